"""Streaming mp4 output: H.264 frames encoded as they arrive, plus an AAC speech track.

Only PyAV is used (no ffmpeg binary). The output matches what upstream LiveTalk produces
(libx264, yuv420p, crf 18, preset veryfast, 16 fps; AAC 48 kHz mono 96 kb/s; ``+faststart``),
but nothing is buffered: each ``write`` encodes its frames and the audio up to the same time, so
memory stays flat however long the video runs.

File rule:

* While writing, the data goes to a hidden temporary file next to the target
  (``.<name>.<random>.partial``). A crash that kills the process (power loss, SIGKILL) therefore
  never leaves a half-written file under the final name.
* A normal ``close()`` (or leaving the ``with`` block) finalises the mp4 and renames it to the
  final name, replacing any file already there.
* An exception or KeyboardInterrupt inside the ``with`` block also finalises the mp4 and renames it
  to the final name, so the frames generated before the interruption are kept as a playable video;
  the exception is then re-raised. If no frame was written, no file is left at all.
* The exception also gets a note saying where those frames were kept (or that there were none), for
  the command line's one-line report.
* A target folder that refuses the file (gone, read-only, full of a same-named folder) never costs the
  video: if the partial file cannot be created there, or the finished file cannot be renamed to its
  name, the video goes to a fallback file instead (:func:`fallback_path`: the current folder, else the
  temporary folder) and a warning / the error names it. A write that fails in the middle (a full
  disk) can only keep what the container can still finish.
* Ctrl-C never lands inside the encoder: while frames are being encoded and muxed (and while the
  file is finalised) SIGINT is held back and raised once the container is consistent again, because
  an mp4 interrupted between an encode and its mux cannot be finished.

Audio length: video frames are never dropped; the audio is trimmed to the video duration
(upstream muxes with ``-shortest`` and its video is the longer stream). Shorter audio simply ends
early. Odd frame sizes are padded by one replicated row/column because yuv420p needs even sizes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import signal
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import NoReturn

import av
import numpy as np
import torch

from ..errors import InputError, LiveTalkError
from ..interrupts import interrupt_handler

log = logging.getLogger(__name__)

OUTPUT_AUDIO_RATE = 48_000
OUTPUT_AUDIO_BITRATE = 96_000
# In-memory waveforms are fed to the resampler in slices of this many seconds.
_WAVEFORM_SLICE_S = 1

AudioSource = str | os.PathLike | np.ndarray | torch.Tensor
Frames = np.ndarray | torch.Tensor


class _AudioFeed:
    """Mono float32 samples at OUTPUT_AUDIO_RATE, pulled on demand from a chunk iterator."""

    def __init__(self, chunks: Iterator[np.ndarray], release: Callable[[], None] = lambda: None):
        self._chunks = chunks
        self._release = release
        self._leftover = np.zeros(0, dtype=np.float32)
        self.exhausted = False

    def take(self, count: int) -> np.ndarray:
        """Up to ``count`` samples; fewer only once the source has ended."""
        parts = [self._leftover[:count]]
        have = len(parts[0])
        self._leftover = self._leftover[count:]
        while have < count and not self.exhausted:
            chunk = next(self._chunks, None)
            if chunk is None:
                self.exhausted = True
                break
            needed = count - have
            parts.append(chunk[:needed])
            self._leftover = chunk[needed:]
            have += len(parts[-1])
        return np.concatenate(parts)

    def close(self) -> None:
        self._release()


def _resampled_chunks(frames: Iterator[av.AudioFrame]) -> Iterator[np.ndarray]:
    resampler = av.AudioResampler(format="fltp", layout="mono", rate=OUTPUT_AUDIO_RATE)
    for frame in frames:
        # Timestamps are re-made from sample counts; source pts (gaps, offsets) would only confuse
        # the resampler.
        frame.pts = None
        for out in resampler.resample(frame):
            yield out.to_ndarray()[0]
    for out in resampler.resample(None):
        yield out.to_ndarray()[0]


def _audio_feed_from_file(path: Path) -> _AudioFeed:
    if not path.is_file():
        raise InputError(f"Audio file not found: {path}. Pass an existing audio file (wav, flac, mp3, ...).")
    try:
        container = av.open(str(path))
    except av.error.FFmpegError as err:
        raise InputError(
            f"Cannot read audio file {path}: {err}. Use a common format such as wav, flac or mp3."
        ) from err
    if not container.streams.audio:
        container.close()
        raise InputError(f"{path} has no audio track. Pass a file that contains the speech to lip-sync.")
    stream = container.streams.audio[0]

    def decoded_frames() -> Iterator[av.AudioFrame]:
        try:
            yield from container.decode(stream)
        except av.error.FFmpegError as err:
            raise InputError(f"Audio file {path} is damaged and could not be decoded: {err}") from err

    return _AudioFeed(_resampled_chunks(decoded_frames()), release=container.close)


def _audio_feed_from_waveform(waveform: np.ndarray | torch.Tensor, sample_rate: int) -> _AudioFeed:
    if isinstance(waveform, torch.Tensor):
        waveform = waveform.detach().to("cpu", torch.float32).numpy()
    samples = np.asarray(waveform, dtype=np.float32)
    if samples.ndim == 2:  # [channels, samples]: downmix, the output track is mono
        samples = samples.mean(axis=0)
    if samples.ndim != 1:
        raise InputError(
            f"Audio waveform must have shape [samples] or [channels, samples], got {tuple(np.shape(waveform))}."
        )
    if not isinstance(sample_rate, int) or sample_rate <= 0:
        raise InputError(f"audio_sample_rate must be a positive integer (Hz), got {sample_rate!r}.")
    step = sample_rate * _WAVEFORM_SLICE_S

    def frames() -> Iterator[av.AudioFrame]:
        for start in range(0, len(samples), step):
            piece = np.ascontiguousarray(samples[None, start : start + step])
            frame = av.AudioFrame.from_ndarray(piece, format="fltp", layout="mono")
            frame.sample_rate = sample_rate
            yield frame

    return _AudioFeed(_resampled_chunks(frames()))


def _as_uint8_frames(frames: Frames) -> np.ndarray:
    """Validate and return frames as a numpy uint8 array [T, H, W, 3]."""
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu().numpy()
    array = np.asarray(frames)
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[-1] != 3:
        raise InputError(f"Video frames must have shape [T, H, W, 3] (RGB), got {tuple(array.shape)}.")
    if array.dtype != np.uint8:
        raise InputError(
            f"Video frames must be uint8 (0..255), got {array.dtype}. Convert float images in 0..1 "
            "with (x * 255).clamp(0, 255).to(torch.uint8) first."
        )
    if array.shape[1] == 0 or array.shape[2] == 0:
        raise InputError(f"Video frames are empty: shape {tuple(array.shape)}.")
    return array


def _pad_to_even(frames: np.ndarray) -> np.ndarray:
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if not (pad_h or pad_w):
        return frames
    return np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")


def _frame_rate(fps: float) -> Fraction:
    if not isinstance(fps, (int, float, Fraction)) or not math.isfinite(fps) or fps <= 0:
        raise InputError(f"fps must be a positive number, got {fps!r}.")
    return Fraction(fps).limit_denominator(1001)


def fallback_path(path: Path) -> Path:
    """Where a video goes when its own folder refuses it: a new name (never an existing file) in the
    current folder if it can be written and is not that folder, else in the temporary folder."""
    candidates = [Path.cwd(), Path(tempfile.gettempdir())]
    folders = [f for f in candidates if f.resolve() != path.parent.resolve() and os.access(f, os.W_OK | os.X_OK)]
    folder = folders[0] if folders else Path(tempfile.gettempdir())
    return folder / f"{path.stem}.unsaved-{uuid.uuid4().hex[:6]}{path.suffix or '.mp4'}"


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Hold Ctrl-C back for the duration of the block and raise it afterwards.

    Only the main thread receives signals, and only Python's default handler or the command line's
    (:func:`~..interrupts.interrupt_handler`) is replaced, and put back afterwards (a host such as
    ComfyUI that installs its own handler, or runs us in a worker thread, is left alone)."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGINT)
    if not in_main_thread or handler not in (signal.default_int_handler, interrupt_handler):
        yield
        return
    received: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, handler)
    if received:
        handler(signal.SIGINT, None)  # raises KeyboardInterrupt (the command line's also remembers it)


class VideoWriter:
    """Write an H.264 mp4 frame batch by frame batch, optionally with an AAC audio track.

    Use as a context manager::

        with VideoWriter("out.mp4", fps=16, audio="speech.wav") as writer:
            for block in blocks:
                writer.write(block)  # uint8 [T, H, W, 3]

    ``audio`` is a file path, or an in-memory waveform ([samples] or [channels, samples], float in
    -1..1) at ``audio_sample_rate`` Hz. ``metadata`` are container tags (ComfyUI keeps its workflow
    there). The frame size is fixed by the first ``write``. See the module docstring for the
    temporary-file and interruption rules.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        fps: float = 16,
        *,
        audio: AudioSource | None = None,
        audio_sample_rate: int = 16_000,
        crf: int = 18,
        preset: str = "veryfast",
        metadata: dict[str, str] | None = None,
    ):
        self.path = Path(path)
        self._metadata = dict(metadata or {})
        self._rate = _frame_rate(fps)
        self._crf = crf
        self._preset = preset
        self._partial_path = self.path.parent / f".{self.path.name}.{uuid.uuid4().hex[:8]}.partial"
        self._container: av.container.OutputContainer | None = None
        self._video_stream: av.VideoStream | None = None
        self._audio_stream: av.AudioStream | None = None
        self._input_size: tuple[int, int] | None = None
        self._frames_written = 0
        self._audio_samples_written = 0
        self._closed = False
        self._saved_path: Path | None = None
        # Open the audio before any frame is generated so that a bad audio input fails fast.
        if audio is None:
            self._audio: _AudioFeed | None = None
        elif isinstance(audio, (str, os.PathLike)):
            self._audio = _audio_feed_from_file(Path(audio))
        else:
            self._audio = _audio_feed_from_waveform(audio, audio_sample_rate)

    @property
    def frames_written(self) -> int:
        return self._frames_written

    @property
    def saved_path(self) -> Path | None:
        """The final file once the video was finalised (also after an interruption); None before or
        if nothing was saved."""
        return self._saved_path

    @property
    def audio_seconds_written(self) -> float:
        """Audio handed to the encoder so far; follows the video time as frames are written."""
        return self._audio_samples_written / OUTPUT_AUDIO_RATE

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool:
        if exc is None:
            self.close()
            return False
        try:
            saved = self._finish()
        except Exception as err:  # never hide the exception that interrupted the block
            exc.add_note(f"The partial video {self.path} could not be saved: {err}")
        else:
            exc.add_note(self._kept_note(saved))
        return False

    def _kept_note(self, saved: Path | None) -> str:
        if saved is None:
            return "no frame had been made yet; no file was written."
        seconds = self._frames_written / self._rate
        return f"kept the {self._frames_written} frames made so far ({float(seconds):.2f} s) in {saved}."

    def write(self, frames: Frames) -> None:
        """Encode frames (uint8 [T, H, W, 3] or [H, W, 3]) and the audio up to the same time."""
        if self._closed:
            raise LiveTalkError(f"VideoWriter for {self.path} is already closed; open a new one to write more.")
        batch = _as_uint8_frames(frames)
        size = (batch.shape[1], batch.shape[2])
        if self._input_size is None:
            self._open(*size)
        elif size != self._input_size:
            raise InputError(
                f"All frames of a video must have the same size: first {self._input_size[0]}x"
                f"{self._input_size[1]} (HxW), now {size[0]}x{size[1]}."
            )
        with _sigint_deferred():
            for image in _pad_to_even(batch):
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
                frame.pts = self._frames_written
                frame.time_base = 1 / self._rate
                self._mux(self._video_stream.encode(frame))
                self._frames_written += 1
            self._write_audio_until_video_time()

    def close(self) -> Path | None:
        """Finalise the mp4 and move it to its final name; returns that path (None if nothing was written)."""
        if self._closed:
            return self._saved_path
        try:
            return self._finish()
        except av.error.FFmpegError as err:
            raise LiveTalkError(f"Could not finish writing {self.path}: {err}. Check free disk space.") from err

    def _create_partial(self) -> av.container.OutputContainer:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return av.open(str(self._partial_path), "w", format="mp4", options={"movflags": "+faststart+use_metadata_tags"})

    def _create_partial_elsewhere(self, refusal: Exception) -> av.container.OutputContainer:
        """The target folder refused the partial file: write the video to :func:`fallback_path` instead."""
        wanted, self.path = self.path, fallback_path(self.path)
        self._partial_path = self.path.parent / f".{self.path.name}.partial"
        try:
            container = self._create_partial()
        except (av.error.FFmpegError, OSError) as err:
            raise InputError(f"Cannot create the video file {wanted} ({refusal}), nor {self.path} ({err}). "
                             "Check that the folders are writable and the disk has space.") from err
        log.warning("cannot write into %s (%s); the video goes to %s instead", wanted.parent, refusal, self.path)
        return container

    def _open(self, height: int, width: int) -> None:
        try:
            container = self._create_partial()
        except (av.error.FFmpegError, OSError) as err:
            container = self._create_partial_elsewhere(err)
        container.metadata.update(self._metadata)
        video = container.add_stream("libx264", rate=self._rate)
        video.width, video.height = width + width % 2, height + height % 2
        video.pix_fmt = "yuv420p"
        video.options = {"crf": str(self._crf), "preset": self._preset}
        if self._audio is not None:
            audio = container.add_stream("aac", rate=OUTPUT_AUDIO_RATE, layout="mono")
            audio.bit_rate = OUTPUT_AUDIO_BITRATE
            self._audio_stream = audio
        self._container, self._video_stream, self._input_size = container, video, (height, width)

    def _mux(self, packets: list[av.Packet]) -> None:
        for packet in packets:
            self._container.mux(packet)

    def _write_audio_until_video_time(self) -> None:
        if self._audio is None or self._audio.exhausted:
            return
        target = int(self._frames_written * OUTPUT_AUDIO_RATE / self._rate)
        samples = self._audio.take(target - self._audio_samples_written)
        if not len(samples):
            return
        frame = av.AudioFrame.from_ndarray(samples[None], format="fltp", layout="mono")
        frame.sample_rate = OUTPUT_AUDIO_RATE
        frame.pts = self._audio_samples_written
        frame.time_base = Fraction(1, OUTPUT_AUDIO_RATE)
        self._mux(self._audio_stream.encode(frame))
        self._audio_samples_written += len(samples)

    def _move_into_place(self) -> Path:
        """Rename the finished partial file to the final name (or, if refused, keep it elsewhere)."""
        try:
            os.replace(self._partial_path, self.path)
        except OSError as refusal:
            self._saved_path = fallback_path(self.path)
            _keep_elsewhere(self._partial_path, self.path, self._saved_path, refusal)
        return self.path

    def _finish(self) -> Path | None:
        with _sigint_deferred():
            return self._finish_container()

    def _finish_container(self) -> Path | None:
        self._closed = True
        try:
            if self._container is None:
                return None
            self._write_audio_until_video_time()
            self._mux(self._video_stream.encode(None))
            if self._audio_stream is not None:
                self._mux(self._audio_stream.encode(None))
            self._container.close()
            self._container = None
            self._saved_path = self._move_into_place()
            return self._saved_path
        finally:
            if self._audio is not None:
                self._audio.close()
            if self._container is not None:  # finishing failed: drop the unusable partial file
                container, self._container = self._container, None
                with contextlib.suppress(Exception):  # the error that got us here is the one to report
                    container.close()
                self._partial_path.unlink(missing_ok=True)


def _keep_elsewhere(partial: Path, wanted: Path, fallback: Path, refusal: OSError) -> NoReturn:
    """The finished video could not take its name: move it to ``fallback`` and say so."""
    try:
        shutil.move(partial, fallback)
    except OSError as err:
        raise LiveTalkError(f"The finished video could not be saved as {wanted} ({refusal}) nor as {fallback} ({err}); "
                            f"it is still in {partial}.") from err
    raise LiveTalkError(f"The finished video could not be saved as {wanted} ({refusal.strerror or refusal}); "
                        f"it was kept as {fallback} instead.")


def read_video_info(path: str | os.PathLike) -> dict:
    """Summary of a video file: frames, fps, width, height, has_audio, audio_duration (s or None)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"Video file not found: {path}.")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise InputError(f"{path} has no video track.")
            video = container.streams.video[0]
            frames = video.frames or sum(1 for packet in container.demux(video) if packet.size)
            audio = container.streams.audio[0] if container.streams.audio else None
            audio_duration = None
            if audio is not None and audio.duration is not None:
                audio_duration = float(audio.duration * audio.time_base)
            return {
                "frames": frames,
                "fps": float(video.average_rate or video.guessed_rate),
                "width": video.width,
                "height": video.height,
                "has_audio": audio is not None,
                "audio_duration": audio_duration,
            }
    except av.error.FFmpegError as err:
        raise InputError(f"Cannot read video file {path}: {err}.") from err
