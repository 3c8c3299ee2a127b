"""LiveTalk 1.3B live: each block's audio features from a bounded window of past audio, fed block by
block into the same sampling loop as the offline path (:func:`~.sampler.sample_livetalk`).

Offline, wav2vec2 runs over the whole clip and its CNN frames are interpolated to the video frames
(frame ``f`` at sample ``1000 f``). Live, the same function runs over a window ending at the
block's last sample plus the look-ahead, starting ``context_samples`` before its tile (never before
the session's first sample): the window's features, frame for frame on the same grid, are those of
a clip that starts and ends there. The DiT's audio embedding of a latent frame reads only its own 4
video frames (frame 0 repeated for latent 0), so a block's embedding is computed from its own
frames and, after block 0, the frame before them, whose latent is dropped.
"""

from __future__ import annotations

import torch

from ..media.timing import video_frames_for_latents
from ..media.wav2vec2 import AudioEncoder, livetalk_audio_features
from ..runtime.cuda_graphs import ForwardGraphs
from ..runtime.live_stream import FRAME_SAMPLES, LiveGeometry, LiveWindow
from ..runtime.noise import SeededNoise
from ..runtime.scheduler import livetalk_schedule
from ..runtime.workspace import Workspace
from .audio import check_audio_encoder
from .model import VIDEO_FRAMES_PER_LATENT, LiveTalkDiT
from .sampler import LIVETALK_CACHE, LIVETALK_FRAMES_PER_BLOCK, sample_livetalk

FIRST_BLOCK_FRAMES = video_frames_for_latents(LIVETALK_FRAMES_PER_BLOCK)  # 9: latent 0 is one frame
BLOCK_FRAMES = VIDEO_FRAMES_PER_LATENT * LIVETALK_FRAMES_PER_BLOCK  # 12
LIVETALK_LIVE_GEOMETRY = LiveGeometry(
    first_block_frames=FIRST_BLOCK_FRAMES,
    block_frames=BLOCK_FRAMES,
    first_block_samples=FIRST_BLOCK_FRAMES * FRAME_SAMPLES,
    block_samples=BLOCK_FRAMES * FRAME_SAMPLES,
)


CNN_ALIGNED_FRAMES = 8
"""Video frames (0.5 s, 25 wav2vec2 CNN frames) a window's start is a multiple of: its CNN frames then
fall on the offline clip's CNN frames."""


def _whole_frames(samples: int) -> int:
    return -(-samples // FRAME_SAMPLES)


def block_window(block: int, window: LiveWindow) -> tuple[int, int]:
    """Timeline samples ``[start, end)`` block ``block``'s features read: whole frames from
    ``context`` before its tile (and the frame before it) to ``lookahead`` past it, from sample 0 on."""
    tile_start, tile_end = LIVETALK_LIVE_GEOMETRY.tile(block)
    first = max(0, tile_start // FRAME_SAMPLES - (block > 0) - _whole_frames(window.context_samples))
    first = first // CNN_ALIGNED_FRAMES * CNN_ALIGNED_FRAMES
    last = tile_end // FRAME_SAMPLES + _whole_frames(window.lookahead_samples)
    return first * FRAME_SAMPLES, last * FRAME_SAMPLES


def block_features(encoder: AudioEncoder, block: int, audio: torch.Tensor, window: LiveWindow,
                   graphs: ForwardGraphs | None = None) -> torch.Tensor:
    """wav2vec2 features ``[1, frames, (L + 2) * hidden]`` of block ``block``'s video frames (after
    block 0, with the frame before them first) from its window's audio ``[N]`` (:func:`block_window`),
    padded with silence at its end to the 0.5 s grid as the offline clip is padded to whole blocks.
    ``graphs``: the encoder's CUDA graphs (a window's length recurs block after block)."""
    start, end = block_window(block, window)
    if audio.numel() != end - start:
        raise ValueError(f"block {block}'s window holds {end - start} samples, got {audio.numel()}")
    grid = CNN_ALIGNED_FRAMES * FRAME_SAMPLES
    padded = torch.nn.functional.pad(audio.float(), (0, -(-audio.numel() // grid) * grid - audio.numel()))
    features = livetalk_audio_features(encoder, padded.to(encoder.device), padded.numel() // FRAME_SAMPLES + 1,
                                       graphs=graphs)
    first = LIVETALK_LIVE_GEOMETRY.first_frame(block) - (block > 0)  # one frame before: latent grouping
    frames = LIVETALK_LIVE_GEOMETRY.first_block_frames if block == 0 else BLOCK_FRAMES + 1
    offset = first - start // FRAME_SAMPLES
    return features[:, offset : offset + frames]


def block_embeds(dit: LiveTalkDiT, encoder: AudioEncoder, block: int, audio: torch.Tensor,
                 window: LiveWindow, graphs: ForwardGraphs | None = None) -> torch.Tensor:
    """The DiT's audio terms ``[1, P, 3, C]`` for block ``block``: :func:`block_features` embedded, the
    latent of the frame before the block dropped."""
    embeds = dit.embed_audio(block_features(encoder, block, audio, window, graphs).to(dit.device))
    return embeds if block == 0 else embeds[:, :, 1:]


class LiveTalkStream:
    """LiveTalk's :class:`~.runtime.live_stream.LiveStream`: one prompt throughout (a silent block is
    sampled from silence; LiveTalk has no idle prompt)."""

    geometry = LIVETALK_LIVE_GEOMETRY

    def __init__(self, dit: LiveTalkDiT, encoder: AudioEncoder, *, context: torch.Tensor, reference: torch.Tensor,
                 seed: int, steps: int | None, window: LiveWindow, workspace: Workspace | None = None) -> None:
        check_audio_encoder(dit, encoder)
        self.dit, self.encoder, self.live_window, self._workspace = dit, encoder, window, workspace
        self._audio: tuple[int, torch.Tensor] | None = None  # the block being sampled and its window's audio
        schedule = livetalk_schedule() if steps is None else livetalk_schedule(steps)
        self._blocks = sample_livetalk(
            dit, ref_latent=reference, audio_embeds=self._block_embeds, context=context, num_blocks=None,
            noise=SeededNoise(seed), schedule=schedule, cache_policy=LIVETALK_CACHE, workspace=workspace,
        )

    def window(self, block: int) -> tuple[int, int]:
        return block_window(block, self.live_window)

    def sample(self, block: int, audio: torch.Tensor, silent: bool) -> torch.Tensor:
        self._audio = (block, audio)
        try:
            return next(self._blocks)
        finally:
            self._audio = None

    def _block_embeds(self, block: int) -> torch.Tensor:
        """Called by the sampler when the block starts, inside its run: the workspace has its graphs by
        then (the first session's block 0 too), so the encoder's calls are counted from the first one."""
        if self._audio is None or self._audio[0] != block:
            raise RuntimeError(f"block {block} was asked for outside LiveTalkStream.sample")
        graphs = self._workspace.module_graphs(self.encoder.model) if self._workspace is not None else None
        return block_embeds(self.dit, self.encoder, block, self._audio[1], self.live_window, graphs)

    def close(self) -> None:
        self._blocks.close()

