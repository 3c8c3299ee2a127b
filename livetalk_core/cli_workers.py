"""The command line's ``--gpus N``: the DiT runs in N worker processes, one per GPU (sequence
parallel, the same video as one GPU), kept loaded while the command runs; the VAE and the audio
encoder stay in the command's process. It is how the ``live`` command runs a family on several GPUs
(a live session sends each block's audio to the workers as it arrives); the offline command takes it
too, next to ``torchrun``. With ``--smoke`` the workers are CPU processes (gloo).
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
from pathlib import Path
from typing import Any

import torch

from .errors import InputError
from .family_base import ModelFamily
from .options import RuntimeOptions

log = logging.getLogger("livetalk")
RUNTIME_LOAD_OPTIONS = ("fp8_weights", "fp8_matmul")  # load options a worker job reads from its RuntimeOptions


def check_gpus(args: argparse.Namespace, family: ModelFamily, heads: int | None, torchrun_ranks: int) -> None:
    """Refuse a ``--gpus`` the run cannot use, before anything loads. ``heads``: the DiT file's
    attention heads (None: not known, e.g. ``--smoke``); ``torchrun_ranks``: processes torchrun started."""
    gpus = args.gpus
    if gpus < 1:
        raise InputError(f"--gpus {gpus}: give 1 or more GPUs.")
    if gpus == 1:
        return
    if torchrun_ranks > 1:
        raise InputError("--gpus starts its own worker processes, one per GPU; run the command without torchrun "
                         "(or under torchrun without --gpus).")
    if not family.supports_sequence_parallel:
        from .families import sequence_parallel_families

        raise InputError(f"{family.name} runs on one GPU; --gpus {gpus} is for {sequence_parallel_families()}. "
                         "Leave --gpus out.")
    if heads is not None and heads % gpus:
        fits = [str(n) for n in range(2, heads + 1) if heads % n == 0][:4]
        advice = f"use --gpus {' or '.join(fits)}" if fits else "leave --gpus out"
        raise InputError(f"--gpus {gpus}, but the model's {heads} attention head{'s' if heads > 1 else ''} cannot be "
                         f"split evenly over {gpus} GPUs: {advice}.")
    available = 0 if args.smoke else torch.cuda.device_count()
    if not args.smoke and gpus > available:
        seen = "no CUDA GPU" if available == 0 else f"{available} CUDA GPU{'s' if available > 1 else ''}"
        hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
        if hidden is not None:
            seen += f" (CUDA_VISIBLE_DEVICES={hidden})"
        raise InputError(f"--gpus {gpus}, but this machine has {seen}. Give --gpus {max(1, available)} or fewer.")


def worker_devices(gpus: int, smoke: bool) -> list[str]:
    """One device per worker: the first ``gpus`` CUDA GPUs, or CPU processes for ``--smoke``."""
    return ["cpu"] * gpus if smoke else [f"cuda:{index}" for index in range(gpus)]


def dit_on_workers(family: ModelFamily, path: Path, runtime: RuntimeOptions, load_options: dict[str, Any],
                   devices: list[str]):
    """Start the workers, each loading the DiT at ``path`` (``runtime`` placed on its device, the
    family's ``load_options``), and return the DiT they hold (a :class:`~.parallel.remote.GroupSampler`).
    The workers stop when the command exits."""
    from .parallel.remote import GroupSampler
    from .parallel.workers import WorkerGroup

    # Each worker's loader takes the fp8 weight forms from ``runtime`` (placed on its device).
    load_options = {name: value for name, value in load_options.items() if name not in RUNTIME_LOAD_OPTIONS}
    log.info("starting %d %s workers on %s (they load the DiT)", len(devices), family.name, ", ".join(devices))
    group = WorkerGroup(family.worker_job(path, runtime, **load_options), devices, label=family.name)
    atexit.register(group.close)
    return GroupSampler(group)
