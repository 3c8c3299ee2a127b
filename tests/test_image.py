"""Reference images of every kind: formats, modes, sizes, batches."""

from pathlib import Path

import av
import numpy as np
import pytest
import torch
from fresh_process import last_printed_int

from livetalk_core.errors import InputError
from livetalk_core.media.image import cover_and_crop, load_image


def write_image(path: Path, pixels: np.ndarray, pix_fmt: str) -> None:
    """Encode ``pixels`` (RGB/RGBA/grey uint8) into an image file with FFmpeg via PyAV."""
    fmt = {1: "gray", 3: "rgb24", 4: "rgba"}[pixels.shape[2]]
    codec = {".png": "png", ".jpg": "mjpeg", ".bmp": "bmp", ".webp": "libwebp"}[path.suffix]
    with av.open(str(path), "w", format="image2") as out:
        stream = out.add_stream(codec, rate=1)
        stream.width, stream.height, stream.pix_fmt = pixels.shape[1], pixels.shape[0], pix_fmt
        frame = av.VideoFrame.from_ndarray(pixels[..., 0] if fmt == "gray" else pixels, format=fmt)
        for packet in stream.encode(frame.reformat(format=pix_fmt)):
            out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


@pytest.mark.parametrize(
    "name, channels, pix_fmt",
    [("rgb.png", 3, "rgb24"), ("rgba.png", 4, "rgba"), ("grey.png", 1, "gray"),
     ("photo.jpg", 3, "yuvj444p"), ("bitmap.bmp", 3, "bgr24")],
)
def test_image_modes_load_as_rgb(tmp_path, name, channels, pix_fmt):
    rng = np.random.default_rng(0)
    shape = (90, 120, channels) if channels > 1 else (90, 120)
    pixels = rng.integers(0, 256, shape, dtype=np.uint8)
    path = tmp_path / name
    write_image(path, pixels[..., None] if pixels.ndim == 2 else pixels, pix_fmt)
    image = load_image(str(path))
    assert image.shape == (90, 120, 3) and image.dtype == torch.uint8
    if name in ("rgb.png", "rgba.png"):
        assert torch.equal(image, torch.from_numpy(pixels[..., :3]))
    model_input = cover_and_crop(image, 64, 64)
    assert model_input.shape == (1, 3, 1, 64, 64) and model_input.min() >= -1 and model_input.max() <= 1


def test_not_an_image_and_missing_file(tmp_path):
    bad = tmp_path / "face.png"
    bad.write_text("hello")
    with pytest.raises(InputError, match="face.png"):
        load_image(str(bad))
    with pytest.raises(InputError, match="does not exist"):
        load_image(str(tmp_path / "nope.jpg"))


def test_too_small_and_bad_sizes():
    with pytest.raises(InputError, match="at least 64"):
        cover_and_crop(torch.zeros(40, 500, 3, dtype=torch.uint8))
    with pytest.raises(InputError, match="multiples of 16"):
        cover_and_crop(torch.zeros(100, 100, 3, dtype=torch.uint8), 500, 512)


@pytest.mark.parametrize("shape", [(300, 1200), (1200, 300), (513, 511)])
def test_any_aspect_ratio_is_cropped_to_the_target(shape):
    out = cover_and_crop(torch.randint(0, 256, (*shape, 3), dtype=torch.uint8), 256, 256)
    assert out.shape == (1, 3, 1, 256, 256)


def test_batch_uses_the_first_image(caplog):
    batch = torch.rand(3, 128, 128, 3)
    batch[1:] = 0
    with caplog.at_level("WARNING"):
        out = cover_and_crop(batch, 64, 64)
    assert "first" in caplog.text
    torch.testing.assert_close(out, cover_and_crop(batch[0], 64, 64))


def test_upstream_sized_inputs_are_not_pre_reduced():
    """A 2048 px source for 512 px (upstream's example) takes the exact path."""
    import livetalk_core.media.image as image_module

    src = torch.randint(0, 256, (2048, 2048, 3), dtype=torch.uint8)
    exact = cover_and_crop(src, 512, 512)
    old = image_module.PRE_REDUCE_ABOVE
    try:
        image_module.PRE_REDUCE_ABOVE = 10**9
        assert torch.equal(exact, cover_and_crop(src, 512, 512))
    finally:
        image_module.PRE_REDUCE_ABOVE = old


def test_8k_image_without_a_memory_spike():
    code = (
        "import resource, torch\n"
        "from livetalk_core.media.image import cover_and_crop\n"
        "img = torch.randint(0, 256, (4320, 7680, 3), dtype=torch.uint8)\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "out = cover_and_crop(img, 512, 512)\n"
        "assert out.shape == (1, 3, 1, 512, 512)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)\n"
    )
    growth_kib = last_printed_int(code, timeout=120)
    # the uint8 source is 100 MB; a float32 copy would add 400 MB
    assert growth_kib < 150_000, f"resizing grew the process by {growth_kib / 1000:.0f} MB"
