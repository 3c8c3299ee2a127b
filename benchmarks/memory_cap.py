"""``bench.py --memory-cap-gib N``: one configuration run end to end, as the CLI runs it, inside N GiB of GPU memory.

A smaller GPU is emulated on a large one: the CUDA context (and anything other processes hold) is
measured and subtracted, and PyTorch's allocator is capped to the rest with
``torch.cuda.set_per_process_memory_fraction``. The run follows the CLI's order with random weights at
the release sizes: the DiT, VAE and wav2vec2 are loaded and set up (compiled, CUDA graphs, fp8 options);
the prompt and, for RealVideo, the idle prompt are encoded by the umT5-XXL encoder at full size, placed
as ``load_text_encoder`` places a file's (whole on the GPU when it fits, else its layers streamed from
host memory) and freed; the reference is encoded by the VAE and the audio by wav2vec2; blocks are sampled
and decoded (the streaming decode, overlapped). An out-of-memory error is caught and reported with the
stage it hit, not raised.

The context is counted as: the GPU's used memory before this process touched it (``nvidia-smi``; other
processes) subtracted from ``total - free`` (``torch.cuda.mem_get_info``) once the context, cuBLAS and
cuDNN are up (a tiny matmul, conv and attention ran), minus what the allocator reserved. Kernels loaded
later (compiled ones) grow it; it is measured again at the end, and a run passes when it finished
under the cap and the memory its tensors held at most plus the context at the end fit in N GiB
(:func:`judged` says why the allocator's cached reservation is not counted). With ``--fp8-kv-cache``
the allocator gets expandable segments, as the CLI gives it (``options.use_expandable_segments``).
"""

from __future__ import annotations

import gc
import os
import subprocess
import time
from argparse import Namespace
from dataclasses import dataclass

import torch

from livetalk_core.media.text_encoder import UMT5Config, UMT5Encoder, encode_text, release_text_encoder, streams_layers
from livetalk_core.options import ALLOCATOR_VARIABLES, use_expandable_segments

GIB = 2**30
UMT5_XXL = UMT5Config(vocab_size=256384, dim=4096, dim_attn=4096, dim_ffn=10240, num_heads=64, num_layers=24,
                      num_buckets=32, shared_pos=False)
PROMPT_TOKENS = 120  # the rest of the 512 are padding, as a real prompt's
RANDOM_BANK = 1 << 24  # random values the encoder's tensors are filled from (filling 5.7 B values one by one is slow)


@dataclass
class Cap:
    """The emulated GPU: ``gib`` in all, of which ``context_bytes`` outside PyTorch's allocator."""

    gib: float | None
    total_bytes: int
    other_processes_bytes: int
    context_bytes: int

    def outside_allocator_now(self, device: torch.device) -> int:
        """This process's GPU memory outside the allocator now (the context and kernels loaded since)."""
        free, total = torch.cuda.mem_get_info(device)
        return total - free - torch.cuda.memory_reserved(device) - self.other_processes_bytes


def is_out_of_memory(err: RuntimeError) -> bool:
    text = str(err)
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in text or "ALLOC_FAILED" in text


def used_before_init() -> tuple[int, str]:
    """The used bytes of this process's first GPU before it made its context (other processes), and how
    they were read."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip() or "0"
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i",
                              visible], capture_output=True, text=True, timeout=30, check=True).stdout
        return int(float(out.strip().splitlines()[0]) * 2**20), "nvidia-smi"
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return 0, "nvidia-smi unavailable: the GPU is taken to be empty before this process"


def start_context(device: torch.device) -> None:
    """Bring up the CUDA context, cuBLAS and cuDNN (what every run loads first) so they are counted."""
    a = torch.randn(64, 64, device=device, dtype=torch.bfloat16)
    (a @ a).sum().item()
    conv = torch.nn.functional.conv3d(a.view(1, 1, 4, 32, 32), torch.ones(1, 1, 3, 3, 3, device=device,
                                                                          dtype=torch.bfloat16))
    q = a.view(1, 1, 64, 64)
    torch.nn.functional.scaled_dot_product_attention(q, q, q).sum().item()
    del a, conv, q
    torch.cuda.synchronize(device)


def apply_cap(gib: float, device: torch.device) -> tuple[Cap, str]:
    """Cap this process's allocator so that it and the context fit in ``gib`` GiB; must run before any
    other CUDA work. Returns the cap and how the other processes' memory was read."""
    other, how = used_before_init()
    start_context(device)
    free, total = torch.cuda.mem_get_info(device)
    context = total - free - torch.cuda.memory_reserved(device) - other
    room = gib * GIB - context
    if room <= 0:
        raise SystemExit(f"--memory-cap-gib {gib}: the CUDA context alone takes {context / GIB:.2f} GiB")
    torch.cuda.set_per_process_memory_fraction(min(1.0, room / total), device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return Cap(gib, total, other, context), how


# --- the umT5-XXL encoder at full size, random weights ------------------------------------------------
def random_text_encoder(config: UMT5Config, device: torch.device, dtype: torch.dtype) -> UMT5Encoder:
    """A umT5 encoder of ``config`` with random weights, placed as ``load_text_encoder`` places a file's
    (the same decision, :func:`streams_layers`): whole on ``device`` when it has room, else in host
    memory with the layers streamed to ``device``."""
    with torch.device("meta"):
        model = UMT5Encoder(config)
    weight_bytes = sum(p.numel() for p in model.parameters()) * dtype.itemsize
    stream_to = device if streams_layers(weight_bytes, device) else None
    home = torch.device("cpu") if stream_to is not None else device
    bank = torch.randn(RANDOM_BANK, generator=torch.Generator().manual_seed(6)).to(home, dtype)
    state = {}
    for index, (name, p) in enumerate(model.state_dict().items()):
        value = torch.empty(p.shape, device=home, dtype=dtype)
        flat = value.view(-1)
        rotated = bank.roll(index)  # another order of the bank for each tensor
        for start in range(0, flat.numel(), RANDOM_BANK):
            piece = flat[start: start + RANDOM_BANK]
            piece.copy_(rotated[: piece.numel()])
        state[name] = value.add_(1) if "norm" in name else value.div_(p.shape[-1] ** 0.5)
    model.load_state_dict(state, assign=True)
    model.stream_to = stream_to
    return model.eval().requires_grad_(False)


def encode_prompts(count: int, config: UMT5Config, device: torch.device, dtype: torch.dtype,
                   log: dict) -> list[torch.Tensor]:
    """``count`` prompt contexts ``[1, 512, dim]`` on ``device``, encoded as the CLI encodes (the encoder
    loaded once, then freed); ``log`` gets whether it streamed and how long it took."""
    start = time.perf_counter()
    encoder = random_text_encoder(config, device, dtype)
    log["text_encoder_streamed"] = encoder.stream_to is not None
    contexts = []
    for seed in range(count):
        ids = torch.randint(1, config.vocab_size, (1, 512), generator=torch.Generator().manual_seed(seed))
        mask = (torch.arange(512) < PROMPT_TOKENS).long()[None]
        contexts.append(encode_text(encoder, ids, mask).to(device))
    release_text_encoder(encoder)
    del encoder
    gc.collect()
    log["text_encoder_s"] = time.perf_counter() - start
    return contexts


# --- the families, in the CLI's order -------------------------------------------------------------------
def run_livetalk(options: Namespace, device: torch.device, dtype: torch.dtype, stage: list[str], log: dict) -> None:
    import bench_livetalk
    from tiny_decoder import decoder_for

    stage[0] = "load the DiT, VAE and wav2vec2"
    pipe, _ = bench_livetalk.build(device, dtype, device, options.tiny)
    bench_livetalk.optimise(pipe, options)
    pipe.decoder = decoder_for(options, pipe.vae)
    stage[0] = "encode the prompt (umT5-XXL)"
    text_dim = pipe.dit.livetalk_config.core.text_dim
    (context,) = encode_prompts(1, text_encoder_config(text_dim, options.tiny), device, dtype, log)
    stage[0] = "encode the reference (VAE) and the audio (wav2vec2)"
    image = torch.randint(0, 255, (2 * options.size, 2 * options.size, 3), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(4))
    waveform = torch.randn(int(options.blocks * 0.75 * 16000), generator=torch.Generator().manual_seed(5)) * 0.1
    ref, audio = pipe.encode_reference(image, options.size, options.size), pipe.encode_audio(waveform)
    stage[0] = "sample and decode"
    log["frames"] = sum(chunk.shape[0] for chunk in pipe.stream(ref, audio, context.to(dtype), 0))


def run_realvideo(options: Namespace, device: torch.device, dtype: torch.dtype, stage: list[str], log: dict) -> None:
    import bench_realvideo
    from tiny_decoder import decoder_for

    from livetalk_core.options import PRECISION_OF_DTYPE, RuntimeOptions
    from livetalk_core.realvideo.parallel import sample_realvideo_parallel
    from livetalk_core.realvideo.sampler import realvideo_schedule
    from livetalk_core.runtime.noise import SeededNoise

    stage[0] = "load the DiT, VAE and wav2vec2"
    config, size = (bench_realvideo.TINY, 64) if options.tiny else (bench_realvideo.RELEASE, 512)
    model = build_s2v(config, device, dtype, fp8=options.fp8 or options.fp8_matmul, per_row=options.fp8_matmul)
    runtime = RuntimeOptions(precision=PRECISION_OF_DTYPE[dtype], compile=options.compile,
                             cuda_graphs=options.cuda_graphs, fp8_matmul=options.fp8_matmul,
                             fp8_kv_cache=options.fp8_kv_cache, device=device).validate()
    vae, encoder = bench_realvideo.build_encoders(device, dtype, options.tiny)
    runtime.apply(model, vae)
    decoding = decoder_for(options, vae)
    stage[0] = "encode the talking and idle prompts (umT5-XXL)"
    contexts = encode_prompts(2, text_encoder_config(config.core.text_dim, options.tiny), device, dtype, log)
    stage[0] = "encode the reference (VAE) and the audio (wav2vec2)"
    image, waveform, _ = bench_realvideo.user_inputs(config, size, dtype)
    inputs = bench_realvideo.encode_inputs(vae, encoder, image, waveform, [c.to(dtype) for c in contexts],
                                           size * size, dtype)
    stage[0] = "sample and decode"
    blocks = sample_realvideo_parallel(model, None, noise=SeededNoise(0), schedule=realvideo_schedule(options.steps),
                                       num_blocks=options.blocks, **inputs)
    log["frames"] = sum(bench_realvideo._decode_all(decoding, blocks, 0)[1])


@torch.no_grad()
def build_s2v(config, device: torch.device, dtype: torch.dtype, fp8: bool, per_row: bool):
    """The 14B DiT with random weights made on ``device`` one tensor at a time, as its loader makes a
    file's: with ``fp8`` the block and injector Linear weights are quantised as each is made (so the
    bf16 model never exists whole); ``per_row``: one scale per output channel, for fp8 matmuls."""
    from timing import random_value

    from livetalk_core.realvideo.model import S2VDiT
    from livetalk_core.wan.fp8_linear import quantize, to_fp8_linear, use_fp8_matmuls

    with torch.device("meta"):
        model = S2VDiT(config)
    fp8_layers = model.heavy_linears() if fp8 else {}
    generator = torch.Generator(device=device).manual_seed(0)
    tensors, scales = {}, {}
    for key, p in model.state_dict().items():
        value = random_value(key, p.shape, generator).to(dtype)
        if key in fp8_layers:
            tensors[key], scales[key] = quantize(value, per_row=per_row)
        else:
            tensors[key] = value
        del value
    model.load_state_dict(tensors, strict=True, assign=True)
    for key, module in fp8_layers.items():
        to_fp8_linear(module, scales[key])
    if per_row:
        use_fp8_matmuls(fp8_layers.values())
    return model.eval().requires_grad_(False)


def text_encoder_config(text_dim: int, tiny: bool) -> UMT5Config:
    """umT5-XXL, or under ``--tiny`` a small one of the DiT's text width."""
    if not tiny:
        return UMT5_XXL
    return UMT5Config(vocab_size=512, dim=text_dim, dim_attn=text_dim, dim_ffn=2 * text_dim, num_heads=2,
                      num_layers=2, num_buckets=32, shared_pos=False)


FAMILIES = {"livetalk": run_livetalk, "realvideo": run_realvideo}


def run(options: Namespace) -> dict:
    """One capped run. Options: family (livetalk / realvideo), memory_cap_gib, steps, blocks, compile,
    cuda_graphs, fp8 (weights), fp8_matmul, fp8_kv_cache, decoder, tiny (CPU, no cap: checks this code)."""
    device = torch.device("cpu" if options.tiny else "cuda", 0 if not options.tiny else None)
    dtype = torch.bfloat16 if device.type == "cuda" or options.fp8_matmul else torch.float32
    options.size = 64 if options.tiny else 512
    expandable = use_expandable_segments(getattr(options, "fp8_kv_cache", False))  # as the CLI: before CUDA starts
    cap, how = (apply_cap(options.memory_cap_gib, device) if device.type == "cuda"
                else (Cap(None, 0, 0, 0), "a CPU: no cap"))
    stage, log = ["start"], {}
    began = time.perf_counter()
    try:
        FAMILIES[options.family](options, device, dtype, stage, log)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        outcome = "pass"
    except RuntimeError as err:  # torch.OutOfMemoryError, or a library's failed allocation (cuBLAS, cuDNN)
        if not is_out_of_memory(err):
            raise
        outcome = "out of memory"
        log["error"] = str(err).splitlines()[0][:300]
    result = {
        "family": options.family, "cap_gib": cap.gib, "outcome": outcome, "stage": stage[0], "context_read": how,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU", "torch": torch.__version__,
        "wall_s": time.perf_counter() - began, "allocator": allocator_settings(expandable), **log,
    }
    if device.type == "cuda":
        end_context = max(cap.outside_allocator_now(device), cap.context_bytes)
        peak_allocated = torch.cuda.max_memory_allocated(device)
        result["outcome"], result["peak_gib"] = judged(outcome, cap.gib, peak_allocated, end_context)
        result.update(context_gib_start=cap.context_bytes / GIB, context_gib_end=end_context / GIB,
                      peak_allocated_gib=peak_allocated / GIB,
                      peak_reserved_gib=torch.cuda.max_memory_reserved(device) / GIB)
    return result


def judged(outcome: str, cap_gib: float, peak_allocated: int, context: int) -> tuple[str, float]:
    """The run's outcome and its peak in GiB: the memory its tensors held at most plus the CUDA context
    as it ended (kernels loaded on the way grow it). The allocator's reservation above what tensors
    hold is not counted: under the cap it gives cached blocks back and retries before it fails, so a
    run that finished needed no more (fragmentation that does matter fails the run itself). A finished
    run whose peak does not fit the cap is "over the cap (context grew)"."""
    peak = (peak_allocated + context) / GIB
    if outcome == "pass" and peak > cap_gib:
        return "over the cap (context grew)", peak
    return outcome, peak


def allocator_settings(set_here: bool) -> str:
    """The CUDA allocator's options for this run, and who set them."""
    value = next((os.environ[name] for name in ALLOCATOR_VARIABLES if name in os.environ), None)
    if value is None:
        return "default"
    return f"{value} ({'set for the fp8 KV cache, as the CLI does' if set_here else 'from the environment'})"
