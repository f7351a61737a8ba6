"""Severity by effect: a warning in a run that does not learn is critical."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from gradwatch.diagnosis.findings import Finding, sci
from gradwatch.diagnosis.batches import LABELLED_ROWS
from gradwatch.diagnosis.measures import FLAT_LOSS_ABOVE, flat_loss, halved, loss_ends, loss_went
from gradwatch.diagnosis.thresholds import Thresholds
from gradwatch.store import Run

BY_EFFECT = ("vanishing", "exploding", "saturation", "dead_units", "stalled")  # kinds whose severity follows the loss


def chance_loss(run: Run) -> tuple[float, float] | None:
    """(classes C, ln C) where the loss is a cross-entropy over class scores — the output (B, C) and nearly every
    row's gradient with exactly one negative entry, its label (``label_rows``, ``output_classes``) — else None. ln C
    is the loss of the uniform guess; the best constant's, the labels' entropy, is no higher."""
    if "label_rows" not in run.quantities or "output_classes" not in run.quantities:
        return None
    rows = run.series("label_rows", "run").values[0]
    classes = run.series("output_classes", "run").values[0]
    rows, classes = rows[np.isfinite(rows)], classes[np.isfinite(classes)]
    if not len(rows) or not len(classes) or float(np.median(rows)) < LABELLED_ROWS:
        return None
    c = float(np.median(classes))
    return (c, math.log(c)) if c >= 2 else None


def by_effect(found: list[Finding], run: Run, th: Thresholds) -> list[Finding]:
    """Severity follows the effect on training: a warning in a run whose loss stayed at its start is critical; so
    is one in a run whose cross-entropy did not halve and ended near chance, above ``FLAT_LOSS_ABOVE`` × ln C (round
    29: BatchNorm on batches of 2, 2.8 → 2.5 and 3.6 → 2.25 on ten classes, 2.30 at chance, held out 0.07–0.18, was
    critical on one seed and a warning on two)."""
    flat = flat_loss(run, th)
    if flat is None:
        ends, chance = loss_ends(run, th), chance_loss(run)
        if ends is None or chance is None or halved(ends) or not ends[1] > FLAT_LOSS_ABOVE * chance[1]:
            return found
        flat = ends
        where = (f"did not halve and ended near chance for a cross-entropy over {chance[0]:g} classes (above "
                 f"{FLAT_LOSS_ABOVE:g} × ln {chance[0]:g} = {FLAT_LOSS_ABOVE * chance[1]:.3g})")
    else:
        # "flat" is an end no lower than 0.9 × the start: a loss that rose, or fell and came back, did not stay put
        where = "stayed at its start value" if flat[1] <= 1.1 * flat[0] else "ended above its start value"
    note = f"; the loss {where} ({loss_went(run, th, flat)}): the run does not learn"
    said = f"; the loss {where}: the run does not learn"  # for evidence that gave the loss's ends already
    return [replace(f, severity="critical",
                    evidence=f.evidence.rstrip(".") + (said if "the loss went" in f.evidence else note) + ".",
                    numbers={**f.numbers, "loss_first": flat[0], "loss_final": flat[1]},
                    sources=f.sources if "loss (run)" in f.sources else (*f.sources, "loss (run)"))
            if f.severity == "warning" and f.kind in BY_EFFECT else f for f in found]
