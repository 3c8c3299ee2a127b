"""LiveTalkEncodeAudioWav2Vec and LiveTalkEncodeReferenceVAE: native AUDIO / IMAGE to model inputs."""

from __future__ import annotations

import comfy.model_management as mm
import torch
import torch.nn.functional as F
from comfy_api.latest import io

from ..livetalk_core.audio import prepare_waveform
from ..livetalk_core.image import check_target_size, cover_and_crop, to_float_image
from ..livetalk_core.pipeline import AudioConditioning, LiveTalkPipeline
from .comfy_models import on_device
from .pack_types import CATEGORY, AudioEmbeds, LiveTalkAudioEncoder, LiveTalkModel, LiveTalkVAE, Reference

CROP_MODES = ("center", "stretch")


class LiveTalkEncodeAudioWav2Vec(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LiveTalkEncodeAudioWav2Vec",
            display_name="EncodeAudioWav2Vec",
            category=CATEGORY,
            description="Turns speech into the model's audio embeddings. The video is as long as the audio "
            "(16 frames per second).",
            inputs=[
                LiveTalkModel.Input("model", tooltip="The LiveTalk model from LoadLiveTalkModel; its audio "
                                    "projection is applied here."),
                LiveTalkAudioEncoder.Input("audio_encoder", tooltip="The wav2vec2 encoder from LoadLiveTalkModel."),
                io.Audio.Input("audio", tooltip="Speech, e.g. from Load Audio: any sample rate, mono or stereo "
                               "(channels are averaged, then resampled to 16 kHz)."),
            ],
            outputs=[AudioEmbeds.Output("audio_embeds", display_name="audio_embeds",
                                        tooltip="Per-frame audio conditioning for the sampler.")],
        )

    @classmethod
    def execute(cls, model, audio_encoder, audio: dict) -> io.NodeOutput:
        waveform = prepare_waveform(audio["waveform"], audio["sample_rate"])
        dit, encoder = on_device(model, audio_encoder)
        # The VAE plays no part in this step.
        conditioning = LiveTalkPipeline(dit, None, encoder).encode_audio(waveform)
        embeds = conditioning.embeds.to(mm.intermediate_device())
        return io.NodeOutput(AudioConditioning(embeds=embeds, num_video_frames=conditioning.num_video_frames))


def _stretch(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize to exactly ``height x width`` ignoring the aspect ratio -> ``[1, 3, 1, H, W]`` in [-1, 1]."""
    check_target_size(height, width)
    pixels = to_float_image(image).permute(2, 0, 1).unsqueeze(0)
    pixels = F.interpolate(pixels, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    return (pixels * 2.0 - 1.0).unsqueeze(2)


class LiveTalkEncodeReferenceVAE(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LiveTalkEncodeReferenceVAE",
            display_name="EncodeReferenceVAE",
            category=CATEGORY,
            description="Fits the reference portrait to the video size and encodes it with the VAE. The video "
            "has this size.",
            inputs=[
                LiveTalkVAE.Input("vae", tooltip="The VAE from LoadLiveTalkModel."),
                io.Image.Input("image", tooltip="The face to animate; the first image of a batch is used."),
                io.Int.Input("width", default=512, min=64, max=2048, step=16,
                             tooltip="Video width in pixels (a multiple of 16). LiveTalk was trained at 512x512."),
                io.Int.Input("height", default=512, min=64, max=2048, step=16,
                             tooltip="Video height in pixels (a multiple of 16). LiveTalk was trained at 512x512."),
                io.Combo.Input("crop", options=list(CROP_MODES), default="center",
                               tooltip="center: scale to cover the size, then crop the middle (as upstream). "
                               "stretch: resize to the size, changing the aspect ratio."),
            ],
            outputs=[Reference.Output("reference", display_name="reference",
                                      tooltip="The reference latent the sampler starts every video from.")],
        )

    @classmethod
    def execute(cls, vae, image: torch.Tensor, width: int, height: int, crop: str) -> io.NodeOutput:
        first = image[0]
        pixels = cover_and_crop(first, height, width) if crop == "center" else _stretch(first, height, width)
        model = on_device(vae)
        latent = model.encode(pixels.to(model.device, model.dtype))
        return io.NodeOutput(latent.to(mm.intermediate_device()))
