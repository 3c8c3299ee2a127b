"""The EXIF ``Orientation`` tag of an image file, and turning decoded pixels upright with it.

Phones store a portrait photo as a landscape image plus an Orientation tag (6 = "turn 90 degrees
clockwise to view"). FFmpeg decodes the stored pixels and does not apply the tag, and Pillow is not a
dependency of this pack, so the tag is read here from the file's bytes: JPEG (APP1 ``Exif``), PNG
(``eXIf`` chunk) and WebP (``EXIF`` chunk) all carry the same TIFF structure. The transforms are
those of Pillow's ``ImageOps.exif_transpose``, which ComfyUI's LoadImage applies.
"""

from __future__ import annotations

import struct
from pathlib import Path

import torch

ORIENTATION_TAG = 0x0112
UPRIGHT = 1
_EXIF_HEADER = b"Exif\x00\x00"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_START_OF_SCAN = 0xDA


def read_orientation(path: str | Path) -> int:
    """The file's EXIF Orientation (1..8); 1 when it has none or the EXIF cannot be parsed."""
    data = Path(path).read_bytes()
    tiff = _exif_tiff(data)
    if tiff is None:
        return UPRIGHT
    try:
        orientation = _tiff_orientation(tiff)
    except struct.error:  # truncated or damaged EXIF: show the pixels as stored
        return UPRIGHT
    return orientation if 1 <= orientation <= 8 else UPRIGHT


def apply_orientation(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """``[H, W, C]`` pixels as stored -> as they are meant to be viewed (EXIF orientation 1..8)."""
    rows, cols = 0, 1
    if orientation in (5, 6, 7, 8):  # these four swap width and height
        image = torch.rot90(image, k=-1 if orientation in (5, 6) else 1, dims=(rows, cols))
    flips = {2: (cols,), 3: (rows, cols), 4: (rows,), 5: (cols,), 7: (cols,)}.get(orientation)
    return image.flip(flips).contiguous() if flips else image.contiguous()


def _exif_tiff(data: bytes) -> bytes | None:
    """The TIFF block of the file's EXIF data, if the container carries one."""
    if data[:2] == b"\xff\xd8":
        return _jpeg_exif(data)
    if data[:8] == _PNG_SIGNATURE:
        return _chunk_exif(data, 8, ">I", b"eXIf", length_first=True)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return _chunk_exif(data, 12, "<I", b"EXIF", length_first=False)
    return None


def _jpeg_exif(data: bytes) -> bytes | None:
    """Walk the JPEG marker segments up to the image data, looking for APP1 ``Exif``."""
    pos = 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == _JPEG_START_OF_SCAN:
            return None
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        body = data[pos + 4 : pos + 2 + length]
        if marker == 0xE1 and body.startswith(_EXIF_HEADER):
            return body[len(_EXIF_HEADER) :]
        pos += 2 + length
    return None


def _chunk_exif(data: bytes, pos: int, length_format: str, name: bytes, *, length_first: bool) -> bytes | None:
    """Find chunk ``name`` in a PNG (length, type, data, CRC) or RIFF (type, length, data, pad) file."""
    while pos + 8 <= len(data):
        if length_first:
            (length,), kind, start = struct.unpack(length_format, data[pos : pos + 4]), data[pos + 4 : pos + 8], pos + 8
            end = start + length + 4  # CRC
        else:
            kind, (length,), start = data[pos : pos + 4], struct.unpack(length_format, data[pos + 4 : pos + 8]), pos + 8
            end = start + length + length % 2  # RIFF chunks are padded to even sizes
        if kind == name:
            body = data[start : start + length]
            return body[len(_EXIF_HEADER) :] if body.startswith(_EXIF_HEADER) else body
        pos = end
    return None


def _tiff_orientation(tiff: bytes) -> int:
    """The Orientation entry of IFD0 of a TIFF block (byte order ``II`` or ``MM``)."""
    order = {b"II": "<", b"MM": ">"}.get(tiff[:2])
    if order is None:
        return UPRIGHT
    (ifd,) = struct.unpack(order + "I", tiff[4:8])
    (count,) = struct.unpack(order + "H", tiff[ifd : ifd + 2])
    for entry in range(ifd + 2, ifd + 2 + 12 * count, 12):
        tag, kind = struct.unpack(order + "HH", tiff[entry : entry + 4])
        if tag == ORIENTATION_TAG:
            value_format = "H" if kind == 3 else "I"  # SHORT as written by cameras; LONG tolerated
            return struct.unpack(order + value_format, tiff[entry + 8 : entry + 8 + struct.calcsize(value_format)])[0]
    return UPRIGHT
