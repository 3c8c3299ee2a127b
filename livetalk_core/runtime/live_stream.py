"""What a model family gives a live session (``livetalk_core/live/session.py``): its blocks, one at
a time, each from the audio that has arrived for it.

A live session has no whole clip: audio arrives while the video is made. The session cuts the
timeline into *tiles*, one per block (the audio each block's frames are made from), and asks the
family's :class:`LiveStream` for a block with the audio of a *window*: the block's tile plus a
bounded stretch of past audio as context (and a look-ahead past the tile, which the session waits
for, so it counts in the latency). Missing audio is silence. The stream turns the window into the
family's audio conditioning for that block and runs one step of its usual causal sampling loop (the
same generator the offline path uses, fed per block).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from ..media.audio_file import SAMPLE_RATE
from ..media.timing import VIDEO_FPS

FRAME_SAMPLES = SAMPLE_RATE // VIDEO_FPS
"""Audio samples per video frame (1000): frame ``f`` is shown at sample ``f * FRAME_SAMPLES``."""


@dataclass(frozen=True)
class LiveWindow:
    """How much audio around a block its features see: ``context_samples`` before its tile (bounded
    memory and time whatever the session's length) and ``lookahead_samples`` after it."""

    context_samples: int
    lookahead_samples: int

    def __post_init__(self) -> None:
        if self.context_samples < 0 or self.lookahead_samples < 0:
            raise ValueError(f"a live window needs a context and look-ahead of at least 0 samples, got {self}")


@dataclass(frozen=True)
class LiveGeometry:
    """A live stream's blocks: decoded video frames and audio samples of block 0 and of every later one.

    Block ``k``'s frames and audio tile the session's timeline: frames from
    ``first_block_frames + (k - 1) * block_frames`` (0 for block 0), audio likewise in samples.
    """

    first_block_frames: int
    block_frames: int
    first_block_samples: int
    block_samples: int
    frame_audio_offset: int = 0
    """Frame ``f`` was made from the samples ``[f * FRAME_SAMPLES + offset, (f + 1) * FRAME_SAMPLES + offset)``
    (clipped to its block's tile): 0 where frames and audio line up (LiveTalk), more where the family's decode
    puts its frames ahead of their audio (RealVideo). Latency is measured against these samples."""

    def first_frame(self, block: int) -> int:
        return 0 if block == 0 else self.first_block_frames + (block - 1) * self.block_frames

    def tile(self, block: int) -> tuple[int, int]:
        """The samples ``[start, end)`` of the timeline block ``block`` is made from."""
        if block == 0:
            return 0, self.first_block_samples
        start = self.first_block_samples + (block - 1) * self.block_samples
        return start, start + self.block_samples

    def frame_audio_end(self, frame: int) -> int:
        """The timeline sample after the last one frame ``frame`` was made from (before clipping to its tile)."""
        return (frame + 1) * FRAME_SAMPLES + self.frame_audio_offset


class LiveStream(Protocol):
    """One family's live sampling: the KV cache lives as long as the stream (until :meth:`close`)."""

    geometry: LiveGeometry

    def window(self, block: int) -> tuple[int, int]:
        """The timeline samples ``[start, end)`` the block's audio features read (it holds the block's
        tile; ``start`` may be below 0: silence before the session began)."""
        ...

    def sample(self, block: int, audio: torch.Tensor, silent: bool) -> torch.Tensor:
        """Block ``block`` (called for 0, 1, 2, ... in order) from its window's audio ``[N]`` float32
        (silence where none arrived); ``silent``: no speech at all in its tile. Returns its clean
        latents ``[1, 16, F, h, w]``."""
        ...

    def close(self) -> None:
        """Frees the KV cache; idempotent."""
        ...
