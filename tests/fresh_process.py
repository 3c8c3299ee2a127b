"""Run a snippet in a fresh Python process (the repository as working directory), for memory tests
whose numbers must not include what this test process already holds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def last_printed_int(code: str, timeout: float) -> int:
    """Run ``code``; it must succeed and print an integer on its last line, which is returned."""
    # the tests folder on the path, as pytest has it, so the snippet can import test modules
    path = os.pathsep.join([str(REPO / "tests"), str(REPO), os.environ.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "PYTHONPATH": path})
    assert result.returncode == 0, result.stderr
    return int(result.stdout.strip().splitlines()[-1])
