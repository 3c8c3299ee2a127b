"""Runs a live session in real time: block after block in a thread of its own, so the video never stops.

Time 0 of the session's timeline is :meth:`LiveClock.start`. Every block has a *deadline* on one fixed
schedule: the time its audio is due on a steady stream (:meth:`~.session.LiveSession.schedule_sample`,
sample ``s`` at ``s / 16000`` s after the start) plus ``slack_s``. Block 0 is made at its deadline plus
``margin_s`` (how much longer than block 0 a later block may take to make and send); a later block as
soon as the audio it needs (its tile and the features' look-ahead) has arrived, or at its deadline with
the missing part as silence. So each block leaves the clock no later, relative to
block 0, than its first frame's time: a player that starts showing block 0 as it comes never waits
(docs/live.md, "Latency and stalls"). The slack covers how late a client's audio comes on a steady
stream: one message (the clients send 0.1 s each, when its last sample has been spoken) plus the
placement tolerance; audio that comes later than that tolerance is placed at the time it was spoken
(features.AudioTimeline), so speech after a pause is on the schedule too.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .session import LiveBlock, LiveSession

PLACEMENT_TOLERANCE_S = 0.04
"""Audio arriving up to this much later than the end of the audio before it still goes right after it
(network and timer jitter); later, it goes at the time it was spoken (a pause, or a late start)."""
CLIENT_MESSAGE_S = 0.1
"""The longest audio message the clock expects on a steady stream (the live clients send 0.1 s each)."""
THREAD_WAKE_S = 0.01  # allowance for the clock thread to wake from its wait
DEFAULT_SLACK_S = CLIENT_MESSAGE_S + PLACEMENT_TOLERANCE_S + THREAD_WAKE_S
"""How long past the moment a block's audio should have arrived the clock waits for it: a message, the
placement tolerance and the thread's wake-up allowance."""
DEFAULT_MARGIN_S = 0.05
"""How much longer than block 0 a later block may take to make, encode and send before a player that started
with block 0 waits for it (the time to make a block varies by a few ms on a GPU)."""
_POLL_S = 0.02  # how often a waiting clock looks again (a new push may move the deadline, stop may come)


class LiveClock:
    """Drives ``session`` block after block in a thread, calling ``on_block(block)`` from that thread (a held
    block 0, :meth:`hold_s`, from a timer's; never two calls at once, and always in block order).
    ``on_error(exc)`` (from that thread) is called if making a block or ``on_block`` raises; the
    clock then stops. :meth:`stop` joins the thread; closing the session is its owner's job (a session
    closed under a running clock stops it too, without an error)."""

    def __init__(self, session: LiveSession, on_block: Callable[[LiveBlock], None], *,
                 slack_s: float = DEFAULT_SLACK_S, margin_s: float = DEFAULT_MARGIN_S,
                 on_error: Callable[[BaseException], None] | None = None) -> None:
        if slack_s < 0 or margin_s < 0:
            raise ValueError(f"slack_s and margin_s must be at least 0, got {slack_s} and {margin_s}")
        self.session, self.on_block, self.on_error, self.slack_s = session, on_block, on_error, slack_s
        self.margin_s = margin_s
        self.started_at: float | None = None
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="livetalk-live-clock", daemon=True)
        self._held: _HeldBlock | None = None

    def start(self) -> None:
        self.started_at = time.monotonic()
        self.session.anchor(self.started_at, PLACEMENT_TOLERANCE_S)
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
        margin = self.margin_s if self.session.blocks_made == 0 else 0.0
        return self.started_at + self.session.schedule_sample() / self.session.sample_rate + self.slack_s + margin

    def _wait_for_audio(self) -> None:
        """Until the next block's audio is there (block 0: its deadline, the schedule's start), its deadline
        passes or stop is asked."""
        first = self.session.blocks_made == 0
        while not self._stop.is_set() and not self.session.closed:
            now, deadline = time.monotonic(), self.deadline()
            if now >= deadline:
                return
            if first:
                self._stop.wait(min(deadline - now, _POLL_S))
            elif self.session.audio_end >= self.session.audio_needed():
                return
            else:
                self.session.wait_for_audio(min(deadline, now + _POLL_S))

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._wait_for_audio()
                if self._stop.is_set():
                    return
                block = self.session.next_block()
                if self._held is not None:  # block 0 before block 1, whether or not its time has come
                    self._held, held = None, self._held
                    held.release()
                hold_s = self.hold_s(block) if block.index == 0 else 0.0
                if hold_s > 0:
                    self._held = _HeldBlock(block, hold_s, self._send)
                else:
                    self._send(block)
        except BaseException as exc:  # reported, not lost in a thread
            self._failed(exc)
        finally:
            if self._held is not None:  # stopped while block 0 was held: it goes now (unless sending failed)
                with contextlib.suppress(BaseException):
                    self._held.release() if self.error is None else self._held.cancel()

    def hold_s(self, block: LiveBlock) -> float:
        """How long block 0 is held before it is sent: 0 when it was made faster than its own frames play
        (less the margin); else the difference. The next block takes about as long to make as block 0 did
        (block 0 is the slower one: it also fills the sinks), and a player that starts with block 0 needs the
        next block when block 0's frames have played. Where a block takes longer to make than block 0's frames
        play (RealVideo's block 0 has 5 frames; the 14B takes longer than that on one H100) the player would
        otherwise wait at block 1; held, it starts that much later, once, and block 1 is on time (docs/live.md)."""
        plays_s = len(block.frames) / self.session.fps
        return max(0.0, block.generated_s + self.margin_s - plays_s)

    def _send(self, block: LiveBlock) -> None:
        try:
            self.on_block(block)
        except BaseException as exc:
            self._failed(exc)
            raise

    def _failed(self, exc: BaseException) -> None:
        if self.session.closed:  # closed under the clock (its owner ends the session): a stop, not a failure
            return
        if self.error is None:
            self.error = exc
            if self.on_error is not None:
                self.on_error(exc)
        self._stop.set()


class _HeldBlock:
    """Block 0 held back for ``delay_s`` (:meth:`LiveClock.hold_s`), then sent by a timer; :meth:`release`
    sends it at once if the timer has not (the next block is ready), :meth:`cancel` drops it (the clock
    stopped). Sent once, in either thread."""

    def __init__(self, block: LiveBlock, delay_s: float, send: Callable[[LiveBlock], None]) -> None:
        self._block: LiveBlock | None = block
        self._send = send
        self._lock = threading.Lock()
        self._timer = threading.Timer(delay_s, self._on_time)
        self._timer.daemon = True
        self._timer.start()

    def release(self) -> None:
        """Send it now if the timer has not; if the timer is sending it, wait for that (block 0 goes first)."""
        self._timer.cancel()
        self._send_once()

    def _on_time(self) -> None:
        with contextlib.suppress(BaseException):  # _send reported it to the clock's owner
            self._send_once()

    def _send_once(self) -> None:
        with self._lock:
            block, self._block = self._block, None
            if block is not None:
                self._send(block)

    def cancel(self) -> None:
        self._timer.cancel()
        with self._lock:
            self._block = None
