"""The benchmark scripts run: ``bench.py --tiny`` (tiny random models on the CPU) end to end, so a
broken script is found before a GPU session is spent on it. Speed itself is only measured on GPUs
(docs/performance.md), never here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def test_bench_tiny_writes_every_configuration(tmp_path):
    out = tmp_path / "tiny.json"
    done = subprocess.run(
        [sys.executable, "benchmarks/bench.py", "--tiny", "--blocks", "6", "--check", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = {r["config"]: r for r in json.loads(out.read_text())}
    assert set(results) == {"livetalk-1.3b", "realvideo-14b-2step", "realvideo-14b-4step"}
    for name, r in results.items():
        assert r["dit_ms_per_block"] > 0 and r["vae_ms_per_block"] > 0 and r["first_frame_s"] > 0, name
        assert len(r["dit_ms_all"]) == 6, name
    assert results["livetalk-1.3b"]["checks"]["pipelined_frames_identical_to_serial"]
    # --tiny runs the eager path twice: the check must find them equal
    assert all(c["max_abs"] == 0 for c in results["realvideo-14b-2step"]["checks"]["dit_per_block"])
    assert "| realvideo-14b-4step |" in done.stdout


def test_the_14b_benchmarks_share_seeded_user_inputs():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from bench_realvideo import TINY, user_inputs
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    first, again = user_inputs(TINY, 64, torch.float32), user_inputs(TINY, 64, torch.float32)
    image, waveform, contexts = first
    assert image.shape == (128, 128, 3) and image.dtype == torch.uint8
    assert waveform.shape == (5 * 16000,) and contexts.shape == (2, 1, 512, TINY.core.text_dim)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
