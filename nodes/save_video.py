"""LiveTalkDecodeToVideoFile: latent blocks straight to an mp4 in ComfyUI's output folder.

DecodeBlocks hands the whole video to the next node as one float32 IMAGE batch (about 3 MB per
512x512 frame, 30 GB for ten minutes). This node decodes a block, encodes its frames (and the
audio up to the same time) into the file and lets them go, so its memory stays flat however long
the video is. An interrupt between blocks, or a failure, keeps a playable mp4 of the blocks
written so far.
"""

from __future__ import annotations

import json
import os

import folder_paths
from comfy.cli_args import args
from comfy_api.latest import InputImpl, io, ui

from ..livetalk_core.errors import InputError
from ..livetalk_core.media.audio_file import prepare_waveform
from ..livetalk_core.media.timing import VIDEO_FPS
from ..livetalk_core.media.video_io import OUTPUT_AUDIO_RATE, VideoWriter
from .comfy_models import Managed, out_of_memory_advice
from .pack_types import CATEGORY, LatentBlockList, LatentBlocks, LiveTalkVAE
from .sampling import decoded_blocks
from .tiny_decoder import TINY_DECODER_TOOLTIP, LiveTalkTinyDecoder


class LiveTalkDecodeToVideoFile(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LiveTalkDecodeToVideoFile",
            display_name="Decode Blocks to Video File",
            category=CATEGORY,
            description="Decodes the latent blocks one after another and writes each block's frames straight "
            "into an mp4 (H.264, with the audio as AAC) in the output folder, so memory stays flat however long "
            "the video is. Use it instead of Decode Blocks -> CreateVideo -> SaveVideo for long videos. An "
            "interrupt keeps a playable mp4 of the blocks decoded so far.",
            inputs=[
                LiveTalkVAE.Input("vae", tooltip="The VAE from Load LiveTalk Model."),
                LatentBlocks.Input("latent_blocks", tooltip="From Causal DiT Sampler."),
                io.String.Input("filename_prefix", default="LiveTalk/video",
                                tooltip="Where to save in the output folder: subfolders and the start of the file "
                                "name. It may hold %width%, %height%, %year%, %month%, %day% and the like."),
                io.Audio.Input("audio", optional=True,
                               tooltip="The speech to put in the video, normally the clip given to "
                               "Encode Audio (wav2vec2). Not connected: a silent video."),
                LiveTalkTinyDecoder.Input("tiny_decoder", optional=True, tooltip=TINY_DECODER_TOOLTIP),
            ],
            outputs=[io.Video.Output("video", display_name="video",
                                     tooltip="The saved mp4, for nodes that take a VIDEO.")],
            hidden=[io.Hidden.prompt, io.Hidden.extra_pnginfo],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, filename_prefix: str) -> bool | str:
        """A prefix that leaves the output folder is refused when the prompt is queued, not after the
        whole video was generated."""
        try:
            check_filename_prefix(filename_prefix)
        except InputError as exc:
            return str(exc)
        return True

    @classmethod
    @out_of_memory_advice
    def execute(cls, vae: Managed, latent_blocks: LatentBlockList, filename_prefix: str,
                audio: dict | None = None, tiny_decoder: Managed | None = None) -> io.NodeOutput:
        check_filename_prefix(filename_prefix)
        factor = vae.engine.config.spatial_factor
        height, width = (factor * side for side in latent_blocks.blocks[0].shape[-2:])
        folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(
            filename_prefix, folder_paths.get_output_directory(), width, height)
        # The writer resamples to its output rate anyway; converting here reuses the audio checks
        # of EncodeAudioWav2Vec (one clip, not empty, finite samples).
        waveform = None if audio is None else prepare_waveform(audio["waveform"], audio["sample_rate"],
                                                                target_rate=OUTPUT_AUDIO_RATE)
        file = reserve_new_file(folder, name, counter)
        path = os.path.join(folder, file)
        writer = None
        try:
            with VideoWriter(path, VIDEO_FPS, audio=waveform, audio_sample_rate=OUTPUT_AUDIO_RATE,
                             metadata=cls._workflow_metadata()) as writer:
                for frames in decoded_blocks(vae, latent_blocks, tiny_decoder):
                    writer.write(frames)
        finally:
            if writer is None or writer.saved_path is None:
                os.remove(path)  # the empty reservation: nothing was saved under its name
        preview = ui.PreviewVideo([ui.SavedResult(file, subfolder, io.FolderType.output)])
        return io.NodeOutput(InputImpl.VideoFromFile(path), ui=preview)

    @classmethod
    def _workflow_metadata(cls) -> dict[str, str]:
        """The prompt and workflow, as SaveVideo stores them, so dropping the mp4 on ComfyUI reopens the graph."""
        if args.disable_metadata:
            return {}
        metadata = dict(cls.hidden.extra_pnginfo or {})
        if cls.hidden.prompt is not None:
            metadata["prompt"] = cls.hidden.prompt
        return {key: json.dumps(value) for key, value in metadata.items()}


def check_filename_prefix(filename_prefix: str) -> None:
    """Raise an InputError unless ``filename_prefix`` names a file inside ComfyUI's output folder
    (ComfyUI's own check would only fail after the video was generated, with an internal message)."""
    output = os.path.abspath(folder_paths.get_output_directory())
    target = os.path.abspath(os.path.join(output, os.path.normpath(filename_prefix)))
    try:
        inside = os.path.commonpath((output, target)) == output and target != output
    except ValueError:  # another drive on Windows
        inside = False
    if not inside:
        raise InputError(
            f"filename_prefix '{filename_prefix}' does not name a file inside ComfyUI's output folder. Give a "
            "file name, with subfolders if you like, e.g. LiveTalk/video; videos are only written there, "
            "under a new name."
        )


def reserve_new_file(folder: str, name: str, counter: int) -> str:
    """Create ``<name>_<counter>_.mp4`` in ``folder`` as a new, empty file (the next free counter if that
    name exists, whatever made it) and return its name: a video is only ever written over a file this
    node has just created, never over an input or an earlier result."""
    while True:
        file = f"{name}_{counter:05}_.mp4"
        try:
            with open(os.path.join(folder, file), "xb"):
                return file
        except FileExistsError:
            counter += 1
