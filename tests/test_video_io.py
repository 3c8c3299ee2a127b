from pathlib import Path

import av
import numpy as np
import pytest
import torch

from livetalk_core.errors import InputError
from livetalk_core.media.video_io import VideoWriter, read_video_info

ASSETS = Path(__file__).resolve().parents[1] / "assets"
FPS = 16


def _frames(count: int, height: int = 48, width: int = 64, start: int = 0) -> np.ndarray:
    """A moving gradient, so that the encoder has something non-trivial to compress."""
    t = np.arange(start, start + count)[:, None, None]
    y = np.arange(height)[None, :, None]
    x = np.arange(width)[None, None, :]
    gray = ((x * 3 + y * 2 + t * 8) % 256).astype(np.uint8)
    return np.stack([gray, 255 - gray, np.full_like(gray, 128)], axis=-1)


def _tone(seconds: float, rate: int = 16_000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def _decoded_frame_count(path: Path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def test_waveform_audio_is_muxed_and_trimmed_to_video(tmp_path):
    out = tmp_path / "clip.mp4"
    with VideoWriter(out, audio=torch.from_numpy(_tone(5.0))) as writer:
        for block in range(4):  # 4 blocks of 12 frames = 3 s of video
            writer.write(torch.from_numpy(_frames(12, start=block * 12)))
            # Audio is encoded alongside the video, not held back until the end.
            assert writer.audio_seconds_written == pytest.approx(writer.frames_written / FPS, abs=1e-3)
    info = read_video_info(out)
    assert info == {
        "frames": 48,
        "fps": FPS,
        "width": 64,
        "height": 48,
        "has_audio": True,
        "audio_duration": pytest.approx(48 / FPS, abs=0.03),
    }
    assert _decoded_frame_count(out) == 48
    assert list(tmp_path.iterdir()) == [out]  # the temporary file was renamed, not copied


def test_audio_file_is_muxed_as_aac_48k_mono(tmp_path):
    out = tmp_path / "clip.mp4"
    with VideoWriter(out, fps=FPS, audio=ASSETS / "speech.flac") as writer:
        writer.write(_frames(20))
        writer.write(_frames(12, start=20))
    info = read_video_info(out)
    assert (info["frames"], info["fps"], info["has_audio"]) == (32, FPS, True)
    assert info["audio_duration"] == pytest.approx(2.0, abs=0.03)
    with av.open(str(out)) as container:
        audio = container.streams.audio[0]
        assert (audio.codec_context.name, audio.rate, audio.channels) == ("aac", 48_000, 1)
        assert container.streams.video[0].codec_context.pix_fmt == "yuv420p"
        decoded = np.concatenate([f.to_ndarray()[0] for f in container.decode(audio=0)])
        assert np.abs(decoded).max() > 0.05  # the speech is really there, not silence


def test_short_audio_ends_early_and_video_is_kept(tmp_path):
    out = tmp_path / "clip.mp4"
    with VideoWriter(out, audio=_tone(0.5), audio_sample_rate=16_000) as writer:
        writer.write(_frames(32))
    info = read_video_info(out)
    assert info["frames"] == 32
    assert info["audio_duration"] == pytest.approx(0.5, abs=0.03)


def test_video_without_audio(tmp_path):
    out = tmp_path / "clip.mp4"
    with VideoWriter(out, fps=25) as writer:
        writer.write(_frames(10)[0])  # a single [H, W, 3] frame is accepted too
        writer.write(_frames(9))
    info = read_video_info(out)
    assert (info["frames"], info["fps"], info["has_audio"], info["audio_duration"]) == (10, 25, False, None)


def test_metadata_tags_are_stored(tmp_path):
    out = tmp_path / "clip.mp4"
    workflow = '{"1": {"class_type": "LoadImage"}}'
    with VideoWriter(out, metadata={"prompt": workflow}) as writer:
        writer.write(_frames(4))
    with av.open(str(out)) as container:
        assert container.metadata["prompt"] == workflow


@pytest.mark.parametrize("interruption", [KeyboardInterrupt, RuntimeError])
def test_interruption_keeps_a_playable_partial_video(tmp_path, interruption):
    out = tmp_path / "clip.mp4"
    with pytest.raises(interruption):
        with VideoWriter(out, audio=_tone(10.0)) as writer:
            writer.write(_frames(16))
            writer.write(_frames(8, start=16))
            raise interruption("stopped by the user")
    info = read_video_info(out)
    assert info["frames"] == 24
    assert info["audio_duration"] == pytest.approx(24 / FPS, abs=0.03)
    assert _decoded_frame_count(out) == 24
    assert list(tmp_path.iterdir()) == [out]


@pytest.mark.parametrize("handler", ["python", "command line"])
def test_ctrl_c_in_the_middle_of_muxing_waits_for_a_consistent_file(tmp_path, monkeypatch, handler):
    """A real SIGINT delivered between an encode and its mux used to leave an mp4 that could not be
    finished (FFmpeg "Invalid argument"), so the partial video was lost. Held back under Python's
    handler and under the command line's (interrupts.interrupt_handler), which is put back after."""
    import os
    import signal
    import threading

    from livetalk_core import interrupts
    from livetalk_core.interrupts import interrupt_handler

    monkeypatch.setattr(interrupts, "_received", threading.Event())  # what it remembers stays with this test
    # The handler, also when this run was started in the background (SIGINT ignored).
    installed = signal.default_int_handler if handler == "python" else interrupt_handler
    previous = signal.signal(signal.SIGINT, installed)
    try:
        out = tmp_path / "clip.mp4"
        writer = VideoWriter(out, audio=_tone(10.0))
        real_mux, calls = writer._mux, []

        def mux_then_ctrl_c(packets):
            calls.append(len(packets))
            if len(calls) == 20:
                os.kill(os.getpid(), signal.SIGINT)
            real_mux(packets)

        monkeypatch.setattr(writer, "_mux", mux_then_ctrl_c)
        with pytest.raises(KeyboardInterrupt):
            with writer:
                writer.write(_frames(16))
                writer.write(_frames(16, start=16))  # the signal arrives during this call
                writer.write(_frames(16, start=32))  # never reached
        assert writer.saved_path == out and writer.frames_written == 32
        assert _decoded_frame_count(out) == 32
        assert signal.getsignal(signal.SIGINT) is installed
    finally:
        signal.signal(signal.SIGINT, previous)


def test_final_name_appears_only_when_finished(tmp_path):
    out = tmp_path / "clip.mp4"
    out.write_bytes(b"previous run")
    writer = VideoWriter(out)
    writer.write(_frames(60))  # enough to get past the encoder's look-ahead, so packets reach the disk
    assert out.read_bytes() == b"previous run"  # a crash now would leave the old file untouched
    partial = [p for p in tmp_path.iterdir() if p != out]
    assert len(partial) == 1 and partial[0].name.startswith(".clip.mp4.")
    assert writer.close() == out
    assert read_video_info(out)["frames"] == 60
    assert list(tmp_path.iterdir()) == [out]


def test_interruption_before_any_frame_leaves_no_file(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with VideoWriter(tmp_path / "clip.mp4"):
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_odd_sizes_are_padded_to_even(tmp_path):
    out = tmp_path / "clip.mp4"
    with VideoWriter(out) as writer:
        writer.write(_frames(4, height=47, width=63))
    info = read_video_info(out)
    assert (info["width"], info["height"], info["frames"]) == (64, 48, 4)


def test_bad_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        VideoWriter(tmp_path / "a.mp4", audio=tmp_path / "missing.wav")
    not_audio = tmp_path / "notes.txt"
    not_audio.write_text("hello")
    with pytest.raises(InputError, match="Cannot read audio|no audio track"):
        VideoWriter(tmp_path / "a.mp4", audio=not_audio)
    with pytest.raises(InputError, match="fps"):
        VideoWriter(tmp_path / "a.mp4", fps=0)
    with pytest.raises(InputError, match=r"\[samples\]"):
        VideoWriter(tmp_path / "a.mp4", audio=np.zeros((1, 1, 10)))
    with pytest.raises(InputError, match="uint8"):
        with VideoWriter(tmp_path / "b.mp4") as writer:
            writer.write(np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(InputError, match="same size"):
        with VideoWriter(tmp_path / "c.mp4") as writer:
            writer.write(_frames(2, 16, 16))
            writer.write(_frames(2, 16, 32))
    assert read_video_info(tmp_path / "c.mp4")["frames"] == 2  # frames before the error are kept
    with pytest.raises(InputError, match=r"\[T, H, W, 3\]"):
        with VideoWriter(tmp_path / "d.mp4") as writer:
            writer.write(np.zeros((2, 8, 8, 4), np.uint8))
    with pytest.raises(InputError, match="not found"):
        read_video_info(tmp_path / "missing.mp4")


def test_portrait_asset():
    path = ASSETS / "portrait.jpg"
    assert path.stat().st_size < 200_000
    with av.open(str(path)) as container:
        image = next(container.decode(video=0)).to_ndarray(format="rgb24")
    assert image.shape == (512, 512, 3)
    assert 40 < image.mean() < 220  # a real photo, neither blank nor saturated


def test_speech_asset():
    path = ASSETS / "speech.flac"
    assert path.stat().st_size < 200_000
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        assert (stream.rate, stream.channels) == (16_000, 1)
        samples = np.concatenate([f.to_ndarray().reshape(-1) for f in container.decode(stream)])
    assert 5.0 <= len(samples) / 16_000 <= 6.5
    assert np.abs(samples.astype(np.float32)).max() > 1000  # int16 speech, not silence


def test_assets_are_documented():
    readme = (ASSETS / "README.md").read_text()
    for name in ("portrait.jpg", "speech.flac", "public domain", "espeak-ng"):
        assert name in readme
