"""The runtime options (livetalk_core/options.py): one validation, one CUDA-graphs rule, one apply()."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from test_compile import run as run_livetalk
from test_compile import tiny_model as tiny_livetalk
from test_realvideo import tiny_model as tiny_realvideo

from livetalk_core import cli
from livetalk_core.errors import InputError
from livetalk_core.options import EAGER, MIN_PARALLEL_RANKS, RuntimeOptions, cli_flag, graphs_off_reason
from livetalk_core.parallel.sequence_parallel import SequenceParallel, attach
from livetalk_core.runtime.compile import compile_blocks
from livetalk_core.runtime.cuda_graphs import eager_reason
from livetalk_core.wan.attention import available_backends
from livetalk_core.wan.fp8_linear import FP8MatmulLinear, use_fp8_matmuls
from livetalk_core.wan.kv_cache import EAGER_FP8, CachePolicy

GPU = torch.device("cuda")  # a device name only: nothing here runs on it

# -- validation ------------------------------------------------------------------------------------


def test_fp8_matmul_needs_bf16_in_the_callers_words():
    with pytest.raises(InputError) as node:
        RuntimeOptions(precision="fp32", fp8_matmul=True).validate()
    assert str(node.value) == ("fp8_matmul runs with bf16 activations, but precision is fp32: set precision to bf16, "
                               "or turn fp8_matmul off.")  # the loader's message, unchanged
    with pytest.raises(InputError) as flags:
        RuntimeOptions(precision="fp16", fp8_matmul=True).validate(cli_flag)
    assert str(flags.value) == ("--fp8-matmul runs with bf16 activations, but --precision is fp16: set --precision "
                                "to bf16, or turn --fp8-matmul off.")
    valid = RuntimeOptions(precision="bf16", fp8_matmul=True)
    assert valid.validate() is valid and valid.dtype == torch.bfloat16


def test_unknown_attention_and_precision_are_refused():
    with pytest.raises(InputError, match=r"Unknown attention backend 'xformers': use one of sdpa, math, flash, sage\."):
        RuntimeOptions(attention="xformers").validate()
    with pytest.raises(InputError, match=r"--precision 'fp64' is not one of bf16, fp16, fp32\."):
        RuntimeOptions(precision="fp64").validate(cli_flag)


def test_the_cli_checks_its_flags_before_loading():
    parser = cli.build_parser()
    with pytest.raises(InputError, match="--fp8-matmul runs with bf16 activations, but --precision is fp32"):
        cli.runtime_options(parser.parse_args(["--precision", "fp32", "--fp8-matmul"]))
    with pytest.raises(InputError, match="--fp8-matmul runs with bf16 activations, but --precision is fp16"):
        cli.runtime_options(parser.parse_args(["--model", "realvideo", "--precision", "fp16", "--fp8-matmul"]))
    # smoke mode: the tiny model runs in fp32, or bf16 with --fp8-matmul, whatever --precision says, on the CPU;
    # its weights stay as they are (--fp8 is not used)
    smoke = cli.runtime_options(parser.parse_args(["--smoke", "--precision", "fp32", "--fp8-matmul"]))
    assert (smoke.precision, smoke.device) == ("bf16", torch.device("cpu"))
    options = cli.runtime_options(parser.parse_args(["--smoke", "--model", "realvideo", "--fp8", "--no-cuda-graphs"]))
    assert (options.precision, options.fp8_weights, options.fp8_matmul, options.cuda_graphs) == (
        "fp32", False, False, False)
    full = cli.runtime_options(parser.parse_args(["--model", "realvideo", "--fp8", "--fp8-matmul", "--fp8-kv-cache",
                                                  "--attention", "math", "--device", "cpu"]))
    assert (full.fp8_weights, full.fp8_matmul, full.fp8_kv_cache, full.attention) == (True, True, True, "math")


# -- whether CUDA graphs run -------------------------------------------------------------------------


@pytest.mark.parametrize("options, ranks, reason", [
    (RuntimeOptions(device=GPU), 1, None),  # compile auto: on for a GPU, graphs on by default
    (RuntimeOptions(device=GPU), MIN_PARALLEL_RANKS, None),
    (RuntimeOptions(device=GPU), 8, None),
    (RuntimeOptions(device=GPU), 2, "sequence parallel over 2 GPUs: graphs pay from 4"),
    (RuntimeOptions(device=GPU, fp8_kv_cache=True), 1, "an fp8 KV cache composes its sink rotations on the host"),
    (RuntimeOptions(device=GPU, compile=False), 1, "not asked for (cuda_graphs off, or the DiT not compiled)"),
    (RuntimeOptions(device=GPU, cuda_graphs=False), 4, "not asked for (cuda_graphs off, or the DiT not compiled)"),
    (RuntimeOptions(), 1, "not asked for (cuda_graphs off, or the DiT not compiled)"),  # CPU: auto compile is off
    (RuntimeOptions(compile=True), 1, "not on a GPU"),
])
def test_one_rule_decides_the_cuda_graphs(options, ranks, reason):
    assert options.cuda_graphs_reason(ranks) == reason


@pytest.mark.parametrize("options", [RuntimeOptions(compile=True), RuntimeOptions(compile=True, fp8_kv_cache=True),
                                     RuntimeOptions(compile=True, cuda_graphs=False), RuntimeOptions()])
@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_the_samplers_ask_the_same_rule_as_the_reports(options, ranks):
    """What a session decides (eager_reason, from the model and its cache) is what the options say."""
    model = tiny_realvideo(heads=4)
    model.runtime = options  # the options of a compiled DiT without compiling it (cheap; apply() is tested below)
    if ranks > 1:
        attach(model, SequenceParallel(rank=0, world_size=ranks))
    cache = model.new_kv_cache(CachePolicy(5, 1), frame_tokens=4, num_heads=1)
    assert eager_reason(model, cache) == options.cuda_graphs_reason(ranks)
    assert eager_reason(model, cache) == graphs_off_reason(
        asked=options.graphs_asked, fp8_kv_cache=options.fp8_kv_cache, on_gpu=False, parallel_ranks=ranks
    )


# -- apply() -------------------------------------------------------------------------------------------


def test_a_model_runs_eager_until_options_are_applied():
    model = tiny_livetalk()
    assert model.runtime == EAGER
    assert (model.attention_backend, model.fp8_kv_cache, model.cuda_graphs) == ("sdpa", False, False)
    with pytest.raises(AttributeError):
        model.fp8_kv_cache = True  # set only through RuntimeOptions.apply


def test_apply_sets_up_the_dit_as_the_call_sites_did():
    """The old loader / CLI code: attention backend resolved, fp8 cache flag, use_fp8_matmuls on the
    block Linear layers, compile_blocks with cuda_graphs. apply() gives the same model."""
    old = tiny_livetalk().to(torch.bfloat16)
    ours = copy.deepcopy(old)
    converted = use_fp8_matmuls(old.heavy_linears().values())
    compile_blocks(old)
    options = RuntimeOptions(precision="bf16", attention="math", compile=True, fp8_matmul=True, fp8_kv_cache=True)
    options.apply(ours)
    assert converted > 0
    assert (ours.attention_backend, ours.fp8_kv_cache, ours.cuda_graphs) == ("math", True, True)
    assert ours.runtime == options
    for (name, a), (_, b) in zip(old.heavy_linears().items(), ours.heavy_linears().items(), strict=True):
        assert type(a) is type(b) and torch.equal(a.weight.float(), b.weight.float()), name
        if isinstance(a, FP8MatmulLinear):
            assert torch.equal(a.weight_scale, b.weight_scale)
    assert sum(isinstance(m, FP8MatmulLinear) for m in ours.heavy_linears().values()) == converted
    assert all(block.gelu_in_gemm for block in ours.blocks) and ours.kv_codec is not EAGER_FP8
    # again (e.g. switching CUDA graphs): the fp8 layers are not converted twice and nothing recompiles
    regions = [getattr(owner, name) for owner, name in ours.compile_regions()]
    weights = [m.weight for m in ours.heavy_linears().values()]
    RuntimeOptions(precision="bf16", attention="math", compile=True, cuda_graphs=False, fp8_matmul=True).apply(ours)
    assert not ours.cuda_graphs and not ours.fp8_kv_cache
    assert [getattr(owner, name) for owner, name in ours.compile_regions()] == regions
    assert all(a is b for a, b in zip(weights, (m.weight for m in ours.heavy_linears().values())))
    with pytest.raises(ValueError, match="compiled already"):
        RuntimeOptions(compile=False).apply(ours)


def test_apply_gives_the_latents_of_the_plain_model():
    """Eager options on the CPU (compile auto: off) change nothing but what they name."""
    plain, applied = tiny_livetalk(), tiny_livetalk()
    RuntimeOptions(attention="sdpa").apply(applied)
    assert not applied.cuda_graphs and applied.kv_codec is EAGER_FP8
    assert torch.equal(run_livetalk(plain, blocks=2), run_livetalk(applied, blocks=2))


def test_apply_compiles_the_vae_where_the_vae_runs(monkeypatch):
    import livetalk_core.runtime.compile as compile_module

    compiled = []
    monkeypatch.setattr(compile_module, "compile_vae", compiled.append)
    vae = torch.nn.Module()
    RuntimeOptions(device=GPU, vae_device="cpu").apply(None, vae)  # auto: the VAE is on the CPU
    RuntimeOptions(device="cpu").apply(None, vae)
    assert compiled == []
    RuntimeOptions(device="cpu", vae_device=GPU).apply(None, vae)
    RuntimeOptions(compile=True).apply(None, vae)  # on: on any device, as the CLIs' --compile
    assert compiled == [vae, vae]


def test_an_optional_attention_kernel_that_is_missing_falls_back_to_sdpa():
    model = tiny_livetalk()
    RuntimeOptions(attention="flash").apply(model)
    assert model.attention_backend == ("flash" if "flash" in available_backends() else "sdpa")


def test_options_travel_to_the_workers():
    """Picklable and equal after the trip (the multi-GPU workers receive them), and placed on a
    worker's GPU with on(); equal options compare equal whether a device was given as text or not."""
    options = RuntimeOptions(precision="bf16", attention="math", fp8_kv_cache=True, device="cuda:0",
                             vae_device="cuda:1")
    assert pickle.loads(pickle.dumps(options)) == options
    assert options == RuntimeOptions(precision="bf16", attention="math", fp8_kv_cache=True,
                                     device=torch.device("cuda", 0), vae_device=torch.device("cuda", 1))
    placed = options.on("cuda:2")
    assert placed.device == torch.device("cuda", 2) and placed.vae_device is None and placed.fp8_kv_cache
    assert hash(placed) != hash(options)


def test_the_workers_loader_applies_the_options(tmp_path):
    from safetensors.torch import save_file

    from livetalk_core.realvideo.parallel import load_realvideo_dit

    save_file({k: v.contiguous() for k, v in tiny_realvideo().state_dict().items()}, str(tmp_path / "dit.safetensors"))
    options = RuntimeOptions(precision="fp32", attention="math", fp8_kv_cache=True, device="cuda:0")
    model = load_realvideo_dit(tmp_path / "dit.safetensors", options, device=torch.device("cpu"),
                               audio_inject_layers=(0, 1))
    assert model.runtime == options.on("cpu") and model.dtype == torch.float32
    assert (model.attention_backend, model.fp8_kv_cache, model.cuda_graphs) == ("math", True, False)

