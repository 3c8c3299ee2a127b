"""LoadLiveTalkModel: the DiT, the VAE and the audio encoder, checked against each other."""

from __future__ import annotations

import comfy.model_management as mm
from comfy_api.latest import io

from ..livetalk_core.attention import ATTENTION_BACKENDS, resolve_backend
from ..livetalk_core.audio import load_audio_encoder
from ..livetalk_core.checkpoint import PRECISIONS, resolve_dtype
from ..livetalk_core.compile import compile_blocks
from ..livetalk_core.errors import LiveTalkError, MissingWeightsError
from ..livetalk_core.vae import load_vae
from . import comfy_models as cm
from .model_files import (
    SUPPORTED_MODELS,
    WAV2VEC2_BASE_HINT,
    WAV2VEC2_LARGE_HINT,
    audio_encoder_size,
    check_audio_encoder_fits,
    check_vae_fits,
    checkpoint_shapes,
    detect_family,
    tensor_shapes,
)
from .pack_types import CATEGORY, LiveTalkAudioEncoder, LiveTalkModel, LiveTalkVAE


def _resolve(kind: str, name: str, path: str | None, folders: str) -> str:
    if path is None:
        raise MissingWeightsError(
            f"The {kind} '{name}' was not found in {folders}. Put the file there and refresh, or pick another."
        )
    return path


def _paths(model_name: str, vae_name: str, audio_encoder_name: str) -> tuple[str, str, str]:
    return (
        _resolve("model", model_name, cm.dit_path(model_name), "models/livetalk or models/diffusion_models"),
        _resolve("VAE", vae_name, cm.vae_path(vae_name), "models/vae"),
        _resolve("audio encoder", audio_encoder_name, cm.audio_encoder_path(audio_encoder_name), "models/audio_encoders"),
    )


class LoadLiveTalkModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoadLiveTalkModel",
            display_name="LoadLiveTalkModel",
            category=CATEGORY,
            description="Loads a LiveTalk DiT with the VAE and the wav2vec2 audio encoder it needs. The "
            "model family (LiveTalk 1.3B or RealVideo 14B) is detected from the DiT file, and the other "
            "nodes follow it.",
            inputs=[
                io.Combo.Input("model_name", options=cm.dit_choices(),
                               tooltip=f"The DiT, from models/livetalk or models/diffusion_models: {SUPPORTED_MODELS}."),
                io.Combo.Input("vae_name", options=cm.vae_choices(),
                               tooltip="The Wan2.1 VAE (wan_2.1_vae.safetensors or Wan2.1_VAE.pth) from models/vae."),
                io.Combo.Input("audio_encoder_name", options=cm.audio_encoder_choices(),
                               tooltip=f"The audio encoder from models/audio_encoders. LiveTalk 1.3B: "
                               f"{WAV2VEC2_BASE_HINT}. RealVideo 14B: {WAV2VEC2_LARGE_HINT}."),
                io.Combo.Input("precision", options=list(PRECISIONS), default="bf16",
                               tooltip="Weight and compute precision of the models. bf16 is what LiveTalk and "
                               "RealVideo were run in upstream; fp32 is for CPUs and debugging. RealVideo's "
                               "audio encoder always runs in fp32, as upstream; fp8_scaled DiT files are "
                               "expanded to this precision."),
                io.Combo.Input("attention", options=list(ATTENTION_BACKENDS), default="sdpa",
                               tooltip="Attention kernel of the DiT. sdpa is PyTorch's; flash and sage need the "
                               "flash_attn / sageattention packages and fall back to sdpa without them; math "
                               "is a slow reference."),
                io.Boolean.Input("compile", default=True, optional=True,
                                 tooltip="torch.compile the DiT's blocks on a GPU (about 30% faster after a few "
                                 "seconds of compiling on the first run). Falls back to eager by itself if "
                                 "compiling is not possible; ignored on the CPU."),
            ],
            outputs=[
                LiveTalkModel.Output("model", display_name="model",
                                     tooltip="The DiT, managed by ComfyUI's model memory management."),
                LiveTalkVAE.Output("vae", display_name="vae", tooltip="The Wan2.1 VAE with LiveTalk's latent normalisation."),
                LiveTalkAudioEncoder.Output("audio_encoder", display_name="audio_encoder", tooltip="The wav2vec2 encoder."),
            ],
        )

    @classmethod
    def validate_inputs(cls, model_name: str, vae_name: str, audio_encoder_name: str) -> bool | str:
        """Catch a wrong file or a mismatched pair before anything is loaded (headers only)."""
        try:
            model_path, vae_path, encoder_path = _paths(model_name, vae_name, audio_encoder_name)
            vae_shapes = tensor_shapes(vae_path)
            if vae_shapes is not None:
                check_vae_fits(vae_shapes, vae_name)
            dit_shapes = tensor_shapes(model_path)
            if dit_shapes is None:
                return True
            family = detect_family(dit_shapes, model_path)
            encoder = audio_encoder_size(encoder_path)
            if encoder is not None:
                check_audio_encoder_fits(family, dit_shapes, encoder, audio_encoder_name)
        except LiveTalkError as exc:
            return str(exc)
        return True

    @classmethod
    def execute(
        cls, model_name: str, vae_name: str, audio_encoder_name: str, precision: str, attention: str, compile: bool = True
    ) -> io.NodeOutput:
        model_path, vae_path, encoder_path = _paths(model_name, vae_name, audio_encoder_name)
        dtype = resolve_dtype(precision)
        family = detect_family(checkpoint_shapes(model_path), model_path)

        offload = mm.unet_offload_device()
        dit = family.load(model_path, dtype, offload)
        dit.attention_backend = resolve_backend(attention)
        if compile and mm.get_torch_device().type == "cuda":
            compile_blocks(dit)
        model = cm.Managed(dit, dit, mm.get_torch_device(), offload, family=family)

        # The VAE and the encoder carry the family too: their nodes prepare inputs the family's way.
        vae_module = load_vae(vae_path, dtype, mm.vae_offload_device())
        vae = cm.Managed(vae_module, vae_module, mm.vae_device(), mm.vae_offload_device(), family=family)

        encoder_dtype = family.audio_encoder_dtype or dtype
        encoder = load_audio_encoder(encoder_path, encoder_dtype, mm.text_encoder_offload_device())
        audio_encoder = cm.Managed(encoder, encoder.model, mm.text_encoder_device(), mm.text_encoder_offload_device(),
                                   family=family)
        return io.NodeOutput(model, vae, audio_encoder)
