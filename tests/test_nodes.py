"""The pack's ComfyUI-independent parts: the version gate and the header-only file checks behind the
loader's validation (nodes/model_files.py). The nodes themselves run in test_comfy_server.py."""

from __future__ import annotations

import importlib
import importlib.util
import json
import struct
import subprocess
import sys

import pytest
import torch
from comfy_env import REPO, import_pack
from safetensors.torch import load_file
from tiny_weights import (
    AUDIO_FEATURES,
    WAV2VEC2_HIDDEN,
    WAV2VEC2_LARGE_LAYERS,
    WAV2VEC2_LAYERS,
    save_module,
    save_tiny_wav2vec2,
    tiny_dit,
    tiny_s2v_dit,
    tiny_vae,
)
from toy_family import tiny_toy_dit, toy_family

PACKAGE = "livetalk_pack_under_test"


@pytest.fixture(scope="module")
def pack():
    """The pack imported the way ComfyUI does (a package from its folder), without ComfyUI."""
    module = import_pack(PACKAGE)
    yield module
    for name in [n for n in sys.modules if n == PACKAGE or n.startswith(PACKAGE + ".")]:
        del sys.modules[name]


@pytest.fixture(scope="module")
def files(pack):
    return importlib.import_module(f"{PACKAGE}.nodes.model_files")


@pytest.fixture(scope="module")
def families(pack):
    return importlib.import_module(f"{PACKAGE}.livetalk_core.families")


@pytest.fixture(scope="module")
def errors(pack):
    return importlib.import_module(f"{PACKAGE}.livetalk_core.errors")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    folder = tmp_path_factory.mktemp("weights")
    return {
        "dit": save_module(tiny_dit(text_dim=16), folder / "dit.safetensors"),
        "s2v": save_module(tiny_s2v_dit(text_dim=16), folder / "s2v.safetensors", dtype=torch.bfloat16),
        "vae": save_module(tiny_vae(), folder / "vae.safetensors"),
        "w2v_file": save_tiny_wav2vec2(folder / "w2v.safetensors"),
        "w2v_folder": save_tiny_wav2vec2(folder / "w2v"),
        "w2v_large": save_tiny_wav2vec2(folder / "w2v_large.safetensors", large=True),
    }


def _import_pack_without_comfy_api(old_comfyui: bool) -> subprocess.CompletedProcess:
    """Import the pack in a fresh process with no ``comfy_api``; ``old_comfyui`` first loads stand-ins
    for the modules an (old) ComfyUI has imported before it loads custom nodes."""
    script = (
        "import importlib.util, logging, sys, types\n"
        "logging.basicConfig(format='%(levelname)s %(message)s')\n"
        + ("sys.modules['folder_paths'] = types.ModuleType('folder_paths')\n" if old_comfyui else "")
        + f"spec = importlib.util.spec_from_file_location('pack', {str(REPO / '__init__.py')!r}, "
        f"submodule_search_locations=[{str(REPO)!r}])\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "print(m.NODE_CLASS_MAPPINGS, hasattr(m, 'comfy_entrypoint'))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd="/")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "{} False"
    return result


def test_in_a_comfyui_without_comfy_api_the_pack_logs_one_line_and_registers_nothing():
    lines = _import_pack_without_comfy_api(old_comfyui=True).stderr.strip().splitlines()
    assert len(lines) == 1 and "ComfyUI 0.3.75 or newer" in lines[0], lines


def test_outside_comfyui_the_pack_imports_silently():
    """pytest imports the repository root's __init__.py (the root is a package): no ComfyUI there,
    so no "needs ComfyUI 0.3.75" error in a plain test run."""
    assert _import_pack_without_comfy_api(old_comfyui=False).stderr.strip() == ""


def test_tensor_shapes_reads_safetensors_headers_only(files, weights, tmp_path, errors):
    shapes = files.tensor_shapes(weights["dit"])
    assert shapes["audio_proj.proj.weight"] == (32, 4 * AUDIO_FEATURES)
    torch.save({"a": torch.zeros(1)}, tmp_path / "x.pth")
    assert files.tensor_shapes(tmp_path / "x.pth") is None
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(struct.pack("<Q", 10) + b"not json!!")
    with pytest.raises(errors.CheckpointError, match="download it again|Download it again"):
        files.tensor_shapes(broken)


def test_detect_family(files, families, weights, errors, tmp_path):
    assert families.detect_family(files.tensor_shapes(weights["dit"]), weights["dit"]) is families.LIVETALK_13B
    prefixed = {f"model.diffusion_model.{k}": v for k, v in files.tensor_shapes(weights["dit"]).items()}
    assert families.detect_family(prefixed, "x.safetensors") is families.LIVETALK_13B
    refused = r"not a LiveTalk model: it looks like a Wan VAE.*LiveTalk-1\.3B.*wan2\.2_s2v"
    with pytest.raises(errors.CheckpointError, match=refused):
        families.detect_family(files.tensor_shapes(weights["vae"]), weights["vae"])


def test_detect_family_finds_a_registered_family(files, families, weights, errors, tmp_path):
    """A family registered from outside the pack (the tests' toy) is detected by its marker tensor and
    its audio-encoder check works; unregistered, its file is refused with the usual message."""
    toy = toy_family(PACKAGE)
    path = save_module(tiny_toy_dit(AUDIO_FEATURES, 16), tmp_path / "toy.safetensors")
    shapes = files.tensor_shapes(path)
    refused = r"toy\.safetensors is not a LiveTalk model: it looks like .*Pick LiveTalk-1\.3B"
    with pytest.raises(errors.CheckpointError, match=refused):
        families.detect_family(shapes, path)
    families.register_family(toy)
    try:
        assert families.detect_family(shapes, path) is toy
        assert families.detect_family(files.tensor_shapes(weights["dit"]), weights["dit"]) is families.LIVETALK_13B
        files.check_audio_encoder_fits(toy, shapes, files.audio_encoder_size(weights["w2v_file"]), "w2v")
        with pytest.raises(errors.InputError, match="but the Toy Talker model expects 256"):
            files.check_audio_encoder_fits(toy, shapes, files.audio_encoder_size(weights["w2v_large"]), "w2v_large")
    finally:
        families.unregister_family(toy)
    with pytest.raises(errors.CheckpointError, match=refused):
        families.detect_family(shapes, path)


def test_detect_realvideo_in_each_layout(files, families, weights, tmp_path):
    """Comfy-Org's bare keys (header), and RealVideo's model.pt (``generator`` / ``model.`` keys,
    a pickle: its shapes come from a memory-mapped load)."""
    shapes = files.tensor_shapes(weights["s2v"])
    assert families.detect_family(shapes, weights["s2v"]) is families.REALVIDEO_14B
    model_pt = tmp_path / "model.pt"
    torch.save({"generator": {f"model.{k}": v for k, v in load_file(weights["s2v"]).items()}}, model_pt)
    assert families.detect_family(files.checkpoint_shapes(model_pt), model_pt) is families.REALVIDEO_14B


def test_audio_encoder_size_from_a_file_or_a_folder(files, weights, errors):
    base = files.EncoderSize(WAV2VEC2_LAYERS, WAV2VEC2_HIDDEN)
    assert files.audio_encoder_size(weights["w2v_file"]) == base
    assert files.audio_encoder_size(weights["w2v_folder"]) == base
    assert files.audio_encoder_size(weights["w2v_large"]) == files.EncoderSize(WAV2VEC2_LARGE_LAYERS, WAV2VEC2_HIDDEN)
    with pytest.raises(errors.CheckpointError, match="not a wav2vec2 audio encoder"):
        files.audio_encoder_size(weights["vae"])


def test_mismatched_audio_encoder_names_the_right_one(files, families, weights, errors):
    livetalk, s2v = files.tensor_shapes(weights["dit"]), files.tensor_shapes(weights["s2v"])
    base = files.audio_encoder_size(weights["w2v_file"])
    large = files.audio_encoder_size(weights["w2v_large"])
    files.check_audio_encoder_fits(families.LIVETALK_13B, livetalk, base, "w2v")
    files.check_audio_encoder_fits(families.REALVIDEO_14B, s2v, large, "w2v_large")
    with pytest.raises(errors.InputError, match=r"gives 1664 features.*1\.3B model expects 256.*wav2vec2-base-960h"):
        files.check_audio_encoder_fits(families.LIVETALK_13B, livetalk, large, "wav2vec2-large")
    with pytest.raises(errors.InputError, match=r"gives 192 features.*14B model expects 1600.*wav2vec2_large_english"):
        files.check_audio_encoder_fits(families.REALVIDEO_14B, s2v, base, "wav2vec2-base")


def test_vae_check(files, weights, errors):
    files.check_vae_fits(files.tensor_shapes(weights["vae"]), "vae")
    wan22 = {**files.tensor_shapes(weights["vae"]), "conv2.weight": (48, 48, 1, 1, 1)}
    with pytest.raises(errors.CheckpointError, match="48 latent channels"):
        files.check_vae_fits(wan22, "wan2.2_vae")
    with pytest.raises(errors.CheckpointError, match="not a Wan VAE"):
        files.check_vae_fits(files.tensor_shapes(weights["dit"]), "dit")


def test_text_context_pads_with_zero_rows_and_trims(families, errors):
    cond = torch.randn(1, 7, 16)
    context = families.text_context([[cond, {}]], text_dim=16)
    assert context.shape == (1, 512, 16)
    assert torch.equal(context[:, :7], cond) and not context[:, 7:].any()
    assert families.text_context([[torch.randn(1, 600, 16), {}]], 16).shape == (1, 512, 16)
    with pytest.raises(errors.InputError, match="CLIPLoader"):
        families.text_context([[torch.randn(1, 7, 768), {}]], text_dim=16)
    with pytest.raises(errors.InputError, match="empty"):
        families.text_context([], text_dim=16)



def test_the_download_catalogue_serves_the_shipped_workflows_download_hints(files):
    """A file the front end offers to download (a workflow's ``properties.models``) is the same file,
    from the same place, as the loader's ``(download)`` choice of that name."""
    loaders = [node for path in sorted((REPO / "workflows").glob("*.json"))
               for node in json.loads(path.read_text())["nodes"] if node["type"] == "LoadLiveTalkModel"]
    # every shipped graph (offline and live, both families) offers its DiT, VAE and audio encoder
    assert len(loaders) >= 4 and all(len(node["properties"]["models"]) == 3 for node in loaders)
    hints = [hint for node in loaders for hint in node["properties"]["models"]]
    catalogue = {d.name: (d.folder, d.source.url()) for d in files.DOWNLOADABLE}
    for hint in hints:
        assert catalogue[hint["name"]] == (hint["directory"], hint["url"]), hint["name"]
