"""A stored run seen through a range of steps, and the step arithmetic every family of rules shares."""

from __future__ import annotations

import numpy as np

from gradwatch.store import Entity, Run, Series


class RunView:
    """A run seen only before step ``limit`` (and from ``start`` on), without the steps in ``drop``.

    It answers what the rules ask of a :class:`~gradwatch.Run` (``quantities``, ``series``, ``entities``,
    ``meta``, ``temporal``), so a rule judges what came before a NaN, or one episode, as a run of its own.
    """

    def __init__(self, run: Run, limit: float, drop: np.ndarray | None = None, start: float = -np.inf) -> None:
        self._run, self._limit, self._start = run, limit, start
        self._drop = drop if drop is not None else np.zeros(0, dtype=np.int64)
        self.path = run.path

    def _keep(self, steps: np.ndarray) -> np.ndarray:
        return (steps >= self._start) & (steps < self._limit) & ~np.isin(steps, self._drop)

    @property
    def quantities(self) -> list[str]:
        return self._run.quantities

    def series(self, quantity: str, kind: str = "layer") -> Series:
        s = self._run.series(quantity, kind)
        keep = self._keep(s.steps)
        return Series(s.quantity, s.names, s.steps[keep], s.values[:, keep])

    def entities(self, kind: str | None = None) -> list[Entity]:
        return self._run.entities(kind)

    @property
    def meta(self) -> dict:
        return self._run.meta

    def temporal(self, name: str, quantity: str = "temporal_grad_norm") -> Series:
        s = self._run.temporal(name, quantity)
        keep = self._keep(s.steps)
        return Series(s.quantity, s.names, s.steps[keep], s.values[:, keep])


def since(flags: np.ndarray, steps: np.ndarray, steady: int = 1) -> int:
    """First step of the final run of consecutive True flags (the last flag may be False: then its end).

    ``steady``: judge each flag by the majority of the ``steady`` flags centred on it, so that one noisy sample
    neither ends the final run early (an onset reported late) nor starts it. The step returned is one whose own flag
    is True where the run has one (round 20: "since step 0" for a gradient that was 0.046 at step 0 and 0 from the
    next sample on — the majority around step 0 was already True).
    """
    raw = f = np.asarray(flags, dtype=bool)
    if steady > 1 and len(f):
        h = steady // 2
        f = np.array([f[max(0, j - h): j + h + 1].mean() > 0.5 for j in range(len(f))])
    i = len(f) - 1
    while i > 0 and f[i - 1]:
        i -= 1
    held = np.flatnonzero(raw[i:])
    return int(steps[i + held[0]]) if len(held) else int(steps[i])


def steps_text(first: int, last: int) -> str:
    """'step 4' or 'steps 4–9'."""
    return f"step {first}" if first == last else f"steps {first}–{last}"


def list_steps(steps: np.ndarray, most: int = 8) -> str:
    """The first ``most`` steps, comma-separated, with the count when there are more."""
    shown = ", ".join(str(int(x)) for x in steps[:most])
    return shown + (f", … ({len(steps)} in all)" if len(steps) > most else "")


def episodes(flags: np.ndarray, least: int) -> list[tuple[int, int]]:
    """(first, last) indices of the runs of consecutive True flags at least ``least`` long."""
    out, i = [], 0
    while i < len(flags):
        if flags[i]:
            j = i
            while j + 1 < len(flags) and flags[j + 1]:
                j += 1
            if j - i + 1 >= least:
                out.append((i, j))
            i = j + 1
        else:
            i += 1
    return out
