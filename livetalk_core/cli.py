"""Command line: ``python -m livetalk_core --image face.jpg --audio speech.wav --output out.mp4``.

Without ``--image``/``--audio`` it uses the shipped portrait and speech clip. ``--smoke`` runs the
same pipeline with tiny random weights on the CPU (no download, a few seconds) to check an install.
Every argument is checked (and the image and audio read) before any model loads. The video is
written while it is generated; Ctrl-C keeps a playable mp4 of what exists so far and says so in one
line (exit status 130).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .cli_checks import check_duration, check_image_size, check_output, parse_size, pick_device
from .errors import InputError, LiveTalkError, out_of_memory_help
from .interrupts import INTERRUPTED_EXIT_CODE, ready, summary
from .media.image import check_target_size
from .media.timing import VIDEO_FPS
from .options import RuntimeOptions, cli_flag

ASSETS = Path(__file__).resolve().parents[1] / "assets"
DEFAULT_PROMPT = (
    "A person talks to the camera with a steady gaze, natural facial expressions and lip movements "
    "that follow the speech."
)
DEFAULT_SIZE = "512"
SMOKE_SIZE = "64"  # the tiny random model's default: a few seconds on a CPU
PACK_LOGGERS = ("livetalk", "livetalk_core")
log = logging.getLogger("livetalk")


def add_input_arguments(p: argparse.ArgumentParser) -> None:
    """``--image`` and ``--audio``, defaulting to the shipped portrait and speech clip."""
    p.add_argument("--image", default=str(ASSETS / "portrait.jpg"), help="reference face image (default: the shipped portrait)")
    p.add_argument("--audio", default=str(ASSETS / "speech.flac"), help="speech audio, any format/rate (default: the shipped clip)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="livetalk", description="Lip-synced talking-avatar video from a face image and speech.")
    add_input_arguments(p)
    p.add_argument("--output", default="livetalk.mp4", help="mp4 to write (default: %(default)s)")
    p.add_argument("--prompt", default=None, help="text prompt (default: a person talking to the camera; not used by --smoke)")
    p.add_argument("--seed", type=int, default=0, help="noise seed; the same seed gives the same video")
    p.add_argument("--duration", type=float, default=None, help="seconds of video (default: the audio's length; longer pads with silence)")
    p.add_argument("--size", default=None,
                   help=f"output size, N or WxH, multiples of 16 (default {DEFAULT_SIZE}, the size the model was trained at; "
                   f"{SMOKE_SIZE} with --smoke)")
    p.add_argument("--max-hw", type=int, default=None, help="upstream's option: 720 means 512x512 (upstream's only size); other values a square of that size")
    p.add_argument("--fps", type=int, default=VIDEO_FPS, help="frame rate; the model generates 16 fps only")
    p.add_argument("--models-dir", type=Path, default=None, help="where weights live / are downloaded (default: ~/.cache/livetalk)")
    p.add_argument("--skip-download", action="store_true", help="never download; fail with the list of files to put in place")
    p.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default="bf16", help="model precision")
    p.add_argument("--device", default="auto", help="cuda, cuda:N, cpu or auto")
    p.add_argument("--vae-device", default=None,
                   help="run the VAE on another GPU (e.g. cuda:1), so decoding never competes with the DiT; default: --device")
    p.add_argument("--attention", default="sdpa", choices=("sdpa", "math", "flash", "sage"), help="attention kernel")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the DiT blocks and the VAE's conv steps (default: on for GPUs, about 30%% faster)")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                   help="with --compile: replay the DiT's forwards as CUDA graphs once the KV cache's layout repeats "
                   "(same video; the DiT no longer waits on a slow host CPU)")
    p.add_argument("--fp8-matmul", action="store_true",
                   help="run the DiT's block Linear layers as fp8 matmuls (Ada/Hopper GPUs, bf16): faster, output moves by fp8 rounding")
    p.add_argument("--fp8-kv-cache", action="store_true",
                   help="store the KV cache in fp8 (half its memory, 1.3 GiB less at 512x512): output moves by fp8 rounding")
    p.add_argument("--smoke", action="store_true",
                   help="tiny random weights on the CPU: checks the install, makes noise (uses --size, not --prompt)")
    return p


@dataclass(frozen=True)
class RunInputs:
    """What a run needs that is checked (and read) before any model loads."""

    height: int
    width: int
    runtime: RuntimeOptions
    image: torch.Tensor
    waveform: torch.Tensor
    output: Path

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    @property
    def vae_device(self) -> torch.device:
        return self.runtime.vae_device or self.runtime.device


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


def check_arguments(args: argparse.Namespace) -> RunInputs:
    """Every argument checked, and the image and audio read, before anything loads; InputError otherwise."""
    from .livetalk.pipeline import fit_waveform, livetalk_video_length
    from .media.audio_file import load_audio
    from .media.image import load_image

    if args.fps != VIDEO_FPS:
        raise InputError(f"LiveTalk generates {VIDEO_FPS} fps video; --fps {args.fps} is not possible. Resample the mp4 afterwards if needed.")
    check_duration(args.duration)
    with size_note_off() if args.smoke else contextlib.nullcontext():
        height, width = parse_size(args.size or (SMOKE_SIZE if args.smoke else DEFAULT_SIZE), args.max_hw)
    device = torch.device("cpu") if args.smoke else pick_device(args.device)
    vae_device = device if args.smoke or args.vae_device is None else pick_device(args.vae_device, "--vae-device")
    runtime = runtime_options(args, device, vae_device)
    image = load_image(args.image)
    check_image_size(image, args.image)
    waveform = load_audio(args.audio)
    livetalk_video_length(fit_waveform(waveform, args.duration).shape[0])  # refuses a too-short clip or duration now
    output = Path(args.output)
    check_output(output, {"--image": Path(args.image), "--audio": Path(args.audio)})
    return RunInputs(height, width, runtime, image, waveform, output)


def runtime_options(args: argparse.Namespace, device: torch.device, vae_device: torch.device) -> RuntimeOptions:
    """The run's options from the flags, checked. Smoke mode runs the tiny model in fp32, or bf16 with
    --fp8-matmul (its kernels take bf16 activations)."""
    precision = ("bf16" if args.fp8_matmul else "fp32") if args.smoke else args.precision
    return RuntimeOptions(
        precision=precision, attention=args.attention, compile=args.compile, cuda_graphs=args.cuda_graphs,
        fp8_matmul=args.fp8_matmul, fp8_kv_cache=args.fp8_kv_cache, device=device, vae_device=vae_device,
    ).validate(cli_flag)


def note_smoke_limits(args: argparse.Namespace) -> None:
    """Say which options smoke mode does not use (tiny random weights on the CPU, no text encoder)."""
    if args.prompt is not None:
        log.info("smoke mode: --prompt is not encoded (the tiny random model has no text encoder; it uses a random context)")
    if args.device != "auto" or args.vae_device is not None:
        log.info("smoke mode runs on the CPU; --device / --vae-device are not used")


def context_cache(models_dir: Path, prompt: str) -> Path:
    """Where the umT5 embedding of ``prompt`` is kept, so the 11 GB encoder runs once per prompt."""
    return models_dir / "contexts" / (hashlib.sha256(prompt.encode()).hexdigest()[:24] + ".safetensors")


def ensure_weights(args: argparse.Namespace, models_dir: Path, prompt: str) -> None:
    """Check (and download) every file the run needs in one go, the umT5 encoder and its tokenizer
    included unless the prompt's embedding is cached: offline, one message lists them all."""
    from .media.weights import LIVETALK_FILES, TEXT_ENCODER_FILES, ensure_files

    needed = LIVETALK_FILES if context_cache(models_dir, prompt).is_file() else LIVETALK_FILES + TEXT_ENCODER_FILES
    ensure_files(needed, models_dir, download=not args.skip_download)


def text_context(prompt: str, models_dir: Path, paths, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """umT5 context for ``prompt``, from the cache or encoded once and cached (files already in place)."""
    from safetensors.torch import load_file, save_file

    from .media.text_encoder import encode_prompt, load_text_encoder, release_text_encoder

    cache = context_cache(models_dir, prompt)
    if cache.is_file():
        return load_file(str(cache))["context"]
    log.info("encoding the prompt with umT5-XXL (once per prompt)")
    encoder = load_text_encoder(paths.text_encoder, dtype=dtype, device=device)
    context = encode_prompt(prompt, encoder, paths.tokenizer).cpu()
    release_text_encoder(encoder)
    cache.parent.mkdir(parents=True, exist_ok=True)
    save_file({"context": context.contiguous()}, str(cache))
    return context


def load_pipeline(args: argparse.Namespace, inputs: RunInputs):
    """Models and text context for this run: the real ones, or tiny random ones in smoke mode."""
    if args.smoke:
        return load_smoke_pipeline(args, inputs)
    from .media.weights import DEFAULT_MODELS_DIR, weight_paths

    models_dir = args.models_dir or DEFAULT_MODELS_DIR
    prompt = args.prompt or DEFAULT_PROMPT
    ensure_weights(args, models_dir, prompt)
    paths = weight_paths(models_dir)
    context = text_context(prompt, models_dir, paths, inputs.device, inputs.runtime.dtype)
    return assemble_pipeline(inputs, (paths.dit, paths.vae, paths.wav2vec2)), context


def load_smoke_pipeline(args: argparse.Namespace, inputs: RunInputs):
    """Tiny random models: written to a temporary folder, loaded, and the folder deleted again."""
    from .smoke import build_tiny_weights, load_context

    with tempfile.TemporaryDirectory(prefix="livetalk-smoke-") as folder:
        tiny = build_tiny_weights(folder)
        pipeline = assemble_pipeline(inputs, (tiny.dit, tiny.vae, tiny.wav2vec2))
        return pipeline, load_context(tiny.context)


def assemble_pipeline(inputs: RunInputs, files: tuple[Path, Path, Path]):
    """Load the DiT, VAE and wav2vec2 from ``files`` in the run's precision and apply its runtime options."""
    from .livetalk.model import load_livetalk_dit
    from .livetalk.pipeline import LiveTalkPipeline
    from .media.wav2vec2 import load_audio_encoder
    from .media.vae import load_vae

    dit, vae, wav2vec2 = files
    dtype = inputs.runtime.dtype
    pipeline = LiveTalkPipeline(
        load_livetalk_dit(dit, dtype, inputs.device), load_vae(vae, dtype, inputs.vae_device),
        load_audio_encoder(wav2vec2, dtype, inputs.device),
    )
    inputs.runtime.apply(pipeline.dit, pipeline.vae)
    return pipeline


def run(args: argparse.Namespace) -> Path:
    inputs = check_arguments(args)
    if args.smoke:
        note_smoke_limits(args)
    pipeline, context = load_pipeline(args, inputs)

    with size_note_off():
        ref_latent = pipeline.encode_reference(inputs.image, inputs.height, inputs.width)
    audio = pipeline.encode_audio(inputs.waveform, args.duration)
    if audio.length.short_clip_message is not None:
        log.warning(audio.length.short_clip_message)
    return generate(args, inputs, pipeline, (ref_latent, audio, context.to(inputs.device)))


def generate(args: argparse.Namespace, inputs: RunInputs, pipeline, conditions: tuple) -> Path:
    """Stream the blocks into the mp4 with a progress bar. On Ctrl-C or an error the writer keeps the
    frames made so far as a playable mp4 and notes where on the exception (see exit_code)."""
    from tqdm import tqdm

    from .media.video_io import VideoWriter

    ref_latent, audio, context = conditions
    frames_done, start = 0, time.perf_counter()
    with tqdm(total=audio.num_video_frames, unit="frame", desc="generating", file=sys.stderr) as bar, \
            VideoWriter(inputs.output, fps=VIDEO_FPS, audio=inputs.waveform) as writer:
        for frames in pipeline.stream(ref_latent, audio, context, args.seed):
            writer.write(frames)
            frames_done += frames.shape[0]
            bar.set_postfix(fps=f"{frames_done / (time.perf_counter() - start):.1f}")
            bar.update(frames.shape[0])
    print(f"wrote {writer.saved_path} ({frames_done} frames, {frames_done / VIDEO_FPS:.2f} s)", file=sys.stderr)
    return writer.saved_path


OUT_OF_MEMORY_HELP = out_of_memory_help(
    "--precision bf16 (not fp32); for LiveTalk a smaller --size (e.g. 384); for RealVideo 14B --fp8, or more "
    "GPUs with torchrun"
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


def setup_logging() -> None:
    """This pack's INFO lines on stderr, as plain messages. The handler goes on the pack's loggers only:
    on the root logger it printed huggingface_hub's lines twice (that library has its own handler)."""
    for name in PACK_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        if not any(getattr(h, "livetalk_cli", False) for h in logger.handlers):
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(message)s"))
            handler.livetalk_cli = True
            logger.addHandler(handler)


def main(argv: list[str] | None = None) -> int:
    ready()
    setup_logging()
    args = build_parser().parse_args(argv)
    return exit_code(lambda: run(args))
