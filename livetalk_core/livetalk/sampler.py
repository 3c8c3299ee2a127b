"""LiveTalk's block-causal few-step sampling with a KV cache.

:func:`sample_livetalk` drives the shared step loop (:func:`~..runtime.denoise.denoise_block`) block
by block and yields each clean block as soon as it exists, so a caller can decode block k while
block k+1 is sampled. After each block the clean latents are run once more
at t=0 so the cache keeps their keys/values (the "refresh" pass).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

import torch

from ..media.vae import LATENT_CHANNELS
from ..runtime.denoise import StepHook, denoise_block
from ..runtime.noise import NoiseSource, to_device
from ..runtime.scheduler import StepSchedule, livetalk_schedule
from ..runtime.workspace import Workspace
from ..wan.kv_cache import CachePolicy
from .model import LiveTalkDiT

LIVETALK_FRAMES_PER_BLOCK = 3
LIVETALK_CACHE = CachePolicy(window_frames=15, sink_frames=9)


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
    audio_embeds: torch.Tensor | Callable[[int], torch.Tensor],
    context: torch.Tensor,
    num_blocks: int | None,
    noise: NoiseSource,
    dtype: torch.dtype | None = None,
    schedule: StepSchedule | None = None,
    frames_per_block: int = LIVETALK_FRAMES_PER_BLOCK,
    cache_policy: CachePolicy = LIVETALK_CACHE,
    on_step: StepHook | None = None,
    workspace: Workspace | None = None,
) -> Iterator[torch.Tensor]:
    """Generate LiveTalk latents block by block.

    Args:
        ref_latent: normalised VAE latent of the reference image ``[1, 16, 1, h, w]``.
        audio_embeds: :meth:`LiveTalkDiT.embed_audio` output covering at least
            ``num_blocks * frames_per_block`` latent frames, ``[1, P, F, C]``; or, for a live
            session whose audio arrives while it runs, a function ``block -> [1, P, frames_per_block, C]``
            called when that block starts.
        num_blocks: how many blocks; None: until the generator is closed (a live session).
        context: text context ``[1, L, text_dim]`` (umT5 output, padded rows zero).
        dtype: run dtype of timesteps, latents and noise (default: the model's).
        workspace: the KV cache and CUDA graphs to use and keep for the next run; None: its own,
            which lives only as long as this generator (closing it early, or dropping it, frees it).
    Yields:
        clean latents per block ``[1, 16, frames_per_block, h, w]`` in the run dtype; in block 0,
        latent frame 0 is the reference latent itself.
    """
    dtype = dtype or model.dtype
    schedule = schedule or livetalk_schedule()
    device = model.device
    _, _, _, h, w = ref_latent.shape
    needed = None if num_blocks is None else num_blocks * frames_per_block
    if isinstance(audio_embeds, torch.Tensor) and (needed is None or audio_embeds.shape[2] < needed):
        raise ValueError(f"audio embeddings cover {audio_embeds.shape[2]} latent frames, {needed} are needed")
    ph, pw = model.config.patch_size[1:]
    run = (workspace or Workspace()).run(model, cache_policy, frame_tokens=(h // ph) * (w // pw),
                                         num_heads=model.config.num_heads, forwards_per_block=len(schedule) + 1,
                                         shapes=(h, w, frames_per_block, tuple(context.shape), dtype))
    with run as (cache, graphs, text):
        context_kv = text.show(model.project_context(context.to(device)), adopt=True)
        ref = ref_latent.to(device)
        ref_in_dtype = ref[:, :, 0].to(dtype)
        shape = (1, LATENT_CHANNELS, frames_per_block, h, w)
        for block in itertools.count() if num_blocks is None else range(num_blocks):
            start = block * frames_per_block
            reference = reference_conditioning(ref, start, frames_per_block)
            audio = (audio_embeds[:, :, start : start + frames_per_block] if isinstance(audio_embeds, torch.Tensor)
                     else audio_embeds(block)).to(device)

            def predict(x: torch.Tensor, t: torch.Tensor, compute_output: bool = True) -> torch.Tensor:
                t_frames = t.to(dtype).expand(1, frames_per_block)
                return model(x, t_frames, reference, audio, context_kv, cache, start, compute_output, graphs)

            def pin_reference(x: torch.Tensor) -> None:
                if start == 0:
                    x[:, :, 0] = ref_in_dtype

            x = to_device(noise.initial(block, shape), device).to(dtype)
            x0 = denoise_block(
                predict, x, schedule,
                renoise=lambda step: noise.renoise(block, step, shape),
                before_step=pin_reference,
                on_step=None if on_step is None else (lambda step, x0: on_step(block, step, x0)),
            )
            pin_reference(x0)
            yield x0
            predict(x0, torch.zeros((), dtype=dtype, device=device), compute_output=False)
