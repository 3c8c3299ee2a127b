#!/usr/bin/env bash
# One command on a fresh machine: make a venv, install the pack, fetch the weights (only the files
# needed) and render the shipped portrait speaking the shipped clip to livetalk.mp4.
# Extra arguments go to the CLI, e.g. `bash scripts/demo.sh --smoke` (tiny random weights, CPU, no
# download) or `bash scripts/demo.sh --image me.jpg --audio me.wav --output me.mp4`.
# TORCH_SPEC picks the torch build to install when the venv has none (default: PyPI's `torch`).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q "${TORCH_SPEC:-torch}"
python -m pip install -q -r requirements.txt
exec python -m livetalk_core "$@"
