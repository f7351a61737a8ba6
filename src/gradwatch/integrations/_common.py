"""What the integrations share: the watch's options, checked when the callback is made."""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import Any

from torch import nn

from gradwatch._errors import bad_argument
from gradwatch.schedules import Schedule
from gradwatch.watch import _NAME, Watch, _make_watch, _schedule


def require(module: str, extra: str, what: str) -> ModuleType:
    """Import an optional library, or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"{what} needs {module.split('.')[0]!r}, which is not installed: pip install 'gradwatch[{extra}]'"
        ) from exc


class WatchOptions:
    """``gw.watch``'s keyword arguments, checked now rather than when training starts."""

    def __init__(
        self,
        caller: str,
        every: int | Schedule,
        activations: bool | int | Schedule,
        update_every: bool | int | Schedule,
        store: str | Path | None,
        name: str | None,
        overwrite: bool,
        temporal: bool | list[str],
    ) -> None:
        _schedule("every", every, None, allow_off=False, caller=caller)
        _schedule("activations", activations, None, allow_off=True, caller=caller)
        _schedule("update_every", update_every, None, allow_off=True, caller=caller)
        if store is not None and not isinstance(store, (str, Path)):
            raise TypeError(bad_argument(caller, "store", "a directory path (str or Path) or None", store))
        if name is not None and (not isinstance(name, str) or not _NAME.match(name)):
            raise ValueError(bad_argument(caller, "name", "a run name of letters, digits, '.', '_' or '-'", name))
        if not isinstance(overwrite, bool):
            raise TypeError(bad_argument(caller, "overwrite", "True or False", overwrite))
        self.caller = caller
        self.kwargs: dict[str, Any] = dict(every=every, activations=activations, update_every=update_every,
                                           store=store, name=name, overwrite=overwrite, temporal=temporal)

    def start(self, model: nn.Module, optimizer: Any, scaler: Any = None) -> Watch:
        """The watch, driven by the integration's callbacks rather than the optimizer's hooks."""
        return _make_watch(model, optimizer, scaler=scaler, driver="external", caller=self.caller, **self.kwargs)


class WatchingCallback:
    """What the Lightning and Hugging Face callbacks share: the options, the watch, its path."""

    def __init__(
        self,
        *,
        every: int | Schedule = 1,
        activations: bool | int | Schedule = True,
        update_every: bool | int | Schedule = True,
        store: str | Path | None = None,
        name: str | None = None,
        overwrite: bool = False,
        temporal: bool | list[str] = False,
    ) -> None:
        self._options = WatchOptions("GradwatchCallback", every, activations, update_every, store, name,
                                     overwrite, temporal)
        self.watch: Watch | None = None
        self._measured = False  # gradients read in this step: the step is to be closed

    @property
    def path(self) -> Path | None:
        """The run directory (None before training starts, and on ranks other than 0)."""
        return self.watch.path if self.watch is not None else None

    def _start(self, model: nn.Module, optimizer: Any, scaler: Any, loop: str) -> Watch:
        if self.watch is not None and not self.watch.closed:
            raise RuntimeError(f"GradwatchCallback is already watching a run; use one callback per {loop}")
        self.watch = self._options.start(model, optimizer, scaler)
        self._measured = False
        return self.watch
