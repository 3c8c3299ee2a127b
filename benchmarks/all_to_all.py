"""NCCL all-to-all time and bandwidth per rank for the sizes the 14B's sequence parallelism
exchanges at 512x512 on 4 GPUs (the output, 5.2 MB per rank; q, k and v together, 15.7 MB), and
a plain GPU-to-GPU copy for scale.

    torchrun --standalone --nproc_per_node=4 benchmarks/all_to_all.py
    NCCL_DEBUG=INFO torchrun ...        # which transport NCCL picked (P2P over NVLink, SHM, ...)
"""

import os

import torch
import torch.distributed as dist

SIZES_MB = (5.24, 15.7, 31.4)
REPEATS = 30


def exchange_us(numel: int) -> float:
    send = torch.randn(numel, device="cuda", dtype=torch.bfloat16)
    received = torch.empty_like(send)
    for _ in range(5):
        dist.all_to_all_single(received, send)
    torch.cuda.synchronize()
    dist.barrier()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(REPEATS):
        dist.all_to_all_single(received, send)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / REPEATS * 1e3


def main() -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    dist.init_process_group("nccl")
    rows = []
    for mb in SIZES_MB:
        numel = int(mb * 1e6 / 2) // (world * 128) * world * 128
        us = exchange_us(numel)
        sent = numel * 2 * (world - 1) / world  # bytes that leave this rank
        rows.append(f"{mb:5.1f} MB per rank: {us:7.0f} us, {sent / us / 1e3:6.1f} GB/s out per rank")
    if rank == 0:
        print("peer access from cuda:0:", [torch.cuda.can_device_access_peer(0, j) for j in range(1, world)])
        a = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda:0")
        b = torch.empty_like(a, device="cuda:1")
        for _ in range(3):
            b.copy_(a)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            b.copy_(a)
        end.record()
        torch.cuda.synchronize()
        rows.append(f"copy cuda:0 -> cuda:1: {a.numel() * 10 / start.elapsed_time(end) / 1e6:.1f} GB/s")
        print("\n".join(rows))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
