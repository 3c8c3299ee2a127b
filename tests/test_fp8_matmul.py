"""fp8 x fp8 scaled matmuls (``fp8_matmul``): the arithmetic, the conversion of both DiTs, the
fall-backs. ``torch._scaled_mm`` has CPU kernels, so the real op runs here; the GPU speed and the
full-size deviation are in benchmarks/ and docs/performance.md."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn as nn
from test_compile import run as run_livetalk
from test_compile import tiny_model as tiny_livetalk
from test_realvideo import run_tiny, tiny_model

from livetalk_core.errors import InputError
from livetalk_core.realvideo.model import load_s2v_dit
from livetalk_core.realvideo.sampler import realvideo_schedule
from livetalk_core.wan.fp8_linear import FP8, FP8Linear, FP8MatmulLinear, quantize, to_fp8_linear, use_fp8_matmuls


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def bf16_linear(in_features: int = 256, out_features: int = 512, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features).to(torch.bfloat16).requires_grad_(False)


def test_scaled_matmul_is_rowwise_fp8_arithmetic():
    layer = bf16_linear()
    x = torch.randn(2, 37, 256, dtype=torch.bfloat16) * torch.linspace(0.01, 10, 37)[:, None].to(torch.bfloat16)
    exact = layer(x).float()
    assert use_fp8_matmuls([layer]) == 1
    assert isinstance(layer, FP8MatmulLinear) and layer.weight.dtype == FP8
    assert layer.weight_scale.shape == (1, 512) and layer.weight_scale.dtype == torch.float32
    y = layer(x)
    assert y.shape == (2, 37, 512) and y.dtype == torch.bfloat16
    # what the kernel computes: per-row fp8 inputs times per-channel fp8 weights, both rescaled
    rows = x.reshape(-1, 256).float()
    row_scale = rows.abs().amax(dim=1, keepdim=True) / torch.finfo(FP8).max
    emulated = ((rows / row_scale).to(FP8).float() * row_scale) @ (layer.weight.float() * layer.weight_scale.t()).t()
    emulated = (emulated + layer.bias.float()).reshape(2, 37, 512)
    assert rel_l2(y, emulated) < 5e-3
    # and that is bf16's result up to fp8 rounding; rows of very different size are all kept
    assert 1e-3 < rel_l2(y, exact) < 0.06
    per_row = ((y.float() - exact).norm(dim=-1) / exact.norm(dim=-1)).max().item()
    assert per_row < 0.08


def test_zero_rows_and_fp8_weight_layers():
    layer = bf16_linear(64, 32)
    values, scale = quantize(layer.weight.float())
    layer.weight = nn.Parameter(values, requires_grad=False)
    to_fp8_linear(layer, scale)
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    x[2] = 0
    before = layer(x)
    use_fp8_matmuls([layer])
    # the stored fp8 values are kept
    assert isinstance(layer, FP8MatmulLinear) and torch.equal(layer.weight.view(torch.uint8), values.view(torch.uint8))
    assert torch.equal(layer.weight_scale, scale.expand(1, 32))
    after = layer(x)
    assert torch.isfinite(after).all() and torch.equal(after[2], layer.bias)
    assert rel_l2(after, before) < 0.06


def test_livetalk_dit_in_fp8_matmuls_stays_close_to_bf16():
    model = tiny_livetalk().to(torch.bfloat16)
    reference = run_livetalk(model, blocks=2)
    layers = model.heavy_linears()
    assert len(layers) == 4 * 10  # per block: self q/k/v/o, cross q/k/v/o, the two FFN layers
    assert use_fp8_matmuls(layers.values()) == 40
    assert model.patch_embedding.weight.dtype == torch.bfloat16 and not isinstance(model.head.head, FP8MatmulLinear)
    ours = run_livetalk(model, blocks=2)
    assert torch.isfinite(ours).all()
    assert 0 < rel_l2(ours, reference) < 0.1


def test_sizes_the_kernels_cannot_take_stay_bf16():
    odd, even = bf16_linear(30, 32), bf16_linear(32, 48)
    assert use_fp8_matmuls([odd, even]) == 1
    assert type(odd) is nn.Linear and isinstance(even, FP8MatmulLinear)


def test_fp8_matmuls_need_bf16():
    layer = nn.Linear(32, 32)
    with pytest.raises(InputError, match="bf16"):
        use_fp8_matmuls([layer])
    assert type(layer) is nn.Linear


def test_gpu_without_fp8_tensor_cores_keeps_bf16(monkeypatch, caplog):
    layer = bf16_linear(32, 32)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce RTX 3090")
    with caplog.at_level(logging.WARNING):
        assert use_fp8_matmuls([layer], device=torch.device("cuda")) == 0
    assert type(layer) is nn.Linear and layer.weight.dtype == torch.bfloat16
    assert "compute capability 8.9" in caplog.text and "RTX 3090" in caplog.text


def test_s2v_loader_fp8_matmul(tmp_path):
    from safetensors.torch import save_file

    model = tiny_model()
    path = tmp_path / "dit_bf16.safetensors"
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}, path)
    exact = load_s2v_dit(path, torch.bfloat16, audio_inject_layers=(0, 1))
    fast = load_s2v_dit(path, torch.bfloat16, audio_inject_layers=(0, 1), fp8_matmul=True)
    converted = [m for m in fast.heavy_linears().values() if isinstance(m, FP8MatmulLinear)]
    assert fast.blocks[1].cross_attn.k in converted and fast.audio_injector.injector[0].o in converted
    # rounded per output channel when the file is bf16
    weight = exact.blocks[0].self_attn.q.weight.float()
    assert torch.equal(fast.blocks[0].self_attn.q.weight_scale[0], weight.abs().amax(dim=1) / torch.finfo(FP8).max)
    ref = run_tiny(exact, schedule=realvideo_schedule(2), num_blocks=1)[0]
    ours = run_tiny(fast, schedule=realvideo_schedule(2), num_blocks=1)[0]
    assert 0 < rel_l2(ours, ref) < 0.1
    with pytest.raises(InputError, match="bf16"):
        load_s2v_dit(path, torch.float32, audio_inject_layers=(0, 1), fp8_matmul=True)
    assert not any(isinstance(m, FP8Linear) and not isinstance(m, FP8MatmulLinear) for m in converted)
