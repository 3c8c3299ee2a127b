"""A live session at full size with random weights on one GPU, measured as a client sees it (docs/live.md).

    python3 benchmarks/bench_live.py --family livetalk --minutes 5 --json live_livetalk.json
    python3 benchmarks/bench_live.py --family realvideo --steps 2 --minutes 5 --json live_realvideo.json
    python3 benchmarks/bench_live.py --family livetalk --tiny --minutes 0.2     # a CPU dry run of this script

The standalone server (livetalk_core/live/server.py) runs in this process on 127.0.0.1 with the family's
session over random full-size models (the benchmarks' builders: bench_livetalk / bench_realvideo), and the
live client streams speech with pauses at real-time pace: the shipped speech clip, then 1 to 4 s in which
nothing is sent (a voice agent that stops talking; the avatar idles), again and again for ``--minutes``.
Printed and written: latency p50 / p95 (frame arrival minus the time its audio was sent), p95 of the first
and of the last minute (drift), stalls, dropped blocks, H.264 bitrate, GPU memory when the session started
and when it ended, where a block's time goes (the server's time to make a block against its length), and
Python's garbage collections during the session with the longest pauses (the client, the server and the
sampler share this one process; a full collection holds all of them).
Run each family on its own (one command per family keeps within the device's 10 minutes).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from livetalk_core.live.client import CHUNK_SECONDS, run_client  # noqa: E402
from livetalk_core.live.clock import LiveClock  # noqa: E402
from livetalk_core.live.server import LiveEndpoint, serving_in_thread  # noqa: E402
from livetalk_core.media.audio_file import load_audio  # noqa: E402
from livetalk_core.media.image import load_image  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RATE = 16_000
PAUSES_S = (1.0, 2.5, 4.0)  # the silences between utterances, in turn
MINUTE = 60.0


def speech_with_pauses(minutes: float) -> tuple[np.ndarray, dict[int, float]]:
    """The shipped clip repeated, and {sample offset: pause seconds} between repeats, covering ``minutes``."""
    chunk = int(CHUNK_SECONDS * RATE)
    clip = load_audio(REPO / "assets" / "speech.flac").numpy()
    clip = np.pad(clip, (0, -len(clip) % chunk))  # pauses fall on chunk boundaries
    parts, pauses, timeline, turn = [], {}, 0.0, 0
    while timeline < minutes * MINUTE:
        parts.append(clip)
        timeline += len(clip) / RATE
        pause = PAUSES_S[turn % len(PAUSES_S)]
        pauses[sum(len(p) for p in parts)] = pause
        timeline += pause
        turn += 1
    return np.concatenate(parts).astype(np.float32), pauses


def full_size_session_opener(options: argparse.Namespace):
    """(opener, family name): sessions over random full-size models of the family, built once, sharing one
    KV cache and its CUDA graphs as the live command's and node's do (session.WarmSessions)."""
    from livetalk_core.live.session import WarmSessions, open_session
    from livetalk_core.options import RuntimeOptions

    device, dtype = torch.device(options.device), torch.bfloat16
    if options.family == "livetalk":
        import bench_livetalk

        from livetalk_core.families import LIVETALK_13B as family
        pipe, context = bench_livetalk.build(device, dtype, device, tiny=False)
        dit, vae, encoder, talking, idle = pipe.dit, pipe.vae, pipe.audio_encoder, context, None
    else:
        import bench_realvideo

        from livetalk_core.families import REALVIDEO_14B as family
        dit = bench_realvideo.build_dit(bench_realvideo.RELEASE, device, dtype)
        vae, encoder = bench_realvideo.build_encoders(device, dtype, tiny=False)
        _, _, contexts = bench_realvideo.user_inputs(bench_realvideo.RELEASE, options.size, dtype)
        idle, talking = contexts[0].to(device), contexts[1].to(device)
    RuntimeOptions(precision="bf16", compile=options.compile, cuda_graphs=options.cuda_graphs,
                   fp8_matmul=options.fp8_matmul, fp8_kv_cache=options.fp8_kv_cache, device=device,
                   vae_device=device).validate().apply(dit, vae)
    image = load_image(REPO / "assets" / "portrait.jpg")

    def open_for(workspace, start):
        return open_session(family, dit=dit, vae=vae, audio_encoder=encoder, text=talking, idle_text=idle,
                            reference_image=image, width=options.size, height=options.size, steps=options.steps,
                            workspace=workspace)
    return WarmSessions(open_for), family.name


def tiny_session_opener(options: argparse.Namespace):
    from livetalk_core.live.session import open_smoke_session

    return (lambda start: open_smoke_session(options.family)), f"{options.family} (tiny, CPU)"


class MemoryWatch:
    """GPU memory when the session started (its first block) and when it ended (its last block)."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda") and torch.cuda.is_available()
        self.at_start: float | None = None
        self.at_end: float | None = None

    def on_block(self, block) -> None:
        if self.cuda:
            gib = torch.cuda.memory_allocated() / 2**30
            self.at_start = gib if self.at_start is None else self.at_start
            self.at_end = gib


def watched_clock(watch: MemoryWatch):
    """LiveClock, with ``watch`` told about every block before the server gets it."""
    def make(session, on_block, **kwargs):
        return LiveClock(session, lambda block: (watch.on_block(block), on_block(block)), **kwargs)
    return make


class GarbageCollections:
    """Python's garbage collections while the session runs (``with``), from ``gc.callbacks``: when, which
    generation, how long. A full collection walks every live object (the compiled models' too) and holds
    the process's threads meanwhile: the suspect for a lone slow block with no capture or recompile."""

    def __init__(self) -> None:
        self.pauses: list[tuple[float, int, float]] = []  # (seconds into the session, generation, seconds)
        self._origin = self._began = 0.0

    def __enter__(self) -> GarbageCollections:
        self._origin = time.perf_counter()
        gc.callbacks.append(self._on_collection)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self._on_collection)

    def _on_collection(self, phase: str, info: dict) -> None:
        now = time.perf_counter()
        if phase == "start":
            self._began = now
        else:
            self.pauses.append((round(self._began - self._origin, 3), info["generation"], round(now - self._began, 4)))

    def report(self) -> dict:
        longest = sorted(self.pauses, key=lambda pause: pause[2])[-3:][::-1]
        return {"collections": len(self.pauses), "full_collections": sum(g == 2 for _, g, _ in self.pauses),
                "seconds": round(sum(s for *_, s in self.pauses), 4),
                "longest": [{"at_s": at, "generation": g, "seconds": s} for at, g, s in longest]}


def where_the_time_goes(recording, block_seconds: float) -> dict:
    """The server's time to make each block against the audio it covers, and the slowest blocks (a recompile or
    a stall shows there); the late blocks' indices and arrival lateness for the stalls."""
    made = [b.header["generated_s"] for b in recording.blocks]
    slowest = sorted(range(len(made)), key=made.__getitem__)[-3:][::-1]
    return {"block_seconds": block_seconds, "generated_s_p50": round(float(np.median(made)), 4),
            "generated_s_p95": round(float(np.percentile(made, 95)), 4),
            "real_time_factor_p95": round(float(np.percentile(made, 95)) / block_seconds, 3),
            "slowest_blocks": [{"index": recording.blocks[i].header["index"], "generated_s": made[i]} for i in slowest]}


def warm_up(opener) -> tuple[int, float]:
    """Open and close a session before the client connects: the live command's and node's sessions warm up
    (compile, CUDA graphs) before the first one is handed out, which would otherwise hold the client's start.
    Returns the warm-up sessions run and the seconds they took."""
    began = time.perf_counter()
    opener(None).close()
    return getattr(opener, "warm_up_sessions", 0), round(time.perf_counter() - began, 1)


def run(options: argparse.Namespace) -> dict:
    audio, pauses = speech_with_pauses(options.minutes)
    opener, name = tiny_session_opener(options) if options.tiny else full_size_session_opener(options)
    warm_up_sessions, warm_up_seconds = warm_up(opener)
    watch = MemoryWatch(options.device)
    endpoint = LiveEndpoint(open_session=opener, family=name, clock=watched_clock(watch))
    started = time.perf_counter()
    with GarbageCollections() as collections, serving_in_thread(endpoint) as url:
        recording = run_client(url, audio, pauses=pauses, coverage_timeout=options.minutes * MINUTE + 600)
    total = time.perf_counter() - started
    report = recording.report()
    streamed = len(audio) / RATE + sum(pauses.values())
    block_seconds = recording.blocks[-1].header["audio_samples"] / RATE
    report.update({
        "family": name, "steps": options.steps, "device": options.device, "warm_up_sessions": warm_up_sessions,
        "warm_up_seconds": warm_up_seconds,
        "gpu": torch.cuda.get_device_name() if watch.cuda else "cpu", "torch": torch.__version__,
        "compile": options.compile, "fp8_matmul": options.fp8_matmul, "fp8_kv_cache": options.fp8_kv_cache,
        "session_seconds": round(streamed, 1), "wall_seconds": round(total, 1),
        "latency_p95_first_minute_s": recording.latency_p95_between(0, MINUTE),
        "latency_p95_last_minute_s": recording.latency_p95_between(streamed - MINUTE, streamed + MINUTE),
        "gpu_gib_at_start": watch.at_start, "gpu_gib_at_end": watch.at_end,
        "gpu_gib_peak": torch.cuda.max_memory_allocated() / 2**30 if watch.cuda else None,
        "server": endpoint.last.__dict__, "time": where_the_time_goes(recording, block_seconds),
        "garbage_collections": collections.report(),
    })
    return report


def summary(r: dict) -> str:
    drift = None if None in (r["latency_p95_first_minute_s"], r["latency_p95_last_minute_s"]) else \
        r["latency_p95_last_minute_s"] - r["latency_p95_first_minute_s"]
    return "\n".join([
        f"{r['family']}  steps={r['steps']}  {r['width']}x{r['height']}  on {r['gpu']}  "
        f"({r['session_seconds']} s session)",
        f"latency p50 {r['latency_p50_s']} s  p95 {r['latency_p95_s']} s  (first minute p95 "
        f"{r['latency_p95_first_minute_s']}, last minute p95 {r['latency_p95_last_minute_s']}, drift {drift})",
        f"stalls {r['stalls']} ({r['stall_seconds']} s)  dropped blocks {r['dropped_blocks']}  "
        f"bitrate {r['bitrate_mbps']} Mbit/s  frames {r['frames']}",
        f"GPU memory: {r['gpu_gib_at_start']} GiB at the start, {r['gpu_gib_at_end']} GiB at the end, "
        f"peak {r['gpu_gib_peak']}",
        f"a block: {r['time']['block_seconds']} s of audio, made in {r['time']['generated_s_p50']} s (p50) / "
        f"{r['time']['generated_s_p95']} s (p95); slowest {r['time']['slowest_blocks']}",
        f"garbage collections {r['garbage_collections']['collections']} "
        f"({r['garbage_collections']['full_collections']} full, {r['garbage_collections']['seconds']} s); "
        f"longest {r['garbage_collections']['longest']}",
    ])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--family", choices=("livetalk", "realvideo"), required=True)
    p.add_argument("--minutes", type=float, default=5.0, help="length of the session (default %(default)s)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the family's; RealVideo: 2)")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--device", default="cuda")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--fp8-matmul", action="store_true")
    p.add_argument("--fp8-kv-cache", action="store_true")
    p.add_argument("--tiny", action="store_true", help="tiny random models on the CPU: checks this script")
    p.add_argument("--json", type=Path, default=None, help="write the report here")
    options = p.parse_args()
    if options.steps is None and options.family == "realvideo":
        options.steps = 2
    if options.tiny:
        options.device, options.compile = "cpu", False
    report = run(options)
    print(summary(report))
    if options.json:
        options.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
