"""Decoding latent blocks while they are being sampled.

:func:`decode_blocks` serves both model paths: it takes the sampler's generator, decodes each block
as it arrives (on a second CUDA stream, so the decode of block k overlaps the sampling of block
k+1) and hands out host uint8 frames, block 0 one latent frame at a time for a short first-frame
latency.

When the decode shares the DiT's GPU, the DiT samples on a high-priority stream: the decode's
kernels then take the SMs the DiT leaves idle (short GEMMs' last wave, waits on a sequence-parallel
exchange) instead of delaying the DiT, which under sequence parallelism every other rank waits for.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..media.vae import StreamDecoder, WanVAE, frames_to_uint8

SAMPLING_STREAM_PRIORITY = -1
"""CUDA priority of the DiT's stream while a decode overlaps it (lower is more urgent; the decode's
side stream has the default, 0, the lowest)."""


def decode_blocks(
    vae: WanVAE,
    blocks: Iterator[torch.Tensor],
    num_video_frames: int | None = None,
    overlap: bool = True,
    first_latent_frame: torch.Tensor | None = None,
) -> Iterator[torch.Tensor]:
    """Stream-decode latent blocks ``[1, 16, F, h, w]`` to uint8 frames ``[T, H, W, 3]`` (host
    memory), stopping at ``num_video_frames``.

    On a GPU with ``overlap``, block k is decoded on a second CUDA stream while the DiT samples
    block k+1, and its frames come out once the next block has been launched. Block 0 is
    decoded and handed out one latent frame at a time (1, then 4 and 4 video frames), so its
    first frames wait for one latent frame's decode, not three. The decoder is causal, so the
    split gives the same frames.

    ``first_latent_frame`` ``[1, 16, 1, h, w]``: block 0's latent frame 0 when it is known before
    sampling (LiveTalk's reference latent, in the sampler's dtype). It is decoded and handed out
    before the first block is asked for, and block 0's own copy is skipped: the same frames,
    the first one without waiting for the DiT.
    """
    decoder = vae.stream_decoder()
    side = torch.cuda.Stream(vae.device) if overlap and vae.device.type == "cuda" else None
    shares_gpu = side is not None and vae.device.index == torch.cuda.current_device()
    sampling = torch.cuda.Stream(vae.device, priority=SAMPLING_STREAM_PRIORITY) if shares_gpu else None
    emitted, pending = 0, None

    def finished(decoded: tuple[torch.Tensor, torch.cuda.Event | None]) -> torch.Tensor:
        frames, ready = decoded
        if ready is not None:
            ready.synchronize()
        return frames if num_video_frames is None else frames[: max(0, num_video_frames - emitted)]

    try:
        if first_latent_frame is not None:
            frames = finished(_decode_block(vae, decoder, first_latent_frame, None))
            emitted += frames.shape[0]
            yield frames
        for index, block in enumerate(_sampled_on(sampling, blocks)):
            if index == 0:  # one latent frame at a time: the first frames out wait for one frame's decode
                pieces = block.split(1, dim=2)[1 if first_latent_frame is not None else 0 :]
            else:
                pieces = (block,)
            for piece in pieces:
                decoded = _decode_block(vae, decoder, piece, side)
                if side is not None and index > 0:  # hand out the previous block; this one overlaps the next
                    decoded, pending = pending, decoded
                    if decoded is None:
                        continue
                frames = finished(decoded)
                emitted += frames.shape[0]
                if frames.shape[0]:
                    yield frames
                if num_video_frames is not None and emitted >= num_video_frames:
                    return
        if pending is not None and (frames := finished(pending)).shape[0]:
            yield frames
    finally:
        close = getattr(blocks, "close", None)
        if close is not None:
            close()  # frees the sampler's KV cache when decoding stops early


def _sampled_on(stream: torch.cuda.Stream | None, blocks: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
    """``blocks``, each sampled with ``stream`` as the current stream (None: as they come). The
    caller's stream waits for every block, so what it queues afterwards (the side stream's decode
    included, through ``wait_stream``) is ordered after the sampling."""
    if stream is None:
        yield from blocks
        return
    caller, iterator = torch.cuda.current_stream(stream.device), iter(blocks)
    while True:
        stream.wait_stream(caller)  # inputs queued on the caller's stream come first
        with torch.cuda.stream(stream):
            block = next(iterator, None)
        caller.wait_stream(stream)
        if block is None:
            return
        yield block


def _decode_block(
    vae: WanVAE, decoder: StreamDecoder, block: torch.Tensor, side: torch.cuda.Stream | None
) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """Decode one block to host uint8 frames; on ``side`` the work is queued and an event returned."""
    if side is None:
        return frames_to_uint8(decoder.decode(block.to(vae.device, vae.dtype))).cpu(), None
    if block.device != vae.device:  # VAE on its own GPU: the copy queues behind the DiT's work
        block = block.to(vae.device, non_blocking=True)
    side.wait_stream(torch.cuda.current_stream(vae.device))
    with torch.cuda.stream(side):
        frames = frames_to_uint8(decoder.decode(block.to(vae.device, vae.dtype)))
        host = torch.empty(frames.shape, dtype=frames.dtype, pin_memory=True)
        host.copy_(frames, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record(side)
    block.record_stream(side)
    return host, ready
