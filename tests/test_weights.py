"""Fetching weight files (livetalk_core.media.weights) with a fake hub: the CLI's <repo>/<file> layout, a
file renamed on the way (the ComfyUI folders), and downloads turned off."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub
import pytest

from livetalk_core.errors import MissingWeightsError
from livetalk_core.media import weights
from livetalk_core.media.weights import WeightFile, ensure_files, fetch_files

FILE = WeightFile("Org/Repo", "split_files/vae/vae.safetensors", "vae")


@pytest.fixture()
def hub(monkeypatch) -> list[tuple[str, str, Path]]:
    calls: list[tuple[str, str, Path]] = []

    def hf_hub_download(repo_id: str, filename: str, *, local_dir, **_) -> str:
        calls.append((repo_id, filename, Path(local_dir)))
        target = Path(local_dir) / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"weights of " + filename.encode())
        return str(target)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(weights, "hub_unreachable_reason", lambda: None)  # the fake hub answers
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return calls


def test_cli_layout_downloads_in_place_once(hub, tmp_path):
    ensure_files((FILE,), tmp_path)
    assert hub == [("Org/Repo", FILE.filename, tmp_path / "Repo")]
    assert (tmp_path / "Repo" / FILE.filename).read_bytes() == b"weights of split_files/vae/vae.safetensors"
    ensure_files((FILE,), tmp_path)
    assert len(hub) == 1


def test_a_renamed_target_goes_through_a_staging_folder_next_to_it(hub, tmp_path):
    target = tmp_path / "models" / "vae" / "wan_2.1_vae.safetensors"
    target.parent.mkdir(parents=True)
    fetch_files([(FILE, target)], retry="(retry)")
    (_, _, local_dir), = hub
    assert local_dir.parent == target.parent and local_dir.name.startswith(".")
    assert target.read_bytes() == b"weights of split_files/vae/vae.safetensors"
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]


def test_offline_lists_the_files_and_never_calls_the_hub(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    target = tmp_path / "vae.safetensors"
    with pytest.raises(MissingWeightsError) as error:
        fetch_files([(FILE, target)], retry="(retry hint)")
    assert str(error.value) == ("Downloads are turned off. These model files are missing; "
                                "put each one at the path shown:\n"
                                f"  {target}\n      from https://huggingface.co/Org/Repo/resolve/main/{FILE.filename}\n"
                                "(retry hint)")
    assert hub == []
