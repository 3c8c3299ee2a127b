"""RealVideo's causal Wan2.2-S2V DiT (14B) on the shared Wan core.

Additions to :class:`~.wan_dit.WanDiTCore`, with the Wan2.2-S2V parameter names:

* ``trainable_cond_mask`` (Embedding(3, C)): row 0 is added to generated-video tokens, row 1 to
  the reference image's tokens (row 2, motion frames, is unused by RealVideo);
* ``casual_audio_encoder`` (:class:`CausalAudioEncoder`, upstream's spelling): mixes the 25 wav2vec2
  hidden states with learnt SiLU weights and runs a causal conv stack that turns 4 video frames
  into one latent frame, giving per latent frame 4 + 1 "local" tokens and one "global" vector;
* ``audio_injector``: after each of the inject layers, every latent frame's tokens are AdaLN-
  modulated by the frame's global vector and cross-attend to the frame's 5 local tokens;
* ``cond_encoder`` and ``frame_packer``: pose and FramePack-motion inputs of the original S2V model;
  RealVideo never calls them, they exist only so that release files load strictly.

The reference image is not part of a block's input: :meth:`S2VDiT.prefill` runs it once at t = 0
(RoPE frame 30) to fill the KV cache's sink, and every block attends to it there.

Shapes: C width, H heads, D = 128, A wav2vec2 width, h x w latent size, N = (h/2)(w/2) tokens per
latent frame, T' latent audio steps of a segment.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import CheckpointError
from ..media.checkpoint import check_keys, check_state_dict, resolve_dtype, split_fp8_scales, strip_prefix
from ..media.vae import LATENT_CHANNELS
from ..runtime.cuda_graphs import ForwardGraphs
from ..wan.dit import HEAD_DIM, CrossAttention, WanCoreConfig, WanDiTCore
from ..wan.kv_cache import KVCache
from ..wan.rope import grid_rotations

CHECKPOINT_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.")
MODEL_NAME = "RealVideo / Wan2.2-S2V DiT"
# Wan2.2-S2V-14B (40 layers): the only released layout; other depths must name their layers.
RELEASE_INJECT_LAYERS = (0, 4, 8, 12, 16, 20, 24, 27, 30, 33, 36, 39)
VIDEO_TOKEN, REFERENCE_TOKEN = 0, 1
NUM_TOKEN_KINDS = 3
# The audio encoder's causal warm-up: 73 copies of the first feature frame are prepended and the
# 19 latent steps they produce are dropped (upstream ``motion_frames = [73, 19]``).
AUDIO_WARMUP_FRAMES = 73
AUDIO_WARMUP_LATENTS = 19
MOTION_ENCODER_EPS = 1e-6
ADAIN_EPS = 1e-5
FRAME_PACKER_KERNELS = {"proj": (1, 2, 2), "proj_2x": (2, 4, 4), "proj_4x": (4, 8, 8)}


@dataclass(frozen=True)
class S2VConfig:
    core: WanCoreConfig
    audio_dim: int
    audio_layers: int
    audio_tokens: int
    inject_layers: tuple[int, ...]
    cond_dim: int
    has_frame_packer: bool = True

    def injector_for_layer(self, layer: int) -> int | None:
        """Index of the audio injector that runs after ``layer``, or None."""
        return self.inject_layers.index(layer) if layer in self.inject_layers else None

    @classmethod
    def from_state_dict(
        cls, sd: dict[str, torch.Tensor], inject_layers: Sequence[int] | None = None
    ) -> S2VConfig:
        """Geometry from tensor shapes. Which layers carry the injectors is not in the file: the
        release layout is assumed for 12 injectors on 40 layers, anything else must pass it."""
        core = WanCoreConfig.from_state_dict(sd)
        local = sd["casual_audio_encoder.encoder.conv1_local.conv.weight"]
        global_ = sd["casual_audio_encoder.encoder.conv1_global.conv.weight"]
        num_injectors = len([k for k in sd if k.startswith("audio_injector.injector.") and k.endswith(".q.weight")])
        if inject_layers is None:
            if (core.num_layers, num_injectors) != (40, len(RELEASE_INJECT_LAYERS)):
                raise CheckpointError(
                    f"This S2V DiT has {core.num_layers} layers and {num_injectors} audio injectors; the layers "
                    "they follow are only known for the 40-layer release (12 injectors). Pass audio_inject_layers "
                    "(the model's config.json lists them)."
                )
            inject_layers = RELEASE_INJECT_LAYERS
        inject_layers = tuple(int(i) for i in inject_layers)
        if len(inject_layers) != num_injectors or len(set(inject_layers)) != num_injectors or not all(
            0 <= i < core.num_layers for i in inject_layers
        ):
            raise CheckpointError(
                f"audio_inject_layers {list(inject_layers)} does not fit a DiT with {core.num_layers} layers and "
                f"{num_injectors} audio injectors: give {num_injectors} distinct layer indices."
            )
        cond = sd.get("cond_encoder.weight")
        return cls(
            core=core,
            audio_dim=local.shape[1],
            audio_layers=sd["casual_audio_encoder.weights"].shape[1],
            audio_tokens=local.shape[0] // global_.shape[0],
            inject_layers=inject_layers,
            cond_dim=0 if cond is None else cond.shape[1],
            has_frame_packer="frame_packer.proj.weight" in sd,
        )

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        c, a, p = self.core.dim, self.audio_dim, self.core.patch_size
        quarter = c // 4
        enc = "casual_audio_encoder."
        shapes = self.core.core_shapes()
        shapes.update(
            {
                "trainable_cond_mask.weight": (NUM_TOKEN_KINDS, c),
                enc + "weights": (1, self.audio_layers, 1, 1),
                enc + "encoder.padding_tokens": (1, 1, 1, c),
                enc + "encoder.conv1_local.conv.weight": (quarter * self.audio_tokens, a, 3),
                enc + "encoder.conv1_local.conv.bias": (quarter * self.audio_tokens,),
                enc + "encoder.conv1_global.conv.weight": (quarter, a, 3),
                enc + "encoder.conv1_global.conv.bias": (quarter,),
                enc + "encoder.conv2.conv.weight": (c // 2, quarter, 3),
                enc + "encoder.conv2.conv.bias": (c // 2,),
                enc + "encoder.conv3.conv.weight": (c, c // 2, 3),
                enc + "encoder.conv3.conv.bias": (c,),
                enc + "encoder.final_linear.weight": (c, c),
                enc + "encoder.final_linear.bias": (c,),
            }
        )
        for k in range(len(self.inject_layers)):
            inj = f"audio_injector.injector.{k}."
            for proj in "qkvo":
                shapes[f"{inj}{proj}.weight"] = (c, c)
                shapes[f"{inj}{proj}.bias"] = (c,)
            shapes[inj + "norm_q.weight"] = (c,)
            shapes[inj + "norm_k.weight"] = (c,)
            shapes[f"audio_injector.injector_adain_layers.{k}.linear.weight"] = (2 * c, c)
            shapes[f"audio_injector.injector_adain_layers.{k}.linear.bias"] = (2 * c,)
        if self.cond_dim:
            shapes["cond_encoder.weight"] = (c, self.cond_dim, *p)
            shapes["cond_encoder.bias"] = (c,)
        if self.has_frame_packer:
            for name, kernel in FRAME_PACKER_KERNELS.items():
                shapes[f"frame_packer.{name}.weight"] = (c, self.core.in_dim, *kernel)
                shapes[f"frame_packer.{name}.bias"] = (c,)
        return shapes


class CausalConv1d(nn.Module):
    """Conv1d over time with ``kernel - 1`` replicated frames of left padding (no look-ahead)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, kernel: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C_in, T]`` float32 -> ``[B, C_out, ceil(T / stride)]`` float32 (weights upcast)."""
        x = F.pad(x, (self.conv.kernel_size[0] - 1, 0), mode="replicate")
        return F.conv1d(x, self.conv.weight.float(), self.conv.bias.float(), stride=self.conv.stride)


class MotionEncoder(nn.Module):
    """Upstream ``MotionEncoder_tc``: 4x temporal downsampling of the mixed wav2vec2 features."""

    def __init__(self, audio_dim: int, dim: int, num_tokens: int) -> None:
        super().__init__()
        self.num_tokens = num_tokens
        self.conv1_local = CausalConv1d(audio_dim, dim // 4 * num_tokens)
        self.conv1_global = CausalConv1d(audio_dim, dim // 4)
        self.conv2 = CausalConv1d(dim // 4, dim // 2, stride=2)
        self.conv3 = CausalConv1d(dim // 2, dim, stride=2)
        self.final_linear = nn.Linear(dim, dim)
        self.padding_tokens = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def _downsample(self, x: torch.Tensor) -> torch.Tensor:
        """conv1 output ``[B', C/4, T]`` -> ``[B', T', C]``: LN+SiLU, then two strided convs with LN+SiLU."""

        def norm_act(y: torch.Tensor) -> torch.Tensor:  # channels-first in, time-first out
            y = y.transpose(1, 2)
            return F.silu(F.layer_norm(y, (y.shape[-1],), eps=MOTION_ENCODER_EPS))

        x = norm_act(x).transpose(1, 2)
        x = norm_act(self.conv2(x)).transpose(1, 2)
        return norm_act(self.conv3(x))

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, T, A]`` -> global ``[B, T', 1, C]`` and local ``[B, T', tokens + 1, C]``, float32."""
        b = features.shape[0]
        x = features.float().transpose(1, 2)
        local = self.conv1_local(x)  # [B, tokens*C/4, T]: token-major channel groups
        local = local.unflatten(1, (self.num_tokens, -1)).flatten(0, 1)
        local = self._downsample(local).unflatten(0, (b, self.num_tokens)).transpose(1, 2)
        padding = self.padding_tokens.float().expand(b, local.shape[1], 1, -1)
        local = torch.cat([local, padding], dim=2)
        glob = self._downsample(self.conv1_global(x))
        glob = F.linear(glob, self.final_linear.weight.float(), self.final_linear.bias.float())
        return glob.unsqueeze(2), local


class CausalAudioEncoder(nn.Module):
    """Learnt mix of the wav2vec2 layers followed by :class:`MotionEncoder` (upstream name kept)."""

    def __init__(self, audio_dim: int, num_layers: int, dim: int, num_tokens: int) -> None:
        super().__init__()
        self.weights = nn.Parameter(torch.zeros(1, num_layers, 1, 1))
        self.encoder = MotionEncoder(audio_dim, dim, num_tokens)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, layers, A, F]`` -> global ``[B, T', 1, C]``, local ``[B, T', tokens + 1, C]`` (float32).

        The layer mix runs in the features' dtype (bf16 upstream); the conv stack in float32, as
        upstream's autocast region does on a GPU.
        """
        w = F.silu(self.weights.to(features.dtype))
        mixed = ((features * w) / w.sum(dim=1, keepdim=True)).sum(dim=1)
        return self.encoder(mixed.transpose(1, 2))


class AdaLayerNorm(nn.Module):
    """LayerNorm (eps 1e-5, no affine) modulated by ``Linear(SiLU(emb))`` split into (shift, scale)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """x ``[B, N, C]``, emb ``[B, C]`` -> float32 ``[B, N, C]`` (kept in float32 like upstream's autocast)."""
        shift, scale = self.linear(F.silu(emb)).float().unsqueeze(1).chunk(2, dim=-1)
        return F.layer_norm(x.float(), (x.shape[-1],), eps=ADAIN_EPS) * (1 + scale) + shift


def inject_audio(
    adain: AdaLayerNorm,
    attn: CrossAttention,
    tokens: torch.Tensor,
    audio_global: torch.Tensor,
    audio_local: torch.Tensor,
    backend: str,
) -> torch.Tensor:
    """One audio injection: tokens ``[B, F*N, C]``, audio_global ``[B, F, 1, C]``, audio_local
    ``[B, F, K, C]`` -> tokens. Each latent frame's tokens only see that frame's audio.

    A plain function of the injection's two modules, so that one compiled graph serves every
    injection (:func:`~.compile.compile_blocks`).
    """
    b, f = audio_local.shape[:2]
    per_frame = tokens.unflatten(1, (f, -1)).flatten(0, 1)  # [B*F, N, C]
    h = adain(per_frame, audio_global.flatten(0, 1)[:, 0]).to(tokens.dtype)
    kv = attn.project_context(audio_local.flatten(0, 1))
    return tokens + attn(h, kv, backend).unflatten(0, (b, f)).flatten(1, 2)


class AudioInjector(nn.Module):
    """The per-layer audio cross-attentions and their AdaLN (upstream ``AudioInjector_WAN``)."""

    def __init__(self, dim: int, num_heads: int, count: int, eps: float) -> None:
        super().__init__()
        self.injector = nn.ModuleList(CrossAttention(dim, num_heads, eps) for _ in range(count))
        self.injector_adain_layers = nn.ModuleList(AdaLayerNorm(dim) for _ in range(count))
        self.inject = inject_audio  # or its compiled form (compile.compile_blocks)

    def forward(
        self, index: int, tokens: torch.Tensor, audio_global: torch.Tensor, audio_local: torch.Tensor, backend: str
    ) -> torch.Tensor:
        """Injection ``index`` (see :func:`inject_audio`)."""
        return self.inject(
            self.injector_adain_layers[index], self.injector[index], tokens, audio_global, audio_local, backend
        )


class FramePacker(nn.Module):
    """FramePack motion compression of the original S2V model: loaded, never run by RealVideo."""

    def __init__(self, dim: int, in_dim: int) -> None:
        super().__init__()
        for name, kernel in FRAME_PACKER_KERNELS.items():
            setattr(self, name, nn.Conv3d(in_dim, dim, kernel_size=kernel, stride=kernel))


def shard_rotations(
    frame_positions: torch.Tensor, grid: tuple[int, int, int], grid_offset: tuple[int, int] = (0, 0)
) -> torch.Tensor:
    """RoPE rotations of a ``grid`` = (frames, h, w) token grid whose patch rows and columns start at
    ``grid_offset`` in the full latent (non-zero for a shard under sequence parallelism).

    Returns float64 ``[frames*h*w, 1, 2, D]`` (:func:`~.rope.grid_rotations`) on ``frame_positions``' device.
    """
    f, gh, gw = grid
    oh, ow = grid_offset
    full = grid_rotations(frame_positions, oh + gh, ow + gw, HEAD_DIM)
    return full.unflatten(0, (f, oh + gh, ow + gw))[:, oh:, ow:].flatten(0, 2)


@dataclass(frozen=True)
class AudioTokens:
    """The DiT-side audio of one segment, warm-up dropped: per latent frame one global vector and
    ``tokens + 1`` local tokens, in the model dtype."""

    global_: torch.Tensor  # [1, L, 1, C]
    local: torch.Tensor  # [1, L, K, C]

    @property
    def num_frames(self) -> int:
        return self.local.shape[1]

    def window(self, start: int, length: int) -> AudioTokens:
        """Frames ``[start, start + length)``, copied: a view's strides would depend on the segment's
        length, and the compiled audio injection would recompile for the last (shorter) segment in
        the middle of a stream."""
        window = slice(start, start + length)
        own = torch.contiguous_format
        return AudioTokens(
            self.global_[:, window].clone(memory_format=own), self.local[:, window].clone(memory_format=own)
        )


class S2VDiT(WanDiTCore):
    def __init__(self, config: S2VConfig) -> None:
        super().__init__(config.core)
        c = config.core
        self.s2v_config = config
        self.trainable_cond_mask = nn.Embedding(NUM_TOKEN_KINDS, c.dim)
        self.casual_audio_encoder = CausalAudioEncoder(
            config.audio_dim, config.audio_layers, c.dim, config.audio_tokens
        )
        self.audio_injector = AudioInjector(c.dim, c.num_heads, len(config.inject_layers), c.eps)
        if config.cond_dim:
            self.cond_encoder = nn.Conv3d(config.cond_dim, c.dim, kernel_size=c.patch_size, stride=c.patch_size)
        if config.has_frame_packer:
            self.frame_packer = FramePacker(c.dim, c.in_dim)

    def heavy_linears(self) -> dict[str, nn.Linear]:
        """The blocks' and the audio injectors' Linear layers (~14 of the 16.3 B parameters of the 14B)."""
        injector = {
            f"audio_injector.{name}.weight": module
            for name, module in self.audio_injector.named_modules()
            if isinstance(module, nn.Linear)
        }
        return {**super().heavy_linears(), **injector}

    def compile_regions(self) -> list[tuple[object, str]]:
        """The blocks' regions and the audio injection (see :meth:`WanDiTCore.compile_regions`)."""
        return [*super().compile_regions(), (self.audio_injector, "inject")]

    def encode_audio(self, features: torch.Tensor) -> AudioTokens:
        """One segment's audio input ``[1, layers, A, F]`` -> :class:`AudioTokens` of ``F // 4`` frames.

        The encoder is causal, so encoding the whole segment once equals upstream's re-encoding in
        every forward; a segment's first frame is replicated in front as the warm-up.
        """
        features = features.to(self.device, self.dtype)
        warmup = features[..., :1].expand(-1, -1, -1, AUDIO_WARMUP_FRAMES)
        glob, local = self.casual_audio_encoder(torch.cat([warmup, features], dim=-1))
        keep = slice(AUDIO_WARMUP_LATENTS, None)
        return AudioTokens(glob[:, keep].to(self.dtype), local[:, keep].to(self.dtype))

    def _run(
        self,
        latents: torch.Tensor,
        kind: int,
        t: torch.Tensor,
        frame_positions: torch.Tensor,
        context_kv: list[tuple[torch.Tensor, torch.Tensor]],
        cache: KVCache,
        audio: AudioTokens | None,
        grid_offset: tuple[int, int],
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int, int]]:
        """The layers over ``latents``; the caller has set the cache's block (:meth:`KVCache.set_block`)."""
        tokens, grid = self.patchify(latents)
        tokens = tokens + self.trainable_cond_mask.weight[kind].to(tokens.dtype)
        # One timestep for all tokens: a single modulation row broadcast over frames.
        t_emb, t_mod = self.embed_time(t.reshape(1, 1))
        rotations = shard_rotations(frame_positions, grid, grid_offset)
        for layer, block in enumerate(self.blocks):
            tokens = block(tokens, t_mod, rotations, context_kv[layer], cache, layer, self.attention_backend)
            j = self.s2v_config.injector_for_layer(layer)
            if audio is not None and j is not None:
                tokens = self.audio_injector(j, tokens, audio.global_, audio.local, self.attention_backend)
        return tokens, t_emb, grid

    def prefill(
        self,
        ref_latent: torch.Tensor,
        context_kv: list[tuple[torch.Tensor, torch.Tensor]],
        cache: KVCache,
        rope_position: int,
        grid_offset: tuple[int, int] = (0, 0),
    ) -> None:
        """Write the reference latent ``[1, 16, 1, h, w]`` (t = 0, no audio) into cache frame 0."""
        t = torch.zeros((), dtype=torch.float64, device=self.device)
        positions = torch.tensor([rope_position], device=self.device)
        cache.set_block(0, 1)
        self._run(ref_latent, REFERENCE_TOKEN, t, positions, context_kv, cache, None, grid_offset)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        audio: AudioTokens,
        context_kv: list[tuple[torch.Tensor, torch.Tensor]],
        cache: KVCache,
        start_frame: int,
        compute_output: bool = True,
        grid_offset: tuple[int, int] = (0, 0),
        graphs: ForwardGraphs | None = None,
    ) -> torch.Tensor | None:
        """Predict the flow ``v`` of one block.

        Args:
            x: noisy latents ``[1, 16, F, h, w]``.
            t: the block's timestep, 0-dim (float64 to embed the float32 value without re-rounding).
            audio: this block's :meth:`AudioTokens.window` (``F`` frames).
            context_kv: :meth:`project_context` of the text context.
            cache: the session's KV cache; ``start_frame`` is the block's stream frame, which is
                also its RoPE position.
            compute_output: False for the cache-refresh pass, whose output is discarded.
            grid_offset: (h, w) patch offset of this latent shard (sequence parallelism).
            graphs: the session's :class:`~.cuda_graphs.ForwardGraphs` to replay the forward from
                (the refresh pass then computes the output too: one small Linear).
        Returns:
            ``v`` ``[1, 16, F, h, w]`` in the model dtype, or None.
        """
        f = x.shape[2]
        if audio.num_frames != f:
            raise ValueError(f"the block has {f} latent frames but its audio window has {audio.num_frames}")
        positions = torch.arange(start_frame, start_frame + f, device=self.device)
        cache.set_block(start_frame, f)

        def predict(x: torch.Tensor, t: torch.Tensor, positions: torch.Tensor, audio_global: torch.Tensor,
                    audio_local: torch.Tensor) -> torch.Tensor:
            audio = AudioTokens(audio_global, audio_local)
            tokens, t_emb, grid = self._run(x, VIDEO_TOKEN, t, positions, context_kv, cache, audio, grid_offset)
            return self.unpatchify(self.head(tokens, t_emb), grid)

        if graphs is not None:
            key = (cache.block_layout, id(context_kv), grid_offset)
            v = graphs(key, predict, x, t, positions, audio.global_, audio.local)
            return v if compute_output else None
        if not compute_output:
            self._run(x, VIDEO_TOKEN, t, positions, context_kv, cache, audio, grid_offset)
            return None
        return predict(x, t, positions, audio.global_, audio.local)


def s2v_config_from_state_dict(
    sd: dict[str, torch.Tensor], path: str | os.PathLike, inject_layers: Sequence[int] | None = None
) -> S2VConfig:
    """Infer the config, then check every key and shape; one clear error if the file is not an S2V DiT."""
    needed = (
        "patch_embedding.weight",
        "head.head.weight",
        "blocks.0.ffn.0.weight",
        "text_embedding.0.weight",
        "time_embedding.0.weight",
        "casual_audio_encoder.weights",
        "casual_audio_encoder.encoder.conv1_local.conv.weight",
        "casual_audio_encoder.encoder.conv1_global.conv.weight",
        "audio_injector.injector_adain_layers.0.linear.weight",
    )
    if any(k not in sd for k in needed):
        check_keys(sd.keys(), needed, path=path, model_name=MODEL_NAME)
    config = S2VConfig.from_state_dict(sd, inject_layers)
    if config.core.in_dim != LATENT_CHANNELS or config.core.dim % HEAD_DIM:
        raise CheckpointError(
            f"{path} is a DiT with {config.core.in_dim} input channels and width {config.core.dim}; the S2V DiT "
            f"has {LATENT_CHANNELS} input channels and a width that is a multiple of {HEAD_DIM}."
        )
    check_state_dict(sd, config.expected_shapes(), path=path, model_name=MODEL_NAME)
    return config


def _layout_keys() -> frozenset[str]:
    """Key names of the S2V layout (a one-layer instance: numbers are ignored when matching)."""
    core = WanCoreConfig(
        dim=HEAD_DIM, in_dim=LATENT_CHANNELS, out_dim=LATENT_CHANNELS, ffn_dim=1, num_layers=1, text_dim=1
    )
    config = S2VConfig(core=core, audio_dim=1, audio_layers=1, audio_tokens=1, inject_layers=(0,), cond_dim=1)
    return frozenset(config.expected_shapes())


def _missing_keys(sd: Mapping[str, torch.Tensor], inject_layers: Sequence[int] | None) -> list[str] | None:
    """Tensors ``sd`` lacks for the model its shapes describe; None if they describe none; [] when
    complete or when the strict check of :func:`s2v_config_from_state_dict` should explain."""
    try:
        config = S2VConfig.from_state_dict(sd, inject_layers)
    except KeyError:
        return None
    except CheckpointError:
        return []
    return sorted(set(config.expected_shapes()) - set(sd))


def s2v_checkpoint_kind(shapes: Mapping[str, Sequence[int]]) -> str | None:
    """What a checkpoint is from its tensor names and shapes alone (a safetensors header): COMPLETE,
    PARTIAL (a fine-tune that needs a base) or None (no S2V DiT), as :func:`load_s2v_dit` would find
    it (:mod:`.s2v_checkpoint`). The release's audio-injector layers are assumed."""
    from .checkpoint import checkpoint_kind

    meta = {k: torch.empty(tuple(shape), device="meta") for k, shape in shapes.items()}
    state, _ = split_fp8_scales(strip_prefix(meta, CHECKPOINT_PREFIXES))
    return checkpoint_kind(state, known_keys=_layout_keys(), missing_keys=lambda sd: _missing_keys(sd, None))


def load_s2v_dit(
    path: str | os.PathLike,
    dtype: torch.dtype | str = torch.bfloat16,
    device: torch.device | str = "cpu",
    *,
    audio_inject_layers: Sequence[int] | None = None,
    base: str | os.PathLike | None = None,
    fp8_weights: bool = False,
    fp8_matmul: bool = False,
) -> S2VDiT:
    """Load an S2V DiT in any layout of :mod:`.s2v_checkpoint`: RealVideo's ``model.pt``
    (``{"generator": {"model.<name>": ...}}``), a bare-key ``diffusion_model.safetensors``
    (Comfy-Org bf16 or ``_fp8_scaled``), or the Wan2.2-S2V-14B diffusers shards (index or folder).

    ``path`` may be complete, or a partial fine-tune applied over ``base`` (any layout); the model's
    ``checkpoint_info`` (:class:`~.s2v_checkpoint.CheckpointInfo`) says which was found. Tensors go
    to ``device`` in ``dtype`` one at a time (pickles are memory-mapped), so no full-size float32
    copy is ever made. ``fp8_weights`` keeps the block and injector Linear weights in float8 with a
    per-tensor scale (:mod:`.fp8_linear`; the file's own fp8 values when it is fp8-scaled), about
    halving the weight memory. ``fp8_matmul`` also keeps them in fp8 (one scale per output channel
    when rounded here) and runs them as fp8 matmuls (:class:`~.fp8_linear.FP8MatmulLinear`; on a GPU
    without fp8 tensor cores they stay fp8 weights). ``audio_inject_layers`` is only needed for non-release depths (see
    :meth:`S2VConfig.from_state_dict`).
    """
    from ..wan.fp8_linear import FP8, dequantize, quantize, to_fp8_linear, use_fp8_matmuls
    from .checkpoint import read_s2v_checkpoint

    dtype = resolve_dtype(dtype)
    sd, scales, info = read_s2v_checkpoint(
        path,
        base,
        prefixes=CHECKPOINT_PREFIXES,
        what=MODEL_NAME,
        known_keys=_layout_keys(),
        missing_keys=lambda state: _missing_keys(state, audio_inject_layers),
    )
    config = s2v_config_from_state_dict(sd, path if base is None else f"{base} + {path}", audio_inject_layers)
    with torch.device("meta"):
        model = S2VDiT(config)
    fp8_layers = model.heavy_linears() if fp8_weights or fp8_matmul else {}
    fp8_scales: dict[str, torch.Tensor] = {}
    tensors: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        value = value.to(device)
        if key in fp8_layers:
            if key in scales and value.dtype == FP8:
                tensors[key], fp8_scales[key] = value, scales[key]
            else:
                weight = dequantize(value, scales[key], dtype) if key in scales else value
                tensors[key], fp8_scales[key] = quantize(weight, per_row=fp8_matmul)
        else:
            tensors[key] = dequantize(value, scales[key], dtype) if key in scales else value.to(dtype)
    model.load_state_dict(tensors, strict=True, assign=True)
    for key, module in fp8_layers.items():
        to_fp8_linear(module, fp8_scales[key])
    if fp8_matmul:
        use_fp8_matmuls(fp8_layers.values())
    model.checkpoint_info = info
    return model.eval().requires_grad_(False)
