"""LoadLiveTalkModel's files inside ComfyUI (run by test_loader_in_comfyui.py through comfy_in_process):
``(download)`` choices fetched into ComfyUI's model folders, RealVideo partial fine-tunes over a base
model, and fp8 weights.

The hub is never reached: ``huggingface_hub.hf_hub_download`` is replaced by a fake that serves tiny
random weights under the catalogue's repository file names.
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import folder_paths
import huggingface_hub
import pytest
import torch
from nodes_in_comfyui_cases import PACKAGE, pack, run, tone  # noqa: F401  (pack is a fixture: it imports the pack)
from tiny_weights import UMT5_WIDTH, save_module, save_tiny_wav2vec2, tiny_dit, tiny_s2v_dit, tiny_vae

SIZE = 64
FP8 = torch.float8_e4m3fn
FINE_TUNED = ("blocks.1.", "audio_injector.injector.1.")
LIVETALK_DOWNLOADS = {"model_name": "LiveTalk-1.3B-V0.1.safetensors", "vae_name": "wan_2.1_vae.safetensors",
                      "audio_encoder_name": "wav2vec2-base-960h.safetensors"}


def module(name: str):
    return importlib.import_module(f"{PACKAGE}.{name}")


@pytest.fixture(scope="session")
def lt(pack) -> SimpleNamespace:
    """The pack's modules these cases use."""
    names = ("nodes.loader", "nodes.encoders", "nodes.sampling", "nodes.comfy_models", "nodes.model_files",
             "livetalk_core.errors", "livetalk_core.families", "livetalk_core.wan.fp8_linear",
             "livetalk_core.family_base")
    return SimpleNamespace(**{name.split(".")[-1]: module(name) for name in names})


@pytest.fixture(scope="session")
def tiny_files(tmp_path_factory) -> dict[str, Path]:
    """Tiny weights of both families, and a RealVideo partial fine-tune (``model.pt``) of the S2V one."""
    folder = tmp_path_factory.mktemp("tiny")
    files = {
        "dit": save_module(tiny_dit(), folder / "dit.safetensors"),
        "s2v": save_module(tiny_s2v_dit(), folder / "s2v.safetensors", dtype=torch.bfloat16),
        "vae": save_module(tiny_vae(), folder / "vae.safetensors"),
        "w2v": save_tiny_wav2vec2(folder / "w2v.safetensors"),
        "w2v_large": save_tiny_wav2vec2(folder / "w2v_large.safetensors", large=True),
    }
    tuned = {k: v for k, v in tiny_s2v_dit(seed=1).state_dict().items() if k.startswith(FINE_TUNED)}
    torch.save({"generator": {"model." + k: v for k, v in tuned.items()}}, folder / "model.pt")
    files["partial"] = folder / "model.pt"
    return files


@pytest.fixture()
def models(lt, tmp_path, monkeypatch) -> Path:
    """Empty ComfyUI model folders under ``<tmp>/models``; ``diffusion_models`` lists ``unet`` first, as
    ComfyUI does."""
    root = tmp_path / "models"
    monkeypatch.setattr(folder_paths, "models_dir", str(root))
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    extensions = set(lt.comfy_models.MODEL_EXTENSIONS)
    for name, subfolders in {"livetalk": ["livetalk"], "diffusion_models": ["unet", "diffusion_models"],
                             "vae": ["vae"], "audio_encoders": ["audio_encoders"]}.items():
        paths = [str(root / sub) for sub in subfolders]
        for path in paths:
            os.makedirs(path)
        monkeypatch.setitem(folder_paths.folder_names_and_paths, name, (paths, extensions))
    return root


def put(source: Path, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return target


@pytest.fixture()
def hub(lt, tiny_files, monkeypatch) -> list[tuple[str, str, Path]]:
    """A fake ``hf_hub_download`` serving the tiny files under the catalogue's sources; returns its calls."""
    by_name = {"LiveTalk-1.3B-V0.1.safetensors": "dit", "wan2.2_s2v_14B_bf16.safetensors": "s2v",
               "wan2.2_s2v_14B_fp8_scaled.safetensors": "s2v", "wan_2.1_vae.safetensors": "vae",
               "wav2vec2-base-960h.safetensors": "w2v", "wav2vec2_large_english_fp16.safetensors": "w2v_large"}
    served = {(d.source.repo_id, d.source.filename): tiny_files[by_name[d.name]]
              for d in lt.model_files.DOWNLOADABLE}
    calls: list[tuple[str, str, Path]] = []

    def hf_hub_download(repo_id: str, filename: str, *, local_dir, **_) -> str:
        calls.append((repo_id, filename, Path(local_dir)))
        return str(put(served[(repo_id, filename)], Path(local_dir) / filename))

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(module("livetalk_core.media.weights"), "hub_unreachable_reason", lambda: None)  # it answers
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return calls


def load(lt, **inputs):
    inputs = {"precision": "fp32", "attention": "sdpa", "compile": False, **inputs}
    return run(lt.loader.LoadLiveTalkModel, **inputs).result


def validate(lt, **inputs):
    """What the loader says about ``inputs`` before it fetches or loads anything (the first thing it
    does when it runs): True, or its one message."""
    try:
        lt.loader.check_inputs(**inputs)
    except lt.errors.LiveTalkError as exc:
        return str(exc)
    return True


def with_download(names: dict[str, str]) -> dict[str, str]:
    return {k: v + " (download)" for k, v in names.items()}


# -- Downloads -----------------------------------------------------------------------------------------


def test_lists_offer_the_known_files_to_download_also_once_they_are_there(lt, models, tiny_files):
    """ComfyUI refuses a value that is not in the list when the prompt is queued: a workflow saved
    with a (download) choice must stay valid once the file was fetched."""
    cm = lt.comfy_models
    assert {"LiveTalk-1.3B-V0.1.safetensors (download)", "wan2.2_s2v_14B_bf16.safetensors (download)",
            "wan2.2_s2v_14B_fp8_scaled.safetensors (download)"} == set(cm.dit_choices())
    assert cm.vae_choices() == ["wan_2.1_vae.safetensors (download)"]
    assert set(cm.audio_encoder_choices()) == {"wav2vec2-base-960h.safetensors (download)",
                                                "wav2vec2_large_english_fp16.safetensors (download)"}
    put(tiny_files["s2v"], models / "unet" / "wan2.2_s2v_14B_bf16.safetensors")  # a legacy folder counts too
    put(tiny_files["vae"], models / "vae" / "wan_2.1_vae.safetensors")
    assert {"wan2.2_s2v_14B_bf16.safetensors", "wan2.2_s2v_14B_bf16.safetensors (download)"} <= set(cm.dit_choices())
    assert cm.vae_choices() == ["wan_2.1_vae.safetensors", "wan_2.1_vae.safetensors (download)"]


def test_only_complete_s2v_dits_are_offered_as_a_base(lt, models, tiny_files):
    """base_model_name lists what can carry a partial RealVideo fine-tune: complete Wan2.2-S2V DiTs
    (by their safetensors header), pickles by name, and the S2V downloads; not the LiveTalk 1.3B DiT,
    not a partial file, not a broken one."""
    put(tiny_files["s2v"], models / "diffusion_models" / "s2v_base.safetensors")
    put(tiny_files["s2v"], models / "livetalk" / "renamed_complete.safetensors")
    put(tiny_files["dit"], models / "livetalk" / "LiveTalk-1.3B-V0.1.safetensors")
    put(tiny_files["partial"], models / "livetalk" / "model.pt")
    put(tiny_files["partial"], models / "livetalk" / "realvideo_s2v_full.pt")
    (models / "livetalk" / "broken.safetensors").write_bytes(b"not safetensors")
    downloads = ["wan2.2_s2v_14B_bf16.safetensors (download)", "wan2.2_s2v_14B_fp8_scaled.safetensors (download)"]
    assert lt.comfy_models.base_choices() == [
        "realvideo_s2v_full.pt", "renamed_complete.safetensors", "s2v_base.safetensors", *downloads]
    options = lt.loader.LoadLiveTalkModel.INPUT_TYPES()["optional"]["base_model_name"][1]["options"]
    assert options == ["none", *lt.comfy_models.base_choices()]
    put(tiny_files["dit"], models / "diffusion_models" / "s2v_base.safetensors")  # replaced: read again
    os.utime(models / "diffusion_models" / "s2v_base.safetensors", ns=(1, 1))
    assert "s2v_base.safetensors" not in lt.comfy_models.base_choices()


def test_download_choices_are_fetched_into_the_comfy_folders_then_loaded(lt, models, hub):
    names = with_download(LIVETALK_DOWNLOADS)
    assert validate(lt, **names) is True
    assert hub == []  # validation never downloads
    model, _, audio_encoder = load(lt, **names)

    assert model.family is lt.families.LIVETALK_13B and audio_encoder.engine.num_layers == 2
    comfy_org = "Comfy-Org/Wan_2.1_ComfyUI_repackaged"
    targets = {"GAIR/LiveTalk-1.3B-V0.1": models / "livetalk" / "LiveTalk-1.3B-V0.1.safetensors",
               comfy_org: models / "vae" / "wan_2.1_vae.safetensors",
               "facebook/wav2vec2-base-960h": models / "audio_encoders" / "wav2vec2-base-960h.safetensors"}
    assert [(repo, filename) for repo, filename, _ in hub] == [
        ("GAIR/LiveTalk-1.3B-V0.1", "model.safetensors"), (comfy_org, "split_files/vae/wan_2.1_vae.safetensors"),
        ("facebook/wav2vec2-base-960h", "model.safetensors")]
    for repo, _, local_dir in hub:
        assert local_dir.parent == targets[repo].parent  # resumable downloads stay in the target folder
        assert targets[repo].is_file() and not local_dir.exists()  # moved into place, staging folder gone
    assert lt.comfy_models.dit_choices() == ["LiveTalk-1.3B-V0.1.safetensors",
                                               "LiveTalk-1.3B-V0.1.safetensors (download)",
                                               "wan2.2_s2v_14B_bf16.safetensors (download)",
                                               "wan2.2_s2v_14B_fp8_scaled.safetensors (download)"]

    load(lt, **names)  # a saved workflow still names the (download) choices: the files are used as they are
    assert len(hub) == 3


def test_the_14b_downloads_go_to_diffusion_models_not_unet(lt, models, hub):
    load(lt, model_name="wan2.2_s2v_14B_bf16.safetensors (download)", vae_name="wan_2.1_vae.safetensors (download)",
         audio_encoder_name="wav2vec2_large_english_fp16.safetensors (download)")
    assert (models / "diffusion_models" / "wan2.2_s2v_14B_bf16.safetensors").is_file()
    assert (models / "audio_encoders" / "wav2vec2_large_english_fp16.safetensors").is_file()
    assert not list((models / "unet").iterdir())
    assert hub[0][:2] == ("Comfy-Org/Wan_2.2_ComfyUI_Repackaged",
                          "split_files/diffusion_models/wan2.2_s2v_14B_bf16.safetensors")


def test_offline_lists_every_file_and_where_it_goes(lt, models, hub, tiny_files, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    put(tiny_files["vae"], models / "vae" / "wan_2.1_vae.safetensors")
    names = with_download(LIVETALK_DOWNLOADS)
    assert validate(lt, **names) is True  # nothing wrong with the choices themselves
    with pytest.raises(lt.errors.MissingWeightsError) as error:
        load(lt, **names)
    message = str(error.value)
    assert message.startswith("Downloads are turned off.")
    for path, url in ((models / "livetalk" / "LiveTalk-1.3B-V0.1.safetensors",
                       "https://huggingface.co/GAIR/LiveTalk-1.3B-V0.1/resolve/main/model.safetensors"),
                      (models / "audio_encoders" / "wav2vec2-base-960h.safetensors",
                       "https://huggingface.co/facebook/wav2vec2-base-960h/resolve/main/model.safetensors")):
        assert f"  {path}\n      from {url}" in message
    assert "wan_2.1_vae" not in message  # it is there
    assert "HF_HUB_OFFLINE" in message.splitlines()[-1]
    assert hub == []


def test_a_failed_download_says_what_is_still_missing(lt, models, monkeypatch):
    def unreachable(repo_id, filename, **_):
        raise ConnectionError("hub unreachable")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    monkeypatch.setattr(module("livetalk_core.media.weights"), "hub_unreachable_reason", lambda: None)  # it answers
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(lt.errors.MissingWeightsError) as error:
        load(lt, **with_download(LIVETALK_DOWNLOADS))
    message = str(error.value)
    assert message.startswith(
        "Downloading model.safetensors from GAIR/LiveTalk-1.3B-V0.1 failed (ConnectionError: hub unreachable)."
    )
    assert message.count("\n      from https://huggingface.co/") == 3


def test_without_a_network_the_loader_fails_at_once_with_every_file(lt, models, monkeypatch):
    """HF_HUB_OFFLINE unset and the hub unreachable: one quick message listing the files, no download
    tried (huggingface_hub would retry each request for about 25 s)."""
    import socket
    import time

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]  # nothing listens there once the socket is closed
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{closed}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def must_not_download(*args, **kwargs):
        raise AssertionError("a download was tried although the hub cannot be reached")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", must_not_download)
    start = time.monotonic()
    with pytest.raises(lt.errors.MissingWeightsError) as error:
        load(lt, **with_download(LIVETALK_DOWNLOADS))
    assert time.monotonic() - start < 10
    message = str(error.value)
    assert message.startswith(f"The Hugging Face hub (http://127.0.0.1:{closed}) cannot be reached"), message
    assert message.count("\n      from https://huggingface.co/") == 3


def test_a_missing_known_file_points_to_its_download_choice(lt, models, tiny_files):
    put(tiny_files["vae"], models / "vae" / "vae.safetensors")
    put(tiny_files["w2v"], models / "audio_encoders" / "w2v.safetensors")
    message = validate(lt, model_name="LiveTalk-1.3B-V0.1.safetensors", vae_name="vae.safetensors",
                       audio_encoder_name="w2v.safetensors")
    assert message == ("The model 'LiveTalk-1.3B-V0.1.safetensors' was not found in models/livetalk or "
                       "models/diffusion_models. Pick 'LiveTalk-1.3B-V0.1.safetensors (download)' to download it, "
                       "or put the file there and refresh.")


# -- RealVideo partial fine-tune over a base model ------------------------------------------------------


@pytest.fixture()
def realvideo(models, tiny_files) -> dict[str, str]:
    put(tiny_files["partial"], models / "livetalk" / "model.pt")
    put(tiny_files["s2v"], models / "diffusion_models" / "s2v_base.safetensors")
    put(tiny_files["dit"], models / "livetalk" / "dit.safetensors")
    put(tiny_files["vae"], models / "vae" / "vae.safetensors")
    put(tiny_files["w2v_large"], models / "audio_encoders" / "w2v_large.safetensors")
    put(tiny_files["w2v"], models / "audio_encoders" / "w2v.safetensors")
    return {"model_name": "model.pt", "vae_name": "vae.safetensors", "audio_encoder_name": "w2v_large.safetensors"}


def test_a_partial_file_without_a_base_names_the_base_to_pick(lt, realvideo):
    message = validate(lt, **realvideo)
    assert isinstance(message, str)
    assert "model.pt is a partial RealVideo fine-tune" in message
    assert "Set base_model_name" in message and "wan2.2_s2v_14B_bf16.safetensors" in message
    assert validate(lt, **realvideo, base_model_name="none") == message
    with pytest.raises(lt.errors.InputError, match="base_model_name"):
        load(lt, **realvideo)


def test_a_partial_file_is_applied_over_its_base(lt, realvideo, models, tiny_files):
    assert validate(lt, **realvideo, base_model_name="s2v_base.safetensors") is True
    model = load(lt, **realvideo, base_model_name="s2v_base.safetensors")[0]
    info = model.engine.checkpoint_info
    assert model.family is lt.families.REALVIDEO_14B
    assert (info.kind, Path(info.base)) == (lt.family_base.PARTIAL,
                                            models / "diffusion_models" / "s2v_base.safetensors")
    partial = torch.load(tiny_files["partial"], weights_only=True)["generator"]
    tuned = {k.removeprefix("model."): v for k, v in partial.items()}
    state = model.engine.state_dict()
    assert torch.equal(state["blocks.1.self_attn.q.weight"], tuned["blocks.1.self_attn.q.weight"])
    base_weight = tiny_s2v_dit().state_dict()["blocks.2.self_attn.q.weight"]
    assert torch.equal(state["blocks.2.self_attn.q.weight"], base_weight.to(torch.bfloat16).float())


def test_a_base_that_is_not_a_whole_s2v_dit_is_refused(lt, realvideo):
    for base in ("dit.safetensors", "model.pt"):
        message = validate(lt, **realvideo, base_model_name=base)
        assert isinstance(message, str)
        assert message.startswith(f"The base model {base} is not a complete Wan2.2-S2V-14B DiT")


def test_a_base_to_download_is_fetched_with_the_partial_file(lt, realvideo, hub, monkeypatch):
    base = "wan2.2_s2v_14B_bf16.safetensors (download)"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(lt.errors.MissingWeightsError) as error:
        load(lt, **realvideo, base_model_name=base)
    assert ("diffusion_models/wan2.2_s2v_14B_bf16.safetensors\n      from https://huggingface.co/Comfy-Org"
            in str(error.value))
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert validate(lt, **realvideo, base_model_name=base) is True
    model = load(lt, **realvideo, base_model_name=base)[0]
    assert model.engine.checkpoint_info.base.endswith("diffusion_models/wan2.2_s2v_14B_bf16.safetensors")
    assert len(hub) == 1


@pytest.mark.parametrize("model_name, encoder", [("s2v_base.safetensors", "w2v_large.safetensors"),
                                                 ("dit.safetensors", "w2v.safetensors")])
def test_a_base_for_a_complete_model_is_ignored_and_not_read(lt, realvideo, hub, caplog, model_name, encoder):
    names = {**realvideo, "model_name": model_name, "audio_encoder_name": encoder}
    base = "wan2.2_s2v_14B_bf16.safetensors (download)"
    assert validate(lt, **names, base_model_name=base) is True
    with caplog.at_level(logging.INFO):
        model = load(lt, **names, base_model_name=base)[0]
    assert hub == []  # never downloaded
    assert f"base_model_name {base} is not used: {model_name} is a complete model" in caplog.text
    assert getattr(model.engine, "checkpoint_info", None) is None or model.engine.checkpoint_info.base is None


# -- fp8 weights ---------------------------------------------------------------------------------------


def sample(lt, model, vae, audio_encoder) -> torch.Tensor:
    """The first block of the 14B sampler (2 steps) on a tiny reference and a short tone."""
    audio_embeds = run(lt.encoders.LiveTalkEncodeAudioWav2Vec, model=model, audio_encoder=audio_encoder,
                       audio=tone(0.3, rate=16_000, channels=1)).result[0]
    reference = run(lt.encoders.LiveTalkEncodeReferenceVAE, vae=vae, image=torch.rand(1, SIZE, SIZE, 3,
                    generator=torch.Generator().manual_seed(0)), width=SIZE, height=SIZE, crop="center").result[0]
    conditioning = [[torch.randn(1, 5, UMT5_WIDTH, generator=torch.Generator().manual_seed(0)), {}]]
    blocks = run(lt.sampling.LiveTalkCausalDiTSampler, model=model, conditioning=conditioning, reference=reference,
                 audio_embeds=audio_embeds, seed=0, steps=2, sink_frames=9, window_frames=15).result[0]
    return blocks.blocks[0].float()


def test_fp8_weights_are_stored_in_fp8_and_give_nearly_the_same_video(lt, realvideo):
    names = {**realvideo, "model_name": "s2v_base.safetensors"}
    exact = load(lt, **names)
    compact = load(lt, **names, fp8_weights=True)
    fp8_linear = lt.fp8_linear.FP8Linear
    dit = compact[0].engine
    linears = [m for m in dit.blocks.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(m, fp8_linear) and m.weight.dtype == FP8 for m in linears)
    assert dit.patch_embedding.weight.dtype == torch.float32  # only the blocks' and injectors' Linears
    assert all(p.dtype == torch.float32 for p in exact[0].engine.parameters())
    fp8_bytes = sum(p.numel() for p in dit.parameters() if p.dtype == FP8)
    size = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())  # noqa: E731
    assert size(exact[0].engine) - size(dit) == 3 * fp8_bytes > 0

    reference, ours = sample(lt, *exact), sample(lt, *compact)
    assert not torch.equal(reference, ours)
    assert ((ours - reference).norm() / reference.norm()).item() < 0.1


def test_fp8_weights_are_ignored_for_livetalk(lt, realvideo, caplog):
    names = {**realvideo, "model_name": "dit.safetensors", "audio_encoder_name": "w2v.safetensors"}
    with caplog.at_level(logging.INFO):
        model = load(lt, **names, fp8_weights=True)[0]
    assert all(p.dtype == torch.float32 for p in model.engine.parameters())
    assert "fp8_weights is for RealVideo 14B" in caplog.text


# -- fp8 matmuls ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_name, encoder", [("s2v_base.safetensors", "w2v_large.safetensors"),
                                                 ("dit.safetensors", "w2v.safetensors")])
def test_fp8_matmul_runs_the_blocks_in_fp8_for_both_families(lt, realvideo, model_name, encoder):
    names = {**realvideo, "model_name": model_name, "audio_encoder_name": encoder, "precision": "bf16"}
    exact = load(lt, **names)
    fast = load(lt, **names, fp8_matmul=True)
    dit = fast[0].engine
    linears = list(dit.heavy_linears().values())
    assert linears and all(isinstance(m, lt.fp8_linear.FP8MatmulLinear) and m.weight.dtype == FP8 for m in linears)
    assert not any(isinstance(m, lt.fp8_linear.FP8MatmulLinear) for m in exact[0].engine.modules())
    reference, ours = sample(lt, *exact), sample(lt, *fast)
    assert not torch.equal(reference, ours)
    assert ((ours - reference).norm() / reference.norm()).item() < 0.1


@pytest.mark.parametrize("model_name, encoder", [("s2v_base.safetensors", "w2v_large.safetensors"),
                                                 ("dit.safetensors", "w2v.safetensors")])
def test_fp8_kv_cache_is_set_on_the_dit_for_both_families(lt, realvideo, model_name, encoder):
    names = {**realvideo, "model_name": model_name, "audio_encoder_name": encoder}
    exact, small = load(lt, **names), load(lt, **names, fp8_kv_cache=True)
    assert small[0].engine.fp8_kv_cache and not exact[0].engine.fp8_kv_cache
    reference, ours = sample(lt, *exact), sample(lt, *small)
    assert not torch.equal(reference, ours)  # block 0 attends its own keys through the cache
    assert ((ours - reference).norm() / reference.norm()).item() < 0.1


def test_fp8_matmul_needs_bf16_before_anything_loads(lt, realvideo):
    names = {**realvideo, "model_name": "dit.safetensors", "audio_encoder_name": "w2v.safetensors"}
    message = validate(lt, **names, precision="fp32", fp8_matmul=True)
    assert message == ("fp8_matmul runs with bf16 activations, but precision is fp32: set precision to bf16, "
                       "or turn fp8_matmul off.")
    assert validate(lt, **names, precision="bf16", fp8_matmul=True) is True


def test_the_loader_validates_its_runtime_options_once(lt, realvideo, monkeypatch):
    """One check where the options are made (before any file is read), not again for the files' check."""
    options = module("livetalk_core.options").RuntimeOptions
    checked = []
    validate = options.validate
    monkeypatch.setattr(options, "validate", lambda self, *args: checked.append(self) or validate(self, *args))
    load(lt, **{**realvideo, "model_name": "dit.safetensors", "audio_encoder_name": "w2v.safetensors"})
    assert len(checked) == 1
