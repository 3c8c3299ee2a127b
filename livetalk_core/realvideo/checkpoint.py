"""The file layouts a RealVideo / Wan2.2-S2V DiT can come in, read into one bare-key state dict.

* RealVideo ``model.pt`` (``{"generator": {"model.<name>": ...}}``) or any single safetensors /
  pickle with bare or prefixed keys (Comfy-Org ``wan2.2_s2v_14B_bf16.safetensors``).
* Wan-AI/Wan2.2-S2V-14B diffusers shards: ``diffusion_pytorch_model-0000x-of-0000y.safetensors``
  named by ``diffusion_pytorch_model.safetensors.index.json`` (pass the index or its folder).
* Comfy-Org ``*_fp8_scaled.safetensors``: float8_e4m3fn weights, each with a ``scale_weight``
  (or ``weight_scale``) tensor; dequantised tensor by tensor to the compute dtype
  (``weight * scale``), or kept in fp8 (:mod:`.fp8_linear`).

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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..family_base import COMPLETE, PARTIAL
from ..media.checkpoint import guess_model_family, read_state_dict, split_fp8_scales, strip_prefix

log = logging.getLogger(__name__)

SHARD_INDEX = "diffusion_pytorch_model.safetensors.index.json"



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
        return text + (", fp8-scaled weights" if self.fp8_scaled else "")


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


def read_dit_file(
    path: str | os.PathLike, prefixes: tuple[str, ...], what: str
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One checkpoint in any supported layout -> bare-key tensors and fp8 scales (:func:`split_fp8_scales`)."""
    path = Path(path)
    index = _shard_index(path)
    state = _read_shards(index, what) if index is not None else read_state_dict(path, what=what)
    return split_fp8_scales(strip_prefix(state, prefixes), path)


def _layout_pattern(key: str) -> str:
    return re.sub(r"\.\d+\.", ".#.", key)


def _in_layout(state: Mapping[str, torch.Tensor], known_keys: frozenset[str]) -> bool:
    patterns = {_layout_pattern(k) for k in known_keys}
    return bool(state) and all(_layout_pattern(k) in patterns for k in state)


def checkpoint_kind(
    state: Mapping[str, torch.Tensor],
    *,
    known_keys: frozenset[str],
    missing_keys: Callable[[Mapping[str, torch.Tensor]], list[str] | None],
) -> str | None:
    """COMPLETE; PARTIAL (every tensor in the S2V layout, some missing: a fine-tune to apply over a
    base, or a truncated file); or None (no S2V DiT). Arguments as for :func:`read_s2v_checkpoint`;
    only names and shapes are used, so ``state`` may hold meta tensors."""
    missing = missing_keys(state)
    if missing == []:
        return COMPLETE
    looks_s2v = missing is not None or guess_model_family(state) == guess_model_family(known_keys)
    return PARTIAL if _in_layout(state, known_keys) and looks_s2v else None


def read_s2v_checkpoint(
    path: str | os.PathLike,
    base: str | os.PathLike | None,
    *,
    prefixes: tuple[str, ...],
    what: str,
    known_keys: frozenset[str],
    missing_keys: Callable[[Mapping[str, torch.Tensor]], list[str] | None],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], CheckpointInfo]:
    """Read ``path`` (complete, or partial over ``base``) into one bare-key state dict.

    Returns the tensors, the fp8 scales of those stored in fp8 (:func:`split_fp8_scales`) and what
    was found. ``known_keys``: key names of the S2V layout (block and injector numbers are ignored) to recognise
    a partial file. ``missing_keys(state)``: the tensors ``state`` lacks for the model its shapes
    describe, or None when they do not describe one (too few tensors to tell).
    A file that is neither complete nor recognisably partial is returned as is, for the caller's
    strict key check to explain.
    """
    state, scales = read_dit_file(path, prefixes, what)
    missing = missing_keys(state)
    if missing == []:
        if base is not None:
            log.info("%s is a complete %s; the base checkpoint %s is not needed and was not read", path, what, base)
        info = CheckpointInfo(COMPLETE, str(path), None, len(state), bool(scales))
        log.info("RealVideo DiT: %s", info.describe())
        return state, scales, info
    if base is None:
        if checkpoint_kind(state, known_keys=known_keys, missing_keys=lambda _: missing) == PARTIAL:
            listed = "" if missing is None else f" Missing {len(missing)} keys: {', '.join(missing[:6])}."
            raise CheckpointError(
                f"{path} holds {len(state)} tensors of the {what} but not the whole model: it is a partial "
                f"fine-tune (or a truncated file).{listed} Give the base Wan2.2-S2V-14B checkpoint as well (the "
                f"diffusers folder with {SHARD_INDEX}, or Comfy-Org's wan2.2_s2v_14B_bf16 / _fp8_scaled "
                ".safetensors) and the file is applied over it."
            )
        return state, scales, CheckpointInfo(COMPLETE, str(path), None, len(state), bool(scales))
    if not _in_layout(state, known_keys):
        patterns = {_layout_pattern(k) for k in known_keys}
        strangers = sorted(k for k in state if _layout_pattern(k) not in patterns)
        raise CheckpointError(
            f"{path} is neither a complete {what} nor a partial fine-tune of one: {len(strangers)} of its keys "
            f"are not in the S2V layout (e.g. {', '.join(strangers[:4])})."
        )
    merged, merged_scales = read_dit_file(base, prefixes, what + " base")
    for key in state:  # a fine-tuned tensor replaces the base one, and its base scale with it
        merged_scales.pop(key, None)
    merged.update(state)
    merged_scales.update(scales)
    info = CheckpointInfo(PARTIAL, str(path), str(base), len(state), bool(merged_scales))
    log.info("RealVideo DiT: %s", info.describe())
    return merged, merged_scales, info
