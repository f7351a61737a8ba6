"""What the integrations share: the watch's options, checked when the callback is made."""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import Any

from torch import nn

from gradwatch.watching import Watch, WatchOptions, start


def require(module: str, extra: str, what: str) -> ModuleType:
    """Import an optional library, or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"{what} needs {module.split('.')[0]!r}, which is not installed: pip install 'gradwatch[{extra}]'"
        ) from exc


class WatchingCallback:
    """What the Lightning and Hugging Face callbacks share: the options, the watch, its path.

    Takes :func:`gradwatch.watch`'s keyword arguments (``every``,
    ``activations``, ``update_every``, ``budget``, ``store``, ``name``,
    ``overwrite``, ``temporal``, "auto" by default as for ``gw.watch``: an RNN
    cell called in a Python loop is followed through time, a fused ``nn.LSTM``
    only when asked),
    checked now rather than when training starts.
    """

    def __init__(self, **options: Any) -> None:
        self.options = WatchOptions.taken_by("GradwatchCallback", **options)
        self.watch: Watch | None = None
        self._measured = False  # gradients read in this step: the step is to be closed

    @property
    def path(self) -> Path | None:
        """The run directory (None before training starts, and on ranks other than 0)."""
        return self.watch.path if self.watch is not None else None

    def _start(self, model: nn.Module, optimizer: Any, scaler: Any, loop: str) -> Watch:
        if self.watch is not None and not self.watch.closed:
            raise RuntimeError(f"GradwatchCallback is already watching a run; use one callback per {loop}")
        self.watch = start(model, optimizer, self.options, scaler=scaler, driver="external")
        self._measured = False
        return self.watch
