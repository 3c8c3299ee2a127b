"""The Wan transformer core shared by the LiveTalk (1.3B) and RealVideo (14B) DiTs.

Module and parameter names follow the Wan-native checkpoints (``blocks.{i}.self_attn.q``,
``norm3``, ``ffn.0``, ``head.modulation``, ...), so state dicts load without renaming.

Shapes: B batch, F latent frames in the forward, S = F*N tokens (N tokens per latent frame),
C model width, H heads, D = C/H = 128 head width, L text tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..options import EAGER
from .attention import attention
from .kv_cache import EAGER_FP8, CachePolicy, KVCache
from .rope import apply_rotary

if TYPE_CHECKING:
    from ..parallel.sequence_parallel import SequenceParallel

HEAD_DIM = 128


@dataclass(frozen=True)
class WanCoreConfig:
    """Geometry of a Wan DiT, as read from a state dict."""

    dim: int
    in_dim: int
    out_dim: int
    ffn_dim: int
    num_layers: int
    text_dim: int
    freq_dim: int = 256
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6

    @property
    def num_heads(self) -> int:
        return self.dim // HEAD_DIM

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor]) -> WanCoreConfig:
        patch = sd["patch_embedding.weight"]
        return cls(
            dim=patch.shape[0],
            in_dim=patch.shape[1],
            out_dim=sd["head.head.weight"].shape[0] // math.prod(patch.shape[2:]),
            ffn_dim=sd["blocks.0.ffn.0.weight"].shape[0],
            num_layers=1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks.")),
            text_dim=sd["text_embedding.0.weight"].shape[1],
            freq_dim=sd["time_embedding.0.weight"].shape[1],
            patch_size=tuple(patch.shape[2:]),
        )

    def core_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every parameter of the shared core with its shape (used for strict key checks)."""
        c, p = self.dim, self.patch_size
        shapes: dict[str, tuple[int, ...]] = {
            "patch_embedding.weight": (c, self.in_dim, *p),
            "patch_embedding.bias": (c,),
            "text_embedding.0.weight": (c, self.text_dim),
            "text_embedding.0.bias": (c,),
            "text_embedding.2.weight": (c, c),
            "text_embedding.2.bias": (c,),
            "time_embedding.0.weight": (c, self.freq_dim),
            "time_embedding.0.bias": (c,),
            "time_embedding.2.weight": (c, c),
            "time_embedding.2.bias": (c,),
            "time_projection.1.weight": (6 * c, c),
            "time_projection.1.bias": (6 * c,),
            "head.modulation": (1, 2, c),
            "head.head.weight": (self.out_dim * math.prod(p), c),
            "head.head.bias": (self.out_dim * math.prod(p),),
        }
        for i in range(self.num_layers):
            b = f"blocks.{i}."
            shapes[b + "modulation"] = (1, 6, c)
            for attn in ("self_attn", "cross_attn"):
                for proj in "qkvo":
                    shapes[f"{b}{attn}.{proj}.weight"] = (c, c)
                    shapes[f"{b}{attn}.{proj}.bias"] = (c,)
                shapes[f"{b}{attn}.norm_q.weight"] = (c,)
                shapes[f"{b}{attn}.norm_k.weight"] = (c,)
            shapes[b + "norm3.weight"] = (c,)
            shapes[b + "norm3.bias"] = (c,)
            shapes[b + "ffn.0.weight"] = (self.ffn_dim, c)
            shapes[b + "ffn.0.bias"] = (self.ffn_dim,)
            shapes[b + "ffn.2.weight"] = (c, self.ffn_dim)
            shapes[b + "ffn.2.bias"] = (c,)
        return shapes


def sinusoidal_embedding(dim: int, t: torch.Tensor) -> torch.Tensor:
    """``[cos(t*w), sin(t*w)]`` with ``w_i = 10000^(-i/(dim/2))``, in float64, cast to ``t.dtype``.

    ``t``: ``[n]``. Returns ``[n, dim]``. Casting to the timestep dtype (bf16 in a bf16 run) is what
    upstream does, and it changes the result measurably.
    """
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device).div(half))
    angles = torch.outer(t.to(torch.float64), freqs)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1).to(t.dtype)


class RMSNorm(nn.Module):
    """RMS norm over the last dim with float32 statistics; the weight is applied after the cast."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, num_frames: int) -> torch.Tensor:
    """Per-frame ``x*(1+scale)+shift``: x ``[B, S, C]``, shift/scale ``[B, F, 1, C]`` (F divides S)."""
    return (x.unflatten(1, (num_frames, -1)) * (1 + scale) + shift).flatten(1, 2)


def gated(y: torch.Tensor, gate: torch.Tensor, num_frames: int) -> torch.Tensor:
    """Per-frame ``y*gate``: y ``[B, S, C]``, gate ``[B, F, 1, C]``."""
    return (y.unflatten(1, (num_frames, -1)) * gate).flatten(1, 2)


class QKNormAttention(nn.Module):
    """The q/k/v/o projections with q/k RMSNorm over the full width that every Wan attention has."""

    def __init__(self, dim: int, num_heads: int, eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)


class SelfAttention(QKNormAttention):
    """Self-attention with 3-axis RoPE and an optional KV cache.

    With a sequence-parallel group attached (:func:`~.sequence_parallel.attach`), ``x`` holds this
    rank's tokens; attention and the cache then work on all tokens of this rank's heads.
    """

    sp: SequenceParallel | None = None

    def project(self, x: torch.Tensor, rotations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x ``[B, S, C]``, rotations ``[S, 1, 2, D]`` (:mod:`~.rope`) -> rotated q, k and v ``[B, S, H, D]``."""
        heads = (self.num_heads, -1)
        q = apply_rotary(self.norm_q(self.q(x)).unflatten(2, heads), rotations)
        k = apply_rotary(self.norm_k(self.k(x)).unflatten(2, heads), rotations)
        return q, k, self.v(x).unflatten(2, heads)

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache | None, layer: int, backend: str
    ) -> torch.Tensor:
        """Write k, v to the cache and attend over it -> ``[B, S, H*D]`` (before the output projection)."""
        if self.sp is not None:
            q, k, v = self.sp.heads_from_sequence(q, k, v)
        if cache is not None:
            k, v = cache.update_and_get(layer, k, v)
        out = attention(q, k, v, backend)
        if self.sp is not None:
            out = self.sp.sequence_from_heads(out.unflatten(2, (q.shape[2], -1))).flatten(2)
        return out


class CrossAttention(QKNormAttention):
    """Attention from video tokens to a fixed context whose K/V are projected once per run."""

    def project_context(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """context ``[B, L, C]`` -> keys, values ``[B, L, H, D]``."""
        heads = (self.num_heads, -1)
        return self.norm_k(self.k(context)).unflatten(2, heads), self.v(context).unflatten(2, heads)

    def forward(self, x: torch.Tensor, context_kv: tuple[torch.Tensor, torch.Tensor], backend: str) -> torch.Tensor:
        q = self.norm_q(self.q(x)).unflatten(2, (self.num_heads, -1))
        return self.o(attention(q, *context_kv, backend))


class WanBlock(nn.Module):
    """One DiT layer: modulated self-attention, text cross-attention, modulated GELU-tanh FFN."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.self_attn = SelfAttention(dim, num_heads, eps)
        self.cross_attn = CrossAttention(dim, num_heads, eps)
        self.norm3 = nn.LayerNorm(dim, eps=eps)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))
        self.modulation = nn.Parameter(torch.zeros(1, 6, dim))
        self.gelu_in_gemm = False  # set by compile.compile_blocks: part of the fast path, not upstream's math

    def forward(
        self,
        x: torch.Tensor,
        t_mod: torch.Tensor,
        rotations: torch.Tensor,
        context_kv: tuple[torch.Tensor, torch.Tensor],
        cache: KVCache | None,
        layer: int,
        backend: str,
    ) -> torch.Tensor:
        """x ``[B, S, C]``; t_mod ``[B, F, 6, C]`` (one modulation per latent frame) -> ``[B, S, C]``.

        The work before and after the cached attention is in :meth:`attention_inputs` and
        :meth:`attention_outputs`, plain tensor functions that :func:`~.compile.compile_blocks`
        compiles once for all layers; the cache write and the attention kernel stay outside.
        """
        modulation = self.modulation.unsqueeze(1) + t_mod
        q, k, v = self.attention_inputs(x, modulation, rotations)
        attended = self.self_attn.attend(q, k, v, cache, layer, backend)
        return self.attention_outputs(x, attended, modulation, context_kv, backend)

    def attention_inputs(
        self, x: torch.Tensor, modulation: torch.Tensor, rotations: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        shift, scale = modulation[:, :, 0:1], modulation[:, :, 1:2]
        h = modulate(F.layer_norm(x, (x.shape[-1],), eps=self.eps), shift, scale, modulation.shape[1])
        return self.self_attn.project(h, rotations)

    def attention_outputs(
        self,
        x: torch.Tensor,
        attended: torch.Tensor,
        modulation: torch.Tensor,
        context_kv: tuple[torch.Tensor, torch.Tensor],
        backend: str,
    ) -> torch.Tensor:
        f = modulation.shape[1]
        gate_sa, shift_ff, scale_ff, gate_ff = (modulation[:, :, i : i + 1] for i in range(2, 6))
        x = x + gated(self.self_attn.o(attended), gate_sa, f)
        x = x + self.cross_attn(self.norm3(x), context_kv, backend)
        h = modulate(F.layer_norm(x, (x.shape[-1],), eps=self.eps), shift_ff, scale_ff, f)
        return x + gated(self.feed_forward(h), gate_ff, f)

    def feed_forward(self, h: torch.Tensor) -> torch.Tensor:
        """``ffn(h)``, ``[B, S, C] -> [B, S, C]``. With :attr:`gelu_in_gemm`, on a GPU with plain Linears,
        the tanh GELU runs in the first GEMM's epilogue (cuBLASLt, on the float32 accumulator before
        rounding): one pass over the ``[S, ffn_dim]`` activations less (docs/performance.md), and
        closer to float32."""
        up, _, down = self.ffn
        if self.gelu_in_gemm and h.is_cuda and type(up) is nn.Linear:
            hidden = torch._addmm_activation(up.bias, h.flatten(0, 1), up.weight.t(), use_gelu=True)
            return down(hidden.unflatten(0, h.shape[:2]))
        return self.ffn(h)


class WanHead(nn.Module):
    """Final LayerNorm modulated by the time *embedding* (not the 6-way projection), then Linear."""

    def __init__(self, dim: int, out_features: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.head = nn.Linear(dim, out_features)
        self.modulation = nn.Parameter(torch.zeros(1, 2, dim))

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        """x ``[B, S, C]``, t_emb ``[B, F, C]`` -> ``[B, S, out_features]``."""
        shift, scale = (self.modulation.unsqueeze(1) + t_emb.unsqueeze(2)).chunk(2, dim=2)
        h = modulate(F.layer_norm(x, (x.shape[-1],), eps=self.eps), shift, scale, t_emb.shape[1])
        return self.head(h)


class WanDiTCore(nn.Module):
    """Embeddings, the stack of :class:`WanBlock` and the head; model variants add their branches."""

    def __init__(self, config: WanCoreConfig) -> None:
        super().__init__()
        c = config.dim
        self.config = config
        self.runtime = EAGER  # how it runs: set by options.RuntimeOptions.apply, read below
        self.kv_codec = EAGER_FP8  # how an fp8 cache quantises (compile.compile_blocks fuses it)
        self.patch_embedding = nn.Conv3d(config.in_dim, c, kernel_size=config.patch_size, stride=config.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(config.text_dim, c), nn.GELU(approximate="tanh"), nn.Linear(c, c))
        self.time_embedding = nn.Sequential(nn.Linear(config.freq_dim, c), nn.SiLU(), nn.Linear(c, c))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(c, 6 * c))
        self.blocks = nn.ModuleList(
            WanBlock(c, config.num_heads, config.ffn_dim, config.eps) for _ in range(config.num_layers)
        )
        self.head = WanHead(c, config.out_dim * math.prod(config.patch_size), config.eps)

    @property
    def attention_backend(self) -> str:
        """The attention kernel (:mod:`.attention`), from :attr:`runtime`."""
        return self.runtime.attention

    @property
    def fp8_kv_cache(self) -> bool:
        """Whether the samplers' KV cache is stored in fp8 (:class:`~.kv_cache.KVCache`)."""
        return self.runtime.fp8_kv_cache

    @property
    def cuda_graphs(self) -> bool:
        """Whether the samplers may replay forwards as CUDA graphs (:func:`~.cuda_graphs.eager_reason`
        adds what the session decides: cache, GPU, ranks)."""
        return self.runtime.graphs_asked

    @property
    def parallel_ranks(self) -> int:
        """How many ranks share each attention (:mod:`..parallel.sequence_parallel`); 1 on one GPU."""
        sp = self.blocks[0].self_attn.sp
        return 1 if sp is None else sp.world_size

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.patch_embedding.weight.device

    def heavy_linears(self) -> dict[str, nn.Linear]:
        """The Linear layers that carry nearly all of the model's matmul work (those of the blocks),
        by weight key; what ``fp8_weights`` / ``fp8_matmul`` convert."""
        return {
            f"blocks.{name}.weight": module
            for name, module in self.blocks.named_modules()
            if isinstance(module, nn.Linear)
        }

    def compile_regions(self) -> list[tuple[object, str]]:
        """``(owner, attribute)`` of every plain tensor function that :func:`~.compile.compile_blocks`
        replaces by its compiled form: each block's work before and after the cached attention."""
        return [(block, name) for block in self.blocks for name in ("attention_inputs", "attention_outputs")]

    def new_kv_cache(self, policy: CachePolicy, *, frame_tokens: int, num_heads: int) -> KVCache:
        """A KV cache for one sampling run: ``frame_tokens`` per latent frame, ``num_heads`` of this
        process, in the model's dtype (fp8 storage when :attr:`fp8_kv_cache` is set)."""
        return KVCache(policy, num_layers=self.config.num_layers, frame_tokens=frame_tokens, num_heads=num_heads,
                       head_dim=HEAD_DIM, dtype=self.dtype, device=self.device, fp8=self.fp8_kv_cache,
                       codec=self.kv_codec)

    def embed_time(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """t ``[B, F]`` -> time embedding ``[B, F, C]`` and block modulation ``[B, F, 6, C]``."""
        sin = sinusoidal_embedding(self.config.freq_dim, t.flatten()).to(self.dtype)
        t_emb = self.time_embedding(sin)
        t_mod = self.time_projection(t_emb).unflatten(1, (6, self.config.dim))
        return t_emb.unflatten(0, t.shape), t_mod.unflatten(0, t.shape)

    def project_context(self, context: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Text context ``[B, L, text_dim]`` -> per-layer cross-attention K/V (computed once per run)."""
        ctx = self.text_embedding(context.to(self.dtype))
        return [block.cross_attn.project_context(ctx) for block in self.blocks]

    def patchify(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """``[B, in_dim, F, h, w]`` -> tokens ``[B, F*h'*w', C]`` in (f, h, w) order, and the grid."""
        x = self.patch_embedding(x.to(self.dtype))
        grid = tuple(x.shape[2:])
        # Contiguous: a transposed view would hand its layout (channels far apart) on to every
        # residual add, so that each layer's norms and adds would read and write across the grain.
        return x.flatten(2).transpose(1, 2).contiguous(), grid

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """``[B, S, pt*ph*pw*out]`` -> ``[B, out, F*pt, h*ph, w*pw]`` (channels ordered (pt, ph, pw, c))."""
        f, h, w = grid
        pt, ph, pw = self.config.patch_size
        b = x.shape[0]
        x = x.reshape(b, f, h, w, pt, ph, pw, -1)
        return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(b, -1, f * pt, h * ph, w * pw)
