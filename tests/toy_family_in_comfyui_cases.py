"""A test-only third model family through the real nodes inside ComfyUI (run by
test_toy_family_in_comfyui.py through comfy_in_process): registered from here, with nothing in
``nodes/`` made for it, it is loaded by Load LiveTalk Model, its audio and reference are encoded,
its blocks sampled and decoded, exactly as the built-in families are."""

from __future__ import annotations

import importlib

import pytest
import torch
from nodes_in_comfyui_cases import PACKAGE, comfy_folders, load, model_files, pack, run, tone  # noqa: F401
from tiny_weights import AUDIO_FEATURES, UMT5_WIDTH, save_module
from toy_family import tiny_toy_dit, toy_family

SIZE = 64  # video side in pixels (the smallest cover_and_crop takes): 8x8 latents
PROMPT = [[torch.randn(1, 5, UMT5_WIDTH, generator=torch.Generator().manual_seed(0)), {}]]  # a umT5 encoding


@pytest.fixture(scope="session")
def toy(pack, model_files):
    """The toy family registered in the pack's registry, and its tiny DiT in models/livetalk."""
    families = importlib.import_module(f"{PACKAGE}.livetalk_core.families")
    family = families.register_family(toy_family(PACKAGE))
    save_module(tiny_toy_dit(AUDIO_FEATURES, UMT5_WIDTH), model_files / "models/livetalk/toy.safetensors")
    yield family
    families.unregister_family(family)


def encode(pack, model, vae, audio_encoder, seconds: float):
    audio_embeds = run(pack.encoders.LiveTalkEncodeAudioWav2Vec, model=model, audio_encoder=audio_encoder,
                       audio=tone(seconds)).result[0]
    reference = run(pack.encoders.LiveTalkEncodeReferenceVAE, vae=vae, image=torch.rand(1, 96, 80, 3),
                    width=SIZE, height=SIZE, crop="center").result[0]
    return audio_embeds, reference


def sample(pack, model, reference, audio_embeds, seed: int = 0):
    return run(pack.sampling.LiveTalkCausalDiTSampler, model=model, conditioning=PROMPT,
               reference=reference, audio_embeds=audio_embeds, seed=seed, steps=2, sink_frames=9,
               window_frames=15).result[0]


def test_a_registered_family_runs_through_the_nodes(pack, comfy_folders, toy):
    model, vae, audio_encoder = load(pack, "toy.safetensors", "w2v.safetensors")
    assert model.family is toy and vae.family is toy and audio_encoder.family is toy

    audio_embeds, reference = encode(pack, model, vae, audio_encoder, seconds=1.0)
    assert isinstance(audio_embeds, toy.conditioning_type)
    assert reference.shape == (1, 16, 1, SIZE // 8, SIZE // 8)  # the toy's reference rule: cropped to the size

    blocks = sample(pack, model, reference, audio_embeds)
    assert len(blocks.blocks) == audio_embeds.num_blocks == 2  # 17 frames: blocks of 9, then 12
    assert all(b.shape == (1, 16, 3, SIZE // 8, SIZE // 8) for b in blocks.blocks)
    assert torch.equal(sample(pack, model, reference, audio_embeds).blocks[1], blocks.blocks[1])  # seeded
    assert not torch.equal(sample(pack, model, reference, audio_embeds, seed=1).blocks[1], blocks.blocks[1])

    frames, fps = run(pack.sampling.LiveTalkDecodeBlocks, vae=vae, latent_blocks=blocks).result
    assert frames.shape == (17, SIZE, SIZE, 3) and fps == 16.0  # floor(16 x 1 s) + 1 frames


def test_the_built_in_families_refuse_the_toys_audio_and_back(pack, comfy_folders, toy):
    """Each family's conditioning_type keeps audio encoded for one family out of another's sampler."""
    toy_model, toy_vae, toy_encoder = load(pack, "toy.safetensors", "w2v.safetensors")
    toy_audio, reference = encode(pack, toy_model, toy_vae, toy_encoder, seconds=0.5)
    livetalk_model, livetalk_vae, livetalk_encoder = load(pack, "dit.safetensors", "w2v.safetensors")
    livetalk_audio, _ = encode(pack, livetalk_model, livetalk_vae, livetalk_encoder, seconds=0.5)
    errors = importlib.import_module(f"{PACKAGE}.livetalk_core.errors")
    with pytest.raises(errors.InputError, match="made for another model family than this LiveTalk 1.3B model"):
        sample(pack, livetalk_model, reference, toy_audio)
    with pytest.raises(errors.InputError, match="made for another model family than this Toy Talker model"):
        sample(pack, toy_model, reference, livetalk_audio)


def test_a_family_without_sequence_parallel_is_refused_several_gpus(pack, comfy_folders, toy):
    errors = importlib.import_module(f"{PACKAGE}.livetalk_core.errors")
    with pytest.raises(errors.InputError, match="Toy Talker runs on one GPU.*are for RealVideo 14B. Set gpus to 1"):
        run(pack.loader.LoadLiveTalkModel, model_name="toy.safetensors", vae_name="vae.safetensors",
            audio_encoder_name="w2v.safetensors", precision="fp32", attention="sdpa", compile=False, gpus=2)
