"""umT5 text encoder: golden parity through the real loader, HF/ComfyUI layouts, errors, tokenizer."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch
from golden import (
    GoldenCase,
    assert_close,
    case_ids,
    golden_cases,
    names_from,
    repo_case,
    require_shared_cases,
    tolerance,
)
from safetensors.torch import save_file

from livetalk_core.errors import CheckpointError, InputError, MissingWeightsError
from livetalk_core.media.checkpoint import read_state_dict
from livetalk_core.media.text_encoder import (
    FIT_MARGIN_BYTES,
    HF_BLOCK_KEYS,
    HF_TOP_KEYS,
    UMT5Config,
    clean_prompt,
    encode_prompt,
    encode_text,
    free_device_bytes,
    load_text_encoder,
    release_text_encoder,
    streams_layers,
    tokenize,
)

T5_CASES = golden_cases("livetalk-umt5")
# Pipeline cases whose text_context input was produced by one of the T5 cases' encoders.
CONSUMER_CASES = [
    c for c in golden_cases("livetalk") if "t5_used_for_text_context" in c.manifest.get("weights", {})
]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CONSUMER_TAGS = {"float32": "fp32", "bfloat16": "bf16"}


def t5_weights(case: GoldenCase) -> Path:
    return case.file(case.manifest["weights"]["t5"])


def t5_inputs(case: GoldenCase) -> tuple[torch.Tensor, torch.Tensor]:
    inputs = case.load("inputs.safetensors")
    return inputs["input_ids"], inputs["attention_mask"]


@pytest.fixture(scope="module")
def case() -> GoldenCase:
    """The in-repo T5 case, for the tests that need some umT5 checkpoint rather than a parity check."""
    return repo_case(T5_CASES, "compact_t5")


@pytest.fixture(scope="module")
def native_state(case) -> dict[str, torch.Tensor]:
    return read_state_dict(t5_weights(case))


def to_hf_names(native: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in native.items():
        if key in HF_TOP_KEYS:
            out[HF_TOP_KEYS[key]] = value
        else:
            _, index, suffix = key.split(".", 2)
            out[f"encoder.block.{index}.{HF_BLOCK_KEYS[suffix]}"] = value
    return out


def save_safetensors(state: dict[str, torch.Tensor], path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


# --------------------------------------------------------------------------------------------------
# Golden parity


def test_golden_cases_exist():
    repo_case(T5_CASES, "compact_t5")
    consumers = names_from(CONSUMER_CASES, "repo")
    assert "compact_fp32" in consumers, f"in-repo pipeline cases recording their T5: {sorted(consumers)}"


def test_shared_golden_cases_exist():
    require_shared_cases(T5_CASES, "livetalk", {"t5_tiny"})
    require_shared_cases(CONSUMER_CASES, "livetalk", {"tiny_fp32", "tiny_bf16"})


@pytest.mark.parametrize("tag", list(DTYPES))
@pytest.mark.parametrize("golden", T5_CASES, ids=case_ids(T5_CASES))
def test_golden_context(golden: GoldenCase, tag: str):
    ids, mask = t5_inputs(golden)
    expected = golden.load("expected.safetensors")
    encoder = load_text_encoder(t5_weights(golden), dtype=DTYPES[tag])

    context = encode_text(encoder, ids, mask)
    assert context.dtype == DTYPES[tag]
    tol = tolerance(golden, f"context_{tag}")
    assert_close(context, expected[f"context_{tag}"], **tol, name=f"context_{tag}")
    with torch.no_grad():
        unzeroed = encoder(ids, mask)
    assert_close(unzeroed, expected[f"encoder_out_{tag}_unzeroed"], **tol, name=f"encoder_out_{tag}_unzeroed")

    true_length = int(mask.sum())
    assert true_length == golden.manifest.get("true_length", true_length)
    assert torch.count_nonzero(context[:, true_length:]) == 0
    assert torch.count_nonzero(context[:, :true_length].abs().sum(-1)) == true_length


@pytest.mark.parametrize("golden", T5_CASES, ids=case_ids(T5_CASES))
def test_config_inferred_from_shapes(golden: GoldenCase):
    config = UMT5Config.from_state_dict(read_state_dict(t5_weights(golden)))
    want = golden.manifest["t5_config"]
    assert config.vocab_size == want["vocab_size"]
    assert (config.dim, config.dim_attn, config.dim_ffn) == (want["dim"], want["dim_attn"], want["dim_ffn"])
    assert (config.num_heads, config.num_layers) == (want["num_heads"], want["encoder_layers"])
    assert (config.num_buckets, config.shared_pos) == (want["num_buckets"], want["shared_pos"])
    assert (config.eps, config.max_distance) == (want.get("eps", config.eps), want.get("max_dist", config.max_distance))


@pytest.mark.parametrize("consumer", CONSUMER_CASES, ids=case_ids(CONSUMER_CASES))
def test_pipeline_text_context_matches(consumer: GoldenCase):
    weights = consumer.file(consumer.manifest["weights"]["t5_used_for_text_context"])
    producers = [c for c in T5_CASES if t5_weights(c) == weights]
    assert producers, f"{consumer.name}: its text encoder {weights} belongs to no golden T5 case"
    producer = producers[0]
    tag = CONSUMER_TAGS[consumer.manifest["dtype"]]

    context = encode_text(load_text_encoder(weights, dtype=DTYPES[tag]), *t5_inputs(producer))
    expected = consumer.load("inputs.safetensors")["text_context"]
    assert expected.dtype == context.dtype
    assert_close(context, expected, **tolerance(producer, f"context_{tag}"), name=f"{consumer.name} text_context")


# --------------------------------------------------------------------------------------------------
# Hugging Face / ComfyUI layouts


def test_hf_named_safetensors_round_trip(case, native_state, tmp_path):
    hf = to_hf_names(native_state)
    # What ComfyUI's umt5 files carry besides the encoder: the tied embedding copy and the tokenizer.
    hf["encoder.embed_tokens.weight"] = hf["shared.weight"].clone()
    hf["spiece_model"] = torch.arange(16, dtype=torch.uint8)
    path = save_safetensors(hf, tmp_path / "umt5_xxl_fp16.safetensors")

    ids, mask = t5_inputs(case)
    reference = encode_text(load_text_encoder(t5_weights(case), dtype=torch.float32), ids, mask)
    converted = load_text_encoder(path, dtype=torch.float32)
    assert converted.config == UMT5Config.from_state_dict(native_state)
    assert torch.equal(encode_text(converted, ids, mask), reference)


def test_hf_names_mean_the_same_in_transformers(case, native_state):
    """The key map is checked against an independent implementation: transformers' UMT5EncoderModel
    run on the HF-named weights must reproduce the golden encoder output."""
    from transformers import UMT5Config as HFUMT5Config
    from transformers import UMT5EncoderModel

    config = UMT5Config.from_state_dict(native_state)
    hf_config = HFUMT5Config(
        vocab_size=config.vocab_size, d_model=config.dim, d_kv=config.head_dim, d_ff=config.dim_ffn,
        num_layers=config.num_layers, num_heads=config.num_heads, relative_attention_num_buckets=config.num_buckets,
        relative_attention_max_distance=config.max_distance, feed_forward_proj="gated-gelu",
        layer_norm_epsilon=config.eps, dropout_rate=0.0,
    )
    model = UMT5EncoderModel(hf_config).eval()
    hf = {k: v.float() for k, v in to_hf_names(native_state).items()}
    hf["encoder.embed_tokens.weight"] = hf["shared.weight"]
    model.load_state_dict(hf, strict=True)

    ids, mask = t5_inputs(case)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    expected = case.load("expected.safetensors")["encoder_out_fp32_unzeroed"]
    assert_close(out, expected, **tolerance(case, "context_fp32"), name="transformers UMT5 on HF names")


def fp8_scaled(hf: dict[str, torch.Tensor], style: str) -> dict[str, torch.Tensor]:
    """Quantise every Linear weight to e4m3fn with a per-tensor scale, as ComfyUI's scaled files do."""
    out = dict(hf)
    if style == "legacy":
        out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    for key, weight in hf.items():
        if (".SelfAttention." in key and "relative_attention_bias" not in key) or ".DenseReluDense." in key:
            layer = key[: -len(".weight")]
            scale = weight.float().abs().max() / 448.0
            out[key] = (weight.float() / scale).to(torch.float8_e4m3fn)
            if style == "legacy":
                out[f"{layer}.scale_weight"] = scale
                out[f"{layer}.scale_input"] = torch.tensor(1.0)
            else:
                out[f"{layer}.weight_scale"] = scale
                out[f"{layer}.comfy_quant"] = torch.tensor(list(b'{"format": "float8_e4m3fn"}'), dtype=torch.uint8)
    return out


@pytest.mark.parametrize("style", ["legacy", "comfy_quant"])
def test_fp8_scaled_file_is_dequantised(case, native_state, tmp_path, style):
    quantised = fp8_scaled(to_hf_names(native_state), style)
    path = save_safetensors(quantised, tmp_path / "umt5_xxl_fp8_e4m3fn_scaled.safetensors")
    encoder = load_text_encoder(path, dtype=torch.float32)

    scale_key = "scale_weight" if style == "legacy" else "weight_scale"
    hf_q = "encoder.block.1.layer.0.SelfAttention.q"
    hf_wo = "encoder.block.0.layer.1.DenseReluDense.wo"
    assert torch.equal(encoder.blocks[1].attn.q.weight,
                       quantised[f"{hf_q}.weight"].float() * quantised[f"{hf_q}.{scale_key}"])
    assert torch.equal(encoder.blocks[0].ffn.fc2.weight,
                       quantised[f"{hf_wo}.weight"].float() * quantised[f"{hf_wo}.{scale_key}"])
    assert torch.equal(encoder.token_embedding.weight, native_state["token_embedding.weight"].float())

    ids, mask = t5_inputs(case)
    reference = encode_text(load_text_encoder(t5_weights(case), dtype=torch.float32), ids, mask)
    # fp8 rounding of the weights only: close to the bf16 original, far from unrelated.
    assert_close(encode_text(encoder, ids, mask), reference, atol=float("inf"), rel_l2=0.1, name="fp8 context")


def test_unsupported_quantisation_is_rejected(native_state, tmp_path):
    quantised = fp8_scaled(to_hf_names(native_state), "comfy_quant")
    quantised["encoder.block.0.layer.0.SelfAttention.q.comfy_quant"] = torch.tensor(
        list(b'{"format": "nvfp4"}'), dtype=torch.uint8
    )
    path = save_safetensors(quantised, tmp_path / "umt5_nvfp4.safetensors")
    with pytest.raises(CheckpointError, match="nvfp4"):
        load_text_encoder(path)


# --------------------------------------------------------------------------------------------------
# Checkpoint errors


def test_wrong_model_file(tmp_path):
    dit_like = {
        "patch_embedding.weight": torch.zeros(8, 4, 1, 2, 2),
        "blocks.0.self_attn.q.weight": torch.zeros(8, 8),
    }
    path = save_safetensors(dit_like, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="umT5-XXL") as err:
        load_text_encoder(path)
    assert "DiT" in str(err.value)


@pytest.mark.parametrize("layout", ["pth", "safetensors"])
def test_truncated_file(case, native_state, tmp_path, layout):
    if layout == "pth":
        source = t5_weights(case)
    else:
        source = save_safetensors(to_hf_names(native_state), tmp_path / "full.safetensors")
    data = source.read_bytes()
    path = tmp_path / f"truncated.{layout}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_text_encoder(path)


def test_missing_tensor(native_state, tmp_path):
    state = dict(native_state)
    del state["blocks.1.ffn.fc2.weight"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match=r"Missing 1 keys: blocks\.1\.ffn\.fc2\.weight"):
        load_text_encoder(tmp_path / "partial.pth")


def test_wrong_shape(native_state, tmp_path):
    state = dict(native_state)
    q = state["blocks.1.attn.q.weight"]
    state["blocks.1.attn.q.weight"] = torch.zeros(q.shape[0], q.shape[1] + 1, dtype=q.dtype)
    torch.save(state, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match=r"blocks\.1\.attn\.q\.weight"):
        load_text_encoder(tmp_path / "odd.pth")


def test_t5_v1_1_with_shared_position_table_is_rejected(native_state, tmp_path):
    hf = {
        k: v
        for k, v in to_hf_names(native_state).items()
        if "relative_attention_bias" not in k or k.startswith("encoder.block.0.")
    }
    path = save_safetensors(hf, tmp_path / "t5xxl_fp16.safetensors")
    with pytest.raises(CheckpointError, match="T5 v1.1"):
        load_text_encoder(path)


# --------------------------------------------------------------------------------------------------
# Encoding inputs and release


@pytest.fixture(scope="module")
def tiny_encoder(case):
    return load_text_encoder(t5_weights(case), dtype=torch.float32)


def test_encode_text_rejects_bad_inputs(tiny_encoder):
    vocab = tiny_encoder.config.vocab_size
    ids = torch.ones(1, 8, dtype=torch.long)
    mask = torch.ones(1, 8, dtype=torch.long)
    with pytest.raises(InputError, match="batch, tokens"):
        encode_text(tiny_encoder, ids, mask[:, :4])
    with pytest.raises(InputError, match="integer"):
        encode_text(tiny_encoder, ids.float(), mask)
    with pytest.raises(InputError, match="tokenizer does not belong"):
        encode_text(tiny_encoder, ids * vocab, mask)


def test_release_frees_weights(case):
    encoder = load_text_encoder(t5_weights(case), dtype=torch.float32)
    release_text_encoder(encoder)
    assert all(p.is_meta for p in encoder.parameters())
    ids, mask = t5_inputs(case)
    with pytest.raises(InputError, match="released"):
        encode_text(encoder, ids, mask)


# --------------------------------------------------------------------------------------------------
# Tokenizer


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A small sentencepiece-style (Unigram) tokenizer laid out like google/umt5-xxl: pad 0, </s> 1."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    words = "a cat sits on the mat & talks".split()
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    vocab += [("\u2581" + w, -2.0) for w in words] + [(ch, -5.0) for ch in "abcdefghijklmnopqrstuvwxyz"]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    folder = tmp_path_factory.mktemp("umt5-xxl")
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "T5Tokenizer", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
              "extra_ids": 0}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_tokenize_pads_and_appends_eos(tokenizer_dir):
    ids, mask = tokenize("  a cat\n\tsits on   the mat ", tokenizer_dir)
    assert ids.shape == mask.shape == (1, 512) and ids.dtype == mask.dtype == torch.int64
    length = int(mask.sum())
    assert length == 7 and mask[0, :length].all()
    assert ids[0, length - 1] == 1 and (ids[0, length:] == 0).all()


def test_tokenize_truncates_keeping_eos(tokenizer_dir):
    ids, mask = tokenize("a cat sits on the mat " * 200, tokenizer_dir, text_len=512)
    assert mask.all() and ids.shape == (1, 512) and ids[0, -1] == 1


def test_tokenize_cleans_like_upstream(tokenizer_dir):
    assert tokenize("a &amp;amp; cat", tokenizer_dir)[0].equal(tokenize("a & cat", tokenizer_dir)[0])


def test_clean_prompt_without_and_with_ftfy(monkeypatch):
    monkeypatch.setitem(sys.modules, "ftfy", None)  # import fails: the fallback path
    assert clean_prompt("  A &amp;amp; B\u00a0\n\t C  ") == "A & B C"
    fake = types.SimpleNamespace(fix_text=lambda text: text.replace("\u201c", '"').replace("\u201d", '"'))
    monkeypatch.setitem(sys.modules, "ftfy", fake)
    assert clean_prompt("\u201cquoted\u201d  text") == '"quoted" text'


def test_missing_tokenizer_folder(tmp_path):
    for folder in (tmp_path / "absent", tmp_path):
        with pytest.raises(MissingWeightsError, match=r"google/umt5-xxl") as err:
            tokenize("a cat", folder)
        assert "tokenizer.json" in str(err.value) and "spiece.model" in str(err.value)


def test_tokenize_rejects_non_text(tokenizer_dir):
    with pytest.raises(InputError, match="text"):
        tokenize(["a cat"], tokenizer_dir)


def test_encode_prompt(tiny_encoder, tokenizer_dir):
    context = encode_prompt("a cat talks", tiny_encoder, tokenizer_dir)
    ids, mask = tokenize("a cat talks", tokenizer_dir)
    assert context.shape == (1, 512, tiny_encoder.config.dim)
    assert torch.equal(context, encode_text(tiny_encoder, ids, mask))
    assert torch.count_nonzero(context[:, int(mask.sum()):]) == 0


# --------------------------------------------------------------------------------------------------
# Layer streaming (a GPU without room for the whole encoder)


def test_streams_layers_only_when_the_gpu_lacks_room():
    weights = 11 << 30
    assert streams_layers(weights, "cuda:0", free_bytes=8 << 30)
    assert streams_layers(weights, "cuda:0", free_bytes=weights)  # no margin left for activations
    assert not streams_layers(weights, "cuda:0", free_bytes=weights + FIT_MARGIN_BYTES)
    assert not streams_layers(weights, "cpu", free_bytes=0)  # host memory is never streamed from


def test_load_keeps_weights_on_host_when_the_gpu_lacks_room(case):
    """The free-memory number is injected, so no GPU is touched: the weights stay on the CPU and the
    encoder computes on the GPU it was asked for."""
    encoder = load_text_encoder(t5_weights(case), dtype=torch.float32, device="cuda:0", free_bytes=0)
    assert encoder.stream_to == torch.device("cuda:0")
    assert encoder.compute_device == torch.device("cuda:0")
    assert all(p.device.type == "cpu" for p in encoder.parameters())
    roomy = load_text_encoder(t5_weights(case), dtype=torch.float32, device="cpu", free_bytes=0)
    assert roomy.stream_to is None


@pytest.mark.parametrize("tag", ["fp32", "bf16"])
def test_streamed_layers_give_the_whole_encoders_context(case, tag):
    """Layer by layer (each layer's weights copied in just before it runs, the kept ones untouched) the
    context equals the whole encoder's: the same kernels on the same values, so exactly (tolerance 0)."""
    whole = load_text_encoder(t5_weights(case), dtype=DTYPES[tag])
    streamed = load_text_encoder(t5_weights(case), dtype=DTYPES[tag])
    streamed.stream_to = torch.device("cpu")
    kept = {name: p.data for name, p in streamed.named_parameters()}
    kept_pointers = {t.data_ptr() for t in kept.values()}
    copies_used = []

    def check_copies(block, _args):  # runs inside weights_on: the block computes with copies
        copies_used.append(all(p.data_ptr() not in kept_pointers for p in block.parameters()))
    for block in streamed.blocks:
        block.register_forward_pre_hook(check_copies)
    ids, mask = t5_inputs(case)
    expected = encode_text(whole, ids, mask)
    got = encode_text(streamed, ids, mask)
    assert copies_used == [True] * len(streamed.blocks)
    assert all(p.data_ptr() == kept[name].data_ptr() for name, p in streamed.named_parameters())  # put back
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("fraction, expected_gib", [(1.0, 12), (0.1, 7)])
def test_free_memory_counts_the_allocators_reserve_and_a_memory_fraction(monkeypatch, fraction, expected_gib):
    """What the encoder may use: the driver's free memory plus the allocator's reserved-but-unused part,
    but never past a per-process memory fraction (a shared or emulated smaller GPU). CUDA's answers are
    stood in for, so this runs without a GPU; "cuda" without an index means the current GPU."""
    gib = 2**30
    asked = []
    cuda = torch.cuda
    monkeypatch.setattr(cuda, "current_device", lambda: 1)
    monkeypatch.setattr(cuda, "mem_get_info", lambda device: asked.append(device) or (10 * gib, 80 * gib))
    monkeypatch.setattr(cuda, "memory_reserved", lambda device: 3 * gib)
    monkeypatch.setattr(cuda, "memory_allocated", lambda device: 1 * gib)
    monkeypatch.setattr(cuda, "get_per_process_memory_fraction", lambda device: fraction)
    assert free_device_bytes(torch.device("cuda")) == expected_gib * gib
    assert asked == [torch.device("cuda", 1)]
