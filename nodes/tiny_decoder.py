"""LoadLiveTalkTinyDecoder: the tiny decoder (TAEHV) for Decode Blocks, an opt-in trading quality for speed.

The weights come from a file in ``vae_approx`` (where ComfyUI keeps ``lighttaew2_1`` for its Wan
previews) or ``vae``, or from ComfyUI's own VAE object when Load VAE loaded a TAEHV file. Decode Blocks
and Decode Blocks to Video File decode with it when it is connected to their ``tiny_decoder`` input;
otherwise they use the full Wan VAE, the default.
"""

from __future__ import annotations

import logging

import comfy.model_management as mm
import folder_paths
from comfy_api.latest import io

from ..livetalk_core.errors import InputError
from ..livetalk_core.media.checkpoint import PRECISIONS
from ..livetalk_core.media.taehv import (
    NORMALISED,
    QUALITY_NOTE,
    RAW,
    WHERE_TO_GET_IT,
    TinyDecoder,
    latent_space_for,
    load_tiny_decoder,
    looks_like_tiny_decoder,
    tiny_decoder_from_state_dict,
)
from .comfy_models import Managed
from .pack_types import CATEGORY

log = logging.getLogger(__name__)

LiveTalkTinyDecoder = io.Custom("LIVETALK_TINY_DECODER")  # Managed holding a livetalk_core.media.taehv.TinyDecoder

NO_FILE = "none"
FOLDERS = ("vae_approx", "vae")
AUTO = "auto"
LATENT_CHOICES = {AUTO: None, "taew2_1 (normalised latents)": NORMALISED, "lighttaew2_1 (raw VAE latents)": RAW}
TINY_DECODER_TOOLTIP = (
    "Optional: the tiny decoder from Load Tiny Decoder (TAEHV). Connected, the blocks are decoded with it "
    "instead of the VAE: much faster, softer frames with less detail. Not connected: the full VAE (default)."
)


def decoder_choices() -> list[str]:
    """``none``, then the files of ``vae_approx`` and those of ``vae`` whose name holds "tae" (the full
    VAEs stay out of the list)."""
    approx = folder_paths.get_filename_list("vae_approx")
    vae = [name for name in folder_paths.get_filename_list("vae") if "tae" in name.lower() and name not in approx]
    return [NO_FILE, *approx, *vae]


def _default_choice(choices: list[str]) -> str:
    """The first Wan2.1 TAEHV file listed (lighttaew2_1 or taew2_1), else ``none``."""
    return next((c for c in choices if any(k in c.lower() for k in ("lighttaew2_1", "taew2_1"))), NO_FILE)


def decoder_path(name: str) -> str | None:
    return next((p for folder in FOLDERS if (p := folder_paths.get_full_path(folder, name))), None)


def latent_space_of_comfy_vae(first_stage_model) -> str:
    """The latent space a TAEHV that ComfyUI's Load VAE made expects. ComfyUI feeds it its LATENT (the
    raw VAE latents) unchanged unless it took the file for Hunyuan's float16 taehv (a latent format is
    set then): that is how lighttaew2_1 and other non-float16 files are decoded (raw), while a float16
    file with these names is madebyollin's taew2_1, which takes the normalised latents."""
    return RAW if getattr(first_stage_model, "latent_format", None) is None else NORMALISED


def from_comfy_vae(vae, latent_space: str | None, dtype) -> TinyDecoder:
    """The tiny decoder with the weights of ComfyUI's VAE object, when that object is a TAEHV."""
    model = getattr(vae, "first_stage_model", None)
    state = model.state_dict() if model is not None else {}
    if not looks_like_tiny_decoder(state):
        raise InputError(
            "The vae connected to Load Tiny Decoder is not a tiny decoder (TAEHV). Connect a Load VAE that loads "
            f"taew2_1 or lighttaew2_1 ({WHERE_TO_GET_IT}), or disconnect it and pick the file in decoder_name. "
            "The full Wan VAE is the one from Load LiveTalk Model."
        )
    space = latent_space or latent_space_of_comfy_vae(model)
    log.info("LiveTalk: tiny decoder from ComfyUI's VAE, decoding %s latents", space)
    return tiny_decoder_from_state_dict(state, latent_space=space, dtype=dtype, device=mm.vae_offload_device(),
                                        source="the VAE connected to Load Tiny Decoder")


class LoadLiveTalkTinyDecoder(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        choices = decoder_choices()
        return io.Schema(
            node_id="LoadLiveTalkTinyDecoder",
            display_name="Load Tiny Decoder (TAEHV)",
            category=CATEGORY,
            description=f"{QUALITY_NOTE} Connect it to the tiny_decoder input of Decode Blocks or Decode Blocks "
            "to Video File; the VAE from Load LiveTalk Model is still needed for Encode Reference. Serves both "
            "model families (Wan2.1 latents).",
            inputs=[
                io.Combo.Input("decoder_name", options=choices, default=_default_choice(choices),
                               tooltip="The TAEHV file for Wan2.1, from models/vae_approx or models/vae: "
                               f"{WHERE_TO_GET_IT}. 'none' when a vae is connected below."),
                io.Combo.Input("latents", options=list(LATENT_CHOICES), default=AUTO,
                               tooltip="Which latents the weights decode. auto: lighttaew2_1 files (and ComfyUI's "
                               "VAE loaded from them) the raw Wan VAE latents, other files the normalised ones "
                               "(taew2_1). Wrong, the colours are wrong."),
                io.Combo.Input("precision", options=list(PRECISIONS), default="bf16",
                               tooltip="Precision of the tiny decoder's weights and compute."),
                io.Vae.Input("vae", optional=True,
                             tooltip="Optional: ComfyUI's own VAE from Load VAE, when it loaded taew2_1 or "
                             "lighttaew2_1; its weights are used instead of decoder_name."),
            ],
            outputs=[LiveTalkTinyDecoder.Output("tiny_decoder", display_name="tiny_decoder",
                                                tooltip="For the tiny_decoder input of the decode nodes.")],
        )

    @classmethod
    def execute(cls, decoder_name: str, latents: str, precision: str, vae=None) -> io.NodeOutput:
        space = LATENT_CHOICES[latents]
        if vae is not None and decoder_name != NO_FILE:
            raise InputError(f"Load Tiny Decoder has both a vae connected and decoder_name '{decoder_name}'. "
                             "Set decoder_name to 'none' to use the vae, or disconnect the vae.")
        if vae is not None:
            decoder = from_comfy_vae(vae, space, precision)
        else:
            path = decoder_path(decoder_name) if decoder_name != NO_FILE else None
            if path is None:
                raise InputError(
                    f"Load Tiny Decoder: no file picked ('{decoder_name}'). Put {WHERE_TO_GET_IT} in models/vae_approx "
                    "(or models/vae) and refresh, or connect ComfyUI's Load VAE with that file."
                )
            decoder = load_tiny_decoder(path, precision, mm.vae_offload_device(),
                                        latent_space=space or latent_space_for(decoder_name))
        return io.NodeOutput(Managed(decoder, decoder, mm.vae_device(), mm.vae_offload_device()))
