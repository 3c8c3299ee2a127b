"""Independent GPU work run at the same time: the reference image's and the audio's encoders.

Before block 0 can be sampled, the VAE encodes the reference and wav2vec2 the audio; neither needs the
other. Run one after the other, their times add up on the first frame's critical path, and on a host
slow on the CPU side each is bound by how fast Python launches its kernels. :func:`run_concurrently`
runs each in its own thread on its own CUDA stream, so their launches and kernels overlap. The work
and its inputs are unchanged (each stream runs the same kernels in the same order), so are the results.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from typing import Any

import torch


def run_concurrently(*work: Callable[[], Any], device: torch.device | str | None = None) -> tuple[Any, ...]:
    """``(work[0](), work[1](), ...)``, each called in its own thread; on a CUDA ``device`` each on its own
    stream, ordered after what the caller's stream has queued, and the caller's stream ordered after them.
    The caller's grad and inference modes hold in the threads (they are per thread). The first error
    raised by any of them is raised here, once all have finished."""
    device = torch.device(device) if device is not None else None
    on_gpu = device is not None and device.type == "cuda"
    caller = torch.cuda.current_stream(device) if on_gpu else None
    streams = [torch.cuda.Stream(device) for _ in work] if on_gpu else [None] * len(work)
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
    results: list[Any] = [None] * len(work)
    errors: list[BaseException | None] = [None] * len(work)

    def call(index: int) -> None:
        try:
            # inference_mode(False) would turn grad on: entered only when on, then the grad mode set
            with torch.inference_mode(inference), torch.set_grad_enabled(grad), _on(streams[index], caller):
                results[index] = work[index]()
        except BaseException as err:  # handed to the caller's thread
            errors[index] = err

    threads = [threading.Thread(target=call, args=(i,), name=f"concurrent-{i}") for i in range(1, len(work))]
    for thread in threads:
        thread.start()
    call(0)  # the first in the caller's thread: one thread fewer to start
    for thread in threads:
        thread.join()
    for err in errors:
        if err is not None:
            raise err
    if on_gpu:
        for stream in streams:
            caller.wait_stream(stream)
        for result in results:
            record_on(result, caller)
    return tuple(results)


class _on:
    """Run on ``stream`` (None: as is), after the work ``caller`` has queued."""

    def __init__(self, stream: torch.cuda.Stream | None, caller: torch.cuda.Stream | None) -> None:
        self.stream, self.caller = stream, caller
        self.context = torch.cuda.stream(stream) if stream is not None else None

    def __enter__(self) -> None:
        if self.context is not None:
            self.stream.wait_stream(self.caller)
            self.context.__enter__()  # also makes the stream's device current (it is per thread)

    def __exit__(self, *exc: object) -> None:
        if self.context is not None:
            self.context.__exit__(*exc)


def record_on(value: Any, stream: torch.cuda.Stream) -> None:
    """Mark every tensor on ``stream``'s GPU in ``value`` (tensors, sequences, dicts, dataclasses) as used
    on ``stream``: the allocator then keeps its memory from the stream it was made on until ``stream`` is
    done with it. (Work on another GPU ran on that GPU's default stream, the caller's too.)"""
    if isinstance(value, torch.Tensor):
        if value.device == stream.device:
            value.record_stream(stream)
    elif isinstance(value, (list, tuple)):
        for item in value:
            record_on(item, stream)
    elif isinstance(value, dict):
        for item in value.values():
            record_on(item, stream)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for field in dataclasses.fields(value):
            record_on(getattr(value, field.name), stream)
