"""Node tests that call the nodes' methods directly, in a Python process that imports ComfyUI.

ComfyUI's model code imports torchvision, which comes from the deps folder and must not reach the
main test session (comfy_env says why). So a ``test_*.py`` file calls :func:`run_in_comfyui` on a
cases file (not named ``test_*``, so the main session does not collect it), which runs in a child
pytest whose ``sys.path`` also holds ComfyUI 0.3.75 and its deps, on the CPU.

Run as a script, this file is that child: ``python comfy_in_process.py CASES_FILE``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from comfy_env import REPO, _declare_torchvision_ops, comfyui_deps, require_comfyui


def run_in_comfyui(cases: Path, timeout: float = 600.0) -> None:
    """Run the pytest cases in ``cases`` in a child process with ComfyUI importable; fail with its report."""
    require_comfyui()
    result = subprocess.run([sys.executable, __file__, str(cases)], cwd=REPO, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, (
        f"{cases.name} failed in the ComfyUI process:\n{result.stdout[-12000:]}\n{result.stderr[-4000:]}"
    )


if __name__ == "__main__":
    import pytest

    # Appended: the tests' own modules (the repo's `nodes` package among them) keep priority over
    # ComfyUI's top-level names.
    sys.path += [str(require_comfyui()), str(comfyui_deps())]
    _declare_torchvision_ops()
    from comfy.cli_args import args

    args.cpu = True  # read when comfy.model_management is first imported; this torch may have no CUDA
    sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", sys.argv[1]]))
