"""Where the sampler's Gaussian noise comes from.

The sampler asks for one initial draw per block and one draw per re-noise step, in that order.
:class:`SeededNoise` draws them from a seeded CPU generator in float32 and then moves them, so a
seed gives the same video on any device and with any number of GPUs. Parity tests replay the
exact upstream tensors through :class:`ReplayNoise`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch


class NoiseSource(Protocol):
    def initial(self, block: int, shape: Sequence[int]) -> torch.Tensor:
        """Noise the block starts from, float32 ``shape``."""

    def renoise(self, block: int, step: int, shape: Sequence[int]) -> torch.Tensor:
        """Noise mixed into step ``step``'s x0 to reach the next step, float32 ``shape``."""


class SeededNoise:
    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator("cpu").manual_seed(int(seed))

    def initial(self, block: int, shape: Sequence[int]) -> torch.Tensor:
        return torch.randn(tuple(shape), generator=self.generator, dtype=torch.float32)

    def renoise(self, block: int, step: int, shape: Sequence[int]) -> torch.Tensor:
        return torch.randn(tuple(shape), generator=self.generator, dtype=torch.float32)


class ReplayNoise:
    """Noise given as functions of (block) and (block, step), e.g. slices of recorded tensors."""

    def __init__(
        self,
        initial: Callable[[int], torch.Tensor],
        renoise: Callable[[int, int], torch.Tensor],
    ) -> None:
        self._initial, self._renoise = initial, renoise

    def initial(self, block: int, shape: Sequence[int]) -> torch.Tensor:
        return self._checked(self._initial(block), shape)

    def renoise(self, block: int, step: int, shape: Sequence[int]) -> torch.Tensor:
        return self._checked(self._renoise(block, step), shape)

    @staticmethod
    def _checked(noise: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        if tuple(noise.shape) != tuple(shape):
            raise ValueError(f"replayed noise has shape {tuple(noise.shape)}, the sampler needs {tuple(shape)}")
        return noise


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` (the samplers' noise draws and timesteps) on ``device`` without stalling the CPU: a
    plain copy from pageable memory waits for every kernel queued before it, so a GPU copy goes
    through pinned memory, asynchronously."""
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
