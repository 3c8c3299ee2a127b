"""A video as long as its audio, to the frame, for both families (issue 16).

The rule (``livetalk_core.media.timing.video_frames_for_samples``): D seconds of audio give
``floor(16 D) + 1`` frames, one at every 1/16 s instant from 0 through the end of the audio, so the
mp4's video lasts ``(D, D + 1/16]``: never shorter than the audio (no speech is cut when the audio
is muxed), at most one frame longer. ``--duration`` takes the place of D.

Checked three ways: the arithmetic of each family over many lengths (instant), the core's sample ->
decode -> mp4 path with tiny random weights over lengths that cross RealVideo's 5 s audio segments,
and the CLI's smoke mode of both families on a few lengths (the first RealVideo case is the issue's 3 s clip,
which gave 2.81 s). The nodes are checked in test_video_length_in_comfyui.py.
"""

from __future__ import annotations

import math
import subprocess
import sys
import wave
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from tiny_weights import tiny_vae

from livetalk_core.errors import InputError
from livetalk_core.livetalk.pipeline import fit_waveform, livetalk_video_length
from livetalk_core.media.audio_file import SAMPLE_RATE
from livetalk_core.media.timing import VIDEO_FPS, samples_for_duration
from livetalk_core.media.video_io import VideoWriter
from livetalk_core.realvideo.audio import split_segments
from livetalk_core.realvideo.model import S2VConfig, S2VDiT
from livetalk_core.realvideo.sampler import latent_frames, plan_blocks, realvideo_video_length, sample_realvideo
from livetalk_core.runtime.decode_stream import decode_blocks
from livetalk_core.runtime.noise import SeededNoise
from livetalk_core.wan.dit import HEAD_DIM, WanCoreConfig

REPO = Path(__file__).resolve().parents[1]
LIVETALK_SECONDS = [0.1, 0.5, 1.0, 2.3, 3.0, 5.0, 5.97, 7.3]
# RealVideo's audio comes in segments of at most 5 s: lengths on both sides of the first boundary.
REALVIDEO_SECONDS = [0.1, 0.5, 1.0, 2.3, 3.0, 4.9, 5.0, 5.3, 6.3, 10.2]
ODD_SAMPLE_COUNTS = [1, 999, 1000, 1001, 7999, 8000, 8001, 80_001]
FRAME = Fraction(1, VIDEO_FPS)


def expected_frames(num_samples: int) -> int:
    """Frames at the instants 0, 1/16, ... up to the audio's end, counted in exact fractions."""
    return math.floor(Fraction(num_samples, SAMPLE_RATE) / FRAME) + 1


def check_covers_the_audio(num_video_frames: int, num_samples: int) -> None:
    seconds = Fraction(num_samples, SAMPLE_RATE)
    assert num_video_frames == expected_frames(num_samples)
    assert seconds < num_video_frames * FRAME <= seconds + FRAME


# -- the arithmetic ----------------------------------------------------------------------------------


@pytest.mark.parametrize("num_samples", [round(s * SAMPLE_RATE) for s in REALVIDEO_SECONDS] + ODD_SAMPLE_COUNTS)
def test_realvideo_length_is_the_audio_to_the_frame_from_the_fewest_blocks(num_samples):
    length = realvideo_video_length(num_samples)
    check_covers_the_audio(length.num_video_frames, num_samples)
    decoded = lambda blocks: 5 + 8 * (blocks - 1)  # noqa: E731  (block 0: 1 + 4 frames, then 4 + 4)
    assert decoded(length.num_blocks) >= length.num_video_frames > decoded(length.num_blocks - 1)


@pytest.mark.parametrize("num_samples", [round(s * SAMPLE_RATE) for s in LIVETALK_SECONDS] + ODD_SAMPLE_COUNTS[2:])
def test_livetalk_length_is_the_audio_to_the_frame_from_the_fewest_blocks(num_samples):
    length = livetalk_video_length(num_samples)
    check_covers_the_audio(length.num_video_frames, num_samples)
    # b blocks of 3 latent frames span (12 b - 4) / 16 s of audio: the fewest that hold every sample
    span = lambda blocks: (12 * blocks - 4) * SAMPLE_RATE // VIDEO_FPS  # noqa: E731
    assert span(length.num_blocks) >= num_samples > span(length.num_blocks - 1)
    assert 12 * length.num_blocks - 3 >= length.num_video_frames


@pytest.mark.parametrize("duration", [0, 0.0, -1, -0.5, float("nan"), float("inf"), 1e-6])
def test_a_duration_that_is_not_positive_is_refused_at_the_source(duration):
    for refuse in (samples_for_duration, lambda d: realvideo_video_length(16000, d),
                   lambda d: fit_waveform(torch.zeros(16000), d)):
        with pytest.raises(InputError, match="duration"):
            refuse(duration)


def test_duration_replaces_the_audio_length():
    assert realvideo_video_length(48_000, 1.3).num_video_frames == 21  # shorter: the video stops there
    assert realvideo_video_length(1_600, 5.3).num_video_frames == 85  # longer: it idles
    assert realvideo_video_length(48_000, 1.3).num_samples == 20_800


@pytest.mark.parametrize("family_length", [livetalk_video_length, realvideo_video_length])
def test_a_clip_shorter_than_one_block_says_what_the_video_will_be(family_length):
    message = family_length(1_600).short_clip_message  # 0.1 s
    assert message is not None
    assert "0.10 s" in message and "shorter than one block" in message and "0.50 s" in message
    assert "2 frames (0.12 s" in message
    assert family_length(8_000).short_clip_message is None  # exactly one block
    with pytest.raises(InputError):
        realvideo_video_length(0)


# -- the core, sample -> decode -> mp4 ----------------------------------------------------------------


def speech(seconds: float) -> torch.Tensor:
    """A 16 kHz syllable-like tone of ``seconds``."""
    t = torch.arange(round(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return 0.3 * torch.sin(2 * torch.pi * 220 * t) * torch.sin(2 * torch.pi * 3 * t).abs()


def mp4_durations(path: Path) -> tuple[int, Fraction, float]:
    """(video frames decoded, video stream duration, audio stream duration in s) of an mp4."""
    with av.open(str(path)) as container:
        video, audio = container.streams.video[0], container.streams.audio[0]
        duration = Fraction(video.duration) * video.time_base
        audio_seconds = float(audio.duration * audio.time_base)
        frames = sum(1 for _ in container.decode(video))
    return frames, duration, audio_seconds


def check_mp4(path: Path, num_samples: int) -> None:
    """As many frames as the audio calls for; the video lasts (D, D + 1/16]; all the audio is in."""
    frames, duration, audio_seconds = mp4_durations(path)
    check_covers_the_audio(frames, num_samples)
    assert float(duration) == pytest.approx(frames / VIDEO_FPS, abs=1e-3)  # the muxer's time base rounds
    assert audio_seconds == pytest.approx(num_samples / SAMPLE_RATE, abs=1e-3)


@pytest.fixture(scope="module")
def realvideo_models():
    """A 2-layer S2V DiT (wav2vec2 width 8) and a width-1 VAE, random."""
    torch.manual_seed(0)
    core = WanCoreConfig(dim=HEAD_DIM, in_dim=16, out_dim=16, ffn_dim=64, num_layers=2, text_dim=32)
    config = S2VConfig(core=core, audio_dim=8, audio_layers=25, audio_tokens=4, inject_layers=(0, 1), cond_dim=16)
    dit = S2VDiT(config).eval().requires_grad_(False)
    with torch.no_grad():
        for name, p in dit.named_parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
    return dit, tiny_vae()


def segment_features(waveform: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
    """Random stand-ins for the wav2vec2 features of each <= 5 s segment, of the real shapes."""
    return [torch.randn(1, 25, 8, s.numel() // 1000, generator=generator) for s in split_segments(waveform)]


@pytest.mark.parametrize("seconds", REALVIDEO_SECONDS)
def test_realvideo_blocks_reach_the_last_segment_the_video_shows(seconds):
    """The plan the sampler follows has the length's blocks, and the last one reads the segment
    holding the audio's end (past 5 s the second segment, not an idle repeat of the first)."""
    waveform = speech(seconds)
    length = realvideo_video_length(waveform.numel())
    plan = plan_blocks([latent_frames(f) for f in segment_features(waveform, torch.Generator())], length.num_blocks)
    assert len(plan) == length.num_blocks
    assert plan[-1].segment == (waveform.numel() - 1) // (5 * SAMPLE_RATE)


@pytest.mark.parametrize("seconds", [0.1, 3.0, 5.3])
def test_realvideo_core_makes_a_video_as_long_as_the_audio(realvideo_models, tmp_path, seconds):
    """The tiny S2V DiT at a 2x2 latent, the sampler planned by the length, the stream decoder
    trimming, the writer muxing the whole clip: the mp4 holds the audio, to the frame."""
    dit, vae = realvideo_models
    waveform = speech(seconds)
    length = realvideo_video_length(waveform.numel())
    generator = torch.Generator().manual_seed(0)
    features = segment_features(waveform, generator)
    plan = plan_blocks([latent_frames(f) for f in features], length.num_blocks)
    idle, talking = torch.randn(2, 1, 16, 32, generator=generator)
    blocks = sample_realvideo(dit, ref_latent=torch.randn(1, 16, 1, 2, 2, generator=generator), idle_context=idle,
                              talking_context=talking, audio_features=features, noise=SeededNoise(0), plan=plan)
    output = tmp_path / "realvideo.mp4"
    with VideoWriter(output, fps=VIDEO_FPS, audio=waveform) as writer:
        for frames in decode_blocks(vae, blocks, length.num_video_frames):
            writer.write(frames)
    check_mp4(output, waveform.numel())


# -- the CLI's smoke modes, both families --------------------------------------------------------------


def write_wav(path: Path, seconds: float) -> Path:
    samples = (speech(seconds).numpy() * 32767).astype(np.int16)
    with wave.open(str(path), "wb") as file:
        file.setnchannels(1)
        file.setsampwidth(2)
        file.setframerate(SAMPLE_RATE)
        file.writeframes(samples.tobytes())
    return path


def run_cli(family: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "livetalk_core", "--smoke", "--model", family, *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize(
    "family, seconds, duration",
    [
        ("realvideo", 3.0, None),  # the clip: 45 frames (2.81 s) before, 49 now
        ("realvideo", 0.1, None),  # shorter than one block: 2 frames, and a warning
        ("realvideo", 0.1, 1.3),  # --duration past the audio idles: 21 frames
        ("livetalk", 0.1, None),
        ("livetalk", 3.0, 1.3),  # --duration short of the audio trims: 21 frames
    ],
)
def test_cli_video_is_as_long_as_the_audio_or_duration(tmp_path, family, seconds, duration):
    audio, output = write_wav(tmp_path / "speech.wav", seconds), tmp_path / "out.mp4"
    extra = () if duration is None else ("--duration", str(duration))
    result = run_cli(family, "--audio", str(audio), "--output", str(output), *extra)
    assert result.returncode == 0, result.stderr
    frames, video_seconds, audio_seconds = mp4_durations(output)
    target = round((seconds if duration is None else duration) * SAMPLE_RATE)
    check_covers_the_audio(frames, target)
    assert float(video_seconds) == pytest.approx(frames / VIDEO_FPS, abs=1e-3)
    assert audio_seconds == pytest.approx(min(seconds, frames / VIDEO_FPS), abs=1e-3)  # the whole clip is muxed
    short = "shorter than one block" in result.stderr
    assert short == (target < SAMPLE_RATE // 2), result.stderr
    if short:
        assert f"the video will be {frames} frames ({frames / VIDEO_FPS:.2f} s" in result.stderr


@pytest.mark.parametrize("family", ["realvideo", "livetalk"])
@pytest.mark.parametrize("duration", ["0", "-1", "nan"])
def test_cli_refuses_a_duration_that_is_not_positive(tmp_path, family, duration):
    output = tmp_path / "out.mp4"
    result = run_cli(family, "--audio", str(write_wav(tmp_path / "speech.wav", 1.0)), "--output", str(output),
                     f"--duration={duration}")
    assert result.returncode == 2, result.stderr
    assert "duration" in result.stderr and "Traceback" not in result.stderr
    assert not output.exists()
