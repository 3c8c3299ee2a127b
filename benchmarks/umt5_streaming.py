"""The umT5-XXL encoder whole on the GPU against its layers streamed from CPU memory (what a GPU without
room for its 11 GB gets, livetalk_core/media/text_encoder.py): the same context, and what it costs.

    python3 benchmarks/umt5_streaming.py          # full size, random weights, one GPU (~1 min)

Prints, for both placements: the encode time of one prompt (the encoder already loaded), the peak GPU
memory of the encode, and whether the two contexts are bit-identical (the same kernels on the same values).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memory_cap import PROMPT_TOKENS, UMT5_XXL, random_text_encoder  # noqa: E402

from livetalk_core.media.text_encoder import encode_text  # noqa: E402

GIB = 2**30


def timed_encode(encoder, ids: torch.Tensor, mask: torch.Tensor,
                 device: torch.device) -> tuple[torch.Tensor, float, float]:
    """The context, the encode's wall seconds and its peak GPU memory above what was allocated before (GiB)."""
    encode_text(encoder, ids, mask)  # warm-up: cuBLAS handles, kernels
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    context = encode_text(encoder, ids, mask)
    torch.cuda.synchronize(device)
    return context, time.perf_counter() - start, (torch.cuda.max_memory_allocated(device) - base) / GIB


@torch.no_grad()
def main() -> None:
    device = torch.device("cuda", 0)
    ids = torch.randint(1, UMT5_XXL.vocab_size, (1, 512), generator=torch.Generator().manual_seed(0))
    mask = (torch.arange(512) < PROMPT_TOKENS).long()[None]
    streamed = random_text_encoder(UMT5_XXL, torch.device("cpu"), torch.bfloat16)  # the same seeded values
    streamed.stream_to = device
    got, streamed_s, streamed_gib = timed_encode(streamed, ids, mask, device)
    whole = streamed.to(device)
    whole.stream_to = None
    expected, whole_s, whole_gib = timed_encode(whole, ids, mask, device)
    print(f"GPU: {torch.cuda.get_device_name(device)}  torch {torch.__version__}")
    print("| placement | encode s | peak GiB of the encode (above the resident weights) |")
    print("|---|---|---|")
    print(f"| whole on the GPU | {whole_s:.3f} | {whole_gib:.2f} |")
    print(f"| layers streamed from CPU memory | {streamed_s:.3f} | {streamed_gib:.2f} |")
    print("contexts bit-identical:", torch.equal(got, expected),
          f"(max |difference| {(got.float() - expected.float()).abs().max().item():.3g})")


if __name__ == "__main__":
    main()
