"""RealVideo's audio conditioning: wav2vec2-large hidden states bucketed to 16 fps, per segment.

Upstream (``core/model_handler.py``, ``core/lip_sync.py``, ``self_forcing/wan/modules/audio_encoder.py``)
cuts the 16 kHz waveform into segments of at most 5 s and handles each one on its own:

1. zero-pad it to whole seconds (the start message's 0.5 s silence is the exception: unpadded);
2. normalise it to zero mean / unit variance (per segment, population variance, float32);
3. run wav2vec2 in float32 and keep all ``L + 1`` = 25 hidden states at the CNN's 50 fps
   (transformers-4.x semantics: the last one after the encoder's final LayerNorm);
4. resample 50 -> 30 fps by linear interpolation (``align_corners=True``);
5. pick, for video frame ``k`` at 16 fps, the 30 fps feature ``round(1.875 k)`` (NumPy rounding).

The result per segment is ``[1, 25, A, F]`` (A = wav2vec2 width, F video frames), which the DiT's
causal audio encoder turns into ``F // 4`` latent frames. Segments do not share context: each gets
its own normalisation and, in the DiT, its own causal-conv warm-up.

Load the encoder (``jonatasgrosman/wav2vec2-large-xlsr-53-english``) in float32, as upstream runs
it; only the final features are cast to the DiT's dtype.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError
from ..media.audio_file import SAMPLE_RATE
from ..media.timing import VIDEO_FPS
from ..media.wav2vec2 import AudioEncoder, cnn_frames, hidden_states, normalize_waveform
from ..runtime.cuda_graphs import ForwardGraphs

SEGMENT_SECONDS = 5
SEGMENT_SAMPLES = SEGMENT_SECONDS * SAMPLE_RATE
CNN_FPS = 50
INTERPOLATED_FPS = 30
# One block of two latent frames = 8 video frames = 0.5 s: the shortest segment the DiT can use.
MIN_SEGMENT_SAMPLES = SAMPLE_RATE // 2


def split_segments(waveform: torch.Tensor, segment_samples: int = SEGMENT_SAMPLES) -> list[torch.Tensor]:
    """Consecutive ``segment_samples`` pieces of a mono ``[N]`` waveform, each zero-padded to whole
    seconds (only the last one can need it)."""
    if waveform.ndim != 1 or waveform.numel() == 0:
        raise InputError(f"Expected a non-empty mono waveform [N]; got shape {tuple(waveform.shape)}.")
    segments = []
    for start in range(0, waveform.numel(), segment_samples):
        piece = waveform[start : start + segment_samples].float()
        padded = math.ceil(piece.numel() / SAMPLE_RATE) * SAMPLE_RATE
        segments.append(F.pad(piece, (0, padded - piece.numel())))
    return segments


def wav2vec_hidden_states(encoder: AudioEncoder, segment: torch.Tensor,
                          graphs: ForwardGraphs | None = None) -> torch.Tensor:
    """All hidden states of one segment at the CNN rate: ``[N]`` -> ``[L + 1, T50, A]`` float32
    (``graphs``: the encoder's CUDA graphs, :func:`~..media.wav2vec2.hidden_states`)."""
    if segment.numel() < MIN_SEGMENT_SAMPLES:
        raise InputError(
            f"An audio segment of {segment.numel()} samples is too short: RealVideo needs at least "
            f"{MIN_SEGMENT_SAMPLES} samples (0.5 s at 16 kHz)."
        )
    values = normalize_waveform(segment) if encoder.do_normalize else segment.float()
    states = hidden_states(encoder, values[None].to(encoder.dtype), cnn_frames(encoder, segment.numel()),
                           graphs=graphs)
    return torch.cat(states).float()


def interpolate_to_30fps(states: torch.Tensor) -> torch.Tensor:
    """``[L, T50, A]`` -> ``[L, int(T50 / 50 * 30), A]`` by linear interpolation with aligned corners."""
    length = int(states.shape[1] / float(CNN_FPS) * INTERPOLATED_FPS)
    return F.interpolate(states.transpose(1, 2), size=length, mode="linear", align_corners=True).transpose(1, 2)


def bucket_indices(num_features: int, num_video_frames: int) -> np.ndarray:
    """30 fps feature index per 16 fps video frame (upstream ``get_audio_embed_bucket_fps``, m = 0).

    Upstream rounds the bucket count up to a multiple of ``num_video_frames`` sized to cover the
    features; entries past the last feature are returned as -1 (zero features).
    """
    scale = INTERPOLATED_FPS / VIDEO_FPS
    batches = int(num_features / (num_video_frames * scale)) + 1
    count = batches * num_video_frames
    times = np.linspace(0.0, count / VIDEO_FPS, count, endpoint=False)
    indices = np.round(times * INTERPOLATED_FPS).astype(int)
    indices = np.clip(indices, 0, math.ceil(count / VIDEO_FPS * INTERPOLATED_FPS) - 1)
    return np.where(indices < num_features, indices, -1)


def bucket_to_video_frames(features_30fps: torch.Tensor, num_video_frames: int) -> torch.Tensor:
    """``[L, T30, A]`` -> ``[1, L, A, frames]``: one 30 fps feature per 16 fps video frame."""
    layers, length, width = features_30fps.shape
    indices = torch.from_numpy(bucket_indices(length, num_video_frames))
    picked = features_30fps[:, indices.clamp(min=0)]
    picked[:, indices < 0] = 0
    return picked.permute(0, 2, 1).unsqueeze(0)


def segment_features(
    encoder: AudioEncoder, segment: torch.Tensor, dtype: torch.dtype = torch.bfloat16,
    graphs: ForwardGraphs | None = None,
) -> torch.Tensor:
    """One already padded segment ``[N]`` -> DiT audio input ``[1, L + 1, A, N // 1000]`` in ``dtype``
    (``graphs``: as in :func:`wav2vec_hidden_states`)."""
    states = interpolate_to_30fps(wav2vec_hidden_states(encoder, segment, graphs))
    return bucket_to_video_frames(states, segment.numel() // 1000).to(dtype)


def realvideo_audio_features(
    encoder: AudioEncoder, waveform_16k: torch.Tensor, dtype: torch.dtype = torch.bfloat16
) -> list[torch.Tensor]:
    """A whole clip ``[N]`` at 16 kHz -> the audio input of every <= 5 s segment (see module doc)."""
    return [segment_features(encoder, segment, dtype) for segment in split_segments(waveform_16k)]
