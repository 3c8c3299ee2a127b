"""LiveTalk DiT loading (config from shapes, strict keys, clear errors) and pipeline frame arithmetic."""


import pytest
import torch
from golden import case_ids, golden_cases, require_shared
from safetensors.torch import save_file

from livetalk_core.errors import CheckpointError
from livetalk_core.livetalk.audio import pad_waveform_to_blocks
from livetalk_core.livetalk.model import LiveTalkConfig, LiveTalkDiT, load_livetalk_dit
from livetalk_core.livetalk.pipeline import fit_waveform, video_frames_for_duration
from livetalk_core.wan.dit import WanCoreConfig

CASES = [c for c in golden_cases("livetalk") if c.model == "livetalk"]


@pytest.fixture(scope="module")
def tiny_state_dict() -> dict[str, torch.Tensor]:
    core = WanCoreConfig(dim=128, in_dim=33, out_dim=16, ffn_dim=32, num_layers=6, text_dim=16)
    return {k: v.clone() for k, v in LiveTalkDiT(LiveTalkConfig(core=core, audio_features=24)).state_dict().items()}


@pytest.mark.parametrize("case", CASES, ids=case_ids(CASES))
def test_config_is_inferred_from_the_golden_weights(case):
    model = load_livetalk_dit(case.file(case.manifest["weights"]["dit"]), "fp32")
    want = case.manifest["dit_config"]
    cfg = model.livetalk_config
    assert (cfg.core.dim, cfg.core.num_heads, cfg.core.num_layers, cfg.core.ffn_dim) == (
        want["dim"], want["num_heads"], want["num_layers"], want["ffn_dim"])
    assert (cfg.core.text_dim, cfg.core.in_dim, cfg.audio_features, cfg.num_audio_layers) == (
        want["text_dim"], want["in_dim"], want["audio_input_dim"], want["num_audio_cond_projs"])
    assert [i for i in range(cfg.core.num_layers) if cfg.audio_layer(i) is not None] == want["audio_injection_layers"]


def test_real_geometry_matches_the_release_key_list():
    import json

    keys = json.loads(require_shared("spec/livetalk_keys.json").read_text())
    dit_keys = keys.get("dit") or keys.get("causal_dit") or next(
        v for v in keys.values() if isinstance(v, dict) and "patch_embedding.weight" in v
    )
    core = WanCoreConfig(dim=1536, in_dim=33, out_dim=16, ffn_dim=8960, num_layers=30, text_dim=4096)
    shapes = LiveTalkConfig(core=core, audio_features=10752).expected_shapes()
    assert {k: list(v) for k, v in shapes.items()} == {k: list(v) for k, v in dit_keys.items()}


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_prefixed_and_cast_files_load(tmp_path, tiny_state_dict, dtype):
    path = tmp_path / "dit.safetensors"
    save_file({f"model.diffusion_model.{k}": v.half() for k, v in tiny_state_dict.items()}, str(path))
    model = load_livetalk_dit(path, dtype)
    assert model.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    assert model.livetalk_config.core.num_layers == 6


def test_missing_key_is_named(tmp_path, tiny_state_dict):
    sd = dict(tiny_state_dict)
    del sd["blocks.3.cross_attn.norm_k.weight"]
    save_file(sd, str(tmp_path / "dit.safetensors"))
    with pytest.raises(CheckpointError, match=r"blocks\.3\.cross_attn\.norm_k\.weight") as err:
        load_livetalk_dit(tmp_path / "dit.safetensors")
    assert "dit.safetensors" in str(err.value) and "LiveTalk" in str(err.value)


def test_wan_t2v_without_audio_is_rejected(tmp_path, tiny_state_dict):
    sd = {k: v for k, v in tiny_state_dict.items() if not k.startswith("audio_")}
    save_file(sd, str(tmp_path / "wan_t2v.safetensors"))
    with pytest.raises(CheckpointError, match="without an audio branch"):
        load_livetalk_dit(tmp_path / "wan_t2v.safetensors")


def test_sdxl_like_file_is_rejected(tmp_path):
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4)}, str(tmp_path / "sdxl.safetensors"))
    with pytest.raises(CheckpointError, match="Stable Diffusion"):
        load_livetalk_dit(tmp_path / "sdxl.safetensors")


def test_wrong_input_channels_are_explained(tmp_path, tiny_state_dict):
    sd = dict(tiny_state_dict)
    sd["patch_embedding.weight"] = torch.zeros(128, 16, 1, 2, 2)
    save_file(sd, str(tmp_path / "dit.safetensors"))
    with pytest.raises(CheckpointError, match="33 input channels"):
        load_livetalk_dit(tmp_path / "dit.safetensors")


def test_truncated_and_missing_files(tmp_path, tiny_state_dict):
    path = tmp_path / "dit.safetensors"
    save_file(tiny_state_dict, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_livetalk_dit(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_livetalk_dit(tmp_path / "nope.safetensors")


def test_pickle_with_code_is_refused(tmp_path):
    import pickle

    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    path = tmp_path / "evil.pt"
    torch.save({"weights": Payload()}, path, pickle_protocol=pickle.DEFAULT_PROTOCOL)
    with pytest.raises(CheckpointError, match="refuses"):
        load_livetalk_dit(path)


@pytest.mark.parametrize(
    "seconds, frames, latents",
    [(1.0, 17, 6), (5.0, 81, 21), (7.3, 117, 33), (8.0, 129, 33), (0.2, 4, 3)],
)
def test_frame_arithmetic_for_any_duration(seconds, frames, latents):
    """Video frames kept = floor(16 s) + 1; latents = the smallest multiple of 3 whose span covers all the audio."""
    waveform = torch.zeros(int(round(seconds * 16000)))
    padded, num_latents = pad_waveform_to_blocks(waveform)
    assert video_frames_for_duration(seconds) == frames
    assert num_latents == latents and 4 * num_latents - 3 >= frames
    assert padded.shape[0] >= waveform.shape[0]


def test_fit_waveform_trims_and_pads():
    wave = torch.ones(16000)
    assert fit_waveform(wave, 0.5).shape[0] == 8000
    padded = fit_waveform(wave, 2.0)
    assert padded.shape[0] == 32000 and padded[16000:].abs().sum() == 0
    assert fit_waveform(wave, None) is wave


def test_sampling_runs_past_1024_latent_frames_with_a_fixed_cache():
    """Upstream's RoPE table stops at 1024 latent frames; the port keeps going with bounded memory."""
    from livetalk_core.livetalk.sampler import sample_livetalk
    from livetalk_core.runtime.noise import SeededNoise
    from livetalk_core.wan.kv_cache import KVCache

    torch.manual_seed(0)
    core = WanCoreConfig(dim=128, in_dim=33, out_dim=16, ffn_dim=32, num_layers=4, text_dim=16)
    model = LiveTalkDiT(LiveTalkConfig(core=core, audio_features=8)).eval()
    blocks = 345  # 1035 latent frames
    audio = model.embed_audio(torch.randn(1, 4 * 3 * blocks - 3, 8))
    sizes = []
    original = KVCache.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        sizes.append(self.num_bytes)

    KVCache.__init__ = spy
    try:
        last = None
        blocks_out = sample_livetalk(model, ref_latent=torch.randn(1, 16, 1, 2, 2), audio_embeds=audio,
                                     context=torch.randn(1, 4, 16), num_blocks=blocks, noise=SeededNoise(0))
        for i, block in enumerate(blocks_out):
            assert torch.isfinite(block).all(), i
            last = i
    finally:
        KVCache.__init__ = original
    assert last == blocks - 1
    assert len(sizes) == 1 and sizes[0] == 4 * 2 * 15 * 1 * 128 * 4  # layers x (k, v) x window x tokens x dim x fp32


def test_the_core_refuses_a_mismatched_audio_encoder_with_the_family_check(tmp_path):
    """LiveTalk's own guard (pipeline, live stream) and the family's check (nodes, CLI) are one check:
    the same words for the same mismatch, naming the encoder and the one to pick."""
    from tiny_weights import save_tiny_wav2vec2, tiny_dit

    from livetalk_core.errors import InputError
    from livetalk_core.families import LIVETALK_13B
    from livetalk_core.livetalk.audio import check_audio_encoder
    from livetalk_core.media.wav2vec2 import load_audio_encoder

    dit = tiny_dit()
    large = load_audio_encoder(save_tiny_wav2vec2(tmp_path / "large.safetensors", large=True), torch.float32)
    with pytest.raises(InputError) as core:
        check_audio_encoder(dit, large)
    shapes = {k: tuple(v.shape) for k, v in dit.state_dict().items()}
    with pytest.raises(InputError) as family:
        LIVETALK_13B.check_audio_encoder(shapes, large.num_layers, large.hidden_size, "large.safetensors")
    assert str(core.value).replace("LiveTalk 1.3B DiT", "LiveTalk 1.3B model") == str(family.value)
    assert "large.safetensors gives" in str(core.value) and "wav2vec2-base-960h" in str(core.value)
    check_audio_encoder(dit, load_audio_encoder(save_tiny_wav2vec2(tmp_path / "base.safetensors"), torch.float32))
