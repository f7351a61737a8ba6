"""Schedules: plain callables ``step -> bool`` saying on which steps to record.

Steps count from 0. An int ``n`` given to :func:`gradwatch.watch` means
:func:`every` ``(n)``. :data:`BUDGET_FLOOR` is the sparsest schedule the
watch's budget ever gives a family (:mod:`gradwatch.watching.budget`): pass
it yourself for the budget's worst case with records that are the same run
after run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

Schedule = Callable[[int], bool]


@dataclass(frozen=True)
class every:
    """Record on steps 0, n, 2n, …"""

    n: int

    def __post_init__(self) -> None:
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"`every(n=…)` expects a positive int, got {self.n!r}")

    def __call__(self, step: int) -> bool:
        return step % self.n == 0


# Why 10: on an H200 the forward-side probes (activation statistics, the
# back-propagated gradient) cost 1.40x per step on ResNet-50 when run every
# step and 1.002x every 10th step (DESIGN.md); weight snapshots for the
# update ratio cost a copy of the parameters, so they share that rhythm.
DEFAULT_SAMPLED = every(10)


SPARSEST = 64  # the budget's floor from step 256 on: a sample at least every 64th step


def floor_gap(step: int) -> int:
    """The widest gap the budget may leave between two samples around ``step``: 16 to step 127, 32 to 255, then 64.

    The diagnosis's depth, activation and stalled-layer rules take medians
    over the last 5 samples (``Thresholds.window``): so a 100-step run keeps
    7 samples, a 300-step run 13, and any 320 steps hold 5.
    """
    return min(SPARSEST, max(16, 1 << max(step.bit_length() - 3, 0)))


@dataclass(frozen=True)
class budget_floor:
    """Record on the steps of :func:`floor_gap`: 0, 16, …, 112, 128, 160, …, 224, 256, 320, …"""

    def __call__(self, step: int) -> bool:
        return step % floor_gap(step) == 0


BUDGET_FLOOR = budget_floor()
