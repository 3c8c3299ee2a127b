"""Whole DiT forwards replayed as CUDA graphs.

A compiled forward still launches over a thousand kernels (per layer: the compiled regions, the
cache write, the attention; the 14B's audio injectors). A fast host launches them faster than the
GPU runs them; a slow or busy one does not, and the GPU then idles between kernels (on one H100
whose host was slow, the 1.3B DiT took 220 ms per block launched kernel by kernel, 178 ms
replayed: docs/performance.md). Replaying a captured graph launches the whole forward at once.

What a capture bakes in, and so what keys a graph: the addresses of every tensor it reads (the
model's weights, the session's KV cache and text K/V) and every Python value (the cache's slot
mapping for the block, the shapes). What changes from forward to forward goes through static
input buffers (the noisy latents, the timestep, RoPE positions, audio). A session's blocks settle
into a couple of slot mappings, so a handful of graphs serve a whole video.

A key runs eagerly for its first ``eager_calls`` forwards, is captured at the next and replayed
from then on. The samplers pass one block's forwards: only a slot mapping that comes back in a later
block is captured, so block 0 (what the first frame waits for) and the cache's fill-up blocks never
pay for a capture, and every lazy thing (cuDNN plans, cuBLAS handles, compiled kernels) is
warm before one. If a capture fails (an op that cannot be captured) the session warns
once and stays eager.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch

from . import sequence_parallel
from .kv_cache import KVCache

log = logging.getLogger(__name__)


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, ...]
    output: torch.Tensor


class ForwardGraphs:
    """The captured forwards of one sampling session (they read its KV cache, so they die with it).

    Call it as ``graphs(key, body, *inputs)``: ``body(*inputs)`` must return one tensor and depend on
    nothing that varies under the same ``key`` except ``inputs``. Returns a fresh tensor (never the
    graph's own output buffer).
    """

    def __init__(self, eager_calls: int = 1, capture: Callable[..., _Captured] | None = None) -> None:
        self.eager_calls = eager_calls
        self._capture = capture or capture_graph
        self._graphs: dict[Hashable, _Captured] = {}
        self._calls: dict[Hashable, int] = {}
        self._pool = None
        self.failed = False

    def __call__(self, key: Hashable, body: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> torch.Tensor:
        captured = self._graphs.get(key)
        if captured is None:
            self._calls[key] = calls = self._calls.get(key, 0) + 1
            if self.failed or calls <= self.eager_calls:
                return body(*inputs)
            try:
                captured = self._capture(body, inputs, self._pool)
            except Exception as exc:  # noqa: BLE001 - anything that cannot be captured runs eager
                self.failed = True
                log.warning("CUDA graph capture failed (%s); this run stays eager", str(exc).splitlines()[0][:200])
                return body(*inputs)
            self._graphs[key] = captured
            self._pool = self._pool or captured.graph.pool()
        for static, value in zip(captured.inputs, inputs):
            static.copy_(value)
        captured.graph.replay()
        return captured.output.clone()

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)


def session_graphs(model: torch.nn.Module, cache: KVCache, forwards_per_block: int) -> ForwardGraphs | None:
    """Graphs for one session of ``model`` with ``cache``, or None (eager) unless all of these hold:

    * the model asks for them (:attr:`~.wan_dit.WanDiTCore.cuda_graphs`, set by ``compile_blocks``);
    * the cache is on a GPU and not fp8 (an fp8 cache composes its sink rotations on the host);
    * one process: NCCL all-to-alls captured in a graph hung on 2 and 4 H200s, so
      sequence-parallel ranks stay eager.
    """
    if not getattr(model, "cuda_graphs", False) or cache.fp8 or cache.keys[0].device.type != "cuda":
        return None
    if sequence_parallel.attached(model) is not None:
        return None
    return ForwardGraphs(eager_calls=forwards_per_block)


def capture_graph(body: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...], pool) -> _Captured:
    """Capture ``body`` on copies of ``inputs``; the graphs of one session share ``pool`` (their
    replays never overlap)."""
    static = tuple(x.clone() for x in inputs)
    graph = torch.cuda.CUDAGraph()
    # thread_local: other threads (ComfyUI's server, a preview) may use CUDA while this captures.
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        output = body(*static)
    return _Captured(graph, static, output)
