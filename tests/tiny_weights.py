"""Tiny random-weight models in the real file formats, for tests that need whole files on disk.

The DiT is a LiveTalk safetensors with LiveTalk's key names, the VAE a Wan2.1 VAE safetensors, the
audio encoder a transformers ``Wav2Vec2ForCTC`` saved with ``save_pretrained`` (so its keys are the
Hugging Face ones: ``wav2vec2.`` prefix, weight-normed positional conv, CTC head). They are wired
together like the real ones: the encoder's ``(layers + 2) * hidden`` features equal the DiT's audio
input width. The wav2vec2 hidden size is 64 so that its config can be inferred from a single file
(one head of 64), as for the real ``wav2vec2-base-960h`` single-file download.

RealVideo 14B: :func:`tiny_s2v_dit` is an S2V DiT with the release's depth (40 layers, 12 audio
injectors at the release's layers, so no config is needed) but width 128, saved with bare keys like
Comfy-Org's ``wan2.2_s2v_14B_bf16.safetensors``; ``save_tiny_wav2vec2(..., large=True)`` is a
wav2vec2-large-style encoder (24 layers, stable layer norm) whose 25 hidden states it mixes.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from livetalk_core.livetalk.model import LATENT_CHANNELS, LiveTalkConfig, LiveTalkDiT
from livetalk_core.media.vae import VAEConfig, WanVAE
from livetalk_core.realvideo.model import RELEASE_INJECT_LAYERS, S2VConfig, S2VDiT
from livetalk_core.wan.dit import HEAD_DIM, WanCoreConfig

WAV2VEC2_HIDDEN = 64
WAV2VEC2_LAYERS = 2
WAV2VEC2_LARGE_LAYERS = 24
AUDIO_FEATURES = (WAV2VEC2_LAYERS + 2) * WAV2VEC2_HIDDEN
S2V_LAYERS = 40
UMT5_WIDTH = 4096


def tiny_dit(text_dim: int = UMT5_WIDTH, audio_features: int = AUDIO_FEATURES, seed: int = 0) -> LiveTalkDiT:
    """A 4-layer, one-head LiveTalk DiT (width 128) with random weights."""
    torch.manual_seed(seed)
    core = WanCoreConfig(dim=HEAD_DIM, in_dim=2 * LATENT_CHANNELS + 1, out_dim=LATENT_CHANNELS, ffn_dim=256,
                         num_layers=4, text_dim=text_dim)
    return LiveTalkDiT(LiveTalkConfig(core=core, audio_features=audio_features)).eval()


def tiny_s2v_dit(text_dim: int = UMT5_WIDTH, seed: int = 0, heads: int = 1) -> S2VDiT:
    """A release-depth S2V DiT of width ``128 * heads`` for the large-style tiny wav2vec2 (2 heads
    split over 2 sequence-parallel ranks).

    Random weights scaled by ``1 / sqrt(fan_in)`` and a positive layer mix: the default init leaves
    the mix at zero, which the encoder's normalisation turns into NaN.
    """
    torch.manual_seed(seed)
    core = WanCoreConfig(dim=heads * HEAD_DIM, in_dim=LATENT_CHANNELS, out_dim=LATENT_CHANNELS, ffn_dim=64,
                         num_layers=S2V_LAYERS, text_dim=text_dim)
    config = S2VConfig(core=core, audio_dim=WAV2VEC2_HIDDEN, audio_layers=WAV2VEC2_LARGE_LAYERS + 1, audio_tokens=4,
                       inject_layers=RELEASE_INJECT_LAYERS, cond_dim=16)
    model = S2VDiT(config).eval().requires_grad_(False)
    for name, param in model.named_parameters():
        if param.ndim >= 2:
            param.normal_(0.0, 1.0 / math.sqrt(param[0].numel()))
        elif "norm" in name:
            param.uniform_(0.9, 1.1)
        else:
            param.normal_(0.0, 0.05)
    model.casual_audio_encoder.weights.uniform_(0.1, 1.0)
    return model


def tiny_vae(seed: int = 0, dim: int = 1) -> WanVAE:
    """A Wan2.1-layout VAE of base width ``dim`` (the release has 96) with random weights. Width 1
    keeps a 512x512 decode on a CPU near half a second per frame."""
    torch.manual_seed(seed)
    return WanVAE(VAEConfig(dim=dim)).eval()


def save_tiny_wav2vec2(path: Path, seed: int = 0, large: bool = False) -> Path:
    """Write a tiny ``Wav2Vec2ForCTC``: a folder via ``save_pretrained`` if ``path`` has no suffix,
    else that folder's ``model.safetensors`` alone under the name ``path``. ``large``: the
    wav2vec2-large options (24 layers, LayerNorm convs with bias, stable layer norm)."""
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC

    torch.manual_seed(seed)
    variant = dict(num_hidden_layers=WAV2VEC2_LARGE_LAYERS, conv_bias=True, feat_extract_norm="layer",
                   do_stable_layer_norm=True) if large else dict(num_hidden_layers=WAV2VEC2_LAYERS)
    config = Wav2Vec2Config(
        hidden_size=WAV2VEC2_HIDDEN, num_attention_heads=1,
        intermediate_size=128, conv_dim=[32] * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
        vocab_size=32, **variant,
    )
    model = Wav2Vec2ForCTC(config).eval()
    if not path.suffix:
        model.save_pretrained(path)
        Wav2Vec2FeatureExtractor(do_normalize=True).save_pretrained(path)
        return path
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(tmp) / "model.safetensors", path)
    return path


def save_module(module: torch.nn.Module, path: Path, dtype: torch.dtype | None = None) -> Path:
    """``module``'s weights as a bare-key safetensors file, in ``dtype`` if given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(dtype or v.dtype).contiguous() for k, v in module.state_dict().items()}, str(path))
    return path
