"""Running the RealVideo DiT on several GPUs: the sharded sampler and a persistent worker group.

:func:`sample_realvideo_parallel` is what every rank of a sequence-parallel group runs (under
``torchrun`` or inside a :class:`RealVideoWorkerGroup`): it slices the reference latent and the
noise, samples its shard, and all-gathers each block, so every rank yields the full block and the
video equals the single-GPU one.

:class:`RealVideoWorkerGroup` keeps one process per device alive between calls (weights loaded
once); rank 0 streams the blocks back. A ComfyUI node creates it once for the selected GPUs and
calls :meth:`RealVideoWorkerGroup.generate` per prompt.

The workers are plain ``python -c`` processes, not ``multiprocessing`` children, for two reasons:
``spawn`` re-runs the host's ``__main__`` in every child (ComfyUI's ``main.py``, with each pack's
prestartup script and a CUDA context on GPU 0), and the host may have imported this package under
a name no other process can import (ComfyUI names a pack's module after its folder path). A worker
imports the engine as the top-level package ``livetalk_core`` from this checkout, and each side
pickles the engine's classes and functions under the name the other side imports them by
(:class:`_EnginePickler`). Each worker talks to the parent over its own socket pair.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
import traceback
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing import Pipe
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..errors import LiveTalkError
from ..options import RuntimeOptions
from ..realvideo.model import S2VDiT, load_s2v_dit
from ..realvideo.sampler import FRAMES_PER_BLOCK, REALVIDEO_CACHE, sample_realvideo
from ..runtime.noise import NoiseSource, SeededNoise
from ..wan.dit import WanCoreConfig
from . import sequence_parallel
from .sequence_parallel import LatentShard, SequenceParallel, ShardedNoise, pick_split_axis

log = logging.getLogger(__name__)
POLL_SECONDS = 1.0
STOP_SECONDS = 10.0  # how long close() waits for a worker to exit before killing it
FAILURE_GRACE_SECONDS = 1.0  # after one worker fails, how long to listen for the others' reasons
_ENGINE_DIR = Path(__file__).resolve().parents[1]
WORKER_PACKAGE = _ENGINE_DIR.name  # the name a worker imports the engine by
_ENGINE_ROOT = _ENGINE_DIR.parent
_ENGINE_PACKAGE = __package__.rpartition(".")[0]  # the name this process imported the engine by
_BOOTSTRAP = (
    "import importlib, pickle, sys\n"
    "setup = pickle.load(sys.stdin.buffer)\n"
    "sys.path[:] = setup['sys_path']\n"
    "importlib.import_module(setup['module']).worker_main(setup)\n"
)


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


def load_realvideo_dit(
    path: str | os.PathLike,
    options: RuntimeOptions,
    *,
    device: torch.device,
    **load_options: Any,
) -> S2VDiT:
    """:func:`~.s2v_model.load_s2v_dit` on ``device`` in ``options``' precision and fp8 weight forms,
    set up by :meth:`~.options.RuntimeOptions.apply` (the blocks compiled on a GPU unless ``options``
    say otherwise): a worker's ``load_model`` as ``functools.partial(load_realvideo_dit, path,
    options, base=...)``; ``load_options`` are ``load_s2v_dit``'s other keyword arguments."""
    options = options.on(device)
    model = load_s2v_dit(path, options.dtype, device, fp8_weights=options.fp8_weights, fp8_matmul=options.fp8_matmul,
                         **load_options)
    options.apply(model)
    return model


@dataclass(frozen=True)
class WorkerModelInfo:
    """What rank 0 reports of the model it loaded: the DiT's geometry, its dtype and the shape of
    every weight (what a caller checks other models against, without a copy of the weights)."""

    config: WanCoreConfig
    dtype: torch.dtype
    weight_shapes: dict[str, tuple[int, ...]]


class _EnginePickler(pickle.Pickler):
    """Pickles references to this engine's modules, classes and functions under the package name
    ``target`` by which the receiving process imports the engine; everything else as usual."""

    def __init__(self, file: io.BytesIO, target: str) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.target = target

    def _renamed(self, module: str) -> str | None:
        if module == _ENGINE_PACKAGE or module.startswith(_ENGINE_PACKAGE + "."):
            return self.target + module[len(_ENGINE_PACKAGE):]
        return None

    def reducer_override(self, obj: Any) -> Any:
        if self.target == _ENGINE_PACKAGE:
            return NotImplemented
        if isinstance(obj, types.ModuleType):
            renamed = self._renamed(obj.__name__)
            return NotImplemented if renamed is None else (importlib.import_module, (renamed,))
        if isinstance(obj, (type, types.FunctionType)) and self._renamed(obj.__module__) is not None:
            # The module object itself goes through the branch above.
            return functools.reduce, (getattr, obj.__qualname__.split("."), sys.modules[obj.__module__])
        return NotImplemented


def _dumps(obj: Any, target: str) -> bytes:
    buffer = io.BytesIO()
    _EnginePickler(buffer, target).dump(obj)
    return buffer.getvalue()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the worker process ------------------------------------------------------------------------------


def worker_main(setup: dict[str, Any]) -> None:
    """One rank (started by :class:`RealVideoWorkerGroup`): join the group, load the model once,
    then serve generations until the parent says stop or goes away."""
    # Ctrl-C in a terminal reaches the whole process group; the parent decides when workers end.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    rank, devices = setup["rank"], setup["devices"]
    logging.basicConfig(level=logging.INFO, format=f"[RealVideo worker {rank}] %(message)s")
    conn = Connection(setup["fd"])
    parent_package = setup["parent_package"]

    def send(message: tuple) -> None:
        conn.send_bytes(_dumps(message, parent_package))

    device = torch.device(devices[rank])
    world = len(devices)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(setup["port"]), RANK=str(rank), WORLD_SIZE=str(world))
    os.environ["LOCAL_RANK"] = str(device.index or 0)
    if device.type == "cpu":  # CPU ranks share the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    try:
        try:
            sp = sequence_parallel.init_from_env("nccl" if device.type == "cuda" else "gloo")
            model = pickle.loads(setup["load_model"])(device=device)
        except Exception as exc:  # reported; the parent raises it
            send(("failed", *_failure(exc)))
            return
        info = WorkerModelInfo(model.config, model.dtype, {k: tuple(v.shape) for k, v in model.state_dict().items()})
        send(("ready", info if rank == 0 else None))
        _serve(rank, device, sp, model, conn, send)
    except (ConnectionError, EOFError):
        pass  # the parent went away: nothing is left to do
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _failure(exc: Exception) -> tuple[str, LiveTalkError | None, bool, str]:
    """(one-line summary, the error itself if it is meant for the user, out of memory?, traceback)."""
    summary = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    return (summary, exc if isinstance(exc, LiveTalkError) else None, isinstance(exc, torch.cuda.OutOfMemoryError),
            traceback.format_exc())


def _serve(rank: int, device: torch.device, sp: SequenceParallel | None, model: S2VDiT, conn: Connection,
           send: Callable[[tuple], None]) -> None:
    while True:
        message = pickle.loads(conn.recv_bytes())
        if message is None:
            sequence_parallel.leave_together(sp)
            return
        kind, request = message[0], message[1]
        if kind != "generate":  # a stop for a generation that has already ended
            continue
        try:
            outcome = _generate(rank, device, sp, model, conn, send, request, dict(message[2]))
        except (ConnectionError, EOFError):
            raise
        except LiveTalkError as exc:
            # Input errors are raised by every rank before any exchange: the group stays usable.
            if rank == 0:
                send(("error", request, exc))
            continue
        except Exception as exc:
            send(("failed", *_failure(exc)))
            return
        if rank == 0:
            send(outcome)


def _generate(rank: int, device: torch.device, sp: SequenceParallel | None, model: S2VDiT, conn: Connection,
              send: Callable[[tuple], None], request: int, kwargs: dict[str, Any]) -> tuple[str, int, int]:
    """Sample one video, rank 0 sending each block; after every block the ranks agree whether the
    parent asked to stop. Returns ``("done" or "stopped", request, blocks made)``."""
    blocks = sample_realvideo_parallel(model, sp, noise=SeededNoise(kwargs.pop("seed")), **kwargs)
    made = 0
    with contextlib.closing(blocks):  # closing frees the KV cache at once
        for block in blocks:
            made += 1
            if rank == 0:
                send(("block", request, block.cpu()))
            if _stop_agreed(conn, request, sp, device):
                return "stopped", request, made
    return "done", request, made


def _stop_agreed(conn: Connection, request: int, sp: SequenceParallel | None, device: torch.device) -> bool:
    """Whether any rank was asked to stop ``request`` (or to exit). Every rank calls this after the
    same block, so all of them stop together and no collective is left waiting for a missing rank."""
    asked = False
    while conn.poll():
        try:
            message = pickle.loads(conn.recv_bytes())
        except EOFError:
            asked = True
            break
        asked = asked or message is None or tuple(message) == ("stop", request)
    if sp is None or sp.world_size == 1:
        return asked
    flag = torch.tensor([1.0 if asked else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=sp.group)
    return bool(flag.item())


# -- the parent ----------------------------------------------------------------------------------------


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


def _start_worker(rank: int, devices: list[str], port: int, load_model: bytes) -> _Worker:
    parent_end, child_end = Pipe()
    setup = dict(
        sys_path=[str(_ENGINE_ROOT), *sys.path],
        module=f"{WORKER_PACKAGE}{__name__[len(_ENGINE_PACKAGE):]}",
        parent_package=_ENGINE_PACKAGE,
        rank=rank,
        devices=devices,
        port=port,
        fd=child_end.fileno(),
        load_model=load_model,
    )
    process = subprocess.Popen([sys.executable, "-c", _BOOTSTRAP], stdin=subprocess.PIPE, pass_fds=(child_end.fileno(),))
    child_end.close()
    with contextlib.suppress(OSError):  # a worker that died at once is reported by the first read
        process.stdin.write(pickle.dumps(setup))
        process.stdin.close()
    return _Worker(rank, devices[rank], process, parent_end)


class RealVideoWorkerGroup:
    """One process per device running :func:`sample_realvideo_parallel`, kept alive between calls.

    Args:
        load_model: picklable callable (e.g. ``functools.partial(load_realvideo_dit, path, options)``)
            called in each worker as ``load_model(device=torch.device)``.
        devices: one entry per rank, e.g. ``["cuda:0", "cuda:1"]`` (NCCL) or ``["cpu", "cpu"]`` (gloo).
        start_timeout: seconds to wait for every worker to load its model.
        poll: called about once a second while the workers load; an exception it raises stops them
            and propagates (e.g. ComfyUI's interrupt check).

    A worker that fails stops the whole group: the call that noticed raises one
    :class:`~.errors.LiveTalkError` naming the worker, its device and the reason, and :attr:`alive`
    turns False. Input errors (raised by every rank alike) leave the group usable.
    """

    def __init__(self, load_model: ModelFactory, devices: Sequence[str], *, start_timeout: float = 3600.0,
                 poll: Callable[[], None] | None = None) -> None:
        if not devices:
            raise LiveTalkError("A RealVideo worker group needs at least one device.")
        kinds = {torch.device(d).type for d in devices}
        if len(kinds) != 1:
            raise LiveTalkError(f"All devices of a worker group must be of one kind, got {list(devices)}.")
        if os.name != "posix":
            raise LiveTalkError("Running RealVideo on several GPUs needs Linux (NCCL); use one GPU here.")
        self.devices = list(devices)
        self.model_info: WorkerModelInfo | None = None
        self._active: int | None = None  # the request whose blocks are still to come
        self._next_request = 0
        port, blob = _free_port(), _dumps(load_model, WORKER_PACKAGE)
        self._workers: list[_Worker] = []
        try:
            for rank in range(len(self.devices)):
                self._workers.append(_start_worker(rank, self.devices, port, blob))
            deadline = time.monotonic() + start_timeout
            for _ in self.devices:
                rank, message = self._next_message(deadline=deadline, poll=poll)
                if rank == 0:
                    self.model_info = message[1]
        except BaseException:
            self.close()
            raise
        log.info("RealVideo worker group ready on %s", ", ".join(self.devices))

    @property
    def world_size(self) -> int:
        return len(self.devices)

    @property
    def alive(self) -> bool:
        return bool(self._workers) and all(w.process.poll() is None for w in self._workers)

    def generate(self, *, seed: int, poll: Callable[[], None] | None = None, **kwargs: Any) -> Iterator[torch.Tensor]:
        """Start :func:`sample_realvideo_parallel` on the group with :class:`~.noise.SeededNoise` of
        ``seed``; ``kwargs`` are the sampler's other arguments (CPU tensors, no ``on_step``).
        Returns an iterator of the full blocks (CPU) as rank 0 produces them.

        Closing the iterator early (or ``poll``, called before each block is awaited and about once
        a second while it is, raising) tells the workers to stop after their current block and waits until
        they have, so the group is ready for the next call.
        """
        if self._active is not None:  # a previous iterator was dropped without being closed
            self._stop(self._active)
        if not self.alive:
            raise LiveTalkError("The RealVideo worker group has stopped; create a new one.")
        request = self._next_request
        self._next_request += 1
        self._send_all(("generate", request, {"seed": seed, **kwargs}))
        self._active = request
        return self._blocks(request, poll)

    def _blocks(self, request: int, poll: Callable[[], None] | None) -> Iterator[torch.Tensor]:
        try:
            while True:
                rank, message = self._next_message(poll=poll)
                if rank != 0 or message[1] != request:
                    continue
                if message[0] == "block":
                    yield message[2]
                    continue
                self._active = None
                if message[0] == "error":
                    raise message[2]
                return
        finally:
            if self._active == request and self.alive:
                self._stop(request)

    def _stop(self, request: int) -> None:
        """Ask the workers to stop ``request`` after their current block; wait until they have."""
        try:
            self._send_all(("stop", request))
            while True:
                rank, message = self._next_message()
                if rank == 0 and message[1] == request and message[0] != "block":
                    if message[0] == "stopped":
                        log.info("RealVideo workers stopped after block %d", message[2])
                    return
        except LiveTalkError as exc:  # the group is closed; the next generation reports it
            log.warning("%s", exc)
        finally:
            self._active = None

    def _send_all(self, message: tuple) -> None:
        payload = _dumps(message, WORKER_PACKAGE)
        for worker in self._workers:
            try:
                worker.conn.send_bytes(payload)
            except OSError:
                self._raise_failure(self._lost(worker))

    def _next_message(self, *, deadline: float | None = None, poll: Callable[[], None] | None = None) -> tuple[int, tuple]:
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
                raise LiveTalkError("The RealVideo workers did not finish loading in time; they were stopped.")

    def _read(self, worker: _Worker) -> tuple | _Failure:
        try:
            message = pickle.loads(worker.conn.recv_bytes())
        except (EOFError, OSError):
            return self._lost(worker)
        if message[0] == "failed":
            return _Failure(worker, *message[1:])
        return message

    def _lost(self, worker: _Worker) -> _Failure:
        try:
            code = worker.process.wait(timeout=STOP_SECONDS)
        except subprocess.TimeoutExpired:
            return _Failure(worker, "it closed its connection")
        if code < 0 and -code in signal.valid_signals():
            how = f"killed by {signal.Signals(-code).name}"
            if -code == signal.SIGKILL:
                how += ", perhaps out of host memory"
        else:
            how = f"exit code {code}"
        return _Failure(worker, f"it exited unexpectedly ({how})")

    def _raise_failure(self, first: _Failure) -> None:
        """Stop the group and raise one error: a worker's own out-of-memory report if any (the
        other ranks then fail in their collectives), else the first failure."""
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
                log.error("RealVideo worker %d (%s) failed:\n%s", failure.worker.rank, failure.worker.device, failure.trace)
        chosen = next((f for f in failures if f.out_of_memory), first)
        if chosen.error is not None:
            raise chosen.error
        where = f"RealVideo worker {chosen.worker.rank} ({chosen.worker.device})"
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

    def __enter__(self) -> "RealVideoWorkerGroup":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
