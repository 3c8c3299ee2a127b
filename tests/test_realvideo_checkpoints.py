"""RealVideo DiT checkpoint variants on tiny synthetic files: complete / partial-over-base
``model.pt``, diffusers shards with an index, Comfy bf16 and ``_fp8_scaled`` files, fp8 weights."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import save_file
from test_realvideo import run_tiny, tiny_model

from livetalk_core.errors import CheckpointError
from livetalk_core.family_base import COMPLETE, PARTIAL
from livetalk_core.realvideo.checkpoint import SHARD_INDEX
from livetalk_core.realvideo.model import load_s2v_dit
from livetalk_core.realvideo.sampler import realvideo_schedule
from livetalk_core.wan.fp8_linear import FP8, FP8Linear, dequantize, quantize

INJECT = (0, 1)
FINE_TUNED = ("blocks.1.", "audio_injector.injector.1.")


def load(path, dtype=torch.float32, **kwargs):
    return load_s2v_dit(path, dtype, audio_inject_layers=INJECT, **kwargs)


def save_st(sd: dict[str, torch.Tensor], path):
    save_file({k: v.contiguous() for k, v in sd.items()}, path)
    return path


def save_generator(sd: dict[str, torch.Tensor], path):
    torch.save({"generator": {"model." + k: v for k, v in sd.items()}}, path)
    return path


def save_shards(sd: dict[str, torch.Tensor], folder):
    """The diffusers layout of Wan-AI/Wan2.2-S2V-14B: two shards and their index."""
    folder.mkdir()
    keys = sorted(sd)
    weight_map = {}
    for i, part in enumerate((keys[::2], keys[1::2])):
        name = f"diffusion_pytorch_model-0000{i + 1}-of-00002.safetensors"
        save_st({k: sd[k] for k in part}, folder / name)
        weight_map.update({k: name for k in part})
    (folder / SHARD_INDEX).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return folder


def fp8_scaled(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Comfy-Org's ``_fp8_scaled`` layout: 2-D block / injector weights in float8_e4m3fn with a
    ``scale_weight`` each, a ``scale_input`` we must ignore, and the ``scaled_fp8`` marker."""
    out = {"scaled_fp8": torch.empty(0, dtype=FP8)}
    for k, v in sd.items():
        if k.startswith(("blocks.", "audio_injector.")) and k.endswith(".weight") and v.ndim == 2:
            out[k], scale = quantize(v)
            out[k.removesuffix("weight") + "scale_weight"] = scale.reshape(1)
            out[k.removesuffix("weight") + "scale_input"] = torch.ones(1)
        else:
            out[k] = v
    return out


def dequantized(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a dequantising load of :func:`fp8_scaled` gives, in float32."""
    q = fp8_scaled(sd)
    return {k: dequantize(q[k], q[k.removesuffix("weight") + "scale_weight"], torch.float32) if q[k].dtype == FP8
            else v for k, v in sd.items()}


def assert_state(model, expected: dict[str, torch.Tensor]):
    state = model.state_dict()
    assert state.keys() == expected.keys()
    different = [k for k in expected if not torch.equal(state[k], expected[k].to(state[k].dtype))]
    assert not different, different[:5]


@pytest.fixture(scope="module")
def weights():
    base = tiny_model(seed=0).state_dict()
    tuned = tiny_model(seed=1).state_dict()
    partial = {k: v for k, v in tuned.items() if k.startswith(FINE_TUNED)}
    return base, partial


def test_complete_model_pt_is_reported(tmp_path, weights, caplog):
    base, _ = weights
    with caplog.at_level(logging.INFO):
        # a complete file never needs (or reads) a base
        model = load(save_generator(base, tmp_path / "model.pt"), base=tmp_path / "not-there.safetensors")
    assert model.checkpoint_info.kind == COMPLETE and model.checkpoint_info.base is None
    assert any("complete" in r.getMessage() for r in caplog.records)
    assert_state(model, base)


@pytest.mark.parametrize("layout", ["shards_folder", "shards_index", "comfy_bf16", "comfy_fp8_scaled"])
def test_partial_fine_tune_over_each_base_layout(tmp_path, weights, layout, caplog):
    base, partial = weights
    if layout.startswith("shards"):
        folder = save_shards(base, tmp_path / "Wan2.2-S2V-14B")
        base_path = folder if layout == "shards_folder" else folder / SHARD_INDEX
        expected_base = base
    elif layout == "comfy_bf16":
        base_path = save_st({k: v.to(torch.bfloat16) for k, v in base.items()},
                            tmp_path / "wan2.2_s2v_14B_bf16.safetensors")
        expected_base = {k: v.to(torch.bfloat16).float() for k, v in base.items()}
    else:
        base_path = save_st(fp8_scaled(base), tmp_path / "wan2.2_s2v_14B_fp8_scaled.safetensors")
        expected_base = dequantized(base)
    with caplog.at_level(logging.INFO):
        model = load(save_generator(partial, tmp_path / "model.pt"), base=base_path)
    info = model.checkpoint_info
    assert info.kind == PARTIAL and info.tensors_in_file == len(partial) and info.base == str(base_path)
    assert info.fp8_scaled == (layout == "comfy_fp8_scaled")
    assert any("partial fine-tune" in r.getMessage() for r in caplog.records)
    assert_state(model, {**expected_base, **partial})


def test_partial_without_base_is_a_clear_error(tmp_path, weights):
    _, partial = weights
    with pytest.raises(CheckpointError, match="partial fine-tune.*base Wan2.2-S2V-14B checkpoint"):
        load(save_generator(partial, tmp_path / "model.pt"))


def test_foreign_keys_over_a_base_are_rejected(tmp_path, weights):
    base, partial = weights
    foreign = {**partial, "unet.conv_in.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match="neither a complete"):
        load(save_generator(foreign, tmp_path / "model.pt"), base=save_st(base, tmp_path / "base.safetensors"))


def test_shard_index_errors(tmp_path, weights):
    base, _ = weights
    folder = save_shards(base, tmp_path / "s2v")
    (folder / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="does not exist"):
        load(folder)
    with pytest.raises(CheckpointError, match=SHARD_INDEX):
        load(tmp_path)


def test_fp8_scaled_file_loads_dequantised_or_kept_in_fp8(tmp_path, weights):
    base, _ = weights
    path = save_st(fp8_scaled(base), tmp_path / "dit_fp8_scaled.safetensors")
    dense = load(path)
    assert dense.checkpoint_info.fp8_scaled and dense.dtype == torch.float32
    assert_state(dense, dequantized(base))
    compact = load(path, fp8_weights=True)
    linear = compact.blocks[0].self_attn.q
    assert isinstance(linear, FP8Linear) and linear.weight.dtype == FP8
    assert compact.blocks[0].ffn[0].weight.dtype == FP8 and compact.audio_injector.injector[0].o.weight.dtype == FP8
    assert compact.patch_embedding.weight.dtype == torch.float32
    # fp8 in memory, the same numbers as the dequantised model
    blocks_dense = run_tiny(dense, schedule=realvideo_schedule(2), num_blocks=2)
    blocks_fp8 = run_tiny(compact, schedule=realvideo_schedule(2), num_blocks=2)
    assert all(torch.equal(a, b) for a, b in zip(blocks_fp8, blocks_dense))
    size = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())  # noqa: E731
    fp8_numel = sum(p.numel() for p in compact.parameters() if p.dtype == FP8)
    assert size(dense) - size(compact) == 3 * fp8_numel > 0  # 1 byte instead of 4 per fp8 weight


def test_fp8_on_the_fly_from_a_bf16_file(tmp_path, weights):
    base, _ = weights
    path = save_st({k: v.to(torch.bfloat16) for k, v in base.items()}, tmp_path / "dit_bf16.safetensors")
    exact = load(path, torch.bfloat16)
    compact = load(path, torch.bfloat16, fp8_weights=True)
    assert compact.blocks[1].cross_attn.k.weight.dtype == FP8
    ref = run_tiny(exact, schedule=realvideo_schedule(2), num_blocks=1)[0].float()
    ours = run_tiny(compact, schedule=realvideo_schedule(2), num_blocks=1)[0].float()
    assert ((ours - ref).norm() / ref.norm()).item() < 0.1
