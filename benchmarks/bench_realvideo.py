"""The RealVideo 14B configurations of ``bench.py`` (full size, random weights; one GPU or several).

Builds the release geometry (dim 5120, 40 layers, 40 heads, 12 audio injectors) directly on each GPU
in bf16, seeded, so every run and every rank has the same weights (``fp8_matmul``: block and
injector Linears as fp8 x fp8 matmuls), plus a random Wan2.1 VAE and wav2vec2-large (fp32, as
upstream) on rank 0. A 512x512 reference (64x64 latent, 1024 tokens per latent frame), 2 latent
frames (8 video frames) per block, run through the shipped sampler
(:func:`~livetalk_core.realvideo.parallel.sample_realvideo_parallel`; Ulysses sequence parallel under
``torchrun``) and the CLI's streaming decode (:func:`~livetalk_core.runtime.decode_stream.decode_blocks`,
on rank 0's GPU).
"""

from __future__ import annotations

import tempfile
import time
from argparse import Namespace
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
from timing import (
    gpu_ms,
    gpu_name,
    median,
    peak_gib,
    random_init_,
    random_value,
    rel_l2,
    reset_peak,
    synchronize,
    wall_ms,
)
from tiny_decoder import decoder_for

from livetalk_core.media.vae import VAEConfig, WanVAE, frames_to_uint8
from livetalk_core.media.wav2vec2 import AudioEncoder, load_audio_encoder
from livetalk_core.options import PRECISION_OF_DTYPE, RuntimeOptions
from livetalk_core.parallel.sequence_parallel import SequenceParallel
from livetalk_core.realvideo.audio import realvideo_audio_features
from livetalk_core.realvideo.image import preprocess_reference
from livetalk_core.realvideo.model import RELEASE_INJECT_LAYERS, S2VConfig, S2VDiT
from livetalk_core.realvideo.parallel import sample_realvideo_parallel
from livetalk_core.realvideo.sampler import realvideo_schedule
from livetalk_core.runtime.decode_stream import decode_blocks
from livetalk_core.runtime.noise import SeededNoise
from livetalk_core.smoke import TINY_WAV2VEC_HIDDEN, TINY_WAV2VEC_LAYERS
from livetalk_core.wan.dit import HEAD_DIM, WanCoreConfig

RELEASE = S2VConfig(
    core=WanCoreConfig(dim=5120, in_dim=16, out_dim=16, ffn_dim=13824, num_layers=40, text_dim=4096),
    audio_dim=1024, audio_layers=25, audio_tokens=4, inject_layers=RELEASE_INJECT_LAYERS, cond_dim=16,
)
TINY = S2VConfig(
    core=WanCoreConfig(dim=2 * HEAD_DIM, in_dim=16, out_dim=16, ffn_dim=64, num_layers=2, text_dim=32),
    audio_dim=TINY_WAV2VEC_HIDDEN, audio_layers=TINY_WAV2VEC_LAYERS + 1, audio_tokens=4, inject_layers=(0, 1),
    cond_dim=16,
)
VIDEO_FRAMES_PER_BLOCK = 8
CHECK_BLOCKS = 6


@torch.no_grad()
def build_dit(config: S2VConfig, device: torch.device, dtype: torch.dtype, seed: int = 0) -> S2VDiT:
    """Random DiT made on ``device`` one tensor at a time (no CPU copy, no float32 model)."""
    with torch.device("meta"):
        model = S2VDiT(config)
    g = torch.Generator(device=device).manual_seed(seed)
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            value = random_value(name, p.shape, g)
            setattr(module, name, torch.nn.Parameter(value.to(dtype), requires_grad=False))
            del value
    return model.eval()


def build_encoders(device: torch.device, dtype: torch.dtype, tiny: bool) -> tuple[WanVAE, AudioEncoder]:
    """Random Wan2.1 VAE (in ``dtype``) and wav2vec2-large-xlsr geometry (float32, as upstream)."""
    vae = WanVAE(VAEConfig(dim=4) if tiny else VAEConfig()).to(device, dtype).eval().requires_grad_(False)
    random_init_(vae, 1)
    if tiny:
        from livetalk_core.smoke import build_tiny_weights

        return vae, load_audio_encoder(build_tiny_weights(Path(tempfile.mkdtemp(prefix="bench-tiny-"))).wav2vec2,
                                       torch.float32, device)
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    torch.manual_seed(2)
    large = Wav2Vec2Config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                           feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True)
    return vae, AudioEncoder(Wav2Vec2Model(large).to(device).eval(), do_normalize=True, source=Path("random"))


def user_inputs(config: S2VConfig, size: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded stand-ins for what a user gives: a ``2*size`` square image (uint8 HWC), 5 s of audio
    (16 kHz) and the idle / talking prompt embeddings ``[2, 1, 512, text_dim]``."""
    image = torch.randint(0, 255, (2 * size, 2 * size, 3), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(4))
    waveform = torch.randn(5 * 16000, generator=torch.Generator().manual_seed(5)) * 0.1
    contexts = torch.randn(2, 1, 512, config.core.text_dim, generator=torch.Generator().manual_seed(3)).to(dtype)
    return image, waveform, contexts


def encode_image(vae: WanVAE, image: torch.Tensor, area: int, dtype: torch.dtype) -> torch.Tensor:
    pixels, _ = preprocess_reference(image, area, vae.device)
    return vae.encode(pixels.to(dtype).unsqueeze(2)).to(dtype)


def encode_inputs(vae: WanVAE, encoder: AudioEncoder, image: torch.Tensor, waveform: torch.Tensor, contexts,
                  area: int, dtype: torch.dtype) -> dict:
    """What rank 0 prepares from the user's image, audio and prompt embeddings (as the CLI does)."""
    features = realvideo_audio_features(encoder, waveform.to(encoder.device), dtype)
    return dict(ref_latent=encode_image(vae, image, area, dtype), idle_context=contexts[0], talking_context=contexts[1],
                audio_features=features)


def shared_inputs(sp: SequenceParallel | None, make) -> dict:
    """``make()`` on rank 0, handed to every rank (as the CLI does)."""
    inputs = [make() if sp is None or sp.rank == 0 else None]
    if sp is not None:
        inputs = [{k: _to_cpu(v) for k, v in inputs[0].items()} if sp.rank == 0 else None]
        dist.broadcast_object_list(inputs, src=0)
    return inputs[0]


def _to_cpu(value):
    return [v.cpu() for v in value] if isinstance(value, list) else value.cpu()


@torch.no_grad()
def run(options: Namespace, sp: SequenceParallel | None) -> list[dict]:
    """One result per entry of ``options.steps``. Options: tiny, blocks, steps, compile, cuda_graphs, fp8_matmul,
    fp8_kv_cache, check, out (folder for the latents, for ``bench.py --compare``)."""
    rank, world = (0, 1) if sp is None else (sp.rank, sp.world_size)
    on_gpu = torch.cuda.is_available() and not options.tiny
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config, size = (TINY, 64) if options.tiny else (RELEASE, 512)
    reset_peak(device)
    start = time.perf_counter()
    model = build_dit(config, device, dtype)
    runtime = RuntimeOptions(precision=PRECISION_OF_DTYPE[dtype], compile=options.compile,
                             cuda_graphs=options.cuda_graphs, fp8_matmul=options.fp8_matmul,
                             fp8_kv_cache=options.fp8_kv_cache, device=device).validate()
    eager = replace(runtime, compile=False, fp8_matmul=False)  # what the optimised path is checked against
    eager.apply(model)
    vae, encoder = build_encoders(device, dtype, options.tiny) if rank == 0 else (None, None)
    image, waveform, contexts = user_inputs(config, size, dtype)

    def make_inputs() -> dict:
        return encode_inputs(vae, encoder, image, waveform, contexts, size * size, dtype)

    def blocks(steps: int, inputs: dict, num_blocks: int = options.blocks):
        return sample_realvideo_parallel(model, sp, noise=SeededNoise(0), schedule=realvideo_schedule(steps),
                                         num_blocks=num_blocks, **inputs)

    checks = {}
    if options.check:  # the optimised path against plain eager bf16 (CUDA graphs replay from block 3)
        inputs = shared_inputs(sp, make_inputs)
        eager = {steps: [b.float().cpu() for b in blocks(steps, inputs, CHECK_BLOCKS)] for steps in options.steps}
    runtime.apply(model, vae)
    decoding = decoder_for(options, vae)  # --decoder tiny: the tiny decoder decodes, the VAE encodes
    if options.fp8_matmul and device.type == "cuda":
        torch.cuda.empty_cache()
    if options.check:
        for steps in options.steps:
            ours = [b.float().cpu() for b in blocks(steps, inputs, CHECK_BLOCKS)]
            checks[steps] = [
                {"max_abs": (a - b).abs().max().item(), "rel_l2": rel_l2(a, b)} for a, b in zip(ours, eager[steps])]
    synchronize()
    build_s = time.perf_counter() - start

    results = []
    for steps in options.steps:
        # warm-up: compile (first configuration only), cuDNN plans, the allocator
        start = time.perf_counter()
        _decode_all(decoding, blocks(steps, shared_inputs(sp, make_inputs), 3), rank)
        synchronize()
        warmup_s = time.perf_counter() - start
        reset_peak(device)

        # image + audio + prompt embeddings in -> the first decoded frame out, then the whole run
        # pipelined as the CLI runs it (block k decoded on a second stream while block k+1 samples)
        synchronize()
        t0 = time.perf_counter()
        stamps, counts = _decode_all(decoding, blocks(steps, shared_inputs(sp, make_inputs)), rank, t0)

        # the first frame's parts one at a time
        parts = {}
        if rank == 0:
            parts["encode_image"] = wall_ms(lambda: encode_image(vae, image, size * size, dtype))[1]
            parts["encode_audio"] = wall_ms(lambda: realvideo_audio_features(encoder, waveform.to(device), dtype))[1]
        first = blocks(steps, shared_inputs(sp, make_inputs), 1)
        block0, parts["dit_block0_with_prefill"] = wall_ms(lambda: next(first))
        if rank == 0:
            decoder = decoding.stream_decoder()
            parts["decode_first_latent_frame"] = wall_ms(
                lambda: frames_to_uint8(decoder.decode(block0[:, :, :1])).cpu()
            )[1]
        first.close()

        # each stage on its own: DiT per block (CUDA events; denoising + the previous block's refresh
        # + the all-gather), then the VAE on the same GPU
        inputs = shared_inputs(sp, make_inputs)
        decoder = decoding.stream_decoder() if decoding is not None else None
        stream, dit_ms, vae_ms, latents = blocks(steps, inputs), [], [], []
        while True:
            block, ms = gpu_ms(lambda: next(stream, None), device)
            if block is None:
                break
            dit_ms.append(ms)
            latents.append(block.float().cpu())
            if decoder is not None:
                vae_ms.append(gpu_ms(lambda: frames_to_uint8(decoder.decode(block)), device)[1])
        peaks = [None] * world
        mine = peak_gib(device)
        if sp is None:
            peaks = [mine]
        else:
            dist.all_gather_object(peaks, mine)
        if rank != 0:
            continue
        dit, vae_block = median(dit_ms[1:]), median(vae_ms[1:])  # block 0 also prefills the reference
        fill = 3  # block 0 comes out in two pieces, block 1 fills the pipeline
        results.append({
            "config": f"realvideo-14b-{steps}step" + (f"-{world}gpu" if world > 1 else ""),
            "steps": steps,
            "gpus": world,
            "gpu": gpu_name(device),
            "torch": torch.__version__,
            "compile": options.compile,
            "cuda_graphs": runtime.cuda_graphs_reason(world) is None,  # whether graphs replayed
            "fp8_matmul": options.fp8_matmul,
            "fp8_kv_cache": options.fp8_kv_cache,
            "vae_device": f"{device} (rank 0)",
            "decoder": getattr(options, "decoder", "full"),
            "frames_per_block": VIDEO_FRAMES_PER_BLOCK,
            "dit_ms_per_block": dit,
            "vae_ms_per_block": vae_block,
            "fps_serial": VIDEO_FRAMES_PER_BLOCK / ((dit + vae_block) / 1e3),
            "fps_pipelined_bound": VIDEO_FRAMES_PER_BLOCK / (max(dit, vae_block) / 1e3),
            "fps_end_to_end_serial": None,
            "fps_end_to_end_pipelined": sum(counts[fill + 1:]) / (stamps[-1] - stamps[fill]),
            "first_frame_s": stamps[0],
            "first_generated_frame_s": stamps[0],
            "first_frame_parts_ms": parts,
            "peak_gib": None if None in peaks else max(peaks),
            "peak_gib_per_gpu": peaks,
            "build_s": build_s,
            "warmup_s": warmup_s,
            "checks": {"dit_per_block": checks[steps]} if options.check else {},
            "dit_ms_all": dit_ms,
            "vae_ms_all": vae_ms,
        })
        if options.out:
            out = Path(options.out)
            out.mkdir(parents=True, exist_ok=True)
            torch.save(torch.cat(latents, dim=2), out / f"latents_{steps}step.pt")
    return results


def _decode_all(vae: WanVAE | None, blocks, rank: int, t0: float | None = None) -> tuple[list[float], list[int]]:
    """Drain ``blocks``; rank 0 decodes them as the CLI does. Returns when each piece of frames
    reached the host (seconds after ``t0``) and its frame count."""
    if rank != 0:
        for _ in blocks:
            pass
        return [], []
    stamps, counts = [], []
    for frames in decode_blocks(vae, blocks):
        stamps.append(time.perf_counter() - (t0 or 0.0))
        counts.append(frames.shape[0])
    return stamps, counts


def compare(a: str, b: str) -> dict:
    """Latents of two runs (e.g. 1 vs 4 GPUs, or fp8 vs bf16): relative L2 per block."""
    x, y = (torch.load(p, weights_only=True).double() for p in (a, b))
    common = min(x.shape[2], y.shape[2])
    x, y = x[:, :, :common], y[:, :, :common]
    per_block = [rel_l2(x[:, :, i:i + 2], y[:, :, i:i + 2]) for i in range(0, common, 2)]
    return {"compare": [a, b], "rel_l2_per_block": per_block, "rel_l2_max": max(per_block),
            "max_abs": (x - y).abs().max().item()}
