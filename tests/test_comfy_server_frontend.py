"""The example workflows in ComfyUI's real front end, in headless Chromium (Debian ``chromium``).

Each UI workflow is opened as its template card opens it: the page asks the server for the pack's
templates (exactly the UI workflows must be listed), fetches the card's file from the template route
and loads it with the front end's own ``app.loadGraphData``; every node type must be
registered, every node must have every input its definition declares (as a widget or a socket),
every widget must show the value the API twin gives it, and no node may cover another once the
front end has sized them (a node with more widgets than its saved size grows). Then the API twin
runs (tiny models, the tiny text branch) for the page's own client, so the nodes show their
progress previews and the saved video as a user sees them, and again no node may cover another.
Screenshots (``<workflow>.png`` on opening, ``<workflow>_run.png`` after the run) are written to
``$LIVETALK_ARTIFACTS`` (default: the test's temporary folder); they are not committed. Fails when
no Chromium is installed (it is not on PyPI; .ci/run installs Debian's).
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
from comfy_env import PACK_DIR_NAME, REPO, free_port, livetalk_server, with_tiny_text_encoder

# The UI-format workflows (an API-format file has no "nodes"): the only files that may be template cards.
UI_FILES = [p for p in sorted((REPO / "workflows").glob("*.json")) if "nodes" in json.loads(p.read_text())]
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
# Every node's area on the canvas (title bar included) once the canvas has drawn it: the front end
# grows a node to fit its widgets and its previews when it draws it.
BOUNDS = """
(() => {
  app.canvas.setDirty(true, true);
  app.canvas.draw(true, true);
  return JSON.stringify(app.graph._nodes.map(node => ({
    id: String(node.id), title: node.title, rect: Array.from(node.getBounding()),
  })));
})()
"""
CLIENT_ID = "window.app.api.clientId || sessionStorage.getItem('clientId')"
# Two nodes may share an edge; an overlap smaller than this (in canvas units) is a shared border.
TOUCHING = 1.0
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


async def _open_in_front_end(port: int, comfy_url: str, template_name: str, screenshots: Path, run) -> dict:
    """Open the template ``template_name`` in a tab of its own browser context: a fresh profile per workflow, as the
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
                return await _inspect_page(page_websocket, comfy_url, template_name, screenshots, run)
            finally:
                await browser.call("Target.disposeBrowserContext", browserContextId=context)


async def _screenshot(tools: DevTools, path: Path) -> None:
    shot = await tools.call("Page.captureScreenshot", format="png")
    path.write_bytes(base64.b64decode(shot["data"]))


async def _inspect_page(page_websocket: str, comfy_url: str, template_name: str, screenshots: Path, run) -> dict:
    """Open the pack's template card ``template_name`` as the front end does, look at it, then
    ``run(client_id)`` the prompt for this page and look again.
    Returns what the front end showed: ``nodes``, ``dialogs``, ``bounds`` and ``bounds_after_run``."""
    import aiohttp

    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(page_websocket, max_msg_size=0) as ws:
            tools = DevTools(ws)
            await tools.call("Page.enable")
            await tools.call("Page.navigate", url=comfy_url)
            await tools.wait_for("!!(window.app && window.app.graph && window.LiteGraph && "
                                 "Object.keys(LiteGraph.registered_node_types).length > 100)", timeout=120)
            open_card = OPEN_TEMPLATE_CARD % json.dumps([PACK_DIR_NAME, template_name])
            state_cards = json.loads(await tools.evaluate(open_card))
            await asyncio.sleep(2)  # let dialogs and widgets settle before looking and taking the picture
            state = json.loads(await tools.evaluate(INSPECT))
            state["template_cards"] = state_cards
            await tools.evaluate(CLOSE_DIALOGS)
            await asyncio.sleep(1)
            state["bounds"] = json.loads(await tools.evaluate(BOUNDS))
            await _screenshot(tools, screenshots / "opened.png")
            await asyncio.to_thread(run, await tools.evaluate(CLIENT_ID))
            await asyncio.sleep(3)  # the last preview and the saved video reach the nodes
            state["bounds_after_run"] = json.loads(await tools.evaluate(BOUNDS))
            await _screenshot(tools, screenshots / "run.png")
            return state


# What a click on the pack's template card does: the page asks the server for the pack's templates,
# fetches the card's file from the template route and opens it. %s is the JSON pair
# [the pack's folder name, the workflow's file stem].
OPEN_TEMPLATE_CARD = """(async () => {
  const [pack, name] = %s;
  const cards = (await (await fetch('api/workflow_templates')).json())[pack] || [];
  const response = await fetch(`api/workflow_templates/${pack}/${name}.json`);
  if (response.ok) await app.loadGraphData(await response.json());
  return JSON.stringify({cards, status: response.status});
})()"""


def overlaps(bounds: list[dict]) -> list[str]:
    """Every pair of nodes whose areas ``[x, y, w, h]`` intersect (more than along a shared edge)."""
    found = []
    for index, a in enumerate(bounds):
        for b in bounds[index + 1:]:
            (ax, ay, aw, ah), (bx, by, bw, bh) = a["rect"], b["rect"]
            width = min(ax + aw, bx + bw) - max(ax, bx)
            height = min(ay + ah, by + bh) - max(ay, by)
            if width > TOUCHING and height > TOUCHING:
                found.append(f"{a['title']} {a['rect']} and {b['title']} {b['rect']} "
                             f"overlap by {width:.0f} x {height:.0f}")
    return found


def test_overlaps_are_found():
    """The overlap check itself: a node grown over its neighbour is found, nodes side by side are not."""
    loader = {"title": "loader", "rect": [0, -30, 380, 392]}
    assert overlaps([loader, {"title": "clip", "rect": [0, 240, 380, 140]}])
    assert overlaps([loader, {"title": "right", "rect": [380, 0, 100, 100]}]) == []


def run_for_client(comfy, prompt: dict, client_id: str) -> None:
    """Queue ``prompt`` for the page's websocket client (so it gets the progress and previews) and wait for it.
    A live workflow runs until Stop: once its LiveTalk Live node serves, Stop is pressed (its route)."""
    status, body = comfy.post("/prompt", {"prompt": prompt, "client_id": client_id})
    assert status == 200, body
    prompt_id, deadline = body["prompt_id"], time.monotonic() + 600
    if any(node["class_type"] == "LiveTalkLive" for node in prompt.values()):
        while not comfy.get("/livetalk/live/status")["running"]:
            assert time.monotonic() < deadline, "the LiveTalk Live node never ran"
            time.sleep(0.5)
        assert comfy.post("/livetalk/live/stop", {})[0] == 200
    while not comfy.get(f"/history/{prompt_id}").get(prompt_id, {}).get("status", {}).get("completed"):
        assert time.monotonic() < deadline, f"prompt {prompt_id} did not finish"
        time.sleep(1)


@pytest.mark.parametrize("ui_path", UI_FILES, ids=lambda p: p.stem)
def test_example_workflow_opens_in_the_real_front_end(ui_path, browser_port, request, tmp_path):
    comfy = livetalk_server(request)
    object_info = comfy.get("/object_info")
    api = json.loads((REPO / "workflows" / "api" / f"{ui_path.stem}_api.json").read_text())
    artifacts = Path(os.environ.get("LIVETALK_ARTIFACTS", tmp_path))
    artifacts.mkdir(parents=True, exist_ok=True)
    comfy.post("/settings/Comfy.TutorialCompleted", True)  # no first-run template browser over the graph
    prompt = with_tiny_text_encoder(api)
    loader = next(node for node in prompt.values() if node["class_type"] == "LoadLiveTalkModel")
    loader["inputs"]["precision"] = "fp32"  # CPU bf16 matmuls of the tiny 40-layer 14B DiT take minutes
    shots = tmp_path / "shots"
    shots.mkdir()

    state = asyncio.run(_open_in_front_end(browser_port, comfy.url, ui_path.stem, shots,
                                           lambda client_id: run_for_client(comfy, prompt, client_id)))
    (artifacts / f"{ui_path.stem}_bounds.json").write_text(json.dumps(
        {"opened": state["bounds"], "after_run": state["bounds_after_run"]}, indent=1))
    for shot, name in (("opened.png", f"{ui_path.stem}.png"), ("run.png", f"{ui_path.stem}_run.png")):
        assert (shots / shot).stat().st_size > 10_000
        shutil.copyfile(shots / shot, artifacts / name)

    # The template browser's cards are exactly the UI workflows, and this one opens from its card.
    # (in any order: the server lists the folder in the file system's order)
    cards = state["template_cards"]
    assert sorted(cards["cards"]) == [p.stem for p in UI_FILES] and cards["status"] == 200, cards
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
                shown = node["widgets"].get(name)
                assert shown == value, f"{node['type']}.{name}: {shown!r} != {value!r}"
    assert overlaps(state["bounds"]) == [], "nodes cover each other when the workflow opens"
    assert overlaps(state["bounds_after_run"]) == [], "previews or the video grow nodes over others"
