"""What a model file holds, read from its header, and which files fit together.

Validation must be fast (it runs before every queued prompt), so files are inspected without
loading weights: a safetensors header lists every tensor name and shape. Torch pickles cannot be
inspected without unpickling them; for those the check is left to loading, which fails with the
same kind of message.

The model families themselves (which DiT a file is, and what each needs) are in
:mod:`livetalk_core.families`; the checks here ask the family.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..livetalk_core.errors import CheckpointError
from ..livetalk_core.families import audio_encoder_hints
from ..livetalk_core.family_base import ModelFamily, Shapes, find_tensor
from ..livetalk_core.media.checkpoint import checkpoint_shapes, guess_model_family, tensor_shapes  # noqa: F401
from ..livetalk_core.media.vae import LATENT_CHANNELS, WHERE_TO_GET_IT
from ..livetalk_core.media.weights import WeightFile

WAN21_REPACKAGED = "Comfy-Org/Wan_2.1_ComfyUI_repackaged"
WAN22_REPACKAGED = "Comfy-Org/Wan_2.2_ComfyUI_Repackaged"


@dataclass(frozen=True)
class Downloadable:
    """A file the loader can fetch: ``models/<folder>/<name>`` in ComfyUI (the name Comfy-Org's and
    the shipped workflows use, so a downloaded file serves native nodes too) and its source."""

    folder: str
    name: str
    source: WeightFile


def _repackaged(repo: str, folder: str, name: str, role: str) -> Downloadable:
    """A file of a Comfy-Org repackaged repository: ``split_files/<folder>/<name>`` there, and
    ``models/<folder>/<name>`` here."""
    return Downloadable(folder, name, WeightFile(repo, f"split_files/{folder}/{name}", role))


DOWNLOADABLE: tuple[Downloadable, ...] = (
    Downloadable("livetalk", "LiveTalk-1.3B-V0.1.safetensors",
                 WeightFile("GAIR/LiveTalk-1.3B-V0.1", "model.safetensors", "dit")),
    _repackaged(WAN22_REPACKAGED, "diffusion_models", "wan2.2_s2v_14B_bf16.safetensors", "dit"),
    _repackaged(WAN22_REPACKAGED, "diffusion_models", "wan2.2_s2v_14B_fp8_scaled.safetensors", "dit"),
    _repackaged(WAN21_REPACKAGED, "vae", "wan_2.1_vae.safetensors", "vae"),
    Downloadable("audio_encoders", "wav2vec2-base-960h.safetensors",
                 WeightFile("facebook/wav2vec2-base-960h", "model.safetensors", "wav2vec2")),
    _repackaged(WAN22_REPACKAGED, "audio_encoders", "wav2vec2_large_english_fp16.safetensors", "wav2vec2"),
)


@dataclass(frozen=True)
class EncoderSize:
    """A wav2vec2 encoder's transformer layers and hidden width."""

    layers: int
    hidden: int


def audio_encoder_size(path: str | os.PathLike) -> EncoderSize | None:
    """Layers and width of the wav2vec2 encoder at ``path``.

    ``path`` is a Hugging Face folder (read from its config.json) or a weights file (read from its
    header). None when that cannot be told without loading.
    """
    path = Path(path)
    if path.is_dir():
        try:
            config = json.loads((path / "config.json").read_text())
            return EncoderSize(int(config["num_hidden_layers"]), int(config["hidden_size"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None
    shapes = tensor_shapes(path)
    if shapes is None:
        return None
    projection = find_tensor(shapes, "feature_projection.projection.weight")
    if projection is None:
        raise CheckpointError(
            f"{path.name} is not a wav2vec2 audio encoder: it looks like {guess_model_family(shapes)}. "
            f"Pick {audio_encoder_hints()}."
        )
    layers = {key.split("encoder.layers.")[1].split(".")[0] for key in shapes if "encoder.layers." in key}
    return EncoderSize(len(layers), projection[0])


def check_audio_encoder_fits(family: ModelFamily, dit_shapes: Shapes, encoder: EncoderSize, encoder_name: str) -> None:
    """Raise an InputError when the encoder's features are not what the DiT was trained on
    (:meth:`~livetalk_core.family_base.ModelFamily.check_audio_encoder`, with the size read here)."""
    family.check_audio_encoder(dit_shapes, encoder.layers, encoder.hidden, encoder_name)


def check_vae_fits(shapes: Shapes, vae_name: str) -> None:
    """Raise a CheckpointError unless ``shapes`` are a Wan2.1 (16-channel) VAE's."""
    prefix = next((p for p in ("", "first_stage_model.", "vae.") if p + "conv2.weight" in shapes), None)
    if prefix is None or prefix + "decoder.middle.0.residual.0.gamma" not in shapes:
        raise CheckpointError(
            f"{vae_name} is not a Wan VAE: it looks like {guess_model_family(shapes)}. Pick {WHERE_TO_GET_IT}."
        )
    channels = shapes[prefix + "conv2.weight"][0]
    if channels != LATENT_CHANNELS:
        raise CheckpointError(
            f"{vae_name} is a VAE with {channels} latent channels (Wan2.2's has 48); LiveTalk needs the "
            f"{LATENT_CHANNELS}-channel Wan2.1 VAE: {WHERE_TO_GET_IT}."
        )
