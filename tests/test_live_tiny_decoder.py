"""The live mode with the tiny decoder (issue 19): a session given a tiny TAEHV decodes its blocks with it,
block 0 one latent frame at a time as with the VAE; the live command's sessions get the CLI's decoder.
Tiny random models on the CPU."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from livetalk_core.live import session as live_session
from livetalk_core.live.server import ModelOpener
from livetalk_core.live.smoke import smoke_models
from livetalk_core.media.audio_file import load_audio
from livetalk_core.media.taehv import TinyDecoder, TinyDecoderConfig
from livetalk_core.media.vae import frames_to_uint8
from livetalk_core.options import RuntimeOptions

SPEECH = Path(__file__).resolve().parents[1] / "assets" / "speech.flac"
SMALL = TinyDecoderConfig(stem_width=8, stage_widths=(8, 8, 8), stage_outputs=(8, 8, 8))
BLOCKS = 3


def tiny_decoder() -> TinyDecoder:
    torch.manual_seed(0)
    decoder = TinyDecoder(SMALL).eval().requires_grad_(False)
    with torch.no_grad():  # the final bias keeps most values inside the [0, 1] clamp
        decoder.decoder["22"].bias.fill_(0.5)
    return decoder


@pytest.fixture(scope="module")
def models():
    return smoke_models("livetalk")


def run_session(models, decoder) -> tuple[np.ndarray, list[torch.Tensor]]:
    """BLOCKS blocks of a session fed speech: the frames, and the latents its stream made."""
    with live_session.open_session(models.family, dit=models.dit, vae=models.vae, audio_encoder=models.encoder,
                                   text=models.text, reference_image=models.reference, width=models.width,
                                   height=models.height, seed=3, decoder=decoder) as session:
        latents, sample = [], session._stream.sample

        def recording(*args, **kwargs):
            latents.append(sample(*args, **kwargs))
            return latents[-1]
        session._stream.sample = recording
        session.push_audio(load_audio(SPEECH)[: 2 * 16000].numpy())
        frames = np.concatenate([session.next_block().frames for _ in range(BLOCKS)])
    return frames, latents


def test_a_live_session_decodes_with_the_tiny_decoder(models):
    """The frames are the tiny decoder's stream of the session's latents (block 0 one latent frame at a
    time), exactly; the VAE's frames of the same session are other frames."""
    decoder = tiny_decoder()
    frames, latents = run_session(models, decoder)
    stream = decoder.stream_decoder()
    pieces = [*latents[0].split(1, dim=2), *latents[1:]]
    expected = np.concatenate([frames_to_uint8(stream.decode(piece)).numpy() for piece in pieces])
    assert frames.shape == expected.shape and np.array_equal(frames, expected)
    full, full_latents = run_session(models, None)
    assert all(torch.equal(a, b) for a, b in zip(latents, full_latents, strict=True))  # the same sampling
    assert full.shape == frames.shape
    assert np.abs(full.astype(int) - frames.astype(int)).mean() > 10, "the VAE decoded, not the tiny decoder"


def test_warm_sessions_replay_the_tiny_decoder_from_graphs_with_the_same_frames(models):
    """On a warm server's workspace the tiny decoder's decodes replay from graphs kept across sessions, the
    stream's memory in the graphs' own tensors, zeroed per session: a client session's frames equal a
    session of its own, without an eager decode or a capture (CPU stand-in for graphs)."""
    from test_cuda_graphs import GRAPHS
    from test_workspace import recording_workspace

    decoder = tiny_decoder()
    alone, _ = run_session(models, decoder)
    models.dit.runtime = GRAPHS
    try:
        def open_for(workspace, start):
            return live_session.open_session(
                models.family, dit=models.dit, vae=models.vae, audio_encoder=models.encoder, text=models.text,
                reference_image=models.reference, width=models.width, height=models.height, seed=3,
                decoder=decoder, workspace=workspace)
        sessions = live_session.WarmSessions(open_for, recording_workspace())
        client = sessions()
        graphs = sessions.workspace.module_graphs(decoder)
        assert sessions.warm_up_sessions == 2 and sessions.workspace.settled
        assert graphs.num_graphs == 2, "block 0's one-latent pieces and the later blocks: one graph each"
        captured, eager = graphs.num_graphs, graphs.eager_forwards
        for session in (client, sessions()):
            with session:
                session.push_audio(load_audio(SPEECH)[: 2 * 16000].numpy())
                frames = np.concatenate([session.next_block().frames for _ in range(BLOCKS)])
            assert np.array_equal(frames, alone), "a warm session's frames differ from a session of its own"
            assert graphs.eager_forwards == eager and graphs.num_graphs == captured
    finally:
        models.dit.runtime = RuntimeOptions()


@dataclass
class Inputs:  # the fields of cli.RunInputs that ModelOpener reads
    prompts: tuple
    family: object
    runtime: object
    reference_pixels: torch.Tensor
    image: object
    steps: int | None = None


def test_the_live_commands_sessions_decode_with_the_clis_decoder(models, monkeypatch):
    """``live --decoder tiny --tiny-decoder FILE``: the CLI's loaded decoder (cli.Models.decoder) is what
    each session decodes with."""
    from livetalk_core import cli

    decoder = tiny_decoder()
    monkeypatch.setattr(cli, "prompt_contexts", lambda inputs, files, runtime: [models.text, None])
    opened = {}
    real_open = live_session.open_session

    def open_session(*args, **kwargs):
        opened.update(kwargs)
        return real_open(*args, **kwargs)
    monkeypatch.setattr(live_session, "open_session", open_session)
    pixels = torch.zeros(1, 3, 1, models.height, models.width)
    inputs = Inputs(("a face", None), models.family, SimpleNamespace(device="cpu"), pixels, models.reference)
    loaded = SimpleNamespace(dit=models.dit, vae=models.vae, audio_encoder=models.encoder, decoder=decoder)
    start = SimpleNamespace(prompt=None, image=None)
    with ModelOpener(inputs, files=None, models=loaded, seed=3)(start) as session:
        assert opened["decoder"] is decoder
        assert session._decoding_model is decoder
