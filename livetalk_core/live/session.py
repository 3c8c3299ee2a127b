"""A live conversation with one avatar: audio in as it arrives, video blocks out.

:class:`LiveSession` drives a model family's :class:`~..runtime.live_stream.LiveStream` block after
block. Block ``k`` is made from its *tile* of the timeline (``LiveBlock.audio``): the session waits
until the audio its features read (the tile, plus the look-ahead) has arrived, or until the deadline
it is given, and fills what is missing with silence, so the video never stops. Each block's latents
go through the shared streaming VAE decoder, block 0 one latent frame at a time as the offline
decoder (:func:`~..runtime.decode_stream.decode_blocks`) does, so a session fed a whole clip makes the
offline video's frames. The reference frame is there before any block.

:func:`open_session` takes loaded models (the ComfyUI node, the CLI); :func:`open_smoke_session` tiny
random ones on the CPU (``live --smoke`` and the tests). :class:`~.clock.LiveClock` runs a session
in real time.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..family_base import ModelFamily
from ..media.audio_file import SAMPLE_RATE
from ..media.timing import VIDEO_FPS
from ..media.vae import WanVAE, frames_to_uint8
from ..runtime.live_stream import FRAME_SAMPLES, LiveStream, LiveWindow
from ..runtime.workspace import Workspace
from .clock import LiveClock
from .features import AudioTimeline, Runs

__all__ = ["LiveBlock", "LiveClock", "LiveSession", "WarmSessions", "open_session", "open_smoke_session"]

DEFAULT_CONTEXT_S = 2.0
"""Seconds of past audio each block's features see (docs/live.md, "Streaming audio features")."""
DEFAULT_LOOKAHEAD_S = 0.0
"""Seconds of audio past a block's tile its features see; the session waits for them (latency)."""
SILENCE_RMS = 0.01
"""A block whose pushed audio is quieter than this (RMS, -40 dBFS; speech is louder, a microphone's
noise floor quieter) is a silent block, like one with no audio at all: the family's idle prompt."""


@dataclass
class LiveBlock:
    """One block of a live session: its frames and the audio they were made from, on the session's
    timeline (frame ``f`` at ``f / fps`` s, sample ``s`` at ``s / sample_rate`` s)."""

    index: int
    first_frame: int
    frames: np.ndarray  # uint8 [n, H, W, 3]
    audio: np.ndarray  # float32 [m]: the block's tile, silence included
    audio_start: int
    speech_samples: int  # pushed samples in ``audio`` (the rest is silence the session filled in)
    generated_s: float
    speech_runs: Runs = ()  # where in ``audio`` the pushed samples are: (offset, length), in order

    def pushed(self) -> np.ndarray:
        """The client's samples this block used, in order (the silence filled in left out)."""
        return pushed_samples(self.audio, self.speech_runs)


def pushed_samples(audio: np.ndarray, runs: Runs) -> np.ndarray:
    """The samples of ``audio`` in ``runs`` ((offset, length) pairs), in order."""
    return np.concatenate([audio[offset : offset + length] for offset, length in runs] or [np.zeros(0, np.float32)])


def is_silence(pushed: np.ndarray) -> bool:
    """Whether a block's pushed samples hold no speech: none, or all below :data:`SILENCE_RMS`."""
    return pushed.size == 0 or float(np.sqrt(np.mean(np.square(pushed, dtype=np.float64)))) < SILENCE_RMS


def seconds_to_samples(seconds: float) -> int:
    return round(seconds * SAMPLE_RATE)


class LiveSession:
    """One live conversation with one avatar (see the module doc). ``push_audio`` may be called from
    any thread; ``next_block`` from one thread at a time; ``close`` frees the KV cache."""

    fps = VIDEO_FPS
    sample_rate = SAMPLE_RATE

    def __init__(self, family: ModelFamily, stream: LiveStream, vae: WanVAE, reference_pixels: torch.Tensor,
                 *, owned: tuple[Any, ...] = (), decoder: Any = None, workspace: Workspace | None = None) -> None:
        """``reference_pixels`` ``[1, 3, 1, H, W]`` in [-1, 1]; ``owned``: models the session frees on close;
        ``decoder``: what decodes the blocks, ``vae`` (None) or a tiny decoder (``media.taehv.TinyDecoder``);
        ``workspace``: the stream's, where a decoder that can (``stream_graphs``) keeps its CUDA graphs."""
        self.family, self._stream = family, stream
        self._decoding_model = vae if decoder is None else decoder
        self._reference = frames_to_uint8(reference_pixels.float().cpu())[0].numpy().copy()  # no torch storage
        self.height, self.width = self._reference.shape[:2]
        geometry = stream.geometry
        self.first_block_frames, self.block_frames = geometry.first_block_frames, geometry.block_frames
        self.block_samples = geometry.block_samples
        self.frame_audio_offset = geometry.frame_audio_offset
        self._lead = max(self._needed(block) - geometry.first_frame(block) * FRAME_SAMPLES for block in range(3))
        self._timeline = AudioTimeline()
        graphs_for = workspace.module_graphs if workspace is not None else None
        self._decoder = self._decoding_model.stream_decoder(graphs_for) \
            if getattr(self._decoding_model, "stream_graphs", False) else self._decoding_model.stream_decoder()
        self._owned = owned
        self._index = 0
        self._lock = threading.Lock()
        self._closed = False

    # --- what a server shows ---------------------------------------------------------------------
    def reference_frame(self) -> np.ndarray:
        """The reference image as the model sees it, uint8 ``[H, W, 3]`` (shown before any block)."""
        return self._reference

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def blocks_made(self) -> int:
        return self._index

    @property
    def on_gpu(self) -> bool:
        """Whether the blocks are decoded on a GPU (then the DiT samples on GPUs too: here or in workers)."""
        return torch.device(self._decoding_model.device).type == "cuda"

    def next_tile(self) -> tuple[int, int]:
        """The timeline samples ``[start, end)`` the next block is made from."""
        return self._stream.geometry.tile(self._index)

    def audio_needed(self) -> int:
        """The timeline sample the pushed audio must reach before the next block can be made
        (its tile and look-ahead)."""
        return self._needed(self._index)

    def _needed(self, block: int) -> int:
        return max(self._stream.geometry.tile(block)[1], self._stream.window(block)[1])

    def schedule_sample(self) -> int:
        """The timeline sample by whose time the next block is due on a steady stream: its first frame's
        sample plus the same lead for every block (the most audio past its first frame any block needs).
        Block 0 is shorter than the rest (LiveTalk 9 frames, RealVideo 5): its due time includes the lead
        too, so a player that starts with block 0 finds every later block on time (docs/live.md)."""
        return self._stream.geometry.first_frame(self._index) * FRAME_SAMPLES + self._lead

    def anchor(self, origin: float, tolerance_s: float) -> None:
        """A clock runs this session from ``origin`` (``time.monotonic()`` of timeline sample 0): audio that
        arrives more than ``tolerance_s`` late for its place goes where it was spoken (features.AudioTimeline)."""
        self._timeline.anchor(origin, tolerance_s)

    @property
    def audio_end(self) -> int:
        """Where the pushed audio ends on the timeline."""
        return self._timeline.end

    @property
    def last_push(self) -> float | None:
        """``time.monotonic()`` of the newest ``push_audio``."""
        return self._timeline.last_push

    # --- the session ---------------------------------------------------------------------------
    def push_audio(self, samples: np.ndarray) -> None:
        """Mono float32 samples at 16 kHz in [-1, 1], any length; thread-safe."""
        self._timeline.push(samples)

    def wait_for_audio(self, until: float) -> bool:
        """Wait until the next block's audio has arrived (True) or ``time.monotonic()`` reaches ``until``."""
        return self._timeline.wait_for(self.audio_needed(), until)

    def next_block(self, *, wait_until: float | None = None) -> LiveBlock:
        """Make the next block. Waits until its audio has arrived or ``time.monotonic()`` reaches
        ``wait_until`` (None: no wait), then fills what is missing with silence."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the live session is closed")
            if wait_until is not None:
                self.wait_for_audio(wait_until)
            return self._make_block()

    @torch.no_grad()
    def _make_block(self) -> LiveBlock:
        began = time.perf_counter()
        index, geometry = self._index, self._stream.geometry
        tile_start, tile_end = geometry.tile(index)
        window, audio, runs = self._timeline.use_tile((tile_start, tile_end), self._stream.window(index))
        pushed = pushed_samples(audio, runs)
        latents = self._stream.sample(index, torch.from_numpy(window), silent=is_silence(pushed))
        frames = self._decode(latents, first=index == 0)
        self._index += 1
        next_start = self._stream.window(self._index)[0]
        self._timeline.forget_before(min(next_start, geometry.tile(self._index)[0]))
        return LiveBlock(index=index, first_frame=geometry.first_frame(index), frames=frames, audio=audio,
                         audio_start=tile_start, speech_samples=pushed.size, speech_runs=runs,
                         generated_s=time.perf_counter() - began)

    def _decode(self, latents: torch.Tensor, first: bool) -> np.ndarray:
        """The block's frames through the streaming decoder; block 0 one latent frame at a time, as
        the offline decoder does (the same kernels, so the same frames)."""
        pieces = latents.split(1, dim=2) if first else (latents,)
        model = self._decoding_model
        frames = [frames_to_uint8(self._decoder.decode(piece.to(model.device, model.dtype))).cpu() for piece in pieces]
        return torch.cat(frames).numpy()

    def close(self) -> None:
        """Free the KV cache, the decoder's state and the models the session owns; idempotent."""
        self._timeline.close()  # wakes a next_block waiting for audio
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._stream.close()
            self._decoder = None
            self._owned = ()

    def __enter__(self) -> LiveSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


WARM_UP_BLOCKS = 8
"""Blocks per warm-up session: both families' caches reach their repeating layouts by block 5 (LiveTalk's
window fills at block 4, RealVideo's at block 1), and the warm-up repeats sessions until one makes every
forward from a graph."""
WARM_UP_SESSIONS = 3
REMOTE_WARM_UP_SESSIONS = 2  # what one process needs in practice: the first meets every layout, the second
# captures block 0's


class WarmSessions:
    """A server's live sessions over one :class:`~..runtime.workspace.Workspace`: the KV cache, the CUDA
    graphs of every block layout and the text buffers are kept from one client's session to the next, and
    made before the first client's session is handed out. Without it a session compiles and captures while
    its client watches (a capture of the 14B's forward held a block for seconds), and block 0, which the
    client's first frame waits for, never replays from a graph.

    ``open_for(workspace, start)`` opens a session on the workspace (:func:`open_session`). The first call
    first runs warm-up sessions on silence (``start``'s inputs, :data:`WARM_UP_BLOCKS` blocks each) until one
    makes every forward from a graph, at most :data:`WARM_UP_SESSIONS`; one when the model runs eagerly on a
    GPU (compile); :data:`REMOTE_WARM_UP_SESSIONS` when the DiT samples in worker processes (they keep a
    workspace of their own, which this process cannot see settle); none past one block on a CPU. :meth:`free`
    lets the workspace go (the server or node is ending)."""

    def __init__(self, open_for: Callable[[Workspace, Any], LiveSession], workspace: Workspace | None = None) -> None:
        self._open_for = open_for
        self.workspace = workspace or Workspace()
        self.warm_up_sessions = 0
        self._warm = False

    def __call__(self, start: Any = None) -> LiveSession:
        while not self._warm:
            with self._open_for(self.workspace, start) as session:
                self._warm = self._warm_up(session)
            self.warm_up_sessions += 1
            self._warm = self._warm or self.warm_up_sessions >= WARM_UP_SESSIONS
        return self._open_for(self.workspace, start)

    def _warm_up(self, session: LiveSession) -> bool:
        """One warm-up session; whether the workspace is warm after it."""
        session.push_audio(np.zeros(session.block_samples * WARM_UP_BLOCKS, np.float32))
        session.next_block()
        workspace = self.workspace
        sampled_here = workspace.cache is not None
        on_gpu = workspace.cache.keys[0].device.type == "cuda" if sampled_here else session.on_gpu
        if not workspace.uses_graphs and not on_gpu:
            return True  # nothing to compile or capture on a CPU
        for _ in range(WARM_UP_BLOCKS - 1):
            session.next_block()
        session.close()  # ends the run: the workspace now says whether it settled
        if not sampled_here:
            return self.warm_up_sessions + 1 >= REMOTE_WARM_UP_SESSIONS
        return workspace.settled or not workspace.uses_graphs

    def free(self) -> None:
        """Let go of the KV cache and graphs (after the last session closed; else when it does)."""
        self.workspace.free()


def as_conditioning(text: Any) -> list | None:
    """A text encoding as ComfyUI's CONDITIONING carries it: a tensor ``[1, L, D]`` is wrapped."""
    if isinstance(text, torch.Tensor):
        return [[text if text.ndim == 3 else text[None], {}]]
    return text


@torch.no_grad()
def open_session(family: ModelFamily, *, dit: Any, vae: WanVAE, audio_encoder: Any, text: Any, idle_text: Any = None,
                 reference_image: torch.Tensor | np.ndarray, width: int, height: int, seed: int = 0,
                 steps: int | None = None, device: torch.device | str | None = None,
                 context_s: float = DEFAULT_CONTEXT_S, lookahead_s: float = DEFAULT_LOOKAHEAD_S,
                 owned: tuple[Any, ...] = (), decoder: Any = None, workspace: Workspace | None = None) -> LiveSession:
    """A live session over loaded models. ``text`` / ``idle_text``: the prompt's encoding (ComfyUI
    CONDITIONING or a tensor ``[1, L, D]``), the idle one used for silent blocks where the family
    has one. ``reference_image`` ``[H, W, 3]`` (uint8, or float in [0, 1]); ``width`` x ``height``
    as the family reads them (:meth:`~..family_base.ModelFamily.reference_pixels`, centre crop).
    ``device``: where the reference is prepared (default: the VAE's). ``decoder``: what decodes the
    blocks: None, the VAE; or a tiny decoder (``media.taehv.TinyDecoder``: faster, lower quality); the VAE
    still encodes the reference. ``workspace``: the KV cache and CUDA graphs to sample with, kept after the
    session closes (:class:`WarmSessions`); None: the session's own, freed when it closes."""
    image = torch.as_tensor(np.asarray(reference_image)) if not isinstance(reference_image, torch.Tensor) \
        else reference_image
    pixels = family.reference_pixels(image, width, height, "center", device or vae.device)
    reference = vae.encode(pixels.to(vae.device, vae.dtype))
    window = LiveWindow(seconds_to_samples(context_s), seconds_to_samples(lookahead_s))
    stream = family.open_live_stream(dit, audio_encoder, conditioning=as_conditioning(text),
                                     idle_conditioning=as_conditioning(idle_text), reference=reference, seed=seed,
                                     steps=steps, window=window, workspace=workspace)
    return LiveSession(family, stream, vae, pixels, owned=owned, decoder=decoder, workspace=workspace)


def open_smoke_session(family_name: str = "livetalk", *, width: int | None = None, height: int | None = None,
                       seed: int = 0, reference_image: torch.Tensor | np.ndarray | None = None,
                       context_s: float = DEFAULT_CONTEXT_S, lookahead_s: float = DEFAULT_LOOKAHEAD_S,
                       workspace: Workspace | None = None) -> LiveSession:
    """A live session over tiny random models on the CPU (``live --smoke``, the tests): the video is
    noise, the whole path is real. ``family_name``: "livetalk" or "realvideo"."""
    from .smoke import smoke_models

    models = smoke_models(family_name)
    image = models.reference if reference_image is None else reference_image
    return open_session(
        models.family, dit=models.dit, vae=models.vae, audio_encoder=models.encoder, text=models.text,
        idle_text=models.idle_text, reference_image=image, width=width or models.width,
        height=height or models.height, seed=seed, context_s=context_s, lookahead_s=lookahead_s,
        owned=(models,), workspace=workspace,
    )
