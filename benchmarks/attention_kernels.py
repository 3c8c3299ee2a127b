"""Attention kernels on the DiTs' real shapes: time, throughput and deviation from an fp32 reference.

    python benchmarks/attention_kernels.py [--json out.json]

Rows: cuDNN / FlashAttention / memory-efficient SDPA in bf16 (what ``attention="sdpa"`` picks from) and
every quantised attention that is installed: ``sageattention`` (INT8 QK, fp16 PV; Triton), FlashInfer's
fp8 prefill, transformer-engine's fp8 attention. Each is judged against the deviation the pack already
accepts for ``fp8_matmul``: the relative RMS error of an fp8 x fp8 matmul of a block Linear's shape
(``wan.fp8_linear``), measured in the same run on the same GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HEAD_DIM = 128
# (label, heads, query tokens, key tokens): 512x512 latents are 32x32 = 1024 tokens a frame after the 2x2 patch.
SHAPES = (
    ("1.3B self-attn, full window (15 frames)", 12, 3 * 1024, 15 * 1024),
    ("1.3B self-attn, block 0 (3 frames)", 12, 3 * 1024, 3 * 1024),
    ("1.3B cross-attn (512 text tokens)", 12, 3 * 1024, 512),
    ("14B self-attn, full window", 40, 2 * 1024, 5 * 1024),
)


def cuda_ms(fn: Callable[[], object], iters: int = 30) -> float:
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def relative_rms(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()


def fp8_matmul_deviation() -> float:
    """Relative RMS error of the pack's fp8 matmul on a 1.3B block Linear (1536 -> 8960, 3072 tokens)."""
    from livetalk_core.wan.fp8_linear import use_fp8_matmuls

    torch.manual_seed(0)
    layer = torch.nn.Linear(1536, 8960, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1, 3072, 1536, device="cuda", dtype=torch.bfloat16)
    ref = F.linear(x.float(), layer.weight.float(), layer.bias.float())
    holder = torch.nn.Sequential(layer)
    use_fp8_matmuls([holder[0]], device=torch.device("cuda"))
    return relative_rms(holder[0](x), ref)


def kernels() -> dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]]:
    """Name -> fn(q, k, v) on ``[B, H, S, D]`` bf16; only what runs here."""
    def sdpa(backend):
        def run(q, k, v):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v)
        return run

    found = {"cudnn bf16": sdpa(SDPBackend.CUDNN_ATTENTION), "flash bf16": sdpa(SDPBackend.FLASH_ATTENTION),
             "efficient bf16": sdpa(SDPBackend.EFFICIENT_ATTENTION)}
    try:
        from sageattention import sageattn

        found["sageattention int8"] = lambda q, k, v: sageattn(q, k, v, tensor_layout="HND")
    except ImportError as exc:
        print("sageattention: not installed:", exc)
    try:
        import flashinfer  # noqa: F401

        print("flashinfer: installed, fp8 prefill not wired into this script yet")
    except ImportError as exc:
        print("flashinfer: not installed:", exc)
    try:
        import transformer_engine  # noqa: F401

        print("transformer-engine: installed, fp8 attention not wired into this script yet")
    except ImportError as exc:
        print("transformer-engine: not installed:", exc)
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    fp8_dev = fp8_matmul_deviation()
    print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    print(f"fp8_matmul relative RMS error (the accepted deviation): {fp8_dev:.2e}")
    rows = []
    found = kernels()
    for label, heads, nq, nk in SHAPES:
        torch.manual_seed(0)
        q = torch.randn(1, heads, nq, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, heads, nk, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        flops = 4 * heads * nq * nk * HEAD_DIM
        for name, fn in found.items():
            try:
                ms = cuda_ms(lambda: fn(q, k, v))
                err = relative_rms(fn(q, k, v), ref)
            except (RuntimeError, ValueError, TypeError) as exc:
                print(f"{label:<42} {name:<20} unavailable ({str(exc).splitlines()[0][:70]})")
                continue
            row = dict(shape=label, kernel=name, ms=ms, tflops=flops / ms / 1e9, rel_rms=err,
                       within_fp8_matmul=err <= fp8_dev)
            rows.append(row)
            print(f"{label:<42} {name:<20} {ms:8.3f} ms {row['tflops']:7.1f} TFLOP/s  rel RMS {err:.2e}"
                  f"  {'<=' if row['within_fp8_matmul'] else '>'} fp8_matmul")
    if args.json:
        args.json.write_text(json.dumps(dict(gpu=torch.cuda.get_device_name(), fp8_matmul_rel_rms=fp8_dev, rows=rows),
                                        indent=1))


if __name__ == "__main__":
    main()
