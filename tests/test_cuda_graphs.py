"""The CUDA-graph replay's bookkeeping (livetalk_core/cuda_graphs.py), on the CPU.

A real graph replays the kernels it captured: it reads its static input buffers and whatever the
capture-time closure referenced, and ignores Python values passed later. ``FakeGraph`` does the
same with the captured closure, so a sampler that forgot to route something that varies through
the graph's inputs gives different latents here (the GPU check in benchmarks/bench.py compares the
real graphs with plain eager at full size)."""

from __future__ import annotations

import logging

import pytest
import torch

import livetalk_core.realvideo_sampler as realvideo_sampler
import livetalk_core.sampler as livetalk_sampler
from livetalk_core.cuda_graphs import ForwardGraphs, _Captured, session_graphs
from livetalk_core.kv_cache import CachePolicy, KVCache
from livetalk_core.livetalk_model import LiveTalkConfig, LiveTalkDiT
from livetalk_core.noise import SeededNoise
from livetalk_core.realvideo_sampler import realvideo_schedule
from livetalk_core.sampler import sample_livetalk
from livetalk_core.wan_dit import WanCoreConfig
from test_realvideo import run_tiny, tiny_model


class FakeGraph:
    def __init__(self, body, static):
        self.body, self.static, self.output, self.replays = body, static, None, 0

    def replay(self):
        self.output.copy_(self.body(*self.static))
        self.replays += 1

    def pool(self):
        return "pool"


class FakeCapture:
    def __init__(self, fail: bool = False):
        self.fail, self.graphs, self.pools = fail, [], []

    def __call__(self, body, inputs, pool):
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        self.pools.append(pool)
        static = tuple(x.clone() for x in inputs)
        graph = FakeGraph(body, static)
        graph.output = torch.full_like(body(*static), float("nan"))  # a capture computes nothing
        self.graphs.append(graph)
        return _Captured(graph, static, graph.output)


def test_eager_until_the_key_recurs_then_captured_once_and_replayed():
    capture, calls = FakeCapture(), []

    def body(x, y):
        calls.append(1)
        return x * 2 + y

    graphs = ForwardGraphs(eager_calls=2, capture=capture)
    for i in range(2):
        assert torch.equal(graphs("a", body, torch.full((3,), float(i)), torch.ones(3)), torch.full((3,), 2.0 * i + 1))
    assert not capture.graphs and len(calls) == 2
    outputs = [graphs("a", body, torch.full((3,), float(i)), torch.ones(3)) for i in range(2, 5)]
    assert [o.tolist() for o in outputs] == [[2.0 * i + 1] * 3 for i in range(2, 5)]
    assert len(capture.graphs) == 1 and capture.graphs[0].replays == 3
    # the caller gets its own tensor: the next replay must not change an earlier result
    assert outputs[0].data_ptr() != capture.graphs[0].output.data_ptr()
    graphs("b", body, torch.zeros(3), torch.zeros(3))
    graphs("b", body, torch.zeros(3), torch.zeros(3))
    graphs("b", body, torch.zeros(3), torch.zeros(3))
    assert graphs.num_graphs == 2 and capture.pools == [None, "pool"]  # one memory pool per session


def test_a_failed_capture_warns_once_and_stays_eager(caplog):
    graphs = ForwardGraphs(eager_calls=0, capture=FakeCapture(fail=True))
    with caplog.at_level(logging.WARNING):
        results = [graphs(k, lambda x: x + 1, torch.zeros(2)) for k in ("a", "a", "b")]
    assert all(torch.equal(r, torch.ones(2)) for r in results)
    assert graphs.failed and graphs.num_graphs == 0
    assert sum("CUDA graph capture failed" in r.message for r in caplog.records) == 1


def test_compile_blocks_is_the_switch_and_both_clis_expose_it():
    from livetalk_core import cli, realvideo_cli
    from livetalk_core.compile import compile_blocks

    assert compile_blocks(tiny_model()).cuda_graphs and not compile_blocks(tiny_model(), cuda_graphs=False).cuda_graphs
    for parser in (cli.build_parser(), realvideo_cli.build_parser()):
        assert parser.parse_args([]).cuda_graphs and not parser.parse_args(["--no-cuda-graphs"]).cuda_graphs


def test_no_graphs_on_the_cpu_with_an_fp8_cache_or_when_not_asked():
    model = tiny_model()
    cache = KVCache(CachePolicy(5, 1), num_layers=2, frame_tokens=4, num_heads=1, head_dim=128)
    assert session_graphs(model, cache, 3) is None  # not asked
    model.cuda_graphs = True
    assert session_graphs(model, cache, 3) is None  # CPU
    fp8 = KVCache(CachePolicy(5, 1), num_layers=2, frame_tokens=4, num_heads=1, head_dim=128, fp8=True)
    assert session_graphs(model, fp8, 3) is None


@pytest.fixture
def fake_session_graphs(monkeypatch):
    made = []

    def fake(model, cache, forwards_per_block):
        if not model.cuda_graphs:
            return None
        made.append(ForwardGraphs(eager_calls=forwards_per_block, capture=FakeCapture()))
        return made[-1]

    monkeypatch.setattr(livetalk_sampler, "session_graphs", fake)
    monkeypatch.setattr(realvideo_sampler, "session_graphs", fake)
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
    model.cuda_graphs = True
    replayed = list(sample_livetalk(model, noise=SeededNoise(0), **arguments))
    (graphs,) = fake_session_graphs
    captured = graphs._capture.graphs
    # The window (15 frames, 9 sinks) is full from block 4; its ring then alternates two layouts
    # (blocks 4, 6, 8 and 5, 7, 9), captured at blocks 6 and 7: 5 + 5 replays each (4 steps + refresh).
    assert len(captured) == 2 and sorted(g.replays for g in captured) == [10, 10]
    assert all(torch.equal(a, b) for a, b in zip(eager, replayed))


def test_realvideo_replays_give_the_eager_latents(fake_session_graphs):
    model = tiny_model()
    eager = run_tiny(model, num_blocks=6, schedule=realvideo_schedule(2))
    model.cuda_graphs = True
    replayed = run_tiny(model, num_blocks=6, schedule=realvideo_schedule(2))
    (graphs,) = fake_session_graphs
    captured = graphs._capture.graphs
    # blocks 1, 3, 5 and 2, 4 share cache layouts, captured at blocks 3 and 4: 3 + 2 and 3 replays
    assert len(captured) == 2 and sorted(g.replays for g in captured) == [3, 5]
    assert all(torch.equal(a, b) for a, b in zip(eager, replayed))
