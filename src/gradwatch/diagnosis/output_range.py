"""A squared error on an output squashed into a range its targets leave.

A sigmoid's outputs lie in (0, 1), a tanh's in (−1, 1), a ReLU's in [0, ∞). Under a squared error against targets
outside that range the output can only press against its bound: a sigmoid or tanh saturates there and passes almost
no gradient, a ReLU stops at 0 and passes none, and the net learns the targets it can reach. The watch reads the
targets' range once (meta ``loss_targets``: a trial from the loss's saved target before its backward pass, a watch
off the output's gradient, :func:`gradwatch.probes.loss_ops.targets_off_gradient`) and what the loss squares off
its graph (meta ``loss_paths``).

Measured (round 23, Chollet's "Building Autoencoders in Keras" head copied onto standardised digits; a diabetes
regression with a ReLU after its output): 75 % of the autoencoder's targets outside [0, 1], its held-out fraction
of variance explained 0.17–0.20 against 0.52–0.58 with a linear output, told "a quadratic cost on the output
sigmoid … cross-entropy on the logits" — a BCE on targets outside [0, 1] is unbounded below (−1e5 in 300 steps);
the regression's targets half below 0, R² 0.29–0.32 against 0.52–0.57, and no finding.
"""

from __future__ import annotations

from dataclasses import replace

from gradwatch.diagnosis.architecture import run_meta, set_up_warning
from gradwatch.diagnosis.findings import Finding, told_cause
from gradwatch.diagnosis.remedies import key_of, remedies
from gradwatch.diagnosis.thresholds import Thresholds
from gradwatch.probes.loss_ops import SQUARED, SQUASH
from gradwatch.store import Run

OUTSIDE_ABOVE = 0.1  # a tenth of the targets or more beyond the output's range: a share of the task it cannot learn

# each output function: its range in words, and the target shares (meta loss_targets' keys) outside it
RANGES = {"sigmoid": ("(0, 1)", ("below_0", "above_1")), "tanh": ("(−1, 1)", ("below_m1", "above_1")),
          "relu": ("[0, ∞)", ("below_0",))}


def squared_output(paths: list[list[str]] | None) -> str:
    """'sigmoid', 'tanh' or 'relu' where the loss squares a difference of that function's output, before any
    layer (meta ``loss_paths``); '' otherwise."""
    for path in paths or ():
        name = SQUASH.get(path[-1], "")
        if name in RANGES and SQUARED & set(path[:-1]):
            return name
    return ""


def output_range_words(run: Run) -> tuple[str, str, float]:
    """(the output function, the words of the cause, the share of targets outside its range) where that share is
    :data:`OUTSIDE_ABOVE` or more; ('', '', 0) otherwise."""
    meta = run_meta(run)
    targets, squash = meta.get("loss_targets"), squared_output(meta.get("loss_paths"))
    if not squash or not isinstance(targets, dict) or targets.get("bce_logits"):  # (a cross-entropy's targets)
        return "", "", 0.0
    span, keys = RANGES[squash]
    outside = sum(float(targets.get(k) or 0.0) for k in keys)
    if outside < OUTSIDE_ABOVE:
        return "", "", 0.0
    stuck = "stops at 0 and passes no gradient" if squash == "relu" else "saturates there and passes almost no gradient"
    words = (f"the output's {squash} cannot reach {outside:.0%} of the targets: a squared error on an output in "
             f"{span} against targets from {targets['min']:.3g} to {targets['max']:.3g} (read at the first step), so "
             f"on those the output presses against its bound, {stuck}, and the net learns only the targets it can "
             f"reach")
    return squash, words, outside


def output_range_findings(found: list[Finding], run: Run, th: Thresholds) -> list[Finding]:
    """Where the targets leave the output's range (:func:`output_range_words`): every problem told so first, with
    ``linear_output`` — and without ``logits_loss``, since a cross-entropy on targets outside [0, 1] is unbounded
    below; where there is none, one finding of its own (``saturation`` for a sigmoid or tanh, ``dead_units`` for a
    ReLU), a warning."""
    squash, words, outside = output_range_words(run)
    if not squash:
        return found
    kept = [replace(f, remedies=tuple(t for t in f.remedies if key_of(t) != "logits_loss"))
            if "logits_loss" in f.remedy_keys else f for f in found]
    if any(f.severity != "info" for f in kept):
        return told_cause(kept, words, remedies("linear_output"), "meta loss_targets")
    return kept + [set_up_warning(
        run, "dead_units" if squash == "relu" else "saturation", (),
        f"{outside:.0%} of the targets lie outside the output {squash}'s range",
        f"the loss squares a difference of a {squash}'s output (read off the loss's graph); its targets at the first "
        f"step: {outside:.0%} outside {RANGES[squash][0]}.", words, "linear_output", "meta loss_targets",
        "meta loss_paths", numbers={"outside_range": outside})]


ZERO_TARGETS_ABOVE = 0.1  # a tenth of a soft-margin loss's targets or more at 0: a share of the task with no gradient


def margin_target_findings(found: list[Finding], run: Run, th: Thresholds) -> list[Finding]:
    """A soft-margin loss (targets −1 and +1) given 0/1 labels (meta ``margin_targets``: a tenth of its targets or
    more at 0): every problem told so first, ``signed_targets`` first; where there is none, one ``stalled`` warning
    of its own. A target of 0 gives its sample log(1 + e⁰) = log 2 whatever the output, and no gradient: the net fits
    the samples labelled 1 and answers 1. Round 25 (``F.soft_margin_loss`` on breast cancer's 0/1 labels, as a BCE
    wants them): 37 % of the targets at 0, the loss 0.69 → 0.28, balanced accuracy 0.5 against 0.97 with 2y − 1,
    and "the gradients look healthy"."""
    seen = run_meta(run).get("margin_targets")
    share = float(seen.get("at_0") or 0.0) if isinstance(seen, dict) else 0.0
    if share < ZERO_TARGETS_ABOVE:
        return found
    words = (f"a soft-margin loss given 0/1 labels: it expects targets of −1 and +1, and {share:.0%} of them are 0 "
             f"(read at the first step) — each such sample's loss is log 2 whatever the output, with no gradient, so "
             f"the net learns only the samples labelled 1 and answers 1")
    if any(f.severity != "info" for f in found):
        return told_cause(found, words, remedies("signed_targets"), "meta margin_targets")
    return found + [set_up_warning(
        run, "stalled", (), f"{share:.0%} of the soft-margin loss's targets are 0, which it reads as no label",
        f"the loss is a soft-margin loss (read off its graph) whose targets at the first step were 0 on {share:.0%} "
        f"of its entries: those pass exactly no gradient to the output.", words, "signed_targets",
        "meta margin_targets", numbers={"targets_at_0": share})]
