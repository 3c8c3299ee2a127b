"""Linear layers with float8 (e4m3fn) weights: dequantised per call, or multiplied in fp8.

* :class:`FP8Linear` (``fp8_weights``): the weight is stored in fp8 with a float32 scale and turned
  back into the compute dtype inside ``forward``, one layer at a time, so the numbers equal a bf16
  model whose weights are ``dequantize(q, scale)``. The 14B DiT's Linear weights are ~14 of its
  16.3 B parameters: ~16 GB instead of ~33 GB in bf16.
* :class:`FP8MatmulLinear` (``fp8_matmul``): the same fp8 weight, one scale per output channel, and
  each call quantises its input rows too (scale = the row's absmax / 448) and multiplies the two on
  the fp8 tensor cores with ``torch._scaled_mm``, which applies both scales and the bias and writes
  the compute dtype. Under ``torch.compile`` the input's scale-and-cast fuses into one kernel. On
  Hopper the fp8 GEMMs run at about twice the bf16 rate; the outputs move by fp8 rounding (a few
  percent per layer), so it is a setting, off by default, and reported apart from the bf16 parity.

The fp8 values come from a Comfy ``_fp8_scaled`` file as stored, or from :func:`quantize` of a
bf16/fp32 checkpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import InputError

log = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max
_SMALLEST_SCALE = 1e-12  # an all-zero row or weight still gets a usable (finite, nonzero) scale
FP8_MATMUL_MIN_CAPABILITY = (8, 9)  # fp8 tensor cores: Ada (8.9) and Hopper (9.0) or newer


def quantize(weight: torch.Tensor, per_row: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` -> (fp8 values, float32 scale) with ``weight ~= values * scale``.

    The scale is one absmax scale for the tensor (a 0-dim tensor) or, with ``per_row``, one per
    output row (``[rows]``).
    """
    w = weight.float()
    amax = w.abs().amax(dim=tuple(range(1, w.ndim))) if per_row else w.abs().amax()
    scale = (amax / FP8_MAX).clamp(min=_SMALLEST_SCALE)
    return (w / scale.reshape(-1, *([1] * (w.ndim - 1))) if per_row else w / scale).to(FP8), scale


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


class FP8MatmulLinear(nn.Linear):
    """An ``nn.Linear`` computed as an fp8 x fp8 scaled matmul.

    ``weight``: fp8 ``[out, in]``; ``weight_scale``: float32 ``[1, out]``. Inputs ``[..., in]`` in
    bf16 give ``[..., out]`` in bf16.
    """

    weight_scale: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        row_scale = rows.abs().amax(dim=1, keepdim=True).float().div(FP8_MAX).clamp(min=_SMALLEST_SCALE)
        quantized = (rows.float() / row_scale).to(FP8)
        y = torch._scaled_mm(
            quantized, self.weight.t(), scale_a=row_scale, scale_b=self.weight_scale, bias=self.bias, out_dtype=x.dtype
        )
        return y.reshape(*x.shape[:-1], y.shape[-1])


def to_fp8_linear(module: nn.Linear, scale: torch.Tensor) -> None:
    """Turn ``module`` (whose weight is already fp8) into an :class:`FP8Linear` in place. A per-tensor
    scale is kept as a Python float so that no forward waits on the GPU to read it."""
    module.__class__ = FP8Linear
    if scale.numel() == 1:
        module.weight_scale = float(scale)
    else:
        module.register_buffer("weight_scale", scale.to(module.weight.device, torch.float32), persistent=False)


def fp8_matmul_supported(device: torch.device) -> bool:
    """Whether ``torch._scaled_mm`` has fp8 kernels for ``device`` (CPUs, and GPUs of compute
    capability 8.9+); logs a warning when it has not."""
    device = torch.device(device)
    if device.type == "cpu" and hasattr(torch, "_scaled_mm"):
        return True
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= FP8_MATMUL_MIN_CAPABILITY:
        return True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    log.warning(
        "fp8 matmuls need an Ada or Hopper GPU (compute capability 8.9+); %s has none, so the DiT runs in bf16", name
    )
    return False


def use_fp8_matmuls(layers: Iterable[nn.Linear], device: torch.device | None = None) -> int:
    """Turn each ``layers`` entry (an ``nn.Linear`` in bf16, or an :class:`FP8Linear`) into an
    :class:`FP8MatmulLinear` in place; returns how many were converted.

    bf16 weights are quantised with one scale per output channel; an :class:`FP8Linear` keeps its
    fp8 values and scale. Layers whose sizes the fp8 kernels cannot take (not multiples of 16) stay
    as they are. Fails soft: on a GPU without fp8 tensor cores a warning is logged and nothing
    changes (``device``: where the layers will run; default: where their weights are). Raises
    :class:`~.errors.InputError` for a compute dtype other than bf16 (the kernels write bf16).
    """
    layers = [layer for layer in layers if layer.in_features % 16 == 0 and layer.out_features % 16 == 0]
    if not layers:
        return 0
    if not fp8_matmul_supported(device or layers[0].weight.device):
        return 0
    device = layers[0].weight.device
    for layer in layers:
        compute_dtype = layer.bias.dtype if layer.bias is not None else layer.weight.dtype
        if compute_dtype != torch.bfloat16:
            raise InputError(
                f"fp8 matmuls run with bf16 activations, but the model is loaded in {compute_dtype}: "
                "set the precision to bf16, or turn fp8 matmuls off."
            )
        if isinstance(layer, FP8Linear):
            values, scale = layer.weight.data, torch.as_tensor(layer.weight_scale, dtype=torch.float32)
            scale = scale.expand(layer.out_features) if scale.numel() == 1 else scale
        else:
            values, scale = quantize(layer.weight.data, per_row=True)
        if hasattr(layer, "weight_scale"):
            del layer.weight_scale
        layer.weight = nn.Parameter(values, requires_grad=False)
        layer.__class__ = FP8MatmulLinear
        scale_row = scale.reshape(1, -1).to(device, torch.float32).contiguous()
        layer.register_buffer("weight_scale", scale_row, persistent=False)
    return len(layers)
