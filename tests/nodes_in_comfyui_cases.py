"""The nodes called directly inside ComfyUI (run by test_nodes_in_comfyui.py through comfy_in_process).

Tiny random weights in temporary model folders, ComfyUI's output folder moved to a temporary one;
each node runs the way ComfyUI's executor calls it (a class clone holding the hidden inputs).
"""

from __future__ import annotations

import importlib
import json
import re
import weakref
from pathlib import Path
from types import SimpleNamespace

import av
import comfy.model_management as mm
import folder_paths
import pytest
import torch
from comfy_env import import_pack
from tiny_weights import UMT5_WIDTH, save_module, save_tiny_wav2vec2, tiny_dit, tiny_s2v_dit, tiny_vae

PACKAGE = "livetalk_pack_in_comfyui"
SIZE = 32  # video side in pixels: 4x4 latents


@pytest.fixture(scope="session")
def pack() -> SimpleNamespace:
    """The pack imported as ComfyUI imports it (a package from its folder), and the modules the tests use."""
    import_pack(PACKAGE)
    names = ("nodes.loader", "nodes.encoders", "nodes.sampling", "nodes.save_video", "nodes.pack_types",
             "nodes.comfy_models", "livetalk_core.errors", "livetalk_core.media.vae",
             "livetalk_core.media.video_io")
    return SimpleNamespace(**{name.split(".")[-1]: importlib.import_module(f"{PACKAGE}.{name}") for name in names})


@pytest.fixture(scope="session")
def model_files(tmp_path_factory) -> Path:
    """``<root>/models/<folder>/`` with tiny weights of both families, and the same files in ``<root>/outside/``."""
    root = tmp_path_factory.mktemp("comfy")
    for folder in ("models/livetalk", "models/diffusion_models", "models/vae", "models/audio_encoders", "outside"):
        (root / folder).mkdir(parents=True)
    for base, dit_folder in ((root / "models", "livetalk"), (root, "outside")):
        save_module(tiny_dit(), base / dit_folder / "dit.safetensors")
    save_module(tiny_s2v_dit(), root / "models/diffusion_models/s2v.safetensors", dtype=torch.bfloat16)
    for folder in ("models/vae", "outside"):
        save_module(tiny_vae(), root / folder / "vae.safetensors")
    for folder in ("models/audio_encoders", "outside"):
        save_tiny_wav2vec2(root / folder / "w2v.safetensors")
    save_tiny_wav2vec2(root / "models/audio_encoders/w2v_large.safetensors", large=True)
    return root


@pytest.fixture()
def comfy_folders(model_files, tmp_path, monkeypatch) -> Path:
    """ComfyUI's model folders at the tiny weights and its output folder empty; returns the output folder."""
    for name in ("livetalk", "diffusion_models", "vae", "audio_encoders"):
        monkeypatch.setitem(folder_paths.folder_names_and_paths, name,
                            ([str(model_files / "models" / name)], {".safetensors"}))
    output = tmp_path / "output"
    output.mkdir()
    monkeypatch.setattr(folder_paths, "output_directory", str(output))
    return output


def run(node, hidden: dict | None = None, **inputs):
    """``node`` executed as ComfyUI's executor does it: on a class clone that holds the hidden inputs."""
    return node.PREPARE_CLASS_CLONE(hidden or {}).EXECUTE_NORMALIZED(**inputs)


def tone(seconds: float, rate: int = 44_100, channels: int = 2) -> dict:
    """A native AUDIO: a 220 Hz tone, batch of one."""
    t = torch.arange(int(seconds * rate)) / rate
    return {"waveform": (0.3 * torch.sin(2 * torch.pi * 220 * t)).repeat(1, channels, 1), "sample_rate": rate}


def load(pack, model_name: str, audio_encoder_name: str):
    return run(pack.loader.LoadLiveTalkModel, model_name=model_name, vae_name="vae.safetensors",
               audio_encoder_name=audio_encoder_name, precision="fp32", attention="sdpa", compile=False).result


def latent_blocks(pack, count: int, trim: int = 0):
    """``count`` random 1.3B-style blocks (3 latent frames: 9 video frames, then 12 each), ``trim`` frames cut."""
    generator = torch.Generator().manual_seed(0)
    blocks = [torch.randn(1, 16, 3, SIZE // 8, SIZE // 8, generator=generator) for _ in range(count)]
    return pack.pack_types.LatentBlockList(blocks=blocks, num_video_frames=9 + 12 * (count - 1) - trim)


@pytest.fixture()
def vae(pack, comfy_folders):
    return load(pack, "dit.safetensors", "w2v.safetensors")[1]


def decode_and_write_order(pack, monkeypatch) -> list[str]:
    """Records each block decode and each frame write, in order."""
    events: list[str] = []
    decode, write = pack.vae.StreamDecoder.decode, pack.video_io.VideoWriter.write

    def spied_decode(self, latents):
        events.append("decode")
        return decode(self, latents)

    def spied_write(self, frames):
        events.append(f"write {len(frames)}")
        return write(self, frames)

    monkeypatch.setattr(pack.vae.StreamDecoder, "decode", spied_decode)
    monkeypatch.setattr(pack.video_io.VideoWriter, "write", spied_write)
    return events


# -- DecodeBlocks to Video File ----------------------------------------------------------------------


def test_video_file_is_written_block_by_block_with_audio_and_workflow(pack, vae, comfy_folders, monkeypatch):
    """Each block's frames go to the file before the next block is decoded, so the node never holds
    more than one block of frames, however long the video."""
    events = decode_and_write_order(pack, monkeypatch)
    blocks = latent_blocks(pack, 3, trim=4)
    workflow = {"nodes": [], "links": []}
    hidden = {"PROMPT": {"1": {"class_type": "LoadImage", "inputs": {}}}, "EXTRA_PNGINFO": {"workflow": workflow}}
    output = run(pack.save_video.LiveTalkDecodeToVideoFile, hidden, vae=vae, latent_blocks=blocks,
                 filename_prefix="LiveTalk/video", audio=tone(5.0))

    assert events == ["decode", "write 9", "decode", "write 12", "decode", "write 8"]
    path = comfy_folders / "LiveTalk" / "video_00001_.mp4"
    info = pack.video_io.read_video_info(path)
    assert (info["frames"], info["fps"], info["width"], info["height"], info["has_audio"]) == (29, 16, SIZE, SIZE, True)
    assert info["audio_duration"] == pytest.approx(29 / 16, abs=0.03)  # the 5 s of audio trimmed to the video
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no partial file left behind
    with av.open(str(path)) as container:
        assert json.loads(container.metadata["workflow"]) == workflow
        assert json.loads(container.metadata["prompt"]) == hidden["PROMPT"]

    assert output.ui.as_dict() == {"images": [{"filename": path.name, "subfolder": "LiveTalk", "type": "output"}],
                                   "animated": (True,)}
    (video,) = output.result
    assert video.get_dimensions() == (SIZE, SIZE)
    assert video.get_duration() == pytest.approx(29 / 16, abs=0.05)


def test_silent_video_and_the_next_file_number(pack, vae, comfy_folders):
    node = pack.save_video.LiveTalkDecodeToVideoFile
    for _ in range(2):
        run(node, vae=vae, latent_blocks=latent_blocks(pack, 1), filename_prefix="clip")
    info = pack.video_io.read_video_info(comfy_folders / "clip_00002_.mp4")
    assert (info["frames"], info["has_audio"]) == (9, False)


def test_interrupt_between_blocks_keeps_a_playable_partial_video(pack, vae, comfy_folders, monkeypatch):
    write = pack.video_io.VideoWriter.write

    def write_then_interrupt_after_two_blocks(self, frames):
        write(self, frames)
        if self.frames_written == 21:
            mm.interrupt_current_processing(True)  # what ComfyUI's Cancel button does

    monkeypatch.setattr(pack.video_io.VideoWriter, "write", write_then_interrupt_after_two_blocks)
    with pytest.raises(mm.InterruptProcessingException):
        run(pack.save_video.LiveTalkDecodeToVideoFile, vae=vae, latent_blocks=latent_blocks(pack, 4),
            filename_prefix="LiveTalk/video", audio=tone(5.0))
    path = comfy_folders / "LiveTalk" / "video_00001_.mp4"
    info = pack.video_io.read_video_info(path)
    assert (info["frames"], info["has_audio"]) == (21, True)
    assert info["audio_duration"] == pytest.approx(21 / 16, abs=0.03)
    with av.open(str(path)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 21
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_decode_blocks_gives_the_frames_the_file_gets(pack, vae, comfy_folders, monkeypatch):
    blocks = latent_blocks(pack, 2, trim=2)
    frames, fps = run(pack.sampling.LiveTalkDecodeBlocks, vae=vae, latent_blocks=blocks).result
    assert frames.shape == (19, SIZE, SIZE, 3) and frames.dtype == torch.float32 and fps == 16.0
    written: list[torch.Tensor] = []
    write = pack.video_io.VideoWriter.write
    monkeypatch.setattr(pack.video_io.VideoWriter, "write",
                        lambda self, batch: (written.append(batch), write(self, batch)))
    run(pack.save_video.LiveTalkDecodeToVideoFile, vae=vae, latent_blocks=blocks, filename_prefix="same")
    assert torch.equal(torch.cat(written).float() / 255, frames)


@pytest.mark.parametrize(
    "prefix", ["../input/portrait", "LiveTalk/../../input/portrait", "{input}/portrait", "", "LiveTalk/.."]
)
def test_a_prefix_outside_the_output_folder_is_refused_before_anything_runs(pack, vae, comfy_folders, tmp_path, prefix):
    """A prefix reaching into ComfyUI's input folder (or naming no file) is refused when the prompt
    is queued, with advice; run anyway, it stops before a block is decoded and the input is untouched."""
    inputs = tmp_path / "input"
    inputs.mkdir()
    victim = inputs / "portrait_00001_.mp4"
    victim.write_bytes(b"the user's own video")
    prefix = prefix.format(input=inputs)
    node = pack.save_video.LiveTalkDecodeToVideoFile
    message = node.validate_inputs(filename_prefix=prefix)
    assert isinstance(message, str) and f"filename_prefix '{prefix}' does not name a file inside" in message, message
    assert "e.g. LiveTalk/video" in message
    assert node.validate_inputs(filename_prefix="LiveTalk/%year%/video") is True
    with pytest.raises(pack.errors.InputError, match="does not name a file inside"):
        run(node, vae=vae, latent_blocks=latent_blocks(pack, 1), filename_prefix=prefix)
    assert victim.read_bytes() == b"the user's own video"
    assert list(comfy_folders.rglob("*")) == []


def test_an_existing_file_under_the_next_name_is_never_written_over(pack, vae, comfy_folders, monkeypatch):
    """If the name ComfyUI's counter gives already exists (another process wrote it since the folder
    was listed, a case-insensitive file system...), the video takes the next free number."""
    folder = comfy_folders / "LiveTalk"
    folder.mkdir()
    taken = [folder / "video_00001_.mp4", folder / "video_00002_.mp4"]
    for path in taken:
        path.write_bytes(b"someone else's file")
    monkeypatch.setattr(folder_paths, "get_save_image_path",
                        lambda prefix, output, *size: (str(folder), "video", 1, "LiveTalk", prefix))
    output = run(pack.save_video.LiveTalkDecodeToVideoFile, vae=vae, latent_blocks=latent_blocks(pack, 1),
                 filename_prefix="LiveTalk/video")
    assert all(path.read_bytes() == b"someone else's file" for path in taken)
    assert output.ui.as_dict()["images"][0]["filename"] == "video_00003_.mp4"
    assert pack.video_io.read_video_info(folder / "video_00003_.mp4")["frames"] == 9


def test_a_failure_before_the_first_frame_leaves_no_empty_file(pack, vae, comfy_folders, monkeypatch):
    monkeypatch.setattr(pack.vae.StreamDecoder, "decode", out_of_memory)
    with pytest.raises(pack.errors.OutOfMemory):
        run(pack.save_video.LiveTalkDecodeToVideoFile, vae=vae, latent_blocks=latent_blocks(pack, 1),
            filename_prefix="x")
    assert list(comfy_folders.rglob("*")) == []


# -- Model names that try to leave the model folders ---------------------------------------------------


ESCAPES = {
    "relative": "../../outside/{}",
    "absolute": "{root}/outside/{}",
    "windows": "..\\..\\outside\\{}",
}
VALID = {"model_name": "dit.safetensors", "vae_name": "vae.safetensors", "audio_encoder_name": "w2v.safetensors"}


@pytest.mark.parametrize("escape", ESCAPES)
@pytest.mark.parametrize("field", VALID)
def test_names_outside_the_model_folders_are_refused(pack, comfy_folders, model_files, field, escape):
    """``<root>/outside`` holds valid copies of the files: a name that escaped the folders would load."""
    loader = pack.loader.LoadLiveTalkModel
    pack.loader.check_inputs(**VALID)
    name = ESCAPES[escape].format(VALID[field], root=model_files)
    names = {**VALID, field: name}
    with pytest.raises(pack.errors.MissingWeightsError, match=f"'{re.escape(name)}' was not found in models/"):
        pack.loader.check_inputs(**names)
    with pytest.raises(pack.errors.MissingWeightsError, match="was not found"):
        run(loader, **names, precision="fp32", attention="sdpa", compile=False)


# -- GPU out of memory -------------------------------------------------------------------------------


def out_of_memory(*args, **kwargs):
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


def check_out_of_memory_message(pack, error: pytest.ExceptionInfo) -> None:
    message = str(error.value)
    assert message == pack.comfy_models.NODE_OUT_OF_MEMORY_HELP
    assert "ran out of memory" in message and "fp8_weights" in message and "Encode Reference (VAE)" in message
    assert error.value.__cause__ is None and error.value.__context__ is None  # no CUDA traceback shown


@pytest.mark.parametrize("family", ["1.3b", "14b"])
def test_out_of_memory_in_the_sampler_is_one_message_and_frees_the_cache(pack, comfy_folders, monkeypatch, family):
    dit_name, encoder_name = {"1.3b": ("dit.safetensors", "w2v.safetensors"),
                              "14b": ("s2v.safetensors", "w2v_large.safetensors")}[family]
    model, vae, audio_encoder = load(pack, dit_name, encoder_name)
    audio_embeds = run(pack.encoders.LiveTalkEncodeAudioWav2Vec, model=model, audio_encoder=audio_encoder,
                       audio=tone(1.0, rate=16_000, channels=1)).result[0]
    reference = run(pack.encoders.LiveTalkEncodeReferenceVAE, vae=vae, image=torch.rand(1, 64, 64, 3),
                    width=64, height=64, crop="center").result[0]
    caches: list[weakref.ref] = []

    def forward_out_of_memory(self, *args, **kwargs):
        caches.extend(weakref.ref(a) for a in args if type(a).__name__ == "KVCache")
        out_of_memory()

    monkeypatch.setattr(type(model.engine), "forward", forward_out_of_memory)
    unloads: list[bool] = []
    monkeypatch.setattr(mm, "unload_all_models", lambda: unloads.append(True))
    sampler = pack.sampling.LiveTalkCausalDiTSampler
    conditioning = [[torch.randn(1, 5, UMT5_WIDTH), {}]]
    with pytest.raises(pack.errors.OutOfMemory) as error:
        run(sampler, model=model, conditioning=conditioning, reference=reference, audio_embeds=audio_embeds, seed=0,
            steps=4, sink_frames=9, window_frames=15)
    check_out_of_memory_message(pack, error)
    assert caches and all(cache() is None for cache in caches), "the KV cache outlived the error"
    assert unloads == [True]


@pytest.mark.parametrize("node", ["LiveTalkDecodeBlocks", "LiveTalkDecodeToVideoFile"])
def test_out_of_memory_while_decoding_is_one_message(pack, vae, comfy_folders, monkeypatch, node):
    decode = pack.vae.StreamDecoder.decode
    calls: list[int] = []

    def decode_then_out_of_memory(self, latents):
        calls.append(1)
        return decode(self, latents) if len(calls) == 1 else out_of_memory()

    monkeypatch.setattr(pack.vae.StreamDecoder, "decode", decode_then_out_of_memory)
    node_class = getattr(pack.sampling, node, None) or getattr(pack.save_video, node)
    inputs = {"filename_prefix": "oom"} if node == "LiveTalkDecodeToVideoFile" else {}
    with pytest.raises(pack.errors.OutOfMemory) as error:
        run(node_class, vae=vae, latent_blocks=latent_blocks(pack, 2), **inputs)
    check_out_of_memory_message(pack, error)
    if inputs:  # the file keeps the block decoded before the failure
        assert pack.video_io.read_video_info(comfy_folders / "oom_00001_.mp4")["frames"] == 9


# -- The sampler's workspace, kept between prompts ----------------------------------------------------


def sampler_inputs(pack, model_name: str = "dit.safetensors", encoder_name: str = "w2v.safetensors") -> dict:
    """A loaded model and the sampler's inputs for it (a reference, 1 s of audio, a prompt)."""
    model, vae, audio_encoder = load(pack, model_name, encoder_name)
    audio_embeds = run(pack.encoders.LiveTalkEncodeAudioWav2Vec, model=model, audio_encoder=audio_encoder,
                       audio=tone(1.0, rate=16_000, channels=1)).result[0]
    reference = run(pack.encoders.LiveTalkEncodeReferenceVAE, vae=vae, image=torch.rand(1, 64, 64, 3),
                    width=64, height=64, crop="center").result[0]
    return dict(model=model, conditioning=[[torch.randn(1, 5, UMT5_WIDTH, generator=torch.Generator().manual_seed(3)),
                                            {}]],
                reference=reference, audio_embeds=audio_embeds, steps=4, sink_frames=3, window_frames=6)


def sample(pack, seed: int, inputs: dict) -> list[torch.Tensor]:
    return run(pack.sampling.LiveTalkCausalDiTSampler, seed=seed, **inputs).result[0].blocks


def with_recorded_graphs(pack, model, monkeypatch) -> None:
    """The DiT asks for CUDA graphs and its workspaces make the CPU stand-in of test_cuda_graphs (a
    replay re-runs the captured ops on the captured tensors: a moved buffer would give other latents)."""
    from test_cuda_graphs import RecordingMaker

    cuda_graphs = importlib.import_module(f"{PACKAGE}.livetalk_core.runtime.cuda_graphs")
    workspace = importlib.import_module(f"{PACKAGE}.livetalk_core.runtime.workspace")
    options = importlib.import_module(f"{PACKAGE}.livetalk_core.options")
    monkeypatch.setattr(model.engine, "runtime", options.RuntimeOptions(compile=True, cuda_graphs=True))
    monkeypatch.setattr(pack.comfy_models, "Workspace", lambda: workspace.Workspace(
        lambda dit, cache, forwards: cuda_graphs.ForwardGraphs(forwards, RecordingMaker())))


def test_the_sampler_keeps_its_workspace_and_the_third_prompt_replays_every_forward(pack, comfy_folders,
                                                                                     monkeypatch):
    inputs = sampler_inputs(pack)
    model = inputs["model"]
    alone = [sample(pack, seed, inputs) for seed in range(3)]  # no graphs: each run's own cache, freed after it
    assert model.workspace is not None and model.workspace.cache is None
    with_recorded_graphs(pack, model, monkeypatch)
    model.workspace = None
    eager = []
    for seed in range(3):
        before = model.workspace.graphs.eager_forwards if model.workspace else 0
        latents = sample(pack, seed, inputs)
        assert all(torch.equal(a, b) for a, b in zip(latents, alone[seed], strict=True)), f"prompt {seed} differs"
        eager.append(model.workspace.graphs.eager_forwards - before)
    # prompt 0 runs block 0 kernel by kernel; prompt 1 captures block 0's layout; prompt 2 replays it all
    assert eager[0] > 0 and eager[2] == 0 and model.workspace.settled
    cache = model.workspace.cache
    sample(pack, 3, inputs)
    assert model.workspace.cache is cache, "a fourth prompt of the same size makes no new cache"


def test_comfyui_unloading_the_dit_lets_its_workspace_go(pack, comfy_folders, monkeypatch):
    inputs = sampler_inputs(pack)
    model = inputs["model"]
    with_recorded_graphs(pack, model, monkeypatch)
    sample(pack, 0, inputs)
    cache = weakref.ref(model.workspace.cache)
    mm.unload_all_models()  # what ComfyUI does for another model's room, or after an out-of-memory error
    assert model.workspace.cache is None and model.workspace.graphs is None and cache() is None
    sample(pack, 0, inputs)  # loaded again: a new workspace
    assert model.workspace.cache is not None


def test_without_room_for_another_cache_the_workspace_is_freed_after_the_run(pack, comfy_folders, monkeypatch):
    inputs = sampler_inputs(pack)
    model = inputs["model"]
    with_recorded_graphs(pack, model, monkeypatch)
    room: list[int] = []

    def free_memory(device=None, torch_free_too=False):
        room.append(model.workspace.cache.num_bytes)
        return room[-1] - 1  # one byte short of another cache

    monkeypatch.setattr(mm, "get_free_memory", free_memory)
    sample(pack, 0, inputs)
    assert room and model.workspace.cache is None


def test_a_live_prompt_queued_again_starts_on_the_workspace_the_last_one_warmed(pack, comfy_folders, monkeypatch):
    """The LiveTalk Live node serves its clients from the DiT's kept workspace: queued again after Stop, its
    warm-up is one session that replays every forward, on the same KV cache, instead of capturing anew."""
    import numpy as np

    live = importlib.import_module(f"{PACKAGE}.nodes.live")
    model, vae, audio_encoder = load(pack, "dit.safetensors", "w2v.safetensors")
    with_recorded_graphs(pack, model, monkeypatch)
    prompts = []

    def one_client_then_stop(offer) -> bool:
        with offer.open_session() as session:  # the node's warm-up, then the client's session
            session.push_audio(np.zeros(session.block_samples, np.float32))
            session.next_block()
        prompts.append((offer.open_session.warm_up_sessions, model.workspace.cache))
        return False

    monkeypatch.setattr(live, "_wait_for_stop", one_client_then_stop)
    conditioning = [[torch.randn(1, 5, UMT5_WIDTH, generator=torch.Generator().manual_seed(3)), {}]]
    for _ in range(2):
        run(live.LiveTalkLive, {"unique_id": "7"}, model=model, vae=vae, audio_encoder=audio_encoder,
            conditioning=conditioning, image=torch.rand(1, 64, 64, 3), width=64, height=64, seed=0, steps=4)
    (first_warm_up, first_cache), (second_warm_up, second_cache) = prompts
    assert first_warm_up >= 2 and second_warm_up == 1 and second_cache is first_cache
    assert model.workspace.settled
