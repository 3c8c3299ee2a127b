"""Running the RealVideo DiT on several GPUs: the sharded sampler and a persistent worker group.

:func:`sample_realvideo_parallel` is what every rank of a sequence-parallel group runs (under
``torchrun`` or inside a :class:`RealVideoWorkerGroup`): it slices the reference latent and the
noise, samples its shard, and all-gathers each block, so every rank yields the full block and the
video equals the single-GPU one.

:class:`RealVideoWorkerGroup` keeps one process per device alive between calls (weights loaded
once), driven through a command queue per worker; rank 0 streams the blocks back. A ComfyUI node
creates it once for the selected GPUs and calls :meth:`RealVideoWorkerGroup.generate` per prompt.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from . import sequence_parallel
from .errors import LiveTalkError
from .noise import NoiseSource, SeededNoise
from .realvideo_sampler import FRAMES_PER_BLOCK, REALVIDEO_CACHE, sample_realvideo
from .s2v_model import S2VDiT
from .sequence_parallel import LatentShard, SequenceParallel, ShardedNoise, pick_split_axis

log = logging.getLogger(__name__)
POLL_SECONDS = 1.0


def sample_realvideo_parallel(
    model: S2VDiT,
    sp: SequenceParallel | None,
    *,
    ref_latent: torch.Tensor,
    noise: NoiseSource,
    **kwargs: Any,
) -> Iterator[torch.Tensor]:
    """:func:`~.realvideo_sampler.sample_realvideo` over the group ``sp`` (None: one process).

    Every rank passes the same full-size inputs; ``noise`` must give the same draws on every rank
    (e.g. :class:`~.noise.SeededNoise` with one seed). Yields full blocks ``[1, 16, 2, h, w]`` on
    every rank. ``kwargs`` are the other arguments of ``sample_realvideo`` (``on_step`` gets this
    rank's shard of x0).
    """
    if sp is None or sp.world_size == 1:
        yield from sample_realvideo(model, ref_latent=ref_latent, noise=noise, **kwargs)
        return
    sequence_parallel.check_cache_policy(REALVIDEO_CACHE, FRAMES_PER_BLOCK, first_frame=REALVIDEO_CACHE.sink_frames)
    sequence_parallel.attach(model, sp)
    try:
        h, w = ref_latent.shape[-2:]
        patch = model.config.patch_size[1:]
        shard = LatentShard(pick_split_axis((h, w), sp.world_size, patch), sp.rank, sp.world_size, (h, w))
        blocks = sample_realvideo(
            model,
            ref_latent=shard.take(ref_latent),
            noise=ShardedNoise(noise, shard),
            grid_offset=shard.grid_offset(patch),
            **kwargs,
        )
        for block in blocks:
            yield shard.gather(sp, block)
    finally:
        sequence_parallel.attach(model, None)


ModelFactory = Callable[..., S2VDiT]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_main(
    rank: int,
    devices: Sequence[str],
    port: int,
    load_model: ModelFactory,
    commands: Sequence[Any],
    results: Any,
) -> None:
    """One rank: join the group, load the model once, then serve commands until ``None``."""
    device = torch.device(devices[rank])
    world = len(devices)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    os.environ["LOCAL_RANK"] = str(device.index or 0)
    if device.type == "cpu":  # CPU ranks share the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    try:
        sp = sequence_parallel.init_from_env("nccl" if device.type == "cuda" else "gloo")
        model = load_model(device=device)
        results.put(("ready", rank, None))
    except Exception as exc:  # report and stop: the parent raises it
        results.put(("failed", rank, _describe(exc)))
        return
    inbox = commands[rank]
    while (command := inbox.get()) is not None:
        request, kwargs = command
        try:
            seed = kwargs.pop("seed")
            for block in sample_realvideo_parallel(model, sp, noise=SeededNoise(seed), **kwargs):
                if rank == 0:
                    results.put(("block", request, block.cpu()))
            if rank == 0:
                results.put(("done", request, None))
        except LiveTalkError as exc:
            # Input errors are raised by every rank before any exchange: the group stays usable.
            if rank == 0:
                results.put(("error", request, exc))
        except Exception as exc:
            results.put(("failed", request, _describe(exc)))
            return
    if dist.is_initialized():
        dist.destroy_process_group()


def _describe(exc: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(exc), exc)).strip() + "\n" + traceback.format_exc()


class RealVideoWorkerGroup:
    """One process per device running :func:`sample_realvideo_parallel`, kept alive between calls.

    Args:
        load_model: picklable callable (e.g. ``functools.partial(load_s2v_dit, path, "bf16")``) called
            in each worker as ``load_model(device=torch.device)``.
        devices: one entry per rank, e.g. ``["cuda:0", "cuda:1"]`` (NCCL) or ``["cpu", "cpu"]`` (gloo).
        start_timeout: seconds to wait for every worker to load its model.
    """

    def __init__(self, load_model: ModelFactory, devices: Sequence[str], *, start_timeout: float = 3600.0) -> None:
        if not devices:
            raise LiveTalkError("A RealVideo worker group needs at least one device.")
        kinds = {torch.device(d).type for d in devices}
        if len(kinds) != 1:
            raise LiveTalkError(f"All devices of a worker group must be of one kind, got {list(devices)}.")
        ctx = mp.get_context("spawn")
        self.devices = list(devices)
        self._commands = [ctx.Queue() for _ in devices]
        self._results = ctx.Queue()
        self._next_request = 0
        port = _free_port()
        self._processes = [
            ctx.Process(
                target=_worker_main,
                args=(rank, self.devices, port, load_model, self._commands, self._results),
                daemon=True,
            )
            for rank in range(len(devices))
        ]
        for p in self._processes:
            p.start()
        ready = set()
        while len(ready) < len(devices):
            kind, rank, payload = self._next_result(start_timeout)
            if kind == "failed":
                self.close()
                raise LiveTalkError(f"RealVideo worker {rank} ({self.devices[rank]}) failed to start: {payload}")
            ready.add(rank)
        log.info("RealVideo worker group ready on %s", ", ".join(self.devices))

    @property
    def world_size(self) -> int:
        return len(self.devices)

    @property
    def alive(self) -> bool:
        return bool(self._processes) and all(p.is_alive() for p in self._processes)

    def generate(self, *, seed: int, **kwargs: Any) -> Iterator[torch.Tensor]:
        """Run :func:`sample_realvideo_parallel` on the group with :class:`~.noise.SeededNoise` of
        ``seed``; ``kwargs`` are the sampler's other arguments (CPU tensors, no ``on_step``).
        Yields the full blocks (CPU) as rank 0 produces them."""
        if not self.alive:
            raise LiveTalkError("The RealVideo worker group has stopped; create a new one.")
        request = self._next_request
        self._next_request += 1
        for inbox in self._commands:
            inbox.put((request, {"seed": seed, **kwargs}))
        while True:
            kind, tag, payload = self._next_result(None)
            if kind == "failed":
                self.close()
                raise LiveTalkError(f"A RealVideo worker failed; the group was stopped: {payload}")
            if tag != request:  # left over from a call whose consumer stopped early
                continue
            if kind == "block":
                yield payload
            elif kind == "error":
                raise payload
            else:
                return

    def _next_result(self, timeout: float | None) -> tuple[str, Any, Any]:
        waited = 0.0
        while True:
            try:
                return self._results.get(timeout=POLL_SECONDS)
            except queue.Empty:
                waited += POLL_SECONDS
                dead = [i for i, p in enumerate(self._processes) if not p.is_alive()]
                if dead:
                    self.close()
                    raise LiveTalkError(
                        f"RealVideo worker(s) {dead} exited unexpectedly (out of memory?); the group was stopped."
                    ) from None
                if timeout is not None and waited >= timeout:
                    self.close()
                    raise LiveTalkError(f"The RealVideo workers did not answer within {timeout:.0f} s.") from None

    def close(self) -> None:
        """Stop every worker (politely, then by force) and free its GPU."""
        for inbox, p in zip(self._commands, self._processes):
            if p.is_alive():
                inbox.put(None)
        for p in self._processes:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
        self._processes = []

    def __enter__(self) -> "RealVideoWorkerGroup":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
