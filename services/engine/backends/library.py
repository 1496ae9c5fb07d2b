"""Importing an engine's own library at start, with an error that says what to install.

Backends over external engines (TensorRT-LLM, MLX...) import their library only here, inside
``start()``, so the backend module itself imports anywhere and a missing library is reported as
one clear sentence naming the package instead of a traceback from deep inside an import.
"""

from __future__ import annotations

import importlib
from types import ModuleType


class EngineLibraryMissing(RuntimeError):
    """The engine's library is not installed (or fails to import) in this environment."""

    def __init__(self, engine: str, module: str, install: str, cause: BaseException) -> None:
        super().__init__(f"the {engine} engine needs the Python package {module!r}, which failed to import "
                         f"({type(cause).__name__}: {cause}); install it with: {install}")
        self.engine = engine
        self.module = module


def import_library(module: str, *, engine: str, install: str) -> ModuleType:
    """Import ``module`` for ``engine``; raise ``EngineLibraryMissing`` naming ``install`` if it cannot be."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise EngineLibraryMissing(engine, module, install, exc) from exc
