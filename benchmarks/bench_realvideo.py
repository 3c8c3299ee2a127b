"""RealVideo 14B DiT at full size with random weights: one GPU vs several (Ulysses SP).

    python benchmarks/bench_realvideo.py --out runs/p1                       # 1 GPU
    torchrun --standalone --nproc_per_node=2 benchmarks/bench_realvideo.py --out runs/p2
    python benchmarks/bench_realvideo.py --compare runs/p1 runs/p2           # bf16 agreement

Builds the release geometry (dim 5120, 40 layers, 40 heads, 12 audio injectors) directly on each
GPU in bf16 (seeded, so every run and every rank has the same weights; ``--fp8`` keeps the block
and injector Linear weights in fp8, ``--fp8-matmul`` also multiplies in fp8), a 512x512 latent (64x64, 1024 tokens per latent
frame; ``--height 72 --width 56`` for RealVideo's 448x576 portrait), random umT5 contexts and one 5 s audio segment, and runs the shipped sampler through
:func:`~livetalk_core.realvideo_worker.sample_realvideo_parallel`. Per block it times the DiT
(noise + denoising forwards + refresh pass + the all-gather of the block) with CUDA sync; with
``--vae`` (one GPU) it also decodes every block on the same GPU and reports VAE ms, FPS with the
decode and the first-frame latency (prefill + block 0 + its first frame's decode; encoders not included). Writes ``result.json`` (ms per block, FPS, peak memory per GPU) and the latents.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from livetalk_core import sequence_parallel  # noqa: E402
from livetalk_core.compile import compile_blocks, compile_vae  # noqa: E402
from livetalk_core.decode_stream import decode_blocks  # noqa: E402
from livetalk_core.fp8_linear import quantize, to_fp8_linear, use_fp8_matmuls  # noqa: E402
from livetalk_core.noise import SeededNoise  # noqa: E402
from livetalk_core.realvideo_sampler import realvideo_schedule  # noqa: E402
from livetalk_core.realvideo_worker import sample_realvideo_parallel  # noqa: E402
from livetalk_core.s2v_model import RELEASE_INJECT_LAYERS, S2VConfig, S2VDiT  # noqa: E402
from livetalk_core.vae import VAEConfig, WanVAE, frames_to_uint8  # noqa: E402
from livetalk_core.wan_dit import WanCoreConfig  # noqa: E402

RELEASE = S2VConfig(
    core=WanCoreConfig(dim=5120, in_dim=16, out_dim=16, ffn_dim=13824, num_layers=40, text_dim=4096),
    audio_dim=1024, audio_layers=25, audio_tokens=4, inject_layers=RELEASE_INJECT_LAYERS, cond_dim=16,
)
VIDEO_FRAMES_PER_BLOCK = 8


@torch.no_grad()
def build(device: torch.device, fp8: bool, seed: int = 0) -> S2VDiT:
    """Random release-size DiT made on ``device`` one tensor at a time (no CPU copy, no fp32 model)."""
    with torch.device("meta"):
        model = S2VDiT(RELEASE)
    fp8_layers = {id(m) for m in model.heavy_linears().values()} if fp8 else set()
    g = torch.Generator(device=device).manual_seed(seed)
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            fan_in = p[0].numel() if p.ndim > 1 else p.shape[-1]
            value = torch.randn(p.shape, generator=g, device=device, dtype=torch.float32) / fan_in**0.5
            if "norm" in name:
                value = 1 + 0.1 * value
            if name == "modulation":
                value = 0.1 * value
            if id(module) in fp8_layers and name == "weight":
                values, scale = quantize(value)
                module.weight = torch.nn.Parameter(values, requires_grad=False)
                to_fp8_linear(module, scale)
            else:
                setattr(module, name, torch.nn.Parameter(value.to(torch.bfloat16), requires_grad=False))
            del value
    return model.eval()


def vae_decoder(device: torch.device, compile: bool, latent_hw: tuple[int, int]):
    """A random-weight Wan2.1 VAE on the same GPU (the 14B path decodes with it too)."""
    vae = WanVAE(VAEConfig()).to(device, torch.bfloat16).eval().requires_grad_(False)
    g = torch.Generator(device=device).manual_seed(1)
    for p in vae.parameters():
        fan_in = p[0].numel() if p.ndim > 1 else p.shape[-1]
        p.copy_(torch.randn(p.shape, generator=g, device=device) / fan_in**0.5)
    if compile:
        compile_vae(vae)
        warm = vae.stream_decoder()
        for frames in (1, 2, 2):  # compile for the first call's and the steady shapes outside the timed run
            warm.decode(torch.zeros(1, 16, frames, *latent_hw, device=device, dtype=torch.bfloat16))
    return vae


def inputs(latent_hw: tuple[int, int], seconds: int, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(
        ref_latent=torch.randn(1, 16, 1, *latent_hw, generator=g).to(torch.bfloat16),
        idle_context=torch.randn(1, 512, 4096, generator=g).to(torch.bfloat16),
        talking_context=torch.randn(1, 512, 4096, generator=g).to(torch.bfloat16),
        audio_features=[torch.randn(1, 25, 1024, 16 * seconds, generator=g).to(torch.bfloat16)],
    )


def run(args: argparse.Namespace) -> None:
    sp = sequence_parallel.init_from_env()
    rank, world = (0, 1) if sp is None else (sp.rank, sp.world_size)
    device = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    model = build(device, args.fp8)
    if args.fp8_matmul:
        use_fp8_matmuls(model.heavy_linears().values())
        torch.cuda.empty_cache()
    model.attention_backend = args.attention
    if args.compile:
        compile_blocks(model)
    torch.cuda.synchronize(device)
    build_s = time.perf_counter() - start
    weights_gb = torch.cuda.memory_allocated(device) / 1e9
    blocks = sample_realvideo_parallel(
        model, sp, noise=SeededNoise(0), schedule=realvideo_schedule(args.steps), num_blocks=args.blocks,
        **inputs((args.height, args.width), args.seconds),
    )
    if args.compile:  # compile (and autotune) outside the timed run, so block 0 is timed warm
        for _ in sample_realvideo_parallel(model, sp, noise=SeededNoise(0), schedule=realvideo_schedule(args.steps),
                                           num_blocks=2, **inputs((args.height, args.width), args.seconds)):
            pass
    vae = vae_decoder(device, args.compile, (args.height, args.width)) if args.vae else None
    decoder = None if vae is None else vae.stream_decoder()
    times, vae_times, latents, first_frame_s = [], [], [], None
    torch.cuda.synchronize(device)
    tick = time.perf_counter()
    for block in blocks:
        torch.cuda.synchronize(device)
        now = time.perf_counter()
        times.append((now - tick) * 1000)
        latents.append(block.float().cpu())
        if decoder is not None:
            vae_start = time.perf_counter()
            pieces = block.split([1, block.shape[2] - 1], dim=2) if first_frame_s is None else (block,)
            for piece in pieces:  # as the pipeline does: the first video frame is handed out on its own
                frames_to_uint8(decoder.decode(piece)).cpu()
                if first_frame_s is None:
                    first_frame_s = time.perf_counter() - tick
            vae_times.append((time.perf_counter() - vae_start) * 1000)
        tick = time.perf_counter()
    peak_gb = torch.cuda.max_memory_allocated(device) / 1e9
    end_to_end_fps = None
    if vae is not None and sp is None:  # as the CLI runs it: block k decoded on a second stream while k+1 samples
        stamps, counts = [], []
        torch.cuda.synchronize(device)
        for frames in decode_blocks(vae, sample_realvideo_parallel(
                model, sp, noise=SeededNoise(0), schedule=realvideo_schedule(args.steps), num_blocks=args.blocks,
                **inputs((args.height, args.width), args.seconds))):
            stamps.append(time.perf_counter())
            counts.append(frames.shape[0])
        fill = 3  # block 0 comes out in two pieces, block 1 fills the pipeline
        end_to_end_fps = sum(counts[fill + 1:]) / (stamps[-1] - stamps[fill])
    per_rank = [None] * world
    mine = {"rank": rank, "peak_gb": round(peak_gb, 2), "weights_gb": round(weights_gb, 2)}
    if sp is None:
        per_rank = [mine]
    else:
        dist.all_gather_object(per_rank, mine)
    if rank == 0:
        steady = times[args.warmup:]
        result = {
            "gpus": world,
            "gpu": torch.cuda.get_device_name(device),
            "torch": torch.__version__,
            "steps": args.steps,
            "fp8_weights": args.fp8,
            "fp8_matmul": args.fp8_matmul,
            "attention": args.attention,
            "latent_hw": [args.height, args.width],
            "tokens_per_latent_frame": args.height * args.width // 4,
            "blocks": len(times),
            "block_ms_all": [round(t, 1) for t in times],
            "block_ms_median": round(statistics.median(steady), 1),
            "block_ms_mean": round(statistics.mean(steady), 1),
            "fps": round(VIDEO_FRAMES_PER_BLOCK * 1000 / statistics.median(steady), 2),
            "build_s": round(build_s, 1),
            "compile": args.compile,
            "memory_per_gpu": per_rank,
        }
        if vae_times:
            vae_ms = statistics.median(vae_times[args.warmup:])
            result.update({
                "vae_ms_median": round(vae_ms, 1),
                "fps_with_vae_serial": round(VIDEO_FRAMES_PER_BLOCK * 1000 / (result["block_ms_median"] + vae_ms), 2),
                "fps_end_to_end_overlapped": end_to_end_fps and round(end_to_end_fps, 2),
                "first_frame_s": round(first_frame_s, 3),
                "peak_gb_with_vae": round(torch.cuda.max_memory_allocated(device) / 1e9, 2),
            })
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        torch.save(torch.cat(latents, dim=2), out / "latents.pt")
        (out / "result.json").write_text(json.dumps(result, indent=1))
        print(json.dumps(result))
    if sp is not None:
        dist.destroy_process_group()


def compare(a: str, b: str) -> None:
    x, y = (torch.load(Path(p) / "latents.pt", weights_only=True).double() for p in (a, b))
    common = min(x.shape[2], y.shape[2])  # runs of different lengths agree on their common blocks
    x, y = x[:, :, :common], y[:, :, :common]
    per_block = [
        ((x[:, :, i:i + 2] - y[:, :, i:i + 2]).norm() / y[:, :, i:i + 2].norm()).item() for i in range(0, x.shape[2], 2)
    ]
    print(json.dumps({
        "compare": [a, b],
        "rel_l2_per_block": [round(v, 5) for v in per_block],
        "rel_l2_max": round(max(per_block), 5),
        "max_abs": round((x - y).abs().max().item(), 4),
    }))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_realvideo", help="folder for result.json and latents.pt (rank 0)")
    p.add_argument("--steps", type=int, default=4, choices=(2, 4))
    p.add_argument("--blocks", type=int, default=6)
    p.add_argument("--warmup", type=int, default=1, help="leading blocks left out of the averages (block 0 also prefills)")
    p.add_argument("--height", type=int, default=64, help="latent height (64 = 512 px; RealVideo's portrait: 72 = 576 px)")
    p.add_argument("--width", type=int, default=64, help="latent width (64 = 512 px; RealVideo's portrait: 56 = 448 px)")
    p.add_argument("--seconds", type=int, default=5, help="audio segment length")
    p.add_argument("--fp8", action="store_true", help="fp8 Linear weights (per-tensor scale)")
    p.add_argument("--fp8-matmul", action="store_true", help="fp8 x fp8 scaled matmuls for the block and injector Linears")
    p.add_argument("--attention", default="sdpa", choices=("sdpa", "math", "flash", "sage"))
    p.add_argument("--vae", action="store_true", help="also decode every block with a random Wan2.1 VAE on the same GPU (1 GPU runs)")
    p.add_argument("--compile", action="store_true", help="regional torch.compile of the DiT blocks")
    p.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"), help="compare the latents of two runs")
    args = p.parse_args()
    if args.compare:
        compare(*args.compare)
    else:
        run(args)


if __name__ == "__main__":
    main()
