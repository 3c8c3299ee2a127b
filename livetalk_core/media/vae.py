"""The Wan2.1 video VAE: a causal 3-D convolutional encoder/decoder.

Time is causal everywhere: a temporal convolution sees the current frame and the two before it, so
a video can be processed a little at a time if every such convolution remembers the last two frames
it was given. That memory is a :class:`FeatureCache`, one per stream. The decoder turns the first
latent frame of a stream into 1 video frame and every later latent frame into 4; the encoder does
the reverse (1 + 4k frames -> 1 + k latents). Spatially each latent is 8x8 pixels.

Module names, parameter names and shapes are those of the released ``Wan2.1_VAE.pth`` (also used
by Comfy-Org's ``wan_2.1_vae.safetensors``), so the file loads with ``strict=True``. Numerics follow
the LiveTalk wrapper: latents are normalised with per-channel mean/std constants that are not in
the file, scaled in the model's dtype exactly as upstream does (see :meth:`WanVAE._latent_scale`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, InputError
from .checkpoint import check_state_dict, read_state_dict, resolve_dtype, strip_prefix

# Per-channel statistics of Wan2.1 latents (Wan's published constants, not stored in the checkpoint).
WAN21_LATENT_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
WAN21_LATENT_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)
LATENT_CHANNELS = len(WAN21_LATENT_MEAN)

MODEL_NAME = "Wan2.1 VAE"
WHERE_TO_GET_IT = (
    "Wan2.1_VAE.pth from Wan-AI/Wan2.1-T2V-1.3B or wan_2.1_vae.safetensors from "
    "Comfy-Org/Wan_2.1_ComfyUI_repackaged"
)


@dataclass(frozen=True)
class VAEConfig:
    """Architecture of a Wan2.1-style VAE. The defaults are the released model's.

    ``dim_mult`` gives the encoder's widths per resolution level (in units of ``dim``);
    ``temporal_downsample[i]`` says whether the step after level ``i`` also halves time.
    Attention exists only in the middle blocks.
    """

    dim: int = 96
    z_dim: int = LATENT_CHANNELS
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent along H and W."""
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_factor(self) -> int:
        """Video frames per latent frame (after the first)."""
        return 2 ** sum(self.temporal_downsample)

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor]) -> VAEConfig:
        """Read the architecture from tensor names and shapes.

        The encoder's ``downsamples`` list is a run of residual blocks per level with one
        resampler between levels; the width of a level is the output width of its blocks.
        Raises ``ValueError`` saying what does not fit that layout.
        """
        for name in ("encoder.conv1.weight", "conv2.weight"):
            if name not in state_dict:
                raise ValueError(f"there is no tensor {name}")
        dim = state_dict["encoder.conv1.weight"].shape[0]
        z_dim = state_dict["conv2.weight"].shape[0]

        pattern = re.compile(r"encoder\.downsamples\.(\d+)\.")
        indices = sorted({int(m.group(1)) for key in state_dict if (m := pattern.match(key))})
        if indices != list(range(len(indices))) or not indices:
            raise ValueError("encoder.downsamples is empty or has gaps")
        level_widths: list[list[int]] = [[]]  # output width of each residual block, per level
        temporal: list[bool] = []
        for i in indices:
            prefix = f"encoder.downsamples.{i}."
            if f"{prefix}residual.2.weight" in state_dict:
                level_widths[-1].append(state_dict[f"{prefix}residual.2.weight"].shape[0])
            elif f"{prefix}resample.1.weight" in state_dict:
                temporal.append(f"{prefix}time_conv.weight" in state_dict)
                level_widths.append([])
            else:
                raise ValueError(f"{prefix}* is neither a residual block nor a resampler")
        blocks_per_level = {len(widths) for widths in level_widths}
        if len(blocks_per_level) != 1 or 0 in blocks_per_level:
            raise ValueError("the encoder levels have different numbers of residual blocks")
        if any(widths[-1] % dim for widths in level_widths):
            raise ValueError(f"a level width is not a multiple of the base width {dim}")
        return cls(
            dim=dim,
            z_dim=z_dim,
            dim_mult=tuple(widths[-1] // dim for widths in level_widths),
            num_res_blocks=blocks_per_level.pop(),
            temporal_downsample=tuple(temporal),
        )


class FeatureCache:
    """What the temporal layers of one stream must remember between calls.

    ``history`` maps a layer to the last input frames it saw (already padded the way that layer
    pads); ``started`` holds the temporal upsamplers that have passed the stream's first frame.
    """

    def __init__(self) -> None:
        self.history: dict[nn.Module, torch.Tensor] = {}
        self.started: set[nn.Module] = set()


FRAMES_LAST = torch.channels_last_3d
"""Memory layout of every activation inside the encoder and decoder: ``[B,C,T,H,W]`` tensors stored
as ``[B][T][H][W][C]``, so that the frames of a video are a channels-last batch of images."""


def tap_major(weight: nn.Parameter) -> torch.Tensor:
    """A 3-D conv weight ``[C',C,kt,kh,kw]`` as its temporal taps ``[kt,C',C,kh,kw]``, each tap a
    channels-last 2-D conv weight.

    The first call re-stores the parameter in that memory order (same values, same shape and
    state-dict entry; ``.to()`` keeps the order), so later calls are a view and no weight is copied
    per forward.
    """
    taps = weight.permute(2, 0, 3, 4, 1)  # [kt, C', kh, kw, C]
    if not taps.is_contiguous():
        weight.data = weight.data.permute(2, 0, 3, 4, 1).contiguous().permute(1, 4, 0, 2, 3)
        taps = weight.permute(2, 0, 3, 4, 1)
    return taps.permute(0, 1, 4, 2, 3)


def conv_by_frames(
    x: torch.Tensor, tap_weights: torch.Tensor, bias: torch.Tensor | None, padding_hw: tuple[int, int]
) -> torch.Tensor:
    """An unpadded-in-time 3-D convolution as one 2-D convolution per temporal tap, summed.

    ``x`` ``[B,C,T,H,W]`` (:data:`FRAMES_LAST`), ``tap_weights`` ``[kt,C',C,kh,kw]`` (:func:`tap_major`)
    -> ``[B,C',T-kt+1,H,W]`` (:data:`FRAMES_LAST`). cuDNN's channels-last 2-D kernels run these shapes
    at up to twice the speed of its 3-D ones, which also convert every input and output between
    layouts (docs/performance.md).
    """
    taps = tap_weights.shape[0]
    frames_out = x.shape[2] - taps + 1
    outputs = []
    for video in x.unbind(0):
        frames = video.transpose(0, 1)  # [T, C, H, W], a channels-last view
        out = F.conv2d(frames[:frames_out], tap_weights[0], bias, padding=padding_hw)
        for tap in range(1, taps):
            # Not in place: compiled (compile.compile_vae), in-place adds to a conv's output stay one
            # kernel each, where a plain sum fuses into one.
            out = out + F.conv2d(frames[tap : tap + frames_out], tap_weights[tap], padding=padding_hw)
        outputs.append(out.transpose(0, 1))  # [C', T', H, W]
    return outputs[0].unsqueeze(0) if len(outputs) == 1 else torch.stack(outputs).contiguous(memory_format=FRAMES_LAST)


def causal_conv_step(
    x: torch.Tensor,
    history: torch.Tensor,
    tap_weights: torch.Tensor,
    bias: torch.Tensor | None,
    padding_hw: tuple[int, int],
    gamma: torch.Tensor | None = None,
    scale: float = 1.0,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One call of a causal conv in a stream: ``x`` ``[B,C,T,H,W]`` -> ``[B,C',T,H,W]``, and the last
    ``kt - 1`` input frames, the next call's ``history`` (all :data:`FRAMES_LAST`).

    ``history`` ``[B,C,kt-1,H,W]``: the input frames in front of ``x`` (zeros at a stream's start).
    With ``gamma`` the conv's input is ``silu(rms_norm(x, gamma, scale))``, the step before every
    conv of the residual blocks and heads; ``residual`` is added to the output. Eager, each of these
    is its own pass over the activations; :func:`~.compile.compile_vae` fuses the norm with the
    history concatenation and the taps' sum with the bias and the residual, around cuDNN's convs.
    """
    if gamma is not None:
        x = F.silu(rms_norm(x, gamma, scale))
    # The layouts are spelled out for the compiler, which would otherwise store the padded input and
    # the history in its own order and convert every frame back for cuDNN (a slower decode).
    padded = torch.cat([history, x], dim=2).contiguous(memory_format=FRAMES_LAST)
    out = conv_by_frames(padded, tap_weights, bias, padding_hw)
    if residual is not None:
        out = out + residual
    # A copy, so that the cache keeps kt - 1 frames alive, not the whole padded input.
    return out, padded[:, :, -history.shape[2]:].clone(memory_format=FRAMES_LAST)


class CausalConv3d(nn.Conv3d):
    """3-D conv that pads time only in front: ``[B,C,T,H,W] -> [B,C',T,H,W]`` (:data:`FRAMES_LAST`).

    The ``kt - 1`` frames in front come from the stream's previous call (zeros at its start), so
    chunked processing equals processing the whole sequence. H and W are zero-padded by ``k // 2``
    inside the convolution (no padded copy of the input). :attr:`step` is
    :func:`causal_conv_step`, or its compiled form once :func:`~.compile.compile_vae` swapped it in.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int, int]) -> None:
        kt, kh, kw = (kernel_size,) * 3 if isinstance(kernel_size, int) else kernel_size
        super().__init__(in_channels, out_channels, (kt, kh, kw), padding=(0, kh // 2, kw // 2))
        self.history_frames = kt - 1
        self.step = causal_conv_step

    def forward(
        self, x: torch.Tensor, cache: FeatureCache, norm: RMSNorm | None = None, residual: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``x`` or, with ``norm``, ``silu(norm(x))`` convolved; plus ``residual`` when given."""
        history = cache.history.get(self)
        if history is None:
            b, c, _, h, w = x.shape
            shape = (b, c, self.history_frames, h, w)
            history = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=FRAMES_LAST).zero_()
        gamma, scale = (None, 1.0) if norm is None else (norm.gamma, norm.scale)
        out, cache.history[self] = self.step(
            x, history, tap_major(self.weight), self.bias, self.padding[1:], gamma, scale, residual
        )
        return out


class RMSNorm(nn.Module):
    """L2-normalise over channels (dim 1), times sqrt(C) and a learned per-channel gain."""

    def __init__(self, channels: int, spatial_dims: int) -> None:
        super().__init__()
        self.scale = channels**0.5
        self.gamma = nn.Parameter(torch.ones(channels, *(1,) * spatial_dims))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.gamma, self.scale)


def rms_norm(x: torch.Tensor, gamma: torch.Tensor, scale: float) -> torch.Tensor:
    """:class:`RMSNorm`'s arithmetic, as a plain function that compiled steps can take in."""
    return F.normalize(x, dim=1) * scale * gamma


def _per_frame(x: torch.Tensor) -> torch.Tensor:
    """``[B,C,T,H,W] -> [B*T,C,H,W]`` (frame-major), for 2-D layers."""
    b, c, t, h, w = x.shape
    return x.transpose(1, 2).reshape(b * t, c, h, w)


def _from_frames(frames: torch.Tensor, batch: int) -> torch.Tensor:
    """Inverse of :func:`_per_frame`: ``[B*T,C,H,W] -> [B,C,T,H,W]`` (a strided view)."""
    bt, c, h, w = frames.shape
    return frames.view(batch, bt // batch, c, h, w).transpose(1, 2)


class ResidualBlock(nn.Module):
    """Two (RMS norm, SiLU, causal 3x3x3 conv) steps plus a skip: ``[B,C_in,T,H,W] -> [B,C_out,T,H,W]``.

    The skip is a 1x1x1 conv when the width changes.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        # Keys "0", "2", "3", "6" are the layer positions in the release checkpoint (the SiLUs and
        # a dropout, which have no weights, filled the other slots).
        self.residual = nn.ModuleDict({
            "0": RMSNorm(in_channels, spatial_dims=3),
            "2": CausalConv3d(in_channels, out_channels, 3),
            "3": RMSNorm(out_channels, spatial_dims=3),
            "6": CausalConv3d(out_channels, out_channels, 3),
        })
        self.shortcut = (
            nn.Conv3d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        )

    def forward(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        layers = self.residual
        h = layers["2"](x, cache, norm=layers["0"])
        if isinstance(self.shortcut, nn.Conv3d):
            x = conv_by_frames(x, tap_major(self.shortcut.weight), self.shortcut.bias, (0, 0))
        return layers["6"](h, cache, norm=layers["3"], residual=x)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame, plus a skip: ``[B,C,T,H,W]`` kept."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = RMSNorm(channels, spatial_dims=2)
        self.to_qkv = nn.Conv2d(channels, channels * 3, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        qkv = self.to_qkv(self.norm(_per_frame(x)))  # [B*T, 3C, H, W]
        # [B*T, 1 head, H*W tokens, 3C], contiguous, then split into q, k, v.
        qkv = qkv.reshape(b * t, 1, 3 * c, h * w).transpose(2, 3).contiguous()
        q, k, v = qkv.chunk(3, dim=-1)
        out = F.scaled_dot_product_attention(q, k, v)  # [B*T, 1, H*W, C]
        out = out.squeeze(1).transpose(1, 2).reshape(b * t, c, h, w)
        return _from_frames(self.proj(out), b) + x


class MiddleBlock(nn.ModuleList):
    """Residual block, attention, residual block, at the lowest resolution (shape kept)."""

    def __init__(self, channels: int) -> None:
        super().__init__(
            [ResidualBlock(channels, channels), AttentionBlock(channels), ResidualBlock(channels, channels)]
        )

    def forward(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        first, attention, second = self
        return second(attention(first(x, cache)), cache)


class Head(nn.ModuleDict):
    """RMS norm, SiLU, causal 3x3x3 conv to ``out_channels`` (keys "0" and "2" as in the checkpoint)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            {"0": RMSNorm(in_channels, spatial_dims=3), "2": CausalConv3d(in_channels, out_channels, 3)}
        )

    def forward(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        return self["2"](x, cache, norm=self["0"])


class Downsample(nn.Module):
    """Halve H and W: ``[B,C,T,H,W] -> [B,C,T',H/2,W/2]``.

    With ``temporal``, time is halved too, except that a stream's first frame passes through on
    its own (T' = T on the first call, else T/2): that is what makes 1 + 4k frames give 1 + k latents.
    """

    def __init__(self, channels: int, temporal: bool) -> None:
        super().__init__()
        # Key "1": position of the conv after a zero-pad layer in the release checkpoint.
        self.resample = nn.ModuleDict({"1": nn.Conv2d(channels, channels, 3, stride=2)})
        self.time_conv = nn.Conv3d(channels, channels, (3, 1, 1), stride=(2, 1, 1)) if temporal else None

    def forward(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        # Pad right and bottom only, so that output pixel i covers input pixels 2i..2i+2.
        x = _from_frames(self.resample["1"](F.pad(_per_frame(x), (0, 1, 0, 1))), x.shape[0])
        if self.time_conv is None:
            return x
        previous = cache.history.get(self)
        cache.history[self] = x[:, :, -1:].clone()
        if previous is None:
            return x
        return self.time_conv(torch.cat([previous, x], dim=2))


def nearest_2x(frames: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour 2x upsampling of channels-last images ``[N,C,H,W] -> [N,C,2H,2W]`` (channels-
    last out). The same values as ``F.interpolate(..., mode="nearest")``, written as one broadcast
    copy: PyTorch's channels-last nearest kernel runs far below the memory bandwidth
    (docs/performance.md)."""
    n, c, h, w = frames.shape
    pixels = frames.permute(0, 2, 3, 1)  # [N, H, W, C]
    doubled = pixels[:, :, None, :, None, :].expand(n, h, 2, w, 2, c).reshape(n, 2 * h, 2 * w, c)
    return doubled.permute(0, 3, 1, 2)


class Upsample(nn.Module):
    """Double H and W and halve the width: ``[B,C,T,H,W] -> [B,C/2,T',2H,2W]``.

    With ``temporal``, each frame after a stream's first becomes two (a causal conv to 2C channels,
    split into two frames): T' = T on the first call of a stream, else 2T.
    """

    def __init__(self, channels: int, temporal: bool) -> None:
        super().__init__()
        # Key "1": position of the conv after the nearest-neighbour layer in the release checkpoint.
        self.resample = nn.ModuleDict({"1": nn.Conv2d(channels, channels // 2, 3, padding=1)})
        self.time_conv = CausalConv3d(channels, channels * 2, (3, 1, 1)) if temporal else None
        self.enlarge = nearest_2x  # or its compiled form (compile.compile_vae)

    def forward(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        if self.time_conv is not None:
            if self in cache.started:
                x = self._split_into_frame_pairs(self.time_conv(x, cache))
            else:
                cache.started.add(self)
        # Upstream upsamples in float32 and casts back; nearest only copies values, so doing it in
        # the model's dtype gives the same frames without two full-size casts.
        frames = self.enlarge(_per_frame(x))
        return _from_frames(self.resample["1"](frames), x.shape[0])

    @staticmethod
    def _split_into_frame_pairs(y: torch.Tensor) -> torch.Tensor:
        """``[B,2C,T,H,W] -> [B,C,2T,H,W]`` (:data:`FRAMES_LAST`): channels [0,C) give frame 2t, [C,2C) frame 2t+1."""
        b, c2, t, h, w = y.shape
        pairs = y.permute(0, 2, 3, 4, 1).reshape(b, t, h, w, 2, c2 // 2)  # [B,T,H,W,2,C]
        frames = pairs.permute(0, 1, 4, 2, 3, 5).reshape(b, 2 * t, h, w, c2 // 2)  # [B,2T,H,W,C]
        return frames.permute(0, 4, 1, 2, 3)


class Encoder(nn.Module):
    """``[B,3,T,H,W] -> [B,2*z_dim,T',H/8,W/8]`` (mean and log-variance), causal in time."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        widths = [config.dim * m for m in (1, *config.dim_mult)]
        self.conv1 = CausalConv3d(3, widths[0], 3)
        layers: list[nn.Module] = []
        for level, (c_in, c_out) in enumerate(zip(widths, widths[1:])):
            for _ in range(config.num_res_blocks):
                layers.append(ResidualBlock(c_in, c_out))
                c_in = c_out
            if level < len(config.dim_mult) - 1:
                layers.append(Downsample(c_out, config.temporal_downsample[level]))
        self.downsamples = nn.ModuleList(layers)
        self.middle = MiddleBlock(widths[-1])
        self.head = Head(widths[-1], 2 * config.z_dim)

    def forward(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        x = self.conv1(x.contiguous(memory_format=FRAMES_LAST), cache)
        for layer in self.downsamples:
            x = layer(x, cache)
        return self.head(self.middle(x, cache), cache)


class Decoder(nn.Module):
    """``[B,z_dim,T,h,w] -> [B,3,T',8h,8w]``, causal in time (T' = 1 + 4(T-1) from a fresh stream)."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        widths = [config.dim * m for m in (config.dim_mult[-1], *reversed(config.dim_mult))]
        temporal_upsample = tuple(reversed(config.temporal_downsample))
        self.conv1 = CausalConv3d(config.z_dim, widths[0], 3)
        self.middle = MiddleBlock(widths[0])
        layers: list[nn.Module] = []
        c_in = widths[0]
        for level, c_out in enumerate(widths[1:]):
            for _ in range(config.num_res_blocks + 1):
                layers.append(ResidualBlock(c_in, c_out))
                c_in = c_out
            if level < len(config.dim_mult) - 1:
                layers.append(Upsample(c_out, temporal_upsample[level]))
                c_in = c_out // 2
        self.upsamples = nn.ModuleList(layers)
        self.head = Head(widths[-1], 3)

    def forward(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        x = self.middle(self.conv1(x.contiguous(memory_format=FRAMES_LAST), cache), cache)
        for layer in self.upsamples:
            x = layer(x, cache)
        return self.head(x, cache)


class WanVAE(nn.Module):
    """The Wan2.1 VAE with LiveTalk's latent normalisation. See :meth:`encode` and :meth:`stream_decoder`."""

    def __init__(self, config: VAEConfig = VAEConfig()) -> None:
        super().__init__()
        if config.z_dim != LATENT_CHANNELS:
            raise ValueError(
                f"The Wan2.1 latent statistics have {LATENT_CHANNELS} channels, not {config.z_dim}."
            )
        self.config = config
        self.encoder = Encoder(config)
        self.conv1 = nn.Conv3d(2 * config.z_dim, 2 * config.z_dim, 1)
        self.conv2 = nn.Conv3d(config.z_dim, config.z_dim, 1)
        self.decoder = Decoder(config)
        # Explicit CPU device: the statistics need real values even when the weights are built on
        # the meta device for loading. Not persistent because the release file does not hold them.
        self.register_buffer("latent_mean", torch.tensor(WAN21_LATENT_MEAN, device="cpu"), persistent=False)
        self.register_buffer("latent_std", torch.tensor(WAN21_LATENT_STD, device="cpu"), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv2.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv2.weight.device

    def _latent_scale(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, 1/std)`` as ``[1,z,1,1,1]`` in ``like``'s dtype.

        As upstream: the reciprocal is taken in that dtype (so it is rounded to bf16 in a bf16
        model) and decoding divides by it instead of multiplying by std; both matter at bf16 precision.
        """
        mean = self.latent_mean.to(device=like.device, dtype=like.dtype)
        inv_std = 1.0 / self.latent_std.to(device=like.device, dtype=like.dtype)
        return mean.view(1, -1, 1, 1, 1), inv_std.view(1, -1, 1, 1, 1)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B,3,T,H,W]`` in [-1, 1] with T = 1 + 4k -> normalised latents ``[B,z,1+k,H/8,W/8]`` float32.

        Only the mean is used (no sampling). Computation runs in the model's dtype and device.
        """
        self._check_pixels(pixels)
        x = pixels.to(device=self.device, dtype=self.dtype)
        step = self.config.temporal_factor
        cache = FeatureCache()
        # The first frame alone, then groups of `step` frames: each group becomes one latent.
        chunks = [x[:, :, :1]] + [x[:, :, i:i + step] for i in range(1, x.shape[2], step)]
        features = torch.cat([self.encoder(chunk, cache) for chunk in chunks], dim=2)
        mu = self.conv1(features)[:, : self.config.z_dim]
        mean, inv_std = self._latent_scale(mu)
        return ((mu - mean) * inv_std).float()

    def stream_decoder(self) -> StreamDecoder:
        """A fresh decoding stream; see :class:`StreamDecoder`."""
        return StreamDecoder(self)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """One-shot decode ``[B,z,F,h,w] -> [B,3,1+4(F-1),8h,8w]`` float32 in [-1, 1]."""
        return self.stream_decoder().decode(latents)

    def _decode_chunk(self, latents: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        z = latents.to(device=self.device, dtype=self.dtype)
        mean, inv_std = self._latent_scale(z)
        x = self.conv2(z / inv_std + mean)
        # One latent frame at a time bounds activation memory and runs the decoder on the same
        # shapes whatever the split of the latents into calls (conv2 above still sees the call's
        # length, for which a CPU may pick another kernel).
        frames = [self.decoder(x[:, :, i:i + 1], cache) for i in range(x.shape[2])]
        return torch.cat(frames, dim=2).float().clamp_(-1, 1)

    def _check_pixels(self, pixels: torch.Tensor) -> None:
        step, factor = self.config.temporal_factor, self.config.spatial_factor
        if pixels.ndim != 5 or pixels.shape[1] != 3:
            raise InputError(
                f"The VAE encodes video as [batch, 3, frames, height, width]; got shape {tuple(pixels.shape)}."
            )
        t, h, w = pixels.shape[2:]
        if (t - 1) % step:
            raise InputError(
                f"The VAE encodes 1 + {step}k frames (1, {1 + step}, {1 + 2 * step}, ...); got {t}."
            )
        if h % factor or w % factor or h == 0 or w == 0:
            raise InputError(
                f"Image height and width must be positive multiples of {factor}; got {h}x{w}. "
                "Resize or crop the image first."
            )


class StreamDecoder:
    """Decodes latents block by block, carrying the causal state between calls.

    The first latent frame of a stream gives 1 video frame, every later one 4; the frames equal a
    one-shot :meth:`WanVAE.decode` of all the latents up to float rounding (the 1x1 ``conv2`` runs on
    each call's length, and a CPU may pick another kernel for another length; see
    ``tests/test_vae.py``). Each stream owns its
    state, so several can run side by side. :meth:`reset` starts a new video.
    """

    def __init__(self, vae: WanVAE) -> None:
        self.vae = vae
        self.reset()

    def reset(self) -> None:
        self._cache = FeatureCache()
        self._latent_shape: tuple[int, ...] | None = None  # (batch, h, w) of this stream

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``[B,z,f,h,w]`` normalised latents -> ``[B,3,frames,8h,8w]`` float32 clamped to [-1, 1]."""
        self._latent_shape = continued_stream(latents, self.vae.config.z_dim, self._latent_shape, "The VAE")
        return self.vae._decode_chunk(latents, self._cache)


def continued_stream(
    latents: torch.Tensor, channels: int, stream_shape: tuple[int, ...] | None, decoder: str
) -> tuple[int, ...]:
    """``(batch, h, w)`` of ``latents`` ``[B, channels, f >= 1, h, w]`` that continue a decoding stream of
    ``stream_shape`` (None: a new stream); :class:`InputError` naming ``decoder`` otherwise. Every
    stream decoder's check (the VAE's, the tiny decoder's)."""
    if latents.ndim != 5 or latents.shape[1] != channels or latents.shape[2] == 0:
        raise InputError(
            f"{decoder} decodes latents shaped [batch, {channels}, frames >= 1, height, width]; got "
            f"{tuple(latents.shape)}. (Frame-major [batch, frames, {channels}, h, w] latents need "
            ".transpose(1, 2).)"
        )
    shape = (latents.shape[0], *latents.shape[3:])
    if stream_shape is not None and shape != stream_shape:
        raise InputError(
            f"These latents (batch, h, w = {shape}) do not continue the stream being decoded "
            f"({stream_shape}). Call reset() before decoding a different video."
        )
    return shape


def frames_to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """``[B,3,T,H,W]`` in [-1, 1] -> ``[B*T,H,W,3]`` uint8 (``[T,H,W,3]`` for one video).

    Maps to [0, 1], clamps, scales by 255 and truncates (as upstream's ``astype(np.uint8)``), in float32.
    """
    if pixels.ndim != 5 or pixels.shape[1] != 3:
        raise InputError(
            f"Expected decoded video [batch, 3, frames, height, width]; got {tuple(pixels.shape)}."
        )
    values = (pixels.float() * 0.5 + 0.5).clamp(0, 1) * 255
    return values.to(torch.uint8).permute(0, 2, 3, 4, 1).flatten(0, 1)


def load_vae(
    path: str | os.PathLike,
    dtype: torch.dtype | str = torch.bfloat16,
    device: str | torch.device = "cpu",
) -> WanVAE:
    """Load ``Wan2.1_VAE.pth`` or Comfy-Org's ``wan_2.1_vae.safetensors`` (any float dtype).

    A ``first_stage_model.`` or ``vae.`` prefix is removed. The architecture is read from the
    tensor shapes; keys and shapes must then match it exactly. Raises :class:`CheckpointError`.
    """
    dtype = resolve_dtype(dtype)
    state_dict = strip_prefix(read_state_dict(path, what=MODEL_NAME), ("first_stage_model.", "vae."))
    _reject_other_latent_spaces(state_dict, path)
    try:
        config = VAEConfig.from_state_dict(state_dict)
    except ValueError:
        # Not laid out like a Wan VAE at all: the key check against the release layout below
        # then names what the file looks like and which keys are missing.
        config = VAEConfig()
    with torch.device("meta"):
        model = WanVAE(config)
    check_state_dict(state_dict, model.state_dict(), path=path, model_name=MODEL_NAME)
    model.load_state_dict(
        {k: v.to(device=device, dtype=dtype) for k, v in state_dict.items()}, strict=True, assign=True
    )
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def _reject_other_latent_spaces(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """A VAE with another number of latent channels (the Wan2.2 VAE has 48) cannot serve LiveTalk."""
    conv2 = state_dict.get("conv2.weight")
    if conv2 is None or conv2.ndim == 0 or conv2.shape[0] == LATENT_CHANNELS:
        return
    which = " (the Wan2.2 VAE)" if conv2.shape[0] == 48 else ""
    raise CheckpointError(
        f"{path} is a VAE with {conv2.shape[0]} latent channels{which}. LiveTalk needs the "
        f"{LATENT_CHANNELS}-channel Wan2.1 VAE: {WHERE_TO_GET_IT}."
    )
