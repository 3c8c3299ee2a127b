"""The CUDA-graph replay's bookkeeping (livetalk_core/runtime/cuda_graphs.py), on the CPU.

``RecordingGraph`` stands in for a CUDA graph: while capturing it records every aten op with the
tensors it touched (by identity, as a graph keeps addresses) and the Python values it was given,
and a replay runs those ops again, writing each result where the capture's result lives. Like a
real graph it ignores anything that changed on the Python side since the capture, so a sampler
that forgot to route something that varies through the graph's inputs gives different latents
here, and a forward cut at its sequence-parallel exchanges only works if the exchanges' static
buffers connect the pieces (the GPU check in benchmarks/ compares real graphs with plain eager at
full size).
"""

from __future__ import annotations

import contextlib
import logging
import socket

import pytest
import torch
import torch.multiprocessing as mp
from test_realvideo import run_tiny, tiny_model
from torch.utils._python_dispatch import TorchDispatchMode, _get_current_dispatch_mode
from torch.utils._pytree import tree_leaves

import livetalk_core.runtime.cuda_graphs as cuda_graphs
from livetalk_core.livetalk.model import LiveTalkConfig, LiveTalkDiT
from livetalk_core.livetalk.sampler import sample_livetalk
from livetalk_core.options import RuntimeOptions
from livetalk_core.parallel.sequence_parallel import SequenceParallel, attach
from livetalk_core.realvideo.sampler import realvideo_schedule
from livetalk_core.runtime.cuda_graphs import ForwardGraphs, eager_reason, outside_graph, session_graphs
from livetalk_core.runtime.noise import SeededNoise
from livetalk_core.wan.dit import WanCoreConfig
from livetalk_core.wan.kv_cache import CachePolicy, KVCache

# The options of a compiled DiT with CUDA graphs, given to an eager one (a test seam: apply() would
# compile it): the samplers' replay bookkeeping is the same, and the CPU tests stay fast.
GRAPHS = RuntimeOptions(compile=True, cuda_graphs=True)

ALLOCATIONS = {torch.ops.aten.empty.memory_format, torch.ops.aten.empty_like.default,
               torch.ops.aten.empty_strided.default}  # no kernel: nothing to replay


class RecordingGraph(TorchDispatchMode):
    def __init__(self, pool):
        super().__init__()
        self.pool, self.ops, self.replays = pool, [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func not in ALLOCATIONS:
            self.ops.append((func, args, kwargs or {}, out))
        return out

    def replay(self):
        for func, args, kwargs, out in self.ops:
            fresh = func(*args, **kwargs)
            for old, new in zip(tree_leaves(out), tree_leaves(fresh)):
                # a view or an in-place op already wrote where the capture's result lives
                moved = isinstance(old, torch.Tensor) and (
                    old.untyped_storage().data_ptr() != new.untyped_storage().data_ptr()
                )
                if moved:
                    old.copy_(new)
        self.replays += 1


class RecordingMaker:
    """A :class:`~livetalk_core.runtime.cuda_graphs.GraphMaker` of :class:`RecordingGraph`; ``fail_at``: the
    number of the graph whose capture fails (an op that cannot be captured)."""

    def __init__(self, fail_at: int | None = None):
        self.fail_at, self.graphs, self.pools = fail_at, [], []

    def new_pool(self):
        return object()

    def capturing(self):
        return contextlib.nullcontext()

    def begin(self, pool):
        if len(self.graphs) == self.fail_at:
            raise RuntimeError("operation not permitted when stream is capturing")
        graph = RecordingGraph(pool)
        graph.__enter__()
        self.graphs.append(graph)
        self.pools.append(pool)
        return graph

    def end(self, graph):
        graph.__exit__(None, None, None)


def test_eager_until_the_key_recurs_then_captured_once_and_replayed():
    maker, calls = RecordingMaker(), []

    def body(x, y):
        calls.append(1)
        return x * 2 + y

    graphs = ForwardGraphs(eager_calls=2, maker=maker)
    for i in range(2):
        assert torch.equal(graphs("a", body, torch.full((3,), float(i)), torch.ones(3)), torch.full((3,), 2.0 * i + 1))
    assert not maker.graphs and len(calls) == 2
    outputs = [graphs("a", body, torch.full((3,), float(i)), torch.ones(3)) for i in range(2, 5)]
    assert [o.tolist() for o in outputs] == [[2.0 * i + 1] * 3 for i in range(2, 5)]
    assert len(maker.graphs) == 1 and maker.graphs[0].replays == 3 and len(calls) == 3  # Python ran once more
    # the caller gets its own tensor: the next replay must not change an earlier result
    assert outputs[0].data_ptr() != graphs.captured[0].output.data_ptr()
    for _ in range(3):
        graphs("b", body, torch.zeros(3), torch.zeros(3))
    assert graphs.num_graphs == 2 and len(set(map(id, maker.pools))) == 1  # one memory pool per session


def test_a_replay_ignores_python_values_as_a_cuda_graph_does():
    graphs, scale = ForwardGraphs(eager_calls=0, maker=RecordingMaker()), [2.0]
    first = graphs("a", lambda x: x * scale[0], torch.ones(2))
    scale[0] = 3.0
    assert torch.equal(graphs("a", lambda x: x * scale[0], torch.ones(2)), first)


def test_a_forward_is_cut_at_its_exchanges_which_run_between_the_graphs():
    exchanged = []

    def reverse(send, received):  # stands in for an all-to-all: eager, outside every graph
        assert send.is_contiguous() and received.is_contiguous()
        exchanged.append(send.clone())
        received.copy_(send.flip(0))

    def body(x):
        y = outside_graph(reverse, (x * 2).t())  # a strided view goes in
        return outside_graph(reverse, y + 1).sum(0) * 3

    def eager(x):
        return ((x * 2).t().flip(0) + 1).flip(0).sum(0) * 3

    maker = RecordingMaker()
    graphs = ForwardGraphs(eager_calls=1, maker=maker)
    inputs = [torch.randn(2, 3, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    for i, x in enumerate(inputs):
        assert torch.equal(graphs("a", body, x), eager(x)), i
    (captured,) = graphs.captured
    assert len(captured.graphs) == 3 and len(captured.between) == 2
    assert len(exchanged) == 2 * len(inputs)  # the capture itself exchanged nothing
    assert [g.replays for g in maker.graphs] == [3, 3, 3]
    # a second forward with exchanges of the same shapes shares the static buffers
    for x in inputs[:3]:
        assert torch.equal(graphs("b", body, x), eager(x))
    assert len(graphs._buffers) == 1 and len(maker.graphs) == 6


@pytest.mark.parametrize("fail_at", [0, 1])  # the first graph, or the one after an exchange
def test_a_failed_capture_warns_once_and_stays_eager(caplog, fail_at):
    maker = RecordingMaker(fail_at=fail_at)
    graphs = ForwardGraphs(eager_calls=0, maker=maker)

    def body(x):
        return outside_graph(lambda send, received: received.copy_(send), x + 1)

    with caplog.at_level(logging.WARNING):
        results = [graphs(k, body, torch.zeros(2)) for k in ("a", "a", "b")]
    assert all(torch.equal(r, torch.ones(2)) for r in results)
    assert graphs.failed and graphs.num_graphs == 0
    assert sum("CUDA graph capture failed" in r.message for r in caplog.records) == 1
    assert _get_current_dispatch_mode() is None  # the half-made capture was ended


def test_the_runtime_options_are_the_switch_and_the_cli_exposes_it():
    from livetalk_core import cli

    def graphs(**options) -> bool:
        model = tiny_model()
        RuntimeOptions(**options).apply(model)
        return model.cuda_graphs

    assert graphs(compile=True) and not graphs(compile=True, cuda_graphs=False)
    assert not graphs() and not graphs(compile=False)  # not compiled (on the CPU, auto is off): nothing to replay
    for family in ([], ["--model", "realvideo"]):
        parser = cli.build_parser()
        assert cli.runtime_options(parser.parse_args(family)).cuda_graphs
        assert not cli.runtime_options(parser.parse_args([*family, "--no-cuda-graphs"])).cuda_graphs


def test_no_graphs_on_the_cpu_with_an_fp8_cache_on_2_gpus_or_when_not_asked():
    model = tiny_model(heads=4)
    cache = KVCache(CachePolicy(5, 1), num_layers=2, frame_tokens=4, num_heads=1, head_dim=128)
    assert session_graphs(model, cache, 3) is None and "not asked" in eager_reason(model, cache)
    model.runtime = GRAPHS
    assert session_graphs(model, cache, 3) is None and eager_reason(model, cache) == "not on a GPU"
    fp8 = KVCache(CachePolicy(5, 1), num_layers=2, frame_tokens=4, num_heads=1, head_dim=128, fp8=True)
    assert session_graphs(model, fp8, 3) is None and "fp8" in eager_reason(model, fp8)
    # sequence parallel: graphs from 4 ranks on (measured: they cost pipelined FPS on 2 GPUs)
    attach(model, SequenceParallel(rank=0, world_size=2))
    assert "over 2 GPUs" in eager_reason(model, cache)
    attach(model, SequenceParallel(rank=0, world_size=4))
    assert eager_reason(model, cache) == "not on a GPU"  # the rank count no longer stands in the way


@pytest.fixture
def fake_session_graphs(monkeypatch):
    made = []

    def fake(model, cache, forwards_per_block):
        if not model.cuda_graphs:
            return None
        made.append(ForwardGraphs(eager_calls=forwards_per_block, maker=RecordingMaker()))
        return made[-1]

    monkeypatch.setattr(cuda_graphs, "session_graphs", fake)
    return made


def test_livetalk_replays_give_the_eager_latents(fake_session_graphs):
    torch.manual_seed(0)
    core = WanCoreConfig(dim=128, in_dim=33, out_dim=16, ffn_dim=32, num_layers=4, text_dim=16)
    model = LiveTalkDiT(LiveTalkConfig(core=core, audio_features=8)).eval()
    blocks = 10
    audio = model.embed_audio(torch.randn(1, 4 * 3 * blocks - 3, 8))
    arguments = dict(ref_latent=torch.randn(1, 16, 1, 2, 2), audio_embeds=audio, context=torch.randn(1, 4, 16),
                     num_blocks=blocks)
    eager = list(sample_livetalk(model, noise=SeededNoise(0), **arguments))
    model.runtime = GRAPHS
    replayed = list(sample_livetalk(model, noise=SeededNoise(0), **arguments))
    (graphs,) = fake_session_graphs
    captured = graphs.maker.graphs
    # The window (15 frames, 9 sinks) is full from block 4; its ring then alternates two layouts
    # (blocks 4, 6, 8 and 5, 7, 9), captured at blocks 6 and 7: 5 + 5 replays each (4 steps + refresh).
    assert len(captured) == 2 and sorted(g.replays for g in captured) == [10, 10]
    assert all(torch.equal(a, b) for a, b in zip(eager, replayed))


def test_realvideo_replays_give_the_eager_latents(fake_session_graphs):
    model = tiny_model()
    eager = run_tiny(model, num_blocks=6, schedule=realvideo_schedule(2))
    model.runtime = GRAPHS
    replayed = run_tiny(model, num_blocks=6, schedule=realvideo_schedule(2))
    (graphs,) = fake_session_graphs
    captured = graphs.maker.graphs
    # blocks 1, 3, 5 and 2, 4 share cache layouts, captured at blocks 3 and 4: 3 + 2 and 3 replays
    assert len(captured) == 2 and sorted(g.replays for g in captured) == [3, 5]
    assert all(torch.equal(a, b) for a, b in zip(eager, replayed))


def _replays_on_rank(rank: int, world: int, port: int) -> None:
    import torch.distributed as dist
    from test_sequence_parallel import sampler_inputs
    from test_sequence_parallel import tiny_model as three_layer_model

    from livetalk_core.parallel.sequence_parallel import SequenceParallel
    from livetalk_core.realvideo.parallel import sample_realvideo_parallel

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        sp, model, inputs = SequenceParallel(rank=rank, world_size=world), three_layer_model(), sampler_inputs((4, 8))
        eager = list(sample_realvideo_parallel(model, sp, noise=SeededNoise(3), **inputs))
        made = []

        def fake(model, cache, forwards_per_block):
            made.append(ForwardGraphs(eager_calls=forwards_per_block, maker=RecordingMaker()))
            return made[-1]

        cuda_graphs.session_graphs = fake
        model.runtime = GRAPHS
        replayed = list(sample_realvideo_parallel(model, sp, noise=SeededNoise(3), **inputs))
        assert all(torch.equal(a, b) for a, b in zip(eager, replayed)), rank
        (graphs,) = made
        # two cache layouts, each forward cut at its 2 exchanges per layer (3 layers)
        assert graphs.num_graphs == 2 and all(len(c.graphs) == 7 and len(c.between) == 6 for c in graphs.captured)
        assert all(g.replays > 0 for g in graphs.maker.graphs)
    finally:
        dist.destroy_process_group()


def test_sequence_parallel_replays_give_the_eager_latents():
    """2 gloo ranks: the forwards are captured as chains of graphs around the all-to-alls, which
    run between them, and give the eager latents on every rank."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_replays_on_rank, args=(2, port), nprocs=2)


def test_keys_past_max_graphs_run_eagerly_and_the_captured_ones_keep_replaying():
    maker = RecordingMaker()
    graphs = ForwardGraphs(eager_calls=1, maker=maker, max_graphs=2)
    for _ in range(3):
        for key in "abc":
            out = graphs(key, lambda x: x + 1, torch.full((2,), float(ord(key))))
            assert torch.equal(out, torch.full((2,), ord(key) + 1.0))
    assert graphs.num_graphs == 2 and len(maker.graphs) == 2
    assert graphs.eager_forwards == 2 + 3  # a and b once each before their capture, c every time
