"""Timing, memory and random-weight helpers shared by the benchmarks.

GPU work is timed with CUDA events on the device's current stream; on a CPU (``bench.py --tiny``,
the dry run that checks the scripts) the same helpers fall back to the wall clock.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch

T = TypeVar("T")


def synchronize() -> None:
    for index in range(torch.cuda.device_count()):
        torch.cuda.synchronize(index)


def gpu_ms(fn: Callable[[], T], device: torch.device) -> tuple[T, float]:
    """``fn()`` and the GPU time it took on ``device`` (CUDA events; wall clock on a CPU)."""
    if device.type != "cuda":
        start = time.perf_counter()
        return fn(), (time.perf_counter() - start) * 1e3
    with torch.cuda.device(device):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        end.synchronize()
    return out, start.elapsed_time(end)


def wall_ms(fn: Callable[[], T]) -> tuple[T, float]:
    """``fn()`` and its wall time, every GPU synchronised before and after."""
    synchronize()
    start = time.perf_counter()
    out = fn()
    synchronize()
    return out, (time.perf_counter() - start) * 1e3


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def median(values: list[float]) -> float:
    return statistics.median(values)


def gpu_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def random_value(name: str, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    """A seeded random float32 parameter on the generator's device: ~N(0, 1/fan_in), norm gains
    around 1, small modulations (so activations stay in range through every layer)."""
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[-1]
    value = torch.randn(shape, generator=generator, device=generator.device) / fan_in**0.5
    if "norm" in name:
        return 1 + 0.1 * value
    if name.endswith("modulation"):
        return 0.1 * value
    return value


@torch.no_grad()
def random_init_(module: torch.nn.Module, seed: int) -> None:
    """:func:`random_value` for every parameter of ``module``, in place, drawn on its device."""
    for index, (name, p) in enumerate(module.named_parameters()):
        p.copy_(random_value(name, p.shape, torch.Generator(device=p.device).manual_seed(seed * 100_003 + index)))


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@contextlib.contextmanager
def contended_cpu(spinners: int = 1) -> Iterator[str | None]:
    """Within: this thread shares one CPU core with ``spinners`` processes that spin on it, so its host side
    (Python, kernel launches) runs at about 1 / (spinners + 1) of its speed: a host with a slow CPU, on a
    fast one. Yields what was done (None where nothing was: ``spinners`` 0, or not Linux). Threads this one
    starts later inherit the core."""
    if spinners < 1 or not hasattr(os, "sched_setaffinity"):
        yield None
        return
    before = os.sched_getaffinity(0)
    core = min(before)
    spin = f"import os\nos.sched_setaffinity(0, {{{core}}})\nwhile True: pass"
    running = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(spinners)]
    os.sched_setaffinity(0, {core})
    try:
        time.sleep(0.2)  # the spinners are running
        yield f"this thread and {spinners} spinning process(es) on CPU core {core}"
    finally:
        os.sched_setaffinity(0, before)
        for spinner in running:
            spinner.kill()
            spinner.wait()
