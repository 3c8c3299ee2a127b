"""Tiny random-weight models in the real file formats, for the smoke mode and the tests.

The files have the release key names and layouts (LiveTalk ``model.safetensors``, the S2V DiT with the
``config.json`` its loader reads, ``Wan2.1_VAE.pth``, a Hugging Face wav2vec2 folder) but a few hundred
kilobytes of random weights, so the whole pipeline (loaders included) runs on a CPU in seconds. The
video they make is noise; that is the point: it proves the installation, not the model. Each family's
``smoke_weights`` calls its builder here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from .livetalk.model import LiveTalkConfig, LiveTalkDiT
from .media.text_encoder import TEXT_LEN
from .media.vae import VAEConfig, WanVAE
from .realvideo.model import S2VConfig, S2VDiT
from .wan.dit import HEAD_DIM, WanCoreConfig

TINY_TEXT_DIM = 64
TINY_TEXT_TOKENS = 8
TINY_WAV2VEC_HIDDEN = 32
TINY_WAV2VEC_LAYERS = 2


@dataclass(frozen=True)
class TinyWeights:
    """The files of a tiny model. ``context`` holds the text context ``context`` (the talking prompt's)
    and, for a family with an idle prompt, ``idle``."""

    dit: Path
    vae: Path
    wav2vec2: Path
    context: Path


def _randomise(module: torch.nn.Module, generator: torch.Generator, scale: float = 0.1) -> None:
    """Give zero-initialised parameters (modulations, gains) small random values so every path matters."""
    for name, p in module.named_parameters():
        if name.endswith("modulation"):
            p.data = torch.randn(p.shape, generator=generator) * scale


def _save_quietly(model, folder: Path) -> None:
    """``save_pretrained`` without transformers' "Writing model shards" progress bar (noise in a smoke run)."""
    from transformers.utils import logging as transformers_logging

    bar_was_on = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        model.save_pretrained(folder, safe_serialization=True)
    finally:
        if bar_was_on:
            transformers_logging.enable_progress_bar()


def _tiny_wav2vec2(folder: Path) -> Path:
    """A 2-layer wav2vec2 folder (config, feature extractor, safetensors weights)."""
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC

    w2v_dir = folder / "wav2vec2-tiny"
    w2v_config = Wav2Vec2Config(
        vocab_size=32,
        hidden_size=TINY_WAV2VEC_HIDDEN,
        num_hidden_layers=TINY_WAV2VEC_LAYERS,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(32,) * 7,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
        feat_extract_norm="group",
        do_stable_layer_norm=False,
        conv_bias=False,
    )
    _save_quietly(Wav2Vec2ForCTC(w2v_config), w2v_dir)
    extractor = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, do_normalize=True,
                                         return_attention_mask=False)
    extractor.save_pretrained(w2v_dir)
    return w2v_dir


def _tiny_vae(folder: Path) -> Path:
    vae_path = folder / "wan2.1_vae_tiny.pth"
    torch.save(WanVAE(VAEConfig(dim=4)).state_dict(), vae_path)
    return vae_path


def build_tiny_weights(folder: str | Path, seed: int = 0) -> TinyWeights:
    """Write tiny LiveTalk DiT / VAE / wav2vec2 files and a text context into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)

    w2v_dir = _tiny_wav2vec2(folder)
    audio_features = (TINY_WAV2VEC_LAYERS + 2) * TINY_WAV2VEC_HIDDEN
    core = WanCoreConfig(dim=128, in_dim=33, out_dim=16, ffn_dim=64, num_layers=4, text_dim=TINY_TEXT_DIM)
    dit = LiveTalkDiT(LiveTalkConfig(core=core, audio_features=audio_features))
    _randomise(dit, generator)
    dit_path = folder / "livetalk_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in dit.state_dict().items()}, str(dit_path))
    vae_path = _tiny_vae(folder)

    context = torch.zeros(1, TEXT_LEN, TINY_TEXT_DIM)
    context[:, :TINY_TEXT_TOKENS] = torch.randn(1, TINY_TEXT_TOKENS, TINY_TEXT_DIM, generator=generator)
    context_path = folder / "context_tiny.safetensors"
    save_file({"context": context}, str(context_path))
    (folder / "README.txt").write_text("Tiny random LiveTalk weights for the smoke test. They make noise, not faces.\n")
    return TinyWeights(dit=dit_path, vae=vae_path, wav2vec2=w2v_dir, context=context_path)


TINY_S2V_INJECT_LAYERS = (0, 1)
TINY_S2V_HEADS = 4  # torchrun --smoke: 1, 2 or 4 ranks (sequence parallel splits the heads)


def build_tiny_realvideo_weights(folder: str | Path, seed: int = 0) -> TinyWeights:
    """Write a tiny S2V DiT (4 heads, so 2 or 4 ranks can split it; its audio front end takes the tiny
    wav2vec2's 3 hidden states), the ``config.json`` naming its injector layers, a VAE, the wav2vec2
    and idle / talking text contexts into ``folder``. Seeded: identical on every rank of a group."""
    import json

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    w2v_dir = _tiny_wav2vec2(folder)
    core = WanCoreConfig(dim=TINY_S2V_HEADS * HEAD_DIM, in_dim=16, out_dim=16, ffn_dim=64, num_layers=2,
                         text_dim=TINY_TEXT_DIM)
    dit = S2VDiT(S2VConfig(core=core, audio_dim=TINY_WAV2VEC_HIDDEN, audio_layers=TINY_WAV2VEC_LAYERS + 1,
                           audio_tokens=4, inject_layers=TINY_S2V_INJECT_LAYERS, cond_dim=16))
    with torch.no_grad():
        for name, p in dit.named_parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1 + (1.0 if "norm" in name else 0.0))
    dit_path = folder / "s2v_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in dit.state_dict().items()}, str(dit_path))
    (folder / "config.json").write_text(json.dumps({"audio_inject_layers": list(TINY_S2V_INJECT_LAYERS)}))
    vae_path = _tiny_vae(folder)
    idle, talking = torch.randn(2, 1, TINY_TEXT_TOKENS, TINY_TEXT_DIM, generator=generator)
    context_path = folder / "context_tiny.safetensors"
    save_file({"context": talking.contiguous(), "idle": idle.contiguous()}, str(context_path))
    return TinyWeights(dit=dit_path, vae=vae_path, wav2vec2=w2v_dir, context=context_path)


def load_context(path: str | Path) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(str(path))["context"]
