"""The layers of livetalk_core and nodes, checked on the import graph (read with ``ast``, nothing imported).

Dependencies point one way: nodes -> the families (livetalk/, realvideo/, families.py) -> the shared
layers (wan/, runtime/, media/, parallel/); no cycle; the core never imports ComfyUI; the nodes
never name a family (they ask the model's family, so a new family needs no change there).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("livetalk_core", "nodes")
SHARED_LAYERS = ("livetalk_core.wan", "livetalk_core.runtime", "livetalk_core.media", "livetalk_core.parallel")
FAMILY_PACKAGES = ("livetalk_core.livetalk", "livetalk_core.realvideo")
# What a shared layer must not import: the families, the registry and the CLI sit above it.
ABOVE_SHARED = (*FAMILY_PACKAGES, "livetalk_core.families", "livetalk_core.cli")
COMFY_MODULES = ("comfy", "comfy_api", "comfy_extras", "folder_paths", "nodes", "server", "execution")
# Names that belong to one family; nodes/ reach a family only through the registry and the interface.
FAMILY_NAMES = (
    "REALVIDEO_14B", "LIVETALK_13B", "S2VDiT", "LiveTalkDiT", "RealVideoFamily", "LiveTalkFamily", "RealVideoAudio",
    "realvideo.", "livetalk.family", "livetalk.model", "livetalk.sampler", "livetalk.pipeline", "WAV2VEC2_BASE_HINT",
    "WAV2VEC2_LARGE_HINT", "REALVIDEO_IDLE_PROMPT", "REALVIDEO_TALKING_PROMPT", "LIVETALK_CACHE", "LIVETALK_STEPS",
    "s2v_checkpoint_kind", "load_s2v_dit", "load_livetalk_dit", "sample_realvideo", "sample_livetalk",
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_files() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((REPO / package).rglob("*.py"))}


def runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node of ``tree`` except those under ``if TYPE_CHECKING:`` (annotations only: such an
    import never runs, so it makes no dependency at run time)."""
    found, todo = [], [tree]
    while todo:
        node = todo.pop()
        found.append(node)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))
    return found


def imported_names(module: str, path: Path) -> set[str]:
    """Every module ``module`` imports (at any depth in the file, also inside functions: a lazy
    import is still a dependency), relative imports resolved; for ``from x import y`` both ``x`` and
    ``x.y`` (y may be a submodule)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in runtime_nodes(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            names.add(origin)
            names.update(f"{origin}.{alias.name}" for alias in node.names)
    return names


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules of livetalk_core and nodes it imports (submodule references mapped to
    the module file they name; a package import to its ``__init__``)."""
    files = source_files()
    graph = {}
    for module, path in files.items():
        graph[module] = {name for name in imported_names(module, path) if name in files and name != module}
    return graph


def all_imports() -> dict[str, set[str]]:
    return {module: imported_names(module, path) for module, path in source_files().items()}


def within(name: str, packages: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_checker_reads_relative_imports_and_finds_cycles():
    """The graph sees what the files import (so the rules below can fail)."""
    graph = import_graph()
    assert "livetalk_core.wan.dit" in graph["livetalk_core.realvideo.model"]
    assert "livetalk_core.families" in graph["nodes.loader"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    typed_only = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import x\nelse:\n    import y\n")
    assert {n.names[0].name for n in runtime_nodes(typed_only) if isinstance(n, ast.Import)} == {"y"}


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("layer", SHARED_LAYERS)
def test_shared_layers_do_not_import_families_registry_or_cli(layer):
    wrong = {
        module: sorted(n for n in names if within(n, ABOVE_SHARED))
        for module, names in all_imports().items()
        if within(module, [layer])
    }
    assert not {m: n for m, n in wrong.items() if n}, wrong


def test_the_families_do_not_import_each_other():
    imports = all_imports()
    for family in FAMILY_PACKAGES:
        others = [p for p in FAMILY_PACKAGES if p != family]
        wrong = {
            module: sorted(n for n in names if within(n, others))
            for module, names in imports.items()
            if within(module, [family])
        }
        assert not {m: n for m, n in wrong.items() if n}, wrong


def test_the_core_never_imports_comfyui():
    wrong = {
        module: sorted(n for n in names if within(n, COMFY_MODULES))
        for module, names in all_imports().items()
        if within(module, ["livetalk_core"])
    }
    assert not {m: n for m, n in wrong.items() if n}, wrong


def test_nodes_name_no_family():
    pattern = re.compile("|".join(r"\b" + re.escape(name) for name in FAMILY_NAMES))
    found = [
        f"{path.relative_to(REPO)}:{number}: {line.strip()}"
        for path in sorted((REPO / "nodes").rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not found, "\n".join(found)


MAX_FUNCTION_LINES = 80
# A time, a speed-up or a throughput: measurements, which belong in docs/performance.md only.
MEASURED = re.compile(r"\b\d+(\.\d+)? ?(ms|us|µs)\b|\b\d+(\.\d+)? ?x (faster|slower)|TFLOP|\b\d+(\.\d+)? ?FPS\b"
                      r"|\b\d+ ?% (faster|slower)")


def python_files() -> list[Path]:
    return [path for package in PACKAGES for path in sorted((REPO / package).rglob("*.py"))]


def test_no_function_over_80_lines():
    long = [
        f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path in python_files()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, "\n".join(long)


def test_no_measured_numbers_in_code_comments_or_tooltips():
    assert MEASURED.search("226 -> 181 ms per block") and MEASURED.search("2.5x slower")
    found = [
        f"{path.relative_to(REPO)}:{number}: {line.strip()}"
        for path in python_files()
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if MEASURED.search(line)
    ]
    assert not found, "\n".join(found)


def literal_constants(path: Path) -> dict[str, object]:
    """The module-level UPPER_CASE names of ``path`` bound to a literal (number, text, tuple of them)."""
    found = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name.isupper() and not name.startswith("_"):
                try:
                    found[name] = ast.literal_eval(node.value)
                except ValueError:
                    continue
    return found


def test_each_constant_is_defined_once():
    """No name bound to the same value in two modules of the core (import it from where it lives)."""
    where: dict[tuple[str, str], list[str]] = {}
    for path in sorted((REPO / "livetalk_core").rglob("*.py")):
        for name, value in literal_constants(path).items():
            where.setdefault((name, repr(value)), []).append(str(path.relative_to(REPO)))
    twice = {key: paths for key, paths in where.items() if len(paths) > 1}
    assert not twice, twice
