"""H.264 for the live stream: one encoder per session, fed block by block, low latency (docs/live.md "Video").

x264 with ``tune=zerolatency`` (no lookahead, no frame delay: each frame's access unit comes out as soon as
the frame goes in) and the Constrained Baseline profile (no B-frames), Annex B output with SPS/PPS before
each keyframe, so a WebCodecs ``VideoDecoder`` configured with just the codec string can start at any
keyframe. Keyframes: the first block, then at the first block after ``keyframe_interval_s``, and the next
block after :meth:`BlockEncoder.force_keyframe` (called when a block was dropped for a slow client). Scene
cuts never insert one, so only a block's first frame can be a keyframe.
"""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np

KEYFRAME_INTERVAL_S = 4.0  # a decoder that joins or recovers waits at most this long for a keyframe
REFERENCE_PIXELS = 512 * 512
MAX_BITRATE_AT_REFERENCE = 2_500_000  # bit/s at 512x512 16 fps, under the 3 Mbit/s the issue allows
VBV_SECONDS = 0.5  # rate-control buffer: short, so a bitrate peak never lasts longer than a few frames
CRF = 23
PRESET = "veryfast"


class BlockEncoder:
    """Encodes a session's frames block by block into H.264 access units (one ``bytes`` per frame)."""

    def __init__(self, width: int, height: int, fps: int, *, keyframe_interval_s: float = KEYFRAME_INTERVAL_S):
        self.width, self.height, self.fps = width, height, fps
        self._keyframe_interval = max(1, round(keyframe_interval_s * fps))
        self._frames_since_keyframe: int | None = None  # None: the next block starts with a keyframe
        self._context = _x264_context(width + width % 2, height + height % 2, fps)
        self._pts = 0

    def force_keyframe(self) -> None:
        """The next block starts with a keyframe (a block before it was not sent: what follows it cannot be decoded)."""
        self._frames_since_keyframe = None

    def encode(self, frames: np.ndarray) -> tuple[list[bytes], bool]:
        """uint8 [n, H, W, 3] -> (one Annex B access unit per frame, whether the first frame is a keyframe)."""
        keyframe = self._frames_since_keyframe is None or self._frames_since_keyframe >= self._keyframe_interval
        units = [self._encode_frame(image, force_key=keyframe and index == 0) for index, image in enumerate(frames)]
        self._frames_since_keyframe = (0 if keyframe else self._frames_since_keyframe) + len(units)
        return units, keyframe

    def _encode_frame(self, image: np.ndarray, *, force_key: bool) -> bytes:
        frame = av.VideoFrame.from_ndarray(_even(np.ascontiguousarray(image)), format="rgb24")
        frame = frame.reformat(format="yuv420p")
        frame.pts = self._pts
        self._pts += 1
        if force_key:
            frame.pict_type = av.video.frame.PictureType.I
        packets = self._context.encode(frame)
        if len(packets) != 1:  # zerolatency gives exactly one unit per frame; anything else breaks the timeline
            raise RuntimeError(f"the H.264 encoder returned {len(packets)} packets for one frame (expected 1)")
        return bytes(packets[0])

    def close(self) -> None:
        """Release the encoder (nothing is pending: it never holds frames back)."""
        self._context = None


def max_bitrate(width: int, height: int) -> int:
    """The VBV cap for a frame size: MAX_BITRATE_AT_REFERENCE scaled by the pixel count (never below a tenth)."""
    return max(MAX_BITRATE_AT_REFERENCE // 10, round(MAX_BITRATE_AT_REFERENCE * width * height / REFERENCE_PIXELS))


def _x264_context(width: int, height: int, fps: int) -> av.VideoCodecContext:
    context = av.CodecContext.create("libx264", "w")
    context.width, context.height, context.pix_fmt = width, height, "yuv420p"
    context.time_base, context.framerate = Fraction(1, fps), Fraction(fps)
    rate = max_bitrate(width, height)
    context.options = {
        "preset": PRESET, "tune": "zerolatency", "profile": "baseline", "crf": str(CRF),
        "maxrate": str(rate), "bufsize": str(round(rate * VBV_SECONDS)),
        # keyframes only where encode() asks for them: no periodic or scene-cut IDR inside a block
        "g": "100000", "keyint_min": "100000", "sc_threshold": "0", "bframes": "0",
    }
    return context


def _even(image: np.ndarray) -> np.ndarray:
    """yuv420p needs even sizes: repeat the last row / column of an odd-sized frame."""
    pad_h, pad_w = image.shape[0] % 2, image.shape[1] % 2
    return np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge") if pad_h or pad_w else image


def encode_png(image: np.ndarray) -> bytes:
    """uint8 [H, W, 3] -> PNG file bytes (the reference frame message)."""
    context = av.CodecContext.create("png", "w")
    context.width, context.height, context.pix_fmt = image.shape[1], image.shape[0], "rgb24"
    context.time_base = Fraction(1, 1)
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
    frame.pts = 0
    return b"".join(bytes(packet) for packet in [*context.encode(frame), *context.encode(None)])
