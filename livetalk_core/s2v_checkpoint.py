"""The file layouts a RealVideo / Wan2.2-S2V DiT can come in, read into one bare-key state dict.

* RealVideo ``model.pt`` (``{"generator": {"model.<name>": ...}}``) or any single safetensors /
  pickle with bare or prefixed keys (Comfy-Org ``wan2.2_s2v_14B_bf16.safetensors``).
* Wan-AI/Wan2.2-S2V-14B diffusers shards: ``diffusion_pytorch_model-0000x-of-0000y.safetensors``
  named by ``diffusion_pytorch_model.safetensors.index.json`` (pass the index or its folder).
* Comfy-Org ``*_fp8_scaled.safetensors``: float8_e4m3fn weights, each with a ``scale_weight``
  (or ``weight_scale``) tensor; dequantised here to the compute dtype (``weight * scale``).

``model.pt`` may be **complete** (upstream loads it strictly as the whole DiT, ~33 GB in bf16) or a
**partial fine-tune** (a subset of the tensors, e.g. the ~2 GB figure quoted for the release): a
partial file is applied over a base checkpoint in any of the layouts above. Which one was found is
logged and returned as :class:`CheckpointInfo` (the loader stores it on the model).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import read_state_dict, strip_prefix
from .errors import CheckpointError

log = logging.getLogger(__name__)

SHARD_INDEX = "diffusion_pytorch_model.safetensors.index.json"
FP8_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
# Bookkeeping entries of Comfy's quantised files that are not model tensors.
FP8_EXTRA_SUFFIXES = (".scale_input", ".input_scale", ".comfy_quant")
FP8_MARKERS = ("scaled_fp8",)
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)

COMPLETE, PARTIAL = "complete", "partial fine-tune over a base checkpoint"


@dataclass(frozen=True)
class CheckpointInfo:
    """What :func:`read_s2v_checkpoint` found."""

    kind: str  # COMPLETE or PARTIAL
    path: str
    base: str | None  # the base checkpoint a partial file was applied over
    tensors_in_file: int  # tensors ``path`` itself provided
    fp8_scaled: bool  # whether any file held Comfy fp8-scaled weights

    def describe(self) -> str:
        text = f"{self.path}: {self.kind} ({self.tensors_in_file} tensors"
        text += f" over {self.base})" if self.base else ")"
        return text + (", fp8-scaled weights dequantised" if self.fp8_scaled else "")


def _shard_index(path: Path) -> Path | None:
    if path.is_dir():
        index = path / SHARD_INDEX
        if not index.is_file():
            raise CheckpointError(
                f"{path} is a folder without {SHARD_INDEX}: give the Wan2.2-S2V-14B folder that holds the "
                "diffusers shards and their index, or a single checkpoint file."
            )
        return index
    return path if path.name.endswith(".index.json") else None


def _read_shards(index: Path, what: str) -> dict[str, torch.Tensor]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index} is not a readable shard index with a 'weight_map' ({exc}).") from None
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        tensors = read_state_dict(index.parent / shard, what=f"{what} shard")
        state.update({k: tensors[k] for k, file in weight_map.items() if file == shard and k in tensors})
    missing = [k for k in weight_map if k not in state]
    if missing:
        raise CheckpointError(
            f"The shards next to {index} lack {len(missing)} tensors the index lists (e.g. {missing[:3]}): "
            "a shard is incomplete; download it again."
        )
    return state


def dequantize_fp8_scaled(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], bool]:
    """Comfy fp8-scaled tensors -> float32 ``weight.float() * scale``; other tensors unchanged.

    Returns the state dict without the scale / marker entries, and whether any fp8 weight was found.
    """
    scales = {k[: -len(s)]: v for k, v in state.items() for s in FP8_SCALE_SUFFIXES if k.endswith(s)}
    out: dict[str, torch.Tensor] = {}
    found = False
    for key, tensor in state.items():
        if key in FP8_MARKERS or key.endswith(FP8_SCALE_SUFFIXES + FP8_EXTRA_SUFFIXES):
            continue
        if tensor.dtype in FP8_DTYPES:
            found = True
            module = key.rsplit(".", 1)[0]
            scale = scales.get(module)
            if scale is None:
                raise CheckpointError(
                    f"{key} is stored in {tensor.dtype} without a {module}.scale_weight: this is not a Comfy "
                    "fp8_scaled file this loader knows. Use the bf16 file instead."
                )
            scale = scale.float()
            if scale.numel() > 1:  # per output channel
                scale = scale.reshape(-1, *([1] * (tensor.ndim - 1)))
            tensor = tensor.float() * scale
        out[key] = tensor
    return out, found


def read_dit_file(path: str | os.PathLike, prefixes: tuple[str, ...], what: str) -> tuple[dict[str, torch.Tensor], bool]:
    """One checkpoint in any supported layout -> bare-key state dict (fp8 dequantised to float32),
    and whether it was fp8-scaled."""
    path = Path(path)
    index = _shard_index(path)
    state = _read_shards(index, what) if index is not None else read_state_dict(path, what=what)
    return dequantize_fp8_scaled(strip_prefix(state, prefixes))


def _layout_pattern(key: str) -> str:
    return re.sub(r"\.\d+\.", ".#.", key)


def read_s2v_checkpoint(
    path: str | os.PathLike,
    base: str | os.PathLike | None,
    *,
    prefixes: tuple[str, ...],
    what: str,
    known_keys: frozenset[str],
    is_complete: callable,
) -> tuple[dict[str, torch.Tensor], CheckpointInfo]:
    """Read ``path`` (complete, or partial over ``base``) into one bare-key state dict.

    ``known_keys``: key names of the S2V layout (any depth: numbers are ignored) to recognise a
    partial file; ``is_complete(state)`` says whether a state dict has every tensor of its model.
    """
    state, fp8 = read_dit_file(path, prefixes, what)
    if is_complete(state):
        if base is not None:
            log.info("%s is a complete %s; the base checkpoint %s is not needed and was not read", path, what, base)
        info = CheckpointInfo(COMPLETE, str(path), None, len(state), fp8)
        log.info("RealVideo DiT: %s", info.describe())
        return state, info
    patterns = {_layout_pattern(k) for k in known_keys}
    partial = bool(state) and all(_layout_pattern(k) in patterns for k in state)
    if base is None:
        if partial:
            raise CheckpointError(
                f"{path} holds {len(state)} tensors of the {what} but not the whole model: it is a partial "
                "fine-tune (or a truncated file). Give the base Wan2.2-S2V-14B checkpoint as well (the diffusers "
                f"folder with {SHARD_INDEX}, or Comfy-Org's wan2.2_s2v_14B_bf16 / _fp8_scaled .safetensors) and "
                "the file is applied over it."
            )
        return state, CheckpointInfo(COMPLETE, str(path), None, len(state), fp8)  # the caller's key check explains
    if not partial:
        strangers = sorted(k for k in state if _layout_pattern(k) not in patterns)
        raise CheckpointError(
            f"{path} is neither a complete {what} nor a partial fine-tune of one: {len(strangers)} of its keys "
            f"are not in the S2V layout (e.g. {', '.join(strangers[:4])})."
        )
    merged, base_fp8 = read_dit_file(base, prefixes, what + " base")
    merged.update(state)
    info = CheckpointInfo(PARTIAL, str(path), str(base), len(state), fp8 or base_fp8)
    log.info("RealVideo DiT: %s", info.describe())
    return merged, info
