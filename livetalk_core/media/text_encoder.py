"""umT5-XXL text encoder, tokenizer and prompt encoding (Wan-native layout).

LiveTalk conditions its DiT on the output of Wan's own umT5-XXL encoder: a T5 encoder whose attention
is unscaled, whose every layer carries its own relative-position table, and whose padded rows are
zeroed before the DiT sees them. The encoder is only needed once per run (the context is cached),
and at full size it weighs about 11 GB in bf16, so callers encode the prompt, keep the context and
drop the encoder (:func:`release_text_encoder`). On a GPU without room for the whole encoder, its
weights stay in host memory and each layer is copied to the GPU only while it runs (:func:`load_text_encoder`).

Two checkpoint layouts are accepted by :func:`load_text_encoder`:

* Wan's ``models_t5_umt5-xxl-enc-bf16.pth`` (native names: ``token_embedding``, ``blocks.N.attn.q`` …);
* the Hugging Face / ComfyUI naming used by ``umt5_xxl_fp16.safetensors`` and
  ``umt5_xxl_fp8_e4m3fn_scaled.safetensors`` (``shared``, ``encoder.block.N.layer.0.SelfAttention.q`` …),
  whose fp8 weights are dequantised on load with their per-tensor scales.
"""

from __future__ import annotations

import html
import importlib
import logging
import math
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import CheckpointError, InputError, MissingWeightsError
from .checkpoint import (
    FP8_DTYPES,
    check_state_dict,
    guess_model_family,
    read_state_dict,
    resolve_dtype,
    split_fp8_scales,
)
from .weights import TOKENIZER_FILES

MODEL_NAME = "umT5-XXL text encoder"
FILE_HINT = (
    "models_t5_umt5-xxl-enc-bf16.pth (Wan-AI/Wan2.1-T2V-1.3B) or umt5_xxl_fp16.safetensors / "
    "umt5_xxl_fp8_e4m3fn_scaled.safetensors (ComfyUI models/text_encoders)"
)
# The umT5 context length the Wan DiTs were trained with: the prompt's tokens, then zero rows.
TEXT_LEN = 512
NORM_EPS = 1e-6
MAX_DISTANCE = 128

log = logging.getLogger(__name__)

TOKENIZER_REPO = "google/umt5-xxl"
# AutoTokenizer can build the umT5 tokenizer from either of these; the others only refine it.
TOKENIZER_VOCAB_FILES = ("tokenizer.json", "spiece.model")
# GPU memory kept free beyond the weights when deciding whether the whole encoder fits: its activations
# (512 tokens: attention scores of 64 heads in float32 are ~64 MiB) and the allocator's rounding.
FIT_MARGIN_BYTES = 1 << 30


# --------------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class UMT5Config:
    """Sizes of a Wan-native T5 encoder, all read from tensor shapes (none is stored in the file)."""

    vocab_size: int
    dim: int
    dim_attn: int
    dim_ffn: int
    num_heads: int
    num_layers: int
    num_buckets: int
    shared_pos: bool
    eps: float = NORM_EPS
    max_distance: int = MAX_DISTANCE

    @property
    def head_dim(self) -> int:
        return self.dim_attn // self.num_heads

    @classmethod
    def from_state_dict(
        cls, state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike = "<state dict>"
    ) -> UMT5Config:
        """Infer the config from native key names (see :func:`to_native_state_dict`)."""
        shared_pos = "pos_embedding.embedding.weight" in state_dict
        pos_key = "pos_embedding.embedding.weight" if shared_pos else "blocks.0.pos_embedding.embedding.weight"
        required = ("token_embedding.weight", "blocks.0.attn.q.weight", "blocks.0.ffn.fc1.weight", pos_key)
        missing = [k for k in required if k not in state_dict]
        if missing:
            raise CheckpointError(
                f"{path} is not a {MODEL_NAME} checkpoint: it looks like {guess_model_family(state_dict)} "
                f"(no {', '.join(missing)}). Pick {FILE_HINT}."
            )
        vocab_size, dim = state_dict["token_embedding.weight"].shape
        dim_attn = state_dict["blocks.0.attn.q.weight"].shape[0]
        dim_ffn = state_dict["blocks.0.ffn.fc1.weight"].shape[0]
        num_buckets, num_heads = state_dict[pos_key].shape
        num_layers = 1 + max(int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k)))
        if dim_attn % num_heads:
            raise CheckpointError(
                f"{path}: attention width {dim_attn} is not a multiple of the {num_heads} heads given by the "
                "relative-position table. The file is corrupt or not a T5 encoder."
            )
        return cls(int(vocab_size), int(dim), int(dim_attn), int(dim_ffn), int(num_heads), num_layers,
                   int(num_buckets), shared_pos)


# --------------------------------------------------------------------------------------------------
# Model


class T5RMSNorm(nn.Module):
    """Scale-only RMS norm whose statistics are always taken in float32. x: [..., dim]."""

    def __init__(self, dim: int, eps: float = NORM_EPS):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inv_rms = torch.rsqrt(x.float().pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * (x.float() * inv_rms).to(self.weight.dtype)


def relative_position_buckets(length: int, num_buckets: int, max_distance: int, device: torch.device) -> torch.Tensor:
    """Bidirectional T5 bucket of key j seen from query i, as a [length, length] int64 tensor.

    Half the buckets are for keys after the query. In each half, the first half of the buckets are
    exact distances and the rest grow logarithmically up to ``max_distance``. The log is taken in
    float32, in the reference order of operations, so boundary distances land in the same bucket.
    """
    positions = torch.arange(length, device=device)
    offset = positions[None, :] - positions[:, None]
    half = num_buckets // 2
    direction = (offset > 0).long() * half
    distance = offset.abs()
    exact = half // 2
    log_ratio = torch.log(distance.clamp(min=1).float() / exact) / math.log(max_distance / exact)
    far = (exact + (log_ratio * (half - exact)).long()).clamp(max=half - 1)
    return direction + torch.where(distance < exact, distance, far)


class RelativePositionBias(nn.Module):
    """Learned per-head bias of each bucket: buckets [L, L] -> bias [1, heads, L, L]."""

    def __init__(self, num_buckets: int, num_heads: int):
        super().__init__()
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def forward(self, buckets: torch.Tensor) -> torch.Tensor:
        return self.embedding(buckets).permute(2, 0, 1).unsqueeze(0)


class UMT5Attention(nn.Module):
    """Self-attention without 1/sqrt(d) scaling (T5 folds it into the weights), softmax in float32."""

    def __init__(self, dim: int, dim_attn: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim_attn, bias=False)
        self.k = nn.Linear(dim, dim_attn, bias=False)
        self.v = nn.Linear(dim, dim_attn, bias=False)
        self.o = nn.Linear(dim_attn, dim, bias=False)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x: [B, L, dim]; bias: [B or 1, heads, L, L] (position bias + padding mask) -> [B, L, dim]."""
        b, length, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, length, self.num_heads, -1).transpose(1, 2)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        scores = q @ k.transpose(-1, -2) + bias
        weights = F.softmax(scores.float(), dim=-1).to(x.dtype)
        out = (weights @ v).transpose(1, 2).reshape(b, length, -1)
        return self.o(out)


class TanhGELU(nn.Module):
    """tanh-approximated GELU evaluated op by op in the input dtype.

    ``F.gelu(approximate="tanh")`` rounds once at the end; the reference rounds after every op,
    and in bf16 matching that makes the whole encoder bit-identical to it.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class GatedGeluFFN(nn.Module):
    """fc2(fc1(x) * gelu_tanh(gate(x))). x: [B, L, dim] -> [B, L, dim]."""

    def __init__(self, dim: int, dim_ffn: int):
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(dim, dim_ffn, bias=False), TanhGELU())
        self.fc1 = nn.Linear(dim, dim_ffn, bias=False)
        self.fc2 = nn.Linear(dim_ffn, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x) * self.gate(x))


def _clamp_fp16(x: torch.Tensor) -> torch.Tensor:
    # T5 activations outgrow float16; Wan clamps infinities back into range rather than propagating them.
    if x.dtype == torch.float16 and torch.isinf(x).any():
        limit = torch.finfo(torch.float16).max - 1000
        x = x.clamp(-limit, limit)
    return x


class UMT5Block(nn.Module):
    """Pre-norm self-attention + gated FFN, with its own position table unless the encoder shares one."""

    def __init__(self, config: UMT5Config):
        super().__init__()
        self.norm1 = T5RMSNorm(config.dim, config.eps)
        self.attn = UMT5Attention(config.dim, config.dim_attn, config.num_heads)
        self.norm2 = T5RMSNorm(config.dim, config.eps)
        self.ffn = GatedGeluFFN(config.dim, config.dim_ffn)
        self.pos_embedding = None if config.shared_pos else RelativePositionBias(config.num_buckets, config.num_heads)

    def forward(self, x: torch.Tensor, position_bias: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
        """x: [B, L, dim]; position_bias: [1, heads, L, L]; padding: [B, 1, 1, L] bool (True = pad)."""
        bias = position_bias
        if padding is not None:
            bias = bias.masked_fill(padding, torch.finfo(x.dtype).min)
        x = _clamp_fp16(x + self.attn(self.norm1(x), bias))
        return _clamp_fp16(x + self.ffn(self.norm2(x)))


@contextmanager
def weights_on(module: nn.Module | None, device: torch.device | None) -> Iterator[None]:
    """Within the block, ``module``'s parameters are copies on ``device`` (None: left where they are);
    on exit the kept weights are put back and the copies freed. The copy is always a new tensor (even
    to the same device), so a CPU test runs the streamed path as a GPU does."""
    if module is None or device is None:
        yield
        return
    kept = [(param, param.data) for param in module.parameters()]
    try:
        for param, data in kept:
            param.data = data.to(device, copy=True)
        yield
    finally:
        for param, data in kept:
            param.data = data


class UMT5Encoder(nn.Module):
    """Wan-native umT5 encoder: ids [B, L] int64 (+ mask [B, L]) -> hidden states [B, L, dim].

    Parameter names match ``models_t5_umt5-xxl-enc-bf16.pth``. Dropout is omitted (inference only).
    ``stream_to``: None, the layers run where their weights are; a device, the weights stay where they
    are (host memory) and each layer runs on that device with a copy of its weights made just before
    and freed just after (:func:`weights_on`): the same kernels, one layer's weights in device memory.
    """

    def __init__(self, config: UMT5Config):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.dim)
        self.pos_embedding = RelativePositionBias(config.num_buckets, config.num_heads) if config.shared_pos else None
        self.blocks = nn.ModuleList(UMT5Block(config) for _ in range(config.num_layers))
        self.norm = T5RMSNorm(config.dim, config.eps)
        self.stream_to: torch.device | None = None

    @property
    def compute_device(self) -> torch.device:
        """Where the encoder computes (its inputs go there)."""
        return self.stream_to if self.stream_to is not None else self.token_embedding.weight.device

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """ids: [B, L] int64; mask: [B, L] (0 = padding) or None -> [B, L, dim] in the model dtype."""
        stream = self.stream_to
        # Streamed, the embedding rows are gathered where the table is (a copy: exact) and only they move.
        table = self.token_embedding.weight
        x = F.embedding(ids.to(table.device), table).to(ids.device)
        buckets = relative_position_buckets(ids.shape[1], self.config.num_buckets, self.config.max_distance, ids.device)
        padding = None if mask is None else (mask == 0)[:, None, None, :]
        with weights_on(self.pos_embedding, stream):
            shared_bias = self.pos_embedding(buckets) if self.pos_embedding is not None else None
        for block in self.blocks:
            with weights_on(block, stream):
                position_bias = shared_bias if block.pos_embedding is None else block.pos_embedding(buckets)
                x = block(x, position_bias, padding)
        with weights_on(self.norm, stream):
            return self.norm(x)


# --------------------------------------------------------------------------------------------------
# Checkpoint layouts

# Per-layer names: Wan-native suffix under ``blocks.N.`` -> Hugging Face suffix under ``encoder.block.N.``.
# HF's gated FFN applies the activation to wi_0, so wi_0 is Wan's gate and wi_1 its fc1.
HF_BLOCK_KEYS = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
HF_TOP_KEYS = {
    "token_embedding.weight": "shared.weight",
    "norm.weight": "encoder.final_layer_norm.weight",
}
_NATIVE_BLOCK_SUFFIX = {hf: native for native, hf in HF_BLOCK_KEYS.items()}
_NATIVE_TOP_KEY = {hf: native for native, hf in HF_TOP_KEYS.items()}
_HF_BLOCK_KEY = re.compile(r"encoder\.block\.(\d+)\.(.+)")
_HF_POS_SUFFIX = HF_BLOCK_KEYS["pos_embedding.embedding.weight"]
# Tensors HF/ComfyUI files carry that the encoder does not use: the tied copy of the embedding, the
# sentencepiece model ComfyUI embeds, and the decoder / LM head of full T5 checkpoints.
_HF_UNUSED = re.compile(r"encoder\.embed_tokens\.weight|spiece_model|decoder\..*|lm_head\..*")


def _is_hf_layout(keys: Mapping[str, torch.Tensor]) -> bool:
    return "shared.weight" in keys or any(k.startswith("encoder.block.") for k in keys)


def _dequantize_fp8(state_dict: dict[str, torch.Tensor], path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Turn ComfyUI "scaled fp8" weights back into float32: weight * per-tensor scale
    (:func:`~.checkpoint.split_fp8_scales` reads the layout). Unscaled fp8 tensors are just upcast."""
    out, scales = split_fp8_scales(state_dict, path, unscaled_fp8=True)
    for weight_key, scale in scales.items():
        if scale.numel() != 1:
            raise CheckpointError(
                f"{path} has a quantisation scale of {weight_key} {tuple(scale.shape)} that is not a single "
                "per-tensor scale; this pack only reads per-tensor scaled fp8. Use umt5_xxl_fp16.safetensors or "
                "models_t5_umt5-xxl-enc-bf16.pth instead."
            )
        out[weight_key] = out[weight_key].float() * scale
    for key, value in out.items():
        if value.dtype in FP8_DTYPES:
            # e4m3fn has no infinity: an out-of-range value saved to it becomes NaN; treat it as 0.
            out[key] = value.float().nan_to_num(nan=0.0)
    return out


def to_native_state_dict(
    state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike = "<state dict>"
) -> dict[str, torch.Tensor]:
    """Wan-native names for a umT5 state dict in either layout; fp8 weights dequantised to float32.

    Unknown HF names are kept as they are, so that the key check reports them.
    """
    state = _dequantize_fp8(dict(state_dict), path)
    if not _is_hf_layout(state):
        return state
    if "shared.weight" not in state and "encoder.embed_tokens.weight" in state:
        state["shared.weight"] = state["encoder.embed_tokens.weight"]
    block_keys = [m for k in state if (m := _HF_BLOCK_KEY.fullmatch(k))]
    blocks_with_table = {m.group(1) for m in block_keys if m.group(2) == _HF_POS_SUFFIX}
    num_blocks = len({m.group(1) for m in block_keys})
    # T5 v1.1 keeps one table in block 0 for the whole stack; umT5 has one per block.
    shared_table = blocks_with_table == {"0"} and num_blocks > 1

    native: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if _HF_UNUSED.fullmatch(key):
            continue
        match = _HF_BLOCK_KEY.fullmatch(key)
        if key in _NATIVE_TOP_KEY:
            native[_NATIVE_TOP_KEY[key]] = value
        elif match and shared_table and match.group(2) == _HF_POS_SUFFIX:
            native["pos_embedding.embedding.weight"] = value
        elif match and match.group(2) in _NATIVE_BLOCK_SUFFIX:
            native[f"blocks.{match.group(1)}.{_NATIVE_BLOCK_SUFFIX[match.group(2)]}"] = value
        else:
            native[key] = value
    return native


def free_device_bytes(device: torch.device) -> int:
    """Bytes this process can still allocate on a CUDA ``device``: the driver's free memory plus what
    PyTorch's allocator holds reserved but unused, within the process's memory fraction if one is set
    (``torch.cuda.set_per_process_memory_fraction``: a GPU shared, or a smaller one emulated)."""
    if device.index is None:  # "cuda": the current GPU (these calls want an index)
        device = torch.device("cuda", torch.cuda.current_device())
    free, total = torch.cuda.mem_get_info(device)
    allocated = torch.cuda.memory_allocated(device)
    allowed = int(torch.cuda.get_per_process_memory_fraction(device) * total) - allocated
    return min(free + torch.cuda.memory_reserved(device) - allocated, allowed)


def streams_layers(weight_bytes: int, device: torch.device | str, free_bytes: int | None = None) -> bool:
    """Whether an encoder of ``weight_bytes`` must keep its weights in host memory and stream its layers
    to ``device``: only on a CUDA device whose free memory (``free_bytes``, else measured) is less than
    the weights plus :data:`FIT_MARGIN_BYTES`."""
    device = torch.device(device)
    if device.type != "cuda":
        return False
    if free_bytes is None:
        free_bytes = free_device_bytes(device)
    return free_bytes < weight_bytes + FIT_MARGIN_BYTES


def load_text_encoder(
    path: str | os.PathLike,
    dtype: torch.dtype | str = torch.bfloat16,
    device: torch.device | str = "cpu",
    free_bytes: int | None = None,
) -> UMT5Encoder:
    """Load a umT5-XXL encoder (Wan ``.pth`` or HF/ComfyUI ``.safetensors``) in ``dtype`` to compute on ``device``.

    The config is read from the tensor shapes. Weights are cast tensor by tensor, so the peak memory
    stays near one copy of the model in ``dtype`` (the Wan ``.pth`` is memory-mapped). When a CUDA
    ``device`` lacks room for the whole encoder (:func:`streams_layers`; ``free_bytes`` stands for its
    free memory, else measured), the weights stay in host memory and the layers stream to ``device``
    one at a time (:class:`UMT5Encoder`'s ``stream_to``): slower, the same context.
    """
    dtype = resolve_dtype(dtype)
    state = to_native_state_dict(read_state_dict(path, what=MODEL_NAME), path)
    weight_bytes = sum(t.numel() for t in state.values()) * dtype.itemsize
    stream_to = torch.device(device) if streams_layers(weight_bytes, device, free_bytes) else None
    if stream_to is not None:
        log.info("the %s (%.1f GiB) does not fit in %s's free memory: its weights stay in CPU memory and its "
                 "layers run on the GPU one at a time (slower, the same result)", MODEL_NAME, weight_bytes / 2**30,
                 stream_to)
        device = "cpu"
    config = UMT5Config.from_state_dict(state, path)
    if config.shared_pos:
        raise CheckpointError(
            f"{path} is a T5 v1.1 encoder (one relative-position table shared by all layers, e.g. the "
            f"t5xxl file of Flux or SD3), not umT5-XXL. LiveTalk needs {FILE_HINT}."
        )
    with torch.device("meta"):
        model = UMT5Encoder(config)
    check_state_dict(state, model.state_dict(), path=path, model_name=MODEL_NAME)
    cast = {}
    for key in list(state):
        cast[key] = state.pop(key).to(device=device, dtype=dtype)
    model.load_state_dict(cast, assign=True)
    model.stream_to = stream_to
    return model.eval().requires_grad_(False)


def release_text_encoder(encoder: UMT5Encoder) -> None:
    """Free the encoder's weights now, even where other references to the module remain.

    The parameters are replaced by storage-less meta tensors; using the encoder afterwards raises
    an :class:`InputError`. Encode the prompt first, keep the context, then call this.
    """
    on_cuda = encoder.compute_device.type == "cuda"
    encoder.to_empty(device="meta")
    if on_cuda:
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------
# Encoding


def encode_text(encoder: UMT5Encoder, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Context for the DiT: input_ids, attention_mask [B, L] -> [B, L, dim] in the encoder dtype.

    Rows at and beyond each sequence's true length (the number of mask entries > 0) are exactly 0,
    as the DiT was trained on.
    """
    weight = encoder.token_embedding.weight
    if weight.is_meta:
        raise InputError("The text encoder was released (release_text_encoder). Load it again to encode a prompt.")
    if input_ids.ndim != 2 or tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise InputError(
            f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} must both be "
            "[batch, tokens]; use tokenize() to make them."
        )
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise InputError(f"input_ids must be integer token ids, not {input_ids.dtype}.")
    vocab = weight.shape[0]
    if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= vocab):
        raise InputError(
            f"Token ids must lie in [0, {vocab}) for this encoder, but range over [{int(input_ids.min())}, "
            f"{int(input_ids.max())}]: the tokenizer does not belong to this text encoder."
        )
    ids = input_ids.to(device=encoder.compute_device, dtype=torch.long)
    mask = attention_mask.to(device=encoder.compute_device)
    with torch.no_grad():
        context = encoder(ids, mask)
    lengths = mask.gt(0).sum(dim=1)
    past_end = torch.arange(ids.shape[1], device=ids.device)[None, :] >= lengths[:, None]
    return context.masked_fill(past_end[..., None], 0.0)


def clean_prompt(text: str) -> str:
    """Upstream's "whitespace" cleaning: fix text, unescape HTML twice, collapse whitespace runs.

    The text fixing uses ``ftfy.fix_text`` when ftfy is installed (an optional dependency). Without
    it that step is skipped, so prompts with mojibake, curly quotes or full-width characters may
    tokenise slightly differently from upstream; plain prompts are unaffected.
    """
    import regex  # a dependency of transformers; its \\s matches upstream's whitespace set exactly

    try:
        ftfy = importlib.import_module("ftfy")
    except ImportError:
        ftfy = None
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return regex.sub(r"\s+", " ", text).strip()


@lru_cache(maxsize=2)
def _load_tokenizer(folder: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as exc:  # transformers and tokenizers raise many types for unusable files
        raise MissingWeightsError(
            f"The umT5 tokenizer in {folder} could not be loaded ({str(exc).splitlines()[0]}). It needs "
            f"{', '.join(TOKENIZER_FILES)} from https://huggingface.co/{TOKENIZER_REPO} (the same files are "
            "in Wan-AI/Wan2.1-T2V-1.3B under google/umt5-xxl/)."
        ) from None


def load_tokenizer(tokenizer_dir: str | os.PathLike):
    """The umT5 tokenizer of a LOCAL folder laid out like the ``google/umt5-xxl`` Hugging Face repo."""
    folder = Path(tokenizer_dir)
    if not folder.is_dir() or not any((folder / name).is_file() for name in TOKENIZER_VOCAB_FILES):
        raise MissingWeightsError(
            f"No umT5 tokenizer in {folder}. Put {', '.join(TOKENIZER_FILES)} from "
            f"https://huggingface.co/{TOKENIZER_REPO} (also shipped in Wan-AI/Wan2.1-T2V-1.3B under "
            "google/umt5-xxl/) in that folder; tokenizer.json or spiece.model is the essential one."
        )
    return _load_tokenizer(str(folder.resolve()))


def tokenize(
    prompt: str, tokenizer_dir: str | os.PathLike, text_len: int = TEXT_LEN
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt -> (input_ids, attention_mask), both [1, text_len] int64.

    Cleaned as upstream (:func:`clean_prompt`), end-of-sequence token appended, truncated to
    ``text_len`` and right-padded with the pad id (mask 0).
    """
    if not isinstance(prompt, str):
        raise InputError(f"The prompt must be text, not {type(prompt).__name__}.")
    tokenizer = load_tokenizer(tokenizer_dir)
    batch = tokenizer(
        [clean_prompt(prompt)],
        padding="max_length",
        truncation=True,
        max_length=text_len,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    return batch["input_ids"].long(), batch["attention_mask"].long()


def pad_to_text_len(context: torch.Tensor, text_len: int = TEXT_LEN) -> torch.Tensor:
    """A prompt's embedding ``[B, L, D]`` (L <= ``text_len``) with zero rows appended up to ``text_len``:
    the Wan DiTs attend to all of them, unmasked, as upstream does, so the padding is part of the prompt."""
    return F.pad(context, (0, 0, 0, text_len - context.shape[1]))


def encode_prompt(
    prompt: str, encoder: UMT5Encoder, tokenizer_dir: str | os.PathLike, text_len: int = TEXT_LEN
) -> torch.Tensor:
    """Prompt -> DiT context [1, text_len, dim] (rows past the prompt's tokens are 0)."""
    ids, mask = tokenize(prompt, tokenizer_dir, text_len)
    return encode_text(encoder, ids, mask)
