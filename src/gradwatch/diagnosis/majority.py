"""A classifier that predicts one class only: the minority classes never come out.

For a model with one score a sample under a binary cross-entropy (meta ``loss_ops``: ``F.binary_cross_entropy_with_
logits`` or ``nn.BCELoss``), the watch reads, on the steps that read ‖∂L/∂a‖, the share of the scores that predict
the positive class (``out_positive``, a logit above 0; ``out_above_half``, a probability above ½) and the share of
the batch's targets that are positive (``target_positive``, from the signs of the output's gradient,
:mod:`gradwatch.probes.output`). For class scores (B, C ≥ 2) under a cross-entropy it reads the batch's most common
label and the shares of the rows labelled and predicted (argmax) otherwise (``label_top``, ``label_minority``,
``pred_minority``: the labels off the gradient, negative exactly at each row's label) — the binary task written as
two logits, as most tutorials do. Where the minority classes are predicted for under ``NEVER_BELOW`` of their rate
over the last third of the reads, the classifier answers the majority class for everything: an unweighted binary
cross-entropy over overlapping classes has its least loss near there, so the loss falls while the model learns
nothing a constant would not. It is the finding of last resort: only where no other rule found a problem (a net
whose units died answers one class too, and that finding says why).

Measured (round 20, discuss.pytorch.org t/145203's set-up: 5 % positives shifted by 0.8 in 3 of 20 features, an MLP
under Adam 3·10⁻³ and ``BCEWithLogitsLoss()``, seeds 0–2): no positive logit in any read after step 0, the targets'
rate 0.03–0.05, the loss 0.72 → 0.12–0.19, the held-out balanced accuracy 0.500 — what a constant scores. With
``pos_weight = n_neg/n_pos`` (the forum's answer) 17–39 % of the scores are positive over the last reads and the
balanced accuracy is 0.73–0.74. Four classes under ``nn.CrossEntropyLoss()``, three of them 5 % each (the same
features, each shifted in 3 of its own): the minority classes are predicted for 0.4–2.3 % of the rows over the last
reads where 15–16 % are labelled so (balanced accuracy 0.30–0.33; a constant scores 0.25); weighted by the inverse
class frequency, 56–59 % (0.63–0.65).
"""

from __future__ import annotations

import math

import numpy as np

from gradwatch.diagnosis.architecture import run_meta
from gradwatch.diagnosis.findings import Finding, sci
from gradwatch.diagnosis.measures import loss_ends
from gradwatch.diagnosis.remedies import remedies
from gradwatch.diagnosis.thresholds import Thresholds
from gradwatch.store import Run

# the minority classes predicted at under this share of their rate: (almost) never. Measured: 0–0.11 (binary: 0; four
# classes, three of 5 % each: 0.02–0.15, sampled every 16 or 10 steps); the weighted twins ×3.4–8
NEVER_BELOW = 0.25
LABELLED_ROWS = 0.9  # a cross-entropy's labels are read where this share of rows has one negative gradient entry
# the predicted-positive share each binary cross-entropy's output is read at
_PREDICTED = {"BinaryCrossEntropyWithLogitsBackward0": "out_positive", "BinaryCrossEntropyBackward0": "out_above_half"}


def _aligned(run: Run, names: tuple[str, ...]) -> tuple[np.ndarray, list[np.ndarray]]:
    """The run-level series ``names`` at the steps they all hold, finite everywhere."""
    series = [run.series(q, "run") for q in names]
    steps = series[0].steps
    for s in series[1:]:
        steps = np.intersect1d(steps, s.steps)
    values = [s.values[0][np.isin(s.steps, steps)] for s in series]
    ok = np.all([np.isfinite(v) for v in values], axis=0)
    return steps[ok], [v[ok] for v in values]


def _binary(run: Run, ops: tuple[str, ...] | list[str]) -> tuple | None:
    """(steps, minority predicted, minority rate, words, numbers, remedy) for a one-score-a-sample binary
    cross-entropy; None where the loss is none or its reads are missing."""
    name = next((q for op, q in _PREDICTED.items() if op in ops), None)
    if name is None or name not in run.quantities or "target_positive" not in run.quantities:
        return None
    steps, (predicted, targets) = _aligned(run, (name, "target_positive"))
    rate = float(np.mean(targets)) if len(targets) else math.nan
    if not 0 < rate < 1:
        return None
    positive_minority = rate <= 0.5
    minority, majority = ("positive", "negative") if positive_minority else ("negative", "positive")
    said = predicted if positive_minority else 1 - predicted
    prior = -(rate * math.log(rate) + (1 - rate) * math.log1p(-rate))  # the loss at outputs at the targets' rate
    words = {"majority": f"the {majority} class", "minority": f"say {minority}", "targets": f"are {minority}",
             "how": "a logit above 0" if name == "out_positive" else "a probability above ½",
             "read": "the signs of the output's gradient", "prior": prior,
             "loss": f"an unweighted binary cross-entropy with a rare {minority} class",
             "answer": f"answering {majority} for every input", "source": f"{name}, target_positive (run)"}
    return steps, said, min(rate, 1 - rate), words, {"positive_rate": rate}, "pos_weight"


def _classes(run: Run, ops: tuple[str, ...] | list[str]) -> tuple | None:
    """The same for class scores (B, C ≥ 2) under a cross-entropy, the labels read off its gradient."""
    names = ("label_top", "label_minority", "pred_minority", "label_rows", "output_classes")
    if "NllLossBackward0" not in ops or not all(q in run.quantities for q in names):
        return None
    steps, (top, labelled, predicted, rows, width) = _aligned(run, names)
    if not len(steps) or float(np.median(rows)) < LABELLED_ROWS:
        return None
    share = 1 - float(np.mean(labelled))
    majority = int(np.median(top[-max(1, len(top) // 3):]))
    words = {"majority": f"class {majority}", "minority": "name another class", "targets": "are of another class",
             "how": "the scores' argmax", "read": "the labels read off the cross-entropy's gradient", "prior": None,
             "loss": f"an unweighted cross-entropy over {int(np.median(width))} classes, {share:.0%} of the targets "
                     f"of class {majority}",
             "answer": f"answering class {majority} for every input",
             "source": "label_top, label_minority, pred_minority (run)"}
    return steps, predicted, float(np.mean(labelled)), words, {"majority_class": float(majority),
                                                             "majority_share": share}, "class_weight"


def majority_findings(found: list[Finding], run: Run, th: Thresholds) -> list[Finding]:
    """One ``stalled`` warning where a classifier predicts the majority class only (see the module) and no other
    rule found a problem."""
    if any(f.severity != "info" for f in found):
        return []
    ops = run_meta(run).get("loss_ops") or ()
    got = _binary(run, ops) or _classes(run, ops)
    if got is None:
        return []
    steps, said_by_read, minority_rate, words, numbers, key = got
    if len(steps) < 2 * th.window or not minority_rate > 0:
        return []
    last = max(th.window, len(steps) // 3)
    said = float(np.mean(said_by_read[-last:]))
    if said >= NEVER_BELOW * minority_rate:
        return []
    ends = loss_ends(run, th)
    prior = words["prior"]
    went = "" if ends is None else f"; the logged loss went {sci(ends[0])} → {sci(ends[1])}" + (
        f", against {sci(prior)} for outputs at the targets' rate" if prior is not None else "")
    first = int(steps[-last])
    return [Finding(
        kind="stalled", severity="warning", layers=(), steps=(first, int(steps[-1])),
        summary=(f"the classifier predicts {words['majority']} {'only' if said == 0 else 'almost only'}: "
                 f"{said:.1%} of its outputs {words['minority']}, "
                 f"where {minority_rate:.1%} of the targets {words['targets']}"),
        evidence=(f"over the last {last} reads (steps {first}–{int(steps[-1])}) {said:.1%} of the outputs "
                  f"{words['minority']} ({words['how']}), where {minority_rate:.1%} of the batches' targets "
                  f"{words['targets']} ({words['read']}){went}."),
        cause=(f"{words['loss']}: where the classes overlap, {words['answer']} is near the loss's minimum, so the loss "
               f"falls while the model learns nothing a constant would not (He & Garcia 2009, §2)"),
        remedies=remedies(key),
        numbers={**numbers, "predicted_minority": said, "minority_rate": minority_rate,
                 **({"loss_prior": prior} if prior is not None else {})},
        sources=(f"{words['source']}: the outputs' and the targets' shares", "meta loss_ops"),
    )]
