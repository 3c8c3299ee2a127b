"""A third model family that exists only in the tests: proof that a family is one class and one
:func:`register_family` call, with nothing changed in ``nodes/`` or the rest of the core.

The toy DiT is tiny and simple but runs real inputs: it is recognised by its own marker tensor,
takes LiveTalk's wav2vec2 features through its own projection, and samples blocks of 3 latent frames
(which the shared streaming VAE decoder turns into 9, then 12 frames each) from the reference latent,
the audio and the prompt. The family is built against the pack as a given package imports it (the
tests import the pack under their own package names), so it subclasses that package's ModelFamily.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import SimpleNamespace

import torch

TOY_MARKER = "toy_talker.marker"
TOY_FRAMES_PER_BLOCK = 3  # as LiveTalk's, so the shared decoder's frame arithmetic holds


class ToyDiT(torch.nn.Module):
    """Audio features per latent frame and the prompt's mean, projected onto the 16 latent channels."""

    def __init__(self, audio_features: int, text_dim: int) -> None:
        super().__init__()
        self.toy_talker = torch.nn.Module()
        self.toy_talker.marker = torch.nn.Parameter(torch.ones(1))
        self.toy_talker.audio_proj = torch.nn.Linear(audio_features, 16)
        self.toy_talker.text_proj = torch.nn.Linear(text_dim, 16)

    @property
    def device(self) -> torch.device:
        return self.toy_talker.marker.device

    @property
    def dtype(self) -> torch.dtype:
        return self.toy_talker.marker.dtype

    @property
    def text_dim(self) -> int:
        return self.toy_talker.text_proj.in_features

    def heavy_linears(self) -> dict[str, torch.nn.Linear]:
        """The layers fp8 matmuls would run (the runtime options ask every DiT)."""
        return {"toy_talker.audio_proj": self.toy_talker.audio_proj}

    def denoise(
        self, noisy: torch.Tensor, reference: torch.Tensor, audio: torch.Tensor, text: torch.Tensor
    ) -> torch.Tensor:
        """One step: ``noisy`` [1, 16, F, h, w] pulled towards the reference, shifted per frame by the audio."""
        shift = self.toy_talker.audio_proj(audio) + self.toy_talker.text_proj(text.mean(dim=1))  # [F, 16]
        return 0.5 * noisy + 0.5 * reference + 0.1 * shift.T[None, :, :, None, None]


def _modules(package: str) -> SimpleNamespace:
    core_package = f"{package}.livetalk_core" if package else "livetalk_core"
    names = ("family_base", "media.timing", "media.wav2vec2", "livetalk.audio", "livetalk.pipeline", "media.image")
    core = SimpleNamespace(**{n.split(".")[-1]: importlib.import_module(f"{core_package}.{n}") for n in names})
    core.options = importlib.import_module(f"{core_package}.options")
    return core


def toy_family(package: str = ""):
    """The toy family, subclassing ``<package>.livetalk_core.family_base.ModelFamily`` (no package: the
    engine imported as ``livetalk_core``, as the command line does); pass it to that package's
    ``families.register_family``."""
    core = _modules(package)

    @dataclass
    class ToyAudio(core.timing.CoversVideoLength):
        """The toy's conditioning: wav2vec2 features per latent frame ``[F, A]`` and the video's
        length (:class:`VideoLength`), which gives the blocks and frames through the shared mixin."""

        features: torch.Tensor
        length: core.timing.VideoLength

    class ToyFamily(core.family_base.ModelFamily):
        name = "Toy Talker"
        marker = TOY_MARKER
        audio_encoder_hint = "the tiny wav2vec2 of tests/tiny_weights.py"
        conditioning_type = ToyAudio
        talking_prompt = "A toy talks."

        def load(self, path, dtype, device, **options) -> ToyDiT:
            from safetensors.torch import load_file

            state = load_file(str(path))
            dit = ToyDiT(state["toy_talker.audio_proj.weight"].shape[1], state["toy_talker.text_proj.weight"].shape[1])
            dit.load_state_dict(state, strict=True)
            dit.runtime = core.options.EAGER  # what the loader's runtime options are applied over
            return dit.to(device, dtype).eval()

        def audio_features(self, shapes) -> int:
            return core.family_base.find_tensor(shapes, "toy_talker.audio_proj.weight")[1]

        def encoder_features(self, layers: int, hidden: int) -> int:
            return (layers + 2) * hidden  # LiveTalk's wav2vec2 features

        def video_length(self, num_samples: int):
            return core.pipeline.livetalk_video_length(num_samples)

        def encode_audio(self, dit, encoder, waveform, output_device):
            length = self.video_length(waveform.numel())
            padded, latents = core.audio.pad_waveform_to_blocks(waveform.float(), TOY_FRAMES_PER_BLOCK)
            per_video_frame = core.wav2vec2.livetalk_audio_features(
                encoder, padded.to(encoder.device), core.timing.video_frames_for_latents(latents))[0]
            # latent frame 0 is video frame 0; latent frame i > 0 covers video frames 4i-3 .. 4i: take the last
            per_latent = per_video_frame[torch.arange(latents) * 4]
            return ToyAudio(features=per_latent.to(output_device), length=length)

        def reference_pixels(self, image, width, height, crop, device):
            return core.image.cover_and_crop(image, height, width)

        def text_dim(self, dit: ToyDiT) -> int:
            return dit.text_dim

        def sample_blocks(self, dit: ToyDiT, *, conditioning, idle_conditioning, reference, audio, seed, steps,
                          cache_policy, on_step=None, workspace=None):
            text = core.family_base.text_context(conditioning, self.text_dim(dit)).to(dit.device, dit.dtype)
            return _toy_blocks(dit, reference.to(dit.device, dit.dtype), audio.features.to(dit.device, dit.dtype),
                               text, audio.num_blocks, seed, steps, on_step)

    return ToyFamily()


@torch.no_grad()
def _toy_blocks(dit: ToyDiT, reference, features, text, num_blocks: int, seed: int, steps: int, on_step):
    generator = torch.Generator().manual_seed(seed)
    _, channels, _, h, w = reference.shape
    for block in range(num_blocks):
        frames = slice(block * TOY_FRAMES_PER_BLOCK, (block + 1) * TOY_FRAMES_PER_BLOCK)
        x = torch.randn(1, channels, TOY_FRAMES_PER_BLOCK, h, w, generator=generator).to(dit.device, dit.dtype)
        for step in range(steps):
            x = dit.denoise(x, reference, features[frames], text)
            if on_step is not None:
                on_step(block, step, x)
        yield x


def tiny_toy_dit(audio_features: int, text_dim: int, seed: int = 0) -> ToyDiT:
    torch.manual_seed(seed)
    return ToyDiT(audio_features, text_dim)
