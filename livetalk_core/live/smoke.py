"""Tiny random models for a live session on the CPU (``live --smoke``, the tests): each family's own
tiny weights (:meth:`~..family_base.ModelFamily.smoke_weights`), loaded through the real loaders."""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError
from ..family_base import ModelFamily
from ..media.samples import SAMPLE_IMAGE

SMOKE_DTYPE = torch.float32
SMOKE_DEVICE = "cpu"


@dataclass
class SmokeModels:
    """A family's tiny models, its text contexts and the shipped portrait at its smoke size."""

    family: ModelFamily
    dit: Any
    vae: Any
    encoder: Any
    text: torch.Tensor
    idle_text: torch.Tensor | None
    reference: torch.Tensor
    width: int
    height: int


def family_named(name: str) -> ModelFamily:
    """The registered family whose ``--model`` word (its ``cli_name``) is ``name``."""
    from ..families import FAMILIES

    for family in FAMILIES:
        if family.cli_name == name:
            return family
    known = ", ".join(f.cli_name for f in FAMILIES)
    raise InputError(f"No model family is called {name!r}; pick one of {known}.")


def smoke_size(family: ModelFamily) -> tuple[int, int]:
    """``(width, height)`` from the family's ``smoke_size`` ("64" or "128x64")."""
    width, _, height = family.smoke_size.partition("x")
    return int(width), int(height or width)


def smoke_reference() -> torch.Tensor:
    """The shipped portrait (uint8 ``[H, W, 3]``), or a plain gradient where the assets are not installed."""
    portrait = SAMPLE_IMAGE
    if portrait.is_file():
        from ..media.image import load_image

        return load_image(str(portrait))
    ramp = torch.linspace(0, 255, 64).to(torch.uint8)
    rows, columns = ramp[:, None].expand(64, 64), ramp[None, :].expand(64, 64)
    return torch.stack([rows, columns, rows.flip(0)], dim=-1)


def smoke_models(name: str) -> SmokeModels:
    """Write the family's tiny weights to a temporary folder, load them (CPU, float32), delete the folder."""
    from safetensors.torch import load_file

    from ..media.vae import load_vae
    from ..media.wav2vec2 import load_audio_encoder

    family = family_named(name)
    with tempfile.TemporaryDirectory(prefix="livetalk-live-smoke-") as folder:
        tiny = family.smoke_weights(Path(folder))
        options = family.cli_load_options(tiny.dit, argparse.Namespace(dit_config=None))
        dit = family.load(tiny.dit, SMOKE_DTYPE, SMOKE_DEVICE, **options)
        vae = load_vae(tiny.vae, SMOKE_DTYPE, SMOKE_DEVICE)
        encoder = load_audio_encoder(tiny.wav2vec2, family.audio_encoder_dtype or SMOKE_DTYPE, SMOKE_DEVICE)
        contexts = load_file(str(tiny.context))
    width, height = smoke_size(family)
    return SmokeModels(family=family, dit=dit, vae=vae, encoder=encoder, text=contexts["context"],
                       idle_text=contexts.get("idle"), reference=smoke_reference(), width=width, height=height)
