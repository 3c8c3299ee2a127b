"""The runtime options of a run, in one object: checked once, applied to a model in one place.

:class:`RuntimeOptions` holds what the loader node, the CLI, the multi-GPU workers and the benchmarks
choose about *how* a model runs (precision, attention kernel, compiling, CUDA graphs, fp8 weights,
fp8 matmuls, an fp8 KV cache, devices); :meth:`RuntimeOptions.validate` refuses options that do not go
together, before anything loads; :meth:`RuntimeOptions.apply` sets a loaded DiT (and VAE) up for them
and hands the DiT its options (``dit.runtime``, which the model reads and nothing else writes).
:func:`graphs_off_reason` is the one rule for whether the samplers replay CUDA graphs: the samplers
(:func:`~.cuda_graphs.eager_reason`) and the benchmarks' reports both ask it.

Plain PyTorch; picklable (the multi-GPU workers receive it).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from .errors import InputError
from .media.checkpoint import PRECISIONS, resolve_dtype
from .wan.attention import ATTENTION_BACKENDS, resolve_backend

if TYPE_CHECKING:
    from .media.vae import WanVAE
    from .wan.dit import WanDiTCore

PRECISION_OF_DTYPE = {resolve_dtype(name): name for name in PRECISIONS}

# Under sequence parallelism graphs pay from 4 ranks on: there a rank's share of a layer is shorter
# than its launches, and the ranks wait on one another's launch jitter. On 2 the DiT is GPU-bound
# either way and the denser replay leaves rank 0's streaming decode less room to overlap
# (docs/performance.md has the measurements).
MIN_PARALLEL_RANKS = 4

OptionName = Callable[[str], str]  # an option's field name -> how the caller's user spells it


def node_input_name(field: str) -> str:
    """How the loader node names an option: its input, as the field."""
    return field


def cli_flag(field: str) -> str:
    """How a CLI names an option: ``fp8_matmul`` -> ``--fp8-matmul``."""
    return "--" + field.replace("_", "-")


@dataclass(frozen=True)
class RuntimeOptions:
    """How a model runs. ``compile`` None: on for a CUDA ``device`` (the DiT) / ``vae_device`` (the
    VAE), off elsewhere; True compiles on any device. ``cuda_graphs`` is used only when compiling
    (:func:`graphs_off_reason`). ``vae_device`` None: ``device``. ``fp8_weights`` and ``fp8_matmul``
    of a family that converts weights while loading (RealVideo 14B) are read by its loader;
    :meth:`apply` converts the rest."""

    precision: str = "bf16"
    attention: str = "sdpa"
    compile: bool | None = None
    cuda_graphs: bool = True
    fp8_weights: bool = False
    fp8_matmul: bool = False
    fp8_kv_cache: bool = False
    device: torch.device = torch.device("cpu")
    vae_device: torch.device | None = None

    def __post_init__(self) -> None:
        # Strings are accepted for the devices; kept as torch.device so equal options compare equal.
        object.__setattr__(self, "device", torch.device(self.device))
        if self.vae_device is not None:
            object.__setattr__(self, "vae_device", torch.device(self.vae_device))

    def validate(self, name: OptionName = node_input_name) -> RuntimeOptions:
        """Raise an :class:`~.errors.InputError` for options that cannot run, naming each option as
        ``name`` spells it (:func:`node_input_name`, :func:`cli_flag`); returns ``self``."""
        if self.precision not in PRECISIONS:
            raise InputError(f"{name('precision')} {self.precision!r} is not one of {', '.join(PRECISIONS)}.")
        if self.attention not in ATTENTION_BACKENDS:
            raise InputError(
                f"Unknown attention backend {self.attention!r}: use one of {', '.join(ATTENTION_BACKENDS)}."
            )
        if self.fp8_matmul and self.precision != "bf16":
            raise InputError(
                f"{name('fp8_matmul')} runs with bf16 activations, but {name('precision')} is {self.precision}: "
                f"set {name('precision')} to bf16, or turn {name('fp8_matmul')} off."
            )
        return self

    @property
    def dtype(self) -> torch.dtype:
        return resolve_dtype(self.precision)

    @property
    def dit_compiled(self) -> bool:
        """Whether :meth:`apply` compiles the DiT's blocks."""
        return self.compile if self.compile is not None else self.device.type == "cuda"

    @property
    def vae_compiled(self) -> bool:
        """Whether :meth:`apply` compiles the VAE's conv steps."""
        return self.compile if self.compile is not None else (self.vae_device or self.device).type == "cuda"

    @property
    def graphs_asked(self) -> bool:
        """CUDA graphs asked for and possible: they replay the compiled forwards."""
        return self.cuda_graphs and self.dit_compiled

    def on(self, device: torch.device | str, vae_device: torch.device | str | None = None) -> RuntimeOptions:
        """These options for a model run on ``device`` (a worker's GPU)."""
        return replace(self, device=torch.device(device), vae_device=vae_device)

    def cuda_graphs_reason(self, parallel_ranks: int = 1) -> str | None:
        """Why a run with these options (sequence parallel over ``parallel_ranks``) does not replay
        CUDA graphs, or None when it does: what a benchmark reports."""
        return graphs_off_reason(asked=self.graphs_asked, fp8_kv_cache=self.fp8_kv_cache,
                                 on_gpu=self.device.type == "cuda", parallel_ranks=parallel_ranks)

    def apply(self, dit: WanDiTCore | None, vae: WanVAE | None = None) -> None:
        """Set ``dit`` up for these options: its options (``dit.runtime``, attention backend resolved:
        flash / sage fall back to sdpa when not installed), fp8 matmuls for the block Linear layers
        its loader left in another form, and its blocks compiled; and compile ``vae``'s conv steps.
        Applying again may change what needs no recompiling (e.g. ``cuda_graphs``); a compiled DiT
        stays compiled."""
        if dit is not None:
            self._apply_to_dit(dit)
        if vae is not None and self.vae_compiled:
            from .runtime.compile import compile_vae

            compile_vae(vae)

    def _apply_to_dit(self, dit: WanDiTCore) -> None:
        from .runtime.compile import compile_blocks
        from .wan.fp8_linear import FP8MatmulLinear, use_fp8_matmuls

        was_compiled = dit.runtime.dit_compiled
        if was_compiled and not self.dit_compiled:
            raise ValueError("this DiT is compiled already: options that do not compile it need a fresh model")
        dit.runtime = replace(self, attention=resolve_backend(self.attention))
        if self.fp8_matmul:
            layers = [layer for layer in dit.heavy_linears().values() if not isinstance(layer, FP8MatmulLinear)]
            if layers:
                use_fp8_matmuls(layers, device=self.device)
        if self.dit_compiled and not was_compiled:
            compile_blocks(dit)


# What a model runs with until options are applied: kernel by kernel, sdpa, a full-precision cache.
EAGER = RuntimeOptions(compile=False)


def graphs_off_reason(*, asked: bool, fp8_kv_cache: bool, on_gpu: bool, parallel_ranks: int = 1) -> str | None:
    """Why a session runs kernel by kernel, or None to replay CUDA graphs: they need asking for (and a
    compiled DiT), a cache in the model's dtype (an fp8 cache composes its sink rotations on the
    host), one GPU or sequence parallel over :data:`MIN_PARALLEL_RANKS` or more, and a GPU."""
    if not asked:
        return "not asked for (cuda_graphs off, or the DiT not compiled)"
    if fp8_kv_cache:
        return "an fp8 KV cache composes its sink rotations on the host"
    if 1 < parallel_ranks < MIN_PARALLEL_RANKS:
        return f"sequence parallel over {parallel_ranks} GPUs: graphs pay from {MIN_PARALLEL_RANKS}"
    if not on_gpu:
        return "not on a GPU"
    return None


ALLOCATOR_VARIABLES = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")  # PyTorch's old and new names
EXPANDABLE_SEGMENTS = "expandable_segments:True"


def use_expandable_segments(fp8_kv_cache: bool) -> bool:
    """On the low-memory path (the fp8 KV cache), give PyTorch's CUDA allocator expandable segments,
    which do not fragment: on an 8 GB GPU the 1.3B with fp8 options ran out of memory with 1.6 GiB
    reserved but free in pieces, and fit with them (docs/performance.md, "Capped GPU memory"). Not
    where the user set allocator options. The fp8 KV cache runs without CUDA graphs, so graph pools
    never meet these segments. Returns whether it set them."""
    if not fp8_kv_cache or any(name in os.environ for name in ALLOCATOR_VARIABLES):
        return False
    os.environ[ALLOCATOR_VARIABLES[0]] = EXPANDABLE_SEGMENTS  # for worker processes started from here
    # This process: PyTorch may have read the variable already (when it loaded), so tell it directly.
    set_settings = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
    if set_settings is not None:
        set_settings(EXPANDABLE_SEGMENTS)
    elif torch.cuda.is_available():  # PyTorch before 2.9
        torch.cuda.memory._set_allocator_settings(EXPANDABLE_SEGMENTS)
    return True
