"""A new user's first runs of the command lines: the offline message lists every file at once and
comes quickly, the log has no doubled lines, and smoke mode uses the options it is given, says what it
does not use and leaves no files behind."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from livetalk_core.media.video_io import read_video_info
from livetalk_core.media.weights import LIVETALK_FILES, TEXT_ENCODER_FILES

REPO = Path(__file__).resolve().parents[1]
# Retries of huggingface_hub without a network took ~23 s before the message; the check takes well under 1 s.
OFFLINE_MESSAGE_WITHIN_S = 12


def run_module(module: str, *args: str, cwd: Path = REPO, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env_extra or {})}
    env.pop("HF_HUB_OFFLINE", None)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def closed_port() -> int:
    """A local port nothing listens on: connections to it are refused at once, as with no network."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def assert_lists_every_file(stderr: str, models_dir: Path) -> None:
    for f in LIVETALK_FILES + TEXT_ENCODER_FILES:
        assert stderr.count(f"  {f.local_path(models_dir)}\n") == 1, f.filename
    assert stderr.count("error:") == 1 and "Traceback" not in stderr


def test_without_a_network_one_quick_message_lists_every_file(tmp_path):
    """HF_HUB_OFFLINE unset, the hub unreachable: no retries, the umT5 encoder and tokenizer listed
    with the rest (they used to come in a second error, after the first five were in place)."""
    start = time.perf_counter()
    done = run_module("livetalk_core", "--models-dir", str(tmp_path), "--output", str(tmp_path / "x.mp4"),
                      env_extra={"HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}"})
    elapsed = time.perf_counter() - start
    assert done.returncode == 2, done.stderr
    assert_lists_every_file(done.stderr, tmp_path)
    assert "cannot be reached" in done.stderr and "Retrying" not in done.stderr
    assert elapsed < OFFLINE_MESSAGE_WITHIN_S, f"{elapsed:.1f} s"
    assert not (tmp_path / "x.mp4").exists()


def test_downloads_off_lists_every_file_too(tmp_path):
    done = run_module("livetalk_core", "--models-dir", str(tmp_path), "--output", str(tmp_path / "x.mp4"),
                      env_extra={"HF_HUB_OFFLINE": "1"})
    assert done.returncode == 2
    assert_lists_every_file(done.stderr, tmp_path)


def test_a_cached_prompt_needs_no_text_encoder(tmp_path):
    from livetalk_core.cli import context_cache
    from livetalk_core.families import LIVETALK_13B

    cache = context_cache(tmp_path, LIVETALK_13B.talking_prompt)
    cache.parent.mkdir(parents=True)
    cache.write_bytes(b"cached")
    done = run_module("livetalk_core", "--models-dir", str(tmp_path), "--skip-download", "--output",
                      str(tmp_path / "x.mp4"))
    assert done.returncode == 2
    assert "umt5" not in done.stderr and "LiveTalk-1.3B-V0.1/model.safetensors" in done.stderr


def test_library_log_lines_are_printed_once():
    """The CLI's logging printed every huggingface_hub line twice (its own handler and the root's)."""
    code = ("from livetalk_core.cli import setup_logging; setup_logging(); import logging, huggingface_hub; "
            "logging.getLogger('huggingface_hub.utils._http').warning('a hub line'); "
            "logging.getLogger('livetalk_core.media.weights').info('a pack line')")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.stderr.count("a hub line") == 1 and done.stderr.count("a pack line") == 1, done.stderr


def left_in(scratch: Path) -> list[str]:
    """What a run left in its temporary folder, less torch's compile cache (one folder shared by all runs)."""
    return [p.name for p in scratch.iterdir() if not p.name.startswith("torchinductor_")]


def test_livetalk_smoke_uses_the_size_and_leaves_no_folder(tmp_path):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    out = tmp_path / "smoke.mp4"
    done = run_module("livetalk_core", "--smoke", "--size", "80x64", "--prompt", "a cat", "--duration", "0.5",
                      "--output", str(out), env_extra={"TMPDIR": str(scratch)})
    assert done.returncode == 0, done.stderr[-2000:]
    info = read_video_info(out)
    assert (info["width"], info["height"], info["frames"]) == (80, 64, 9)
    assert "--prompt is not encoded" in done.stderr
    assert "trained at 512" not in done.stderr and "Writing model shards" not in done.stderr
    assert left_in(scratch) == []


def test_realvideo_smoke_leaves_no_folder(tmp_path):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    out = tmp_path / "smoke.mp4"
    done = run_module("livetalk_core", "--smoke", "--model", "realvideo", "--duration", "0.5", "--output", str(out),
                      env_extra={"TMPDIR": str(scratch)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert read_video_info(out)["frames"] > 0
    assert left_in(scratch) == []
