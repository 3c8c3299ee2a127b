"""The wav2vec2 audio encoder: loading (a Hugging Face folder or one weights file, offline), a
hand-written forward, and LiveTalk's per-frame features.

Features follow upstream's ``Wav2VecModel.forward`` with transformers-4.x hidden-state semantics,
recomputed here by hand so that transformers 4.x and 5.x give the same numbers (5.x no longer returns
the per-layer states the way upstream reads them):

    waveform --(zero mean, unit variance)--> CNN feature extractor [1, C, T_cnn]
      --(linear interpolation, align_corners)--> [1, C, num_video_frames]
      --> feature projection --> + positional conv --> (LayerNorm, post-LN models) --> layers

``hidden_states`` returns ``h0`` (the encoder input) and the output of every layer, the last one after
the encoder's final LayerNorm in the stable-layer-norm (wav2vec2-large) variant. LiveTalk's feature
per video frame is ``cat(last_hidden_state, h0, ..., hL)``: ``(L + 2) * hidden`` channels.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import CheckpointError, InputError, MissingWeightsError
from ..wan.attention import attention
from .checkpoint import check_state_dict, guess_model_family, read_state_dict, strip_prefix
from .timing import SAMPLE_RATE

if TYPE_CHECKING:
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    from ..runtime.cuda_graphs import ForwardGraphs

NORMALIZE_EPS = 1e-7
# Heads of the HF checkpoint classes (CTC, pre-training); LiveTalk uses only the bare encoder.
_HEAD_PREFIXES = ("lm_head.", "quantizer.", "project_q.", "project_hid.")
_POS_CONV = "encoder.pos_conv_embed.conv."
# (weight_g, weight_v) names: transformers' legacy weight norm, and torch parametrizations (ComfyUI).
_WEIGHT_NORM_NAMES = (
    ("weight_g", "weight_v"),
    ("parametrizations.weight.original0", "parametrizations.weight.original1"),
)
# The only conv stack wav2vec2 checkpoints use; strides are not stored in the weights.
_STANDARD_CONV_KERNEL = (10, 3, 3, 3, 3, 2, 2)
_STANDARD_CONV_STRIDE = (5, 2, 2, 2, 2, 2, 2)
_HEAD_DIM = 64
_MODEL_NAME = "wav2vec2 audio encoder"


class AudioEncoder:
    """A loaded wav2vec2 encoder: transformers' ``Wav2Vec2Model`` (eval, no grad) plus whether its
    feature extractor normalises the waveform (``do_normalize``)."""

    def __init__(self, model: Wav2Vec2Model, *, do_normalize: bool, source: Path):
        self.model = model
        self.do_normalize = do_normalize
        self.source = source

    @property
    def config(self) -> Wav2Vec2Config:
        return self.model.config

    @property
    def dtype(self) -> torch.dtype:
        return self.model.feature_projection.projection.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.feature_projection.projection.weight.device

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def receptive_field(self) -> int:
        """Samples one CNN frame sees (400 for every released wav2vec2): the shortest usable input."""
        field = 1
        for kernel, stride in zip(reversed(self.config.conv_kernel), reversed(self.config.conv_stride)):
            field = (field - 1) * stride + kernel
        return field

    def to(self, device: str | torch.device) -> AudioEncoder:
        self.model.to(device)
        return self


def load_audio_encoder(
    path: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    *,
    do_normalize: bool | None = None,
) -> AudioEncoder:
    """Load a wav2vec2 encoder without touching the network.

    ``path`` is either a Hugging Face folder laid out like ``facebook/wav2vec2-base-960h``
    (``config.json``, ``preprocessor_config.json``, ``model.safetensors`` or ``pytorch_model.bin``;
    a ``Wav2Vec2ForCTC`` checkpoint is fine, its head is ignored) or one weights file such as those in
    ComfyUI's ``models/audio_encoders`` (keys with or without ``wav2vec2.``), whose config is
    inferred from the tensor shapes. ``do_normalize`` defaults to the folder's preprocessor config,
    else True (base-960h's setting, which LiveTalk was trained with).
    """
    path = Path(path)
    if path.is_dir():
        weights = _weights_in_folder(path)
        config_dict = _read_json(path / "config.json")
        preprocessor = _read_json(path / "preprocessor_config.json") or {}
    elif path.is_file():
        weights, config_dict, preprocessor = path, None, {}
    else:
        raise MissingWeightsError(
            f"The {_MODEL_NAME} {path} does not exist. Put facebook/wav2vec2-base-960h (folder or a single "
            ".safetensors) there, or pick the file in the loader."
        )
    state = canonical_state_dict(read_state_dict(weights, what=_MODEL_NAME), weights, dtype)
    if config_dict is not None:
        config = _config_from_dict(config_dict, path)
        hint = f" If these are the right weights, {path / 'config.json'} belongs to another wav2vec2 variant."
    else:
        config, hint = infer_config(state, weights), ""
    model = _build_model(config, state, weights, hint)
    if do_normalize is None:
        do_normalize = bool(preprocessor.get("do_normalize", True))
    return AudioEncoder(model.to(device), do_normalize=do_normalize, source=path)


def _weights_in_folder(folder: Path) -> Path:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    raise MissingWeightsError(
        f"The folder {folder} holds no wav2vec2 weights (model.safetensors or pytorch_model.bin). "
        "Download facebook/wav2vec2-base-960h into it."
    )


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}). Download it again.") from None


def canonical_state_dict(
    raw: dict[str, torch.Tensor], path: str | Path, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """``Wav2Vec2Model`` keys (no ``wav2vec2.`` prefix, heads dropped) cast to ``dtype``, with the
    weight-normed positional conv folded into one plain ``weight``.

    The fold happens after the cast, as upstream computes the weight from ``g`` and ``v`` held in
    the model dtype: ``w = g * v / ||v||`` with the norm over dims (0, 1), i.e. ``dim=2`` kept.
    """
    state = strip_prefix({k: v for k, v in raw.items() if not k.startswith(_HEAD_PREFIXES)}, ["wav2vec2."])
    # The masking embedding only serves training-time SpecAugment.
    state = {k: v.to(dtype) for k, v in state.items() if k != "masked_spec_embed"}
    for g_name, v_name in _WEIGHT_NORM_NAMES:
        if _POS_CONV + g_name in state and _POS_CONV + v_name in state:
            g, v = state.pop(_POS_CONV + g_name), state.pop(_POS_CONV + v_name)
            if g.ndim != 3 or g.shape[:2] != (1, 1) or g.shape[2] != v.shape[2]:
                raise CheckpointError(
                    f"{path}: the positional-conv weight norm has gain shape {tuple(g.shape)}; expected "
                    f"(1, 1, {v.shape[-1]}) (weight norm over dim 2). The file is not a wav2vec2 encoder."
                )
            # torch's fused weight-norm kernel, as the parametrization upstream runs on every forward.
            state[_POS_CONV + "weight"] = torch._weight_norm(v, g, 2)
    return state


def infer_config(state: dict[str, torch.Tensor], path: str | Path) -> Wav2Vec2Config:
    """A ``Wav2Vec2Config`` from the tensor shapes of a canonical state dict.

    hidden / intermediate sizes, layer count and the CNN widths and kernels are read from shapes;
    heads = hidden / 64 (every released wav2vec2); a LayerNorm on every conv layer marks the
    wav2vec2-large family, which also uses the stable (pre-LN) encoder; a bias on the convs sets
    ``conv_bias``.
    """
    from transformers import Wav2Vec2Config

    def need(key: str) -> torch.Tensor:
        if key not in state:
            raise CheckpointError(
                f"{path} is not a {_MODEL_NAME}: it looks like {guess_model_family(state)} and has no "
                f"{key}. Pick the wav2vec2 file (e.g. wav2vec2-base-960h) instead."
            )
        return state[key]

    hidden, conv_width = need("feature_projection.projection.weight").shape
    num_conv = sum(1 for k in state if k.startswith("feature_extractor.conv_layers.") and k.endswith(".conv.weight"))
    conv_weights = [need(f"feature_extractor.conv_layers.{i}.conv.weight") for i in range(num_conv)]
    kernels = tuple(int(w.shape[2]) for w in conv_weights)
    if kernels != _STANDARD_CONV_KERNEL:
        raise CheckpointError(
            f"{path}: the wav2vec2 feature extractor has kernels {kernels}, not the standard "
            f"{_STANDARD_CONV_KERNEL}; its strides cannot be inferred. Use the Hugging Face folder with "
            "its config.json instead."
        )
    if hidden % _HEAD_DIM:
        raise CheckpointError(
            f"{path}: hidden size {hidden} is not a multiple of {_HEAD_DIM}, so the number of attention "
            "heads cannot be inferred. Use the Hugging Face folder with its config.json instead."
        )
    num_layers = len({k.split(".")[2] for k in state if k.startswith("encoder.layers.")})
    layer_norm_convs = "feature_extractor.conv_layers.1.layer_norm.weight" in state
    pos_conv = need(_POS_CONV + "weight")
    return Wav2Vec2Config(
        hidden_size=int(hidden),
        num_hidden_layers=num_layers,
        num_attention_heads=int(hidden) // _HEAD_DIM,
        intermediate_size=int(need("encoder.layers.0.feed_forward.intermediate_dense.weight").shape[0]),
        conv_dim=[int(w.shape[0]) for w in conv_weights],
        conv_kernel=list(kernels),
        conv_stride=list(_STANDARD_CONV_STRIDE),
        conv_bias="feature_extractor.conv_layers.0.conv.bias" in state,
        feat_extract_norm="layer" if layer_norm_convs else "group",
        do_stable_layer_norm=layer_norm_convs,
        num_conv_pos_embeddings=int(pos_conv.shape[2]),
        num_conv_pos_embedding_groups=int(hidden) // int(pos_conv.shape[1]),
        feat_extract_activation="gelu",
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        mask_time_prob=0.0,
        mask_feature_prob=0.0,
    )


def _config_from_dict(config_dict: dict, path: Path) -> Wav2Vec2Config:
    from transformers import Wav2Vec2Config

    if config_dict.get("model_type", "wav2vec2") != "wav2vec2":
        raise CheckpointError(
            f"{path} holds a {config_dict.get('model_type')!r} model, not wav2vec2. "
            "Use facebook/wav2vec2-base-960h."
        )
    if config_dict.get("add_adapter") or config_dict.get("adapter_attn_dim"):
        raise CheckpointError(f"{path}: wav2vec2 models with adapters are not supported.")
    # Inference never masks; without masking the model has no masked_spec_embed to load.
    return Wav2Vec2Config.from_dict({**config_dict, "mask_time_prob": 0.0, "mask_feature_prob": 0.0})


def _build_model(config: Wav2Vec2Config, state: dict[str, torch.Tensor], path: Path, hint: str) -> Wav2Vec2Model:
    """Instantiate on the meta device (no random init, no download) and assign the checkpoint;
    ``hint`` is appended to a key or shape mismatch message."""
    from torch.nn.utils import parametrize
    from transformers import Wav2Vec2Model

    with torch.device("meta"):
        model = Wav2Vec2Model(config)
    conv = model.encoder.pos_conv_embed.conv
    if parametrize.is_parametrized(conv, "weight"):
        parametrize.remove_parametrizations(conv, "weight")
    expected = model.state_dict()
    try:
        check_state_dict(state, expected, path=path, model_name=_MODEL_NAME)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}{hint}") from None
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def normalize_waveform(waveform: torch.Tensor | np.ndarray) -> torch.Tensor:
    """``(x - mean) / sqrt(var + 1e-7)`` over the clip, in NumPy float32 like
    ``Wav2Vec2FeatureExtractor(do_normalize=True)`` (population variance). ``[N]`` -> ``[N]`` float32."""
    if isinstance(waveform, torch.Tensor):
        waveform = waveform.detach().to("cpu", torch.float32).numpy()
    x = np.asarray(waveform, dtype=np.float32)
    return torch.from_numpy((x - x.mean()) / np.sqrt(x.var() + NORMALIZE_EPS))


# Clips up to this length go through wav2vec2 in one pass, exactly as upstream (whose examples are
# 5-20 s). Longer clips are encoded in windows so memory and time grow linearly with the length.
WHOLE_CLIP_MAX_SECONDS = 60.0
WINDOW_SECONDS = 30.0
WINDOW_CONTEXT_SECONDS = 10.0
_CNN_CHUNK_FRAMES = 4096


@torch.no_grad()
def hidden_states(
    encoder: AudioEncoder,
    input_values: torch.Tensor,
    num_frames: int,
    *,
    whole_clip_max_seconds: float = WHOLE_CLIP_MAX_SECONDS,
    graphs: ForwardGraphs | None = None,
) -> list[torch.Tensor]:
    """wav2vec2 hidden states with the CNN features interpolated to ``num_frames``.

    Args:
        input_values: ``[1, N]`` (already normalised if the encoder expects it).
        num_frames: output length (LiveTalk: the number of video frames, ``4F - 3``).
        whole_clip_max_seconds: clips up to this length run in one pass (upstream's exact features);
            longer ones take :func:`windowed_hidden_states`.
        graphs: CUDA graphs of this encoder (:meth:`~..runtime.workspace.Workspace.module_graphs`): a
            one-pass clip replays from the graph of its length once captured (a live session's windows),
            the same kernels on the same shapes, so the same states.
    Returns:
        ``L + 1`` tensors ``[1, num_frames, hidden]`` in the encoder dtype: ``h0`` = encoder input
        (after the positional conv, and after the LayerNorm in post-LN models), ``h_i`` = output of
        layer ``i``; for stable-layer-norm models ``h_L`` is taken after the final LayerNorm.
    """
    if input_values.ndim != 2 or input_values.shape[0] != 1:
        raise InputError(f"Expected audio input values [1, N], got shape {tuple(input_values.shape)}.")
    if input_values.shape[1] < encoder.receptive_field:
        raise InputError(
            f"The audio clip is too short ({input_values.shape[1]} samples at 16 kHz); wav2vec2 needs at "
            f"least {encoder.receptive_field}."
        )
    if num_frames < 1:
        raise InputError(f"The number of audio feature frames must be positive, got {num_frames}.")
    if input_values.shape[1] > whole_clip_max_seconds * SAMPLE_RATE:
        return windowed_hidden_states(encoder, input_values, num_frames)
    values = input_values.to(encoder.device, encoder.dtype)
    if graphs is None:
        return _one_pass_states(encoder, values, num_frames)
    key = ("wav2vec2", values.shape[1], num_frames)
    stacked = graphs(key, lambda v: torch.stack(_one_pass_states(encoder, v, num_frames)), values)
    return list(stacked.unbind(0))


def _one_pass_states(encoder: AudioEncoder, values: torch.Tensor, num_frames: int) -> list[torch.Tensor]:
    """:func:`hidden_states` of a clip ``[1, N]`` on the encoder's device and in its dtype, in one pass."""
    h = values[:, None]
    for layer in encoder.model.feature_extractor.conv_layers:
        h = _cnn_layer(layer, h)
    cnn = h  # [1, C, T_cnn]
    return _transformer_states(encoder, F.interpolate(cnn, size=num_frames, mode="linear", align_corners=True))


def _transformer_states(encoder: AudioEncoder, cnn: torch.Tensor) -> list[torch.Tensor]:
    """Feature projection, positional conv and layers over CNN features ``[1, C, T]`` (already at the output rate)."""
    model, config = encoder.model, encoder.config
    h, _ = model.feature_projection(cnn.transpose(1, 2))  # [1, T, hidden]
    encoder_module = model.encoder
    h = h + positional_conv(encoder_module.pos_conv_embed, h)
    if not config.do_stable_layer_norm:
        h = encoder_module.layer_norm(h)
    states = []
    for layer in encoder_module.layers:
        states.append(h)
        h = _encoder_layer(layer, h, config.num_attention_heads, pre_norm=config.do_stable_layer_norm)
    if config.do_stable_layer_norm:
        h = encoder_module.layer_norm(h)
    states.append(h)
    return states


_POS_CONV_CHUNK_FRAMES = 256


def conv1d_as_matmul(conv: torch.nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    """An ungrouped, unpadded strided ``conv(x)`` ``[B, C, L] -> [B, C', L']`` as one matmul.

    cuDNN builds a new plan for every input length it has not seen (each new clip), host time spent
    again per clip in the feature extractor; cuBLAS needs none and is as fast here.
    """
    kernel, stride = conv.kernel_size[0], conv.stride[0]
    batch, channels, _ = x.shape
    cols = x.unfold(2, kernel, stride).transpose(1, 2).reshape(batch, -1, channels * kernel)  # [B, L', C*k]
    y = cols @ conv.weight.reshape(conv.out_channels, channels * kernel).t()
    if conv.bias is not None:
        y = y + conv.bias
    return y.transpose(1, 2)


def _cnn_layer(layer: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
    """One wav2vec2 feature-extractor layer (conv, then its GroupNorm / LayerNorm if any, then the activation)."""
    h = conv1d_as_matmul(layer.conv, h)
    norm = getattr(layer, "layer_norm", None)
    if isinstance(norm, torch.nn.GroupNorm):
        h = norm(h)
    elif isinstance(norm, torch.nn.LayerNorm):
        h = norm(h.transpose(1, 2)).transpose(1, 2)
    return layer.activation(h)


def positional_conv(embed: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
    """wav2vec2's positional embedding (grouped same-padded conv, then its activation): ``[1, T, C] -> [1, T, C]``.

    Computed as one batched matmul per group and time chunk instead of the convolution: cuDNN's
    128-tap grouped conv took most of the audio encoding time (docs/performance.md), the matmuls a
    small part of it. The chunks bound the unfolded copy for long clips.
    """
    conv = embed.conv
    kernel, groups, pad = conv.kernel_size[0], conv.groups, conv.padding[0]
    in_per_group, out_per_group = conv.in_channels // groups, conv.out_channels // groups
    weight = conv.weight.reshape(groups, out_per_group, in_per_group * kernel).transpose(1, 2)
    x = F.pad(h[0].transpose(0, 1), (pad, pad))  # [C, T + 2 pad]
    frames = h.shape[1]  # an even kernel gives one extra frame, which the same-padding drops
    out = []
    for t0 in range(0, frames, _POS_CONV_CHUNK_FRAMES):
        t1 = min(frames, t0 + _POS_CONV_CHUNK_FRAMES)
        cols = x[:, t0 : t1 + kernel - 1].unfold(1, kernel, 1)  # [C, t, kernel]
        cols = cols.reshape(groups, in_per_group, t1 - t0, kernel).transpose(1, 2).reshape(groups, t1 - t0, -1)
        out.append(torch.bmm(cols, weight))  # [groups, t, out_per_group]
    y = torch.cat(out, dim=1).transpose(0, 1).reshape(1, frames, conv.out_channels)
    return embed.activation(y + conv.bias)


def cnn_frames(encoder: AudioEncoder, num_samples: int) -> int:
    """Frames the wav2vec2 feature extractor gives for ``num_samples`` samples (50 per second)."""
    frames = num_samples
    for kernel, stride in zip(encoder.config.conv_kernel, encoder.config.conv_stride):
        frames = (frames - kernel) // stride + 1
    return frames


def _cnn_stride(encoder: AudioEncoder) -> int:
    return math.prod(encoder.config.conv_stride)


def chunked_cnn_features(encoder: AudioEncoder, input_values: torch.Tensor) -> torch.Tensor:
    """The CNN features of a long clip, ``[1, C, T_cnn]``, computed a few thousand frames at a time.

    Equal to the one-pass CNN: every conv is local, and the per-channel GroupNorm of the first layer
    (wav2vec2-base) is applied with statistics gathered over the whole clip in a first pass.
    """
    layers = encoder.model.feature_extractor.conv_layers
    first = layers[0]
    x = input_values.to(encoder.device, encoder.dtype)
    stride, field = _cnn_stride(encoder), encoder.receptive_field
    total = cnn_frames(encoder, x.shape[1])
    stats = None
    if isinstance(getattr(first, "layer_norm", None), torch.nn.GroupNorm):
        stats = _first_conv_statistics(first.conv, x)
    chunks = []
    for k0 in range(0, total, _CNN_CHUNK_FRAMES):
        k1 = min(total, k0 + _CNN_CHUNK_FRAMES)
        h = x[:, None, k0 * stride : (k1 - 1) * stride + field]
        for i, layer in enumerate(layers):
            if i == 0 and stats is not None:
                mean, inv_std = stats
                norm = first.layer_norm
                h = conv1d_as_matmul(first.conv, h)
                h = ((h.double() - mean) * inv_std).to(h.dtype) * norm.weight[:, None] + norm.bias[:, None]
                h = first.activation(h)
            else:
                h = _cnn_layer(layer, h)
        chunks.append(h)
    return torch.cat(chunks, dim=2)


def _first_conv_statistics(conv: torch.nn.Conv1d, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and 1/std (GroupNorm's biased variance + eps) of ``conv(x)`` over time, in chunks."""
    kernel, stride = conv.kernel_size[0], conv.stride[0]
    frames = (x.shape[1] - kernel) // stride + 1
    total = torch.zeros(conv.out_channels, dtype=torch.float64, device=x.device)
    squares = torch.zeros_like(total)
    step = _CNN_CHUNK_FRAMES * 64
    for m0 in range(0, frames, step):
        m1 = min(frames, m0 + step)
        h = conv1d_as_matmul(conv, x[:, None, m0 * stride : (m1 - 1) * stride + kernel]).double()[0]
        total += h.sum(dim=1)
        squares += h.pow(2).sum(dim=1)
    mean = total / frames
    var = (squares / frames - mean.pow(2)).clamp_min(0)
    eps = 1e-5
    return mean[:, None], torch.rsqrt(var + eps)[:, None]


def windowed_hidden_states(encoder: AudioEncoder, input_values: torch.Tensor, num_frames: int) -> list[torch.Tensor]:
    """Hidden states of a long clip with bounded memory.

    The CNN, the interpolation to ``num_frames``, the feature projection and the positional conv are
    computed exactly as in one pass (see :func:`chunked_cnn_features`); only self-attention is
    limited to windows of :data:`WINDOW_SECONDS` plus :data:`WINDOW_CONTEXT_SECONDS` of context on each
    side, of which the centre is kept.
    """
    cnn = chunked_cnn_features(encoder, input_values)
    cnn = F.interpolate(cnn, size=num_frames, mode="linear", align_corners=True)
    frames_per_second = (num_frames - 1) / (input_values.shape[1] / SAMPLE_RATE)
    core = max(1, int(WINDOW_SECONDS * frames_per_second))
    context = int(WINDOW_CONTEXT_SECONDS * frames_per_second)
    pieces: list[list[torch.Tensor]] = []
    for start in range(0, num_frames, core):
        stop = min(num_frames, start + core)
        lo, hi = max(0, start - context), min(num_frames, stop + context)
        states = _transformer_states(encoder, cnn[:, :, lo:hi])
        pieces.append([s[:, start - lo : stop - lo] for s in states])
    return [torch.cat(parts, dim=1) for parts in zip(*pieces)]


def _encoder_layer(layer: torch.nn.Module, h: torch.Tensor, num_heads: int, *, pre_norm: bool) -> torch.Tensor:
    """One wav2vec2 transformer layer: post-LN (base) or pre-LN (stable layer norm, large)."""
    if pre_norm:
        h = h + _self_attention(layer.attention, layer.layer_norm(h), num_heads)
        return h + layer.feed_forward(layer.final_layer_norm(h))
    h = layer.layer_norm(h + _self_attention(layer.attention, h, num_heads))
    return layer.final_layer_norm(h + layer.feed_forward(h))


def _self_attention(module: torch.nn.Module, h: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Unmasked multi-head self-attention through SDPA (scale 1/sqrt(head_dim) inside the kernel, as
    transformers' ``sdpa`` implementation does). ``[B, T, C]`` -> ``[B, T, C]``."""
    b, t, c = h.shape
    q, k, v = (proj(h).view(b, t, num_heads, c // num_heads) for proj in (module.q_proj, module.k_proj, module.v_proj))
    return module.out_proj(attention(q, k, v, varying_shapes=True))  # one sequence length per clip


def livetalk_audio_features(
    encoder: AudioEncoder, waveform_16k: torch.Tensor, num_video_frames: int, graphs: ForwardGraphs | None = None
) -> torch.Tensor:
    """LiveTalk's audio conditioning (``scripts/inference_example.py:170-181``).

    Args:
        waveform_16k: ``[N]`` float32 mono at 16 kHz, already trimmed or padded to the video length.
        num_video_frames: ``4F - 3``.
        graphs: as in :func:`hidden_states`.
    Returns:
        ``[1, num_video_frames, (L + 2) * hidden]`` in the encoder dtype:
        ``cat(last_hidden_state, h0, ..., hL)`` (``hL`` is the last hidden state, so it appears twice).
    """
    if waveform_16k.ndim != 1 or waveform_16k.shape[0] == 0:
        raise InputError(f"Expected a non-empty mono waveform [N], got shape {tuple(waveform_16k.shape)}.")
    values = normalize_waveform(waveform_16k) if encoder.do_normalize else waveform_16k.float()
    states = hidden_states(encoder, values.to(encoder.dtype)[None], num_video_frames, graphs=graphs)
    return torch.cat([states[-1], *states], dim=-1)
