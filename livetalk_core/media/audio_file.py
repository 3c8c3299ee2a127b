"""Audio files and in-memory audio to 16 kHz mono float32, the input of every audio encoder here.

Decoding goes through PyAV (FFmpeg): every channel is converted to float, the channels are averaged
(the mono downmix librosa does), and the mono signal is resampled to 16 kHz by FFmpeg's
**swresample** with its default settings (a Kaiser-windowed sinc filter) through
``av.AudioResampler``. Upstream uses ``librosa.load`` (soxr); both are band-limited resamplers that
differ far below what the model can notice, and neither shifts the signal in time. Audio that is
already at 16 kHz is passed through untouched, so the parity cases see exactly upstream's samples.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import av
import numpy as np
import torch

from ..errors import InputError
from .timing import SAMPLE_RATE

# Samples per frame fed to swresample, so a long clip is never handed over as one huge AVFrame.
_RESAMPLE_CHUNK = 1 << 16


def load_audio(path: str | Path, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Decode an audio file (WAV, MP3, FLAC, OGG, or anything FFmpeg reads) to mono float32.

    Returns:
        ``[N]`` float32 at ``sample_rate``: channels averaged, then resampled with swresample.
    Raises:
        InputError: the file is missing, is not audio, is corrupt, has no audio stream, or holds no
            samples.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise InputError(f"The audio file {path} {what}. Check the path or file name.")
    channels, rate = _decode_channels(path)
    return torch.from_numpy(_mono_at_rate(channels, rate, sample_rate, what=str(path)))


def prepare_waveform(
    samples: torch.Tensor | np.ndarray,
    sample_rate: int,
    layout: Literal["channels_first", "channels_last"] = "channels_first",
    target_rate: int = SAMPLE_RATE,
) -> torch.Tensor:
    """In-memory audio to ``[N]`` float32 mono at ``target_rate``.

    Accepts ``[T]``, ``[C, T]`` (``layout="channels_first"``), ``[T, C]`` (``"channels_last"``), or
    ComfyUI's AUDIO waveform ``[B, C, T]`` with ``B == 1``.
    """
    if layout not in ("channels_first", "channels_last"):
        raise InputError(f"Unknown audio layout {layout!r}: use 'channels_first' or 'channels_last'.")
    if isinstance(samples, torch.Tensor):
        samples = samples.detach().to("cpu", torch.float32).numpy()
    array = np.asarray(samples, dtype=np.float32)
    if array.ndim == 3:
        if layout != "channels_first":
            raise InputError("A batched waveform must be laid out [batch, channels, samples].")
        if array.shape[0] != 1:
            raise InputError(
                f"The audio input holds a batch of {array.shape[0]} clips; LiveTalk needs exactly one. "
                "Split the batch or pick one clip."
            )
        array = array[0]
    elif array.ndim == 1:
        array = array[None]
    elif array.ndim == 2 and layout == "channels_last":
        array = array.T
    elif array.ndim != 2:
        raise InputError(f"Expected a waveform of 1 to 3 dimensions, got shape {tuple(array.shape)}.")
    if not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
        raise InputError(f"The audio sample rate must be a positive integer, got {sample_rate!r}.")
    return torch.from_numpy(_mono_at_rate(array, int(sample_rate), target_rate, what="the audio input"))


def _decode_channels(path: Path) -> tuple[np.ndarray, int]:
    """All samples of the first audio stream as float32 ``[C, T]`` and the stream's sample rate."""
    unreadable = (
        f"{path} could not be read as audio: it is not an audio file or it is corrupt. "
        "Use a WAV, MP3, FLAC or OGG file."
    )
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError, UnicodeDecodeError, ValueError):
        raise InputError(unreadable) from None
    with container:
        if not container.streams.audio:
            raise InputError(f"{path} has no audio stream. Pick a file that contains sound.")
        stream = container.streams.audio[0]
        # Format conversion only (same rate and layout): integer PCM becomes float in [-1, 1].
        to_float = av.AudioResampler(format="fltp")
        frames: list[av.AudioFrame] = []
        try:
            for frame in container.decode(stream):
                frames += to_float.resample(frame)
            frames += to_float.resample(None)
        except (av.FFmpegError, ValueError):
            raise InputError(unreadable) from None
    if sum(f.samples for f in frames) == 0:
        raise InputError(f"{path} holds no audio samples (the clip is empty).")
    return np.concatenate([f.to_ndarray() for f in frames], axis=1), int(frames[0].sample_rate)


def _mono_at_rate(channels: np.ndarray, rate: int, target_rate: int, *, what: str) -> np.ndarray:
    """``[C, T]`` float32 at ``rate`` to ``[N]`` float32 mono at ``target_rate``."""
    if channels.shape[-1] == 0 or channels.shape[0] == 0:
        raise InputError(f"{what} holds no audio samples (the clip is empty).")
    if not np.isfinite(channels).all():
        raise InputError(f"{what} contains NaN or infinite samples. Re-export the audio.")
    mono = channels.mean(axis=0, dtype=np.float32) if channels.shape[0] > 1 else channels[0]
    if rate != target_rate:
        mono = resample(mono, rate, target_rate)
    return np.ascontiguousarray(mono, dtype=np.float32)


def resample(waveform: np.ndarray, rate: int, target_rate: int) -> np.ndarray:
    """Resample ``[T]`` float32 mono with swresample; the result has ``ceil(T * target / rate)``
    samples (librosa's length rule), trimmed or zero-extended by at most a sample or two."""
    resampler = av.AudioResampler(format="flt", layout="mono", rate=target_rate)
    out: list[np.ndarray] = []
    for start in range(0, len(waveform), _RESAMPLE_CHUNK):
        chunk = np.ascontiguousarray(waveform[None, start : start + _RESAMPLE_CHUNK], dtype=np.float32)
        frame = av.AudioFrame.from_ndarray(chunk, format="flt", layout="mono")
        frame.sample_rate = rate
        out += [f.to_ndarray()[0] for f in resampler.resample(frame)]
    out += [f.to_ndarray()[0] for f in resampler.resample(None)]
    result = np.concatenate(out) if out else np.zeros(0, np.float32)
    length = -(-len(waveform) * target_rate // rate)
    if len(result) < length:
        result = np.pad(result, (0, length - len(result)))
    return result[:length]
