"""RealVideo parity with upstream: every golden case, stage by stage, through the real loaders.

Cases: the compact ``tests/golden/realvideo/*``, ``../shared/golden/realvideo/*`` when present and
every folder in ``LIVETALK_GOLDEN_DIRS`` whose manifest
says ``realvideo``. Stages are checked separately, as the golden README advises, so errors do not
compound: preprocessing (image, audio) -> VAE encode -> the DiT fed with the golden reference latent,
audio features, contexts and replayed noise (both checkpoint layouts) -> streaming VAE decode of
the golden blocks. Every tensor in ``expected.safetensors`` is compared with the case's recommended
tolerance; a case that cannot run fails, nothing is skipped.
"""

from __future__ import annotations

import math
from fnmatch import fnmatchcase
from pathlib import Path

import pytest
import torch
from golden import GoldenCase, assert_close, case_ids, golden_cases, names_from, require_shared_cases

from livetalk_core.media.vae import frames_to_uint8, load_vae
from livetalk_core.media.wav2vec2 import load_audio_encoder
from livetalk_core.realvideo.audio import (
    interpolate_to_30fps,
    realvideo_audio_features,
    segment_features,
    wav2vec_hidden_states,
)
from livetalk_core.realvideo.image import preprocess_reference
from livetalk_core.realvideo.model import AUDIO_WARMUP_LATENTS, S2VDiT, load_s2v_dit
from livetalk_core.realvideo.sampler import BlockPlan, sample_realvideo
from livetalk_core.runtime.noise import ReplayNoise
from livetalk_core.runtime.scheduler import warped_schedule

CASES = [c for c in golden_cases("realvideo") if c.model == "realvideo"]
IDS = case_ids(CASES)
LAYOUTS = ("model.pt", "diffusion_model.safetensors")
# Streaming decode of the first blocks (5 + 8 + 8 frames) covers the first-chunk rule and the
# carried causal cache; all 14 blocks would take most of a minute on 2 CPU cores.
DECODED_BLOCKS = 3


def test_repo_cases_are_found():
    names = names_from(CASES, "repo")
    assert {"compact_fp32_4step"} <= names, f"in-repo cases missing from tests/golden/realvideo; got {sorted(names)}"


def test_shared_cases_are_found():
    require_shared_cases(CASES, "realvideo", {"tiny_fp32_4step", "tiny_bf16_2step"})


def case_file(case: GoldenCase, name: str) -> Path:
    """A weight file of the case. The case folders hold relative symlinks into ``weights/``; a copy
    that turned them into small text files holding the link target is followed as well."""
    link = case.path / name
    if link.is_file() and not link.is_symlink() and link.stat().st_size < 1024:
        target = case.path / link.read_text().strip()
        if target.exists():
            return target.resolve()
    assert link.exists(), f"{case.name}: {name} is missing"
    return link.resolve()


# The golden README's float32 rule for the wav2vec2 stages, which run in float32 in every case
# (bf16 manifests do not list them).
FLOAT32_FEATURES = (("wav2vec_hidden_*", "audio_z30_*"), {"rel_l2_max": 1e-5})


def tolerance(case: GoldenCase, name: str) -> dict:
    """The recommended entry for ``name``: keys list ``/``-separated names or patterns."""
    for key, value in case.manifest["tolerances"]["recommended"].items():
        if key == "note":
            continue
        for pattern in (p.strip() for p in key.split("/")):
            hit = pattern == "x0_and_block_latents" and (name.startswith("x0_") or name.startswith("block_"))
            if hit or fnmatchcase(name, pattern) or fnmatchcase(name, pattern + "_*"):
                return {"exact": True} if isinstance(value, str) and value.startswith("exact") else value
    patterns, fallback = FLOAT32_FEATURES
    if any(fnmatchcase(name, p) for p in patterns):
        return fallback
    raise KeyError(f"{case.name}: no recommended tolerance for {name}")


def check(case: GoldenCase, name: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
    tol = tolerance(case, name)
    if tol.get("exact"):
        assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
        assert torch.equal(actual.to(expected.dtype), expected), f"{name}: not bit-identical"
        return
    assert_close(actual, expected, atol=tol.get("max_abs", math.inf), rel_l2=tol["rel_l2_max"], name=name)


def check_frames(case: GoldenCase, actual: torch.Tensor, expected: torch.Tensor) -> None:
    tol = tolerance(case, "frames_uint8")
    assert actual.shape == expected.shape, f"frames: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    d = (actual.int() - expected.int()).abs().double()
    assert d.max().item() <= tol["max_abs"], f"frames: max|d| = {d.max().item()} > {tol['max_abs']}"
    if "frac_pixels_differ_max" in tol:
        frac = (d > 0).double().mean().item()
        assert frac <= tol["frac_pixels_differ_max"], f"frames: {frac:.4%} of values differ"
    if "mean_abs_max" in tol:
        assert d.mean().item() <= tol["mean_abs_max"], f"frames: mean|d| = {d.mean().item():.3f}"


_LOADED: dict[tuple[Path, str], dict[str, torch.Tensor]] = {}


def tensors(case: GoldenCase, which: str) -> dict[str, torch.Tensor]:
    key = (case.path, which)
    if key not in _LOADED:
        _LOADED[key] = case.load(which)
    return _LOADED[key]


def dtype_of(case: GoldenCase) -> torch.dtype:
    return case.dtype


def segment_sources(case: GoldenCase) -> list[str]:
    """Audio sources in order of first use by the block schedule."""
    names: list[str] = []
    for block in case.manifest["schedule"]["blocks"]:
        if block["audio_source"] not in names:
            names.append(block["audio_source"])
    return names


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_image_preprocessing(case: GoldenCase):
    image = tensors(case, "inputs.safetensors")["image_uint8"]
    expected = tensors(case, "expected.safetensors")
    model_run, _ = preprocess_reference(image, case.manifest["image"]["model_run"]["max_image_area"])
    check(case, "image_preprocessed", model_run, expected["image_preprocessed"])
    if "image_preprocessed_full_uint8" in expected:  # at upstream's default area; the compact case leaves it out
        full, _ = preprocess_reference(image)
        full_uint8 = ((full[0].permute(1, 2, 0) + 1) / 2 * 255).round().to(torch.uint8)
        check(case, "image_preprocessed_full_uint8", full_uint8, expected["image_preprocessed_full_uint8"])


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_audio_features(case: GoldenCase):
    inputs, expected = tensors(case, "inputs.safetensors"), tensors(case, "expected.safetensors")
    dtype = dtype_of(case)
    encoder = load_audio_encoder(case_file(case, "wav2vec2"), torch.float32)
    hidden = wav2vec_hidden_states(encoder, inputs["silence_audio"])
    check(case, "wav2vec_hidden_silence_start", hidden, expected["wav2vec_hidden_silence_start"])
    check(case, "audio_z30_silence_start", interpolate_to_30fps(hidden), expected["audio_z30_silence_start"])
    speech = realvideo_audio_features(encoder, inputs["audio_16k"], dtype)
    names = [n for n in expected if n.startswith("audio_features_")]
    assert names, f"{case.name}: no audio_features_* tensors"
    for name in names:
        source = name.removeprefix("audio_features_")
        if source.startswith("silence"):
            ours = segment_features(encoder, inputs["silence_audio"], dtype)
        else:
            ours = speech[int(source.removeprefix("seg"))]
        check(case, name, ours, expected[name])


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_vae_encode(case: GoldenCase):
    expected = tensors(case, "expected.safetensors")
    dtype = dtype_of(case)
    vae = load_vae(case_file(case, "Wan2.1_VAE.pth"), dtype)
    latent = vae.encode(expected["image_preprocessed"].to(dtype).unsqueeze(2)).to(dtype)
    check(case, "ref_latent", latent, expected["ref_latent"])


def replayed_noise(case: GoldenCase) -> ReplayNoise:
    inputs = tensors(case, "inputs.safetensors")
    initial: dict[int, str] = {}
    renoise: dict[int, list[str]] = {}
    for draw in case.manifest["noise"]["consumption"]:
        if draw["call"] == "randn":
            initial[draw["block"]] = draw["name"]
        else:
            renoise.setdefault(draw["block"], []).append(draw["name"])
    return ReplayNoise(lambda b: inputs[initial[b]], lambda b, i: inputs[renoise[b][i]])


def load_dit(case: GoldenCase, layout: str) -> S2VDiT:
    layers = case.manifest["dit"]["audio_inject_layers"]
    return load_s2v_dit(case_file(case, layout), dtype_of(case), audio_inject_layers=layers)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_both_layouts_load_the_same_model(case: GoldenCase):
    """RealVideo's ``model.pt`` and the bare-key safetensors give bit-identical models, so the full
    parity run below (on ``model.pt``) holds for both."""
    first, second = (load_dit(case, layout).state_dict() for layout in LAYOUTS)
    assert first.keys() == second.keys()
    different = [k for k in first if not torch.equal(first[k], second[k])]
    assert not different, f"{case.name}: {len(different)} tensors differ between layouts, e.g. {different[:3]}"


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_dit_blocks(case: GoldenCase):
    m = case.manifest
    inputs, expected = tensors(case, "inputs.safetensors"), tensors(case, "expected.safetensors")
    model = load_dit(case, LAYOUTS[0])
    sources = segment_sources(case)
    features = [expected[f"audio_features_{s}"] for s in sources]
    for s, f in zip(sources, features):
        tokens = model.encode_audio(f)
        for part, ours in (("global", tokens.global_), ("local", tokens.local)):
            name = f"audio_enc_{part}_{s}"
            if name in expected:
                # The DiT drops the warm-up steps; compare what it uses.
                check(case, name, ours, expected[name][:, AUDIO_WARMUP_LATENTS:])
    sampler = m["sampler"]
    schedule = warped_schedule(sampler["denoising_step_list_config"], sampler["shift"])
    assert schedule.timesteps == pytest.approx(sampler["timesteps_fed"], abs=1e-3)
    plan = [
        BlockPlan(sources.index(b["audio_source"]), b["audio_ptr"], talking=b["context"] == "speech")
        for b in m["schedule"]["blocks"]
    ]
    ours: dict[str, torch.Tensor] = {}
    record = lambda b, i, x0: ours.__setitem__(f"x0_b{b}_s{i}", x0.transpose(1, 2).clone())  # noqa: E731
    for b, block in enumerate(
        sample_realvideo(
            model,
            ref_latent=expected["ref_latent"],
            idle_context=inputs["silence_context"],
            talking_context=inputs["speech_context"],
            audio_features=features,
            noise=replayed_noise(case),
            plan=plan,
            schedule=schedule,
            on_step=record,
        )
    ):
        ours[f"block_{b}"] = block.transpose(1, 2)
    names = [n for n in expected if n.startswith(("x0_", "block_"))]
    assert len(names) == len(ours), f"{case.name}: produced {sorted(ours)} for {sorted(names)}"
    failures = []
    for name in names:
        try:
            check(case, name, ours[name], expected[name])
        except AssertionError as exc:
            failures.append(str(exc))
    assert not failures, f"{case.name}: " + "; ".join(failures)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_streaming_decode(case: GoldenCase):
    expected = tensors(case, "expected.safetensors")
    vae = load_vae(case_file(case, "Wan2.1_VAE.pth"), dtype_of(case))
    decoder = vae.stream_decoder()
    counts = case.manifest["frames"]["per_block"][:DECODED_BLOCKS]
    frames = []
    for b, count in enumerate(counts):
        pixels = decoder.decode(expected[f"block_{b}"].transpose(1, 2))
        assert pixels.shape[2] == count, f"block {b}: {pixels.shape[2]} frames, upstream {count}"
        frames.append(frames_to_uint8(pixels))
    check_frames(case, torch.cat(frames), expected["frames_uint8"][: sum(counts)])
