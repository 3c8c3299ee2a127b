"""Unit tests of the RealVideo path: image and audio rules, block plans, the S2V key layout, the
loaders, the sink drift, sharded RoPE and the sampler's contract (parity is in test_realvideo_parity)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from golden import require_shared
from safetensors.torch import save_file

from livetalk_core.errors import CheckpointError, InputError
from livetalk_core.realvideo.audio import bucket_indices, split_segments
from livetalk_core.realvideo.image import nearest_multiple, pil_bicubic_resize, plan_image, preprocess_reference
from livetalk_core.realvideo.model import (
    RELEASE_INJECT_LAYERS,
    S2VConfig,
    S2VDiT,
    load_s2v_dit,
    shard_rotations,
)
from livetalk_core.realvideo.sampler import (
    REALVIDEO_CACHE,
    BlockPlan,
    pad_context,
    plan_blocks,
    realvideo_schedule,
    sample_realvideo,
)
from livetalk_core.runtime.noise import SeededNoise
from livetalk_core.wan.dit import HEAD_DIM, WanCoreConfig
from livetalk_core.wan.kv_cache import KVCache
from livetalk_core.wan.rope import apply_rotary, grid_rotations

TEXT_DIM = 32
AUDIO_DIM = 8


# Spec §2.2 (W x H in, W x H out, resize W x H).
@pytest.mark.parametrize(
    "size, target, resize",
    [
        ((480, 640), (448, 576), (448, 597)),
        ((640, 480), (576, 448), (597, 448)),
        ((1920, 1080), (704, 384), (683, 384)),
        ((1080, 1920), (384, 704), (384, 683)),
        ((1024, 1024), (512, 512), (512, 512)),
    ],
)
def test_image_size_rule(size, target, resize):
    plan = plan_image(*size)
    assert plan.target_hw[::-1] == target and plan.resize_hw[::-1] == resize
    assert plan.split_axis == ("h" if target[1] < target[0] else "w")


def test_extreme_aspect_is_a_clear_error():
    with pytest.raises(InputError, match="too elongated"):
        plan_image(100000, 3)


def test_nearest_multiple_rounds_ties_up():
    assert nearest_multiple(96) == 128 and nearest_multiple(95) == 64 and nearest_multiple(160) == 192


def test_16_9_input_is_padded_black():
    image = torch.full((108, 192, 3), 200, dtype=torch.uint8)
    x, plan = preprocess_reference(image, area=128 * 64)
    assert plan.target_hw == (64, 128) and plan.resize_hw[1] < 128
    assert torch.all(x[..., 0] == -1) and torch.all(x[..., -1] == -1)


def test_comfy_float_image_equals_uint8():
    image = torch.randint(0, 256, (70, 90, 3), dtype=torch.uint8)
    as_uint8, _ = preprocess_reference(image, area=64 * 64)
    as_float, _ = preprocess_reference(image[None].float() / 255, area=64 * 64)
    assert torch.equal(as_uint8, as_float)


def test_bicubic_matches_pillow():
    """Pillow is no dependency of the pack, but .ci/run installs it (ComfyUI needs it) for this check."""
    from PIL import Image as image_module

    rng = np.random.default_rng(0)
    # Both pass orders of Pillow 13 (height shrinking much more than width, and the rest), and upscales.
    sizes = [((120, 90), (30, 80)), ((120, 90), (60, 50)), ((40, 50), (97, 33)), ((90, 40), (91, 120))]
    for (h_in, w_in), (h, w) in sizes:
        pixels = rng.integers(0, 256, (h_in, w_in, 3), dtype=np.uint8)
        expected = np.asarray(image_module.fromarray(pixels).resize((w, h), image_module.BICUBIC))
        assert np.array_equal(pil_bicubic_resize(pixels, h, w), expected), (h_in, w_in, h, w)


def test_silence_bucket_indices():
    # Spec §2.3: 8000 samples -> 24 CNN frames -> 14 at 30 fps -> these 8 frames.
    assert bucket_indices(14, 8).tolist() == [0, 2, 4, 6, 8, 9, 11, 13]
    assert (bucket_indices(149, 80) == np.round(np.arange(80) / 16 * 30).astype(int)).all()


def test_split_segments_pads_only_the_last():
    segments = split_segments(torch.ones(100800))
    assert [s.numel() for s in segments] == [80000, 32000]
    assert segments[1][20800:].abs().sum() == 0 and segments[1][:20800].eq(1).all()


def test_schedules():
    assert realvideo_schedule(4).timesteps == pytest.approx([1000.0, 900.0, 750.0, 500.0], abs=1e-3)
    assert realvideo_schedule(2).timesteps == pytest.approx([1000.0, 750.0], abs=1e-3)
    with pytest.raises(InputError):
        realvideo_schedule(3)


def test_block_plan():
    plan = plan_blocks([20, 8])
    assert len(plan) == 14
    assert [b.audio_ptr for b in plan[:10]] == list(range(0, 20, 2)) and plan[10] == BlockPlan(1, 0)
    longer = plan_blocks([20, 8], num_blocks=16)
    assert longer[14:] == [BlockPlan(1, 6), BlockPlan(1, 6)]
    assert [b.audio_ptr for b in plan_blocks([3])] == [0, 1]  # clamped to the last full window
    assert len(plan_blocks([20, 8], num_blocks=3)) == 3
    with pytest.raises(InputError):
        plan_blocks([1])


def release_config() -> S2VConfig:
    core = WanCoreConfig(dim=5120, in_dim=16, out_dim=16, ffn_dim=13824, num_layers=40, text_dim=4096)
    return S2VConfig(core=core, audio_dim=1024, audio_layers=25, audio_tokens=4,
                     inject_layers=RELEASE_INJECT_LAYERS, cond_dim=16)


def test_release_key_layout_matches_upstream():
    keys_file = require_shared("spec/realvideo_keys.json")
    upstream = {k.removeprefix("model."): tuple(v) for k, v in json.loads(keys_file.read_text()).items()}
    assert release_config().expected_shapes() == upstream


def test_config_inferred_from_release_shapes():
    shapes = release_config().expected_shapes()
    sd = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    config = S2VConfig.from_state_dict(sd)
    assert config == release_config()
    with torch.device("meta"):
        model = S2VDiT(config)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes


def tiny_model(num_layers: int = 2, inject: tuple[int, ...] = (0, 1), seed: int = 0, heads: int = 1) -> S2VDiT:
    torch.manual_seed(seed)
    core = WanCoreConfig(dim=heads * HEAD_DIM, in_dim=16, out_dim=16, ffn_dim=64, num_layers=num_layers,
                         text_dim=TEXT_DIM)
    model = S2VDiT(S2VConfig(core=core, audio_dim=AUDIO_DIM, audio_layers=25, audio_tokens=4,
                             inject_layers=inject, cond_dim=16))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
    return model.eval().requires_grad_(False)


def test_loaders_read_both_layouts_and_dtypes(tmp_path):
    model = tiny_model()
    sd = model.state_dict()
    torch.save({"generator": {"model." + k: v for k, v in sd.items()}}, tmp_path / "model.pt")
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in sd.items()}, tmp_path / "diffusion_model.safetensors")
    from_pt = load_s2v_dit(tmp_path / "model.pt", torch.float32, audio_inject_layers=(0, 1))
    assert all(torch.equal(from_pt.state_dict()[k], v) for k, v in sd.items())
    from_st = load_s2v_dit(tmp_path / "diffusion_model.safetensors", "bf16", audio_inject_layers=(0, 1))
    assert from_st.dtype == torch.bfloat16
    assert all(torch.equal(from_st.state_dict()[k], v.to(torch.bfloat16)) for k, v in sd.items())


def test_loader_errors_are_clear(tmp_path):
    sd = tiny_model().state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "dit.safetensors")
    with pytest.raises(CheckpointError, match="audio_inject_layers"):
        load_s2v_dit(tmp_path / "dit.safetensors")  # not the release depth: the layers must be named
    with pytest.raises(CheckpointError, match="does not fit"):
        load_s2v_dit(tmp_path / "dit.safetensors", audio_inject_layers=(0,))
    partial = {k: v.contiguous() for k, v in sd.items() if not k.startswith("blocks.1.ffn")}
    save_file(partial, tmp_path / "partial.safetensors")
    with pytest.raises(CheckpointError, match="Missing 4 keys"):
        load_s2v_dit(tmp_path / "partial.safetensors", audio_inject_layers=(0, 1))
    other = {k: v.contiguous() for k, v in sd.items() if not k.startswith(("casual_audio", "audio_injector"))}
    save_file(other, tmp_path / "t2v.safetensors")
    with pytest.raises(CheckpointError, match="Wan video DiT without an audio branch"):
        load_s2v_dit(tmp_path / "t2v.safetensors")


def test_sink_rotation_accumulates_and_leaves_the_window_alone():
    cache = KVCache(REALVIDEO_CACHE, num_layers=1, frame_tokens=3, num_heads=2, head_dim=HEAD_DIM, dtype=torch.float64)
    keys = torch.randn_like(cache.keys[0])
    cache.keys[0].copy_(keys)
    step = grid_rotations(torch.tensor([1]), 1, 1, HEAD_DIM)
    cache.rotate_sink_keys(0, step)
    cache.rotate_sink_keys(0, step)
    sink = keys[:, :3]
    expected = apply_rotary(sink, grid_rotations(torch.tensor([2]), 1, 1, HEAD_DIM))
    torch.testing.assert_close(cache.keys[0][:, :3], expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(cache.keys[0][:, 3:], keys[:, 3:])
    # only the temporal pairs move
    torch.testing.assert_close(cache.keys[0][:, :3, :, 44:], sink[..., 44:], rtol=0, atol=0)


def test_sharded_rotations_tile_the_full_grid():
    positions = torch.tensor([5, 6])
    full = shard_rotations(positions, (2, 4, 6)).view(2, 4, 6, 1, -1)
    halves_w = [shard_rotations(positions, (2, 4, 3), (0, o)).view(2, 4, 3, 1, -1) for o in (0, 3)]
    halves_h = [shard_rotations(positions, (2, 2, 6), (o, 0)).view(2, 2, 6, 1, -1) for o in (0, 2)]
    # Each shard computes cos/sin over a grid of another size than the full one, so an angle may go
    # through the vectorised (SLEEF, <= 1 ulp) path in one and the scalar libm tail in the other: the
    # float64 tables agree to a few ulp (atol 1e-15 on values in [-1, 1]), not bit for bit. A wrong
    # offset moves entries by O(0.1-1).
    torch.testing.assert_close(torch.cat(halves_w, dim=2), full, rtol=0, atol=1e-15)
    torch.testing.assert_close(torch.cat(halves_h, dim=1), full, rtol=0, atol=1e-15)


def run_tiny(model: S2VDiT, seed: int = 0, **overrides) -> list[torch.Tensor]:
    """Blocks of a small run: two audio segments of 4 and 2 latent frames; ``overrides`` replace any
    argument of :func:`sample_realvideo`."""
    torch.manual_seed(1)
    arguments = dict(
        ref_latent=torch.randn(1, 16, 1, 4, 6),
        idle_context=torch.randn(1, 10, TEXT_DIM),
        talking_context=torch.randn(1, 7, TEXT_DIM),
        audio_features=[torch.randn(1, 25, AUDIO_DIM, 16), torch.randn(1, 25, AUDIO_DIM, 8)],
        noise=SeededNoise(seed),
    )
    return list(sample_realvideo(model, **{**arguments, **overrides}))


def test_sampler_blocks_and_idle_tail():
    model = tiny_model()
    blocks = run_tiny(model, schedule=realvideo_schedule(2))
    assert len(blocks) == 3 and all(b.shape == (1, 16, 2, 4, 6) for b in blocks)
    longer = run_tiny(model, num_blocks=5, schedule=realvideo_schedule(2))
    assert all(torch.equal(a, b) for a, b in zip(blocks, longer))  # causal: a longer run starts the same
    assert all(torch.isfinite(b).all() for b in longer)
    assert not torch.equal(run_tiny(model, schedule=realvideo_schedule(2), seed=1)[0], blocks[0])


def test_sampler_rejects_bad_inputs():
    model = tiny_model()
    with pytest.raises(InputError, match="reference latent"):
        run_tiny(model, ref_latent=torch.randn(1, 16, 2, 4, 6))
    with pytest.raises(InputError, match="wav2vec2"):
        run_tiny(model, audio_features=[torch.zeros(1, 13, 768, 8)])
    with pytest.raises(InputError, match="does not fit"):
        run_tiny(model, plan=[BlockPlan(2, 0)])
    with pytest.raises(InputError, match="prompt embedding"):
        run_tiny(model, talking_context=torch.zeros(1, 600, TEXT_DIM))
    assert pad_context(torch.ones(1, 7, TEXT_DIM), TEXT_DIM).shape == (1, 512, TEXT_DIM)
