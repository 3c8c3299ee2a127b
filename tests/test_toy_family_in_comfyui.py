"""A test-only third model family through the nodes inside ComfyUI: toy_family_in_comfyui_cases.py, run
in a child process that imports ComfyUI (comfy_in_process says why). Fails when ComfyUI is not installed."""

from pathlib import Path

from comfy_in_process import run_in_comfyui


def test_toy_family_cases_in_a_comfyui_process():
    run_in_comfyui(Path(__file__).with_name("toy_family_in_comfyui_cases.py"))
