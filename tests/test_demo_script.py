"""scripts/demo.sh as a new user runs it: relative paths are the user's, a torch already there is
reused, and --smoke never installs the CUDA build. Fast and offline: a fake venv whose ``python``
records what it was asked to do (and one real smoke run through the project's own venv)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from livetalk_core.media.video_io import read_video_info

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "scripts" / "demo.sh"

# Stands in for the venv's python: logs "<cwd>|<PYTHONPATH>|<args>" and answers the import checks.
FAKE_PYTHON = """#!/usr/bin/env bash
echo "$PWD|${PYTHONPATH:-}|$*" >> "$FAKE_LOG"
if [ "${1:-}" = "-c" ]; then
  case "$2" in
    "import torch") [ -e "$FAKE_VENV/has_torch" ] && exit 0 || exit 1 ;;
    *) exit 0 ;;
  esac
fi
if [ "${1:-} ${2:-} ${3:-}" = "-m pip install" ]; then
  case " $* " in *" torch "*) touch "$FAKE_VENV/has_torch" ;; esac
fi
exit 0
"""
# Stands in for the system's python3: ``python3 -m venv [--system-site-packages] DIR`` makes a fake venv.
FAKE_PYTHON3 = """#!/usr/bin/env bash
echo "python3 $*" >> "$FAKE_LOG"
dir="${@: -1}"
mkdir -p "$dir/bin"
cp "$FAKE_PYTHON_SOURCE" "$dir/bin/python"
chmod +x "$dir/bin/python"
printf 'export PATH="%s/bin:$PATH"\\nexport FAKE_VENV="%s"\\n' "$dir" "$dir" > "$dir/bin/activate"
"""


@pytest.fixture()
def fake(tmp_path: Path) -> dict:
    tools = tmp_path / "tools"
    tools.mkdir()
    (tools / "python_venv").write_text(FAKE_PYTHON)
    (tools / "python3").write_text(FAKE_PYTHON3)
    (tools / "python3").chmod(0o755)
    user = tmp_path / "user folder"
    user.mkdir()
    env = {**os.environ, "PATH": f"{tools}:{os.environ['PATH']}", "FAKE_LOG": str(tmp_path / "log"),
           "FAKE_PYTHON_SOURCE": str(tools / "python_venv"), "LIVETALK_VENV": str(tmp_path / "venv")}
    env.pop("TORCH_SPEC", None)
    return {"env": env, "user": user, "log": tmp_path / "log", "venv": tmp_path / "venv"}


def run_demo(fake: dict, *args: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    done = subprocess.run(["bash", str(DEMO), *args], cwd=fake["user"], env=fake["env"], capture_output=True, text=True,
                          timeout=60)
    return done, fake["log"].read_text().splitlines()


def test_relative_paths_are_the_users(fake):
    done, log = run_demo(fake, "--image", "me.jpg", "--output", "me.mp4")
    assert done.returncode == 0, done.stderr
    cli = [line for line in log if line.endswith("-m livetalk_core --image me.jpg --output me.mp4")]
    assert len(cli) == 1
    cwd, pythonpath, _ = cli[0].split("|")
    assert cwd == str(fake["user"])  # so me.jpg, me.mp4 and the default livetalk.mp4 are in the user's folder
    assert pythonpath.split(":")[0] == str(REPO)


def test_a_new_venv_sees_the_systems_torch(fake):
    done, log = run_demo(fake, "--smoke")
    assert done.returncode == 0, done.stderr
    assert log[0] == f"python3 -m venv --system-site-packages {fake['venv']}"


def test_smoke_installs_the_cpu_build_and_says_how_big_first(fake):
    done, log = run_demo(fake, "--smoke")
    installs = [line.split("|")[2] for line in log if "-m pip install" in line and " torch" in line]
    assert installs == ["-m pip install -q torch --index-url https://download.pytorch.org/whl/cpu"]
    assert "about 200 MB" in done.stderr and "CPU build" in done.stderr


def test_a_real_run_says_the_cuda_builds_size(fake):
    done, log = run_demo(fake)
    assert [line.split("|")[2] for line in log if "pip install -q torch" in line] == ["-m pip install -q torch"]
    assert "about 3 GB" in done.stderr


def test_an_installed_torch_is_reused(fake):
    run_demo(fake, "--version-check-only")  # makes the venv (and installs torch once)
    fake["log"].unlink()
    done, log = run_demo(fake, "--smoke")
    assert done.returncode == 0, done.stderr
    assert not [line for line in log if "pip install" in line]
    assert "installing" not in done.stderr


@pytest.mark.skipif(not (REPO / ".venv" / "bin" / "python").exists(), reason="needs the project's .venv")
def test_smoke_run_from_another_folder_writes_there(tmp_path):
    """A real run through the project's venv (torch already in it: nothing is installed)."""
    shutil.copy(REPO / "assets" / "portrait.jpg", tmp_path / "face.jpg")
    env = {**os.environ, "LIVETALK_VENV": str(REPO / ".venv")}
    done = subprocess.run(["bash", str(DEMO), "--smoke", "--duration", "0.5", "--image", "face.jpg",
                           "--output", "clip.mp4"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "installing" not in done.stderr
    assert read_video_info(tmp_path / "clip.mp4")["frames"] == 9
    assert not (REPO / "clip.mp4").exists()
