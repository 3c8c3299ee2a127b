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
    names = ("nodes.live", "nodes.multi_gpu", "livetalk_core.errors")
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


def test_a_model_on_several_gpus_is_refused_before_anything_loads(pack, nothing_loads):
    workers = pack.multi_gpu.WorkerDiT.__new__(pack.multi_gpu.WorkerDiT)  # its DiT would run in worker processes
    with pytest.raises(pack.errors.InputError, match="Set gpus to 1"):
        run(pack.live.LiveTalkLive, **live_inputs(workers, torch.rand(1, 64, 64, 3)))


def test_an_empty_image_batch_is_refused_before_anything_loads(pack, nothing_loads):
    with pytest.raises(pack.errors.InputError, match="holds no image"):
        run(pack.live.LiveTalkLive, **live_inputs(object(), torch.zeros(0, 64, 64, 3)))


def test_the_node_is_never_taken_from_comfyuis_cache(pack):
    """Queuing the same live workflow twice must open a new service each time, not reuse the last result."""
    inputs = live_inputs(object(), torch.rand(1, 64, 64, 3))
    node = pack.live.LiveTalkLive
    assert node.fingerprint_inputs(**inputs) != node.fingerprint_inputs(**inputs)
