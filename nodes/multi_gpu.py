"""A DiT on several GPUs from ComfyUI: it runs in a worker group (``livetalk_core.parallel.workers``).

With ``gpus`` > 1 the loader does not load the DiT in ComfyUI's process: one worker process per GPU
loads it (sequence parallel; the video equals the one-GPU video) and stays alive between prompts.
What the workers run comes from the model's family (``ModelFamily.worker_job``), for any family that
``supports_sequence_parallel``.
The VAE and the audio encoder stay in ComfyUI's process.

One group runs at a time (held here, per process): a loader asking for the same settings reuses it,
other settings close it and start a new one. It is also closed when ComfyUI unloads its models
("Unload models", after an out-of-memory error, or to make room on GPU 0), and at exit. ComfyUI
keeps the loader's output cached, so a group that failed or was closed is started again by the
next sampler run, not by the loader.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import comfy.model_management as mm
import torch
from comfy.patcher_extension import CallbacksMP

from ..livetalk_core.errors import InputError
from ..livetalk_core.families import ModelFamily, sequence_parallel_families
from ..livetalk_core.options import RuntimeOptions
from ..livetalk_core.parallel.remote import on_cpu
from ..livetalk_core.parallel.sequence_parallel import header_heads
from ..livetalk_core.parallel.workers import BlockStream, WorkerGroup, WorkerJob, WorkerModelInfo
from .comfy_models import Managed

log = logging.getLogger(__name__)


def parallel_devices() -> list[str]:
    """Every device a worker group can use, in order: the CUDA GPUs this process sees."""
    return [f"cuda:{index}" for index in range(torch.cuda.device_count())]


def check_gpus(gpus: int, family: ModelFamily | None, shapes: Mapping[str, tuple[int, ...]] | None = None) -> None:
    """Raise an InputError unless the model can run on the first ``gpus`` GPUs. ``family`` None: not
    known yet (a file still to be downloaded); ``shapes``: the DiT's weight shapes, when known, for
    the attention-head split."""
    if gpus <= 1:
        return
    if family is not None and not family.supports_sequence_parallel:
        raise InputError(
            f"gpus is {gpus}, but {family.name} runs on one GPU: several GPUs (sequence parallel) are for "
            f"{sequence_parallel_families()}. Set gpus to 1."
        )
    available = len(parallel_devices())
    if gpus > available:
        seen = "no CUDA GPU" if available == 0 else f"{available} CUDA GPU{'s' if available > 1 else ''}"
        hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
        if hidden is not None:
            seen += f" (CUDA_VISIBLE_DEVICES={hidden}, which ComfyUI's --cuda-device sets, hides the others)"
        raise InputError(f"gpus is {gpus}, but ComfyUI sees {seen}. Set gpus to {max(1, available)} or fewer.")
    heads = header_heads(shapes or {})
    if heads is not None and heads % gpus:
        fits = [str(n) for n in range(1, available + 1) if heads % n == 0]
        choices = fits[0] if len(fits) == 1 else f"{', '.join(fits[:-1])} or {fits[-1]}"
        raise InputError(
            f"gpus is {gpus}, but the model's {heads} attention heads cannot be split evenly over {gpus} GPUs. "
            f"Use {choices} GPUs."
        )


@dataclass(frozen=True)
class WorkerSettings:
    """Everything that decides what the workers load; equal settings share a running group."""

    family: ModelFamily
    model_path: str
    runtime: RuntimeOptions  # placed on each worker's GPU by the worker
    devices: tuple[str, ...]
    load_options: tuple[tuple[str, Any], ...] = ()

    def job(self) -> WorkerJob:
        return self.family.worker_job(self.model_path, self.runtime, **dict(self.load_options))


_running: tuple[WorkerSettings, WorkerGroup] | None = None


def worker_group(settings: WorkerSettings) -> WorkerGroup:
    """The running group if it runs ``settings`` and is alive; otherwise the running one is closed
    and a new one started (the workers load the DiT: minutes for a large one). ComfyUI's interrupt
    stops a start."""
    global _running
    if _running is not None and _running[0] == settings and _running[1].alive:
        return _running[1]
    stop_workers()
    log.info("LiveTalk: starting %s workers on %s", settings.family.name, ", ".join(settings.devices))
    group = WorkerGroup(settings.job(), settings.devices, label=settings.family.name,
                        poll=mm.throw_exception_if_processing_interrupted)
    _running = (settings, group)
    return group


def stop_workers(settings: WorkerSettings | None = None) -> None:
    """Close the running group (when ``settings`` is given: only if it runs them), freeing its GPUs."""
    global _running
    if _running is None or (settings is not None and _running[0] != settings):
        return
    group = _running[1]
    _running = None
    group.close()


atexit.register(stop_workers)


class WorkerDiT:
    """The engine of a LIVETALK_MODEL whose DiT runs in worker processes: what the nodes read of a
    loaded DiT (``config``, ``dtype``, ``weight_shapes``) and :meth:`generate`, which makes it a
    :class:`livetalk_core.family_base.RemoteSampler` (the family samples through it)."""

    def __init__(self, settings: WorkerSettings, info: WorkerModelInfo) -> None:
        self.settings = settings
        self.config, self.dtype, self.weight_shapes = info.config, info.dtype, info.weight_shapes

    def generate(self, *, seed: int, **inputs: Any) -> Iterator[torch.Tensor]:
        """The family's blocks (CPU) from the workers, started again if they stopped since the loader
        ran; ``inputs`` are the family's sampler inputs. ComfyUI's interrupt, checked while a block is
        awaited, or closing the iterator stops the workers and leaves them ready for the next run."""
        group = worker_group(self.settings)
        inputs = {name: on_cpu(value) for name, value in inputs.items()}
        return group.generate(seed=seed, poll=mm.throw_exception_if_processing_interrupted, **inputs)

    def stream(self, *, seed: int, **inputs: Any) -> BlockStream:
        """A live session's streaming request on the workers (started again if they stopped): the family
        sends each block's inputs as its audio arrives; ``inputs`` are what every block shares. Closing
        it (the session's Stop) stops the request and leaves the workers ready."""
        group = worker_group(self.settings)
        return group.stream(seed=seed, **{name: on_cpu(value) for name, value in inputs.items()})


def load_on_workers(family: ModelFamily, gpus: int, model_path: str, runtime: RuntimeOptions,
                    load_options: Mapping[str, Any]) -> Managed:
    """The loader's model output for ``gpus`` > 1: workers on the first ``gpus`` devices are started
    (or reused) now, and ComfyUI manages an empty stand-in whose unloading closes them.
    ``load_options``: the family's loader's other keyword arguments (base, ...)."""
    settings = WorkerSettings(family, model_path, runtime, tuple(parallel_devices()[:gpus]),
                              tuple(sorted(load_options.items())))
    group = worker_group(settings)
    model = Managed(WorkerDiT(settings, group.model_info), torch.nn.Module(), mm.get_torch_device(),
                    mm.unet_offload_device(), family=family)
    model.patcher.add_callback(CallbacksMP.ON_DETACH, functools.partial(_on_unload, settings))
    return model


def _on_unload(settings: WorkerSettings, patcher: Any, unpatch_all: bool) -> None:
    # ComfyUI detaches with unpatch_all=True when it unloads a model; with False when a patcher is
    # only garbage-collected or replaced by a clone, which must not stop workers others still use.
    if unpatch_all and _running is not None and _running[0] == settings:
        log.info("LiveTalk: ComfyUI unloaded the models: the %s workers were stopped (the next run starts them)",
                 settings.family.name)
        stop_workers(settings)
