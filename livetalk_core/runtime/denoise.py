"""The few-step denoising of one block, shared by every family's sampler.

:func:`denoise_block` predicts the flow, converts it to x0 with the step's exact sigma and re-noises
to the next sigma with fresh noise; each family's sampler drives it block by block with its own
model call, noise layout and KV cache.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .noise import to_device
from .scheduler import StepSchedule

StepHook = Callable[[int, int, torch.Tensor], None]
"""Called with (block, step, x0) after every denoising step (between model forwards): parity tests
and previews read x0; ComfyUI's interrupt check raises from it."""


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
