"""The watch's options, checked once: one object for ``gw.watch`` and for every framework's callback."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from gradwatch._errors import bad_argument
from gradwatch.schedules import DEFAULT_SAMPLED, Schedule
from gradwatch.schedules import every as every_nth

RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def parse_schedule(caller: str, arg: str, value: Any, default: Schedule | None, allow_off: bool) -> Schedule | None:
    """An int ``n`` as :class:`~gradwatch.schedules.every`, a callable as it is, True/False as ``default``/None."""
    expected = "a positive int or a callable step -> bool" + (", or True/False" if allow_off else "")
    if isinstance(value, bool):
        if not allow_off:
            raise TypeError(bad_argument(caller, arg, expected, value))
        return default if value else None
    if isinstance(value, int):
        if value < 1:
            raise ValueError(bad_argument(caller, arg, expected, value))
        return every_nth(value)
    if callable(value):
        return value
    raise TypeError(bad_argument(caller, arg, expected, value))


@dataclass(frozen=True)
class WatchOptions:
    """:func:`gradwatch.watch`'s keyword arguments, checked when made (see its docstring for each).

    A callback takes them when it is made and checks them then, not when
    training starts; ``caller`` names it in error messages.
    """

    every: int | Schedule = 1
    activations: bool | int | Schedule = True
    update_every: bool | int | Schedule = True
    store: str | Path | None = None
    name: str | None = None
    overwrite: bool = False
    temporal: bool | str | list[str] = "auto"
    caller: str = "watch"
    # The schedules, parsed: gradient statistics, the sampled (forward-side) probes, update ratios.
    grad_schedule: Schedule = field(init=False, repr=False, compare=False)
    sampled_schedule: Schedule | None = field(init=False, repr=False, compare=False)
    update_schedule: Schedule | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        caller = self.caller
        grads = parse_schedule(caller, "every", self.every, None, allow_off=False)
        sampled = parse_schedule(caller, "activations", self.activations, DEFAULT_SAMPLED, allow_off=True)
        update = parse_schedule(caller, "update_every", self.update_every, DEFAULT_SAMPLED, allow_off=True)
        if self.store is not None and not isinstance(self.store, (str, Path)):
            raise TypeError(bad_argument(caller, "store", "a directory path (str or Path) or None", self.store))
        if self.name is not None and (not isinstance(self.name, str) or not RUN_NAME.match(self.name)):
            raise ValueError(bad_argument(caller, "name", "a run name of letters, digits, '.', '_' or '-'", self.name))
        if not isinstance(self.overwrite, bool):
            raise TypeError(bad_argument(caller, "overwrite", "True or False", self.overwrite))
        if self.temporal is not False and not self.temporal_auto and sampled is None:
            raise ValueError(f"`{caller}(temporal=…)` rides the activations schedule: pass activations=True or an int, "
                             f"not False")
        object.__setattr__(self, "grad_schedule", grads)
        object.__setattr__(self, "sampled_schedule", sampled)
        object.__setattr__(self, "update_schedule", update)

    @classmethod
    def taken_by(cls, caller: str, **given: Any) -> WatchOptions:
        """The options a callback named ``caller`` was given: ``WatchOptions.taken_by("MyCallback", every=5)``."""
        known = [f.name for f in fields(cls) if f.init and f.name != "caller"]
        for key in given:
            if key not in known:
                raise TypeError(f"`{caller}()` got an unexpected keyword argument {key!r}; it takes "
                                f"gradwatch.watch's: {', '.join(known)}")
        return cls(**given, caller=caller)

    @property
    def temporal_auto(self) -> bool:
        """``temporal="auto"``: follow the cells that one forward pass calls more than once."""
        return isinstance(self.temporal, str) and self.temporal == "auto"

    @property
    def temporal_modules(self) -> bool | str | list[str]:
        """What to follow through time: "auto" rides the activations schedule, off with it."""
        return False if self.temporal_auto and self.sampled_schedule is None else self.temporal

    @property
    def root(self) -> Path:
        """The directory that holds the runs."""
        return Path("runs") if self.store is None else Path(self.store)

    @property
    def updates_need_optimizer(self) -> bool:
        """``update_every`` was set to a schedule (not left on or off), which needs an optimizer to measure across."""
        return not isinstance(self.update_every, bool)
