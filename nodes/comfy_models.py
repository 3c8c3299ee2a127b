"""Model folders and memory management: where the files are, and ComfyUI's hold on loaded models.

Folders: DiTs come from the pack's ``livetalk`` folder merged with ``diffusion_models``; the VAE
from ``vae``; the audio encoder from ``audio_encoders``, as a single file or a Hugging Face folder
(``config.json`` + weights) anywhere under it. Each list also offers the known files
(:data:`~.model_files.DOWNLOADABLE`) that are not there yet, as ``<name> (download)``: choosing one
fetches it into its folder when the loader runs.

Memory: each engine model is wrapped in a ``ModelPatcher`` and moved with ``load_models_gpu``, so
ComfyUI evicts it (and other models) to make room exactly as it does for native models. A DiT's
sampling workspace (:func:`kept_workspace`: its KV cache and CUDA graphs) stays between prompts
where it pays and fits (:func:`keep_if_worth_it`); ComfyUI unloading the DiT lets it go.
"""

from __future__ import annotations

import functools
import os
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import comfy.model_management as mm
import comfy.model_patcher
import folder_paths
import torch
from comfy.patcher_extension import CallbacksMP

from ..livetalk_core.errors import CheckpointError, OutOfMemory, out_of_memory_help
from ..livetalk_core.families import ModelFamily, can_be_base, named_as_base
from ..livetalk_core.media.weights import WeightFile
from ..livetalk_core.runtime.workspace import Workspace
from .model_files import DOWNLOADABLE, tensor_shapes

LIVETALK_FOLDER = "livetalk"
MODEL_EXTENSIONS = {".safetensors", ".sft", ".pt", ".pth", ".bin", ".ckpt"}
_HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
DOWNLOAD_SUFFIX = " (download)"
DIT_FOLDERS = (LIVETALK_FOLDER, "diffusion_models")


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


def _download_choices(folders: tuple[str, ...]) -> list[str]:
    """A ``<name> (download)`` choice for each known file of ``folders``, also once it is there: a
    workflow saved with that choice stays valid after the download (ComfyUI refuses a value that is
    not in the list), and the choice then uses the file as it is."""
    return [d.name + DOWNLOAD_SUFFIX for d in DOWNLOADABLE if d.folder in folders]


def _with_downloads(present: list[str], folders: tuple[str, ...]) -> list[str]:
    return present + _download_choices(folders)


def file_name(choice: str) -> str:
    """The file a choice names: a ``(download)`` choice names the file it fetches."""
    return choice.removesuffix(DOWNLOAD_SUFFIX)


def download_target(choice: str) -> tuple[WeightFile, Path] | None:
    """For a ``<name> (download)`` choice: its source and the path it is fetched to, in the folder's
    default ``models/<folder>`` (else the folder's first path); None for any other choice."""
    entry = next((d for d in DOWNLOADABLE if d.name + DOWNLOAD_SUFFIX == choice), None)
    if entry is None:
        return None
    paths = folder_paths.get_folder_paths(entry.folder)
    default = os.path.join(folder_paths.models_dir, entry.folder)
    return entry.source, Path(default if default in paths else paths[0]) / entry.name


def _dit_files() -> list[str]:
    return sorted(set().union(*(folder_paths.get_filename_list(folder) for folder in DIT_FOLDERS)))


def dit_choices() -> list[str]:
    return _with_downloads(_dit_files(), DIT_FOLDERS)


_base_verdicts: dict[tuple[str, int, int], bool] = {}


def can_be_base_file(path: str) -> bool:
    """Whether the file can serve as the base of a partial fine-tune of some family: a complete
    checkpoint of a family that takes partial files, by its safetensors header (read once per file
    version; :func:`livetalk_core.families.can_be_base`). A pickle is not opened to fill a list; it is
    offered when its name holds a family's base mark, and checked in full when the loader runs."""
    stat = os.stat(path)
    key = (path, stat.st_size, stat.st_mtime_ns)
    if key not in _base_verdicts:
        try:
            shapes = tensor_shapes(path)
        except CheckpointError:
            shapes, verdict = None, False
        else:
            verdict = named_as_base(Path(path).name) if shapes is None else can_be_base(shapes)
        _base_verdicts[key] = verdict
    return _base_verdicts[key]


def base_choices() -> list[str]:
    """The DiT files that can be a base (:func:`can_be_base_file`), then the known downloads named as one."""
    downloads = [choice for choice in _download_choices(DIT_FOLDERS) if named_as_base(choice)]
    return [name for name in _dit_files() if can_be_base_file(dit_path(name))] + downloads


def dit_path(name: str) -> str | None:
    name = file_name(name)
    return folder_paths.get_full_path(LIVETALK_FOLDER, name) or folder_paths.get_full_path("diffusion_models", name)


def vae_choices() -> list[str]:
    return _with_downloads(folder_paths.get_filename_list("vae"), ("vae",))


def vae_path(name: str) -> str | None:
    return folder_paths.get_full_path("vae", file_name(name))


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
    files = [f for f in folder_paths.get_filename_list("audio_encoders")
             if not any(f.startswith(d + "/") for d in folders)]
    return _with_downloads(sorted(files + list(folders)), ("audio_encoders",))


def audio_encoder_path(name: str) -> str | None:
    name = file_name(name)
    folder = _hf_folders().get(name)
    return str(folder) if folder is not None else folder_paths.get_full_path("audio_encoders", name)


class _Shell(torch.nn.Module):
    """What ModelPatcher manages. It sets bookkeeping attributes (``device``, lowvram flags) on the
    module it holds, which the engine's models expose as read-only properties, so they live here."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.inner = module


@functools.cache
def _shell_class(module_type: type[torch.nn.Module]) -> type[_Shell]:
    """A :class:`_Shell` subclass named after the module it holds: ComfyUI logs "Requested to load
    <class name>" for each model it loads, so the log names the DiT, the VAE or the encoder."""
    return type(module_type.__name__, (_Shell,), {"__doc__": f"The ModelPatcher shell of a {module_type.__name__}."})


def shell(module: torch.nn.Module) -> _Shell:
    return _shell_class(type(module))(module)


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
        self.patcher = comfy.model_patcher.ModelPatcher(shell(module), load_device=load_device,
                                                        offload_device=offload_device)
        self.workspace: Workspace | None = None  # a DiT's, once it has sampled (kept_workspace)


def on_device(*models: Managed):
    """Load ``models`` onto their compute device together (evicting others if needed); returns their engines.

    Always whole: ComfyUI's partial (lowvram) loading only works for its own cast-on-the-fly layers
    and skips parameters that sit next to submodules (e.g. a block's ``modulation``).
    """
    mm.load_models_gpu([m.patcher for m in models], force_full_load=True)
    engines = tuple(m.engine for m in models)
    return engines[0] if len(engines) == 1 else engines


def kept_workspace(model: Managed) -> Workspace:
    """The DiT's sampling workspace (KV cache, CUDA graphs, text buffers), kept from one prompt to
    the next so that a run replays its forwards from block 0 on instead of running them kernel by
    kernel and capturing them again. ComfyUI unloading the DiT lets the workspace go; its graphs read
    the weights' addresses, so weights that moved at all make it start again."""
    if model.workspace is None:
        workspace = model.workspace = Workspace()

        def let_go(patcher, unpatch_all: bool) -> None:
            # ComfyUI detaches with unpatch_all=True to unload a model (for room, or after an
            # out-of-memory error), and with False around every load of a model already loaded
            # (its weights stay where they are: the workspace stays).
            if unpatch_all:
                workspace.free()

        # Moved in part and back (ComfyUI may offload some layers for room) with no detach: the
        # workspace sees new weight addresses at the next run and starts again.
        model.patcher.add_callback(CallbacksMP.ON_DETACH, let_go)
    return model.workspace


def keep_if_worth_it(model: Managed) -> None:
    """After a run: keep the DiT's workspace only where it pays and leaves room. It pays when its
    forwards replay from CUDA graphs (on a GPU, graphs on, a bf16 KV cache); it leaves room when the
    GPU could still hold another KV cache of its size, so that the nodes after the sampler (the
    decoder, a text encoder) do not evict the DiT for memory the workspace holds. Else it is freed."""
    workspace = model.workspace
    if workspace is None or workspace.cache is None:
        return
    device = workspace.cache.keys[0].device
    if not workspace.uses_graphs or mm.get_free_memory(device) < workspace.cache.num_bytes:
        workspace.free()


T = TypeVar("T")
NODE_OUT_OF_MEMORY_HELP = out_of_memory_help(
    "precision bf16 (not fp32) in Load LiveTalk Model; a smaller video (width and height of Encode Reference (VAE), "
    "e.g. 384); for RealVideo 14B, fp8_weights on in Load LiveTalk Model, or more GPUs"
)


def out_of_memory_advice(execute: Callable[..., T]) -> Callable[..., T]:
    """Wrap a node's ``execute``: a GPU out-of-memory error in it becomes :class:`OutOfMemory` with the
    options, raised once the memory the failed run held is given back."""

    @functools.wraps(execute)
    def guarded(*args, **kwargs) -> T:
        try:
            return execute(*args, **kwargs)
        except torch.cuda.OutOfMemoryError as err:
            # The traceback's frames hold the failed forward's activations and, through the
            # sampler's closures, its KV cache. Clearing them breaks any cycles; leaving the except
            # block drops the error, so that memory can go before the cache is emptied.
            traceback.clear_frames(err.__traceback__)
        mm.unload_all_models()  # what ComfyUI does after an out-of-memory error in its own nodes
        mm.soft_empty_cache()
        raise OutOfMemory(NODE_OUT_OF_MEMORY_HELP)

    return guarded
