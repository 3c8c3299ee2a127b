"""The example workflows in ComfyUI's real front end, in headless Chromium (Debian ``chromium``).

Each UI workflow is loaded with the front end's own ``app.loadGraphData``; every node type must be
registered, every node must have every input its definition declares (as a widget or a socket),
and every widget must show the value the API twin gives it. A screenshot per workflow is written
to ``$LIVETALK_ARTIFACTS`` (default: the test's temporary folder); it is not committed.
Skipped when no Chromium is installed (it is not on PyPI, so .ci/run does not install it).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from comfy_env import REPO, free_port, livetalk_server

UI_FILES = sorted((REPO / "workflows").glob("*.json"))
BROWSERS = ("chromium", "chromium-headless-shell", "google-chrome", "chrome")

# Runs in the page after loadGraphData: what the front end made of the workflow.
INSPECT = """
(() => {
  const nodes = app.graph._nodes.map(node => ({
    id: String(node.id),
    type: node.type,
    registered: !!LiteGraph.registered_node_types[node.type],
    inputs: (node.inputs || []).map(i => i.name),
    widgets: Object.fromEntries((node.widgets || []).map(w => [w.name, w.value])),
  }));
  const dialogs = [...document.querySelectorAll('.p-dialog')].map(d => d.innerText);
  return JSON.stringify({nodes, dialogs});
})()
"""
CLOSE_DIALOGS = "document.querySelectorAll('.p-dialog-close-button').forEach(b => b.click())"


def _browser() -> str | None:
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


class DevTools:
    """A minimal Chrome DevTools Protocol client over one page's websocket."""

    def __init__(self, ws):
        self.ws, self.next_id = ws, 0

    async def call(self, method: str, **params):
        self.next_id += 1
        await self.ws.send_json({"id": self.next_id, "method": method, "params": params})
        while True:
            message = await self.ws.receive_json(timeout=60)
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    async def evaluate(self, expression: str):
        result = await self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page error: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not await self.evaluate(expression):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the page never satisfied {expression}")
            await asyncio.sleep(0.5)


@pytest.fixture(scope="module")
def browser_port(tmp_path_factory):
    browser = _browser()
    if browser is None:
        message = "no Chromium installed (apt-get install chromium)"
        pytest.fail(message)
    port = free_port()
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    process = subprocess.Popen(
        [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         f"--remote-debugging-port={port}", f"--user-data-dir={profile}", "--window-size=1600,1000", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/json/version", timeout=2)
            break
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                pytest.fail("Chromium did not start")
            time.sleep(0.3)
    yield port
    process.terminate()
    process.wait(timeout=20)
    shutil.rmtree(profile, ignore_errors=True)


async def _open_in_front_end(port: int, comfy_url: str, workflow: dict, screenshot: Path) -> dict:
    """Open ``workflow`` in a tab of its own browser context: a fresh profile per workflow, as the
    front end restores the previous session's workflows (and their model checks) from local storage."""
    import aiohttp

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/version", timeout=10) as response:
        browser_websocket = json.loads(response.read())["webSocketDebuggerUrl"]
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(browser_websocket, max_msg_size=0) as ws:
            browser = DevTools(ws)
            context = (await browser.call("Target.createBrowserContext"))["browserContextId"]
            try:
                target = await browser.call("Target.createTarget", url="about:blank", browserContextId=context)
                page_websocket = f"ws://127.0.0.1:{port}/devtools/page/{target['targetId']}"
                return await _inspect_page(page_websocket, comfy_url, workflow, screenshot)
            finally:
                await browser.call("Target.disposeBrowserContext", browserContextId=context)


async def _inspect_page(page_websocket: str, comfy_url: str, workflow: dict, screenshot: Path) -> dict:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(page_websocket, max_msg_size=0) as ws:
            tools = DevTools(ws)
            await tools.call("Page.enable")
            await tools.call("Page.navigate", url=comfy_url)
            await tools.wait_for("!!(window.app && window.app.graph && window.LiteGraph && "
                                 "Object.keys(LiteGraph.registered_node_types).length > 100)", timeout=120)
            await tools.evaluate(f"app.loadGraphData({json.dumps(workflow)})")
            await asyncio.sleep(2)  # let dialogs and widgets settle before looking and taking the picture
            state = json.loads(await tools.evaluate(INSPECT))
            await tools.evaluate(CLOSE_DIALOGS)
            await asyncio.sleep(1)
            shot = await tools.call("Page.captureScreenshot", format="png")
            screenshot.write_bytes(base64.b64decode(shot["data"]))
            return state


@pytest.mark.parametrize("ui_path", UI_FILES, ids=lambda p: p.stem)
def test_example_workflow_opens_in_the_real_front_end(ui_path, browser_port, request, tmp_path):
    comfy = livetalk_server(request)
    object_info = comfy.get("/object_info")
    api = json.loads((REPO / "workflows" / "api" / f"{ui_path.stem}_api.json").read_text())
    artifacts = Path(os.environ.get("LIVETALK_ARTIFACTS", tmp_path))
    artifacts.mkdir(parents=True, exist_ok=True)
    screenshot = artifacts / f"{ui_path.stem}.png"
    comfy.post("/settings/Comfy.TutorialCompleted", True)  # no first-run template browser over the graph

    state = asyncio.run(_open_in_front_end(browser_port, comfy.url, json.loads(ui_path.read_text()), screenshot))

    assert screenshot.stat().st_size > 10_000
    assert not [d for d in state["dialogs"] if "missing" in d.lower() and "node" in d.lower()], state["dialogs"]
    # The test server holds every model file except the full umT5 (CI cannot), so that is the only
    # download the front end may ask for.
    missing_models = " ".join(d for d in state["dialogs"] if "Missing Models" in d)
    for name in next(n for n in api.values() if n["class_type"] == "LoadLiveTalkModel")["inputs"].values():
        if isinstance(name, str):
            assert name not in missing_models, missing_models
    assert {n["id"] for n in state["nodes"]} == set(api)
    for node in state["nodes"]:
        assert node["registered"], f"{node['type']} is not a known node type in the front end"
        info = object_info[node["type"]]
        for name in [*info["input"].get("required", {}), *info["input"].get("optional", {})]:
            assert name in node["widgets"] or name in node["inputs"], f"{node['type']} lost its input {name}"
        for name, value in api[node["id"]]["inputs"].items():
            if not isinstance(value, list):
                assert node["widgets"].get(name) == value, f"{node['type']}.{name}: {node['widgets'].get(name)!r} != {value!r}"
