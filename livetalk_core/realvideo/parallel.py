"""RealVideo 14B on several GPUs: the sharded sampler every rank runs and what a worker process of
a :class:`~..parallel.workers.WorkerGroup` runs (:func:`worker_job`): whole videos, and live streams
fed one block at a time (:func:`stream_realvideo_parallel`)."""

from __future__ import annotations

import functools
import os
import weakref
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from ..options import RuntimeOptions
from ..parallel.sequence_parallel import SequenceParallel
from ..parallel.sharded_sampling import sample_sharded
from ..parallel.worker_process import WorkerJob
from ..runtime.noise import NoiseSource
from ..runtime.workspace import Workspace
from .live import LatestSegment
from .model import S2VDiT, load_s2v_dit
from .sampler import FRAMES_PER_BLOCK, REALVIDEO_CACHE, BlockPlan, sample_realvideo

# A worker's live streams share one workspace (KV cache, CUDA graphs, text buffers), as one GPU's live
# sessions do, so a stream after the first replays its graphs from block 0; a whole video on the same
# worker lets it go first (the video's own cache takes that memory).
_STREAM_WORKSPACES: weakref.WeakKeyDictionary[S2VDiT, Workspace] = weakref.WeakKeyDictionary()


def sample_realvideo_parallel(model: S2VDiT, sp: SequenceParallel | None, *, ref_latent: torch.Tensor,
                              noise: NoiseSource, **kwargs: Any) -> Iterator[torch.Tensor]:
    """:func:`~.sampler.sample_realvideo` over the group ``sp`` (None: one process), through
    :func:`~..parallel.sharded_sampling.sample_sharded`: every rank passes the same full-size inputs
    and yields full blocks ``[1, 16, 2, h, w]``; ``kwargs`` are ``sample_realvideo``'s other
    arguments (``on_step`` gets this rank's shard of x0)."""
    return sample_sharded(sample_realvideo, model, sp, cache=REALVIDEO_CACHE, frames_per_block=FRAMES_PER_BLOCK,
                          ref_latent=ref_latent, noise=noise, **kwargs)


def stream_realvideo_parallel(model: S2VDiT, sp: SequenceParallel | None, *, noise: NoiseSource,
                              feed: Iterable[tuple[BlockPlan, torch.Tensor]], **kwargs: Any) -> Iterator[torch.Tensor]:
    """A live stream's blocks over the group ``sp``: :func:`sample_realvideo_parallel` with an endless
    plan read from ``feed``, one ``(plan entry, its segment's features [1, 25, A, F])`` per block, as
    :class:`~.live.RealVideoStream` feeds :func:`~.sampler.sample_realvideo` in one process (the
    same blocks); ``kwargs``: the inputs every block shares (``ref_latent``, the two contexts,
    ``schedule``). Only the newest segment is kept, so memory stays flat however long it runs."""
    segments = LatestSegment()

    def plan() -> Iterator[BlockPlan]:
        for entry, features in feed:
            segments.set(entry.segment, features.to(model.device))
            yield entry

    workspace = _STREAM_WORKSPACES.setdefault(model, Workspace())
    return sample_realvideo_parallel(model, sp, noise=noise, audio_features=segments, plan=plan(), workspace=workspace,
                                     **kwargs)


def generate_on_worker(model: S2VDiT, sp: SequenceParallel | None, **kwargs: Any) -> Iterator[torch.Tensor]:
    """A whole video on a worker (:func:`sample_realvideo_parallel`), after the live streams' kept
    workspace, if any, is let go."""
    if (workspace := _STREAM_WORKSPACES.pop(model, None)) is not None:
        workspace.free()
    return sample_realvideo_parallel(model, sp, **kwargs)


def load_realvideo_dit(path: str | os.PathLike, options: RuntimeOptions, *, device: torch.device,
                       **load_options: Any) -> S2VDiT:
    """:func:`~.model.load_s2v_dit` on ``device`` in ``options``' precision and fp8 weight forms,
    set up by :meth:`~..options.RuntimeOptions.apply` (the blocks compiled on a GPU unless ``options``
    say otherwise); ``load_options`` are ``load_s2v_dit``'s other keyword arguments (``base``, ...)."""
    options = options.on(device)
    model = load_s2v_dit(path, options.dtype, device, fp8_weights=options.fp8_weights, fp8_matmul=options.fp8_matmul,
                         **load_options)
    options.apply(model)
    return model


def worker_job(path: str | os.PathLike, options: RuntimeOptions, **load_options: Any) -> WorkerJob:
    """What each worker of a multi-GPU group runs for the RealVideo DiT at ``path``."""
    return WorkerJob(functools.partial(load_realvideo_dit, path, options, **load_options), generate_on_worker,
                     stream=stream_realvideo_parallel)
