"""RealVideo (Wan2.2-S2V-14B, causal) from the command line, on one GPU or several.

One GPU::

    python -m livetalk_core.realvideo.cli --dit model.pt --base Wan2.2-S2V-14B/ --vae Wan2.1_VAE.pth \\
        --wav2vec2 wav2vec2-large-xlsr-53-english/ --contexts prompts.safetensors \\
        --image face.jpg --audio speech.wav --output out.mp4

Several GPUs (Ulysses sequence parallelism, one process per GPU; same video as one GPU)::

    torchrun --standalone --nproc_per_node=2 -m livetalk_core.realvideo.cli ...same arguments...

Every rank loads the full DiT; rank 0 prepares the inputs (image, audio, prompts), broadcasts
them, decodes the blocks with the VAE and writes the mp4. ``--contexts`` is a safetensors file with
the umT5 embeddings ``idle`` ("A character is looking at the camera.") and ``talking`` ("A
character is talking."); without it, ``--text-encoder`` / ``--tokenizer`` compute them once and save
them next to the output. ``--smoke`` runs the whole path with tiny random weights on the CPU (gloo
under torchrun) to check an installation or a launch.
"""

from __future__ import annotations

if __name__ == "__main__":  # Ctrl-C while torch imports: one line, no traceback (see interrupts.py)
    from ..interrupts import exit_quietly_while_starting

    exit_quietly_while_starting()

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..cli import add_input_arguments, exit_code, setup_logging
from ..cli_checks import check_duration, check_output
from ..errors import InputError
from ..interrupts import exit_process, ready
from ..media.audio import VIDEO_FPS
from ..options import RuntimeOptions, cli_flag
from ..parallel import sequence_parallel

SMOKE_AREA = 128 * 64
log = logging.getLogger("livetalk.realvideo")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="realvideo", description="RealVideo talking-avatar video (Wan2.2-S2V-14B, causal).")
    add_input_arguments(p)
    p.add_argument("--output", default="realvideo.mp4", help="mp4 to write (rank 0)")
    p.add_argument("--dit", type=Path, help="model.pt (complete or partial fine-tune), a .safetensors, or the diffusers folder")
    p.add_argument("--base", type=Path, default=None, help="base S2V checkpoint a partial --dit file is applied over")
    p.add_argument("--dit-config", type=Path, default=None,
                   help="the DiT's config.json, read for audio_inject_layers (default: config.json next to --dit, if any; "
                   "only needed for non-release depths)")
    p.add_argument("--fp8", action="store_true", help="keep the DiT's Linear weights in fp8 (about half the weight memory)")
    p.add_argument("--fp8-matmul", action="store_true",
                   help="fp8 weights and fp8 matmuls for the DiT's Linear layers (Ada/Hopper GPUs, bf16): faster, output moves by fp8 rounding")
    p.add_argument("--fp8-kv-cache", action="store_true",
                   help="store the KV cache in fp8 (half its memory, 2 GB less at 512x512): output moves by fp8 rounding")
    p.add_argument("--vae", type=Path, help="Wan2.1_VAE.pth")
    p.add_argument("--wav2vec2", type=Path, help="wav2vec2-large-xlsr-53-english folder")
    p.add_argument("--contexts", type=Path, default=None, help="safetensors with 'idle' and 'talking' umT5 embeddings")
    p.add_argument("--text-encoder", type=Path, default=None, help="umT5 .pth, used when --contexts is not given")
    p.add_argument("--tokenizer", type=Path, default=None, help="umT5 tokenizer folder, with --text-encoder")
    p.add_argument("--steps", type=int, default=4, choices=(2, 4), help="denoising steps per block (upstream default 4)")
    p.add_argument("--seed", type=int, default=0, help="noise seed; the same seed gives the same video on any number of GPUs")
    p.add_argument("--duration", type=float, default=None, help="seconds of video (default: the audio's; longer idles on the last audio)")
    p.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--attention", default="sdpa", choices=("sdpa", "math", "flash", "sage"), help="attention kernel")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the DiT blocks and the VAE's conv steps (default: on for GPUs; 442 -> 335 ms per 2-step block on an H200)")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                   help="with --compile: replay the DiT's forwards as CUDA graphs once the KV cache's layout repeats, "
                   "under torchrun on 4 or more GPUs as graphs between their exchanges (same video; the DiT no longer waits "
                   "on a slow host CPU; 4 H200s: 307 -> 121 ms per 2-step block; not used on 2 GPUs, where it does not pay)")
    p.add_argument("--latents-out", type=Path, default=None, help="also save the blocks' latents (safetensors, rank 0)")
    p.add_argument("--smoke", action="store_true", help="tiny random weights on the CPU: checks the install or the launch")
    return p


def _device(smoke: bool) -> torch.device:
    if smoke or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _smoke_models(dtype: torch.dtype, device: torch.device):
    """Tiny random S2V DiT (2 heads, so 2 ranks can split it) and VAE, seeded: identical on every rank.
    The DiT goes through a file (the real loader) in a temporary folder that is deleted again."""
    with tempfile.TemporaryDirectory(prefix="realvideo-smoke-") as folder:
        return _smoke_models_in(Path(folder), dtype, device)


def _smoke_models_in(folder: Path, dtype: torch.dtype, device: torch.device):
    from safetensors.torch import save_file

    from ..media.vae import VAEConfig, WanVAE
    from ..wan.dit import HEAD_DIM, WanCoreConfig
    from .model import S2VConfig, S2VDiT, load_s2v_dit

    torch.manual_seed(0)
    core = WanCoreConfig(dim=2 * HEAD_DIM, in_dim=16, out_dim=16, ffn_dim=64, num_layers=2, text_dim=32)
    dit = S2VDiT(S2VConfig(core=core, audio_dim=8, audio_layers=25, audio_tokens=4, inject_layers=(0, 1), cond_dim=16))
    with torch.no_grad():
        for name, p in dit.named_parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
    path = folder / "s2v_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in dit.state_dict().items()}, str(path))
    vae = WanVAE(VAEConfig(dim=4)).to(device, dtype).eval()
    return load_s2v_dit(path, dtype, device, audio_inject_layers=(0, 1)), vae


def _inject_layers(args: argparse.Namespace) -> list[int] | None:
    """``audio_inject_layers`` from the DiT's config.json (upstream's ``from_config`` file), if there is one."""
    import json

    config = args.dit_config or (args.dit if args.dit.is_dir() else args.dit.parent) / "config.json"
    if not config.is_file():
        if args.dit_config is not None:
            raise InputError(f"--dit-config {config} does not exist.")
        return None
    try:
        return json.loads(config.read_text()).get("audio_inject_layers")
    except ValueError as exc:
        raise InputError(f"{config} is not valid JSON ({exc}).") from None


def _contexts(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    from safetensors.torch import load_file, save_file

    if args.contexts is not None:
        if not args.contexts.is_file():
            raise InputError(f"--contexts {args.contexts} does not exist.")
        saved = load_file(str(args.contexts))
        if not {"idle", "talking"} <= saved.keys():
            raise InputError(f"{args.contexts} must hold the tensors 'idle' and 'talking' (umT5 embeddings).")
        return saved["idle"], saved["talking"]
    if args.text_encoder is None or args.tokenizer is None:
        raise InputError("Give --contexts, or --text-encoder and --tokenizer to compute the two prompt embeddings.")
    from ..media.text_encoder import encode_prompt, load_text_encoder, release_text_encoder
    from .family import REALVIDEO_IDLE_PROMPT, REALVIDEO_TALKING_PROMPT

    encoder = load_text_encoder(args.text_encoder, dtype=dtype, device=device)
    prompts = (REALVIDEO_IDLE_PROMPT, REALVIDEO_TALKING_PROMPT)
    idle, talking = (encode_prompt(p, encoder, args.tokenizer).cpu() for p in prompts)
    release_text_encoder(encoder)
    saved = Path(args.output).with_suffix(".contexts.safetensors")
    save_file({"idle": idle.contiguous(), "talking": talking.contiguous()}, str(saved))
    log.info("saved the prompt embeddings to %s (pass --contexts next time)", saved)
    return idle, talking


MODEL_FILE_OPTIONS = ("dit", "base", "dit_config", "vae", "wav2vec2", "contexts", "text_encoder", "tokenizer")


def check_arguments(args: argparse.Namespace) -> RuntimeOptions:
    """Every argument checked, and the image and audio read once, before any model loads (InputError
    otherwise); returns the run's runtime options (on the CPU until :func:`run` knows its device)."""
    from ..media.audio import load_audio
    from ..media.image import load_image
    from .image import DEFAULT_AREA, plan_image
    from .sampler import realvideo_video_length

    check_duration(args.duration)
    runtime = runtime_options(args)
    if not args.smoke:
        _check_model_files(args)
    image = load_image(args.image)
    plan_image(image.shape[1], image.shape[0], SMOKE_AREA if args.smoke else DEFAULT_AREA)
    realvideo_video_length(load_audio(args.audio).numel(), args.duration)  # refuses a duration under one sample now
    inputs = {f"--{name.replace('_', '-')}": getattr(args, name) for name in MODEL_FILE_OPTIONS}
    inputs.update({"--image": Path(args.image), "--audio": Path(args.audio)})
    check_output(Path(args.output), inputs)
    if args.latents_out is not None:
        check_output(args.latents_out, {**inputs, "--output": Path(args.output)}, "--latents-out")
    return runtime


def runtime_options(args: argparse.Namespace) -> RuntimeOptions:
    """The run's options from the flags, checked. Smoke mode runs the tiny model in fp32, without
    --fp8 / --fp8-matmul (its weights stay as they are)."""
    return RuntimeOptions(
        precision="fp32" if args.smoke else args.precision, attention=args.attention, compile=args.compile,
        cuda_graphs=args.cuda_graphs, fp8_weights=args.fp8 and not args.smoke,
        fp8_matmul=args.fp8_matmul and not args.smoke, fp8_kv_cache=args.fp8_kv_cache,
    ).validate(cli_flag)


def _check_model_files(args: argparse.Namespace) -> None:
    missing = [name for name in ("dit", "vae", "wav2vec2") if getattr(args, name) is None]
    if missing:
        raise InputError(f"Give --{' --'.join(missing)} (or --smoke for a check with tiny random weights).")
    if args.contexts is None and (args.text_encoder is None or args.tokenizer is None):
        raise InputError("Give --contexts, or --text-encoder and --tokenizer to compute the two prompt embeddings.")
    for name in MODEL_FILE_OPTIONS:
        path = getattr(args, name)
        if path is not None and not path.exists():
            raise InputError(f"--{name.replace('_', '-')} {path} does not exist. Check the path.")


def prepare_inputs(args: argparse.Namespace, vae, device: torch.device, dtype: torch.dtype) -> dict:
    """Reference latent, prompt embeddings, per-segment audio features and the waveform (rank 0)."""
    from ..media.audio import load_audio
    from ..media.image import load_image
    from .image import DEFAULT_AREA, preprocess_reference

    pixels, plan = preprocess_reference(load_image(args.image), SMOKE_AREA if args.smoke else DEFAULT_AREA, device)
    log.info("reference image -> %dx%d (W x H)", pixels.shape[-1], pixels.shape[-2])
    ref_latent = vae.encode(pixels.to(device, dtype).unsqueeze(2)).to(dtype).cpu()
    waveform = load_audio(args.audio)
    if args.duration is not None:  # the video stops at --duration: no features for the audio past it
        from .sampler import realvideo_video_length

        waveform = waveform[: realvideo_video_length(waveform.numel(), args.duration).num_samples]
    if args.smoke:
        from .audio import split_segments

        generator = torch.Generator().manual_seed(0)
        features = [torch.randn(1, 25, 8, s.numel() // 1000, generator=generator) for s in split_segments(waveform)]
        idle, talking = torch.randn(2, 1, 16, 32, generator=generator)
    else:
        from ..media.audio import load_audio_encoder
        from .audio import realvideo_audio_features

        encoder = load_audio_encoder(args.wav2vec2, torch.float32, device)
        features = [f.cpu() for f in realvideo_audio_features(encoder, waveform.to(device), dtype)]
        del encoder
        idle, talking = _contexts(args, device, dtype)
    return dict(ref_latent=ref_latent, idle_context=idle, talking_context=talking, audio_features=features, waveform=waveform)


def run(args: argparse.Namespace) -> Path | None:
    from ..media.vae import load_vae
    from ..parallel.workers import sample_realvideo_parallel
    from ..runtime.noise import SeededNoise
    from .sampler import realvideo_schedule, realvideo_video_length

    runtime = check_arguments(args)
    sp = sequence_parallel.init_from_env("gloo" if args.smoke else None)
    rank = 0 if sp is None else sp.rank
    device = _device(args.smoke)
    runtime = runtime.on(device)
    dtype = runtime.dtype
    if args.smoke:
        dit, vae = _smoke_models(dtype, device)
    else:
        from .model import load_s2v_dit

        missing = [name for name in ("dit", "vae", "wav2vec2") if getattr(args, name) is None]
        if missing:
            raise InputError(f"Give --{' --'.join(missing)} (or --smoke for a check with tiny random weights).")
        dit = load_s2v_dit(
            args.dit, dtype, device, base=args.base, fp8_weights=runtime.fp8_weights, fp8_matmul=runtime.fp8_matmul,
            audio_inject_layers=_inject_layers(args),
        )
        vae = load_vae(args.vae, dtype, device) if rank == 0 else None
    runtime.apply(dit, vae)

    inputs = [prepare_inputs(args, vae, device, dtype) if rank == 0 else None]
    if sp is not None:
        dist.broadcast_object_list(inputs, src=0)
    inputs = inputs[0]
    waveform = inputs.pop("waveform")
    length = realvideo_video_length(waveform.numel(), args.duration)
    if rank == 0 and length.short_clip_message is not None:
        log.warning(length.short_clip_message)
    blocks = sample_realvideo_parallel(
        dit, sp, noise=SeededNoise(args.seed), schedule=realvideo_schedule(args.steps), num_blocks=length.num_blocks,
        **inputs,
    )
    written = None
    if rank == 0:
        written = _write(args, blocks, vae, waveform, length.num_video_frames)
    else:
        for _ in blocks:
            pass
    sequence_parallel.leave_together(sp)
    return written


def _write(args: argparse.Namespace, blocks, vae, waveform: torch.Tensor, num_video_frames: int) -> Path:
    """Decode each block as it comes (overlapping the next block's sampling on a GPU) and stream
    its frames, up to ``num_video_frames``, into the mp4 (rank 0)."""
    from safetensors.torch import save_file

    from ..media.video_io import VideoWriter
    from ..runtime.decode_stream import decode_blocks

    latents = []

    def kept(blocks):
        for block in blocks:
            latents.append(block.float().cpu())
            yield block

    output, frames_done, start = Path(args.output), 0, time.perf_counter()
    with VideoWriter(output, fps=VIDEO_FPS, audio=waveform) as writer:
        for frames in decode_blocks(vae, kept(blocks) if args.latents_out is not None else blocks, num_video_frames):
            writer.write(frames)
            frames_done += frames.shape[0]
            log.info("%d frames, %.2f s elapsed", frames_done, time.perf_counter() - start)
    if args.latents_out is not None:
        save_file({"latents": torch.cat(latents, dim=2).contiguous()}, str(args.latents_out))
    print(f"wrote {writer.saved_path} ({frames_done} frames, {frames_done / VIDEO_FPS:.2f} s)", file=sys.stderr)
    return output


def main(argv: list[str] | None = None) -> int:
    ready()
    setup_logging()
    args = build_parser().parse_args(argv)
    try:
        return exit_code(lambda: run(args))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    exit_process(main())
