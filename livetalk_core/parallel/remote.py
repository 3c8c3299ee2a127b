"""A DiT that runs on a :class:`~.workers.WorkerGroup`, as a family samples through it (a
:class:`~..family_base.RemoteSampler`): the command line's ``--gpus``. Family-agnostic.

It carries what callers read of a loaded DiT (``config``, ``dtype``, ``weight_shapes``) and passes
:meth:`generate` (a whole video) and :meth:`stream` (a live session, block by block) to the group,
with the inputs moved to the CPU, as the workers take them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from .workers import BlockStream, WorkerGroup


def on_cpu(value: Any) -> Any:
    """``value`` with every tensor in it (also in lists and tuples) moved to the CPU."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, (list, tuple)):
        return [on_cpu(v) for v in value]
    return value


class GroupSampler:
    """The DiT of ``group``'s workers (loaded there; this process holds no weights of it)."""

    def __init__(self, group: WorkerGroup) -> None:
        info = group.model_info
        self.group = group
        self.config, self.dtype, self.weight_shapes = info.config, info.dtype, info.weight_shapes

    def generate(self, *, seed: int, **inputs: Any) -> Iterator[torch.Tensor]:
        """The family's blocks (CPU) for a whole video; ``inputs``: its sampler's inputs."""
        return self.group.generate(seed=seed, **{name: on_cpu(value) for name, value in inputs.items()})

    def stream(self, *, seed: int, **inputs: Any) -> BlockStream:
        """A streaming request (a live session); ``inputs``: what every block shares."""
        return self.group.stream(seed=seed, **{name: on_cpu(value) for name, value in inputs.items()})

    def close(self) -> None:
        """Stop the workers and free their devices."""
        self.group.close()
