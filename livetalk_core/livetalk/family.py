"""LiveTalk 1.3B as a :class:`~.family_base.ModelFamily`: wav2vec2-base features through the DiT's
audio projection, a reference cropped (or stretched) to the chosen size, blocks of 3 latent frames
with a sliding KV cache of sink frames."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..family_base import ModelFamily, Shapes, StepHook, find_tensor, text_context
from ..media.image import check_target_size, cover_and_crop, to_float_image
from ..media.timing import VideoLength
from ..media.weights import LIVETALK_FILES
from ..runtime.live_stream import LiveWindow
from ..runtime.noise import SeededNoise
from ..runtime.scheduler import LIVETALK_STEPS, livetalk_schedule
from ..runtime.workspace import Workspace
from ..wan.kv_cache import CachePolicy
from .audio import WAV2VEC2_BASE_HINT, encoder_features
from .live import LiveTalkStream
from .model import VIDEO_FRAMES_PER_LATENT, LiveTalkDiT, load_livetalk_dit
from .pipeline import AudioConditioning, encode_audio, livetalk_video_length
from .sampler import LIVETALK_CACHE, sample_livetalk

LIVETALK_PROMPT = (
    "A person talks to the camera with a steady gaze, natural facial expressions and lip movements "
    "that follow the speech."
)


def stretch(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize to exactly ``height x width`` ignoring the aspect ratio -> ``[1, 3, 1, H, W]`` in [-1, 1]."""
    check_target_size(height, width)
    pixels = to_float_image(image).permute(2, 0, 1).unsqueeze(0)
    pixels = F.interpolate(pixels, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    return (pixels * 2.0 - 1.0).unsqueeze(2)


class LiveTalkFamily(ModelFamily):
    name = "LiveTalk 1.3B"
    marker = "audio_proj.proj.weight"
    audio_encoder_hint = WAV2VEC2_BASE_HINT
    conditioning_type = AudioConditioning
    talking_prompt = LIVETALK_PROMPT
    default_steps = LIVETALK_STEPS
    default_cache_policy = LIVETALK_CACHE
    reference_is_first_latent = True  # the sampler pins block 0's first latent frame to the reference
    weight_files = LIVETALK_FILES

    def load(
        self, path: str | os.PathLike, dtype: torch.dtype, device: torch.device | str, **options: Any
    ) -> LiveTalkDiT:
        return load_livetalk_dit(path, dtype, device, **options)

    def audio_features(self, shapes: Shapes) -> int:
        return find_tensor(shapes, "audio_proj.proj.weight")[1] // VIDEO_FRAMES_PER_LATENT

    def encoder_features(self, layers: int, hidden: int) -> int:
        return encoder_features(layers, hidden)

    def video_length(self, num_samples: int) -> VideoLength:
        return livetalk_video_length(num_samples)

    def encode_audio(self, dit: LiveTalkDiT, encoder: Any, waveform: torch.Tensor,
                     output_device: torch.device | str) -> AudioConditioning:
        conditioning = encode_audio(dit, encoder, waveform)
        return dataclasses.replace(conditioning, embeds=conditioning.embeds.to(output_device))

    def reference_pixels(self, image: torch.Tensor, width: int, height: int, crop: str,
                         device: torch.device | str) -> torch.Tensor:
        return cover_and_crop(image, height, width) if crop == "center" else stretch(image, height, width)

    def text_dim(self, dit: LiveTalkDiT) -> int:
        return dit.livetalk_config.core.text_dim

    def sample_blocks(self, dit: LiveTalkDiT, *, conditioning: list, idle_conditioning: list | None,
                      reference: torch.Tensor, audio: AudioConditioning, seed: int, steps: int,
                      cache_policy: CachePolicy, on_step: StepHook | None = None,
                      workspace: Workspace | None = None):
        """LiveTalk's loop; ``idle_conditioning`` is not used (one prompt for the whole video)."""
        return sample_livetalk(
            dit,
            ref_latent=reference,
            audio_embeds=audio.embeds,
            context=text_context(conditioning, self.text_dim(dit)),
            num_blocks=audio.num_blocks,
            noise=SeededNoise(seed),
            schedule=livetalk_schedule(steps),
            cache_policy=cache_policy,
            on_step=on_step,
            workspace=workspace,
        )

    def open_live_stream(self, dit: LiveTalkDiT, encoder: Any, *, conditioning: list, idle_conditioning: list | None,
                         reference: torch.Tensor, seed: int, steps: int | None, window: LiveWindow,
                         workspace: Workspace | None = None) -> LiveTalkStream:
        """LiveTalk's live blocks (:mod:`.live`); ``idle_conditioning`` is not used (silence only)."""
        return LiveTalkStream(dit, encoder, context=text_context(conditioning, self.text_dim(dit)),
                              reference=reference, seed=seed, steps=steps, window=window, workspace=workspace)

    def smoke_weights(self, folder: Path):
        from ..smoke import build_tiny_weights

        return build_tiny_weights(folder)


LIVETALK_13B = LiveTalkFamily()
