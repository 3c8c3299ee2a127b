"""Audio: decoding (media.audio_file), LiveTalk's frame arithmetic (livetalk.audio), wav2vec2 loading
and features (media.wav2vec2) and golden parity.

Audio files and small wav2vec2 checkpoints are written on the fly (no binary fixtures in the repo).
"""

from __future__ import annotations

import json
import wave
from functools import cache
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from golden import assert_close, case_ids, golden_cases, names_from, require_shared_cases, tolerance
from safetensors.torch import load_file, save_file

from livetalk_core.errors import CheckpointError, InputError, MissingWeightsError
from livetalk_core.livetalk.audio import (
    encoder_features,
    pad_waveform_to_blocks,
    samples_for_latents,
    trim_waveform_for_latents,
)
from livetalk_core.media.audio_file import load_audio, prepare_waveform
from livetalk_core.media.timing import video_frames_for_latents
from livetalk_core.media.wav2vec2 import hidden_states, livetalk_audio_features, load_audio_encoder, normalize_waveform

CASES = [case for case in golden_cases("livetalk") if case.model == "livetalk"]


# --------------------------------------------------------------------------------------------------
# Golden parity
# --------------------------------------------------------------------------------------------------


@cache
def _golden_encoder(path: Path, dtype_name: str):
    return load_audio_encoder(path, dtype=getattr(torch, dtype_name))


def _golden_audio(case):
    """Upstream's trimmed clip, its latent frame count, and the case's encoder."""
    num_latent_frames = case.manifest["sampler"]["num_latent_frames"]
    audio = trim_waveform_for_latents(case.load("inputs.safetensors")["audio_16k"], num_latent_frames)
    encoder = _golden_encoder(case.file(case.manifest["weights"]["wav2vec2"]), case.manifest["dtype"])
    return audio, num_latent_frames, encoder


def test_golden_cases_present():
    names = names_from(CASES, "repo")
    assert "compact_fp32" in names, f"in-repo case missing from tests/golden/livetalk; got {sorted(names)}"


def test_shared_golden_cases_present():
    require_shared_cases(CASES, "livetalk", {"tiny_fp32", "tiny_bf16"})


@pytest.mark.parametrize("case", CASES, ids=case_ids(CASES))
def test_golden_audio_input_values(case):
    audio, _, encoder = _golden_audio(case)
    expected = case.load("expected.safetensors")["audio_input_values"]
    actual = (normalize_waveform(audio) if encoder.do_normalize else audio).to(encoder.dtype)[None]
    assert actual.dtype == expected.dtype
    assert_close(actual, expected, **_tol(case, "audio_input_values"), name="audio_input_values")


@pytest.mark.parametrize("case", CASES, ids=case_ids(CASES))
def test_golden_audio_features(case):
    audio, num_latent_frames, encoder = _golden_audio(case)
    expected = case.load("expected.safetensors")["audio_features"]
    actual = livetalk_audio_features(encoder, audio, video_frames_for_latents(num_latent_frames))
    assert actual.dtype == expected.dtype
    assert actual.shape[-1] == encoder_features(encoder.num_layers, encoder.hidden_size)
    assert_close(actual, expected, **_tol(case, "audio_features"), name="audio_features")


def _tol(case, name: str) -> dict:
    entry = tolerance(case, name)
    return {"atol": entry["atol"], "rel_l2": entry["rel_l2"]}


# --------------------------------------------------------------------------------------------------
# Frame arithmetic
# --------------------------------------------------------------------------------------------------


def test_latent_to_video_frames():
    assert video_frames_for_latents(21) == 81
    assert video_frames_for_latents(3) == 9


@pytest.mark.parametrize(
    "seconds, latents, samples",
    [(1.0, 6, 20000), (5.0, 21, 80000), (7.3, 33, 128000)],
)
def test_pad_waveform_to_blocks(seconds, latents, samples):
    waveform = torch.rand(round(seconds * 16000)) - 0.5
    padded, num_latent_frames = pad_waveform_to_blocks(waveform)
    assert num_latent_frames == latents and num_latent_frames % 3 == 0
    assert padded.shape == (samples,) and samples == samples_for_latents(latents)
    assert torch.equal(padded[: len(waveform)], waveform)
    assert not padded[len(waveform):].any()
    # The smallest such F: one block less would not cover the audio.
    assert samples_for_latents(latents - 3) < len(waveform)


@pytest.mark.parametrize("seconds", [2, 5, 8, 11, 20])
def test_pad_waveform_matches_upstream_for_3n_plus_2_seconds(seconds):
    upstream_latents = (seconds * 16 + 4) // 4  # scripts/inference_example.py:516
    waveform = torch.rand(seconds * 16000)
    padded, num_latent_frames = pad_waveform_to_blocks(waveform)
    assert num_latent_frames == upstream_latents
    assert torch.equal(padded, waveform)
    assert torch.equal(trim_waveform_for_latents(waveform, num_latent_frames), waveform)


def test_trim_never_pads():
    assert len(trim_waveform_for_latents(torch.zeros(90000), 21)) == 80000
    assert len(trim_waveform_for_latents(torch.zeros(50000), 21)) == 50000


def test_pad_rejects_empty():
    with pytest.raises(InputError):
        pad_waveform_to_blocks(torch.zeros(0))


# --------------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------------

TONE_HZ = 440.0


def _tone(rate: int, seconds: float, amplitudes: tuple[float, ...]) -> np.ndarray:
    t = np.arange(round(rate * seconds)) / rate
    return np.stack([a * np.sin(2 * np.pi * TONE_HZ * t) for a in amplitudes]).astype(np.float32)


def _write_audio(path: Path, codec: str, rate: int, channels: np.ndarray) -> Path:
    """Encode float ``[C, T]`` with PyAV; picks a sample format the encoder supports."""
    layout = "mono" if channels.shape[0] == 1 else "stereo"
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate, options={"strict": "experimental"})
        stream.layout = layout
        supported = [f.name for f in stream.codec_context.codec.audio_formats]
        fmt = next(f for f in ("fltp", "flt", "s16", "s16p") if f in supported)
        stream.format = fmt
        for start in range(0, channels.shape[1], 4096):
            chunk = channels[:, start : start + 4096]
            if fmt.startswith("s16"):
                chunk = (chunk * 32767).astype(np.int16)
            array = chunk if fmt.endswith("p") else chunk.T.reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(array), format=fmt, layout=layout)
            frame.sample_rate = rate
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def _dominant_hz(waveform: torch.Tensor, rate: int = 16000) -> float:
    spectrum = np.abs(np.fft.rfft(waveform.numpy() * np.hanning(len(waveform))))
    return float(np.fft.rfftfreq(len(waveform), 1 / rate)[spectrum.argmax()])


@pytest.mark.parametrize(
    "suffix, codec, exact_length",
    [("wav", "pcm_s16le", True), ("flac", "flac", True), ("mp3", "libmp3lame", False), ("ogg", "vorbis", False)],
)
def test_load_audio_stereo_44k(tmp_path, suffix, codec, exact_length):
    path = _write_audio(tmp_path / f"tone.{suffix}", codec, 44100, _tone(44100, 1.5, (0.5, 0.3)))
    waveform = load_audio(path)
    assert waveform.dtype == torch.float32 and waveform.ndim == 1
    if exact_length:
        assert len(waveform) == 24000
        # Channel mean of 0.5 and 0.3 amplitude sines in phase.
        assert abs(waveform[2000:-2000].abs().max().item() - 0.4) < 0.01
    else:  # lossy codecs add encoder delay / padding
        assert abs(len(waveform) - 24000) < 1600
    assert abs(_dominant_hz(waveform) - TONE_HZ) < 2


def test_load_audio_8k_mono(tmp_path):
    path = _write_audio(tmp_path / "tone.wav", "pcm_s16le", 8000, _tone(8000, 1.0, (0.5,)))
    waveform = load_audio(path)
    assert len(waveform) == 16000
    assert abs(_dominant_hz(waveform) - TONE_HZ) < 2


def test_load_audio_16k_float_is_untouched(tmp_path):
    samples = (np.random.RandomState(0).rand(1, 12345).astype(np.float32) - 0.5)
    path = _write_audio(tmp_path / "noise.wav", "pcm_f32le", 16000, samples)
    assert torch.equal(load_audio(path), torch.from_numpy(samples[0]))


def test_load_audio_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_audio(tmp_path / "missing.wav")
    (tmp_path / "zero.wav").write_bytes(b"")
    with pytest.raises(InputError, match="not an audio file"):
        load_audio(tmp_path / "zero.wav")
    (tmp_path / "notes.wav").write_text("this is a text file, not audio\n" * 50)
    with pytest.raises(InputError, match="not an audio file"):
        load_audio(tmp_path / "notes.wav")
    with wave.open(str(tmp_path / "empty.wav"), "wb") as empty:
        empty.setnchannels(1)
        empty.setsampwidth(2)
        empty.setframerate(16000)
    with pytest.raises(InputError, match="empty"):
        load_audio(tmp_path / "empty.wav")


def test_load_audio_without_audio_stream(tmp_path):
    path = tmp_path / "silent_film.mkv"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1", rate=1)
        stream.width, stream.height, stream.pix_fmt = 16, 16, "yuv420p"
        frame = av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24")
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    with pytest.raises(InputError, match="no audio stream"):
        load_audio(path)


def test_prepare_waveform_comfy_audio():
    stereo = torch.from_numpy(_tone(24000, 1.0, (0.5, 0.3)))[None]  # ComfyUI AUDIO: [B, C, T]
    waveform = prepare_waveform(stereo, 24000)
    assert waveform.shape == (16000,) and waveform.dtype == torch.float32
    assert abs(_dominant_hz(waveform) - TONE_HZ) < 2


def test_prepare_waveform_layouts():
    stereo = np.random.RandomState(1).rand(2, 8000).astype(np.float32)
    mono = prepare_waveform(stereo, 16000)
    assert torch.equal(mono, torch.from_numpy(stereo.mean(axis=0)))
    assert torch.equal(prepare_waveform(stereo.T, 16000, layout="channels_last"), mono)
    assert torch.equal(prepare_waveform(torch.from_numpy(stereo[0]), 16000), torch.from_numpy(stereo[0]))


@pytest.mark.parametrize(
    "samples, rate",
    [(torch.zeros(2, 2, 100), 16000), (torch.zeros(1, 0), 16000), (torch.full((100,), float("nan")), 16000),
     (torch.zeros(100), 0), (torch.zeros(1, 1, 1, 100), 16000)],
)
def test_prepare_waveform_errors(samples, rate):
    with pytest.raises(InputError):
        prepare_waveform(samples, rate)


# --------------------------------------------------------------------------------------------------
# Encoder loading
# --------------------------------------------------------------------------------------------------

VARIANTS = {
    # base-960h shape family: group-norm CNN, post-LN encoder, no conv bias.
    "base": dict(feat_extract_norm="group", do_stable_layer_norm=False, conv_bias=False),
    # large-xlsr family: layer-norm CNN, stable (pre-LN) encoder, conv bias.
    "large": dict(feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True),
}


def _write_checkpoints(folder: Path, variant: str) -> tuple[Path, Path]:
    """A small random Wav2Vec2ForCTC as a base-960h-style HF folder (legacy ``weight_g/weight_v``)
    and as a ComfyUI-style single file (no prefix, no head, parametrization names)."""
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

    torch.manual_seed(0)
    config = Wav2Vec2Config(
        hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96,
        conv_dim=[16] * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, vocab_size=8,
        **VARIANTS[variant],
    )
    state = {k: v.detach().clone() for k, v in Wav2Vec2ForCTC(config).state_dict().items()}
    for name, tensor in state.items():  # move norms away from 1/0 so loading them matters
        if tensor.ndim == 1:
            tensor.add_(0.1 * torch.randn_like(tensor))
    hf_dir = folder / f"{variant}_hf"
    hf_dir.mkdir()
    pos = "wav2vec2.encoder.pos_conv_embed.conv."
    legacy = {
        k.replace(pos + "parametrizations.weight.original0", pos + "weight_g")
        .replace(pos + "parametrizations.weight.original1", pos + "weight_v"): v
        for k, v in state.items()
    }
    save_file(legacy, hf_dir / "model.safetensors")
    (hf_dir / "config.json").write_text(json.dumps(config.to_dict()))
    (hf_dir / "preprocessor_config.json").write_text(json.dumps({"do_normalize": True, "sampling_rate": 16000}))
    single = folder / f"{variant}.safetensors"
    save_file({k.removeprefix("wav2vec2."): v for k, v in state.items() if k.startswith("wav2vec2.")}, single)
    return hf_dir, single


@pytest.mark.parametrize("variant", VARIANTS)
def test_single_file_equals_folder(tmp_path, variant):
    hf_dir, single = _write_checkpoints(tmp_path, variant)
    from_folder = load_audio_encoder(hf_dir, dtype=torch.float32)
    from_file = load_audio_encoder(single, dtype=torch.float32)
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "conv_dim",
                "conv_bias", "feat_extract_norm", "do_stable_layer_norm", "num_conv_pos_embeddings",
                "num_conv_pos_embedding_groups"):
        assert getattr(from_file.config, key) == getattr(from_folder.config, key), key
    assert from_file.do_normalize and from_folder.do_normalize
    waveform = torch.randn(9000) * 0.1
    expected = livetalk_audio_features(from_folder, waveform, 17)
    assert expected.shape == (1, 17, 4 * 128)
    assert torch.equal(livetalk_audio_features(from_file, waveform, 17), expected)


def test_folder_with_pytorch_bin(tmp_path):
    hf_dir, _ = _write_checkpoints(tmp_path, "base")
    bin_dir = tmp_path / "bin_hf"
    bin_dir.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        (bin_dir / name).write_text((hf_dir / name).read_text())
    torch.save(load_file(hf_dir / "model.safetensors"), bin_dir / "pytorch_model.bin")
    waveform = torch.randn(8000) * 0.1
    assert torch.equal(
        livetalk_audio_features(load_audio_encoder(bin_dir, dtype=torch.float32), waveform, 9),
        livetalk_audio_features(load_audio_encoder(hf_dir, dtype=torch.float32), waveform, 9),
    )


@pytest.mark.parametrize("variant", VARIANTS)
def test_last_state_matches_transformers_forward(tmp_path, variant):
    """With as many frames as the CNN yields the interpolation is the identity, so the last hidden
    state must equal transformers' own ``Wav2Vec2Model`` forward."""
    encoder = load_audio_encoder(_write_checkpoints(tmp_path, variant)[0], dtype=torch.float32)
    values = normalize_waveform(torch.randn(8000) * 0.1)[None]
    with torch.no_grad():
        reference = encoder.model(values).last_hidden_state
    states = hidden_states(encoder, values, reference.shape[1])
    assert len(states) == encoder.num_layers + 1
    torch.testing.assert_close(states[-1], reference, atol=1e-5, rtol=1e-5)


def test_normalisation_flag_override(tmp_path):
    hf_dir, _ = _write_checkpoints(tmp_path, "base")
    raw = load_audio_encoder(hf_dir, dtype=torch.float32, do_normalize=False)
    normalised = load_audio_encoder(hf_dir, dtype=torch.float32)
    waveform = torch.randn(8000) * 0.1
    assert torch.equal(
        livetalk_audio_features(raw, normalize_waveform(waveform), 9),
        livetalk_audio_features(normalised, waveform, 9),
    )


def test_encoder_load_errors(tmp_path):
    with pytest.raises(MissingWeightsError):
        load_audio_encoder(tmp_path / "nowhere")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(MissingWeightsError, match="model.safetensors"):
        load_audio_encoder(tmp_path / "empty_dir")
    save_file({"decoder.middle.0.residual.0.gamma": torch.zeros(4)}, tmp_path / "vae.safetensors")
    with pytest.raises(CheckpointError, match="wav2vec2"):
        load_audio_encoder(tmp_path / "vae.safetensors")
    hf_dir, single = _write_checkpoints(tmp_path, "base")
    (tmp_path / "truncated.safetensors").write_bytes(single.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_audio_encoder(tmp_path / "truncated.safetensors")
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(CheckpointError, match="Missing"):
        load_audio_encoder(hf_dir)


def test_too_short_audio(tmp_path):
    encoder = load_audio_encoder(_write_checkpoints(tmp_path, "base")[1], dtype=torch.float32)
    with pytest.raises(InputError, match="too short"):
        livetalk_audio_features(encoder, torch.randn(300), 5)


@pytest.mark.parametrize("frames", [3, 256, 257, 700])
@pytest.mark.parametrize("large", [False, True], ids=["base", "large"])
def test_positional_conv_as_matmuls_equals_the_convolution(frames, large):
    """The grouped 128-tap positional conv computed as chunked matmuls (cuDNN is slow for it) is the same function."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    from livetalk_core.media.wav2vec2 import positional_conv

    hidden, heads = (64, 4) if not large else (96, 4)
    config = Wav2Vec2Config(hidden_size=hidden, num_attention_heads=heads, num_hidden_layers=1, intermediate_size=32,
                            num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16, do_stable_layer_norm=large)
    torch.manual_seed(frames)
    embed = Wav2Vec2Model(config).eval().encoder.pos_conv_embed
    h = torch.randn(1, frames, hidden)
    with torch.no_grad():
        expected, actual = embed(h), positional_conv(embed, h)
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("large", [False, True], ids=["base-groupnorm", "large-layernorm"])
def test_feature_extractor_as_matmuls_equals_the_convolutions(large):
    """The CNN layers run as unfold + matmul (no cuDNN plan per clip length) give the feature extractor's output."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    from livetalk_core.media.wav2vec2 import _cnn_layer

    config = Wav2Vec2Config(hidden_size=32, num_attention_heads=2, num_hidden_layers=1, intermediate_size=16,
                            conv_dim=(24,) * 7, feat_extract_norm="layer" if large else "group", conv_bias=large)
    torch.manual_seed(int(large))
    extractor = Wav2Vec2Model(config).eval().feature_extractor
    x = torch.randn(1, 7919)
    with torch.no_grad():
        expected = extractor(x)
        actual = x[:, None]
        for layer in extractor.conv_layers:
            actual = _cnn_layer(layer, actual)
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
