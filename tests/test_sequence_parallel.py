"""Sequence parallelism on CPU: 2 and 4 gloo processes give the single-process RealVideo blocks (fp32)."""

from __future__ import annotations

import functools
import logging
import os

import pytest
import torch
from safetensors.torch import save_file
from test_realvideo import AUDIO_DIM, TEXT_DIM
from test_realvideo import tiny_model as realvideo_tiny_model

from livetalk_core.errors import InputError, LiveTalkError
from livetalk_core.parallel.sequence_parallel import (
    LatentShard,
    SequenceParallel,
    ShardedNoise,
    attach,
    check_cache_policy,
    pick_split_axis,
)
from livetalk_core.parallel.workers import WorkerGroup, WorkerJob
from livetalk_core.realvideo.model import S2VDiT, load_s2v_dit
from livetalk_core.realvideo.parallel import sample_realvideo_parallel
from livetalk_core.realvideo.sampler import FRAMES_PER_BLOCK, REALVIDEO_CACHE, realvideo_schedule, sample_realvideo
from livetalk_core.runtime.noise import SeededNoise
from livetalk_core.wan.kv_cache import CachePolicy

INJECT = (0, 2)
# Every world size the CPU tests run (gloo): 4 splits the tiny latents into one patch column or row per rank.
WORLD_SIZES = (2, 4)
# fp32: the sharded run differs from one process only in summation order (attention over the rank-major
# gathered keys, per-rank head matmuls), a few ulps per step that 12 blocks of recurrence grow.
RTOL, ATOL = 1e-5, 2e-5


def tiny_model(heads: int = 2) -> S2VDiT:
    """3 layers, audio injected at 0 and 2, ``heads`` heads (as many as ranks split them)."""
    return realvideo_tiny_model(num_layers=3, inject=INJECT, heads=heads)


def test_split_axis_follows_upstream_and_falls_back():
    assert pick_split_axis((36, 44), 2) == "h"  # landscape
    assert pick_split_axis((72, 56), 2) == "w"  # portrait
    assert pick_split_axis((64, 64), 2) == "w"  # square
    assert pick_split_axis((36, 56), 4) == "w"  # 36 rows do not give whole patches to 4 ranks
    with pytest.raises(InputError, match="cannot be split over 8 GPUs"):
        pick_split_axis((36, 56), 8)


def test_shards_tile_the_latent_and_the_noise_does_not_depend_on_ranks():
    full = SeededNoise(5).initial(0, (1, 2, 16, 4, 8))
    for axis, world in (("h", 2), ("w", 2), ("w", 4)):
        shards = [LatentShard(axis, r, world, (4, 8)) for r in range(world)]
        noise = [ShardedNoise(SeededNoise(5), s).initial(0, (1, 2, 16, 4, 8)) for s in shards]
        assert torch.equal(torch.cat(noise, dim=shards[0].dim), full)
    assert [LatentShard("w", r, 4, (4, 8)).grid_offset((2, 2)) for r in range(4)] == [(0, 0), (0, 1), (0, 2), (0, 3)]
    assert LatentShard("h", 1, 2, (4, 8)).grid_offset((2, 2)) == (1, 0)


def test_cache_layout_keeps_blocks_contiguous():
    check_cache_policy(REALVIDEO_CACHE, FRAMES_PER_BLOCK, first_frame=REALVIDEO_CACHE.sink_frames)
    with pytest.raises(ValueError, match="splits a block"):
        check_cache_policy(CachePolicy(window_frames=4, sink_frames=1), 2, first_frame=1)


def test_heads_must_divide_over_ranks():
    with pytest.raises(InputError, match="2 attention heads"):
        attach(tiny_model(), SequenceParallel(rank=0, world_size=4))


def _exchange_on_rank(rank: int, world: int, port: int) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        sp = SequenceParallel(rank=rank, world_size=world)
        full = [torch.randn(1, 3 * world, 4, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
        mine = [t.chunk(world, dim=1)[rank] for t in full]  # this rank's tokens, all heads
        q, k, v = sp.heads_from_sequence(*mine)
        heads = slice(rank * 4 // world, (rank + 1) * 4 // world)
        for got, want in zip((q, k, v), full):
            assert torch.equal(got, want[:, :, heads]), rank  # every token, this rank's heads, in order
        assert torch.equal(sp.sequence_from_heads(k * 2), mine[1] * 2), rank
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_the_exchanges_move_tokens_and_heads_to_the_right_ranks(world: int):
    """q, k and v cross in one all-to-all: each rank gets all tokens of its own heads, and the
    inverse exchange gives back its own tokens (4 heads over ``world`` gloo processes)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_exchange_on_rank, args=(world, port), nprocs=world)


def sampler_inputs(latent_hw: tuple[int, int]) -> dict:
    torch.manual_seed(1)
    return dict(
        ref_latent=torch.randn(1, 16, 1, *latent_hw),
        idle_context=torch.randn(1, 10, TEXT_DIM),
        talking_context=torch.randn(1, 7, TEXT_DIM),
        audio_features=[torch.randn(1, 25, AUDIO_DIM, 16), torch.randn(1, 25, AUDIO_DIM, 8)],
        # past block 10: the sink drift runs on the head-sharded cache too
        num_blocks=12,
        schedule=realvideo_schedule(2),
    )


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_gloo_ranks_equal_one_process(tmp_path, caplog, world: int):
    """``world`` worker processes (gloo) sample the single-process blocks, then survive a rejected
    input and an early close, and stop with one message when a worker dies."""
    path = tmp_path / "tiny_s2v.safetensors"
    model = tiny_model(heads=world)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    load = functools.partial(load_s2v_dit, path, torch.float32, audio_inject_layers=INJECT)
    with WorkerGroup(WorkerJob(load, sample_realvideo_parallel), ["cpu"] * world, label="RealVideo") as group:
        for latent_hw in ((4, 8), (8, 4)):  # split along H, then along W (4 ranks: along W, then along H)
            inputs = sampler_inputs(latent_hw)
            single = list(sample_realvideo(model, noise=SeededNoise(3), **inputs))
            parallel = list(group.generate(seed=3, **inputs))
            assert len(parallel) == len(single) == 12
            for b, (ours, ref) in enumerate(zip(parallel, single)):
                torch.testing.assert_close(ours, ref, rtol=RTOL, atol=ATOL, msg=lambda m: f"{latent_hw} block {b}: {m}")
        with pytest.raises(InputError, match="reference latent"):
            list(group.generate(seed=3, **{**sampler_inputs((4, 8)), "ref_latent": torch.zeros(1, 16, 2, 4, 8)}))
        # the group survives a rejected input and stays deterministic
        again = list(group.generate(seed=3, **{**sampler_inputs((8, 4)), "num_blocks": 2}))
        assert len(again) == 2 and all(torch.equal(a, b) for a, b in zip(again, parallel))
        # closing the stream early stops the workers after their current block, not at the end
        with caplog.at_level(logging.INFO, logger="livetalk_core.parallel.workers"):
            blocks = group.generate(seed=3, **{**sampler_inputs((8, 4)), "num_blocks": 500})
            next(blocks)
            blocks.close()
        stops = [int(r.getMessage().split()[-1]) for r in caplog.records if "stopped after block" in r.getMessage()]
        assert len(stops) == 1 and stops[0] < 100, caplog.text
        again = list(group.generate(seed=3, **{**sampler_inputs((8, 4)), "num_blocks": 2}))
        assert all(torch.equal(a, b) for a, b in zip(again, parallel))
        # a worker that dies stops the group, with one message naming it
        group._workers[world - 1].process.kill()
        with pytest.raises(LiveTalkError,
                           match=rf"^RealVideo worker {world - 1} \(cpu\) failed: it exited unexpectedly"):
            list(group.generate(seed=3, **sampler_inputs((8, 4))))
        assert not group.alive
    assert not group.alive


def load_running_out_of_memory_on_rank_1(path, device: torch.device) -> S2VDiT:
    """A worker's model whose rank 1 runs out of GPU memory in its first forward."""
    model = load_s2v_dit(path, torch.float32, device, audio_inject_layers=INJECT)
    if os.environ["RANK"] == "1":
        def out_of_memory(*args, **kwargs):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

        model.blocks[0].forward = out_of_memory
    return model


def test_out_of_memory_on_one_worker_is_the_one_message(tmp_path):
    """Rank 0 then fails too (its exchange with rank 1 breaks): the message is rank 1's reason."""
    path = tmp_path / "tiny_s2v.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_model().state_dict().items()}, path)
    job = WorkerJob(functools.partial(load_running_out_of_memory_on_rank_1, path), sample_realvideo_parallel)
    group = WorkerGroup(job, ["cpu", "cpu"], label="RealVideo")
    with pytest.raises(LiveTalkError, match=r"^RealVideo worker 1 \(cpu\) ran out of GPU memory \(.*OutOfMemoryError: "
                       r"CUDA out of memory. Tried to allocate 2.00 GiB\)\. The worker group was stopped"):
        list(group.generate(seed=3, **sampler_inputs((4, 8))))
    assert not group.alive


def test_a_worker_that_cannot_load_its_model_says_why(tmp_path):
    load = functools.partial(load_s2v_dit, tmp_path / "missing.safetensors", torch.float32)
    with pytest.raises(LiveTalkError, match="missing.safetensors"):
        WorkerGroup(WorkerJob(load, sample_realvideo_parallel), ["cpu"])


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_cli_under_torchrun_equals_one_process(tmp_path, world: int):
    """``torchrun --nproc_per_node=world -m livetalk_core --smoke --model realvideo`` (gloo) writes the
    same latents as the single-process CLI, and rank 0 alone writes the mp4."""
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    from livetalk_core.cli import main

    assert main(["--smoke", "--model", "realvideo", "--duration", "1", "--output", str(tmp_path / "one.mp4"),
                 "--latents-out", str(tmp_path / "one.safetensors")]) == 0
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", "-m",
         "livetalk_core", "--smoke", "--model", "realvideo", "--duration", "1", "--output", str(tmp_path / "ranks.mp4"),
         "--latents-out", str(tmp_path / "ranks.safetensors")],
        cwd=repo, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    one, ranks = (load_file(str(tmp_path / f"{n}.safetensors"))["latents"] for n in ("one", "ranks"))
    assert one.shape[2] == 6  # 3 blocks of 2 latent frames: 1 s is 17 frames, 2 blocks decode to 5 + 8
    torch.testing.assert_close(ranks, one, rtol=RTOL, atol=ATOL)
    assert (tmp_path / "ranks.mp4").stat().st_size > 0
