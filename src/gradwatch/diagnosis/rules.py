"""The rules: stored records in, findings out. Pure functions; no model, no hooks.

Depth findings are judged on ‖∂L/∂a‖ (``out_grad_norm``), the back-propagated
gradient at each layer's output, and fall back on the weight-gradient norm
only when it was not recorded (DESIGN.md: the weight gradient also scales
with the layer's input).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

from gradwatch.diagnosis.findings import Diagnosis, Finding, layer_name, sci, span
from gradwatch.diagnosis.remedies import REMEDIES, remedies
from gradwatch.diagnosis.thresholds import Thresholds
from gradwatch.store import Entity, Run, Series


def _window(series: Series, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Per entity, the median over the last ``window`` recorded steps; and those steps."""
    cols = series.values[:, -window:]
    if cols.shape[1] == 0:
        return np.full(len(series.names), np.nan), series.steps[-window:]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows: a median of NaN is the answer
        return np.nanmedian(cols, axis=1), series.steps[-window:]


def _since(flags: np.ndarray, steps: np.ndarray) -> int:
    """First step of the final run of consecutive True flags (the last flag may be False: then its end)."""
    i = len(flags) - 1
    while i > 0 and flags[i - 1]:
        i -= 1
    return int(steps[i])


def _steps_text(first: int, last: int) -> str:
    return f"step {first}" if first == last else f"steps {first}–{last}"


@dataclass
class _Profile:
    """The depth profile of the back-propagated gradient over the window."""

    quantity: str
    names: list[str]
    median: np.ndarray  # per layer, window median
    ratio: np.ndarray  # per recorded step: first layer over last layer
    steps: np.ndarray
    window_steps: np.ndarray


def _profile(run: Run, th: Thresholds) -> _Profile | None:
    quantity = "out_grad_norm" if "out_grad_norm" in run.quantities else "grad_norm"
    if quantity not in run.quantities:
        return None
    s = run.series(quantity)
    rows = [i for i in range(len(s.names)) if np.isfinite(s.values[i]).any()]
    if len(rows) < 2:
        return None
    values = s.values[rows]
    med, wsteps = _window(Series(quantity, [s.names[i] for i in rows], s.steps, values), th.window)
    with np.errstate(all="ignore"):
        ratio = values[0] / values[-1]
    return _Profile(quantity, [s.names[i] for i in rows], med, ratio, s.steps, wsteps)


def _between(entities: list[Entity], a: str, b: str) -> list[str]:
    """Activation modules whose output comes after layer ``a``'s and before layer ``b``'s."""
    depth = {e.name: e.depth for e in entities if e.kind == "layer"}
    da, db = depth.get(a), depth.get(b)
    if da is None or db is None:
        return []
    return [e.name for e in entities if e.kind == "activation" and e.depth is not None and da < e.depth < db]


def _cause(run: Run, prof: _Profile, upto: int, th: Thresholds, vanishing: bool) -> tuple[str, tuple[str, ...], dict, list[str]]:
    """Split the gradient ratio across layers 0..upto into activation-derivative and weight factors.

    For consecutive layers l, l+1: r = ‖∂L/∂a_l‖ / ‖∂L/∂a_{l+1}‖ ≈ (rms φ' of the
    activation between them) × (the gain through layer l+1's weights), so the
    weight factor is r divided by the measured rms derivative.
    """
    entities = run.entities()
    acts = {}
    for q in ("deriv_rms", "saturated_frac", "dead_frac"):
        if q in run.quantities:
            s = run.series(q, "activation")
            med, _ = _window(s, th.window)
            acts[q] = dict(zip(s.names, med))
    log_r, log_a, visible, between_all = [], [], 0, []
    for i in range(min(upto + 1, len(prof.names) - 1)):
        g0, g1 = prof.median[i], prof.median[i + 1]
        between = _between(entities, prof.names[i], prof.names[i + 1])
        between_all += between
        if not (g0 > 0 and g1 > 0 and math.isfinite(g0) and math.isfinite(g1)):
            continue
        log_r.append(math.log(g0 / g1))
        d = [acts.get("deriv_rms", {}).get(b, math.nan) for b in between]
        if d and all(x > 0 and math.isfinite(x) for x in d):
            log_a.append(sum(math.log(x) for x in d))
            visible += 1
        else:
            log_a.append(math.nan)
    sources = []
    numbers: dict[str, float] = {}
    kinds = sorted({e.module or "" for e in entities if e.name in between_all and e.kind == "activation"})
    act_names = "/".join(k for k in kinds if k) or "activation"
    sat = [b for b in between_all if acts.get("saturated_frac", {}).get(b, 0) > th.saturated_above]
    dead = [b for b in between_all if acts.get("dead_frac", {}).get(b, 0) > th.dead_above]
    if between_all and "deriv_rms" in acts:
        sources.append(f"deriv_rms, saturated_frac/dead_frac (activations {span(between_all)}, "
                       f"{_steps_text(int(prof.window_steps[0]), int(prof.window_steps[-1]))})")
    if dead and vanishing:
        frac = float(np.mean([acts["dead_frac"][b] for b in dead]))
        numbers["dead_frac"] = frac
        return (f"dead units — {frac:.0%} of the units of {span(dead)} are silent for whole batches, "
                f"so no gradient passes them", remedies("leaky", "zero_bias", "he_init", "lower_lr"), numbers, sources)
    if sat:
        frac = float(np.mean([acts["saturated_frac"][b] for b in sat]))
        numbers["saturated_frac"] = frac
        return (f"{act_names} saturation — {frac:.0%} of the unit-samples of {span(sat)} sit in the flat tails",
                remedies("smaller_init", "norm", "relu", "lower_lr"), numbers, sources)
    if not log_r:
        return "no layer-to-layer ratio could be measured", (), numbers, sources
    r = math.exp(float(np.mean(log_r)))
    numbers["per_layer"] = r
    if visible == 0:
        return (f"the layers' Jacobians scale the gradient by ×{sci(r)} per layer; no activation module is "
                f"visible between them (activations applied as functions cannot be measured)",
                remedies(*(("orthogonal_init", "residual", "norm") if vanishing else ("orthogonal_init", "clip_norm", "norm"))),
                numbers, sources)
    a = math.exp(float(np.nanmean(log_a)))
    w = r / a
    numbers.update(activation_factor=a, weight_factor=w)
    if vanishing and math.log(a) <= 0.5 * math.log(r):  # the derivative explains at least half the decay
        return (f"activation derivative — {act_names}' passes on ×{sci(a)} (rms) per layer, the weights ×{sci(w)}",
                remedies("relu", "norm", "residual"), numbers, sources)
    if vanishing:
        return (f"weight scale — the weights pass on ×{sci(w)} of the gradient per layer while {act_names}' "
                f"passes on ×{sci(a)}: the initialisation shrinks the signal",
                remedies("orthogonal_init", "he_init", "residual", "norm"), numbers, sources)
    return (f"weight scale — the weights amplify the gradient ×{sci(w)} per layer ({act_names}' ×{sci(a)})",
            remedies("orthogonal_init", "clip_norm", "norm", "lower_lr"), numbers, sources)


def layers_per_halving(values: np.ndarray) -> float | None:
    """Layers per halving of ‖g‖ going towards the input (negative: per doubling), by least squares on log₂‖g‖.

    ``values[i]`` is the gradient at the i-th layer in depth order; zeros and
    non-finite values are left out of the fit.
    """
    x = np.array([i for i in range(len(values)) if values[i] > 0 and math.isfinite(values[i])], dtype=float)
    if len(x) < 2:
        return None
    slope = float(np.polyfit(x, np.log2(values[x.astype(int)]), 1)[0])
    return 1.0 / slope if slope != 0 else None


def _halving(prof: _Profile, idx: Sequence[int]) -> float | None:
    idx = [i for i in idx if i < len(prof.median)]
    return layers_per_halving(prof.median[idx[0] : idx[-1] + 1]) if idx else None


FIT_T_ABOVE = 3.0  # a halving rate is quoted when the least-squares slope is this many standard errors from 0
FIT_DECAY_ABOVE = 4.0  # ... and the fitted line changes ‖g‖ by at least this factor over the stretch


def real_fit(values: np.ndarray) -> bool:
    """Is the log₂‖g‖-vs-depth line a real trend? Significant slope (|t| ≥ 3) and a total change ≥ 4× over the stretch.

    Two points are an exact line (no standard error): only the total change counts. A profile that
    wanders around a level fits a slope near 0 whose "halves every 53 layers" describes no decay.
    """
    x = np.array([i for i in range(len(values)) if values[i] > 0 and math.isfinite(values[i])], dtype=float)
    if len(x) < 2:
        return False
    y = np.log2(values[x.astype(int)])
    slope, icpt = np.polyfit(x, y, 1)
    total = abs(float(slope)) * float(x[-1] - x[0])  # log₂ of the fitted change end to end
    if total < math.log2(FIT_DECAY_ABOVE):
        return False
    if len(x) == 2:
        return True
    resid = y - (slope * x + icpt)
    se = math.sqrt(float(resid @ resid) / (len(x) - 2) / float(((x - x.mean()) ** 2).sum()))
    return se == 0 or abs(float(slope)) / se >= FIT_T_ABOVE


def episodes(flags: np.ndarray, least: int) -> list[tuple[int, int]]:
    """(first, last) indices of the runs of consecutive True flags at least ``least`` long."""
    out, i = [], 0
    while i < len(flags):
        if flags[i]:
            j = i
            while j + 1 < len(flags) and flags[j + 1]:
                j += 1
            if j - i + 1 >= least:
                out.append((i, j))
            i = j + 1
        else:
            i += 1
    return out


def _centred_ratio(run: Run, th: Thresholds) -> tuple[np.ndarray, np.ndarray] | None:
    """(steps, first/last ‖∂L/∂a‖ as a centred median over ``window`` samples), at the steps where it was measured."""
    prof = _profile(run, th)
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
    got = _centred_ratio(run, th)
    if got is None:
        return []
    steps, smooth = got
    found = []
    damage = [f for f in current if f.severity != "info" and f.kind in ("dead_units", "stalled")]
    flat = flat_loss(run, th)
    for kind, flags in (("vanishing", smooth < th.vanish_below), ("exploding", smooth > th.explode_above)):
        eps = episodes(flags, th.window)
        if any(f.kind == kind and f.layers for f in current):
            continue  # it holds now: the current finding covers the run (earlier episodes are noted in it)
        for i, j in eps:
            a, b = int(steps[i]), int(steps[j])
            view: Run = _Before(run, b + 1, start=a)  # type: ignore[assignment]
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


def _earlier_episodes(found: list[Finding], run: Run, th: Thresholds) -> list[Finding]:
    """A depth finding that holds now notes the earlier episodes of its kind (steps where the ratio was beyond
    its cut before the final stretch), so one finding covers the whole run."""
    got = _centred_ratio(run, th)
    if got is None:
        return found
    steps, smooth = got
    out = []
    for f in found:
        if f.layers and f.kind in ("vanishing", "exploding") and f.sources and f.sources[0].startswith(("out_grad_norm", "grad_norm")):
            flags = smooth < th.vanish_below if f.kind == "vanishing" else smooth > th.explode_above
            before = [(int(steps[i]), int(steps[j])) for i, j in episodes(flags, th.window) if int(steps[j]) < f.steps[0]]
            if before:
                text = ", ".join(_steps_text(a, b) for a, b in before)
                f = replace(f, evidence=f.evidence.rstrip(".") + f"; earlier, also beyond the cut at {text}.")
        out.append(f)
    return out


def depth_findings(run: Run, th: Thresholds) -> list[Finding]:
    prof = _profile(run, th)
    if prof is None:
        return []
    first, last = prof.median[0], prof.median[-1]
    if not (last > 0 and math.isfinite(last) and math.isfinite(first)):
        return []
    ratio = first / last
    n = len(prof.names)
    source = (f"{prof.quantity} (layers {span(prof.names)}, "
              f"{_steps_text(int(prof.window_steps[0]), int(prof.window_steps[-1]))})")
    caveat = "" if prof.quantity == "out_grad_norm" else " (weight-gradient norms: the back-propagated gradient was not recorded)"
    with np.errstate(all="ignore"):
        rel = prof.median / last
    found = []
    if ratio < th.vanish_below:
        upto = 0
        while upto + 1 < n - 1 and rel[upto + 1] < th.affected_below:
            upto += 1
        layers = tuple(prof.names[: upto + 1])
        k = _halving(prof, range(0, upto + 2))
        if k is not None and not real_fit(prof.median[: upto + 2]):
            k = None  # no real trend: say what the profile does instead
        cause, fixes, numbers, sources = _cause(run, prof, upto, th, vanishing=True)
        since = _since(prof.ratio < th.vanish_below, prof.steps)
        zero = [prof.names[i] for i in range(n) if prof.median[i] == 0]
        if zero:
            decay = f"{span(zero)} receive{'s' if len(zero) == 1 else ''} no gradient at all (exactly 0)"
        elif k is not None and k > 0:
            decay = (f"the gradient halves every {k:.2g} layers (×{2 ** (-1 / k):.2g} per layer) from layer "
                     f"{layer_name(prof.names[upto])} down to layer {layer_name(prof.names[0])}")
        else:
            low = int(np.nanargmin(rel[: upto + 1]))
            decay = (f"layers {span(layers)} get less than {th.affected_below:g}× the last layer's gradient, with no "
                     f"steady decay across depth to fit (lowest, {sci(float(rel[low]))}×, at layer {layer_name(prof.names[low])})")
        numbers.update(ratio=ratio, halving_layers=k if k else math.nan)
        found.append(Finding(
            "vanishing", "critical" if ratio < th.vanish_below**2 else "warning", layers,
            (since, int(prof.steps[-1])),
            f"the gradient reaching layer {layer_name(prof.names[0])} is {sci(ratio)} of the last layer's, since step {since}",
            f"‖∂L/∂a‖ at layer {layer_name(prof.names[0])} is {sci(first)} against {sci(last)} at layer {layer_name(prof.names[-1])}"
            f"{caveat}; {decay}.",
            cause, fixes, numbers, (source, *sources),
        ))
    elif ratio > th.explode_above:
        upto = 0
        while upto + 1 < n - 1 and rel[upto + 1] > th.affected_above:
            upto += 1
        layers = tuple(prof.names[: upto + 1])
        k = _halving(prof, range(0, upto + 2))
        if k is not None and not real_fit(prof.median[: upto + 2]):
            k = None
        cause, fixes, numbers, sources = _cause(run, prof, upto, th, vanishing=False)
        since = _since(prof.ratio > th.explode_above, prof.steps)
        growth = (f"the gradient doubles every {-k:.2g} layers towards the input (×{2 ** (-1 / k):.2g} per layer)"
                  if k is not None and k < 0 else f"layers {span(layers)} get more than {th.affected_above:g}× the last layer's")
        numbers.update(ratio=ratio, doubling_layers=-k if k else math.nan)
        found.append(Finding(
            "exploding", "critical", layers, (since, int(prof.steps[-1])),
            f"the gradient reaching layer {layer_name(prof.names[0])} is {sci(ratio)}× the last layer's, since step {since}",
            f"‖∂L/∂a‖ at layer {layer_name(prof.names[0])} is {sci(first)} against {sci(last)} at layer {layer_name(prof.names[-1])}"
            f"{caveat}; {growth}.",
            cause, fixes, numbers, (source, *sources),
        ))
    return found


def total_grad_norm(run: Run) -> tuple[np.ndarray, np.ndarray] | None:
    """(steps, √Σ layer grad_norm²) per recorded step; NaN where nothing finite was recorded, inf where a norm was."""
    if "grad_norm" not in run.quantities:
        return None
    s = run.series("grad_norm")
    with np.errstate(all="ignore"):
        total = np.sqrt(np.nansum(s.values**2, axis=0))
    total[np.isnan(s.values).all(axis=0)] = np.nan  # nothing recorded, or every norm NaN
    total[np.isinf(s.values).any(axis=0)] = np.inf
    return s.steps, total


def spike_findings(run: Run, th: Thresholds) -> list[Finding]:
    got = total_grad_norm(run)
    if got is None:
        return []
    steps, total = got
    finite = np.isfinite(total)
    spikes, over, high = [], [], []
    start = total[: th.spike_after][finite[: th.spike_after]]
    initial = float(start.max()) if len(start) else math.inf
    for j in range(len(total)):
        if not finite[j]:
            continue
        prev = total[:j]
        prev = prev[np.isfinite(prev)]
        if len(prev) >= th.spike_after and total[j] > initial and total[j] > th.spike_above * np.median(prev):
            high.append(j)
            if total[j] > th.spike_above * np.median(prev[-th.spike_window:]):
                spikes.append(j)
        if total[j] > th.grad_norm_above:
            over.append(j)
    ramps = _ramps(run, steps, total, high, spikes, th)
    if not spikes and not over and not ramps:
        return []
    ramp_steps = sorted({j for a, b, _ in ramps for j in range(a, b + 1) if finite[j]})
    hit = sorted(set(spikes) | set(over) | set(ramp_steps))
    calm_idx = [j for j in range(len(total)) if finite[j] and j not in set(hit)]
    median = float(np.median(total[finite])) if finite.any() else math.nan
    clip = float(np.median(total[calm_idx])) if calm_idx else math.nan
    parts = []
    for a, b, p in ramps:
        parts.append(f"a ramp: the total norm left the calm steps' level at step {int(steps[a])} (against their "
                     f"median and MAD) and rose to a peak of {sci(float(total[p]))} at step {int(steps[p])}, "
                     f"while the loss did not fall")
    if spikes:
        shown = ", ".join(str(int(steps[j])) for j in spikes[:5]) + (" …" if len(spikes) > 5 else "")
        parts.append(f"{len(spikes)} spike{'s' if len(spikes) > 1 else ''} above {th.spike_above:g}× the median "
                     f"of all the steps before and of the last {th.spike_window} (step{'s' if len(spikes) > 1 else ''} {shown})")
    if over:
        parts.append(f"the total norm crossed {sci(th.grad_norm_above)} on {len(over)} step{'s' if len(over) > 1 else ''}, "
                     f"first at step {int(steps[over[0]])}")
    peak = float(np.nanmax(np.where(finite, total, np.nan)))
    if math.isfinite(clip):
        clipping = (f"gradient-norm clipping at about the norm of the calm steps, "
                    f"clip_grad_norm_(params, max_norm={sci(clip)}) (Pascanu et al. 2013), which would have held every one of these steps",)
        fixes = clipping + remedies("lower_lr", "norm")
    else:  # not one calm step: the scale itself is wrong
        fixes = remedies("orthogonal_init", "clip_norm", "norm", "lower_lr")
    peak_step = int(steps[int(np.nanargmax(np.where(finite, total, np.nan)))])
    summary = (f"the total gradient norm jumps to {sci(peak)} (median {sci(median)}), from step {int(steps[hit[0]])}"
               + (f", peak at step {peak_step}" if ramps else "")
               if spikes or ramps else f"the total gradient norm exceeds {sci(th.grad_norm_above)} from step {int(steps[hit[0]])} "
               f"(median {sci(median)})")
    severity = "critical" if over else "warning"
    recovered = "" if over else _recovered(run, total, clip, th)
    if recovered:  # severity follows the effect on training: transient spikes in a run that learns are info
        severity, fixes = "info", ()
        parts.append(recovered)
    return [Finding(
        "exploding", severity, (), (int(steps[hit[0]]), int(steps[hit[-1]])),
        summary,
        "; ".join(parts) + ".",
        "unstable steps: a sharp region of the loss surface or a learning rate too large for it" if calm_idx
        else "the gradient is too large from the first step: the initial scale of the weights or the loss",
        fixes,
        {"peak": peak, "median": median, "clip_at": clip, "spikes": float(len(spikes)), "over_bound": float(len(over)),
         "peak_step": float(peak_step), **({"onset": float(steps[ramps[0][0]])} if ramps else {})},
        (f"grad_norm (every layer, {_steps_text(int(steps[0]), int(steps[-1]))}), total = √Σ layer²",),
    )]


RAMP_Z_ABOVE = 3.5  # a step above the calm steps by this many robust standard deviations (1.4826 MAD) is off-calm


def _ramps(run: Run, steps: np.ndarray, total: np.ndarray, high: list[int], spikes: list[int],
           th: Thresholds) -> list[tuple[int, int, int]]:
    """Ramps into divergence: (onset, end, peak) indices of each stretch of steps above ``spike_above`` × the median
    of all steps before them that no single-step spike explains.

    A gradual ramp drags a recent-window baseline up with it, so its onset is found against the calm phase
    instead: the median and MAD of the steps before the stretch; the onset is the first step of the unbroken
    run of steps above it by a robust z-score of ``RAMP_Z_ABOVE``, found twice (the second time against the steps
    before the first onset). It counts only while the logged loss does not fall across it (median over the
    ``window`` steps up to the peak against the ``window`` before the onset): a net whose gradient grows while it
    learns (zero-initialised residual branches) is not diverging. Without a logged loss nothing confirms a ramp.
    """
    if not high or "loss" not in run.quantities:
        return []
    ls = run.series("loss", "run")
    loss = dict(zip(ls.steps.tolist(), ls.values[0].tolist()))
    finite = np.isfinite(total)
    out: list[tuple[int, int, int]] = []
    stretches: list[tuple[int, int]] = []
    for i, j in episodes(np.isin(np.arange(len(total)), high), 1):
        if stretches and i - stretches[-1][1] - 1 <= th.window:  # a few noisy steps back below: the same ramp
            stretches[-1] = (stretches[-1][0], j)
        else:
            stretches.append((i, j))
    for i, j in stretches:
        if any(i <= k <= j for k in spikes) and j - i < th.window:
            continue  # a spike: the spike test has it
        onset = i
        for _ in range(2):
            calm = total[: onset][finite[: onset]]
            if len(calm) < th.spike_after:
                break
            med = float(np.median(calm))
            mad = 1.4826 * float(np.median(np.abs(calm - med))) or 1e-12 * max(med, 1e-30)
            k = i
            while k > 0 and finite[k - 1] and (total[k - 1] - med) / mad > RAMP_Z_ABOVE:
                k -= 1
            onset = k
        peak = onset + int(np.argmax(np.where(finite[onset: j + 1], total[onset: j + 1], -np.inf)))
        calm = total[: onset][finite[: onset]]
        idx = np.array([x for x in range(onset, peak + 1) if finite[x] and total[x] > 0])
        if len(idx) >= 3 and len(calm) and np.median(calm) > 0:
            # The first steps of a ramp hide in the calm steps' noise: extend its log-linear trend back to
            # where it leaves the calm level (an exponential ramp from a clean start gives that start).
            slope, icpt = np.polyfit(idx, np.log(total[idx]), 1)
            if slope > 0:
                x0 = (math.log(float(np.median(calm))) - icpt) / slope
                onset = int(min(onset, max(0, math.ceil(x0 - 1e-9))))
        before = [loss.get(int(x), math.nan) for x in steps[max(0, onset - th.window): onset]]
        at = [loss.get(int(x), math.nan) for x in steps[max(onset, peak - th.window + 1): peak + 1]]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # no loss logged at those steps: NaN
            before_m = float(np.nanmedian(before)) if before else math.nan
            at_m = float(np.nanmedian(at)) if at else math.nan
        if math.isfinite(before_m) and math.isfinite(at_m) and at_m >= before_m:
            out.append((onset, j, peak))
    return out


def _recovered(run: Run, total: np.ndarray, calm: float, th: Thresholds) -> str:
    """Words for a run that got over its gradient spikes ('' if it did not, or nothing shows it).

    Recovered means: the total norm of the last ``4 × window`` steps is back within ``spike_above`` of the calm
    steps' median, and the logged loss fell to at most half its start (median of the first ``spike_after``
    steps against the last ``4 × window``). Without a logged loss nothing shows that the run learns.
    """
    if "loss" not in run.quantities or not math.isfinite(calm):
        return ""
    tail = total[-4 * th.window:]
    tail = tail[np.isfinite(tail)]
    loss = run.series("loss", "run").values[0]
    if not np.isfinite(loss).all() or len(loss) < th.spike_after + 4 * th.window or not len(tail):
        return ""
    first, final = float(np.median(loss[: th.spike_after])), float(np.median(loss[-4 * th.window:]))
    late = float(np.median(tail))
    if late < th.spike_above * calm and 0 < final <= 0.5 * first:
        return (f"the run recovered: the total norm is back at {sci(late)} over the last {4 * th.window} steps and "
                f"the loss fell from {sci(first)} to {sci(final)} (info only)")
    return ""


def fading_findings(run: Run, th: Thresholds) -> list[Finding]:
    """Vanishing over steps: the whole gradient collapses while the loss has not converged.

    The total norm's median over the last ``4 × window`` steps against its
    median over the first ``spike_after``; a run whose logged loss fell to
    below ``vanish_below`` of its start converged instead.
    """
    got = total_grad_norm(run)
    if got is None:
        return []
    steps, total = got
    ok = np.isfinite(total)
    if ok.sum() < th.spike_after + 4 * th.window:
        return []
    early = float(np.median(total[ok][: th.spike_after]))
    late = float(np.median(total[ok][-4 * th.window:]))
    if not (early > 0 and late < th.vanish_below * early):
        return []
    if "loss" in run.quantities:
        loss = run.series("loss", "run").values[0]
        loss = loss[np.isfinite(loss)]
        first, final = np.median(loss[: th.spike_after]), np.median(loss[-4 * th.window:])
        if len(loss) > th.spike_after and final < first and abs(final) < th.vanish_below * abs(first):
            return []  # converged (the loss fell to ~0): a vanishing gradient is what a minimum looks like
    below = total < th.vanish_below * early
    since = _since(below, steps)
    return [Finding(
        "vanishing", "critical", (), (since, int(steps[-1])),
        f"the whole gradient collapsed: its norm is {sci(late / early)} of what it was at the start, since step {since}",
        f"the total gradient norm fell from {sci(early)} (median of steps {int(steps[0])}–{int(steps[ok][th.spike_after - 1])}) "
        f"to {sci(late)} (median of the last {4 * th.window} steps) while the loss did not converge.",
        "the loss saturates: nothing flows back from it. For a GAN generator trained with the minimax loss "
        "log(1 − D(G(z))), a discriminator that confidently rejects the samples leaves almost no gradient",
        remedies("nonsaturating", "lower_lr"),
        {"ratio": late / early, "early": early, "late": late},
        (f"grad_norm (every layer, {_steps_text(int(steps[0]), int(steps[-1]))}), total = √Σ layer²",)
        + (("loss (run)",) if "loss" in run.quantities else ()),
    )]


def skipped_steps(run: Run) -> np.ndarray:
    """Steps that optimizer.step() never took (a GradScaler skipping inf/NaN gradients)."""
    if "skipped_step" not in run.quantities:
        return np.zeros(0, dtype=np.int64)
    s = run.series("skipped_step", "run")
    return s.steps[np.nan_to_num(s.values[0]) > 0].astype(np.int64)


def skipped_findings(run: Run, th: Thresholds, skipped: np.ndarray) -> list[Finding]:
    """``skipped``: the run's :func:`skipped_steps`."""
    if not len(skipped) or "grad_norm" not in run.quantities:
        return []
    steps = run.series("grad_norm").steps
    frac = len(skipped) / max(len(steps), 1)
    if frac <= th.skipped_above:
        return []
    scale = ""
    if "loss_scale" in run.quantities:
        ls = run.series("loss_scale", "run")
        scale = (f"; the loss scale at the skipped steps went from {sci(float(ls.values[0][0]))} "
                 f"to {sci(float(ls.values[0][-1]))}")
    tail = steps[-min(10, len(steps)):]
    persistent = bool(np.isin(tail, skipped).all())
    return [Finding(
        "skipped_steps", "critical" if persistent else "warning", (), (int(skipped[0]), int(skipped[-1])),
        f"the GradScaler skipped {len(skipped)} of {len(steps)} steps ({frac:.0%}) for inf/NaN gradients"
        + (", every one of the last ones" if persistent else ""),
        f"skipped steps {_list_steps(skipped)}{scale}.",
        "float16 gradients overflow even at a reduced loss scale" if not persistent else
        "the gradients are non-finite at any loss scale: the model itself diverges (or the data holds NaN/Inf)",
        remedies("bf16", "clip_norm", "lower_lr", "check_data"),
        {"skipped": float(len(skipped)), "fraction": frac},
        ("skipped_step (run)",) + (("loss_scale (run)",) if scale else ()),
    )]


def _list_steps(steps: np.ndarray, most: int = 8) -> str:
    shown = ", ".join(str(int(x)) for x in steps[:most])
    return shown + (f", … ({len(steps)} in all)" if len(steps) > most else "")


def nonfinite_findings(run: Run, th: Thresholds, skipped: np.ndarray) -> list[Finding]:
    """``skipped``: the run's :func:`skipped_steps`."""
    if "nonfinite" not in run.quantities:
        return []
    s = run.series("nonfinite")
    g = run.series("grad_norm") if "grad_norm" in run.quantities else None
    bad = np.nan_to_num(s.values, nan=0.0) > 0
    if g is not None and g.values.shape == s.values.shape:
        bad |= ~np.isfinite(g.values) & ~np.isnan(g.values) | np.isnan(g.values) & (s.values > 0)
    # A step the GradScaler skipped changed no weight: it is a skipped step (skipped_findings), not a NaN casualty.
    bad[:, np.isin(s.steps, skipped)] = False
    cols = np.where(bad.any(axis=0))[0]
    if len(cols) == 0:
        return []
    j0 = cols[0]
    step0 = int(s.steps[j0])
    layers_at = [s.names[i] for i in range(len(s.names)) if bad[i, j0]]
    first_back = layers_at[-1]  # backward runs from the output: the deepest layer is reached first
    count = float(np.nansum(s.values[:, j0]))
    steps_bad = len(cols)
    evidence = (f"at step {step0}, {int(count)} parameter tensor{'' if count == 1 else 's'} with NaN/Inf gradients in "
                f"{len(layers_at)} layer{'s' if len(layers_at) > 1 else ''} ({span(layers_at)}); backward reached "
                f"{first_back!r} first; {steps_bad} step{'s' if steps_bad > 1 else ''} with non-finite gradients in all")
    sources = [f"nonfinite (layers {span(s.names)}, {_steps_text(int(s.steps[0]), int(s.steps[-1]))})"]
    cause = "non-finite values in the forward pass or the loss"
    got = total_grad_norm(run)
    if got is not None:
        steps, total = got
        before = total[(steps < step0) & np.isfinite(total)]
        if len(before) >= 2 and before[-1] > th.spike_above * np.median(before):
            cause = (f"divergence — the total gradient norm grew from a median of {sci(float(np.median(before)))} to "
                     f"{sci(float(before[-1]))} just before step {step0}")
    loss_note = ""
    if "loss" in run.quantities:
        loss = run.series("loss", "run")
        nf = np.where(~np.isfinite(loss.values[0]))[0]
        if len(nf):
            loss_note = f"; the loss is non-finite from step {int(loss.steps[nf[0]])}"
            sources.append("loss (run)")
    return [Finding(
        "nonfinite", "critical", tuple(layers_at), (step0, int(s.steps[cols[-1]])),
        f"NaN/Inf gradients from step {step0}, first in layer {first_back!r} (backward order)",
        evidence + loss_note + ".",
        cause,
        remedies("lower_lr", "clip_norm", "check_data", "grad_scaler"),
        {"step": float(step0), "tensors": count, "steps": float(steps_bad)},
        tuple(sources),
    )]


def activation_findings(run: Run, th: Thresholds) -> list[Finding]:
    found = []
    for quantity, kind, bound in (("saturated_frac", "saturation", th.saturated_above), ("dead_frac", "dead_units", th.dead_above)):
        if quantity not in run.quantities:
            continue
        s = run.series(quantity, "activation")
        med, wsteps = _window(s, th.window)
        hit = [i for i in range(len(s.names)) if med[i] > bound]
        if not hit:
            continue
        names = tuple(s.names[i] for i in hit)
        flags = np.nan_to_num(s.values[hit], nan=0.0).mean(axis=0) > bound
        since = _since(flags, s.steps)
        modules = sorted({e.module or "" for e in run.entities("activation") if e.name in names})
        frac = float(np.mean(med[hit]))
        rms = ""
        if "deriv_rms" in run.quantities:
            d, _ = _window(run.series("deriv_rms", "activation"), th.window)
            dn = dict(zip(run.series("deriv_rms", "activation").names, d))
            vals = [dn[n] for n in names if n in dn and math.isfinite(dn[n])]
            if vals:
                rms = f"; they pass on ×{sci(float(np.mean(vals)))} of the gradient (rms derivative)"
        where = f"{len(names)} {'/'.join(modules)} module{'s' if len(names) > 1 else ''} ({span(names)})"
        if kind == "saturation":
            summary = f"{frac:.0%} of the units of {span(names)} sit in the flat tails"
            evidence = (f"saturated fraction (φ' < 2 % of its peak) above {bound:g} in {where}, "
                        f"{frac:.0%} on average over {_steps_text(int(wsteps[0]), int(wsteps[-1]))}{rms}")
            cause = "pre-activations too large for the activation: weights initialised or grown too large"
            fixes = remedies("smaller_init", "norm", "relu", "lower_lr")
        else:
            summary = f"{frac:.0%} of the units of {span(names)} are dead"
            evidence = (f"units silent for whole batches above {bound:g} in {where}, {frac:.0%} on average "
                        f"over {_steps_text(int(wsteps[0]), int(wsteps[-1]))}{rms}")
            cause = "pre-activations negative for every input: negative biases, a large step that pushed them there, or a poor initialisation"
            fixes = remedies("leaky", "zero_bias", "he_init", "lower_lr", "norm")
        hurt, effect, numbers = _unit_effect(run, names, th)
        found.append(Finding(
            kind, "warning" if hurt else "info", names, (since, int(s.steps[-1])), summary,
            evidence + "; " + effect + ".", cause, fixes if hurt else (),
            {quantity: frac, **numbers},
            (f"{quantity} (activations {span(s.names)}, {_steps_text(int(wsteps[0]), int(wsteps[-1]))})",),
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
    prof = _profile(run, th)
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
    if "loss" in run.quantities:
        loss = run.series("loss", "run").values[0]
        loss = loss[np.isfinite(loss)]
        if len(loss) >= th.spike_after + 4 * th.window:
            first, final = float(np.median(loss[: th.spike_after])), float(np.median(loss[-4 * th.window:]))
            numbers.update(loss_first=first, loss_final=final)
            falls = final < 0.9 * first
    decays = across < th.affected_below
    words = (f"‖∂L/∂a‖ goes ×{sci(across)} from layer {prof.names[after[0]]} down to layer {prof.names[before[-1]]} "
             f"across them")
    if decays:
        return True, words + ": they cost the gradient", numbers
    if not falls:
        return True, words + f", and the loss does not fall ({sci(numbers['loss_first'])} → {sci(numbers['loss_final'])})", numbers
    return False, words + " and the loss falls: the gradient gets past them (info only)", numbers


def stalled_findings(run: Run, th: Thresholds, vanishing: Finding | None = None) -> list[Finding]:
    if "update_ratio" not in run.quantities:
        return []
    s = run.series("update_ratio")
    med, wsteps = _window(s, th.window)
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
    since = _since(flags, s.steps)
    if vanishing is not None and set(names) <= set(vanishing.layers):
        cause = f"the vanishing gradient: these layers get {vanishing.numbers['ratio']:.1e} of the last layer's gradient or less"
        fixes = vanishing.remedies
    else:
        cause = "these layers get too little gradient, or too small a learning rate, for their weights"
        fixes = remedies("param_groups", "orthogonal_init", "norm")
    return [Finding(
        "stalled", "warning", names, (since, int(s.steps[-1])),
        f"layers {span(names)} barely move: update ratio {sci(worst)} against a median of {sci(typical)}",
        f"‖Δw‖/‖w‖ per optimizer step below {th.stalled_below:g}× the median layer's ({sci(typical)}) in "
        f"{len(names)} layer{'s' if len(names) > 1 else ''} ({span(names, len(s.names))}), as low as {sci(worst)}.",
        cause, fixes,
        {"update_ratio": worst, "median": typical},
        (f"update_ratio (layers {span(s.names)}, {_steps_text(int(wsteps[0]), int(wsteps[-1]))})",),
    )]


class _Before:
    """A run seen only before a given step (and from ``start`` on), without the steps in ``drop``."""

    def __init__(self, run: Run, limit: float, drop: np.ndarray | None = None, start: float = -np.inf) -> None:
        self._run, self._limit, self._start = run, limit, start
        self._drop = drop if drop is not None else np.zeros(0, dtype=np.int64)
        self.path = run.path

    def _keep(self, steps: np.ndarray) -> np.ndarray:
        return (steps >= self._start) & (steps < self._limit) & ~np.isin(steps, self._drop)

    @property
    def quantities(self) -> list[str]:
        return self._run.quantities

    def series(self, quantity: str, kind: str = "layer") -> Series:
        s = self._run.series(quantity, kind)
        keep = self._keep(s.steps)
        return Series(s.quantity, s.names, s.steps[keep], s.values[:, keep])

    def entities(self, kind: str | None = None) -> list[Entity]:
        return self._run.entities(kind)

    @property
    def meta(self) -> dict:
        return self._run.meta

    def temporal(self, name: str, quantity: str = "temporal_grad_norm") -> Series:
        s = self._run.temporal(name, quantity)
        keep = self._keep(s.steps)
        return Series(s.quantity, s.names, s.steps[keep], s.values[:, keep])


def by_lag(s: Series) -> Series:
    """Re-index a (positions × steps) temporal series by lag from each step's last position.

    Sequence lengths may differ between steps (Pascanu's adding task draws
    one); aligned at their ends, row ``i`` of the result is lag
    ``len − 1 − i`` (the last row is lag 0) and only lags that every step has
    are kept. ``names`` are the lags.
    """
    ok = ~np.isnan(s.values)
    lengths = [int(np.where(ok[:, j])[0].max()) + 1 if ok[:, j].any() else 0 for j in range(s.values.shape[1])]
    cols = [j for j, n in enumerate(lengths) if n > 0]
    if not cols:
        return Series(s.quantity, [], s.steps[:0], np.zeros((0, 0)))
    depth = min(lengths[j] for j in cols)
    values = np.stack([s.values[lengths[j] - depth : lengths[j], j] for j in cols], axis=1)
    return Series(s.quantity, [str(depth - 1 - i) for i in range(depth)], s.steps[cols], values)


def temporal_findings(run: Run, th: Thresholds) -> list[Finding]:
    """Vanishing and exploding through time, from ‖∂L/∂h_t‖ of each recurrent layer (``watch(temporal=…)``)."""
    if "temporal_grad_norm" not in run.quantities:
        return []
    gammas = {r["name"]: r.get("gamma") for r in run.meta.get("recurrent", [])} if hasattr(run, "meta") else {}
    lam = run.series("lambda1", "recurrent") if "lambda1" in run.quantities else None
    found = []
    for e in run.entities("recurrent"):
        s = by_lag(run.temporal(e.name))
        if len(s.names) < 3 or len(s.steps) == 0:
            continue
        med, wsteps = _window(s, th.window)
        pos = [-int(p) for p in s.names]  # −lag: increasing towards the last step
        first, last = med[0], med[-1]
        if not (last > 0 and math.isfinite(last) and math.isfinite(first)):
            continue
        ratio = first / last
        span_text = f"{_steps_text(int(wsteps[0]), int(wsteps[-1]))}"
        k = layers_per_halving(med)
        rel = med / last
        below = [i for i in range(len(med) - 1, -1, -1) if rel[i] < th.memory_below]
        memory = -pos[below[0]] if below else None  # the smallest lag at which the gradient is below the cut
        numbers: dict[str, float] = {"ratio": ratio, "halving_steps": k if k else math.nan,
                                     "memory": float(memory) if memory is not None else math.nan}
        lam1, pascanu = math.nan, ""
        if lam is not None and e.name in lam.names:
            row = lam.values[lam.names.index(e.name)]
            ok = row[np.isfinite(row)]
            lam1 = float(ok[-1]) if len(ok) else math.nan
            numbers["lambda1"] = lam1
            gamma = gammas.get(e.name)
            if gamma and math.isfinite(lam1):
                pascanu = (f"; λ₁(W_hh) = {lam1:.2g} < 1/γ = {1 / gamma:g} — Pascanu's sufficient condition for vanishing holds"
                           if lam1 < 1 / gamma else
                           f"; λ₁(W_hh) = {lam1:.2g} ≥ 1/γ = {1 / gamma:g} — the necessary condition for exploding holds")
            elif math.isfinite(lam1):
                pascanu = f"; λ₁(W_hh) = {lam1:.2g} (gated cell: Pascanu's condition gives no verdict)"
        flags_v = (s.values[0] / s.values[-1]) < th.vanish_below
        sources = (f"temporal_grad_norm ({e.name}, lags {-pos[0]}…0 from each sequence's end, {span_text})",) + (
            (f"lambda1 ({e.name})",) if "lambda1" in numbers else ())
        mem_text = (f"effective memory ≈ {memory} steps (‖∂L/∂h‖ below {th.memory_below:g}× its last value beyond that lag)"
                    if memory is not None else f"no lag within the {-pos[0]} steps falls below {th.memory_below:g}×")
        if ratio < th.vanish_below:
            decay = f"the gradient through time halves every {k:.2g} steps (×{2 ** (-1 / k):.2g} per step)" if k and k > 0 else "the gradient through time falls"
            found.append(Finding(
                "vanishing", "critical" if ratio < th.vanish_below**2 else "warning", (e.name,),
                (_since(flags_v, s.steps), int(s.steps[-1])),
                f"through time in {e.name}: ‖∂L/∂h‖ at the first step is {sci(ratio)} of the last step's",
                f"{decay}; {mem_text}{pascanu}.",
                "the recurrent Jacobian ∂h_{t+1}/∂h_t shrinks the gradient at every step"
                + (" (its largest singular value is below the bound)" if "sufficient condition" in pascanu else "")
                + (": in an LSTM, forget gates that close" if e.module == "LSTM" else ""),
                remedies("forget_bias", "clip_norm") if e.module == "LSTM"
                else remedies("orthogonal_rnn", "gated", "pascanu_reg", "irnn"), numbers, sources,
            ))
        elif ratio > th.explode_above:
            growth = f"the gradient through time doubles every {-k:.2g} steps going back (×{2 ** (-1 / k):.2g} per step)" if k and k < 0 else "the gradient through time grows going back"
            found.append(Finding(
                "exploding", "critical", (e.name,), (_since((s.values[0] / s.values[-1]) > th.explode_above, s.steps), int(s.steps[-1])),
                f"through time in {e.name}: ‖∂L/∂h‖ at the first step is {sci(ratio)}× the last step's",
                f"{growth}{pascanu}.",
                "the recurrent Jacobian stretches the gradient at every step",
                remedies("clip_norm", "smaller_w_hh", "orthogonal_rnn", "gated"), numbers, sources,
            ))
    return found


FLAT_LOSS_ABOVE = 0.9  # the loss is "flat at its start" when its late median is above this fraction of its early one


def flat_loss(run: Run, th: Thresholds) -> tuple[float, float] | None:
    """(start, end) of a logged loss that stayed at its start value, else None.

    Start: the median of the first ``spike_after`` finite values; end: the median of the last ``4 × window``.
    Flat means the end is above ``FLAT_LOSS_ABOVE`` × the start (a positive loss). Without a logged loss, or
    with too few values, nothing shows the run's progress: None.
    """
    if "loss" not in run.quantities:
        return None
    loss = run.series("loss", "run").values[0]
    loss = loss[np.isfinite(loss)]
    if len(loss) < th.spike_after + 4 * th.window:
        return None
    first, final = float(np.median(loss[: th.spike_after])), float(np.median(loss[-4 * th.window:]))
    return (first, final) if first > 0 and final > FLAT_LOSS_ABOVE * first else None


def _by_effect(found: list[Finding], run: Run, th: Thresholds) -> list[Finding]:
    """Severity follows the effect on training: a warning in a run whose loss stayed at its start is critical."""
    flat = flat_loss(run, th)
    if flat is None:
        return found
    note = f"; the loss stayed at its start value ({sci(flat[0])} → {sci(flat[1])}): the run does not learn"
    return [replace(f, severity="critical", evidence=f.evidence.rstrip(".") + note + ".",
                    numbers={**f.numbers, "loss_first": flat[0], "loss_final": flat[1]},
                    sources=f.sources if "loss (run)" in f.sources else (*f.sources, "loss (run)"))
            if f.severity == "warning" and f.kind in _BY_EFFECT else f for f in found]


# Module classes that say what the architecture already has (class names, as `module_types` in the run's meta
# and the entities' modules record them).
_RESIDUAL_TYPES = frozenset({"TransformerEncoderLayer", "TransformerDecoderLayer", "BasicBlock", "Bottleneck",
                             "GPT2Block", "BertLayer", "ViTLayer", "Block", "ResidualBlock"})
_RELU_TYPES = frozenset({"ReLU", "ReLU6", "LeakyReLU", "PReLU", "RReLU", "ELU", "CELU", "SELU", "GELU", "SiLU",
                         "Mish", "Hardswish", "Softplus"})
_SATURATING_TYPES = frozenset({"Tanh", "Sigmoid", "Hardtanh", "Softsign", "Hardsigmoid", "LogSigmoid", "Tanhshrink"})
_ADAM_TYPES = frozenset({"Adam", "AdamW", "NAdam", "RAdam", "Adamax"})
# Adam's step moves every weight by about lr from the first step on (its update is normalised): above 3·10⁻³
# without a warm-up, attention and LayerNorm'd nets (Xiong et al. 2020; Liu et al. 2020) commonly collapse.
ADAM_LR_ABOVE = 3e-3


def _module_types(run: Run) -> set[str]:
    meta = getattr(run, "meta", {}) or {}
    types = set(meta.get("module_types") or ())
    return types | {e.module for e in run.entities() if e.module}


def _lr_without_warmup(run: Run) -> str:
    """Words for Adam-type optimisation at a high learning rate with no warm-up seen ('' when that is not the case)."""
    meta = getattr(run, "meta", {}) or {}
    opt, lr, initial = meta.get("optimizer"), meta.get("optimizer_lr"), meta.get("optimizer_initial_lr")
    if opt not in _ADAM_TYPES or not isinstance(lr, (int, float)) or lr <= ADAM_LR_ABOVE:
        return ""
    if isinstance(initial, (int, float)) and lr < initial:
        return ""  # a scheduler started below its base rate: a warm-up
    return (f"the learning rate: {opt} at lr {lr:g} with no warm-up (no scheduler had lowered it when the watch "
            f"started) moves every weight by about lr from the first step, which a deep net with attention or "
            f"normalisation often does not survive")


def _key(text: str) -> str | None:
    key = getattr(text, "key", None)
    return key if key is not None else next((k for k, v in REMEDIES.items() if v == text), None)


def _fit_architecture(found: list[Finding], run: Run) -> list[Finding]:
    """Remedies that fit the architecture: nothing the model already has, no swap of activations it does not use.

    With Adam at a high learning rate and no warm-up, the depth and spike findings name the learning rate.
    """
    types = _module_types(run)
    has_residual = bool(types & _RESIDUAL_TYPES)
    drop = set()
    if has_residual:
        drop.add("residual")
    if any("Norm" in t for t in types):
        drop.add("norm")
    relu_type = bool(types & _RELU_TYPES) or bool(types & {"TransformerEncoderLayer", "TransformerDecoderLayer"})
    if not types & _SATURATING_TYPES and (relu_type or run.entities("activation")):
        drop.add("relu")  # nothing tanh/sigmoid-like to swap
    lr_words = _lr_without_warmup(run)
    out = []
    for f in found:
        fixes = tuple(t for t in f.remedies if _key(t) not in drop)
        cause = f.cause
        if lr_words and f.severity != "info" and f.kind in ("vanishing", "exploding", "nonfinite", "stalled"):
            first = remedies("warmup", "lower_lr")
            fixes = first + tuple(t for t in fixes if _key(t) not in ("warmup", "lower_lr"))
            cause = f"{lr_words}; the measurement: {cause}"
        out.append(f if fixes == f.remedies and cause == f.cause else replace(f, remedies=fixes, cause=cause))
    return out


_BY_EFFECT = ("vanishing", "exploding", "saturation", "dead_units", "stalled")
_ORDER = {"nonfinite": 0, "skipped_steps": 0, "exploding": 1, "vanishing": 2, "dead_units": 3, "saturation": 4, "stalled": 5}


def diagnose(run: Run | str, thresholds: Thresholds | None = None) -> Diagnosis:
    """Findings of a stored run (a :class:`~gradwatch.Run` or its path), most severe first."""
    from gradwatch.store import open_run

    if not isinstance(run, Run):
        run = open_run(run)
    th = Thresholds() if thresholds is None else thresholds
    if not isinstance(th, Thresholds):
        raise TypeError(f"`diagnose(thresholds=…)` expects a gradwatch.Thresholds, got {type(th).__name__}")
    drop = skipped_steps(run)
    found = nonfinite_findings(run, th, drop)
    skipped = skipped_findings(run, th, drop)
    # After the first NaN/Inf every statistic is a casualty, not a cause: judge what came before,
    # leaving out the steps a GradScaler skipped (their gradients are inf/NaN by definition).
    if found or len(drop):
        view: Run = _Before(run, found[0].steps[0] if found else np.inf, drop)  # type: ignore[assignment]
    else:
        view = run
    found += spike_findings(view, th) + fading_findings(view, th) + depth_findings(view, th) + temporal_findings(view, th)
    found += activation_findings(view, th) + skipped
    found += stalled_findings(view, th, next((f for f in found if f.kind == "vanishing"), None))
    found = _earlier_episodes(found, view, th) + past_depth_findings(view, th, found)
    found = _fit_architecture(_by_effect(found, view, th), view)
    found.sort(key=lambda f: (f.severity != "critical", _ORDER[f.kind]))
    return Diagnosis(found, str(run.path))
