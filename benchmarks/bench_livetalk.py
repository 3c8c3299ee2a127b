"""The LiveTalk 1.3B configuration of ``bench.py`` (full size, random weights).

Builds the real geometry (DiT dim 1536 x 30 layers, Wan2.1 VAE, wav2vec2-base) with random bf16
weights and runs the shipped :class:`~livetalk_core.livetalk.pipeline.LiveTalkPipeline` at 512x512: 3 latent
frames (12 video frames) per block, 4 denoising steps + the refresh pass, KV window 15 with 9 sinks.
"""

from __future__ import annotations

import copy
import tempfile
import time
from argparse import Namespace
from pathlib import Path

import torch
from timing import (
    contended_cpu,
    gpu_ms,
    gpu_name,
    median,
    peak_gib,
    random_init_,
    rel_l2,
    reset_peak,
    synchronize,
    wall_ms,
)
from tiny_decoder import decoder_for

from livetalk_core.livetalk.model import LiveTalkConfig, LiveTalkDiT, load_livetalk_dit
from livetalk_core.livetalk.pipeline import LiveTalkPipeline
from livetalk_core.media.vae import VAEConfig, WanVAE, frames_to_uint8, load_vae
from livetalk_core.media.wav2vec2 import AudioEncoder, load_audio_encoder
from livetalk_core.options import PRECISION_OF_DTYPE, RuntimeOptions
from livetalk_core.runtime.decode_stream import decode_blocks
from livetalk_core.runtime.workspace import Workspace
from livetalk_core.wan.dit import WanCoreConfig

FULL_DIT = WanCoreConfig(dim=1536, in_dim=33, out_dim=16, ffn_dim=8960, num_layers=30, text_dim=4096)
VIDEO_FRAMES_PER_BLOCK = 12


def build(
    device: torch.device, dtype: torch.dtype, vae_device: torch.device, tiny: bool
) -> tuple[LiveTalkPipeline, torch.Tensor]:
    """The pipeline and a random text context: full size, or the smoke test's tiny files (``tiny``)."""
    if tiny:
        from livetalk_core.smoke import build_tiny_weights, load_context

        files = build_tiny_weights(Path(tempfile.mkdtemp(prefix="bench-tiny-")))
        pipe = LiveTalkPipeline(load_livetalk_dit(files.dit, dtype, device), load_vae(files.vae, dtype, vae_device),
                                load_audio_encoder(files.wav2vec2, dtype, device))
        return pipe, load_context(files.context).to(device, dtype)
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    dit = LiveTalkDiT(LiveTalkConfig(core=FULL_DIT, audio_features=14 * 768)).to(device, dtype)
    random_init_(dit, 0)
    vae = WanVAE(VAEConfig()).to(vae_device, dtype)
    random_init_(vae, 1)
    torch.manual_seed(2)
    w2v = Wav2Vec2Model(Wav2Vec2Config()).to(device, dtype).eval()
    pipe = LiveTalkPipeline(dit.eval().requires_grad_(False), vae.eval().requires_grad_(False),
                            AudioEncoder(w2v, do_normalize=True, source=Path("random")))
    context = torch.randn(1, 512, FULL_DIT.text_dim, generator=torch.Generator().manual_seed(3)).to(device, dtype)
    return pipe, context


def runtime_options(pipe: LiveTalkPipeline, options: Namespace) -> RuntimeOptions:
    """The benchmark's options for ``pipe``, where it is and in its dtype (``compile``: on any device)."""
    return RuntimeOptions(
        precision=PRECISION_OF_DTYPE[pipe.dit.dtype], compile=options.compile, cuda_graphs=options.cuda_graphs,
        fp8_matmul=options.fp8_matmul, fp8_kv_cache=options.fp8_kv_cache, device=pipe.dit.device,
        vae_device=next(pipe.vae.parameters()).device,
    ).validate()


def optimise(pipe: LiveTalkPipeline, options: Namespace) -> None:
    runtime_options(pipe, options).apply(pipe.dit, pipe.vae)


def check_against_eager(pipe: LiveTalkPipeline, image, waveform, context, options: Namespace) -> dict:
    """The optimised path against the plain eager bf16 one on the same inputs: latents per block, and
    the VAE's frames (with eager bf16 vs float32 as the yardstick). Leaves ``pipe`` optimised."""
    # the whole clip: CUDA graphs replay from the 8th block on (a slot mapping's second block)
    ref, audio = pipe.encode_reference(image, options.size, options.size), pipe.encode_audio(waveform)
    eager = list(pipe.sample(ref, audio, context, 0))
    eager_frames = torch.cat(list(pipe.decode(iter(eager[:3]))))
    vae32 = copy.deepcopy(pipe.vae).float()
    fp32_frames = torch.cat(list(decode_blocks(vae32, iter(eager[:3]))))
    del vae32
    optimise(pipe, options)
    optimised = list(pipe.sample(ref, audio, context, 0))
    frames = torch.cat(list(pipe.decode(iter(eager[:3]))))
    vae_difference = (frames.int() - eager_frames.int()).abs()
    yardstick = (eager_frames.int() - fp32_frames.int()).abs()
    return {
        "dit_per_block": [{"max_abs": (a.double() - b.double()).abs().max().item(), "rel_l2": rel_l2(a, b)}
                          for a, b in zip(optimised, eager)],
        "vae_frames_uint8": {"max_abs": vae_difference.max().item(), "mean_abs": vae_difference.float().mean().item()},
        "vae_eager_bf16_vs_fp32_uint8": {
            "max_abs": yardstick.max().item(), "mean_abs": yardstick.float().mean().item()
        },
    }


def first_frames(pipe: LiveTalkPipeline, image, clip, context, options: Namespace,
                 workspace: Workspace | None = None) -> list[float]:
    """Seconds from image + audio in to the first and to the first generated frame out of ``stream()``."""
    synchronize()
    stamps, t0 = [], time.perf_counter()
    if getattr(options, "serial_encoders", False):  # the A/B: one encoder after the other
        first_inputs = pipe.encode_reference(image, options.size, options.size), pipe.encode_audio(clip)
    else:
        first_inputs = pipe.encode_inputs(image, clip, options.size, options.size)  # at the same time, as the CLI
    frames = pipe.stream(*first_inputs, context, 0, workspace=workspace)
    for _ in range(2):
        next(frames)
        stamps.append(time.perf_counter() - t0)
    frames.close()
    return stamps


def kept_workspace_first_frames(pipe: LiveTalkPipeline, image, waveform, clip, context,
                                options: Namespace) -> dict:
    """The first frames of a run in a :class:`Workspace` kept from earlier runs, as every live session
    after the server's warm-up runs (and a Python caller that keeps one): block 0 replays its CUDA
    graphs. Warm-up runs on another clip until the workspace settles (every forward from a graph)."""
    workspace = Workspace()
    ref, audio = pipe.encode_reference(image, options.size, options.size), pipe.encode_audio(waveform[: 16000 * 3])
    runs = 0
    while runs < 3:
        runs += 1
        for _ in pipe.stream(ref, audio, context, 0, workspace=workspace):
            pass
        if workspace.settled or not workspace.uses_graphs:
            break
    stamps = first_frames(pipe, image, clip, context, options, workspace)
    replayed = workspace.settled
    workspace.free()
    return {"kept_workspace_first_frame_s": stamps[0], "kept_workspace_first_generated_frame_s": stamps[1],
            "kept_workspace_warm_up_runs": runs, "kept_workspace_block0_replayed": replayed}


def audio_graph_identical(pipe: LiveTalkPipeline, waveform, workspace: Workspace) -> bool | None:
    """Whether block 0's audio window gives the same features from the workspace's graph as eagerly (the
    same kernels on the same shapes); None where the encoder has no graphs."""
    from livetalk_core.live.session import DEFAULT_CONTEXT_S, DEFAULT_LOOKAHEAD_S, seconds_to_samples
    from livetalk_core.livetalk.live import block_features, block_window
    from livetalk_core.runtime.live_stream import LiveWindow

    graphs = workspace.module_graphs(pipe.audio_encoder.model)
    if graphs is None:
        return None
    window = LiveWindow(seconds_to_samples(DEFAULT_CONTEXT_S), seconds_to_samples(DEFAULT_LOOKAHEAD_S))
    start, end = block_window(0, window)
    audio, encoder = waveform[start:end], pipe.audio_encoder
    return torch.equal(block_features(encoder, 0, audio, window, graphs), block_features(encoder, 0, audio, window))


def decoder_graph_identical(decoder, workspace: Workspace, size: int) -> bool | None:
    """Whether a tiny decoder's stream gives the same frames from the workspace's graphs as eagerly, over a
    session's block shapes (block 0 one latent frame at a time, then whole blocks); None where none replays."""
    if decoder is None or workspace.module_graphs(decoder) is None:
        return None
    g = torch.Generator().manual_seed(6)
    shapes = [(1, 16, 1, size // 8, size // 8)] * 3 + [(1, 16, 3, size // 8, size // 8)] * 2
    pieces = [torch.randn(shape, generator=g).to(decoder.device, decoder.dtype) for shape in shapes]
    replayed, eager = decoder.stream_decoder(workspace.module_graphs), decoder.stream_decoder()
    return all(torch.equal(replayed.decode(p), eager.decode(p)) for p in pieces)


LIVE_SESSIONS = 3  # client sessions per live measurement (each one block 0)


def warm_live_sessions(pipe: LiveTalkPipeline, image, context, size: int, decoder=None):
    """A warm server's sessions over this pipeline's models (``session.WarmSessions``, as the live command and
    node run them; ``decoder`` None: the VAE decodes), its warm-up sessions already run."""
    from livetalk_core.families import LIVETALK_13B
    from livetalk_core.live.session import WarmSessions, open_session

    def open_for(workspace, start):
        return open_session(LIVETALK_13B, dit=pipe.dit, vae=pipe.vae, audio_encoder=pipe.audio_encoder, text=context,
                            reference_image=image, width=size, height=size, decoder=decoder, workspace=workspace)
    sessions = WarmSessions(open_for)
    sessions().close()
    return sessions


def live_first_blocks(pipe: LiveTalkPipeline, image, waveform, context, options: Namespace) -> dict:
    """Block 0 of live sessions on a warm server (``session.WarmSessions`` over this pipeline's models and
    decoder, as the live command and node run them): seconds from its audio in to its frames on the host
    (``LiveBlock.generated_s``: the audio window's wav2vec2, the DiT's block 0, its decode; the reference was
    encoded when the session opened). The audio encoder and the tiny decoder replaying from the workspace's
    graphs, and both eager; each also with the host's CPU side slowed (:func:`timing.contended_cpu`, a slow
    host on this one)."""
    decoder = None if pipe.decoder is pipe.vae else pipe.decoder
    sessions = warm_live_sessions(pipe, image, context, options.size, decoder)
    workspace = sessions.workspace
    result = {"live_warm_up_sessions": sessions.warm_up_sessions,
              "live_audio_graph_identical_to_eager": audio_graph_identical(pipe, waveform, workspace),
              "live_decoder_graph_identical_to_eager": decoder_graph_identical(decoder, workspace, options.size)}
    for slow in (False, True):
        for graphed in (True, False):
            if not graphed:
                workspace.module_graphs = lambda module: None  # the A/B: audio encoder and tiny decoder eager
            made = []
            with contended_cpu(int(slow)):
                for _ in range(LIVE_SESSIONS):
                    with sessions() as session:
                        session.push_audio(waveform[: session.audio_needed()].numpy())
                        made.append(session.next_block().generated_s)
            vars(workspace).pop("module_graphs", None)
            name = f"live_block0_s{'_slow_host' if slow else ''}{'' if graphed else '_encoder_decoder_eager'}"
            result[name] = median(made)
            result[name + "_all"] = made
    result["live_block0_replayed"] = workspace.settled
    sessions.free()
    return result


@torch.no_grad()
def run(options: Namespace) -> dict:
    """Options: tiny, blocks, compile, cuda_graphs, fp8_matmul, fp8_kv_cache, vae_device, check, long_seconds."""
    device = torch.device("cuda" if torch.cuda.is_available() and not options.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" or options.fp8_matmul else torch.float32
    vae_device = torch.device(options.vae_device) if options.vae_device else device
    options.size = 64 if options.tiny else 512
    reset_peak(device)
    start = time.perf_counter()
    pipe, context = build(device, dtype, vae_device, options.tiny)
    image = torch.randint(0, 255, (2 * options.size, 2 * options.size, 3), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(4))
    waveform = torch.randn(int(options.blocks * 0.75 * 16000), generator=torch.Generator().manual_seed(5)) * 0.1
    checks = check_against_eager(pipe, image, waveform, context, options) if options.check else None
    if not options.check:
        optimise(pipe, options)
    pipe.decoder = decoder_for(options, pipe.vae)  # --decoder tiny: the tiny decoder decodes, the VAE encodes
    synchronize()
    build_s = time.perf_counter() - start

    # warm-up: compile, cuDNN plans, the allocator (a clip of another length than the timed ones)
    start = time.perf_counter()
    for _ in pipe.stream(pipe.encode_reference(image, options.size, options.size),
                         pipe.encode_audio(waveform[: 16000 * 2]), context, 0):
        pass
    synchronize()
    warmup_s = time.perf_counter() - start
    reset_peak(device)

    # first frames as the CLI sees them: image + audio + context in -> frames out of stream()
    # (the pinned reference frame first, decoded before the DiT runs; then block 0's first latent frame)
    clip = waveform[: 16000 * 4 + 1234]  # a clip length not seen before
    stamps = first_frames(pipe, image, clip, context, options)
    kept = kept_workspace_first_frames(pipe, image, waveform, clip, context, options)
    live = live_first_blocks(pipe, image, waveform, context, options)
    # the same steps one at a time, for the breakdown
    ref, encode_image_ms = wall_ms(lambda: pipe.encode_reference(image, options.size, options.size))
    audio, encode_audio_ms = wall_ms(lambda: pipe.encode_audio(waveform))
    _, encode_both_ms = wall_ms(lambda: pipe.encode_inputs(image, waveform, options.size, options.size))
    decoder = pipe.decoder.stream_decoder()
    _, reference_frame_ms = wall_ms(lambda: frames_to_uint8(decoder.decode(ref.to(dtype))).cpu())
    blocks = pipe.sample(ref, audio, context, 0)
    block0, dit0_ms = wall_ms(lambda: next(blocks))
    _, generated_ms = wall_ms(lambda: frames_to_uint8(decoder.decode(block0[:, :, 1:2])).cpu())
    decoder.decode(block0[:, :, 2:])

    # steady blocks: DiT (previous block's refresh pass + 4 denoising forwards) and VAE, CUDA events
    dit_ms, vae_ms = [], []
    while True:
        block, ms = gpu_ms(lambda: next(blocks, None), device)
        if block is None:
            break
        dit_ms.append(ms)
        vae_ms.append(gpu_ms(lambda: decoder.decode(block), vae_device)[1])
    peak = peak_gib(device)
    peak_vae = peak_gib(vae_device) if vae_device != device else None

    # end to end as the CLI runs it: frames out per second, the decode after each block or overlapped
    end_to_end, outputs = {}, {}
    for overlap in (False, True):
        synchronize()
        stamps_out, chunks = [], []
        for chunk in pipe.stream(ref, audio, context, 0, overlap=overlap):
            stamps_out.append(time.perf_counter())
            chunks.append(chunk)
        fill = 4  # block 0 comes out in three pieces, block 1 fills the pipeline
        end_to_end[overlap] = sum(c.shape[0] for c in chunks[fill + 1:]) / (stamps_out[-1] - stamps_out[fill])
        outputs[overlap] = torch.cat(chunks)
    dit, vae = median(dit_ms), median(vae_ms)
    result = {
        "config": "livetalk-1.3b",
        "steps": 4,
        "gpus": 1,
        "gpu": gpu_name(device),
        "torch": torch.__version__,
        "compile": options.compile,
        "cuda_graphs": runtime_options(pipe, options).cuda_graphs_reason() is None,  # whether graphs replayed
        "fp8_matmul": options.fp8_matmul,
        "fp8_kv_cache": options.fp8_kv_cache,
        "vae_device": str(vae_device),
        "decoder": getattr(options, "decoder", "full"),
        "frames_per_block": VIDEO_FRAMES_PER_BLOCK,
        "dit_ms_per_block": dit,
        "vae_ms_per_block": vae,
        "fps_serial": VIDEO_FRAMES_PER_BLOCK / ((dit + vae) / 1e3),
        "fps_pipelined_bound": VIDEO_FRAMES_PER_BLOCK / (max(dit, vae) / 1e3),
        "fps_end_to_end_serial": end_to_end[False],
        "fps_end_to_end_pipelined": end_to_end[True],
        "first_frame_s": stamps[0],
        "first_generated_frame_s": stamps[1],
        **kept,
        **live,
        "serial_encoders": getattr(options, "serial_encoders", False),
        "first_frame_parts_ms": {"encode_image": encode_image_ms, "encode_audio": encode_audio_ms,
                                 "encode_image_and_audio_at_once": encode_both_ms,
                                 "decode_reference_frame": reference_frame_ms, "dit_block0": dit0_ms,
                                 "decode_first_generated_latent_frame": generated_ms},
        "peak_gib": peak,
        "peak_gib_vae_device": peak_vae,
        "build_s": build_s,
        "warmup_s": warmup_s,
        "checks": {
            **(checks or {}), "pipelined_frames_identical_to_serial": torch.equal(outputs[False], outputs[True])
        },
        "dit_ms_all": dit_ms,
        "vae_ms_all": vae_ms,
    }
    if options.long_seconds:
        result["long_run"] = long_video(pipe, image, context, options.long_seconds, options.size)
    return result


def long_video(pipe: LiveTalkPipeline, image: torch.Tensor, context: torch.Tensor, seconds: float, size: int) -> dict:
    """The CLI's path for a long clip: sample, decode (overlapped) and stream the mp4 to disk, while
    GPU memory and the process's resident memory are sampled after every block."""
    import resource

    from livetalk_core.media.video_io import VideoWriter, read_video_info

    waveform = torch.randn(int(seconds * 16000)) * 0.1
    device = pipe.dit.device
    synchronize()
    reset_peak(device)
    start = time.perf_counter()
    audio = pipe.encode_audio(waveform)
    gpu_gib, rss_gib = [], []
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "long.mp4"
        with VideoWriter(out, fps=16, audio=waveform) as writer:
            for frames in pipe.stream(pipe.encode_reference(image, size, size), audio, context, 0):
                writer.write(frames)
                gpu_gib.append(torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0)
                rss_gib.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
        elapsed = time.perf_counter() - start
        info = read_video_info(out)
    quarter = max(1, len(gpu_gib) // 4)
    return {
        "audio_s": seconds, "frames": info["frames"], "wall_s": elapsed, "fps": info["frames"] / elapsed,
        "has_audio": info["has_audio"],
        "gpu_allocated_gib_after_block": {
            "first_quarter_max": max(gpu_gib[:quarter]), "last_quarter_max": max(gpu_gib[-quarter:])
        },
        "gpu_peak_gib": peak_gib(device),
        "max_rss_gib": {"after_first_quarter": rss_gib[quarter - 1], "at_end": rss_gib[-1]},
    }
