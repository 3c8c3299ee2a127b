"""Where one LiveTalk block's time goes: torch profiler table of the top CUDA kernels (full size, random weights).

    python benchmarks/profile_livetalk.py
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_livetalk import build  # noqa: E402


@torch.no_grad()
def main():
    pipe = build(torch.device("cuda"), torch.bfloat16)
    image = torch.randint(0, 255, (512, 512, 3), dtype=torch.uint8)
    ref = pipe.encode_reference(image)
    audio = pipe.encode_audio(torch.randn(16000 * 6) * 0.1)
    context = torch.randn(1, 512, 4096, device="cuda", dtype=torch.bfloat16)
    gen = pipe.sample(ref, audio, context, 0)
    for _ in range(6):  # fill the window so the profiled block attends all 15 frames
        next(gen)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
        next(gen)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))


if __name__ == "__main__":
    main()
