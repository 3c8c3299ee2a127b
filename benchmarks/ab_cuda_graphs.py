"""CUDA graphs on or off, same process, same inputs: steady DiT ms per block, the latents of both
runs compared element by element, peak memory (full size, random weights; one GPU, or the 14B
sequence parallel under ``torchrun``, where the graphs are cut at the all-to-alls).

    python3 benchmarks/ab_cuda_graphs.py [--configs livetalk,realvideo-2]
    torchrun --standalone --nproc_per_node=4 benchmarks/ab_cuda_graphs.py --configs realvideo-2

Each configuration is compiled once, warmed up, then sampled four times (off, on, off, on); the
steady time is the median over the blocks after the graphs' captures (block 8 on).
"""

import argparse
import sys
from argparse import Namespace
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench_livetalk  # noqa: E402
from bench_realvideo import RELEASE, build_dit  # noqa: E402
from timing import gpu_ms, median, rel_l2  # noqa: E402

from livetalk_core.options import RuntimeOptions  # noqa: E402
from livetalk_core.parallel import sequence_parallel  # noqa: E402
from livetalk_core.realvideo.parallel import sample_realvideo_parallel  # noqa: E402
from livetalk_core.realvideo.sampler import realvideo_schedule  # noqa: E402
from livetalk_core.runtime.noise import SeededNoise  # noqa: E402

STEADY_FROM = 8


def timed(blocks, device: torch.device) -> tuple[list[torch.Tensor], list[float]]:
    latents, ms = [], []
    while True:
        block, t = gpu_ms(lambda: next(blocks, None), device)
        if block is None:
            return latents, ms
        latents.append(block.float().cpu())
        ms.append(t)


def compare(name: str, model: torch.nn.Module, sample, device: torch.device, rank: int = 0) -> None:
    runs: dict[bool, list] = {False: [], True: []}
    for graphs in (False, True, False, True):
        replace(model.runtime, cuda_graphs=graphs).apply(model)  # compiled once: only the switch changes
        torch.cuda.reset_peak_memory_stats(device)
        latents, ms = timed(sample(), device)
        runs[graphs].append(latents)
        if rank == 0:
            print(f"{name} cuda_graphs={graphs}: steady DiT {median(ms[STEADY_FROM:]):.1f} ms/block, "
                  f"per block {[round(x) for x in ms]}, peak {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB",
                  flush=True)
    if rank != 0:
        return
    off, on = runs[False][0], runs[True][0]
    print(f"{name} graphs vs not, per block (max |d|, rel L2):",
          [(round((a - b).abs().max().item(), 5), round(rel_l2(a, b), 6)) for a, b in zip(on, off)], flush=True)
    print(f"{name} run to run without graphs, max |d|:",
          max((a - b).abs().max().item() for a, b in zip(off, runs[False][1])))


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="livetalk,realvideo-2", help="of livetalk, realvideo-2, realvideo-4")
    configs = parser.parse_args().configs.split(",")
    sp = sequence_parallel.init_from_env()
    rank = 0 if sp is None else sp.rank
    device = torch.device("cuda", torch.cuda.current_device())
    if sp is not None and "livetalk" in configs:
        raise SystemExit("the 1.3B runs on one GPU: under torchrun give --configs realvideo-2 or realvideo-4")
    if "livetalk" in configs:
        pipe, context = bench_livetalk.build(device, torch.bfloat16, device, False)
        bench_livetalk.optimise(pipe, Namespace(fp8_kv_cache=False, fp8_matmul=False, compile=True, cuda_graphs=False))
        image = torch.randint(0, 255, (1024, 1024, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
        ref = pipe.encode_reference(image, 512, 512)
        audio = pipe.encode_audio(torch.randn(16000 * 11, generator=torch.Generator().manual_seed(5)) * 0.1)
        for _ in pipe.sample(ref, audio, context, 0):  # compile and warm up
            pass
        compare("livetalk-1.3b", pipe.dit, lambda: pipe.sample(ref, audio, context, 0), device)
        pipe = None
        torch.cuda.empty_cache()
    for steps in [int(c.split("-")[1]) for c in configs if c.startswith("realvideo")]:
        model = build_dit(RELEASE, device, torch.bfloat16)
        RuntimeOptions(device=device).apply(model)
        g = torch.Generator().manual_seed(1)
        inputs = dict(ref_latent=torch.randn(1, 16, 1, 64, 64, generator=g).bfloat16(),
                      idle_context=torch.randn(1, 512, 4096, generator=g).bfloat16(),
                      talking_context=torch.randn(1, 512, 4096, generator=g).bfloat16(),
                      audio_features=[torch.randn(1, 25, 1024, 80, generator=g).bfloat16()])

        def sample():
            return sample_realvideo_parallel(model, sp, noise=SeededNoise(0), schedule=realvideo_schedule(steps),
                                             num_blocks=12, **inputs)

        for _ in sample():
            pass
        compare(f"realvideo-14b-{steps}step" + (f"-{sp.world_size}gpu" if sp else ""), model, sample, device, rank)
        model = None
        torch.cuda.empty_cache()
    sequence_parallel.leave_together(sp)


if __name__ == "__main__":
    main()
