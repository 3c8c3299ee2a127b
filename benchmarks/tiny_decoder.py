"""``--decoder tiny`` for the benchmarks: the tiny decoder (TAEHV, livetalk_core.media.taehv) at the
released size (taew2_1's widths) with seeded random weights, in place of the full VAE's decode."""

from __future__ import annotations

from argparse import Namespace

import torch
from timing import random_init_

from livetalk_core.media.taehv import DECODERS, TinyDecoder, TinyDecoderConfig

__all__ = ["DECODERS", "decoder_for", "random_tiny_decoder"]
DRY_RUN = TinyDecoderConfig(stem_width=16, stage_widths=(16, 16, 16), stage_outputs=(16, 16, 16))
"""Its widths under ``bench.py --tiny`` (a CPU run that checks the script, not the speed)."""


def random_tiny_decoder(device: torch.device, dtype: torch.dtype, config: TinyDecoderConfig = TinyDecoderConfig(),
                        seed: int = 7) -> TinyDecoder:
    decoder = TinyDecoder(config).to(device)
    random_init_(decoder, seed)
    return decoder.to(dtype).eval().requires_grad_(False)


def decoder_for(options: Namespace, vae):
    """What decodes the frames: ``vae`` (``--decoder full``, and None where there is no VAE, e.g. on
    other ranks), or a random tiny decoder on the VAE's device and in its dtype: full size, small
    under ``--tiny``."""
    if vae is None or getattr(options, "decoder", "full") == "full":
        return vae
    return random_tiny_decoder(vae.device, vae.dtype, DRY_RUN if options.tiny else TinyDecoderConfig())
