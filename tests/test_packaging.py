"""Registry packaging facts that need no ComfyUI: pyproject equals requirements.txt, nothing extra."""

import re
from importlib.metadata import requires
from pathlib import Path

import tomllib
from comfy_env import require_comfyui

REPO = Path(__file__).resolve().parents[1]


def names(lines) -> set[str]:
    out = set()
    for line in lines:
        line = line.split("#")[0].strip()
        if line:
            out.add(re.split(r"[<>=~!\[; ]", line, maxsplit=1)[0].lower().replace("_", "-"))
    return out


def test_pyproject_dependencies_equal_requirements_txt():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    requirements = (REPO / "requirements.txt").read_text().splitlines()
    assert sorted(project["project"]["dependencies"]) == sorted(r for r in requirements if r.strip())
    comfy = project["tool"]["comfy"]
    assert {"PublisherId", "DisplayName", "Icon", "requires-comfyui"} <= set(comfy)
    assert project["project"]["urls"]["Repository"]
    assert "torch" in names(requirements) and not any("==" in r for r in requirements if r.startswith("torch"))


def test_installing_the_pack_adds_nothing_comfyui_does_not_have():
    """Every requirement is in ComfyUI's own requirements.txt or installed by one of them."""
    comfy_requirements = names((require_comfyui() / "requirements.txt").read_text().splitlines())
    transitive = set(comfy_requirements)
    for dist in ("transformers",):
        transitive |= names(r for r in (requires(dist) or []) if "extra ==" not in r)
    ours = names((REPO / "requirements.txt").read_text().splitlines())
    assert ours <= transitive, ours - transitive
