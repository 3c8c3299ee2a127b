"""Reference-image preprocessing: upstream's scale-to-cover, centre-crop rule.

LiveTalk (OmniAvatar's ``resize_pad``): scale by ``r = max(th/h, tw/w)`` so the image covers the
target, resize to ``(int(h*r), int(w*r))`` with antialiased bilinear interpolation on a float
tensor (what torchvision's ``Resize`` does), then pad by ``target - size`` split ``p//2`` before and
the rest after. The pads are <= 0, so this is a centre crop (an odd excess pixel is cropped at the
top/left). Float error in ``int(h*r)`` can leave a 1-px black border exactly as upstream does.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError
from .exif import apply_orientation, read_orientation

log = logging.getLogger(__name__)

TRAINED_SIZE = (512, 512)
SIZE_MULTIPLE = 16
MIN_SIDE = 64
# Sources more than this many times larger than the target are box-averaged first (leaving a 2x
# resize), a band of rows at a time, so an 8K photo never exists as a float image. Up to this
# factor (e.g. upstream's 2048px example for 512px) the result is upstream's exactly.
PRE_REDUCE_ABOVE = 8
_PRE_REDUCE_BAND_ROWS = 256


def to_float_image(image: torch.Tensor | np.ndarray) -> torch.Tensor:
    """An RGB image as float32 ``[H, W, 3]`` in [0, 1].

    Accepts uint8 or float ``[H, W, C]`` / ``[B, H, W, C]`` (first image used) with C = 1 (grey),
    3 (RGB) or 4 (RGBA: alpha dropped, as PIL's ``convert("RGB")`` does).
    """
    image = torch.as_tensor(image)
    if image.ndim == 4:
        if image.shape[0] > 1:
            log.warning("got a batch of %d images; using the first as the reference", image.shape[0])
        image = image[0]
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise InputError(f"Expected an RGB image [H, W, 3]; got a tensor of shape {tuple(image.shape)}.")
    if image.shape[-1] == 1:
        image = image.expand(-1, -1, 3)
    image = image[..., :3]
    if image.dtype == torch.uint8:
        return image.to(torch.float32) / 255.0
    if not image.is_floating_point():
        raise InputError(f"Unsupported image dtype {image.dtype}: use uint8 or float in [0, 1].")
    return image.to(torch.float32)


def check_target_size(height: int, width: int) -> None:
    if height % SIZE_MULTIPLE or width % SIZE_MULTIPLE or min(height, width) < MIN_SIDE:
        raise InputError(
            f"Output size {width}x{height} is not usable: both sides must be multiples of {SIZE_MULTIPLE} "
            f"and at least {MIN_SIDE}. LiveTalk was trained at 512x512."
        )
    if (height, width) != TRAINED_SIZE:
        log.info("LiveTalk was trained at 512x512; %dx%d works but may look worse", width, height)


def box_reduce(image: torch.Tensor, factor: int) -> torch.Tensor:
    """Average ``factor x factor`` pixel boxes of ``[H, W, C]`` (uint8 or float) -> float32 in [0, 1].

    Works on bands of rows so memory stays near the size of the result.
    """
    h, w = (image.shape[0] // factor) * factor, (image.shape[1] // factor) * factor
    scale = 255.0 if image.dtype == torch.uint8 else 1.0
    band = max(1, _PRE_REDUCE_BAND_ROWS // factor) * factor
    out = torch.empty(h // factor, w // factor, image.shape[2], dtype=torch.float32)
    for top in range(0, h, band):
        chunk = image[top : min(h, top + band), :w].to(torch.float32).div_(scale)
        pooled = F.avg_pool2d(chunk.permute(2, 0, 1).unsqueeze(0), factor).squeeze(0).permute(1, 2, 0)
        out[top // factor : top // factor + pooled.shape[0]] = pooled
    return out


def cover_and_crop(image: torch.Tensor | np.ndarray, height: int = 512, width: int = 512) -> torch.Tensor:
    """Reference image -> model input ``[1, 3, 1, height, width]`` float32 in [-1, 1]."""
    check_target_size(height, width)
    image = torch.as_tensor(image)
    if image.ndim >= 3 and image.shape[-1] in (1, 3, 4):
        h, w = image.shape[-3:-1]
        ratio = min(h / height, w / width)
        if ratio > PRE_REDUCE_ABOVE:  # keep at least a 2x antialiased resize after the box average
            factor = int(ratio // 2)
            image = box_reduce(image[0] if image.ndim == 4 else image, factor)
    pixels = to_float_image(image)
    h, w = pixels.shape[:2]
    if min(h, w) < MIN_SIDE:
        raise InputError(f"The reference image is {w}x{h} pixels; it must be at least {MIN_SIDE} pixels on each side.")
    ratio = max(height / h, width / w)
    sh, sw = int(h * ratio), int(w * ratio)
    x = pixels.permute(2, 0, 1).unsqueeze(0)
    x = F.interpolate(x, size=(sh, sw), mode="bilinear", align_corners=False, antialias=True)
    pad_h, pad_w = height - sh, width - sw
    x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), mode="constant", value=0.0)
    return (x * 2.0 - 1.0).unsqueeze(2)


def load_image(path: str) -> torch.Tensor:
    """Read an image file (JPEG, PNG, WebP, BMP, ...) as uint8 RGB ``[H, W, 3]`` through PyAV/FFmpeg.

    Grey, palette and RGBA images are converted to RGB (alpha dropped), as PIL's ``convert("RGB")``.
    The EXIF orientation is applied (a phone portrait comes out upright), as ComfyUI's LoadImage does.
    """
    import os

    import av

    if not os.path.isfile(path):
        raise InputError(f"The image file {path} does not exist.")
    try:
        with av.open(path) as container:
            frame = next(container.decode(video=0))
            pixels = torch.from_numpy(frame.to_ndarray(format="rgb24"))
    except (av.error.FFmpegError, StopIteration, ValueError, IndexError) as exc:
        raise InputError(f"{path} could not be read as an image ({exc}). Use a JPEG or PNG file.") from None
    return apply_orientation(pixels, read_orientation(path))
