"""EXIF orientation: an image file read by the CLIs (livetalk_core.media.image.load_image, used by both
families) comes out the way it is meant to be viewed, as ComfyUI's LoadImage shows it."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from livetalk_core.media.exif import read_orientation
from livetalk_core.media.image import load_image

STORED_H, STORED_W = 48, 80  # a landscape image as the sensor stored it
MARK = 32  # side of the white square in the stored image's top-left corner


def stored_pixels() -> np.ndarray:
    """Black, with a white square in the top-left corner and a grey band along the bottom."""
    image = np.zeros((STORED_H, STORED_W, 3), np.uint8)
    image[:MARK, :MARK] = 255
    image[-8:, :] = 128
    return image


def jpeg_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mjpeg") as container:
        stream = container.add_stream("mjpeg", rate=1)
        stream.width, stream.height, stream.pix_fmt = image.shape[1], image.shape[0], "yuvj444p"
        for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return buffer.getvalue()


def exif_tiff(orientation: int, byte_order: str) -> bytes:
    """A TIFF block whose IFD0 holds one entry, Orientation (SHORT)."""
    fmt = "<" if byte_order == "II" else ">"
    header = byte_order.encode() + struct.pack(fmt + "HI", 42, 8)
    entry = struct.pack(fmt + "HHIHH", 0x0112, 3, 1, orientation, 0)
    return header + struct.pack(fmt + "H", 1) + entry + struct.pack(fmt + "I", 0)


def jpeg_with_orientation(path: Path, orientation: int, byte_order: str = "II") -> Path:
    """A JPEG as a phone writes it: an APP1 Exif segment right after the start-of-image marker."""
    data = jpeg_bytes(stored_pixels())
    payload = b"Exif\x00\x00" + exif_tiff(orientation, byte_order)
    app1 = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    path.write_bytes(data[:2] + app1 + data[2:])
    return path


def corner_means(image: torch.Tensor) -> dict[str, float]:
    """Mean brightness of the four corners (MARK/2 squares): where the white square ended up."""
    h = MARK // 2
    corners = {"top-left": image[:h, :h], "top-right": image[:h, -h:],
               "bottom-left": image[-h:, :h], "bottom-right": image[-h:, -h:]}
    return {name: float(part.float().mean()) for name, part in corners.items()}


# Orientation -> (shape as viewed, where the stored top-left corner is seen), per the EXIF standard.
VIEWED = {
    1: ((STORED_H, STORED_W), "top-left"),
    2: ((STORED_H, STORED_W), "top-right"),
    3: ((STORED_H, STORED_W), "bottom-right"),
    4: ((STORED_H, STORED_W), "bottom-left"),
    5: ((STORED_W, STORED_H), "top-left"),
    6: ((STORED_W, STORED_H), "top-right"),
    7: ((STORED_W, STORED_H), "bottom-right"),
    8: ((STORED_W, STORED_H), "bottom-left"),
}


@pytest.mark.parametrize("orientation", [3, 6, 8, 1, 2, 4, 5, 7])
def test_a_jpeg_is_read_upright(tmp_path, orientation):
    path = jpeg_with_orientation(tmp_path / f"o{orientation}.jpg", orientation)
    image = load_image(str(path))
    shape, white_corner = VIEWED[orientation]
    assert tuple(image.shape[:2]) == shape
    means = corner_means(image)
    assert max(means, key=means.get) == white_corner and means[white_corner] > 240, means


def test_big_endian_exif_is_read_too(tmp_path):
    path = jpeg_with_orientation(tmp_path / "mm.jpg", 6, byte_order="MM")
    assert read_orientation(path) == 6
    assert tuple(load_image(str(path)).shape[:2]) == (STORED_W, STORED_H)


def test_png_exif_chunk_is_applied(tmp_path):
    """PNG carries EXIF in an ``eXIf`` chunk (placed before the image data)."""
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    pixels = stored_pixels()
    raw = b"".join(b"\x00" + row.tobytes() for row in pixels)
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", STORED_W, STORED_H, 8, 2, 0, 0, 0))
           + chunk(b"eXIf", exif_tiff(8, "MM")) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    path = tmp_path / "o8.png"
    path.write_bytes(png)
    image = load_image(str(path))
    assert tuple(image.shape[:2]) == (STORED_W, STORED_H)
    assert torch.equal(image, torch.from_numpy(np.rot90(pixels).copy()))  # orientation 8: turn 90 degrees left


def test_damaged_exif_leaves_the_image_as_stored(tmp_path):
    path = tmp_path / "damaged.jpg"
    data = jpeg_bytes(stored_pixels())
    payload = b"Exif\x00\x00II*\x00\xff\xff\xff\x00"  # IFD0 offset far past the end
    path.write_bytes(data[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + data[2:])
    assert read_orientation(path) == 1
    assert tuple(load_image(str(path)).shape[:2]) == (STORED_H, STORED_W)


def test_same_pixels_as_pillows_exif_transpose(tmp_path):
    """Where Pillow is installed (ComfyUI's LoadImage uses ImageOps.exif_transpose), it agrees exactly."""
    image_module = pytest.importorskip("PIL.Image")
    from PIL import ImageOps

    for orientation in range(1, 9):
        path = jpeg_with_orientation(tmp_path / f"p{orientation}.jpg", orientation)
        ours = load_image(str(path))
        theirs = torch.from_numpy(np.array(ImageOps.exif_transpose(image_module.open(path)).convert("RGB")))
        assert ours.shape == theirs.shape, orientation
        # FFmpeg and Pillow decode JPEG with different IDCTs: compare the geometry, not the last level
        assert (ours.float() - theirs.float()).abs().mean() < 2.0, orientation
