"""LiveTalk's audio arithmetic: the samples ``F`` latent frames cover (upstream's trim rule) and the
silence that pads a clip to whole blocks (``scripts/inference_example.py:162-168``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import InputError
from ..family_base import check_encoder_features
from ..media.timing import SAMPLE_RATE, VIDEO_FPS, VIDEO_FRAMES_PER_LATENT
from ..media.wav2vec2 import AudioEncoder
from .model import MODEL_NAME, LiveTalkDiT


def samples_for_latents(num_latent_frames: int, sample_rate: int = SAMPLE_RATE, fps: int = VIDEO_FPS) -> int:
    """Audio samples upstream keeps for ``F`` latent frames: ``int((4F - 4) / fps * sample_rate)``.

    Upstream trims longer audio to this many samples and never pads shorter audio. The expression
    is evaluated in the same float order as upstream so the count is identical.
    """
    return int(((num_latent_frames * VIDEO_FRAMES_PER_LATENT - VIDEO_FRAMES_PER_LATENT) / fps) * sample_rate)


def trim_waveform_for_latents(waveform: torch.Tensor, num_latent_frames: int) -> torch.Tensor:
    """Upstream's rule: keep the first ``samples_for_latents(F)`` samples (shorter audio is kept as is)."""
    return waveform[: samples_for_latents(num_latent_frames)]


def latents_covering(num_samples: int, frames_per_block: int = 3) -> int:
    """The smallest multiple ``F`` of ``frames_per_block`` whose audio span
    ``samples_for_latents(F)`` holds ``num_samples`` (see :func:`pad_waveform_to_blocks`)."""
    num_latent_frames = frames_per_block
    while samples_for_latents(num_latent_frames) < num_samples:
        num_latent_frames += frames_per_block
    return num_latent_frames


def pad_waveform_to_blocks(waveform: torch.Tensor, frames_per_block: int = 3) -> tuple[torch.Tensor, int]:
    """Pad ``[N]`` 16 kHz audio with silence to a whole number of generation blocks.

    Picks the smallest ``F`` that is a multiple of ``frames_per_block`` with ``(4F - 4) / 16`` seconds
    >= the audio duration, and zero-pads to exactly ``samples_for_latents(F)`` samples, so every video
    frame has audio aligned to it (upstream instead stretches short audio over the whole video).
    Durations upstream accepts (3n + 2 whole seconds) get upstream's ``F`` and no padding. The caller
    trims the decoded video back to the audio length.

    Returns:
        ``(padded [samples_for_latents(F)] float32, F)``.
    """
    num_samples = int(waveform.shape[-1])
    if waveform.ndim != 1 or num_samples == 0:
        raise InputError(f"Expected a non-empty mono waveform [N], got shape {tuple(waveform.shape)}.")
    num_latent_frames = latents_covering(num_samples, frames_per_block)
    padding = samples_for_latents(num_latent_frames) - num_samples
    return F.pad(waveform.float(), (0, padding)), num_latent_frames


WAV2VEC2_BASE_HINT = "wav2vec2-base-960h (facebook/wav2vec2-base-960h, as a folder or a single .safetensors)"


def encoder_features(layers: int, hidden: int) -> int:
    """LiveTalk's audio features per video frame from a wav2vec2 of ``layers`` x ``hidden``:
    ``cat(last hidden state, h0 ... hL)`` (:func:`~..media.wav2vec2.livetalk_audio_features`)."""
    return (layers + 2) * hidden


def check_audio_encoder(dit: LiveTalkDiT, audio_encoder: AudioEncoder) -> None:
    """The DiT's audio projection takes :func:`encoder_features` per frame; refuse a mismatch."""
    layers, hidden = audio_encoder.num_layers, audio_encoder.hidden_size
    check_encoder_features(encoder_features(layers, hidden), dit.livetalk_config.audio_features, layers=layers,
                           hidden=hidden, encoder_name=audio_encoder.source.name, model=MODEL_NAME,
                           hint=WAV2VEC2_BASE_HINT)
