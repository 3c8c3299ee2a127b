"""The nodes make a video as long as the audio, to the frame, for both families (issue 16); a clip
shorter than one block is announced (run by test_video_length_in_comfyui.py through comfy_in_process).

Encode Audio (wav2vec2) -> Causal DiT Sampler -> Decode Blocks and Decode Blocks to Video File with
tiny random weights at 64x64: the frames are ``floor(16 D) + 1`` for D seconds of audio (the rule of
``livetalk_core.media.timing.video_frames_for_samples``), and the mp4 holds all of the audio.
"""

from __future__ import annotations

import logging
import math
from fractions import Fraction

import av
import pytest
import server
import torch
from nodes_in_comfyui_cases import comfy_folders, load, model_files, pack, run, tone  # noqa: F401  (fixtures)
from tiny_weights import UMT5_WIDTH

FAMILIES = {"1.3b": ("dit.safetensors", "w2v.safetensors"), "14b": ("s2v.safetensors", "w2v_large.safetensors")}
SHORT = "shorter than one block"


def expected_frames(seconds: float, rate: int) -> int:
    """Frames at the instants 0, 1/16, ... through the end of ``seconds`` of audio at ``rate``."""
    return math.floor(Fraction(round(seconds * rate), rate) * 16) + 1


def encode_and_sample(pack, family: str, audio: dict, hidden: dict | None = None):
    model, vae, audio_encoder = load(pack, *FAMILIES[family])
    audio_embeds = run(pack.encoders.LiveTalkEncodeAudioWav2Vec, hidden, model=model, audio_encoder=audio_encoder,
                       audio=audio).result[0]
    reference = run(pack.encoders.LiveTalkEncodeReferenceVAE, vae=vae, image=torch.rand(1, 64, 64, 3),
                    width=64, height=64, crop="center").result[0]  # LiveTalk's smallest size
    blocks = run(pack.sampling.LiveTalkCausalDiTSampler, model=model,
                 conditioning=[[torch.randn(1, 5, UMT5_WIDTH), {}]], reference=reference, audio_embeds=audio_embeds,
                 seed=0, steps=4 if family == "1.3b" else 2, sink_frames=9, window_frames=15).result[0]
    return vae, audio_embeds, blocks


@pytest.mark.parametrize(
    "family, seconds",
    [("1.3b", 0.1), ("1.3b", 2.3), ("14b", 0.1), ("14b", 3.0), ("14b", 5.3)],  # 14B: 3 s gave 45 frames (2.81 s)
)
def test_decoded_video_is_as_long_as_the_audio(pack, comfy_folders, family, seconds):
    audio = tone(seconds, rate=44_100, channels=2)
    frames_expected = expected_frames(seconds, 44_100)
    vae, audio_embeds, blocks = encode_and_sample(pack, family, audio)
    assert audio_embeds.num_video_frames == blocks.num_video_frames == frames_expected
    assert len(blocks.blocks) == audio_embeds.num_blocks

    frames, fps = run(pack.sampling.LiveTalkDecodeBlocks, vae=vae, latent_blocks=blocks).result
    assert frames.shape[0] == frames_expected and fps == 16.0

    run(pack.save_video.LiveTalkDecodeToVideoFile, vae=vae, latent_blocks=blocks, filename_prefix="length", audio=audio)
    (path,) = comfy_folders.glob("length_*.mp4")
    with av.open(str(path)) as container:
        video, sound = container.streams.video[0], container.streams.audio[0]
        assert sum(1 for _ in container.decode(video)) == frames_expected
        assert float(video.duration * video.time_base) == pytest.approx(frames_expected / 16, abs=1e-3)
        # the video lasts (D, D + 1/16], so every sample of the speech is in the file
        assert seconds < frames_expected / 16 <= seconds + 1 / 16
        assert float(sound.duration * sound.time_base) == pytest.approx(seconds, abs=2e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_clip_shorter_than_one_block_is_announced_in_the_console_and_on_the_node(pack, comfy_folders, monkeypatch,
                                                                                  caplog, family):
    shown: list[tuple[str, str]] = []
    front_end = type("FrontEnd", (), {"send_progress_text": lambda self, text, node_id: shown.append((text, node_id))})
    monkeypatch.setattr(server.PromptServer, "instance", front_end(), raising=False)
    with caplog.at_level(logging.WARNING):
        _, audio_embeds, _ = encode_and_sample(pack, family, tone(0.1, rate=16_000, channels=1), {"UNIQUE_ID": "12"})
    assert audio_embeds.num_video_frames == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and SHORT in r.getMessage()]
    assert len(warnings) == 1 and "0.10 s" in warnings[0] and "2 frames (0.12 s" in warnings[0]
    assert len(shown) == 1 and shown[0][1] == "12" and SHORT in shown[0][0] and "2 frames" in shown[0][0]

    caplog.clear()
    shown.clear()
    encode_and_sample(pack, family, tone(0.5, rate=16_000, channels=1), {"UNIQUE_ID": "12"})  # one whole block
    assert not shown and not [r for r in caplog.records if SHORT in r.getMessage()]
