"""Loss spikes and divergence with attribution: when, which layers moved first, which mechanism the probes point to.

Pure: a stored run (with the attention probe's records, when the watch
took them; or its series handed over) in; :class:`~gradwatch.diagnosis.Finding` objects out. Robust running
statistics (median and MAD of the ``window`` recorded steps before each step,
on the log scale where a quantity is positive) flag

- a **spike**: the loss, or the total gradient norm, above that median by
  ``spike_z_above`` robust SDs (OLMo 2's stability monitor uses 6σ over 128
  steps) and by a factor (``loss_ratio_above``, ``grad_ratio_above``:
  llm-foundry's KillLossSpike uses 2× the last-100 mean);
- a **divergence**: the loss's running median climbs to ``diverge_above`` ×
  its best level, giving back ``diverge_lost_above`` of what it had gained
  since its first 10 steps, and the run ends there;
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
from dataclasses import replace

import numpy as np

from gradwatch._errors import bad_argument
from gradwatch.diagnosis.architecture import module_types
from gradwatch.diagnosis.findings import Finding, sci
from gradwatch.diagnosis.instability_thresholds import InstabilityThresholds
from gradwatch.diagnosis.measures import flat_loss, total_grad_norm
from gradwatch.diagnosis.mechanisms import Mechanism, ProbeSeries, mechanisms
from gradwatch.diagnosis.remedies import remedies
from gradwatch.diagnosis.spikes import Event, events, first_movers, robust_z, update_norms
from gradwatch.diagnosis.thresholds import Thresholds
from gradwatch.store import Run

__all__ = ["Event", "InstabilityThresholds", "Mechanism", "ProbeSeries", "events", "first_movers", "instability_findings",
           "mechanisms", "qk_normalised", "robust_z", "update_norms"]


_NO_MECHANISM = ("skip_step", "warmup", "clip_norm", "lower_lr")
_DIVERGING = ("clip_norm", "lower_lr", "warmup", "skip_step")
QK_NORM_TYPES = frozenset({"HeadNorm", "NormedProjection", "NormedFusedQKV", "QKNormMultiheadAttention"})


def qk_normalised(module_types: set[str], layers: list[str]) -> bool:
    """Whether the model already normalises q and k: gradwatch's qk-layernorm classes, or a ``q_norm``/``k_norm``
    submodule (OLMo 2, Qwen3)."""
    return bool(module_types & QK_NORM_TYPES) or any(
        part in ("q_norm", "k_norm") for name in layers for part in name.split("."))


def _already_normalised(found: list[Finding], run: Run) -> list[Finding]:
    """In a model that normalises q and k already, attention-logit growth comes from the norms' gains:
    qk-layernorm leaves the remedies, and the cause says so."""
    if not qk_normalised(module_types(run), [e.name for e in run.entities()]):
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
             probes: ProbeSeries | None, severity: str, more: str = "", attends: bool = True) -> Finding:
    """``attends``: the model has attention (or a Transformer layer), whose statistics could have told the mechanism."""
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
        cause = ("unstable steps: a sharp region of the loss surface, a bad batch or a learning rate too large for it"
                 if probes is None and not attends else
                 "no attention or log-Z statistics were recorded: the mechanism cannot be told apart" if probes is None
                 else "the attention logits and log Z stayed in range: a sharp region of the loss surface or a bad batch")
        # a loss that climbs step after step has no outlier step to skip: the bound on the step and its size first
        # (round 45: d2l's grad_clipping handed a generator, so nothing was clipped, at SGD lr 100 — its loss at
        # 10³ from step 1, told "skip the outlier steps" first)
        keys = _DIVERGING if ev.kind == "divergence" else _NO_MECHANISM
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
    the loss came back -- within 10 % of its level before the spike, a tenth
    of the progress made until then, or by the run's end -- else a warning).

    ``diagnose()`` (diagnosis/rules.py) calls this on its ``view`` with
    ``Thresholds.instability`` and folds ``over_steps.spike_findings``' finding
    at the same steps into it (``rules.merge_spikes``).
    """
    th = InstabilityThresholds() if thresholds is None else thresholds
    if not isinstance(th, InstabilityThresholds):
        raise TypeError(bad_argument("instability_findings", "thresholds", "a gradwatch InstabilityThresholds", th))
    if "loss" not in run.quantities:
        return []
    probes = ProbeSeries.from_run(run) if probes is None else probes
    ls = run.series("loss", "run")
    steps, loss = ls.steps, ls.values[0]
    if not len(steps):  # a view that ends before the first logged loss (NaN from step 0)
        return []
    got = total_grad_norm(run)
    grad, recorded = None, None
    if got is not None:
        where = {int(s): v for s, v in zip(got[0].tolist(), got[1].tolist())}
        grad = np.array([where.get(int(s), np.nan) for s in steps])
        recorded = np.array([int(s) in where for s in steps], dtype=bool)  # a sampled schedule leaves steps out
    if grad is not None and np.isfinite(grad).any() and not np.nanmax(np.abs(grad)) > 0:
        return []  # no parameter moves: the loss changes with the batch alone (the stall rule speaks)
    evs = events(steps, loss, grad, th, recorded)
    got_norms = update_norms(run)

    def movers(t0: int) -> tuple[str, list[tuple[str, int, float]]] | None:
        if got_norms is None:
            return None
        what, (names, s, v) = got_norms
        return what, first_movers(names, s, v, t0, th)

    found = []
    attends = probes is not None or any("Attention" in t or "Transformer" in t for t in module_types(run))
    serious = [e for e in evs if e.kind in ("divergence", "nonfinite")]
    end = serious[0].step if serious else math.inf
    if serious:
        ev = serious[0]
        more = "".join(f"; {e.words}" for e in serious[1:2])
        found.append(_finding(ev, movers(ev.step), mechanisms(probes, ev.step, th), probes, "critical", more, attends))
    spikes = [e for e in evs if e.kind == "spike" and e.step < end]
    if spikes:
        ev = spikes[0]
        more = "" if len(spikes) == 1 else f"; {len(spikes) - 1} more spike{'s' if len(spikes) > 2 else ''}, at steps " + \
            ", ".join(str(e.step) for e in spikes[1:6]) + (" …" if len(spikes) > 6 else "")
        after = loss[(steps > ev.last) & (steps <= ev.last + th.window)]
        before = loss[(steps < ev.step) & (steps >= ev.step - th.window)]
        recovered = not serious and len(after) and len(before) and _recovered(loss, before, after)
        found.append(_finding(ev, movers(ev.step), mechanisms(probes, ev.step, th), probes,
                              "info" if recovered else "warning", more, attends))
    if not serious and not any("attention_logit_growth" in f.numbers and f.severity != "info" for f in found):
        whole = _whole_run(run, int(steps[0]), int(steps[-1]), probes, th)
        if whole is not None:
            found.insert(0, whole)
    return _already_normalised(found, run)


def _recovered(loss: np.ndarray, before: np.ndarray, after: np.ndarray) -> bool:
    """The loss came back after a spike: within 10 % of its level before it, or having given back at most a tenth
    of the progress made until then, or the run went on to end (median of its last 10 %) no higher than it was
    before the spike. Severity follows the effect on training: a run that learns through its spikes is told of
    them (info), not warned."""
    was, now = float(np.median(before)), float(np.median(after))
    ok = loss[np.isfinite(loss)]
    if not len(ok):
        return False
    start, end = float(np.median(ok[:10])), float(np.median(ok[-max(10, len(ok) // 10):]))
    return now <= 1.1 * was or (start > was and now <= was + 0.1 * (start - was)) or end <= was


def _whole_run(run: Run, first: int, last: int, probes: ProbeSeries | None, th: InstabilityThresholds) -> Finding | None:
    """Without a divergence: attention-logit growth over the whole run is a finding of its own (the attention
    went one-hot and stopped learning; critical when the loss never fell, ``measures.flat_loss``; info when it
    fell to ``SOLVED_BELOW`` of its start or less), and so is an output-logit divergence in a run whose loss never
    fell."""
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
    solved = not flat and start > 0 and end <= SOLVED_BELOW * start
    if solved:  # round 8's Pre-LN recall task at lr 0.1: one-hot attention on the token to recall is the answer
        words += f": a loss that fell to {sci(end / start)} of its start, the one-hot attention is what it learned"
    ev = Event("stall" if flat else "attention", onset, last, words, {"loss_first": start, "loss_final": end})
    return _finding(ev, None, mech, probes, "critical" if flat else "info" if solved else "warning")


# A loss at a tenth of its start or less (the units rules' "learned"): attention that went one-hot on the way is what
# the task asked of it (info only). Runs whose one-hot attention stalls them fall short of it: the lr-0.1 proxy
# language model, the digit rows attended without 1/√d (held-out 0.65–0.87).
SOLVED_BELOW = 0.1
