"""livetalk_core.media.taehv, the tiny decoder: upstream parity, streaming, frame alignment, loading.

Parity runs every ``taehv-wan2.1`` golden case (tests/golden/taehv, ../shared/golden,
LIVETALK_GOLDEN_DIRS), made with madebyollin/taehv's and lightx2v's own code (tests/golden/taehv/README.md).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from golden import assert_close, case_ids, golden_cases, names_from
from safetensors.torch import save_file

from livetalk_core.errors import CheckpointError, InputError
from livetalk_core.media.taehv import (
    NORMALISED,
    RAW,
    TinyDecoder,
    TinyDecoderConfig,
    check_tiny_decoder_file,
    latent_space_for,
    load_tiny_decoder,
    looks_like_tiny_decoder,
    tiny_decoder_from_state_dict,
)
from livetalk_core.media.vae import VAEConfig, WanVAE
from livetalk_core.runtime.decode_stream import decode_blocks

CASES = golden_cases("taehv")
REPO_CASES = {"taew2_1_fp32", "taew2_1_bf16", "lighttaew2_1_fp32", "lighttaew2_1_bf16"}
SMALL = TinyDecoderConfig(stem_width=8, stage_widths=(8, 8, 8), stage_outputs=(8, 8, 8))


def _random_decoder(config: TinyDecoderConfig = SMALL, latent_space: str = NORMALISED, seed: int = 0) -> TinyDecoder:
    torch.manual_seed(seed)
    decoder = TinyDecoder(config, latent_space).eval().requires_grad_(False)
    with torch.no_grad():  # the final bias keeps most values inside the [0, 1] clamp
        decoder.decoder["22"].bias.fill_(0.5)
    return decoder


def _case_decoder(case) -> TinyDecoder:
    return load_tiny_decoder(case.file(case.manifest["weights"]), dtype=case.dtype)


def _expected(case, name: str) -> torch.Tensor:
    """A stored frames tensor as float32 NCTHW in [-1, 1], the port's output form."""
    frames = case.load("tensors.safetensors")[name].float()
    if case.manifest["tensors"][name]["layout"].startswith("NTCHW in [0, 1]"):
        frames = frames.transpose(1, 2) * 2 - 1
    return frames


def _streamed(decoder, latents: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    stream = decoder.stream_decoder()
    pieces = latents.split([size for size in sizes if size], dim=2)
    return torch.cat([stream.decode(piece) for piece in pieces], dim=2)


# --------------------------------------------------------------------------------------------------
# Golden parity
# --------------------------------------------------------------------------------------------------


def test_in_repo_cases_present():
    found = names_from(CASES, "repo")
    assert REPO_CASES <= found, f"tiny-decoder cases missing from tests/golden/taehv: {sorted(REPO_CASES - found)}"


@pytest.mark.parametrize("case", CASES, ids=case_ids(CASES))
def test_tiny_decoder_matches_upstream(case):
    """One-shot and streamed (block 0 one latent frame at a time, then blocks of 2 or 3, as
    decode_stream does) against every frames tensor upstream recorded."""
    decoder = _case_decoder(case)
    assert decoder.latent_space == case.manifest["latent_space"], "the file name picks the wrong latent space"
    latents = case.load("tensors.safetensors")["latents"]
    tol = case.manifest["tolerance"]["recommended"]
    frames = latents.shape[2]
    outputs = {
        "one-shot": decoder.decode(latents),
        "streamed": _streamed(decoder, latents, [1, 1, 1] + [3] * ((frames - 3) // 3) + [(frames - 3) % 3]),
        "streamed by 2": _streamed(decoder, latents, [2] * (frames // 2) + [frames % 2]),
    }
    for name in case.manifest["tensors"]:
        expected = _expected(case, name)
        for how, actual in outputs.items():
            assert_close(actual, expected, atol=tol["atol"], rel_l2=tol["rel_l2"], name=f"{case.id} {how} vs {name}")


@pytest.mark.parametrize("case", [c for c in CASES if c.manifest["variant"] == "lighttaew2_1"][:1], ids=lambda c: c.id)
def test_the_tolerance_catches_the_wrong_latent_space(case):
    """lighttaew2_1 decoded as if it took the normalised latents is far outside the tolerance."""
    decoder = _case_decoder(case)
    decoder.latent_space = NORMALISED
    latents = case.load("tensors.safetensors")["latents"]
    tol = case.manifest["tolerance"]["recommended"]
    with pytest.raises(AssertionError, match="max"):
        assert_close(decoder.decode(latents), _expected(case, "frames_lightx2v"), atol=tol["atol"],
                     rel_l2=tol["rel_l2"], name="wrong space")


def test_the_tolerance_catches_the_wrong_time_grow_rows(tmp_path):
    """taew2_1.pth stores its first time grow for stride 2; keeping the first rows instead of the last
    (the original loader's choice) is far outside the tolerance."""
    case = next(c for c in CASES if c.name == "taew2_1_fp32" and c.source == "repo")
    state = torch.load(case.file(case.manifest["weights"]), weights_only=True)
    rows = state["decoder.7.conv.weight"].shape[0] // 2
    state["decoder.7.conv.weight"] = state["decoder.7.conv.weight"][:rows]
    decoder = tiny_decoder_from_state_dict(state, latent_space=NORMALISED, dtype=torch.float32)
    latents = case.load("tensors.safetensors")["latents"]
    tol = case.manifest["tolerance"]["recommended"]
    with pytest.raises(AssertionError, match="max"):
        assert_close(decoder.decode(latents), _expected(case, "frames_parallel"), atol=tol["atol"],
                     rel_l2=tol["rel_l2"], name="first rows")


# --------------------------------------------------------------------------------------------------
# Streaming and alignment
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sizes", [[1, 1, 1, 3, 3], [2, 2, 2, 2, 1], [3, 3, 3], [9], [1, 8]])
def test_streaming_equals_one_shot(dtype, sizes):
    """Any split of the latents into blocks gives the one-shot frames: float32 within 1e-5, bf16
    within one bf16 step of 1.0 (a CPU may pick another conv kernel for another batch of frames)."""
    decoder = _random_decoder().to(dtype)
    latents = torch.randn(1, 16, 9, 3, 2, generator=torch.Generator().manual_seed(5))
    one_shot = decoder.decode(latents)
    atol = 1e-5 if dtype == torch.float32 else 2.0**-7
    assert_close(_streamed(decoder, latents, sizes), one_shot, atol=atol, rel_l2=atol, name=f"split {sizes}")


def test_the_gpu_layout_gives_the_same_frames():
    """Channels-last weights and activations (what a GPU runs; here on the CPU): the frames of the
    default layout, one-shot and streamed; the time grow splits channels-last frames in one copy."""
    latents = torch.randn(1, 16, 5, 3, 2, generator=torch.Generator().manual_seed(10))
    plain, fast = _random_decoder(), _random_decoder()
    fast.use_channels_last()
    assert fast.decoder["1"].weight.is_contiguous(memory_format=torch.channels_last)
    expected = plain.decode(latents)
    assert_close(fast.decode(latents), expected, atol=1e-5, rel_l2=1e-6, name="channels-last one-shot")
    assert_close(_streamed(fast, latents, [1, 1, 3]), expected, atol=1e-5, rel_l2=1e-6, name="channels-last streamed")
    grow = fast.decoder["13"]
    x = torch.randn(3, 8, 4, 5).contiguous(memory_format=torch.channels_last)
    split = grow(x)
    assert split.is_contiguous(memory_format=torch.channels_last) and not split.is_contiguous()
    assert_close(split, grow.conv(x.contiguous()).reshape(6, 8, 4, 5), atol=1e-6, rel_l2=1e-6, name="time grow")


def test_the_stream_tolerance_catches_a_lost_state():
    """Restarting the stream at each block (the memory blocks' state lost) is caught."""
    decoder = _random_decoder()
    latents = torch.randn(1, 16, 6, 3, 2, generator=torch.Generator().manual_seed(6))
    lost = torch.cat([decoder.decode(piece)[:, :, -4:] for piece in latents.split(3, dim=2)], dim=2)
    with pytest.raises(AssertionError):
        assert_close(lost, decoder.decode(latents)[:, :, -lost.shape[2]:], atol=1e-5, rel_l2=1e-5, name="lost")


@pytest.mark.parametrize("latent_frames", [1, 2, 5])
def test_frame_count_equals_the_full_vae(latent_frames):
    """T latent frames -> 1 + 4(T-1) frames of 8x the latent size, as the full VAE; streamed one
    latent frame at a time, both give 1, then 4 per latent frame."""
    vae = WanVAE(VAEConfig(dim=4)).eval()
    decoder = _random_decoder()
    latents = torch.randn(1, 16, latent_frames, 2, 3)
    full, tiny = vae.decode(latents), decoder.decode(latents)
    assert tiny.shape == full.shape == (1, 3, 1 + 4 * (latent_frames - 1), 16, 24)
    assert tiny.dtype == full.dtype == torch.float32
    assert -1 <= tiny.min() and tiny.max() <= 1
    streams = vae.stream_decoder(), decoder.stream_decoder()
    for frame in latents.split(1, dim=2):
        assert [s.decode(frame).shape[2] for s in streams] in ([1, 1], [4, 4])


@pytest.mark.parametrize("changed", [1, 3])
def test_alignment_equals_the_full_vae(changed):
    """Latent frame k first shows in video frame 1 + 4(k-1), in both decoders: changing it leaves every
    earlier frame as it was and changes that one."""
    latents = torch.randn(1, 16, 4, 2, 3, generator=torch.Generator().manual_seed(7))
    other = latents.clone()
    other[:, :, changed] += 3.0
    first = 1 + 4 * (changed - 1)
    for decoder in (WanVAE(VAEConfig(dim=4)).eval(), _random_decoder()):
        before, after = decoder.decode(latents), decoder.decode(other)
        name = type(decoder).__name__
        assert torch.equal(before[:, :, :first], after[:, :, :first]), f"{name}: an earlier frame changed"
        assert not torch.equal(before[:, :, first], after[:, :, first]), f"{name}: frame {first} did not change"


def test_decode_stream_runs_the_tiny_decoder():
    """runtime.decode_stream.decode_blocks takes the tiny decoder where it takes the VAE: the same
    uint8 frames as a one-shot decode, trimmed to the video length."""
    decoder = _random_decoder()
    blocks = list(torch.randn(1, 16, 9, 2, 3, generator=torch.Generator().manual_seed(8)).split(3, dim=2))
    frames = torch.cat(list(decode_blocks(decoder, iter(blocks), num_video_frames=30)))
    expected = ((decoder.decode(torch.cat(blocks, dim=2)) * 0.5 + 0.5).clamp(0, 1) * 255).to(torch.uint8)
    assert frames.shape == (30, 16, 24, 3)
    diff = (frames.int() - expected[0].permute(1, 2, 3, 0)[:30].int()).abs()
    assert diff.max() <= 1, "streamed uint8 frames differ from the one-shot decode"


def test_the_livetalk_pipeline_decodes_with_its_decoder():
    """LiveTalkPipeline.decode (what stream() and the CLI's path use) decodes with ``pipe.decoder``, the
    VAE unless a tiny decoder is set: then the tiny decoder's frames, the pinned first latent frame
    first."""
    from livetalk_core.livetalk.pipeline import LiveTalkPipeline

    pipe = LiveTalkPipeline.__new__(LiveTalkPipeline)  # decode() needs no DiT or audio encoder
    pipe.vae = pipe.decoder = WanVAE(VAEConfig(dim=4)).eval()
    latents = torch.randn(1, 16, 6, 2, 3, generator=torch.Generator().manual_seed(9))

    def frames() -> torch.Tensor:
        blocks = iter(latents.split(3, dim=2))
        return torch.cat(list(pipe.decode(blocks, 21, first_latent_frame=latents[:, :, :1])))

    full = frames()
    pipe.decoder = _random_decoder()
    tiny = frames()
    expected = ((pipe.decoder.decode(latents) * 0.5 + 0.5).clamp(0, 1) * 255).to(torch.uint8)
    assert tiny.shape == full.shape == (21, 16, 24, 3)
    assert (tiny.int() - expected[0].permute(1, 2, 3, 0).int()).abs().max() <= 1
    assert (tiny.int() - full.int()).abs().float().mean() > 10, "the tiny decoder was not used"


def test_raw_latent_space_scales_like_lightx2v():
    """lighttaew2_1's input: z / (1/std) + mean in the latents' dtype, then the model's dtype."""
    decoder = _random_decoder(latent_space=RAW).to(torch.bfloat16)
    z = torch.randn(1, 16, 2, 2, 2)
    from livetalk_core.media.vae import WAN21_LATENT_MEAN, WAN21_LATENT_STD

    mean = torch.tensor(WAN21_LATENT_MEAN).view(1, -1, 1, 1, 1)
    std = torch.tensor(WAN21_LATENT_STD).view(1, -1, 1, 1, 1)
    assert torch.equal(decoder.to_decoder_input(z), (z / (1.0 / std) + mean).to(torch.bfloat16))
    assert torch.equal(_random_decoder().to_decoder_input(z), z)


def test_latent_space_by_file_name():
    assert latent_space_for("models/vae_approx/lighttaew2_1.safetensors") == RAW
    assert latent_space_for("LightTAEW2_1.pth") == RAW
    assert latent_space_for("taew2_1.pth") == NORMALISED
    assert latent_space_for("vae/taew2_1.safetensors") == NORMALISED


def test_bad_latents_raise_input_error():
    stream = _random_decoder().stream_decoder()
    with pytest.raises(InputError, match="frames >= 1"):
        stream.decode(torch.randn(1, 48, 2, 2, 2))
    stream.decode(torch.randn(1, 16, 1, 2, 2))
    with pytest.raises(InputError, match="reset"):
        stream.decode(torch.randn(1, 16, 1, 2, 4))
    stream.reset()
    assert stream.decode(torch.randn(1, 16, 1, 2, 4)).shape == (1, 3, 1, 16, 32)


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def test_release_layout_has_the_released_names():
    """The default config's state dict: the released decoder's names, ``decoder.22.bias`` (ComfyUI's
    test) included, 16 -> 256 channels at the stem."""
    names = TinyDecoder().state_dict()
    assert looks_like_tiny_decoder(names)
    assert names["decoder.1.weight"].shape == (256, 16, 3, 3)
    assert names["decoder.3.conv.0.weight"].shape == (256, 512, 3, 3)
    assert names["decoder.13.conv.weight"].shape == (256, 128, 1, 1)
    assert names["decoder.22.weight"].shape == (3, 64, 3, 3)
    assert len(names) == 1 + 2 + 9 * 6 + 3 + 3 - 1 + 2  # stem, 9 memory blocks, 3 time grows, 3 convs, final


def test_config_round_trips_through_state_dict():
    config = TinyDecoderConfig(stem_width=12, stage_widths=(12, 10, 6), stage_outputs=(10, 6, 4))
    assert TinyDecoderConfig.from_state_dict(TinyDecoder(config).state_dict()) == config


def test_pth_and_safetensors_load_alike(tmp_path):
    state = {k: v.half() for k, v in _random_decoder().state_dict().items()}
    torch.save(state, tmp_path / "taew2_1.pth")
    save_file(state, str(tmp_path / "taew2_1.safetensors"))
    a = load_tiny_decoder(tmp_path / "taew2_1.pth", torch.float32)
    b = load_tiny_decoder(tmp_path / "taew2_1.safetensors", torch.float32)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    assert a.config == b.config == SMALL


def test_encoder_tensors_and_a_prefix_are_accepted(tmp_path):
    state = {f"first_stage_model.{k}": v for k, v in _random_decoder().state_dict().items()}
    state["first_stage_model.encoder.0.weight"] = torch.zeros(8, 3, 3, 3)
    save_file(state, str(tmp_path / "lighttaew2_1.safetensors"))
    assert load_tiny_decoder(tmp_path / "lighttaew2_1.safetensors").latent_space == RAW


def test_load_rejects_the_full_vae(tmp_path):
    vae = WanVAE(VAEConfig(dim=4)).state_dict()
    save_file(vae, str(tmp_path / "wan_2.1_vae.safetensors"))
    with pytest.raises(CheckpointError, match=r"not a TAEHV tiny decoder for Wan2\.1 checkpoint.*a Wan VAE"):
        load_tiny_decoder(tmp_path / "wan_2.1_vae.safetensors")


def test_load_rejects_other_latent_spaces(tmp_path):
    config = TinyDecoderConfig(latent_channels=48)
    save_file(TinyDecoder(config).state_dict(), str(tmp_path / "taew2_2.safetensors"))
    with pytest.raises(CheckpointError, match="48-channel latents .*Wan2.2 5B.*taew2_1"):
        load_tiny_decoder(tmp_path / "taew2_2.safetensors")


@pytest.mark.parametrize("name", ["taehv.pth", "taehv.safetensors", "taecvx.pth", "taeos1_3.pth"])
def test_load_refuses_other_models_tiny_decoders_by_name(tmp_path, name):
    """madebyollin's TAEHVs for HunyuanVideo, CogVideoX and Open-Sora also take 16-channel latents: their
    weights would load and decode wrong frames, so the name refuses them."""
    state = _random_decoder().state_dict()
    (torch.save(state, tmp_path / name) if name.endswith(".pth") else save_file(state, str(tmp_path / name)))
    with pytest.raises(CheckpointError, match="by its name.*taew2_1"):
        load_tiny_decoder(tmp_path / name)
    renamed = (tmp_path / name).rename(tmp_path / ("taew2_1" + Path(name).suffix))
    assert load_tiny_decoder(renamed).config == SMALL


def test_load_names_missing_and_unexpected_keys(tmp_path):
    state = _random_decoder().state_dict()
    del state["decoder.16.conv.2.bias"]
    state["decoder.16.skip.weight"] = torch.zeros(8, 8, 1, 1)
    save_file(state, str(tmp_path / "taew2_1.safetensors"))
    with pytest.raises(CheckpointError) as error:
        load_tiny_decoder(tmp_path / "taew2_1.safetensors")
    message = str(error.value)
    assert "Missing 1 keys: decoder.16.conv.2.bias" in message
    assert "Unexpected 1 keys: decoder.16.skip.weight" in message


def test_load_names_misshapen_tensors(tmp_path):
    state = _random_decoder().state_dict()
    state["decoder.9.conv.2.weight"] = torch.zeros(8, 8, 1, 1)
    save_file(state, str(tmp_path / "taew2_1.safetensors"))
    expected = r"decoder\.9\.conv\.2\.weight \(8, 8, 1, 1\) \(expected \(8, 8, 3, 3\)\)"
    with pytest.raises(CheckpointError, match=expected):
        load_tiny_decoder(tmp_path / "taew2_1.safetensors")


def test_a_file_is_checked_without_loading(tmp_path):
    """check_tiny_decoder_file: the loader's checks on the meta device, for the CLI's checks before loading."""
    torch.save(_random_decoder().state_dict(), tmp_path / "taew2_1.pth")
    assert check_tiny_decoder_file(tmp_path / "taew2_1.pth") == SMALL
    save_file(WanVAE(VAEConfig(dim=4)).state_dict(), str(tmp_path / "wan_2.1_vae.safetensors"))
    with pytest.raises(CheckpointError, match="a Wan VAE"):
        check_tiny_decoder_file(tmp_path / "wan_2.1_vae.safetensors")


def test_load_names_widths_that_do_not_chain(tmp_path):
    """A stage conv wider than the next stage takes: one CheckpointError naming the tensors, no traceback."""
    state = _random_decoder().state_dict()
    state["decoder.8.weight"] = torch.zeros(12, 8, 3, 3)
    save_file(state, str(tmp_path / "taew2_1.safetensors"))
    with pytest.raises(CheckpointError, match=r"unexpected shape.*decoder\.1\.weight"):
        load_tiny_decoder(tmp_path / "taew2_1.safetensors")


def test_load_refuses_missing_truncated_and_unsafe_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_tiny_decoder(tmp_path / "taew2_1.pth")
    torch.save(_random_decoder().state_dict(), tmp_path / "taew2_1.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "taew2_1.pth").read_bytes()[:500])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_tiny_decoder(tmp_path / "cut.pth")
    torch.save({"model": TinyDecoderConfig()}, tmp_path / "code.pth")
    with pytest.raises(CheckpointError, match="refuses"):
        load_tiny_decoder(tmp_path / "code.pth")
