"""The CLI as a new user meets it: the smoke mode end to end, and the offline message."""

import os
import subprocess
import sys
from pathlib import Path

from livetalk_core.media.video_io import read_video_info

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "livetalk_core", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)


def test_smoke_mode_writes_a_video_of_the_audio_length(tmp_path):
    out = tmp_path / "smoke.mp4"
    result = run_cli("--smoke", "--output", str(out))
    assert result.returncode == 0, result.stderr
    info = read_video_info(out)
    # the shipped clip is 5.97 s: floor(16 * 5.97) + 1 frames at 16 fps, with the speech muxed in
    assert info["frames"] == 96 and info["fps"] == 16 and info["has_audio"]
    assert abs(info["audio_duration"] - info["frames"] / 16) < 0.1


def test_offline_run_says_which_files_go_where(tmp_path):
    result = run_cli("--models-dir", str(tmp_path), "--output", str(tmp_path / "x.mp4"),
                     env_extra={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    for expected in ("LiveTalk-1.3B-V0.1/model.safetensors", "Wan2.1-T2V-1.3B/Wan2.1_VAE.pth",
                     "wav2vec2-base-960h/model.safetensors"):
        assert str(tmp_path / expected) in result.stderr
    assert "huggingface.co/GAIR/LiveTalk-1.3B-V0.1" in result.stderr
    assert not (tmp_path / "x.mp4").exists()


def test_bad_inputs_give_one_line_errors(tmp_path):
    text = tmp_path / "notes.wav"
    text.write_text("not audio")
    result = run_cli("--smoke", "--audio", str(text), "--output", str(tmp_path / "x.mp4"))
    assert result.returncode == 2 and "Traceback" not in result.stderr and "notes.wav" in result.stderr
    result = run_cli("--smoke", "--fps", "25", "--output", str(tmp_path / "x.mp4"))
    assert result.returncode == 2 and "16 fps" in result.stderr


def test_ctrl_c_keeps_a_playable_partial_video(tmp_path):
    import signal
    import time

    out = tmp_path / "partial.mp4"
    # 60 s of video (silence-padded): several seconds of work, so the signal lands mid-run
    # The child gets Ctrl-C's default disposition even when this run was started in the background,
    # where the shell ignores SIGINT for it (and Python would then never raise KeyboardInterrupt).
    proc = subprocess.Popen([sys.executable, "-m", "livetalk_core", "--smoke", "--duration", "60",
                             "--output", str(out)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while time.time() < deadline and not list(tmp_path.glob(".partial.mp4.*")):
        time.sleep(0.1)
    time.sleep(1.0)  # let a block or two be written
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    info = read_video_info(out)
    assert 0 < info["frames"] < 961


def test_same_seed_same_video_bit_identical(tmp_path):
    import torch

    from livetalk_core.livetalk.model import load_livetalk_dit
    from livetalk_core.livetalk.pipeline import LiveTalkPipeline
    from livetalk_core.media.audio_file import load_audio
    from livetalk_core.media.image import load_image
    from livetalk_core.media.vae import load_vae
    from livetalk_core.media.wav2vec2 import load_audio_encoder
    from livetalk_core.smoke import build_tiny_weights, load_context

    w = build_tiny_weights(tmp_path / "w")
    pipe = LiveTalkPipeline(load_livetalk_dit(w.dit, "fp32"), load_vae(w.vae, "fp32"),
                            load_audio_encoder(w.wav2vec2, torch.float32))
    image, wave = load_image(str(REPO / "assets" / "portrait.jpg")), load_audio(REPO / "assets" / "speech.flac")[:24000]
    ctx = load_context(w.context)
    runs = [torch.cat(list(pipe.generate(image, wave, ctx, seed=seed, height=64, width=64))) for seed in (7, 7, 8)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_out_of_memory_gives_the_options(tmp_path, monkeypatch, capsys):
    import torch

    from livetalk_core import cli
    from livetalk_core.livetalk import family

    def fake_oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(family, "sample_livetalk", fake_oom)
    code = cli.main(["--smoke", "--output", str(tmp_path / "x.mp4")])
    err = capsys.readouterr().err
    assert code == 3
    assert "ran out of memory" in err and "--size" in err and "Traceback" not in err


def test_fp8_matmul_option_runs_the_dit_in_fp8(tmp_path, monkeypatch):
    from livetalk_core import cli
    from livetalk_core.wan import fp8_linear

    converted = []
    real = fp8_linear.use_fp8_matmuls
    monkeypatch.setattr(fp8_linear, "use_fp8_matmuls",
                        lambda layers, device=None: converted.append(real(layers, device)) or converted[-1])
    out = tmp_path / "fp8.mp4"
    assert cli.main(["--smoke", "--fp8-matmul", "--duration", "1", "--output", str(out)]) == 0
    assert converted and converted[0] > 0
    assert read_video_info(out)["frames"] == 17
