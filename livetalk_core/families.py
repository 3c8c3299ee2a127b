"""The registry of model families: the built-in ones (LiveTalk 1.3B, RealVideo 14B) and any a test
or a third party adds with :func:`register_family`; :func:`detect_family` tells which one a
checkpoint is. The interface is :class:`~.family_base.ModelFamily`."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import CheckpointError
from .family_base import ModelFamily, RemoteSampler, Shapes, find_tensor, text_context
from .livetalk.family import LIVETALK_13B
from .media.checkpoint import guess_model_family
from .realvideo.family import REALVIDEO_14B, RealVideoAudio

__all__ = [
    "FAMILIES", "LIVETALK_13B", "REALVIDEO_14B", "ModelFamily", "RealVideoAudio",
    "RemoteSampler", "Shapes", "audio_encoder_hints", "can_be_base", "default_family", "detect_family", "find_tensor",
    "named_as_base", "register_family", "sequence_parallel_families", "text_context", "unregister_family",
]

FAMILIES: list[ModelFamily] = []


def register_family(family: ModelFamily) -> ModelFamily:
    """Add ``family`` to :data:`FAMILIES` (once), so :func:`detect_family` and everything that asks
    it find it. Returns it."""
    if family not in FAMILIES:
        FAMILIES.append(family)
    return family


def unregister_family(family: ModelFamily) -> None:
    """Remove a family :func:`register_family` added (tests)."""
    if family in FAMILIES:
        FAMILIES.remove(family)


SUPPORTED_MODELS = (
    "LiveTalk-1.3B-V0.1 model.safetensors (GAIR/LiveTalk-1.3B-V0.1), or for RealVideo 14B "
    "wan2.2_s2v_14B_bf16.safetensors / _fp8_scaled (Comfy-Org/Wan_2.2_ComfyUI_Repackaged) or RealVideo's model.pt"
)


def detect_family(shapes: Shapes, path: str | os.PathLike) -> ModelFamily:
    """The registered family whose checkpoints ``shapes`` are; a CheckpointError naming what the file is otherwise."""
    for family in FAMILIES:
        if family.matches(shapes):
            return family
    raise CheckpointError(
        f"{Path(path).name} is not a LiveTalk model: it looks like {guess_model_family(shapes)}. "
        f"Pick {SUPPORTED_MODELS} instead."
    )


def can_be_base(shapes: Shapes) -> bool:
    """Whether a checkpoint of ``shapes`` can be the base of some family's partial fine-tune."""
    return any(family.can_be_base(shapes) for family in FAMILIES)


def named_as_base(name: str) -> bool:
    """Whether the file name ``name`` marks a checkpoint some family's partial fine-tune is applied
    over (for files whose tensors cannot be listed cheaply)."""
    return any(f.base_name_mark is not None and f.base_name_mark in name.lower() for f in FAMILIES)


def audio_encoder_hints() -> str:
    """Which wav2vec2 each family needs, for messages: "<hint> for <family>, or ..."."""
    return ", or ".join(f"{family.audio_encoder_hint} for {family.name}" for family in FAMILIES)


def default_family() -> ModelFamily:
    """The family the nodes' widgets take their defaults from: the first registered (LiveTalk 1.3B)."""
    return FAMILIES[0]


def sequence_parallel_families() -> str:
    """The names of the families that run on several GPUs, for messages."""
    return " or ".join(f.name for f in FAMILIES if f.supports_sequence_parallel)


register_family(LIVETALK_13B)
register_family(REALVIDEO_14B)
