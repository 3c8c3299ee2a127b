"""A group of worker processes, one per device, that keeps a model loaded between calls and samples
with it over the group: the parent's side. Family-agnostic: it runs the :class:`WorkerJob` it is
given (a model family's loader and sharded sampler, :meth:`~..family_base.ModelFamily.worker_job`).

Rank 0 streams the blocks back. A ComfyUI node creates one group for the selected GPUs and calls
:meth:`WorkerGroup.generate` per prompt; a live session opens a :meth:`WorkerGroup.stream` and sends
each block's inputs as its audio arrives. :mod:`.worker_process` is the workers' side.

The workers are plain ``python -c`` processes, not ``multiprocessing`` children, for two reasons:
``spawn`` re-runs the host's ``__main__`` in every child (ComfyUI's ``main.py``, with each pack's
prestartup script and a CUDA context on GPU 0), and the host may have imported this package under
a name no other process can import (ComfyUI names a pack's module after its folder path). A worker
imports the engine as the top-level package ``livetalk_core`` from this checkout, and each side
pickles the engine's classes and functions under the name the other side imports them by
(:mod:`.engine_pickle`). Each worker talks to the parent over its own socket pair.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing import Pipe
from multiprocessing.connection import Connection, wait
from typing import Any

import torch

from ..errors import LiveTalkError
from . import worker_process
from .engine_pickle import ENGINE_PACKAGE, ENGINE_ROOT, WORKER_PACKAGE, dumps, engine_module
from .worker_process import WorkerJob, WorkerModelInfo

__all__ = ["BlockStream", "WorkerGroup", "WorkerJob", "WorkerModelInfo"]

log = logging.getLogger(__name__)
POLL_SECONDS = 1.0
STOP_SECONDS = 10.0  # how long close() waits for a worker to exit before killing it
FAILURE_GRACE_SECONDS = 1.0  # after one worker fails, how long to listen for the others' reasons
_BOOTSTRAP = (
    "import importlib, pickle, sys\n"
    "setup = pickle.load(sys.stdin.buffer)\n"
    "sys.path[:] = setup['sys_path']\n"
    "importlib.import_module(setup['module']).worker_main(setup)\n"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class _Worker:
    rank: int
    device: str
    process: subprocess.Popen
    conn: Connection


@dataclass
class _Failure:
    worker: _Worker
    summary: str
    error: LiveTalkError | None = None
    out_of_memory: bool = False
    trace: str = ""
    killed: bool = False  # ended by a signal: the cause of the others' failures in their exchanges with it


def _start_worker(rank: int, devices: list[str], port: int, job: bytes, label: str) -> _Worker:
    parent_end, child_end = Pipe()
    setup = dict(
        sys_path=[str(ENGINE_ROOT), *sys.path],
        module=engine_module(worker_process.__name__, WORKER_PACKAGE),
        parent_package=ENGINE_PACKAGE,
        label=label,
        rank=rank,
        devices=devices,
        port=port,
        fd=child_end.fileno(),
        job=job,
    )
    process = subprocess.Popen([sys.executable, "-c", _BOOTSTRAP], stdin=subprocess.PIPE,
                               pass_fds=(child_end.fileno(),))
    child_end.close()
    with contextlib.suppress(OSError):  # a worker that died at once is reported by the first read
        process.stdin.write(pickle.dumps(setup))
        process.stdin.close()
    return _Worker(rank, devices[rank], process, parent_end)


class WorkerGroup:
    """One process per device running ``job``, kept alive between calls.

    Args:
        job: what each worker runs: its loader, called once as ``job.load(device=torch.device)``,
            and its sampler, called per :meth:`generate` (:class:`WorkerJob`).
        devices: one entry per rank, e.g. ``["cuda:0", "cuda:1"]`` (NCCL) or ``["cpu", "cpu"]`` (gloo).
        label: what messages call the workers, e.g. the model family's name ("<label> worker 1 (cuda:1)").
        start_timeout: seconds to wait for every worker to load its model.
        poll: called about once a second while the workers load; an exception it raises stops them
            and propagates (e.g. ComfyUI's interrupt check).

    A worker that fails stops the whole group: the call that noticed raises one
    :class:`~.errors.LiveTalkError` naming the worker, its device and the reason, and :attr:`alive`
    turns False. Input errors (raised by every rank alike) leave the group usable.
    """

    def __init__(self, job: WorkerJob, devices: Sequence[str], *, label: str = "model", start_timeout: float = 3600.0,
                 poll: Callable[[], None] | None = None) -> None:
        if not devices:
            raise LiveTalkError(f"A {label} worker group needs at least one device.")
        kinds = {torch.device(d).type for d in devices}
        if len(kinds) != 1:
            raise LiveTalkError(f"All devices of a worker group must be of one kind, got {list(devices)}.")
        if os.name != "posix":
            raise LiveTalkError(f"Running {label} on several GPUs needs Linux (NCCL); use one GPU here.")
        self.label = label
        self.devices = list(devices)
        self.model_info: WorkerModelInfo | None = None
        self._active: int | None = None  # the request whose blocks are still to come
        self._next_request = 0
        port, blob = _free_port(), dumps(job, WORKER_PACKAGE)
        self._workers: list[_Worker] = []
        try:
            for rank in range(len(self.devices)):
                self._workers.append(_start_worker(rank, self.devices, port, blob, label))
            deadline = time.monotonic() + start_timeout
            for _ in self.devices:
                rank, message = self._next_message(deadline=deadline, poll=poll)
                if rank == 0:
                    self.model_info = message[1]
        except BaseException:
            self.close()
            raise
        log.info("%s worker group ready on %s", label, ", ".join(self.devices))

    @property
    def world_size(self) -> int:
        return len(self.devices)

    @property
    def alive(self) -> bool:
        return bool(self._workers) and all(w.process.poll() is None for w in self._workers)

    def generate(self, *, seed: int, poll: Callable[[], None] | None = None, **kwargs: Any) -> Iterator[torch.Tensor]:
        """Start the job's sampler on the group with :class:`~..runtime.noise.SeededNoise` of ``seed``;
        ``kwargs`` are the sampler's other arguments (CPU tensors, no ``on_step``).
        Returns an iterator of the full blocks (CPU) as rank 0 produces them.

        Closing the iterator early (or ``poll``, called before each block is awaited and about once
        a second while it is, raising) tells the workers to stop after their current block and waits until
        they have, so the group is ready for the next call.
        """
        request = self._start("generate", seed, kwargs)
        return self._blocks(request, poll)

    def stream(self, *, seed: int, poll: Callable[[], None] | None = None, **kwargs: Any) -> BlockStream:
        """Start the job's streaming sampler (:attr:`WorkerJob.stream`) on the group with
        :class:`~..runtime.noise.SeededNoise` of ``seed``; ``kwargs`` are its inputs that hold for every
        block (CPU tensors). Returns a :class:`BlockStream`: each :meth:`BlockStream.next_block` sends
        one block's inputs and returns that block. A stream holds the group until it is closed; a
        :meth:`generate` or another stream closes it first."""
        return BlockStream(self, self._start("stream", seed, kwargs), poll)

    def _start(self, kind: str, seed: int, kwargs: dict[str, Any]) -> int:
        """Send a new request of ``kind`` ("generate" or "stream") to every worker; returns its number."""
        if self._active is not None:  # a previous iterator or stream was dropped without being closed
            self._stop(self._active)
        if not self.alive:
            raise LiveTalkError(f"The {self.label} worker group has stopped; create a new one.")
        request = self._next_request
        self._next_request += 1
        self._send_all((kind, request, {"seed": seed, **kwargs}))
        self._active = request
        return request

    def _blocks(self, request: int, poll: Callable[[], None] | None) -> Iterator[torch.Tensor]:
        try:
            while (block := self._answer(request, poll)) is not None:
                yield block
        finally:
            if self._active == request and self.alive:
                self._stop(request)

    def _answer(self, request: int, poll: Callable[[], None] | None) -> torch.Tensor | None:
        """Rank 0's next block of ``request``, or None when the request has ended; raises the
        workers' input error, or when a worker has failed."""
        while True:
            rank, message = self._next_message(poll=poll)
            if rank != 0 or message[1] != request:
                continue
            if message[0] == "block":
                return message[2]
            self._active = None
            if message[0] == "error":
                raise message[2]
            return None

    def _stop(self, request: int) -> None:
        """Ask the workers to stop ``request`` after their current block; wait until they have."""
        try:
            self._send_all(("stop", request))
            while True:
                rank, message = self._next_message()
                if rank == 0 and message[1] == request and message[0] != "block":
                    if message[0] == "stopped":
                        log.info("%s workers stopped after block %d", self.label, message[2])
                    return
        except LiveTalkError as exc:  # the group is closed; the next generation reports it
            log.warning("%s", exc)
        finally:
            self._active = None

    def _send_all(self, message: tuple) -> None:
        payload = dumps(message, WORKER_PACKAGE)
        for worker in self._workers:
            try:
                worker.conn.send_bytes(payload)
            except OSError:
                self._raise_failure(self._failure_of(worker))

    def _next_message(self, *, deadline: float | None = None,
                      poll: Callable[[], None] | None = None) -> tuple[int, tuple]:
        """The next message of any worker, as (rank, message); raises when a worker has failed.
        ``poll`` is called before every wait (so once per block at least) and about once a second."""
        while True:
            if poll is not None:
                poll()
            by_conn = {w.conn: w for w in self._workers}
            for conn in wait(list(by_conn), timeout=POLL_SECONDS):
                worker = by_conn[conn]
                message = self._read(worker)
                if isinstance(message, _Failure):
                    self._raise_failure(message)
                return worker.rank, message
            if deadline is not None and time.monotonic() > deadline:
                self.close()
                raise LiveTalkError(f"The {self.label} workers did not finish loading in time; they were stopped.")

    def _read(self, worker: _Worker) -> tuple | _Failure:
        try:
            message = pickle.loads(worker.conn.recv_bytes())
        except (EOFError, OSError):
            return self._lost(worker)
        if message[0] == "failed":
            return _Failure(worker, *message[1:])
        return message

    def _failure_of(self, worker: _Worker) -> _Failure:
        """Why ``worker``, whose connection broke, is gone: the reason it sent before it exited, if any."""
        with contextlib.suppress(OSError):
            while worker.conn.poll():
                message = self._read(worker)
                if isinstance(message, _Failure):
                    return message
        return self._lost(worker)

    def _lost(self, worker: _Worker) -> _Failure:
        try:
            code = worker.process.wait(timeout=STOP_SECONDS)
        except subprocess.TimeoutExpired:
            return _Failure(worker, "it closed its connection")
        killed = code < 0 and -code in signal.valid_signals()
        if killed:
            how = f"killed by {signal.Signals(-code).name}"
            if -code == signal.SIGKILL:
                how += ", perhaps out of host memory"
        else:
            how = f"exit code {code}"
        return _Failure(worker, f"it exited unexpectedly ({how})", killed=killed)

    def _raise_failure(self, first: _Failure) -> None:
        """Stop the group and raise one error: a worker's own out-of-memory report if any (the
        other ranks then fail in their collectives), else a worker killed by a signal (likewise), else
        the first failure."""
        failures = [first]
        others = {w.conn: w for w in self._workers if w is not first.worker}
        deadline = time.monotonic() + FAILURE_GRACE_SECONDS
        while others and (left := deadline - time.monotonic()) > 0:
            for conn in wait(list(others), timeout=left):
                message = self._read(others[conn])
                if isinstance(message, _Failure):
                    failures.append(message)
                    del others[conn]
        self._close(timeout=0.0)
        for failure in failures:
            if failure.trace and failure.error is None:  # a LiveTalkError's message says it all
                log.error("%s worker %d (%s) failed:\n%s", self.label, failure.worker.rank, failure.worker.device,
                          failure.trace)
        chosen = next((f for f in failures if f.out_of_memory), next((f for f in failures if f.killed), first))
        if chosen.error is not None:
            raise chosen.error
        where = f"{self.label} worker {chosen.worker.rank} ({chosen.worker.device})"
        if chosen.out_of_memory:
            raise LiveTalkError(
                f"{where} ran out of GPU memory ({chosen.summary}). The worker group was stopped; a smaller "
                "video, fp8 weights or more GPUs need less memory per GPU."
            )
        raise LiveTalkError(f"{where} failed: {chosen.summary}. The worker group was stopped.")

    def close(self) -> None:
        """Stop every worker (politely, then by force) and free its GPU."""
        self._close(timeout=STOP_SECONDS)

    def _close(self, timeout: float) -> None:
        for worker in self._workers:
            with contextlib.suppress(OSError):
                worker.conn.send_bytes(pickle.dumps(None))
            worker.conn.close()
        deadline = time.monotonic() + timeout
        for worker in self._workers:
            try:
                worker.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait()
        self._workers = []
        self._active = None

    def __enter__(self) -> WorkerGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BlockStream:
    """A streaming request on a :class:`WorkerGroup` (:meth:`WorkerGroup.stream`): one block per call,
    from inputs the caller makes as it goes (a live session's audio). :meth:`close` stops the request
    after the workers' current block and leaves the group ready for the next one."""

    def __init__(self, group: WorkerGroup, request: int, poll: Callable[[], None] | None) -> None:
        self._group, self._request, self._poll = group, request, poll

    @property
    def open(self) -> bool:
        return self._group._active == self._request and self._group.alive

    def next_block(self, inputs: Any) -> torch.Tensor:
        """Send the next block's ``inputs`` (picklable; what the job's ``feed`` yields) to every worker
        and return the block (CPU) rank 0 sends back. An error ends the stream: a worker's input error
        is raised as it is, a worker that failed stops the group (one :class:`~.errors.LiveTalkError`)."""
        group = self._group
        if group._active != self._request:  # a worker that died since is reported by the exchange below
            raise LiveTalkError(f"This {group.label} stream has ended (closed, or its workers stopped); open a new "
                                "session.")
        try:
            group._send_all(("feed", self._request, inputs))
            block = group._answer(self._request, self._poll)
        except BaseException:
            self.close()
            raise
        if block is None:
            raise LiveTalkError(f"The {group.label} workers ended the stream before its next block.")
        return block

    def close(self) -> None:
        """Stop the request after the workers' current block and wait until they have; idempotent."""
        if self.open:
            self._group._stop(self._request)

    def __enter__(self) -> BlockStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
