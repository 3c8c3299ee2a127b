"""The pack's socket types and the values that travel on them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from comfy_api.latest import io

CATEGORY = "LiveTalk"

LiveTalkModel = io.Custom("LIVETALK_MODEL")  # nodes.comfy_models.Managed holding the DiT
LiveTalkVAE = io.Custom("LIVETALK_VAE")  # Managed holding a livetalk_core.media.vae.WanVAE
LiveTalkAudioEncoder = io.Custom("LIVETALK_AUDIO_ENCODER")  # Managed holding a wav2vec2 AudioEncoder
# what the model's family encodes audio to (ModelFamily.conditioning_type, one type per family)
AudioEmbeds = io.Custom("LIVETALK_AUDIO_EMBEDS")
Reference = io.Custom("LIVETALK_REFERENCE")  # reference latent [1, 16, 1, h, w] in the VAE's dtype
LatentBlocks = io.Custom("LIVETALK_LATENT_BLOCKS")  # LatentBlockList


@dataclass
class LatentBlockList:
    """Sampled latent blocks ``[1, 16, F_block, h, w]`` (float32, intermediate device) and the number
    of video frames the audio covers, which the decoder keeps."""

    blocks: list[torch.Tensor]
    num_video_frames: int
