"""LoadLiveTalkModel's downloads, partial fine-tunes and fp8 weights inside ComfyUI:
loader_in_comfyui_cases.py, run in a child process that imports ComfyUI (comfy_in_process says why).
Fails when ComfyUI is not installed (`bash .ci/run`)."""

from pathlib import Path

from comfy_in_process import run_in_comfyui


def test_loader_cases_in_a_comfyui_process():
    run_in_comfyui(Path(__file__).with_name("loader_in_comfyui_cases.py"))
