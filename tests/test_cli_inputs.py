"""The command line (``python -m livetalk_core``) checks every argument before anything loads, for both
families (LiveTalk, and RealVideo through ``--model realvideo``): a bad value is one ``error:`` line and
exit status 2, an output that would overwrite an input or cannot be written is refused, and nothing is
loaded, fetched or written."""

from __future__ import annotations

import importlib
import os
import shutil
import struct
import zlib
from pathlib import Path

import pytest
import torch

from livetalk_core import cli

REPO = Path(__file__).resolve().parents[1]
PORTRAIT = REPO / "assets" / "portrait.jpg"
SPEECH = REPO / "assets" / "speech.flac"


class LoadedTooEarly(Exception):
    pass


@pytest.fixture()
def nothing_loads(monkeypatch):
    """Any model loading, tiny-weight building, fetching or prompt encoding fails the test."""
    def refuse(*args, **kwargs):
        raise LoadedTooEarly("a model was loaded before the arguments were checked")

    # Imported before the patch: a module first imported while it is on would keep the refusing stand-in
    # for good (RealVideo's worker loader imports load_s2v_dit by name), and later tests would load with it.
    importlib.import_module("livetalk_core.realvideo.parallel")
    monkeypatch.setattr(cli, "load_models", refuse)
    monkeypatch.setattr(cli, "weight_files", refuse)
    monkeypatch.setattr(cli, "fetch_weights", refuse)
    monkeypatch.setattr("livetalk_core.realvideo.model.load_s2v_dit", refuse)
    monkeypatch.setattr("livetalk_core.parallel.sequence_parallel.init_from_env", refuse)


@pytest.fixture()
def inputs(tmp_path) -> dict[str, Path]:
    """Copies of the shipped portrait and speech, so that a test that fails cannot harm the originals."""
    image, audio = tmp_path / "face.jpg", tmp_path / "speech.flac"
    shutil.copy(PORTRAIT, image)
    shutil.copy(SPEECH, audio)
    return {"--image": image, "--audio": audio}


def run_family(family: str, args: list[str]) -> int:
    return cli.main(["--smoke", "--model", family, *args])


def refused(capsys, code: int, *words: str) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and "Traceback" not in err
    for word in words:
        assert word in err, err
    return err


FAMILIES = ["livetalk", "realvideo"]


# -- the output is never one of the inputs ---------------------------------------------------------


def same_file_spellings(path: Path, tmp_path: Path) -> dict[str, str]:
    link = tmp_path / "link.mp4"
    link.symlink_to(path)
    hard = tmp_path / "hard.mp4"
    os.link(path, hard)
    return {"same path": str(path), "relative": os.path.relpath(path), "dotted": str(path.parent / "." / path.name),
            "symlink": str(link), "hard link": str(hard)}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("which", ["--audio", "--image"])
@pytest.mark.parametrize("spelling", ["same path", "relative", "dotted", "symlink", "hard link"])
def test_an_input_is_never_overwritten(tmp_path, capsys, nothing_loads, inputs, family, which, spelling):
    original = inputs[which].read_bytes()
    output = same_file_spellings(inputs[which], tmp_path)[spelling]
    code = run_family(family, ["--image", str(inputs["--image"]), "--audio", str(inputs["--audio"]),
                               "--output", output])
    refused(capsys, code, f"same file as {which}", "another file name")
    assert inputs[which].read_bytes() == original


# -- the output can be written -----------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_an_existing_folder_as_output_is_refused(tmp_path, capsys, nothing_loads, family):
    code = run_family(family, ["--output", str(tmp_path)])
    refused(capsys, code, "is a folder", "give a file name")


@pytest.mark.parametrize("family", FAMILIES)
def test_a_folder_that_cannot_be_made_is_refused(tmp_path, capsys, nothing_loads, family):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file where the folder would go")
    code = run_family(family, ["--output", str(blocker / "out" / "video.mp4")])
    refused(capsys, code, "cannot write into the folder", "folder you can write to")
    assert blocker.read_text() == "a file where the folder would go"


def unwritable_folder(tmp_path: Path) -> Path:
    """A folder this process cannot create files in: read-only by mode, or (as root, where modes do not
    stop writes) a sysfs folder."""
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir(mode=0o555)
        return folder
    if os.access("/sys", os.W_OK) and not _can_create_in(Path("/sys")):
        return Path("/sys")
    pytest.skip("no read-only folder available to this user")


def _can_create_in(folder: Path) -> bool:
    try:
        (folder / ".livetalk-probe").touch()
    except OSError:
        return False
    (folder / ".livetalk-probe").unlink()
    return True


@pytest.mark.parametrize("family", FAMILIES)
def test_a_read_only_folder_is_refused(tmp_path, capsys, nothing_loads, family):
    code = run_family(family, ["--output", str(unwritable_folder(tmp_path) / "video.mp4")])
    refused(capsys, code, "cannot write into the folder")


# -- every other argument ----------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("duration", ["0", "-1", "nan", "inf", "-0.0"])
def test_a_duration_that_is_not_a_length_is_refused(tmp_path, capsys, nothing_loads, family, duration):
    code = run_family(family, ["--duration", duration, "--output", str(tmp_path / "x.mp4")])
    refused(capsys, code, f"--duration {float(duration)}", "above 0")
    assert not (tmp_path / "x.mp4").exists()


@pytest.mark.parametrize("family, duration, words", [("livetalk", "0.01", "at least"),
                                                     ("realvideo", "0.00001", "shorter than one audio sample")])
def test_a_duration_too_short_for_the_family_is_refused_before_loading(tmp_path, capsys, nothing_loads, family,
                                                                       duration, words):
    code = run_family(family, ["--duration", duration, "--output", str(tmp_path / "x.mp4")])
    refused(capsys, code, words)
    assert not (tmp_path / "x.mp4").exists()


@pytest.mark.parametrize("size, words", [("abc", "not a size"), ("512x", "not a size"), ("12x34x56", "not a size"),
                                         ("100", "multiples of 16"), ("32", "at least 64"),
                                         ("512x200", "multiples of 16")])
@pytest.mark.parametrize("smoke", [True, False])
def test_a_bad_size_is_refused(tmp_path, capsys, nothing_loads, size, words, smoke):
    code = cli.main([*(["--smoke"] if smoke else []), "--size", size, "--output", str(tmp_path / "x.mp4")])
    refused(capsys, code, words)


def test_a_frame_rate_other_than_16_is_refused(tmp_path, capsys, nothing_loads):
    code = cli.main(["--fps", "25", "--output", str(tmp_path / "x.mp4")])
    refused(capsys, code, "16 fps")


@pytest.mark.parametrize("option", ["--device", "--vae-device"])
@pytest.mark.parametrize("value, words", [("tpu", "not a device"), ("cuda:x", "not a device"), ("cuda:64", "cuda")])
def test_a_device_that_is_not_there_is_refused(tmp_path, capsys, nothing_loads, option, value, words):
    code = cli.main([option, value, "--output", str(tmp_path / "x.mp4")])
    refused(capsys, code, f"{option} ", words)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_says_what_to_do(tmp_path, capsys, nothing_loads):
    code = cli.main(["--device", "cuda", "--output", str(tmp_path / "x.mp4")])
    refused(capsys, code, "--device cuda", "--device cpu")


def tiny_png(path: Path, width: int, height: int) -> Path:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    raw = b"".join(b"\x00" + bytes(3 * width) for _ in range(height))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("smoke", [True, False])
def test_an_image_too_small_is_refused_before_loading(tmp_path, capsys, nothing_loads, smoke):
    image = tiny_png(tmp_path / "icon.png", 48, 40)
    code = cli.main([*(["--smoke"] if smoke else []), "--image", str(image), "--output", str(tmp_path / "x.mp4")])
    refused(capsys, code, "icon.png", "48x40", "at least 64")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("which", ["--image", "--audio"])
def test_an_unreadable_input_is_refused_before_loading(tmp_path, capsys, nothing_loads, family, which):
    junk = tmp_path / ("junk.jpg" if which == "--image" else "junk.wav")
    junk.write_text("not media")
    code = run_family(family, [which, str(junk), "--output", str(tmp_path / "x.mp4")])
    refused(capsys, code, "junk.")


def test_realvideo_model_files_are_checked_before_loading(tmp_path, capsys, nothing_loads):
    present = tmp_path / "present.safetensors"
    present.write_bytes(b"x")
    args = ["--model", "realvideo", "--output", str(tmp_path / "x.mp4"), "--vae", str(present),
            "--wav2vec2", str(tmp_path)]
    refused(capsys, cli.main(args), "Give --dit:", "RealVideo 14B has no release file")
    refused(capsys, cli.main(["--model", "realvideo", "--output", str(tmp_path / "x.mp4")]),
            "Give --dit and --wav2vec2")
    refused(capsys, cli.main([*args, "--dit", str(tmp_path / "absent.pt")]), "--dit", "absent.pt", "does not exist")
    s2v = tiny_s2v_file(tmp_path)
    code = cli.main([*args, "--dit", str(s2v), "--text-encoder", str(present)])
    refused(capsys, code, "--text-encoder and --tokenizer together")
    code = cli.main([*args, "--dit", str(s2v), "--latents-out", str(s2v)])
    refused(capsys, code, "--latents-out", "same file as --dit")
    code = cli.main([*args, "--dit", str(s2v), "--output", str(s2v)])
    refused(capsys, code, "--output", "same file as --dit")


def tiny_s2v_file(folder: Path) -> Path:
    """A RealVideo DiT file (a tiny one): the family is read from its tensors."""
    from safetensors.torch import save_file
    from test_realvideo import tiny_model

    path = folder / "s2v.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_model().state_dict().items()}, str(path))
    return path


def test_the_family_comes_from_the_dit_file(tmp_path, capsys, nothing_loads):
    """--dit decides the family: a RealVideo file runs RealVideo (its flags are taken, LiveTalk's size rule
    is not asked), --model that contradicts the file is refused, and a file of no family names what it is."""
    s2v = tiny_s2v_file(tmp_path)
    out = ["--output", str(tmp_path / "x.mp4"), "--vae", str(s2v), "--wav2vec2", str(tmp_path)]
    refused(capsys, cli.main([*out, "--dit", str(s2v), "--model", "livetalk"]), "--model livetalk",
            "RealVideo 14B model")
    refused(capsys, cli.main([*out, "--dit", str(s2v), "--steps", "3"]), "--steps 3",
            "RealVideo 14B samples with 2 or 4")
    refused(capsys, cli.main([*out, "--dit", str(s2v), "--dit-config", str(tmp_path / "no.json"), "--latents-out",
                              str(s2v)]), "same file as --dit")  # --dit-config is RealVideo's: accepted
    vae = tmp_path / "vae.safetensors"
    from safetensors.torch import save_file

    save_file({"conv2.weight": torch.zeros(32, 32, 1, 1, 1)}, str(vae))
    refused(capsys, cli.main([*out, "--dit", str(vae)]), "vae.safetensors is not a LiveTalk model")


@pytest.mark.parametrize("args, words", [
    (["--dit-config", "c.json"], ["--dit-config is for RealVideo 14B", "this run is LiveTalk 1.3B"]),
    (["--fp8"], ["--fp8 is for families whose loader takes it", "LiveTalk 1.3B does not"]),
    (["--base", "b.safetensors"], ["--base is for families whose loader takes it"]),
    (["--steps", "0"], ["--steps 0", "1 or more"]),
])
def test_flags_the_family_does_not_use_are_refused(tmp_path, capsys, nothing_loads, args, words):
    refused(capsys, cli.main([*args, "--output", str(tmp_path / "x.mp4")]), *words)


def test_torchrun_is_refused_for_a_family_on_one_gpu(tmp_path, capsys, nothing_loads, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    refused(capsys, cli.main(["--smoke", "--output", str(tmp_path / "x.mp4")]), "LiveTalk 1.3B runs on one GPU",
            "for RealVideo 14B")


def test_torchrun_over_more_ranks_than_the_heads_split_is_refused_from_the_header(tmp_path, capsys, nothing_loads,
                                                                                    monkeypatch):
    """The head split is checked from the DiT file's header under torchrun, before every rank would load the
    whole model only to be refused by the sequence-parallel attach."""
    from test_realvideo import tiny_model

    assert tiny_model().config.num_heads == 1  # the file below: nothing splits it
    monkeypatch.setenv("WORLD_SIZE", "2")
    s2v = tiny_s2v_file(tmp_path)
    out = ["--wav2vec2", str(tmp_path), "--output", str(tmp_path / "x.mp4")]
    err = refused(capsys, cli.main(["--dit", str(s2v), *out]),
                  "1 attention head cannot be split evenly over 2 GPUs", "without torchrun")
    assert err.count("error:") == 1


def test_the_head_split_check_names_the_process_counts_that_work(tmp_path, monkeypatch):
    import torch
    from safetensors.torch import save_file

    from livetalk_core.errors import InputError
    from livetalk_core.wan.dit import HEAD_DIM

    path = tmp_path / "dit.safetensors"
    save_file({"model.blocks.0.self_attn.q.weight": torch.zeros(6 * HEAD_DIM, 8)}, str(path))  # 6 heads
    for ranks in ("1", "2", "3", "6"):
        monkeypatch.setenv("WORLD_SIZE", ranks)
        cli.check_head_split(path)
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(InputError, match="6 attention heads cannot be split evenly over 4 GPUs: "
                                         "use --nproc_per_node 2 or 3 or 6"):
        cli.check_head_split(path)


def test_usable_durations_and_sizes_pass_the_checks():
    from livetalk_core.cli_checks import check_duration, parse_size

    for seconds in (0.01, 1.0, 3.0, 600.0, None):
        check_duration(seconds)
    assert parse_size("512") == (512, 512) and parse_size("640x384") == (384, 640)
    assert parse_size(" 64 X 80 ") == (80, 64)
    assert parse_size("abc", max_hw=720) == (512, 512)


def test_realvideo_offline_lists_every_file_it_fetches_in_one_message(tmp_path, capsys, monkeypatch):
    """RealVideo through the one CLI gets #16's first-run behaviour: its VAE and the umT5 encoder with its
    tokenizer (fetched like LiveTalk's) are listed together, once, before anything loads; --skip-download."""
    from livetalk_core.media.weights import TEXT_ENCODER_FILES, WAN_VAE_FILE

    def refuse(*args, **kwargs):
        raise LoadedTooEarly("a model was loaded before the missing files were listed")

    monkeypatch.setattr(cli, "load_models", refuse)
    s2v = tiny_s2v_file(tmp_path)
    models = tmp_path / "models"
    code = cli.main(["--dit", str(s2v), "--wav2vec2", str(tmp_path), "--models-dir", str(models), "--skip-download",
                     "--output", str(tmp_path / "x.mp4")])
    err = refused(capsys, code, "missing")
    for f in (WAN_VAE_FILE, *TEXT_ENCODER_FILES):
        assert err.count(f"  {f.local_path(models)}\n") == 1, f.filename
    assert err.count("error:") == 1 and not (tmp_path / "x.mp4").exists()
