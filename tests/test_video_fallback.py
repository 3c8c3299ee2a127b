"""When the output's folder refuses the video in the middle of a run, the frames are kept in a fallback
file that the message names (the current folder, else the temporary folder), never lost."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from livetalk_core import cli
from livetalk_core.errors import LiveTalkError
from livetalk_core.media.video_io import VideoWriter, read_video_info


def frames(count: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, (count, 64, 64, 3), dtype=np.uint8)


@pytest.fixture()
def user_folder(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "user"
    folder.mkdir()
    monkeypatch.chdir(folder)
    return folder


def test_a_folder_gone_before_the_first_frame_sends_the_video_to_the_current_folder(tmp_path, user_folder, caplog):
    target = tmp_path / "out" / "clip.mp4"
    with VideoWriter(target) as writer:
        (tmp_path / "out").write_text("a file now stands where the folder was")
        with caplog.at_level(logging.WARNING):
            writer.write(frames(20))
    kept = writer.saved_path
    assert kept.parent == user_folder and kept.name.startswith("clip.unsaved-") and kept.suffix == ".mp4"
    assert read_video_info(kept)["frames"] == 20
    assert str(kept) in caplog.text and "cannot write into" in caplog.text
    assert [p.name for p in user_folder.iterdir()] == [kept.name]


def test_a_name_taken_by_a_folder_at_the_end_keeps_the_finished_video(tmp_path, user_folder):
    target = tmp_path / "clip.mp4"
    writer = VideoWriter(target)
    writer.write(frames(20))
    target.mkdir()  # e.g. another program made a folder of that name while the video was generated
    with pytest.raises(LiveTalkError) as error:
        writer.close()
    kept = next(user_folder.iterdir())
    assert f"it was kept as {kept} instead" in str(error.value) and str(target) in str(error.value)
    assert read_video_info(kept)["frames"] == 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4", "user"]  # no partial file left


def test_the_temporary_folder_when_the_current_folder_is_the_refusing_one(tmp_path, monkeypatch):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr("tempfile.tempdir", None)  # re-read TMPDIR
    monkeypatch.chdir(tmp_path)
    target = tmp_path / "clip.mp4"
    writer = VideoWriter(target)
    writer.write(frames(20))
    target.mkdir()
    with pytest.raises(LiveTalkError):
        writer.close()
    (kept,) = scratch.iterdir()
    assert read_video_info(kept)["frames"] == 20


def test_cli_names_the_fallback_file(tmp_path, user_folder, monkeypatch, capsys):
    """A smoke run whose output name is taken by a folder after the checks: exit 2, the video is kept."""
    out = tmp_path / "smoke.mp4"
    real_write = VideoWriter.write

    def write_then_block_the_name(self, batch):
        real_write(self, batch)
        out.mkdir(exist_ok=True)

    monkeypatch.setattr(VideoWriter, "write", write_then_block_the_name)
    code = cli.main(["--smoke", "--duration", "0.5", "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    kept = next(user_folder.iterdir())
    assert f"kept as {kept}" in err and "Traceback" not in err
    assert read_video_info(kept)["frames"] == 9
