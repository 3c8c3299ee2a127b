"""The LiveTalk Live panel in ComfyUI's real front end, in headless Chromium with a fake microphone.

Chromium's fake capture device plays a WAV of speech (``--use-fake-device-for-media-stream
--use-file-for-fake-audio-capture``). The page opens the live workflow from its template card; the
tiny-model twin is queued for the page's client, so the node's panel connects when the node starts; the
test presses the panel's microphone button, waits until the panel has shown video frames and played
the blocks' audio, takes a picture of the panel (``$LIVETALK_ARTIFACTS``/live_comfyui.png, default the
test's temporary folder), presses Stop and checks that the prompt finished and no session is left in
memory. Fails when no Chromium or no ComfyUI is installed.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
import urllib.request
from pathlib import Path

import pytest
from comfy_env import PACK_DIR_NAME, livetalk_server
from test_comfy_server_frontend import CLOSE_DIALOGS, DevTools
from test_live_comfyui import (
    LIVE_1_3B_API,
    PREFIX,
    end_any_live_node,
    live_prompt,
    speech_16k,
    status,
    wait_for_status,
    write_wav,
)
from test_live_server import launch_chromium

SPEECH_SECONDS = 3.0
LIVE_NODE_ID = "5"  # the LiveTalk Live node's id in the shipped live workflows
# Enough of the session for the test: frames drawn and block audio played after the microphone was on.
FRAMES_WANTED = 24
PAGE_SIZE = {"width": 1400, "height": 1100}  # room for the whole node beside ComfyUI's floating menus
PANEL = f"app.graph.getNodeById({LIVE_NODE_ID}).livetalkLivePanel"


@pytest.fixture(scope="module")
def fake_microphone_browser(tmp_path_factory):
    """Chromium whose microphone is a WAV of speech (played in a loop), permissions granted, autoplay allowed
    (test_live_server's launcher, as for the standalone page)."""
    folder = tmp_path_factory.mktemp("chromium")
    process, port = launch_chromium(folder, write_wav(folder / "speech.wav", speech_16k(SPEECH_SECONDS)))
    yield port
    process.terminate()
    process.wait(timeout=20)


OPEN_LIVE_TEMPLATE = f"""(async () => {{
  const response = await fetch('api/workflow_templates/{PACK_DIR_NAME}/live_livetalk_1.3b.json');
  await app.loadGraphData(await response.json());
  return response.status;
}})()"""
# What the panel shows: the shared client's counters and the node's state line.
PANEL_STATE = f"""(() => {{
  // how much the drawn picture varies (0 for a blank canvas)
  const spread = (canvas) => {{
    const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
    let min = 255, max = 0;
    for (let i = 0; i < data.length; i += 4) {{ min = Math.min(min, data[i]); max = Math.max(max, data[i]); }}
    return max - min;
  }};
  const panel = {PANEL};
  const client = panel.client;
  return JSON.stringify({{
    node_state: panel.nodeState.textContent,
    client_status: client ? client.statusText : null,
    connected: !!(client && client.socket && client.socket.readyState === WebSocket.OPEN),
    reference_shown: !!(client && client.stats.referenceShown),
    frames: client ? client.stats.framesDrawn : 0,
    audio: client ? client.stats.audioBuffersScheduled : 0,
    speech_sent: client ? client.stats.speechSamplesSent : 0,
    audio_running: !!(client && client.audio && client.audio.state === "running"),
    canvas_spread: client ? spread(client.canvas) : 0,
  }});
}})()"""
# The whole live node on screen, right of the workflow menu, for the picture.
SHOW_LIVE_NODE = f"""(() => {{
  const node = app.graph.getNodeById({LIVE_NODE_ID});
  app.canvas.ds.scale = 1;
  app.canvas.ds.offset = [420 - node.pos[0], 160 - node.pos[1]];
  app.canvas.setDirty(true, true);
  return true;
}})()"""
NODE_RECT = f"""(() => {{
  const node = app.graph.getNodeById({LIVE_NODE_ID});
  const [x, y, w, h] = node.getBounding();
  const [left, top] = app.canvas.ds.convertOffsetToCanvas([x, y]);
  const box = app.canvas.canvas.getBoundingClientRect();
  const scale = app.canvas.ds.scale;
  return JSON.stringify([box.left + left, box.top + top, w * scale, h * scale]);
}})()"""
async def _panel_state(tools: DevTools) -> dict:
    return json.loads(await tools.evaluate(PANEL_STATE))


def _finished(comfy, prompt_id: str, timeout: float = 120.0) -> dict:
    """The history of a prompt queued for the page's client (this test's listener does not get its messages)."""
    deadline = time.monotonic() + timeout
    while not (entry := comfy.get(f"/history/{prompt_id}").get(prompt_id, {})).get("status", {}).get("completed"):
        assert time.monotonic() < deadline, f"prompt {prompt_id} did not finish:\n{comfy.log()[-3000:]}"
        time.sleep(0.5)
    return entry


async def _drive_panel(port: int, comfy, artifacts: Path) -> dict:
    """Open the live workflow, queue the tiny twin for this page, talk, look, Stop. Returns the panel's states."""
    import aiohttp

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/version", timeout=10) as response:
        browser_websocket = json.loads(response.read())["webSocketDebuggerUrl"]
    async with aiohttp.ClientSession() as session, session.ws_connect(browser_websocket, max_msg_size=0) as ws:
        browser = DevTools(ws)
        target = await browser.call("Target.createTarget", url="about:blank")
        page = f"ws://127.0.0.1:{port}/devtools/page/{target['targetId']}"
        async with session.ws_connect(page, max_msg_size=0) as page_ws:
            tools = DevTools(page_ws)
            await tools.call("Page.enable")
            await tools.call("Emulation.setDeviceMetricsOverride", **PAGE_SIZE, deviceScaleFactor=1, mobile=False)
            await tools.call("Page.navigate", url=comfy.url)
            await tools.wait_for("!!(window.app && window.app.graph && window.LiteGraph && "
                                 "Object.keys(LiteGraph.registered_node_types).length > 100)", timeout=120)
            assert await tools.evaluate(OPEN_LIVE_TEMPLATE) == 200
            await tools.wait_for(f"!!{PANEL}", timeout=30)
            await asyncio.sleep(2)  # the missing-model dialog (the full umT5, not in CI) opens, then goes
            await tools.evaluate(CLOSE_DIALOGS)
            await tools.evaluate(SHOW_LIVE_NODE)
            client_id = await tools.evaluate("window.app.api.clientId || sessionStorage.getItem('clientId')")
            status_code, body = comfy.post("/prompt", {"prompt": live_prompt(), "client_id": client_id})
            assert status_code == 200, body
            # the panel connects by itself once the node serves: the reference frame shows at once
            await tools.wait_for(f"!!({PANEL}.client && {PANEL}.client.stats.referenceShown)", timeout=300)
            connected = await _panel_state(tools)
            await tools.evaluate(f"{PANEL}.view.querySelector('.live-mic').click()")
            wanted = connected["frames"] + FRAMES_WANTED  # frames drawn once the microphone is on
            deadline = time.monotonic() + 300
            while (state := await _panel_state(tools))["frames"] < wanted or state["audio"] < 2 \
                    or not state["speech_sent"]:
                assert time.monotonic() < deadline, f"the panel showed too little: {state}"
                await asyncio.sleep(0.5)
            x, y, width, height = json.loads(await tools.evaluate(NODE_RECT))
            shot = await tools.call("Page.captureScreenshot", format="png",
                                    clip={"x": x, "y": y, "width": width, "height": height, "scale": 1})
            (artifacts / "live_comfyui.png").write_bytes(base64.b64decode(shot["data"]))
            await tools.evaluate(f"{PANEL}.endButton.click()")
            history = _finished(comfy, body["prompt_id"])
            await tools.wait_for(f"{PANEL}.client.socket.readyState === WebSocket.CLOSED", timeout=60)
            return {"connected": connected, "talking": state, "after_stop": await _panel_state(tools),
                    "history": history}


def test_panel_shows_the_avatar_answering_the_fake_microphone(fake_microphone_browser, request, tmp_path):
    comfy = livetalk_server(request)
    comfy.post("/settings/Comfy.TutorialCompleted", True)
    artifacts = Path(os.environ.get("LIVETALK_ARTIFACTS", tmp_path))
    artifacts.mkdir(parents=True, exist_ok=True)
    assert LIVE_1_3B_API.is_file()
    request.addfinalizer(lambda: end_any_live_node(comfy))
    result = asyncio.run(_drive_panel(fake_microphone_browser, comfy, artifacts))
    assert result["connected"]["connected"] and result["connected"]["reference_shown"], result["connected"]
    talking = result["talking"]
    # the fake microphone's speech went out, frames were drawn and the blocks' audio was scheduled to play
    assert talking["speech_sent"] > 0 and talking["frames"] >= FRAMES_WANTED and talking["audio"] >= 2, talking
    assert talking["audio_running"] and talking["canvas_spread"] > 0, talking  # sound playing, a picture drawn
    assert result["history"]["status"]["status_str"] == "success", result["history"]["status"]
    assert (artifacts / "live_comfyui.png").stat().st_size > 5_000
    state = wait_for_status(comfy, lambda s: not s["running"], "the node to end")
    assert state["sessions_alive"] == 0 and not status(comfy)["busy"]
    assert result["after_stop"]["connected"] is False
    assert json.loads(urllib.request.urlopen(f"{comfy.url}{PREFIX}/status", timeout=10).read())["running"] is False
