"""RealVideo 14B (Wan2.2-S2V) as a :class:`~.family_base.ModelFamily`: wav2vec2-large features per
5 s segment (the DiT applies its audio front end per block), RealVideo's size rule for the
reference, blocks of 2 latent frames after a prefill of the reference under the idle prompt."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError
from ..family_base import ModelFamily, RemoteSampler, Shapes, StepHook, find_tensor, fit_waveform, text_context
from ..media.timing import CoversVideoLength, VideoLength
from ..media.weights import WAN_VAE_FILE
from ..options import RuntimeOptions
from ..parallel.worker_process import WorkerJob
from ..runtime.live_stream import LiveWindow
from ..runtime.noise import SeededNoise
from ..runtime.workspace import Workspace
from ..wan.kv_cache import CachePolicy
from .audio import realvideo_audio_features
from .image import preprocess_reference
from .live import RealVideoStream
from .live_remote import RemoteRealVideoStream
from .model import S2VDiT, load_s2v_dit, s2v_checkpoint_kind
from .parallel import sample_realvideo_parallel
from .parallel import worker_job as realvideo_worker_job
from .sampler import STEP_LISTS, realvideo_schedule, realvideo_video_length, sample_realvideo

WAV2VEC2_LARGE_HINT = (
    "wav2vec2_large_english_fp16.safetensors (Comfy-Org/Wan_2.2_ComfyUI_Repackaged, split_files/audio_encoders) "
    "or the jonatasgrosman/wav2vec2-large-xlsr-53-english folder"
)
# Upstream's prompts: the reference is prefilled under the idle one, the blocks use the talking one.
REALVIDEO_IDLE_PROMPT = "A character is looking at the camera."
REALVIDEO_TALKING_PROMPT = "A character is talking."


@dataclass
class RealVideoAudio(CoversVideoLength):
    """RealVideo's audio input: per <= 5 s segment the wav2vec2 features ``[1, 25, A, F]`` (in the
    DiT's dtype), and the video's length (:func:`~.realvideo_sampler.realvideo_video_length`): the
    fewest blocks whose frames cover the audio; past the last segment, blocks repeat its final audio
    window (upstream's idle behaviour) until then."""

    features: list[torch.Tensor]
    length: VideoLength


class RealVideoFamily(ModelFamily):
    name = "RealVideo 14B"
    marker = "casual_audio_encoder.encoder.final_linear.weight"
    audio_encoder_hint = WAV2VEC2_LARGE_HINT
    conditioning_type = RealVideoAudio
    # Upstream runs wav2vec2 in float32 whatever the DiT's precision.
    audio_encoder_dtype = torch.float32
    fp8_and_partial_files = True
    supports_sequence_parallel = True
    audio_uses_dit = False  # the DiT takes the features per block; only its dtype is read here
    idle_prompt = REALVIDEO_IDLE_PROMPT
    talking_prompt = REALVIDEO_TALKING_PROMPT
    step_counts = tuple(STEP_LISTS)
    weight_files = (WAN_VAE_FILE,)  # the DiT and its wav2vec2 are given (--dit, --wav2vec2)
    base_name_mark = "s2v"  # Wan2.2-S2V-14B, which RealVideo's partial model.pt is applied over
    smoke_size = "128x64"  # an area: the tiny model's video keeps the image's aspect ratio

    def matches(self, shapes: Shapes) -> bool:
        """The marker, or a partial fine-tune (which may lack it)."""
        return super().matches(shapes) or s2v_checkpoint_kind(shapes) is not None

    def checkpoint_kind(self, shapes: Shapes) -> str | None:
        return s2v_checkpoint_kind(shapes) if self.matches(shapes) else None

    def load(self, path: str | os.PathLike, dtype: torch.dtype, device: torch.device | str, **options: Any) -> S2VDiT:
        return load_s2v_dit(path, dtype, device, **options)

    def audio_features(self, shapes: Shapes) -> int:
        """The S2V DiT mixes ``weights.shape[1]`` hidden states, each as wide as its first conv's input."""
        layers = find_tensor(shapes, "casual_audio_encoder.weights")[1]
        return layers * find_tensor(shapes, "casual_audio_encoder.encoder.conv1_local.conv.weight")[1]

    def encoder_features(self, layers: int, hidden: int) -> int:
        return (layers + 1) * hidden  # h0 ... hL, all of them

    def video_length(self, num_samples: int) -> VideoLength:
        return realvideo_video_length(num_samples)

    def encode_audio(self, dit: Any, encoder: Any, waveform: torch.Tensor,
                     output_device: torch.device | str) -> RealVideoAudio:
        """Features per 5 s segment; ``dit`` (here or on workers) only gives the dtype."""
        length = realvideo_video_length(waveform.numel())
        segments = realvideo_audio_features(encoder, waveform.to(encoder.device), dit.dtype)
        return RealVideoAudio(features=[f.to(output_device) for f in segments], length=length)

    def reference_pixels(self, image: torch.Tensor, width: int, height: int, crop: str,
                         device: torch.device | str) -> torch.Tensor:
        """RealVideo's rule whatever ``crop``: ``width x height`` is an area, the aspect ratio the image's."""
        return preprocess_reference(image, area=width * height, device=device)[0].unsqueeze(2)

    def text_dim(self, dit: Any) -> int:
        return dit.config.text_dim

    def sample_blocks(self, dit: Any, *, conditioning: list, idle_conditioning: list | None,
                      reference: torch.Tensor, audio: RealVideoAudio, seed: int, steps: int,
                      cache_policy: CachePolicy, on_step: StepHook | None = None,
                      workspace: Workspace | None = None):
        """RealVideo's blocks, here or on the worker processes of a :class:`~.family_base.RemoteSampler`
        (the same blocks, in their own workspace); without an idle prompt the talking one also fills
        the prefill. The cache is RealVideo's own (``cache_policy`` is not used)."""
        talking = text_context(conditioning, self.text_dim(dit))
        idle = talking if idle_conditioning is None else text_context(idle_conditioning, self.text_dim(dit))
        inputs = dict(
            ref_latent=reference.to(dit.dtype),
            idle_context=idle,
            talking_context=talking,
            audio_features=audio.features,
            num_blocks=audio.num_blocks,
            schedule=realvideo_schedule(steps),  # refuses anything but 2 or 4 steps
        )
        if isinstance(dit, RemoteSampler):
            return dit.generate(seed=seed, **inputs)
        return sample_realvideo(dit, noise=SeededNoise(seed), on_step=on_step, workspace=workspace, **inputs)

    def worker_job(self, path: str | os.PathLike, options: RuntimeOptions, **load_options: Any) -> WorkerJob:
        return realvideo_worker_job(path, options, **load_options)

    def open_live_stream(self, dit: Any, encoder: Any, *, conditioning: list, idle_conditioning: list | None,
                         reference: torch.Tensor, seed: int, steps: int | None, window: LiveWindow,
                         workspace: Workspace | None = None) -> RealVideoStream | RemoteRealVideoStream:
        """RealVideo's live blocks (:mod:`.live`; :mod:`.live_remote` for a DiT on worker processes, whose
        workers keep their own caches): silent blocks under ``idle_conditioning`` (the talking prompt when
        None), 2 steps unless told."""
        talking = text_context(conditioning, self.text_dim(dit))
        idle = talking if idle_conditioning is None else text_context(idle_conditioning, self.text_dim(dit))
        inputs = dict(idle_context=idle, talking_context=talking, reference=reference, seed=seed, steps=steps,
                      window=window)
        if isinstance(dit, RemoteSampler):
            return RemoteRealVideoStream(dit, encoder, **inputs)
        return RealVideoStream(dit, encoder, workspace=workspace, **inputs)

    # --- the command line ----------------------------------------------------------------------
    def add_cli_arguments(self, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--dit-config", type=Path, default=None,
                           help="the DiT's config.json, read for audio_inject_layers (default: config.json next to "
                           "--dit, if any; only needed for non-release depths)")

    def cli_load_options(self, dit: Path, args: argparse.Namespace) -> dict[str, Any]:
        return {"audio_inject_layers": inject_layers(dit, args.dit_config)}

    def encode_audio_for_duration(self, dit: Any, encoder: Any, waveform: torch.Tensor,
                                  output_device: torch.device | str, duration: float | None) -> RealVideoAudio:
        """Past the end of the audio the blocks repeat its final window (upstream's idling), not silence:
        features for the audio up to ``duration``, and the length of ``duration``."""
        length = self.video_length(fit_waveform(waveform, duration).numel())
        audio = self.encode_audio(dit, encoder, waveform[: length.num_samples], output_device)
        return dataclasses.replace(audio, length=length)

    def smoke_weights(self, folder: Path):
        from ..smoke import build_tiny_realvideo_weights

        return build_tiny_realvideo_weights(folder)

    def parallel_sampler(self, dit: S2VDiT, sp: Any) -> RemoteSampler:
        return ShardedRealVideo(dit, sp)


def inject_layers(dit: Path, config: Path | None) -> list[int] | None:
    """``audio_inject_layers`` from the DiT's config.json (``config``, else the one next to ``dit``), if any."""
    path = config or (dit if dit.is_dir() else dit.parent) / "config.json"
    if not path.is_file():
        if config is not None:
            raise InputError(f"--dit-config {config} does not exist.")
        return None
    try:
        return json.loads(path.read_text()).get("audio_inject_layers")
    except ValueError as exc:
        raise InputError(f"{path} is not valid JSON ({exc}).") from None


class ShardedRealVideo:
    """The DiT of one rank of a torchrun group, as a :class:`~.family_base.RemoteSampler`: each rank
    samples its share of every block and gets the whole blocks (the same video as one GPU)."""

    def __init__(self, dit: S2VDiT, sp: Any) -> None:
        self.dit, self.sp = dit, sp
        self.config, self.dtype = dit.config, dit.dtype

    def generate(self, *, seed: int, **inputs: Any):
        return sample_realvideo_parallel(self.dit, self.sp, noise=SeededNoise(seed), **inputs)


REALVIDEO_14B = RealVideoFamily()
