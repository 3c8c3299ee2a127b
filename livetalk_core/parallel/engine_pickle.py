"""Pickling between processes that import this engine under different package names.

ComfyUI imports a custom node pack under a module name made from its folder path, which no other
process can import; a worker process imports the engine as the top-level package ``livetalk_core``
from this checkout. :func:`dumps` pickles references to the engine's modules, classes and functions
under the name the receiving process imports the engine by; plain :func:`pickle.loads` reads them.
"""

from __future__ import annotations

import functools
import importlib
import io
import pickle
import sys
import types
from pathlib import Path
from typing import Any

ENGINE_DIR = Path(__file__).resolve().parents[1]
ENGINE_ROOT = ENGINE_DIR.parent  # what a worker puts first on sys.path
WORKER_PACKAGE = ENGINE_DIR.name  # the name a worker imports the engine by
ENGINE_PACKAGE = __package__.rpartition(".")[0]  # the name this process imported the engine by


def engine_module(module: str, package: str) -> str:
    """The name of this process's engine module ``module`` in a process that imports the engine as ``package``."""
    return package + module[len(ENGINE_PACKAGE):]


class _EnginePickler(pickle.Pickler):
    """Pickles references to this engine's modules, classes and functions under the package name
    ``target``; everything else as usual."""

    def __init__(self, file: io.BytesIO, target: str) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.target = target

    def _renamed(self, module: str) -> str | None:
        if module == ENGINE_PACKAGE or module.startswith(ENGINE_PACKAGE + "."):
            return engine_module(module, self.target)
        return None

    def reducer_override(self, obj: Any) -> Any:
        if self.target == ENGINE_PACKAGE:
            return NotImplemented
        if isinstance(obj, types.ModuleType):
            renamed = self._renamed(obj.__name__)
            return NotImplemented if renamed is None else (importlib.import_module, (renamed,))
        if isinstance(obj, (type, types.FunctionType)) and self._renamed(obj.__module__) is not None:
            # The module object itself goes through the branch above.
            return functools.reduce, (getattr, obj.__qualname__.split("."), sys.modules[obj.__module__])
        return NotImplemented


def dumps(obj: Any, target: str) -> bytes:
    """``obj`` pickled for a process that imports the engine as the package ``target``."""
    buffer = io.BytesIO()
    _EnginePickler(buffer, target).dump(obj)
    return buffer.getvalue()
