"""A model whose output collapsed: every input gets nearly the same output, while the loss does not halve.

The watch reads the output's spread across the batch, ``out_spread`` = ‖Y − Ȳ‖/‖Y‖, and its rms ``out_rms`` =
‖Y‖/√B (:mod:`gradwatch.probes.output`), on the steps that read ‖∂L/∂a‖; their product is the rms distance of a
sample's output from the batch's mean. A collapse is that distance falling to at most ``COLLAPSE_FELL_TO`` of its
first read, with the relative spread at or below ``COLLAPSED_BELOW`` over the last quarter of the reads, in a run
whose logged loss did not halve, under a loss that is not the output's error against targets (:data:`AGAINST_TARGETS`,
read off the loss's graph). Outputs that moved to an offset are no collapse: a GAN generator's samples
reaching data far from 0 have a relative spread of 0.08–0.13 while their distance from their mean grew ×7–13
(measured on goodfellow_gan_nonsaturating, seeds 0–2). It is the finding of last resort: only where no other rule
found a problem (a net whose units died has a constant output too, and that finding says why).

Measured (round 18, FaceNet's triplet loss with the hardest negatives on digits, Schroff et al. 2015 §3.2, seeds
0–2): the distance fell from 0.41 / 0.29 / 0.24 at step 0 to 0.09 by step 64–112 (the outputs are unit vectors:
distance and relative spread agree), 0.12–0.13 over the last reads, the loss 0.29 → 0.20 (at its margin α) and
the held-out margin accuracy 0; with semi-hard negatives the spread rises to 0.98–0.99 and the loss to 10⁻⁴. Adam
at 10⁻³ in place of SGD escapes it (0.989 / 0.983 held out).
"""

from __future__ import annotations

import numpy as np

from gradwatch.diagnosis.architecture import run_meta
from gradwatch.diagnosis.findings import Finding, sci
from gradwatch.diagnosis.measures import halved, loss_ends
from gradwatch.diagnosis.remedies import remedies
from gradwatch.diagnosis.thresholds import Thresholds
from gradwatch.store import Run

# a loss of the output against targets (a regression's squared or absolute error, a classifier's cross-entropy): an
# output that stopped depending on the input there predicts the targets' mean or prior — a net that learned nothing,
# which the other rules explain, not a collapse into the minimum of a loss between outputs (twenty-fifth session: a
# hand-unrolled RNN on Pascanu's adding problem at R² ≈ 0 was told "the output collapsed … a triplet or contrastive
# loss", and the doctor's next round followed that finding's remedies, not the baseline's, and lost its repair)
AGAINST_TARGETS = frozenset({"MseLossBackward0", "L1LossBackward0", "SmoothL1LossBackward0", "HuberLossBackward0",
                             "NllLossBackward0", "NllLoss2DBackward0"})
COLLAPSE_FELL_TO = 0.5  # the distance's least read at most this share of its first (0.22–0.39 measured)
COLLAPSED_BELOW = 0.25  # ... and its last quarter's median at or below this (0.12–0.13 measured; the twin's 0.98)


def collapse_findings(found: list[Finding], run: Run, th: Thresholds) -> list[Finding]:
    """One ``stalled`` warning where the output collapsed (see the module) and no other rule found a problem."""
    if any(f.severity != "info" for f in found) or "out_spread" not in run.quantities:
        return []
    if AGAINST_TARGETS & set(run_meta(run).get("loss_ops") or ()):
        return []
    ends = loss_ends(run, th)
    if ends is None or halved(ends):
        return []
    s, r = run.series("out_spread", "run"), run.series("out_rms", "run") if "out_rms" in run.quantities else None
    if r is None or len(r.steps) != len(s.steps):
        return []
    ok = np.isfinite(s.values[0]) & np.isfinite(r.values[0])
    steps, spread = s.steps[ok], s.values[0][ok]
    distance = spread * r.values[0][ok]
    if len(spread) < 2 * th.window:
        return []
    last = max(th.window, len(spread) // 4)
    first, low = float(distance[0]), int(np.argmin(distance))
    late = float(np.median(spread[-last:]))
    if not (first > 0 and distance[low] <= COLLAPSE_FELL_TO * first and late <= COLLAPSED_BELOW):
        return []
    onset = int(steps[np.flatnonzero(distance <= COLLAPSE_FELL_TO * first)[0]])
    return [Finding(
        kind="stalled", severity="warning", layers=(), steps=(onset, int(steps[-1])),
        summary=f"the model's output collapsed: every input gets nearly the same output, from step {onset}",
        evidence=(f"the rms distance of a sample's output from the batch's mean fell from {sci(first)} at step "
                  f"{int(steps[0])} to {sci(float(distance[low]))} at step {int(steps[low])}, and the output's spread "
                  f"across the batch, ‖y − ȳ‖/‖y‖ (1 for outputs centred at 0, 0 for one output for all), is "
                  f"{sci(late)} over the last {last} reads; the logged loss went {sci(ends[0])} → {sci(ends[1])} and "
                  "did not halve."),
        cause=("a collapse of the outputs: the steps went to where the loss no longer depends on the input — a loss "
               "that compares outputs with each other (a triplet or contrastive loss) under the hardest negatives "
               "collapses so early in training (Schroff et al. 2015, §3.2: \"a collapsed model (i.e. f(x) = 0)\")"),
        remedies=remedies("no_collapse", "adam"),
        numbers={"distance_first": first, "distance_least": float(distance[low]), "spread_late": late,
                 "loss_first": ends[0], "loss_final": ends[1]},
        sources=("out_spread, out_rms (run): ‖y − ȳ‖/‖y‖ and ‖y‖/√B of the model's output", "loss (run)"),
    )]
