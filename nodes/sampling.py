"""LiveTalkCausalDiTSampler and LiveTalkDecodeBlocks: latent blocks with a KV cache, then frames.

Both advance ComfyUI's progress bar once per block with a preview, and check for an interrupt between
model forwards. Closing the sampler generator on an interrupt frees its KV cache at once.
"""

from __future__ import annotations

import contextlib

import comfy.latent_formats
import comfy.model_management as mm
import comfy.utils
import torch
from comfy.cli_args import args
from comfy_api.latest import io
from PIL import Image

from ..livetalk_core.audio import VIDEO_FPS
from ..livetalk_core.errors import InputError
from ..livetalk_core.kv_cache import CachePolicy
from ..livetalk_core.noise import SeededNoise
from ..livetalk_core.sampler import LIVETALK_CACHE, sample_livetalk
from ..livetalk_core.scheduler import LIVETALK_STEPS, livetalk_schedule
from ..livetalk_core.vae import frames_to_uint8
from .comfy_models import on_device
from .model_files import LIVETALK_13B, text_context
from .pack_types import CATEGORY, AudioEmbeds, LatentBlockList, LatentBlocks, LiveTalkModel, LiveTalkVAE, Reference

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
    return ("JPEG", image, args.preview_size)


def frame_preview(frame: torch.Tensor) -> tuple[str, Image.Image, int]:
    """A progress-bar preview of one decoded uint8 frame ``[H, W, 3]``."""
    return ("JPEG", Image.fromarray(frame.numpy()), args.preview_size)


class LiveTalkCausalDiTSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LiveTalkCausalDiTSampler",
            display_name="CausalDiTSampler",
            category=CATEGORY,
            description="Generates the video latents block by block (3 latent frames each), attending to "
            "earlier blocks through a KV cache. One progress step per block.",
            inputs=[
                LiveTalkModel.Input("model", tooltip="The LiveTalk model from LoadLiveTalkModel."),
                io.Conditioning.Input("conditioning", tooltip="The prompt, from CLIPTextEncode with a CLIPLoader "
                                      "of type 'wan' (umt5_xxl)."),
                Reference.Input("reference", tooltip="The reference latent from EncodeReferenceVAE; it sets "
                                "the video size."),
                AudioEmbeds.Input("audio_embeds", tooltip="From EncodeAudioWav2Vec; it sets the video length."),
                io.Int.Input("seed", default=0, min=0, max=MAX_SEED, control_after_generate=True,
                             tooltip="Seed of the sampling noise; the same seed gives the same video."),
                io.Int.Input("steps", default=LIVETALK_STEPS, min=1, max=50,
                             tooltip=f"Denoising steps per block. LiveTalk is distilled for {LIVETALK_STEPS}."),
                io.Int.Input("sink_frames", default=LIVETALK_CACHE.sink_frames, min=0, max=1024,
                             tooltip="Latent frames at the start of the video that stay in the KV cache for "
                             "the whole video (identity anchors; upstream: 9). Must be below window_frames."),
                io.Int.Input("window_frames", default=LIVETALK_CACHE.window_frames, min=2, max=1024,
                             tooltip="Latent frames each block attends to, sink frames included (upstream: 15). "
                             "Memory grows with it."),
            ],
            outputs=[LatentBlocks.Output("latent_blocks", display_name="latent_blocks",
                                         tooltip="The clean latent blocks, for Decode Blocks.")],
        )

    @classmethod
    def validate_inputs(cls, sink_frames: int, window_frames: int) -> bool | str:
        if not 0 <= sink_frames < window_frames:
            return (f"sink_frames ({sink_frames}) must be below window_frames ({window_frames}); "
                    f"upstream uses {LIVETALK_CACHE.sink_frames} and {LIVETALK_CACHE.window_frames}.")
        if window_frames > 1024:
            return f"window_frames ({window_frames}) is above the maximum of 1024."
        return True

    @classmethod
    def execute(cls, model, conditioning, reference: torch.Tensor, audio_embeds, seed: int, steps: int,
                sink_frames: int, window_frames: int) -> io.NodeOutput:
        if model.family is not LIVETALK_13B:
            raise InputError(f"This sampler cannot run {model.family.name} models yet; pick a LiveTalk 1.3B model.")
        dit = on_device(model)
        context = text_context(conditioning, dit.livetalk_config.core.text_dim)
        num_blocks = audio_embeds.num_blocks
        progress = comfy.utils.ProgressBar(num_blocks)

        def between_forwards(block: int, step: int, x0: torch.Tensor) -> None:
            mm.throw_exception_if_processing_interrupted()

        sampler = sample_livetalk(
            dit,
            ref_latent=reference,
            audio_embeds=audio_embeds.embeds,
            context=context,
            num_blocks=num_blocks,
            noise=SeededNoise(seed),
            schedule=livetalk_schedule(steps),
            cache_policy=CachePolicy(window_frames=window_frames, sink_frames=sink_frames),
            on_step=between_forwards,
        )
        blocks = []
        with contextlib.closing(sampler):
            for index, block in enumerate(sampler):
                blocks.append(block.to(mm.intermediate_device(), torch.float32))
                progress.update_absolute(index + 1, num_blocks, latent_preview(blocks[-1]))
        return io.NodeOutput(LatentBlockList(blocks=blocks, num_video_frames=audio_embeds.num_video_frames))


class LiveTalkDecodeBlocks(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LiveTalkDecodeBlocks",
            display_name="DecodeBlocks",
            category=CATEGORY,
            description="Decodes the latent blocks one after another with the streaming VAE decoder and trims "
            "the video to the audio length. Finish with CreateVideo (same audio, fps from here) and SaveVideo.",
            inputs=[
                LiveTalkVAE.Input("vae", tooltip="The VAE from LoadLiveTalkModel."),
                LatentBlocks.Input("latent_blocks", tooltip="From Causal DiT Sampler."),
            ],
            outputs=[
                io.Image.Output("frames", display_name="frames", tooltip="The video frames as an IMAGE batch."),
                io.Float.Output("fps", display_name="fps", tooltip=f"The frame rate the model generates at ({VIDEO_FPS})."),
            ],
        )

    @classmethod
    def execute(cls, vae, latent_blocks: LatentBlockList) -> io.NodeOutput:
        model = on_device(vae)
        decoder = model.stream_decoder()
        total = latent_blocks.num_video_frames
        progress = comfy.utils.ProgressBar(len(latent_blocks.blocks))
        chunks: list[torch.Tensor] = []
        kept = 0
        for index, block in enumerate(latent_blocks.blocks):
            mm.throw_exception_if_processing_interrupted()
            frames = frames_to_uint8(decoder.decode(block.to(model.device, model.dtype)))[: total - kept].cpu()
            kept += frames.shape[0]
            if frames.shape[0]:
                # uint8 per block keeps memory at a quarter until the single float copy below.
                chunks.append(frames)
                progress.update_absolute(index + 1, len(latent_blocks.blocks), frame_preview(frames[-1]))
            if kept >= total:
                break
        images = torch.cat(chunks).to(mm.intermediate_device(), torch.float32).div_(255.0)
        return io.NodeOutput(images, float(VIDEO_FPS))
