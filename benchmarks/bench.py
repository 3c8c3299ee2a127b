"""Speed and memory of both model paths at full size with random weights: one table and one JSON.

    python3 benchmarks/bench.py --json bench.json                          # all three on one GPU
    python3 benchmarks/bench.py --configs livetalk --fp8-kv-cache --fp8-matmul
    python3 benchmarks/bench.py --configs livetalk --vae-device cuda:1     # the VAE on a second GPU
    torchrun --standalone --nproc_per_node=4 benchmarks/bench.py --configs realvideo-2   # sequence parallel
    python3 benchmarks/bench.py --compare RUN_A/latents_2step.pt RUN_B/latents_2step.pt
    python3 benchmarks/bench.py --tiny                                     # a CPU dry run of this script
    python3 benchmarks/bench.py --decoder tiny     # the tiny decoder (TAEHV) decodes instead of the VAE
    python3 benchmarks/bench.py --configs realvideo-2 --fp8 --memory-cap-gib 24 --blocks 4   # a 24 GB GPU
    python3 benchmarks/vram_table.py               # every row of the README's GPU table, each capped
    python3 benchmarks/bench.py --configs livetalk --decoder tiny [--serial-encoders]   # first-frame A/B

Configurations: ``livetalk`` (1.3B, 512x512, 3 latent frames per block, window 15 with 9 sinks, 4 steps
+ refresh), ``realvideo-2`` and ``realvideo-4`` (14B, 512x512, 2 latent frames per block, 2 or 4
steps + refresh; the model is built once for both). Each is built, compiled and warmed up, then
timed. Per configuration: DiT ms per block (denoising + refresh, CUDA events), VAE ms per block,
FPS serial (DiT then VAE) and pipelined (the CLI's streaming decode, block k decoded while k+1
samples, frames on the host), first-frame latency (image + audio + prompt embeddings in -> first
decoded frame out, encoders included; for the 1.3B also in a workspace kept from earlier runs, where
block 0 replays its CUDA graphs as in every live session), for the 1.3B the live mode's start: block 0 of
a session on a warm server, its audio in to its frames out (the audio encoder from its graphs and eager,
and on a slowed host side: this thread sharing its CPU core with a spinning process), peak GPU memory, build and warm-up
(compile) time, GPU, torch.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_livetalk  # noqa: E402
import bench_realvideo  # noqa: E402
import memory_cap  # noqa: E402
from tiny_decoder import DECODERS  # noqa: E402

from livetalk_core.parallel import sequence_parallel  # noqa: E402

CONFIGS = ("livetalk", "realvideo-2", "realvideo-4")
COLUMNS = (
    ("config", "{}"), ("dit_ms_per_block", "{:.1f}"), ("vae_ms_per_block", "{:.1f}"), ("fps_serial", "{:.1f}"),
    ("fps_end_to_end_pipelined", "{:.1f}"), ("first_frame_s", "{:.3f}"), ("first_generated_frame_s", "{:.3f}"),
    ("kept_workspace_first_generated_frame_s", "{:.3f}"), ("live_block0_s", "{:.3f}"),
    ("live_block0_s_slow_host", "{:.3f}"),
    ("peak_gib", "{:.2f}"), ("warmup_s", "{:.1f}"), ("build_s", "{:.1f}"),
)
HEADERS = ("config", "DiT ms/block", "VAE ms/block", "FPS serial", "FPS pipelined", "first frame s",
           "first generated s", "same, kept workspace", "live block 0 s", "same, slow host", "peak GiB", "warm-up s",
           "build s")


def table(results: list[dict]) -> str:
    rows = [HEADERS] + [tuple("-" if r.get(k) is None else f.format(r[k]) for k, f in COLUMNS) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADERS))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    first = results[0] if results else {}
    shown = ("compile", "cuda_graphs", "fp8_matmul", "fp8_kv_cache", "decoder")
    options = ", ".join(f"{k}={first.get(k)}" for k in shown)
    return "\n".join([f"GPU: {first.get('gpu')}  torch {first.get('torch')}  ({options})", *lines])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of {', '.join(CONFIGS)}")
    p.add_argument("--blocks", type=int, default=12, help="blocks per timed run")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="regional torch.compile of the DiT blocks and the VAE's conv steps "
                   "(the shipped default on GPUs)")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                   help="with --compile: replay the DiT's forwards as CUDA graphs (the shipped default)")
    p.add_argument("--fp8-matmul", action="store_true", help="fp8 x fp8 matmuls for the DiT's block Linears")
    p.add_argument("--fp8-kv-cache", action="store_true", help="the KV cache in fp8")
    p.add_argument("--decoder", choices=DECODERS, default="full",
                   help="full: the Wan VAE decodes (the shipped default); tiny: the tiny decoder (TAEHV, random "
                   "weights at the released size), faster at lower quality; the VAE still encodes the reference")
    p.add_argument("--memory-cap-gib", type=float, default=None,
                   help="emulate a GPU of this many GiB (the CUDA context included): one configuration run end to "
                   "end as the CLI runs it, the umT5-XXL prompt encoding included; reports pass or out of memory "
                   "and the peak (benchmarks/memory_cap.py) instead of the timings")
    p.add_argument("--fp8", action="store_true",
                   help="with --memory-cap-gib, RealVideo: fp8 weights (the CLI's --fp8), made fp8 as they load")
    p.add_argument("--serial-encoders", action="store_true",
                   help="LiveTalk: the first frame's reference and audio encoded one after the other (as before "
                   "issue 19), not at the same time: the A/B of the first-frame latency")
    p.add_argument("--check", action="store_true", help="also compare the optimised path with plain eager bf16")
    p.add_argument("--vae-device", default=None, help="LiveTalk: the VAE on another GPU, e.g. cuda:1")
    p.add_argument("--long-seconds", type=float, default=0, help="LiveTalk: also write an mp4 of this many seconds")
    p.add_argument("--out", default=None, help="RealVideo: folder for the latents (for --compare)")
    p.add_argument("--json", type=Path, default=None, help="write every result here")
    p.add_argument("--tiny", action="store_true", help="tiny models on the CPU: checks this script, not the speed")
    p.add_argument("--compare", nargs=2, metavar=("LATENTS_A", "LATENTS_B"), help="compare two runs' latents")
    args = p.parse_args()
    if args.compare:
        print(json.dumps(bench_realvideo.compare(*args.compare), indent=1))
        return
    configs = args.configs.split(",")
    unknown = set(configs) - set(CONFIGS)
    if unknown:
        p.error(f"unknown configuration(s) {', '.join(sorted(unknown))}; use {', '.join(CONFIGS)}")
    if args.tiny:
        args.compile = False
    if args.fp8 and args.memory_cap_gib is None:
        p.error("--fp8 (fp8 weights) is read by the capped run only: add --memory-cap-gib, or use --fp8-matmul")
    if args.memory_cap_gib is not None:
        capped_run(args, configs, p)
        return
    sp = sequence_parallel.init_from_env("gloo" if args.tiny else None)
    if sp is not None and "livetalk" in configs:
        p.error("the LiveTalk 1.3B configuration runs on one GPU: leave it out under torchrun")
    results = []
    if "livetalk" in configs:
        results.append(bench_livetalk.run(argparse.Namespace(**vars(args))))
        gc.collect()
        torch.cuda.empty_cache()
    steps = [int(c.split("-")[1]) for c in configs if c.startswith("realvideo")]
    if steps:
        results += bench_realvideo.run(argparse.Namespace(**{**vars(args), "steps": steps}), sp)
    if sp is None or sp.rank == 0:
        print(table(results))
        for r in results:
            print(r["config"], "checks:", json.dumps(r["checks"]))
            if "first_frame_parts_ms" in r:
                parts = {k: round(v, 1) for k, v in r["first_frame_parts_ms"].items()}
                print(r["config"], "first frame parts ms:", json.dumps(parts))
            live = {k[len("live_block0_s"):].strip("_").replace("_", " ") or "from graphs": round(v, 3)
                    for k, v in r.items() if k.startswith("live_block0_s") and not k.endswith("_all")}
            if live:
                print(r["config"], "live block 0 s (median of sessions):", json.dumps(live))
            if "long_run" in r:
                print(r["config"], "long run:", json.dumps(r["long_run"]))
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
    if sp is not None:
        sequence_parallel.leave_together(sp)
        torch.distributed.destroy_process_group()


def capped_run(args: argparse.Namespace, configs: list[str], p: argparse.ArgumentParser) -> None:
    """``--memory-cap-gib``: one configuration in the emulated GPU; one table row and its JSON."""
    if len(configs) != 1:
        p.error("--memory-cap-gib runs one configuration: pick it with --configs")
    family, _, steps = configs[0].partition("-")
    result = memory_cap.run(argparse.Namespace(**vars(args), family=family, steps=int(steps or 4)))
    keys = ("family", "cap_gib", "outcome", "stage", "peak_gib", "peak_allocated_gib", "context_gib_start",
            "context_gib_end", "text_encoder_streamed", "wall_s")
    print("| " + " | ".join(keys) + " |")
    print("| " + " | ".join(f"{result[k]:.2f}" if isinstance(result.get(k), float) else str(result.get(k, "-"))
                            for k in keys) + " |")
    print("RESULT " + json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
