"""Unit tests of the shared Wan core: scheduler tables, RoPE, the KV-cache policy, the DiT loader."""

import math

import pytest
import torch

from livetalk_core.livetalk.sampler import LIVETALK_CACHE
from livetalk_core.runtime.scheduler import livetalk_schedule, warped_schedule
from livetalk_core.wan.dit import sinusoidal_embedding
from livetalk_core.wan.kv_cache import CachePolicy, KVCache
from livetalk_core.wan.rope import apply_rotary, axis_rotations, axis_splits, compose_rotations, grid_rotations


def test_livetalk_schedule_tables():
    s = livetalk_schedule()
    assert s.sigmas == pytest.approx([1.0, 0.9375, 0.8333333134651184, 0.625], abs=0)
    assert s.timesteps == pytest.approx([1000.0, 937.5, 833.3333129882812, 625.0], abs=0)
    assert [t.item() for t in s.model_timesteps(torch.bfloat16)] == [1000.0, 936.0, 832.0, 624.0]
    assert [t.item() for t in s.model_timesteps(torch.float32)] == pytest.approx(list(s.timesteps), abs=0)


def test_warped_schedule_realvideo_steps():
    two = warped_schedule([1000, 500], shift=3.0)
    four = warped_schedule([1000, 750, 500, 250], shift=3.0)
    assert two.timesteps == pytest.approx([1000.0, 750.0], abs=1e-3)
    assert four.timesteps == pytest.approx([1000.0, 900.0, 750.0, 500.0], abs=1e-3)
    assert four.sigmas[1] == pytest.approx(0.8999999762, abs=1e-9)


def test_sinusoidal_embedding_cos_first_and_dtype():
    t = torch.tensor([0.0, 624.0], dtype=torch.bfloat16)
    emb = sinusoidal_embedding(256, t)
    assert emb.dtype == torch.bfloat16 and emb.shape == (2, 256)
    assert torch.all(emb[0, :128] == 1) and torch.all(emb[0, 128:] == 0)
    w0 = 1.0  # first frequency is 10000^0
    assert emb[1, 0].item() == pytest.approx(math.cos(624.0 * w0), abs=1e-2)


def test_rope_per_channel_form_is_upstreams_pairwise_arithmetic_bit_for_bit():
    # Upstream forms (re*cos - im*sin, re*sin + im*cos) in float64 from (cos, sin) per pair; the
    # per-channel tables (cos on both channels, sine signed per channel) must give the same bits,
    # eager and compiled (the compiled form is the fast path's).
    f, h, w, heads = 2, 4, 3, 3
    positions = torch.arange(7, 7 + f)
    x = torch.randn(1, f * h * w, heads, 128, generator=torch.Generator().manual_seed(3)).bfloat16()
    tables = grid_rotations(positions, h, w, 128)
    cos, sin = tables[..., 0, 0::2], tables[..., 1, 1::2]  # a pair's second channel carries +sin
    assert torch.equal(tables[..., 0, 1::2], cos) and torch.equal(tables[..., 1, 0::2], -sin)
    pairs = x.double().unflatten(-1, (-1, 2))
    re, im = pairs[..., 0], pairs[..., 1]
    expected = torch.stack([re * cos - im * sin, re * sin + im * cos], dim=-1).flatten(-2).bfloat16()
    assert torch.equal(apply_rotary(x, tables), expected)
    assert torch.equal(torch.compile(apply_rotary, dynamic=False)(x, tables), expected)


def test_composed_rotations_add_their_angles():
    a, b = axis_rotations(torch.tensor([3]), 44), axis_rotations(torch.tensor([5]), 44)
    torch.testing.assert_close(compose_rotations(a, b), axis_rotations(torch.tensor([8]), 44), rtol=0, atol=1e-14)


def test_rope_matches_direct_formula():
    head_dim, heads, f, h, w = 128, 2, 3, 2, 3
    start = 1030  # beyond upstream's 1024-entry table
    x = torch.randn(1, f * h * w, heads, head_dim, dtype=torch.float64)
    out = apply_rotary(x, grid_rotations(torch.arange(start, start + f), h, w, head_dim))
    dt, dh, dw = axis_splits(head_dim)
    assert (dt, dh, dw) == (44, 42, 42)
    expected = torch.empty_like(x)
    for tok in range(f * h * w):
        fi, rem = divmod(tok, h * w)
        hi, wi = divmod(rem, w)
        angles = []
        for pos, d in ((start + fi, dt), (hi, dh), (wi, dw)):
            angles += [pos / 10000 ** (2 * j / d) for j in range(d // 2)]
        for p, a in enumerate(angles):
            re, im = x[0, tok, :, 2 * p], x[0, tok, :, 2 * p + 1]
            expected[0, tok, :, 2 * p] = re * math.cos(a) - im * math.sin(a)
            expected[0, tok, :, 2 * p + 1] = re * math.sin(a) + im * math.cos(a)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)


# Spec §3.3: latent frames each LiveTalk block attends (window 15, sink 9, 3 frames per block).
LIVETALK_TRACE = {
    0: list(range(0, 3)),
    1: list(range(0, 6)),
    2: list(range(0, 9)),
    3: list(range(0, 12)),
    4: list(range(0, 15)),
    5: list(range(0, 9)) + list(range(12, 18)),
    6: list(range(0, 9)) + list(range(15, 21)),
}


@pytest.mark.parametrize("block", [*LIVETALK_TRACE, 40, 400, 1000])
def test_livetalk_cache_trace(block):
    start = 3 * block
    expected = LIVETALK_TRACE.get(block, list(range(9)) + list(range(start - 3, start + 3)))
    assert LIVETALK_CACHE.attended_frames(start, 3) == expected


def _frame_tagged_cache(policy: CachePolicy, num_blocks: int, block_frames: int, fs: int = 2):
    """Write blocks whose keys carry their stream frame index; return what each block attends."""
    cache = KVCache(policy, num_layers=1, frame_tokens=fs, num_heads=1, head_dim=1, dtype=torch.float64)
    seen = []
    for b in range(num_blocks):
        start = b * block_frames
        frames = torch.arange(start, start + block_frames, dtype=torch.float64).repeat_interleave(fs)
        kv = frames.view(1, -1, 1, 1)
        for _ in range(3):  # every denoising step and the refresh rewrite the same slots
            cache.set_block(start, block_frames)
            keys, _ = cache.update_and_get(0, kv, kv)
        seen.append(sorted(set(int(v) for v in keys.flatten().tolist())))
    return seen, cache


def test_kv_cache_holds_the_policy_frames_past_1024_latents():
    # 400 blocks = 1200 latent frames, past upstream's 1024-frame RoPE table.
    seen, cache = _frame_tagged_cache(LIVETALK_CACHE, 400, 3)
    for b, frames in enumerate(seen):
        assert frames == LIVETALK_CACHE.attended_frames(3 * b, 3), b
    # memory is bounded by the window, not the video length
    assert cache.keys[0].shape[1] == 15 * 2


def test_kv_cache_realvideo_ring():
    policy = CachePolicy(window_frames=5, sink_frames=1)
    cache = KVCache(policy, num_layers=1, frame_tokens=1, num_heads=1, head_dim=1, dtype=torch.float64)
    cache.set_block(0, 1)
    cache.update_and_get(0, torch.zeros(1, 1, 1, 1, dtype=torch.float64), torch.zeros(1, 1, 1, 1, dtype=torch.float64))
    attended = []
    for block in range(6):
        start = 1 + 2 * block
        kv = torch.arange(start, start + 2, dtype=torch.float64).view(1, 2, 1, 1)
        cache.set_block(start, 2)
        keys, _ = cache.update_and_get(0, kv, kv)
        attended.append(sorted(int(v) for v in keys.flatten().tolist()))
    assert attended[0] == [0, 1, 2]
    assert attended[1] == [0, 1, 2, 3, 4]
    assert attended[5] == [0, 9, 10, 11, 12]


def test_cache_policy_rejects_bad_sizes():
    with pytest.raises(ValueError):
        CachePolicy(window_frames=4, sink_frames=4)
