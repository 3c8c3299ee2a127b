"""The CLI's ``--decoder tiny --tiny-decoder FILE``: the tiny decoder (TAEHV) instead of the full VAE,
an opt-in that trades quality for speed; a missing or wrong file is refused before any model loads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from livetalk_core import cli
from livetalk_core.media.taehv import TinyDecoder, TinyDecoderConfig
from livetalk_core.media.vae import VAEConfig, WanVAE
from livetalk_core.media.video_io import read_video_info

REPO = Path(__file__).resolve().parents[1]
SMALL = TinyDecoderConfig(stem_width=8, stage_widths=(8, 8, 8), stage_outputs=(8, 8, 8))


def tiny_decoder_file(folder: Path, name: str = "taew2_1.pth") -> Path:
    torch.manual_seed(0)
    state = TinyDecoder(SMALL).state_dict()
    state["decoder.22.bias"].fill_(0.5)
    path = folder / name
    torch.save(state, path) if path.suffix == ".pth" else save_file(state, str(path))
    return path


@pytest.fixture()
def nothing_loads(monkeypatch):
    """Any model load fails the test: the checks must refuse first."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were refused")

    monkeypatch.setattr(cli, "load_models", refuse)
    monkeypatch.setattr(cli, "fetch_weights", refuse)


def refused(capsys, argv: list[str], *words: str) -> None:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for word in words:
        assert word in err, err


def test_decoder_tiny_without_its_file_is_refused(tmp_path, capsys, nothing_loads):
    refused(capsys, ["--smoke", "--decoder", "tiny", "--output", str(tmp_path / "x.mp4")],
            "--decoder tiny needs --tiny-decoder", "taew2_1", "lighttaew2_1")
    assert not (tmp_path / "x.mp4").exists()


def test_a_tiny_decoder_file_without_decoder_tiny_is_refused(tmp_path, capsys, nothing_loads):
    path = tiny_decoder_file(tmp_path)
    refused(capsys, ["--smoke", "--tiny-decoder", str(path), "--output", str(tmp_path / "x.mp4")],
            "only used with --decoder tiny")


def test_a_wrong_or_missing_tiny_decoder_is_refused_before_loading(tmp_path, capsys, nothing_loads):
    vae = tmp_path / "wan_2.1_vae.safetensors"
    save_file(WanVAE(VAEConfig(dim=4)).state_dict(), str(vae))
    out = str(tmp_path / "x.mp4")
    refused(capsys, ["--smoke", "--decoder", "tiny", "--tiny-decoder", str(vae), "--output", out],
            "not a TAEHV tiny decoder for Wan2.1 checkpoint", "a Wan VAE")
    refused(capsys, ["--smoke", "--decoder", "tiny", "--tiny-decoder", str(tmp_path / "none.pth"), "--output", out],
            "does not exist")
    refused(capsys, ["--smoke", "--decoder", "tiny", "--tiny-decoder", str(tiny_decoder_file(tmp_path, "taehv.pth")),
                     "--output", out], "HunyuanVideo")


def test_the_output_may_not_overwrite_the_tiny_decoder(tmp_path, capsys, nothing_loads):
    path = tiny_decoder_file(tmp_path)
    refused(capsys, ["--smoke", "--decoder", "tiny", "--tiny-decoder", str(path), "--output", str(path)],
            "same file as --tiny-decoder")
    assert path.stat().st_size > 0


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "livetalk_core", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600)


def test_smoke_run_with_the_tiny_decoder_makes_the_full_vaes_frame_count(tmp_path):
    """The same video length as the full VAE's run, other frames, and the run says what it trades."""
    tiny, full = tmp_path / "tiny.mp4", tmp_path / "full.mp4"
    result = run_cli("--smoke", "--duration", "1", "--decoder", "tiny", "--tiny-decoder",
                     str(tiny_decoder_file(tmp_path, "lighttaew2_1.safetensors")), "--output", str(tiny))
    assert result.returncode == 0, result.stderr
    assert "trades quality for speed" in result.stderr
    assert run_cli("--smoke", "--duration", "1", "--output", str(full)).returncode == 0
    tiny_info, full_info = read_video_info(tiny), read_video_info(full)
    assert tiny_info["frames"] == full_info["frames"] == 17 and tiny_info["has_audio"]
    assert tiny.read_bytes() != full.read_bytes()
