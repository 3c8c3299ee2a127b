"""The live server (docs/live.md): ``python -m livetalk_core live [--smoke] [--host 127.0.0.1] [--port N]``.

:class:`LiveEndpoint` is the protocol over one aiohttp WebSocket, whatever server hosts it: the standalone
app built here and the ComfyUI routes (nodes/live.py) both hand their socket requests to it, so both accept,
refuse and stream alike. One session per endpoint: a second client gets "busy". A session's blocks come
from a ``LiveClock`` thread; each is encoded to H.264 in a thread of its own (the clock goes on sampling)
and sent by an asyncio task. At most ``max_pending_blocks`` blocks wait for a client: a slow reader loses
whole blocks (counted, and a keyframe follows), never server memory.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from aiohttp import WebSocketError, WSMsgType, web

from ..errors import InputError, LiveTalkError
from . import protocol
from .encoder import BlockEncoder, encode_png
from .protocol import Audio, ProtocolError, Start, Stop

log = logging.getLogger(__name__)

WEB_DIR = Path(__file__).resolve().parent / "web"
DEFAULT_PORT = 8765
MAX_PENDING_BLOCKS = 4  # blocks made but not yet sent to the client; a fifth is dropped
STOP_DRAIN_S = 10.0  # after stop, how long the blocks already made may take to go out
TEARDOWN_WAIT_S = 5.0  # how long a new client waits for a session whose client has left to be freed
TEARDOWN_POLL_S = 0.02
PAGE_FILES = ("index.html", "live_client.js", "audio_capture.js")

SessionOpener = Callable[[Start], object]  # a Start message -> a LiveSession (blocking: runs in a worker thread)


class SendBudget:
    """How many blocks wait for the client; thread-safe (the clock thread reserves, the event loop releases)."""

    def __init__(self, limit: int):
        self.limit, self.pending, self.most_pending = limit, 0, 0
        self._lock = threading.Lock()

    def try_reserve(self) -> bool:
        with self._lock:
            if self.pending >= self.limit:
                return False
            self.pending += 1
            self.most_pending = max(self.most_pending, self.pending)
            return True

    def release(self) -> None:
        with self._lock:
            self.pending -= 1


@dataclass
class SessionStats:
    """What a session did, for ``/live/status`` and the tests."""

    blocks_made: int = 0
    blocks_sent: int = 0
    blocks_dropped: int = 0
    frames_sent: int = 0
    most_buffered_bytes: int = 0
    most_pending: int = 0
    client_samples: int = 0
    closed_with: int | None = None
    close_reason: str = ""


@dataclass(frozen=True)
class EncodedBlock:
    message: bytes
    frames: int


class LiveSocket(web.WebSocketResponse):
    """aiohttp closes an oversized message's socket itself, with no reason: this says why first."""

    async def close(self, *, code: int = 1000, message: bytes = b"", drain: bool = True) -> bool:
        if code == protocol.CLOSE_TOO_BIG and not message and not self.closed:
            text = f"message exceeds the limit of {protocol.MAX_MESSAGE_BYTES} bytes"
            with contextlib.suppress(Exception):
                await self.send_str(protocol.error_message("too_big", text))
            message = text.encode()
        return await super().close(code=code, message=message, drain=drain)


@dataclass
class LiveEndpoint:
    """The live protocol for one server: at most one session at a time.

    ``open_session(start)`` makes the session (blocking; it runs in a worker thread and may raise
    LiveTalkError for input it cannot use). ``image`` says what the server does with a start message's image:
    "optional" (standalone) or "ignored" (ComfyUI: the node's reference). ``clock`` builds the driver:
    ``clock(session, on_block, on_error=...)`` (clock.LiveClock)."""

    open_session: SessionOpener
    image: str = "optional"
    family: str = ""
    max_pending_blocks: int = MAX_PENDING_BLOCKS
    send_buffer_bytes: int | None = None  # SO_SNDBUF for the socket (None: the system's); small = drops sooner
    clock: Callable | None = None
    sessions_served: int = 0
    last: SessionStats = field(default_factory=SessionStats)
    _active: object | None = None

    @property
    def busy(self) -> bool:
        return self._active is not None

    async def status(self, request: web.Request) -> web.Response:
        """``GET .../live/status``: whether a session runs and the counters of the current or last one."""
        return web.json_response({"busy": self.busy, "sessions_served": self.sessions_served, "last": vars(self.last)})

    async def handle_socket(self, request: web.Request) -> web.StreamResponse:
        """``GET .../live/ws``: one client's whole connection."""
        ws = LiveSocket(max_msg_size=protocol.MAX_MESSAGE_BYTES, heartbeat=30)
        await ws.prepare(request)
        if not await self._previous_session_freed():
            await _refuse(ws, ProtocolError(protocol.CLOSE_BUSY, "busy: another client is in a live session; "
                                                                 "one session per server, try again when it ends"))
            return ws
        self._limit_send_buffer(request)
        connection = LiveConnection(self, ws, request.transport)
        self._active, self.last = connection, connection.stats
        try:
            await connection.run()
        finally:
            self._active = None
            self.sessions_served += 1
        return ws

    async def _previous_session_freed(self) -> bool:
        """True when no session is in memory: at once, or after waiting (at most :data:`TEARDOWN_WAIT_S`) for a
        connection whose client has already left to finish freeing its session. A client that reconnects the
        moment its last session closed is served, not told "busy"; one still connected keeps its session."""
        active = self._active
        if active is None:
            return True
        if not active.ws.closed:
            return False
        deadline = asyncio.get_running_loop().time() + TEARDOWN_WAIT_S
        while self._active is not None and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(TEARDOWN_POLL_S)
        return self._active is None

    def end_session(self, reason: str) -> bool:
        """End the connected client's session from another thread (ComfyUI: the LiveTalk Live node is ending):
        the client gets the error ``ended`` with ``reason`` and a close 1001; its connection then stops the clock
        and frees the session as for any close. Returns at once (False: no client was connected)."""
        connection = self._active
        if connection is None:
            return False
        asyncio.run_coroutine_threadsafe(connection.end(reason), connection.loop)
        return True

    def _limit_send_buffer(self, request: web.Request) -> None:
        sock = request.transport.get_extra_info("socket") if request.transport else None
        if self.send_buffer_bytes and sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.send_buffer_bytes)


async def _refuse(ws: web.WebSocketResponse, error: ProtocolError) -> None:
    """Say why (an error message, then the close frame's reason) and close."""
    with contextlib.suppress(ConnectionError, RuntimeError):
        await ws.send_str(protocol.error_message(error.error_code, error.reason))
    await ws.close(code=error.code, message=error.close_reason.encode())


class LiveConnection:
    """One client's session: receive start, audio and stop; stream the blocks back."""

    def __init__(self, endpoint: LiveEndpoint, ws: web.WebSocketResponse, transport: asyncio.Transport | None = None):
        self.endpoint, self.ws, self.transport = endpoint, ws, transport
        self.stats = SessionStats()
        self.loop = asyncio.get_running_loop()
        self.budget = SendBudget(endpoint.max_pending_blocks)
        self.outbox: asyncio.Queue[EncodedBlock | BaseException] = asyncio.Queue()
        self.encoding = ThreadPoolExecutor(max_workers=1, thread_name_prefix="live-encode")
        self.session = self.clock = self.encoder = None
        self._client_samples_used = 0
        self._sender: asyncio.Task | None = None
        self._stopping = False

    async def run(self) -> None:
        try:
            await self.ws.send_str(protocol.text_message("hello", protocol=protocol.PROTOCOL_VERSION,
                                                         image=self.endpoint.image, limits=_limits()))
            await self._serve()
        except ProtocolError as error:
            self._closing(error.code, error.reason)
            await _refuse(self.ws, error)
        except ConnectionError as error:  # the client went away while we were sending (e.g. during start)
            self._closing(1006, f"connection lost: {error}")
        finally:
            await self._shut_down()

    async def _serve(self) -> None:
        async for message in self.ws:
            if message.type == WSMsgType.ERROR:  # aiohttp refused the frame (too big, broken) and closed
                code = message.data.code if isinstance(message.data, WebSocketError) else self.ws.close_code
                self._closing(code, str(message.data))
                return
            parsed = protocol.parse_client_message(message.data)
            if isinstance(parsed, Start):
                await self._start(parsed)
            elif isinstance(parsed, Audio):
                self._push(parsed.samples)
            elif isinstance(parsed, Stop):
                await self._stop()
                return
        self._closing(self.ws.close_code or protocol.CLOSE_NORMAL, "client closed the socket")

    def _closing(self, code: int, reason: str) -> None:
        if self.stats.closed_with is None:  # the first reason is the one (after end(), the socket's close follows)
            self.stats.closed_with, self.stats.close_reason = code, reason

    async def end(self, reason: str) -> None:
        """The server ends this session (see LiveEndpoint.end_session)."""
        error = ProtocolError(protocol.CLOSE_GOING_AWAY, reason, protocol.ENDED)
        self._closing(error.code, error.reason)
        await _refuse(self.ws, error)

    async def _start(self, start: Start) -> None:
        if self.session is not None:
            raise ProtocolError(protocol.CLOSE_POLICY, "start sent twice; one start per connection")
        await self.ws.send_str(protocol.text_message("loading"))
        try:
            self.session = await self.loop.run_in_executor(None, self.endpoint.open_session, start)
        except LiveTalkError as err:
            raise ProtocolError(protocol.CLOSE_POLICY, str(err), protocol.BAD_INPUT) from err
        except Exception as err:  # the model failed to start: the client hears why, the server goes on
            log.exception("live session failed to open")
            raise ProtocolError(protocol.CLOSE_SERVER_ERROR, f"the session could not start: {err}") from err
        session = self.session
        self.encoder = BlockEncoder(session.width, session.height, session.fps)
        reference = encode_png(session.reference_frame())
        header = {"width": session.width, "height": session.height, "mime": "image/png"}
        await self.ws.send_bytes(protocol.pack_binary(protocol.REFERENCE, header, reference))
        await self.ws.send_str(protocol.text_message("ready", **_session_info(session), family=self.endpoint.family))
        self._sender = asyncio.create_task(self._send_blocks())
        self.clock = self.endpoint.clock(session, self._on_block, on_error=self._on_error)
        self.clock.start()

    def _push(self, samples: np.ndarray) -> None:
        if self.clock is None:
            raise ProtocolError(protocol.CLOSE_POLICY, "audio before ready; send start and wait for ready")
        self.stats.client_samples += len(samples)
        ahead = (self.stats.client_samples - self._client_samples_used) / protocol.SAMPLE_RATE
        if ahead > protocol.MAX_AUDIO_AHEAD_SECONDS:  # the session's buffer would grow without bound
            raise ProtocolError(protocol.CLOSE_POLICY, f"audio arrives faster than it is spoken: {ahead:.0f} s not yet "
                                f"used (at most {protocol.MAX_AUDIO_AHEAD_SECONDS} s); send it at real-time pace")
        self.session.push_audio(samples)

    # --- blocks: clock thread -> encoder thread -> event loop -> socket -------------------------------
    def _on_block(self, block) -> None:
        """Called by the clock thread for each block, in order: keep it (encode, queue) or drop it whole."""
        if self._stopping:
            return
        self.stats.blocks_made += 1
        self._client_samples_used += int(block.speech_samples)
        header = {**_block_header(block, self._client_samples_used), "dropped_blocks": self.stats.blocks_dropped}
        if not self.budget.try_reserve():
            self.stats.blocks_dropped += 1
            self.encoding.submit(self.encoder.force_keyframe)
            return
        self.stats.most_pending = max(self.stats.most_pending, self.budget.most_pending)
        future = self.encoding.submit(self._encode, block, header)
        future.add_done_callback(self._queue_encoded)

    def _encode(self, block, header: dict) -> EncodedBlock:
        units, keyframe = self.encoder.encode(block.frames)
        header["keyframe"] = keyframe
        return EncodedBlock(protocol.block_message(header, units, protocol.float_to_pcm(block.audio)), len(units))

    def _queue_encoded(self, future) -> None:
        result = future.exception() or future.result()
        with contextlib.suppress(RuntimeError):  # the loop is gone: the server is shutting down
            self.loop.call_soon_threadsafe(self.outbox.put_nowait, result)

    def _on_error(self, error: BaseException) -> None:
        """The clock thread's session failed (e.g. out of GPU memory): close the socket with 1011."""
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.outbox.put_nowait, error)

    async def _send_blocks(self) -> None:
        while True:
            item = await self.outbox.get()
            if isinstance(item, BaseException):
                log.error("live session failed: %s", item)
                error = ProtocolError(protocol.CLOSE_SERVER_ERROR, f"the session failed: {item}")
                self._closing(error.code, error.reason)
                await _refuse(self.ws, error)
                return
            try:
                await self.ws.send_bytes(item.message)
            finally:
                self.budget.release()
            self.stats.blocks_sent += 1
            self.stats.frames_sent += item.frames
            self._note_buffered()

    def _note_buffered(self) -> None:
        """Record the most bytes the socket's transport has held unsent (bounded: aiohttp waits to drain)."""
        if self.transport is not None:
            buffered = self.transport.get_write_buffer_size()
            self.stats.most_buffered_bytes = max(self.stats.most_buffered_bytes, buffered)

    async def _stop(self) -> None:
        """Stop the clock, send what was made, then "stopped" and close normally."""
        self._stopping = True  # a block finished after the stop request is not sent
        if self.clock is not None:
            await self.loop.run_in_executor(None, self.clock.stop)
            await self.loop.run_in_executor(None, self.encoding.shutdown, True)
            deadline = time.monotonic() + STOP_DRAIN_S
            while self.budget.pending and time.monotonic() < deadline and not self._sender.done():
                await asyncio.sleep(0.01)  # the blocks already made still go out
        await self.ws.send_str(protocol.text_message(
            "stopped", blocks=self.stats.blocks_sent, frames=self.stats.frames_sent,
            dropped_blocks=self.stats.blocks_dropped))
        self._closing(protocol.CLOSE_NORMAL, "stopped")
        await self.ws.close(code=protocol.CLOSE_NORMAL, message=b"stopped")

    async def _shut_down(self) -> None:
        """Whatever ended the connection: stop the clock, free the session (its KV cache), stop the sender."""
        if self.clock is not None:
            await self.loop.run_in_executor(None, self.clock.stop)
        self.encoding.shutdown(wait=False, cancel_futures=True)
        if self._sender is not None:
            self._sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError, RuntimeError):
                await self._sender
        if self.session is not None:
            await self.loop.run_in_executor(None, self.session.close)
        if self.encoder is not None:
            self.encoder.close()
        if not self.ws.closed:
            await self.ws.close()


def _limits() -> dict:
    return {"max_message_bytes": protocol.MAX_MESSAGE_BYTES, "max_audio_chunk_bytes": protocol.MAX_AUDIO_CHUNK_BYTES,
            "max_audio_ahead_seconds": protocol.MAX_AUDIO_AHEAD_SECONDS,
            "max_prompt_chars": protocol.MAX_PROMPT_CHARS, "sample_rate": protocol.SAMPLE_RATE}


def _session_info(session) -> dict:
    return {"fps": session.fps, "width": session.width, "height": session.height, "sample_rate": session.sample_rate,
            "block_frames": session.block_frames, "first_block_frames": session.first_block_frames,
            "frame_audio_offset": int(getattr(session, "frame_audio_offset", 0)),
            "codec": protocol.VIDEO_CODEC, "format": protocol.VIDEO_FORMAT}


def _block_header(block, client_samples_end: int) -> dict:
    return {"index": int(block.index), "first_frame": int(block.first_frame), "frames": int(len(block.frames)),
            "audio_start": int(block.audio_start), "audio_samples": int(len(block.audio)),
            "speech_samples": int(block.speech_samples), "speech_runs": _speech_runs(block),
            "client_samples_end": client_samples_end, "generated_s": round(float(block.generated_s), 4)}


def _speech_runs(block) -> list[list[int]]:
    """Where the client's samples are in the block's audio, ``[[offset, length], ...]`` (a session without
    runs puts its speech first)."""
    runs = getattr(block, "speech_runs", None)
    if runs is None:
        runs = ((0, block.speech_samples),) if block.speech_samples else ()
    return [[int(offset), int(length)] for offset, length in runs]


def build_app(endpoint: LiveEndpoint, prefix: str = "/live") -> web.Application:
    """The standalone server's app: the page, its scripts, the socket and the status under ``prefix``."""
    app = web.Application()
    app.router.add_get("/", redirect_handler(f"{prefix}/"))
    add_routes(app.router, endpoint, prefix)
    return app


def add_routes(router, endpoint: LiveEndpoint, prefix: str) -> None:
    """The page, scripts, socket and status under ``prefix`` on an aiohttp router (ComfyUI's too)."""
    router.add_get(f"{prefix}/ws", endpoint.handle_socket)
    router.add_get(f"{prefix}/status", endpoint.status)
    router.add_get(f"{prefix}", redirect_handler(f"{prefix}/"))
    router.add_get(f"{prefix}/", page_file_handler("index.html"))
    for name in PAGE_FILES:
        router.add_get(f"{prefix}/{name}", page_file_handler(name))


def redirect_handler(location: str):
    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound(location)
    return redirect


def page_file_handler(name: str):
    """A handler serving ``web/<name>`` (only the page's own files: no directory listing or traversal)."""
    async def serve(request: web.Request) -> web.FileResponse:
        return web.FileResponse(WEB_DIR / name, headers={"Cache-Control": "no-cache"})
    return serve


# --- the command ---------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="livetalk live", description="Talk to the avatar: serve the live page and its socket (docs/live.md).",
        epilog="Any other option is a model option of the main command (python -m livetalk_core --help): --model, "
        "--dit, --models-dir, --skip-download, --size, --steps, --prompt (the default prompt), --precision, --device, "
        "--compile, --fp8, --fp8-kv-cache, ... They are checked, and the models loaded, once at start-up.")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s: this machine only; "
                   "the server has no authentication)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (default %(default)s)")
    p.add_argument("--smoke", action="store_true", help="tiny random weights on the CPU: checks the install")
    p.add_argument("--family", default="livetalk", choices=("livetalk", "realvideo"),
                   help="the tiny model's family with --smoke (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    return p


def smoke_opener(args: argparse.Namespace) -> SessionOpener:
    """Sessions on tiny random weights (CPU): the start message's image is the reference; its prompt is not
    encoded (the tiny model has no text encoder)."""
    from .session import open_smoke_session

    def open_for(start: Start):  # each session its own tiny models; a CPU has no CUDA graphs to keep warm
        image = None if start.image is None else decode_image(start.image)
        return open_smoke_session(args.family, seed=args.seed, reference_image=image)
    return open_for


@dataclass
class ModelOpener:
    """Sessions over the models the main command's options load (once, at start-up): a start message's
    prompt is encoded as the command encodes one (cached per prompt), its image is the reference. The
    sessions share one KV cache and its CUDA graphs, made before the first one (session.WarmSessions)."""

    inputs: object  # cli.RunInputs
    files: object  # cli.ModelFiles
    models: object  # cli.Models
    seed: int

    def __post_init__(self) -> None:
        from .session import WarmSessions

        self.sessions = WarmSessions(self.open_on)

    def __call__(self, start: Start):
        return self.sessions(start)

    def open_on(self, workspace, start: Start):
        from dataclasses import replace

        from .. import cli
        from .session import open_session

        inputs = self.inputs
        prompts = (start.prompt or inputs.prompts[0], inputs.prompts[1])
        talking, idle = cli.prompt_contexts(replace(inputs, prompts=prompts), self.files, inputs.runtime)
        device = inputs.runtime.device
        height, width = inputs.reference_pixels.shape[-2:]
        image = inputs.image if start.image is None else decode_image(start.image)
        return open_session(
            inputs.family, dit=self.models.dit, vae=self.models.vae, audio_encoder=self.models.audio_encoder,
            text=talking.to(device), idle_text=None if idle is None else idle.to(device), reference_image=image,
            width=width, height=height, seed=self.seed, steps=inputs.steps, decoder=self.models.decoder,
            workspace=workspace)


def decode_image(data: bytes) -> np.ndarray:
    """A start message's image file -> uint8 [H, W, 3]; InputError (bad_input) if it cannot be read."""
    import io

    import av

    from ..errors import InputError
    try:
        with av.open(io.BytesIO(data)) as container:
            frame = next(container.decode(video=0))
            return frame.to_ndarray(format="rgb24")
    except (av.error.FFmpegError, StopIteration) as err:
        raise InputError(f"the image could not be read ({err}); send a JPEG, PNG or WebP file") from err


@contextlib.contextmanager
def serving_in_thread(endpoint: LiveEndpoint, host: str = "127.0.0.1", port: int = 0):
    """Run the standalone app on its own event loop in a thread (tests, benchmarks); yields its http:// URL."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="live-server", daemon=True)
    thread.start()
    runner = web.AppRunner(build_app(endpoint))

    async def start() -> int:
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        return runner.addresses[0][1]
    try:
        bound = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=30)
        yield f"http://{host}:{bound}"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


def serve(endpoint: LiveEndpoint, host: str, port: int) -> None:
    """Run the standalone server until Ctrl-C."""
    app = build_app(endpoint)
    try:
        web.run_app(app, host=host, port=port, print=lambda _: print(
            f"live page: http://{host}:{port}/live/  (Ctrl-C stops)", flush=True))
    except OSError as err:
        raise InputError(f"cannot listen on {host}:{port} ({err.strerror or err}); pick another --port or --host") \
            from err


def run(args: argparse.Namespace, model_argv: list[str]) -> None:
    """Check everything, load the models once (unless --smoke), then serve until Ctrl-C."""
    from .clock import LiveClock

    if not 0 <= args.port <= 65535:
        raise InputError(f"--port {args.port} is not a port; use 1-65535 (0: any free port)")
    if args.smoke:
        if model_argv:
            raise InputError(f"--smoke runs the tiny model; leave out {' '.join(model_argv)}")
        serve(LiveEndpoint(open_session=smoke_opener(args), family=args.family, clock=LiveClock), args.host, args.port)
        return
    with model_opener(model_argv, args.seed) as (opener, family):
        serve(LiveEndpoint(open_session=opener, family=family, clock=LiveClock), args.host, args.port)


@contextlib.contextmanager
def model_opener(model_argv: list[str], seed: int):
    """The main command's model options checked, its weights fetched and its models loaded (as the command does
    it); yields (ModelOpener, family name) while the weight files exist."""
    from .. import cli

    parser = cli.build_parser()
    parser.prog = "livetalk live"
    model_args = parser.parse_args(model_argv)
    inputs = cli.check_arguments(model_args, parser)
    cli.fetch_weights(inputs, download=not model_args.skip_download)
    with cli.weight_files(inputs) as files:
        models = cli.load_models(inputs, files, inputs.runtime, 0, model_args)
        opener = ModelOpener(inputs, files, models, seed)
        try:
            yield opener, inputs.family.name
        finally:
            opener.sessions.free()


def main(argv: list[str] | None = None) -> int:
    from .. import cli

    args, model_argv = build_parser().parse_known_args(argv)
    cli.setup_logging()
    return cli.exit_code(lambda: run(args, model_argv))
