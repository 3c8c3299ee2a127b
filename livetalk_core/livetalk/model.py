"""LiveTalk 1.3B: the Wan core with OmniAvatar's audio branch and channel-concatenated reference.

Differences from the shared core (everything else is :mod:`.wan_dit`):

* input channels = 16 noisy latent + 16 reference latent + 1 mask (0 at latent frame 0, else 1);
* ``audio_proj`` (AudioPack) packs the wav2vec features of 4 video frames into one latent frame
  (Linear to 32 + LayerNorm), and ``audio_cond_projs[j]`` (Linear 32 -> C) is added to the residual
  stream before layer ``j + 2`` for ``2 <= layer <= num_layers // 2`` (also in the refresh pass).

Shapes: F latent frames, h x w latent size, N = (h/2)*(w/2) tokens per frame, C width,
A wav2vec features per video frame (14*768 = 10752 for the real model), P = num_layers//2 - 1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..errors import CheckpointError
from ..media.checkpoint import check_keys, check_state_dict, read_state_dict, resolve_dtype, strip_prefix
from ..media.timing import VIDEO_FRAMES_PER_LATENT
from ..media.vae import LATENT_CHANNELS
from ..runtime.cuda_graphs import ForwardGraphs
from ..wan.dit import HEAD_DIM, WanCoreConfig, WanDiTCore
from ..wan.kv_cache import KVCache
from ..wan.rope import grid_rotations

FIRST_AUDIO_LAYER = 2
CHECKPOINT_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.", "generator.")
MODEL_NAME = "LiveTalk 1.3B DiT"


@dataclass(frozen=True)
class LiveTalkConfig:
    core: WanCoreConfig
    audio_features: int
    audio_hidden: int = 32

    @property
    def num_audio_layers(self) -> int:
        return self.core.num_layers // 2 - 1

    def audio_layer(self, layer: int) -> int | None:
        """Index of the audio projection added before ``layer``, or None."""
        if FIRST_AUDIO_LAYER <= layer <= self.core.num_layers // 2:
            return layer - FIRST_AUDIO_LAYER
        return None

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor]) -> LiveTalkConfig:
        pack = sd["audio_proj.proj.weight"]
        return cls(
            core=WanCoreConfig.from_state_dict(sd),
            audio_features=pack.shape[1] // VIDEO_FRAMES_PER_LATENT,
            audio_hidden=pack.shape[0],
        )

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = self.core.core_shapes()
        a, c = self.audio_hidden, self.core.dim
        shapes.update(
            {
                "audio_proj.proj.weight": (a, VIDEO_FRAMES_PER_LATENT * self.audio_features),
                "audio_proj.proj.bias": (a,),
                "audio_proj.norm_out.weight": (a,),
                "audio_proj.norm_out.bias": (a,),
            }
        )
        for j in range(self.num_audio_layers):
            shapes[f"audio_cond_projs.{j}.weight"] = (c, a)
            shapes[f"audio_cond_projs.{j}.bias"] = (c,)
        return shapes


class AudioPack(nn.Module):
    """Packs 4 consecutive video-frame feature vectors (time-major) into one latent-frame vector."""

    def __init__(self, features: int, hidden: int) -> None:
        super().__init__()
        self.proj = nn.Linear(VIDEO_FRAMES_PER_LATENT * features, hidden)
        self.norm_out = nn.LayerNorm(hidden, eps=1e-5)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``[B, 4F, A]`` -> ``[B, F, hidden]``."""
        b, t, a = features.shape
        return self.norm_out(self.proj(features.reshape(b, t // VIDEO_FRAMES_PER_LATENT, VIDEO_FRAMES_PER_LATENT * a)))


class LiveTalkDiT(WanDiTCore):
    def __init__(self, config: LiveTalkConfig) -> None:
        super().__init__(config.core)
        self.livetalk_config = config
        self.audio_proj = AudioPack(config.audio_features, config.audio_hidden)
        self.audio_cond_projs = nn.ModuleList(
            nn.Linear(config.audio_hidden, config.core.dim) for _ in range(config.num_audio_layers)
        )

    def embed_audio(self, features: torch.Tensor) -> torch.Tensor:
        """Video-rate wav2vec features ``[B, 4F-3, A]`` -> per-layer residual terms ``[B, P, F, C]``.

        The first latent frame covers one video frame, so frame 0's features are repeated 3 more
        times in front, as upstream does. Each latent frame only sees its own 4 video frames, so
        slicing the result per block equals embedding per block.
        """
        features = features.to(self.dtype)
        padded = torch.cat([features[:, :1].expand(-1, VIDEO_FRAMES_PER_LATENT - 1, -1), features], dim=1)
        packed = self.audio_proj(padded)
        if not len(self.audio_cond_projs):  # fewer than 4 layers: nothing is injected
            return packed.new_zeros(packed.shape[0], 0, packed.shape[1], self.config.dim)
        return torch.stack([proj(packed) for proj in self.audio_cond_projs], dim=1)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        reference: torch.Tensor,
        audio: torch.Tensor,
        context_kv: list[tuple[torch.Tensor, torch.Tensor]],
        cache: KVCache | None,
        start_frame: int,
        compute_output: bool = True,
        graphs: ForwardGraphs | None = None,
    ) -> torch.Tensor | None:
        """Predict the flow ``v`` for one block.

        Args:
            x: noisy latents ``[B, 16, F, h, w]``.
            t: timestep per latent frame ``[B, F]`` in the dtype fed to the time embedding.
            reference: reference latent + mask channels ``[B, 17, F, h, w]``.
            audio: this block's slice of :meth:`embed_audio`, ``[B, P, F, C]``.
            context_kv: :meth:`project_context` of the text context.
            cache: the run's KV cache, or None to attend only within the block.
            start_frame: stream index of the block's first latent frame (RoPE position and cache slot).
            compute_output: False for the cache-refresh pass, whose output is never used.
            graphs: the session's :class:`~.cuda_graphs.ForwardGraphs` to replay the forward from
                (with a cache; the refresh pass then computes the output too: one small Linear).
        Returns:
            ``v`` ``[B, 16, F, h, w]`` in the model dtype, or None when ``compute_output`` is False.
        """
        positions = torch.arange(start_frame, start_frame + x.shape[2], device=x.device)
        if cache is not None:
            cache.set_block(start_frame, x.shape[2])

        def predict(x: torch.Tensor, t: torch.Tensor, reference: torch.Tensor, audio: torch.Tensor,
                    positions: torch.Tensor, compute_output: bool = True) -> torch.Tensor | None:
            tokens, grid = self.patchify(torch.cat([x.to(self.dtype), reference.to(self.dtype)], dim=1))
            _, gh, gw = grid
            t_emb, t_mod = self.embed_time(t)
            rotations = grid_rotations(positions, gh, gw, HEAD_DIM)
            for layer, block in enumerate(self.blocks):
                j = self.livetalk_config.audio_layer(layer)
                if j is not None:
                    tokens = tokens + audio[:, j].unsqueeze(2).expand(-1, -1, gh * gw, -1).flatten(1, 2)
                tokens = block(tokens, t_mod, rotations, context_kv[layer], cache, layer, self.attention_backend)
            if not compute_output:
                return None
            return self.unpatchify(self.head(tokens, t_emb), grid)

        if graphs is not None and cache is not None:
            v = graphs((cache.block_layout, id(context_kv)), predict, x, t, reference, audio, positions)
            return v if compute_output else None
        return predict(x, t, reference, audio, positions, compute_output)


def livetalk_config_from_state_dict(sd: dict[str, torch.Tensor], path: str | os.PathLike) -> LiveTalkConfig:
    """Infer the config, then check every key and shape; one clear error if the file is not LiveTalk."""
    needed = ("patch_embedding.weight", "head.head.weight", "blocks.0.ffn.0.weight", "text_embedding.0.weight",
              "time_embedding.0.weight", "audio_proj.proj.weight")
    if any(k not in sd for k in needed):
        check_keys(sd.keys(), needed, path=path, model_name=MODEL_NAME)
    config = LiveTalkConfig.from_state_dict(sd)
    expected_in = 2 * LATENT_CHANNELS + 1
    if config.core.in_dim != expected_in or config.core.dim % HEAD_DIM:
        raise CheckpointError(
            f"{path} is a DiT with {config.core.in_dim} input channels and width {config.core.dim}; "
            f"a LiveTalk DiT has {expected_in} input channels (latent + reference + mask) and a width "
            f"that is a multiple of {HEAD_DIM}. Pick LiveTalk's model.safetensors."
        )
    check_state_dict(sd, config.expected_shapes(), path=path, model_name=MODEL_NAME)
    return config


def load_livetalk_dit(
    path: str | os.PathLike, dtype: torch.dtype | str = torch.bfloat16, device: torch.device | str = "cpu"
) -> LiveTalkDiT:
    """Load LiveTalk's ``model.safetensors`` (bare keys; a ``model.``/``diffusion_model.`` prefix is
    accepted) with the architecture inferred from tensor shapes and every key checked."""
    dtype = resolve_dtype(dtype)
    sd = strip_prefix(read_state_dict(path, what=MODEL_NAME), CHECKPOINT_PREFIXES)
    config = livetalk_config_from_state_dict(sd, path)
    with torch.device("meta"):
        model = LiveTalkDiT(config)
    model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=True, assign=True)
    return model.to(device).eval().requires_grad_(False)
