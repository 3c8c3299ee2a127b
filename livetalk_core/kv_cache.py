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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .rope import apply_rotary


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
    layer then calls :meth:`update_and_get` with its new keys and values.
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
    ) -> None:
        self.policy = policy
        self.frame_tokens = frame_tokens
        shape = (batch, policy.window_frames * frame_tokens, num_heads, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self._write: list[tuple[int, int, int]] = []
        self._attended_tokens = 0

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

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

    def update_and_get(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the block's ``k``, ``v`` ``[B, S, H, D]`` and return the attended keys and values."""
        keys, values = self.keys[layer], self.values[layer]
        for src, dst, length in self._write:
            keys[:, dst : dst + length] = k[:, src : src + length]
            values[:, dst : dst + length] = v[:, src : src + length]
        n = self._attended_tokens
        return keys[:, :n], values[:, :n]

    def rotate_sink_keys(self, layer: int, rotation: torch.Tensor) -> None:
        """Rotate ``layer``'s cached sink keys in place by ``rotation`` ((cos, sin) pairs, broadcast as in
        :func:`~.rope.apply_rotary`), re-rounding to the cache dtype.

        RealVideo advances its reference frame's temporal RoPE position this way once per block
        late in a session; repeating the in-place rounding is part of upstream's numbers.
        """
        sink = self.keys[layer][:, : self.policy.sink_frames * self.frame_tokens]
        sink.copy_(apply_rotary(sink, rotation))
