"""Finding golden parity cases and comparing tensors with their tolerances.

Cases live under ``<repo>/../shared/golden/<family>/<case>/manifest.json`` (or under
``$LIVETALK_SHARED_DIR/golden``) and in every folder listed in ``LIVETALK_GOLDEN_DIRS``
(colon-separated; a listed folder may be a case itself or hold case folders).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    return Path(os.environ.get("LIVETALK_SHARED_DIR", REPO.parent / "shared"))


@dataclass(frozen=True)
class GoldenCase:
    path: Path
    manifest: dict

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def model(self) -> str:
        return self.manifest.get("model", "")

    @property
    def dtype(self) -> torch.dtype:
        """The run dtype the case was recorded in (its manifest's ``dtype``)."""
        return {"float32": torch.float32, "bfloat16": torch.bfloat16}[self.manifest["dtype"]]

    def file(self, relative: str) -> Path:
        return (self.path / relative).resolve()

    def load(self, name: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.path / name))


def _cases_under(folder: Path) -> list[Path]:
    if (folder / "manifest.json").is_file():
        return [folder]
    return sorted(p.parent for p in folder.glob("*/manifest.json")) + sorted(
        p.parent for p in folder.glob("*/*/manifest.json")
    )


def golden_cases(model_prefix: str) -> list[GoldenCase]:
    """All cases whose manifest ``model`` starts with ``model_prefix``, public and extra."""
    folders = [shared_dir() / "golden"]
    folders += [Path(p) for p in os.environ.get("LIVETALK_GOLDEN_DIRS", "").split(":") if p]
    seen: dict[Path, GoldenCase] = {}
    for folder in folders:
        for case_dir in _cases_under(folder):
            manifest = json.loads((case_dir / "manifest.json").read_text())
            if str(manifest.get("model", "")).startswith(model_prefix):
                seen.setdefault(case_dir.resolve(), GoldenCase(case_dir, manifest))
    return sorted(seen.values(), key=lambda c: (c.name, str(c.path)))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rel_l2: float, name: str) -> None:
    """max|a-b| <= atol and ||a-b||/||b|| <= rel_l2, in float64 (the golden READMEs' metric)."""
    assert tuple(actual.shape) == tuple(expected.shape), f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().to("cpu", torch.float64)
    b = expected.detach().to("cpu", torch.float64)
    diff = a - b
    max_abs = diff.abs().max().item() if diff.numel() else 0.0
    norm = b.norm().item()
    rel = diff.norm().item() / norm if norm > 0 else diff.norm().item()
    assert max_abs <= atol and rel <= rel_l2, (
        f"{name}: max|d|={max_abs:.3g} (atol {atol:.3g}), rel_l2={rel:.3g} (limit {rel_l2:.3g})"
    )


def assert_frames_close(actual: torch.Tensor, expected: torch.Tensor, tol: dict, *, name: str = "frames_uint8") -> None:
    """uint8 frame comparison with either the fp32 rule (max/fraction) or the bf16 rule (PSNR/mean/p99)."""
    assert tuple(actual.shape) == tuple(expected.shape), f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    d = (actual.to(torch.int16) - expected.to(torch.int16)).abs().to(torch.float64)
    if "max_abs" in tol:
        frac = (d > 0).double().mean().item()
        assert d.max().item() <= tol["max_abs"], f"{name}: max|d|={d.max().item()} > {tol['max_abs']}"
        assert frac <= tol["max_fraction_differing"], f"{name}: {frac:.3%} of values differ"
    else:
        mse = (d**2).mean().item()
        psnr = float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(255.0**2 / mse)).item()
        p99 = torch.quantile(d.flatten()[:: max(1, d.numel() // 2_000_000)], 0.99).item()
        assert psnr >= tol["min_psnr_db"], f"{name}: PSNR {psnr:.2f} dB < {tol['min_psnr_db']}"
        assert d.mean().item() <= tol["max_mean_abs"], f"{name}: mean|d|={d.mean().item():.3f}"
        assert p99 <= tol["max_p99_abs"], f"{name}: p99|d|={p99}"


def tolerance(case: GoldenCase, tensor_name: str) -> dict:
    """The recommended tolerance entry of a LiveTalk case for ``tensor_name``."""
    rec = case.manifest["tolerance"]["recommended"]
    if tensor_name in rec:
        return rec[tensor_name]
    for key, value in rec.items():
        if isinstance(value, dict) and any(
            _matches(tensor_name, pattern.strip()) for pattern in key.split(",")
        ):
            return value
    raise KeyError(f"{case.name}: no recommended tolerance for {tensor_name}")


def _matches(name: str, pattern: str) -> bool:
    from fnmatch import fnmatchcase

    return fnmatchcase(name, pattern)
