"""Reference-image preprocessing for RealVideo (upstream ``core/lip_sync.py`` ``read_image``).

The output size is not fixed: the image is scaled to an area of about 512x512, its aspect ratio is
snapped to 16:9, 4:3 or 1:1 (either orientation), and the sides are rounded to multiples of 64
(ties up). The image is then resized with **PIL's bicubic filter** so that it covers the target
along the snapped side, and centre-cropped (zero-padded, i.e. black, where the resize is smaller:
16:9 inputs lose ~10 px per side to padding, as upstream).

PIL is not a dependency of this pack, so :func:`pil_bicubic_resize` re-implements Pillow's
``Image.resize(..., BICUBIC)`` for 8-bit images bit for bit: the same separable filter (a = -0.5,
support widened by the downscale factor), the same 22-bit fixed-point coefficients, horizontal pass
first with the intermediate rounded to uint8, then the vertical pass, except where Pillow 13 runs the
vertical pass first (see :func:`pil_bicubic_resize`). Older Pillow versions always go horizontal
first, so for those inputs they differ from Pillow 13 by a level in some pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .errors import InputError
from .image import to_float_image

DEFAULT_AREA = 512 * 512
SIDE_MULTIPLE = 64
ASPECT_RATIOS = (16 / 9, 4 / 3, 1.0)
# Pillow's fixed point: 32 bits minus 8 for the pixel and 2 for the filter's negative lobes.
_PRECISION_BITS = 32 - 8 - 2
_BICUBIC_SUPPORT = 2.0


@dataclass(frozen=True)
class ImagePlan:
    """Sizes chosen for one input image (all in pixels)."""

    resize_hw: tuple[int, int]
    target_hw: tuple[int, int]

    @property
    def split_axis(self) -> str:
        """The latent axis a sequence-parallel run splits (upstream's ``sp_dim``): the longer side."""
        return "h" if self.target_hw[0] < self.target_hw[1] else "w"


def nearest_multiple(n: float, multiple: int = SIDE_MULTIPLE) -> int:
    """The multiple of ``multiple`` nearest to ``n``; a tie goes up (upstream's strict ``<``)."""
    lower = (n // multiple) * multiple
    upper = lower + multiple
    return int(lower if abs(n - lower) < abs(n - upper) else upper)


def closest_aspect_ratio(ratio: float) -> float:
    """Long side / short side snapped to the nearest of 16:9, 4:3, 1:1 (first wins a tie)."""
    return min(ASPECT_RATIOS, key=lambda r: abs(ratio - r))


def plan_image(width: int, height: int, area: int = DEFAULT_AREA) -> ImagePlan:
    """Upstream's size rule for a ``width`` x ``height`` image.

    The aspect ratio used for the resize is that of the *rounded, area-normalised* size (so
    1920x1080 resizes to 683x384, not 682x384), exactly as upstream computes it.
    """
    if width < 1 or height < 1:
        raise InputError(f"The reference image is {width}x{height} pixels; it must not be empty.")
    scale = math.sqrt(area / (width * height))
    w, h = round(width * scale), round(height * scale)
    if min(w, h) == 0:
        raise _too_elongated(width, height)
    if h < w:
        ratio = closest_aspect_ratio(w / h)
        target_h = nearest_multiple(h)
        target_w = nearest_multiple(target_h * ratio)
        if w / h > ratio:
            resize = (target_h, int(w / h * target_h))
        else:
            resize = (int(h / w * target_w), target_w)
    else:
        ratio = closest_aspect_ratio(h / w)
        target_w = nearest_multiple(w)
        target_h = nearest_multiple(target_w * ratio)
        if h / w > ratio:
            resize = (int(h / w * target_w), target_w)
        else:
            resize = (target_h, int(w / h * target_h))
    if min(target_h, target_w) < SIDE_MULTIPLE or min(resize) < 1:
        raise _too_elongated(width, height)
    return ImagePlan(resize_hw=resize, target_hw=(target_h, target_w))


def _too_elongated(width: int, height: int) -> InputError:
    return InputError(
        f"The reference image is {width}x{height} pixels, too elongated for RealVideo's sizes (16:9, 4:3 or 1:1, "
        f"sides multiples of {SIDE_MULTIPLE}). Crop it closer to one of those shapes first."
    )


def _bicubic(x: np.ndarray) -> np.ndarray:
    a = -0.5
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _fixed_point_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's ``precompute_coeffs`` + ``normalize_coeffs_8bpc``: per output pixel the first input
    pixel ``[out]`` and the 22-bit fixed-point taps ``[out, ksize]`` (zero past the window)."""
    scale = in_size / out_size
    filter_scale = max(scale, 1.0)
    support = _BICUBIC_SUPPORT * filter_scale
    ksize = int(math.ceil(support)) * 2 + 1
    firsts = np.zeros(out_size, dtype=np.int64)
    taps = np.zeros((out_size, ksize), dtype=np.int32)
    for out in range(out_size):
        center = (out + 0.5) * scale
        first = max(int(center - support + 0.5), 0)
        last = min(int(center + support + 0.5), in_size)
        weights = _bicubic((np.arange(first, last) - center + 0.5) * (1.0 / filter_scale))
        total = 0.0
        for w in weights.tolist():  # sequential, as Pillow sums (numpy's pairwise sum rounds differently)
            total += w
        if total != 0.0:
            weights = weights / total
        # C's (int) cast truncates towards zero after adding +-0.5: round half away from zero.
        fixed = np.trunc(weights * (1 << _PRECISION_BITS) + np.where(weights < 0, -0.5, 0.5))
        firsts[out] = first
        taps[out, : last - first] = fixed.astype(np.int32)
    return firsts, taps


def _resample_axis(pixels: np.ndarray, in_size: int, out_size: int, axis: int) -> np.ndarray:
    """One separable pass over ``axis`` of a uint8 ``[H, W, C]`` array, rounded and clipped to uint8."""
    firsts, taps = _fixed_point_taps(in_size, out_size)
    # int32 like Pillow's accumulator: 255 * 2^22 per tap leaves room for the filter's lobes.
    source = np.moveaxis(pixels, axis, 0).astype(np.int32)
    acc = np.full((out_size, *source.shape[1:]), 1 << (_PRECISION_BITS - 1), dtype=np.int32)
    extra = (slice(None),) + (None,) * (source.ndim - 1)
    for k in range(taps.shape[1]):
        # Taps past a window are zero, so clamping their index to the image is harmless.
        acc += source[np.minimum(firsts + k, in_size - 1)] * taps[:, k][extra]
    out = np.clip(acc >> _PRECISION_BITS, 0, 255).astype(np.uint8)
    return np.moveaxis(out, 0, axis)


def pil_bicubic_resize(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pillow's ``Image.resize((width, height), Image.BICUBIC)`` on a uint8 ``[H, W, C]`` array."""
    if pixels.dtype != np.uint8 or pixels.ndim != 3:
        raise InputError(f"Expected a uint8 image [H, W, C]; got {pixels.dtype} {pixels.shape}.")
    in_h, in_w = pixels.shape[:2]
    passes = [(in_w, width, 1), (in_h, height, 0)]
    # Pillow >= 13 (python-pillow/Pillow#9549) shrinks the height first when it loses more than twice
    # as many pixels as the width; the order changes the rounding of the uint8 intermediate.
    if height < in_h and in_h - height > 2 * (in_w - width):
        passes.reverse()
    out = pixels
    for in_size, out_size, axis in passes:
        if out_size != in_size:
            out = _resample_axis(out, in_size, out_size, axis)
    return out


def center_crop(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """torchvision's ``CenterCrop``: zero-pad a side that is too short (extra pixel after), then crop
    with the offset ``round((size - crop) / 2)`` (Python rounding)."""
    h, w = pixels.shape[:2]
    pad_h, pad_w = max(height - h, 0), max(width - w, 0)
    if pad_h or pad_w:
        pixels = np.pad(pixels, ((pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2), (0, 0)))
        h, w = pixels.shape[:2]
    top, left = int(round((h - height) / 2.0)), int(round((w - width) / 2.0))
    return pixels[top : top + height, left : left + width]


def to_uint8_image(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """An RGB image (uint8, or float in [0, 1] as ComfyUI passes it) as a uint8 ``[H, W, 3]`` array."""
    tensor = torch.as_tensor(image)
    if tensor.dtype == torch.uint8 and tensor.ndim == 3 and tensor.shape[-1] == 3:
        return tensor.numpy()
    pixels = to_float_image(tensor)
    # ComfyUI loads 8-bit files as uint8 / 255, so rounding recovers the file's values exactly.
    return (pixels * 255).round().clamp(0, 255).to(torch.uint8).numpy()


def preprocess_reference(
    image: torch.Tensor | np.ndarray, area: int = DEFAULT_AREA
) -> tuple[torch.Tensor, ImagePlan]:
    """Reference image -> model input ``[1, 3, H, W]`` float32 in [-1, 1], and the sizes used.

    ``image``: ``[H, W, 3]`` (or ``[B, H, W, 3]``, first image) uint8, or float in [0, 1].
    """
    pixels = to_uint8_image(image)
    plan = plan_image(pixels.shape[1], pixels.shape[0], area)
    resized = pil_bicubic_resize(pixels, *plan.resize_hw)
    cropped = center_crop(resized, *plan.target_hw)
    x = torch.from_numpy(np.ascontiguousarray(cropped)).permute(2, 0, 1).unsqueeze(0).float() / 255.0
    return x * 2.0 - 1.0, plan
