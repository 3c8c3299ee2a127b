"""DiT forwards replayed as CUDA graphs, on one GPU and under sequence parallelism over 4 GPUs or more.

A compiled forward still launches over a thousand kernels (per layer: the compiled regions, the
cache write, the attention; the 14B's audio injectors). A fast host launches them faster than the
GPU runs them; a slow or busy one does not, and the GPU then idles between kernels
(docs/performance.md has the measurements). Under sequence parallelism the gaps are worse: every layer's
exchanges wait for the slowest rank's launches, so each rank's launch jitter costs all of them
(:data:`~.options.MIN_PARALLEL_RANKS` says where that starts to matter).

What a capture bakes in, and so what keys a graph: the addresses of every tensor it reads (the
model's weights, the session's KV cache and text K/V) and every Python value (the cache's slot
mapping for the block, the shapes). What changes from forward to forward goes through static
input buffers (the noisy latents, the timestep, RoPE positions, audio). A session's blocks settle
into a couple of slot mappings, so a handful of graphs serve a whole video.

Collectives are never captured (NCCL all-to-alls inside a graph hung). A forward
that calls :func:`outside_graph` (the sequence-parallel exchanges do) is captured as a chain of
graphs cut at those calls; a replay runs the graphs in order with the exchanges between them, from
static send and receive buffers that all graphs of the session share.

A key runs eagerly for its first ``eager_calls`` forwards, is captured at the next and replayed
from then on. The samplers pass one block's forwards: only a slot mapping that comes back in a later
block is captured, so block 0 (what the first frame waits for) and the cache's fill-up blocks never
pay for a capture, and every lazy thing (cuDNN plans, cuBLAS handles, compiled kernels, NCCL
channels) is warm before one. If a capture fails (an op that cannot be captured) the session warns
once and stays eager.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from itertools import zip_longest
from typing import Any, Protocol

import torch

from ..options import graphs_off_reason
from ..wan.kv_cache import KVCache

log = logging.getLogger(__name__)

Exchange = Callable[[torch.Tensor, torch.Tensor], Any]  # (send, received): fills received
_capturing = threading.local()


class Graph(Protocol):
    def replay(self) -> None: ...


class GraphMaker(Protocol):
    """How graphs are made: :class:`CudaGraphMaker` on a GPU (the tests give a CPU stand-in)."""

    def new_pool(self) -> Any: ...

    def capturing(self) -> contextlib.AbstractContextManager: ...

    def begin(self, pool: Any) -> Graph: ...

    def end(self, graph: Graph) -> None: ...


class CudaGraphMaker:
    """``torch.cuda.CUDAGraph`` captured on a side stream (capture cannot use the default stream).

    ``thread_local``: other threads (ComfyUI's server, a preview, NCCL's watchdog) may use CUDA
    while this thread captures.
    """

    def new_pool(self) -> Any:
        return torch.cuda.graph_pool_handle()

    @contextlib.contextmanager
    def capturing(self) -> Iterator[None]:
        torch.cuda.synchronize()
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            yield
        torch.cuda.current_stream().wait_stream(stream)

    def begin(self, pool: Any) -> torch.cuda.CUDAGraph:
        graph = torch.cuda.CUDAGraph()
        graph.capture_begin(pool=pool, capture_error_mode="thread_local")
        return graph

    def end(self, graph: torch.cuda.CUDAGraph) -> None:
        graph.capture_end()


def outside_graph(exchange: Exchange, send: torch.Tensor) -> torch.Tensor:
    """``exchange(send, received)`` into a new contiguous ``received`` shaped like ``send`` (which
    may have any strides); returns ``received``.

    Run eagerly, that is all. In a forward being captured, the current graph ends here: ``send``
    is copied into a static buffer as the graph's last kernel, ``exchange`` is recorded to run from
    it into a static receive buffer before the next graph, and the next graph reads that buffer.
    """
    recorder: _Recorder | None = getattr(_capturing, "recorder", None)
    if recorder is None:
        send = send.contiguous()
        received = torch.empty_like(send)
        exchange(send, received)
        return received
    return recorder.cut(exchange, send)


class _Recorder:
    """The graphs and exchanges of one forward being captured."""

    def __init__(self, maker: GraphMaker, pool: Any, buffers: dict[tuple, tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.maker, self.pool, self.buffers = maker, pool, buffers
        self.graphs: list[Graph] = []
        self.between: list[Callable[[], Any]] = []
        self._open: Graph | None = None

    def begin(self) -> None:
        self._open = self.maker.begin(self.pool)
        self.graphs.append(self._open)

    def end(self) -> None:
        graph, self._open = self._open, None
        self.maker.end(graph)

    def abandon(self) -> None:
        """End a capture that failed half-way (its graph is discarded with the recorder)."""
        if self._open is not None:
            with contextlib.suppress(Exception):
                self.end()

    def cut(self, exchange: Exchange, send: torch.Tensor) -> torch.Tensor:
        # One pair of buffers per shape for the whole session: replays run one after another on one
        # stream, and each exchange's receiver has been read before the next one of that shape writes.
        key = (tuple(send.shape), send.dtype, send.device)
        if key not in self.buffers:
            self.buffers[key] = tuple(torch.empty(send.shape, dtype=send.dtype, device=send.device) for _ in range(2))
        static_send, static_received = self.buffers[key]
        static_send.copy_(send)
        self.end()
        self.between.append(functools.partial(exchange, static_send, static_received))
        self.begin()
        return static_received


@dataclass
class _Captured:
    graphs: list[Graph]
    between: list[Callable[[], Any]]  # run after graphs[i]; one fewer than graphs
    inputs: tuple[torch.Tensor, ...]
    output: torch.Tensor

    def replay(self) -> None:
        for graph, exchange in zip_longest(self.graphs, self.between):
            graph.replay()
            if exchange is not None:
                exchange()


class ForwardGraphs:
    """The captured forwards of one KV cache (they read it, so they die with it; a
    :class:`~.workspace.Workspace` keeps both across sampling runs).

    Call it as ``graphs(key, body, *inputs)``: ``body(*inputs)`` must return one tensor and depend on
    nothing that varies under the same ``key`` except ``inputs``. Returns a fresh tensor (never the
    graph's own output buffer). All graphs of a session share one memory pool (their replays never
    overlap) and the exchange buffers of :func:`outside_graph`. ``max_graphs``: keys past this many
    run eagerly (a caller whose shapes are not known to be few bounds the pool's memory so).
    """

    def __init__(self, eager_calls: int = 1, maker: GraphMaker | None = None, max_graphs: int | None = None) -> None:
        self.eager_calls = eager_calls
        self.max_graphs = max_graphs
        self.maker = maker or CudaGraphMaker()
        self._captured: dict[Hashable, _Captured] = {}
        self._calls: dict[Hashable, int] = {}
        self._pool: Any = None
        self._buffers: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.kept: dict[str, Any] = {}
        """What a module's graphs read besides their inputs, kept with them (a stream decoder's memory)."""
        self.failed = False
        self.eager_forwards = 0  # forwards run kernel by kernel (not yet captured, or after a failed capture)

    def __call__(self, key: Hashable, body: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> torch.Tensor:
        captured = self._captured.get(key)
        if captured is None:
            self._calls[key] = calls = self._calls.get(key, 0) + 1
            full = self.max_graphs is not None and len(self._captured) >= self.max_graphs
            if self.failed or full or calls <= self.eager_calls:
                self.eager_forwards += 1
                return body(*inputs)
            try:
                captured = self._capture(body, inputs)
            except Exception as exc:  # noqa: BLE001 - anything that cannot be captured runs eager
                self.failed = True
                log.warning("CUDA graph capture failed (%s); this run stays eager", str(exc).splitlines()[0][:200])
                self.eager_forwards += 1
                return body(*inputs)
            self._captured[key] = captured
        for static, value in zip(captured.inputs, inputs):
            static.copy_(value)
        captured.replay()
        return captured.output.clone()

    def _capture(self, body: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...]) -> _Captured:
        if self._pool is None:
            self._pool = self.maker.new_pool()
        static = tuple(x.clone() for x in inputs)
        recorder = _Recorder(self.maker, self._pool, self._buffers)
        with self.maker.capturing():
            _capturing.recorder = recorder
            try:
                recorder.begin()
                output = body(*static)
                recorder.end()
            except BaseException:
                recorder.abandon()
                raise
            finally:
                _capturing.recorder = None
        return _Captured(recorder.graphs, recorder.between, static, output)

    def drop_all(self) -> None:
        """Forget every capture (what they read is going away); keys start eager again."""
        self._captured.clear()
        self._calls.clear()

    @property
    def num_graphs(self) -> int:
        """Captured forwards (each one graph, or a chain of graphs cut at its exchanges)."""
        return len(self._captured)

    @property
    def captured(self) -> list[_Captured]:
        return list(self._captured.values())


def eager_reason(model: torch.nn.Module, cache: KVCache) -> str | None:
    """Why a session of ``model`` with ``cache`` runs kernel by kernel, or None to use graphs
    (:func:`~.options.graphs_off_reason`, from the model's options and this session's cache and group)."""
    return graphs_off_reason(asked=model.cuda_graphs, fp8_kv_cache=cache.fp8,
                             on_gpu=cache.keys[0].device.type == "cuda", parallel_ranks=model.parallel_ranks)


def session_graphs(model: torch.nn.Module, cache: KVCache, forwards_per_block: int) -> ForwardGraphs | None:
    """Graphs for one session of ``model`` with ``cache``, or None (eager; :func:`eager_reason` says why)."""
    reason = eager_reason(model, cache)
    if reason is not None:
        log.debug("no CUDA graphs for this run: %s", reason)
        return None
    return ForwardGraphs(eager_calls=forwards_per_block)
