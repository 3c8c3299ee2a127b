"""LoadLiveTalkModel: the DiT, the VAE and the audio encoder, checked against each other.

A ``<file> (download)`` choice is fetched from the Hugging Face hub into its ComfyUI folder when the
node runs (not when the prompt is validated), then checked like any file. A RealVideo partial
fine-tune (a ``model.pt`` with only some of the DiT's tensors) is applied over ``base_model_name``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import comfy.model_management as mm
import torch
from comfy_api.latest import io

from ..livetalk_core.errors import InputError, LiveTalkError, MissingWeightsError
from ..livetalk_core.families import SUPPORTED_MODELS, ModelFamily, audio_encoder_hints, detect_family
from ..livetalk_core.family_base import COMPLETE, PARTIAL
from ..livetalk_core.media.checkpoint import PRECISIONS
from ..livetalk_core.media.vae import load_vae
from ..livetalk_core.media.wav2vec2 import load_audio_encoder
from ..livetalk_core.media.weights import WeightFile, fetch_files
from ..livetalk_core.options import RuntimeOptions
from ..livetalk_core.wan.attention import ATTENTION_BACKENDS
from ..livetalk_core.wan.fp8_linear import fp8_matmul_supported
from . import comfy_models as cm
from .model_files import audio_encoder_size, check_audio_encoder_fits, check_vae_fits, checkpoint_shapes, tensor_shapes
from .multi_gpu import check_gpus, load_on_workers, stop_workers
from .pack_types import CATEGORY, LiveTalkAudioEncoder, LiveTalkModel, LiveTalkVAE

log = logging.getLogger(__name__)

NO_BASE = "none"
S2V_BASE_FILE = "wan2.2_s2v_14B_bf16.safetensors"
DIT_FOLDERS = "models/livetalk or models/diffusion_models"
RETRY_DOWNLOAD = "(or queue the prompt again with network access and without HF_HUB_OFFLINE to download them)"


class _Files:
    """The loader's file choices: where each file is, or where its ``(download)`` choice will put it."""

    def __init__(self, model_name: str, vae_name: str, audio_encoder_name: str) -> None:
        self.downloads: list[tuple[WeightFile, Path]] = []
        self.model = self.locate("model", model_name, cm.dit_path, DIT_FOLDERS)
        self.vae = self.locate("VAE", vae_name, cm.vae_path, "models/vae")
        self.audio_encoder = self.locate(
            "audio encoder", audio_encoder_name, cm.audio_encoder_path, "models/audio_encoders"
        )

    def locate(self, kind: str, name: str, find: Callable[[str], str | None], folders: str) -> Path:
        path = find(name)
        if path is not None:
            return Path(path)
        download = cm.download_target(name)
        if download is None:
            offer = name + cm.DOWNLOAD_SUFFIX
            advice = (f"Pick '{offer}' to download it, or put the file there and refresh."
                      if cm.download_target(offer) else "Put the file there and refresh, or pick another.")
            raise MissingWeightsError(f"The {kind} '{name}' was not found in {folders}. {advice}")
        self.downloads.append(download)
        return download[1]

    def on_disk(self, path: Path) -> bool:
        return all(path != target for _, target in self.downloads)


def _check(
    files: _Files, model_name: str, audio_encoder_name: str, base_model_name: str
) -> tuple[ModelFamily | None, Path | None]:
    """Catch a wrong file, a mismatched pair or a partial model without its base from the headers of
    the files on disk; files still to be downloaded are checked once they are there.

    Returns the model's family (None while it is not downloaded) and the base checkpoint to apply it
    over (None for a complete model: ``base_model_name`` is then ignored). Safetensors are read from
    their headers; pickles (RealVideo's model.pt) are memory-mapped, their tensors are not read.
    """
    if files.on_disk(files.vae):
        vae_shapes = tensor_shapes(files.vae)
        if vae_shapes is not None:
            check_vae_fits(vae_shapes, files.vae.name)
    if not files.on_disk(files.model):
        return None, None
    dit_shapes = checkpoint_shapes(files.model)
    family = detect_family(dit_shapes, files.model)
    base = None
    if family.checkpoint_kind(dit_shapes) == PARTIAL:
        if base_model_name == NO_BASE:
            raise InputError(
                f"{model_name} is a partial RealVideo fine-tune: it holds only some of the DiT's tensors. Set "
                f"base_model_name to the Wan2.2-S2V-14B checkpoint it was tuned from ({S2V_BASE_FILE} from "
                "Comfy-Org/Wan_2.2_ComfyUI_Repackaged, or its fp8_scaled version) and it is applied over it."
            )
        base = files.locate("base model", base_model_name, cm.dit_path, DIT_FOLDERS)
        if files.on_disk(base):
            base_shapes = checkpoint_shapes(base)
            if family.checkpoint_kind(base_shapes) != COMPLETE:
                raise InputError(
                    f"The base model {base_model_name} is not a complete Wan2.2-S2V-14B DiT. Pick {S2V_BASE_FILE} "
                    "(or its fp8_scaled version) as base_model_name."
                )
            dit_shapes = {**base_shapes, **dit_shapes}
        else:
            dit_shapes = None
    if dit_shapes is not None and files.on_disk(files.audio_encoder):
        encoder = audio_encoder_size(files.audio_encoder)
        if encoder is not None:
            check_audio_encoder_fits(family, dit_shapes, encoder, audio_encoder_name)
    return family, base


def check_inputs(model_name: str, vae_name: str, audio_encoder_name: str, precision: str = "bf16",
                 base_model_name: str = NO_BASE, fp8_matmul: bool = False, gpus: int = 1,
                 options: RuntimeOptions | None = None) -> tuple[_Files, ModelFamily | None, Path | None]:
    """Catch a missing or wrong file, a mismatched pair, GPUs that are not there or options that do not
    go together, from the files' headers, before anything is fetched or loaded: one error, whose
    message names the input to change. ``options``: the loader's runtime options, validated already
    (:func:`runtime_options`); None: ``precision`` and ``fp8_matmul`` are checked here. Returns the
    files, the model's family and the base (see :func:`_check`)."""
    if options is None:
        RuntimeOptions(precision=precision, fp8_matmul=fp8_matmul).validate()
    files = _Files(model_name, vae_name, audio_encoder_name)
    family, base = _check(files, model_name, audio_encoder_name, base_model_name)
    check_gpus(gpus, family, tensor_shapes(files.model) if files.on_disk(files.model) else None)
    return files, family, base


def runtime_options(precision: str, attention: str, compile: bool, cuda_graphs: bool, fp8_weights: bool,
                    fp8_matmul: bool, fp8_kv_cache: bool, gpus: int) -> RuntimeOptions:
    """The loader's inputs as the engine's runtime options, validated (once, as asked), on ComfyUI's
    devices (the first GPU for ``gpus`` > 1): ``compile`` on compiles on a GPU only; ``fp8_matmul``
    stays on only where the GPU has fp8 kernels (a warning says so otherwise)."""
    asked = RuntimeOptions(
        precision=precision, attention=attention, compile=None if compile else False, cuda_graphs=cuda_graphs,
        fp8_weights=fp8_weights, fp8_matmul=fp8_matmul, fp8_kv_cache=fp8_kv_cache,
    ).validate()
    device = mm.get_torch_device() if gpus == 1 else torch.device("cuda", 0)
    return replace(asked, fp8_matmul=fp8_matmul and fp8_matmul_supported(device), device=device,
                   vae_device=mm.vae_device())


class LoadLiveTalkModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoadLiveTalkModel",
            display_name="Load LiveTalk Model",
            category=CATEGORY,
            description="Loads a LiveTalk DiT with the VAE and the wav2vec2 audio encoder it needs. The "
            "model family (LiveTalk 1.3B or RealVideo 14B) is detected from the DiT file, and the other "
            "nodes follow it.",
            inputs=[
                io.Combo.Input("model_name", options=cm.dit_choices(),
                               tooltip="The DiT, from models/livetalk or models/diffusion_models: "
                               f"{SUPPORTED_MODELS}."),
                io.Combo.Input("vae_name", options=cm.vae_choices(),
                               tooltip="The Wan2.1 VAE (wan_2.1_vae.safetensors or Wan2.1_VAE.pth) from models/vae."),
                io.Combo.Input("audio_encoder_name", options=cm.audio_encoder_choices(),
                               tooltip=f"The audio encoder from models/audio_encoders: {audio_encoder_hints()}."),
                io.Combo.Input("precision", options=list(PRECISIONS), default="bf16",
                               tooltip="Weight and compute precision of the models. bf16 is what LiveTalk and "
                               "RealVideo were run in upstream; fp32 is for CPUs and debugging. RealVideo's "
                               "audio encoder always runs in fp32, as upstream; fp8_scaled DiT files are "
                               "expanded to this precision unless fp8_weights is on."),
                io.Combo.Input("attention", options=list(ATTENTION_BACKENDS), default="sdpa",
                               tooltip="Attention kernel of the DiT. sdpa is PyTorch's; flash and sage need the "
                               "flash_attn / sageattention packages and fall back to sdpa without them; math "
                               "is a slow reference."),
                io.Boolean.Input("compile", default=True, optional=True,
                                 tooltip="torch.compile the DiT's blocks and the VAE's conv steps on a GPU (faster "
                                 "after a few seconds of compiling on the first run). Falls back to eager by itself "
                                 "if compiling is not possible; ignored on the CPU."),
                io.Combo.Input("base_model_name", options=[NO_BASE, *cm.base_choices()], default=NO_BASE, optional=True,
                               tooltip="RealVideo 14B only: the Wan2.2-S2V-14B checkpoint a partial fine-tune (a "
                               "model.pt holding only some of the DiT's tensors) is applied over, "
                               f"e.g. {S2V_BASE_FILE}. "
                               "Lists the complete Wan2.2-S2V DiTs of models/livetalk and models/diffusion_models "
                               "(safetensors by their tensors, other files when their name holds 's2v'). "
                               "Ignored, and not read, for a complete model file and for LiveTalk 1.3B."),
                io.Boolean.Input("fp8_weights", default=False, optional=True,
                                 tooltip="RealVideo 14B only: keep the DiT's block weights in fp8 (one scale per "
                                 "tensor, turned back into the chosen precision one layer at a time): about 23 GB "
                                 "of GPU memory instead of 39 at the cost of fp8 rounding (a 24 GB GPU needs "
                                 "fp8_kv_cache too). An fp8_scaled file keeps "
                                 "its own fp8 values; others are rounded to fp8 when loaded. "
                                 "Ignored for LiveTalk 1.3B."),
                io.Boolean.Input("fp8_matmul", default=False, optional=True,
                                 tooltip="Run the DiT's block Linear layers as fp8 x fp8 matmuls (weights kept in fp8 "
                                 "with one scale per output channel, inputs scaled per row): faster on Ada/Hopper "
                                 "GPUs (mostly for RealVideo 14B), outputs move by fp8 rounding. Needs bf16 "
                                 "precision; on older GPUs it logs a warning and runs bf16."),
                io.Int.Input("gpus", default=1, min=1, max=16, optional=True,
                             tooltip="RealVideo 14B only: run the DiT sequence parallel on the first N CUDA GPUs "
                             "(1, 2, 4 or 8; the same video as one GPU, faster). Above 1 the DiT is not loaded in "
                             "ComfyUI's process: one worker process per GPU loads it and stays loaded between "
                             "prompts until a loader setting changes or ComfyUI unloads models. The VAE and the "
                             "audio encoder stay on ComfyUI's GPU."),
                # New inputs go last: UI workflows saved before them list widget values by position.
                io.Boolean.Input("fp8_kv_cache", default=False, optional=True,
                                 tooltip="Store the sampler's KV cache in fp8 (one scale per token and head): half "
                                 "its GPU memory (LiveTalk 1.3B at 512x512: 1.3 GiB less; RealVideo 14B: 2 GB less), "
                                 "outputs move by fp8 rounding. With fp8_matmul, LiveTalk 1.3B fits in about 6 GiB."),
                io.Boolean.Input("cuda_graphs", default=True, optional=True,
                                 tooltip="With compile: replay the DiT's forwards as CUDA graphs once the KV cache's "
                                 "layout repeats (from about the 8th block; with 4 or more gpus, graphs between the "
                                 "GPUs' exchanges; not used on 2, where they do not pay). The same video bit for bit; "
                                 "the DiT no longer waits on a slow or busy CPU. "
                                 "Off: every kernel is launched one by one. Not used with fp8_kv_cache."),
            ],
            outputs=[
                LiveTalkModel.Output("model", display_name="model",
                                     tooltip="The DiT, managed by ComfyUI's model memory management."),
                LiveTalkVAE.Output("vae", display_name="vae",
                                   tooltip="The Wan2.1 VAE with LiveTalk's latent normalisation."),
                LiveTalkAudioEncoder.Output("audio_encoder", display_name="audio_encoder",
                                            tooltip="The wav2vec2 encoder."),
            ],
        )

    @classmethod
    def validate_inputs(cls, gpus: int = 1) -> bool | str:
        """Only what concerns one input alone and needs no file: ComfyUI reports a validation failure
        once for each input named here, so a check that reads several inputs would show one problem
        several times. Missing files are refused by ComfyUI's own list check, on their input; the
        checks that read the files run first thing in :meth:`execute` (:func:`check_inputs`)."""
        try:
            check_gpus(gpus, None)
        except LiveTalkError as exc:
            return str(exc)
        return True

    @classmethod
    def execute(
        cls, model_name: str, vae_name: str, audio_encoder_name: str, precision: str, attention: str,
        compile: bool = True, base_model_name: str = NO_BASE, fp8_weights: bool = False, fp8_matmul: bool = False,
        fp8_kv_cache: bool = False, gpus: int = 1, cuda_graphs: bool = True,
    ) -> io.NodeOutput:
        runtime = runtime_options(precision, attention, compile, cuda_graphs, fp8_weights, fp8_matmul, fp8_kv_cache,
                                  gpus)
        files, family, base = check_inputs(model_name, vae_name, audio_encoder_name, base_model_name=base_model_name,
                                           gpus=gpus, options=runtime)
        if files.downloads:
            fetch_files(files.downloads, retry=RETRY_DOWNLOAD)
            # now on disk: checked in full
            files, family, base = check_inputs(model_name, vae_name, audio_encoder_name,
                                               base_model_name=base_model_name, gpus=gpus, options=runtime)
        model_path, vae_path, encoder_path = str(files.model), str(files.vae), str(files.audio_encoder)
        dtype = runtime.dtype
        if base is None and base_model_name != NO_BASE:
            log.info("LiveTalk: base_model_name %s is not used: %s is a complete model", base_model_name, model_name)
        if fp8_weights and not family.fp8_and_partial_files:
            log.info("LiveTalk: fp8_weights is for RealVideo 14B; the %s DiT is loaded in %s", family.name, precision)
        options = ({"base": base, "fp8_weights": runtime.fp8_weights, "fp8_matmul": runtime.fp8_matmul}
                   if family.fp8_and_partial_files else {})

        if gpus > 1:
            check_gpus(gpus, family)  # a pickled model's family is only known now
            model = load_on_workers(family, gpus, model_path, runtime, {"base": base})
        else:
            stop_workers()  # their GPU memory is needed for the DiT loaded here
            offload = mm.unet_offload_device()
            dit = family.load(model_path, dtype, offload, **options)
            runtime.apply(dit)
            model = cm.Managed(dit, dit, mm.get_torch_device(), offload, family=family)

        # The VAE and the encoder carry the family too: their nodes prepare inputs the family's way.
        vae_module = load_vae(vae_path, dtype, mm.vae_offload_device())
        runtime.apply(None, vae_module)
        vae = cm.Managed(vae_module, vae_module, mm.vae_device(), mm.vae_offload_device(), family=family)

        encoder_dtype = family.audio_encoder_dtype or dtype
        encoder = load_audio_encoder(encoder_path, encoder_dtype, mm.text_encoder_offload_device())
        audio_encoder = cm.Managed(encoder, encoder.model, mm.text_encoder_device(), mm.text_encoder_offload_device(),
                                   family=family)
        return io.NodeOutput(model, vae, audio_encoder)
