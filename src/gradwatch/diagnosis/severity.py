"""Severity by effect: a warning in a run that does not learn is critical."""

from __future__ import annotations

from dataclasses import replace

from gradwatch.diagnosis.findings import Finding, sci
from gradwatch.diagnosis.measures import flat_loss, loss_went
from gradwatch.diagnosis.thresholds import Thresholds
from gradwatch.store import Run

BY_EFFECT = ("vanishing", "exploding", "saturation", "dead_units", "stalled")  # kinds whose severity follows the loss


def by_effect(found: list[Finding], run: Run, th: Thresholds) -> list[Finding]:
    """Severity follows the effect on training: a warning in a run whose loss stayed at its start is critical."""
    flat = flat_loss(run, th)
    if flat is None:
        return found
    # "flat" is an end no lower than 0.9 × the start: a loss that rose, or fell and came back, did not stay put
    where = "stayed at its start value" if flat[1] <= 1.1 * flat[0] else "ended above its start value"
    note = f"; the loss {where} ({loss_went(run, th, flat)}): the run does not learn"
    said = f"; the loss {where}: the run does not learn"  # for evidence that gave the loss's ends already
    return [replace(f, severity="critical",
                    evidence=f.evidence.rstrip(".") + (said if "the loss went" in f.evidence else note) + ".",
                    numbers={**f.numbers, "loss_first": flat[0], "loss_final": flat[1]},
                    sources=f.sources if "loss (run)" in f.sources else (*f.sources, "loss (run)"))
            if f.severity == "warning" and f.kind in BY_EFFECT else f for f in found]
