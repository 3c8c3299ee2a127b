"""Where block 0 of a LiveTalk 1.3B live session goes (the live mode's start), on a warm server, with the
host's CPU side as it is and slowed (``timing.contended_cpu``, ``--spinners``): the audio window's wav2vec2 + audio
embedding, the DiT's block 0 (4 forwards from CUDA graphs, the sampler's host work between them), the
decode of its 3 latent frames to frames on the host. Each part is timed between GPU synchronisations
(which add a little to the total), medians over the sessions.

    python3 benchmarks/live_block0.py [--decoder tiny] [--sessions 5] [--spinners 1 3] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_livetalk  # noqa: E402
from timing import contended_cpu, median, synchronize  # noqa: E402
from tiny_decoder import DECODERS, decoder_for  # noqa: E402

from livetalk_core.live import session as live_session  # noqa: E402
from livetalk_core.livetalk import live as livetalk_live  # noqa: E402


def timed(parts: dict[str, float], name: str, fn):
    """``fn`` wrapped: each call's wall time, GPUs synchronised before and after, added to ``parts[name]``."""
    def wrapper(*args, **kwargs):
        synchronize()
        began = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            synchronize()
            parts[name] = parts.get(name, 0.0) + (time.perf_counter() - began) * 1e3
    return wrapper


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--decoder", choices=DECODERS, default="tiny")
    p.add_argument("--sessions", type=int, default=5)
    p.add_argument("--spinners", type=int, nargs="+", default=[1],
                   help="slowed hosts to measure: processes spinning on this thread's core (1: about half speed)")
    p.add_argument("--tiny", action="store_true", help="tiny models on the CPU: checks this script, not the speed")
    options = p.parse_args()
    device = torch.device("cpu" if options.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    options.compile, options.cuda_graphs, options.fp8_matmul, options.fp8_kv_cache = device.type == "cuda", True, \
        False, False
    pipe, context = bench_livetalk.build(device, dtype, device, options.tiny)
    bench_livetalk.optimise(pipe, options)
    decoder = decoder_for(options, pipe.vae)
    size = 64 if options.tiny else 512
    image = torch.randint(0, 255, (size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    waveform = torch.randn(16000 * 4, generator=torch.Generator().manual_seed(5)) * 0.1

    sessions = bench_livetalk.warm_live_sessions(pipe, image, context, size, None if decoder is pipe.vae else decoder)
    parts: dict[str, float] = {}
    livetalk_live.block_embeds = timed(parts, "audio_ms", livetalk_live.block_embeds)
    live_session.LiveSession._decode = timed(parts, "decode_ms", live_session.LiveSession._decode)
    live_session.LiveSession._make_block = timed(parts, "block0_ms", live_session.LiveSession._make_block)
    report = {"gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
              "decoder": options.decoder, "settled": sessions.workspace.settled}
    for spinners in (0, *options.spinners):
        runs = []
        with contended_cpu(spinners):
            for _ in range(options.sessions):
                parts.clear()
                with sessions() as session:
                    session.push_audio(waveform[: session.audio_needed()].numpy())
                    session.next_block()
                runs.append(dict(parts, dit_and_rest_ms=parts["block0_ms"] - parts["audio_ms"] - parts["decode_ms"]))
        name = f"slow host, {spinners} spinner(s)" if spinners else "host"
        report[name] = {k: round(median([r[k] for r in runs]), 1) for k in runs[0]}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
