"""Live mode inside a real ComfyUI server (0.3.75, --cpu), tiny random weights under the shipped names.

The shipped live workflow is queued (its text branch swapped for the tiny one, the video made small);
while its LiveTalk Live node runs, clients talk to ``/livetalk/live/ws`` on ComfyUI's own port: the
Python live client streams a WAV at real-time pace and gets frames and its audio back; a second client
is told "busy"; malformed and oversized messages close only their socket; a client that disconnects
frees its session; Stop ends the prompt successfully, Cancel as an interrupt; each time the session
is gone from memory (``sessions_alive``) and ComfyUI keeps serving. Fails when ComfyUI is not installed.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from comfy_env import REPO, SPEECH, livetalk_server, with_tiny_text_encoder

from livetalk_core.errors import LiveTalkError
from livetalk_core.live import protocol
from livetalk_core.live.client import run_client

LIVE_1_3B_API = REPO / "workflows" / "api" / "live_livetalk_1.3b_api.json"
LIVE_14B_API = REPO / "workflows" / "api" / "live_realvideo_14b_api.json"
SIZE = 64  # video side: the smallest the node takes, so a block takes little time on 2 CPU cores
SPEECH_SECONDS = 2.0
PREFIX = "/livetalk/live"


@pytest.fixture(scope="module")
def comfy(request):
    return livetalk_server(request)


def speech_16k(seconds: float) -> np.ndarray:
    """The first ``seconds`` of the shipped speech as 16 kHz mono float32 (int16-exact: what a client sends)."""
    import av

    with av.open(str(SPEECH)) as source:
        resampler = av.AudioResampler(format="s16", layout="mono", rate=protocol.SAMPLE_RATE)
        chunks = [out.to_ndarray().reshape(-1) for frame in source.decode(audio=0) for out in resampler.resample(frame)]
    pcm = np.concatenate(chunks)[: int(seconds * protocol.SAMPLE_RATE)]
    return pcm.astype(np.float32) / protocol.PCM_MAX


def write_wav(path: Path, samples: np.ndarray) -> Path:
    """16 kHz mono int16 WAV of float samples (the browser's fake microphone reads such a file)."""
    import wave

    with wave.open(str(path), "wb") as file:
        file.setnchannels(1)
        file.setsampwidth(2)
        file.setframerate(protocol.SAMPLE_RATE)
        file.writeframes(protocol.float_to_pcm(samples))
    return path


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    return speech_16k(SPEECH_SECONDS)


def live_prompt(workflow: Path = LIVE_1_3B_API) -> dict:
    prompt = with_tiny_text_encoder(json.loads(workflow.read_text()))
    live = next(node for node in prompt.values() if node["class_type"] == "LiveTalkLive")
    live["inputs"].update(width=SIZE, height=SIZE)
    loader = next(node for node in prompt.values() if node["class_type"] == "LoadLiveTalkModel")
    loader["inputs"]["precision"] = "fp32"  # CPU bf16 matmuls are slow; the tiny 14B DiT has 40 layers
    return prompt


def status(comfy) -> dict:
    return comfy.get(f"{PREFIX}/status")


def wait_for_status(comfy, condition, what: str, timeout: float = 300.0) -> dict:
    deadline = time.monotonic() + timeout
    while not condition(state := status(comfy)):
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {state}\n{comfy.log()[-3000:]}"
        time.sleep(0.2)
    return state


def end_any_live_node(comfy) -> None:
    """A live prompt runs until Stop: end one a failed test left running, or every later prompt of this server
    would wait behind it."""
    if status(comfy)["running"]:
        comfy.post(f"{PREFIX}/stop", {})
        wait_for_status(comfy, lambda s: not s["running"], "the left-over live node to end", timeout=60)


@pytest.fixture(autouse=True)
def no_live_node_left(comfy):
    yield
    end_any_live_node(comfy)


def start_live(comfy, workflow: Path = LIVE_1_3B_API) -> str:
    prompt_id = comfy.queue(live_prompt(workflow))
    wait_for_status(comfy, lambda s: s["running"], "the LiveTalk Live node to run")
    return prompt_id


def stop_live(comfy, prompt_id: str) -> dict:
    assert comfy.post(f"{PREFIX}/stop", {}) == (200, {"stopped": True})
    history = comfy.wait_for(prompt_id)
    state = wait_for_status(comfy, lambda s: not s["running"], "the node to end")
    assert state["sessions_alive"] == 0, "a session (its KV cache) is still in memory after the node ended"
    return history


async def raw_client(comfy, *messages, start: bool = False) -> tuple[list, int | None, str]:
    """Connect to the live socket, optionally start a session (until ready), send ``messages``, collect
    the text messages until the server closes; returns them, the close code and the close reason."""
    import aiohttp

    texts = []
    url = comfy.url.replace("http", "ws", 1) + f"{PREFIX}/ws"
    async with aiohttp.ClientSession() as http, http.ws_connect(url, max_msg_size=0) as ws:
        if start:
            await ws.send_str(protocol.text_message("start"))
            while not texts or texts[-1]["type"] != "ready":
                message = await ws.receive(timeout=300)
                if message.type == aiohttp.WSMsgType.TEXT:
                    texts.append(json.loads(message.data))
                elif message.type != aiohttp.WSMsgType.BINARY:  # closed before ready (e.g. a Cancel while starting)
                    return texts, ws.close_code, message.extra or ""
        for message in messages:
            try:
                await (ws.send_bytes(message) if isinstance(message, bytes) else ws.send_str(message))
            except ConnectionError:  # the server closed while an oversized message was still going out
                break
        while True:
            message = await ws.receive(timeout=120)
            if message.type == aiohttp.WSMsgType.TEXT:
                texts.append(json.loads(message.data))
            elif message.type != aiohttp.WSMsgType.BINARY:
                return texts, ws.close_code, message.extra or ""


def test_without_a_live_node_the_socket_says_to_queue_one(comfy):
    assert status(comfy)["running"] is False
    with pytest.raises(LiveTalkError, match="No LiveTalk Live node is serving"):
        run_client(f"{comfy.url}{PREFIX}", np.zeros(1600, np.float32))
    assert comfy.post(f"{PREFIX}/stop", {})[0] == 409


def test_live_workflow_streams_a_wav_and_stop_ends_the_prompt(comfy, speech):
    prompt_id = start_live(comfy)
    busy: dict = {}

    def second_client_while_busy():
        wait_for_status(comfy, lambda s: s["busy"], "the first client's session")
        busy["texts"], busy["code"], busy["reason"] = asyncio.run(raw_client(comfy))

    second = threading.Thread(target=second_client_while_busy, daemon=True)
    second.start()
    recording = run_client(f"{comfy.url}{PREFIX}", speech)
    second.join(120)
    report = recording.report()
    # frames cover the streamed audio (16 per second) within one block; the audio comes back exactly
    block = recording.info["block_frames"]
    assert abs(report["frames"] - SPEECH_SECONDS * 16) <= block + recording.info["first_block_frames"], report
    assert report["returned_audio_exact"]
    assert report["returned_speech_seconds"] == pytest.approx(SPEECH_SECONDS, abs=1e-3)
    assert report["latency_p50_s"] is not None and report["latency_p50_s"] <= report["latency_p95_s"]
    assert recording.reference.startswith(b"\x89PNG")
    assert recording.decoded_frames().shape[1:] == (SIZE, SIZE, 3)
    # a second client during the session: told busy (close 1013), the first went on undisturbed
    assert busy["code"] == protocol.CLOSE_BUSY and busy["texts"][0]["code"] == "busy", busy
    history = stop_live(comfy, prompt_id)
    assert history["status"]["status_str"] == "success", history["status"]
    text = [t for output in history["outputs"].values() for t in output.get("text", [])]
    assert text and "1 client session(s)" in text[0], history["outputs"]


def test_bad_messages_and_disconnects_close_only_their_socket_then_cancel(comfy, speech):
    prompt_id = start_live(comfy)
    # malformed: not JSON -> 1008 with a reason; the server and the node keep serving
    texts, code, reason = asyncio.run(raw_client(comfy, "this is not json"))
    assert code == protocol.CLOSE_POLICY and "JSON" in reason and texts[-1]["code"] == "bad_message"
    # oversized: an audio message over 2 s -> 1009 with a reason
    too_long = protocol.audio_message(b"\0\0" * (protocol.MAX_AUDIO_CHUNK_BYTES // 2 + 1))
    texts, code, reason = asyncio.run(raw_client(comfy, too_long, start=True))
    assert code == protocol.CLOSE_TOO_BIG and reason, (texts, code, reason)
    wait_for_status(comfy, lambda s: not s["busy"] and s["sessions_alive"] == 0, "the refused client's session to go")
    # oversized: any message over 8 MiB -> error too_big with the reason, then 1009 (or, as the server drops the
    # connection while the client is still sending the rest, an abnormal closure on this side)
    texts, code, reason = asyncio.run(raw_client(comfy, "x" * (protocol.MAX_MESSAGE_BYTES + 1)))
    assert texts[-1]["code"] == "too_big" and "exceeds the limit" in texts[-1]["message"], (texts, code, reason)
    assert code in (protocol.CLOSE_TOO_BIG, 1006), code
    # a client that vanishes mid-session frees its session; the next client is served
    asyncio.run(_start_then_vanish(comfy))
    wait_for_status(comfy, lambda s: not s["busy"] and s["sessions_alive"] == 0, "the vanished client's session to go")
    assert run_client(f"{comfy.url}{PREFIX}", speech[:16000]).report()["returned_audio_exact"]
    # ComfyUI's Cancel while a client is connected: the client's socket closes, the prompt is interrupted
    holder: dict = {}
    client = threading.Thread(target=lambda: holder.update(result=asyncio.run(raw_client(comfy, start=True))),
                              daemon=True)
    client.start()
    wait_for_status(comfy, lambda s: s["busy"], "the client's session")
    assert comfy.post("/interrupt", {})[0] == 200
    history = comfy.wait_for(prompt_id)
    assert comfy.events(prompt_id, "execution_interrupted"), history["status"]
    client.join(60)
    assert "result" in holder, "the client was not disconnected when the prompt was cancelled"
    texts, code, reason = holder["result"]
    assert code == protocol.CLOSE_GOING_AWAY and texts[-1]["code"] == protocol.ENDED and "cancelled" in reason, texts
    assert wait_for_status(comfy, lambda s: not s["running"], "the node to end")["sessions_alive"] == 0


async def _start_then_vanish(comfy) -> None:
    """A client that starts a session and drops the connection without a word."""
    import aiohttp

    url = comfy.url.replace("http", "ws", 1) + f"{PREFIX}/ws"
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(url)
        await ws.send_str(protocol.text_message("start"))
        while (message := await ws.receive(timeout=300)).type != aiohttp.WSMsgType.TEXT or \
                json.loads(message.data)["type"] != "ready":
            pass
        ws._response.connection.transport.abort()  # no close frame: as a browser tab that crashed


def test_live_realvideo_workflow_serves_a_session(comfy, speech):
    """The 14B live workflow (tiny RealVideo weights): its idle prompt goes in, a client gets frames."""
    prompt_id = start_live(comfy, LIVE_14B_API)
    recording = run_client(f"{comfy.url}{PREFIX}", speech[:16000])
    report = recording.report()
    assert recording.info["family"] == "RealVideo 14B" and report["returned_audio_exact"], report
    assert abs(report["frames"] - 16) <= recording.info["block_frames"], report
    assert stop_live(comfy, prompt_id)["status"]["status_str"] == "success"


def test_node_cases_in_a_comfyui_process():
    """live_comfyui_cases.py: the node's refusals before loading, and no caching (see comfy_in_process)."""
    from comfy_in_process import run_in_comfyui

    run_in_comfyui(Path(__file__).with_name("live_comfyui_cases.py"))


def test_live_client_command_streams_a_wav_file_through_comfyui(comfy, tmp_path):
    """What a voice agent runs: ``python -m livetalk_core live-client`` with a WAV against ComfyUI's URL."""
    import subprocess
    import sys

    import av

    wav = write_wav(tmp_path / "speech.wav", speech_16k(1.5))
    output, report_path = tmp_path / "answer.mp4", tmp_path / "report.json"
    prompt_id = start_live(comfy)
    result = subprocess.run([sys.executable, "-m", "livetalk_core", "live-client", "--url", f"{comfy.url}{PREFIX}",
                             "--audio", str(wav), "--output", str(output), "--report", str(report_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(report_path.read_text())
    assert report["returned_audio_exact"] and abs(report["frames"] - 1.5 * 16) <= 16, report
    assert report["latency_p50_s"] is not None and report["stalls"] >= 0 and report["bitrate_mbps"] > 0, report
    with av.open(str(output)) as video:
        stream = video.streams.video[0]
        assert (stream.width, stream.height) == (SIZE, SIZE) and len(video.streams.audio) == 1
        assert sum(1 for _ in video.decode(stream)) == report["frames"]
    assert stop_live(comfy, prompt_id)["status"]["status_str"] == "success"
