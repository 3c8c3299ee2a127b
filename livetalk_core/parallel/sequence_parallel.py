"""Ulysses-style sequence parallelism for the Wan DiTs over ``torch.distributed``.

Each rank holds the full weights and a slice of the latent along H or W. Every per-token operation
(patch embedding, norms, FFN, text cross-attention, per-frame audio injection, head) runs on the
local tokens. Self-attention is the only place where tokens meet: after RoPE (applied with the
shard's own spatial offset) an all-to-all turns the local tokens x all heads into all tokens x
``heads / P`` heads, attention runs over the full sequence for those heads, and a second all-to-all
brings the output back to local tokens x all heads.

KV-cache layout (differs from upstream on purpose): upstream keeps the cache sequence-sharded (local
tokens, all heads) and all-to-alls the *whole* cached K/V every forward (5 frames of keys and values
for 2 frames of queries). Here the new K/V are exchanged together with Q, so the cache holds all
tokens for this rank's heads. Memory per GPU is the same (``window * frame_tokens * H / P``), the
traffic per layer drops from 14 to 8 frame-shards, and the cache container is the unchanged
:class:`~.kv_cache.KVCache` with ``frame_tokens * P`` tokens and ``H / P`` heads.

The gathered sequence is rank-major (rank 0's tokens, then rank 1's, ...). Attention ignores key
order and the output is sent back by the inverse exchange, so this is exact as long as a forward
writes its frames into consecutive cache slots (true for RealVideo's sink + 2-block ring:
:func:`check_cache_policy`).

Noise never depends on the number of ranks: :class:`ShardedNoise` draws the full-size tensor from
the wrapped (seeded, CPU) source on every rank and keeps this rank's slice.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from ..errors import InputError
from ..runtime import cuda_graphs
from ..runtime.noise import NoiseSource
from ..wan.dit import HEAD_DIM
from ..wan.kv_cache import CachePolicy

log = logging.getLogger(__name__)

SPATIAL_DIMS = {"h": -2, "w": -1}


@dataclass(frozen=True)
class SequenceParallel:
    """Handle of one sequence-parallel group: this process's rank in it and its size."""

    rank: int
    world_size: int
    group: dist.ProcessGroup | None = None

    def heads_from_sequence(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """Local tokens, all heads ``[B, s, H, D]`` (any number of same-shape tensors, exchanged in one
        all-to-all) -> all tokens, this rank's heads ``[B, s*P, H/P, D]`` each."""
        t, p = len(tensors), self.world_size
        b, s, h, d = tensors[0].shape
        # [T, B, s, H, D] -> [P, T, B, s, H/P, D]: head chunk i goes to rank i.
        send = torch.stack(tensors).view(t, b, s, p, h // p, d).permute(3, 0, 1, 2, 4, 5)
        received = self._all_to_all(send)  # chunk i now holds rank i's tokens
        return list(received.permute(1, 2, 0, 3, 4, 5).reshape(t, b, p * s, h // p, d).unbind(0))

    def sequence_from_heads(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`heads_from_sequence` for one tensor: ``[B, s*P, H/P, D]`` -> ``[B, s, H, D]``."""
        p = self.world_size
        b, n, hp, d = x.shape
        send = x.view(b, p, n // p, hp, d).movedim(1, 0)  # token chunk i goes to rank i
        received = self._all_to_all(send)  # chunk i now holds rank i's heads
        return received.permute(1, 2, 0, 3, 4).reshape(b, n // p, p * hp, d)

    def _all_to_all(self, send: torch.Tensor) -> torch.Tensor:
        """Chunk i of ``send`` (split along dim 0; any strides) to rank i; a captured forward is cut
        here, so the collective itself is never part of a CUDA graph (:mod:`.cuda_graphs`)."""
        return cuda_graphs.outside_graph(self._exchange, send)

    def _exchange(self, send: torch.Tensor, received: torch.Tensor) -> None:
        dist.all_to_all_single(received, send, group=self.group)

    def all_gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Concatenate every rank's ``x`` along ``dim`` (rank order)."""
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)


def leave_together(sp: SequenceParallel | None) -> None:
    """Wait for every rank of ``sp``'s group before the group is torn down: a gloo rank that destroys
    its group while a peer still uses it (rank 0 writing the video, say) can abort in the group's
    destructor. A peer that is already gone ends the wait at once."""
    if sp is None or sp.world_size == 1:
        return
    try:
        dist.barrier(group=sp.group)
    except RuntimeError:
        pass


def attach(model: nn.Module, sp: SequenceParallel | None) -> None:
    """Make every self-attention of ``model`` (a :class:`~.wan_dit.WanDiTCore`) use ``sp``; None detaches."""
    if sp is not None and model.config.num_heads % sp.world_size:
        raise InputError(
            f"The DiT has {model.config.num_heads} attention heads, which cannot be split over {sp.world_size} GPUs: "
            "use a number of GPUs that divides it (1, 2, 4 or 8 for the 14B model's 40 heads; 8 only for wide latents)."
        )
    for block in model.blocks:
        block.self_attn.sp = sp


QUERY_WEIGHT = "blocks.0.self_attn.q.weight"  # its rows are heads x HEAD_DIM in every Wan DiT


def header_heads(shapes: Mapping[str, tuple[int, ...]]) -> int | None:
    """A Wan DiT's attention heads from its file header (tensor shapes), or None if it has no query weight:
    what decides how many GPUs can share its attention, known before anything loads."""
    query = next((shape for key, shape in shapes.items() if key.endswith(QUERY_WEIGHT)), None)
    return None if query is None else query[0] // HEAD_DIM


def attached(model: nn.Module) -> SequenceParallel | None:
    """The group :func:`attach` gave ``model``, or None on one GPU."""
    return model.blocks[0].self_attn.sp


def check_cache_policy(policy: CachePolicy, frames_per_block: int, first_frame: int) -> None:
    """Raise unless every block (and the sink prefill) lands in consecutive cache slots, which the
    rank-major token order of the gathered sequence needs (see the module doc)."""
    period = policy.window_frames - policy.sink_frames
    for start in range(first_frame, first_frame + period * frames_per_block + 1, frames_per_block):
        slots = [policy.slot(start + i) for i in range(frames_per_block)]
        if slots != list(range(slots[0], slots[0] + frames_per_block)):
            raise ValueError(f"cache policy {policy} splits a block of {frames_per_block} frames: {slots}")


def pick_split_axis(latent_hw: tuple[int, int], world_size: int, patch_hw: tuple[int, int] = (2, 2)) -> str:
    """``"h"`` for landscape latents, ``"w"`` otherwise (upstream's rule), falling back to the other
    axis when the preferred one does not split into whole patches per rank."""
    h, w = latent_hw
    preferred = ["h", "w"] if h < w else ["w", "h"]
    sizes = {"h": (h, patch_hw[0]), "w": (w, patch_hw[1])}
    for axis in preferred:
        side, patch = sizes[axis]
        if side % (patch * world_size) == 0:
            return axis
    raise InputError(
        f"A {h}x{w} latent cannot be split over {world_size} GPUs: one side must be a multiple of "
        f"{patch_hw[0]}*{world_size}. Use fewer GPUs or another image size."
    )


@dataclass(frozen=True)
class LatentShard:
    """Which slice of the full latent one rank holds."""

    axis: str  # "h" or "w"
    rank: int
    world_size: int
    full_hw: tuple[int, int]

    @property
    def dim(self) -> int:
        return SPATIAL_DIMS[self.axis]

    @property
    def local_size(self) -> int:
        return self.full_hw[0 if self.axis == "h" else 1] // self.world_size

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's slice of a full-size ``[..., h, w]`` tensor."""
        return x.narrow(self.dim, self.rank * self.local_size, self.local_size)

    def grid_offset(self, patch_hw: tuple[int, int]) -> tuple[int, int]:
        """(row, column) patch offset of this shard in the full token grid."""
        start = self.rank * self.local_size
        return (start // patch_hw[0], 0) if self.axis == "h" else (0, start // patch_hw[1])

    def gather(self, sp: SequenceParallel, x: torch.Tensor) -> torch.Tensor:
        """Every rank's ``[..., h_local, w_local]`` -> the full ``[..., h, w]`` on every rank."""
        return sp.all_gather(x, self.dim)


class ShardedNoise:
    """Full-size draws from ``source`` (identical on every rank), sliced to this rank's shard."""

    def __init__(self, source: NoiseSource, shard: LatentShard) -> None:
        self.source, self.shard = source, shard

    def _full(self, shape: Sequence[int]) -> tuple[int, ...]:
        return (*shape[:-2], *self.shard.full_hw)

    def initial(self, block: int, shape: Sequence[int]) -> torch.Tensor:
        return self.shard.take(self.source.initial(block, self._full(shape)))

    def renoise(self, block: int, step: int, shape: Sequence[int]) -> torch.Tensor:
        return self.shard.take(self.source.renoise(block, step, self._full(shape)))


def init_from_env(backend: str | None = None) -> SequenceParallel | None:
    """Join the process group that ``torchrun`` (or a spawner) describes in ``RANK`` / ``WORLD_SIZE``
    / ``MASTER_ADDR`` / ``MASTER_PORT``; NCCL when CUDA is available, else gloo. On CUDA the current
    device becomes ``cuda:LOCAL_RANK``. Returns None when there is a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return None
    rank = int(os.environ["RANK"])
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    options = None
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
        # Rank 0 also decodes the video on a side stream; the exchanges every rank waits for go first.
        options = dist.ProcessGroupNCCL.Options(is_high_priority_stream=True)
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world, pg_options=options)
    log.info("sequence parallel: rank %d of %d (%s)", rank, world, backend)
    return SequenceParallel(rank=rank, world_size=world)
