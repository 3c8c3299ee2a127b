"""Micro-benchmark of the attention kernels for LiveTalk's shapes (1.3B, 512x512, full window).

    python benchmarks/attention_kernels.py
"""

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def bench(fn, iters=50):
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


def main():
    torch.manual_seed(0)
    for heads, q_tokens, kv_tokens, label in ((12, 3072, 15360, "1.3B self-attn, full window"), (12, 3072, 512, "1.3B cross-attn"), (40, 2048, 5120, "14B self-attn")):
        q = torch.randn(1, heads, q_tokens, 128, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, heads, kv_tokens, 128, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        flops = 4 * heads * q_tokens * kv_tokens * 128
        for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
            try:
                with sdpa_kernel([backend]):
                    ms = bench(lambda: F.scaled_dot_product_attention(q, k, v))
                    err = (F.scaled_dot_product_attention(q, k, v).float() - ref).abs().max().item()
                print(f"{label:<30} {name:<10} {ms:8.3f} ms  {flops / ms / 1e9:7.1f} TFLOP/s  max err {err:.2e}")
            except RuntimeError as exc:
                print(f"{label:<30} {name:<10} unavailable ({str(exc).splitlines()[0][:60]})")


if __name__ == "__main__":
    main()
