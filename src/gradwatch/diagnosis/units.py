"""Units and layers that fail on their own: saturated units, dead units, layers whose weights stall."""

from __future__ import annotations

import math

import numpy as np

from gradwatch.diagnosis.depth import profile
from gradwatch.diagnosis.findings import Finding, sci, span
from gradwatch.diagnosis.measures import FLAT_LOSS_ABOVE, loss_ends, window_median
from gradwatch.diagnosis.remedies import remedies
from gradwatch.diagnosis.thresholds import Thresholds
from gradwatch.diagnosis.view import since, steps_text
from gradwatch.store import Run


def activation_findings(run: Run, th: Thresholds) -> list[Finding]:
    """Saturation (``saturated_frac`` above ``saturated_above``) and dead units (``dead_frac`` above ``dead_above``)."""
    found = []
    for quantity, kind, bound in (("saturated_frac", "saturation", th.saturated_above), ("dead_frac", "dead_units", th.dead_above)):
        if quantity not in run.quantities:
            continue
        s = run.series(quantity, "activation")
        med, wsteps = window_median(s, th.window)
        hit = [i for i in range(len(s.names)) if med[i] > bound]
        if not hit:
            continue
        names = tuple(s.names[i] for i in hit)
        flags = np.nan_to_num(s.values[hit], nan=0.0).mean(axis=0) > bound
        start = since(flags, s.steps)
        modules = sorted({e.module or "" for e in run.entities("activation") if e.name in names})
        frac = float(np.mean(med[hit]))
        rms = ""
        if "deriv_rms" in run.quantities:
            d = run.series("deriv_rms", "activation")
            dn = dict(zip(d.names, window_median(d, th.window)[0]))
            vals = [dn[n] for n in names if n in dn and math.isfinite(dn[n])]
            if vals:
                rms = f"; they pass on ×{sci(float(np.mean(vals)))} of the gradient (rms derivative)"
        where = f"{len(names)} {'/'.join(modules)} module{'s' if len(names) > 1 else ''} ({span(names)})"
        over = steps_text(int(wsteps[0]), int(wsteps[-1]))
        if kind == "saturation":
            summary = f"{frac:.0%} of the units of {span(names)} sit in the flat tails"
            evidence = (f"saturated fraction (φ' < 2 % of its peak) above {bound:g} in {where}, "
                        f"{frac:.0%} on average over {over}{rms}")
            cause = "pre-activations too large for the activation: weights initialised or grown too large"
            fixes = remedies("smaller_init", "norm", "relu", "lower_lr")
        else:
            summary = f"{frac:.0%} of the units of {span(names)} are dead"
            evidence = (f"units silent for whole batches above {bound:g} in {where}, {frac:.0%} on average "
                        f"over {over}{rms}")
            cause = "pre-activations negative for every input: negative biases, a large step that pushed them there, or a poor initialisation"
            fixes = remedies("leaky", "zero_bias", "he_init", "lower_lr", "norm")
        hurt, effect, numbers = _unit_effect(run, names, th)
        found.append(Finding(
            kind=kind, severity="warning" if hurt else "info", layers=names, steps=(start, int(s.steps[-1])),
            summary=summary, evidence=evidence + "; " + effect + ".", cause=cause, remedies=fixes if hurt else (),
            numbers={quantity: frac, **numbers},
            sources=(f"{quantity} (activations {span(s.names)}, {over})",),
        ))
    return found


def _unit_effect(run: Run, acts: tuple[str, ...], th: Thresholds) -> tuple[bool, str, dict[str, float]]:
    """Is the gradient through these activation modules hurt? (hurt, the measurement in words, its numbers).

    Saturated or dead units only matter when they cost the gradient: it decays
    across the stretch of layers they sit in (‖∂L/∂a‖ of the last layer below
    the stretch, not feeding one of them, over that of the first layer after
    it, below ``affected_below``), or the loss does not fall. A residual net whose skip path carries the gradient past
    them is not hurt. When the profile around them was not measured, they are
    taken to hurt (nothing measured says otherwise).
    """
    prof = profile(run, th)
    depth = {e.name: e.depth for e in run.entities()}
    d = [x for x in (depth.get(a) for a in acts) if x is not None]
    if prof is None or prof.quantity != "out_grad_norm" or not d:
        return True, "the gradient around them was not measured", {}
    layer_depth = [depth.get(n) for n in prof.names]
    # A layer that feeds one of them directly reads ‖∂L/∂a‖ behind the activation's own derivative (inside a
    # residual branch, say): the gradient that got past them is the one at the layers below those feeders.
    feeders = {max((i for i, x in enumerate(layer_depth) if x is not None and x < a), default=None) for a in d}
    before = [i for i, x in enumerate(layer_depth) if x is not None and x < min(d) and i not in feeders]
    after = [i for i, x in enumerate(layer_depth) if x is not None and x > max(d)]
    if not before or not after:
        return True, "no layer on both sides of them to measure the gradient across", {}
    g_in, g_out = prof.median[before[-1]], prof.median[after[0]]
    if not (g_in > 0 and g_out > 0 and math.isfinite(g_in) and math.isfinite(g_out)):
        return True, "the gradient across them is not finite", {}
    across = float(g_in / g_out)
    numbers = {"across": across}
    falls = True
    ends = loss_ends(run, th)
    if ends is not None:
        numbers.update(loss_first=ends[0], loss_final=ends[1])
        falls = ends[1] < FLAT_LOSS_ABOVE * ends[0]
    decays = across < th.affected_below
    words = (f"‖∂L/∂a‖ goes ×{sci(across)} from layer {prof.names[after[0]]} down to layer {prof.names[before[-1]]} "
             f"across them")
    if decays:
        return True, words + ": they cost the gradient", numbers
    if not falls:
        return True, words + f", and the loss does not fall ({sci(numbers['loss_first'])} → {sci(numbers['loss_final'])})", numbers
    return False, words + " and the loss falls: the gradient gets past them (info only)", numbers


def stalled_findings(run: Run, th: Thresholds, vanishing: Finding | None = None) -> list[Finding]:
    """Layers whose update ratio ‖Δw‖/‖w‖ is below ``stalled_below`` × the median layer's; ``vanishing``: the
    depth finding, whose cause and remedies these layers share when they lie in its stretch."""
    if "update_ratio" not in run.quantities:
        return []
    s = run.series("update_ratio")
    med, wsteps = window_median(s, th.window)
    ok = np.isfinite(med)
    if ok.sum() < 3:
        return []
    typical = float(np.median(med[ok]))
    if not typical > 0:
        return []
    hit = [i for i in range(len(s.names)) if ok[i] and med[i] < th.stalled_below * typical]
    if not hit:
        return []
    names = tuple(s.names[i] for i in hit)
    worst = float(np.min(med[hit]))
    flags = np.asarray((s.values[hit] < th.stalled_below * typical).all(axis=0))
    start = since(flags, s.steps)
    if vanishing is not None and set(names) <= set(vanishing.layers):
        cause = f"the vanishing gradient: these layers get {vanishing.numbers['ratio']:.1e} of the last layer's gradient or less"
        fixes = vanishing.remedies
    else:
        cause = "these layers get too little gradient, or too small a learning rate, for their weights"
        fixes = remedies("param_groups", "orthogonal_init", "norm")
    return [Finding(
        kind="stalled", severity="warning", layers=names, steps=(start, int(s.steps[-1])),
        summary=f"layers {span(names)} barely move: update ratio {sci(worst)} against a median of {sci(typical)}",
        evidence=(f"‖Δw‖/‖w‖ per optimizer step below {th.stalled_below:g}× the median layer's ({sci(typical)}) in "
                  f"{len(names)} layer{'s' if len(names) > 1 else ''} ({span(names, len(s.names))}), as low as {sci(worst)}."),
        cause=cause, remedies=fixes,
        numbers={"update_ratio": worst, "median": typical},
        sources=(f"update_ratio (layers {span(s.names)}, {steps_text(int(wsteps[0]), int(wsteps[-1]))})",),
    )]
