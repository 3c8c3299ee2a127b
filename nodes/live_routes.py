"""The live routes on ComfyUI's own server (no second port), between the LiveTalk Live node and its clients.

The socket, the status and the page's files are the standalone server's (``livetalk_core.live.server``:
one :class:`LiveEndpoint`, so both servers accept, refuse and stream alike; docs/live.md), mounted under
:data:`ROUTE_PREFIX` on ``PromptServer.instance.routes`` when the pack loads. ComfyUI also serves every
route under ``/api`` (``/api/livetalk/live/ws``, ...). What ComfyUI adds:

- a session can only start while a LiveTalk Live node runs: the node *offers* a session opener over its
  loaded models (:meth:`LiveHost.offering`); a client that starts with no node running is told to queue
  one (error ``bad_input``, close 1008);
- ``POST /livetalk/live/stop`` ends the running node (the panel's Stop button);
- ``GET /livetalk/live/status`` also says whether a node runs (``running``, ``node_id``) and how many
  sessions are still in memory (``sessions_alive``: 0 once every client's session is closed and freed);
- when the node ends (Stop or ComfyUI's Cancel), the connected client's session is ended and closed (its
  KV cache freed) before the node returns.

The node runs in ComfyUI's prompt thread, the routes in the server's event loop: :class:`LiveHost` is
the thread-safe meeting point.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from ..livetalk_core.errors import InputError

log = logging.getLogger(__name__)

ROUTE_PREFIX = "/livetalk/live"
SOCKET_PATH = f"{ROUTE_PREFIX}/ws"
STATUS_PATH = f"{ROUTE_PREFIX}/status"
STOP_PATH = f"{ROUTE_PREFIX}/stop"
# How long the ending node waits for the connected client to be told and its session closed (the clock
# finishes its block), before it cancels the socket's handler; then how long it waits for that.
END_CLIENT_GRACE_S = 30.0
END_CLIENT_TIMEOUT_S = 30.0
ENDED_BY_STOP = "the LiveTalk Live node was ended in ComfyUI (Stop); queue the workflow again to talk"
ENDED_BY_CANCEL = "the LiveTalk Live node was cancelled in ComfyUI; queue the workflow again to talk"
NO_NODE_RUNNING = ("No LiveTalk Live node is serving in ComfyUI. Queue a workflow with a LiveTalk Live node "
                   "(e.g. the live_livetalk_1.3b template) and connect once it serves (it loads its models first; "
                   "GET /livetalk/live/status then says running).")


@dataclass
class LiveSummary:
    """What one run of the node served, shown on the node when it ends."""

    clients: int = 0
    frames: int = 0

    def text(self) -> str:
        return f"{self.clients} client session(s), {self.frames} frames sent"


@dataclass
class LiveOffer:
    """A running LiveTalk Live node: ``open_session()`` opens a session over its loaded models (blocking;
    called in a worker thread per client); ``stop`` is set by the Stop route and makes the node return."""

    open_session: Callable[[], Any]
    node_id: str | None = None
    family: str = ""
    stop: threading.Event = field(default_factory=threading.Event)
    summary: LiveSummary = field(default_factory=LiveSummary)


class LiveHost:
    """The one offer (at most one node runs: ComfyUI runs one prompt at a time) and the socket handlers
    serving it. Called from the prompt thread (offering) and the event loop (the routes)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._offer: LiveOffer | None = None
        self._handlers: set[tuple[asyncio.AbstractEventLoop, asyncio.Task]] = set()
        self._handlers_done = threading.Condition(self._lock)
        self._sessions: weakref.WeakSet = weakref.WeakSet()  # every session opened and not yet garbage
        self.endpoint = None  # the LiveEndpoint, once mounted

    @contextlib.contextmanager
    def offering(self, offer: LiveOffer) -> Iterator[None]:
        """While the node runs: sessions open over its models. On leaving, the connected client's
        session is ended and closed before this returns."""
        with self._lock:
            if self._offer is not None:
                raise InputError("Another LiveTalk Live node is already serving; stop it first.")
            self._offer = offer
        if self.endpoint is not None:
            self.endpoint.family = offer.family
        try:
            yield
        finally:
            with self._lock:
                self._offer = None
            self._end_clients(ENDED_BY_STOP if offer.stop.is_set() else ENDED_BY_CANCEL)

    def open_session(self, start) -> Any:
        """The endpoint's session opener (a worker thread): the running node's, or a refusal saying what to do.
        The start message's image and prompt are not used: the node's reference and conditioning are."""
        offer = self._offer
        if offer is None:
            raise InputError(NO_NODE_RUNNING)
        session = offer.open_session()
        offer.summary.clients += 1
        self._sessions.add(session)
        return session

    def sessions_alive(self) -> int:
        """Sessions still in memory (with their KV cache): 0 once every client's session was closed and let go."""
        if self._sessions and not (self.endpoint is not None and self.endpoint.busy):
            gc.collect()  # a session in a reference cycle is only gone after a collection (not mid-session: no hiccup)
        return len(self._sessions)

    def stop(self) -> bool:
        """End the running node (the Stop route); False when none runs."""
        offer = self._offer
        if offer is None:
            return False
        offer.stop.set()
        return True

    async def handle_socket(self, request: web.Request) -> web.StreamResponse:
        """The endpoint's socket handler, tracked so that the ending node can end its client."""
        entry = (asyncio.get_running_loop(), asyncio.current_task())
        offer, stats_before = self._offer, self.endpoint.last
        with self._lock:
            self._handlers.add(entry)
        try:
            return await self.endpoint.handle_socket(request)
        finally:
            if offer is not None and self.endpoint.last is not stats_before:  # this client had the session
                offer.summary.frames += self.endpoint.last.frames_sent
            with self._lock:
                self._handlers.discard(entry)
                self._handlers_done.notify_all()

    def _end_clients(self, reason: str) -> None:
        """Tell the connected client ``reason`` and close its socket (error ``ended``, close 1001; its connection
        stops the clock and closes the session), and wait until the socket handlers are gone. Handlers still
        there after :data:`END_CLIENT_GRACE_S` are cancelled (the session is closed on the way out)."""
        if self.endpoint is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: the server is shutting down
                self.endpoint.end_session(reason)
        with self._lock:
            if self._handlers_done.wait_for(lambda: not self._handlers, END_CLIENT_GRACE_S):
                return
            for loop, task in self._handlers:
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(task.cancel)
            if not self._handlers_done.wait_for(lambda: not self._handlers, END_CLIENT_TIMEOUT_S):
                log.warning("LiveTalk Live: a client's session did not close within %.0f s", END_CLIENT_TIMEOUT_S)

    async def status(self, request: web.Request) -> web.Response:
        """The endpoint's status plus whether a node runs."""
        response = await self.endpoint.status(request)
        offer = self._offer
        body = {**json.loads(response.body), "running": offer is not None,
                "node_id": None if offer is None else offer.node_id, "sessions_alive": self.sessions_alive()}
        return web.json_response(body)

    async def stop_route(self, request: web.Request) -> web.Response:
        if self.stop():
            return web.json_response({"stopped": True})
        return web.json_response({"stopped": False, "message": NO_NODE_RUNNING}, status=409)


HOST = LiveHost()


def _clock(session, on_block, **options):
    """The session's driver (``livetalk_core.live.clock.LiveClock``), imported when a client starts."""
    from ..livetalk_core.live.clock import LiveClock

    return LiveClock(session, on_block, **options)


class _RouteTable:
    """``router.add_get`` (what ``livetalk_core.live.server.add_routes`` calls) on an aiohttp RouteTableDef
    (ComfyUI's ``PromptServer.instance.routes``), with the socket and the status routed through ``host``."""

    def __init__(self, routes: web.RouteTableDef, host: LiveHost) -> None:
        self.routes, self.host = routes, host

    def add_get(self, path: str, handler) -> None:
        wrapped = {SOCKET_PATH: self.host.handle_socket, STATUS_PATH: self.host.status}.get(path, handler)
        self.routes.get(path)(wrapped)


def mount_on(routes: web.RouteTableDef, host: LiveHost = HOST, clock: Callable = _clock) -> None:
    """The live routes on ``routes``: the endpoint's socket, status and page under :data:`ROUTE_PREFIX`, and Stop."""
    from ..livetalk_core.live.server import LiveEndpoint, add_routes

    host.endpoint = LiveEndpoint(open_session=host.open_session, image="ignored", clock=clock)
    add_routes(_RouteTable(routes, host), host.endpoint, ROUTE_PREFIX)
    routes.post(STOP_PATH)(host.stop_route)


def mount() -> bool:
    """Add the live routes to the running ComfyUI server (called when the pack loads; ComfyUI adds the
    routes to its app after every pack has loaded). False outside a ComfyUI server (pytest, in-process)."""
    try:
        from server import PromptServer
    except ImportError:
        return False
    server = getattr(PromptServer, "instance", None)
    if server is None:
        return False
    mount_on(server.routes)
    return True
