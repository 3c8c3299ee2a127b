"""The LiveTalk Live node's routes (nodes/live_routes.py) on an aiohttp server, without ComfyUI: what the
node offers, what a client gets with and without a running node, Stop, and the node's end taking the
connected client's session with it. The real ComfyUI server runs them in test_live_comfyui.py.

Sessions here are tiny random-weight ones on the CPU (``open_smoke_session``) driven by the real
``LiveClock``, as in ComfyUI; the routes are mounted on a RouteTableDef as on ComfyUI's PromptServer.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib
import json
import threading
import time
import urllib.error
import urllib.request
import weakref

import numpy as np
import pytest
from comfy_env import import_pack

from livetalk_core.errors import LiveTalkError
from livetalk_core.live import protocol
from livetalk_core.live.client import run_client

PACKAGE = "livetalk_pack_live_routes"
RATE = protocol.SAMPLE_RATE


@pytest.fixture(scope="module")
def routes_module():
    import_pack(PACKAGE)
    return importlib.import_module(f"{PACKAGE}.nodes.live_routes")


@pytest.fixture(scope="module")
def smoke_session():
    """A factory of tiny LiveTalk sessions (CPU); ``opened`` holds weak references to them, so a test sees
    whether a session is still in memory."""
    from livetalk_core.live.session import open_smoke_session

    def open_new():
        session = open_smoke_session("livetalk")
        open_new.opened.append(weakref.ref(session))
        return session
    open_new.opened = []
    return open_new


@contextlib.contextmanager
def serving(routes_module):
    """A fresh LiveHost with the live routes mounted, served in a thread; yields (host, base URL)."""
    from aiohttp import web

    from livetalk_core.live.clock import LiveClock

    host = routes_module.LiveHost()
    table = web.RouteTableDef()
    routes_module.mount_on(table, host=host, clock=LiveClock)
    app = web.Application()
    app.add_routes(table)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    runner = web.AppRunner(app)

    async def start() -> int:
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return site._server.sockets[0].getsockname()[1]
    port = asyncio.run_coroutine_threadsafe(start(), loop).result(30)
    try:
        yield host, f"http://127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@contextlib.contextmanager
def node_running(routes_module, host, open_session):
    """What the node's execute does around its wait: offer sessions until Stop; yields the offer and the
    thread (it ends when the offering has ended, i.e. the node would return)."""
    offer = routes_module.LiveOffer(open_session=open_session, node_id="5", family="livetalk")
    started = threading.Event()

    def node():
        with host.offering(offer):
            started.set()
            offer.stop.wait(120)
    thread = threading.Thread(target=node, daemon=True)
    thread.start()
    started.wait(10)
    try:
        yield offer, thread
    finally:
        offer.stop.set()
        thread.join(120)


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def freed(url: str, timeout: float = 10.0) -> dict:
    """The status once no session is left in memory (the server's teardown takes moments), or at the timeout."""
    deadline = time.monotonic() + timeout
    while (state := get_json(f"{url}/livetalk/live/status"))["sessions_alive"] and time.monotonic() < deadline:
        time.sleep(0.1)
    return state


def post(url: str) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=b"{}", method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def tone(seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (np.round(0.3 * np.sin(2 * np.pi * 220 * t) * 32767) / 32768).astype(np.float32)


def test_without_a_running_node_a_client_is_told_to_queue_one(routes_module):
    with serving(routes_module) as (host, url):
        state = get_json(f"{url}/livetalk/live/status")
        assert state["running"] is False and state["busy"] is False
        with pytest.raises(LiveTalkError, match="No LiveTalk Live node is serving"):
            run_client(f"{url}/livetalk/live", tone(0.2))
        status, body = post(f"{url}/livetalk/live/stop")
        assert status == 409 and "No LiveTalk Live node" in body["message"]
        # the page and its scripts are served under the prefix (the panel imports the client module)
        with urllib.request.urlopen(f"{url}/livetalk/live/live_client.js", timeout=30) as response:
            assert response.status == 200


def test_a_client_of_the_running_node_streams_and_stop_ends_the_node(routes_module, smoke_session):
    with serving(routes_module) as (host, url), node_running(routes_module, host, smoke_session) as (offer, thread):
        assert get_json(f"{url}/livetalk/live/status")["running"] is True
        recording = run_client(f"{url}/livetalk/live", tone(1.0))
        report = recording.report()
        assert report["returned_audio_exact"] and report["frames"] >= 16
        assert post(f"{url}/livetalk/live/stop") == (200, {"stopped": True})
        thread.join(60)
        assert not thread.is_alive(), "Stop did not end the node"
        assert offer.summary.clients == 1 and offer.summary.frames == report["frames"]
        state = freed(url)
        assert state["running"] is False and state["sessions_alive"] == 0


async def _connect_and_hold(url: str, ready: threading.Event) -> tuple[int | None, list[dict]]:
    """A client that starts a session and then only listens, until the server closes the socket."""
    import aiohttp

    texts = []
    async with aiohttp.ClientSession() as http, http.ws_connect(f"{url}/livetalk/live/ws") as ws:
        await ws.send_str(protocol.text_message("start"))
        async for message in ws:
            if message.type == aiohttp.WSMsgType.TEXT:
                texts.append(json.loads(message.data))
                if texts[-1]["type"] == "ready":
                    ready.set()
        return ws.close_code, texts


def test_the_node_ending_ends_the_connected_clients_session(routes_module, smoke_session):
    """Cancel or Stop while a client is connected: its session is closed (KV cache freed) before the node
    returns, and the client's socket is closed."""
    with serving(routes_module) as (host, url):
        with node_running(routes_module, host, smoke_session) as (offer, thread):
            ready = threading.Event()
            result = {}
            client = threading.Thread(target=lambda: result.update(
                outcome=asyncio.run(_connect_and_hold(url, ready))), daemon=True)
            client.start()
            assert ready.wait(120), "the session never became ready"
            assert host.sessions_alive() == 1
            time.sleep(0.5)
        # node_running's exit set Stop and joined the node: the offering is over
        assert not thread.is_alive()
        client.join(30)
        assert "outcome" in result, "the client's socket was not closed when the node ended"
        code, texts = result["outcome"]
        # the client is told why: error "ended" with the reason, then close 1001 (going away)
        assert code == protocol.CLOSE_GOING_AWAY and texts[-1]["code"] == protocol.ENDED, result["outcome"]
        assert "ended in ComfyUI (Stop)" in texts[-1]["message"]
        # the server's teardown (handler task, executor jobs) lets go of the session within moments
        deadline = time.monotonic() + 10
        while smoke_session.opened[-1]() is not None and time.monotonic() < deadline:
            gc.collect()
            time.sleep(0.1)
        assert smoke_session.opened[-1]() is None, "the ended client's session (its KV cache) is still in memory"
        assert freed(url)["sessions_alive"] == 0
