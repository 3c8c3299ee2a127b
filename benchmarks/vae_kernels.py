"""Where the Wan2.1 VAE decode spends its GPU time, and what its convolutions could run at (GPU).

    python benchmarks/vae_kernels.py

1. A profile of one steady 12-frame decode at 512x512 (bf16): CUDA time per kernel family.
2. The causal 3x3x3 conv of each decoder level timed as it runs now (cuDNN conv3d on the
   history-padded input) and as 2-D convolutions over frames (the three temporal taps stacked
   into the channels of one conv2d, or three conv2d summed), channels-last; outputs compared.
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attention_kernels import bench  # noqa: E402  (this folder is on the path when run as a script)

from livetalk_core.media.vae import VAEConfig, WanVAE  # noqa: E402

DEVICE, DTYPE = torch.device("cuda"), torch.bfloat16


def build() -> WanVAE:
    vae = WanVAE(VAEConfig()).to(DEVICE, DTYPE).eval().requires_grad_(False)
    g = torch.Generator(device=DEVICE).manual_seed(1)
    for p in vae.parameters():
        fan_in = p[0].numel() if p.ndim > 1 else p.shape[-1]
        p.copy_(torch.randn(p.shape, generator=g, device=DEVICE) / fan_in**0.5)
    return vae


def steady_decode(vae: WanVAE):
    decoder = vae.stream_decoder()
    g = torch.Generator(device=DEVICE).manual_seed(0)
    decoder.decode(torch.randn(1, 16, 3, 64, 64, generator=g, device=DEVICE, dtype=DTYPE))
    latent = torch.randn(1, 16, 3, 64, 64, generator=g, device=DEVICE, dtype=DTYPE)

    def one():
        snapshot = {k: v for k, v in decoder._cache.history.items()}
        decoder.decode(latent)
        decoder._cache.history.update(snapshot)  # decode the same steady block again and again

    return one


def profile(vae: WanVAE) -> None:
    one = steady_decode(vae)
    for _ in range(2):
        one()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    one()
    torch.cuda.synchronize()
    working_gib = (torch.cuda.max_memory_allocated() - base) / 2**30
    print(f"decode working set above the weights and cache: {working_gib:.2f} GiB")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        one()
        torch.cuda.synchronize()
    families: dict[str, float] = defaultdict(float)
    kernels: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        ms = event.self_device_time_total / 1e3
        name = event.key
        low = name.lower()
        conv_marks = ("conv", "xmma", "implicit", "cudnn", "sm90", "sm80", "gemm", "cutlass")
        family = ("conv" if any(s in low for s in conv_marks)
                  else "copy/cat" if any(s in low for s in ("copy", "cat", "memcpy", "memset", "fill"))
                  else "norm" if any(s in low for s in ("norm", "reduce", "sum")) else "elementwise/other")
        families[family] += ms
        kernels[name] += ms
    total = sum(families.values())
    print(f"\n== steady 12-frame decode: {total:.1f} ms of CUDA kernels ==")
    for family, ms in sorted(families.items(), key=lambda kv: -kv[1]):
        print(f"  {family:<20} {ms:8.1f} ms  {100 * ms / total:5.1f} %")
    print("  top kernels:")
    for name, ms in sorted(kernels.items(), key=lambda kv: -kv[1])[:14]:
        print(f"    {ms:8.2f} ms  {name[:110]}")


def conv_variants() -> None:
    print("\n== causal 3x3x3 conv per decoder level (ms, one call; TFLOP/s) ==")
    print(f"  {'C':>4} {'T':>3} {'HxW':>8} | {'conv3d now':>12} {'2d stacked CL':>14} {'3x 2d CL':>10} | max rel diff")
    # the decoder runs one latent frame per call: 4 frames at the two top levels, 2 and 1 below
    for c, t, hw in ((96, 4, 512), (192, 4, 256), (384, 2, 128), (384, 1, 64)):
        g = torch.Generator(device=DEVICE).manual_seed(0)
        x = torch.randn(1, c, t, hw, hw, generator=g, device=DEVICE, dtype=DTYPE)
        history = torch.randn(1, c, 2, hw, hw, generator=g, device=DEVICE, dtype=DTYPE)
        w = torch.randn(c, c, 3, 3, 3, generator=g, device=DEVICE, dtype=DTYPE) / (27 * c) ** 0.5
        b = torch.zeros(c, device=DEVICE, dtype=DTYPE)
        flops = 2 * 27 * c * c * hw * hw * t

        def now():
            return F.conv3d(torch.cat([history, x], dim=2), w, b, padding=(0, 1, 1))

        # frames as a batch, channels last: [T+2, H, W, C]
        frames = torch.cat([history, x], dim=2)[0].transpose(0, 1).contiguous(memory_format=torch.channels_last)
        w_stacked = w.permute(0, 2, 1, 3, 4).reshape(c, 3 * c, 3, 3).contiguous(memory_format=torch.channels_last)
        w_taps = [w[:, :, k].contiguous(memory_format=torch.channels_last) for k in range(3)]

        def stacked():
            xs = torch.cat([frames[k : k + t] for k in range(3)], dim=1)
            return F.conv2d(xs, w_stacked, b, padding=1)

        def three():
            out = F.conv2d(frames[0:t], w_taps[0], b, padding=1)
            out += F.conv2d(frames[1 : t + 1], w_taps[1], None, padding=1)
            out += F.conv2d(frames[2 : t + 2], w_taps[2], None, padding=1)
            return out

        ref = now()[0].transpose(0, 1).float()
        diffs = [((f().float() - ref).norm() / ref.norm()).item() for f in (stacked, three)]
        times = [bench(f, iters=10) for f in (now, stacked, three)]
        cells = " ".join(f"{ms:7.2f} ({flops / ms / 1e9:4.0f})" for ms in times)
        print(f"  {c:>4} {t:>3} {hw:>4}x{hw:<3} | {cells} | {max(diffs):.2e}")


def main() -> None:
    print(torch.cuda.get_device_name(), torch.__version__)
    vae = build()
    start = time.perf_counter()
    profile(vae)
    conv_variants()
    print(f"\n({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
