"""Runs a live session in real time: block after block in a thread of its own, so the video never stops.

Time 0 of the session's timeline is :meth:`LiveClock.start`. A block is made as soon as the audio it
needs (its tile and the features' look-ahead) has arrived, or at its *deadline*, with the missing
part as silence. The deadline is when that audio should have arrived, plus ``slack_s``: on the
timeline's schedule (sample ``s`` at ``s / 16000`` s after the start) or, while a client is
streaming into the block, at the pace of its stream (its last push plus the time the rest of the
audio takes to play), whichever is later: a client that began speaking mid-block is not cut short.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .session import LiveBlock, LiveSession

DEFAULT_SLACK_S = 0.1
"""How long past the moment a block's audio should have arrived the clock waits for it."""
_POLL_S = 0.02  # how often a waiting clock looks again (a new push may move the deadline, stop may come)


class LiveClock:
    """Drives ``session`` block after block in a thread, calling ``on_block(block)`` from that thread.
    ``on_error(exc)`` (from that thread) is called if making a block or ``on_block`` raises; the
    clock then stops. :meth:`stop` joins the thread; closing the session is its owner's job (a session
    closed under a running clock stops it too, without an error)."""

    def __init__(self, session: LiveSession, on_block: Callable[[LiveBlock], None], *,
                 slack_s: float = DEFAULT_SLACK_S,
                 on_error: Callable[[BaseException], None] | None = None) -> None:
        if slack_s < 0:
            raise ValueError(f"slack_s must be at least 0, got {slack_s}")
        self.session, self.on_block, self.on_error, self.slack_s = session, on_block, on_error, slack_s
        self.started_at: float | None = None
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="livetalk-live-clock", daemon=True)

    def start(self) -> None:
        self.started_at = time.monotonic()
        self._thread.start()

    def stop(self) -> None:
        """Stop after the block being made (if any) and join the thread; idempotent."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def deadline(self) -> float:
        """``time.monotonic()`` at which the next block is made whatever audio has arrived."""
        session = self.session
        needed = session.audio_needed()
        due = self.started_at + needed / session.sample_rate
        tile_start = session.next_tile()[0]
        last_push = session.last_push
        if last_push is not None and session.audio_end > tile_start:  # a client is streaming into this block
            due = max(due, last_push + (needed - session.audio_end) / session.sample_rate)
        return due + self.slack_s

    def _wait_for_audio(self) -> None:
        """Until the next block's audio is there, its deadline passes or stop is asked."""
        while not self._stop.is_set() and not self.session.closed:
            if self.session.audio_end >= self.session.audio_needed():
                return
            now = time.monotonic()
            deadline = self.deadline()
            if now >= deadline:
                return
            self.session.wait_for_audio(min(deadline, now + _POLL_S))

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._wait_for_audio()
                if self._stop.is_set():
                    return
                self.on_block(self.session.next_block())
        except BaseException as exc:  # reported, not lost in a thread
            if self.session.closed:  # closed under the clock (its owner ends the session): a stop, not a failure
                return
            self.error = exc
            if self.on_error is not None:
                self.on_error(exc)
