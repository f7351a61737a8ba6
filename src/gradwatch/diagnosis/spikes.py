"""Spikes, divergence and first movers over steps: robust running statistics (median/MAD) on the log scale.

Events of the loss and the total gradient norm (:func:`events`), and the layers whose update (or gradient) norms
rose first before one (:func:`first_movers`); :mod:`gradwatch.diagnosis.instability` words them as findings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from gradwatch.diagnosis.findings import sci
from gradwatch.diagnosis.instability_thresholds import InstabilityThresholds
from gradwatch.store import Run


def robust_z(x: np.ndarray, window: int, floor: float = 1e-3, least: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """(z, median): per position, against the median and 1.4826·MAD (at least ``floor``) of the up to ``window``
    finite values before it; NaN where fewer than ``least`` exist."""
    z, med = np.full(len(x), np.nan), np.full(len(x), np.nan)
    for j in range(len(x)):
        past = x[max(0, j - window): j]
        past = past[np.isfinite(past)]
        if len(past) >= least and np.isfinite(x[j]):
            med[j] = m = float(np.median(past))
            z[j] = (x[j] - m) / max(1.4826 * float(np.median(np.abs(past - m))), floor)
    return z, med


@dataclass(frozen=True)
class Event:
    """One instability: its ``kind`` (spike, divergence, nonfinite; stall or attention for whole-run findings),
    onset step, last step, and words."""

    kind: str
    step: int
    last: int
    words: str
    numbers: dict[str, float]


def _log(x: np.ndarray) -> np.ndarray:
    with np.errstate(all="ignore"):
        return np.log(x)


def _unprecedented(rise: np.ndarray, th: InstabilityThresholds) -> np.ndarray:
    """Per step: whether its rise above the running median is at least ``spike_precedent`` times the largest rise
    of the ``lookback`` steps before it (a first step, or one after no rise at all, is)."""
    out = np.ones(len(rise), dtype=bool)
    r = np.nan_to_num(rise, nan=-np.inf)
    for j in np.flatnonzero(r > 0).tolist():
        before = r[max(0, j - th.lookback): j]
        if len(before) and before.max() > 0:
            out[j] = r[j] >= th.spike_precedent * before.max()
    return out


def events(steps: np.ndarray, loss: np.ndarray, grad: np.ndarray | None, th: InstabilityThresholds,
           recorded: np.ndarray | None = None) -> list[Event]:
    """Spikes (steps within 10 of each other clustered), a divergence and the first non-finite step, in step order.

    Spikes and divergence are judged on the steps before the first non-finite one (after it, every value is a
    casualty, not a cause). ``grad`` is the total gradient norm at the same steps (None: not recorded);
    ``recorded`` marks the steps where it was measured (a sampled schedule, ``every=8``, leaves the others out:
    they are missing, neither calm nor non-finite; None: every step).
    """
    out: list[Event] = []
    if grad is not None and recorded is None:
        recorded = np.ones(len(loss), dtype=bool)
    bad = ~np.isfinite(loss) | ((recorded & ~np.isfinite(grad)) if grad is not None else np.zeros(len(loss), dtype=bool))
    end = int(np.argmax(bad)) if bad.any() else len(steps)
    if end < len(steps):
        out.append(Event("nonfinite", int(steps[end]), int(steps[-1]),
                         f"the loss or the gradient norm is non-finite from step {int(steps[end])}", {}))
    steps, loss = steps[:end], loss[:end]
    positive = bool(len(loss)) and bool((loss > 0).all())
    x = _log(loss) if positive else loss
    # judged from the 10th step on, as the total-norm spike test (Thresholds.spike_after): the first steps of
    # a warm-up move too fast for a median of fewer to mean anything
    z, med = robust_z(x, th.window, least=10)
    with np.errstate(divide="ignore", invalid="ignore"):  # a running median of 0 (a loss that reached 0): no ratio
        ratio = np.exp(x - med) if positive else loss / med
    loss_flag = (z > th.spike_z_above) & (ratio > th.loss_ratio_above) & _unprecedented(x - med, th)
    grad_flag = np.zeros(len(loss), dtype=bool)
    if grad is not None and recorded is not None:
        at = np.flatnonzero(recorded[:end])  # judged against the measured steps before it, as a series of its own
        gx = _log(grad[at])
        z_at, med_at = robust_z(gx, th.window, least=10)
        gz, grad_ratio = np.full(len(loss), np.nan), np.full(len(loss), np.nan)
        gz[at], grad_ratio[at] = z_at, np.exp(gx - med_at)
        grad_flag[at] = (z_at > th.spike_z_above) & (grad_ratio[at] > th.grad_ratio_above)
    clusters: list[list[int]] = []
    for i in np.flatnonzero(loss_flag | grad_flag).tolist():
        if clusters and i - clusters[-1][-1] <= 10:
            clusters[-1].append(i)
        else:
            clusters.append([i])
    for c in clusters:
        i = c[0]
        parts = []
        if loss_flag[i]:
            parts.append(f"the loss jumped to {sci(float(loss[i]))}, ×{ratio[i]:.2g} its median over the {th.window} "
                         f"steps before (robust z {z[i]:.0f})")
        if grad_flag[i]:
            parts.append(f"the total gradient norm jumped ×{grad_ratio[i]:.2g} its median (robust z {gz[i]:.0f})")
        more = f"; {len(c) - 1} more flagged step{'s' if len(c) > 2 else ''} up to step {int(steps[c[-1]])}" if len(c) > 1 else ""
        out.append(Event("spike", int(steps[i]), int(steps[c[-1]]), f"at step {int(steps[i])} " + " and ".join(parts) + more,
                         {"loss": float(loss[i]), "loss_ratio": float(ratio[i]), "spike_steps": float(len(c))}))
    if len(loss) >= 20:
        smooth = np.array([np.median(loss[max(0, j - 9): j + 1]) for j in range(len(loss))])  # trailing, 10 steps
        b = int(np.argmin(smooth))
        best, final = float(smooth[b]), float(smooth[-1])
        # what the run had gained before its best; nothing where the best is within the first 10 steps (round 11: a
        # GRU at SGD lr 20 went 3.9 → 51 at step 4 and stayed above chance; the first 10 steps' median held the
        # jump): then the loss must end further above its start (a GAN's generator loss rises as it learns)
        gained = float(np.median(loss[:10])) - best if b >= 10 else 0.0
        above = th.diverge_above if b >= 10 else th.diverge_from_start_above
        if best > 0 and final >= above * best and final - best >= th.diverge_lost_above * gained:
            onset = b + int(np.argmax(smooth[b:] >= th.diverge_above * best))
            out.append(Event("divergence", int(steps[onset]), int(steps[-1]),
                             f"the loss diverged: its running median (10 steps) rose from its best, {sci(best)} at step "
                             f"{int(steps[b])}, past ×{th.diverge_above:g} that at step {int(steps[onset])} and ended at "
                             f"{sci(final)}", {"loss_best": best, "loss_final": final, "best_step": float(steps[b])}))
    return sorted(out, key=lambda e: e.step)


def update_norms(run: Run, kind: str = "layer") -> tuple[str, Any] | None:
    """('update', series) of per-layer ‖Δw‖ = update_ratio · weight_norm, or ('gradient', grad_norm series); None.
    ``kind``: the entities read (``"param"``: per parameter)."""
    if {"update_ratio", "weight_norm"} <= set(run.quantities):
        ur, wn = run.series("update_ratio", kind), run.series("weight_norm", kind)
        names = [n for n in ur.names if n in wn.names]
        steps = np.intersect1d(ur.steps, wn.steps)
        a = ur.values[[ur.names.index(n) for n in names]][:, np.searchsorted(ur.steps, steps)]
        b = wn.values[[wn.names.index(n) for n in names]][:, np.searchsorted(wn.steps, steps)]
        return "update", (names, steps, a * b)
    if "grad_norm" in run.quantities:
        g = run.series("grad_norm", kind)
        return "gradient", (g.names, g.steps, g.values)
    return None


def first_movers(names: list[str], steps: np.ndarray, values: np.ndarray, t0: int,
                 th: InstabilityThresholds) -> list[tuple[str, int, float]]:
    """(layer, onset step, largest z) of the layers elevated at the event, earliest onset first (then by z).

    Each layer's log norm is scored against a calm baseline: the median and MAD
    (floor 1 %) of the ``window`` recorded steps before the ``lookback`` span
    (the first quarter of the steps up to ``t0`` when the run is younger). A
    layer is elevated when its z exceeds ``layer_z_above`` at one of the last
    3 recorded steps up to ``t0``; its onset is the first step of that unbroken
    elevated stretch, so a lone noisy step earlier in the span does not count.
    """
    rec = np.flatnonzero(steps <= t0)
    if len(rec) < 6:
        return []
    base = rec[steps[rec] <= t0 - th.lookback][-th.window:]
    if len(base) < 5:
        base = rec[: min(th.window, max(5, len(rec) // 4))]
    span = rec[rec > base[-1]]
    moved = []
    for name, row in zip(names, values):
        x = _log(row)
        calm = x[base][np.isfinite(x[base])]
        if len(calm) < 5 or not len(span):
            continue
        med = float(np.median(calm))
        z = (x[span] - med) / max(1.4826 * float(np.median(np.abs(calm - med))), 1e-2)
        up = np.nan_to_num(z, nan=-np.inf) > th.layer_z_above
        hits = np.flatnonzero(up)
        if not len(hits) or hits[-1] < len(span) - 3:
            continue
        k = hits[-1]
        while k > 0 and up[k - 1]:
            k -= 1
        moved.append((name, int(steps[span[k]]), float(np.max(z[k: hits[-1] + 1]))))
    return sorted(moved, key=lambda m: (m[1], -m[2]))


