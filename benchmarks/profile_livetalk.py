"""Where one LiveTalk block's time goes: torch profiler table of the top CUDA kernels (full size, random weights).

    python benchmarks/profile_livetalk.py [--compile]

Also prints how much of the block's wall time the GPU was busy: the rest is launch gaps.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_livetalk import build  # noqa: E402

from livetalk_core.compile import compile_blocks  # noqa: E402


@torch.no_grad()
def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--compile", action="store_true", help="profile the regionally compiled DiT")
    args = parser.parse_args()
    pipe = build(torch.device("cuda"), torch.bfloat16)
    if args.compile:
        compile_blocks(pipe.dit)
    image = torch.randint(0, 255, (512, 512, 3), dtype=torch.uint8)
    ref = pipe.encode_reference(image)
    audio = pipe.encode_audio(torch.randn(16000 * 6) * 0.1)
    context = torch.randn(1, 512, 4096, device="cuda", dtype=torch.bfloat16)
    gen = pipe.sample(ref, audio, context, 0)
    for _ in range(6):  # fill the window so the profiled block attends all 15 frames
        next(gen)
    torch.cuda.synchronize()
    start = time.perf_counter()
    next(gen)
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - start) * 1e3
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
        next(gen)
        torch.cuda.synchronize()
    events = prof.key_averages()
    print(events.table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))
    busy_ms = sum(e.self_device_time_total for e in events) / 1e3
    print(f"block wall {wall_ms:.1f} ms (unprofiled), GPU kernels {busy_ms:.1f} ms: {wall_ms - busy_ms:.1f} ms of launch gaps")


if __name__ == "__main__":
    main()
