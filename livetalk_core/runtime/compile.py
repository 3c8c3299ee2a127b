"""Regional ``torch.compile``: the DiT's work around the cached attention, and the VAE's conv steps.

Each :class:`~.wan_dit.WanBlock` runs :meth:`attention_inputs` (norm, modulation, q/k/v, RMSNorm,
RoPE) and :meth:`attention_outputs` (output projection, gates, cross-attention, FFN) as plain tensor
functions; the KV-cache write, the sequence-parallel exchange and the attention kernel stay eager
between them. A model variant may add regions of its own (the 14B's audio injection,
:meth:`~..wan.dit.WanDiTCore.compile_regions`). All layers share one compiled graph per function
(parameters are graph inputs), so compiling takes seconds, not minutes, and the cache's per-block
slot mapping never recompiles it.
Most of what it removes is the element-wise traffic of the eager loop (docs/performance.md has the
profile).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from ..media.vae import CausalConv3d, Upsample, WanVAE, causal_conv_step, nearest_2x
from ..wan.kv_cache import FP8Codec, dequantize_fp8, quantize_fp8

if TYPE_CHECKING:  # annotations only: the DiT imports the options, which import this module to compile it
    from ..wan.dit import WanDiTCore

log = logging.getLogger(__name__)


def compile_blocks(model: WanDiTCore, mode: str | None = None) -> WanDiTCore:
    """Compile every block's two tensor functions in place, and run their FFN's GELU in the GEMM's
    epilogue on GPUs (:meth:`~.wan_dit.WanBlock.feed_forward`); returns ``model``. Called by
    :meth:`~.options.RuntimeOptions.apply`, whose options also say whether the compiled forwards
    are replayed as CUDA graphs (:func:`~.options.graphs_off_reason`).

    Fails soft: if compiling fails at the first call (no Triton, no C++ toolchain, an unsupported
    op), a warning is logged once and every block runs eager from then on.
    """
    if not hasattr(torch, "compile"):
        log.warning("torch.compile is not available in this torch; the DiT runs eager")
        return model
    state = {"compiled": True}
    for block in model.blocks:
        block.gelu_in_gemm = True
    for owner, name in model.compile_regions():
        eager = getattr(owner, name)
        setattr(owner, name, _fail_soft(torch.compile(eager, dynamic=False, mode=mode), eager, state))
    # The fp8 cache's (de)quantisation, one fused kernel each; the window grows over the first
    # blocks, so these may see a few lengths (dynamic shapes after the second).
    model.kv_codec = FP8Codec(
        quantize=_fail_soft(torch.compile(quantize_fp8), quantize_fp8, state),
        dequantize=_fail_soft(torch.compile(dequantize_fp8), dequantize_fp8, state),
    )
    return model


def compile_vae(vae: WanVAE) -> WanVAE:
    """Compile every causal conv step of the VAE (:func:`~.vae.causal_conv_step`) and its nearest
    upsampling (:func:`~.vae.nearest_2x`) in place; returns ``vae``. Eager, the RMSNorm + SiLU before
    each conv, the history concatenation, the sum of the three temporal taps and the residual add
    are a dozen memory-bound passes over the largest activations, about half the decode's GPU time;
    compiled, they are two fused kernels around cuDNN's convs (docs/performance.md). One static graph
    per activation shape; the result differs from eager by bf16 rounding only (the fused kernels
    round once, which is closer to float32; the upsampling only copies). Fails soft like
    :func:`compile_blocks`.
    """
    if not hasattr(torch, "compile"):
        log.warning("torch.compile is not available in this torch; the VAE runs eager")
        return vae
    state = {"compiled": True}
    step = _fail_soft(_one_graph_per_shape(causal_conv_step), causal_conv_step, state)
    enlarge = _fail_soft(_one_graph_per_shape(nearest_2x), nearest_2x, state)
    for module in vae.modules():
        if isinstance(module, CausalConv3d):
            module.step = step
        elif isinstance(module, Upsample):
            module.enlarge = enlarge
    return vae


def _one_graph_per_shape(function):
    """``function`` compiled with one static graph per activation shape (a few dozen across the VAE's
    levels, first and later calls): generic dynamic-shape kernels were no faster than eager here."""
    compiled = torch.compile(function, dynamic=False)

    def call(*args):
        with torch._dynamo.config.patch(recompile_limit=_VAE_GRAPHS):
            return compiled(*args)

    return call


_VAE_GRAPHS = 128


def _fail_soft(compiled, eager, state: dict):
    def call(*args, **kwargs):
        if state["compiled"]:
            try:
                return compiled(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - any compiler failure means: run eager
                if not _is_compile_failure(exc):
                    raise
                state["compiled"] = False
                log.warning("torch.compile failed (%s); the DiT runs eager", str(exc).splitlines()[0][:200])
        return eager(*args, **kwargs)

    return call


def _is_compile_failure(exc: Exception) -> bool:
    from torch._dynamo.exc import TorchDynamoException

    return isinstance(exc, TorchDynamoException) or "triton" in str(exc).lower()
