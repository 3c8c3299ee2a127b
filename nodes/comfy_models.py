"""Model folders and memory management: where the files are, and ComfyUI's hold on loaded models.

Folders: DiTs come from the pack's ``livetalk`` folder merged with ``diffusion_models``; the VAE
from ``vae``; the audio encoder from ``audio_encoders``, as a single file or a Hugging Face folder
(``config.json`` + weights) anywhere under it.

Memory: each engine model is wrapped in a ``ModelPatcher`` and moved with ``load_models_gpu``, so
ComfyUI evicts it (and other models) to make room exactly as it does for native models.
"""

from __future__ import annotations

import os
from pathlib import Path

import comfy.model_management as mm
import comfy.model_patcher
import folder_paths
import torch

from .model_files import ModelFamily

LIVETALK_FOLDER = "livetalk"
MODEL_EXTENSIONS = {".safetensors", ".sft", ".pt", ".pth", ".bin", ".ckpt"}
_HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def register_model_folders() -> None:
    """Add ``models/livetalk``, keeping any paths a user's extra_model_paths.yaml already gave it.

    A folder name first seen in that YAML is created with no extension filter (every file would be
    listed); the pack's extensions are merged in so only weights show up.
    """
    default = os.path.join(folder_paths.models_dir, LIVETALK_FOLDER)
    paths, extensions = folder_paths.folder_names_and_paths.get(LIVETALK_FOLDER, ([], set()))
    if default not in paths:
        paths = [*paths, default]
    folder_paths.folder_names_and_paths[LIVETALK_FOLDER] = (paths, set(extensions) | MODEL_EXTENSIONS)


def dit_choices() -> list[str]:
    return sorted(set(folder_paths.get_filename_list(LIVETALK_FOLDER)) | set(folder_paths.get_filename_list("diffusion_models")))


def dit_path(name: str) -> str | None:
    return folder_paths.get_full_path(LIVETALK_FOLDER, name) or folder_paths.get_full_path("diffusion_models", name)


def vae_choices() -> list[str]:
    return folder_paths.get_filename_list("vae")


def vae_path(name: str) -> str | None:
    return folder_paths.get_full_path("vae", name)


def _hf_folders() -> dict[str, Path]:
    """Hugging Face wav2vec2 folders under ``audio_encoders``, by path relative to their root."""
    found: dict[str, Path] = {}
    for root in folder_paths.get_folder_paths("audio_encoders"):
        base = Path(root)
        if not base.is_dir():
            continue
        for config in sorted(base.rglob("config.json")):
            folder = config.parent
            if folder != base and any((folder / w).is_file() for w in _HF_WEIGHTS):
                found.setdefault(folder.relative_to(base).as_posix(), folder)
    return found


def audio_encoder_choices() -> list[str]:
    """Single files plus HF folders; the weight files inside an HF folder are listed as the folder."""
    folders = _hf_folders()
    files = [f for f in folder_paths.get_filename_list("audio_encoders") if not any(f.startswith(d + "/") for d in folders)]
    return sorted(files + list(folders))


def audio_encoder_path(name: str) -> str | None:
    folder = _hf_folders().get(name)
    return str(folder) if folder is not None else folder_paths.get_full_path("audio_encoders", name)


class _Shell(torch.nn.Module):
    """What ModelPatcher manages. It sets bookkeeping attributes (``device``, lowvram flags) on the
    module it holds, which the engine's models expose as read-only properties, so they live here."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.inner = module


class Managed:
    """An engine object whose weights ComfyUI's memory manager moves between devices.

    ``engine`` is what the nodes call (a DiT, a VAE, an AudioEncoder); ``module`` the nn.Module that
    holds its weights; ``family`` the DiT family the three were loaded for. Call :func:`on_device`
    before using ``engine``.
    """

    def __init__(self, engine, module: torch.nn.Module, load_device: torch.device, offload_device: torch.device,
                 family: ModelFamily | None = None) -> None:
        self.engine = engine
        self.module = module
        self.family = family
        self.patcher = comfy.model_patcher.ModelPatcher(_Shell(module), load_device=load_device, offload_device=offload_device)


def on_device(*models: Managed):
    """Load ``models`` onto their compute device together (evicting others if needed); returns their engines.

    Always whole: ComfyUI's partial (lowvram) loading only works for its own cast-on-the-fly layers
    and skips parameters that sit next to submodules (e.g. a block's ``modulation``).
    """
    mm.load_models_gpu([m.patcher for m in models], force_full_load=True)
    engines = tuple(m.engine for m in models)
    return engines[0] if len(engines) == 1 else engines
