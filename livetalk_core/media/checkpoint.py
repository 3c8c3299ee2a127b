"""Reading state dicts from disk and checking their keys.

Every loader in the pack goes through :func:`read_state_dict` (safetensors or a torch pickle read
with ``weights_only=True``, memory-mapped where the format allows) and :func:`check_keys`, so that
a wrong, truncated or unsafe file always fails the same way: one :class:`CheckpointError` that names
the file, what it looks like, and what is missing or unexpected.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import struct
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from ..errors import CheckpointError

PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
# A safetensors header larger than this is not a real file (the 14B DiT's is a few MB).
_MAX_HEADER_BYTES = 100 * 1024 * 1024


def read_state_dict(path: str | os.PathLike, *, what: str = "model") -> dict[str, torch.Tensor]:
    """Load a flat ``{name: tensor}`` dict from a safetensors file or a torch pickle.

    Pickles are opened with ``weights_only=True`` (a checkpoint can never run code) and ``mmap=True``
    when they are zip archives, so large files are not copied into RAM. A pickle whose top level is
    ``{"generator": {...}}`` or ``{"state_dict": {...}}`` is unwrapped one level.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"The {what} file {path} does not exist. Check the path or file name.")
    if path.stat().st_size == 0:
        raise CheckpointError(f"The {what} file {path} is empty (0 bytes). Download it again.")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return _read_safetensors(path, what)
    if suffix in PICKLE_SUFFIXES:
        return _read_pickle(path, what)
    raise CheckpointError(
        f"The {what} file {path} has an unknown extension {suffix!r}: expected one of "
        f"{', '.join(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)}."
    )


def _read_safetensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"The {what} file {path} is not a readable safetensors file ({exc}). It is probably "
            "truncated or corrupt: download it again."
        ) from None


def _read_pickle(path: Path, what: str) -> dict[str, torch.Tensor]:
    mmap = zipfile.is_zipfile(path)
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"This pack refuses the {what} file {path}: "
            f"it holds Python objects other than tensors{_unsafe_object(exc)}, "
            "and loading those could run code stored in the file. Use a .safetensors copy of the weights, "
            "or the original release file."
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile) as exc:
        raise CheckpointError(
            f"The {what} file {path} could not be read ({str(exc).splitlines()[0]}). It is probably "
            "truncated or corrupt: download it again."
        ) from None
    for wrapper in ("generator", "state_dict", "model_state_dict"):
        if isinstance(obj, Mapping) and wrapper in obj and isinstance(obj[wrapper], Mapping):
            obj = obj[wrapper]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(
            f"The {what} file {path} does not hold a state dict (a mapping of names to tensors)."
        )
    return dict(obj)


def _unsafe_object(refusal: pickle.UnpicklingError) -> str:
    """`` (such as module.Name)`` for the first object torch's safe loader refused, if it names one.

    Only the name is kept: torch's own message goes on to suggest loading the file unsafely."""
    found = re.search(r"GLOBAL ([\w.]+)", str(refusal))
    return f" (such as {found.group(1)})" if found else ""


def strip_prefix(state_dict: Mapping[str, torch.Tensor], prefixes: Iterable[str]) -> dict[str, torch.Tensor]:
    """Remove the first of ``prefixes`` that every key starts with (e.g. ``model.``)."""
    for prefix in prefixes:
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            return {k[len(prefix):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def guess_model_family(keys: Iterable[str]) -> str:
    """A human name for what a state dict looks like, for error messages."""
    keys = set(keys)
    has = lambda *parts: any(all(p in k for p in parts) for k in keys)  # noqa: E731
    if has("audio_proj.proj") or has("audio_cond_projs"):
        return "a LiveTalk / OmniAvatar 1.3B DiT"
    if has("casual_audio_encoder") or has("audio_injector"):
        return "a Wan2.2-S2V / RealVideo 14B DiT"
    if has("blocks.", "self_attn.q") and has("patch_embedding"):
        return "a Wan video DiT without an audio branch (e.g. Wan2.1 T2V/I2V)"
    if has("decoder.middle") or has("encoder.downsamples"):
        return "a Wan VAE"
    if has("feature_extractor.conv_layers") or has("wav2vec2."):
        return "a wav2vec2 audio encoder"
    if has("token_embedding") or has("shared.weight") or has("encoder.block."):
        return "a T5 text encoder"
    if has("model.diffusion_model.input_blocks") or has("input_blocks.") or has("conditioner.embedders"):
        return "a Stable Diffusion / SDXL checkpoint"
    if has("double_blocks.") or has("single_blocks."):
        return "a Flux / Hunyuan-style DiT"
    return "an unrecognised model"


def check_keys(
    found: Iterable[str],
    expected: Iterable[str],
    *,
    path: str | os.PathLike,
    model_name: str,
    max_listed: int = 8,
) -> None:
    """Raise one clear :class:`CheckpointError` unless ``found`` equals ``expected``."""
    found, expected = set(found), set(expected)
    missing = sorted(expected - found)
    unexpected = sorted(found - expected)
    if not missing and not unexpected:
        return

    def listing(names: list[str]) -> str:
        shown = ", ".join(names[:max_listed])
        return shown + (f" and {len(names) - max_listed} more" if len(names) > max_listed else "")

    parts = [f"{path} is not a {model_name} checkpoint: it looks like {guess_model_family(found)}."]
    if missing:
        parts.append(f"Missing {len(missing)} keys: {listing(missing)}.")
    if unexpected:
        parts.append(f"Unexpected {len(unexpected)} keys: {listing(unexpected)}.")
    parts.append(f"Pick the {model_name} file instead.")
    raise CheckpointError(" ".join(parts))


def check_shapes(
    state_dict: Mapping[str, torch.Tensor],
    expected: Mapping[str, tuple[int, ...]],
    *,
    path: str | os.PathLike,
    model_name: str,
) -> None:
    """Raise a :class:`CheckpointError` naming the first tensors whose shapes differ."""
    wrong = [
        f"{k} {tuple(state_dict[k].shape)} (expected {tuple(shape)})"
        for k, shape in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(shape)
    ]
    if wrong:
        raise CheckpointError(
            f"{path} has tensors of unexpected shape for a {model_name}: {'; '.join(wrong[:5])}"
            + (f" and {len(wrong) - 5} more" if len(wrong) > 5 else "")
            + ". The file is from a different model variant or is corrupt."
        )


def check_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    expected: Mapping[str, tuple[int, ...]] | Mapping[str, torch.Tensor],
    *,
    path: str | os.PathLike,
    model_name: str,
) -> None:
    """:func:`check_keys` then :func:`check_shapes`; ``expected`` maps names to shapes or to tensors."""
    shapes = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else tuple(v) for k, v in expected.items()}
    check_keys(state_dict.keys(), shapes.keys(), path=path, model_name=model_name)
    check_shapes(state_dict, shapes, path=path, model_name=model_name)


PRECISIONS = ("bf16", "fp16", "fp32")
DTYPES = {
    "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
}


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"bf16"``/``"fp16"``/``"fp32"`` (or a torch dtype) to a torch dtype."""
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"Unknown precision {name!r}: use one of {', '.join(DTYPES)}.") from None


def tensor_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]] | None:
    """``{name: shape}`` from a safetensors header, or None for other formats (pickles).

    Raises:
        CheckpointError: the file claims to be safetensors but its header is unreadable.
    """
    path = Path(path)
    if path.suffix.lower() not in SAFETENSORS_SUFFIXES:
        return None
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > _MAX_HEADER_BYTES:
                raise ValueError(f"header of {size} bytes")
            header = json.loads(f.read(size))
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc}). Download it again.") from None
    return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}


def checkpoint_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` of any checkpoint: the safetensors header, or the pickle's tensors
    (memory-mapped, so even the 14B ``model.pt`` is not read into RAM)."""
    shapes = tensor_shapes(path)
    if shapes is None:
        shapes = {k: tuple(v.shape) for k, v in read_state_dict(path, what="model").items()}
    return shapes


# Comfy's fp8_scaled files: fp8 weights, each with a float per-tensor scale. Legacy files name it
# "<layer>.scale_weight" and carry a "scaled_fp8" marker; newer ones "<layer>.weight_scale" with a
# "<layer>.comfy_quant" JSON record of the format. Input scales only serve fp8 matmuls.
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
FP8_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
_FP8_INPUT_SCALE_SUFFIXES = (".scale_input", ".input_scale")
_FP8_FORMAT_SUFFIX = ".comfy_quant"
_FP8_MARKER = "scaled_fp8"
_FP8_FORMATS = ("float8_e4m3fn", "float8_e5m2")


def split_fp8_scales(
    state: Mapping[str, torch.Tensor], path: str | os.PathLike = "<state dict>", *, unscaled_fp8: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Separate a Comfy fp8_scaled state dict's weights from their scales.

    Returns the model tensors as stored (scales, input scales, markers and format records removed)
    and ``{weight key: float32 scale}`` for every weight that has a scale, so a caller can form
    ``weight * scale`` one tensor at a time. An fp8 tensor without a scale is refused unless
    ``unscaled_fp8`` (the caller then upcasts it); a format record other than fp8 is refused.
    Meta tensors (shapes from a header) skip the format check.
    """
    tensors: dict[str, torch.Tensor] = {}
    scale_of: dict[str, tuple[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        if key.endswith(_FP8_FORMAT_SUFFIX):
            _check_fp8_format(key, tensor, path)
        elif key.endswith(FP8_SCALE_SUFFIXES):
            scale_of[key.rsplit(".", 1)[0] + ".weight"] = (key, tensor)
        elif key != _FP8_MARKER and not key.endswith(_FP8_INPUT_SCALE_SUFFIXES):
            tensors[key] = tensor
    scales = {}
    for weight, (key, scale) in scale_of.items():
        if weight not in tensors:
            raise CheckpointError(
                f"{path} has a quantisation scale {key} {tuple(scale.shape)} but no {weight} to scale: it is not "
                "a Comfy fp8_scaled file this pack reads. Use the bf16 / fp16 file instead."
            )
        scales[weight] = scale.float()
    for key, tensor in tensors.items():
        if tensor.dtype in FP8_DTYPES and key not in scales and not unscaled_fp8:
            raise CheckpointError(
                f"{key} is stored in {tensor.dtype} without a {key.rsplit('.', 1)[0]}.scale_weight: this is not a "
                "Comfy fp8_scaled file this loader knows. Use the bf16 file instead."
            )
    return tensors, scales


def _check_fp8_format(key: str, record: torch.Tensor, path: str | os.PathLike) -> None:
    """A ``comfy_quant`` record (UTF-8 JSON bytes) must name an fp8 format this pack dequantises."""
    if record.is_meta:
        return
    try:
        fmt = json.loads(bytes(record.to(torch.uint8).tolist()).decode("utf-8")).get("format")
    except (ValueError, AttributeError):
        fmt = None
    if fmt not in _FP8_FORMATS:
        raise CheckpointError(
            f"{path} stores {key.removesuffix(_FP8_FORMAT_SUFFIX)} in the quantisation format {fmt!r}, which "
            "this pack cannot dequantise. Use the bf16 / fp16 file, or a per-tensor scaled fp8 one, instead."
        )
