"""What a model file holds, read from its header, and which files fit together.

Validation must be fast (it runs before every queued prompt), so files are inspected without
loading weights: a safetensors header lists every tensor name and shape. Torch pickles cannot be
inspected without unpickling them; for those the check is left to loading, which fails with the
same kind of message.

Model families: every DiT the pack can run is a :class:`ModelFamily`, recognised by a tensor only
that family has: LiveTalk 1.3B and RealVideo 14B (Wan2.2-S2V). Adding a family means adding one
entry to :data:`FAMILIES` and teaching the nodes its encoders and loop; the loader and the
validation pick it up from here.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ..livetalk_core.checkpoint import SAFETENSORS_SUFFIXES, guess_model_family, read_state_dict
from ..livetalk_core.errors import CheckpointError, InputError
from ..livetalk_core.livetalk_model import VIDEO_FRAMES_PER_LATENT, load_livetalk_dit
from ..livetalk_core.s2v_model import load_s2v_dit
from ..livetalk_core.vae import LATENT_CHANNELS, WHERE_TO_GET_IT
from ..livetalk_core.weights import WeightFile

Shapes = Mapping[str, tuple[int, ...]]

# umT5 output length the Wan DiTs were trained with: the prompt, then zero rows.
TEXT_CONTEXT_TOKENS = 512
WAV2VEC2_BASE_HINT = "wav2vec2-base-960h (facebook/wav2vec2-base-960h, as a folder or a single .safetensors)"
WAV2VEC2_LARGE_HINT = (
    "wav2vec2_large_english_fp16.safetensors (Comfy-Org/Wan_2.2_ComfyUI_Repackaged, split_files/audio_encoders) "
    "or the jonatasgrosman/wav2vec2-large-xlsr-53-english folder"
)
WAN21_REPACKAGED = "Comfy-Org/Wan_2.1_ComfyUI_repackaged"
WAN22_REPACKAGED = "Comfy-Org/Wan_2.2_ComfyUI_Repackaged"
# A safetensors header larger than this is not a real file (the 14B DiT's is a few MB).
_MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class Downloadable:
    """A file the loader can fetch: ``models/<folder>/<name>`` in ComfyUI (the name Comfy-Org's and
    the shipped workflows use, so a downloaded file serves native nodes too) and its source."""

    folder: str
    name: str
    source: WeightFile


DOWNLOADABLE: tuple[Downloadable, ...] = (
    Downloadable("livetalk", "LiveTalk-1.3B-V0.1.safetensors", WeightFile("GAIR/LiveTalk-1.3B-V0.1", "model.safetensors", "dit")),
    Downloadable("diffusion_models", "wan2.2_s2v_14B_bf16.safetensors",
                 WeightFile(WAN22_REPACKAGED, "split_files/diffusion_models/wan2.2_s2v_14B_bf16.safetensors", "dit")),
    Downloadable("diffusion_models", "wan2.2_s2v_14B_fp8_scaled.safetensors",
                 WeightFile(WAN22_REPACKAGED, "split_files/diffusion_models/wan2.2_s2v_14B_fp8_scaled.safetensors", "dit")),
    Downloadable("vae", "wan_2.1_vae.safetensors", WeightFile(WAN21_REPACKAGED, "split_files/vae/wan_2.1_vae.safetensors", "vae")),
    Downloadable("audio_encoders", "wav2vec2-base-960h.safetensors",
                 WeightFile("facebook/wav2vec2-base-960h", "model.safetensors", "wav2vec2")),
    Downloadable("audio_encoders", "wav2vec2_large_english_fp16.safetensors",
                 WeightFile(WAN22_REPACKAGED, "split_files/audio_encoders/wav2vec2_large_english_fp16.safetensors", "wav2vec2")),
)


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
    audio-feature width per video frame the DiT expects, read from its shapes; ``encoder_features``:
    the width a wav2vec2 of ``(layers, hidden)`` gives this family's audio pipeline.
    ``audio_encoder_dtype``: the dtype its audio encoder runs in (None: the loader's precision).
    ``fp8_and_partial_files``: whether ``load`` also takes ``base=`` (the checkpoint a partial
    fine-tune is applied over) and ``fp8_weights=``.
    """

    name: str
    marker: str
    audio_features: Callable[[Shapes], int]
    encoder_features: Callable[[int, int], int]
    audio_encoder_hint: str
    load: Callable[..., torch.nn.Module]
    audio_encoder_dtype: torch.dtype | None = None
    fp8_and_partial_files: bool = False

    def matches(self, shapes: Shapes) -> bool:
        return _find(shapes, self.marker) is not None


def _s2v_audio_features(shapes: Shapes) -> int:
    """The S2V DiT mixes ``weights.shape[1]`` hidden states, each as wide as its first conv's input."""
    layers = _find(shapes, "casual_audio_encoder.weights")[1]
    return layers * _find(shapes, "casual_audio_encoder.encoder.conv1_local.conv.weight")[1]


LIVETALK_13B = ModelFamily(
    name="LiveTalk 1.3B",
    marker="audio_proj.proj.weight",
    audio_features=lambda shapes: _find(shapes, "audio_proj.proj.weight")[1] // VIDEO_FRAMES_PER_LATENT,
    # cat(last hidden state, h0 ... hL)
    encoder_features=lambda layers, hidden: (layers + 2) * hidden,
    audio_encoder_hint=WAV2VEC2_BASE_HINT,
    load=load_livetalk_dit,
)
REALVIDEO_14B = ModelFamily(
    name="RealVideo 14B",
    marker="casual_audio_encoder.encoder.final_linear.weight",
    audio_features=_s2v_audio_features,
    # h0 ... hL, all of them
    encoder_features=lambda layers, hidden: (layers + 1) * hidden,
    audio_encoder_hint=WAV2VEC2_LARGE_HINT,
    load=load_s2v_dit,
    # Upstream runs wav2vec2 in float32 whatever the DiT's precision.
    audio_encoder_dtype=torch.float32,
    fp8_and_partial_files=True,
)
FAMILIES: tuple[ModelFamily, ...] = (LIVETALK_13B, REALVIDEO_14B)
SUPPORTED_MODELS = (
    "LiveTalk-1.3B-V0.1 model.safetensors (GAIR/LiveTalk-1.3B-V0.1), or for RealVideo 14B "
    "wan2.2_s2v_14B_bf16.safetensors / _fp8_scaled (Comfy-Org/Wan_2.2_ComfyUI_Repackaged) or RealVideo's model.pt"
)


def detect_family(shapes: Shapes, path: str | os.PathLike) -> ModelFamily:
    """The family whose marker tensor is in ``shapes``; a CheckpointError naming what the file is otherwise."""
    for family in FAMILIES:
        if family.matches(shapes):
            return family
    raise CheckpointError(
        f"{Path(path).name} is not a LiveTalk model: it looks like {guess_model_family(shapes)}. "
        f"Pick {SUPPORTED_MODELS} instead."
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
    projection = _find(shapes, "feature_projection.projection.weight")
    if projection is None:
        raise CheckpointError(
            f"{path.name} is not a wav2vec2 audio encoder: it looks like {guess_model_family(shapes)}. "
            f"Pick {WAV2VEC2_BASE_HINT} for LiveTalk 1.3B, or {WAV2VEC2_LARGE_HINT} for RealVideo 14B."
        )
    layers = {key.split("encoder.layers.")[1].split(".")[0] for key in shapes if "encoder.layers." in key}
    return EncoderSize(len(layers), projection[0])


def check_audio_encoder_fits(family: ModelFamily, dit_shapes: Shapes, encoder: EncoderSize, encoder_name: str) -> None:
    """Raise an InputError when the encoder's features are not what the DiT was trained on."""
    expected = family.audio_features(dit_shapes)
    given = family.encoder_features(encoder.layers, encoder.hidden)
    if given != expected:
        raise InputError(
            f"The audio encoder {encoder_name} gives {given} features per frame ({encoder.layers} layers of "
            f"width {encoder.hidden}), but the {family.name} model expects {expected}. Pick "
            f"{family.audio_encoder_hint} instead."
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
