"""Every row of the README's "Which GPU for which path" table, run on one large GPU capped to the row's size.

    python3 benchmarks/vram_table.py                       # all rows on one H100 (about 7 minutes)
    python3 benchmarks/vram_table.py --only livetalk       # the LiveTalk rows (or realvideo): half the time
    python3 benchmarks/vram_table.py --tiny                # a CPU dry run of this script (no cap, tiny models)

Each row is one ``bench.py --memory-cap-gib N`` process (benchmarks/memory_cap.py: the CUDA context
measured and counted in the N GiB, the allocator capped to the rest, the run end to end as the CLI runs
it, the umT5-XXL prompt encoding included), so one row's memory never leaks into the next. Prints a
markdown table: the GPU size, family, options, what the README claims, the result, the peak (what
tensors held at most + the CUDA context; memory_cap.judged) and the allocator's peak reservation.
The models are built with random weights; the 14B build takes ~20 s of each of its rows,
compiling ~30 s (less once inductor's cache holds the kernels).
LiveTalk rows run 9 blocks, so that CUDA graphs are captured (from the 8th block) and counted.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent / "bench.py"
LIVETALK_BLOCKS = 9  # CUDA graphs are captured at the 8th block: their memory is part of the peak
REALVIDEO_BLOCKS = 4  # the 14B's graphs are captured from its 3rd block


@dataclass(frozen=True)
class Row:
    gib: int
    config: str  # bench.py's --configs
    options: tuple[str, ...]
    claim: str  # what the README's table says of this row

    @property
    def family(self) -> str:
        return "LiveTalk 1.3B" if self.config == "livetalk" else f"RealVideo 14B ({self.config.split('-')[1]} steps)"


ROWS = (
    Row(8, "livetalk", ("--fp8-kv-cache", "--fp8-matmul"), "yes (Ada/Hopper)"),
    Row(8, "livetalk", (), "no (bf16)"),
    Row(12, "livetalk", (), "yes"),
    Row(24, "realvideo-2", ("--fp8",), "no: fp8 weights alone"),
    Row(24, "realvideo-2", ("--fp8", "--fp8-kv-cache"), "fp8 weights + fp8 KV cache: tight"),
    Row(32, "realvideo-2", ("--fp8-matmul",), "yes"),
    Row(48, "realvideo-2", (), "bf16 from 48 GB"),
)


def run_row(row: Row, tiny: bool, timeout_s: float) -> dict:
    """``bench.py --memory-cap-gib`` for ``row`` in its own process; its JSON result, or why there is none."""
    blocks = LIVETALK_BLOCKS if row.config == "livetalk" else REALVIDEO_BLOCKS
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "result.json"
        command = [sys.executable, str(BENCH), "--configs", row.config, "--memory-cap-gib", str(row.gib),
                   "--blocks", str(2 if tiny else blocks), "--json", str(out), *row.options]
        command += ["--tiny"] if tiny else []
        began = time.perf_counter()
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {"outcome": f"timed out after {timeout_s:.0f} s"}
        if out.is_file():
            return json.loads(out.read_text())
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"outcome": f"failed (exit {done.returncode}: {last[:160]})", "wall_s": time.perf_counter() - began}


def cell(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def table_line(row: Row, result: dict) -> str:
    streamed = result.get("text_encoder_streamed")
    place = "on the CPU" if result.get("gpu") == "CPU" else "whole on the GPU"
    umt5 = "-" if streamed is None else ("layers streamed" if streamed else place)
    outcome = result.get("outcome", "-")
    if outcome != "pass" and result.get("stage"):
        outcome += f" ({result['stage']})"
    return (f"| {row.gib} GB | {row.family} | {' '.join(row.options) or 'bf16'} | {row.claim} | {outcome} | "
            f"{cell(result.get('peak_gib'))} | {cell(result.get('peak_reserved_gib'))} | "
            f"{cell(result.get('context_gib_end'))} | {umt5} | "
            f"{cell(result.get('wall_s'), 0)} |")


HEADER = ("| GPU | family | options | README | result | peak GiB (tensors + context) | reserved GiB | context GiB "
          "| umT5-XXL | s |\n|---|---|---|---|---|---|---|---|---|---|")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=("livetalk", "realvideo"), default=None, help="only this family's rows")
    p.add_argument("--tiny", action="store_true", help="tiny models on the CPU, no cap: checks this script")
    p.add_argument("--timeout-s", type=float, default=240, help="the most one row may take")
    p.add_argument("--json", type=Path, default=None, help="write every row's result here")
    args = p.parse_args()
    rows = [r for r in ROWS if args.only is None or r.config.startswith(args.only)]
    lines, results = [], []
    for row in rows:
        result = run_row(row, args.tiny, args.timeout_s)
        results.append({"gib": row.gib, "config": row.config, "options": row.options, **result})
        lines.append(table_line(row, result))
        print(lines[-1], flush=True)  # as it comes: a run cut short still shows its finished rows
    gpu = next((r.get("gpu") for r in results if r.get("gpu")), "?")
    print(f"\nGPU: {gpu}, each row capped to its size with the CUDA context counted\n{HEADER}\n" + "\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
