"""The loader's gpus input inside ComfyUI: multi_gpu_in_comfyui_cases.py, run in a child process that
imports ComfyUI (comfy_in_process says why). Fails when ComfyUI is not installed (`bash .ci/run`)."""

from pathlib import Path

from comfy_in_process import run_in_comfyui


def test_multi_gpu_cases_in_a_comfyui_process():
    run_in_comfyui(Path(__file__).with_name("multi_gpu_in_comfyui_cases.py"))
