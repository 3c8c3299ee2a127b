"""LiveTalkCausalDiTSampler and LiveTalkDecodeBlocks: latent blocks with a KV cache, then frames.

The sampler runs the loaded family's loop (``model.family.sample_blocks``): LiveTalk 1.3B (blocks of 3
latent frames, a sliding cache with sink frames) or RealVideo 14B (blocks of 2 latent frames, the
reference prefilled under the idle prompt, 2 or 4 steps). The decoder serves both. Both advance
ComfyUI's progress bar once per block with a preview, and check for an interrupt between model
forwards. The sampler runs in the DiT's kept workspace (:func:`~.comfy_models.kept_workspace`): the
layouts an earlier prompt captured replay from CUDA graphs, every forward from the third prompt on
(block 0's too); where that does not pay or the GPU is short of room, the KV cache is freed when the
run ends (or is interrupted).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import comfy.latent_formats
import comfy.model_management as mm
import comfy.utils
import torch
from comfy_api.latest import io
from PIL import Image

from ..livetalk_core.errors import InputError
from ..livetalk_core.families import FAMILIES, default_family
from ..livetalk_core.media.timing import VIDEO_FPS
from ..livetalk_core.media.vae import frames_to_uint8
from ..livetalk_core.wan.kv_cache import CachePolicy
from .comfy_models import Managed, keep_if_worth_it, kept_workspace, on_device, out_of_memory_advice
from .pack_types import (
    CATEGORY,
    AudioEmbeds,
    LatentBlockList,
    LatentBlocks,
    LiveTalkModel,
    LiveTalkVAE,
    Reference,
)
from .tiny_decoder import TINY_DECODER_TOOLTIP, LiveTalkTinyDecoder

MAX_SEED = 0xFFFFFFFFFFFFFFFF


def latent_preview(block: torch.Tensor) -> tuple[str, Image.Image, int]:
    """A progress-bar preview of a block's last latent frame, through ComfyUI's linear Wan2.1
    latent->RGB approximation (no VAE), upscaled 8x to roughly the video size."""
    fmt = comfy.latent_formats.Wan21()
    factors = torch.tensor(fmt.latent_rgb_factors, dtype=torch.float32)
    bias = torch.tensor(fmt.latent_rgb_factors_bias, dtype=torch.float32)
    latent = block[0, :, -1].float().cpu()  # [16, h, w]
    rgb = torch.einsum("chw,cr->hwr", latent, factors) + bias
    pixels = ((rgb + 1) * 127.5).clamp(0, 255).to(torch.uint8).numpy()
    image = Image.fromarray(pixels).resize((8 * pixels.shape[1], 8 * pixels.shape[0]), Image.BILINEAR)
    return at_own_size(image)


def frame_preview(frame: torch.Tensor) -> tuple[str, Image.Image, int]:
    """A progress-bar preview of one decoded uint8 frame ``[H, W, 3]``."""
    return at_own_size(Image.fromarray(frame.numpy()))


def at_own_size(image: Image.Image) -> tuple[str, Image.Image, int]:
    """A preview sent at the video's size: ComfyUI fits previews into a square of the size given here
    (enlarging smaller ones; --preview-size by default), and the front end labels a preview with its
    pixel size, so a 128x128 video would read "512 x 512"."""
    return ("JPEG", image, max(image.size))


def default_cache() -> CachePolicy:
    """The KV cache the sampler's widgets default to: the default family's (upstream LiveTalk's)."""
    return default_family().default_cache_policy


def prefill_prompts(prompt: str) -> str:
    """Where the families that prefill the reference under an idle prompt name their ``prompt``
    ("idle_prompt" / "talking_prompt"): "<family> (upstream: '<prompt>')", for the tooltips."""
    return ", ".join(f"{f.name} (upstream: '{getattr(f, prompt)}')" for f in FAMILIES if f.idle_prompt is not None)


class LiveTalkCausalDiTSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        default, cache = default_family(), default_cache()
        return io.Schema(
            node_id="LiveTalkCausalDiTSampler",
            display_name="Causal DiT Sampler",
            category=CATEGORY,
            description="Generates the video latents block by block, attending to earlier blocks through a "
            "KV cache (LiveTalk 1.3B: 3 latent frames per block; RealVideo 14B: 2). One progress step per block.",
            inputs=[
                LiveTalkModel.Input("model", tooltip="The model from Load LiveTalk Model."),
                io.Conditioning.Input("conditioning", tooltip="The prompt, from CLIPTextEncode with a CLIPLoader "
                                      "of type 'wan' (umt5_xxl). It is the talking prompt for "
                                      f"{prefill_prompts('talking_prompt')}."),
                Reference.Input("reference", tooltip="The reference latent from Encode Reference (VAE); it sets "
                                "the video size."),
                AudioEmbeds.Input("audio_embeds", tooltip="From Encode Audio (wav2vec2); it sets the video length."),
                io.Int.Input("seed", default=0, min=0, max=MAX_SEED, control_after_generate=True,
                             tooltip="Seed of the sampling noise; the same seed gives the same video."),
                io.Int.Input("steps", default=default.default_steps, min=1, max=50,
                             tooltip=f"Denoising steps per block. {default.name} is distilled for "
                             f"{default.default_steps}. "
                             "RealVideo 14B takes 2 or 4: 4 is upstream's default; 2 needs 3 DiT forwards per block "
                             "instead of 5."),
                io.Int.Input("sink_frames", default=cache.sink_frames, min=0, max=1024,
                             tooltip="LiveTalk 1.3B: latent frames at the start of the video that stay in the KV "
                             f"cache for the whole video (identity anchors; upstream: {cache.sink_frames}). Must be "
                             "below window_frames. Ignored by RealVideo 14B, whose cache is fixed (the reference and "
                             "the previous block)."),
                io.Int.Input("window_frames", default=cache.window_frames, min=2, max=1024,
                             tooltip="LiveTalk 1.3B: latent frames each block attends to, sink frames included "
                             f"(upstream: {cache.window_frames}). Memory grows with it. Ignored by RealVideo 14B."),
                io.Conditioning.Input("idle_conditioning", optional=True,
                                      tooltip="The idle prompt the reference is prefilled with, for "
                                      f"{prefill_prompts('idle_prompt')}, from a second CLIPTextEncode. Not "
                                      "connected: the talking prompt is used for the prefill too. LiveTalk 1.3B "
                                      "ignores it."),
            ],
            outputs=[LatentBlocks.Output("latent_blocks", display_name="latent_blocks",
                                         tooltip="The clean latent blocks, for Decode Blocks.")],
        )

    @staticmethod
    def check_cache_frames(sink_frames: int, window_frames: int) -> None:
        """The sink must leave room for the rolling frames. Checked when the node runs, not in
        validate_inputs: ComfyUI reports a validate_inputs failure once for each input the method
        takes, so this one problem would show twice (the widgets' own min/max are checked when queued)."""
        if not 0 <= sink_frames < window_frames:
            raise InputError(f"sink_frames ({sink_frames}) must be below window_frames ({window_frames}); "
                             f"upstream uses {default_cache().sink_frames} and {default_cache().window_frames}.")

    @classmethod
    @out_of_memory_advice
    def execute(cls, model: Managed, conditioning, reference: torch.Tensor, audio_embeds, seed: int, steps: int,
                sink_frames: int, window_frames: int, idle_conditioning=None) -> io.NodeOutput:
        cls.check_cache_frames(sink_frames, window_frames)
        family = model.family
        if not isinstance(audio_embeds, family.conditioning_type):
            raise InputError(
                f"The audio_embeds were made for another model family than this {family.name} model. "
                "Feed Encode Audio (wav2vec2) the same model as the sampler."
            )
        sampler = family.sample_blocks(
            on_device(model),
            conditioning=conditioning,
            idle_conditioning=idle_conditioning,
            reference=reference,
            audio=audio_embeds,
            seed=seed,
            steps=steps,
            cache_policy=CachePolicy(window_frames=window_frames, sink_frames=sink_frames),
            on_step=_between_forwards,
            workspace=kept_workspace(model),
        )
        num_blocks = audio_embeds.num_blocks
        progress = comfy.utils.ProgressBar(num_blocks)
        blocks = []
        try:
            with contextlib.closing(sampler):
                for index, block in enumerate(sampler):
                    blocks.append(block.to(mm.intermediate_device(), torch.float32))
                    progress.update_absolute(index + 1, num_blocks, latent_preview(blocks[-1]))
        finally:
            keep_if_worth_it(model)
        return io.NodeOutput(LatentBlockList(blocks=blocks, num_video_frames=audio_embeds.num_video_frames))


def _between_forwards(block: int, step: int, x0: torch.Tensor) -> None:
    mm.throw_exception_if_processing_interrupted()


class LiveTalkDecodeBlocks(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LiveTalkDecodeBlocks",
            display_name="Decode Blocks",
            category=CATEGORY,
            description="Decodes the latent blocks (of either family) one after another with the streaming VAE "
            "decoder and trims the video to the audio length. Finish with CreateVideo (same audio, fps from "
            "here) and SaveVideo.",
            inputs=[
                LiveTalkVAE.Input("vae", tooltip="The VAE from Load LiveTalk Model."),
                LatentBlocks.Input("latent_blocks", tooltip="From Causal DiT Sampler."),
                LiveTalkTinyDecoder.Input("tiny_decoder", optional=True, tooltip=TINY_DECODER_TOOLTIP),
            ],
            outputs=[
                io.Image.Output("frames", display_name="frames", tooltip="The video frames as an IMAGE batch."),
                io.Float.Output("fps", display_name="fps",
                                tooltip=f"The frame rate the model generates at ({VIDEO_FPS})."),
            ],
        )

    @classmethod
    @out_of_memory_advice
    def execute(cls, vae: Managed, latent_blocks: LatentBlockList,
                tiny_decoder: Managed | None = None) -> io.NodeOutput:
        # uint8 per block keeps memory at a quarter until the single float copy below.
        chunks = list(decoded_blocks(vae, latent_blocks, tiny_decoder))
        images = torch.cat(chunks).to(mm.intermediate_device(), torch.float32).div_(255.0)
        return io.NodeOutput(images, float(VIDEO_FPS))


def decoded_blocks(vae: Managed, latent_blocks: LatentBlockList,
                   tiny_decoder: Managed | None = None) -> Iterator[torch.Tensor]:
    """The video as uint8 frames ``[T, H, W, 3]`` on the CPU, one block at a time, trimmed to the
    audio length, decoded by ``tiny_decoder`` when one is given, else by the VAE. Advances the
    progress bar with a preview per block and checks for an interrupt before each one."""
    model = on_device(tiny_decoder if tiny_decoder is not None else vae)
    decoder = model.stream_decoder()
    total = latent_blocks.num_video_frames
    progress = comfy.utils.ProgressBar(len(latent_blocks.blocks))
    kept = 0
    for index, block in enumerate(latent_blocks.blocks):
        mm.throw_exception_if_processing_interrupted()
        frames = frames_to_uint8(decoder.decode(block.to(model.device, model.dtype)))[: total - kept].cpu()
        kept += frames.shape[0]
        if frames.shape[0]:
            progress.update_absolute(index + 1, len(latent_blocks.blocks), frame_preview(frames[-1]))
            yield frames
        if kept >= total:
            break
