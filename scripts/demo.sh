#!/usr/bin/env bash
# One command on a fresh machine: make a venv, install the pack, fetch the weights (only the files
# needed) and render the shipped portrait speaking the shipped clip to livetalk.mp4.
# Extra arguments go to the CLI (`python -m livetalk_core`, one for both model families), e.g.
# `bash scripts/demo.sh --smoke` (tiny random weights, CPU, no download), `bash scripts/demo.sh --smoke
# --model realvideo` (RealVideo 14B's path, tiny) or `bash scripts/demo.sh --image me.jpg --audio me.wav --output me.mp4`.
# Relative paths are taken from the folder you run this in, and livetalk.mp4 lands there too.
# The venv is the repository's .venv (LIVETALK_VENV picks another). A torch already installed, in the
# venv or the system's (a new venv sees the system's packages), is used as it is. Otherwise --smoke
# installs the small CPU build and a real run PyPI's torch with its CUDA libraries; TORCH_SPEC picks
# the build to install instead. The size is said before an install starts.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
venv="${LIVETALK_VENV:-$repo/.venv}"
CPU_TORCH_INDEX="https://download.pytorch.org/whl/cpu"

smoke=0
for arg in "$@"; do
  if [ "$arg" = "--smoke" ]; then smoke=1; fi
done

if [ ! -d "$venv" ]; then
  echo "creating the venv $venv (it also sees the packages installed for the system's python3)" >&2
  python3 -m venv --system-site-packages "$venv"
fi
# shellcheck disable=SC1091
. "$venv/bin/activate"

install_torch() {
  if [ -n "${TORCH_SPEC:-}" ]; then
    echo "installing torch as TORCH_SPEC says: $TORCH_SPEC" >&2
    python -m pip install -q "$TORCH_SPEC"
  elif [ "$smoke" = 1 ]; then
    echo "installing torch's CPU build (about 200 MB to download), enough for --smoke" >&2
    python -m pip install -q torch --index-url "$CPU_TORCH_INDEX"
  else
    echo "installing torch from PyPI with its CUDA libraries (about 3 GB to download, 6 GB on disk);" \
         "set TORCH_SPEC to pick another build" >&2
    python -m pip install -q torch
  fi
}

if ! python -c "import torch" 2>/dev/null; then
  install_torch
fi
if ! python -c "import transformers, safetensors, huggingface_hub, einops, numpy, av" 2>/dev/null; then
  echo "installing the pack's other requirements (about 150 MB to download)" >&2
  python -m pip install -q -r "$repo/requirements.txt"
fi
# Run from the caller's folder; the pack is found through PYTHONPATH.
PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" exec python -m livetalk_core "$@"
