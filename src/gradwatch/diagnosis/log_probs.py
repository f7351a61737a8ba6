"""An NLL loss fed the model's raw scores: a loss unbounded below.

``nn.NLLLoss`` (``F.nll_loss``) takes log-probabilities: its loss is −z_y, the label's entry of its input, averaged.
On raw scores that is unbounded below — every step raises the label's score, the loss goes negative and falls on,
and the weights grow until the forward overflows. The watch reads off the loss's graph whether an NLL loss's input
comes from a layer with no logarithm between (meta ``nll_on_scores``, :func:`gradwatch.probes.loss_ops.
nll_on_scores`). ``nn.CrossEntropyLoss`` applies log_softmax itself and is never this.

Measured (round 21, the NLLLoss docs' "add a LogSoftmax layer", a forum report of a negative loss): a digits MLP at
SGD 0.05 with momentum under ``nn.NLLLoss()`` on its logits, the loss −0.09 / 0.03 / −0.01 at step 0 and negative
after, NaN from step 32–33 on seeds 0–2, chance accuracy, told "divergence … a lower learning rate"; the doctor's
learning rate ×0.01 "fixed" it at 0.32 held out, its loss −0.81 and still falling (NaN at step ≈840). With
``nn.LogSoftmax(dim=1)`` appended: 0.96–0.98.
"""

from __future__ import annotations

from gradwatch.diagnosis.architecture import run_meta
from gradwatch.diagnosis.findings import Finding, told_cause
from gradwatch.diagnosis.measures import went_below_zero
from gradwatch.diagnosis.remedies import remedies
from gradwatch.diagnosis.thresholds import Thresholds
from gradwatch.store import Run

WORDS = ("an NLL loss on the model's raw scores: nn.NLLLoss (F.nll_loss) takes log-probabilities, and its input "
         "comes from a layer with no log_softmax or log between (read off the loss's graph), so its loss −z_y is "
         "unbounded below — every step raises the label's score, the loss goes negative and falls on, and the "
         "weights grow until the forward overflows (the NLLLoss docs: \"add a LogSoftmax layer\")")


def nll_on_scores_findings(found: list[Finding], run: Run, th: Thresholds) -> list[Finding]:
    """Where an NLL loss takes raw scores (see the module): the problems of the run told so, ``log_softmax`` first;
    where there are none, one ``exploding`` finding of its own — critical once the logged loss went below 0, which a
    negative log-likelihood of probabilities never does, else a warning."""
    if run_meta(run).get("nll_on_scores") is not True:
        return found
    if any(f.severity != "info" for f in found):
        return told_cause(found, WORDS, remedies("log_softmax"), "meta nll_on_scores")
    told, steps, below = went_below_zero(run)
    if below is not None:
        told += f", below 0 from step {below}: a negative log-likelihood of probabilities never is"
    return found + [Finding(
        kind="exploding", severity="critical" if below is not None else "warning", layers=(), steps=steps,
        summary="the loss is unbounded below: an NLL loss takes the model's raw scores, not log-probabilities",
        evidence=f"the NLL loss's input comes from a layer with no log_softmax or log between{told}.",
        cause=WORDS, remedies=remedies("log_softmax"),
        numbers={"below_zero_step": float(below) if below is not None else float("nan")},
        sources=("meta nll_on_scores (the loss's graph)", "loss (run)"))]
