"""One rank of a :class:`~.workers.WorkerGroup`: the worker process's side of the protocol.

A worker joins the sequence-parallel group, runs its :class:`WorkerJob`'s loader once, then serves
generations (the job's sampler) and streams (its streaming sampler, fed one block's inputs at a
time) until the parent says stop or goes away. Messages are pickled tuples over the worker's own
connection: the parent sends ``("generate", request, inputs)``, ``("stream", request, inputs)``, per
block of a stream ``("feed", request, block_inputs)``, ``("stop", request)`` or ``None`` (exit); the
worker answers ``("ready", info)``, then per request ``("block", request, tensor)`` (rank 0 only),
and ``("done" | "stopped", request, blocks)`` or ``("error", request, LiveTalkError)``;
``("failed", summary, error, out_of_memory, traceback)`` ends the worker. Every rank receives the
same messages in the same order, so all of them end a stream after the same block.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import signal
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import torch
import torch.distributed as dist

from ..errors import LiveTalkError
from ..runtime.noise import SeededNoise
from ..wan.dit import WanCoreConfig
from . import sequence_parallel
from .engine_pickle import dumps
from .sequence_parallel import SequenceParallel

Send = Callable[[tuple], None]


@dataclass(frozen=True)
class WorkerJob:
    """What every process of a worker group runs; picklable (module-level functions, a
    ``functools.partial`` of one, plain data), as it travels to the workers.

    load: ``load(device=torch.device)`` -> the model on that device, set up to run.
    sample: ``sample(model, sp, *, noise, **inputs)`` -> the video's full blocks on every rank of
        the group ``sp`` (e.g. a family's sampler through :func:`~.sharded_sampling.sample_sharded`).
    stream: ``stream(model, sp, *, noise, feed, **inputs)`` -> the same, for a stream whose blocks'
        inputs arrive one at a time: ``feed`` iterates over them as the parent sends them (each read
        when its block starts) and ends when the parent closes the stream (a live session); None:
        the job cannot stream.
    """

    load: Callable[..., torch.nn.Module]
    sample: Callable[..., Iterator[torch.Tensor]]
    stream: Callable[..., Iterator[torch.Tensor]] | None = None


@dataclass(frozen=True)
class WorkerModelInfo:
    """What rank 0 reports of the model it loaded: the DiT's geometry, its dtype and the shape of
    every weight (what a caller checks other models against, without a copy of the weights)."""

    config: WanCoreConfig
    dtype: torch.dtype
    weight_shapes: dict[str, tuple[int, ...]]


def worker_main(setup: dict[str, Any]) -> None:
    """One rank (started by :class:`~.workers.WorkerGroup`): join the group, load the model once,
    then serve generations until the parent says stop or goes away."""
    # Ctrl-C in a terminal reaches the whole process group; the parent decides when workers end.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    rank, devices = setup["rank"], setup["devices"]
    logging.basicConfig(level=logging.INFO, format=f"[{setup['label']} worker {rank}] %(message)s")
    conn = Connection(setup["fd"])
    parent_package = setup["parent_package"]

    def send(message: tuple) -> None:
        conn.send_bytes(dumps(message, parent_package))

    device = torch.device(devices[rank])
    world = len(devices)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(setup["port"]), RANK=str(rank), WORLD_SIZE=str(world))
    os.environ["LOCAL_RANK"] = str(device.index or 0)
    if device.type == "cpu":  # CPU ranks share the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    try:
        try:
            sp = sequence_parallel.init_from_env("nccl" if device.type == "cuda" else "gloo")
            job: WorkerJob = pickle.loads(setup["job"])
            model = job.load(device=device)
        except Exception as exc:  # reported; the parent raises it
            send(("failed", *failure(exc)))
            return
        info = WorkerModelInfo(model.config, model.dtype, {k: tuple(v.shape) for k, v in model.state_dict().items()})
        send(("ready", info if rank == 0 else None))
        _Rank(rank, device, sp, conn, send).serve(job, model)
    except (ConnectionError, EOFError):
        pass  # the parent went away: nothing is left to do
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def failure(exc: Exception) -> tuple[str, LiveTalkError | None, bool, str]:
    """(one-line summary, the error itself if it is meant for the user, out of memory?, traceback)."""
    summary = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    return (summary, exc if isinstance(exc, LiveTalkError) else None, isinstance(exc, torch.cuda.OutOfMemoryError),
            traceback.format_exc())


@dataclass
class _Rank:
    """This worker's place in the group and its line to the parent."""

    rank: int
    device: torch.device
    sp: SequenceParallel | None
    conn: Connection
    send: Send
    exiting: bool = False  # the parent said exit while a stream was waiting for its next block

    def serve(self, job: WorkerJob, model: torch.nn.Module) -> None:
        while not self.exiting:
            message = pickle.loads(self.conn.recv_bytes())
            if message is None:
                break
            kind, request = message[0], message[1]
            if kind not in ("generate", "stream"):  # a stop or a block's inputs for a request that has ended
                continue
            inputs = dict(message[2])
            noise = SeededNoise(inputs.pop("seed"))  # the same draws on every rank
            try:
                if kind == "generate":
                    outcome = self.run(job.sample(model, self.sp, noise=noise, **inputs), request, streaming=False)
                else:
                    outcome = self.run(self.stream_blocks(job, model, noise, inputs, request), request, streaming=True)
            except (ConnectionError, EOFError):
                raise
            except LiveTalkError as exc:
                # Input errors are raised by every rank before any exchange: the group stays usable.
                if self.rank == 0:
                    self.send(("error", request, exc))
                continue
            except Exception as exc:
                self.send(("failed", *failure(exc)))
                return
            if self.rank == 0:
                self.send(outcome)
        sequence_parallel.leave_together(self.sp)

    def stream_blocks(self, job: WorkerJob, model: torch.nn.Module, noise: SeededNoise, inputs: dict[str, Any],
                      request: int) -> Iterator[torch.Tensor]:
        """The job's streaming sampler for ``request``, fed from the parent's messages."""
        if job.stream is None:
            raise LiveTalkError("This model's workers sample whole videos only; they cannot stream block by block.")
        return job.stream(model, self.sp, noise=noise, feed=self.feed(request), **inputs)

    def feed(self, request: int) -> Iterator[Any]:
        """The inputs of each block of the stream ``request``, as the parent sends them; ends when the
        parent stops the stream (or tells the worker to exit: it does once the stream has ended)."""
        while True:
            message = pickle.loads(self.conn.recv_bytes())
            if message is None:
                self.exiting = True
                return
            if message[1] != request:  # a late stop for an earlier request
                continue
            if message[0] == "stop":
                return
            if message[0] == "feed":
                yield message[2]

    def run(self, blocks: Iterator[torch.Tensor], request: int, *, streaming: bool) -> tuple[str, int, int]:
        """Run one request, rank 0 sending each block. A generation checks after every block whether the
        parent asked to stop (the ranks agree); a stream ends when its feed does (the parent's stop).
        Returns ``("done" or "stopped", request, blocks made)``."""
        made = 0
        with contextlib.closing(blocks):  # closing frees the KV cache at once
            for block in blocks:
                made += 1
                if self.rank == 0:
                    self.send(("block", request, block.cpu()))
                if not streaming and self.stop_agreed(request):
                    return "stopped", request, made
        return "stopped" if streaming else "done", request, made

    def stop_agreed(self, request: int) -> bool:
        """Whether any rank was asked to stop ``request`` (or to exit). Every rank calls this after the
        same block, so all of them stop together and no collective is left waiting for a missing rank."""
        asked = False
        while self.conn.poll():
            try:
                message = pickle.loads(self.conn.recv_bytes())
            except EOFError:
                asked = True
                break
            asked = asked or message is None or tuple(message) == ("stop", request)
        if self.sp is None or self.sp.world_size == 1:
            return asked
        flag = torch.tensor([1.0 if asked else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.sp.group)
        return bool(flag.item())
