"""Long audio: the CNN is chunked exactly, attention is windowed, memory stays bounded."""

from pathlib import Path

import pytest
import torch
from fresh_process import last_printed_int

from livetalk_core.media.wav2vec2 import AudioEncoder, chunked_cnn_features, hidden_states, normalize_waveform


def tiny_encoder(norm: str) -> AudioEncoder:
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    torch.manual_seed(0)
    config = Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, conv_dim=(32,) * 7,
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, feat_extract_norm=norm,
        do_stable_layer_norm=norm == "layer", conv_bias=norm == "layer",
    )
    return AudioEncoder(Wav2Vec2Model(config).eval(), do_normalize=True, source=Path("tiny"))


@pytest.mark.parametrize("norm", ["group", "layer"])
def test_chunked_cnn_equals_one_pass(norm, monkeypatch):
    import livetalk_core.media.wav2vec2 as wav2vec2

    monkeypatch.setattr(wav2vec2, "_CNN_CHUNK_FRAMES", 97)  # many uneven chunks
    encoder = tiny_encoder(norm)
    x = normalize_waveform(torch.randn(16000 * 7) * 0.1)[None]
    whole = encoder.model.feature_extractor(x)
    chunked = chunked_cnn_features(encoder, x)
    assert chunked.shape == whole.shape
    torch.testing.assert_close(chunked, whole, atol=1e-4, rtol=1e-4)


def test_short_clips_take_the_exact_path_and_long_ones_stay_close():
    encoder = tiny_encoder("group")
    x = normalize_waveform(torch.randn(16000 * 70) * 0.1)[None]
    frames = 70 * 16 + 1
    windowed = hidden_states(encoder, x, frames)  # 70 s > the whole-clip limit
    exact = hidden_states(encoder, x, frames, whole_clip_max_seconds=1e9)
    # everything before self-attention is exact; attention sees 30 s + 2 x 10 s of context
    torch.testing.assert_close(windowed[0], exact[0], atol=1e-4, rtol=1e-4)
    for ours, ref in zip(windowed[1:], exact[1:]):
        assert ((ours - ref).norm() / ref.norm()).item() < 1e-2
    short = normalize_waveform(torch.randn(16000 * 20) * 0.1)[None]
    a = hidden_states(encoder, short, 321)
    b = hidden_states(encoder, short, 321, whole_clip_max_seconds=1e9)
    assert all(torch.equal(p, q) for p, q in zip(a, b))


def test_thirty_minutes_of_audio_encode_in_bounded_memory():
    """A 30-minute clip through the tiny encoder in a fresh process: peak RSS well under 2 GB."""
    code = (
        "import resource, torch\n"
        "from tests.test_audio_long import tiny_encoder\n"
        "from livetalk_core.media.wav2vec2 import hidden_states, normalize_waveform\n"
        "enc = tiny_encoder('group')\n"
        "x = normalize_waveform(torch.randn(16000 * 1800) * 0.1)[None]\n"
        "states = hidden_states(enc, x, 1800 * 16 + 1)\n"
        "assert states[-1].shape == (1, 28801, 32)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    peak_kib = last_printed_int(code, timeout=300)
    assert peak_kib < 2_000_000, f"peak RSS {peak_kib / 1e6:.2f} GB"
