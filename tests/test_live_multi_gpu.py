"""RealVideo's live mode on a worker group (the loader's gpus > 1, the CLI's --gpus) on CPU: 2 and 4 gloo
worker processes stand in for GPUs. A live stream on the workers makes the blocks one process makes; closing
it mid-session leaves the group serving the next session; a worker that dies mid-session is one clear error."""

from __future__ import annotations

import argparse
import contextlib
import logging
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_sequence_parallel import ATOL, RTOL, WORLD_SIZES

from livetalk_core import cli
from livetalk_core.errors import InputError, LiveTalkError
from livetalk_core.live.session import open_session
from livetalk_core.live.smoke import smoke_models
from livetalk_core.media.audio_file import load_audio
from livetalk_core.media.samples import SAMPLE_AUDIO
from livetalk_core.options import RuntimeOptions
from livetalk_core.parallel.remote import GroupSampler
from livetalk_core.parallel.workers import WorkerGroup
from livetalk_core.realvideo import parallel as realvideo_parallel
from livetalk_core.realvideo.audio import segment_features
from livetalk_core.realvideo.family import REALVIDEO_14B
from livetalk_core.realvideo.live import block_segment, block_window
from livetalk_core.realvideo.live_remote import RemoteRealVideoStream
from livetalk_core.realvideo.parallel import generate_on_worker, stream_realvideo_parallel
from livetalk_core.realvideo.sampler import BlockPlan, realvideo_schedule
from livetalk_core.runtime.live_stream import LiveWindow
from livetalk_core.runtime.noise import SeededNoise

SEED = 3
WINDOW = LiveWindow(context_samples=16000, lookahead_samples=0)
BLOCKS = 12  # past block 10: the sink drift runs on the head-sharded cache too
SILENT_BLOCKS = (2, 3)  # sampled under the idle prompt


@pytest.fixture(scope="module")
def models():
    return smoke_models("realvideo")


@pytest.fixture(scope="module")
def dit_file(tmp_path_factory):
    """The tiny DiT's file (what workers load) and its load options."""
    tiny = REALVIDEO_14B.smoke_weights(tmp_path_factory.mktemp("tiny_realvideo"))
    return tiny.dit, REALVIDEO_14B.cli_load_options(tiny.dit, argparse.Namespace(dit_config=None))


@pytest.fixture(scope="module")
def one_process_dit(dit_file):
    path, options = dit_file
    return REALVIDEO_14B.load(path, torch.float32, "cpu", **options)


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    return load_audio(SAMPLE_AUDIO)[: 4 * 16000].numpy()


def start_workers(dit_file, world: int) -> GroupSampler:
    path, options = dit_file
    job = REALVIDEO_14B.worker_job(path, RuntimeOptions(precision="fp32"), **options)
    return GroupSampler(WorkerGroup(job, ["cpu"] * world, label=REALVIDEO_14B.name))


def reference_latent(models) -> torch.Tensor:
    pixels = REALVIDEO_14B.reference_pixels(models.reference, models.width, models.height, "center", "cpu")
    return models.vae.encode(pixels)


def open_stream(dit, models, seed: int = SEED):
    return REALVIDEO_14B.open_live_stream(
        dit, models.encoder, conditioning=[[models.text, {}]], idle_conditioning=[[models.idle_text, {}]],
        reference=reference_latent(models), seed=seed, steps=None, window=WINDOW)


def window_audio(window: tuple[int, int], clip: np.ndarray) -> torch.Tensor:
    """The timeline samples ``window`` of ``clip`` (which starts with the session; silence around it)."""
    start, end = window
    audio = np.zeros(end - start, np.float32)
    lo, hi = max(start, 0), min(end, clip.size)
    if hi > lo:
        audio[lo - start : hi - start] = clip[lo:hi]
    return torch.from_numpy(audio)


def stream_blocks(stream, clip: np.ndarray, blocks: int) -> list[torch.Tensor]:
    """The first ``blocks`` latents of ``stream`` fed from ``clip``; the stream is left open."""
    return [stream.sample(b, window_audio(stream.window(b), clip), silent=b in SILENT_BLOCKS) for b in range(blocks)]


def assert_same_blocks(ours: list[torch.Tensor], reference: list[torch.Tensor]) -> None:
    assert len(ours) == len(reference)
    for b, (a, r) in enumerate(zip(ours, reference)):
        torch.testing.assert_close(a, r, rtol=RTOL, atol=ATOL, msg=lambda m: f"block {b}: {m}")


def test_a_workers_streams_share_one_workspace_and_a_whole_video_lets_it_go(models, one_process_dit, speech):
    """What a worker runs (here in this process, one rank): its second stream samples on the first one's
    kept KV cache (and graphs, on a GPU) and gets the same block; a whole video frees that workspace."""
    segment, ptr = block_segment(0, WINDOW, window_audio(block_window(0, WINDOW), speech))
    features = segment_features(models.encoder, segment, torch.float32)
    inputs = dict(ref_latent=reference_latent(models), idle_context=models.idle_text, talking_context=models.text,
                  schedule=realvideo_schedule(2))
    firsts = []
    for _ in range(2):
        with contextlib.closing(stream_realvideo_parallel(one_process_dit, None, noise=SeededNoise(SEED),
                                                          feed=iter([(BlockPlan(0, ptr), features)]),
                                                          **inputs)) as blocks:
            firsts.append(next(blocks))
    workspace = realvideo_parallel._STREAM_WORKSPACES[one_process_dit]
    assert workspace.runs == 2 and workspace.cache is not None and torch.equal(firsts[0], firsts[1])
    video = list(generate_on_worker(one_process_dit, None, noise=SeededNoise(SEED), audio_features=[features],
                                    plan=[BlockPlan(0, ptr)], **inputs))
    assert torch.equal(video[0], firsts[0])  # block 0 of the video is block 0 of the stream
    assert one_process_dit not in realvideo_parallel._STREAM_WORKSPACES and workspace.cache is None


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_a_live_stream_on_workers_makes_the_one_process_blocks(world, models, dit_file, one_process_dit, speech):
    """The same session (speech, then silent blocks under the idle prompt, past the sink drift) on
    ``world`` workers and in one process: the same latents, within the offline worker tests' tolerance."""
    with contextlib.closing(open_stream(one_process_dit, models)) as stream:
        single = stream_blocks(stream, speech, BLOCKS)
    workers = start_workers(dit_file, world)
    try:
        with contextlib.closing(open_stream(workers, models)) as stream:
            assert isinstance(stream, RemoteRealVideoStream)
            parallel = stream_blocks(stream, speech, BLOCKS)
    finally:
        workers.close()
    assert_same_blocks(parallel, single)
    assert not torch.equal(parallel[0], parallel[1])  # the blocks differ: not one block repeated


def test_closing_a_session_mid_stream_leaves_the_group_serving(models, dit_file, one_process_dit, speech, caplog):
    """A live session (through open_session, decoded frames and all) closed after 2 blocks stops the
    workers' request at once; a rejected stream input leaves the group usable; the next session on the
    same workers gets the one-process blocks, and a whole video after it still works."""
    workers = start_workers(dit_file, 2)
    try:
        def session(dit):
            return open_session(REALVIDEO_14B, dit=dit, vae=models.vae, audio_encoder=models.encoder, text=models.text,
                                idle_text=models.idle_text, reference_image=models.reference, width=models.width,
                                height=models.height, seed=SEED, context_s=1.0)

        with caplog.at_level(logging.INFO, logger="livetalk_core.parallel.workers"), session(workers) as live:
            live.push_audio(speech[:16000])
            first = [live.next_block() for _ in range(2)]
        assert "workers stopped after block 2" in caplog.text
        with session(one_process_dit) as live:
            live.push_audio(speech[:16000])
            reference_frames = [live.next_block() for _ in range(2)]
        for ours, ref in zip(first, reference_frames):  # decoded frames: within one level of rounding
            assert ours.frames.shape == ref.frames.shape
            assert np.abs(ours.frames.astype(int) - ref.frames.astype(int)).max() <= 1
            assert np.array_equal(ours.audio, ref.audio)

        bad = workers.stream(seed=SEED, ref_latent=torch.zeros(1, 16, 2, 4, 4), idle_context=models.idle_text,
                             talking_context=models.text)
        with pytest.raises(InputError, match="reference latent"):
            bad.next_block(None)
        assert workers.group.alive

        with contextlib.closing(open_stream(one_process_dit, models, seed=SEED + 1)) as stream:
            single = stream_blocks(stream, speech, 4)
        with contextlib.closing(open_stream(workers, models, seed=SEED + 1)) as stream:
            assert_same_blocks(stream_blocks(stream, speech, 4), single)
        # a whole video after the live sessions
        audio = REALVIDEO_14B.encode_audio(workers, models.encoder, torch.from_numpy(speech[:16000]), "cpu")

        def video(dit):
            return list(REALVIDEO_14B.sample_blocks(
                dit, conditioning=[[models.text, {}]], idle_conditioning=[[models.idle_text, {}]],
                reference=reference_latent(models), audio=audio, seed=SEED, steps=2, cache_policy=None))
        assert_same_blocks(video(workers), video(one_process_dit))
    finally:
        workers.close()


def test_a_worker_that_dies_mid_session_is_one_clear_error(models, dit_file, speech):
    """Rank 1 is killed between blocks: the next block raises one message naming it (no hang; not rank 0,
    which fails in its exchanges with rank 1), the group is stopped, the stream still closes, and a new
    stream says the group has stopped."""
    workers = start_workers(dit_file, 2)
    try:
        stream = open_stream(workers, models)
        stream_blocks(stream, speech, 2)
        workers.group._workers[1].process.kill()
        time.sleep(1.0)  # rank 0 may fail in an exchange with the dead rank and exit first: rank 1 is still named
        began = time.monotonic()
        with pytest.raises(LiveTalkError, match=r"^RealVideo 14B worker 1 \(cpu\) failed: it exited unexpectedly"):
            stream.sample(2, window_audio(stream.window(2), speech), silent=False)
        assert time.monotonic() - began < 30
        assert not workers.group.alive
        stream.close()
        with pytest.raises(LiveTalkError, match="has stopped; create a new one"):
            open_stream(workers, models)
    finally:
        workers.close()


def live_command_blocks(model_argv: list[str], speech: np.ndarray) -> list:
    """The first 2 blocks of a session of the live command's models (``model_argv``: its model options)."""
    from livetalk_core.live.protocol import Start
    from livetalk_core.live.server import model_opener

    with model_opener(model_argv, SEED) as (opener, family), opener(Start(prompt=None, image=None)) as session:
        assert family == REALVIDEO_14B.name
        session.push_audio(speech[:16000])
        return [session.next_block() for _ in range(2)]


def test_the_live_command_runs_the_model_on_workers_with_gpus(speech, monkeypatch):
    """``live --gpus 2`` (here the smoke model's CPU workers): the command's loader starts the workers
    and its sessions stream on them, making the frames of the command's one-process sessions."""
    started = []
    real_start = cli.dit_on_workers
    monkeypatch.setattr(cli, "dit_on_workers", lambda *a, **k: started.append(real_start(*a, **k)) or started[-1])
    try:
        ours = live_command_blocks(["--smoke", "--model", "realvideo", "--gpus", "2"], speech)
    finally:
        for workers in started:
            workers.close()
    assert len(started) == 1 and started[0].group.world_size == 2
    for a, b in zip(ours, live_command_blocks(["--smoke", "--model", "realvideo"], speech)):
        assert a.frames.shape == b.frames.shape
        assert np.abs(a.frames.astype(int) - b.frames.astype(int)).max() <= 1


def test_the_command_with_gpus_writes_the_one_process_video(tmp_path, monkeypatch):
    """Offline, ``--gpus 2`` samples on the workers the latents one process samples."""
    started = []
    real_start = cli.dit_on_workers
    monkeypatch.setattr(cli, "dit_on_workers", lambda *a, **k: started.append(real_start(*a, **k)) or started[-1])
    common = ["--smoke", "--model", "realvideo", "--duration", "1.0"]
    try:
        assert cli.main([*common, "--gpus", "2", "--output", str(tmp_path / "w.mp4"),
                         "--latents-out", str(tmp_path / "w.safetensors")]) == 0
    finally:
        for workers in started:
            workers.close()
    assert len(started) == 1
    assert cli.main([*common, "--output", str(tmp_path / "one.mp4"),
                     "--latents-out", str(tmp_path / "one.safetensors")]) == 0
    ours, one = (load_file(str(tmp_path / f"{name}.safetensors"))["latents"] for name in ("w", "one"))
    torch.testing.assert_close(ours, one, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(("argv", "message"), [
    (["--gpus", "0"], "--gpus 0: give 1 or more"),
    (["--gpus", "2"], "LiveTalk 1.3B runs on one GPU; --gpus 2 is for RealVideo 14B"),
    (["--model", "realvideo", "--gpus", "2", "--device", "cpu"], "--gpus 2, but this machine has no CUDA GPU"),
])
def test_gpus_the_run_cannot_use_are_refused_before_anything_loads(argv, message, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err
