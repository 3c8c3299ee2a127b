"""The opt-in fp8 KV cache: what it stores where, how much memory it takes, and how far it moves
the samplers' outputs (fp8 rounding, not parity)."""

from __future__ import annotations

import pytest
import torch
from golden import golden_cases, repo_case
from test_realvideo import run_tiny, tiny_model

from livetalk_core.livetalk.model import load_livetalk_dit
from livetalk_core.livetalk.sampler import LIVETALK_CACHE, sample_livetalk
from livetalk_core.options import RuntimeOptions
from livetalk_core.realvideo.sampler import REALVIDEO_CACHE, realvideo_schedule
from livetalk_core.runtime.noise import SeededNoise
from livetalk_core.wan.dit import HEAD_DIM
from livetalk_core.wan.kv_cache import FP8_KV, KVCache
from livetalk_core.wan.rope import grid_rotations


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_fp8_cache_attends_the_policy_frames_past_1024_latents():
    # Every key row holds its stream frame index: a constant row is exact in fp8 with float32 scales.
    cache = KVCache(LIVETALK_CACHE, num_layers=1, frame_tokens=2, num_heads=1, head_dim=8, dtype=torch.float32,
                    fp8=True)
    assert cache.keys[0].dtype == FP8_KV
    for b in range(400):
        start = 3 * b
        frame_rows = (torch.arange(start, start + 3, dtype=torch.float32) + 1).repeat_interleave(2)
        kv = frame_rows.view(1, -1, 1, 1).expand(1, 6, 1, 8)
        for _ in range(2):  # a denoising step and the refresh rewrite the same slots
            cache.set_block(start, 3)
            keys, values = cache.update_and_get(0, kv, kv)
        assert keys.dtype == torch.float32
        frames = sorted({round(v) - 1 for v in keys.flatten().tolist()})
        assert frames == LIVETALK_CACHE.attended_frames(start, 3), b
        assert torch.equal(keys, values)


def test_fp8_cache_is_half_the_memory_within_fp8_rounding():
    shape = dict(num_layers=2, frame_tokens=16, num_heads=2, head_dim=HEAD_DIM)
    exact = KVCache(LIVETALK_CACHE, **shape, dtype=torch.bfloat16)
    small = KVCache(LIVETALK_CACHE, **shape, dtype=torch.bfloat16, fp8=True)
    assert small.num_bytes / exact.num_bytes == pytest.approx((HEAD_DIM + 2) / (2 * HEAD_DIM))
    g = torch.Generator().manual_seed(0)
    # rows of very different magnitudes: one scale per token and head keeps each one's precision
    k = (torch.randn(1, 48, 2, HEAD_DIM, generator=g) * torch.randn(1, 48, 2, 1, generator=g).mul(3).exp()).bfloat16()
    v = torch.randn(1, 48, 2, HEAD_DIM, generator=g).bfloat16()
    for cache in (exact, small):
        cache.set_block(0, 3)
    want, got = exact.update_and_get(1, k, v), small.update_and_get(1, k, v)
    for reference, ours in zip(want, got):
        assert ours.dtype == torch.bfloat16 and ours.shape == reference.shape
        error = (ours.float() - reference.float()).abs()
        row_max = reference.float().abs().amax(-1, keepdim=True)
        assert (error <= row_max * (2**-4 + 2**-7)).all()  # e4m3's half step, then the bf16 output's
        assert 0 < rel_l2(ours, reference) < 0.04


def test_fp8_sink_rotation_tracks_the_exact_one():
    shape = dict(num_layers=1, frame_tokens=3, num_heads=2, head_dim=HEAD_DIM, dtype=torch.bfloat16)
    exact, small = KVCache(REALVIDEO_CACHE, **shape), KVCache(REALVIDEO_CACHE, **shape, fp8=True)
    sink = torch.randn(1, 3, 2, HEAD_DIM, generator=torch.Generator().manual_seed(1)).bfloat16()
    for cache in (exact, small):
        cache.set_block(0, 1)
        cache.update_and_get(0, sink, sink)
    step = grid_rotations(torch.tensor([1]), 1, 1, HEAD_DIM)
    for _ in range(20):
        exact.rotate_sink_keys(0, step)
        small.rotate_sink_keys(0, step)
    exact.set_block(1, 2)
    small.set_block(1, 2)
    block = torch.zeros(1, 6, 2, HEAD_DIM, dtype=torch.bfloat16)
    want, got = exact.update_and_get(0, block, block)[0][:, :3], small.update_and_get(0, block, block)[0][:, :3]
    assert 0 < rel_l2(got, want) < 0.05


def test_the_workers_loader_sets_the_cache_storage(tmp_path):
    from safetensors.torch import save_file

    from livetalk_core.realvideo.parallel import load_realvideo_dit

    save_file({k: v.contiguous() for k, v in tiny_model().state_dict().items()}, str(tmp_path / "dit.safetensors"))
    for fp8 in (False, True):
        model = load_realvideo_dit(tmp_path / "dit.safetensors", RuntimeOptions(precision="fp32", fp8_kv_cache=fp8),
                                   device=torch.device("cpu"), audio_inject_layers=(0, 1))
        assert model.fp8_kv_cache is fp8


def test_realvideo_sampling_with_an_fp8_cache_moves_by_fp8_rounding():
    model = tiny_model()
    exact = run_tiny(model, schedule=realvideo_schedule(2))
    RuntimeOptions(fp8_kv_cache=True).apply(model)
    small = run_tiny(model, schedule=realvideo_schedule(2))
    for reference, ours in zip(exact, small, strict=True):
        assert torch.isfinite(ours).all()
        assert 0 < rel_l2(ours, reference) < 0.1


def test_livetalk_sampling_with_an_fp8_cache_moves_by_fp8_rounding():
    case = repo_case(golden_cases("livetalk"), "compact_fp32")  # in every clone
    model = load_livetalk_dit(case.file(case.manifest["weights"]["dit"]), torch.float32)
    g = torch.Generator().manual_seed(0)
    h, w = (s // 8 for s in case.manifest["image"]["target_hw"])
    arguments = dict(
        ref_latent=torch.randn(1, 16, 1, h, w, generator=g),
        audio_embeds=model.embed_audio(torch.randn(1, 4 * 9 - 3, model.livetalk_config.audio_features, generator=g)),
        context=torch.randn(1, 8, model.config.text_dim, generator=g),
        num_blocks=3,
    )
    exact = list(sample_livetalk(model, noise=SeededNoise(0), **arguments))
    RuntimeOptions(fp8_kv_cache=True).apply(model)
    small = list(sample_livetalk(model, noise=SeededNoise(0), **arguments))
    for reference, ours in zip(exact, small, strict=True):
        assert 0 < rel_l2(ours, reference) < 0.1
