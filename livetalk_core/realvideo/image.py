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

from ..errors import InputError
from ..media.image import to_float_image

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


def _fixed_point_taps(in_size: int, out_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pillow's ``precompute_coeffs`` + ``normalize_coeffs_8bpc``: per output pixel the first input
    pixel ``[out]`` (int64) and the 22-bit fixed-point taps ``[out, ksize]`` (int32, zero past the
    window)."""
    scale = in_size / out_size
    filter_scale = max(scale, 1.0)
    support = _BICUBIC_SUPPORT * filter_scale
    ksize = int(math.ceil(support)) * 2 + 1
    center = (np.arange(out_size) + 0.5) * scale
    # C's (int) cast truncates towards zero
    first = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    last = np.minimum(np.trunc(center + support + 0.5), in_size).astype(np.int64)
    offsets = np.arange(ksize)
    inside = offsets[None, :] < (last - first)[:, None]
    x = ((first[:, None] + offsets[None, :]) - center[:, None] + 0.5) * (1.0 / filter_scale)
    weights = np.where(inside, _bicubic(x), 0.0)
    # cumsum adds left to right, as Pillow sums (a pairwise sum rounds differently)
    total = np.cumsum(weights, axis=1)[:, -1:]
    weights = np.where(total != 0.0, weights / np.where(total != 0.0, total, 1.0), weights)
    # C's (int) cast after adding +-0.5: round half away from zero.
    fixed = np.trunc(weights * (1 << _PRECISION_BITS) + np.where(weights < 0, -0.5, 0.5))
    return torch.from_numpy(first), torch.from_numpy(np.where(inside, fixed, 0).astype(np.int32))


def _resample_axis(pixels: torch.Tensor, out_size: int, axis: int) -> torch.Tensor:
    """One separable pass over ``axis`` of a uint8 ``[H, W, C]`` tensor (any device), rounded and
    clipped to uint8. Integer arithmetic, so a GPU gives the same pixels as the CPU."""
    in_size = pixels.shape[axis]
    firsts, taps = (t.to(pixels.device) for t in _fixed_point_taps(in_size, out_size))
    source = pixels.to(torch.int32)
    shape = [1, 1, 1]
    shape[axis] = out_size
    # int32 like Pillow's accumulator: 255 * 2^22 per tap leaves room for the filter's lobes.
    acc = torch.full([out_size if d == axis else n for d, n in enumerate(source.shape)], 1 << (_PRECISION_BITS - 1),
                     dtype=torch.int32, device=pixels.device)
    for k in range(taps.shape[1]):
        # Taps past a window are zero, so clamping their index to the image is harmless.
        acc += source.index_select(axis, (firsts + k).clamp(max=in_size - 1)) * taps[:, k].view(shape)
    return (acc >> _PRECISION_BITS).clamp(0, 255).to(torch.uint8)


def pil_bicubic_resize(pixels: torch.Tensor | np.ndarray, height: int, width: int) -> torch.Tensor | np.ndarray:
    """Pillow's ``Image.resize((width, height), Image.BICUBIC)`` on a uint8 ``[H, W, C]`` array or
    tensor (on any device); returns the same kind."""
    if pixels.dtype not in (np.uint8, torch.uint8) or pixels.ndim != 3:
        raise InputError(f"Expected a uint8 image [H, W, C]; got {pixels.dtype} {tuple(pixels.shape)}.")
    out = torch.as_tensor(pixels)
    in_h, in_w = out.shape[:2]
    passes = [(in_w, width, 1), (in_h, height, 0)]
    # Pillow >= 13 (python-pillow/Pillow#9549) shrinks the height first when it loses more than twice
    # as many pixels as the width; the order changes the rounding of the uint8 intermediate.
    if height < in_h and in_h - height > 2 * (in_w - width):
        passes.reverse()
    for in_size, out_size, axis in passes:
        if out_size != in_size:
            out = _resample_axis(out, out_size, axis)
    return out.numpy() if isinstance(pixels, np.ndarray) else out


def center_crop(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """torchvision's ``CenterCrop`` on ``[H, W, C]``: zero-pad a side that is too short (extra pixel
    after), then crop with the offset ``round((size - crop) / 2)`` (Python rounding)."""
    h, w = pixels.shape[:2]
    pad_h, pad_w = max(height - h, 0), max(width - w, 0)
    if pad_h or pad_w:
        pixels = torch.nn.functional.pad(pixels, (0, 0, pad_w // 2, (pad_w + 1) // 2, pad_h // 2, (pad_h + 1) // 2))
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
    image: torch.Tensor | np.ndarray, area: int = DEFAULT_AREA, device: torch.device | str | None = None
) -> tuple[torch.Tensor, ImagePlan]:
    """Reference image -> model input ``[1, 3, H, W]`` float32 in [-1, 1] on ``device`` (default: the
    CPU), and the sizes used. The resize runs there too (on a GPU it takes a millisecond, not 100+).

    ``image``: ``[H, W, 3]`` (or ``[B, H, W, 3]``, first image) uint8, or float in [0, 1].
    """
    pixels = torch.from_numpy(to_uint8_image(image)).to(device)
    plan = plan_image(pixels.shape[1], pixels.shape[0], area)
    cropped = center_crop(pil_bicubic_resize(pixels, *plan.resize_hw), *plan.target_hw)
    x = cropped.permute(2, 0, 1).unsqueeze(0).float() / 255.0
    return x * 2.0 - 1.0, plan
