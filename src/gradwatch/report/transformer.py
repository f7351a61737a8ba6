"""The report's Transformer pages: per-head attention heat maps and a spike timeline, when the run has them.

- **Attention**: one row per (attention module, head), one column per
  recorded step: log₁₀ of the max attention logit (``attn_logit_max``) and
  the attention entropy in nats (``attn_entropy``); growth to 10²–10⁵ with
  the entropy falling to 0 is the attention going one-hot (Dehghani et al.
  2023; Wortsman et al. 2023).
- **Spike timeline**: around the first event — a flight-recorder event
  (``meta["flight"]["events"]``) or the first instability finding's onset —
  the loss, the total gradient norm and every layer's update-norm robust z
  (log ‖Δw‖, or log gradient norm where update ratios are not recorded,
  against the median/MAD of its ``window`` recorded steps before;
  :func:`gradwatch.diagnosis.spikes.robust_z`), so the layers that moved
  first show as the rows that turn red before the line.
"""

from __future__ import annotations

import numpy as np

from gradwatch import plots
from gradwatch.diagnosis import Diagnosis
from gradwatch.diagnosis.measures import total_grad_norm
from gradwatch.diagnosis.mechanisms import ProbeSeries
from gradwatch.diagnosis.spikes import robust_z, update_norms
from gradwatch.store import Run, Series

BEFORE, AFTER = 100, 30  # steps shown around the event


def head_series(probes: ProbeSeries, quantity: str) -> Series | None:
    """(module · head) × steps of one attention quantity."""
    names, rows = [], []
    for module in probes.modules(quantity):
        values = probes.values[(module, quantity)]
        for h, row in enumerate(values):
            names.append(f"{module} · head {h}")
            rows.append(row)
    if not rows:
        return None
    return Series(quantity, names, probes.steps, np.array(rows))


def event_steps(run: Run, diagnosis: Diagnosis) -> list[int]:
    """The flight recorder's events, else the onset of the first instability finding (a spike or divergence)."""
    flight = ((run.meta or {}).get("flight") or {}).get("events") or []
    if flight:
        return [int(s) for s in flight]
    for f in diagnosis.findings:
        if f.kind == "exploding" and ("loss_ratio" in f.numbers or "loss_best" in f.numbers):
            return [int(f.numbers.get("onset", f.steps[0]))]
    return []


def update_z(run: Run, window: int, lo: int, hi: int) -> Series | None:
    """Per-layer robust z of the log update (or gradient) norm at each recorded step in [lo, hi]."""
    got = update_norms(run)
    if got is None:
        return None
    what, (names, steps, values) = got
    with np.errstate(all="ignore"):
        z = np.array([robust_z(np.log(row), window)[0] for row in values]).reshape(len(names), len(steps))
    keep = (steps >= lo) & (steps <= hi)
    return Series(f"z of log ‖Δw‖" if what == "update" else "z of log grad_norm", list(names), steps[keep], z[:, keep])


def figures(run: Run, diagnosis: Diagnosis) -> list[tuple[str, str, str]]:
    """(id, svg, caption) of the attention heat maps and the spike timeline this run has records for."""
    out = []
    probes = ProbeSeries.from_run(run)
    if probes is not None:
        for quantity, fig_id, title, log, cmap, label in (
                ("attn_logit_max", "attention-logits", "log₁₀ max attention logit per head", True, "viridis", ""),
                ("attn_entropy", "attention-entropy", "attention entropy per head (nats)", False, "magma", "nats")):
            s = head_series(probes, quantity)
            if s is not None:
                out.append((fig_id, plots.heatmap(s, title, log=log, cmap=cmap, label=label, vmin=None if log else 0),
                            f"{quantity} of every head of every attention module, steps "
                            f"{int(s.steps[0])}–{int(s.steps[-1])}, {len(s.steps)} recorded."))
    events = event_steps(run, diagnosis)
    if events and "loss" in run.quantities:
        t0 = events[0]
        lo, hi = t0 - BEFORE, t0 + AFTER
        loss = run.series("loss", "run")
        keep = (loss.steps >= lo) & (loss.steps <= hi)
        steps = loss.steps[keep]
        total = None
        got = total_grad_norm(run)
        if got is not None:
            where = dict(zip(got[0].tolist(), got[1].tolist()))
            total = np.array([where.get(int(s), np.nan) for s in steps])
        z = update_z(run, diagnosis_window(), lo, hi)
        svg = plots.timeline(steps, loss.values[0][keep], total, z, [e for e in events if lo <= e <= hi],
                             f"spike timeline around step {t0}")
        out.append(("spike-timeline", svg, f"loss, total gradient norm and per-layer {z.quantity if z else 'z'} "
                    f"(robust z against the steps before), steps {int(steps[0])}–{int(steps[-1])}; dashed: the "
                    f"event{'s' if len(events) > 1 else ''} at step {', '.join(map(str, events[:5]))}."))
    return out


def diagnosis_window() -> int:
    """The robust statistics' window, as the instability rules take it."""
    from gradwatch.diagnosis.instability_thresholds import InstabilityThresholds

    return InstabilityThresholds().window


def lines(run: Run, diagnosis: Diagnosis) -> list[str]:
    """The terminal's summary of the same: the largest attention logit and smallest entropy per module, the events."""
    out = []
    probes = ProbeSeries.from_run(run)
    if probes is not None:
        for module in probes.modules("attn_logit_max"):
            top = probes.values[(module, "attn_logit_max")]
            ent = probes.values.get((module, "attn_entropy"))
            h, j = np.unravel_index(np.nanargmax(top), top.shape)
            sharp = "" if ent is None else f", entropy at the last sample {np.nanmin(ent[:, -1]):.2g}–{np.nanmax(ent[:, -1]):.2g} nats"
            out.append(f"attention {module}: max logit {top[h, j]:.3g} (head {h}, step {int(probes.steps[j])}){sharp}")
    events = event_steps(run, diagnosis)
    if events:
        out.append(f"events (flight recorder / spike onset): steps {', '.join(map(str, events[:8]))}")
    return out
