"""``python -m livetalk_core live-client --url http://HOST:PORT --audio FILE [--image FILE] [--prompt TEXT]
[--output FILE.mp4] [--report FILE.json]``: stream an audio file to a live server at real-time pace, the way a
voice agent's TTS would, keep what comes back and measure it (docs/live.md, "Latency and stalls").

As a library: :func:`stream_audio` (async) or :func:`run_client` return a :class:`LiveRecording` whose
:meth:`~LiveRecording.report` is the JSON report; :meth:`~LiveRecording.save` writes the mp4.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from ..errors import InputError, LiveTalkError
from . import protocol

CHUNK_SECONDS = 0.1  # audio is sent in messages of this length, each when its last sample "has been spoken"
STOP_GRACE_S = 30.0  # after the last audio, how long to wait by default for the blocks that cover it


def socket_url(url: str) -> str:
    """The socket of a live server's page URL: http://HOST:PORT -> ws://HOST:PORT/live/ws; a path (ComfyUI's
    ``/livetalk/live``) gets ``/ws`` appended; a ``.../ws`` URL is kept."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme not in ("http", "https", "ws", "wss"):
        raise InputError(f"--url {url}: use http://HOST:PORT (the address the live server printed)")
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    path = parts.path.rstrip("/") or "/live"
    if not path.endswith("/ws"):
        path += "/ws"
    return urlunsplit((scheme, parts.netloc, path, "", ""))


@dataclass
class ReceivedBlock:
    header: dict
    units: list[bytes]
    audio: np.ndarray  # int16
    arrived: float  # time.monotonic()


@dataclass
class LiveRecording:
    """What a client sent and got back, with the send times, so latency and stalls can be measured."""

    sent: np.ndarray  # int16, everything the client sent
    send_log: list[tuple[int, float]] = field(default_factory=list)  # (samples sent so far, time.monotonic())
    blocks: list[ReceivedBlock] = field(default_factory=list)
    info: dict = field(default_factory=dict)  # the ready message
    reference: bytes = b""
    stopped: dict | None = None

    @property
    def fps(self) -> int:
        return int(self.info["fps"])

    @property
    def samples_per_frame(self) -> int:
        return int(self.info["sample_rate"]) // self.fps

    @property
    def frame_audio_offset(self) -> int:
        """Frame ``f`` was made from the samples ``[f * spf + offset, (f + 1) * spf + offset)`` (the ready message)."""
        return int(self.info.get("frame_audio_offset", 0))

    def returned_speech(self) -> np.ndarray:
        """The client's samples as the blocks that used them returned them (int16), in order."""
        parts = [block.audio[offset:offset + length] for block in self.blocks for offset, length in speech_runs(block)]
        return np.concatenate(parts) if parts else np.zeros(0, np.int16)

    def sent_by(self, samples: int) -> float | None:
        """When the client had finished sending its first ``samples`` samples (None: it never did)."""
        return next((at for count, at in self.send_log if count >= samples), None)

    def frame_latencies(self) -> list[float]:
        """Per frame covering client speech: its arrival minus the time its audio had been fully sent."""
        return [latency for _, latency in self.timed_latencies()]

    def timed_latencies(self) -> list[tuple[float, float]]:
        """(arrival time.monotonic(), latency) of every frame that covers client speech, in order."""
        return [(block.arrived, latency) for block in self.blocks for latency in self._block_latencies(block)]

    def latency_p95_between(self, start_s: float, end_s: float) -> float | None:
        """p95 latency of the frames that arrived between ``start_s`` and ``end_s`` after the first audio was sent."""
        first = self.send_log[0][1] if self.send_log else 0.0
        chosen = [lat for at, lat in self.timed_latencies() if start_s <= at - first < end_s]
        return round(float(np.percentile(chosen, 95)), 4) if chosen else None

    def _block_latencies(self, block: ReceivedBlock) -> list[float]:
        """Per frame made from some of the client's samples: its arrival minus when the last of them was sent.
        Frame ``f``'s samples are ``[f * spf + offset, (f + 1) * spf + offset)`` clipped to the block's audio."""
        h, spf, offset = block.header, self.samples_per_frame, self.frame_audio_offset
        runs = speech_runs(block)
        client_sample = h["client_samples_end"] - h["speech_samples"]  # the client's index of the first pushed one
        ends = []  # (block-audio offset where a run ends, client samples up to it)
        for start, length in runs:
            client_sample += length
            ends.append((start, start + length, client_sample))
        out = []
        for frame in range(h["first_frame"], h["first_frame"] + h["frames"]):
            lo, hi = frame * spf + offset - h["audio_start"], (frame + 1) * spf + offset - h["audio_start"]
            covered = [end_client - (end - min(end, hi)) for start, end, end_client in ends if start < hi and end > lo]
            if not covered:
                continue  # made from filled-in silence only: no audio of the client's to be late for
            sent_at = self.sent_by(max(covered))
            if sent_at is not None:
                out.append(block.arrived - sent_at)
        return out

    def late_blocks(self) -> list[tuple[int, float]]:
        """(block index, seconds late) of each stall: a player shows the first block as it arrives, then a frame
        every 1/fps s; a frame not there when needed is a stall, and the player waits for it (its clock shifts)."""
        if not self.blocks:
            return []
        first = self.blocks[0]
        start, first_frame = first.arrived, first.header["first_frame"]
        late, waited = [], 0.0
        for block in self.blocks:
            due = start + waited + (block.header["first_frame"] - first_frame) / self.fps
            if block.arrived > due:
                late.append((block.header["index"], block.arrived - due))
                waited += block.arrived - due
        return late

    def stalls(self) -> tuple[int, float]:
        """(stalls, seconds the player waited in all); see :meth:`late_blocks`."""
        late = self.late_blocks()
        return len(late), sum(seconds for _, seconds in late)

    def report(self) -> dict:
        """The JSON report: frames, audio_seconds, latency_p50_s, latency_p95_s, stalls, bitrate_mbps, ..."""
        frames = sum(block.header["frames"] for block in self.blocks)
        video_bytes = sum(len(unit) for block in self.blocks for unit in block.units)
        latencies = self.frame_latencies()
        stalls, stall_seconds = self.stalls()
        returned = self.returned_speech()
        percentile = (lambda q: round(float(np.percentile(latencies, q)), 4)) if latencies else (lambda q: None)
        return {
            "frames": frames,
            "speech_frames": len(latencies),
            "blocks": len(self.blocks),
            "audio_seconds": round(len(self.sent) / protocol.SAMPLE_RATE, 4),
            "latency_p50_s": percentile(50), "latency_p95_s": percentile(95), "latency_max_s": percentile(100),
            "first_block_latency_s": round(self.blocks[0].arrived - self.send_log[0][1], 4)
            if self.blocks and self.send_log else None,
            "stalls": stalls, "stall_seconds": round(stall_seconds, 4),
            "late_blocks": [[index, round(seconds, 4)] for index, seconds in self.late_blocks()],
            "bitrate_mbps": round(video_bytes * 8 / (frames / self.fps) / 1e6, 4) if frames else None,
            "dropped_blocks": self.blocks[-1].header["dropped_blocks"] if self.blocks else 0,
            "returned_audio_exact": bool(np.array_equal(returned, self.sent[:len(returned)])),
            "returned_speech_seconds": round(len(returned) / protocol.SAMPLE_RATE, 4),
            "generated_s_p50": round(float(np.median([b.header["generated_s"] for b in self.blocks])), 4)
            if self.blocks else None,
            "width": self.info.get("width"), "height": self.info.get("height"), "fps": self.info.get("fps"),
        }

    def decoded_frames(self) -> np.ndarray:
        """All received frames decoded (uint8 [n, H, W, 3]); a dropped block's gap is not filled."""
        import av

        decoder = av.CodecContext.create("h264", "r")
        frames = []
        for unit in (u for block in self.blocks for u in block.units):  # each unit is one whole frame
            frames.extend(f.to_ndarray(format="rgb24") for f in decoder.decode(av.Packet(unit)))
        for frame in decoder.decode(None):
            frames.append(frame.to_ndarray(format="rgb24"))
        return np.stack(frames) if frames else np.zeros((0, 1, 1, 3), np.uint8)

    def timeline_audio(self) -> np.ndarray:
        """The returned audio on the session timeline (float32), silence where blocks were dropped."""
        if not self.blocks:
            return np.zeros(0, np.float32)
        start = self.blocks[0].header["audio_start"]
        end = max(b.header["audio_start"] + len(b.audio) for b in self.blocks)
        audio = np.zeros(end - start, np.float32)
        for block in self.blocks:
            offset = block.header["audio_start"] - start
            audio[offset:offset + len(block.audio)] = block.audio / protocol.PCM_MAX
        return audio

    def save(self, output: Path) -> Path | None:
        """The received video with its audio as an mp4 (media/video_io's writer: partial file, then rename)."""
        from ..media.video_io import VideoWriter

        frames = self.decoded_frames()
        if not len(frames):
            return None
        audio = self.timeline_audio()
        with VideoWriter(output, fps=self.fps, audio=audio, audio_sample_rate=protocol.SAMPLE_RATE) as writer:
            writer.write(frames)
        return writer.saved_path


def speech_runs(block: ReceivedBlock) -> list[tuple[int, int]]:
    """Where the client's samples are in a block's audio: the header's ``speech_runs`` (a server without them
    puts a block's speech first)."""
    h = block.header
    if "speech_runs" in h:
        return [(int(offset), int(length)) for offset, length in h["speech_runs"]]
    return [(0, int(h["speech_samples"]))] if h["speech_samples"] else []


async def stream_audio(url: str, audio: np.ndarray, *, image: bytes | None = None, prompt: str | None = None,
                       chunk_s: float = CHUNK_SECONDS, connect_timeout: float = 600.0,
                       coverage_timeout: float = STOP_GRACE_S, pauses: dict[int, float] | None = None) -> LiveRecording:
    """Send ``audio`` (float32 mono at 16 kHz) at real-time pace after the session is ready, receive every block
    until the blocks cover all of it, then stop. ``pauses``: {sample offset: seconds} during which nothing is
    sent (a voice agent that stops talking; the offsets should be multiples of ``chunk_s``). Raises LiveTalkError
    with the server's reason if refused."""
    import aiohttp

    pcm = np.frombuffer(protocol.float_to_pcm(audio), dtype="<i2")
    recording = LiveRecording(sent=pcm)
    async with aiohttp.ClientSession() as http, http.ws_connect(socket_url(url), max_msg_size=0) as ws:
        await _open(ws, recording, image, prompt, connect_timeout)
        receiver = asyncio.create_task(_receive_blocks(ws, recording))
        await _send_paced(ws, recording, pcm, chunk_s, pauses or {})
        await _wait_for_coverage(recording, len(pcm), receiver, coverage_timeout)
        await ws.send_str(protocol.text_message("stop"))
        await asyncio.wait_for(receiver, coverage_timeout)
    return recording


async def _open(ws, recording: LiveRecording, image: bytes | None, prompt: str | None, timeout: float) -> None:
    """hello -> start -> loading -> reference -> ready; the server's error (busy, bad input) as LiveTalkError."""
    import base64

    start = {"prompt": prompt} if prompt else {}
    if image is not None:
        start["image"] = base64.b64encode(image).decode()
    await _expect(ws, "hello", timeout)
    await ws.send_str(protocol.text_message("start", **start))
    deadline = time.monotonic() + timeout
    while not recording.info:
        message = await ws.receive(timeout=max(1.0, deadline - time.monotonic()))
        if message.type.name == "BINARY":
            kind, header, payload = protocol.unpack_binary(message.data)
            if kind == protocol.REFERENCE:
                recording.reference = bytes(payload)
            continue
        data = _text(message, ws)
        if data["type"] == "ready":
            recording.info = data


async def _expect(ws, kind: str, timeout: float) -> dict:
    data = _text(await ws.receive(timeout=timeout), ws)
    if data["type"] != kind:
        raise LiveTalkError(f"the live server sent {data['type']!r} where {kind!r} was expected")
    return data


def _text(message, ws) -> dict:
    """A text message as a dict; the server's error or close as LiveTalkError."""
    if message.type.name != "TEXT":
        raise LiveTalkError(f"the live server closed the connection (code {ws.close_code}): {message.extra or ''}")
    data = json.loads(message.data)
    if data["type"] == "error":
        raise LiveTalkError(f"the live server refused: {data['message']} ({data['code']})")
    return data


async def _send_paced(ws, recording: LiveRecording, pcm: np.ndarray, chunk_s: float,
                      pauses: dict[int, float]) -> None:
    """Each chunk goes out when its last sample would have been spoken, counting from the first send; at an
    offset in ``pauses`` nothing is sent for that long."""
    step = max(1, int(chunk_s * protocol.SAMPLE_RATE))
    start = time.monotonic()
    for offset in range(0, len(pcm), step):
        start += pauses.get(offset, 0.0)
        chunk = pcm[offset:offset + step]
        await asyncio.sleep(max(0.0, start + (offset + len(chunk)) / protocol.SAMPLE_RATE - time.monotonic()))
        await ws.send_bytes(protocol.audio_message(chunk.astype("<i2").tobytes()))
        recording.send_log.append((offset + len(chunk), time.monotonic()))


async def _receive_blocks(ws, recording: LiveRecording) -> None:
    async for message in ws:
        if message.type.name == "BINARY":
            arrived = time.monotonic()
            kind, header, payload = protocol.unpack_binary(message.data)
            if kind == protocol.BLOCK:
                units, audio = protocol.split_block(header, payload)
                recording.blocks.append(ReceivedBlock(header, units, audio.copy(), arrived))
        elif message.type.name == "TEXT":
            data = json.loads(message.data)
            if data["type"] == "stopped":
                recording.stopped = data
            elif data["type"] == "error":
                raise LiveTalkError(f"the live server ended the session: {data['message']} ({data['code']})")


async def _wait_for_coverage(recording: LiveRecording, samples: int, receiver: asyncio.Task, timeout: float) -> None:
    """Until a block has used the client's last sample (or ``timeout`` passes, or the socket ends)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not receiver.done():
        if recording.blocks and recording.blocks[-1].header["client_samples_end"] >= samples:
            return
        await asyncio.sleep(0.02)
    if receiver.done():
        receiver.result()  # the server's error, if any


def run_client(url: str, audio: np.ndarray, **options) -> LiveRecording:
    """:func:`stream_audio`, blocking; a socket that cannot be opened is a LiveTalkError that says where."""
    import aiohttp

    try:
        return asyncio.run(stream_audio(url, audio, **options))
    except aiohttp.WSServerHandshakeError as err:
        raise LiveTalkError(f"{socket_url(url)} is not a live socket (HTTP {err.status}); give the address the live "
                            "server printed, e.g. http://127.0.0.1:8765") from err


# --- the command ---------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="livetalk live-client", description="Stream an audio file to a live server "
                                "at real-time pace; save the answer and measure latency.")
    p.add_argument("--url", required=True, help="the live server's address, e.g. http://127.0.0.1:8765")
    p.add_argument("--audio", required=True, help="speech to stream (any format; resampled to 16 kHz mono)")
    p.add_argument("--image", default=None, help="face image (JPEG, PNG or WebP; default: the server's)")
    p.add_argument("--prompt", default=None, help="text prompt (default: the server's)")
    p.add_argument("--output", default=None, help="mp4 to write with what came back (default: none)")
    p.add_argument("--report", default=None, help="JSON report to write (default: print it)")
    return p


def check_arguments(args: argparse.Namespace) -> tuple[np.ndarray, bytes | None]:
    """Read the audio and image and check the outputs before connecting (no input is ever overwritten)."""
    from ..cli_checks import check_output
    from ..media.audio_file import load_audio

    inputs = {"--audio": Path(args.audio), "--image": Path(args.image) if args.image else None}
    for option in ("output", "report"):
        if getattr(args, option):
            check_output(Path(getattr(args, option)), inputs, f"--{option}")
    if args.output and args.report and Path(args.output).resolve() == Path(args.report).resolve():
        raise InputError("--output and --report name the same file; give them different names")
    socket_url(args.url)
    audio = load_audio(args.audio).numpy()
    if args.image and not Path(args.image).is_file():
        raise InputError(f"--image {args.image} not found; give an existing JPEG, PNG or WebP file")
    image = Path(args.image).read_bytes() if args.image else None
    return audio, image


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        audio, image = check_arguments(args)
        recording = run_client(args.url, audio, image=image, prompt=args.prompt)
        report = recording.report()
        if args.output:
            report["output"] = str(recording.save(Path(args.output)))
    except (LiveTalkError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    text = json.dumps(report, indent=2)
    if args.report:
        Path(args.report).write_text(text + "\n")
    print(text)
    return 0
