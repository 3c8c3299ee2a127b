"""Where the real weights come from, and fetching only the files a run needs.

The CLI keeps them under one folder (default ``~/.cache/livetalk``, or ``--models-dir``) laid out as
``<folder>/<repo name>/<file>``; the ComfyUI nodes keep them under ComfyUI's model folders with the
names Comfy-Org's workflows use (:func:`fetch_files` takes any target path). Files already there are
used as they are. Missing files are fetched with ``huggingface_hub`` (resumable, with a progress bar)
unless downloads are off (``--skip-download`` or ``HF_HUB_OFFLINE=1``); then, or when the hub cannot
be reached, the error lists exactly which files to put where.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import MissingWeightsError

# Seconds to wait for the hub to answer before a download is started (see ensure_files).
HUB_PROBE_TIMEOUT_S = 5.0
DEFAULT_MODELS_DIR = Path(os.environ.get("LIVETALK_MODELS_DIR", Path.home() / ".cache" / "livetalk"))


@dataclass(frozen=True)
class WeightFile:
    repo_id: str
    filename: str
    role: str

    def local_path(self, models_dir: Path) -> Path:
        return models_dir / self.repo_id.split("/")[-1] / self.filename

    def url(self) -> str:
        return f"https://huggingface.co/{self.repo_id}/resolve/main/{self.filename}"


WAN_T2V = "Wan-AI/Wan2.1-T2V-1.3B"
WAV2VEC2_BASE = "facebook/wav2vec2-base-960h"
LIVETALK_REPO = "GAIR/LiveTalk-1.3B-V0.1"
TOKENIZER_FILES = ("spiece.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

WAN_VAE_FILE = WeightFile(WAN_T2V, "Wan2.1_VAE.pth", "vae")  # the 16-channel VAE both families decode with
LIVETALK_FILES: tuple[WeightFile, ...] = (
    WeightFile(LIVETALK_REPO, "model.safetensors", "dit"),
    WAN_VAE_FILE,
    WeightFile(WAV2VEC2_BASE, "config.json", "wav2vec2"),
    WeightFile(WAV2VEC2_BASE, "preprocessor_config.json", "wav2vec2"),
    WeightFile(WAV2VEC2_BASE, "model.safetensors", "wav2vec2"),
)
TEXT_ENCODER_FILES: tuple[WeightFile, ...] = (
    WeightFile(WAN_T2V, "models_t5_umt5-xxl-enc-bf16.pth", "t5"),
    *(WeightFile(WAN_T2V, f"google/umt5-xxl/{name}", "tokenizer") for name in TOKENIZER_FILES),
)


@dataclass(frozen=True)
class LiveTalkWeightPaths:
    dit: Path
    vae: Path
    wav2vec2: Path
    text_encoder: Path
    tokenizer: Path


def weight_paths(models_dir: Path) -> LiveTalkWeightPaths:
    by_role = {f.role: f.local_path(models_dir) for f in LIVETALK_FILES + TEXT_ENCODER_FILES}
    return LiveTalkWeightPaths(
        dit=by_role["dit"],
        vae=by_role["vae"],
        wav2vec2=by_role["wav2vec2"].parent,
        text_encoder=by_role["t5"],
        tokenizer=by_role["tokenizer"].parent,
    )


def downloads_disabled() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _missing_message(targets: Sequence[tuple[WeightFile, Path]], reason: str, retry: str) -> str:
    lines = [f"{reason} These model files are missing; put each one at the path shown:"]
    for f, path in targets:
        lines.append(f"  {path}\n      from {f.url()}")
    lines.append(retry)
    return "\n".join(lines)


def ensure_files(files: tuple[WeightFile, ...], models_dir: Path, *, download: bool = True) -> None:
    """Make sure every file exists under ``models_dir``, downloading missing ones if allowed (:func:`fetch_files`)."""
    targets = [(f, f.local_path(models_dir)) for f in files]
    retry = (
        "(or run again with network access and without --skip-download / HF_HUB_OFFLINE "
        f"to fetch them into {models_dir})"
    )
    fetch_files(targets, download=download, retry=retry)


def hub_unreachable_reason(timeout_s: float = HUB_PROBE_TIMEOUT_S) -> str | None:
    """None when the Hugging Face endpoint (``HF_ENDPOINT``, default huggingface.co) answers an HTTP
    request, else a sentence saying that it cannot be reached and why. Proxies set in the environment
    are used, as huggingface_hub uses them."""
    import urllib.error
    import urllib.request

    from huggingface_hub import constants

    try:
        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return None  # it answered, if only with an error status: downloads can be tried
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        return f"The Hugging Face hub ({constants.ENDPOINT}) cannot be reached ({reason}), so nothing was downloaded."
    return None


def fetch_files(targets: Sequence[tuple[WeightFile, Path]], *, download: bool = True, retry: str) -> None:
    """Make sure each target path exists, downloading its file from the hub to exactly that path if allowed.

    Before the first download the hub is asked once, with a short timeout, whether it answers: without
    a network ``huggingface_hub`` retries each request for about 25 s before giving up.

    Raises:
        MissingWeightsError: one message listing every file still missing and where it goes, ending
            with ``retry`` (how to let the download happen).
    """
    missing = [(f, path) for f, path in targets if not path.is_file()]
    if not missing:
        return
    if not download or downloads_disabled():
        raise MissingWeightsError(_missing_message(missing, "Downloads are turned off.", retry))
    unreachable = hub_unreachable_reason()
    if unreachable is not None:
        raise MissingWeightsError(_missing_message(missing, unreachable, retry))
    for f, path in missing:
        try:
            download_to(f, path)
        except Exception as exc:  # network, auth, disk: all end in the same actionable message
            still = [(g, p) for g, p in missing if not p.is_file()]
            reason = f"Downloading {f.filename} from {f.repo_id} failed ({type(exc).__name__}: {exc})."
            raise MissingWeightsError(_missing_message(still, reason, retry)) from None


def download_to(f: WeightFile, path: Path) -> None:
    """Fetch ``f`` to ``path``. Where ``path`` is not ``<folder>/<f.filename>`` (another name, or the
    repository's subfolders dropped), the download goes through a hidden folder next to it, where an
    interrupted download also resumes, and is then moved into place."""
    from huggingface_hub import hf_hub_download

    if path.as_posix().endswith("/" + f.filename):
        hf_hub_download(f.repo_id, f.filename, local_dir=path.as_posix()[: -len(f.filename)])
        return
    staging = path.parent / f".{path.name}.download"
    fetched = hf_hub_download(f.repo_id, f.filename, local_dir=staging)
    os.replace(fetched, path)
    shutil.rmtree(staging, ignore_errors=True)
