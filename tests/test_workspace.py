"""A sampling workspace (KV cache + CUDA graphs + text buffers) kept across runs: the runs after the
first replay their forwards from block 0 on, with each run's own prompt and inputs, and give the
latents a run of their own gives.

The graphs are the CPU stand-in of tests/test_cuda_graphs.py: a capture records the ops with the
tensors they touched and a replay re-runs them on those same tensors, so a buffer that moved (a new
cache, a prompt's K/V in new tensors) would replay the old values and the latents would differ.
"""

from __future__ import annotations

import pytest
import torch
from test_cuda_graphs import GRAPHS, RecordingMaker
from test_realvideo import AUDIO_DIM, TEXT_DIM, tiny_model

from livetalk_core.livetalk.model import LiveTalkConfig, LiveTalkDiT
from livetalk_core.livetalk.sampler import sample_livetalk
from livetalk_core.options import RuntimeOptions
from livetalk_core.realvideo.sampler import BlockPlan, realvideo_schedule, sample_realvideo
from livetalk_core.runtime.cuda_graphs import ForwardGraphs
from livetalk_core.runtime.noise import SeededNoise
from livetalk_core.runtime.workspace import Workspace
from livetalk_core.wan.dit import WanCoreConfig


def recording_workspace() -> Workspace:
    """A workspace whose graphs are the CPU stand-in (when the model asks for graphs)."""
    return Workspace(lambda model, cache, forwards: ForwardGraphs(forwards, RecordingMaker()) if model.cuda_graphs
                     else None)


def livetalk_model() -> LiveTalkDiT:
    torch.manual_seed(0)
    core = WanCoreConfig(dim=128, in_dim=33, out_dim=16, ffn_dim=32, num_layers=4, text_dim=16)
    return LiveTalkDiT(LiveTalkConfig(core=core, audio_features=8)).eval()


def livetalk_inputs(model: LiveTalkDiT, run: int, blocks: int = 8) -> dict:
    """Run ``run``'s own reference, audio, prompt and seed."""
    g = torch.Generator().manual_seed(100 + run)
    return dict(ref_latent=torch.randn(1, 16, 1, 2, 2, generator=g),
                audio_embeds=model.embed_audio(torch.randn(1, 4 * 3 * blocks - 3, 8, generator=g)),
                context=torch.randn(1, 4, 16, generator=g), num_blocks=blocks, noise=SeededNoise(run))


def eager_forwards_per_run(model, runs: int, sample, inputs, workspace: Workspace) -> tuple[list, list]:
    """Each run's latents on ``workspace``, and the forwards each ran eagerly."""
    latents, eager = [], []
    for run in range(runs):
        before = 0 if workspace.graphs is None else workspace.graphs.eager_forwards
        latents.append(list(sample(model, workspace=workspace, **inputs(model, run))))
        eager.append(workspace.graphs.eager_forwards - before)
    return latents, eager


def test_livetalk_runs_on_one_workspace_replay_from_block_0_with_their_own_prompts():
    model = livetalk_model()
    alone = [list(sample_livetalk(model, **livetalk_inputs(model, run))) for run in range(3)]
    model.runtime = GRAPHS
    workspace = recording_workspace()
    latents, eager = eager_forwards_per_run(model, 3, sample_livetalk, livetalk_inputs, workspace)
    for run in range(3):
        assert all(torch.equal(a, b) for a, b in zip(alone[run], latents[run])), f"run {run} differs from its own"
    graphs = workspace.graphs
    # run 0 meets each layout (block 0, the fill-up blocks, the ring's two) and captures the ring's;
    # run 1 captures the rest at their first call; run 2 replays every forward, block 0's too.
    assert eager[0] > 0 and eager[1:] == [0, 0] and workspace.settled
    block_0 = graphs.maker.graphs[2]  # the third capture: block 0's layout, at run 1's first forward
    assert block_0.replays == 2 * 5, "block 0's 4 steps and refresh replay in runs 1 and 2 (a capture replays too)"
    assert len(graphs.maker.graphs) == 2 + 4  # ring layouts in run 0; block 0 + 3 fill-up layouts in run 1


def realvideo_inputs(model, run: int) -> dict:
    """A run with idle and talking blocks (RealVideo's two prompts) and its own inputs."""
    g = torch.Generator().manual_seed(200 + run)
    talking = [(block + run) % 3 != 0 for block in range(7)]
    return dict(ref_latent=torch.randn(1, 16, 1, 4, 6, generator=g),
                idle_context=torch.randn(1, 10, TEXT_DIM, generator=g),
                talking_context=torch.randn(1, 7, TEXT_DIM, generator=g),
                audio_features=[torch.randn(1, 25, AUDIO_DIM, 16, generator=g)],
                plan=[BlockPlan(0, (2 * block) % 4, talks) for block, talks in enumerate(talking)],
                noise=SeededNoise(run), schedule=realvideo_schedule(2))


def test_realvideo_runs_on_one_workspace_replay_both_prompts_from_one_text_slot():
    model = tiny_model()
    alone = [list(sample_realvideo(model, **realvideo_inputs(model, run))) for run in range(3)]
    model.runtime = GRAPHS
    workspace = recording_workspace()
    latents, eager = eager_forwards_per_run(model, 3, sample_realvideo, realvideo_inputs, workspace)
    for run in range(3):
        assert all(torch.equal(a, b) for a, b in zip(alone[run], latents[run])), f"run {run} differs from its own"
    # one graph per cache layout whatever the prompt: block 0's and the ring's two
    assert eager[0] > 0 and eager[1:] == [0, 0] and workspace.graphs.num_graphs == 3


def test_a_reused_fp8_cache_starts_each_run_with_unturned_sinks():
    """RealVideo's sink keys turn once per block late in a run; an fp8 cache keeps the turn aside. A run
    on a used cache must not start from the last run's turn (blocks past frame 20 would differ)."""
    model = tiny_model()
    model.runtime = RuntimeOptions(fp8_kv_cache=True)
    workspace = Workspace()
    def run() -> list[torch.Tensor]:  # fresh inputs each time: the noise source is read once
        return list(sample_realvideo(model, workspace=workspace, **{**realvideo_inputs(model, 0),
                                                                    "plan": [BlockPlan(0, 0)] * 12}))
    first = run()
    cache = workspace.cache
    second = run()
    assert workspace.cache is cache and workspace.graphs is None  # kept, and eager: fp8 caches are not captured
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_the_workspace_starts_again_for_another_size_or_model_and_serves_one_run_at_a_time():
    model = livetalk_model()
    workspace = Workspace()
    run = sample_livetalk(model, workspace=workspace, **livetalk_inputs(model, 0, blocks=2))
    next(run)
    with pytest.raises(RuntimeError, match="one run at a time"):
        next(sample_livetalk(model, workspace=workspace, **livetalk_inputs(model, 1, blocks=2)))
    run.close()
    cache = workspace.cache
    list(sample_livetalk(model, workspace=workspace, **livetalk_inputs(model, 1, blocks=2)))
    assert workspace.cache is cache
    bigger = dict(livetalk_inputs(model, 1, blocks=2), ref_latent=torch.randn(1, 16, 1, 4, 2))
    list(sample_livetalk(model, workspace=workspace, **bigger))
    assert workspace.cache is not cache
    cache = workspace.cache
    other = livetalk_model()
    list(sample_livetalk(other, workspace=workspace, **bigger))
    assert workspace.cache is not cache
    workspace.free()
    assert workspace.cache is None and workspace.graphs is None


def test_the_text_slot_copies_prompts_into_its_buffers_and_refuses_another_shape():
    """Graphs read the slot's buffers: a prompt is copied in (the buffers stay the same tensors), and a prompt
    of another shape is refused rather than given new buffers under the graphs."""
    slot = Workspace().text
    first = [(torch.ones(1, 4, 2), torch.ones(1, 4, 2))]
    buffers = slot.show(first)
    assert buffers[0][0] is not first[0][0]  # a copy: the caller keeps its own
    second = [(torch.full((1, 4, 2), 2.0), torch.full((1, 4, 2), 3.0))]
    assert slot.show(second) is buffers and torch.equal(buffers[0][1], second[0][1])
    with pytest.raises(ValueError, match="another shape"):
        slot.show([(torch.ones(1, 5, 2), torch.ones(1, 5, 2))])


def test_the_pipeline_streams_in_a_kept_workspace_with_the_frames_of_a_run_of_its_own(tmp_path):
    """``LiveTalkPipeline.stream(workspace=...)`` (the Python API, and bench.py's first-frame measurement):
    the same frames as a run without one, and from the third run on block 0 replays (no eager forward)."""
    from livetalk_core.livetalk.model import load_livetalk_dit
    from livetalk_core.livetalk.pipeline import LiveTalkPipeline
    from livetalk_core.media.vae import load_vae
    from livetalk_core.media.wav2vec2 import load_audio_encoder
    from livetalk_core.smoke import build_tiny_weights, load_context

    files = build_tiny_weights(tmp_path)
    pipe = LiveTalkPipeline(load_livetalk_dit(files.dit, torch.float32, "cpu"),
                            load_vae(files.vae, torch.float32, "cpu"),
                            load_audio_encoder(files.wav2vec2, torch.float32, "cpu"))
    context = load_context(files.context)
    image = torch.randint(0, 255, (80, 96, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    clips = [torch.randn(int(16000 * seconds), generator=torch.Generator().manual_seed(2)) * 0.1
             for seconds in (1.7, 2.3, 1.2)]
    alone = [torch.cat(list(pipe.generate(image, clip, context, height=64, width=64))) for clip in clips]
    pipe.dit.runtime = GRAPHS
    workspace = recording_workspace()
    for run, clip in enumerate(clips):
        before = 0 if workspace.graphs is None else workspace.graphs.eager_forwards
        ref, audio = pipe.encode_inputs(image, clip, 64, 64)
        frames = torch.cat(list(pipe.stream(ref, audio, context, 0, workspace=workspace)))
        assert torch.equal(frames, alone[run]), f"run {run}: frames differ from a run of its own"
        assert workspace.runs == run + 1
    assert workspace.graphs.eager_forwards == before and workspace.settled, "the third run replays every forward"


def test_a_workspace_starts_again_when_any_weight_of_the_model_moved():
    """ComfyUI may offload some layers of a loaded model for room and load them back: the first and
    last weights stay where they were, a middle one does not, and graphs would read freed memory."""
    model = livetalk_model()
    model.runtime = GRAPHS
    workspace = recording_workspace()
    list(sample_livetalk(model, workspace=workspace, **livetalk_inputs(model, 0, blocks=2)))
    cache = workspace.cache
    list(sample_livetalk(model, workspace=workspace, **livetalk_inputs(model, 0, blocks=2)))
    assert workspace.cache is cache, "same weights, same place: the cache is kept"
    middle = list(model.parameters())[len(list(model.parameters())) // 2]
    middle.data = middle.data.clone()  # the same values somewhere else
    latents = list(sample_livetalk(model, workspace=workspace, **livetalk_inputs(model, 1, blocks=2)))
    assert workspace.cache is not cache
    alone = list(sample_livetalk(model, **livetalk_inputs(model, 1, blocks=2)))
    assert all(torch.equal(a, b) for a, b in zip(latents, alone, strict=True))


def test_encoder_graphs_follow_the_runs_graphs_and_the_encoders_weights():
    """An encoder's graphs (a live session's audio windows) exist only while the runs replay from graphs and
    the encoder sits on the cache's device; they start again when its weights move, go with ``free()``, and a
    call that ran eagerly between two runs keeps the next run from counting as settled."""
    model = livetalk_model()
    encoder = torch.nn.Linear(4, 4)
    workspace = recording_workspace()
    assert workspace.module_graphs(encoder) is None  # no run yet
    list(sample_livetalk(model, workspace=workspace, **livetalk_inputs(model, 0, blocks=2)))
    assert workspace.module_graphs(encoder) is None  # the runs are eager (the model's options)
    model.runtime = GRAPHS
    try:
        def run(i: int) -> None:
            list(sample_livetalk(model, workspace=workspace, **livetalk_inputs(model, i, blocks=2)))
        for i in range(3):
            run(i)
        assert workspace.settled
        graphs = workspace.module_graphs(encoder)
        assert graphs is not None and workspace.module_graphs(encoder) is graphs
        assert workspace.module_graphs(torch.nn.Linear(4, 4, device="meta")) is None  # not on the cache's device
        x = torch.randn(2, 4)
        outputs = [graphs("x", encoder, x + i) for i in range(3)]  # eager, captured, replayed
        assert graphs.num_graphs == 1 and all(torch.equal(o, encoder(x + i)) for i, o in enumerate(outputs))
        run(3)
        assert not workspace.settled, "an encoder call ran eagerly before this run, yet it counted as settled"
        graphs("x", encoder, x)
        run(4)
        assert workspace.settled
        with torch.no_grad():
            encoder.weight = torch.nn.Parameter(encoder.weight.clone())  # moved: graphs would read the old ones
        assert workspace.module_graphs(encoder) is not graphs
        workspace.free()
        assert workspace.module_graphs(encoder) is None
    finally:
        model.runtime = RuntimeOptions()
