"""Load Tiny Decoder (TAEHV) and the decode nodes' tiny_decoder input, called inside ComfyUI
(run by test_tiny_decoder_in_comfyui.py through comfy_in_process).

Tiny random weights in temporary model folders; ComfyUI's own VAE object is built by ComfyUI's
VAE loader code (comfy.sd.VAE) from a full-size random TAEHV state dict, as Load VAE does for a file.
"""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import comfy.sd
import comfy.taesd.taehv
import folder_paths
import pytest
import torch
from comfy_env import import_pack
from safetensors.torch import save_file
from tiny_weights import save_module, tiny_vae

PACKAGE = "livetalk_pack_in_comfyui_tiny"
SIZE = 32  # video side in pixels: 4x4 latents


@pytest.fixture(scope="session")
def pack() -> SimpleNamespace:
    import_pack(PACKAGE)
    names = ("nodes.loader", "nodes.sampling", "nodes.save_video", "nodes.tiny_decoder", "nodes.pack_types",
             "nodes.node_list", "livetalk_core.errors", "livetalk_core.media.taehv", "livetalk_core.media.video_io")
    return SimpleNamespace(**{name.split(".")[-1]: importlib.import_module(f"{PACKAGE}.{name}") for name in names})


def small_state(pack, seed: int) -> dict[str, torch.Tensor]:
    """A small TAEHV decoder's state dict (widths 8), with an encoder tensor as released files have."""
    taehv = pack.taehv
    torch.manual_seed(seed)
    decoder = taehv.TinyDecoder(taehv.TinyDecoderConfig(stem_width=8, stage_widths=(8, 8, 8), stage_outputs=(8, 8, 8)))
    state = {k: v.detach().clone() for k, v in decoder.state_dict().items()}
    state["decoder.22.bias"].fill_(0.5)
    state["encoder.0.weight"] = torch.randn(8, 3, 3, 3)
    return state


@pytest.fixture()
def folders(pack, tmp_path, monkeypatch):
    """models/vae_approx with lighttaew2_1 and taew2_1, models/vae with the full VAE and a TAE copy."""
    approx, vae = tmp_path / "vae_approx", tmp_path / "vae"
    approx.mkdir(), vae.mkdir()
    save_file(small_state(pack, 1), str(approx / "lighttaew2_1.safetensors"))
    torch.save(small_state(pack, 2), approx / "taew2_1.pth")
    save_file(small_state(pack, 2), str(vae / "my_taew2_1.safetensors"))
    save_module(tiny_vae(), vae / "vae.safetensors")
    extensions = {".safetensors", ".pth"}
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "vae_approx", ([str(approx)], extensions))
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "vae", ([str(vae)], extensions))
    for folder in ("livetalk", "diffusion_models", "audio_encoders"):
        monkeypatch.setitem(folder_paths.folder_names_and_paths, folder, ([str(tmp_path / folder)], extensions))
    output = tmp_path / "output"
    output.mkdir()
    monkeypatch.setattr(folder_paths, "output_directory", str(output))
    return SimpleNamespace(approx=approx, vae=vae, output=output)


def run(node, **inputs):
    return node.PREPARE_CLASS_CLONE({}).EXECUTE_NORMALIZED(**inputs)


def load_tiny(pack, **inputs):
    inputs = {"decoder_name": "lighttaew2_1.safetensors", "latents": "auto", "precision": "fp32", **inputs}
    return run(pack.tiny_decoder.LoadLiveTalkTinyDecoder, **inputs).result[0]


def full_vae(pack, folders):
    """The pack's Managed full VAE (Load LiveTalk Model's vae output), from the tiny VAE file."""
    from livetalk_pack_in_comfyui_tiny.nodes.comfy_models import Managed

    module = importlib.import_module(f"{PACKAGE}.livetalk_core.media.vae").load_vae(folders.vae / "vae.safetensors",
                                                                                    torch.float32)
    return Managed(module, module, torch.device("cpu"), torch.device("cpu"))


def blocks(pack, count: int, trim: int = 0):
    generator = torch.Generator().manual_seed(0)
    latents = [torch.randn(1, 16, 3, SIZE // 8, SIZE // 8, generator=generator) for _ in range(count)]
    return pack.pack_types.LatentBlockList(blocks=latents, num_video_frames=9 + 12 * (count - 1) - trim)


def test_the_node_is_registered_and_lists_tiny_decoders_only(pack, folders):
    assert pack.tiny_decoder.LoadLiveTalkTinyDecoder in pack.node_list.NODES
    assert pack.tiny_decoder.decoder_choices() == ["none", "lighttaew2_1.safetensors", "taew2_1.pth",
                                                   "my_taew2_1.safetensors"]
    schema = pack.tiny_decoder.LoadLiveTalkTinyDecoder.define_schema()
    assert "trades quality for speed" in schema.description and "full Wan VAE" in schema.description
    decode = pack.sampling.LiveTalkDecodeBlocks.define_schema()
    assert any(i.id == "tiny_decoder" and i.optional for i in decode.inputs)


def test_decode_blocks_with_the_tiny_decoder(pack, folders):
    """Connected, Decode Blocks decodes with the tiny decoder: its frames (the file's own latent space,
    raw for lighttaew2_1), trimmed to the audio length; not connected, the full VAE's."""
    tiny = load_tiny(pack)
    assert tiny.engine.latent_space == pack.taehv.RAW
    latent_blocks = blocks(pack, 2, trim=2)
    frames, fps = run(pack.sampling.LiveTalkDecodeBlocks, vae=full_vae(pack, folders), latent_blocks=latent_blocks,
                      tiny_decoder=tiny).result
    decoder = pack.taehv.load_tiny_decoder(folders.approx / "lighttaew2_1.safetensors", torch.float32)
    expected = decoder.decode(torch.cat(latent_blocks.blocks, dim=2))[0].permute(1, 2, 3, 0)[:19]
    assert frames.shape == (19, SIZE, SIZE, 3) and fps == 16.0
    assert (frames - (expected * 0.5 + 0.5)).abs().max() <= 1 / 255 + 1e-6
    full, _ = run(pack.sampling.LiveTalkDecodeBlocks, vae=full_vae(pack, folders), latent_blocks=latent_blocks).result
    assert full.shape == frames.shape and not torch.allclose(full, frames, atol=0.05)


def test_decode_to_video_file_with_the_tiny_decoder(pack, folders):
    run(pack.save_video.LiveTalkDecodeToVideoFile, vae=full_vae(pack, folders), latent_blocks=blocks(pack, 2, trim=3),
        filename_prefix="tiny", tiny_decoder=load_tiny(pack, decoder_name="taew2_1.pth"))
    info = pack.video_io.read_video_info(folders.output / "tiny_00001_.mp4")
    assert (info["frames"], info["width"], info["height"]) == (18, SIZE, SIZE)


def test_the_latent_space_choice_overrides_the_file_name(pack, folders):
    assert load_tiny(pack, decoder_name="taew2_1.pth").engine.latent_space == pack.taehv.NORMALISED
    chosen = load_tiny(pack, decoder_name="taew2_1.pth", latents="lighttaew2_1 (raw VAE latents)")
    assert chosen.engine.latent_space == pack.taehv.RAW
    assert load_tiny(pack, decoder_name="my_taew2_1.safetensors").engine.config.stem_width == 8


def comfy_taehv_vae(dtype: torch.dtype = torch.float32):
    """ComfyUI's own VAE object for a TAEHV file (comfy.sd.VAE detects it by decoder.22.bias), from a
    full-size random state dict in ``dtype``."""
    generator = torch.Generator().manual_seed(3)
    state = {}
    for name, tensor in comfy.taesd.taehv.TAEHV(latent_channels=16).state_dict().items():
        scale = (1.0 / tensor[0].numel()) ** 0.5 if tensor.ndim > 1 else 0.1
        state[name] = torch.randn(tensor.shape, generator=generator) * scale
        if ".conv.4." in name:
            state[name] *= 0.3  # the memory blocks' residual branches
    state["decoder.22.weight"] *= 0.1
    state["decoder.22.bias"] += 0.5
    return comfy.sd.VAE(sd={k: v.to(dtype) for k, v in state.items()})


def test_comfyui_vae_object_decodes_as_comfyui_does(pack, folders):
    """A TAEHV that ComfyUI's Load VAE made (lighttaew2_1-style, not float16: ComfyUI feeds it the raw
    latents): the tiny decoder from it gives the frames ComfyUI's own VAE decode gives for the same
    latents (its LATENT is the raw one: z * std + mean)."""
    vae = comfy_taehv_vae()
    tiny = load_tiny(pack, decoder_name="none", vae=vae)
    assert tiny.engine.latent_space == pack.taehv.RAW and tiny.engine.config == pack.taehv.TinyDecoderConfig()
    latents = torch.randn(1, 16, 3, 2, 3, generator=torch.Generator().manual_seed(4))
    mean = torch.tensor(pack.taehv.WAN21_LATENT_MEAN).view(1, -1, 1, 1, 1)
    std = torch.tensor(pack.taehv.WAN21_LATENT_STD).view(1, -1, 1, 1, 1)
    comfy_frames = vae.decode(latents * std + mean).clamp(0, 1)  # [B, T, H, W, 3]; ComfyUI clamps later
    ours = tiny.engine.decode(latents).permute(0, 2, 3, 4, 1) * 0.5 + 0.5
    assert ours.shape == comfy_frames.shape == (1, 9, 16, 24, 3)
    inside = ((comfy_frames > 0) & (comfy_frames < 1)).float().mean()
    assert inside > 0.5, f"only {inside:.0%} of the values are inside the clamp: the comparison would be weak"
    assert (ours - comfy_frames).abs().max() <= 1e-4


def test_a_float16_comfyui_taehv_is_taken_for_taew2_1(pack, folders):
    """ComfyUI takes a float16 TAEHV file for Hunyuan's taehv; with the Wan names it is madebyollin's
    taew2_1, which decodes the normalised latents."""
    tiny = load_tiny(pack, decoder_name="none", vae=comfy_taehv_vae(torch.float16))
    assert tiny.engine.latent_space == pack.taehv.NORMALISED


def test_wrong_inputs_are_refused_with_advice(pack, folders):
    errors = pack.errors
    with pytest.raises(errors.InputError, match="no file picked.*vae_approx"):
        load_tiny(pack, decoder_name="none")
    with pytest.raises(errors.InputError, match="Set decoder_name to 'none'"):
        load_tiny(pack, vae=comfy_taehv_vae())
    not_taehv = SimpleNamespace(first_stage_model=torch.nn.Linear(2, 2))
    with pytest.raises(errors.InputError, match="not a tiny decoder \\(TAEHV\\)"):
        load_tiny(pack, decoder_name="none", vae=not_taehv)
    (folders.vae / "tae_is_the_full_vae.safetensors").write_bytes((folders.vae / "vae.safetensors").read_bytes())
    with pytest.raises(errors.CheckpointError, match="not a TAEHV tiny decoder for Wan2.1 checkpoint"):
        load_tiny(pack, decoder_name="tae_is_the_full_vae.safetensors")
