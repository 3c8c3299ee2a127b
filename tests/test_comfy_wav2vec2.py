"""ComfyUI's own wav2vec2 files through the pack's audio encoder loader: comfy_wav2vec2_cases.py,
run in a child process that imports ComfyUI (comfy_in_process says why). Fails when ComfyUI is not
installed (`bash .ci/run`)."""

from pathlib import Path

from comfy_in_process import run_in_comfyui


def test_comfy_wav2vec2_cases_in_a_comfyui_process():
    run_in_comfyui(Path(__file__).with_name("comfy_wav2vec2_cases.py"))
