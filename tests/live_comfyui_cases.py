"""The LiveTalk Live node called directly inside ComfyUI (run by test_live_comfyui.py through comfy_in_process):
what it refuses before any model loads, and that ComfyUI never serves it from its cache."""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import pytest
import torch
from comfy_env import import_pack

PACKAGE = "livetalk_pack_live_cases"


@pytest.fixture(scope="module")
def pack() -> SimpleNamespace:
    import_pack(PACKAGE)
    names = ("nodes.live", "livetalk_core.errors")
    return SimpleNamespace(**{name.split(".")[-1]: importlib.import_module(f"{PACKAGE}.{name}") for name in names})


@pytest.fixture()
def nothing_loads(pack, monkeypatch):
    """Fail the test if the node moves any model onto its device (the refusal must come first)."""
    def refuse(*models):
        raise AssertionError("a model was loaded before the inputs were checked")
    monkeypatch.setattr(pack.live, "on_device", refuse)


def run(node, **inputs):
    return node.PREPARE_CLASS_CLONE({"unique_id": "5"}).EXECUTE_NORMALIZED(**inputs)


def live_inputs(engine, image: torch.Tensor) -> dict:
    model = SimpleNamespace(engine=engine, family=SimpleNamespace(name="LiveTalk 1.3B"))
    return dict(model=model, vae=object(), audio_encoder=object(), conditioning=[[torch.zeros(1, 1, 8), {}]],
                image=image, width=64, height=64, seed=0, steps=4)


def test_an_empty_image_batch_is_refused_before_anything_loads(pack, nothing_loads):
    with pytest.raises(pack.errors.InputError, match="holds no image"):
        run(pack.live.LiveTalkLive, **live_inputs(object(), torch.zeros(0, 64, 64, 3)))


def test_the_node_is_never_taken_from_comfyuis_cache(pack):
    """Queuing the same live workflow twice must open a new service each time, not reuse the last result."""
    inputs = live_inputs(object(), torch.rand(1, 64, 64, 3))
    node = pack.live.LiveTalkLive
    assert node.fingerprint_inputs(**inputs) != node.fingerprint_inputs(**inputs)


def test_the_node_decodes_with_a_connected_tiny_decoder(pack, monkeypatch):
    """tiny_decoder connected: it is loaded with the other models and the sessions decode with it (the VAE
    still encodes the reference). Tiny random models on the CPU; the host opens one session and stops."""
    import contextlib

    smoke = importlib.import_module(f"{PACKAGE}.livetalk_core.live.smoke").smoke_models("livetalk")
    taehv = importlib.import_module(f"{PACKAGE}.livetalk_core.media.taehv")
    tiny = taehv.TinyDecoder(taehv.TinyDecoderConfig(stem_width=8, stage_widths=(8, 8, 8), stage_outputs=(8, 8, 8)))
    loaded, sessions = [], []

    def on_device(*models):
        loaded.extend(models)
        return tuple(m.engine for m in models)

    class Host:  # opens one session as a client would, then Stop
        @contextlib.contextmanager
        def offering(self, offer):
            sessions.append(offer.open_session())
            offer.stop.set()
            yield
    monkeypatch.setattr(pack.live, "on_device", on_device)
    monkeypatch.setattr(pack.live, "HOST", Host())
    patcher = SimpleNamespace(add_callback=lambda call_type, callback: None)  # the DiT's kept workspace registers
    managed = {name: SimpleNamespace(engine=engine, family=smoke.family, workspace=None, patcher=patcher)
               for name, engine in (("model", smoke.dit), ("vae", smoke.vae), ("audio_encoder", smoke.encoder),
                                    ("tiny", tiny))}
    run(pack.live.LiveTalkLive, model=managed["model"], vae=managed["vae"], audio_encoder=managed["audio_encoder"],
        conditioning=[[smoke.text, {}]], image=torch.rand(1, 64, 64, 3), width=smoke.width, height=smoke.height,
        seed=0, steps=4, tiny_decoder=managed["tiny"])
    assert managed["tiny"] in loaded
    assert sessions[0]._session._decoding_model is tiny
    block = sessions[0].next_block()
    assert block.frames.shape[1:] == (smoke.height, smoke.width, 3)
    sessions[0].close()
