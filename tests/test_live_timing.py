"""Live timing (docs/live.md, "Latency and stalls"): a player that starts with block 0 never waits, and latency
is measured against the audio each frame was made from.

A fast stand-in model (the real LiveSession, AudioTimeline, LiveClock, server, H.264 and client; only the DiT
and the decoder are replaced by instant ones with each family's block geometry) is streamed at real-time pace
with pauses, as a voice agent talks: no stall, for both families, however the pauses fall on the blocks.
"""

from __future__ import annotations

import functools
import time

import numpy as np
import pytest
import torch

from livetalk_core.live.client import LiveRecording, ReceivedBlock, run_client
from livetalk_core.live.clock import LiveClock
from livetalk_core.live.features import AudioTimeline
from livetalk_core.live.server import LiveEndpoint, serving_in_thread
from livetalk_core.live.session import LiveSession
from livetalk_core.livetalk.live import LIVETALK_LIVE_GEOMETRY
from livetalk_core.realvideo.live import REALVIDEO_LIVE_GEOMETRY
from livetalk_core.runtime.live_stream import FRAME_SAMPLES, LiveGeometry

RATE, SIZE = 16_000, 32
CPU_MARGIN_S = 0.3
"""This shared 2-core CPU's jitter in making, encoding and sending a block (on a GPU: the default, 0.05 s)."""
GEOMETRIES = {"livetalk": LIVETALK_LIVE_GEOMETRY, "realvideo": REALVIDEO_LIVE_GEOMETRY}


class InstantStream:
    """A LiveStream with a family's geometry that samples at once: one latent frame per 4 video frames
    (latent 0 of block 0 is one frame), all zeros; its window is its tile (no context)."""

    def __init__(self, geometry: LiveGeometry) -> None:
        self.geometry = geometry

    def window(self, block: int) -> tuple[int, int]:
        return self.geometry.tile(block)

    def sample(self, block: int, audio: torch.Tensor, silent: bool) -> torch.Tensor:
        frames = self.geometry.first_block_frames if block == 0 else self.geometry.block_frames
        latents = (frames + 3) // 4 if block == 0 else frames // 4
        return torch.zeros(1, 16, latents, 2, 2)

    def close(self) -> None:
        pass


class InstantDecoder:
    """A streaming decoder as the VAE's: the first latent frame gives 1 video frame, every later one 4."""

    device, dtype = torch.device("cpu"), torch.float32

    def stream_decoder(self) -> InstantDecoder:
        self.first = True
        return self

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        frames = 4 * latents.shape[2] - (3 if self.first else 0)
        self.first = False
        return torch.zeros(1, 3, frames, SIZE, SIZE)


def instant_session(family: str) -> LiveSession:
    decoder = InstantDecoder()
    return LiveSession(None, InstantStream(GEOMETRIES[family]), decoder, torch.zeros(1, 3, 1, SIZE, SIZE),
                       decoder=decoder)


def speech_with_pauses(seed: int = 0) -> tuple[np.ndarray, dict[int, float]]:
    """Three utterances of speech-like noise (1.3, 1.5, 1.2 s) with pauses of 0.55 and 0.85 s between them:
    neither the utterances nor the pauses are whole blocks, so speech stops and resumes mid-block."""
    rng = np.random.default_rng(seed)
    lengths = [20_800, 24_000, 19_200]  # whole 0.1 s messages
    audio = (0.3 * rng.standard_normal(sum(lengths))).clip(-1, 1).astype(np.float32)
    return audio, {lengths[0]: 0.55, lengths[0] + lengths[1]: 0.85}


@pytest.mark.parametrize("family", ["livetalk", "realvideo"])
def test_a_steady_stream_with_pauses_has_no_stall(family):
    """Streamed at real-time pace with pauses: zero stalls (a player started at block 0's arrival never waits),
    every sample comes back exactly and once, and each frame's latency is at least 0 (a frame never comes
    before the audio it was made from was sent)."""
    audio, pauses = speech_with_pauses()
    clock = functools.partial(LiveClock, margin_s=CPU_MARGIN_S)
    endpoint = LiveEndpoint(open_session=lambda start: instant_session(family), clock=clock)
    with serving_in_thread(endpoint) as url:
        recording = run_client(url, audio, pauses=pauses, coverage_timeout=30)
    report = recording.report()
    assert report["returned_audio_exact"] and report["returned_speech_seconds"] == report["audio_seconds"]
    assert report["stalls"] == 0, report["late_blocks"]
    assert report["speech_frames"] > 0 and min(recording.frame_latencies()) >= 0
    assert recording.info["frame_audio_offset"] == GEOMETRIES[family].frame_audio_offset


class SlowStream(InstantStream):
    """An InstantStream that takes ``seconds`` to make each block, as a GPU does (block 0 a little longer)."""

    def __init__(self, geometry: LiveGeometry, seconds: float) -> None:
        super().__init__(geometry)
        self.seconds = seconds

    def sample(self, block: int, audio: torch.Tensor, silent: bool) -> torch.Tensor:
        time.sleep(self.seconds * (1.2 if block == 0 else 1.0))
        return super().sample(block, audio, silent)


HOLD_TEST_MARGIN_S = 0.06
"""The clock's margin in the hold test: the stream's making time is a sleep, so only encoding and sending vary."""


def slow_realvideo_report(block_seconds: float) -> dict:
    """A RealVideo-shaped session making each block in ``block_seconds``, streamed with pauses."""
    decoder = InstantDecoder()
    stream = SlowStream(REALVIDEO_LIVE_GEOMETRY, block_seconds)
    session = lambda start: LiveSession(None, stream, decoder, torch.zeros(1, 3, 1, SIZE, SIZE),  # noqa: E731
                                        decoder=decoder)
    audio, pauses = speech_with_pauses(seed=1)
    clock = functools.partial(LiveClock, margin_s=HOLD_TEST_MARGIN_S)
    with serving_in_thread(LiveEndpoint(open_session=session, clock=clock)) as url:
        return run_client(url, audio, pauses=pauses, coverage_timeout=30).report()


def test_block_0_is_held_when_a_block_takes_longer_to_make_than_block_0s_frames_play(monkeypatch):
    """RealVideo's block 0 has 5 frames (0.31 s); a GPU that makes a block in more than that (0.31 s plus the
    margin) would leave a player that starts with block 0 waiting at block 1. The clock holds block 0 for
    the difference (LiveClock.hold_s), so the player starts that much later and never waits; without the hold
    it waits at block 1."""
    seconds = 0.4  # over block 0's 5 frames (0.3125 s), under a later block's 8 (0.5 s): faster than real time
    held = slow_realvideo_report(seconds)
    assert held["stalls"] == 0, held["late_blocks"]
    monkeypatch.setattr(LiveClock, "hold_s", lambda self, block: 0.0)
    unheld = slow_realvideo_report(seconds)
    assert [index for index, _ in unheld["late_blocks"]][:1] == [1], unheld["late_blocks"]
    assert held["first_block_latency_s"] > unheld["first_block_latency_s"]


def test_speech_after_a_pause_goes_where_it_was_spoken(monkeypatch):
    """Once a clock runs the timeline, audio that arrives well after the audio before it ended is placed at the
    time it was spoken (silence before it), not right after the last block; within the tolerance it follows on."""
    monkeypatch.setattr(time, "monotonic", lambda: 100.0)
    timeline = AudioTimeline()
    timeline.anchor(99.0, tolerance_s=0.04)  # the session started 1 s ago
    timeline.push(np.ones(1600, np.float32))  # spoken from 0.9 s to now
    assert timeline.runs_in(0, 32_000) == ((14_400, 1600),)
    timeline.push(np.ones(320, np.float32))  # right after it: not moved
    assert timeline.runs_in(0, 32_000) == ((14_400, 1920),)
    _, tile, runs = timeline.use_tile((12_000, 24_000), (12_000, 24_000))
    assert runs == ((2400, 1920),) and not tile[:2400].any() and tile[2400:4320].all() and not tile[4320:].any()


def test_frame_latency_is_measured_against_the_audio_the_frame_was_made_from():
    """RealVideo's frames are made from the audio 3 frames after them (frame_audio_offset 3000): the block's
    last frame needs the block's last sample, its first frame the tile's first 1000; speech runs are honoured."""
    recording = LiveRecording(sent=np.zeros(16_000, np.int16),
                              info={"fps": 16, "sample_rate": RATE, "frame_audio_offset": 3 * FRAME_SAMPLES})
    recording.send_log = [(count, 10.0 + count / RATE) for count in range(1600, 16_001, 1600)]
    header = {"index": 1, "first_frame": 5, "frames": 8, "audio_start": 8000, "audio_samples": 8000,
              "speech_samples": 6400, "speech_runs": [[1600, 6400]], "client_samples_end": 6400}
    recording.blocks = [ReceivedBlock(header, [], np.zeros(8000, np.int16), 11.0)]
    # frame 5 is made from tile samples [0, 1000): filled-in silence, no latency; frame 6 from [1000, 2000),
    # whose client samples end at 400 (sent by 10.1); the last frame (12) needs all 6400 (sent at 10.4)
    latencies = recording.frame_latencies()
    assert len(latencies) == 7
    assert latencies[0] == pytest.approx(0.9) and latencies[-1] == pytest.approx(0.6)


def test_a_session_behind_the_clock_places_at_most_two_seconds_of_silence(monkeypatch):
    """A session slower than real time (its blocks far behind the clock): audio after a pause goes at most 2 s
    after the audio before it, so the silence filled in (and the memory it takes) stays bounded."""
    monkeypatch.setattr(time, "monotonic", lambda: 1000.0)
    timeline = AudioTimeline()
    timeline.anchor(0.0, tolerance_s=0.04)  # the clock started 1000 s ago; nothing was used yet
    timeline.push(np.ones(1600, np.float32))
    assert timeline.runs_in(0, 10**9) == ((32_000, 1600),) and timeline.end == 33_600
