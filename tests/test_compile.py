"""Regional compilation: one graph for all layers, same numbers, and a soft fall-back."""

import torch

from livetalk_core.livetalk.model import LiveTalkConfig, LiveTalkDiT
from livetalk_core.livetalk.sampler import sample_livetalk
from livetalk_core.options import RuntimeOptions
from livetalk_core.runtime.compile import compile_blocks
from livetalk_core.runtime.noise import SeededNoise
from livetalk_core.wan.dit import WanCoreConfig


def tiny_model() -> LiveTalkDiT:
    torch.manual_seed(0)
    core = WanCoreConfig(dim=128, in_dim=33, out_dim=16, ffn_dim=64, num_layers=4, text_dim=16)
    model = LiveTalkDiT(LiveTalkConfig(core=core, audio_features=8)).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    return model


def run(model, blocks=6):
    audio = model.embed_audio(torch.randn(1, 4 * 3 * blocks - 3, 8, generator=torch.Generator().manual_seed(1)))
    return torch.cat(list(sample_livetalk(model, ref_latent=torch.ones(1, 16, 1, 4, 4), audio_embeds=audio,
                                          context=torch.ones(1, 4, 16), num_blocks=blocks, noise=SeededNoise(0))), 2)


def test_all_layers_share_one_compiled_graph_and_match_eager():
    import torch._dynamo.utils as dynamo_utils

    model = tiny_model()
    eager = run(model)
    torch._dynamo.reset()
    dynamo_utils.counters.clear()
    compile_blocks(model)
    compiled = run(model)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    # two functions per block, 4 layers, 6 blocks with a growing then rolling cache: still 2 graphs
    assert dynamo_utils.counters["stats"]["unique_graphs"] == 2


def test_s2v_audio_injections_share_one_compiled_graph_and_match_eager():
    from test_realvideo import run_tiny
    from test_realvideo import tiny_model as tiny_s2v
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    from livetalk_core.realvideo.model import inject_audio
    from livetalk_core.realvideo.sampler import realvideo_schedule

    model = tiny_s2v(num_layers=3, inject=(0, 1, 2))
    eager = torch.cat(run_tiny(model, schedule=realvideo_schedule(2)), 2)
    torch._dynamo.reset()
    compile_blocks(model)
    compiled = torch.cat(run_tiny(model, schedule=realvideo_schedule(2)), 2)
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)
    # three injections, each with its own modules, over two audio segments of different lengths: one graph
    assert len(_debug_get_cache_entry_list(inject_audio.__code__)) == 1


def test_compiler_failure_falls_back_to_eager(monkeypatch, caplog):
    model = tiny_model()
    eager = run(model, blocks=2)

    def broken(*args, **kwargs):
        def fn(*a, **k):
            raise RuntimeError(
                "Cannot find a working triton installation. Either the package is not installed or it is too old."
            )
        return fn

    monkeypatch.setattr(torch, "compile", broken)
    compile_blocks(model)
    with caplog.at_level("WARNING"):
        assert torch.equal(run(model, blocks=2), eager)
    assert "runs eager" in caplog.text


def test_vae_conv_steps_compiled_match_eager():
    from livetalk_core.media.vae import (
        FRAMES_LAST,
        CausalConv3d,
        Upsample,
        VAEConfig,
        WanVAE,
        causal_conv_step,
        nearest_2x,
    )
    from livetalk_core.runtime.compile import compile_vae

    torch.manual_seed(0)
    vae = WanVAE(VAEConfig(dim=8)).eval().requires_grad_(False)
    for p in vae.parameters():
        p.data.normal_(0, 0.2)
    latents = torch.randn(1, 16, 4, 4, 4)

    def decode_in_two_calls(decoder=None):
        decoder = decoder or vae.stream_decoder()
        return torch.cat([decoder.decode(latents[:, :, :1]), decoder.decode(latents[:, :, 1:])], 2)

    eager = decode_in_two_calls()
    torch._dynamo.reset()
    compile_vae(vae)
    convs = [m for m in vae.modules() if isinstance(m, CausalConv3d)]
    # encoder: conv1, 4x2 + 2x2 residual blocks' two convs, head, one temporal downsample's conv is a
    # plain Conv3d; decoder: conv1, (4x3 + 2) x 2, head, two temporal upsamplers' time convs
    assert len(convs) == (1 + 2 * 10 + 1) + (1 + 2 * 14 + 1 + 2)
    assert all(m.step is not causal_conv_step for m in convs)
    upsamplers = [m for m in vae.modules() if isinstance(m, Upsample)]
    assert len(upsamplers) == 3 and all(m.enlarge is not nearest_2x for m in upsamplers)
    decoder = vae.stream_decoder()
    torch.testing.assert_close(decode_in_two_calls(decoder), eager, atol=1e-4, rtol=1e-4)
    # the kept frames stay frame-major channels-last, the layout cuDNN's kernels take without a copy
    histories = decoder._cache.history.values()
    assert len(histories) == 32 and all(h.is_contiguous(memory_format=FRAMES_LAST) for h in histories)


def test_fp8_cache_codec_compiled_matches_eager():
    model = tiny_model()
    RuntimeOptions(fp8_kv_cache=True).apply(model)  # on the CPU: not compiled yet
    eager = run(model)
    torch._dynamo.reset()
    compile_blocks(model)
    assert model.kv_codec.quantize is not None and model.kv_codec != type(model.kv_codec)()
    compiled = run(model)
    # the same fp8 values and scales (the fused kernel rounds as eager does), up to float32 reassociation
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)


def test_tokens_reach_every_layer_contiguous():
    """The patch embedding's output is re-laid out once: a transposed view would pass its layout on
    through every residual add, and each layer's norms would read across the grain (docs/performance.md,
    session 9)."""
    from test_realvideo import run_tiny
    from test_realvideo import tiny_model as tiny_s2v

    from livetalk_core.realvideo.sampler import realvideo_schedule

    layouts = []

    def record(block, args):
        layouts.append(args[0].is_contiguous())

    for model, sample in ((tiny_model(), lambda m: run(m, blocks=2)),
                          (tiny_s2v(), lambda m: run_tiny(m, schedule=realvideo_schedule(2)))):
        hooks = [block.register_forward_pre_hook(record) for block in model.blocks]
        sample(model)
        for hook in hooks:
            hook.remove()
    assert len(layouts) > 20 and all(layouts)
