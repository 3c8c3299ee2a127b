"""RealVideo 14B live: each block is its own audio segment, fed block by block into the same
sampling loop as the offline path (:func:`~.sampler.sample_realvideo` with an endless plan).

Offline, the audio is cut into 5 s segments and a segment's blocks take consecutive 2-latent
windows of its features. Live, block ``k``'s segment is a window of whole seconds (upstream pads
every segment to whole seconds) ending at its tile's end plus the look-ahead (whole latent frames),
with silence before the session began: its wav2vec2 features and the DiT's causal audio encoder run
over that window, and the block takes the 2 latent frames that cover its tile. A block whose tile
holds no speech is sampled under the idle prompt, as upstream's live app does between sentences.
Block ``k``'s frames are the offline ones (``[8k - 3, 8k + 5)``, block 0 ``[0, 5)``) and its tile the
audio its latents were made from (``[8000 k, 8000 k + 8000)``): the 3-frame shift of upstream's
decode, as in the offline mp4.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from ..errors import InputError
from ..family_base import RemoteSampler
from ..media.audio_file import SAMPLE_RATE
from ..media.timing import video_frames_for_latents
from ..media.wav2vec2 import AudioEncoder
from ..runtime.live_stream import FRAME_SAMPLES, LiveGeometry, LiveWindow
from ..runtime.noise import SeededNoise
from .audio import segment_features
from .sampler import FRAMES_PER_BLOCK, VIDEO_FRAMES_PER_LATENT, BlockPlan, realvideo_schedule, sample_realvideo

LIVE_STEPS = 2  # real time on one H100 needs 2 steps (upstream offers 2 or 4)
BLOCK_FRAMES = VIDEO_FRAMES_PER_LATENT * FRAMES_PER_BLOCK  # 8
LATENT_SAMPLES = VIDEO_FRAMES_PER_LATENT * FRAME_SAMPLES  # 4000: one latent frame of audio
REALVIDEO_LIVE_GEOMETRY = LiveGeometry(
    first_block_frames=video_frames_for_latents(FRAMES_PER_BLOCK),  # 5: the VAE's first latent is one frame
    block_frames=BLOCK_FRAMES,
    first_block_samples=BLOCK_FRAMES * FRAME_SAMPLES,
    block_samples=BLOCK_FRAMES * FRAME_SAMPLES,
)


def lookahead_latents(window: LiveWindow) -> int:
    return -(-window.lookahead_samples // LATENT_SAMPLES)


def segment_samples(window: LiveWindow) -> int:
    """The whole seconds of audio each block's segment holds: its tile, context and look-ahead."""
    needed = window.context_samples + REALVIDEO_LIVE_GEOMETRY.block_samples + lookahead_latents(window) * LATENT_SAMPLES
    return -(-needed // SAMPLE_RATE) * SAMPLE_RATE


def block_window(block: int, window: LiveWindow) -> tuple[int, int]:
    """Timeline samples ``[start, end)`` of block ``block``'s segment (``start`` < 0 early on: silence)."""
    end = REALVIDEO_LIVE_GEOMETRY.tile(block)[1] + lookahead_latents(window) * LATENT_SAMPLES
    return end - segment_samples(window), end


class LatestSegment(Sequence):
    """The live blocks' audio segments as the sampler indexes them (segment ``k`` for block ``k``),
    holding only the newest one: memory stays flat however long the session runs."""

    def __init__(self) -> None:
        self.index, self.features = -1, None

    def set(self, index: int, features: torch.Tensor) -> None:
        self.index, self.features = index, features

    def __len__(self) -> int:
        return self.index + 1

    def __getitem__(self, index: int) -> torch.Tensor:
        if index != self.index or self.features is None:
            raise IndexError(f"live segment {index} is gone; only the newest ({self.index}) is kept")
        return self.features


class RealVideoStream:
    """RealVideo's :class:`~.runtime.live_stream.LiveStream` (one GPU: workers are not driven live)."""

    geometry = REALVIDEO_LIVE_GEOMETRY

    def __init__(self, dit, encoder: AudioEncoder, *, idle_context: torch.Tensor, talking_context: torch.Tensor,
                 reference: torch.Tensor, seed: int, steps: int | None, window: LiveWindow) -> None:
        if isinstance(dit, RemoteSampler):
            raise InputError("Live mode runs RealVideo on one GPU; load the model with gpus = 1.")
        self.dit, self.encoder, self.live_window = dit, encoder, window
        self._segments = LatestSegment()
        self._entry: BlockPlan | None = None
        self._blocks = sample_realvideo(
            dit, ref_latent=reference.to(dit.dtype), idle_context=idle_context, talking_context=talking_context,
            audio_features=self._segments, noise=SeededNoise(seed), plan=self._plan(),
            schedule=realvideo_schedule(LIVE_STEPS if steps is None else steps),
        )

    def window(self, block: int) -> tuple[int, int]:
        return block_window(block, self.live_window)

    def sample(self, block: int, audio: torch.Tensor, silent: bool) -> torch.Tensor:
        start, end = self.window(block)
        if audio.numel() != end - start:
            raise ValueError(f"block {block}'s window holds {end - start} samples, got {audio.numel()}")
        features = segment_features(self.encoder, audio.to(self.encoder.device), self.dit.dtype)
        self._segments.set(block, features)
        ptr = features.shape[-1] // VIDEO_FRAMES_PER_LATENT - FRAMES_PER_BLOCK - lookahead_latents(self.live_window)
        self._entry = BlockPlan(block, ptr, talking=not silent)
        try:
            return next(self._blocks)
        finally:
            self._entry = None

    def _plan(self) -> Iterator[BlockPlan]:
        while True:
            if self._entry is None:
                raise RuntimeError("a live RealVideo block was asked for outside RealVideoStream.sample")
            yield self._entry

    def close(self) -> None:
        self._blocks.close()
        self._segments.set(-1, None)
