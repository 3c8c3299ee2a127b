"""The model-family interface: what each DiT the pack runs needs, behind one class.

A :class:`ModelFamily` is recognised by a tensor only its checkpoints hold (``marker``) and knows
everything that differs between families: how its DiT is loaded, which audio encoder fits it, how
audio and the reference image are prepared, how its blocks are sampled, and its prompts. The nodes
and the CLI ask a model's family; they never branch on which family it is.

Adding a family: subclass :class:`ModelFamily` in a module of its own and pass an instance to
:func:`~.families.register_family` (:mod:`.families` holds the registry). Plain
PyTorch: nothing here imports ComfyUI; ComfyUI's devices, progress and interrupts come in as
arguments and callbacks.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from .errors import InputError
from .media.text_encoder import TEXT_LEN, pad_to_text_len
from .media.timing import samples_for_duration
from .media.weights import WeightFile
from .runtime.denoise import StepHook
from .runtime.live_stream import LiveStream, LiveWindow
from .wan.kv_cache import CachePolicy

if TYPE_CHECKING:
    from .options import RuntimeOptions
    from .parallel.sequence_parallel import SequenceParallel
    from .parallel.worker_process import WorkerJob
    from .smoke import TinyWeights

Shapes = Mapping[str, tuple[int, ...]]

# What a DiT file holds (ModelFamily.checkpoint_kind): a whole model, or a fine-tune applied over a base.
COMPLETE, PARTIAL = "complete", "partial fine-tune over a base checkpoint"


def find_tensor(shapes: Shapes, suffix: str) -> tuple[int, ...] | None:
    """Shape of the tensor named ``suffix`` under any prefix (``model.``, ``wav2vec2.``, ...)."""
    for key, shape in shapes.items():
        if key == suffix or key.endswith("." + suffix):
            return shape
    return None


def check_encoder_features(given: int, expected: int, *, layers: int, hidden: int, encoder_name: str, model: str,
                           hint: str) -> None:
    """The one audio-encoder fit check: an InputError naming the encoder, the widths and the
    encoder to pick (``hint``) unless the encoder gives the ``expected`` features per frame."""
    if given != expected:
        raise InputError(
            f"The audio encoder {encoder_name} gives {given} features per frame ({layers} layers of width {hidden}), "
            f"but the {model} expects {expected}. Pick {hint} instead."
        )


def text_context(conditioning: list, text_dim: int, tokens: int = TEXT_LEN) -> torch.Tensor:
    """A text encoding as ComfyUI's CONDITIONING carries it -> the DiT's text context
    ``[1, tokens, text_dim]`` float32.

    ``conditioning[0][0]`` is the umT5 output ``[1, L, text_dim]``. Rows past ``L`` are zeros and
    the DiT attends to all ``tokens`` rows, as upstream zeroes the rows past the prompt length.
    """
    try:
        cond = conditioning[0][0]
    except (TypeError, IndexError, KeyError):
        raise InputError(
            "The conditioning input is empty. Connect CLIPTextEncode (with CLIPLoader type 'wan')."
        ) from None
    if not isinstance(cond, torch.Tensor) or cond.ndim != 3:
        raise InputError("The conditioning is not a text encoding [batch, tokens, width]. Use CLIPTextEncode.")
    if cond.shape[-1] != text_dim:
        raise InputError(
            f"The conditioning has width {cond.shape[-1]}, but the model expects {text_dim} (umT5-XXL). "
            "Load umt5_xxl_fp16.safetensors (or the fp8 one) with CLIPLoader, type 'wan'."
        )
    return pad_to_text_len(cond[:1, :tokens].float(), tokens)


def fit_waveform(waveform: torch.Tensor, duration: float | None) -> torch.Tensor:
    """Trim or pad (with silence) ``[N]`` 16 kHz audio to ``duration`` seconds (None: keep as is);
    refuses a duration that is not a positive number of seconds."""
    if duration is None:
        return waveform
    samples = samples_for_duration(duration)
    return F.pad(waveform, (0, samples - waveform.shape[0])) if samples > waveform.shape[0] else waveform[:samples]


@runtime_checkable
class RemoteSampler(Protocol):
    """A DiT that runs elsewhere (worker processes) and samples a family's blocks there:
    ``generate`` takes the family's sampler inputs and yields the same blocks (CPU)."""

    def generate(self, *, seed: int, **inputs: Any) -> Iterator[torch.Tensor]: ...


class ModelFamily:
    """A DiT the pack can run. Subclasses set the class attributes and implement the methods.

    ``marker``: a tensor only this family's checkpoints contain. ``audio_encoder_hint``: the
    wav2vec2 to pick. ``audio_encoder_dtype``: the dtype its audio encoder runs in (None: the
    loader's precision). ``fp8_and_partial_files``: whether :meth:`load` also takes ``base=``
    (the checkpoint a partial fine-tune is applied over), ``fp8_weights=`` and ``fp8_matmul=``.
    ``supports_sequence_parallel``: whether its DiT can run on several GPUs (``gpus`` > 1).
    ``audio_uses_dit``: whether :meth:`encode_audio` runs the DiT's weights (else only its dtype is
    read, and the DiT need not be on the GPU). ``conditioning_type``: what :meth:`encode_audio`
    returns, so audio encoded for another family is refused.
    """

    name: ClassVar[str]
    marker: ClassVar[str]
    audio_encoder_hint: ClassVar[str]
    conditioning_type: ClassVar[type]
    audio_encoder_dtype: ClassVar[torch.dtype | None] = None
    fp8_and_partial_files: ClassVar[bool] = False
    supports_sequence_parallel: ClassVar[bool] = False
    audio_uses_dit: ClassVar[bool] = True

    def __repr__(self) -> str:
        return f"<model family {self.name}>"

    # --- recognising and loading ---------------------------------------------------------------
    def matches(self, shapes: Shapes) -> bool:
        """Whether ``shapes`` (a checkpoint's tensors) are this family's."""
        return find_tensor(shapes, self.marker) is not None

    def checkpoint_kind(self, shapes: Shapes) -> str | None:
        """COMPLETE, PARTIAL (a fine-tune applied over a base checkpoint) or None (not this family's)."""
        return COMPLETE if self.matches(shapes) else None

    # base_name_mark: a word in the file names of checkpoints a partial fine-tune of this family can be
    # applied over, which offers a file whose tensors cannot be listed cheaply (a pickle) as a base.
    base_name_mark: ClassVar[str | None] = None

    def can_be_base(self, shapes: Shapes) -> bool:
        """Whether a checkpoint of ``shapes`` can be the base a partial fine-tune of this family is
        applied over: a complete checkpoint of a family that takes partial files."""
        return self.fp8_and_partial_files and self.checkpoint_kind(shapes) == COMPLETE

    def load(
        self, path: str | os.PathLike, dtype: torch.dtype, device: torch.device | str, **options: Any
    ) -> torch.nn.Module:
        """The DiT at ``path`` on ``device``; ``options`` as ``fp8_and_partial_files`` says."""
        raise NotImplementedError

    # --- the audio encoder ---------------------------------------------------------------------
    def audio_features(self, shapes: Shapes) -> int:
        """The audio-feature width per video frame the DiT with these weights expects."""
        raise NotImplementedError

    def encoder_features(self, layers: int, hidden: int) -> int:
        """The width a wav2vec2 of ``layers`` x ``hidden`` gives this family's audio pipeline."""
        raise NotImplementedError

    def check_audio_encoder(self, dit_shapes: Shapes, layers: int, hidden: int, encoder_name: str) -> None:
        """Refuse a wav2vec2 of ``layers`` x ``hidden`` whose features are not what the DiT with
        ``dit_shapes`` was trained on (from headers, before anything loads, or from loaded models)."""
        check_encoder_features(self.encoder_features(layers, hidden), self.audio_features(dit_shapes), layers=layers,
                               hidden=hidden, encoder_name=encoder_name, model=f"{self.name} model",
                               hint=self.audio_encoder_hint)

    # --- inputs --------------------------------------------------------------------------------
    def video_length(self, num_samples: int):
        """The :class:`~.audio.VideoLength` of ``num_samples`` of 16 kHz audio; refuses unusable
        audio (before any model loads)."""
        raise NotImplementedError

    def encode_audio(self, dit: Any, encoder: Any, waveform: torch.Tensor, output_device: torch.device | str) -> Any:
        """Mono 16 kHz speech ``[N]`` -> a ``conditioning_type`` (with ``length``, ``num_blocks``
        and ``num_video_frames``), its tensors on ``output_device``."""
        raise NotImplementedError

    def reference_pixels(self, image: torch.Tensor, width: int, height: int, crop: str,
                         device: torch.device | str) -> torch.Tensor:
        """A reference image ``[H, W, C]`` -> the pixels the VAE encodes, ``[1, 3, 1, h, w]`` in [-1, 1]."""
        raise NotImplementedError

    # --- sampling ------------------------------------------------------------------------------
    def text_dim(self, dit: Any) -> int:
        """The width of the DiT's text context."""
        raise NotImplementedError

    def sample_blocks(self, dit: Any, *, conditioning: list, idle_conditioning: list | None, reference: torch.Tensor,
                      audio: Any, seed: int, steps: int, cache_policy: CachePolicy,
                      on_step: StepHook | None = None, workspace: Any = None) -> Iterator[torch.Tensor]:
        """The video's clean latent blocks ``[1, 16, F_block, h, w]``, one at a time. Inputs are
        checked when this is called, not when the first block is asked for; closing the iterator
        frees the KV cache, unless it is ``workspace``'s (a :class:`~.runtime.workspace.Workspace`
        the caller keeps across runs, so the next run replays its CUDA graphs; a DiT on worker
        processes keeps its own there and ignores it)."""
        raise NotImplementedError

    # --- the command line (livetalk_core/cli.py) ---------------------------------------------------
    # talking_prompt: the prompt a video is sampled under (--prompt replaces it); idle_prompt: the one
    # a prefill runs under (None: none). default_steps / step_counts: the steps per block by default /
    # all it samples with (None: any). default_cache_policy: the KV cache asked for (None: its own).
    # reference_is_first_latent: block 0's first latent frame is the reference latent, decoded before
    # sampling. weight_files: its release files by role (dit, vae, wav2vec2), fetched into --models-dir
    # for a role not given. smoke_size: the --size of its tiny random model (--smoke).
    talking_prompt: ClassVar[str]
    idle_prompt: ClassVar[str | None] = None
    default_steps: ClassVar[int] = 4
    step_counts: ClassVar[tuple[int, ...] | None] = None
    default_cache_policy: ClassVar[CachePolicy | None] = None
    reference_is_first_latent: ClassVar[bool] = False
    weight_files: ClassVar[tuple[WeightFile, ...]] = ()
    smoke_size: ClassVar[str] = "64"

    @property
    def cli_name(self) -> str:
        """The word ``--model`` takes for this family: its name's first word, in lower case."""
        return self.name.split()[0].lower()

    def add_cli_arguments(self, group: argparse._ArgumentGroup) -> None:
        """Declare the command-line flags only this family has (none by default)."""

    def cli_load_options(self, dit: Path, args: argparse.Namespace) -> dict[str, Any]:
        """:meth:`load`'s keyword arguments that come from this family's own flags, for the DiT ``dit``."""
        return {}

    def encode_audio_for_duration(self, dit: Any, encoder: Any, waveform: torch.Tensor,
                                  output_device: torch.device | str, duration: float | None) -> Any:
        """:meth:`encode_audio` for a video of ``duration`` seconds (None: the audio's length): the
        audio trimmed to it, or padded with silence past its end."""
        return self.encode_audio(dit, encoder, fit_waveform(waveform, duration), output_device)

    def smoke_weights(self, folder: Path) -> TinyWeights:
        """Tiny random weights written into ``folder``, for ``--smoke``."""
        raise InputError(f"{self.name} has no tiny random weights for --smoke: give its model files instead.")

    def parallel_sampler(self, dit: Any, sp: SequenceParallel) -> RemoteSampler:
        """``dit`` sampling this rank's share of every block over the torchrun group ``sp`` (every rank
        gets the whole blocks); only for a family that ``supports_sequence_parallel``."""
        raise NotImplementedError

    def worker_job(self, path: str | os.PathLike, options: RuntimeOptions, **load_options: Any) -> WorkerJob:
        """What each process of a multi-GPU worker group (:class:`~.parallel.workers.WorkerGroup`)
        runs for the DiT at ``path``: a picklable loader (``options`` applied, ``load_options`` as
        :meth:`load` takes them) and the sharded sampler, which takes :meth:`sample_blocks`' inputs
        for a :class:`RemoteSampler`; only for a family that ``supports_sequence_parallel``."""
        raise NotImplementedError

    # --- live mode (livetalk_core/live/session.py) ---------------------------------------------------
    def open_live_stream(self, dit: Any, encoder: Any, *, conditioning: list, idle_conditioning: list | None,
                         reference: torch.Tensor, seed: int, steps: int | None, window: LiveWindow,
                         workspace: Any = None) -> LiveStream:
        """A live stream over the loaded ``dit`` and audio ``encoder``: blocks sampled one at a time
        from the audio that has arrived for each (:class:`~.runtime.live_stream.LiveStream`);
        ``reference`` is the VAE latent of :meth:`reference_pixels`, ``steps`` None: the family's
        choice for real time; ``workspace``: the :class:`~.runtime.workspace.Workspace` its sampler
        uses and keeps for the next stream (None: its own)."""
        raise InputError(f"{self.name} has no live mode.")
