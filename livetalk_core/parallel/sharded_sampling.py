"""Any family's block sampler over a sequence-parallel group: each rank samples a slice of the
latent grid and gets back the whole blocks.

:func:`sample_sharded` is what every rank runs (under ``torchrun`` or in a worker process): it
slices the reference latent and the noise along one spatial axis, runs the family's sampler on its
slice with the slice's RoPE grid offset (the DiT's attention exchanges tokens for heads, see
:mod:`.sequence_parallel`), and all-gathers each block, so every rank yields the full block and the
video equals the single-GPU one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..runtime.noise import NoiseSource
from ..wan.kv_cache import CachePolicy
from . import sequence_parallel
from .sequence_parallel import LatentShard, SequenceParallel, ShardedNoise, pick_split_axis

# A family's block sampler: (model, *, ref_latent, noise, grid_offset, **inputs) -> clean blocks.
BlockSampler = Callable[..., Iterator[torch.Tensor]]


def sample_sharded(
    sample: BlockSampler,
    model: torch.nn.Module,
    sp: SequenceParallel | None,
    *,
    cache: CachePolicy,
    frames_per_block: int,
    ref_latent: torch.Tensor,
    noise: NoiseSource,
    **inputs: Any,
) -> Iterator[torch.Tensor]:
    """``sample(model, ref_latent=..., noise=..., **inputs)`` over the group ``sp`` (None: one process).

    ``cache`` and ``frames_per_block`` are the sampler's KV-cache layout (checked to keep each
    block's frames together, as the sharded cache needs) after a sink of ``cache.sink_frames``.
    Every rank passes the same full-size inputs; ``noise`` must give the same draws on every rank
    (e.g. :class:`~..runtime.noise.SeededNoise` with one seed). Yields full blocks on every rank;
    ``inputs`` (e.g. ``on_step``, which gets this rank's shard of x0) go to ``sample`` as they are.
    """
    if sp is None or sp.world_size == 1:
        yield from sample(model, ref_latent=ref_latent, noise=noise, **inputs)
        return
    sequence_parallel.check_cache_policy(cache, frames_per_block, first_frame=cache.sink_frames)
    sequence_parallel.attach(model, sp)
    try:
        h, w = ref_latent.shape[-2:]
        patch = model.config.patch_size[1:]
        shard = LatentShard(pick_split_axis((h, w), sp.world_size, patch), sp.rank, sp.world_size, (h, w))
        blocks = sample(
            model,
            ref_latent=shard.take(ref_latent),
            noise=ShardedNoise(noise, shard),
            grid_offset=shard.grid_offset(patch),
            **inputs,
        )
        with contextlib.closing(blocks):  # closing this generator frees the sampler's KV cache at once
            for block in blocks:
                yield shard.gather(sp, block)
    finally:
        sequence_parallel.attach(model, None)
