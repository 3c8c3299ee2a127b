"""Attention kernels behind one function.

Everything goes through :func:`attention` with ``[B, S, H, D]`` inputs. ``"sdpa"`` (the default) is
``torch.nn.functional.scaled_dot_product_attention``, which picks cuDNN / flash / memory-efficient
kernels on a GPU; ``"math"`` is an explicit softmax used as a reference in tests; ``"flash"`` and
``"sage"`` use the optional ``flash_attn`` / ``sageattention`` packages and fall back to SDPA (with a
warning) when they are not installed, so a missing extra never stops a run.
"""

from __future__ import annotations

import importlib.util
import logging
import math

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

# cuDNN's fused attention is about 2x FlashAttention-2 on Hopper for these shapes (benchmarks/attention_kernels.py)
try:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    _GPU_SDPA_ORDER = [
        SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH
    ]
    # cuDNN builds a plan per new shape (host time, docs/performance.md): not worth it for shapes seen once.
    _GPU_SDPA_ORDER_VARYING = [
        SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH
    ]
except ImportError:  # older torch: its default order
    sdpa_kernel = None

ATTENTION_BACKENDS = ("sdpa", "math", "flash", "sage")
_warned: set[str] = set()


def available_backends() -> list[str]:
    """Backends usable in this environment (``sdpa`` and ``math`` always are)."""
    names = ["sdpa", "math"]
    if importlib.util.find_spec("flash_attn") is not None:
        names.append("flash")
    if importlib.util.find_spec("sageattention") is not None:
        names.append("sage")
    return names


def resolve_backend(name: str) -> str:
    """Validate ``name``; an optional backend that is not installed falls back to ``sdpa``."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"Unknown attention backend {name!r}: use one of {', '.join(ATTENTION_BACKENDS)}.")
    if name in ("flash", "sage") and name not in available_backends():
        if name not in _warned:
            log.warning("attention backend %r is not installed; using PyTorch SDPA instead", name)
            _warned.add(name)
        return "sdpa"
    return name


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa", varying_shapes: bool = False
) -> torch.Tensor:
    """Unmasked multi-head attention with scale ``1/sqrt(D)``.

    Args:
        q: ``[B, Sq, H, D]``; k, v: ``[B, Sk, H, D]`` (any strides with a contiguous last dim).
        varying_shapes: the sequence lengths change from call to call (e.g. one per audio clip), so
            ``sdpa`` on a GPU tries FlashAttention first instead of cuDNN, whose per-shape plan
            costs more than the kernel.
    Returns:
        ``[B, Sq, H*D]``.
    """
    b, sq, h, d = q.shape
    if backend == "flash" and q.is_cuda:
        from flash_attn import flash_attn_func

        out = flash_attn_func(q, k, v)
    elif backend == "sage" and q.is_cuda:
        from sageattention import sageattn

        out = sageattn(q, k, v, tensor_layout="NHD")
    elif backend == "math":
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * (1.0 / math.sqrt(d))
        probs = scores.float().softmax(dim=-1).to(v.dtype)
        out = torch.einsum("bhqk,bkhd->bqhd", probs, v)
    elif q.is_cuda and sdpa_kernel is not None:
        with sdpa_kernel(_GPU_SDPA_ORDER_VARYING if varying_shapes else _GPU_SDPA_ORDER, set_priority=True):
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            ).transpose(1, 2)
    else:
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        ).transpose(1, 2)
    return out.reshape(b, sq, h * d)
