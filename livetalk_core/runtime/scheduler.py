"""Flow-matching step tables for the few-step distilled samplers.

A run feeds the DiT a timestep per step and converts its flow prediction with the matching sigma
(``x0 = x_t - sigma * v``), then re-noises to the next sigma with fresh noise. Upstream computes
both in float32 and then casts the *timesteps* to the run dtype (bf16: 1000/936/832/624), while the
sigmas used for x0 and re-noising stay exact; :class:`StepSchedule` keeps both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StepSchedule:
    """Per denoising step: the float32 timestep and its float32 sigma (``timestep = 1000 * sigma``)."""

    timesteps: tuple[float, ...]
    sigmas: tuple[float, ...]

    def __len__(self) -> int:
        return len(self.timesteps)

    def model_timesteps(self, dtype: torch.dtype) -> list[torch.Tensor]:
        """The timesteps as fed to the model: the float32 values cast to the run dtype."""
        table = torch.tensor(self.timesteps, dtype=torch.float32).to(dtype)
        return list(table)


def shifted_sigmas(num_steps: int, shift: float) -> torch.Tensor:
    """``s = linspace(1, 0, n+1)[:-1]``; ``sigma = shift*s / (1 + (shift-1)*s)``, float32 ``[n]``."""
    s = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float32)[:-1]
    return shift * s / (1 + (shift - 1) * s)


def uniform_schedule(num_steps: int, shift: float, train_timesteps: int = 1000) -> StepSchedule:
    """Evenly spaced steps in the shifted sigma space (LiveTalk: 4 steps, shift 5)."""
    sigmas = shifted_sigmas(num_steps, shift)
    timesteps = sigmas * train_timesteps
    return StepSchedule(tuple(timesteps.tolist()), tuple(sigmas.tolist()))


def warped_schedule(steps: list[int], shift: float, train_timesteps: int = 1000) -> StepSchedule:
    """Steps picked from the full ``train_timesteps``-entry shifted table (Self-Forcing's "warp").

    Step value ``k`` maps to entry ``train_timesteps - k`` of ``[timesteps..., 0]``: e.g. with
    shift 3, [1000, 750, 500, 250] -> [1000, 900, 750, 500].
    """
    sigmas = torch.cat([shifted_sigmas(train_timesteps, shift), torch.zeros(1)])
    timesteps = sigmas * train_timesteps
    picked = [train_timesteps - k for k in steps]
    return StepSchedule(tuple(timesteps[picked].tolist()), tuple(sigmas[picked].tolist()))


LIVETALK_SCHEDULE_SHIFT = 5.0
LIVETALK_STEPS = 4


def livetalk_schedule(num_steps: int = LIVETALK_STEPS) -> StepSchedule:
    return uniform_schedule(num_steps, LIVETALK_SCHEDULE_SHIFT)
