"""Batches that are not shuffled: each holds a few of the classes, and the classes come in turn.

The watch reads a cross-entropy's labels off the gradient at the model's class scores (∂L/∂z = c·(softmax(z) −
onehot(y)) is negative exactly at the label; :func:`gradwatch.probes.output.batch_labels`) on the steps that read
‖∂L/∂a‖: how many distinct labels a batch holds, and its smallest. A batch of B samples drawn at random from C
balanced classes holds about E = C·(1 − (1 − 1/C)^B) of them. Where the batches hold a median of E/``FEW_CLASSES`` or
fewer, and their smallest label ranges over half the classes or more (the classes come in turn, as from a data set
sorted by class), the problems of the run are told so, with shuffling first; where there are none and the loss did
not halve, that is a finding of its own. Heavily imbalanced data shuffled holds few classes a batch too, but its
smallest label is the common class's throughout.

Measured (round 19, Cross Validated q. 245502: digits sorted by label, batches of 32 in order, an MLP at SGD 0.05
with momentum): 1–2 distinct labels a batch against E = 9.7, the smallest going 0, 4, 8, 2, 6, …; dead units and a
divergence were found with generic causes, 0.22–0.44 held out (shuffled: 8–10 labels a batch, 0.97).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from gradwatch.diagnosis.architecture import run_meta
from gradwatch.diagnosis.findings import Finding, sci
from gradwatch.diagnosis.measures import halved, loss_ends
from gradwatch.diagnosis.remedies import remedies
from gradwatch.diagnosis.thresholds import Thresholds
from gradwatch.store import Run

FEW_CLASSES = 3  # a batch holding a third of the classes a random batch would, or fewer, is not a random batch
LABELLED_ROWS = 0.9  # the share of a batch's rows whose gradient has exactly one negative entry: a cross-entropy
_QUANTITIES = ("batch_classes", "batch_class_min", "label_rows", "output_classes")


def unshuffled_words(run: Run, th: Thresholds) -> str:
    """The cause in words where the batches are not shuffled (see the module); '' where they are, or nothing
    shows it."""
    if not all(q in run.quantities for q in _QUANTITIES):
        return ""
    values = [run.series(q, "run").values[0] for q in _QUANTITIES]
    if len({len(v) for v in values}) != 1 or len(values[0]) < 2 * th.window:
        return ""
    distinct, smallest, rows, width = values
    size = run_meta(run).get("batch_size")
    classes = float(np.median(width))
    if not isinstance(size, int) or size < 2 or classes < 3 or float(np.median(rows)) < LABELLED_ROWS:
        return ""
    expected = classes * (1 - (1 - 1 / classes) ** size)
    held = float(np.median(distinct))
    seen = smallest[smallest < classes]
    if held > expected / FEW_CLASSES or not len(seen) or float(seen.max() - seen.min()) < classes / 2:
        return ""
    return (f"the batches are not shuffled: a batch holds a median of {held:g} of the {classes:g} classes (a batch "
            f"of {size} drawn at random would hold about {expected:.1f}), and the classes come in turn — the smallest "
            f"label of a batch went over {seen.min():g}…{seen.max():g} — so each stretch of steps fits the classes in "
            f"hand and forgets the others (a data set sorted or grouped by class)")


def unshuffled(found: list[Finding], run: Run, th: Thresholds) -> list[Finding]:
    """The problem findings told that the batches are not shuffled, shuffling first; or, where there are none and
    the loss did not halve, one ``stalled`` warning of its own (see the module)."""
    words = unshuffled_words(run, th)
    if not words:
        return found
    problems = [f for f in found if f.severity != "info"]
    if problems:
        return [replace(f, cause=f"{words}; besides, {f.cause}", remedies=remedies("shuffle") + f.remedies,
                        sources=(*f.sources, "batch_classes, batch_class_min (run)"))
                if f.severity != "info" and "shuffle" not in f.remedy_keys else f for f in found]
    ends = loss_ends(run, th)
    if ends is None or halved(ends):
        return found
    steps = run.series("batch_classes", "run").steps
    return found + [Finding(
        kind="stalled", severity="warning", layers=(), steps=(int(steps[0]), int(steps[-1])),
        summary="the batches are not shuffled: each holds a few classes, and the classes come in turn",
        evidence=(f"read off the cross-entropy's gradient at the class scores on {len(steps)} steps; the logged loss "
                  f"went {sci(ends[0])} → {sci(ends[1])} and did not halve."),
        cause=words, remedies=remedies("shuffle"),
        numbers={"loss_first": ends[0], "loss_final": ends[1]},
        sources=("batch_classes, batch_class_min, label_rows, output_classes (run)", "loss (run)"))]
