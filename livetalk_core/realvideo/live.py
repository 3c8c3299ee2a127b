"""RealVideo 14B live: each block is its own audio segment, fed block by block into the same
sampling loop as the offline path (:func:`~.sampler.sample_realvideo` with an endless plan).

Offline, the audio is cut into 5 s segments and a segment's blocks take consecutive 2-latent
windows of its features. Live, block ``k``'s segment is a window from its tile's end plus the
look-ahead back through the context (whole seconds, starting on the offline segments' 0.5 s grid,
silence before the session began), padded with silence at its end to whole seconds as upstream pads
each segment: its wav2vec2 features and the DiT's causal audio encoder run over it, and the block
takes the 2 latent frames that cover its tile. A block whose tile
holds no speech is sampled under the idle prompt, as upstream's live app does between sentences.
Block ``k``'s frames are the offline ones (``[8k - 3, 8k + 5)``, block 0 ``[0, 5)``) and its tile the
audio its latents were made from (``[8000 k, 8000 k + 8000)``): the 3-frame shift of upstream's
decode, as in the offline mp4.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from ..family_base import RemoteSampler
from ..media.audio_file import SAMPLE_RATE
from ..media.timing import video_frames_for_latents
from ..media.wav2vec2 import AudioEncoder
from ..runtime.live_stream import FRAME_SAMPLES, LiveGeometry, LiveWindow
from ..runtime.noise import SeededNoise
from ..runtime.workspace import Workspace
from .audio import segment_features
from .sampler import FRAMES_PER_BLOCK, VIDEO_FRAMES_PER_LATENT, BlockPlan, realvideo_schedule, sample_realvideo

LIVE_STEPS = 2  # real time on one H100 needs 2 steps (upstream offers 2 or 4)
BLOCK_FRAMES = VIDEO_FRAMES_PER_LATENT * FRAMES_PER_BLOCK  # 8
LATENT_SAMPLES = VIDEO_FRAMES_PER_LATENT * FRAME_SAMPLES  # 4000: one latent frame of audio
BLOCK_SAMPLES = BLOCK_FRAMES * FRAME_SAMPLES  # 8000
REALVIDEO_LIVE_GEOMETRY = LiveGeometry(
    first_block_frames=video_frames_for_latents(FRAMES_PER_BLOCK),  # 5: the VAE's first latent is one frame
    block_frames=BLOCK_FRAMES,
    first_block_samples=BLOCK_SAMPLES,
    block_samples=BLOCK_SAMPLES,
    # latent 0 decodes to 1 frame, every later one to 4: frame f shows the audio of frame f + 3
    frame_audio_offset=(VIDEO_FRAMES_PER_LATENT - 1) * FRAME_SAMPLES,
)


def block_window(block: int, window: LiveWindow) -> tuple[int, int]:
    """Timeline samples ``[start, end)`` block ``block``'s segment reads (``start`` < 0 early on: silence).

    ``end`` is the tile's end plus the look-ahead (whole frames). ``start`` reaches ``context``
    back, further to make whole seconds, and down to a multiple of 0.5 s: the offline segments start
    on that grid too, so the 30 fps features a video frame picks are the ones at the same time.
    """
    tile_start, tile_end = REALVIDEO_LIVE_GEOMETRY.tile(block)
    end = tile_end + -(-window.lookahead_samples // FRAME_SAMPLES) * FRAME_SAMPLES
    needed = end - tile_start + window.context_samples
    start = end - -(-needed // SAMPLE_RATE) * SAMPLE_RATE
    return start // BLOCK_SAMPLES * BLOCK_SAMPLES, end


def block_segment(block: int, window: LiveWindow, audio: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The block's segment from its window's audio ``[N]`` (:func:`block_window`): padded with silence
    at the end to whole seconds, as upstream pads each segment; and the first latent frame of the block in it."""
    start, end = block_window(block, window)
    if audio.numel() != end - start:
        raise ValueError(f"block {block}'s window holds {end - start} samples, got {audio.numel()}")
    padded = -(-audio.numel() // SAMPLE_RATE) * SAMPLE_RATE
    segment = torch.nn.functional.pad(audio.float(), (0, padded - audio.numel()))
    return segment, (REALVIDEO_LIVE_GEOMETRY.tile(block)[0] - start) // LATENT_SAMPLES


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
    """RealVideo's :class:`~.runtime.live_stream.LiveStream` in this process (a DiT on worker
    processes streams through :class:`~.live_remote.RemoteRealVideoStream`)."""

    geometry = REALVIDEO_LIVE_GEOMETRY

    def __init__(self, dit, encoder: AudioEncoder, *, idle_context: torch.Tensor, talking_context: torch.Tensor,
                 reference: torch.Tensor, seed: int, steps: int | None, window: LiveWindow,
                 workspace: Workspace | None = None) -> None:
        if isinstance(dit, RemoteSampler):
            raise TypeError("RealVideoStream samples in this process; a DiT on workers streams through "
                            "RemoteRealVideoStream (RealVideoFamily.open_live_stream picks it)")
        self.dit, self.encoder, self.live_window, self._workspace = dit, encoder, window, workspace
        self._segments = LatestSegment()
        self._entry: BlockPlan | None = None
        self._blocks = sample_realvideo(
            dit, ref_latent=reference.to(dit.dtype), idle_context=idle_context, talking_context=talking_context,
            audio_features=self._segments, noise=SeededNoise(seed), plan=self._plan(),
            schedule=realvideo_schedule(LIVE_STEPS if steps is None else steps), workspace=workspace,
        )

    def window(self, block: int) -> tuple[int, int]:
        return block_window(block, self.live_window)

    def sample(self, block: int, audio: torch.Tensor, silent: bool) -> torch.Tensor:
        segment, ptr = block_segment(block, self.live_window, audio)
        graphs = self._workspace.module_graphs(self.encoder.model) if self._workspace is not None else None
        features = segment_features(self.encoder, segment.to(self.encoder.device), self.dit.dtype, graphs)
        self._segments.set(block, features)
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
