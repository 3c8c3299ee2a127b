"""The live WebSocket protocol (docs/live.md): message layout, limits and checks, shared by the standalone
server (server.py) and the ComfyUI routes (nodes/live.py) so both accept and refuse exactly the same things.

Text messages are JSON objects with a ``"type"``. Binary messages are::

    byte 0        kind (AUDIO from the client; BLOCK or REFERENCE from the server)
    bytes 1..4    H, the header's length in bytes (uint32, little endian)
    bytes 5..5+H  header: a JSON object (UTF-8); H may be 0 (no header)
    the rest      payload

Nothing here touches a socket: :func:`parse_client_message` turns what a client sent into a typed message
or raises :class:`ProtocolError` carrying the close code and reason to send; the ``*_message`` functions
build what the server sends.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from dataclasses import dataclass

import numpy as np

from ..media.timing import SAMPLE_RATE  # the client sends, and gets back, 16 kHz mono PCM

PROTOCOL_VERSION = 1
PCM_MAX = 32768.0  # int16 full scale: float sample = int16 / PCM_MAX

# Binary message kinds (byte 0).
AUDIO = 0x01  # client -> server: int16 little-endian mono PCM at SAMPLE_RATE, no header
BLOCK = 0x02  # server -> client: one block's H.264 frames and the audio they were made from
REFERENCE = 0x03  # server -> client: the reference frame as a PNG, shown at once
BINARY_PREFIX = struct.Struct("<BI")  # kind, header length

# Limits: anything beyond closes the socket with CLOSE_TOO_BIG / CLOSE_POLICY.
MAX_MESSAGE_BYTES = 8 * 1024 * 1024  # the largest message accepted (a start message with its image)
MAX_AUDIO_CHUNK_SECONDS = 2  # one audio message carries at most this much audio
MAX_AUDIO_CHUNK_BYTES = MAX_AUDIO_CHUNK_SECONDS * SAMPLE_RATE * 2
MAX_PROMPT_CHARS = 2000
MAX_AUDIO_AHEAD_SECONDS = 30  # audio received but not yet used by a block: more means the client sends too fast
IMAGE_SIGNATURES = {b"\xff\xd8\xff": "image/jpeg", b"\x89PNG\r\n\x1a\n": "image/png", b"RIFF": "image/webp"}

# WebSocket close codes (RFC 6455) the server uses.
CLOSE_NORMAL = 1000  # after "stop"
CLOSE_GOING_AWAY = 1001  # the server ended the session itself (ComfyUI: the LiveTalk Live node was stopped)
CLOSE_UNSUPPORTED = 1003  # a message of a kind the protocol does not have
CLOSE_POLICY = 1008  # malformed message (bad JSON, wrong field, out of order)
CLOSE_TOO_BIG = 1009  # message over MAX_MESSAGE_BYTES or an audio chunk over MAX_AUDIO_CHUNK_BYTES
CLOSE_SERVER_ERROR = 1011  # the session failed (e.g. out of GPU memory); the reason says what to do
CLOSE_BUSY = 1013  # "try again later": another client holds the server's one session

# The video stream: H.264 Annex B (start codes; SPS/PPS in band before every keyframe), Constrained
# Baseline profile (no B-frames), so WebCodecs decodes it with no "description".
VIDEO_CODEC = "avc1.42E01F"
VIDEO_FORMAT = "annexb"


# The "code" of an error message, by close code.
ERROR_CODES = {CLOSE_UNSUPPORTED: "bad_message", CLOSE_POLICY: "bad_message", CLOSE_TOO_BIG: "too_big",
               CLOSE_SERVER_ERROR: "session_failed", CLOSE_BUSY: "busy"}
ENDED = "ended"  # error code: the server ended the session (closes with CLOSE_GOING_AWAY)
BAD_INPUT = "bad_input"  # error code: the start message's image or prompt could not be used (closes with 1008)


class ProtocolError(Exception):
    """A client message the protocol refuses: the socket is closed with ``code`` and ``reason``."""

    def __init__(self, code: int, reason: str, error_code: str | None = None):
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.error_code = error_code or ERROR_CODES.get(code, "bad_message")

    @property
    def close_reason(self) -> str:
        """The reason for the close frame, which must fit in 123 bytes (the error message has it in full)."""
        return self.reason.encode()[:120].decode(errors="ignore")


@dataclass(frozen=True)
class Start:
    """``{"type": "start", "prompt": str?, "image": base64 str?, "sample_rate": 16000?}``."""

    prompt: str | None
    image: bytes | None  # the encoded file (JPEG, PNG or WebP)


@dataclass(frozen=True)
class Stop:
    """``{"type": "stop"}``: end the session; the server answers "stopped" and closes normally."""


@dataclass(frozen=True)
class Audio:
    """A binary AUDIO message: float32 mono samples in [-1, 1) at SAMPLE_RATE (int16 / 32768)."""

    samples: np.ndarray


ClientMessage = Start | Stop | Audio


def pack_binary(kind: int, header: dict | None, payload: bytes = b"") -> bytes:
    """One binary message: kind, header length, JSON header, payload."""
    encoded = json.dumps(header, separators=(",", ":")).encode() if header else b""
    return BINARY_PREFIX.pack(kind, len(encoded)) + encoded + payload


def unpack_binary(data: bytes) -> tuple[int, dict, memoryview]:
    """The kind, header and payload of a binary message; ProtocolError if it is cut short or its header is not JSON."""
    if len(data) < BINARY_PREFIX.size:
        raise ProtocolError(CLOSE_POLICY, f"binary message of {len(data)} bytes is shorter than its prefix")
    kind, header_length = BINARY_PREFIX.unpack_from(data)
    end = BINARY_PREFIX.size + header_length
    if end > len(data):
        raise ProtocolError(CLOSE_POLICY, f"binary header length {header_length} runs past the message's end")
    header = _json_object(bytes(data[BINARY_PREFIX.size:end])) if header_length else {}
    return kind, header, memoryview(data)[end:]


def _json_object(text: str | bytes) -> dict:
    try:
        value = json.loads(text)
    except (ValueError, UnicodeDecodeError) as err:
        raise ProtocolError(CLOSE_POLICY, f"message is not valid JSON: {err}") from err
    if not isinstance(value, dict):
        raise ProtocolError(CLOSE_POLICY, "a text message must be a JSON object with a \"type\"")
    return value


def parse_client_message(data: str | bytes) -> ClientMessage:
    """A client's message (text: str, binary: bytes), checked against the protocol's types and limits."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError(CLOSE_TOO_BIG, f"message of {len(data)} bytes exceeds the limit of {MAX_MESSAGE_BYTES}")
    if isinstance(data, (bytes, bytearray, memoryview)):
        return _parse_binary(bytes(data))
    message = _json_object(data)
    kind = message.get("type")
    if kind == "start":
        return _parse_start(message)
    if kind == "stop":
        return Stop()
    raise ProtocolError(CLOSE_POLICY, f"unknown message type {kind!r}; expected start or stop (audio is binary)")


def _parse_binary(data: bytes) -> Audio:
    kind, _header, payload = unpack_binary(data)
    if kind != AUDIO:
        raise ProtocolError(CLOSE_UNSUPPORTED, f"binary message kind {kind} is not audio ({AUDIO})")
    if len(payload) > MAX_AUDIO_CHUNK_BYTES:
        raise ProtocolError(CLOSE_TOO_BIG, f"audio chunk of {len(payload)} bytes exceeds {MAX_AUDIO_CHUNK_SECONDS} s "
                                           f"({MAX_AUDIO_CHUNK_BYTES} bytes); send smaller chunks")
    if len(payload) % 2:
        raise ProtocolError(CLOSE_POLICY, f"audio chunk of {len(payload)} bytes is not whole int16 samples")
    return Audio(pcm_to_float(payload))


def _parse_start(message: dict) -> Start:
    unknown = set(message) - {"type", "prompt", "image", "sample_rate"}
    if unknown:
        raise ProtocolError(CLOSE_POLICY, f"start message has unknown fields {sorted(unknown)}")
    rate = message.get("sample_rate", SAMPLE_RATE)
    if rate != SAMPLE_RATE:
        raise ProtocolError(CLOSE_POLICY, f"sample_rate must be {SAMPLE_RATE} (resample in the client), got {rate!r}")
    prompt = message.get("prompt")
    if prompt is not None and (not isinstance(prompt, str) or len(prompt) > MAX_PROMPT_CHARS):
        raise ProtocolError(CLOSE_POLICY, f"prompt must be a string of at most {MAX_PROMPT_CHARS} characters")
    image = message.get("image")
    return Start(prompt=prompt or None, image=None if image is None else decode_image(image))


def decode_image(text: object) -> bytes:
    """The image file of a start message: base64 (a ``data:`` URL prefix is allowed) of a JPEG, PNG or WebP."""
    if not isinstance(text, str):
        raise ProtocolError(CLOSE_POLICY, "image must be a base64 string of a JPEG, PNG or WebP file")
    try:
        data = base64.b64decode(text.split(",", 1)[-1] if text.startswith("data:") else text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ProtocolError(CLOSE_POLICY, f"image is not valid base64: {err}") from err
    if not any(data.startswith(signature) for signature in IMAGE_SIGNATURES):
        raise ProtocolError(CLOSE_POLICY, "image must be a JPEG, PNG or WebP file")
    return data


def pcm_to_float(payload: bytes | memoryview) -> np.ndarray:
    """int16 little-endian PCM -> float32 in [-1, 1)."""
    return np.frombuffer(payload, dtype="<i2").astype(np.float32) / PCM_MAX


def float_to_pcm(samples: np.ndarray) -> bytes:
    """float32 in [-1, 1] -> int16 little-endian PCM; exact inverse of :func:`pcm_to_float` on its outputs."""
    scaled = np.clip(np.rint(np.asarray(samples, dtype=np.float64) * PCM_MAX), -PCM_MAX, PCM_MAX - 1)
    return scaled.astype("<i2").tobytes()


def audio_message(pcm: bytes) -> bytes:
    """A client's AUDIO message from int16 little-endian PCM."""
    return pack_binary(AUDIO, None, pcm)


def text_message(kind: str, **fields) -> str:
    """A server (or client) text message: ``{"type": kind, **fields}``."""
    return json.dumps({"type": kind, **fields}, separators=(",", ":"))


def block_message(header: dict, video: list[bytes], pcm: bytes) -> bytes:
    """A BLOCK message: ``header`` plus ``frame_bytes`` (each access unit's length), the units, then the PCM."""
    return pack_binary(BLOCK, {**header, "frame_bytes": [len(unit) for unit in video]}, b"".join(video) + pcm)


def split_block(header: dict, payload: memoryview) -> tuple[list[bytes], np.ndarray]:
    """A BLOCK message's access units and its audio as int16 samples (what a client does with the payload)."""
    units, offset = [], 0
    for size in header["frame_bytes"]:
        units.append(bytes(payload[offset:offset + size]))
        offset += size
    audio = np.frombuffer(payload[offset:offset + 2 * header["audio_samples"]], dtype="<i2")
    return units, audio


def error_message(code: str, message: str) -> str:
    """``{"type": "error", "code": ..., "message": ...}``, sent before the server closes the socket."""
    return text_message("error", code=code, message=message)
