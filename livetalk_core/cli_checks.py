"""Checks of the command line's arguments (every family), run before any model loads.

Each failure is an :class:`~.errors.InputError` whose message names the option, the value and what
to give instead; the CLI prints it and exits with status 2.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch

from .errors import InputError
from .media.image import MIN_SIDE, check_target_size


def parse_size(size: str, max_hw: int | None = None) -> tuple[int, int]:
    """``--size`` (``N`` or ``WxH``) or upstream's ``--max-hw`` -> ``(height, width)``, checked."""
    if max_hw is not None:
        side = 512 if max_hw == 720 else max_hw
        height = width = side
    else:
        parts = [part.strip() for part in size.lower().split("x")]
        if len(parts) > 2 or not all(part.isdigit() for part in parts):
            raise InputError(f"--size {size!r} is not a size: give N for a square or WxH, e.g. --size 512 or "
                             "--size 640x512.")
        width, height = int(parts[0]), int(parts[-1])
    check_target_size(height, width)
    return height, width


def check_duration(seconds: float | None) -> None:
    """``--duration``: None (the audio's length) or a finite number of seconds above zero."""
    if seconds is not None and not (math.isfinite(seconds) and seconds > 0):
        raise InputError(f"--duration {seconds} is not a length: give a number of seconds above 0, or leave it out "
                         "to make the video as long as the audio.")


def pick_device(name: str, option: str = "--device") -> torch.device:
    """``auto`` (a GPU if there is one, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``, checked against this machine."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise InputError(f"{option} {name!r} is not a device here: use auto, cpu, cuda or cuda:N.")
    if device.type == "cuda":
        _check_gpu(device, option)
    return device


def _check_gpu(device: torch.device, option: str) -> None:
    if not torch.cuda.is_available():
        build = "a CPU-only build of torch" if torch.version.cuda is None else "no CUDA GPU visible"
        raise InputError(f"{option} {device}: this machine has {build}. Use {option} cpu (slow), or install a "
                         "CUDA build of torch on a machine with an NVIDIA GPU.")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise InputError(f"{option} {device}: there are only {torch.cuda.device_count()} GPUs (cuda:0 to "
                         f"cuda:{torch.cuda.device_count() - 1}).")


def check_image_size(image: torch.Tensor, path: str) -> None:
    """The reference image must have at least ``MIN_SIDE`` pixels on each side."""
    height, width = image.shape[:2]
    if min(height, width) < MIN_SIDE:
        raise InputError(f"The image {path} is {width}x{height} pixels; give a face image at least {MIN_SIDE} pixels "
                         "on "
                         "each side (512 or more looks best).")


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file: the same path once resolved, a symlink to it, or a hard link."""
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return False


def check_output(output: Path, inputs: Mapping[str, Path | None], option: str = "--output") -> None:
    """The file a run writes must not be one of its inputs, must not be a folder, and its folder must be
    writable (missing folders are created). ``inputs`` maps each option to the file it names."""
    if output.is_dir():
        raise InputError(f"{option} {output} is a folder; give a file name, e.g. {option} {output / 'video.mp4'}.")
    for name, path in inputs.items():
        if path is not None and _same_file(output, Path(path)):
            raise InputError(f"{option} {output} is the same file as {name} {path}: writing there would destroy that "
                             "input. "
                             f"Give {option} another file name.")
    check_folder_writable(output.parent if str(output.parent) else Path("."), f"{option} {output}")


def check_folder_writable(folder: Path, what: str) -> None:
    """Create ``folder`` if needed and write a scratch file in it: the one test that holds for every
    reason a folder can refuse files (permissions, read-only disk, a file in the way)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise InputError(f"{what}: cannot write into the folder {folder} ({exc.strerror or exc}). Give a path in a "
                         "folder you can write to.") from None
