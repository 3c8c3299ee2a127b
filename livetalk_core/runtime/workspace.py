"""What a sampling run's CUDA graphs read, kept from one run to the next: the KV cache, the graphs
themselves and the text K/V buffers.

A captured forward reads fixed addresses (:mod:`.cuda_graphs`): the model's weights, the run's KV
cache and its projected text context. Made per run, every run pays for its own graphs: each block
layout runs eagerly the first time, a later block pays for its capture (on the 14B, seconds in the
middle of a live session), and block 0, which the first frame waits for, is never replayed. A
:class:`Workspace` outlives the runs of one model: the next run at the same size gets the same cache,
the same graphs and the same text buffers (its prompt's K/V copied in), so the layouts seen before
replay from block 0 on. A live endpoint keeps one across its client sessions and frees it when it
stops; a sampler given none makes a private one that goes with it.

A module whose calls repeat at fixed shapes in every block (a live session's audio encoder over its
windows, a few lengths over and over; its tiny decoder) replays from graphs of its own here too
(:meth:`Workspace.module_graphs`): eager, their hundreds of small kernels are launch-bound on a slow
host, and block 0 waits for them.

Reusing the cache needs no clearing: a block attends only slots its own run wrote (the window fills
from frame 0, the sinks first), so a run on a used cache gives a fresh cache's numbers.

The caller keeps the model where it is (same weights, same device) while a workspace holds graphs of
it; a workspace serves one run at a time.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable, Hashable, Iterator
from typing import Any

import torch

from ..wan.kv_cache import CachePolicy, KVCache
from . import cuda_graphs
from .cuda_graphs import ForwardGraphs

ContextKV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: cross-attention keys, values
GraphsFactory = Callable[[torch.nn.Module, KVCache, int], "ForwardGraphs | None"]
MODULE_GRAPHS = 8
"""Input shapes a module's graphs are kept for (more run eagerly): a live session's audio windows come in
three or four lengths, its decoder's blocks in two, and the pool's memory stays bounded whatever a caller sends."""
MODULES = 4
"""Modules a workspace keeps graphs for (the oldest goes first)."""


class TextSlot:
    """The text K/V buffers a run's forwards read. :meth:`show` puts one prompt's K/V (a
    ``project_context`` result) in them; the buffers stay where they are, so one graph serves every
    prompt (RealVideo's idle and talking prompts included)."""

    def __init__(self) -> None:
        self.buffers: ContextKV | None = None
        self._showing: Any = None

    def show(self, context_kv: ContextKV, *, adopt: bool = False) -> ContextKV:
        """``context_kv``'s values in the slot's buffers (copied unless already there); returns the buffers.
        ``adopt``: the caller no longer needs ``context_kv``, so a slot without buffers takes its tensors."""
        if self._showing is context_kv:
            return self.buffers
        if self.buffers is None:
            self.buffers = list(context_kv) if adopt else [(k.clone(), v.clone()) for k, v in context_kv]
        else:
            # Graphs read these very buffers (keyed by the list's identity): new ones would need new graphs.
            if [k.shape for k, _ in self.buffers] != [k.shape for k, _ in context_kv]:
                raise ValueError("a prompt's K/V of another shape needs a new workspace (the samplers key a "
                                 "workspace by the prompt's shape)")
            for (k, v), (new_k, new_v) in zip(self.buffers, context_kv):
                k.copy_(new_k)
                v.copy_(new_v)
        self._showing = context_kv
        return self.buffers

    def forget_source(self) -> None:
        """The next :meth:`show` copies even the same list again (a new run may have changed it in place)."""
        self._showing = None


class Workspace:
    """A KV cache, the forwards' CUDA graphs and the text buffers, kept across sampling runs (module doc).

    ``make_graphs(model, cache, forwards_per_block)``: the graphs for a new cache, or None to run
    eagerly; default :func:`~.cuda_graphs.session_graphs` (the model's options decide).
    """

    def __init__(self, make_graphs: GraphsFactory | None = None) -> None:
        self._make_graphs = make_graphs
        self._key: tuple | None = None
        self._model: weakref.ref | None = None
        self.cache: KVCache | None = None
        self.graphs: ForwardGraphs | None = None
        self.text = TextSlot()
        self._busy = self._free_after_run = False
        self._lock = threading.Lock()
        self.runs = 0
        self.settled = False
        """Whether the last finished run made every forward from a graph (captures allowed): the
        layouts it met are all captured. False while a run is going and when the model runs eagerly."""
        self._eager_before = 0
        self._modules: dict[int, tuple[tuple, ForwardGraphs]] = {}  # id(module): (where its weights are, graphs)
        self._modules_before: dict[int, int] = {}  # _modules_eager() when the last run ended

    def begin(self, model: torch.nn.Module, policy: CachePolicy, *, frame_tokens: int, num_heads: int,
              forwards_per_block: int, shapes: Hashable) -> tuple[KVCache, ForwardGraphs | None]:
        """Start a run of ``model`` with a cache of ``policy`` (``frame_tokens``, ``num_heads``) and inputs
        of ``shapes``: the kept cache and graphs if they fit, else new ones. Returns (cache, graphs or None)."""
        with self._lock:
            if self._busy:
                raise RuntimeError("a sampling workspace serves one run at a time; the last one has not ended")
            self._busy = True
        try:
            self._fit(model, policy, frame_tokens, num_heads, forwards_per_block, shapes)
        except BaseException:
            self._busy = False
            raise
        self.text.forget_source()
        self.settled = False
        self._eager_before = self.graphs.eager_forwards if self.graphs is not None else 0
        self.runs += 1
        return self.cache, self.graphs

    def _fit(self, model: torch.nn.Module, policy: CachePolicy, frame_tokens: int, num_heads: int,
             forwards_per_block: int, shapes: Hashable) -> None:
        """Keep the cache and graphs if this run's model and sizes are the last run's; else make new ones."""
        key = (_where(model), policy, frame_tokens, num_heads, shapes, model.dtype, model.fp8_kv_cache,
               model.cuda_graphs)
        if key == self._key and self._model is not None and self._model() is model:
            self.cache.reset()
            return
        self._let_go()
        self.cache = model.new_kv_cache(policy, frame_tokens=frame_tokens, num_heads=num_heads)
        make_graphs = self._make_graphs or cuda_graphs.session_graphs
        self.graphs = make_graphs(model, self.cache, forwards_per_block)
        self._key, self._model = key, weakref.ref(model)

    @contextlib.contextmanager
    def run(self, model: torch.nn.Module, policy: CachePolicy, **sizes: Any) -> Iterator[
            tuple[KVCache, ForwardGraphs | None, TextSlot]]:
        """:meth:`begin` (``sizes``: its keywords) ... :meth:`end`, as a context; yields (cache, graphs, text slot)."""
        cache, graphs = self.begin(model, policy, **sizes)
        try:
            yield cache, graphs, self.text
        finally:
            self.end()

    def end(self) -> None:
        """The run is over (finished or closed early); the next may begin."""
        with self._lock:
            if not self._busy:
                return
            self._busy = False
            graphs = self.graphs
            self.settled = (graphs is not None and not graphs.failed and graphs.eager_forwards == self._eager_before
                            and self._modules_settled())
            self._modules_before = self._modules_eager()  # a caller may encode the next run's first input now
            if self._free_after_run:
                self._let_go()

    def free(self) -> None:
        """Let go of the cache, the graphs and the text buffers (the next run makes new ones); during a
        run (another thread's), as soon as it ends."""
        with self._lock:
            if self._busy:
                self._free_after_run = True
            else:
                self._let_go()

    def module_graphs(self, module: torch.nn.Module) -> ForwardGraphs | None:
        """Graphs for ``module``'s calls during this workspace's runs (``graphs(key, body, *inputs)``, a key
        per input shape; what else they read lives in ``graphs.kept``), or None to run it eagerly: only while
        the runs' forwards replay from graphs (the model's options allow them; the fp8 KV cache's path runs
        eagerly) and ``module`` is on the KV cache's device. Kept with the workspace for up to
        :data:`MODULES` modules (a live session's audio encoder and tiny decoder); a module whose weights
        moved gets new ones. :attr:`settled` also asks that no call of them ran eagerly."""
        if not self.uses_graphs:
            return None
        weights = [*module.parameters()]
        if not weights or weights[0].device != self.cache.keys[0].device:
            return None
        where = _where(module)
        kept = self._modules.get(id(module))
        if kept is None or kept[0] != where:
            self._modules.pop(id(module), None)
            while len(self._modules) >= MODULES:
                self._modules.pop(next(iter(self._modules)))
            kept = self._modules[id(module)] = (where, ForwardGraphs(eager_calls=1, maker=self.graphs.maker,
                                                                      max_graphs=MODULE_GRAPHS))
        return kept[1]

    def _modules_eager(self) -> dict[int, int]:
        """Each module's graphs (by identity) and how many of their calls ran eagerly (:attr:`settled`)."""
        return {id(graphs): graphs.eager_forwards for _, graphs in self._modules.values()}

    def _modules_settled(self) -> bool:
        """No call of a module's graphs ran eagerly since the last run ended (graphs made since: none at all)."""
        before = self._modules_before
        return all(eager == before.get(graphs, 0) for graphs, eager in self._modules_eager().items())

    def _let_go(self) -> None:
        self._modules, self._modules_before = {}, {}
        self._key = self._model = self.cache = self.graphs = None
        self.text = TextSlot()
        self.settled = self._free_after_run = False

    @property
    def uses_graphs(self) -> bool:
        return self.graphs is not None and not self.graphs.failed


def _where(model: torch.nn.Module) -> tuple:
    """Where the model's weights are (every parameter's and buffer's address): moved or reloaded,
    even in part (ComfyUI may offload some layers for room and load them back), the graphs would
    read the wrong memory, so the workspace starts again."""
    tensors = [*model.parameters(), *model.buffers()]
    if not tensors:
        return (id(model),)
    return id(model), tensors[0].device, hash(tuple(t.data_ptr() for t in tensors))
