"""runtime/concurrent.py: the reference's and the audio's encoders run at the same time (issue 19's
first-frame latency), with the same results; on the CPU here (threads; CUDA streams on a GPU)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from livetalk_core.live.smoke import smoke_models
from livetalk_core.livetalk.pipeline import LiveTalkPipeline
from livetalk_core.media.audio_file import load_audio
from livetalk_core.runtime.concurrent import record_on, run_concurrently

SPEECH = Path(__file__).resolve().parents[1] / "assets" / "speech.flac"


def test_work_runs_at_the_same_time_and_results_keep_their_order():
    """Each piece waits at a barrier for the other: one after the other, the first would time out."""
    barrier = threading.Barrier(2, timeout=30)

    def piece(value: int) -> tuple[int, int]:
        barrier.wait()
        return value, threading.get_ident()
    (first, first_thread), (second, second_thread) = run_concurrently(lambda: piece(1), lambda: piece(2))
    assert (first, second) == (1, 2)
    assert first_thread == threading.get_ident() != second_thread  # the first runs in the caller's thread


def test_an_error_is_raised_once_everything_has_finished():
    finished = threading.Event()

    def slow() -> None:
        finished.wait(0.2)
        finished.set()

    def broken() -> None:
        raise ValueError("bad input")
    with pytest.raises(ValueError, match="bad input"):
        run_concurrently(broken, slow)
    assert finished.is_set()


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "grad"])
def test_the_callers_grad_mode_holds_in_every_thread(mode):
    context = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode, "grad": torch.enable_grad}[mode]

    def modes() -> tuple[bool, bool]:
        return torch.is_grad_enabled(), torch.is_inference_mode_enabled()
    with context():
        expected = modes()
        assert run_concurrently(modes, modes) == (expected, expected)


def test_record_on_leaves_tensors_of_other_devices_alone():
    """Only tensors on the stream's GPU are recorded: asking a host tensor to record raises."""
    class GpuStream:
        device = torch.device("cuda", 0)
    record_on({"a": [torch.zeros(2)], "b": (torch.ones(1), "text")}, GpuStream())


def test_pipeline_encodes_its_inputs_at_the_same_time_with_the_same_results():
    """LiveTalkPipeline.encode_inputs (what generate() and the benchmark's first frame use) gives exactly
    what encode_reference and encode_audio give one after the other."""
    models = smoke_models("livetalk")
    pipe = LiveTalkPipeline(models.dit, models.vae, models.encoder)
    waveform = load_audio(SPEECH)[: 3 * 16000]
    reference, audio = pipe.encode_inputs(models.reference, waveform, models.height, models.width)
    assert torch.equal(reference, pipe.encode_reference(models.reference, models.height, models.width))
    serial = pipe.encode_audio(waveform)
    assert torch.equal(audio.embeds, serial.embeds) and audio.length == serial.length
