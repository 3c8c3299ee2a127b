"""The benchmark scripts run: ``bench.py --tiny`` (tiny random models on the CPU) end to end, so a
broken script is found before a GPU session is spent on it. Speed itself is only measured on GPUs
(docs/performance.md), never here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
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
    live = results["livetalk-1.3b"]
    for name in ("live_block0_s", "live_block0_s_encoder_decoder_eager", "live_block0_s_slow_host",
                 "live_block0_s_slow_host_encoder_decoder_eager"):
        assert len(live[name + "_all"]) == 3 and live[name] > 0, name
    assert "live block 0 s (median of sessions)" in done.stdout


def test_live_block0_parts_add_up(tmp_path):
    """``live_block0.py --tiny``: the parts of a live session's block 0, on the host and on the slowed host."""
    command = [sys.executable, "benchmarks/live_block0.py", "--tiny", "--sessions", "2", "--spinners", "1", "2"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout[done.stdout.index("{"):])
    for host in ("host", "slow host, 1 spinner(s)", "slow host, 2 spinner(s)"):
        parts = report[host]
        assert parts["block0_ms"] >= parts["audio_ms"] + parts["decode_ms"] > 0, host
        assert parts["dit_and_rest_ms"] > 0, host


def test_the_slowed_host_side_shares_one_core_with_a_spinner_and_ends_with_it():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import timing

    before = os.sched_getaffinity(0)
    with timing.contended_cpu(2) as how:
        pinned = os.sched_getaffinity(0)
        core = next(iter(pinned))
        spinners = [p for p in Path("/proc").glob("[0-9]*") if _spins_on(p, core)]
    assert how and len(pinned) == 1 and len(spinners) == 2, "not two spinning processes on this thread's core"
    assert os.sched_getaffinity(0) == before
    assert not any(p.exists() and _spins_on(p, core) for p in spinners), "the spinner outlived the block"
    with timing.contended_cpu(0) as how:
        assert how is None and os.sched_getaffinity(0) == before


def _spins_on(proc: Path, core: int) -> bool:
    """Whether /proc/PID is contended_cpu's spinner (its command line) pinned to ``core``."""
    try:
        cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
        return "while True: pass" in cmdline and os.sched_getaffinity(int(proc.name)) == {core}
    except (OSError, ValueError):
        return False


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


def memory_cap_module():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import memory_cap
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return memory_cap


def test_capped_run_tiny_goes_end_to_end_with_the_text_encoder(tmp_path):
    """``bench.py --memory-cap-gib`` (the README table's runs), tiny on the CPU: the prompt is encoded by a
    umT5 encoder, the reference and audio encoded, blocks sampled and decoded; one table row and its JSON."""
    out = tmp_path / "capped.json"
    done = subprocess.run(
        [sys.executable, "benchmarks/bench.py", "--tiny", "--configs", "realvideo-2", "--fp8", "--memory-cap-gib", "24",
         "--blocks", "2", "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["outcome"] == "pass" and result["stage"] == "sample and decode"
    assert result["frames"] > 0 and result["text_encoder_s"] > 0 and result["text_encoder_streamed"] is False
    assert "| realvideo | None | pass |" in done.stdout


def test_capped_run_reports_out_of_memory_as_a_row(monkeypatch):
    """An out-of-memory error (PyTorch's, or a library's failed allocation) is the run's result, with the
    stage it hit; any other error is raised."""
    import argparse

    memory_cap = memory_cap_module()

    def runs_out(options, device, dtype, stage, log):
        stage[0] = "encode the prompt (umT5-XXL)"
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    options = argparse.Namespace(family="livetalk", tiny=True, fp8_matmul=False, memory_cap_gib=8)
    monkeypatch.setitem(memory_cap.FAMILIES, "livetalk", runs_out)
    result = memory_cap.run(options)
    assert result["outcome"] == "out of memory" and result["stage"] == "encode the prompt (umT5-XXL)"
    assert "Tried to allocate" in result["error"]

    def breaks(options, device, dtype, stage, log):
        raise RuntimeError("a bug")
    monkeypatch.setitem(memory_cap.FAMILIES, "livetalk", breaks)
    with pytest.raises(RuntimeError, match="a bug"):
        memory_cap.run(options)


def test_random_text_encoder_is_placed_as_a_loaded_one(monkeypatch):
    """The capped run's umT5 is placed by load_text_encoder's own rule: layers streamed from host memory
    when the GPU lacks room (here a CUDA device with no free memory, injected), whole otherwise."""
    memory_cap = memory_cap_module()
    config = memory_cap.text_encoder_config(32, tiny=True)
    placed = memory_cap.random_text_encoder(config, torch.device("cpu"), torch.float32)
    assert placed.stream_to is None and all(p.device.type == "cpu" for p in placed.parameters())
    assert all(torch.isfinite(p).all() and p.std() > 0 for p in placed.parameters())
    monkeypatch.setattr(memory_cap, "streams_layers", lambda weight_bytes, device: device.type == "cuda")
    streamed = memory_cap.random_text_encoder(config, torch.device("cuda", 0), torch.float32)
    assert streamed.stream_to == torch.device("cuda", 0) and all(p.device.type == "cpu" for p in streamed.parameters())


def test_a_capped_run_is_judged_by_what_its_tensors_held_plus_the_context():
    """Session 15's H100 rows: the 1.3B in bf16 under a 12 GiB cap finished with tensors at 8.50 GiB and the
    context at 0.76, while the allocator had cached up to 11.31 GiB (it gives that back before it fails):
    a pass. A finished run whose tensors and context exceed the cap is not."""
    memory_cap = memory_cap_module()
    gib = memory_cap.GIB
    outcome, peak = memory_cap.judged("pass", 12.0, int(8.50 * gib), int(0.76 * gib))
    assert outcome == "pass" and abs(peak - 9.26) < 1e-6
    assert memory_cap.judged("pass", 8.0, int(7.40 * gib), int(0.76 * gib))[0] == "over the cap (context grew)"
    assert memory_cap.judged("out of memory", 8.0, int(5.59 * gib), int(0.76 * gib))[0] == "out of memory"


def test_the_fp8_kv_cache_gets_expandable_segments_unless_the_user_chose(monkeypatch):
    """The low-memory path's allocator options (options.use_expandable_segments), set by the CLI and the
    capped runs: in the environment (for worker processes) and in PyTorch's allocator, which may have read
    the environment already. A user's own PYTORCH_CUDA_ALLOC_CONF / PYTORCH_ALLOC_CONF is kept."""
    from livetalk_core import options

    # a copy of the environment, so that what the code sets goes with the test
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k not in options.ALLOCATOR_VARIABLES})
    told: list[str] = []
    monkeypatch.setattr(torch._C, "_accelerator_setAllocatorSettings", told.append)
    assert not options.use_expandable_segments(False) and "PYTORCH_CUDA_ALLOC_CONF" not in os.environ and not told
    assert options.use_expandable_segments(True) and os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert told == ["expandable_segments:True"]
    for name, mine in (("PYTORCH_CUDA_ALLOC_CONF", "backend:cudaMallocAsync"),
                       ("PYTORCH_ALLOC_CONF", "expandable_segments:False")):
        os.environ.pop("PYTORCH_CUDA_ALLOC_CONF", None)
        os.environ[name] = mine
        told.clear()
        assert not options.use_expandable_segments(True) and os.environ[name] == mine and not told
        del os.environ[name]


def test_the_cli_asks_for_expandable_segments_with_the_fp8_kv_cache(monkeypatch, tmp_path):
    """`python -m livetalk_core --smoke --fp8-kv-cache` sets them before anything touches a GPU."""
    from livetalk_core import cli, options

    # a copy of the environment, so that what the code sets goes with the test
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k not in options.ALLOCATOR_VARIABLES})
    class Stop(Exception):
        pass

    seen = []

    def first_step_after_the_checks(*args, **kwargs):
        seen.append(os.environ.get("PYTORCH_CUDA_ALLOC_CONF"))
        raise Stop

    monkeypatch.setattr(cli, "fetch_weights", first_step_after_the_checks)
    parser = cli.build_parser()
    with pytest.raises(Stop):
        cli.run(parser.parse_args(["--smoke", "--fp8-kv-cache", "--output", str(tmp_path / "o.mp4")]), parser)
    assert seen == ["expandable_segments:True"]
