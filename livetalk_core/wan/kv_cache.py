"""Self-attention key/value cache with permanent sink frames and a rolling window.

Both model paths keep, per layer, a fixed number of latent frames of keys and values:

* LiveTalk: a window of 15 frames whose first 9 (the reference frame and the first 8 generated
  frames) are permanent "identity sinks"; the other 6 roll (previous block + current block).
* RealVideo: a window of 5 frames whose first one (the reference image, prefilled at t=0) is the
  sink; the other 4 hold the previous and the current block of 2 frames.

Frames are addressed by their index in the stream (0, 1, 2, ... never reset). A frame below
``sink_frames`` lives in slot = its index forever; a later frame ``g`` lives in the ring slot
``sink + (g - sink) mod (window - sink)``, so a new block overwrites the oldest non-sink frames
in place instead of shifting the cache. Until the window is full, a block attends frames
``[0, end)``; after that it attends every slot. Attention does not depend on the order of keys, so
this equals upstream's shift-left cache, while copying nothing and keeping memory bounded by
the window whatever the video length.

Keys are stored after RoPE (absolute positions), exactly as upstream does.

With ``fp8=True`` (opt-in, to fit a smaller GPU) keys and values are stored in float8 e4m3 with
one scale per token and head, halving the cache; attention still runs in the model dtype on the
dequantised window, so outputs move by fp8 rounding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .rope import apply_rotary, compose_rotations

FP8_KV = torch.float8_e4m3fn
_FP8_MAX = torch.finfo(FP8_KV).max


def quantize_fp8(x: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` ``[..., D]`` -> float8 e4m3 values ``[..., D]`` and scales ``[..., 1]`` (one per row, in
    ``scale_dtype``) with ``values * scales ~ x``."""
    scales = (x.abs().amax(-1, keepdim=True).float() / _FP8_MAX).clamp_min(1e-12).to(scale_dtype)
    # The scale is rounded first so that dequantising with it stays inside fp8's range.
    return (x.float() / scales.float()).clamp(-_FP8_MAX, _FP8_MAX).to(FP8_KV), scales


def dequantize_fp8(values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`quantize_fp8`, in the scales' dtype."""
    return values.to(scales.dtype) * scales


@dataclass(frozen=True)
class FP8Codec:
    """The two functions an fp8 cache runs on every layer (:func:`~.compile.compile_blocks` swaps in
    fused, compiled ones: eager, they are a dozen element-wise kernels per layer)."""

    quantize: Callable[[torch.Tensor, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = quantize_fp8
    dequantize: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = dequantize_fp8


EAGER_FP8 = FP8Codec()


@dataclass(frozen=True)
class CachePolicy:
    """How many latent frames each layer keeps, and how many of them never leave."""

    window_frames: int
    sink_frames: int

    def __post_init__(self) -> None:
        if not 0 <= self.sink_frames < self.window_frames:
            raise ValueError(
                f"sink_frames ({self.sink_frames}) must be at least 0 and below window_frames ({self.window_frames})"
            )

    def slot(self, frame: int) -> int:
        """Cache slot of stream frame ``frame``."""
        if frame < self.sink_frames:
            return frame
        return self.sink_frames + (frame - self.sink_frames) % (self.window_frames - self.sink_frames)

    def attended_slots(self, end_frame: int) -> int:
        """Number of leading slots a block ending at ``end_frame`` (exclusive) attends."""
        return min(end_frame, self.window_frames)

    def attended_frames(self, start_frame: int, num_frames: int) -> list[int]:
        """Stream frames a block attends, in time order (for tests and documentation)."""
        end = start_frame + num_frames
        if end <= self.window_frames:
            return list(range(end))
        rolling = self.window_frames - self.sink_frames
        return list(range(self.sink_frames)) + list(range(end - rolling, end))


class KVCache:
    """Preallocated K/V buffers ``[B, window*frame_tokens, H, D]`` per layer.

    Call :meth:`set_block` once per forward with the block's first stream frame and length; every
    layer then calls :meth:`update_and_get` with its new keys and values. ``dtype`` is what
    attention sees; ``fp8`` stores in float8 e4m3 plus ``[B, window*frame_tokens, H, 1]`` scales.
    """

    def __init__(
        self,
        policy: CachePolicy,
        *,
        num_layers: int,
        frame_tokens: int,
        num_heads: int,
        head_dim: int,
        batch: int = 1,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
        fp8: bool = False,
        codec: FP8Codec = EAGER_FP8,
    ) -> None:
        self.policy = policy
        self.frame_tokens = frame_tokens
        self.dtype = dtype
        self.fp8 = fp8
        self.codec = codec
        shape = (batch, policy.window_frames * frame_tokens, num_heads, head_dim)
        storage = FP8_KV if fp8 else dtype
        self.keys = [torch.zeros(shape, dtype=storage, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=storage, device=device) for _ in range(num_layers)]
        scale_shape = (*shape[:-1], 1)
        scaled_layers = range(num_layers if fp8 else 0)
        self.key_scales = [torch.ones(scale_shape, dtype=dtype, device=device) for _ in scaled_layers]
        self.value_scales = [torch.ones(scale_shape, dtype=dtype, device=device) for _ in scaled_layers]
        # fp8 sink keys are rotated when read: re-rounding them to fp8 at every rotation would drift.
        self._sink_turns: list[torch.Tensor | None] = [None] * num_layers
        self._write: list[tuple[int, int, int]] = []
        self._attended_tokens = 0

    def reset(self) -> None:
        """Ready for a new run from stream frame 0 (the buffers are kept: a run reads only slots it wrote)."""
        self._sink_turns = [None] * len(self.keys)
        self._write, self._attended_tokens = [], 0

    @property
    def num_bytes(self) -> int:
        tensors = self.keys + self.values + self.key_scales + self.value_scales
        return sum(t.numel() * t.element_size() for t in tensors)

    def set_block(self, start_frame: int, num_frames: int) -> None:
        """Prepare the slot mapping for a block of ``num_frames`` stream frames from ``start_frame``.

        Consecutive frames that land in consecutive slots are written as one slice.
        """
        runs: list[tuple[int, int, int]] = []  # (token offset in block, slot token start, length)
        for i in range(num_frames):
            slot = self.policy.slot(start_frame + i) * self.frame_tokens
            src = i * self.frame_tokens
            if runs and runs[-1][1] + runs[-1][2] == slot and runs[-1][0] + runs[-1][2] == src:
                runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + self.frame_tokens)
            else:
                runs.append((src, slot, self.frame_tokens))
        self._write = runs
        self._attended_tokens = self.policy.attended_slots(start_frame + num_frames) * self.frame_tokens

    @property
    def block_layout(self) -> tuple:
        """What :meth:`set_block` decided (slot runs, attended length), as a hashable value: two
        forwards with equal layouts touch the same cache addresses (:mod:`.cuda_graphs`)."""
        return tuple(self._write), self._attended_tokens

    def update_and_get(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the block's ``k``, ``v`` ``[B, S, H, D]`` and return the attended keys and values
        (in ``dtype``)."""
        n = self._attended_tokens
        if not self.fp8:
            self._store(self.keys[layer], k)
            self._store(self.values[layer], v)
            return self.keys[layer][:, :n], self.values[layer][:, :n]
        attended = []
        for store, scales, new in ((self.keys, self.key_scales, k), (self.values, self.value_scales, v)):
            new_values, new_scales = self.codec.quantize(new, self.dtype)
            self._store(store[layer], new_values)
            self._store(scales[layer], new_scales)
            attended.append(self.codec.dequantize(store[layer][:, :n], scales[layer][:, :n]))
        keys, turn = attended[0], self._sink_turns[layer]
        if turn is not None:
            if self._write[0][1] < self._sink_tokens:
                raise RuntimeError("an fp8 cache cannot take new sink keys after its sinks were rotated")
            keys[:, : self._sink_tokens] = apply_rotary(keys[:, : self._sink_tokens], turn)
        return keys, attended[1]

    @property
    def _sink_tokens(self) -> int:
        return self.policy.sink_frames * self.frame_tokens

    def _store(self, buffer: torch.Tensor, block: torch.Tensor) -> None:
        for src, dst, length in self._write:
            buffer[:, dst : dst + length] = block[:, src : src + length]

    def rotate_sink_keys(self, layer: int, rotation: torch.Tensor) -> None:
        """Rotate ``layer``'s cached sink keys in place by ``rotation`` (see :mod:`~.rope`, broadcast as in
        :func:`~.rope.apply_rotary`), re-rounding to the cache dtype.

        RealVideo advances its reference frame's temporal RoPE position this way once per block
        late in a session; repeating the in-place rounding is part of upstream's numbers. An fp8 cache
        keeps its sink keys as written and composes the rotations (float64), applied when the keys
        are read.
        """
        if self.fp8:
            turn = self._sink_turns[layer]
            self._sink_turns[layer] = rotation.double() if turn is None else compose_rotations(turn, rotation.double())
            return
        sink = self.keys[layer][:, : self._sink_tokens]
        sink.copy_(apply_rotary(sink, rotation))

