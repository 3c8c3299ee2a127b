"""What a model file holds, read from its header, and which files fit together.

Validation must be fast (it runs before every queued prompt), so files are inspected without
loading weights: a safetensors header lists every tensor name and shape. Torch pickles cannot be
inspected without unpickling them; for those the check is left to loading, which fails with the
same kind of message.

Model families: every DiT the pack can run is a :class:`ModelFamily`, recognised by a tensor only
that family has. Adding a family (e.g. RealVideo 14B) means adding one entry to :data:`FAMILIES`
and teaching the sampler its loop; the loader and the validation pick it up from here.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ..livetalk_core.checkpoint import SAFETENSORS_SUFFIXES, guess_model_family
from ..livetalk_core.errors import CheckpointError, InputError
from ..livetalk_core.livetalk_model import VIDEO_FRAMES_PER_LATENT, load_livetalk_dit
from ..livetalk_core.vae import LATENT_CHANNELS, WHERE_TO_GET_IT

Shapes = Mapping[str, tuple[int, ...]]

# umT5 output length the Wan DiTs were trained with: the prompt, then zero rows.
TEXT_CONTEXT_TOKENS = 512
WAV2VEC2_BASE_HINT = "wav2vec2-base-960h (facebook/wav2vec2-base-960h, as a folder or a single .safetensors)"
# A safetensors header larger than this is not a real file (the 14B DiT's is a few MB).
_MAX_HEADER_BYTES = 100 * 1024 * 1024


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


def _find(shapes: Shapes, suffix: str) -> tuple[int, ...] | None:
    """Shape of the tensor named ``suffix`` under any prefix (``model.``, ``wav2vec2.``, ...)."""
    for key, shape in shapes.items():
        if key == suffix or key.endswith("." + suffix):
            return shape
    return None


@dataclass(frozen=True)
class ModelFamily:
    """A DiT the pack can run.

    ``marker``: a tensor only this family's checkpoints contain. ``audio_features``: the
    audio-feature width per video frame the DiT expects, read from its shapes.
    """

    name: str
    marker: str
    audio_features: Callable[[Shapes], int]
    audio_encoder_hint: str
    load: Callable[[str, torch.dtype, torch.device], torch.nn.Module]

    def matches(self, shapes: Shapes) -> bool:
        return _find(shapes, self.marker) is not None


LIVETALK_13B = ModelFamily(
    name="LiveTalk 1.3B",
    marker="audio_proj.proj.weight",
    audio_features=lambda shapes: _find(shapes, "audio_proj.proj.weight")[1] // VIDEO_FRAMES_PER_LATENT,
    audio_encoder_hint=WAV2VEC2_BASE_HINT,
    load=load_livetalk_dit,
)
FAMILIES: tuple[ModelFamily, ...] = (LIVETALK_13B,)
SUPPORTED_MODELS = "LiveTalk-1.3B-V0.1 model.safetensors (GAIR/LiveTalk-1.3B-V0.1)"


def detect_family(shapes: Shapes, path: str | os.PathLike) -> ModelFamily:
    """The family whose marker tensor is in ``shapes``; a CheckpointError naming what the file is otherwise."""
    for family in FAMILIES:
        if family.matches(shapes):
            return family
    raise CheckpointError(
        f"{Path(path).name} is not a LiveTalk model: it looks like {guess_model_family(shapes)}. "
        f"Pick {SUPPORTED_MODELS} instead."
    )


def audio_encoder_features(path: str | os.PathLike) -> int | None:
    """Features per video frame the wav2vec2 encoder at ``path`` gives, ``(layers + 2) * hidden``.

    ``path`` is a Hugging Face folder (read from its config.json) or a weights file (read from its
    header). None when that cannot be told without loading.
    """
    path = Path(path)
    if path.is_dir():
        try:
            config = json.loads((path / "config.json").read_text())
            return (int(config["num_hidden_layers"]) + 2) * int(config["hidden_size"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
    shapes = tensor_shapes(path)
    if shapes is None:
        return None
    projection = _find(shapes, "feature_projection.projection.weight")
    if projection is None:
        raise CheckpointError(
            f"{path.name} is not a wav2vec2 audio encoder: it looks like {guess_model_family(shapes)}. "
            f"Pick {WAV2VEC2_BASE_HINT}."
        )
    layers = {key.split("encoder.layers.")[1].split(".")[0] for key in shapes if "encoder.layers." in key}
    return (len(layers) + 2) * projection[0]


def check_audio_encoder_fits(family: ModelFamily, dit_shapes: Shapes, encoder_features: int, encoder_name: str) -> None:
    """Raise an InputError when the encoder's features are not what the DiT was trained on."""
    expected = family.audio_features(dit_shapes)
    if encoder_features != expected:
        raise InputError(
            f"The audio encoder {encoder_name} gives {encoder_features} features per frame, but the "
            f"{family.name} model expects {expected}. Pick {family.audio_encoder_hint} instead."
        )


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


def text_context(conditioning: list, text_dim: int, tokens: int = TEXT_CONTEXT_TOKENS) -> torch.Tensor:
    """ComfyUI CONDITIONING -> the DiT's text context ``[1, tokens, text_dim]`` float32.

    ``conditioning[0][0]`` is the umT5 output ``[1, L, text_dim]``. Rows past ``L`` are zeros and
    the DiT attends to all ``tokens`` rows, as upstream zeroes the rows past the prompt length.
    """
    try:
        cond = conditioning[0][0]
    except (TypeError, IndexError, KeyError):
        raise InputError("The conditioning input is empty. Connect CLIPTextEncode (with CLIPLoader type 'wan').") from None
    if not isinstance(cond, torch.Tensor) or cond.ndim != 3:
        raise InputError("The conditioning is not a text encoding [batch, tokens, width]. Use CLIPTextEncode.")
    if cond.shape[-1] != text_dim:
        raise InputError(
            f"The conditioning has width {cond.shape[-1]}, but the model expects {text_dim} (umT5-XXL). "
            "Load umt5_xxl_fp16.safetensors (or the fp8 one) with CLIPLoader, type 'wan'."
        )
    context = cond[:1, :tokens].float()
    return torch.nn.functional.pad(context, (0, 0, 0, tokens - context.shape[1]))
