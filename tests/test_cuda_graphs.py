"""CUDA graphs of the layer stack (``cuda_graphs.use_cuda_graphs``): the model keeps its KV cache
between runs, a stale run is refused, moved weights drop the graphs; on a GPU, replayed graphs give
the same latents as launching kernel by kernel (those tests skip without CUDA)."""

from __future__ import annotations

import pytest
import torch

from golden import golden_cases
from livetalk_core.cuda_graphs import StaleCacheError, use_cuda_graphs
from livetalk_core.livetalk_model import load_livetalk_dit
from livetalk_core.noise import SeededNoise
from livetalk_core.realvideo_sampler import realvideo_schedule
from livetalk_core.sampler import sample_livetalk
from test_realvideo import run_tiny, tiny_model

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
LIVETALK_CASE = [c for c in golden_cases("livetalk") if c.model == "livetalk"][:1]


def livetalk_run(case, device: str, num_blocks: int = 7):
    """A LiveTalk model of ``case`` on ``device`` and a function sampling ``num_blocks`` blocks (7:
    every cache signature, then one that repeats)."""
    model = load_livetalk_dit(case.file(case.manifest["weights"]["dit"]), torch.float32, device)
    g = torch.Generator().manual_seed(0)
    h, w = (s // 8 for s in case.manifest["image"]["target_hw"])
    arguments = dict(
        ref_latent=torch.randn(1, 16, 1, h, w, generator=g),
        audio_embeds=model.embed_audio(torch.randn(1, 4 * 3 * num_blocks - 3, model.livetalk_config.audio_features,
                                                   generator=g).to(device)),
        context=torch.randn(1, 8, model.config.text_dim, generator=g),
        num_blocks=num_blocks,
    )
    return model, lambda seed=0: sample_livetalk(model, noise=SeededNoise(seed), **arguments)


@pytest.mark.parametrize("case", LIVETALK_CASE, ids=lambda c: c.name)
def test_the_model_keeps_its_cache_and_refuses_a_stale_run(case):
    model, sample = livetalk_run(case, "cpu", num_blocks=3)
    plain = [b.clone() for b in sample()]
    use_cuda_graphs(model)
    first = sample()
    assert torch.equal(next(first), plain[0])
    buffers = model.layer_graphs._cache.keys[0].data_ptr()
    second = sample()
    assert [torch.equal(a, b) for a, b in zip(second, plain, strict=True)] == [True] * 3
    assert model.layer_graphs._cache.keys[0].data_ptr() == buffers  # the same buffers, a fresh run
    with pytest.raises(StaleCacheError, match="started another video"):
        next(first)
    model.double()  # the weights move: the graphs and the cache are dropped
    doubled = list(sample())
    assert model.layer_graphs._cache.keys[0].dtype == torch.float64
    assert all(torch.allclose(a.float(), b, atol=1e-3) for a, b in zip(doubled, plain, strict=True))


@needs_cuda
@pytest.mark.parametrize("case", LIVETALK_CASE, ids=lambda c: c.name)
def test_livetalk_graphs_replay_the_same_latents(case):
    model, sample = livetalk_run(case, "cuda")
    plain = [b.clone() for b in sample()]
    use_cuda_graphs(model)
    for seed in (0, 0, 1):  # the first run captures, the next ones replay (with other inputs too)
        graphed = [b.clone() for b in sample(seed)]
        want = plain if seed == 0 else [b.clone() for b in _without_graphs(model, lambda: sample(seed))]
        assert [torch.equal(a, b) for a, b in zip(graphed, want, strict=True)] == [True] * len(want)
    assert not model.layer_graphs.failed
    assert len(model.layer_graphs._graphs) == 6  # blocks 0-3, then two that alternate


@needs_cuda
def test_realvideo_graphs_replay_the_same_latents():
    model = tiny_model().cuda()
    plain = run_tiny(model, schedule=realvideo_schedule(2), num_blocks=6)
    use_cuda_graphs(model)
    for _ in range(2):
        graphed = run_tiny(model, schedule=realvideo_schedule(2), num_blocks=6)
        assert [torch.equal(a, b) for a, b in zip(graphed, plain, strict=True)] == [True] * 6
    assert not model.layer_graphs.failed
    assert len(model.layer_graphs._graphs) == 5  # the prefill, blocks 0 and 1, then two that alternate


def _without_graphs(model, run):
    graphs, model.layer_graphs = model.layer_graphs, None
    try:
        return list(run())
    finally:
        model.layer_graphs = graphs
