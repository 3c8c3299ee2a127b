"""The loader's ``gpus`` input inside ComfyUI (run by test_multi_gpu_in_comfyui.py through comfy_in_process).

``parallel_devices`` is patched to give CPUs, so two (or four) gloo worker processes stand in for GPUs and
the real worker path runs: the pack is imported under the name ComfyUI gives it (its folder path),
so the workers import the engine under another name than this process does. One worker group is
reused across the checks where possible (each start spawns processes that import torch).
"""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import comfy.model_management as mm
import comfy.utils
import folder_paths
import pytest
import torch
from comfy_env import REPO, import_pack
from tiny_weights import UMT5_WIDTH, save_module, save_tiny_wav2vec2, tiny_dit, tiny_s2v_dit, tiny_vae

# ComfyUI names a pack's module after its folder path (nodes.load_custom_node).
PACKAGE = str(REPO).replace(".", "_x_")
SIZE = 64  # the video side: 8x8 latents, split along W over 2 or 4 workers
FOUR_HEADS = "s2v_4_heads.safetensors"  # a DiT that 4 workers can split


@pytest.fixture(scope="module")
def pack():
    import_pack(PACKAGE)
    names = ("nodes.loader", "nodes.encoders", "nodes.sampling", "nodes.multi_gpu", "nodes.live",
             "livetalk_core.errors")
    # The workers take a core each: one thread here keeps small CI machines from oversubscribing.
    torch.set_num_threads(1)
    modules = SimpleNamespace(**{name.split(".")[-1]: importlib.import_module(f"{PACKAGE}.{name}") for name in names})
    yield modules
    modules.multi_gpu.stop_workers()


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    for folder in ("livetalk", "diffusion_models", "vae", "audio_encoders"):
        (root / folder).mkdir()
    save_module(tiny_s2v_dit(heads=2), root / "diffusion_models" / "s2v.safetensors")
    save_module(tiny_s2v_dit(heads=4), root / "diffusion_models" / FOUR_HEADS)
    save_module(tiny_dit(), root / "livetalk" / "dit.safetensors")
    save_module(tiny_vae(), root / "vae" / "vae.safetensors")
    save_tiny_wav2vec2(root / "audio_encoders" / "w2v.safetensors")
    save_tiny_wav2vec2(root / "audio_encoders" / "w2v_large.safetensors", large=True)
    return root


@pytest.fixture()
def cpu_workers(pack, model_files, monkeypatch):
    """ComfyUI's model folders at the tiny weights; 'GPUs' are CPU ranks (gloo)."""
    for name in ("livetalk", "diffusion_models", "vae", "audio_encoders"):
        monkeypatch.setitem(folder_paths.folder_names_and_paths, name, ([str(model_files / name)], {".safetensors"}))
    monkeypatch.setattr(pack.multi_gpu, "parallel_devices", lambda: ["cpu", "cpu"])


def run(node, **inputs):
    """``node`` executed as ComfyUI's executor does it: on a class clone."""
    return node.PREPARE_CLASS_CLONE({}).EXECUTE_NORMALIZED(**inputs).result


def load(pack, gpus: int, attention: str = "sdpa", model_name: str = "s2v.safetensors", **options):
    return run(pack.loader.LoadLiveTalkModel, model_name=model_name, vae_name="vae.safetensors",
               audio_encoder_name="w2v_large.safetensors", precision="fp32", attention=attention, compile=False,
               gpus=gpus, **options)


def validate(pack, gpus: int, model_name: str = "s2v.safetensors", audio_encoder_name: str = "w2v_large.safetensors"):
    """The loader's checks before it loads anything: True, or its message."""
    try:
        pack.loader.check_inputs(model_name=model_name, vae_name="vae.safetensors",
                                 audio_encoder_name=audio_encoder_name, gpus=gpus)
    except pack.errors.LiveTalkError as exc:
        return str(exc)
    return True


def running_group(pack):
    return pack.multi_gpu._running[1] if pack.multi_gpu._running is not None else None


@pytest.fixture()
def inputs(pack, cpu_workers):
    """The sampler's other inputs, made by the pack's encoder nodes with the one-GPU model: 1.5 s of
    speech (4 blocks), a 64x64 reference and a prompt."""
    model, vae, audio_encoder = load(pack, gpus=1)
    t = torch.arange(int(1.5 * 16000)) / 16000
    audio = {"waveform": (0.3 * torch.sin(2 * torch.pi * 220 * t)).view(1, 1, -1), "sample_rate": 16000}
    audio_embeds = run(pack.encoders.LiveTalkEncodeAudioWav2Vec, model=model, audio_encoder=audio_encoder,
                       audio=audio)[0]
    image = torch.rand(1, SIZE, SIZE, 3, generator=torch.Generator().manual_seed(0))
    reference = run(pack.encoders.LiveTalkEncodeReferenceVAE, vae=vae, image=image, width=SIZE, height=SIZE,
                    crop="center")[0]
    conditioning = [[torch.randn(1, 6, UMT5_WIDTH, generator=torch.Generator().manual_seed(1)), {}]]
    return dict(conditioning=conditioning, reference=reference, audio_embeds=audio_embeds, seed=5, steps=2,
                sink_frames=1, window_frames=3)


def sample(pack, model, inputs) -> list[torch.Tensor]:
    return run(pack.sampling.LiveTalkCausalDiTSampler, model=model, **inputs)[0].blocks


def assert_same_video(blocks: list[torch.Tensor], reference: list[torch.Tensor]) -> None:
    assert len(blocks) == len(reference) == 4
    for index, (ours, expected) in enumerate(zip(blocks, reference)):
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=2e-5, msg=lambda m: f"block {index}: {m}")


def test_two_workers_give_the_one_gpu_video_and_recover_from_interrupts_failures_and_changes(pack, inputs, monkeypatch):
    one_gpu = sample(pack, load(pack, gpus=1)[0], inputs)

    model, vae, audio_encoder = load(pack, gpus=2)
    assert isinstance(model.engine, pack.multi_gpu.WorkerDiT)  # no DiT weights in this process
    group = running_group(pack)
    assert_same_video(sample(pack, model, inputs), one_gpu)
    # the audio node checks the encoder against the workers' weight shapes
    t = torch.arange(16000) / 16000
    speech = {"waveform": torch.sin(2 * torch.pi * 220 * t).view(1, 1, -1), "sample_rate": 16000}
    run(pack.encoders.LiveTalkEncodeAudioWav2Vec, model=model, audio_encoder=audio_encoder, audio=speech)
    # the same settings reuse the running workers
    assert load(pack, gpus=2)[0].engine.settings == model.engine.settings and running_group(pack) is group

    # ComfyUI's Cancel after the second block: the workers stop, and the next run is a fresh one
    def cancel_after_two_blocks(value, total, preview, node_id=None):
        if value == 2:
            mm.interrupt_current_processing(True)

    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", cancel_after_two_blocks)
    with pytest.raises(mm.InterruptProcessingException):
        sample(pack, model, inputs)
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", None)
    assert running_group(pack) is group and group.alive
    assert_same_video(sample(pack, model, inputs), one_gpu)

    # another setting replaces the workers
    changed = load(pack, gpus=2, attention="math", cuda_graphs=False)[0]
    replaced = running_group(pack)
    assert not group.alive and replaced.alive and changed.engine.settings.runtime.attention == "math"
    assert changed.engine.settings.runtime.cuda_graphs is False  # the workers get the switch

    # a worker that dies (e.g. killed for memory): one message naming it; the next run starts new workers
    replaced._workers[1].process.kill()
    with pytest.raises(pack.errors.LiveTalkError, match=r"worker 1 \(cpu\).*exited unexpectedly.*SIGKILL"):
        sample(pack, changed, inputs)
    assert not replaced.alive
    assert_same_video(sample(pack, changed, inputs), one_gpu)
    restarted = running_group(pack)
    assert restarted not in (None, replaced) and restarted.alive

    # ComfyUI unloading its models ("Unload models", or after an out-of-memory error) stops them
    mm.unload_all_models()
    assert not restarted.alive and running_group(pack) is None


def test_four_workers_give_the_one_gpu_video(pack, inputs, monkeypatch):
    """4 heads over 4 CPU workers, each sampling one patch column of the 8x8 latent."""
    monkeypatch.setattr(pack.multi_gpu, "parallel_devices", lambda: ["cpu"] * 4)
    one_gpu = sample(pack, load(pack, gpus=1, model_name=FOUR_HEADS)[0], inputs)
    model = load(pack, gpus=4, model_name=FOUR_HEADS)[0]
    assert isinstance(model.engine, pack.multi_gpu.WorkerDiT) and len(running_group(pack)._workers) == 4
    assert_same_video(sample(pack, model, inputs), one_gpu)
    mm.unload_all_models()
    assert running_group(pack) is None


def test_a_live_stream_on_the_workers_makes_the_one_gpu_blocks(pack, cpu_workers):
    """Live mode through the loader's gpus: the family's live stream runs on the workers (each block's
    inputs sent as it is made, unpickled there under the engine's other name) and makes the gpus = 1
    blocks, speech then silence; a stream closed mid-session leaves the workers serving the next one."""
    window = importlib.import_module(f"{PACKAGE}.livetalk_core.runtime.live_stream").LiveWindow(32000, 0)
    image = torch.rand(SIZE, SIZE, 3, generator=torch.Generator().manual_seed(0))
    text = [[torch.randn(1, 6, UMT5_WIDTH, generator=torch.Generator().manual_seed(1)), {}]]
    t = torch.arange(16000) / 16000
    speech = 0.3 * torch.sin(2 * torch.pi * 220 * t)

    def live_blocks(gpus: int, blocks: int) -> list[torch.Tensor]:
        model, vae, audio_encoder = load(pack, gpus=gpus)
        reference = vae.engine.encode(model.family.reference_pixels(image, SIZE, SIZE, "center", "cpu"))
        stream = model.family.open_live_stream(model.engine, audio_encoder.engine, conditioning=text,
                                               idle_conditioning=None, reference=reference, seed=5, steps=None,
                                               window=window)
        made = []
        for block in range(blocks):
            start, end = stream.window(block)
            audio = torch.zeros(end - start)
            lo, hi = max(start, 0), min(end, speech.numel())
            if hi > lo:
                audio[lo - start : hi - start] = speech[lo:hi]
            made.append(stream.sample(block, audio, silent=block >= 2))
        stream.close()
        return made

    one_gpu = live_blocks(1, 4)
    assert_same_video(live_blocks(2, 4), one_gpu)
    group = running_group(pack)
    live_blocks(2, 2)  # a session that ends after 2 blocks
    assert running_group(pack) is group and group.alive
    assert_same_video(live_blocks(2, 4), one_gpu)
    pack.multi_gpu.stop_workers()
    assert not group.alive


def test_the_live_node_serves_a_model_on_two_workers(pack, cpu_workers, monkeypatch):
    """The LiveTalk Live node on a gpus = 2 model: a client's session streams its blocks from the workers
    (speech, then silence under the idle prompt), and the workers stay loaded for the next session."""
    import contextlib

    blocks = []

    class Host:  # a client's session as the panel opens one, then End live node
        @contextlib.contextmanager
        def offering(self, offer):
            with offer.open_session() as session:
                t = torch.arange(session.block_samples) / 16000
                session.push_audio((0.3 * torch.sin(2 * torch.pi * 220 * t)).numpy())
                blocks.extend(session.next_block() for _ in range(3))
            offer.stop.set()
            yield
    monkeypatch.setattr(pack.live, "HOST", Host())
    model, vae, audio_encoder = load(pack, gpus=2)
    text = [[torch.randn(1, 6, UMT5_WIDTH, generator=torch.Generator().manual_seed(1)), {}]]
    pack.live.LiveTalkLive.PREPARE_CLASS_CLONE({"unique_id": "7"}).EXECUTE_NORMALIZED(
        model=model, vae=vae, audio_encoder=audio_encoder, conditioning=text, image=torch.rand(1, SIZE, SIZE, 3),
        width=SIZE, height=SIZE, seed=0, steps=2)
    assert [b.speech_samples for b in blocks] == [blocks[0].audio.size, 0, 0]
    assert all(b.frames.shape[1:] == (SIZE, SIZE, 3) and b.frames.std() > 0 for b in blocks)
    assert running_group(pack).alive


def test_validation_names_what_to_change(pack, cpu_workers, monkeypatch):
    assert validate(pack, gpus=2) is True
    message = validate(pack, gpus=2, model_name="dit.safetensors", audio_encoder_name="w2v.safetensors")
    assert "LiveTalk 1.3B runs on one GPU" in message and "RealVideo 14B" in message and "Set gpus to 1" in message
    assert validate(pack, gpus=3) == "gpus is 3, but ComfyUI sees 2 CUDA GPUs. Set gpus to 2 or fewer."
    assert pack.loader.LoadLiveTalkModel.validate_inputs(gpus=3) == validate(pack, gpus=3)  # also when queued
    monkeypatch.setattr(pack.multi_gpu, "parallel_devices", lambda: ["cpu"] * 4)
    message = validate(pack, gpus=4)
    assert "2 attention heads cannot be split evenly over 4 GPUs. Use 1 or 2 GPUs." in message
    monkeypatch.setattr(pack.multi_gpu, "parallel_devices", lambda: [])
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert validate(pack, gpus=2) == "gpus is 2, but ComfyUI sees no CUDA GPU. Set gpus to 1 or fewer."
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert "CUDA_VISIBLE_DEVICES=0" in validate(pack, gpus=2)
