"""The live session's audio: a timeline that audio is pushed onto from any thread and that each
block reads its window from, keeping only the recent past (bounded memory however long it runs).

Audio is placed where the pushed audio ends, or, when the session already filled that time with
silence (the audio came after its block's deadline), right after the last block made: no sample is
dropped or overwritten, late speech is shown late. So within a block's tile the pushed samples
come first and the silence the session filled in last.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from ..errors import InputError


class AudioTimeline:
    """16 kHz mono float32 samples on the session's timeline (sample 0 = the session's start)."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._samples = np.zeros(0, np.float32)  # timeline samples [_base, _end)
        self._base = 0
        self._end = 0
        self._used = 0  # end of the last tile a block was made from
        self._closed = False
        self.last_push: float | None = None  # time.monotonic() of the newest push

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
            start = max(self._end, self._used)
            parts = [self._samples, np.zeros(start - self._end, np.float32), audio]
            self._samples = np.concatenate(parts)
            self._end = start + audio.size
            self.last_push = time.monotonic()
            self._changed.notify_all()

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

    def use_tile(self, tile: tuple[int, int], window: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, int]:
        """A block is made from its ``tile`` ``[start, end)`` with features over ``window``: the
        window's samples, the tile's, and how many of the tile's were pushed (the rest is silence,
        and audio pushed from now on goes after the tile), all read at one instant."""
        with self._changed:
            start, end = tile
            audio = self.read(start, end)
            self._used = max(self._used, end)
            return self.read(*window), audio, max(0, min(self._end, end) - start)

    def forget_before(self, position: int) -> None:
        """Drop the samples before ``position`` (no later block reads them)."""
        with self._changed:
            drop = min(max(0, position - self._base), self._samples.size)
            self._samples = self._samples[drop:].copy()
            self._base += drop

    def close(self) -> None:
        """Wake every waiter; later pushes are ignored."""
        with self._changed:
            self._closed = True
            self._samples = np.zeros(0, np.float32)
            self._base = self._end
            self._changed.notify_all()
