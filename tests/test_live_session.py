"""The live session (livetalk_core/live): tiny random models on the CPU, both families.

A session fed a whole clip makes the offline video of that clip (the same causal loop and decoder,
fed block by block); blocks whose audio is late are filled with silence at their deadline; silent
RealVideo blocks run under the idle prompt; memory stays flat over many blocks; audio pushed from
another thread arrives whole and in order; close frees the KV cache.
"""

from __future__ import annotations

import gc
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from livetalk_core.family_base import text_context
from livetalk_core.live.clock import LiveClock
from livetalk_core.live.session import LiveSession, is_silence, open_session
from livetalk_core.live.smoke import smoke_models
from livetalk_core.livetalk import live as livetalk_live
from livetalk_core.livetalk.pipeline import AudioConditioning, livetalk_video_length
from livetalk_core.livetalk.sampler import LIVETALK_CACHE
from livetalk_core.media.audio_file import load_audio
from livetalk_core.media.timing import video_frames_for_samples
from livetalk_core.realvideo import live as realvideo_live
from livetalk_core.realvideo.audio import segment_features
from livetalk_core.realvideo.sampler import BlockPlan, realvideo_schedule, sample_realvideo
from livetalk_core.runtime.decode_stream import decode_blocks
from livetalk_core.runtime.live_stream import LiveWindow
from livetalk_core.runtime.noise import SeededNoise

SPEECH = Path(__file__).resolve().parents[1] / "assets" / "speech.flac"
CLIP_SECONDS = 2.0
SEED = 3


@pytest.fixture(scope="module", params=["livetalk", "realvideo"])
def models(request):
    return request.getfixturevalue(f"{request.param}_models")


@pytest.fixture(scope="module")
def livetalk_models():
    return smoke_models("livetalk")


@pytest.fixture(scope="module")
def realvideo_models():
    return smoke_models("realvideo")


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    """The shipped speech clip (real speech), its first CLIP_SECONDS."""
    return load_audio(SPEECH)[: round(CLIP_SECONDS * 16000)].numpy()


def open_on(models, **options) -> LiveSession:
    return open_session(models.family, dit=models.dit, vae=models.vae, audio_encoder=models.encoder,
                        text=models.text, idle_text=models.idle_text, reference_image=models.reference,
                        width=models.width, height=models.height, seed=SEED, **options)


def reference_latent(models) -> torch.Tensor:
    pixels = models.family.reference_pixels(models.reference, models.width, models.height, "center", "cpu")
    return models.vae.encode(pixels)


def windows_of(clip: np.ndarray, stream_window, blocks: int) -> list[torch.Tensor]:
    """Each block's window of a clip that starts at the session's start (silence around it)."""
    out = []
    for block in range(blocks):
        start, end = stream_window(block)
        audio = np.zeros(end - start, np.float32)
        lo, hi = max(start, 0), min(end, clip.size)
        if hi > lo:
            audio[lo - start : hi - start] = clip[lo:hi]
        out.append(torch.from_numpy(audio))
    return out


def offline_livetalk(models, clip: np.ndarray, window: LiveWindow) -> torch.Tensor:
    """The offline path (family.sample_blocks + the streaming decoder, trimmed to the clip) with the
    conditioning the live windows give."""
    length = livetalk_video_length(clip.size)
    windows = windows_of(clip, lambda b: livetalk_live.block_window(b, window), length.num_blocks)
    embeds = torch.cat([livetalk_live.block_embeds(models.dit, models.encoder, b, audio, window)
                        for b, audio in enumerate(windows)], dim=2)
    blocks = models.family.sample_blocks(
        models.dit, conditioning=[[models.text, {}]], idle_conditioning=None, reference=reference_latent(models),
        audio=AudioConditioning(embeds=embeds, length=length), seed=SEED, steps=4, cache_policy=LIVETALK_CACHE)
    return torch.cat(list(decode_blocks(models.vae, blocks, length.num_video_frames, overlap=False)))


def offline_realvideo(models, clip: np.ndarray, window: LiveWindow, num_blocks: int) -> torch.Tensor:
    """RealVideo's offline loop (sample_realvideo, which family.sample_blocks runs) over a plan of one
    segment per block, the live windows' features, talking where the block's tile holds speech."""
    windows = windows_of(clip, lambda b: realvideo_live.block_window(b, window), num_blocks)
    segments = [realvideo_live.block_segment(b, window, audio) for b, audio in enumerate(windows)]
    features = [segment_features(models.encoder, segment, models.dit.dtype) for segment, _ in segments]
    geometry = realvideo_live.REALVIDEO_LIVE_GEOMETRY
    plan = [BlockPlan(b, ptr, talking=not is_silence(clip[slice(*geometry.tile(b))]))
            for b, (_, ptr) in enumerate(segments)]
    dim = models.family.text_dim(models.dit)
    blocks = sample_realvideo(
        models.dit, ref_latent=reference_latent(models).to(models.dit.dtype),
        idle_context=text_context([[models.idle_text, {}]], dim),
        talking_context=text_context([[models.text, {}]], dim),
        audio_features=features, noise=SeededNoise(SEED), plan=plan, schedule=realvideo_schedule(2))
    return torch.cat(list(decode_blocks(models.vae, blocks, video_frames_for_samples(clip.size), overlap=False)))


@pytest.mark.parametrize("lookahead_s", [0.0, 0.25])
def test_session_fed_a_whole_clip_makes_the_offline_video(models, speech, lookahead_s):
    """All audio pushed up front: the blocks' frames, concatenated and cut to the clip's length, are
    the offline video's, exactly (the same kernels run on the CPU); the blocks' audio is the clip."""
    with open_on(models, lookahead_s=lookahead_s) as session:
        session.push_audio(speech)
        frames_needed = video_frames_for_samples(speech.size)
        blocks = []
        while sum(b.frames.shape[0] for b in blocks) < frames_needed:
            blocks.append(session.next_block())
        window = session._stream.live_window
    live = np.concatenate([b.frames for b in blocks])[:frames_needed]
    if models.family.cli_name == "livetalk":
        offline = offline_livetalk(models, speech, window)
    else:
        offline = offline_realvideo(models, speech, window, len(blocks))
    assert live.shape == tuple(offline.shape)
    assert np.array_equal(live, offline.numpy())
    audio = np.concatenate([b.audio for b in blocks])
    assert [b.audio_start for b in blocks] == [sum(x.audio.size for x in blocks[:i]) for i in range(len(blocks))]
    assert np.array_equal(audio[: speech.size], speech) and not audio[speech.size :].any()
    assert [b.speech_samples for b in blocks] == [
        int(np.clip(speech.size - b.audio_start, 0, b.audio.size)) for b in blocks]
    assert [b.first_frame for b in blocks] == [sum(x.frames.shape[0] for x in blocks[:i]) for i in range(len(blocks))]
    assert live.shape[1:] == (session.height, session.width, 3)
    assert session.reference_frame().shape == (session.height, session.width, 3)


def test_a_late_block_is_filled_with_silence_at_its_deadline(livetalk_models):
    """Part of a block's audio by its deadline: the block is made then, the rest silence; audio that
    comes later goes after that block (nothing lost or overwritten)."""
    rng = np.random.default_rng(0)
    early, late = (rng.uniform(-0.5, 0.5, n).astype(np.float32) for n in (4800, 3000))
    with open_on(livetalk_models) as session:
        session.push_audio(early)
        began = time.monotonic()
        block = session.next_block(wait_until=began + 0.3)
        assert time.monotonic() - began >= 0.3  # it waited for the rest of the tile
        assert block.speech_samples == early.size and np.array_equal(block.audio[: early.size], early)
        assert not block.audio[early.size :].any()
        session.push_audio(late)
        following = session.next_block()  # no wait: what is there now
    assert following.audio_start == block.audio.size
    assert following.speech_samples == late.size and np.array_equal(following.audio[: late.size], late)


def test_no_audio_at_all_still_makes_blocks(models):
    """A listening avatar: with nothing pushed, blocks come at their deadlines, all silence."""
    with open_on(models) as session:
        blocks = [session.next_block(wait_until=time.monotonic()) for _ in range(2)]
    assert [b.speech_samples for b in blocks] == [0, 0]
    assert all(not b.audio.any() and b.frames.shape[0] > 0 for b in blocks)


def record_prompts(monkeypatch, dit) -> list[str]:
    """Which prompt ("idle" / "talking") each DiT forward of a block runs under (the prefill excluded)."""
    projected, used = [], []
    project, forward = dit.project_context, dit.forward

    def project_context(context):
        projected.append(project(context))
        return projected[-1]

    def recording_forward(x, t, window, kv, *args, **kwargs):
        # the forward reads the text slot, into which the block's prompt K/V was copied
        idle, talking = (torch.equal(kv[0][0], prompt[0][0]) for prompt in projected)
        assert idle != talking
        used.append("idle" if idle else "talking")
        return forward(x, t, window, kv, *args, **kwargs)

    monkeypatch.setattr(dit, "project_context", project_context)
    monkeypatch.setattr(dit, "forward", recording_forward)
    return used


def test_silent_realvideo_blocks_use_the_idle_prompt(realvideo_models, speech, monkeypatch):
    """RealVideo, as its live app: a block whose tile holds speech runs under the talking prompt, a
    silent one (nothing pushed, or only a microphone's noise floor) under the idle prompt (LiveTalk has
    one prompt)."""
    used = record_prompts(monkeypatch, realvideo_models.dit)
    forwards = 2 + 1  # 2 steps and the cache refresh
    noise_floor = np.random.default_rng(0).normal(0, 0.002, 8000).astype(np.float32)  # a quiet room's microphone
    with open_on(realvideo_models) as session:
        session.push_audio(speech[8000:16000])  # block 0's tile: speech
        session.push_audio(noise_floor)  # block 1's: the microphone on, nobody speaking
        blocks = [session.next_block() for _ in range(3)]  # block 2: nothing pushed
    assert [b.speech_samples for b in blocks] == [8000, 8000, 0]
    assert used[:forwards] == ["talking"] * forwards
    assert used[forwards : 3 * forwards - 1] == ["idle"] * (2 * forwards - 1)  # block 2's refresh not yet run


def tensor_bytes() -> int:
    """Bytes of every distinct tensor storage the interpreter holds."""
    gc.collect()
    storages = {}
    for obj in gc.get_objects():
        # Plain tensors and parameters only: the fake and functional tensors an earlier torch.compile may
        # leave behind hold no memory, and reading their data pointer raises.
        if type(obj) in (torch.Tensor, torch.nn.Parameter) and obj.device.type == "cpu" and not obj.is_meta:
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


@pytest.mark.parametrize("family_name", ["livetalk", "realvideo"])
def test_memory_stays_flat_over_many_blocks(family_name, livetalk_models, realvideo_models, speech):
    """The KV cache's sink + window ring never grows: after the ring has wrapped, more blocks (with
    audio streaming in) hold exactly the same tensor bytes, and the audio kept stays bounded."""
    models = livetalk_models if family_name == "livetalk" else realvideo_models
    with open_on(models) as session:
        bytes_after = {}
        for block in range(11):
            session.push_audio(speech[: session.block_samples])
            session.next_block()
            if block in (6, 10):
                bytes_after[block] = tensor_bytes()
        kept = session._timeline._samples.size
    assert bytes_after[10] == bytes_after[6]
    assert kept <= 4 * 16000  # the windows' context, not the session's whole audio


def test_push_audio_from_another_thread_arrives_whole_and_in_order(livetalk_models, speech):
    """A thread pushes odd-sized chunks while the clock makes blocks: the blocks' pushed samples (their
    speech runs) are exactly the pushed audio, in order, and the rest of their audio is silence."""
    chunks = np.array_split(speech, 37)
    blocks, errors = [], []
    with open_on(livetalk_models) as session:
        clock = LiveClock(session, blocks.append, slack_s=1.0, on_error=errors.append)
        clock.start()

        def push():
            for chunk in chunks:
                session.push_audio(chunk)
                time.sleep(0.005)

        pusher = threading.Thread(target=push)
        pusher.start()
        pusher.join()
        while sum(b.speech_samples for b in blocks) < speech.size and not errors:
            time.sleep(0.05)
        clock.stop()
    assert not errors
    assert np.array_equal(np.concatenate([b.pushed() for b in blocks]), speech)
    audio = np.concatenate([b.audio for b in blocks])
    assert np.abs(audio).sum() == pytest.approx(np.abs(speech).sum())  # the rest is silence


def test_clock_makes_a_block_at_its_deadline_when_no_audio_comes(livetalk_models):
    """Without audio the first block is made when its audio should have arrived plus the slack, not before."""
    made = []
    with open_on(livetalk_models) as session:
        clock = LiveClock(session, lambda block: made.append(time.monotonic()), slack_s=0.2)
        clock.start()
        while not made:
            time.sleep(0.02)
        clock.stop()
        due = clock.started_at + session.first_block_frames * 1000 / 16000 + 0.2
    assert made[0] >= due


def test_close_frees_the_kv_cache_and_is_idempotent(livetalk_models):
    """After close the session holds no tensor (the models stay: they are the caller's), a second
    close is a no-op and a block cannot be asked for."""
    with open_on(livetalk_models) as warm_up:  # the process's one-time caches (RoPE frequencies) fill now
        warm_up.next_block()
    before = tensor_bytes()
    session = open_on(livetalk_models)
    session.next_block()
    assert tensor_bytes() > before
    session.close()
    session.close()
    assert tensor_bytes() == before
    with pytest.raises(RuntimeError, match="closed"):
        session.next_block()


def test_closing_the_session_under_a_waiting_clock_stops_it_quietly(livetalk_models):
    """The owner closes the session while the clock waits for audio: the clock's thread ends at once, no error."""
    errors = []
    session = open_on(livetalk_models)
    clock = LiveClock(session, lambda block: None, slack_s=30.0, on_error=errors.append)
    clock.start()
    time.sleep(0.1)
    session.close()
    clock._thread.join(timeout=5)
    assert not clock.running and clock.error is None and not errors
    clock.stop()


class FakeWorkerStream:
    """What a worker group's streaming request (parallel.workers.BlockStream) is to the live stream: it
    records each block's inputs and answers zeros."""

    def __init__(self, **inputs):
        self.inputs, self.fed, self.closed = inputs, [], False

    def next_block(self, block_inputs):
        self.fed.append(block_inputs)
        return torch.zeros(1, 16, 2, *self.inputs["ref_latent"].shape[-2:])

    def close(self):
        self.closed = True


def worker_dit(realvideo_models, *, can_stream: bool):
    """A DiT on worker processes as the live stream sees it (nodes/multi_gpu.WorkerDiT, the CLI's
    GroupSampler): config, dtype, generate, and stream where the workers can stream."""
    class TorchrunRanks:  # a RemoteSampler that samples whole videos only
        config, dtype = realvideo_models.dit.config, torch.float32

        def generate(self, *, seed, **inputs):
            raise AssertionError("not reached")

    class WorkerDiT(TorchrunRanks):
        streams = []

        def stream(self, *, seed, **inputs):
            self.streams.append(FakeWorkerStream(seed=seed, **inputs))
            return self.streams[-1]

    return WorkerDiT() if can_stream else TorchrunRanks()


def test_realvideo_on_workers_streams_each_blocks_inputs_to_them(realvideo_models, speech):
    """A DiT on worker processes (a RemoteSampler; the loader's gpus > 1): the live stream opens one
    streaming request with what every block shares, then sends each block the one-process stream's
    plan entry and segment features (tests/test_live_multi_gpu.py runs real workers); closing it closes
    the request. A RemoteSampler that cannot stream (torchrun ranks) is one clear error."""
    window, reference, context = LiveWindow(16000, 0), reference_latent(realvideo_models), [[realvideo_models.text, {}]]

    def open_stream(dit):
        return realvideo_models.family.open_live_stream(
            dit, realvideo_models.encoder, conditioning=context, idle_conditioning=None, reference=reference, seed=5,
            steps=None, window=window)

    dit = worker_dit(realvideo_models, can_stream=True)
    stream = open_stream(dit)
    audio = windows_of(speech, stream.window, 3)
    for block in range(3):
        assert stream.sample(block, audio[block], silent=block == 1).shape[2] == 2
    stream.close()
    (request,) = dit.streams
    assert request.closed and request.inputs["seed"] == 5 and torch.equal(request.inputs["ref_latent"], reference)
    assert len(request.inputs["schedule"]) == realvideo_live.LIVE_STEPS
    for block, (entry, features) in enumerate(request.fed):
        segment, ptr = realvideo_live.block_segment(block, window, audio[block])
        assert entry == BlockPlan(block, ptr, talking=block != 1)
        assert torch.equal(features, segment_features(realvideo_models.encoder, segment, torch.float32))
    from livetalk_core.errors import InputError

    with pytest.raises(InputError, match="cannot stream block by block"):
        open_stream(worker_dit(realvideo_models, can_stream=False))
