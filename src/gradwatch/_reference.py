"""``FILE.py:NAME`` and ``package.module:NAME`` references: a function named by text, importable in any process.

The CLI names a model factory or a set-up this way, and the doctor ships a
set-up to its worker processes as such a reference (a function defined in a
user's script or notebook pickles by a name the workers cannot import). A
file is imported once per process, under a private module name derived from
its absolute path (never its stem, which may shadow a real module).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

def normalise(spec: str) -> str:
    """``spec`` with a file's path made absolute, so that a worker with another working directory finds it."""
    module_name, _, attr = spec.rpartition(":")
    if module_name.endswith(".py") or Path(module_name).exists():
        return f"{Path(module_name).resolve()}:{attr}"
    return spec


def load(spec: str, noun: str = "function") -> Any:
    """The object ``spec`` names (a ``noun``); ValueError (or the user module's ImportError) in one line when it cannot."""
    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr:
        raise ValueError(f"expects MODULE:{noun.upper()} (a file or module, a colon, a function), got {spec!r}")
    if module_name.endswith(".py") or Path(module_name).exists():
        path = Path(module_name).resolve()
        if not path.is_file():
            raise ValueError(f"no such file: {module_name}")
        private = f"_gradwatch_file_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:10]}"
        module = sys.modules.get(private)
        if module is None:
            found = importlib.util.spec_from_file_location(private, path)
            assert found is not None and found.loader is not None
            module = importlib.util.module_from_spec(found)
            sys.modules[private] = module  # dataclasses and pickle look a class's module up here
            try:
                found.loader.exec_module(module)
            except BaseException:
                del sys.modules[private]
                raise
    else:
        module = importlib.import_module(module_name)
    if not hasattr(module, attr):
        raise ValueError(f"{module_name} has no {noun} {attr!r}")
    return getattr(module, attr)
