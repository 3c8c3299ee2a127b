"""Load Tiny Decoder (TAEHV) and the decode nodes' tiny_decoder input inside ComfyUI:
tiny_decoder_in_comfyui_cases.py, run in a child process that imports ComfyUI (comfy_in_process says why)."""

from pathlib import Path

from comfy_in_process import run_in_comfyui


def test_tiny_decoder_cases_in_a_comfyui_process():
    run_in_comfyui(Path(__file__).with_name("tiny_decoder_in_comfyui_cases.py"))
