"""Linear weights kept in float8 (e4m3fn) with one float32 scale per tensor, dequantised per layer.

The 14B DiT's Linear weights are ~14 of its 16.3 B parameters: in fp8 they take ~16 GB instead of
~33 GB in bf16. :class:`FP8Linear` stores ``weight`` in fp8 and multiplies it back by its scale in
the compute dtype inside ``forward`` (one layer's weight at a time), so the numbers equal a bf16
model whose weights are ``dequantize(q, scale)``. The values come from a Comfy ``_fp8_scaled``
file as stored, or from :func:`quantize` (per-tensor absmax scaling) of a bf16/fp32 checkpoint.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` -> (fp8 values, float32 scalar scale) with ``weight ~= values * scale``."""
    w = weight.float()
    scale = (w.abs().amax() / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    return (w / scale).to(FP8), scale


def dequantize(values: torch.Tensor, scale: torch.Tensor | float, dtype: torch.dtype) -> torch.Tensor:
    """fp8 ``values`` times ``scale`` (a scalar, or one per output row), rounded once to ``dtype``.

    A scalar scale multiplies as a Python number: the product is formed in float32 (PyTorch's
    compute type for reduced-precision elementwise ops) straight from the ``dtype`` copy, which is
    exact since every e4m3 value is a bf16 value; this equals ``(values.float() * scale).to(dtype)``
    with a fraction of the memory traffic.
    """
    if isinstance(scale, torch.Tensor) and scale.numel() == 1:
        scale = float(scale)
    if isinstance(scale, float):
        return values.to(dtype).mul_(scale)
    scale = scale.to(values.device, torch.float32).reshape(-1, *([1] * (values.ndim - 1)))
    return (values.float() * scale).to(dtype)


class FP8Linear(nn.Linear):
    """An ``nn.Linear`` whose ``weight`` is fp8 with a ``weight_scale`` (not in the state dict, so
    checkpoints keep their key names); the weight is dequantised to the input's dtype per call."""

    weight_scale: torch.Tensor | float

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, dequantize(self.weight, self.weight_scale, x.dtype), self.bias)


def to_fp8_linear(module: nn.Linear, scale: torch.Tensor) -> None:
    """Turn ``module`` (whose weight is already fp8) into an :class:`FP8Linear` in place. A per-tensor
    scale is kept as a Python float so that no forward waits on the GPU to read it."""
    module.__class__ = FP8Linear
    if scale.numel() == 1:
        module.weight_scale = float(scale)
    else:
        module.register_buffer("weight_scale", scale.to(module.weight.device, torch.float32), persistent=False)
