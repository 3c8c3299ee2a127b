"""Where LiveTalk's block time goes: the kernels with the most GPU time in block 0 (what the first
generated frame waits for), in a steady block and in the VAE decode of a steady block (full size,
random weights).

    python benchmarks/profile_livetalk.py [--compile]

Also prints how much of each block's wall time the GPU was busy (the rest is launch gaps) and the
GPU time per kind of kernel (GEMMs, attention, fused element-wise, other).
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_livetalk import build  # noqa: E402

from livetalk_core.options import RuntimeOptions  # noqa: E402

KERNEL_KINDS = (  # (kind, substrings of the kernel name), first match wins
    ("attention", ("sdpa", "flash", "fmha", "attention")),
    ("GEMM / conv", ("gemm", "nvjet", "cutlass", "xmma", "sm90", "conv", "implicit")),
    ("fused element-wise (triton)", ("triton",)),
    ("copies", ("copy", "memcpy", "memset", "cat")),
)


def kernel_kinds(events) -> dict[str, float]:
    """GPU milliseconds per kind of kernel (names matched by :data:`KERNEL_KINDS`, else "other")."""
    kinds: dict[str, float] = {}
    for event in events:
        if event.self_device_time_total <= 0 or event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        name = event.key.lower()
        kind = next((k for k, words in KERNEL_KINDS if any(w in name for w in words)), "other")
        kinds[kind] = kinds.get(kind, 0.0) + event.self_device_time_total / 1e3
    return kinds


def top_kernels(events, count: int = 30) -> str:
    """The ``count`` kernels with the most GPU time: ms, calls, name."""
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA and e.self_device_time_total > 0]
    kernels.sort(key=lambda e: -e.self_device_time_total)
    return "\n".join(f"{e.self_device_time_total / 1e3:8.2f} {e.count:6d}  {e.key[:110]}" for e in kernels[:count])


def profiled(label: str, step) -> None:
    torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - start) * 1e3
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    print(f"== {label}: kernels by GPU time (ms, calls)")
    print(top_kernels(events))
    kinds = kernel_kinds(events)
    busy_ms = sum(kinds.values())
    print(f"{label}: wall {wall_ms:.1f} ms (unprofiled), GPU kernels {busy_ms:.1f} ms: "
          f"{wall_ms - busy_ms:.1f} ms of gaps")
    print(f"{label}: GPU ms by kind:", {k: round(v, 1) for k, v in sorted(kinds.items())})


@torch.no_grad()
def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--compile", action="store_true", help="profile the regionally compiled DiT")
    args = parser.parse_args()
    device = torch.device("cuda")
    pipe, context = build(device, torch.bfloat16, device, tiny=False)
    if args.compile:
        RuntimeOptions(device=device).apply(pipe.dit, pipe.vae)
    ref = pipe.encode_reference(torch.randint(0, 255, (512, 512, 3), dtype=torch.uint8))
    audio = pipe.encode_audio(torch.randn(16000 * 6) * 0.1)
    for _ in pipe.sample(ref, audio, context, 0):  # warm-up
        pass
    profiled("block 0 (4 denoising forwards, short cache)", lambda: next(pipe.sample(ref, audio, context, 0)))
    gen = pipe.sample(ref, audio, context, 0)
    for _ in range(6):  # fill the window so the profiled block attends all 15 frames
        next(gen)
    profiled("steady block (previous refresh + 4 forwards, full window)", lambda: next(gen))
    block, decoder = next(gen), pipe.vae.stream_decoder()
    decoder.decode(block)  # the first call starts the stream (1 video frame for its first latent frame)
    profiled("VAE decode of a steady block (12 frames)", lambda: decoder.decode(block))


if __name__ == "__main__":
    main()
