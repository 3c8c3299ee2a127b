"""CUDA graphs of the DiT's layer stack: one launch per forward instead of thousands.

Compiled (:func:`~.compile.compile_blocks`), a forward still launches a few dozen kernels per layer
from Python, plus the cache writes and the attention between the compiled regions. When a forward's
GPU work is short (LiveTalk's block 0 attends 3 frames; a 14B rank under sequence parallelism holds a
quarter of the tokens) the GPU waits on those launches. :class:`LayerGraphs` captures the whole
layer stack, cache writes, attention and sequence-parallel exchanges included, and replays it.

A graph bakes in the address of every tensor it touches, which sets the rules here:

* **one graph per KV-cache signature** (which slots a block writes, how many it attends): LiveTalk
  has four start-up signatures and two that alternate after them, RealVideo a prefill, two start-up
  and two alternating; the graphs are captured the first time a signature comes and kept for every
  later video;
* **the KV cache belongs to the graphs**: each run gets a fresh view of the same buffers
  (:meth:`LayerGraphs.kv_cache`), and only the newest run may use them;
* **inputs are copied into static buffers** before a replay (skipped when the same unchanged tensor
  was copied last time, as the text context's keys and values are); the output is a static buffer
  too, valid until the next replay;
* **weights must stay where they were**: a run checks their addresses and drops every graph if they
  moved (e.g. the model was offloaded and loaded back).

All graphs share one memory pool: they never run at the same time. Capturing fails soft: a warning,
then the stack runs launch by launch as before.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from .kv_cache import KVCache

log = logging.getLogger(__name__)


class StaleCacheError(RuntimeError):
    """A run used a KV cache after a newer run of the same model took the cache's buffers."""


class LayerGraphs:
    """The captured layer stacks of one model (see the module docstring)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self._model = weakref.ref(model)
        self._graphs: dict[Hashable, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._statics: dict[tuple, torch.Tensor] = {}
        self._sources: dict[tuple, tuple[weakref.ref, int]] = {}
        self._pool = None
        self._cache: KVCache | None = None
        self._cache_key: Hashable = None
        self._weights: tuple[int, ...] = ()
        self.failed = False

    def kv_cache(self, key: Hashable, make: Callable[[], KVCache]) -> KVCache:
        """The cache for a new run: a fresh view of the graphs' buffers when ``key`` (the cache's
        geometry) is the one they hold, else newly made (and every graph dropped)."""
        weights = self._weight_addresses()
        if weights != self._weights:
            self.release()
            self._weights = weights
        if self._cache is not None and self._cache_key == key:
            self._cache = self._cache.restarted()
        else:
            self.release()
            self._cache, self._cache_key = make(), key
        return self._cache

    def release(self) -> None:
        """Drop every graph, static buffer and the cache (their memory returns to the allocator)."""
        self._graphs.clear()
        self._statics.clear()
        self._sources.clear()
        self._pool = None
        self._cache = self._cache_key = None

    def run(self, layers: Callable[..., torch.Tensor], cache: KVCache, *inputs: Any, variant: Hashable = None) -> torch.Tensor:
        """``layers(*inputs, cache=cache)`` through the graph of the cache's current signature.

        ``inputs`` are tensors, None, or lists/tuples of them; ``variant`` is any other setting the
        stack reads (e.g. the attention kernel). The result is a static buffer that the next replay
        overwrites: use it before the next forward.
        """
        if cache is not self._cache:
            raise StaleCacheError(
                "This model started another video while this one was still being generated; finish or "
                "close one video's sampling before starting the next on the same model."
            )
        signature = cache.graph_signature()
        if self.failed or signature is None or not cache.keys[0].is_cuda:
            return layers(*inputs, cache=cache)
        flat, spec = tree_flatten(list(inputs))
        # tensors go through static buffers; anything else (None) is part of the key
        slots = [(i, tuple(x.shape), x.dtype, x.device) if isinstance(x, torch.Tensor) else x for i, x in enumerate(flat)]
        key = (getattr(layers, "__func__", layers), variant, signature, str(spec), tuple(slots))
        for slot, x in zip(slots, flat):
            if isinstance(x, torch.Tensor):
                self._fill(slot, x)
        entry = self._graphs.get(key)
        if entry is None:
            statics = [self._statics[s] if isinstance(x, torch.Tensor) else x for s, x in zip(slots, flat)]
            try:
                entry = self._capture(layers, cache, tree_unflatten(statics, spec))
            except Exception as exc:  # noqa: BLE001 - any capture failure means: launch as before
                self.failed = True
                log.warning("CUDA graph capture failed (%s); the DiT runs without graphs",
                            str(exc).splitlines()[0][:200])
                return layers(*inputs, cache=cache)
            self._graphs[key] = entry
        graph, output = entry
        graph.replay()
        return output

    def _fill(self, slot: tuple, x: torch.Tensor) -> None:
        static = self._statics.get(slot)
        if static is None:
            self._statics[slot] = static = torch.empty_like(x)
        elif (last := self._sources.get(slot)) is not None and last[0]() is x and last[1] == x._version:
            return
        static.copy_(x)
        self._sources[slot] = (weakref.ref(x), x._version)

    def _capture(self, layers: Callable[..., torch.Tensor], cache: KVCache, inputs: list) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        device = self._cache.keys[0].device
        current = torch.cuda.current_stream(device)
        side = torch.cuda.Stream(device)
        side.wait_stream(current)
        # A warm-up run outside the capture compiles, plans the attention kernels and allocates
        # their workspaces; it writes the cache exactly as the replay below will.
        with torch.cuda.stream(side):
            layers(*inputs, cache=cache)
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            output = layers(*inputs, cache=cache)
        self._pool = graph.pool()
        return graph, output

    def _weight_addresses(self) -> tuple[int, ...]:
        model = self._model()
        return () if model is None else tuple(p.data_ptr() for p in model.parameters())


def use_cuda_graphs(model: torch.nn.Module) -> torch.nn.Module:
    """Replay ``model``'s layer stack as CUDA graphs from now on (in place; returns ``model``).

    Only CUDA runs replay graphs; on the CPU the stack runs as before (the cache is still the
    model's). Best after :func:`~.compile.compile_blocks`.
    """
    model.layer_graphs = LayerGraphs(model)
    return model
