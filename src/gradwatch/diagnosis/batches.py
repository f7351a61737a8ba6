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

import numpy as np

from gradwatch.diagnosis.architecture import run_meta
from gradwatch.diagnosis.findings import Finding, sci, told_cause
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
    if run_meta(run).get("policy_loss"):
        return ""  # the gradient at a policy's scores is negative at the action it sampled, not at a label (round 46)
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


REGRESSION_LOSSES = frozenset({"MseLossBackward0", "L1LossBackward0", "SmoothL1LossBackward0", "HuberLossBackward0"})
SWEEPS_ABOVE = 3.0  # the batch mean's spread across reads, over a batch's own spread: a random batch's is about 1/√B
SWEEP_OF_SCALE = 0.3  # ... and at least this share of the output's rms (a model whose output barely moves sweeps nothing)
# A batch's own spread at least this share of the output's rms: an output that is one constant within a batch moves
# with its bias, not along the targets (round 15's autoencoder whose latents all died, its output the decoder's bias:
# a spread of 0.01 of its rms, its bias moved by Adam between batches; round 36's MLP clipped after its SGD step, 98 %
# of its last hidden layer dead and its bias thrown about by unstable steps: 0.054, told "not shuffled" first for
# batches drawn at random; round 21's sorted regression: 0.2–0.25)
OWN_SPREAD_FROM = 0.1


def sorted_targets_words(run: Run, th: Thresholds) -> str:
    """The cause in words where a regression's batches come in the order of their targets; '' where they do not, or
    nothing shows it. Read off the output across the batch (``out_spread``, ``out_rms``: a batch's mean output
    m = rms·√(1 − spread²) and its samples' spread about it s = rms·spread): in batches drawn at random, the batch
    means differ by about s/√B from one read to the next; in a data set sorted by its target and read in order, each
    batch holds neighbouring targets and the model fits the band in hand, so its outputs sit close together (s
    small) while their mean sweeps the targets' range over the epoch, and back. Where m's spread about its linear
    trend over the second half of the reads (an output still approaching targets far from 0 drifts one way) is
    ``SWEEPS_ABOVE`` × the median s or more, and ``SWEEP_OF_SCALE`` of the median rms or more, under a regression
    loss (meta ``loss_ops``), the batches are not shuffled — where s itself is ``OWN_SPREAD_FROM`` of the median rms
    or more (an output constant within each batch is no band of targets).

    Measured (round 21, the common-mistakes guide's "not shuffling the training data": Friedman-1 sorted by its
    standardised target, batches of 32 in order, Adam 3e-3): m's spread 4–5× the median s and ≈ the median rms,
    R² −1.41 / −0.22 / −1.14, told "unstable steps … a learning rate too large"; shuffled each epoch, the twin's
    m spread ≈ 0.05× its s (R² 0.94–0.97)."""
    if (not REGRESSION_LOSSES & set(run_meta(run).get("loss_ops") or ())
            or not {"out_spread", "out_rms"} <= set(run.quantities)):
        return ""
    spread, rms = run.series("out_spread", "run").values[0], run.series("out_rms", "run").values[0]
    ok = np.isfinite(spread) & np.isfinite(rms)
    spread, rms = spread[ok], rms[ok]
    spread, rms = spread[len(spread) // 2:], rms[len(rms) // 2:]  # after the output's approach to the targets' scale
    if len(spread) < th.window:
        return ""
    within = rms * spread
    means = rms * np.sqrt(np.clip(1 - spread ** 2, 0, 1))
    reads = np.arange(len(means), dtype=float)
    trend = np.polyval(np.polyfit(reads, means, 1), reads)  # a mean still drifting one way is no sweep
    sweep, own, scale = float(np.std(means - trend)), float(np.median(within)), float(np.median(rms))
    if not (sweep >= SWEEPS_ABOVE * own and sweep >= SWEEP_OF_SCALE * scale and own >= OWN_SPREAD_FROM * scale > 0):
        return ""
    return (f"the batches are not shuffled: each batch's outputs lie close together (a median spread of {sci(own)} "
            f"about their mean) while that mean sweeps the range from one batch to the next (its spread across the "
            f"last {len(means)} reads, {sci(sweep)}, is {sweep / max(own, 1e-30):.0f}× a batch's own; a batch drawn at "
            f"random moves it by about 1/√B of it) — batches of neighbouring targets, as from a data set sorted by "
            f"its target: each stretch of steps fits the targets in hand and forgets the rest")


def unshuffled(found: list[Finding], run: Run, th: Thresholds) -> list[Finding]:
    """The problem findings told that the batches are not shuffled, shuffling first; or, where there are none, one
    ``stalled`` warning of its own — for batches of a few classes, where the loss did not halve (see the module);
    for a regression's batches of neighbouring targets (:func:`sorted_targets_words`), whatever the loss did."""
    words = unshuffled_words(run, th)
    regression = not words
    words = words or sorted_targets_words(run, th)
    if not words:
        return found
    if any(f.severity != "info" for f in found):
        read = "out_spread, out_rms (run)" if regression else "batch_classes, batch_class_min (run)"
        return told_cause(found, words, remedies("shuffle"), read)
    ends = loss_ends(run, th)
    if regression:  # the sweep is its own evidence: a loss that halves on each band in turn still fits the band only
        steps = run.series("out_spread", "run").steps
        went = "" if ends is None else f"; the logged loss went {sci(ends[0])} → {sci(ends[1])}"
        return found + [Finding(
            kind="stalled", severity="warning", layers=(), steps=(int(steps[0]), int(steps[-1])),
            summary="the batches are not shuffled: each holds neighbouring targets, and they sweep the range in turn",
            evidence=f"read off the output across the batch on {len(steps)} steps{went}.",
            cause=words, remedies=remedies("shuffle"),
            sources=("out_spread, out_rms (run)", "meta loss_ops"))]
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
