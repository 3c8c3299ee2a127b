"""Where the 14B's block time goes under sequence parallelism: per rank, the wall time of a steady
2-step block (unprofiled), then one profiled block: GPU time of the exchanges (NCCL) and of
everything else, and how long each all-to-all kernel lasted (one alone takes ~60 us on 4 H200s,
``benchmarks/all_to_all.py``; the rest of a kernel's time is spent waiting for the other ranks).

    torchrun --standalone --nproc_per_node=4 benchmarks/profile_realvideo_sp.py [--trace DIR]
    python3 benchmarks/profile_realvideo_sp.py    # one GPU: the same block without the exchanges

``--trace`` also writes rank 0's Chrome trace (gzipped).
"""

import argparse
import gzip
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_realvideo import RELEASE, build_dit, build_encoders, encode_inputs, shared_inputs, user_inputs  # noqa: E402
from profile_livetalk import kernel_kinds, top_kernels  # noqa: E402

from livetalk_core.options import RuntimeOptions  # noqa: E402
from livetalk_core.parallel import sequence_parallel  # noqa: E402
from livetalk_core.realvideo.parallel import sample_realvideo_parallel  # noqa: E402
from livetalk_core.realvideo.sampler import realvideo_schedule  # noqa: E402
from livetalk_core.runtime.noise import SeededNoise  # noqa: E402


def exchange_kernels_us(trace: Path) -> list[float]:
    """Durations of the NCCL kernels in a Chrome trace written by ``torch.profiler``."""
    opener = gzip.open if trace.suffix == ".gz" else open
    with opener(trace, "rt") as f:
        events = json.load(f)["traceEvents"]
    return [e["dur"] for e in events if e.get("ph") == "X" and e.get("cat") == "kernel" and "nccl" in e["name"].lower()]


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trace", type=Path, default=None, help="folder for rank 0's Chrome trace")
    args = parser.parse_args()
    sp = sequence_parallel.init_from_env()
    rank = sp.rank if sp else 0
    device = torch.device("cuda", torch.cuda.current_device())
    dtype = torch.bfloat16
    model = build_dit(RELEASE, device, dtype)
    vae, encoder = build_encoders(device, dtype, False) if rank == 0 else (None, None)
    image, waveform, contexts = user_inputs(RELEASE, 512, dtype)
    inputs = shared_inputs(sp, lambda: encode_inputs(vae, encoder, image, waveform, contexts, 512 * 512, dtype))
    RuntimeOptions(device=device).apply(model)

    def blocks(n: int):
        return sample_realvideo_parallel(model, sp, noise=SeededNoise(0), schedule=realvideo_schedule(2),
                                         num_blocks=n, **inputs)

    for _ in blocks(4):  # compile, cuDNN plans, NCCL channels
        pass
    stream = blocks(12)
    for _ in range(4):
        next(stream)
    wall = []
    for _ in range(3):
        if sp:
            dist.barrier()
        torch.cuda.synchronize()
        start = time.perf_counter()
        next(stream)
        torch.cuda.synchronize()
        wall.append((time.perf_counter() - start) * 1e3)
    if sp:
        dist.barrier()
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        next(stream)
        torch.cuda.synchronize()
    events = prof.key_averages()
    cuda = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.self_device_time_total for e in cuda) / 1e3
    nccl = sum(e.self_device_time_total for e in cuda if "nccl" in e.key.lower()) / 1e3
    folder = args.trace if (args.trace and rank == 0) else Path(tempfile.mkdtemp(prefix="sp-trace-"))
    folder.mkdir(parents=True, exist_ok=True)
    trace = folder / f"trace_rank{rank}.json"
    prof.export_chrome_trace(str(trace))
    durations = exchange_kernels_us(trace)
    exchanges = (f"{len(durations)} NCCL kernels, median {statistics.median(durations):.0f} us, min "
                 f"{min(durations):.0f} us" if durations else "no NCCL kernels")
    summary = (f"rank {rank}: steady block {[round(w, 1) for w in wall]} ms (unprofiled); profiled block: GPU kernels "
               f"{busy:.1f} ms, of which NCCL {nccl:.1f} ms and the rest {busy - nccl:.1f} ms; {exchanges}; "
               f"by kind (ms) {({k: round(v, 1) for k, v in kernel_kinds(events).items()})}")
    summaries = [None] * (sp.world_size if sp else 1)
    if sp:
        dist.all_gather_object(summaries, summary)
    else:
        summaries = [summary]
    if rank == 0:
        print("\n".join(summaries))
        print("rank 0's kernels by GPU time (ms, calls):")
        print(top_kernels(events, 40))
        if args.trace:
            with open(trace, "rb") as f, gzip.open(f"{trace}.gz", "wb") as out:
                out.write(f.read())
            trace.unlink()
    if sp:
        sequence_parallel.leave_together(sp)
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
