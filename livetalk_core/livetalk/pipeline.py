"""LiveTalk 1.3B end to end: reference image + speech + text context -> streamed video frames.

The steps are separate so that ComfyUI nodes, the CLI and the tests share them:

1. :meth:`LiveTalkPipeline.encode_reference` — crop/resize, VAE-encode the reference image.
2. :meth:`LiveTalkPipeline.encode_audio` — pad the speech to whole blocks, wav2vec2 features, the
   DiT's audio embeddings, and how many video frames to keep at the end.
3. :meth:`LiveTalkPipeline.sample` — the block-causal sampler (a generator of latent blocks).
4. :meth:`LiveTalkPipeline.decode` — streaming VAE decode, trimmed to the audio length.

Video length (:func:`livetalk_video_length`, the one place it is derived): a clip of D seconds gives
``floor(16 D) + 1`` frames (upstream's ``16D + 1`` for whole seconds), so the video lasts
``(D, D + 1/16]`` s. Latent frames come in blocks of 3, so the speech is padded with silence to the
block grid (upstream instead requires D = 3n+2 seconds, and stretches shorter audio); the extra
frames are dropped after decoding. For the durations upstream accepts, nothing is padded and the
results are upstream's.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import InputError
from ..family_base import fit_waveform
from ..media.audio_file import SAMPLE_RATE
from ..media.image import cover_and_crop
from ..media.timing import (
    CoversVideoLength,
    VideoLength,
    samples_for_duration,
    video_frames_for_latents,
    video_frames_for_samples,
)
from ..media.vae import WanVAE
from ..media.wav2vec2 import AudioEncoder, livetalk_audio_features
from ..runtime.concurrent import run_concurrently
from ..runtime.decode_stream import decode_blocks
from ..runtime.denoise import StepHook
from ..runtime.noise import NoiseSource, SeededNoise
from ..runtime.workspace import Workspace
from .audio import check_audio_encoder, latents_covering, pad_waveform_to_blocks, samples_for_latents
from .model import LiveTalkDiT
from .sampler import LIVETALK_FRAMES_PER_BLOCK, sample_livetalk

MIN_AUDIO_SECONDS = 0.05


@dataclass
class AudioConditioning(CoversVideoLength):
    """Audio prepared for one video.

    embeds: the DiT's per-layer audio terms ``[1, P, F, C]`` for all F latent frames.
    length: the blocks to sample and the frames to keep after decoding (:func:`livetalk_video_length`).
    """

    embeds: torch.Tensor
    length: VideoLength

    @property
    def num_latent_frames(self) -> int:
        return self.embeds.shape[2]


def livetalk_video_length(num_samples: int) -> VideoLength:
    """LiveTalk's video for ``num_samples`` of 16 kHz audio: ``floor(16 D) + 1`` frames
    (:func:`~.audio.video_frames_for_samples`) from the fewest 3-frame blocks whose audio span holds
    every sample (:func:`~.audio.pad_waveform_to_blocks` pads to it); the decoder trims the rest.

    Refuses audio shorter than ``MIN_AUDIO_SECONDS``.
    """
    if num_samples < MIN_AUDIO_SECONDS * SAMPLE_RATE:
        raise InputError(
            f"The audio is {num_samples / SAMPLE_RATE:.3f} s long; at least {MIN_AUDIO_SECONDS} s is needed. "
            "Check the file or the duration."
        )
    num_latent_frames = latents_covering(num_samples, LIVETALK_FRAMES_PER_BLOCK)
    return VideoLength(
        num_samples=num_samples,
        num_blocks=num_latent_frames // LIVETALK_FRAMES_PER_BLOCK,
        num_video_frames=video_frames_for_samples(num_samples),
        block_samples=samples_for_latents(LIVETALK_FRAMES_PER_BLOCK),
    )


def video_frames_for_duration(seconds: float) -> int:
    """Frames at times 0, 1/16, ... up to ``seconds``: ``floor(16 * seconds) + 1`` (see
    :func:`~.audio.video_frames_for_samples`)."""
    return video_frames_for_samples(samples_for_duration(seconds))


@torch.no_grad()
def encode_audio(
    dit: LiveTalkDiT, audio_encoder: AudioEncoder, waveform_16k: torch.Tensor, duration: float | None = None
) -> AudioConditioning:
    """Mono 16 kHz speech ``[N]`` -> :class:`AudioConditioning` (``duration`` trims or pads, in s)."""
    check_audio_encoder(dit, audio_encoder)
    waveform = fit_waveform(torch.as_tensor(waveform_16k, dtype=torch.float32).flatten(), duration)
    length = livetalk_video_length(waveform.shape[0])
    padded, num_latent_frames = pad_waveform_to_blocks(waveform, LIVETALK_FRAMES_PER_BLOCK)
    features = livetalk_audio_features(
        audio_encoder, padded.to(audio_encoder.device), video_frames_for_latents(num_latent_frames)
    )
    embeds = dit.embed_audio(features.to(dit.device))
    return AudioConditioning(embeds=embeds, length=length)


class LiveTalkPipeline:
    """The loaded LiveTalk models and the steps that connect them (no ComfyUI import)."""

    def __init__(self, dit: LiveTalkDiT, vae: WanVAE, audio_encoder: AudioEncoder) -> None:
        check_audio_encoder(dit, audio_encoder)
        self.dit, self.vae, self.audio_encoder = dit, vae, audio_encoder
        self.decoder = vae  # what decode() uses: the VAE, or a tiny decoder with its interface (media.taehv)

    @torch.no_grad()
    def encode_reference(self, image: torch.Tensor | np.ndarray, height: int = 512, width: int = 512) -> torch.Tensor:
        """Image ``[H, W, C]`` (uint8 or float in [0, 1]) -> reference latent ``[1, 16, 1, h, w]`` float32."""
        pixels = cover_and_crop(image, height, width)
        return self.vae.encode(pixels.to(self.vae.device, self.vae.dtype))

    def encode_audio(self, waveform_16k: torch.Tensor, duration: float | None = None) -> AudioConditioning:
        """See :func:`encode_audio`."""
        return encode_audio(self.dit, self.audio_encoder, waveform_16k, duration)

    def encode_inputs(self, image: torch.Tensor | np.ndarray, waveform_16k: torch.Tensor, height: int = 512,
                      width: int = 512, duration: float | None = None) -> tuple[torch.Tensor, AudioConditioning]:
        """:meth:`encode_reference` and :meth:`encode_audio` at the same time (two threads, two CUDA
        streams: :func:`~..runtime.concurrent.run_concurrently`), the same results: block 0 waits for
        the longer of the two instead of their sum."""
        return run_concurrently(lambda: self.encode_reference(image, height, width),
                                lambda: self.encode_audio(waveform_16k, duration), device=self.dit.device)

    def sample(
        self,
        ref_latent: torch.Tensor,
        audio: AudioConditioning,
        context: torch.Tensor,
        noise: NoiseSource | int = 0,
        on_step: StepHook | None = None,
        num_blocks: int | None = None,
        workspace: Workspace | None = None,
    ) -> Iterator[torch.Tensor]:
        """Latent blocks ``[1, 16, 3, h, w]`` one at a time (see :func:`sample_livetalk`).

        ``noise`` is a seed or a :class:`NoiseSource`; ``num_blocks`` defaults to what the audio covers.
        ``workspace``: a :class:`~..runtime.workspace.Workspace` kept by the caller across runs (the KV
        cache and CUDA graphs stay, so block 0 replays once its layouts are captured); None: this run's own.
        """
        if isinstance(noise, int):
            noise = SeededNoise(noise)
        return sample_livetalk(
            self.dit,
            ref_latent=ref_latent,
            audio_embeds=audio.embeds,
            context=context,
            num_blocks=audio.num_blocks if num_blocks is None else num_blocks,
            noise=noise,
            on_step=on_step,
            workspace=workspace,
        )

    def stream(
        self,
        ref_latent: torch.Tensor,
        audio: AudioConditioning,
        context: torch.Tensor,
        noise: NoiseSource | int = 0,
        overlap: bool = True,
        workspace: Workspace | None = None,
    ) -> Iterator[torch.Tensor]:
        """Sample and decode: uint8 frames ``[T, H, W, 3]`` as they are ready, trimmed to the audio
        (``workspace``: as in :meth:`sample`).

        The first frame comes out before the DiT has run: block 0's latent frame 0 is the reference
        latent itself (the sampler pins it), so it is decoded straight away (see :meth:`decode`).
        """
        return self.decode(
            self.sample(ref_latent, audio, context, noise, workspace=workspace),
            audio.num_video_frames,
            overlap=overlap,
            first_latent_frame=ref_latent.to(self.dit.dtype),
        )

    def decode(
        self,
        blocks: Iterator[torch.Tensor],
        num_video_frames: int | None = None,
        overlap: bool = True,
        first_latent_frame: torch.Tensor | None = None,
    ) -> Iterator[torch.Tensor]:
        """See :func:`~.decode_stream.decode_blocks` (with this pipeline's :attr:`decoder`)."""
        return decode_blocks(self.decoder, blocks, num_video_frames, overlap=overlap,
                             first_latent_frame=first_latent_frame)

    def generate(
        self,
        image: torch.Tensor | np.ndarray,
        waveform_16k: torch.Tensor,
        context: torch.Tensor,
        *,
        seed: int = 0,
        height: int = 512,
        width: int = 512,
        duration: float | None = None,
    ) -> Iterator[torch.Tensor]:
        """All steps in one call: uint8 frames ``[T, H, W, 3]`` per block."""
        ref_latent, audio = self.encode_inputs(image, waveform_16k, height, width, duration)
        return self.stream(ref_latent, audio, context, seed)
