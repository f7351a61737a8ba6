"""The watch's options, checked once: one object for ``gw.watch`` and for every framework's callback."""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from gradwatch._errors import bad_argument
from gradwatch.schedules import Schedule
from gradwatch.schedules import every as every_nth
from gradwatch.watching.budget import BUDGETED, Given

BUDGET_EXPECTED = "a fraction of the step time in (0, 1] (0.02: 2 %), or None to turn budgeting off"
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


DEFAULT_BUDGET = 0.02  # watching may cost 2 % of the step time unless the user says otherwise
FLIGHT_STEPS = 64  # flight=True: the steps kept before an event (OLMo's monitor looks back 128, llm-foundry 100)
FLIGHT_LEAST = 16  # the recorder's trigger needs a median of 8 steps (its warm-up) before it tests anything


def parse_schedule(caller: str, arg: str, value: Any, allow_off: bool) -> Given:
    """An int ``n`` as :class:`~gradwatch.schedules.every`, a callable as it is; True: left to the budget; False: off."""
    expected = "a positive int or a callable step -> bool" + (", or True/False" if allow_off else "")
    if isinstance(value, bool):
        if not allow_off:
            raise TypeError(bad_argument(caller, arg, expected, value))
        return BUDGETED if value else None
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

    every: int | Schedule | None = None
    activations: bool | int | Schedule = True
    update_every: bool | int | Schedule = True
    budget: float | None = DEFAULT_BUDGET
    store: str | Path | None = None
    name: str | None = None
    overwrite: bool = False
    temporal: bool | str | list[str] = "auto"
    attention: bool | int | Schedule = True
    flight: bool | int | str = "auto"
    caller: str = "watch"
    # The schedules, parsed: gradient statistics, the sampled (forward-side) probes, update ratios; each a
    # schedule of the user's, BUDGETED (left to the budget, or the default with budget=None), or None (off).
    grad_schedule: Given = field(init=False, repr=False, compare=False)
    sampled_schedule: Given = field(init=False, repr=False, compare=False)
    update_schedule: Given = field(init=False, repr=False, compare=False)
    attention_schedule: Given = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        caller = self.caller
        # None (the default): left to the budget, which keeps them on every step early on and at least every 8th
        grads = BUDGETED if self.every is None else parse_schedule(caller, "every", self.every, allow_off=False)
        sampled = parse_schedule(caller, "activations", self.activations, allow_off=True)
        update = parse_schedule(caller, "update_every", self.update_every, allow_off=True)
        attention = parse_schedule(caller, "attention", self.attention, allow_off=True)
        f = self.flight
        if not (isinstance(f, bool) or (isinstance(f, str) and f == "auto")) and (not isinstance(f, int) or f < FLIGHT_LEAST):
            raise (ValueError if isinstance(f, (int, str)) else TypeError)(bad_argument(
                caller, "flight", f"'auto', True/False, or the steps to keep before an event (an int ≥ {FLIGHT_LEAST})", f))
        b = self.budget
        if b is not None and (not isinstance(b, numbers.Real) or isinstance(b, bool)):
            raise TypeError(bad_argument(caller, "budget", BUDGET_EXPECTED, b))
        if b is not None and not (math.isfinite(float(b)) and 0 < float(b) <= 1):
            raise ValueError(bad_argument(caller, "budget", BUDGET_EXPECTED, b))
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
        object.__setattr__(self, "attention_schedule", attention)
        if b is not None:
            object.__setattr__(self, "budget", float(b))

    def given(self, with_optimizer: bool = True) -> dict[str, Given]:
        """Each family's schedule as given (:data:`gradwatch.watching.budget.FAMILIES`); the forward-side
        families ride ``activations``, temporal only where there is something to follow."""
        sampled = self.sampled_schedule
        return {"grads": self.grad_schedule, "backprop": sampled, "activations": sampled, "temporal": sampled,
                "attention": self.attention_schedule, "updates": self.update_schedule if with_optimizer else None}

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

    def flight_steps(self, has_attention: bool) -> int:
        """The flight recorder's capacity in steps (0: off); "auto" turns it on for models with attention."""
        if isinstance(self.flight, str):
            return FLIGHT_STEPS if has_attention else 0
        return 0 if self.flight is False else FLIGHT_STEPS if self.flight is True else int(self.flight)

    @property
    def root(self) -> Path:
        """The directory that holds the runs."""
        return Path("runs") if self.store is None else Path(self.store)

    @property
    def updates_need_optimizer(self) -> bool:
        """``update_every`` was set to a schedule (not left on or off), which needs an optimizer to measure across."""
        return not isinstance(self.update_every, bool)
