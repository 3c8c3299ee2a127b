"""A server's live sessions share one workspace (KV cache, CUDA graphs, text buffers), warmed up before the
first client's session: every client session then makes each forward from a graph, block 0's included, and
its frames are those of a session of its own; the audio encoder's windows replay from graphs too. Both
families, tiny models on the CPU, with the CPU stand-in for CUDA graphs of tests/test_cuda_graphs.py (a buffer
that moved would replay stale values)."""

from __future__ import annotations

import numpy as np
import pytest
from test_cuda_graphs import GRAPHS
from test_workspace import recording_workspace

from livetalk_core.live.session import WARM_UP_BLOCKS, WarmSessions, open_session
from livetalk_core.live.smoke import smoke_models
from livetalk_core.options import RuntimeOptions

SEED = 5
BLOCKS = 4


@pytest.fixture(scope="module", params=["livetalk", "realvideo"])
def models(request):
    return smoke_models(request.param)


def open_on(models, workspace=None, start=None):
    return open_session(models.family, dit=models.dit, vae=models.vae, audio_encoder=models.encoder,
                        text=models.text, idle_text=models.idle_text, reference_image=models.reference,
                        width=models.width, height=models.height, seed=SEED, workspace=workspace)


def speech_then_silence(session) -> np.ndarray:
    """Audio for BLOCKS blocks: a loud tone for half of them (RealVideo's talking prompt), then silence."""
    samples = session.block_samples * BLOCKS
    t = np.arange(samples // 2) / 16000
    return np.concatenate([0.3 * np.sin(2 * np.pi * 220 * t), np.zeros(samples - t.size)]).astype(np.float32)


def frames_of(session) -> list[np.ndarray]:
    with session:
        session.push_audio(speech_then_silence(session))
        return [session.next_block().frames for _ in range(BLOCKS)]


def test_client_sessions_replay_every_forward_and_make_their_own_frames(models):
    models.dit.runtime = RuntimeOptions()
    alone = frames_of(open_on(models))
    models.dit.runtime = GRAPHS
    try:
        sessions = WarmSessions(lambda workspace, start: open_on(models, workspace, start), recording_workspace())
        first = sessions()
        graphs = sessions.workspace.graphs
        audio = sessions.workspace.module_graphs(models.encoder.model)
        assert sessions.warm_up_sessions == 2 and sessions.workspace.settled
        assert audio.num_graphs >= 1, "the audio windows were not captured"
        captured, eager = graphs.num_graphs, graphs.eager_forwards
        audio_captured, audio_eager = audio.num_graphs, audio.eager_forwards
        for session in (first, sessions()):  # the first client, and the next one on the kept workspace
            frames = frames_of(session)
            assert all(np.array_equal(a, b) for a, b in zip(alone, frames)), "a warm session's frames differ"
            assert graphs.eager_forwards == eager and graphs.num_graphs == captured, \
                "a client session ran a forward eagerly or paused for a capture"
            assert audio.eager_forwards == audio_eager and audio.num_graphs == audio_captured, \
                "a client session encoded its audio eagerly or paused for a capture (block 0's window too)"
            assert sessions.workspace.module_graphs(models.encoder.model) is audio
        assert sessions.warm_up_sessions == 2
    finally:
        models.dit.runtime = RuntimeOptions()


def test_on_a_cpu_without_graphs_one_block_decides_and_the_cache_is_kept(models):
    models.dit.runtime = RuntimeOptions()
    sessions = WarmSessions(lambda workspace, start: open_on(models, workspace, start))
    with sessions() as session:
        session.push_audio(np.zeros(session.block_samples, np.float32))
        session.next_block()
    assert sessions.warm_up_sessions == 1 and sessions.workspace.graphs is None
    assert sessions.workspace.runs == 2  # one warm-up block, then the client's session
    assert WARM_UP_BLOCKS > 1


def test_free_waits_for_an_open_session_then_lets_the_cache_go(models):
    sessions = WarmSessions(lambda workspace, start: open_on(models, workspace, start))
    session = sessions()
    session.push_audio(np.zeros(session.block_samples, np.float32))
    session.next_block()
    sessions.free()  # the node ends while a client's session is still closing
    assert sessions.workspace.cache is not None, "freed under a running session"
    session.close()
    assert sessions.workspace.cache is None and sessions.workspace.graphs is None
    assert sessions.workspace.text.buffers is None


class RemoteSession:
    """A session whose DiT samples in worker processes (this process's workspace stays empty); ``on_gpu``:
    whether its blocks are made on GPUs."""

    block_samples = 100

    def __init__(self, on_gpu: bool):
        self.on_gpu, self.blocks, self.closed = on_gpu, 0, False

    def push_audio(self, samples):
        pass

    def next_block(self):
        self.blocks += 1

    def close(self):
        self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@pytest.mark.parametrize("on_gpu", [True, False])
def test_a_dit_on_workers_is_warmed_by_two_whole_sessions_on_gpus_and_one_block_on_cpus(on_gpu):
    """The workers keep their own workspace, which this process cannot see settle: on GPUs two whole warm-up
    sessions (the first meets every layout, the second captures block 0's), on CPUs one block."""
    opened = []

    def open_for(workspace, start):
        opened.append(RemoteSession(on_gpu))
        return opened[-1]
    sessions = WarmSessions(open_for)
    client = sessions()
    warm_ups = opened[:-1]
    assert [s.blocks for s in warm_ups] == ([WARM_UP_BLOCKS] * 2 if on_gpu else [1])
    assert all(s.closed for s in warm_ups) and client is opened[-1] and not client.closed
    assert sessions() is opened[-1] and len(opened) == len(warm_ups) + 2  # later clients: no more warm-up
