"""Registry packaging with comfy-cli, offline: ``comfy node validate`` passes and the archive that
``comfy node pack`` builds leaves tests and media out (.comfyignore).

comfy-cli is a test-only tool with its own virtual environment (.ci/run: ``.venv/comfy-cli``; or
the ``LIVETALK_COMFY_CLI`` variable naming the ``comfy`` executable).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
from comfy_env import REPO


@pytest.fixture(scope="module")
def comfy_cli() -> Path:
    candidates = [os.environ.get("LIVETALK_COMFY_CLI"), REPO / ".venv" / "comfy-cli" / "bin" / "comfy",
                  shutil.which("comfy")]
    found = next((Path(c) for c in candidates if c and Path(c).is_file()), None)
    if found is None:
        message = "comfy-cli is not installed (see .ci/run)"
        pytest.fail(message)
    return found


def _run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "COMFY_CLI_NO_TRACKING": "1"}
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=120, **kwargs)


def test_comfy_node_validate_passes(comfy_cli):
    result = _run([str(comfy_cli), "--skip-prompt", "node", "validate"])
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "validation checks passed" in output, output


def test_published_archive_leaves_tests_and_media_out(comfy_cli, tmp_path):
    archive = tmp_path / "node.zip"
    # The function behind `comfy node pack`, pointed outside the checkout.
    script = "import sys; from comfy_cli.file_utils import zip_files; zip_files(sys.argv[1])"
    result = _run([str(comfy_cli.parent / "python"), "-c", script, str(archive)])
    assert result.returncode == 0, result.stdout + result.stderr
    names = zipfile.ZipFile(archive).namelist()
    assert {"__init__.py", "pyproject.toml", "requirements.txt", "LICENSE"} <= set(names)
    leaked = [n for n in names if n.startswith(("tests/", "assets/", ".ci/")) or n.endswith((".mp4", ".wav", ".flac"))]
    assert leaked == []
