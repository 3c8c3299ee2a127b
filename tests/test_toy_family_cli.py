"""The test-only toy family (tests/toy_family.py) through the command line: registered with
``families.register_family`` and nothing else, ``livetalk_core.cli.main`` reads its family from the DiT
file, loads it, encodes the audio and the reference its way, samples its blocks and writes the mp4; the
CLI has nothing made for it. The prompt's embedding comes from the one prompt cache (no umT5 here)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_weights import AUDIO_FEATURES, UMT5_WIDTH, save_module, save_tiny_wav2vec2, tiny_vae
from toy_family import tiny_toy_dit

from livetalk_core.cli import context_cache
from livetalk_core.media.video_io import read_video_info

REPO = Path(__file__).resolve().parents[1]
TOY_PROMPT = "A toy talks."  # the toy family's talking_prompt
# A separate process, so the registration ends with it: the toy family, then the CLI's main with the arguments.
REGISTER_AND_RUN = (
    "import sys\n"
    "from livetalk_core import cli, families\n"
    "from toy_family import toy_family\n"
    "families.register_family(toy_family())\n"
    "sys.exit(cli.main(sys.argv[1:]))\n"
)


@pytest.fixture(scope="module")
def toy_files(tmp_path_factory) -> dict[str, Path]:
    """The toy DiT, a tiny VAE and wav2vec2, and a models folder whose prompt cache holds the toy's prompt."""
    root = tmp_path_factory.mktemp("toy")
    files = {"--dit": save_module(tiny_toy_dit(AUDIO_FEATURES, UMT5_WIDTH), root / "toy.safetensors"),
             "--vae": save_module(tiny_vae(), root / "vae.safetensors"),
             "--wav2vec2": save_tiny_wav2vec2(root / "w2v.safetensors"),
             "--models-dir": root / "models"}
    cache = context_cache(files["--models-dir"], TOY_PROMPT)
    cache.parent.mkdir(parents=True)
    save_file({"context": torch.randn(1, 5, UMT5_WIDTH, generator=torch.Generator().manual_seed(0))}, str(cache))
    return files


def run_toy(toy_files: dict[str, Path], out: Path, *args: str) -> subprocess.CompletedProcess:
    paths = [str(part) for option, path in toy_files.items() for part in (option, path)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)]), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-c", REGISTER_AND_RUN, *paths, "--device", "cpu", "--precision", "fp32", "--size", "64",
         "--duration", "1", "--skip-download", "--output", str(out), "--latents-out", str(out.with_suffix(".st")),
         *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )


def test_a_registered_family_runs_through_the_cli(tmp_path, toy_files):
    done = run_toy(toy_files, tmp_path / "toy.mp4")
    assert done.returncode == 0, done.stderr[-3000:]
    info = read_video_info(tmp_path / "toy.mp4")
    assert (info["frames"], info["width"], info["height"], info["fps"]) == (17, 64, 64, 16)  # floor(16 x 1 s) + 1
    assert info["has_audio"]
    latents = load_file(str(tmp_path / "toy.st"))["latents"]
    assert latents.shape == (1, 16, 6, 8, 8)  # 2 toy blocks of 3 latent frames at 64 px

    again, other = (run_toy(toy_files, tmp_path / f"{name}.mp4", "--seed", seed)
                    for name, seed in (("a", "0"), ("b", "1")))
    assert again.returncode == 0 and other.returncode == 0, (again.stderr[-2000:], other.stderr[-2000:])
    assert torch.equal(load_file(str(tmp_path / "a.st"))["latents"], latents)  # seeded
    assert not torch.equal(load_file(str(tmp_path / "b.st"))["latents"], latents)


def test_the_cli_refuses_what_the_toy_family_does_not_do(tmp_path, toy_files):
    """Its capabilities come from the family too: no fp8 weights, no sequence parallel, no tiny weights."""
    done = run_toy(toy_files, tmp_path / "toy.mp4", "--fp8")
    assert done.returncode == 2 and "--fp8 is for families whose loader takes it; Toy Talker does not" in done.stderr
    done = run_toy(toy_files, tmp_path / "toy.mp4", "--smoke")
    assert done.returncode == 2 and "Toy Talker has no tiny random weights" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "toy.mp4").exists()


def test_the_cli_names_no_family():
    """No family branch in the command line: none of the names that belong to one family appear in it."""
    import re

    from test_architecture import FAMILY_NAMES

    pattern = re.compile("|".join(r"\b" + re.escape(name) for name in (*FAMILY_NAMES, "isinstance")))
    files = [REPO / "livetalk_core" / name for name in ("cli.py", "cli_checks.py", "__main__.py")]
    found = [f"{path.name}:{number}: {line.strip()}" for path in files
             for number, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert not found, "\n".join(found)
