"""A binary classifier that predicts one class only: the minority class never comes out.

For a model with one score a sample under a binary cross-entropy (meta ``loss_ops``: ``F.binary_cross_entropy_with_
logits`` or ``nn.BCELoss``), the watch reads, on the steps that read ‖∂L/∂a‖, the share of the scores that predict
the positive class (``out_positive``, a logit above 0; ``out_above_half``, a probability above ½) and the share of
the batch's targets that are positive (``target_positive``, from the signs of the output's gradient,
:mod:`gradwatch.probes.output`). Where the minority class is predicted for at most ``NEVER_BELOW`` of its own rate
over the last third of the reads, the classifier answers the majority class for everything: an unweighted binary
cross-entropy over overlapping classes has its least loss near there, so the loss falls while the model learns
nothing a constant would not. It is the finding of last resort: only where no other rule found a problem (a net
whose units died answers one class too, and that finding says why).

Measured (round 20, discuss.pytorch.org t/145203's set-up: 5 % positives shifted by 0.8 in 3 of 20 features, an MLP
under Adam 3·10⁻³ and ``BCEWithLogitsLoss()``, seeds 0–2): no positive logit in any read after step 0, the targets'
rate 0.03–0.05, the loss 0.72 → 0.12–0.19, the held-out balanced accuracy 0.500 — what a constant scores. With
``pos_weight = n_neg/n_pos`` (the forum's answer) 17–39 % of the scores are positive over the last reads and the
balanced accuracy is 0.73–0.74.
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

NEVER_BELOW = 0.1  # the minority class predicted at under this share of its rate: never (0 measured; the twin ×4–8)
# the predicted-positive share each binary cross-entropy's output is read at
_PREDICTED = {"BinaryCrossEntropyWithLogitsBackward0": "out_positive", "BinaryCrossEntropyBackward0": "out_above_half"}


def majority_findings(found: list[Finding], run: Run, th: Thresholds) -> list[Finding]:
    """One ``stalled`` warning where a binary classifier predicts the majority class only (see the module) and no
    other rule found a problem."""
    if any(f.severity != "info" for f in found):
        return []
    ops = run_meta(run).get("loss_ops") or ()
    name = next((q for op, q in _PREDICTED.items() if op in ops), None)
    if name is None or name not in run.quantities or "target_positive" not in run.quantities:
        return []
    p, t = run.series(name, "run"), run.series("target_positive", "run")
    steps = np.intersect1d(p.steps, t.steps)
    predicted = p.values[0][np.isin(p.steps, steps)]
    targets = t.values[0][np.isin(t.steps, steps)]
    ok = np.isfinite(predicted) & np.isfinite(targets)
    steps, predicted, targets = steps[ok], predicted[ok], targets[ok]
    if len(steps) < 2 * th.window:
        return []
    rate = float(np.mean(targets))
    if not 0 < rate < 1:
        return []
    positive_minority = rate <= 0.5
    minority_rate = rate if positive_minority else 1 - rate
    last = max(th.window, len(steps) // 3)
    shares = predicted[-last:] if positive_minority else 1 - predicted[-last:]
    said = float(np.mean(shares))
    if said > NEVER_BELOW * minority_rate:
        return []
    minority, majority = ("positive", "negative") if positive_minority else ("negative", "positive")
    # an unweighted binary cross-entropy's loss at outputs at the targets' rate (the prior's entropy): closed form
    prior = -(rate * math.log(rate) + (1 - rate) * math.log1p(-rate))
    ends = loss_ends(run, th)
    went = (f"; the logged loss went {sci(ends[0])} → {sci(ends[1])}, against {sci(prior)} for outputs at the targets' "
            f"rate" if ends is not None else "")
    first = int(steps[-last])
    return [Finding(
        kind="stalled", severity="warning", layers=(), steps=(first, int(steps[-1])),
        summary=(f"the classifier predicts the {majority} class only: {said:.1%} of its outputs say {minority}, where "
                 f"{minority_rate:.1%} of the targets are"),
        evidence=(f"over the last {last} reads (steps {first}–{int(steps[-1])}) {said:.1%} of the outputs predict the "
                  f"{minority} class ({'a logit above 0' if name == 'out_positive' else 'a probability above ½'}), "
                  f"where {minority_rate:.1%} of the batches' targets are {minority} (the signs of the output's "
                  f"gradient){went}."),
        cause=(f"an unweighted binary cross-entropy with a rare {minority} class: where the classes overlap, answering "
               f"{majority} for every input is near the loss's minimum, so the loss falls while the model learns "
               f"nothing a constant would not (He & Garcia 2009, §2)"),
        remedies=remedies("pos_weight"),
        numbers={"positive_rate": rate, "predicted_minority": said, "minority_rate": minority_rate,
                 "loss_prior": prior},
        sources=(f"{name}, target_positive (run): the output's and the targets' positive shares", "meta loss_ops"),
    )]
