"""Training set-ups the gradwatch team did not write, ported from public sources, each with a measured label.

Every set-up is a ``seed -> Trial`` callable with a fixed step count; its
docstring and ``source`` cite where it comes from (repository + file, or
paper + section). ``label`` is "healthy" or the pathology kind, and
:mod:`benchmarks.setups.truth` checks it by plain hooks (tests/test_repair_setups.py).
``benchmarks/repair_eval.py`` runs the diagnosis and the doctor on all of them.
"""

from __future__ import annotations

from .common import BenchSetup

__all__ = ["BenchSetup", "SETUPS", "get", "names"]


def _collect() -> dict[str, BenchSetup]:
    from . import (autotrainer, cnns, deep_mlps, deeplocalize, goodfellow, practice, recurrent, round3, round9, round10,
                   transformers_)

    found: dict[str, BenchSetup] = {}
    for module in (autotrainer, deeplocalize, deep_mlps, practice, cnns, recurrent, transformers_, goodfellow, round3,
                   round9, round10):
        for s in module.SETUPS:
            if s.name in found:
                raise ValueError(f"two set-ups are named {s.name!r}")
            found[s.name] = s
    return found


SETUPS: dict[str, BenchSetup] = _collect()


def get(name: str) -> BenchSetup:
    """The set-up of that name."""
    try:
        return SETUPS[name]
    except KeyError:
        raise KeyError(f"`setups.get(name=…)` expects one of {sorted(SETUPS)}, got {name!r}") from None


def names() -> list[str]:
    return list(SETUPS)
