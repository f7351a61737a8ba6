"""Loss spikes and divergence with attribution: when, which layers moved first, which mechanism the probes point to.

Pure: a stored run (and, until the watch records them, the attention probe's
series) in; :class:`~gradwatch.diagnosis.Finding` objects out. Robust running
statistics (median and MAD of the ``window`` recorded steps before each step,
on the log scale where a quantity is positive) flag

- a **spike**: the loss, or the total gradient norm, above that median by
  ``spike_z_above`` robust SDs (OLMo 2's stability monitor uses 6σ over 128
  steps) and by a factor (``loss_ratio_above``, ``grad_ratio_above``:
  llm-foundry's KillLossSpike uses 2× the last-100 mean);
- a **divergence**: the loss's running median climbs to ``diverge_above`` ×
  its best level and the run ends there;
- the first **non-finite** loss or gradient norm.

For each event the per-layer update norms ‖Δw‖ = update_ratio · weight_norm
(gradient norms where update ratios were not recorded) are scored the same
way over the ``lookback`` steps before it: the layers whose robust z first
crossed ``layer_z_above`` *moved first* (Molybog et al. 2023 and the Marin
32B retrospective saw update-norm spikes before loss spikes). The attention
probe's series over the same span name the mechanism: **attention-logit
growth** (Dehghani et al. 2023; Wortsman et al. 2023 §3.1: the max attention
logit rose by ``logit_growth_above`` to at least ``attn_logit_above``, with
the heads whose entropy fell below ``entropy_below``), remedied by
qk-layernorm; **output-logit divergence** (|log Z| at the LM head beyond
``logz_above``; Wortsman §3.2, PaLM), remedied by the z-loss; or none seen.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass, fields, replace
from typing import Any, Mapping

import numpy as np

from gradwatch._errors import bad_argument
from gradwatch.diagnosis.findings import Finding, sci
from gradwatch.diagnosis.remedies import remedies
from gradwatch.diagnosis.measures import flat_loss, total_grad_norm
from gradwatch.diagnosis.thresholds import Thresholds
from gradwatch.store import Run

_STEPS = frozenset({"window", "lookback"})


@dataclass(frozen=True)
class InstabilityThresholds:
    """Cut-offs of :func:`instability_findings`, named for the way they cut (fields of ``Thresholds`` once wired)."""

    window: int = 50  # recorded steps behind each robust median/MAD (OLMo: 128, llm-foundry: 100; short runs here)
    spike_z_above: float = 6.0  # OLMo 2's 6σ, as robust SDs (1.4826·MAD) on the log scale
    loss_ratio_above: float = 1.5  # and the loss at least ×1.5 its running median (llm-foundry: ×2 of the mean)
    grad_ratio_above: float = 4.0  # and the total gradient norm at least ×4 its running median
    diverge_above: float = 1.5  # the loss's running median ends ≥ ×1.5 its best running median: diverged
    lookback: int = 200  # steps before an event searched for the first movers and the mechanism
    layer_z_above: float = 3.5  # a layer's update norm this many robust SDs above its running median moved
    # A max attention logit of 10²: keys 10² below the top get e^−100 of the attention and no gradient through
    # the softmax in any float format. A large logit alone is no pathology: healthy runs measured here
    # (benchmarks/instability.py) reach ~10² with every head still spread (entropy ≥ 0.3 nats), so the finding
    # also needs a one-hot head; failing ones reach 10³–10⁵ with most heads one-hot.
    attn_logit_above: float = 100.0
    logit_growth_above: float = 5.0  # ... reached by growing ×5 or more over the lookback span
    entropy_below: float = 0.1  # nats: a head this sharp attends to one key (the 0.1; p_max ≳ 0.98)
    logz_above: float = 20.0  # |log Z| of the output softmax: bf16 keeps 8 bits, so log Z = 20 costs ±0.08 in logits

    def __post_init__(self) -> None:
        for f in fields(self):
            value: Any = getattr(self, f.name)
            if f.name in _STEPS:
                if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 1:
                    raise ValueError(bad_argument("InstabilityThresholds", f.name, "a positive int", value))
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(float(value)) and float(value) > 0):
                raise ValueError(bad_argument("InstabilityThresholds", f.name, "a positive finite number", value))
            if f.name.endswith("ratio_above") or f.name in ("diverge_above", "logit_growth_above"):
                if not float(value) > 1:
                    raise ValueError(bad_argument("InstabilityThresholds", f.name, "a ratio above 1", value))


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


def events(steps: np.ndarray, loss: np.ndarray, grad: np.ndarray | None, th: InstabilityThresholds) -> list[Event]:
    """Spikes (steps within 10 of each other clustered), a divergence and the first non-finite step, in step order.

    Spikes and divergence are judged on the steps before the first non-finite one (after it, every value is a
    casualty, not a cause). ``grad`` is the total gradient norm at the same steps (None: not recorded).
    """
    out: list[Event] = []
    bad = ~np.isfinite(loss) | (~np.isfinite(grad) if grad is not None else np.zeros(len(loss), dtype=bool))
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
    ratio = np.exp(x - med) if positive else loss / med
    loss_flag = (z > th.spike_z_above) & (ratio > th.loss_ratio_above)
    grad_flag = np.zeros(len(loss), dtype=bool)
    if grad is not None:
        gx = _log(grad[:end])
        gz, gmed = robust_z(gx, th.window, least=10)
        grad_ratio = np.exp(gx - gmed)
        grad_flag = (gz > th.spike_z_above) & (grad_ratio > th.grad_ratio_above)
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
        if best > 0 and final >= th.diverge_above * best:
            onset = b + int(np.argmax(smooth[b:] >= th.diverge_above * best))
            out.append(Event("divergence", int(steps[onset]), int(steps[-1]),
                             f"the loss diverged: its running median (10 steps) rose from its best, {sci(best)} at step "
                             f"{int(steps[b])}, past ×{th.diverge_above:g} that at step {int(steps[onset])} and ended at "
                             f"{sci(final)}", {"loss_best": best, "loss_final": final, "best_step": float(steps[b])}))
    return sorted(out, key=lambda e: e.step)


def update_norms(run: Run) -> tuple[str, Any] | None:
    """('update', series) of per-layer ‖Δw‖ = update_ratio · weight_norm, or ('gradient', grad_norm series); None."""
    if {"update_ratio", "weight_norm"} <= set(run.quantities):
        ur, wn = run.series("update_ratio"), run.series("weight_norm")
        names = [n for n in ur.names if n in wn.names]
        steps = np.intersect1d(ur.steps, wn.steps)
        a = ur.values[[ur.names.index(n) for n in names]][:, np.searchsorted(ur.steps, steps)]
        b = wn.values[[wn.names.index(n) for n in names]][:, np.searchsorted(wn.steps, steps)]
        return "update", (names, steps, a * b)
    if "grad_norm" in run.quantities:
        g = run.series("grad_norm")
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
        found.append(Mechanism("attention_logit_growth", tuple(x[0] for x in grown), words, ("qk_layernorm", "sigma_reparam", "lower_lr"),
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


_NO_MECHANISM = ("skip_step", "warmup", "clip_norm", "lower_lr")
QK_NORM_TYPES = frozenset({"HeadNorm", "NormedProjection", "NormedFusedQKV", "QKNormMultiheadAttention"})


def qk_normalised(module_types: set[str], layers: list[str]) -> bool:
    """Whether the model already normalises q and k: gradwatch's qk-layernorm classes, or a ``q_norm``/``k_norm``
    submodule (OLMo 2, Qwen3)."""
    return bool(module_types & QK_NORM_TYPES) or any(
        part in ("q_norm", "k_norm") for name in layers for part in name.split("."))


def _already_normalised(found: list[Finding], run: Run) -> list[Finding]:
    """In a model that normalises q and k already, attention-logit growth comes from the norms' gains:
    qk-layernorm leaves the remedies, and the cause says so."""
    types = set((getattr(run, "meta", {}) or {}).get("module_types") or ()) | {e.module for e in run.entities() if e.module}
    if not qk_normalised(types, [e.name for e in run.entities()]):
        return found
    out = []
    for f in found:
        if "qk_layernorm" in f.remedy_keys:
            keys = tuple(k for k in f.remedy_keys if k != "qk_layernorm")
            f = replace(f, remedies=remedies(*keys), cause=f.cause + " — the model already normalises q and k, "
                        "so the norms' learned gains carried the growth")
        out.append(f)
    return out


def _finding(ev: Event, movers: tuple[str, list[tuple[str, int, float]]] | None, mech: list[Mechanism],
             probes: ProbeSeries | None, severity: str, more: str = "") -> Finding:
    evidence = [ev.words + more]
    numbers = dict(ev.numbers, onset=float(ev.step))
    layers: tuple[str, ...] = ()
    sources = ["loss (run)", "grad_norm (every layer), total = √Σ layer²"]
    if movers is not None:
        what, moved = movers
        sources.append("update_ratio × weight_norm (layers)" if what == "update" else "grad_norm (layers)")
        if moved:
            layers = tuple(m[0] for m in moved[:3])
            shown = ", ".join(f"{n} (z {z:.0f} at step {s})" for n, s, z in moved[:3])
            evidence.append(f"the {what} norms rose first in {shown}"
                            + (f", {ev.step - moved[0][1]} steps before" if moved[0][1] < ev.step else ""))
            numbers.update(first_mover_step=float(moved[0][1]), first_mover_z=moved[0][2])
    if not layers:  # no first movers: the modules the mechanism is in
        layers = tuple(dict.fromkeys(name for m in mech for name in m.modules))
    for m in mech:
        evidence.append(m.words)
        numbers.update(m.numbers)
        numbers[m.key] = 1.0
        sources.append(m.source)
    if mech:
        cause = "; ".join({"attention_logit_growth": "attention-logit growth (Dehghani et al. 2023; Wortsman et al. 2023): "
                           "the attention goes one-hot and its gradient through the softmax vanishes",
                           "output_logit_divergence": "output-logit divergence (Wortsman et al. 2023; PaLM): log Z drifts "
                           "far from 0"}[m.key] for m in mech)
        keys = tuple(dict.fromkeys(k for m in mech for k in m.remedy_keys))
    else:
        cause = ("no attention or log-Z statistics were recorded: the mechanism cannot be told apart" if probes is None
                 else "the attention logits and log Z stayed in range: a sharp region of the loss surface or a bad batch")
        keys = _NO_MECHANISM
    name = {"spike": "loss spike", "divergence": "the loss diverged", "nonfinite": "the run went non-finite",
            "stall": "the loss did not fall", "attention": "the attention went one-hot"}[ev.kind]
    summary = f"{name} from step {ev.step}" + (f": {', '.join(m.key.replace('_', ' ') for m in mech)}" if mech else "")
    return Finding("exploding", severity, layers, (ev.step, ev.last), summary, "; ".join(evidence) + ".", cause,
                   remedies(*keys), numbers, tuple(sources))


def instability_findings(run: Run, thresholds: InstabilityThresholds | None = None,
                         probes: ProbeSeries | None = None) -> list[Finding]:
    """Spike, divergence, non-finite and stall findings of a run with a logged ``loss``, each attributed (see the module).

    ``probes``: the attention probe's series (``ProbeSeries.from_collected``);
    by default read from the run's records (kind ``attention``, head in
    ``pos``; ``logz_mean`` at the LM head). At most two findings: the first
    divergence or non-finite event (critical), or else attention-logit growth
    over the whole run (critical when the loss never fell, ``measures.flat_loss``;
    a warning otherwise; an output-logit divergence only when the loss never
    fell); and the spikes before it (the first one attributed; ``info`` when
    the loss came back within 10 % of its level before the spike, else a
    warning).

    Wiring (the lead's): ``diagnose()`` (diagnosis/rules.py) calls this on its
    ``view`` (a ``RunView`` answers all it reads) with ``InstabilityThresholds``
    (or their fields folded into ``Thresholds``) and adds the findings before
    ``by_effect``/``fit_architecture``; where ``over_steps.spike_findings``
    reports the same steps, keep this finding, which carries the mechanism.
    """
    th = InstabilityThresholds() if thresholds is None else thresholds
    if not isinstance(th, InstabilityThresholds):
        raise TypeError(bad_argument("instability_findings", "thresholds", "a gradwatch InstabilityThresholds", th))
    if "loss" not in run.quantities:
        return []
    probes = ProbeSeries.from_run(run) if probes is None else probes
    ls = run.series("loss", "run")
    steps, loss = ls.steps, ls.values[0]
    got = total_grad_norm(run)
    grad = None
    if got is not None:
        where = {int(s): v for s, v in zip(got[0].tolist(), got[1].tolist())}
        grad = np.array([where.get(int(s), np.nan) for s in steps])
        grad[np.isnan(grad) & np.isfinite(loss)] = np.nan
    evs = events(steps, loss, grad, th)
    got_norms = update_norms(run)

    def movers(t0: int) -> tuple[str, list[tuple[str, int, float]]] | None:
        if got_norms is None:
            return None
        what, (names, s, v) = got_norms
        return what, first_movers(names, s, v, t0, th)

    found = []
    serious = [e for e in evs if e.kind in ("divergence", "nonfinite")]
    end = serious[0].step if serious else math.inf
    if serious:
        ev = serious[0]
        more = "".join(f"; {e.words}" for e in serious[1:2])
        found.append(_finding(ev, movers(ev.step), mechanisms(probes, ev.step, th), probes, "critical", more))
    spikes = [e for e in evs if e.kind == "spike" and e.step < end]
    if spikes:
        ev = spikes[0]
        more = "" if len(spikes) == 1 else f"; {len(spikes) - 1} more spike{'s' if len(spikes) > 2 else ''}, at steps " + \
            ", ".join(str(e.step) for e in spikes[1:6]) + (" …" if len(spikes) > 6 else "")
        after = loss[(steps > ev.last) & (steps <= ev.last + th.window)]
        before = loss[(steps < ev.step) & (steps >= ev.step - th.window)]
        recovered = (not serious and len(after) and len(before)
                     and float(np.median(after)) <= 1.1 * float(np.median(before)))
        found.append(_finding(ev, movers(ev.step), mechanisms(probes, ev.step, th), probes,
                              "info" if recovered else "warning", more))
    if not serious and not any("attention_logit_growth" in f.numbers and f.severity != "info" for f in found):
        whole = _whole_run(run, int(steps[0]), int(steps[-1]), probes, th)
        if whole is not None:
            found.insert(0, whole)
    return _already_normalised(found, run)


def _whole_run(run: Run, first: int, last: int, probes: ProbeSeries | None, th: InstabilityThresholds) -> Finding | None:
    """Without a divergence: attention-logit growth over the whole run is a finding of its own (the attention
    went one-hot and stopped learning; critical when the loss never fell, ``measures.flat_loss``), and so is an
    output-logit divergence in a run whose loss never fell."""
    flat = flat_loss(run, Thresholds())
    mech = [m for m in mechanisms(probes, last, th, since=first - 1)
            if m.key == "attention_logit_growth" or flat is not None]
    if not mech:
        return None
    onset = int(min(m.numbers.get("attn_onset", last) for m in mech))
    loss = run.series("loss", "run").values[0]
    loss = loss[np.isfinite(loss)]
    start, end = float(np.median(loss[:10])), float(np.median(loss[-20:]))  # measures.flat_loss's medians
    words = (f"the loss did not fall: {sci(start)} over the first 10 steps, {sci(end)} over the last 20" if flat
             else f"the loss went from {sci(start)} (first 10 steps) to {sci(end)} (last 20; best {sci(float(loss.min()))}) "
             f"while the attention went one-hot from step {onset}")
    ev = Event("stall" if flat else "attention", onset, last, words, {"loss_first": start, "loss_final": end})
    return _finding(ev, None, mech, probes, "critical" if flat else "warning")
