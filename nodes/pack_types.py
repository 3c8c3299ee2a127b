"""The pack's socket types and the values that travel on them."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from comfy_api.latest import io

CATEGORY = "LiveTalk"

LiveTalkModel = io.Custom("LIVETALK_MODEL")  # nodes.comfy_models.Managed holding the DiT
LiveTalkVAE = io.Custom("LIVETALK_VAE")  # Managed holding a livetalk_core.vae.WanVAE
LiveTalkAudioEncoder = io.Custom("LIVETALK_AUDIO_ENCODER")  # Managed holding a livetalk_core.audio.AudioEncoder
# livetalk_core.pipeline.AudioConditioning (LiveTalk 1.3B) or RealVideoAudio (RealVideo 14B)
AudioEmbeds = io.Custom("LIVETALK_AUDIO_EMBEDS")
Reference = io.Custom("LIVETALK_REFERENCE")  # reference latent [1, 16, 1, h, w] in the VAE's dtype
LatentBlocks = io.Custom("LIVETALK_LATENT_BLOCKS")  # LatentBlockList


@dataclass
class LatentBlockList:
    """Sampled latent blocks ``[1, 16, F_block, h, w]`` (float32, intermediate device) and the number
    of video frames the audio covers, which the decoder keeps."""

    blocks: list[torch.Tensor]
    num_video_frames: int


# A RealVideo block of 2 latent frames decodes to 8 video frames, except the first: 5 (the VAE's
# first latent frame is a single image), so b blocks give 8 b - 3 frames.
REALVIDEO_FRAMES_PER_BLOCK = 8
REALVIDEO_FIRST_BLOCK_DEFICIT = 3


@dataclass
class RealVideoAudio:
    """RealVideo's audio input: per <= 5 s segment the wav2vec2 features ``[1, 25, A, F]``
    (intermediate device, the DiT's dtype), and the video frames the audio covers."""

    features: list[torch.Tensor]
    num_video_frames: int

    @property
    def num_blocks(self) -> int:
        """The fewest blocks whose frames cover the audio; past the last segment, blocks repeat its
        final audio window (upstream's idle behaviour) until then."""
        return math.ceil((self.num_video_frames + REALVIDEO_FIRST_BLOCK_DEFICIT) / REALVIDEO_FRAMES_PER_BLOCK)
