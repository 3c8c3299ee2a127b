"""Command line: ``python -m livetalk_core --image face.jpg --audio speech.wav --output out.mp4``.

Without ``--image``/``--audio`` it uses the shipped portrait and speech clip. ``--smoke`` runs the
same pipeline with tiny random weights on the CPU (no download, a few seconds) to check an install.
The video is written while it is generated; Ctrl-C keeps a playable mp4 of what exists so far.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

from .audio import VIDEO_FPS
from .errors import LiveTalkError, out_of_memory_help

ASSETS = Path(__file__).resolve().parents[1] / "assets"
DEFAULT_PROMPT = (
    "A person talks to the camera with a steady gaze, natural facial expressions and lip movements "
    "that follow the speech."
)
log = logging.getLogger("livetalk")


def add_input_arguments(p: argparse.ArgumentParser) -> None:
    """``--image`` and ``--audio``, defaulting to the shipped portrait and speech clip."""
    p.add_argument("--image", default=str(ASSETS / "portrait.jpg"), help="reference face image (default: the shipped portrait)")
    p.add_argument("--audio", default=str(ASSETS / "speech.flac"), help="speech audio, any format/rate (default: the shipped clip)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="livetalk", description="Lip-synced talking-avatar video from a face image and speech.")
    add_input_arguments(p)
    p.add_argument("--output", default="livetalk.mp4", help="mp4 to write (default: %(default)s)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="text prompt")
    p.add_argument("--seed", type=int, default=0, help="noise seed; the same seed gives the same video")
    p.add_argument("--duration", type=float, default=None, help="seconds of video (default: the audio's length; longer pads with silence)")
    p.add_argument("--size", default="512", help="output size, N or WxH, multiples of 16 (the model was trained at 512)")
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
    p.add_argument("--smoke", action="store_true", help="tiny random weights on the CPU: checks the install, makes noise")
    return p


def parse_size(args: argparse.Namespace) -> tuple[int, int]:
    if args.max_hw is not None:
        side = 512 if args.max_hw == 720 else args.max_hw
        return side, side
    if "x" in args.size.lower():
        w, h = (int(v) for v in args.size.lower().split("x"))
        return h, w
    return int(args.size), int(args.size)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def text_context(prompt: str, models_dir: Path, paths, device: torch.device, dtype: torch.dtype, download: bool) -> torch.Tensor:
    """umT5 context for ``prompt``; cached on disk so the 11 GB encoder runs once per prompt."""
    from safetensors.torch import load_file, save_file

    from .text_encoder import encode_prompt, load_text_encoder, release_text_encoder
    from .weights import TEXT_ENCODER_FILES, ensure_files

    cache = models_dir / "contexts" / (hashlib.sha256(prompt.encode()).hexdigest()[:24] + ".safetensors")
    if cache.is_file():
        return load_file(str(cache))["context"]
    ensure_files(TEXT_ENCODER_FILES, models_dir, download=download)
    log.info("encoding the prompt with umT5-XXL (once per prompt)")
    encoder = load_text_encoder(paths.text_encoder, dtype=dtype, device=device)
    context = encode_prompt(prompt, encoder, paths.tokenizer).cpu()
    release_text_encoder(encoder)
    cache.parent.mkdir(parents=True, exist_ok=True)
    save_file({"context": context.contiguous()}, str(cache))
    return context


def load_pipeline(args: argparse.Namespace, device: torch.device):
    """Models and text context for this run: the real ones, or tiny random ones in smoke mode."""
    from .audio import load_audio_encoder
    from .livetalk_model import load_livetalk_dit
    from .pipeline import LiveTalkPipeline
    from .vae import load_vae

    if args.smoke:
        from .smoke import build_tiny_weights, load_context

        tiny = build_tiny_weights(Path(tempfile.mkdtemp(prefix="livetalk-smoke-")))
        dtype = torch.bfloat16 if args.fp8_matmul else torch.float32  # fp8 matmuls take bf16 activations
        dit, vae, wav2vec2, context = tiny.dit, tiny.vae, tiny.wav2vec2, load_context(tiny.context)
    else:
        from .weights import DEFAULT_MODELS_DIR, LIVETALK_FILES, ensure_files, weight_paths

        models_dir = args.models_dir or DEFAULT_MODELS_DIR
        paths = weight_paths(models_dir)
        ensure_files(LIVETALK_FILES, models_dir, download=not args.skip_download)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.precision]
        context = text_context(args.prompt, models_dir, paths, device, dtype, not args.skip_download)
        dit, vae, wav2vec2 = paths.dit, paths.vae, paths.wav2vec2
    pipeline = LiveTalkPipeline(
        load_livetalk_dit(dit, dtype, device),
        load_vae(vae, dtype, device if args.smoke or args.vae_device is None else pick_device(args.vae_device)),
        load_audio_encoder(wav2vec2, dtype, device),
    )
    pipeline.dit.attention_backend = args.attention
    pipeline.dit.fp8_kv_cache = args.fp8_kv_cache
    if args.fp8_matmul:
        from .fp8_linear import use_fp8_matmuls

        use_fp8_matmuls(pipeline.dit.heavy_linears().values())
    if args.compile if args.compile is not None else device.type == "cuda":
        from .compile import compile_blocks, compile_vae

        compile_blocks(pipeline.dit, cuda_graphs=args.cuda_graphs)
        compile_vae(pipeline.vae)
    return pipeline, context


def run(args: argparse.Namespace) -> Path:
    from tqdm import tqdm

    from .attention import resolve_backend
    from .audio import load_audio
    from .image import load_image
    from .video_io import VideoWriter

    if args.fps != VIDEO_FPS:
        raise LiveTalkError(f"LiveTalk generates {VIDEO_FPS} fps video; --fps {args.fps} is not possible. Resample the mp4 afterwards if needed.")
    height, width = (64, 64) if args.smoke else parse_size(args)
    device = torch.device("cpu") if args.smoke else pick_device(args.device)
    args.attention = resolve_backend(args.attention)
    image, waveform = load_image(args.image), load_audio(args.audio)
    pipeline, context = load_pipeline(args, device)

    ref_latent = pipeline.encode_reference(image, height, width)
    audio = pipeline.encode_audio(waveform, args.duration)
    output = Path(args.output)
    frames_done, start = 0, time.perf_counter()
    bar = tqdm(total=audio.num_video_frames, unit="frame", desc="generating", file=sys.stderr)
    writer = VideoWriter(output, fps=VIDEO_FPS, audio=waveform)
    try:
        with writer:
            for frames in pipeline.stream(ref_latent, audio, context.to(device), args.seed):
                writer.write(frames)
                frames_done += frames.shape[0]
                bar.set_postfix(fps=f"{frames_done / (time.perf_counter() - start):.1f}")
                bar.update(frames.shape[0])
    except KeyboardInterrupt as interrupt:
        bar.close()
        if writer.saved_path is not None:
            print(f"\ninterrupted: kept {writer.frames_written} frames in {output}", file=sys.stderr)
        else:
            reason = " ".join(getattr(interrupt, "__notes__", [])) or "no frame had been generated yet."
            print(f"\ninterrupted: nothing saved; {reason}", file=sys.stderr)
        raise
    bar.close()
    print(f"wrote {output} ({frames_done} frames, {frames_done / VIDEO_FPS:.2f} s)", file=sys.stderr)
    return output


OUT_OF_MEMORY_HELP = out_of_memory_help(
    "--precision bf16 (not fp32); for LiveTalk a smaller --size (e.g. 384); for RealVideo 14B --fp8, or more "
    "GPUs with torchrun"
)


def exit_code(run_once) -> int:
    """Run ``run_once()`` and turn the failures a user can act on into a message and an exit code:
    2 bad input / missing files, 3 GPU out of memory, 130 interrupted (the partial mp4 is kept)."""
    try:
        run_once()
    except LiveTalkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        print(f"error: {OUT_OF_MEMORY_HELP}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        return 130
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    return exit_code(lambda: run(args))
