"""The live session's audio: a timeline that audio is pushed onto from any thread and that each
block reads its window from, keeping only the recent past (bounded memory however long it runs).

Audio is placed where the pushed audio ends, or, when the session already filled that time with
silence (the audio came after its block's deadline), right after the last block made: no sample is
dropped or overwritten. Once a clock runs the timeline (:meth:`AudioTimeline.anchor`), audio that
arrives later than that place by more than a tolerance (a client that paused, or began talking after
the session started) goes where it was spoken instead: its first sample at the timeline time it
arrived minus its own length (a client sends a chunk when its last sample has been spoken). The
silence before it is filled in, so speech resumed mid-block is on schedule, never a block late. A
block's tile then holds the client's samples as *runs* (:meth:`AudioTimeline.use_tile`), in order.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from ..errors import InputError
from ..media.audio_file import SAMPLE_RATE

MAX_GAP_SAMPLES = 2 * SAMPLE_RATE
"""The most silence placed before audio that came after a pause. A clock on schedule never needs more than a
block and its slack; a session slower than real time (its blocks behind the clock) would otherwise fill the
whole lag with silence, and memory with it."""
Runs = tuple[tuple[int, int], ...]
"""Where pushed samples lie in a stretch of the timeline: ``(offset, length)`` pairs, in order."""


class AudioTimeline:
    """16 kHz mono float32 samples on the session's timeline (sample 0 = the session's start)."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._samples = np.zeros(0, np.float32)  # timeline samples [_base, _end)
        self._base = 0
        self._end = 0
        self._used = 0  # end of the last tile a block was made from
        self._closed = False
        self._runs: list[list[int]] = []  # timeline [start, end) of the pushed samples, contiguous ones merged
        self._origin: float | None = None  # time.monotonic() of timeline sample 0, once a clock runs the timeline
        self._tolerance = 0  # samples a push may arrive later than where it goes without being moved to its time
        self.last_push: float | None = None  # time.monotonic() of the newest push

    def anchor(self, origin: float, tolerance_s: float) -> None:
        """A clock runs the timeline from ``origin`` (``time.monotonic()`` of sample 0): from now on audio
        that arrives more than ``tolerance_s`` after where it would go is placed at the time it was spoken."""
        with self._changed:
            self._origin, self._tolerance = origin, round(tolerance_s * SAMPLE_RATE)

    @property
    def end(self) -> int:
        """Where the pushed audio ends (silence filled in before it included)."""
        return self._end

    def push(self, samples: np.ndarray) -> None:
        """Append ``samples`` (mono float32, any length); thread-safe."""
        audio = np.asarray(samples, dtype=np.float32)
        if audio.ndim != 1:
            raise InputError(f"Live audio must be mono samples [N]; got shape {audio.shape}. Mix it down first.")
        if not np.isfinite(audio).all():
            raise InputError("Live audio holds NaN or infinite samples; send PCM in [-1, 1].")
        with self._changed:
            if self._closed or audio.size == 0:
                return
            now = time.monotonic()
            start = self._place(audio.size, now)
            parts = [self._samples, np.zeros(start - self._end, np.float32), audio]
            self._samples = np.concatenate(parts)
            self._end = start + audio.size
            if self._runs and self._runs[-1][1] == start:
                self._runs[-1][1] = self._end
            else:
                self._runs.append([start, self._end])
            self.last_push = now
            self._changed.notify_all()

    def _place(self, samples: int, now: float) -> int:
        """Where a push of ``samples`` arriving at ``now`` starts: after the pushed audio and the tiles already
        used, or where it was spoken if it arrived more than the tolerance later than that (see the module doc)."""
        start = max(self._end, self._used)
        if self._origin is not None:
            spoken = round((now - self._origin) * SAMPLE_RATE) - samples
            if spoken > start + self._tolerance:
                start = min(spoken, start + MAX_GAP_SAMPLES)
        return start

    def runs_in(self, start: int, end: int) -> Runs:
        """The pushed samples in ``[start, end)`` as ``(offset from start, length)`` runs."""
        with self._changed:
            return tuple((max(lo, start) - start, min(hi, end) - max(lo, start))
                         for lo, hi in self._runs if lo < end and hi > start)

    def wait_for(self, position: int, deadline: float) -> bool:
        """Wait until the pushed audio reaches ``position`` or ``time.monotonic()`` reaches
        ``deadline`` (or the timeline closes); whether the audio is there."""
        with self._changed:
            while self._end < position and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(left)
            return self._end >= position

    def read(self, start: int, end: int) -> np.ndarray:
        """Samples ``[start, end)``: silence before the session began and past the pushed audio."""
        with self._changed:
            if max(start, 0) < self._base and end > start:
                raise ValueError(f"samples from {start} were forgotten (kept from {self._base})")
            out = np.zeros(end - start, np.float32)
            lo, hi = max(start, self._base), min(end, self._end)
            if hi > lo:
                out[lo - start : hi - start] = self._samples[lo - self._base : hi - self._base]
            return out

    def use_tile(self, tile: tuple[int, int], window: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, Runs]:
        """A block is made from its ``tile`` ``[start, end)`` with features over ``window``: the
        window's samples, the tile's, and where in the tile the pushed ones are (the rest is silence,
        and audio pushed from now on goes after the tile), all read at one instant."""
        with self._changed:
            start, end = tile
            audio = self.read(start, end)
            self._used = max(self._used, end)
            return self.read(*window), audio, self.runs_in(start, end)

    def forget_before(self, position: int) -> None:
        """Drop the samples before ``position`` (no later block reads them)."""
        with self._changed:
            drop = min(max(0, position - self._base), self._samples.size)
            self._samples = self._samples[drop:].copy()
            self._base += drop
            self._runs = [run for run in self._runs if run[1] > self._base]

    def close(self) -> None:
        """Wake every waiter; later pushes are ignored."""
        with self._changed:
            self._closed = True
            self._samples = np.zeros(0, np.float32)
            self._base = self._end
            self._runs = []
            self._changed.notify_all()
