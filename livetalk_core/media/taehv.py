"""The tiny decoder: TAEHV for Wan2.1 latents, a fast, lower-quality alternative to the full VAE.

TAEHV (madebyollin/taehv, MIT) decodes each latent frame with 2-D convolutions only: a stem, three
stages of three *memory blocks* (each sees its own input of the previous frame, the only state carried
in time), each stage ending in a 2x nearest upsample, a *time grow* 1x1 conv that splits every frame
into ``stride`` frames (1, 2 and 2 for Wan2.1: 4 video frames per latent) and a conv to the next width.
Its first ``4 - 1`` output frames are dropped, so that T latent frames give ``1 + 4(T-1)`` video frames
aligned with the full Wan VAE's (:mod:`.vae`): latent 0 gives frame 0, latent t frames ``4t-3 .. 4t``.

Two released weight sets share this layout and differ in the latents they expect:

* ``taew2_1`` (madebyollin/taehv, ``.pth`` and ``.safetensors``): the DiT's latents as they are,
  normalised by Wan's per-channel mean and std (:data:`NORMALISED`);
* ``lighttaew2_1`` (lightx2v/Autoencoders): the Wan VAE's own latents, ``z * std + mean`` (:data:`RAW`),
  which lightx2v computes before decoding with it (and ComfyUI feeds it, its LATENT being in VAE space).

Their state dicts have the same names (the encoder's ``encoder.*`` and the decoder's ``decoder.*``);
some files store the first time-grow conv for a stride of 2 (twice the output rows), of which the
decoder, whose first stage does not grow time, uses the last half, as the original code does.

The decoder here is written from that description: the architecture is read from the state dict,
keys and shapes are then checked exactly, and decoding streams block by block with the memory
blocks' last input frames as the only state (:class:`TinyStreamDecoder`), the interface of the full
VAE's :class:`~.vae.StreamDecoder`. The encoder is not implemented (the full VAE encodes the reference).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError
from .checkpoint import check_state_dict, read_state_dict, resolve_dtype, strip_prefix
from .vae import LATENT_CHANNELS, WAN21_LATENT_MEAN, WAN21_LATENT_STD, continued_stream, nearest_2x

MODEL_NAME = "TAEHV tiny decoder for Wan2.1"
WHERE_TO_GET_IT = (
    "taew2_1.pth or taew2_1.safetensors from madebyollin/taehv, or lighttaew2_1.safetensors from "
    "lightx2v/Autoencoders"
)
QUALITY_NOTE = (
    "The tiny decoder (TAEHV) trades quality for speed: frames come out softer and with less fine detail "
    "than the full Wan VAE, which stays the default."
)

DECODERS = ("full", "tiny")
"""What can decode the frames (the CLI's and the benchmarks' ``--decoder``): the full Wan VAE, the
default, or this tiny decoder."""

NORMALISED = "normalised"
"""Latent space of ``taew2_1``: the DiT's latents as they are."""
RAW = "raw"
"""Latent space of ``lighttaew2_1``: the Wan VAE's latents, ``z * std + mean``."""
LATENT_SPACES = (NORMALISED, RAW)

STAGES = 3
BLOCKS_PER_STAGE = 3
WAN21_TIME_STRIDES = (1, 2, 2)
"""Video frames each stage's time grow makes of one frame, for Wan2.1 (4 per latent frame in all)."""
IMAGE_CHANNELS = 3
_PREFIXES = ("first_stage_model.", "vae.", "taehv.")
_STEM, _FINAL = 1, 4 + STAGES * (BLOCKS_PER_STAGE + 3)  # decoder.1 and decoder.22


def latent_space_for(file_name: str) -> str:
    """The latent space a weight file expects, by its name: lightx2v's ``lighttae*`` files take the raw
    Wan VAE latents (lightx2v's own rule), every other TAEHV file the normalised ones."""
    return RAW if "lighttae" in os.path.basename(str(file_name)).lower() else NORMALISED


@dataclass(frozen=True)
class TinyDecoderConfig:
    """Widths of a TAEHV decoder: ``stem_width`` after the stem, ``stage_widths[s]`` of stage s's memory
    blocks, ``stage_outputs[s]`` after its closing conv. The defaults are the released decoder's."""

    latent_channels: int = LATENT_CHANNELS
    stem_width: int = 256
    stage_widths: tuple[int, ...] = (256, 128, 64)
    stage_outputs: tuple[int, ...] = (128, 64, 64)
    time_strides: tuple[int, ...] = WAN21_TIME_STRIDES

    @property
    def time_factor(self) -> int:
        """Video frames per latent frame."""
        return math.prod(self.time_strides)

    @staticmethod
    def stage_start(stage: int) -> int:
        """Index (in the state dict's ``decoder.<i>`` names) of a stage's first memory block."""
        return 3 + stage * (BLOCKS_PER_STAGE + 3)

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor]) -> TinyDecoderConfig:
        """The widths, read from the convs' shapes. Raises ``ValueError`` naming a missing tensor, or
        when the widths do not chain from layer to layer."""

        def out_channels(name: str) -> int:
            if name not in state_dict or state_dict[name].ndim != 4:
                raise ValueError(f"there is no 4-D tensor {name}")
            return state_dict[name].shape[0]

        stem_width = out_channels(f"decoder.{_STEM}.weight")
        starts = [cls.stage_start(s) for s in range(STAGES)]
        config = cls(
            latent_channels=state_dict[f"decoder.{_STEM}.weight"].shape[1],
            stem_width=stem_width,
            stage_widths=tuple(out_channels(f"decoder.{start}.conv.0.weight") for start in starts),
            stage_outputs=tuple(out_channels(f"decoder.{start + BLOCKS_PER_STAGE + 2}.weight") for start in starts),
        )
        if (config.stem_width, *config.stage_outputs[:-1]) != config.stage_widths:
            raise ValueError("each stage's width is not the width of the layer before it")
        return config


def _conv3x3(channels_in: int, channels_out: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(channels_in, channels_out, 3, padding=1, bias=bias)


class MemoryBlock(nn.Module):
    """Three 3x3 convs on ``[this frame, the same block's input one frame earlier]``, ReLUs between them
    and after the skip: ``[N,C,H,W]`` kept. Keys "0", "2", "4": the convs' places in the released
    file's ``conv`` sequence (its ReLUs, without weights, fill the others)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.ModuleDict({
            "0": _conv3x3(2 * channels, channels),
            "2": _conv3x3(channels, channels),
            "4": _conv3x3(channels, channels),
        })

    def forward(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv["0"](torch.cat([x, past], dim=1)))
        h = F.relu(self.conv["2"](h))
        return F.relu(self.conv["4"](h) + x)


class TimeGrow(nn.Module):
    """A 1x1 conv to ``stride`` times the channels, each group of channels one more frame:
    ``[N*T,C,H,W] -> [N*T*stride,C,H,W]``, frame ``t`` becoming ``t*stride .. t*stride+stride-1``."""

    def __init__(self, channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(channels, channels * stride, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        y = self.conv(x)
        if y.is_contiguous() or not y.is_contiguous(memory_format=torch.channels_last):
            return y.reshape(n * self.stride, c, h, w)
        # Channels-last, y's memory is [N, H, W, stride, C]: reordered to [N, stride, H, W, C] in one copy,
        # that is the output's channels-last memory.
        grouped = y.permute(0, 2, 3, 1).reshape(n, h, w, self.stride, c).permute(0, 3, 1, 2, 4).contiguous()
        return grouped.view(n * self.stride, h, w, c).permute(0, 3, 1, 2)


@dataclass
class StreamState:
    """What one decoding stream carries between calls: each memory block's last input frame
    ``[B,1,C,H,W]`` and how many video frames the decoder has made (the first ones are dropped)."""

    memory: dict[int, torch.Tensor]
    frames_made: int = 0


class TinyDecoder(nn.Module):
    """TAEHV's decoder for Wan2.1 latents, with the full VAE's decoding interface:
    :meth:`stream_decoder`, :meth:`decode`, :attr:`device`, :attr:`dtype`. See the module docstring."""

    def __init__(self, config: TinyDecoderConfig = TinyDecoderConfig(), latent_space: str = NORMALISED) -> None:
        super().__init__()
        if latent_space not in LATENT_SPACES:
            raise ValueError(f"latent_space must be one of {LATENT_SPACES}, not {latent_space!r}")
        self.config = config
        self.latent_space = latent_space
        layers: dict[str, nn.Module] = {str(_STEM): _conv3x3(config.latent_channels, config.stem_width)}
        width = config.stem_width
        for stage, (stage_width, out, stride) in enumerate(
            zip(config.stage_widths, config.stage_outputs, config.time_strides, strict=True)
        ):
            start = config.stage_start(stage)
            if width != stage_width:
                raise ValueError(f"stage {stage} takes {stage_width} channels, the layer before gives {width}")
            for block in range(BLOCKS_PER_STAGE):
                layers[str(start + block)] = MemoryBlock(stage_width)
            layers[str(start + BLOCKS_PER_STAGE + 1)] = TimeGrow(stage_width, stride)
            layers[str(start + BLOCKS_PER_STAGE + 2)] = _conv3x3(stage_width, out, bias=False)
            width = out
        layers[str(_FINAL)] = _conv3x3(width, IMAGE_CHANNELS)
        self.decoder = nn.ModuleDict(layers)
        self.channels_last = False  # the layout of weights and activations: channels-last on a GPU
        self._raw_scales: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder[str(_FINAL)].weight.dtype

    @property
    def device(self) -> torch.device:
        return self.decoder[str(_FINAL)].weight.device

    stream_graphs = True
    """:meth:`stream_decoder` can replay its decodes from CUDA graphs (a live session's blocks)."""

    def stream_decoder(self, graphs_for: Callable[[nn.Module], Any] | None = None) -> TinyStreamDecoder:
        """A fresh decoding stream; see :class:`TinyStreamDecoder`. ``graphs_for(self)``: CUDA graphs kept
        across streams to replay the decodes from (``Workspace.module_graphs``; None: eager)."""
        self.use_gpu_layout()  # before any graph: they are keyed by where the weights are
        return TinyStreamDecoder(self, graphs_for)

    def use_gpu_layout(self) -> None:
        """On a GPU, go channels-last (:meth:`use_channels_last`), once: before a stream starts, so not
        on a side stream that decodes."""
        if self.device.type == "cuda" and not self.channels_last:
            self.use_channels_last()

    def use_channels_last(self) -> None:
        """Store the conv weights and the activations channels-last: cuDNN's fast 2-D convs on a GPU (the
        same values and names; on a CPU only for the tests of that path)."""
        self.to(memory_format=torch.channels_last)
        self.channels_last = True

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """One-shot decode ``[B,16,F,h,w] -> [B,3,1+4(F-1),8h,8w]`` float32 in [-1, 1]."""
        return self.stream_decoder().decode(latents)

    def to_decoder_input(self, latents: torch.Tensor) -> torch.Tensor:
        """The DiT's normalised latents in this decoder's latent space and dtype. For :data:`RAW`, as
        lightx2v does: ``z / (1/std) + mean`` in the latents' own dtype (the reciprocal taken in it
        too), then cast."""
        z = latents.to(device=self.device)
        if self.latent_space == RAW:
            mean, inv_std = self._raw_scale(z.device, z.dtype)
            z = z / inv_std + mean
        return z.to(self.dtype)

    def _raw_scale(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, 1/std)`` ``[1,16,1,1,1]`` in ``dtype``, from the float32 constants (a buffer would be cast
        to the model's dtype first), made once per device and dtype rather than per block."""
        key = (device, dtype)
        if key not in self._raw_scales:
            mean = torch.tensor(WAN21_LATENT_MEAN, device=device).to(dtype).view(1, -1, 1, 1, 1)
            inv_std = 1.0 / torch.tensor(WAN21_LATENT_STD, device=device).to(dtype).view(1, -1, 1, 1, 1)
            self._raw_scales[key] = (mean, inv_std)
        return self._raw_scales[key]

    def decode_frames(self, latents: torch.Tensor, state: StreamState) -> torch.Tensor:
        """Decoder-space latents ``[B,16,f,h,w]`` (continuing ``state``'s stream) -> the stream's next
        video frames ``[B,3,T,8h,8w]`` in [0, 1], in the model's dtype. All ``f`` frames run as one
        batch through each layer; each memory block takes the frame before each of them from its own
        input (the first from ``state``)."""
        return self.stream_frames(self.decode_all_frames(latents, state), state)

    def stream_frames(self, video: torch.Tensor, state: StreamState) -> torch.Tensor:
        """The frames of :meth:`decode_all_frames`' ``video`` the stream shows: its first ones dropped."""
        dropped = max(0, min(self.config.time_factor - 1 - state.frames_made, video.shape[2]))
        state.frames_made += video.shape[2]
        return video[:, :, dropped:]

    def decode_all_frames(self, latents: torch.Tensor, state: StreamState) -> torch.Tensor:
        """:meth:`decode_frames` without dropping a stream's first frames: ``[B,3,4f,8h,8w]``. Reads and
        writes only ``latents``, the weights and ``state.memory`` (in place once it holds a frame of this
        shape), so a CUDA graph of it replays on the same memory."""
        batch, frames_in = latents.shape[0], latents.shape[2]
        self.use_gpu_layout()
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        x = latents.transpose(1, 2).reshape(batch * frames_in, *latents.shape[1:2], *latents.shape[3:])
        x = x.contiguous(memory_format=layout)
        x = torch.tanh(x / 3) * 3  # TAEHV's soft clamp of its input to (-3, 3)
        x = F.relu(self.decoder[str(_STEM)](x))
        for stage in range(STAGES):
            start = self.config.stage_start(stage)
            for index in range(start, start + BLOCKS_PER_STAGE):
                x = self.decoder[str(index)](x, _previous_frames(x, batch, state, index))
            # F.interpolate(mode="nearest")'s values, faster channels-last
            x = nearest_2x(x).contiguous(memory_format=layout)
            x = self.decoder[str(start + BLOCKS_PER_STAGE + 1)](x)
            x = self.decoder[str(start + BLOCKS_PER_STAGE + 2)](x)
        x = self.decoder[str(_FINAL)](F.relu(x)).clamp_(0, 1)
        return x.reshape(batch, -1, *x.shape[1:]).transpose(1, 2)  # [B, 3, T, H, W]


def _previous_frames(x: torch.Tensor, batch: int, state: StreamState, index: int) -> torch.Tensor:
    """For memory block ``index``'s input ``x`` ``[B*T,C,H,W]``: the input one frame earlier for each
    frame (zeros before a stream's first), written once into a tensor of ``x``'s layout; ``state``
    keeps this call's last frame."""
    frames = x.view(batch, -1, *x.shape[1:])  # [B, T, C, H, W]
    previous = torch.empty_like(x)
    shifted = previous.view(frames.shape)
    before = state.memory.get(index)
    if before is None:
        shifted[:, :1].zero_()
    else:
        shifted[:, :1].copy_(before)
    shifted[:, 1:].copy_(frames[:, :-1])
    last = frames[:, -1:]
    if before is not None and before.shape == last.shape:
        before.copy_(last)  # in place: a graph replays on the same memory
    else:
        state.memory[index] = last.clone()
    return previous


class TinyStreamDecoder:
    """Decodes latents block by block, carrying each memory block's last input frame between calls.

    The same interface and frame alignment as the full VAE's :class:`~.vae.StreamDecoder`: the first
    latent frame of a stream gives 1 video frame, every later one 4, float32 in [-1, 1]. Memory grows
    with the block, not with the video. The frames equal a one-shot :meth:`TinyDecoder.decode` up to
    float rounding (a CPU may pick another conv kernel for another batch of frames; tests/test_taehv.py).
    :meth:`reset` starts a new video.
    """

    def __init__(self, model: TinyDecoder, graphs_for: Callable[[nn.Module], Any] | None = None) -> None:
        """``graphs_for(model)``: a ``runtime.cuda_graphs.ForwardGraphs`` kept across streams, or None (eager);
        asked at each stream's first decode (a live session's sampling run has begun by then). Its ``kept``
        holds the stream's memory, which its graphs read: one stream at a time uses them."""
        self.model, self._graphs_for = model, graphs_for
        self.reset()

    def reset(self) -> None:
        self._latent_shape: tuple[int, ...] | None = None  # (batch, h, w) of this stream
        self._graphs: Any = None
        self._state: StreamState | None = None  # made at the stream's first decode

    def _start(self) -> StreamState:
        """The stream's state: a fresh one, or the graphs' kept one zeroed (a stream's first frame then
        reads zeros as before, from the same tensors)."""
        self._graphs = self._graphs_for(self.model) if self._graphs_for is not None else None
        if self._graphs is None:
            return StreamState(memory={})
        state = self._graphs.kept.setdefault("stream", StreamState(memory={}))
        for frame in state.memory.values():
            frame.zero_()
        state.frames_made = 0
        return state

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``[B,16,f,h,w]`` normalised latents -> ``[B,3,frames,8h,8w]`` float32 clamped to [-1, 1]."""
        channels = self.model.config.latent_channels
        self._latent_shape = continued_stream(latents, channels, self._latent_shape, "The tiny decoder")
        z = self.model.to_decoder_input(latents)
        if self._state is None:
            self._state = self._start()
        if self._graphs is None:
            frames = self.model.decode_frames(z, self._state)
        else:
            frames = self._replayed(z)
        return frames.float().mul_(2).sub_(1)

    def _replayed(self, z: torch.Tensor) -> torch.Tensor:
        """:meth:`TinyDecoder.decode_frames` with the graphed part from the kept graphs. Kept memory of
        another stream shape is dropped with the graphs that read it; empty memory is filled eagerly."""
        state, shape = self._state, (z.shape[0], *z.shape[3:])
        if state.memory and self._graphs.kept.get("shape") != shape:
            self._graphs.drop_all()
            state.memory.clear()
        self._graphs.kept["shape"] = shape
        if not state.memory:
            return self.model.decode_frames(z, state)
        video = self._graphs(("taehv", tuple(z.shape), z.dtype), lambda x: self.model.decode_all_frames(x, state), z)
        return self.model.stream_frames(video, state)


def fit_time_grow(state_dict: Mapping[str, torch.Tensor], config: TinyDecoderConfig) -> dict[str, torch.Tensor]:
    """``state_dict`` with each time-grow weight stored for a larger stride than the decoder's cut to the
    decoder's rows, keeping the last (the stride's last frame), as the original loader does."""
    fitted = dict(state_dict)
    for stage, (width, stride) in enumerate(zip(config.stage_widths, config.time_strides, strict=True)):
        name = f"decoder.{config.stage_start(stage) + BLOCKS_PER_STAGE + 1}.conv.weight"
        weight = fitted.get(name)
        rows = width * stride
        if weight is not None and weight.ndim == 4 and weight.shape[0] > rows and weight.shape[0] % width == 0:
            fitted[name] = weight[-rows:]
    return fitted


def decoder_tensors(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The decoder's tensors of a TAEHV state dict: a wrapping prefix removed, the encoder's
    ``encoder.*`` tensors left out (the tiny decoder does not encode). Other names stay, so that
    the key check names them."""
    tensors = strip_prefix(state_dict, _PREFIXES)
    return {k: v for k, v in tensors.items() if not k.startswith("encoder.")}


def tiny_decoder_from_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    *,
    latent_space: str,
    dtype: torch.dtype | str = torch.bfloat16,
    device: str | torch.device = "cpu",
    source: str | os.PathLike = "the state dict",
) -> TinyDecoder:
    """Build the decoder a TAEHV state dict describes and load it strictly; ``source`` names the
    file in errors. Raises :class:`CheckpointError` for anything that is not a Wan2.1 TAEHV decoder."""
    dtype = resolve_dtype(dtype)
    tensors = decoder_tensors(state_dict)
    _reject_other_latent_spaces(tensors, source)
    try:
        config = TinyDecoderConfig.from_state_dict(tensors)
    except ValueError:
        config = TinyDecoderConfig()  # not a TAEHV decoder: the key check below names what is off
    tensors = fit_time_grow(tensors, config)
    with torch.device("meta"):
        model = TinyDecoder(config, latent_space)
    check_state_dict(tensors, model.state_dict(), path=source, model_name=MODEL_NAME)
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in tensors.items()}, strict=True, assign=True)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def load_tiny_decoder(
    path: str | os.PathLike,
    dtype: torch.dtype | str = torch.bfloat16,
    device: str | torch.device = "cpu",
    latent_space: str | None = None,
) -> TinyDecoder:
    """Load ``taew2_1`` (``.pth``, read with ``weights_only=True``, or ``.safetensors``) or lightx2v's
    ``lighttaew2_1``. ``latent_space`` None: by the file name (:func:`latent_space_for`). Raises
    :class:`CheckpointError`."""
    _reject_other_models_by_name(path)
    state_dict = read_state_dict(path, what=MODEL_NAME)
    space = latent_space_for(str(path)) if latent_space is None else latent_space
    return tiny_decoder_from_state_dict(state_dict, latent_space=space, dtype=dtype, device=device, source=path)


def check_tiny_decoder_file(path: str | os.PathLike) -> TinyDecoderConfig:
    """Everything :func:`load_tiny_decoder` checks, on the meta device (nothing is materialised), so
    that a wrong file is refused before any model loads. Returns the architecture it describes."""
    return load_tiny_decoder(path, torch.float32, "meta").config


def looks_like_tiny_decoder(keys) -> bool:
    """Whether state-dict names are a TAEHV's (ComfyUI's own test: its last decoder conv)."""
    return any(re.fullmatch(rf"(?:.*\.)?decoder\.{_FINAL}\.bias", key) for key in keys)


OTHER_MODELS_16_CHANNELS = {r"taehv(?!\d)": "HunyuanVideo", "taecvx": "CogVideoX", "taeos": "Open-Sora"}
"""madebyollin's TAEHV files for other models whose latents also have 16 channels, by how their names
start (``taehv1_5``, 32 channels, is refused by its shapes): their weights load, so only the name tells
them from taew2_1."""


def _reject_other_models_by_name(path: str | os.PathLike) -> None:
    stem = os.path.splitext(os.path.basename(str(path)))[0].lower()
    for start, model in OTHER_MODELS_16_CHANNELS.items():
        if re.match(start, stem):
            raise CheckpointError(
                f"{path} is, by its name, madebyollin's tiny decoder for {model}, whose latents differ from "
                f"Wan2.1's (its frames would be wrong). LiveTalk needs the Wan2.1 one: {WHERE_TO_GET_IT}. (If the "
                "file is a renamed taew2_1, name it taew2_1.)"
            )


def _reject_other_latent_spaces(tensors: Mapping[str, torch.Tensor], source: str | os.PathLike) -> None:
    """TAEHVs of other models (Wan2.2 5B: 48 channels, HunyuanVideo 1.5: 32) cannot decode Wan2.1 latents."""
    stem = tensors.get(f"decoder.{_STEM}.weight")
    if stem is None or stem.ndim != 4 or stem.shape[1] == LATENT_CHANNELS:
        return
    which = {48: " (TAEHV for Wan2.2 5B, taew2_2)", 32: " (TAEHV for HunyuanVideo 1.5)"}.get(stem.shape[1], "")
    raise CheckpointError(
        f"{source} is a tiny decoder for {stem.shape[1]}-channel latents{which}. LiveTalk needs the "
        f"{LATENT_CHANNELS}-channel Wan2.1 one: {WHERE_TO_GET_IT}."
    )
