"""What the attention probe's series say before an event: attention-logit growth, output-logit divergence.

:class:`ProbeSeries` reads the attention statistics back (from a stored run or from ``AttentionProbe.collect()``);
:func:`mechanisms` judges a span of them (Dehghani et al. 2023; Wortsman et al. 2023 §3.1–3.2).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from gradwatch.diagnosis.findings import sci
from gradwatch.diagnosis.instability_thresholds import InstabilityThresholds
from gradwatch.store import Run


@dataclass(frozen=True)
class ProbeSeries:
    """Attention and log-Z statistics over steps: ``values[(module, quantity)]`` is (heads, steps); log Z (1, steps)."""

    steps: np.ndarray
    values: dict[tuple[str, str], np.ndarray]

    @classmethod
    def from_collected(cls, collected: Mapping[int, Mapping[tuple[str, str, int | None], Any]]) -> ProbeSeries:
        """From ``{step: AttentionProbe.collect()}`` (tensors or numbers)."""
        steps = np.array(sorted(collected), dtype=np.int64)
        heads: dict[tuple[str, str], int] = {}
        for stats in collected.values():
            for layer, quantity, head in stats:
                heads[(layer, quantity)] = max(heads.get((layer, quantity), 0), (head or 0) + 1)
        values = {k: np.full((n, len(steps)), np.nan) for k, n in heads.items()}
        for j, step in enumerate(steps.tolist()):
            for (layer, quantity, head), v in collected[step].items():
                values[(layer, quantity)][head or 0, j] = float(v)
        return cls(steps, values)

    @classmethod
    def from_run(cls, run: Run) -> ProbeSeries | None:
        """From stored records: attention quantities of ``attention`` entities with ``pos`` = head, log Z at a
        ``layer`` without; None if none were recorded. Reads only what a ``RunView`` answers too (``entities``,
        ``temporal``, ``series``), so diagnose() may pass its view of the run."""
        from gradwatch.probes.attention_read import ATTENTION_QUANTITIES, LOGZ_QUANTITIES

        collected: dict[int, dict[tuple[str, str, int | None], float]] = {}
        for quantity in ATTENTION_QUANTITIES:
            if quantity not in run.quantities:
                continue
            for e in run.entities("attention"):
                t = run.temporal(e.name, quantity)  # (heads, steps)
                for j, step in enumerate(t.steps.tolist()):
                    for head, v in zip(t.names, t.values[:, j].tolist()):
                        if v == v:  # NaN: not measured at this step
                            collected.setdefault(step, {})[(e.name, quantity, int(head))] = v
        for quantity in LOGZ_QUANTITIES:
            if quantity in run.quantities:
                s = run.series(quantity)
                for name, row in zip(s.names, s.values):
                    for step, v in zip(s.steps.tolist(), row.tolist()):
                        if v == v:
                            collected.setdefault(step, {})[(name, quantity, None)] = v
        return cls.from_collected(collected) if collected else None

    def modules(self, quantity: str) -> list[str]:
        return [m for m, q in self.values if q == quantity]


@dataclass(frozen=True)
class Mechanism:
    """What the probes show over the span before an event: in words, with the remedies for it."""

    key: str  # "attention_logit_growth" or "output_logit_divergence"
    modules: tuple[str, ...]  # where: the attention modules, or the LM head
    words: str
    remedy_keys: tuple[str, ...]
    numbers: dict[str, float]
    source: str


def _span_idx(probes: ProbeSeries, t0: int, since: int) -> np.ndarray:
    """Probe samples in (since, t0]; with fewer than two, the earliest sample joins (growth needs a start)."""
    idx = np.flatnonzero((probes.steps > since) & (probes.steps <= t0))
    if len(idx) < 2 and len(probes.steps) and probes.steps[0] <= t0:
        idx = np.union1d([0], idx)
    return idx


# Attention logits whose rms is this large at step 0 did not start as q·k/√d of unit-scale queries and keys (about 1;
# measured: 0.5–0.7 in round 6's hand-written attention with the scale, 8–11 without it at d = 256).
START_RMS_ABOVE = 4.0


def mechanisms(probes: ProbeSeries | None, t0: int, th: InstabilityThresholds,
               since: int | None = None) -> list[Mechanism]:
    """Attention-logit growth and output-logit divergence over the probe samples in (``since``, ``t0``].

    ``since`` defaults to ``t0 − lookback``. Attention-logit growth needs all three of the issue's signs in one
    module: its max logit (over heads) reached ``attn_logit_above``, by growing ``logit_growth_above``-fold over
    the span, and at least one head went one-hot (entropy below ``entropy_below`` at the last sample): a healthy
    model can carry max logits near 10² with every head still spread.
    """
    if probes is None:
        return []
    idx = _span_idx(probes, t0, t0 - th.lookback if since is None else since)
    if len(idx) < 2:
        return []
    steps = probes.steps[idx]
    found: list[Mechanism] = []
    grown = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a module not measured at a step: all-NaN column
        for module in probes.modules("attn_logit_max"):
            top = np.nanmax(probes.values[(module, "attn_logit_max")][:, idx], axis=0)  # max over heads, per sample
            start, peak = float(top[0]), float(np.nanmax(top))
            growth = peak / start if start > 0 else math.inf
            ent = probes.values.get((module, "attn_entropy"))
            if ent is None:  # no entropy recorded: "one-hot" cannot be told, so neither can the mechanism
                continue
            sharp = [h for h, e in enumerate(ent[:, idx[-1]]) if e < th.entropy_below]
            if peak >= th.attn_logit_above and growth >= th.logit_growth_above and sharp:
                # the first sample with a logit past the bound and a one-hot head: when it happened
                hot = (top >= th.attn_logit_above) & (np.nanmin(ent[:, idx], axis=0) < th.entropy_below)
                grown.append((module, start, peak, growth, sharp, int(steps[int(np.argmax(hot))])))
    if grown:
        g = max(grown, key=lambda x: x[3])
        modules = ", ".join(m for m, *_ in grown)
        heads = "; ".join(f"{', '.join(map(str, x[4]))} of {x[0]}" for x in grown[:4]) + (" …" if len(grown) > 4 else "")
        n_sharp = sum(len(x[4]) for x in grown)
        words = (f"attention logits grew in {modules}: the max logit of {g[0]} rose ×{sci(g[3])} from {sci(g[1])} to "
                 f"{sci(g[2])} over steps {int(steps[0])}–{int(steps[-1])}; the attention entropy of "
                 f"head{'s' if n_sharp > 1 else ''} {heads} fell below {th.entropy_below:g} nats (one-hot)")
        keys: tuple[str, ...] = ("qk_layernorm", "sigma_reparam", "lower_lr")
        rms = probes.values.get((g[0], "attn_logit_rms"))
        first = float(np.nanmax(rms[:, 0])) if rms is not None and np.isfinite(rms[:, 0]).any() else math.nan
        if first >= START_RMS_ABOVE and probes.steps[0] == 0:
            words += (f"; they were large from the start (rms {sci(first)} at step 0, where q·k/√d of unit-scale "
                      f"queries and keys is about 1): a missing 1/√d scale, or queries and keys far from unit scale")
            keys = ("attention_scale",) + keys
        found.append(Mechanism("attention_logit_growth", tuple(x[0] for x in grown), words, keys,
                               {"attn_logit_peak": g[2], "attn_logit_growth": g[3], "attn_modules": float(len(grown)),
                                "sharp_heads": float(n_sharp), "attn_onset": float(min(x[5] for x in grown))},
                               f"attn_logit_max, attn_entropy (attention {modules}, steps {int(steps[0])}–{int(steps[-1])})"))
    for head in probes.modules("logz_mean"):
        logz = probes.values[(head, "logz_mean")][0, idx]
        k = int(np.nanargmax(np.abs(logz))) if np.isfinite(logz).any() else -1
        if k >= 0 and abs(float(logz[k])) >= th.logz_above:
            found.append(Mechanism(
                "output_logit_divergence", (head,),
                f"output-logit divergence: log Z at {head} drifted to {sci(float(logz[k]))} at step {int(steps[k])} "
                f"(from {sci(float(logz[0]))} at step {int(steps[0])})",
                ("z_loss", "lower_lr"), {"logz": float(logz[k])}, f"logz_mean ({head})"))
    return found


