"""Block-causal few-step sampling with a KV cache.

:func:`denoise_block` is the step loop both model paths share: predict the flow, convert it to x0
with the step's exact sigma, re-noise to the next sigma with fresh noise. :func:`sample_livetalk`
drives it block by block for LiveTalk and yields each clean block as soon as it exists, so a caller
can decode block k while block k+1 is sampled. After each block the clean latents are run once more
at t=0 so the cache keeps their keys/values (the "refresh" pass).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from ..runtime.cuda_graphs import session_graphs
from ..runtime.noise import NoiseSource, to_device
from ..runtime.scheduler import StepSchedule, livetalk_schedule
from ..wan.kv_cache import CachePolicy
from .model import LATENT_CHANNELS, LiveTalkDiT

StepHook = Callable[[int, int, torch.Tensor], None]
"""Called with (block, step, x0) after every denoising step; used by parity tests and previews."""

LIVETALK_FRAMES_PER_BLOCK = 3
LIVETALK_CACHE = CachePolicy(window_frames=15, sink_frames=9)


def denoise_block(
    predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    schedule: StepSchedule,
    renoise: Callable[[int], torch.Tensor],
    before_step: Callable[[torch.Tensor], None] | None = None,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
    x0_from_timestep: bool = False,
) -> torch.Tensor:
    """Run the few-step sampler on one block.

    Args:
        predict: ``(x, t) -> v`` with ``t`` the model timestep (0-dim, run dtype).
        x: the block's starting noise in the run dtype, ``[B, 16, F, h, w]``.
        renoise: step index -> float32 noise shaped like ``x``.
        before_step: may edit ``x`` in place before each prediction (e.g. pin the reference frame).
        x0_from_timestep: Self-Forcing's wrapper rule (RealVideo): feed the float32 timestep and
            form ``x0 = x_t - (t/1000) * v`` in float32, keeping x0 in float32 until it is returned.
    Returns:
        x0 of the last step, in the run dtype.
    """
    dtype = x.dtype
    # One copy per block, through pinned memory: a plain copy from pageable memory makes the CPU
    # wait for the GPU's whole queue.
    timesteps = to_device(torch.stack(schedule.model_timesteps(torch.float32 if x0_from_timestep else dtype)), x.device)
    x0 = x
    for i, t in enumerate(timesteps):
        if before_step is not None:
            before_step(x)
        v = predict(x, t)
        if x0_from_timestep:
            x0 = x.float() - (t / 1000) * v.float()
        else:
            # float64 x0 and float32 re-noise, then the run dtype: upstream's precision, kept for parity.
            x0 = (x.double() - schedule.sigmas[i] * v.double()).to(dtype)
        if on_step is not None:
            on_step(i, x0)
        if i + 1 < len(schedule):
            sigma = torch.tensor(schedule.sigmas[i + 1], dtype=torch.float32)
            noise = to_device(renoise(i).float(), x.device)
            x = ((1 - sigma) * x0.float() + sigma * noise).to(dtype)
    return x0.to(dtype)


def reference_conditioning(ref_latent: torch.Tensor, start_frame: int, num_frames: int) -> torch.Tensor:
    """Reference channels for frames ``[start, start+n)``: the latent repeated + a mask that is 0 only
    at stream frame 0. ``ref_latent`` ``[B, 16, 1, h, w]`` -> ``[B, 17, n, h, w]``."""
    b, _, _, h, w = ref_latent.shape
    mask = torch.ones(b, 1, num_frames, h, w, dtype=ref_latent.dtype, device=ref_latent.device)
    if start_frame == 0:
        mask[:, :, 0] = 0
    return torch.cat([ref_latent.expand(-1, -1, num_frames, -1, -1), mask], dim=1)


@torch.no_grad()
def sample_livetalk(
    model: LiveTalkDiT,
    *,
    ref_latent: torch.Tensor,
    audio_embeds: torch.Tensor,
    context: torch.Tensor,
    num_blocks: int,
    noise: NoiseSource,
    dtype: torch.dtype | None = None,
    schedule: StepSchedule | None = None,
    frames_per_block: int = LIVETALK_FRAMES_PER_BLOCK,
    cache_policy: CachePolicy = LIVETALK_CACHE,
    on_step: StepHook | None = None,
) -> Iterator[torch.Tensor]:
    """Generate LiveTalk latents block by block.

    Args:
        ref_latent: normalised VAE latent of the reference image ``[1, 16, 1, h, w]``.
        audio_embeds: :meth:`LiveTalkDiT.embed_audio` output covering at least
            ``num_blocks * frames_per_block`` latent frames, ``[1, P, F, C]``.
        context: text context ``[1, L, text_dim]`` (umT5 output, padded rows zero).
        dtype: run dtype of timesteps, latents and noise (default: the model's).
    Yields:
        clean latents per block ``[1, 16, frames_per_block, h, w]`` in the run dtype; in block 0,
        latent frame 0 is the reference latent itself.
    The KV cache lives only as long as this generator: closing it early (or dropping it) frees it.
    """
    dtype = dtype or model.dtype
    schedule = schedule or livetalk_schedule()
    device = model.device
    _, _, _, h, w = ref_latent.shape
    needed = num_blocks * frames_per_block
    if audio_embeds.shape[2] < needed:
        raise ValueError(f"audio embeddings cover {audio_embeds.shape[2]} latent frames, {needed} are needed")
    ph, pw = model.config.patch_size[1:]
    cache = model.new_kv_cache(cache_policy, frame_tokens=(h // ph) * (w // pw), num_heads=model.config.num_heads)
    graphs = session_graphs(model, cache, forwards_per_block=len(schedule) + 1)
    context_kv = model.project_context(context.to(device))
    ref = ref_latent.to(device)
    ref_in_dtype = ref[:, :, 0].to(dtype)
    shape = (1, LATENT_CHANNELS, frames_per_block, h, w)
    for block in range(num_blocks):
        start = block * frames_per_block
        reference = reference_conditioning(ref, start, frames_per_block)
        audio = audio_embeds[:, :, start : start + frames_per_block].to(device)

        def predict(x: torch.Tensor, t: torch.Tensor, compute_output: bool = True) -> torch.Tensor:
            t_frames = t.to(dtype).expand(1, frames_per_block)
            return model(x, t_frames, reference, audio, context_kv, cache, start, compute_output, graphs)

        def pin_reference(x: torch.Tensor) -> None:
            if start == 0:
                x[:, :, 0] = ref_in_dtype

        x = to_device(noise.initial(block, shape), device).to(dtype)
        x0 = denoise_block(
            predict,
            x,
            schedule,
            renoise=lambda step: noise.renoise(block, step, shape),
            before_step=pin_reference,
            on_step=None if on_step is None else (lambda step, x0: on_step(block, step, x0)),
        )
        pin_reference(x0)
        yield x0
        predict(x0, torch.zeros((), dtype=dtype, device=device), compute_output=False)
