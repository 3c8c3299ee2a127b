"""The command line for every model family: ``python -m livetalk_core`` (or ``livetalk``).

``python -m livetalk_core --image face.jpg --audio speech.wav --output out.mp4`` renders LiveTalk
1.3B with the release weights (fetched into ``--models-dir``); ``--dit FILE`` runs the family that
file belongs to (read from its header), ``--model NAME`` picks a family when no file is given
(``--smoke --model realvideo`` is RealVideo 14B's smoke run). ``torchrun --nproc_per_node=N -m
livetalk_core ...`` samples a family that supports it sequence parallel over N GPUs: every rank
loads the DiT, rank 0 prepares the inputs, decodes and writes the video.

Without ``--image``/``--audio`` it uses the shipped portrait and speech clip. ``--smoke`` runs the
same path with the family's tiny random weights on the CPU (no download, seconds) to check an
install or a launch. Every argument is checked (and the image and audio read) before any model
loads. The video is written while it is generated; Ctrl-C keeps a playable mp4 of what exists so
far and says so in one line (exit status 130).

Everything that differs between families comes from the family (:class:`~.family_base.ModelFamily`):
its flags, files, prompts, steps, audio, reference and sampler; this module never asks which one it is.
A first word found in :data:`SUBCOMMANDS` runs that module's ``main`` instead (``live``, ``live-client``).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import importlib.util
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .cli_checks import check_duration, check_image_size, check_output, parse_size, pick_device
from .cli_workers import check_gpus, dit_on_workers, worker_devices
from .errors import InputError, LiveTalkError, out_of_memory_help
from .families import FAMILIES, ModelFamily, detect_family, sequence_parallel_families
from .family_base import fit_waveform
from .interrupts import INTERRUPTED_EXIT_CODE, raise_if_interrupted, ready, summary
from .media.checkpoint import PRECISIONS, checkpoint_shapes
from .media.image import check_target_size
from .media.samples import SAMPLE_AUDIO, SAMPLE_IMAGE
from .media.taehv import DECODERS
from .media.timing import VIDEO_FPS
from .media.weights import TEXT_ENCODER_FILES, WeightFile
from .options import RuntimeOptions, cli_flag, use_expandable_segments
from .wan.attention import ATTENTION_BACKENDS

# Subcommands: the first word of the command line -> the module (relative to this package) whose
# main(argv) runs them; imported only when asked for.
SUBCOMMANDS = {"live": ".live.server", "live-client": ".live.client"}
DEFAULT_MODEL = "livetalk"  # the family --model means when neither it nor --dit is given
DEFAULT_SIZE = "512"
MODEL_ROLES = ("dit", "vae", "wav2vec2")  # the files every family loads, by WeightFile.role
PACK_LOGGERS = ("livetalk", "livetalk_core")
log = logging.getLogger("livetalk")


# -- the flags -------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """Every flag, each declared once: the shared ones here, each family's own in a group of its own
    (:meth:`~.family_base.ModelFamily.add_cli_arguments`)."""
    p = argparse.ArgumentParser(prog="livetalk", description="Lip-synced talking-avatar video from a face image and "
                                "speech, with any model family of the pack (LiveTalk 1.3B by default).",
                                epilog=f"Subcommands: {', '.join(SUBCOMMANDS)} (e.g. livetalk live --help).")
    _add_input_arguments(p.add_argument_group("inputs and output"))
    _add_model_arguments(p.add_argument_group("model and weight files"))
    _add_video_arguments(p.add_argument_group("the video"))
    _add_runtime_arguments(p.add_argument_group("how it runs"))
    p.family_flags = {}
    for family in FAMILIES:
        group = p.add_argument_group(f"{family.name} only")
        family.add_cli_arguments(group)
        p.family_flags[family] = tuple(group._group_actions)
    return p


def _add_input_arguments(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--image", default=str(SAMPLE_IMAGE),
                   help="reference face image (default: the shipped portrait)")
    g.add_argument("--audio", default=str(SAMPLE_AUDIO),
                   help="speech audio, any format/rate (default: the shipped clip)")
    g.add_argument("--output", default="livetalk.mp4",
                   help="mp4 to write (default: %(default)s; rank 0 writes it under torchrun)")
    g.add_argument("--latents-out", type=Path, default=None, help="also save the blocks' latents (safetensors)")


def _add_model_arguments(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--model", choices=[f.cli_name for f in FAMILIES], default=None,
                   help=f"the model family when no --dit is given (default: {DEFAULT_MODEL}); with --dit, the file's")
    g.add_argument("--dit", type=Path, default=None,
                   help="the DiT file (its family is read from it); default: the family's release file in --models-dir")
    g.add_argument("--base", type=Path, default=None, help="base checkpoint a partial fine-tune --dit is applied over")
    g.add_argument("--vae", type=Path, default=None, help="Wan2.1_VAE.pth (default: fetched into --models-dir)")
    g.add_argument("--tiny-decoder", type=Path, default=None,
                   help="with --decoder tiny: taew2_1.pth / .safetensors (madebyollin/taehv) or "
                   "lighttaew2_1.safetensors (lightx2v/Autoencoders); never downloaded")
    g.add_argument("--wav2vec2", type=Path, default=None, help="the audio encoder the family needs (folder or file)")
    g.add_argument("--text-encoder", type=Path, default=None, help="umT5 .pth (default: fetched into --models-dir; "
                   "used once per prompt, the embedding is cached in <models-dir>/contexts)")
    g.add_argument("--tokenizer", type=Path, default=None, help="umT5 tokenizer folder, with --text-encoder")
    g.add_argument("--models-dir", type=Path, default=None,
                   help="where weights live / are downloaded (default: ~/.cache/livetalk)")
    g.add_argument("--skip-download", action="store_true",
                   help="never download; fail with the list of files to put in place")
    g.add_argument("--smoke", action="store_true",
                   help="tiny random weights on the CPU: checks the install or the launch, makes noise (not --prompt)")


def _add_video_arguments(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--prompt", default=None, help="text prompt (default: the family's; not used by --smoke)")
    g.add_argument("--seed", type=int, default=0,
                   help="noise seed; the same seed gives the same video, on any number of GPUs")
    g.add_argument("--steps", type=int, default=None, help="denoising steps per block (default: the family's)")
    g.add_argument("--duration", type=float, default=None, help="seconds of video (default: the audio's length)")
    g.add_argument("--size", default=None,
                   help=f"output size, N or WxH, multiples of 16 (default {DEFAULT_SIZE}, the size the models were "
                   "trained at; a family that keeps the image's aspect ratio takes it as an area; --smoke: the tiny "
                   "model's)")
    g.add_argument("--max-hw", type=int, default=None,
                   help="upstream's option: 720 means 512x512 (upstream's only size); other values a square of that "
                   "size")
    g.add_argument("--fps", type=int, default=VIDEO_FPS, help="frame rate; the models generate 16 fps only")


def _add_runtime_arguments(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--precision", choices=PRECISIONS, default="bf16", help="model precision")
    g.add_argument("--device", default="auto", help="cuda, cuda:N, cpu or auto (under torchrun: each rank's GPU)")
    g.add_argument("--gpus", type=int, default=1,
                   help="run the DiT in N worker processes, one per GPU (cuda:0 ... cuda:N-1; sequence parallel, the "
                   "same video as one GPU), the VAE and audio encoder on --device: how the live command runs a "
                   "family on several GPUs (offline, torchrun works too; --smoke: N CPU processes)")
    g.add_argument("--vae-device", default=None,
                   help="run the VAE on another GPU (e.g. cuda:1), so decoding never competes with the DiT; "
                   "default: --device")
    g.add_argument("--decoder", choices=DECODERS, default="full",
                   help="full: the Wan VAE decodes the frames (default); tiny: the tiny decoder (TAEHV, "
                   "--tiny-decoder) decodes them much faster but trades quality for speed (softer frames, less "
                   "fine detail)")
    g.add_argument("--attention", default="sdpa", choices=ATTENTION_BACKENDS, help="attention kernel")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the DiT blocks and the VAE's conv steps (default: on for GPUs)")
    g.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                   help="with --compile: replay the DiT's forwards as CUDA graphs once the KV cache's layout repeats "
                   "(under torchrun from 4 GPUs, between the exchanges); the same video, the DiT no longer waits on "
                   "the host")
    g.add_argument("--fp8", action="store_true",
                   help="keep the DiT's Linear weights in fp8 (about half the weight memory; families that load so)")
    g.add_argument("--fp8-matmul", action="store_true",
                   help="run the DiT's block Linear layers as fp8 matmuls (Ada/Hopper GPUs, bf16): output moves by "
                   "fp8 rounding")
    g.add_argument("--fp8-kv-cache", action="store_true",
                   help="store the KV cache in fp8 (half its memory): output moves by fp8 rounding")


# -- checks before anything loads -----------------------------------------------------------------


@dataclass(frozen=True)
class ModelFiles:
    """The files a run loads: the DiT, VAE and audio encoder, and either the umT5 encoder and its
    tokenizer (real runs: used for prompts not cached yet) or a file of text contexts (smoke)."""

    dit: Path
    vae: Path
    wav2vec2: Path
    text_encoder: Path | None = None
    tokenizer: Path | None = None
    contexts: Path | None = None


@dataclass(frozen=True)
class RunInputs:
    """What a run needs that is checked (and read) before any model loads."""

    family: ModelFamily
    runtime: RuntimeOptions
    image: torch.Tensor
    reference_pixels: torch.Tensor  # what the VAE encodes, [1, 3, 1, h, w] on the CPU
    waveform: torch.Tensor
    output: Path
    steps: int
    prompts: tuple[str, str | None]  # talking, idle
    models_dir: Path
    files: ModelFiles | None  # None: --smoke (the family's tiny weights)
    fetch: tuple[WeightFile, ...] = field(default=())  # release files the run needs in models_dir


def check_arguments(args: argparse.Namespace, parser: argparse.ArgumentParser) -> RunInputs:
    """Every argument checked, and the image and audio read, before anything loads; InputError otherwise."""
    from .media.audio_file import load_audio
    from .media.image import load_image
    from .media.weights import DEFAULT_MODELS_DIR

    family = pick_family(args)
    check_family_flags(args, parser, family)
    if args.fps != VIDEO_FPS:
        raise InputError(f"The models generate {VIDEO_FPS} fps video; --fps {args.fps} is not possible. "
                         "Resample the mp4 afterwards if needed.")
    check_duration(args.duration)
    with size_note_off() if args.smoke else contextlib.nullcontext():
        height, width = parse_size(args.size or (family.smoke_size if args.smoke else DEFAULT_SIZE), args.max_hw)
    runtime = runtime_options(args)
    image = load_image(args.image)
    check_image_size(image, args.image)
    with size_note_off():  # said once, by parse_size
        pixels = family.reference_pixels(image, width, height, "center", "cpu")  # refuses an image it cannot use
    waveform = load_audio(args.audio)
    family.video_length(fit_waveform(waveform, args.duration).numel())  # refuses a too-short clip or duration now
    models_dir = args.models_dir or DEFAULT_MODELS_DIR
    prompts = (args.prompt or family.talking_prompt, family.idle_prompt)
    files, fetch = (None, ()) if args.smoke else model_files(args, family, models_dir, prompts)
    check_outputs(args, files)
    check_decoder(args)
    steps = family.default_steps if args.steps is None else args.steps
    return RunInputs(family, runtime, image, pixels, waveform, Path(args.output), steps, prompts, models_dir, files,
                     fetch)


def pick_family(args: argparse.Namespace) -> ModelFamily:
    """The family of ``--dit`` (read from its tensors' names and shapes), else the one ``--model`` names."""
    named = args.model or DEFAULT_MODEL
    if args.dit is None:
        return next(f for f in FAMILIES if f.cli_name == named)
    if not args.dit.exists():
        raise InputError(f"--dit {args.dit} does not exist. Check the path.")
    family = detect_family(dit_shapes(args.dit), args.dit)
    if args.model is not None and args.model != family.cli_name:
        raise InputError(f"--model {args.model}, but --dit {args.dit} is a {family.name} model: "
                         f"leave --model out (the file decides), or give --model {family.cli_name}.")
    return family


def dit_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of a DiT file, or of every safetensors file in a DiT folder (diffusers shards)."""
    if not path.is_dir():
        return checkpoint_shapes(path)
    shapes = {}
    for shard in sorted(path.glob("*.safetensors")):
        shapes.update(checkpoint_shapes(shard))
    return shapes


def check_family_flags(args: argparse.Namespace, parser: argparse.ArgumentParser, family: ModelFamily) -> None:
    """Refuse what the run's family does not do: another family's own flags, torchrun for a family that
    runs on one GPU, --base / --fp8 where its loader takes neither, a step count it does not sample with."""
    for other, actions in parser.family_flags.items():
        for action in actions:
            if other is not family and getattr(args, action.dest) != action.default:
                raise InputError(f"{action.option_strings[0]} is for {other.name}; this run is {family.name}: "
                                 "leave it out.")
    if parallel_ranks() > 1 and not family.supports_sequence_parallel:
        raise InputError(f"{family.name} runs on one GPU; torchrun with several processes is for "
                         f"{sequence_parallel_families()}. Run it without torchrun.")
    check_head_split(args.dit)
    if args.gpus != 1:
        from .parallel.sequence_parallel import header_heads

        check_gpus(args, family, header_heads(dit_shapes(args.dit)) if args.dit else None, parallel_ranks())
    if not family.fp8_and_partial_files:
        for flag, given in (("--base", args.base is not None), ("--fp8", args.fp8)):
            if given:
                raise InputError(f"{flag} is for families whose loader takes it; {family.name} does not: leave it out "
                                 "(--fp8-matmul and --fp8-kv-cache work with every family).")
    if args.steps is not None and (args.steps < 1 or (family.step_counts and args.steps not in family.step_counts)):
        counts = " or ".join(map(str, family.step_counts or ())) or "1 or more"
        raise InputError(f"--steps {args.steps}: {family.name} samples with {counts} steps per block.")


def check_head_split(dit: Path | None) -> None:
    """Under torchrun, refuse a process count that does not divide the DiT's attention heads, from the
    file's header: before every rank loads the whole model only to be refused."""
    from .parallel.sequence_parallel import header_heads

    ranks = parallel_ranks()
    heads = header_heads(dit_shapes(dit)) if ranks > 1 and dit is not None else None
    if heads is not None and heads % ranks:
        fits = [str(n) for n in range(2, heads + 1) if heads % n == 0][:4]
        advice = f"use --nproc_per_node {' or '.join(fits)}" if fits else "run it without torchrun"
        raise InputError(f"torchrun started {ranks} processes, but the model's {heads} attention "
                         f"head{'s' if heads > 1 else ''} cannot be split evenly over {ranks} GPUs: {advice}.")


def runtime_options(args: argparse.Namespace) -> RuntimeOptions:
    """The run's options from the flags, checked. Smoke mode runs the tiny model on the CPU in fp32, or
    bf16 with --fp8-matmul (its kernels take bf16 activations), its weights as they are (no --fp8)."""
    device = torch.device("cpu") if args.smoke else pick_device(args.device)
    vae_device = device if args.smoke or args.vae_device is None else pick_device(args.vae_device, "--vae-device")
    precision = ("bf16" if args.fp8_matmul else "fp32") if args.smoke else args.precision
    return RuntimeOptions(
        precision=precision, attention=args.attention, compile=args.compile, cuda_graphs=args.cuda_graphs,
        fp8_weights=args.fp8 and not args.smoke, fp8_matmul=args.fp8_matmul, fp8_kv_cache=args.fp8_kv_cache,
        device=device, vae_device=vae_device,
    ).validate(cli_flag)


def model_files(args: argparse.Namespace, family: ModelFamily, models_dir: Path,
                prompts: tuple[str, str | None]) -> tuple[ModelFiles, tuple[WeightFile, ...]]:
    """Where each file comes from: its flag, else the family's release file in ``models_dir`` (and
    those to fetch). The umT5 encoder is needed only for a prompt whose embedding is not cached."""
    for flag in ("dit", "base", "vae", "wav2vec2", "text_encoder", "tokenizer"):
        path = getattr(args, flag)
        if path is not None and not path.exists():
            raise InputError(f"{cli_flag(flag)} {path} does not exist. Check the path.")
    chosen, fetch = {}, []
    for role in MODEL_ROLES:
        released = [f for f in family.weight_files if f.role == role]
        chosen[role] = getattr(args, role) or (weight_path(released, models_dir) if released else None)
        fetch += released if getattr(args, role) is None else []
    missing = [cli_flag(role) for role in MODEL_ROLES if chosen[role] is None]
    if missing:
        raise InputError(f"Give {' and '.join(missing)}: {family.name} has no release file to fetch for "
                         f"{'them' if len(missing) > 1 else 'it'} (or --smoke for a check with tiny random weights).")
    if (args.text_encoder is None) != (args.tokenizer is None):
        raise InputError("Give --text-encoder and --tokenizer together, or neither (then they are fetched into "
                         "--models-dir).")
    encoder = (args.text_encoder, args.tokenizer)
    if args.text_encoder is None:
        encoder = tuple(weight_path([f for f in TEXT_ENCODER_FILES if f.role == role], models_dir)
                        for role in ("t5", "tokenizer"))
        if not all(context_cache(models_dir, p).is_file() for p in prompts if p is not None):
            fetch += TEXT_ENCODER_FILES
    return ModelFiles(chosen["dit"], chosen["vae"], chosen["wav2vec2"], *encoder), tuple(fetch)


def weight_path(files: list[WeightFile], models_dir: Path) -> Path:
    """Where a model's release files lie: the file, or the folder of a model made of several."""
    paths = [f.local_path(models_dir) for f in files]
    return paths[0] if len(paths) == 1 else paths[0].parent


def check_outputs(args: argparse.Namespace, files: ModelFiles | None) -> None:
    """--output (and --latents-out) must not be an input, nor a folder, and must be writable."""
    inputs = {"--image": Path(args.image), "--audio": Path(args.audio), "--base": args.base,
              "--tiny-decoder": args.tiny_decoder}
    if files is not None:
        inputs.update({"--dit": files.dit, "--vae": files.vae, "--wav2vec2": files.wav2vec2,
                       "--text-encoder": files.text_encoder})
    check_output(Path(args.output), inputs)
    if args.latents_out is not None:
        check_output(args.latents_out, {**inputs, "--output": Path(args.output)}, "--latents-out")


def check_decoder(args: argparse.Namespace) -> None:
    """--decoder tiny needs --tiny-decoder, a Wan2.1 TAEHV file, checked now (nothing is loaded); the file
    without --decoder tiny is a mistake too."""
    from .media.taehv import QUALITY_NOTE, WHERE_TO_GET_IT, check_tiny_decoder_file

    if args.decoder == "full":
        if args.tiny_decoder is not None:
            raise InputError(f"--tiny-decoder {args.tiny_decoder} is only used with --decoder tiny: add --decoder tiny "
                             "(faster, lower quality) or leave --tiny-decoder out.")
        return
    if args.tiny_decoder is None:
        raise InputError(f"--decoder tiny needs --tiny-decoder FILE: {WHERE_TO_GET_IT} (it is not downloaded).")
    check_tiny_decoder_file(args.tiny_decoder)
    log.info(QUALITY_NOTE)


@contextlib.contextmanager
def size_note_off() -> Iterator[None]:
    """Silence image.check_target_size's "trained at 512x512" note: the CLI gives it once, while it checks
    the arguments, and not at all in smoke mode, where the size only has to fit the tiny model."""
    logger = logging.getLogger(check_target_size.__module__)
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def note_smoke_limits(args: argparse.Namespace) -> None:
    """Say which options smoke mode does not use (tiny random weights on the CPU, no text encoder)."""
    if args.prompt is not None:
        log.info("smoke mode: --prompt is not encoded (the tiny random model has no text encoder; it uses a random "
                 "context)")
    if args.device != "auto" or args.vae_device is not None:
        log.info("smoke mode runs on the CPU; --device / --vae-device are not used")
    if args.fp8:
        log.info("smoke mode keeps the tiny model's weights as they are; --fp8 is not used")


# -- weights, models and prompts --------------------------------------------------------------------


def fetch_weights(inputs: RunInputs, download: bool) -> None:
    """Check (and download) every release file the run needs in one go: offline, one message lists them all."""
    from .media.weights import ensure_files

    if inputs.fetch:
        ensure_files(inputs.fetch, inputs.models_dir, download=download)


@contextlib.contextmanager
def weight_files(inputs: RunInputs) -> Iterator[ModelFiles]:
    """The run's files; for --smoke the family's tiny random ones, in a temporary folder deleted afterwards."""
    if inputs.files is not None:
        yield inputs.files
        return
    with tempfile.TemporaryDirectory(prefix="livetalk-smoke-") as folder:
        tiny = inputs.family.smoke_weights(Path(folder))
        yield ModelFiles(tiny.dit, tiny.vae, tiny.wav2vec2, contexts=tiny.context)


@dataclass
class Models:
    """The loaded models of one process: the DiT everywhere; the VAE and audio encoder on rank 0."""

    dit: Any
    vae: Any = None
    audio_encoder: Any = None
    decoder: Any = None  # what decodes the frames: the VAE, or the tiny decoder (--decoder tiny)


def load_models(inputs: RunInputs, files: ModelFiles, runtime: RuntimeOptions, rank: int,
                args: argparse.Namespace) -> Models:
    """Load the DiT (and on rank 0 the VAE and audio encoder) in the run's precision, with its options applied."""
    from .media.taehv import load_tiny_decoder
    from .media.vae import load_vae
    from .media.wav2vec2 import load_audio_encoder

    family, dtype = inputs.family, runtime.dtype
    options = family.cli_load_options(files.dit, args)
    if family.fp8_and_partial_files:
        options.update(base=args.base, fp8_weights=runtime.fp8_weights, fp8_matmul=runtime.fp8_matmul)
    if args.gpus > 1:  # the DiT in worker processes, one per GPU (cli_workers)
        models = Models(dit_on_workers(family, files.dit, runtime, options, worker_devices(args.gpus, args.smoke)))
    else:
        models = Models(family.load(files.dit, dtype, runtime.device, **options))
    if rank == 0:
        models.vae = load_vae(files.vae, dtype, runtime.vae_device or runtime.device)
        models.audio_encoder = load_audio_encoder(files.wav2vec2, family.audio_encoder_dtype or dtype, runtime.device)
        models.decoder = models.vae if args.decoder == "full" else \
            load_tiny_decoder(args.tiny_decoder, dtype, runtime.vae_device or runtime.device)
    runtime.apply(models.dit if args.gpus == 1 else None, models.vae)  # workers apply it to theirs
    return models


def context_cache(models_dir: Path, prompt: str) -> Path:
    """Where the umT5 embedding of ``prompt`` is kept, so the 11 GB encoder runs once per prompt."""
    return models_dir / "contexts" / (hashlib.sha256(prompt.encode()).hexdigest()[:24] + ".safetensors")


def prompt_contexts(inputs: RunInputs, files: ModelFiles, runtime: RuntimeOptions) -> list[torch.Tensor | None]:
    """The text contexts of the talking and idle prompts: a smoke run's tiny ones, else the cached
    embeddings, with the umT5 encoder loaded once for those not cached yet (and cached)."""
    from safetensors.torch import load_file, save_file

    if files.contexts is not None:
        tiny = load_file(str(files.contexts))
        return [tiny["context"], tiny.get("idle")]
    prompts, contexts = inputs.prompts, {}
    for prompt in filter(None, prompts):
        if context_cache(inputs.models_dir, prompt).is_file():
            contexts[prompt] = load_file(str(context_cache(inputs.models_dir, prompt)))["context"]
    to_encode = [p for p in dict.fromkeys(filter(None, prompts)) if p not in contexts]
    if to_encode:
        from .media.text_encoder import encode_prompt, load_text_encoder, release_text_encoder

        log.info("encoding the prompt with umT5-XXL (once per prompt)")
        encoder = load_text_encoder(files.text_encoder, dtype=runtime.dtype, device=runtime.device)
        for prompt in to_encode:
            contexts[prompt] = encode_prompt(prompt, encoder, files.tokenizer).cpu()
            cache = context_cache(inputs.models_dir, prompt)
            cache.parent.mkdir(parents=True, exist_ok=True)
            save_file({"context": contexts[prompt].contiguous()}, str(cache))
        release_text_encoder(encoder)
    return [None if p is None else contexts[p] for p in prompts]


# -- one run ----------------------------------------------------------------------------------------


@dataclass
class Conditions:
    """What rank 0 prepares for the sampler (and, under torchrun, hands to every rank)."""

    reference: torch.Tensor
    audio: Any
    talking: torch.Tensor
    idle: torch.Tensor | None


def prepare(inputs: RunInputs, models: Models, contexts: list, output_device: torch.device | str,
            duration: float | None) -> Conditions:
    """The reference latent, the family's audio conditioning and the text contexts (rank 0)."""
    from .runtime.concurrent import run_concurrently

    vae = models.vae

    @torch.no_grad()
    def encode_reference() -> torch.Tensor:
        return vae.encode(inputs.reference_pixels.to(vae.device, vae.dtype)).to(output_device)

    def encode_audio():
        return inputs.family.encode_audio_for_duration(models.dit, models.audio_encoder, inputs.waveform,
                                                       output_device, duration)
    # at the same time (two threads, two CUDA streams; the same results): the first frame waits for the longer
    reference, audio = run_concurrently(encode_reference, encode_audio, device=models.audio_encoder.device)
    log.info("reference image -> %dx%d (W x H)", inputs.reference_pixels.shape[-1], inputs.reference_pixels.shape[-2])
    if audio.length.short_clip_message is not None:
        log.warning(audio.length.short_clip_message)
    talking, idle = contexts
    return Conditions(reference, audio, talking, idle)


def share(conditions: Conditions | None, sp) -> Conditions:
    """Rank 0's conditions on every rank of the group ``sp`` (None: one process)."""
    if sp is None:
        return conditions
    import torch.distributed as dist

    box = [conditions]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sample(inputs: RunInputs, dit: Any, conditions: Conditions, seed: int) -> Iterator[torch.Tensor]:
    """The family's latent blocks for these conditions."""
    idle = None if conditions.idle is None else [[conditions.idle, {}]]
    return inputs.family.sample_blocks(
        dit, conditioning=[[conditions.talking, {}]], idle_conditioning=idle, reference=conditions.reference,
        audio=conditions.audio, seed=seed, steps=inputs.steps, cache_policy=inputs.family.default_cache_policy,
    )


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Path | None:
    from .parallel import sequence_parallel

    inputs = check_arguments(args, parser)
    use_expandable_segments(inputs.runtime.fp8_kv_cache)  # before anything touches the GPU
    if args.smoke:
        note_smoke_limits(args)
    fetch_weights(inputs, download=not args.skip_download)
    sp = sequence_parallel.init_from_env("gloo" if args.smoke else None) if parallel_ranks() > 1 else None
    rank = 0 if sp is None else sp.rank
    runtime = inputs.runtime if sp is None else inputs.runtime.on(rank_device(args.smoke))
    with weight_files(inputs) as files:
        models = load_models(inputs, files, runtime, rank, args)
        raise_if_interrupted()  # a Ctrl-C that Python dropped meanwhile (interrupts.py) ends the run here
        contexts = prompt_contexts(inputs, files, runtime) if rank == 0 else None
    raise_if_interrupted()
    output_device = runtime.device if sp is None else "cpu"  # broadcast from the host
    conditions = share(prepare(inputs, models, contexts, output_device, args.duration) if rank == 0 else None, sp)
    raise_if_interrupted()
    dit = models.dit if sp is None else inputs.family.parallel_sampler(models.dit, sp)
    blocks = sample(inputs, dit, conditions, args.seed)
    if rank == 0:
        written = write_video(args, inputs, models, conditions, blocks)
    else:
        written = None
        for _ in blocks:
            pass
    sequence_parallel.leave_together(sp)
    return written


def parallel_ranks() -> int:
    """How many processes torchrun started for this run (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank_device(smoke: bool) -> torch.device:
    """A rank's device under torchrun: its GPU (set from LOCAL_RANK), or the CPU in smoke mode or without one."""
    if smoke or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def write_video(args: argparse.Namespace, inputs: RunInputs, models: Models, conditions: Conditions,
                blocks: Iterator[torch.Tensor]) -> Path:
    """Decode each block as it comes (on a GPU overlapping the next block's sampling) and stream its
    frames into the mp4 with a progress bar. On Ctrl-C or an error the writer keeps the frames made so
    far as a playable mp4 and notes where on the exception (see exit_code)."""
    from tqdm import tqdm

    from .media.video_io import VideoWriter
    from .runtime.decode_stream import decode_blocks

    latents: list[torch.Tensor] = []
    if args.latents_out is not None:
        blocks = kept(blocks, latents)
    first = conditions.reference.to(models.dit.dtype) if inputs.family.reference_is_first_latent else None
    num_frames = conditions.audio.num_video_frames
    frames_done, start = 0, time.perf_counter()
    with tqdm(total=num_frames, unit="frame", desc="generating", file=sys.stderr) as bar, \
            VideoWriter(inputs.output, fps=VIDEO_FPS, audio=inputs.waveform) as writer:
        for frames in decode_blocks(models.decoder, blocks, num_frames, first_latent_frame=first):
            writer.write(frames)
            frames_done += frames.shape[0]
            bar.set_postfix(fps=f"{frames_done / (time.perf_counter() - start):.1f}")
            bar.update(frames.shape[0])
            raise_if_interrupted()
        raise_if_interrupted()
    if args.latents_out is not None:
        from safetensors.torch import save_file

        save_file({"latents": torch.cat(latents, dim=2).contiguous()}, str(args.latents_out))
    print(f"wrote {writer.saved_path} ({frames_done} frames, {frames_done / VIDEO_FPS:.2f} s)", file=sys.stderr)
    return writer.saved_path


def kept(blocks: Iterator[torch.Tensor], latents: list[torch.Tensor]) -> Iterator[torch.Tensor]:
    """``blocks``, each also appended (float32, on the CPU) to ``latents``."""
    for block in blocks:
        latents.append(block.float().cpu())
        yield block


# -- exit codes and the entry point -----------------------------------------------------------------


OUT_OF_MEMORY_HELP = out_of_memory_help(
    "--precision bf16 (not fp32); a smaller --size (e.g. 384); --fp8-matmul or --fp8-kv-cache; for "
    f"{sequence_parallel_families()} --fp8, or more GPUs with torchrun"
)


def exit_code(run_once) -> int:
    """Run ``run_once()`` and turn the failures a user can act on into a message and an exit code:
    2 bad input / missing files, 3 GPU out of memory, 130 interrupted (one line: what was kept).
    Notes on the exception (the video writer's: where the frames made so far were kept) are printed too."""
    try:
        run_once()
    except LiveTalkError as exc:
        report(f"error: {exc}", exc)
        return 2
    except torch.cuda.OutOfMemoryError as exc:
        torch.cuda.empty_cache()
        report(f"error: {OUT_OF_MEMORY_HELP}", exc)
        return 3
    except KeyboardInterrupt as interrupt:
        print(f"\n{summary(interrupt)}", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
    return 0


def report(message: str, exc: BaseException) -> None:
    print("\n".join([message, *getattr(exc, "__notes__", [])]), file=sys.stderr)


class CurrentStderrHandler(logging.StreamHandler):
    """Writes to the ``sys.stderr`` of the moment a line is logged, not of the moment it was made: a
    program that runs :func:`main` more than once and swaps stderr in between (tests) gets every line."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging() -> None:
    """This pack's INFO lines on stderr, as plain messages. The handler goes on the pack's loggers only:
    on the root logger it printed huggingface_hub's lines twice (that library has its own handler)."""
    for name in PACK_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        if not any(getattr(h, "livetalk_cli", False) for h in logger.handlers):
            handler = CurrentStderrHandler()
            handler.setFormatter(logging.Formatter("%(message)s"))
            handler.livetalk_cli = True
            logger.addHandler(handler)


def run_subcommand(name: str, argv: list[str]) -> int:
    """``main(argv)`` of the module :data:`SUBCOMMANDS` names for ``name``; exit 2 with one line when
    that module is not part of this installation."""
    module_name = importlib.util.resolve_name(SUBCOMMANDS[name], __package__)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is None or not module_name.startswith(exc.name):
            raise  # the module is there; something it imports is not
        print(f"error: '{name}' is not available in this installation ({module_name} is missing).", file=sys.stderr)
        return 2
    return module.main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ready()
    if argv and argv[0] in SUBCOMMANDS:
        return run_subcommand(argv[0], argv[1:])
    setup_logging()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return exit_code(lambda: run(args, parser))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
