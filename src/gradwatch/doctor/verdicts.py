"""Verdicts on measured trials: a loss curve summarised, a remedy's row against the baseline's."""

from __future__ import annotations

import math

import numpy as np

from gradwatch.doctor.table import TrialResult
from gradwatch.doctor.trial_run import TrialRun

LEARNED_BELOW = 0.5  # "really learns": the final loss is at most this fraction of the run's first finite loss


def curve(losses: list[float]) -> tuple[float, float, float, bool]:
    """(first finite loss, final loss = mean of the last 10 %, mean loss, learned) of one run's own loss curve."""
    arr = np.array(losses, dtype=float)
    finite = arr[np.isfinite(arr)]
    first = float(finite[0]) if len(finite) else math.inf
    tail = arr[-max(1, len(arr) // 10):]
    final = float(np.mean(tail)) if np.isfinite(tail).all() else math.inf
    auc = float(np.mean(arr)) if np.isfinite(arr).all() else math.inf
    learned = math.isfinite(final) and math.isfinite(first) and first > 0 and final <= LEARNED_BELOW * first
    return first, final, auc, learned


def summary(label: str, runs: list[TrialRun], seconds: float) -> TrialResult:
    curves = [curve(losses) for losses, _, _, _ in runs]
    kinds = sorted({k for _, _, ks, _ in runs for k in ks})
    return TrialResult(label, float(np.mean([c[1] for c in curves])), float(np.mean([c[2] for c in curves])),
                       float(np.mean([s for _, s, _, _ in runs])), kinds, seconds,
                       first_loss=float(np.mean([c[0] for c in curves])), learned=all(c[3] for c in curves))


def verdict(base: TrialResult, trial: TrialResult, targets: set[str]) -> str:
    """Judged only on what was measured: the findings left, the loss curve, the held-out score.

    "fixes it" needs all three: the targeted findings gone, a finite final loss, and real learning — a better
    held-out score where the set-up has one, otherwise a final loss at most half the trial's own first finite
    loss and no higher than where the untouched baseline started (so inf → 10¹⁰ is never a repair).
    """
    gone = not (targets & set(trial.findings))
    if not math.isfinite(trial.final_loss):
        return "worse (diverged)"
    if math.isfinite(base.score) and math.isfinite(trial.score):
        better = trial.score > base.score + 0.02
        worse = trial.score < base.score - 0.02
        learns = better
    else:
        better = trial.final_loss < 0.9 * base.final_loss
        worse = trial.final_loss > 1.1 * base.final_loss
        learns = trial.learned and not (math.isfinite(base.first_loss) and trial.final_loss > base.first_loss)
    if gone and learns:
        return "fixes it"
    if gone and not worse:
        return "removes the finding; does not learn" if not trial.learned else "removes the finding; no better"
    if better:
        return "helps; finding remains"
    return "worse" if worse else "no change"
