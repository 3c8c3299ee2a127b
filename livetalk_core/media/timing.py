"""Audio-to-video timing both model families share: the sample and frame rates, the video frames a clip gets,
the frames the VAE decodes from latent frames, and :class:`VideoLength`, which each family's
``video_length`` fills (upstream ``scripts/inference_example.py:133-134, 162-168``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import InputError

SAMPLE_RATE = 16000  # Hz: the audio every encoder here takes (and the live protocol carries)
VIDEO_FPS = 16
# The Wan VAE's temporal compression: latent frame 0 decodes to one video frame, every later one to 4.
VIDEO_FRAMES_PER_LATENT = 4


def video_frames_for_samples(num_samples: int, sample_rate: int = SAMPLE_RATE, fps: int = VIDEO_FPS) -> int:
    """Video frames for ``N`` samples of audio (D = N / rate seconds), for both model families.

    One frame for every instant ``k / fps`` from 0 through the end of the audio:
    ``floor(fps * D) + 1`` (upstream LiveTalk's ``16 D + 1`` for whole seconds). At ``fps``, the
    mp4's video then lasts ``(D, D + 1/fps]``: never shorter than the audio (so no speech is cut
    when the audio track is muxed), at most one frame longer. Integer arithmetic: no rounding drift.
    """
    return num_samples * fps // sample_rate + 1


def samples_for_duration(seconds: float, sample_rate: int = SAMPLE_RATE) -> int:
    """Audio samples in ``seconds`` (a requested video duration), refusing what is not a positive
    finite number of seconds of at least one sample."""
    if not (isinstance(seconds, (int, float)) and math.isfinite(seconds) and seconds > 0):
        raise InputError(f"The duration must be a positive number of seconds (e.g. 3.5); got {seconds}.")
    samples = round(seconds * sample_rate)
    if samples < 1:
        raise InputError(f"The duration {seconds} s is shorter than one audio sample (1/{sample_rate} s).")
    return samples


@dataclass(frozen=True)
class VideoLength:
    """How long a video is and how many blocks make it (each family's function in
    ``pipeline.livetalk_video_length`` / ``realvideo_sampler.realvideo_video_length`` fills it).

    num_samples: the 16 kHz audio the video covers (the clip, or ``duration`` seconds of it).
    num_blocks: blocks to sample; their decoded frames cover ``num_video_frames`` (the surplus of
        the last block is trimmed after decoding).
    num_video_frames: :func:`video_frames_for_samples` of ``num_samples``.
    block_samples: the audio one block covers, for the short-clip message.
    """

    num_samples: int
    num_blocks: int
    num_video_frames: int
    block_samples: int

    @property
    def seconds(self) -> float:
        return self.num_samples / SAMPLE_RATE

    @property
    def short_clip_message(self) -> str | None:
        """What a clip shorter than one block gives (None for a clip of one block or more)."""
        if self.num_samples >= self.block_samples:
            return None
        frames = self.num_video_frames
        return (
            f"{self.seconds:.2f} s of audio is shorter than one block ({self.block_samples / SAMPLE_RATE:.2f} s): "
            f"the video will be {frames} frame{'s' if frames != 1 else ''} ({frames / VIDEO_FPS:.2f} s at {VIDEO_FPS} "
            "fps). A longer clip gives a longer video."
        )


class CoversVideoLength:
    """What an audio conditioning with a ``length`` (:class:`VideoLength`) tells the sampler and the
    decoder: the blocks to sample and the frames to keep."""

    length: VideoLength

    @property
    def num_blocks(self) -> int:
        return self.length.num_blocks

    @property
    def num_video_frames(self) -> int:
        return self.length.num_video_frames


def video_frames_for_latents(num_latent_frames: int) -> int:
    """Video frames decoded from ``F`` latent frames: ``4F - 3`` (latent 0 is one frame, the rest 4)."""
    return VIDEO_FRAMES_PER_LATENT * (num_latent_frames - 1) + 1
