"""Vanishing and exploding across depth: the profile of ‖∂L/∂a‖ over layers, now and in episodes over the run.

Depth findings are judged on ‖∂L/∂a‖ (``out_grad_norm``), the back-propagated
gradient at each layer's output, and fall back on the weight-gradient norm
only when it was not recorded (DESIGN.md: the weight gradient also scales
with the layer's input). The cut, the affected stretch, the halving fit and
the cause split are :mod:`gradwatch.diagnosis.measures`', as ``gw.check``'s are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from gradwatch.diagnosis.findings import Finding, layer_name, sci, span
from gradwatch.diagnosis.measures import (
    Between, Cause, affected_upto, by_lag, cause_split, depth_verdict, flat_loss, layers_per_halving, real_fit,
    window_median,
)
from gradwatch.diagnosis.remedies import remedies
from gradwatch.diagnosis.thresholds import Thresholds
from gradwatch.diagnosis.view import RunView, episodes, since, steps_text
from gradwatch.store import Entity, Run, Series


@dataclass
class Profile:
    """The depth profile of the back-propagated gradient over the window."""

    quantity: str
    names: list[str]
    median: np.ndarray  # per layer, window median
    ratio: np.ndarray  # per recorded step: first layer over last layer
    steps: np.ndarray
    window_steps: np.ndarray


def profile(run: Run, th: Thresholds) -> Profile | None:
    """The profile of ``out_grad_norm`` (``grad_norm`` when it was not recorded) over the layers measured; None below two."""
    quantity = "out_grad_norm" if "out_grad_norm" in run.quantities else "grad_norm"
    if quantity not in run.quantities:
        return None
    s = run.series(quantity)
    rows = [i for i in range(len(s.names)) if np.isfinite(s.values[i]).any()]
    if len(rows) < 2:
        return None
    values = s.values[rows]
    med, wsteps = window_median(Series(quantity, [s.names[i] for i in rows], s.steps, values), th.window)
    with np.errstate(all="ignore"):
        ratio = values[0] / values[-1]
    return Profile(quantity, [s.names[i] for i in rows], med, ratio, s.steps, wsteps)


def _between(entities: list[Entity], a: str, b: str) -> list[str]:
    """Activation modules whose output comes after layer ``a``'s and before layer ``b``'s."""
    depth = {e.name: e.depth for e in entities if e.kind == "layer"}
    da, db = depth.get(a), depth.get(b)
    if da is None or db is None:
        return []
    return [e.name for e in entities if e.kind == "activation" and e.depth is not None and da < e.depth < db]


def _cause(run: Run, prof: Profile, upto: int, th: Thresholds, vanishing: bool) -> tuple[Cause, list[str]]:
    """The cause of the change across layers 0..upto+1, from the activations' window medians; and its sources."""
    entities = run.entities()
    module = {e.name: e.module or "" for e in entities}
    acts: dict[str, dict[str, float]] = {}
    for q in ("deriv_rms", "saturated_frac", "dead_frac"):
        if q in run.quantities:
            s = run.series(q, "activation")
            med, _ = window_median(s, th.window)
            acts[q] = dict(zip(s.names, med))
    pairs = []
    for i in range(min(upto + 1, len(prof.names) - 1)):
        pairs.append([Between(b, module.get(b, ""), *(acts.get(q, {}).get(b, math.nan)
                                                     for q in ("deriv_rms", "saturated_frac", "dead_frac")))
                      for b in _between(entities, prof.names[i], prof.names[i + 1])])
    custom = frozenset((getattr(run, "meta", None) or {}).get("custom_functions") or ())  # a user's autograd.Function
    cause = cause_split(prof.median[: len(pairs) + 1], pairs, th, vanishing, custom)
    sources = []
    if any(pairs) and "deriv_rms" in acts:
        sources.append(f"deriv_rms, saturated_frac/dead_frac (activations {span([b.name for p in pairs for b in p])}, "
                       f"{steps_text(int(prof.window_steps[0]), int(prof.window_steps[-1]))})")
    return cause, sources


def _halving(prof: Profile, upto: int) -> float | None:
    """Layers per halving over layers 0..upto+1, only when the fit is a real trend."""
    values = prof.median[: upto + 2]
    k = layers_per_halving(values)
    return k if k is not None and real_fit(values) else None  # no real trend: say what the profile does instead


def depth_findings(run: Run, th: Thresholds) -> list[Finding]:
    """Vanishing or exploding across depth over the last ``window`` steps: the first layer's ‖∂L/∂a‖ against the last's."""
    prof = profile(run, th)
    if prof is None:
        return []
    first, last = prof.median[0], prof.median[-1]
    if not (last > 0 and math.isfinite(last) and math.isfinite(first)):
        return []
    ratio = first / last
    verdict = depth_verdict(ratio, th)
    if verdict == "trainable":
        return []
    vanishing = verdict == "vanishing"
    n = len(prof.names)
    source = (f"{prof.quantity} (layers {span(prof.names)}, "
              f"{steps_text(int(prof.window_steps[0]), int(prof.window_steps[-1]))})")
    caveat = "" if prof.quantity == "out_grad_norm" else " (weight-gradient norms: the back-propagated gradient was not recorded)"
    with np.errstate(all="ignore"):
        rel = prof.median / last
    upto = affected_upto(rel, vanishing, th)
    layers = tuple(prof.names[: upto + 1])
    k = _halving(prof, upto)
    cause, sources = _cause(run, prof, upto, th, vanishing)
    numbers = cause.numbers
    seen = np.isfinite(prof.ratio)  # samples where both ends were measured
    start = since(prof.ratio[seen] < th.vanish_below if vanishing else prof.ratio[seen] > th.explode_above,
                  prof.steps[seen], th.window)
    at = (f"‖∂L/∂a‖ at layer {layer_name(prof.names[0])} is {sci(first)} against {sci(last)} at layer "
          f"{layer_name(prof.names[-1])}{caveat}")
    looped = _called_in_a_loop(run, prof.names[: upto + 2])
    skip = None
    if looped:  # the stretch crosses a module's repeated calls: no rate per layer, and no activation "between" them
        k = None
        cause_words = (f"the repeated calls of {span(list(looped))}: one module applied again to its own output "
                       f"{max(looped.values())} times in each forward pass, and the gradient passes its Jacobian "
                       f"once per call (the finding through time measures the rate per call)")
        skip = None if vanishing else _skip_path_growth(run, list(looped))
        if skip is not None:
            name, per_call, lam = skip
            cause_words = (f"the update around the repeated calls of {name} amplifies by itself: ‖∂L/∂a‖ at its "
                           f"output grows ×{sci(per_call)} a call (backwards) while its weights' spectral norm is "
                           f"{sci(lam)}, so its own path can pass at most about ×{sci(lam)}; the rest is the path that "
                           f"skips it — an explicit update h + dt·f(h) whose linear part (a decay −λ·h, the skip) "
                           f"multiplies the gradient by more than 1 a step: a step dt too large for the dynamics "
                           f"(explicit Euler is stable only for dt·λ < 2; Hairer & Wanner, Solving ODEs II, §IV.2)")
    if vanishing:
        zero = [prof.names[i] for i in range(n) if prof.median[i] == 0]
        if zero:
            change = f"{span(zero)} receive{'s' if len(zero) == 1 else ''} no gradient at all (exactly 0)"
        elif looped:
            change = (f"it falls ×{sci(float(rel[upto]))} from layer {layer_name(prof.names[upto + 1])} down to layer "
                      f"{layer_name(prof.names[0])}, across the {max(looped.values())} calls of {span(list(looped))}")
        elif k is not None and k > 0:
            change = (f"the gradient halves every {k:.2g} layers (×{2 ** (-1 / k):.2g} per layer) from layer "
                      f"{layer_name(prof.names[upto])} down to layer {layer_name(prof.names[0])}")
        else:
            low = int(np.nanargmin(rel[: upto + 1]))
            change = (f"layers {span(layers)} get less than {th.affected_below:g}× the last layer's gradient, with no "
                      f"steady decay across depth to fit (lowest, {sci(float(rel[low]))}×, at layer {layer_name(prof.names[low])})")
        numbers.update(ratio=ratio, halving_layers=k if k else math.nan)
        severity = "critical" if ratio < th.vanish_below**2 else "warning"
    else:
        change = (f"the gradient doubles every {-k:.2g} layers towards the input (×{2 ** (-1 / k):.2g} per layer)"
                  if k is not None and k < 0 else f"layers {span(layers)} get more than {th.affected_above:g}× the last layer's")
        numbers.update(ratio=ratio, doubling_layers=-k if k else math.nan,
                       growth_per_layer=2 ** (-1 / k) if k is not None and k < 0 else math.nan)
        severity = "critical"
    return [Finding(
        kind=verdict, severity=severity, layers=layers, steps=(start, int(prof.steps[-1])),
        summary=(f"the gradient reaching layer {layer_name(prof.names[0])} is {sci(ratio)}"
                 f"{' of' if vanishing else '×'} the last layer's, since step {start}"),
        evidence=f"{at}; {change}.",
        cause=cause_words if looped else cause.words,
        remedies=remedies(*(("smaller_step",) if skip is not None else LOOP_REMEDIES) if looped else cause.remedy_keys),
        numbers=numbers,
        sources=(source, *sources), cause_key="loop" if looped else cause.key,
    )]


LOOP_REMEDIES = ("orthogonal_rnn", "residual", "orthogonal_init")  # a module's calls in a loop: keep its Jacobian
# norm-preserving (Haber & Ruthotto 2017: the step h + δ·σ(Wh + b) for a block applied many times)
RNN_MODULES = frozenset({"RNN", "LSTM", "GRU"})  # recurrent modules that loop inside one call


SKIP_PATH_ABOVE = 2.0  # growth per call over the looped layer's spectral norm beyond which its own path cannot explain it


def _skip_path_growth(run: Run, looped: list[str]) -> tuple[str, float, float] | None:
    """(layer, ‖∂L/∂a‖'s growth per call backwards, its weights' λ₁) for a layer called in a loop whose gradient
    grows per call more than :data:`SKIP_PATH_ABOVE` × λ₁ (meta-free: the temporal record and ``lambda1``): the path
    through the layer passes at most about λ₁ (a unit's derivative ≤ 1, a step ≤ 1), so the growth is the update's
    own. The growth is the median ratio of consecutive calls' norms where both are positive (late calls whose units
    saturated pass 0). Round 17: a stiff neural ODE under explicit Euler, dt·λ_max = 10: ×9–14 a call against
    λ₁(W) = 1.07, and "the repeated calls of W" told orthogonal weights, which cannot help."""
    if "lambda1" not in run.quantities:
        return None
    lam = run.series("lambda1", "recurrent")
    for name in looped:
        if name not in lam.names:
            continue
        l1 = lam.values[lam.names.index(name)]
        l1 = float(np.nanmedian(l1)) if np.isfinite(l1).any() else math.nan
        t = run.temporal(name)  # (calls, steps), the first call first
        ratios = [a / b for col in t.values.T for a, b in zip(col[:-1], col[1:]) if a > 0 and b > 0
                  and math.isfinite(a) and math.isfinite(b)]
        if not ratios or not l1 > 0:
            continue
        per_call = float(np.median(ratios))
        if per_call > SKIP_PATH_ABOVE * max(l1, 1.0):
            return name, per_call, l1
    return None


def _called_in_a_loop(run: Run, names: list[str]) -> dict[str, int]:
    """The layers among ``names`` called more than once in one forward pass (a cell, or any block applied to its own
    output in a Python loop; nn.RNN/LSTM/GRU loop inside one call), with their number of calls (the temporal
    record's positions). Round 15: one Linear + tanh applied 30 times was told "halves every 0.044 layers … from
    layer enc down to layer enc" and "no activation module is visible" beside its measured tanh."""
    calls = {}
    for e in run.entities("recurrent"):
        if e.name in names and e.module not in RNN_MODULES:
            s = by_lag(run.temporal(e.name))
            if len(s.names) > 1:
                calls[e.name] = int(s.names[0]) + 1
    return calls


def centred_ratio(run: Run, th: Thresholds) -> tuple[np.ndarray, np.ndarray] | None:
    """(steps, first/last ‖∂L/∂a‖ as a centred median over ``window`` samples), at the steps where it was measured."""
    prof = profile(run, th)
    if prof is None:
        return None
    ok = np.isfinite(prof.ratio)
    steps, ratio = prof.steps[ok], prof.ratio[ok]
    h = th.window // 2
    smooth = np.array([np.median(ratio[max(0, j - h): j + h + 1]) for j in range(len(ratio))])
    return steps, smooth


def past_depth_findings(run: Run, th: Thresholds, current: list[Finding]) -> list[Finding]:
    """Depth episodes over the whole run that ended before its last steps: "from step a to b, then recovered".

    A step belongs to a vanishing (exploding) episode when the first/last ratio, as a centred median over
    ``window`` measured steps, is below ``vanish_below`` (above ``explode_above``); an episode lasts at least
    ``window`` measured steps. The one that reaches the end of the run is the current finding's (its "since").
    Each past episode is judged as a run of its own steps (its medians, its layers, its cause); it is ``info``
    unless the run shows damage after it: a loss back at its start (severity then follows the effect), dead
    units or stalled layers that are problems now.
    """
    got = centred_ratio(run, th)
    if got is None:
        return []
    steps, smooth = got
    found = []
    damage = [f for f in current if f.severity != "info" and f.kind in ("dead_units", "stalled")]
    flat = flat_loss(run, th)
    for kind, flags in (("vanishing", smooth < th.vanish_below), ("exploding", smooth > th.explode_above)):
        if any(f.kind == kind and f.layers for f in current):
            continue  # it holds now: the current finding covers the run (earlier episodes are noted in it)
        for i, j in episodes(flags, th.window):
            a, b = int(steps[i]), int(steps[j])
            view: Run = RunView(run, b + 1, start=a)  # type: ignore[assignment]
            got_f = [f for f in depth_findings(view, replace(th, window=j - i + 1)) if f.kind == kind]
            if not got_f:
                continue
            f = got_f[0]
            after = f"then recovered (the ratio is {sci(float(smooth[-1]))} at the end)"
            hurt = "; ".join([f"{d.kind} now in {span(d.layers)}" for d in damage]
                             + ([f"the loss is back at its start ({sci(flat[0])} → {sci(flat[1])})"] if flat else []))
            found.append(replace(
                f, severity="warning" if hurt else "info", steps=(a, b),
                summary=f.summary.split(", since step")[0] + f", from step {a} to {b}, then recovered",
                evidence=f.evidence.rstrip(".") + f" (medians over steps {a}–{b}); {after}"
                + (f"; it left damage: {hurt}" if hurt else " (info only)") + ".",
                remedies=f.remedies if hurt else (),
                numbers={**f.numbers, "episode_first": float(a), "episode_last": float(b)},
            ))
    return found


def earlier_episodes(found: list[Finding], run: Run, th: Thresholds) -> list[Finding]:
    """A depth finding that holds now notes the earlier episodes of its kind (steps where the ratio was beyond
    its cut before the final stretch), so one finding covers the whole run."""
    got = centred_ratio(run, th)
    if got is None:
        return found
    steps, smooth = got
    out = []
    for f in found:
        if f.layers and f.kind in ("vanishing", "exploding") and f.sources and f.sources[0].startswith(("out_grad_norm", "grad_norm")):
            flags = smooth < th.vanish_below if f.kind == "vanishing" else smooth > th.explode_above
            before = [(int(steps[i]), int(steps[j])) for i, j in episodes(flags, th.window) if int(steps[j]) < f.steps[0]]
            if before:
                text = ", ".join(steps_text(a, b) for a, b in before)
                f = replace(f, evidence=f.evidence.rstrip(".") + f"; earlier, also beyond the cut at {text}.")
        out.append(f)
    return out
