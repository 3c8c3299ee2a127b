"""RealVideo's streaming sampler: reference prefill, then blocks of 2 latent frames.

One session (upstream ``StreamCausalInferencePipeline`` driven as spec §2.6 describes):

1. **Prefill**: the reference latent runs once at t = 0 under the *idle* prompt ("looking at the
   camera") with RoPE frame 30; its keys/values become the cache's permanent sink (stream frame 0).
2. **Blocks** k = 0, 1, ...: stream frames ``1 + 2k`` and ``2 + 2k`` (also their RoPE positions),
   under the *talking* prompt. Fresh noise, 2 or 4 denoising forwards (Self-Forcing's warped steps
   with shift 3), then a refresh forward of the clean result at t = 0 that leaves its keys/values in
   the cache. A block attends to the reference, the previous block and itself (a 5-frame cache).
3. **Audio**: each <= 5 s segment gives ``L`` latent frames; block windows advance by 2 and are
   clamped to ``[L-2, L)``, so a segment lasts ``ceil(L/2)`` blocks and blocks after the last
   segment repeat its final window (upstream's idle behaviour).
   The video's length is :func:`realvideo_video_length`'s: ``floor(16 D) + 1`` frames for D seconds.
   A block decodes to 8 frames, the first to 5 (the VAE's first latent frame is one image), so the
   segments' own blocks fall 3 frames short of the audio: one more block, idling on the last
   window, is sampled when needed and the decoded frames are trimmed to the audio.
4. **Sink drift**: from the first block whose first frame is past 20, every block first advances
   the cached reference keys by one temporal RoPE step (upstream rotates them in place once per
   block). Without it blocks >= 10 differ from upstream by 1-3 %.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InputError
from ..media.audio_file import SAMPLE_RATE
from ..media.text_encoder import TEXT_LEN, pad_to_text_len
from ..media.timing import (
    VIDEO_FPS,
    VIDEO_FRAMES_PER_LATENT,
    VideoLength,
    samples_for_duration,
    video_frames_for_latents,
    video_frames_for_samples,
)
from ..media.vae import LATENT_CHANNELS
from ..parallel import sequence_parallel
from ..runtime.cuda_graphs import ForwardGraphs
from ..runtime.denoise import StepHook, denoise_block
from ..runtime.noise import NoiseSource, to_device
from ..runtime.scheduler import StepSchedule, warped_schedule
from ..runtime.workspace import Workspace
from ..wan.dit import HEAD_DIM
from ..wan.kv_cache import CachePolicy, KVCache
from ..wan.rope import grid_rotations
from .model import AudioTokens, S2VDiT

FRAMES_PER_BLOCK = 2
REALVIDEO_CACHE = CachePolicy(window_frames=1 + 2 * FRAMES_PER_BLOCK, sink_frames=1)
REFERENCE_ROPE_POSITION = 30
SINK_DRIFT_AFTER_FRAME = 20
SCHEDULE_SHIFT = 3.0
STEP_LISTS = {2: (1000, 500), 4: (1000, 750, 500, 250)}


def latent_frames(features: torch.Tensor) -> int:
    """Latent frames a segment's audio input ``[1, layers, A, F]`` covers (upstream ``F // 4``)."""
    return features.shape[-1] // VIDEO_FRAMES_PER_LATENT


def realvideo_video_length(num_samples: int, duration: float | None = None) -> VideoLength:
    """RealVideo's video for ``num_samples`` of 16 kHz audio, or for ``duration`` seconds when given
    (shorter than the audio: the video stops there; longer: it idles on the last audio window).

    ``floor(16 D) + 1`` frames (:func:`~.audio.video_frames_for_samples`), from the fewest blocks
    whose decoded frames (``8 b - 3``) reach that many; the decoder trims the surplus.
    """
    if duration is not None:
        num_samples = samples_for_duration(duration)
    if num_samples < 1:
        raise InputError("The audio is empty (0 samples). Give a clip with speech.")
    num_video_frames = video_frames_for_samples(num_samples)
    frames_per_block = video_frames_for_latents(2 * FRAMES_PER_BLOCK) - video_frames_for_latents(FRAMES_PER_BLOCK)
    first_block_deficit = frames_per_block - video_frames_for_latents(FRAMES_PER_BLOCK)
    return VideoLength(
        num_samples=num_samples,
        num_blocks=-(-(num_video_frames + first_block_deficit) // frames_per_block),  # ceil
        num_video_frames=num_video_frames,
        block_samples=frames_per_block * SAMPLE_RATE // VIDEO_FPS,
    )


def realvideo_schedule(num_steps: int = 4) -> StepSchedule:
    """Upstream's step tables: 4 steps (the default) -> t = 1000/900/750/500, 2 steps -> 1000/750."""
    if num_steps not in STEP_LISTS:
        raise InputError(f"RealVideo samples with 2 or 4 steps, not {num_steps}.")
    return warped_schedule(list(STEP_LISTS[num_steps]), shift=SCHEDULE_SHIFT)


@dataclass(frozen=True)
class BlockPlan:
    """What one block is conditioned on."""

    segment: int  # index of the audio segment
    audio_ptr: int  # first latent audio frame of the block's 2-frame window
    talking: bool = True  # talking prompt (else the idle prompt)


def plan_blocks(segment_frames: Sequence[int], num_blocks: int | None = None) -> list[BlockPlan]:
    """Segments back to back under the talking prompt (spec §2.6); with ``num_blocks`` larger than
    the audio needs, the extra blocks repeat the last window; smaller, the plan is cut short."""
    if not segment_frames:
        raise InputError("RealVideo needs at least one audio segment.")
    plan = []
    for index, frames in enumerate(segment_frames):
        if frames < FRAMES_PER_BLOCK:
            raise InputError(
                f"Audio segment {index} covers {frames} latent frame(s); a block needs {FRAMES_PER_BLOCK} "
                "(0.5 s of audio)."
            )
        plan += [BlockPlan(index, min(ptr, frames - FRAMES_PER_BLOCK)) for ptr in range(0, frames, FRAMES_PER_BLOCK)]
    if num_blocks is not None:
        if num_blocks < 1:
            raise InputError(f"The number of blocks must be at least 1, got {num_blocks}.")
        plan = plan[:num_blocks] + [plan[-1]] * max(num_blocks - len(plan), 0)
    return plan


def pad_context(context: torch.Tensor, text_dim: int) -> torch.Tensor:
    """A prompt embedding ``[1, L, text_dim]`` (L <= ``TEXT_LEN``) zero-padded to ``TEXT_LEN`` rows.

    Padding rows are attended, unmasked, as upstream does, so the padding is part of the prompt.
    """
    if context.ndim == 2:
        context = context.unsqueeze(0)
    if context.ndim != 3 or context.shape[0] != 1 or context.shape[2] != text_dim or context.shape[1] > TEXT_LEN:
        raise InputError(
            f"A prompt embedding must be [1, <= {TEXT_LEN}, {text_dim}] (umT5 output); got {tuple(context.shape)}."
        )
    return pad_to_text_len(context)


def _check_reference(ref_latent: torch.Tensor, patch: tuple[int, int, int]) -> None:
    if ref_latent.ndim != 5 or ref_latent.shape[:3] != (1, LATENT_CHANNELS, 1):
        raise InputError(
            f"The reference latent must be [1, {LATENT_CHANNELS}, 1, h, w]; got {tuple(ref_latent.shape)}."
        )
    h, w = ref_latent.shape[3:]
    if h % patch[1] or w % patch[2]:
        raise InputError(f"The reference latent's size {h}x{w} must be a multiple of {patch[1]}x{patch[2]}.")


def _check_audio(audio_features: Sequence[torch.Tensor], layers: int, width: int) -> None:
    for i, f in enumerate(audio_features):
        if f.ndim != 4 or f.shape[0] != 1 or tuple(f.shape[1:3]) != (layers, width):
            raise InputError(
                f"Audio segment {i} has features of shape {tuple(f.shape)}; this DiT expects [1, {layers}, {width}, "
                f"frames]: {layers} hidden states of a {width}-wide wav2vec2 (wav2vec2-large-xlsr-53-english for "
                "the release)."
            )


def _check_plan_entry(entry: BlockPlan, audio_features: Sequence[torch.Tensor]) -> None:
    if not (0 <= entry.segment < len(audio_features)) or not (
        0 <= entry.audio_ptr <= latent_frames(audio_features[entry.segment]) - FRAMES_PER_BLOCK
    ):
        raise InputError(f"Block plan entry {entry} does not fit the {len(audio_features)} audio segment(s) given.")


@torch.no_grad()
def sample_realvideo(
    model: S2VDiT,
    *,
    ref_latent: torch.Tensor,
    idle_context: torch.Tensor,
    talking_context: torch.Tensor,
    audio_features: Sequence[torch.Tensor],
    noise: NoiseSource,
    plan: Iterable[BlockPlan] | None = None,
    num_blocks: int | None = None,
    schedule: StepSchedule | None = None,
    on_step: StepHook | None = None,
    grid_offset: tuple[int, int] = (0, 0),
    workspace: Workspace | None = None,
) -> Iterator[torch.Tensor]:
    """Generate RealVideo latents block by block (see the module doc).

    Args:
        ref_latent: normalised VAE latent of the reference image ``[1, 16, 1, h, w]``.
        idle_context, talking_context: umT5 embeddings ``[1, <=512, text_dim]`` of
            "A character is looking at the camera." (prefill) and "A character is talking."
        audio_features: per segment :func:`~.realvideo_audio.segment_features` ``[1, 25, A, F]``.
        noise: initial draws are requested as ``[1, 2, 16, h, w]`` and re-noise draws as
            ``[2, 16, h, w]`` (upstream's layouts, so recorded noise replays as is).
        plan: per-block conditioning; default :func:`plan_blocks` over the segments (``num_blocks``).
            A live session passes an endless iterator, read when each block starts, and
            ``audio_features`` that grow meanwhile (each entry checked when its block starts).
        schedule: default :func:`realvideo_schedule` (4 steps).
        grid_offset: (h, w) patch offset of this latent shard under sequence parallelism.
        workspace: the KV cache and CUDA graphs to use and keep for the next run; None: its own,
            which lives only as long as this generator (closing it early frees it).
    Yields:
        clean latents per block ``[1, 16, 2, h, w]`` in the model dtype.
    """
    core = model.config
    _check_reference(ref_latent, core.patch_size)
    _check_audio(audio_features, model.s2v_config.audio_layers, model.s2v_config.audio_dim)
    schedule = schedule or realvideo_schedule()
    if plan is None:
        plan = plan_blocks([latent_frames(f) for f in audio_features], num_blocks)
    plan_length = len(plan) if isinstance(plan, Sequence) else None  # None: endless (live)
    for b in plan if plan_length is not None else ():
        _check_plan_entry(b, audio_features)
    device = model.device
    run = (workspace or Workspace()).run(model, REALVIDEO_CACHE, **_cache_size(model, ref_latent),
                                         forwards_per_block=len(schedule) + 1,
                                         shapes=(tuple(ref_latent.shape), grid_offset, model.dtype))
    with run as (cache, graphs, text):
        context_kv = {  # both prompts' K/V; a block's is shown in the one text slot the graphs read
            talking: model.project_context(pad_context(ctx, core.text_dim).to(device))
            for talking, ctx in ((False, idle_context), (True, talking_context))
        }
        session = _Session(model, cache, graphs, grid_offset, noise, schedule, on_step, ref_latent.shape[-2:])
        audio: dict[int, AudioTokens] = {}
        # One temporal RoPE step, spatial pairs untouched (identity): the per-block sink drift.
        drift = grid_rotations(torch.tensor([1]), 1, 1, HEAD_DIM).to(device)
        model.prefill(ref_latent.to(device), text.show(context_kv[False]), cache, REFERENCE_ROPE_POSITION, grid_offset)
        for block, entry in enumerate(plan):
            if plan_length is None:
                _check_plan_entry(entry, audio_features)
            start = REALVIDEO_CACHE.sink_frames + FRAMES_PER_BLOCK * block
            if entry.segment not in audio:
                audio = {entry.segment: model.encode_audio(audio_features[entry.segment])}
            if start > SINK_DRIFT_AFTER_FRAME:
                for layer in range(core.num_layers):
                    cache.rotate_sink_keys(layer, drift)
            predict = session.predictor(audio[entry.segment].window(entry.audio_ptr, FRAMES_PER_BLOCK),
                                        text.show(context_kv[entry.talking]), start)
            x0 = session.denoise(block, predict)
            yield x0
            if plan_length is None or block + 1 < plan_length:
                predict(x0, torch.zeros((), device=device), compute_output=False)


def _cache_size(model: S2VDiT, ref_latent: torch.Tensor) -> dict[str, int]:
    """RealVideo's KV cache size for a reference latent of this size (this rank's shard of it)."""
    core = model.config
    h, w = ref_latent.shape[-2:]
    # Under sequence parallelism each rank caches every token of its share of the heads.
    ranks = 1 if (sp := sequence_parallel.attached(model)) is None else sp.world_size
    return {"frame_tokens": (h // core.patch_size[1]) * (w // core.patch_size[2]) * ranks,
            "num_heads": core.num_heads // ranks}


@dataclass(frozen=True)
class _Session:
    """What every block of one :func:`sample_realvideo` call shares."""

    model: S2VDiT
    cache: KVCache
    graphs: ForwardGraphs | None
    grid_offset: tuple[int, int]
    noise: NoiseSource
    schedule: StepSchedule
    on_step: StepHook | None
    latent_hw: tuple[int, int]

    def predictor(self, window: Any, context_kv: Any, start: int) -> Callable[..., torch.Tensor | None]:
        """The DiT's flow prediction for the block at stream frame ``start`` (its audio ``window``)."""

        def predict(x: torch.Tensor, t: torch.Tensor, compute_output: bool = True) -> torch.Tensor | None:
            # float64 so the sinusoid sees the float32 timestep without a second rounding.
            return self.model(x, t.double(), window, context_kv, self.cache, start, compute_output, self.grid_offset,
                              self.graphs)

        return predict

    def denoise(self, block: int, predict: Callable[..., torch.Tensor | None]) -> torch.Tensor:
        """Block ``block``'s clean latents ``[1, 16, 2, h, w]`` from its noise (upstream's layouts:
        initial draws ``[1, 2, 16, h, w]``, re-noise draws ``[2, 16, h, w]``)."""
        frames = (FRAMES_PER_BLOCK, LATENT_CHANNELS, *self.latent_hw)
        x = to_device(self.noise.initial(block, (1, *frames)), self.model.device).to(self.model.dtype).transpose(1, 2)
        on_step = self.on_step
        return denoise_block(
            predict,
            x,
            self.schedule,
            renoise=lambda step: self.noise.renoise(block, step, frames).transpose(0, 1).unsqueeze(0),
            on_step=None if on_step is None else (lambda step, x0: on_step(block, step, x0)),
            x0_from_timestep=True,
        )
