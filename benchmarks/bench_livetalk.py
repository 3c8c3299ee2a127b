"""LiveTalk 1.3B speed and memory at full size with random weights (run on a GPU).

    python benchmarks/bench_livetalk.py --blocks 12 --json bench.json

Builds the real geometry (DiT dim 1536 x 30 layers, Wan2.1 VAE, wav2vec2-base) with random bf16
weights, runs the shipped pipeline at 512x512 and prints a table: DiT ms per block (4 denoising
forwards + the refresh pass), VAE ms per block, steady FPS serial and pipelined (DiT and VAE
overlapped: max of the two), first-frame latency (image + audio + context in -> first decoded frame
out, encoders included), peak GPU memory, GPU and torch version.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from livetalk_core.audio import AudioEncoder  # noqa: E402
from livetalk_core.compile import compile_blocks, compile_vae  # noqa: E402
from livetalk_core.decode_stream import decode_blocks  # noqa: E402
from livetalk_core.fp8_linear import use_fp8_matmuls  # noqa: E402
from livetalk_core.livetalk_model import LiveTalkConfig, LiveTalkDiT  # noqa: E402
from livetalk_core.pipeline import LiveTalkPipeline  # noqa: E402
from livetalk_core.vae import VAEConfig, WanVAE, frames_to_uint8  # noqa: E402
from livetalk_core.wan_dit import WanCoreConfig  # noqa: E402

FULL_DIT = WanCoreConfig(dim=1536, in_dim=33, out_dim=16, ffn_dim=8960, num_layers=30, text_dim=4096)


def random_init_(module: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator(device="cpu").manual_seed(seed)
    for p in module.parameters():
        fan_in = p.shape[1] if p.ndim > 1 else p.shape[0]
        values = torch.randn(p.shape, generator=g) / max(fan_in, 1) ** 0.5
        p.data.copy_(values.to(p.dtype))


def build(device: torch.device, dtype: torch.dtype, vae_device: torch.device | None = None) -> LiveTalkPipeline:
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    dit = LiveTalkDiT(LiveTalkConfig(core=FULL_DIT, audio_features=14 * 768)).to(device, dtype)
    random_init_(dit)
    vae = WanVAE(VAEConfig()).to(vae_device or device, dtype)
    random_init_(vae, 1)
    w2v = Wav2Vec2Model(Wav2Vec2Config()).to(device, dtype).eval()
    return LiveTalkPipeline(dit.eval().requires_grad_(False), vae.eval().requires_grad_(False),
                            AudioEncoder(w2v, do_normalize=True, source=Path("random")))


def synchronize() -> None:
    for index in range(torch.cuda.device_count()):
        torch.cuda.synchronize(index)


def cuda_ms(fn):
    synchronize()
    start = time.perf_counter()
    out = fn()
    synchronize()
    return out, (time.perf_counter() - start) * 1e3


@torch.no_grad()
def run(args) -> dict:
    device, dtype = torch.device("cuda"), torch.bfloat16
    t0 = time.perf_counter()
    pipe = build(device, dtype, torch.device(args.vae_device) if args.vae_device else None)
    pipe.dit.attention_backend = args.attention
    image = torch.randint(0, 255, (1024, 1024, 3), dtype=torch.uint8)
    seconds = args.blocks * 0.75
    waveform = torch.randn(int(seconds * 16000)) * 0.1
    context = torch.randn(1, 512, 4096, device=device, dtype=dtype)
    deviation = vae_deviation = None
    if args.compile or args.fp8_matmul:  # the optimised path against the plain eager bf16 one, at full size
        ref, audio = pipe.encode_reference(image), pipe.encode_audio(waveform[: 16000 * 5])
        eager = list(pipe.sample(ref, audio, context, 0))
        if args.fp8_matmul:
            use_fp8_matmuls(pipe.dit.heavy_linears().values())
        eager_frames = torch.cat(list(pipe.decode(iter(eager[:3]))))
        vae32 = copy.deepcopy(pipe.vae).float()  # the yardstick: bf16 eager against float32
        fp32_frames = torch.cat(list(decode_blocks(vae32, iter(eager[:3]))))
        del vae32
        if args.compile:
            compile_blocks(pipe.dit)
            compile_vae(pipe.vae)
        optimised = list(pipe.sample(ref, audio, context, 0))
        deviation = [
            {"max_abs": (a.double() - b.double()).abs().max().item(),
             "rel_l2": ((a.double() - b.double()).norm() / b.double().norm()).item()}
            for a, b in zip(optimised, eager)
        ]
        # the VAE on the same latents, compiled vs eager: uint8 frames
        difference = (torch.cat(list(pipe.decode(iter(eager[:3])))).int() - eager_frames.int()).abs()
        yardstick = (eager_frames.int() - fp32_frames.int()).abs()
        vae_deviation = {"max_abs_uint8": difference.max().item(), "mean_abs_uint8": difference.float().mean().item(),
                         "eager_bf16_vs_fp32_max_abs_uint8": yardstick.max().item(),
                         "eager_bf16_vs_fp32_mean_abs_uint8": yardstick.float().mean().item()}
        del eager, optimised
    build_s = time.perf_counter() - t0

    # warm-up (compile, cuDNN autotune, allocator)
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        ref = pipe.encode_reference(image)
        audio = pipe.encode_audio(waveform[: 16000 * 2])
        for _ in pipe.stream(ref, audio, context, 0):
            pass
    synchronize()
    warmup_s = time.perf_counter() - t0
    torch.cuda.reset_peak_memory_stats()

    # first-frame latency as the CLI sees it: image + audio in -> frames out of LiveTalkPipeline.stream
    # (first: the pinned reference frame, decoded before the DiT runs; then block 0's first latent frame)
    stamps = []
    synchronize()
    t_start = time.perf_counter()
    ref = pipe.encode_reference(image)
    audio = pipe.encode_audio(waveform[: 16000 * 11])  # a clip length not seen before: a cold audio encode
    stream = pipe.stream(ref, audio, context, 0)
    for _ in range(2):
        next(stream)
        stamps.append(time.perf_counter() - t_start)
    stream.close()
    first_frame_s, first_generated_s = stamps
    # the same steps one at a time, with a sync after each, for the breakdown
    synchronize()
    ref, enc_ref_ms = cuda_ms(lambda: pipe.encode_reference(image))
    audio, enc_audio_ms = cuda_ms(lambda: pipe.encode_audio(waveform))
    decoder = pipe.vae.stream_decoder()
    _, ref_frame_ms = cuda_ms(lambda: frames_to_uint8(decoder.decode(ref.to(pipe.dit.dtype))).cpu())
    gen = pipe.sample(ref, audio, context, 0)
    block0, dit0_ms = cuda_ms(lambda: next(gen))
    _, generated_frames_ms = cuda_ms(lambda: frames_to_uint8(decoder.decode(block0[:, :, 1:2])).cpu())
    decoder.decode(block0[:, :, 2:])
    if args.profile_audio:
        cold = waveform[: 16000 * 10 + 1234]  # a new length again
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
            pipe.encode_audio(cold)
            synchronize()
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=70))
        _, warm_ms = cuda_ms(lambda: pipe.encode_audio(cold))
        print(f"audio encode of that clip again (warm): {warm_ms:.1f} ms")
        from livetalk_core import attention as attention_module

        order = attention_module._GPU_SDPA_ORDER
        for name, first in (("cudnn first", order), ("flash first", [order[1], order[2], order[0], order[3]])):
            attention_module._GPU_SDPA_ORDER = first
            for extra in (2345, 3456):
                _, ms = cuda_ms(lambda: pipe.encode_audio(waveform[: 16000 * 9 + extra + (0 if name == "cudnn first" else 5000)]))
                print(f"audio encode, new length, {name}: {ms:.1f} ms")
        attention_module._GPU_SDPA_ORDER = order

    dit_ms, vae_ms = [], []
    while True:
        block, ms = cuda_ms(lambda: next(gen, None))
        if block is None:
            break
        dit_ms.append(ms)
        _, ms = cuda_ms(lambda: decoder.decode(block))
        vae_ms.append(ms)
    peak = torch.cuda.max_memory_allocated() / 2**30
    peak_vae_device = torch.cuda.max_memory_allocated(pipe.vae.device) / 2**30 if pipe.vae.device != device else None

    # end to end as the CLI runs it: frames out per second, decode overlapped with sampling or not
    end_to_end = {}
    outputs = {}
    for overlap in (False, True):
        synchronize()
        stamps, chunks = [], []
        start = time.perf_counter()
        for frames in pipe.stream(ref, audio, context, 0, overlap=overlap):
            stamps.append(time.perf_counter())
            chunks.append(frames)
        # skip block 0 (handed out in three pieces) and block 1 (pipeline fill): frames per second after that
        fill = 4
        end_to_end["overlap" if overlap else "serial"] = sum(c.shape[0] for c in chunks[fill + 1 :]) / (stamps[-1] - stamps[fill])
        outputs[overlap] = torch.cat(chunks)
    overlap_identical = torch.equal(outputs[False], outputs[True])
    long_run = long_video(pipe, image, context, args.long_seconds) if args.long_seconds else None
    steady_dit = sorted(dit_ms)[len(dit_ms) // 2]
    steady_vae = sorted(vae_ms)[len(vae_ms) // 2]
    frames = 12
    return {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "attention": args.attention,
        "compile": args.compile,
        "vae_device": str(pipe.vae.device),
        "fp8_matmul": args.fp8_matmul,
        "optimised_vs_eager_bf16_per_block": deviation,
        "vae_compiled_vs_eager_frames": vae_deviation,
        "blocks": args.blocks,
        "dit_ms_per_block_median": steady_dit,
        "vae_ms_per_block_median": steady_vae,
        "fps_serial": frames / ((steady_dit + steady_vae) / 1e3),
        "fps_pipelined_bound": frames / (max(steady_dit, steady_vae) / 1e3),
        "first_frame_latency_s": first_frame_s,
        "first_generated_frame_latency_s": first_generated_s,
        "first_frame_parts_ms": {"encode_image": enc_ref_ms, "encode_audio_warm": enc_audio_ms, "decode_reference_frame": ref_frame_ms,
                                 "dit_block0": dit0_ms, "decode_first_generated_latent_frame": generated_frames_ms},
        "peak_gib": peak,
        "peak_gib_vae_device": peak_vae_device,
        "fps_end_to_end_serial": end_to_end["serial"],
        "fps_end_to_end_overlapped": end_to_end["overlap"],
        "overlap_frames_identical": overlap_identical,
        "warmup_s": warmup_s,
        "build_s": build_s,
        "long_run": long_run,
        "dit_ms_per_block": dit_ms,
        "vae_ms_per_block": vae_ms,
    }


def long_video(pipe: LiveTalkPipeline, image: torch.Tensor, context: torch.Tensor, seconds: float) -> dict:
    """The CLI's path for a long clip: sample, decode (overlapped) and stream the mp4 to disk, while
    GPU memory and the process's resident memory are sampled after every block."""
    import resource
    import tempfile

    from livetalk_core.video_io import VideoWriter, read_video_info

    waveform = torch.randn(int(seconds * 16000)) * 0.1
    synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    audio = pipe.encode_audio(waveform)
    gpu_gib, rss_gib = [], []
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "long.mp4"
        with VideoWriter(out, fps=16, audio=waveform) as writer:
            for frames in pipe.stream(pipe.encode_reference(image), audio, context, 0):
                writer.write(frames)
                gpu_gib.append(torch.cuda.memory_allocated() / 2**30)
                rss_gib.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
        elapsed = time.perf_counter() - start
        info = read_video_info(out)
    quarter = len(gpu_gib) // 4
    return {
        "audio_s": seconds, "frames": info["frames"], "video_s": info["frames"] / 16, "wall_s": elapsed,
        "fps": info["frames"] / elapsed, "has_audio": info["has_audio"],
        "gpu_allocated_gib_after_block": {"first_quarter_max": max(gpu_gib[:quarter]), "last_quarter_max": max(gpu_gib[-quarter:])},
        "gpu_peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "max_rss_gib": {"after_first_quarter": rss_gib[quarter], "at_end": rss_gib[-1]},
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--blocks", type=int, default=12)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--attention", default="sdpa")
    p.add_argument("--compile", action="store_true", help="regional torch.compile of the DiT blocks (livetalk_core/compile.py)")
    p.add_argument("--fp8-matmul", action="store_true", help="fp8 x fp8 matmuls for the DiT's block Linears (livetalk_core/fp8_linear.py)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--vae-device", default=None, help="put the VAE on another GPU, e.g. cuda:1 (default: the DiT's)")
    p.add_argument("--profile-audio", action="store_true", help="print a profile of the audio encoding")
    p.add_argument("--long-seconds", type=float, default=0, help="also run the CLI path on a clip this long, writing the mp4")
    args = p.parse_args()
    result = run(args)
    deviation = result["optimised_vs_eager_bf16_per_block"]
    rows = [
        ("GPU", result["gpu"]), ("torch", result["torch"]), ("attention", result["attention"]), ("compile", result["compile"]), ("fp8 matmul", result["fp8_matmul"]), ("VAE device", result["vae_device"]),
        ("DiT ms/block (4 steps + refresh)", f"{result['dit_ms_per_block_median']:.1f}"),
        ("VAE ms/block (12 frames)", f"{result['vae_ms_per_block_median']:.1f}"),
        ("FPS serial", f"{result['fps_serial']:.1f}"),
        ("FPS pipelined (bound)", f"{result['fps_pipelined_bound']:.1f}"),
        ("first-frame latency s", f"{result['first_frame_latency_s']:.3f}"),
        ("first generated frame s", f"{result['first_generated_frame_latency_s']:.3f}"),
        ("  parts ms", json.dumps({k: round(v, 1) for k, v in result["first_frame_parts_ms"].items()})),
        ("FPS end to end, serial decode", f"{result['fps_end_to_end_serial']:.1f}"),
        ("FPS end to end, overlapped decode", f"{result['fps_end_to_end_overlapped']:.1f}"),
        ("overlapped frames == serial frames", str(result["overlap_frames_identical"])),
        ("peak GPU memory GiB", f"{result['peak_gib']:.2f}" + ("" if result["peak_gib_vae_device"] is None else f" (+ VAE GPU {result['peak_gib_vae_device']:.2f})")),
        ("long run", json.dumps(result["long_run"])),
        ("warm-up s", f"{result['warmup_s']:.1f}"),
        ("optimised vs eager bf16, worst block", "" if deviation is None else
         f"max|d| {max(d['max_abs'] for d in deviation):.3g}, rel L2 {max(d['rel_l2'] for d in deviation):.3g}"),
    ]
    rows.append(("VAE compiled vs eager, uint8 frames", json.dumps(result["vae_compiled_vs_eager_frames"])))
    for k, v in rows:
        print(f"{k:<34} {v}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
