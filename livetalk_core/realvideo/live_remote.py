"""RealVideo 14B live on several GPUs: the live stream of a DiT that runs in worker processes (a
model loaded with ``gpus`` > 1, or the CLI's ``--gpus``).

This process keeps the audio encoder and makes each block's inputs as :class:`~.live.RealVideoStream`
does (its segment's wav2vec2 features and its :class:`~.sampler.BlockPlan` entry); the workers run
:func:`~.parallel.stream_realvideo_parallel`, the one-process sampling loop fed those inputs one
block at a time over a streaming request (:meth:`~..parallel.workers.WorkerGroup.stream`), so the
blocks are the ones a single process makes. Closing the stream ends the request; the workers stay
loaded for the next session.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import InputError
from ..media.wav2vec2 import AudioEncoder
from ..runtime.live_stream import LiveWindow
from .audio import segment_features
from .live import LIVE_STEPS, REALVIDEO_LIVE_GEOMETRY, block_segment, block_window
from .sampler import BlockPlan, realvideo_schedule


def can_stream(dit: Any) -> bool:
    """Whether ``dit`` (a :class:`~..family_base.RemoteSampler`) can open a streaming request."""
    return callable(getattr(dit, "stream", None))


class RemoteRealVideoStream:
    """RealVideo's :class:`~..runtime.live_stream.LiveStream` over a DiT in worker processes:
    ``dit.stream(seed=..., **inputs)`` opens the request (e.g. a :class:`~..parallel.workers.BlockStream`)."""

    geometry = REALVIDEO_LIVE_GEOMETRY

    def __init__(self, dit: Any, encoder: AudioEncoder, *, idle_context: torch.Tensor, talking_context: torch.Tensor,
                 reference: torch.Tensor, seed: int, steps: int | None, window: LiveWindow) -> None:
        if not can_stream(dit):
            raise InputError("This model runs on several GPUs in a way that cannot stream block by block (torchrun "
                             "ranks); load it with the loader's gpus (or the live command's --gpus) instead.")
        self.dtype, self.encoder, self.live_window = dit.dtype, encoder, window
        schedule = realvideo_schedule(LIVE_STEPS if steps is None else steps)  # refuses anything but 2 or 4
        self._blocks = dit.stream(seed=seed, ref_latent=reference.to(dit.dtype).cpu(), idle_context=idle_context.cpu(),
                                  talking_context=talking_context.cpu(), schedule=schedule)

    def window(self, block: int) -> tuple[int, int]:
        return block_window(block, self.live_window)

    def sample(self, block: int, audio: torch.Tensor, silent: bool) -> torch.Tensor:
        """Block ``block``'s latents (CPU), sampled by the workers from its segment's features."""
        segment, ptr = block_segment(block, self.live_window, audio)
        features = segment_features(self.encoder, segment.to(self.encoder.device), self.dtype).cpu()
        return self._blocks.next_block((BlockPlan(block, ptr, talking=not silent), features))

    def close(self) -> None:
        self._blocks.close()
