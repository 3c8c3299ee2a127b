"""(Cases run in a ComfyUI process by test_comfy_wav2vec2.py, see comfy_in_process.)

ComfyUI's own wav2vec2 key names (``wav2vec2_large_english_fp16.safetensors`` is a state dict of
ComfyUI's ``comfy.audio_encoders.wav2vec2.Wav2Vec2Model``) load through the pack's single-file path
and give ComfyUI's numbers.

A tiny ``Wav2Vec2Model`` of ComfyUI 0.3.75 (imported in this process) gets random weights, which are
saved in fp16, with and without the ``wav2vec2.`` prefix ComfyUI's loader strips. What is compared:

* the hidden states: ComfyUI returns ``(out, all_layers)`` where ``all_layers`` is the encoder input
  (after the positional conv) and each layer's output, the last after the final LayerNorm in the
  stable-layer-norm (large) variant, i.e. transformers-4.x ``hidden_states``, which is what
  :func:`livetalk_core.media.wav2vec2.hidden_states` returns. Ours are interpolated to the video frame count
  before the transformer; asked for exactly the CNN's frame count the interpolation is the identity,
  so both must agree to float32 rounding.
* the waveform normalisation: ComfyUI's ``do_normalize`` divides by the unbiased variance of the clip,
  the transformers feature extractor (and the pack) by the population variance, a relative scale
  difference of ``1 / (2N)``; it is compared separately, with a tolerance for that.
"""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

from livetalk_core.media.wav2vec2 import cnn_frames, hidden_states, load_audio_encoder, normalize_waveform

HIDDEN = 64  # one head of 64: the pack infers heads = hidden / 64, as for every released wav2vec2
LAYERS = 2
SAMPLES = 16000


@pytest.fixture(scope="module")
def comfy_wav2vec2():
    import comfy.ops
    from comfy.audio_encoders.wav2vec2 import Wav2Vec2Model

    return Wav2Vec2Model, comfy.ops.manual_cast


def comfy_model(comfy_wav2vec2, large: bool, seed: int = 0) -> torch.nn.Module:
    """ComfyUI's module in its large (wav2vec2_large_english) or base configuration, random weights
    rounded to fp16 so that the fp16 file holds exactly the numbers this model computes with."""
    model_class, operations = comfy_wav2vec2
    model = model_class(embed_dim=HIDDEN, num_heads=HIDDEN // 64, num_layers=LAYERS, conv_norm=large, conv_bias=large,
                        do_normalize=large, do_stable_layer_norm=large, dtype=torch.float32, operations=operations)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim >= 2:
                param.normal_(0.0, 1.0 / math.sqrt(param[0].numel()), generator=generator)
            elif "norm" in name and name.endswith("weight"):
                param.uniform_(0.8, 1.2, generator=generator)
            else:
                param.normal_(0.0, 0.1, generator=generator)
            param.copy_(param.half().float())
    return model.eval()


def save_comfy_file(model: torch.nn.Module, path, prefix: str):
    save_file({prefix + k: v.half().contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def speech_like(seconds: float = 1.0) -> torch.Tensor:
    t = torch.arange(int(seconds * SAMPLES)) / SAMPLES
    generator = torch.Generator().manual_seed(1)
    return (0.3 * torch.sin(2 * math.pi * 220 * t) * torch.sin(2 * math.pi * 3 * t)
            + 0.01 * torch.randn(t.shape, generator=generator))


@pytest.mark.parametrize("prefix", ["", "wav2vec2."], ids=["bare", "wav2vec2_prefix"])
@pytest.mark.parametrize("large", [True, False], ids=["large", "base"])
def test_comfy_state_dict_loads_and_matches_comfys_forward(comfy_wav2vec2, tmp_path, prefix, large):
    reference = comfy_model(comfy_wav2vec2, large)
    path = save_comfy_file(reference, tmp_path / "wav2vec2_comfy_fp16.safetensors", prefix)
    encoder = load_audio_encoder(path, torch.float32)
    assert (encoder.num_layers, encoder.hidden_size) == (LAYERS, HIDDEN)
    assert encoder.config.do_stable_layer_norm == large and encoder.config.conv_bias == large

    values = normalize_waveform(speech_like())
    reference.do_normalize = False  # the normalisation is compared in its own test
    with torch.no_grad():
        out, all_layers = reference(values[None, None])
    ours = hidden_states(encoder, values[None], cnn_frames(encoder, values.shape[0]))
    assert len(ours) == len(all_layers) == LAYERS + 1
    for i, (mine, theirs) in enumerate(zip(ours, all_layers)):
        assert mine.shape == theirs.shape
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4, msg=f"hidden state {i}")
    torch.testing.assert_close(ours[-1], out, rtol=1e-4, atol=1e-4)


def test_comfys_own_normalisation_differs_only_by_the_variance_estimator(comfy_wav2vec2, tmp_path):
    reference = comfy_model(comfy_wav2vec2, large=True)
    encoder = load_audio_encoder(save_comfy_file(reference, tmp_path / "w.safetensors", ""), torch.float32)
    waveform = speech_like()
    with torch.no_grad():
        _, all_layers = reference(waveform[None, None])  # ComfyUI normalises inside its forward
    values = normalize_waveform(waveform)
    ours = hidden_states(encoder, values[None], cnn_frames(encoder, values.shape[0]))
    for mine, theirs in zip(ours, all_layers):
        torch.testing.assert_close(mine, theirs, rtol=1e-3, atol=1e-3)
    unbiased = (waveform - waveform.mean()) / torch.sqrt(waveform.var() + 1e-7)
    ratio = (values / unbiased)[waveform.abs() > 0.05]
    expected = math.sqrt(SAMPLES / (SAMPLES - 1))
    torch.testing.assert_close(ratio, torch.full_like(ratio, expected), rtol=1e-5, atol=0)
