"""LiveTalkEncodeAudioWav2Vec and LiveTalkEncodeReferenceVAE: native AUDIO / IMAGE to model inputs.

Both prepare their input the way the loaded family was trained, by asking the family
(:class:`livetalk_core.family_base.ModelFamily`): LiveTalk 1.3B's interpolated wav2vec2-base
features and a fixed video size, or RealVideo 14B's bucketed wav2vec2-large features per 5 s segment
and its own size rule (an area, the aspect ratio snapped from the image).
"""

from __future__ import annotations

import logging

import comfy.model_management as mm
import torch
from comfy_api.latest import io

from ..livetalk_core.media.audio_file import prepare_waveform
from ..livetalk_core.media.timing import VideoLength
from .comfy_models import Managed, on_device
from .model_files import EncoderSize, check_audio_encoder_fits
from .multi_gpu import WorkerDiT
from .pack_types import CATEGORY, AudioEmbeds, LiveTalkAudioEncoder, LiveTalkModel, LiveTalkVAE, Reference

CROP_MODES = ("center", "stretch")


class LiveTalkEncodeAudioWav2Vec(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LiveTalkEncodeAudioWav2Vec",
            display_name="Encode Audio (wav2vec2)",
            category=CATEGORY,
            description="Turns speech into the model's audio embeddings. The video is as long as the audio "
            "(16 frames per second). LiveTalk 1.3B takes wav2vec2-base, RealVideo 14B wav2vec2-large "
            "(run in fp32, in 5 s segments).",
            inputs=[
                LiveTalkModel.Input("model", tooltip="The model from Load LiveTalk Model. LiveTalk 1.3B: its audio "
                                    "projection is applied here. RealVideo 14B: it only picks the pipeline (its "
                                    "DiT takes the features per block, so it is not loaded here)."),
                LiveTalkAudioEncoder.Input("audio_encoder", tooltip="The wav2vec2 encoder from Load LiveTalk Model "
                                           "(wav2vec2-base for LiveTalk 1.3B, wav2vec2-large for RealVideo 14B)."),
                io.Audio.Input("audio", tooltip="Speech, e.g. from Load Audio: any sample rate, mono or stereo "
                               "(channels are averaged, then resampled to 16 kHz)."),
            ],
            outputs=[AudioEmbeds.Output("audio_embeds", display_name="audio_embeds",
                                        tooltip="Per-frame audio conditioning for the sampler.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model: Managed, audio_encoder: Managed, audio: dict) -> io.NodeOutput:
        family = model.family
        waveform = prepare_waveform(audio["waveform"], audio["sample_rate"])
        _check_encoder_fits(model, audio_encoder)
        family.video_length(waveform.numel())  # refuses unusable audio before the models load
        if family.audio_uses_dit:
            dit, encoder = on_device(model, audio_encoder)
        else:  # only the DiT's dtype is read: it stays where it is
            dit, encoder = model.engine, on_device(audio_encoder)
        embeds = family.encode_audio(dit, encoder, waveform, mm.intermediate_device())
        _say_if_short(embeds.length, cls.hidden.unique_id)
        return io.NodeOutput(embeds)


def _say_if_short(length: VideoLength, node_id: str | None) -> None:
    """A clip shorter than one block: a warning in the console and, in the front end, on the node."""
    message = length.short_clip_message
    if message is None:
        return
    logging.warning("LiveTalk: %s", message)
    from server import PromptServer  # ComfyUI's server; imported here, where a prompt is running

    server = getattr(PromptServer, "instance", None)
    if server is not None and node_id is not None:
        server.send_progress_text(message, node_id)


def _check_encoder_fits(model: Managed, audio_encoder: Managed) -> None:
    """The loader's check, again on the loaded models: pickled checkpoints skip it at validation."""
    if isinstance(model.engine, WorkerDiT):  # the weights are in the worker processes
        dit_shapes = model.engine.weight_shapes
    else:
        dit_shapes = {k: tuple(v.shape) for k, v in model.module.state_dict().items()}
    encoder = audio_encoder.engine
    size = EncoderSize(encoder.num_layers, encoder.hidden_size)
    check_audio_encoder_fits(model.family, dit_shapes, size, str(encoder.source.name))


class LiveTalkEncodeReferenceVAE(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LiveTalkEncodeReferenceVAE",
            display_name="Encode Reference (VAE)",
            category=CATEGORY,
            description="Fits the reference portrait to the video size and encodes it with the VAE. The video "
            "has this size. For RealVideo 14B the size follows RealVideo's rule instead (see width).",
            inputs=[
                LiveTalkVAE.Input("vae", tooltip="The VAE from Load LiveTalk Model."),
                io.Image.Input("image", tooltip="The face to animate; the first image of a batch is used."),
                io.Int.Input("width", default=512, min=64, max=2048, step=16,
                             tooltip="Video width in pixels (a multiple of 16). LiveTalk was trained at 512x512. "
                             "RealVideo 14B: width x height is only the video's area (upstream: 512x512); the "
                             "aspect ratio is the image's, snapped to 16:9, 4:3 or 1:1, sides multiples of 64 "
                             "(a 3:4 portrait gives 448x576)."),
                io.Int.Input("height", default=512, min=64, max=2048, step=16,
                             tooltip="Video height in pixels (a multiple of 16). LiveTalk was trained at 512x512. "
                             "RealVideo 14B: see width (an area, not a height)."),
                io.Combo.Input("crop", options=list(CROP_MODES), default="center",
                               tooltip="center: scale to cover the size, then crop the middle (as upstream). "
                               "stretch: resize to the size, changing the aspect ratio. RealVideo 14B always "
                               "scales and crops the middle as upstream (padding black past a 16:9 edge)."),
            ],
            outputs=[Reference.Output("reference", display_name="reference",
                                      tooltip="The reference latent the sampler starts every video from.")],
        )

    @classmethod
    def execute(cls, vae: Managed, image: torch.Tensor, width: int, height: int, crop: str) -> io.NodeOutput:
        model = on_device(vae)
        pixels = vae.family.reference_pixels(image[0], width, height, crop, model.device)
        latent = model.encode(pixels.to(model.device, model.dtype))
        return io.NodeOutput(latent.to(mm.intermediate_device()))
