"""Over steps: spikes and ramps of the total gradient norm, a gradient that fades away, skipped and non-finite steps."""

from __future__ import annotations

import math
import warnings
from dataclasses import replace
from typing import Any

import numpy as np

from gradwatch.diagnosis.architecture import ADAM_TYPES, UNBOUNDED_BELOW, module_types, run_meta
from gradwatch.diagnosis.findings import Finding, sci, span
from gradwatch.diagnosis.measures import (
    EPS_TINY_STEP, FLAT_LOSS_ABOVE, halved, loss_ends, loss_went, nonfinite_grads_seen, real_fit, total_grad_norm,
    typical_update_ratio,
)
from gradwatch.diagnosis.remedies import key_of, remedies
from gradwatch.diagnosis.thresholds import Thresholds
from gradwatch.diagnosis.view import episodes, list_steps, since, steps_text
from gradwatch.probes.loss_ops import log_of_probabilities
from gradwatch.store import Run


def _total_source(steps: np.ndarray) -> str:
    return f"grad_norm (every layer, {steps_text(int(steps[0]), int(steps[-1]))}), total = √Σ layer²"


def spike_findings(run: Run, th: Thresholds) -> list[Finding]:
    """Exploding over steps: single-step spikes of the total norm, ramps into divergence, a norm beyond its bound."""
    got = total_grad_norm(run)
    if got is None:
        return []
    steps, total = got
    finite = np.isfinite(total)
    spikes, over, high = [], [], []
    start = total[: th.spike_after][finite[: th.spike_after]]
    initial = float(start.max()) if len(start) else math.inf
    # The absolute bound counts where the norm also grew (spike_above × the first steps' median), or where the
    # logged loss does not show the run learning (it did not halve, or too few steps to tell: a net at 10⁴ on
    # step 0 and NaN on step 1). A large loss gives a large gradient from the start (a regression on unnormalised
    # targets: 6·10² at MSE 3·10³, its peak 4–6× its start, measured) in a run that learns, with nothing exploding.
    ends = loss_ends(run, th)
    learns = halved(ends)
    grown = th.spike_above * float(np.median(start)) if len(start) and learns else 0.0
    for j in range(len(total)):
        if not finite[j]:
            continue
        prev = total[:j]
        prev = prev[np.isfinite(prev)]
        if len(prev) >= th.spike_after and total[j] > initial and total[j] > th.spike_above * np.median(prev):
            high.append(j)
            if total[j] > th.spike_above * np.median(prev[-th.spike_window:]):
                spikes.append(j)
        if total[j] > th.grad_norm_above and total[j] > grown:
            over.append(j)
    ramps = _ramps(run, steps, total, high, spikes, th)
    if not spikes and not over and not ramps:
        return []
    ramp_steps = sorted({j for a, b, _ in ramps for j in range(a, b + 1) if finite[j]})
    hit = sorted(set(spikes) | set(over) | set(ramp_steps))
    calm_idx = [j for j in range(len(total)) if finite[j] and j not in set(hit)]
    median = float(np.median(total[finite])) if finite.any() else math.nan
    clip = float(np.median(total[calm_idx])) if calm_idx else math.nan
    # the level to clip at is that of the calm steps before the event: after it a net may be dead (raw inputs: norms
    # of 177–1176 on steps 0–3, then 0.05–0.2 from dead units, advised max_norm=0.2 "which would have held" them)
    calm_before = [j for j in calm_idx if j < hit[0]]
    clip_at = float(np.median(total[calm_before])) if calm_before else math.nan
    parts = []
    for a, b, p in ramps:
        rose = (f"rose to a peak of {sci(float(total[p]))} at step {int(steps[p])}" if p != a
                else f"peaked there at {sci(float(total[p]))}")  # a one-step ramp: its onset is its peak
        parts.append(f"a ramp: the total norm left the calm steps' level at step {int(steps[a])} (against their "
                     f"median and MAD) and {rose}, "
                     + ("while the loss did not fall over those steps" if "loss" in run.quantities
                        else "rising steadily to the last step seen (no loss logged: the gradient alone shows it)"))
    if spikes:
        shown = ", ".join(str(int(steps[j])) for j in spikes[:5]) + (" …" if len(spikes) > 5 else "")
        parts.append(f"{len(spikes)} spike{'s' if len(spikes) > 1 else ''} above {th.spike_above:g}× the median "
                     f"of all the steps before and of the last {th.spike_window} (step{'s' if len(spikes) > 1 else ''} {shown})")
    if over:
        parts.append(f"the total norm crossed {sci(th.grad_norm_above)} on {len(over)} step{'s' if len(over) > 1 else ''}, "
                     f"first at step {int(steps[over[0]])}" + (f" ({th.spike_above:g}× above its first steps' median or more)"
                                                              if grown else ""))
    # the event's own peak: the largest norm among the steps the evidence names (a larger one elsewhere in the run,
    # within the calm steps' spread, is not part of it: a summary of 21 over evidence of 19 contradicted itself)
    peak_at = max((j for j in hit if finite[j]), key=lambda j: total[j], default=None)
    peak = float(total[peak_at]) if peak_at is not None else float(np.nanmax(np.where(finite, total, np.nan)))
    calm_phase = len(calm_before) >= th.spike_after  # a calm phase to clip at; else the scale is wrong from the start
    first_loss = _first_loss(run)
    large_loss = first_loss > LOSS_SCALE_ABOVE  # the loss's own scale: regression targets in their raw units
    heavy = weights_too_large(run) if large_loss else ""
    summed = summed_over_batch(run, first_loss) if large_loss and not heavy else ""
    # a classifier's loss (a cross-entropy's nodes in the loss's graph) has no targets' scale to blame (round 40: a
    # residual sum added twice in a 12-block MLP, the loss at ~1000 from logits ×10³, told "in a regression, the scale
    # of the targets" with target standardisation first)
    classifier = bool(CLASSIFIER_NODES & set(run_meta(run).get("loss_ops") or ()))
    targets_first = large_loss and not heavy and not summed and not classifier and "weight_norm" in run.quantities
    # A norm that starts ordinary and grows by spike_above or more before any calm phase: each step overshoots (a
    # GRU at SGD lr 0.5 with momentum 0.9, NaN by step 11, was blamed on "the initial scale of the weights")
    start_norm = float(total[finite][0]) if finite.any() else math.nan
    grew = float(np.nanmax(np.where(finite, total, np.nan))) / start_norm if start_norm > 0 else math.nan
    # ... from an ordinary start: a tenth of the bound or less (round 12: a GCN summing over an unnormalised adjacency
    # started at 793–1,300 against its normalised twin's 0.14–0.20, and was told "a learning rate too large")
    ordinary_start = start_norm < th.grad_norm_above / 10
    overshoot = not calm_phase and not large_loss and grew >= th.spike_above and ordinary_start
    if calm_phase:
        clipping = (f"gradient-norm clipping at about the norm of the calm steps before it, "
                    f"clip_grad_norm_(params, max_norm={sci(clip_at)}) (Pascanu et al. 2013), which would have held every one of these steps",)
        fixes = clipping + remedies("lower_lr", *(["standardise_targets"] if large_loss else []), "norm")
    elif large_loss:  # no calm phase, and a loss in the hundreds or more from the first step (the weights' scale or
        # the targets': the loss alone cannot tell them apart, and the doctor tries both; where every layer's weights
        # were measured at an ordinary scale, the targets go first — round 15: the diabetes targets ×100 under
        # nn.Linear's default init were told "weights re-initialised" first)
        scale = (("standardise_targets", "smaller_init") if targets_first else ("smaller_init",) if classifier
                 else ("smaller_init", "standardise_targets"))
        fixes = remedies(*(["mean_reduction"] if summed else []), *scale, "lower_lr", "clip_norm", "norm")
    elif overshoot:  # no calm phase, but a normal start that grew fast: the steps, not the scale
        fixes = remedies("lower_lr", "clip_norm", "smaller_init", "norm")
    else:  # no calm phase before it: the scale itself is wrong (a divergence within the first steps)
        fixes = remedies("smaller_init", "lower_lr", "clip_norm", "norm")
    peak_step = int(steps[peak_at]) if peak_at is not None else int(steps[int(np.nanargmax(np.where(finite, total, np.nan)))])
    # the level it jumped from: the median of the steps before the event, which the spike rule compares with (round
    # 28: "jumps to 6.5 (median 5.6)" over the whole run, of a spike ×10 the steps before it); the run's own without any
    earlier = total[: hit[0]][finite[: hit[0]]]
    level = f"median {sci(float(np.median(earlier)))} before it" if len(earlier) else f"median {sci(median)}"
    summary = (f"the total gradient norm jumps to {sci(peak)} ({level}), from step {int(steps[hit[0]])}"
               + (f", peak at step {peak_step}" if ramps else "")
               if spikes or ramps else f"the total gradient norm exceeds {sci(th.grad_norm_above)} from step {int(steps[hit[0]])} "
               f"(median {sci(median)})")
    severity = "critical" if over else "warning"
    # a bound crossed on a few steps of a run that learns, its norm back at the calm level: transient, like a spike
    # (round 24: a mixture density net's NLL, median norm 2.7e2, above 1e3 on 1–2 steps while its loss fell 37 → −9.6)
    fell = ends is not None and ends[0] > 0 and ends[1] <= 0.5 * ends[0]  # (an NLL may fall below 0)
    # ... and no spike against the run's own level: a norm that lives near the bound (an explosion that then killed
    # units is back at a "calm" level too — round 9's IRNN, a raw-target regression — and its peak is ×10 and more)
    near = bool(over) and max(float(total[j]) for j in over) <= th.spike_above * median
    transient = not over or (fell and len(over) <= th.window and near) or (calm_phase and _fell_during(run, steps, hit))
    recovered = _recovered(run, steps, total, clip, int(steps[hit[0]]), th) if transient else ""
    if recovered:  # severity follows the effect on training: transient spikes in a run that learns are info
        severity, fixes = "info", ()
        parts.append(recovered)
    return [Finding(
        kind="exploding", severity=severity, layers=(), steps=(int(steps[hit[0]]), int(steps[hit[-1]])),
        summary=summary,
        evidence="; ".join(parts) + ".",
        cause="unstable steps: a sharp region of the loss surface or a learning rate too large for it" if calm_phase
        else f"the gradient is too large from the first step: the loss starts at {sci(first_loss)} — the scale of "
             f"the weights ({heavy})" if large_loss and heavy
        else f"the gradient is too large from the first step: the loss starts at {sci(first_loss)} with every "
             f"layer's weights within ×{WEIGHTS_ABOVE_HE:g} of He's scale — in a regression, the scale of the targets (a "
             "squared error on targets in their raw units)" if targets_first
        else f"the gradient is too large from the first step: the loss starts at {sci(first_loss)}, a classifier's "
             "logits that large — the scale of the forward pass: the weights, the inputs, or activations that grow "
             "block by block (a residual sum that adds its input more than once)" if large_loss and classifier
        else f"the gradient is too large from the first step: the loss starts at {sci(first_loss)} — the scale of "
             "the weights, or, in a regression, of the targets (a squared error on targets in their raw units)"
             + (f", or {summed}" if summed else "") if large_loss
        else f"steps that overshoot: the total norm grew ×{sci(grew)} from {sci(start_norm)} at the first step, "
             "before any calm phase — a learning rate too large for this net" if overshoot
        else (f"the gradient is too large from the first step ({sci(start_norm)} at step {int(steps[finite][0])}): the "
              "scale of the forward pass at init — the weights, the inputs, or a sum that grows with its size (an "
              "unnormalised aggregation) — or of the loss"),
        remedies=fixes,
        # clip_at only from a calm phase: the median of a dozen steps already on their way up (a GRU at lr 0.5 that
        # is NaN by step 11: 27) clips too late to hold anything; without it the doctor clips at 1
        numbers={"peak": peak, "median": median, "clip_at": clip_at if calm_phase else math.nan, "spikes": float(len(spikes)),
                 "over_bound": float(len(over)), "peak_step": float(peak_step),
                 **({"onset": float(steps[ramps[0][0]])} if ramps else {}), **({"recovered": 1.0} if recovered else {})},
        sources=(_total_source(steps),),
    )]


# a cross-entropy's or a binary cross-entropy's nodes in the loss's graph (meta loss_ops): a classifier's loss
CLASSIFIER_NODES = frozenset({"NllLossBackward0", "NllLoss2DBackward0", "BinaryCrossEntropyWithLogitsBackward0",
                              "BinaryCrossEntropyBackward0"})
RECOVERED = "the run recovered"  # opens the last clause of a recovered finding's evidence (rules.merge_spikes drops it
# where the same steps hold a worse finding: a spike the run got over does not excuse attention that went one-hot)
TARGETS_STANDARDISED = "TargetScaled"  # the doctor's wrapper that trains a model as on standardised targets
LOSS_SCALE_ABOVE = 100.0  # a first loss above this: no classification loss starts there, a squared error on raw targets does
# A large first loss that is this much per sample of the batch: a sum of ordinary losses (a squared error on
# standardised targets starts near 1 a sample, a cross-entropy over 10 classes at 2.3), where no layer's weights
# are far above He's scale (an MSE mean from N(0, 1) weights also starts at 2.6–7 a sample of 128).
SUMMED_PER_SAMPLE = (0.3, 3.0)
SUMMED_BATCH_FROM = 16  # ... over a batch this large (over 4 samples, a loss of 4 per sample is no sign of anything)


WEIGHTS_ABOVE_HE = 2.5  # a layer's weights at the first step this many times He's norm √(2·fan_out): too large


def weights_too_large(run: Run) -> str:
    """Words for the layer whose weight norm at the first recorded step is furthest above the norm He
    initialisation gives (‖W‖ ≈ √(2·fan_out), for a Linear or a convolution alike), where it is ``WEIGHTS_ABOVE_HE``
    × or more ('' otherwise): the initial scale, not the loss, makes a first loss in the hundreds (N(0, 1) weights:
    ×2.7 in a Linear(20, 64), ×5.7 in a Linear(64, 1))."""
    if "weight_norm" not in run.quantities:
        return ""
    s = run.series("weight_norm")
    first = dict(zip(s.names, s.values[:, 0])) if s.values.shape[1] else {}
    worst = (0.0, "", 0.0)
    for layer in run_meta(run).get("layers") or ():
        if not isinstance(layer, dict):
            continue
        norm = first.get(str(layer.get("name")))
        # He's ‖W‖² is 2·fan_out: a module's "weight" is (out, in, …); a bare matrix of the user's (an
        # nn.ParameterList used as x @ W) is taken at the larger of its sides, the lenient reading
        he = sum(2 * (shape[0] if key == "weight" else max(shape[0], shape[1]))
                 for key, shape in (layer.get("params") or {}).items() if isinstance(shape, list) and len(shape) >= 2)
        if he > 0 and norm is not None and math.isfinite(norm):
            ratio = norm / math.sqrt(he)
            if ratio > worst[0]:
                worst = (ratio, str(layer.get("name")), float(norm))
    if worst[0] < WEIGHTS_ABOVE_HE:
        return ""
    return f"layer {worst[1]} starts at ‖W‖ = {sci(worst[2])}, ×{sci(worst[0])} what He initialisation gives"


def summed_over_batch(run: Run, first_loss: float) -> str:
    """Words for a large first loss that is an ordinary one per sample of the batch (meta ``batch_size``) — a loss
    summed over the batch, ``reduction='sum'`` ('' otherwise); asked only where no layer's weights are too large
    (:func:`weights_too_large`). Measured (round 6): an MSE with reduction='sum' on standardised targets over batches
    of 256 starts at 251–257 and is NaN by step 4 at SGD 0.01."""
    size = run_meta(run).get("batch_size")
    if not isinstance(size, int) or size < SUMMED_BATCH_FROM or not math.isfinite(first_loss):
        return ""
    per = first_loss / size
    if not SUMMED_PER_SAMPLE[0] <= per <= SUMMED_PER_SAMPLE[1]:
        return ""
    return (f"a loss summed over the batch rather than averaged (reduction='sum'): {sci(first_loss)} over a batch of "
            f"{size} is {sci(per)} a sample")


def _first_loss(run: Run) -> float:
    """The first finite logged loss (NaN when none is logged)."""
    if "loss" not in run.quantities:
        return math.nan
    values = run.series("loss", "run").values[0]
    finite = values[np.isfinite(values)]
    return float(finite[0]) if len(finite) else math.nan


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
    learns (zero-initialised residual branches) is not diverging. Without a logged loss the gradient alone must
    show the divergence: the stretch lasts to the last finite step seen (still rising, or into a NaN) and the norm
    climbs it as a real log-linear trend (:func:`real_fit`: a significant slope, 4× or more end to end).
    """
    if not high:
        return []
    loss: dict[int, float] | None = None
    if "loss" in run.quantities:
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
        if loss is None:
            last = int(np.flatnonzero(finite)[-1])
            if j == last and len(idx) >= 3 and real_fit(total[idx]):
                out.append((onset, j, peak))
            continue
        before = [loss.get(int(x), math.nan) for x in steps[max(0, onset - th.window): onset]]
        at = [loss.get(int(x), math.nan) for x in steps[max(onset, peak - th.window + 1): peak + 1]]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # no loss logged at those steps: NaN
            before_m = float(np.nanmedian(before)) if before else math.nan
            at_m = float(np.nanmedian(at)) if at else math.nan
        if math.isfinite(before_m) and math.isfinite(at_m) and at_m >= before_m:
            out.append((onset, j, peak))
    return out


def _fell_during(run: Run, steps: np.ndarray, hit: list[int]) -> bool:
    """The logged loss, finite throughout, fell while the norm was out: its median over the event's steps is at most
    ``FELL_DURING`` of its median over as many steps before it. Norms far beyond the bound on many steps can be a
    model's own geometry, not a step that overshoots (round 26: Poincaré embeddings kept in the ball by a projection,
    Euclidean gradients ×10⁴ their median near its edge on 20–40 steps while the loss fell 1.2 → 0.8 and the ranking
    reached 0.90–0.94); an explosion that damages the run does not lower its loss (round 9's IRNN, whose units died)."""
    if "loss" not in run.quantities:
        return False
    ls = run.series("loss", "run")
    if not np.isfinite(ls.values[0]).all():
        return False
    a, b = int(steps[hit[0]]), int(steps[hit[-1]])
    during = ls.values[0][(ls.steps >= a) & (ls.steps <= b)]
    before = ls.values[0][ls.steps < a][-max(len(during), 1):]
    return bool(len(during) and len(before) and float(np.median(during)) <= FELL_DURING * float(np.median(before)))


FELL_DURING = 0.9


def _recovered(run: Run, steps: np.ndarray, total: np.ndarray, calm: float, onset: int, th: Thresholds) -> str:
    """Words for a run that got over its gradient spikes ('' if it did not, or nothing shows it).

    Recovered means: the total norm of the last ``4 × window`` steps is back within ``spike_above`` of the calm
    steps' median, the logged loss is finite throughout, and the spikes left no damage: the loss fell to at most
    half its start (:func:`loss_ends`), or it ends no higher than it was just before the first spike (the median of
    the ``4 × window`` logged values before ``onset``). The second reading is for losses that need not fall — a
    GAN generator's measures it against a discriminator that learns too — and for a spike late in a run that had
    already learned. Without a logged loss nothing shows that the run learns.
    """
    if "loss" not in run.quantities or not math.isfinite(calm):
        return ""
    tail = total[-4 * th.window:]
    tail = tail[np.isfinite(tail)]
    ends = loss_ends(run, th)
    ls = run.series("loss", "run")
    if ends is None or not np.isfinite(ls.values[0]).all() or not len(tail):
        return ""
    first, final = ends
    late = float(np.median(tail))
    if late >= th.spike_above * calm:
        return ""
    back = f"{RECOVERED}: the total norm is back at {sci(late)} over the last {4 * th.window} steps"
    # a likelihood without its constant term may start or end below 0 (round 39: a Poisson NLL on log-rates, the
    # medians of its first and last values −0.57 → −2.2): fallen, short of what a loss without a minimum reaches
    if halved((first, final)) or -UNBOUNDED_BELOW * abs(first) < final < min(first, 0.0):
        return back + f" and the loss fell from {sci(first)} to {sci(final)} (info only)"
    before = ls.values[0][ls.steps < onset][-4 * th.window:]
    if len(before) >= th.window and final <= float(np.median(before)):
        return back + (f" and the loss ends at {sci(final)}, no higher than before the first spike "
                       f"({sci(float(np.median(before)))}): no lasting damage (info only)")
    return ""


# the loss functions of targets in [0, 1] or of class indices: no target of theirs is in raw units
UNIT_TARGET_LOSSES = frozenset({"BinaryCrossEntropyBackward0", "BinaryCrossEntropyWithLogitsBackward0",
                                "NllLossBackward0", "NllLoss2DBackward0"})
REGRESSION_LOSSES = frozenset({"MseLossBackward0", "L1LossBackward0", "SmoothL1LossBackward0", "HuberLossBackward0"})
UNIT_TARGETS_TO = 10.0  # a squared error's targets within ± this: not a regression in raw units


def _summed_over_unit_targets(run: Run) -> bool:
    """Whether the loss's graph (meta ``loss_ops``, ``loss_targets``) shows its targets at unit scale: a loss of
    targets in [0, 1] or of class indices and no regression loss beside it, or a squared error whose targets lie within
    ±:data:`UNIT_TARGETS_TO`. A large loss of such targets is a sum over many elements (``reduction='sum'``), not a
    regression in raw units (round 44: a VAE's summed binary cross-entropy over 64 pixels, 2.8·10³ → 1.6·10³ with the
    reconstructions explaining half the pixels' variance, told "targets in their raw units")."""
    meta = run_meta(run)
    ops, targets = set(meta.get("loss_ops") or ()), meta.get("loss_targets")
    if isinstance(targets, dict) and "bce_logits" not in targets:
        low, high = targets.get("min"), targets.get("max")
        if isinstance(low, (int, float)) and isinstance(high, (int, float)):
            return max(abs(low), abs(high)) <= UNIT_TARGETS_TO
    return bool(ops & UNIT_TARGET_LOSSES) and not ops & REGRESSION_LOSSES


def loss_scale_findings(run: Run, th: Thresholds) -> list[Finding]:
    """A loss that starts above ``LOSS_SCALE_ABOVE`` and does not halve: regression targets in their raw units.

    A squared error there explodes (:func:`spike_findings` names it); an absolute, smooth-L1 or Huber error has a
    bounded gradient instead, and a plain SGD step moves an output that must reach the hundreds by about lr: the
    run crawls with every gradient looking healthy (measured: smooth L1 on the diabetes targets, 25–346, at SGD
    lr 10⁻³, 169 → 151 in 400 steps, R² −3.5).

    Not on a model that predicts mean + std·output already (the doctor's target standardisation,
    ``TargetScaled``): its loss is in the targets' units while it trains as on unit targets, and a regression
    that reaches the noise of its data (round 15: diabetes, R² 0.61, its loss 5.0e7 → 3.0e7) need not halve.
    """
    if TARGETS_STANDARDISED in module_types(run):
        return []  # trained on standardised targets already (the doctor's row): its loss is in the user's units
    if _summed_over_unit_targets(run):
        return []
    first = _first_loss(run)
    ends = loss_ends(run, th)
    if not first > LOSS_SCALE_ABOVE or ends is None or not math.isfinite(ends[1]) or ends[1] <= 0.5 * ends[0]:
        return []
    steps = run.series("loss", "run").steps
    return [Finding(
        kind="stalled", severity="warning", layers=(), steps=(int(steps[0]), int(steps[-1])),
        summary=f"the loss starts at {sci(first)} and does not halve ({sci(ends[0])} → {sci(ends[1])})",
        evidence=(f"the first logged loss is {sci(first)}, above {LOSS_SCALE_ABOVE:g}; its medians went "
                  f"{sci(ends[0])} → {sci(ends[1])} (first {th.spike_after}, last {4 * th.window} values)."),
        cause=f"the loss's own scale: it starts at {sci(first)}, as a regression on targets in their raw units does, "
              "and the steps that reach targets that far take a very long time",
        remedies=remedies("standardise_targets", "adam"),
        numbers={"loss_first": ends[0], "loss_final": ends[1], "first_loss": first},
        sources=("loss (run)",),
    )]


TINY_STEP = 1e-5  # the upper-quartile layer's update ratio ‖Δw‖/‖w‖ below this a step: nothing moves (1e-3 is typical)
SMALL_LR = {"sgd": 1e-3, "adam": 1e-5}  # a rate the finding may call too small lies below these (SGD-type, Adam-type)
# Adam's eps this large makes its step about lr·g/eps (round 7: eps = 1 on digits, update ratios 1.3–5.4e-5 in every
# layer against 1.8–2.4e-3 at the default 1e-8, loss flat at 2.30); with such an eps the finding takes the upper
# quartile's update ratio below EPS_TINY_STEP as too short.
ADAM_EPS_FROM = 1e-3
# A low-precision weight's unit roundoff: an update below half its spacing, about this share of the weight, rounds
# away (bfloat16 keeps 8 significant bits, float16 11). Below ROUNDED_BELOW of it the upper-quartile layer's update
# ratio says most entries never change (round 19: pure bfloat16 weights under Adam 3e-5, ratios 7e-5–1.3e-4 against
# bfloat16's 3.9e-3, about 10 % of the entries ever changed, loss 2.30 → 2.29; in float32 0.63–0.79 held out).
ROUNDOFF = {"bfloat16": 2.0 ** -8, "float16": 2.0 ** -11}
ROUNDED_BELOW = 1 / 8


def _whole_run_warning(run: Run, **fields: Any) -> Finding:
    """A stalled-run warning over the logged loss's steps, of no layer in particular (a schedule's, a step size's)."""
    steps = run.series("loss", "run").steps
    return Finding(kind="stalled", severity="warning", layers=(), steps=(int(steps[0]), int(steps[-1])), **fields)


LR_COLLAPSED = 1e-3  # a learning rate that ended at this fraction of its start, or below, has gone to ~0
LOW_FOR = 0.5  # ... for at least this share of the run's optimizer steps (cosine annealing reaches it at the end)


def _plateau_max(meta: dict) -> dict | None:
    """A ``ReduceLROnPlateau`` with ``mode='max'`` on the optimizer (meta ``plateau_schedulers``), None for none."""
    return next((p for p in meta.get("plateau_schedulers") or () if isinstance(p, dict) and p.get("mode") == "max"),
                None)


def _collapse_cause(meta: dict) -> str:
    """What took the rate to ~0: a ``ReduceLROnPlateau`` in ``mode='max'`` where one is on the optimizer, else a
    schedule stepped faster than meant. Round 41: ReduceLROnPlateau(mode='max') stepped on a validation loss every
    10 steps (FunctionLab/selene#115), 10⁻³ → 10⁻⁸ in 300 steps, 0.45 held out against 0.95–0.97 in mode 'min', told
    "a scheduler stepped every batch"."""
    plateau = _plateau_max(meta)
    if plateau is not None:
        return (f"a ReduceLROnPlateau in mode='max' on this optimizer (factor {plateau['factor']:g}, patience "
                f"{plateau['patience']}): it counts a rise of what it is given as improvement, so given a loss, "
                f"which falls, it sees none and cuts the rate ×{plateau['factor']:g} after every patience + 1 of its "
                f"steps — mode='min' for a loss (mode='max' is for a score, such as accuracy)")
    return ("a learning-rate schedule that decays far faster than meant: a scheduler stepped every batch where it "
            "was meant per epoch (StepLR's step_size, MultiStepLR's milestones and ExponentialLR's gamma count "
            "scheduler.step() calls), or a step_size or gamma off by the number of batches in an epoch")


def lr_collapse_findings(run: Run, th: Thresholds) -> list[Finding]:
    """A learning rate that a schedule took to ~0 (meta ``optimizer_lr_last`` at most :data:`LR_COLLAPSED` × the
    start's ``optimizer_lr``) and kept there for :data:`LOW_FOR` of the run or more (``optimizer_lr_low_from``), in a
    run whose loss did not halve: every step since is ≈ 0. A schedule that reaches ~0 at its end, as cosine
    annealing and OneCycleLR do, is none. Round 17: StepLR(step_size=2, γ=0.5) meant per epoch, stepped per batch —
    0.05 → 1.2e-5 by step 24, 3.5e-47 by step 300, the loss at 2.25 (chance 2.30), update ratios exactly 0, and "the
    gradients look healthy"."""
    meta = run_meta(run)
    lr0, last = meta.get("optimizer_lr"), meta.get("optimizer_lr_last")
    if not (isinstance(lr0, (int, float)) and isinstance(last, (int, float)) and lr0 > 0 and last <= LR_COLLAPSED * lr0):
        return []
    low_from, stepped = meta.get("optimizer_lr_low_from"), meta.get("optimizer_steps")
    if not (isinstance(low_from, int) and isinstance(stepped, int) and stepped - low_from >= LOW_FOR * stepped):
        return []
    ends = loss_ends(run, th)
    if ends is None or halved(ends):
        return []
    at = meta.get("optimizer_lr_last_step")
    at = at if isinstance(at, int) else int(run.series("loss", "run").steps[-1])
    return [_whole_run_warning(
        run,
        summary=f"the learning rate fell from {lr0:g} to {last:.2g}: no step since changes anything",
        evidence=(f"the optimizer's largest learning rate was {lr0:g} at the start and {last:.2g} at step "
                  f"{at} (×{sci(last / lr0)}), at {LR_COLLAPSED:g} × its "
                  f"start or below from optimizer step {low_from} of {stepped}; the logged loss went "
                  f"{sci(ends[0])} → {sci(ends[1])} (medians of its first {th.spike_after} and last {4 * th.window} "
                  f"values)."),
        cause=_collapse_cause(meta),
        remedies=remedies("plateau_mode_min" if _plateau_max(meta) else "schedule_per_epoch"),
        numbers={"lr_first": float(lr0), "lr_last": float(last), "loss_first": ends[0], "loss_final": ends[1]},
        sources=("meta optimizer_lr, optimizer_lr_last", "loss (run)"),
    )]


def zero_lr_findings(run: Run, th: Thresholds) -> list[Finding]:
    """Every optimizer step taken at a learning rate of exactly 0 (meta ``optimizer_lr`` and ``optimizer_lr_peak``
    both 0), in a run whose loss did not halve: nothing ever moves, whatever the gradients. Round 38:
    get_linear_schedule_with_warmup built and never stepped (huggingface/transformers#2331) — LambdaLR sets the rate
    to base·λ(0) = 0 when it is built; a small Transformer's loss 2.3 → 2.3, 0.10 held out against its twin's 1.00,
    told "look outside the gradients" (at lr 10⁻⁹ the same net was told "too small a learning rate", and ×10 of 0 is
    0 all the same)."""
    meta = run_meta(run)
    lr0, peak, stepped = meta.get("optimizer_lr"), meta.get("optimizer_lr_peak"), meta.get("optimizer_steps")
    if not (lr0 == 0 and peak == 0 and isinstance(stepped, int) and stepped > 0):
        return []
    ends = loss_ends(run, th)
    if ends is None or halved(ends):
        return []
    base = meta.get("optimizer_initial_lr")
    if isinstance(base, (int, float)) and base > 0:
        cause = (f"a learning-rate scheduler built on this optimizer set the rate to its factor at step 0 — 0, a "
                 f"linear warm-up's start — and was never stepped: the groups' initial_lr, the rate the schedule "
                 f"starts from, is {base:g}")
        keys = remedies("step_scheduler")
    else:
        cause = "the optimizer's learning rate is 0: lr=0 where it was built, or set to 0 in its param_groups"
        keys = remedies("set_lr")
    steps = run.series("loss", "run").steps
    return [Finding(
        kind="stalled", severity="critical", layers=(), steps=(int(steps[0]), int(steps[-1])),
        summary="the learning rate is 0: no step changes any weight",
        evidence=(f"every group's learning rate was 0 at the start and after each of the {stepped} optimizer steps; "
                  f"the logged loss went {loss_went(run, th, ends)}."),
        cause=cause, remedies=keys,
        numbers={"lr_first": 0.0, "loss_first": ends[0], "loss_final": ends[1]},
        sources=("meta optimizer_lr, optimizer_lr_peak, optimizer_initial_lr", "loss (run)"),
    )]


def group_lr_collapse_findings(run: Run, th: Thresholds) -> list[Finding]:
    """Some parameter groups' learning rates taken to ~0 (:data:`LR_COLLAPSED` × their first or below, meta
    ``optimizer_groups_low``) for :data:`LOW_FOR` of the run or more while the other groups kept theirs, in a run
    whose loss did not halve: the layers those groups hold stop training, and the largest rate, which
    :func:`lr_collapse_findings` reads, says nothing. Round 38: a layer-wise decay of 0.75 multiplied into a
    scheduler's lambda at every step instead of once (jaehyunnn/ViTPose_pytorch#20) — three of four groups at
    10⁻⁴⁰–10⁻¹¹⁶ by step 300, the head's at 3·10⁻³, the loss 2.3 → 1.8–2.0, 0.26–0.36 held out against the twin's
    1.00, and "the gradients look healthy"."""
    meta = run_meta(run)
    low, stepped = meta.get("optimizer_groups_low"), meta.get("optimizer_steps")
    if not (isinstance(low, dict) and isinstance(stepped, int) and stepped > 0):
        return []
    groups = [g for g in low.get("groups") or () if isinstance(g, dict) and isinstance(g.get("low_from"), int)
              and stepped - g["low_from"] >= LOW_FOR * stepped]
    ends = loss_ends(run, th)
    if not groups or ends is None or halved(ends):
        return []
    modules = [m for g in groups for m in g.get("modules") or ()]
    watched = [str(l["name"]) for l in meta.get("layers") or () if isinstance(l, dict) and l.get("name") is not None]
    layers = tuple(n for n in watched if any(n == m or n.startswith(f"{m}.") or m.startswith(f"{n}.") for m in modules))
    rates = "; ".join(f"group {g['group']} ({span(g.get('modules') or [])}) {sci(g['lr_first'])} → {sci(g['lr_last'])} "
                      f"from optimizer step {g['low_from']}" for g in groups[:4])
    more = f"; and {len(groups) - 4} more" if len(groups) > 4 else ""
    steps = run.series("loss", "run").steps
    return [Finding(
        kind="stalled", severity="warning", layers=layers, steps=(int(steps[0]), int(steps[-1])),
        summary=(f"the learning rate of {len(groups)} of {low.get('of')} parameter groups fell to ~0 while the others "
                 f"kept theirs: {span(modules)} stopped training"),
        evidence=(f"at {LR_COLLAPSED:g} × their first rate or below: {rates}{more}, of {stepped} optimizer steps; "
                  f"the logged loss went {loss_went(run, th, ends)}."),
        cause=("a per-group factor that compounds: a layer-wise learning-rate decay multiplied into the groups' "
               "rates at every step (in a scheduler's lambda, or a loop over optimizer.param_groups) where it was "
               "meant once, or a schedule that decays these groups far faster than meant"),
        remedies=remedies("layer_decay_once", "schedule_per_epoch"),
        numbers={"groups_low": float(len(groups)), "loss_first": ends[0], "loss_final": ends[1],
                 "lr_last": float(min(g["lr_last"] for g in groups))},
        sources=("meta optimizer_groups_low, optimizer_steps", "loss (run)"),
    )]


WARMUP_SHORT_OF = 0.5  # a rate that never reached this share of its schedule's base (its peak) in the whole run
WARMUP_ROSE = 2.0  # ... while it rose this many times over and ended at its highest: a warm-up the run never finished


def unfinished_warmup_findings(run: Run, th: Thresholds) -> list[Finding]:
    """A warm-up longer than the run: the scheduler's rate rose through the run (its last rate its highest, at least
    :data:`WARMUP_ROSE` × its first) and never reached :data:`WARMUP_SHORT_OF` of its base (the param groups'
    ``initial_lr``, OneCycleLR's ``max_lr``), in a run whose loss did not halve. Round 33: a linear warm-up of 2000
    steps, GPT2-Chinese's default (Morizeyao/GPT2-Chinese#60), in a 300-step run of a small Transformer — the rate
    ended at 15 % of its peak, the loss 1.5 → 1.2, 0.52–0.59 held out against its twin's 0.98–0.99 (a warm-up of 30
    steps), and "the gradients look healthy"."""
    meta = run_meta(run)
    rates = [meta.get(k) for k in ("optimizer_lr", "optimizer_lr_last", "optimizer_lr_peak")]
    bases = [b for b in (meta.get("optimizer_initial_lr"), meta.get("optimizer_max_lr")) if isinstance(b, (int, float))]
    if not bases or not all(isinstance(v, (int, float)) for v in rates):
        return []
    first, last, peak = (float(v) for v in rates)  # type: ignore[arg-type]  # numbers, checked just above
    base = float(max(bases))
    if not (0 < peak <= WARMUP_SHORT_OF * base and last >= peak * (1 - 1e-6) and last >= WARMUP_ROSE * first):
        return []
    ends = loss_ends(run, th)
    if ends is None or halved(ends):
        return []
    stepped = meta.get("optimizer_steps")
    over = f"all {stepped} optimizer steps" if isinstance(stepped, int) else "the whole run"
    return [_whole_run_warning(
        run,
        summary=f"the learning rate was still warming up when the run ended: {last:.2g}, {last / base:.0%} of its "
                f"base {base:g}",
        evidence=(f"the optimizer's largest learning rate rose from {first:.2g} at the start to {last:.2g} at the last "
                  f"step, its highest over {over}, and never reached {WARMUP_SHORT_OF:.0%} of the schedule's base rate "
                  f"{base:g} (the param groups' initial_lr, or OneCycleLR's max_lr); the logged loss went {loss_went(run, th, ends)}."),
        cause=("a learning-rate warm-up longer than the run: the schedule's warm-up steps (num_warmup_steps, "
               "LinearLR's total_iters, a warm-up copied from a longer run) exceed the steps trained, so the rate "
               "climbs the whole time and the run trains at a small share of the rate it was given"),
        remedies=remedies("finish_warmup"),
        numbers={"lr_first": float(first), "lr_last": float(last), "lr_base": float(base),
                 "loss_first": ends[0], "loss_final": ends[1]},
        sources=("meta optimizer_lr, optimizer_lr_last, optimizer_lr_peak, optimizer_initial_lr", "loss (run)"),
    )]


def tiny_step_findings(run: Run, th: Thresholds) -> list[Finding]:
    """A flat loss while every layer moves by less than :data:`TINY_STEP` of its norm a step at a learning rate below
    :data:`SMALL_LR`: too small a rate, with every gradient looking healthy (measured: a Xavier tanh MLP on digits at
    SGD lr 10⁻⁵, loss 2.35 → 2.35 in 300 steps, update ratios ~10⁻⁷; at lr 0.05 it reaches 0.93–0.95). Or, under an
    Adam-type optimiser with eps of :data:`ADAM_EPS_FROM` or more, below :data:`EPS_TINY_STEP`: the eps."""
    ends = loss_ends(run, th)
    if ends is None or not ends[0] > 0 or ends[1] < FLAT_LOSS_ABOVE * ends[0]:
        return []
    typical, wsteps = typical_update_ratio(run, th)
    meta = run_meta(run)
    lr, adam, eps = meta.get("optimizer_lr"), meta.get("optimizer") in ADAM_TYPES, meta.get("optimizer_eps")
    low = [d for d in ROUNDOFF if d in (meta.get("param_dtypes") or ())]
    if low and 0 < typical < ROUNDED_BELOW * ROUNDOFF[low[0]]:
        return [_rounded_away(run, th, ends, typical, wsteps, low[0], lr)]
    if not 0 < typical < EPS_TINY_STEP:  # NaN: not recorded
        return []
    # Only a rate small by any standard: a converged run resumed at an ordinary rate also has a flat loss and short
    # steps, because its gradient is small, not its rate. Or Adam's eps far above any gradient's rms.
    if adam and isinstance(eps, (int, float)) and eps >= ADAM_EPS_FROM:
        return [_tiny_step_finding(run, th, ends, typical, wsteps, "",
                                   f"Adam's eps = {eps:g}: its step lr·m/(√v + eps) is about lr·g/eps wherever the "
                                   f"gradient's rms is below eps, so the steps are far too short (the default is 1e-8; "
                                   f"TensorFlow's 1.0 or 0.1 for Inception is for its own epsilon-hat)",
                                   remedies("lower_eps", "raise_lr"))]
    small_rate = isinstance(lr, (int, float)) and lr < SMALL_LR["adam" if adam else "sgd"]
    at = f" at lr {lr:g}" if isinstance(lr, (int, float)) else ""
    if (divided := _mean_divided_words(meta, at)) and not (typical < TINY_STEP and small_rate):
        # round 34: F.cross_entropy(out, y) / y.shape[0] under SGD 0.05 (williamleif/GraphSAGE#12), every gradient
        # 1/64 of its twin's, loss flat at 0.036 (= 2.30 / 64), held out 0.10–0.20 against 0.95; by default told only
        # "a flat loss the gradients do not explain … look outside the gradients"
        return [_tiny_step_finding(run, th, ends, typical, wsteps, at, divided,
                                   remedies("raise_lr") if adam else remedies("raise_lr", "adam"))]
    if (low_rate := _rate_set_low(meta)) and not (typical < TINY_STEP and small_rate):  # (else: too small a rate)
        # round 42: LambdaLR(opt, lambda x: lr·(1 + γx)^−0.75) (lhoyer/MIC#60), 3·10⁻³ squared to 9·10⁻⁶, and Adadelta
        # at Keras' 10⁻³ (tensorflow#36785), PyTorch's 1.0 ÷ 1000: held out at chance against 0.93–0.96, told only
        # "look outside the gradients"
        return [_tiny_step_finding(run, th, ends, typical, wsteps, at, low_rate, remedies("raise_lr"))]
    # a run from its init that never moved: as the caller says (the doctor's trials), or every layer at PyTorch's
    # default initialisation when the watch started (round 47: a distillation at T = 20 without T², "info" before)
    if (th.from_init or meta.get("default_init")) and not (typical < TINY_STEP and small_rate):
        return [_tiny_step_finding(run, th, ends, typical, wsteps, at,
                                   f"steps too short for this loss{at}, from the initialisation on: its gradient is "
                                   f"small, not the rate — a loss on a small scale (a distillation loss at temperature "
                                   f"T without its T² factor, a sum divided by a large constant), or a rate chosen for "
                                   f"another loss", remedies("raise_lr") if adam else remedies("raise_lr", "adam"))]
    if typical >= TINY_STEP or not small_rate:
        return []
    return [_tiny_step_finding(run, th, ends, typical, wsteps, at,
                               f"too small a learning rate{at}: the gradients are fine, the steps are too short to change "
                               f"anything", remedies("raise_lr") if adam else remedies("raise_lr", "adam"))]


BELOW_DEFAULT = 0.01  # a rate at this fraction of PyTorch's default for its optimizer, or below, is set low
SQUARED_WITHIN = 0.05  # a rate at its scheduler's base rate squared, within this relative tolerance


def _default_lr(name: object) -> float | None:
    """PyTorch's default ``lr`` for the optimizer class ``torch.optim.<name>``, None where it has none."""
    import inspect

    import torch

    cls = getattr(torch.optim, str(name), None)
    try:
        lr = inspect.signature(cls).parameters["lr"].default if isinstance(cls, type) else None
    except (KeyError, TypeError, ValueError):
        return None
    return float(lr) if isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr > 0 else None


def _rate_set_low(meta: dict) -> str:
    """Words for a rate set low by the set-up, '' otherwise: at the watch's start the rate was its scheduler's base
    rate squared (a LambdaLR whose lambda returns a rate where a factor is meant), or the optimizer's rate is
    :data:`BELOW_DEFAULT` of PyTorch's default for it or below (Adadelta at Keras' 10⁻³ for PyTorch's 1.0)."""
    lr, base, opt = meta.get("optimizer_lr"), meta.get("optimizer_initial_lr"), meta.get("optimizer")
    if not isinstance(lr, (int, float)) or not lr > 0:
        return ""
    if isinstance(base, (int, float)) and 0 < base < 0.1 and abs(lr - base * base) <= SQUARED_WITHIN * base * base:
        return (f"the learning rate at the start is {lr:.3g}, its scheduler's base rate {base:g} squared: a LambdaLR "
                f"sets lr = base × λ(step), so a lambda that returns a rate (lambda x: {base:g} · …) where a factor "
                f"is meant puts the rate in twice (pytorch/pytorch#78917) — the steps are {1 / base:.3g}× too short")
    default = _default_lr(opt)
    if default is not None and lr <= BELOW_DEFAULT * default:
        return (f"the learning rate: {opt} at lr {lr:g}, 1/{default / lr:.0f} of PyTorch's default for it "
                f"({default:g}), so every step is that much shorter than {opt} is built for" +
                (" — Adadelta scales its own steps by a ratio of running RMS (Zeiler 2012 has no rate at all) and "
                 "its lr, meant at about 1, only multiplies them; Keras' default of 0.001 for it is not PyTorch's"
                 if opt == "Adadelta" else ""))
    return ""


_MEAN_NAMES = {"NllLoss": "a cross-entropy or NLL loss", "NllLoss2D": "a cross-entropy or NLL loss",
               "MseLoss": "a mean squared error", "L1Loss": "an L1 loss", "SmoothL1Loss": "a smooth L1 loss",
               "HuberLoss": "a Huber loss", "BinaryCrossEntropy": "a binary cross-entropy",
               "BinaryCrossEntropyWithLogits": "a binary cross-entropy", "KlDiv": "a KL divergence"}


PRODUCT_NODES = frozenset({"CumprodBackward0", "ProdBackward0", "ProdBackward1"})


def _log_of_product(run: Run, loss_step: float) -> str:
    """The cause for a loss that is non-finite from its first logged step and takes the logarithm of a product of
    many factors (``LogBackward0`` and a ``torch.cumprod``/``torch.prod`` node in meta ``loss_ops``): the product
    underflowed to 0 before any update; '' otherwise."""
    ops = set(run_meta(run).get("loss_ops") or ())
    if "loss" not in run.quantities or "LogBackward0" not in ops or not ops & PRODUCT_NODES:
        return ""
    steps = run.series("loss", "run").steps
    if not len(steps) or loss_step != float(steps[0]):
        return ""
    calls = " and ".join(sorted({"torch.cumprod" if o.startswith("Cumprod") else "torch.prod"
                                 for o in ops & PRODUCT_NODES}))
    return (f"the loss takes the logarithm of a product of many factors ({calls} in its graph, then torch.log): a "
            f"product of a hundred or more factors below 1 underflows to 0 in float32 (0.5¹⁵⁰ ≈ 7·10⁻⁴⁶ is below its "
            f"smallest value, 1.4·10⁻⁴⁵), so its logarithm is −inf from the first step, before any update — sum the "
            f"factors' logarithms instead (a product of 1 − σ(z) as torch.cumsum(F.logsigmoid(−z)), of probabilities "
            f"as a cumsum of their logs)")


def _exp_in_loss(run: Run, loss_step: float) -> str:
    """The cause for a loss that is non-finite from its first logged step where the layers' outputs were finite
    there (``out_rms``) and the loss's graph takes ``torch.exp`` (meta ``loss_ops``): e^x overflows float32 above
    x ≈ 88.7; '' otherwise. Round 41: lightning-bolts' NT-Xent (Lightning-bolts#811, #320), exp(cos/τ) at τ = 0.01
    — e^100 = inf, then inf − inf — NaN at step 0 on every seed, told "the forward pass or the loss" with input
    standardisation and a GradScaler for a float32 model; its twin, F.cross_entropy on cos/τ, learns."""
    if "loss" not in run.quantities or "ExpBackward0" not in (run_meta(run).get("loss_ops") or ()):
        return ""
    steps = run.series("loss", "run").steps
    if not len(steps) or loss_step != float(steps[0]) or "out_rms" not in run.quantities:
        return ""
    out = run.series("out_rms")
    first = out.values[:, out.steps == steps[0]]
    if first.size == 0 or not np.isfinite(first).all():
        return ""
    return ("the loss exponentiates by hand (torch.exp in its graph, after the model's outputs, which are finite at "
            "the first step): e^x overflows float32 above x ≈ 88.7 — a cosine over a temperature of 0.01 reaches "
            "100 — and inf − inf or inf/inf is NaN from the first step; it underflows to 0 below x ≈ −103 — a "
            "sequence's log-probability e^(−115) — whose log is −inf; compute the loss in log space, on the "
            "exponent itself: F.cross_entropy or torch.logsumexp of the logits (a similarity over τ), never torch.exp "
            "and then a log")


def _zero_over_zero(run: Run, loss_step: float) -> tuple[str, str, str] | None:
    """The cause, its remedy key and the meta it read for a loss that is non-finite from its first logged step where
    the model normalises a weight whose norm is 0 (meta ``zero_weight_norms``) or the graph takes a variance or a
    standard deviation over no more elements per output than its correction (meta ``degenerate_reductions``: a
    ``torch.var`` over a 1×1 map, Bessel's n − 1 by default): 0/0 on every forward pass; None otherwise."""
    meta = run_meta(run)
    found, norms = meta.get("degenerate_reductions") or [], meta.get("zero_weight_norms") or []
    if "loss" not in run.quantities or not (found or norms):
        return None
    steps = run.series("loss", "run").steps
    if not len(steps) or loss_step != float(steps[0]):
        return None
    if norms:
        # round 37: an output layer zero-initialised, then wrapped in weight_norm (pytorch/pytorch#19126), NaN at step
        # 0, told "the forward pass or the loss" with input standardisation and a GradScaler
        got = norms[0]
        rows, zero = int(got.get("rows", 1)), int(got.get("zero_rows", 1))
        shape = "×".join(str(d) for d in got.get("shape") or ())
        return (f"weight normalisation (w = g·v/‖v‖) of the {shape} weight of '{got.get('module') or ''}', "
                f"{'all ' if zero == rows else ''}{zero} of whose {rows} rows {'is' if zero == 1 else 'are'} "
                f"0 at the start: g = ‖v‖ = 0 there, so w is 0·0/0 = NaN on every forward pass, before any update "
                f"— initialise the weight before wrapping it (a layer meant to start at 0: zero g alone, after)",
                "weight_norm_init", "meta zero_weight_norms")
    got = found[0]
    dims = "all its dimensions" if got.get("dims") is None else f"dims {tuple(got['dims'])}"
    shape = "×".join(str(d) for d in got.get("input") or ())
    over, correction = int(got.get("over", 1)), float(got.get("correction", 1))
    return (f"{got.get('op', 'torch.var')} over {dims} of a {shape} input reduces {over} "
            f"element{'s' * (over != 1)} per output with a correction of {correction:g} (Bessel's n − 1, torch.var's "
            f"and torch.std's default): it divides by {over} − {correction:g} = {over - correction:g}, so every "
            f"value it makes is NaN (0/0), on every forward pass, before any update — pass correction=0 "
            f"(unbiased=False), as an instance statistic over a 1×1 map needs, or reduce over more elements",
            "biased_variance", "meta degenerate_reductions")


def _mean_divided_words(meta: dict, at: str) -> str:
    """The cause for a loss that is a mean divided again by a constant (meta ``mean_divided``,
    :func:`gradwatch.probes.loss_ops.mean_divided`) whose steps ``at`` a rate are too short; '' for none — nor where
    the constant is the number of backward passes a step (``backwards_per_step``: gradient accumulation's own
    division), or unread in a run that accumulates."""
    divided = meta.get("mean_divided")
    if not isinstance(divided, dict):
        return ""
    got, passes, batch = divided.get("divisor"), meta.get("backwards_per_step"), meta.get("batch_size")
    known = isinstance(got, (int, float))
    d = float(got) if isinstance(got, (int, float)) else math.nan
    k = float(passes) if isinstance(passes, (int, float)) else 1.0
    if k > 1.5 and (not known or abs(d - k) < 0.5) or known and abs(d) <= 1:
        return ""
    node = str(divided.get("loss", "")).removesuffix("Backward0")
    what = "torch.mean of a loss" if node.startswith("Mean") else f"{_MEAN_NAMES.get(node, node)} with reduction='mean'"
    if known:
        by = f"{d:g}" + (", the batch size" if d == batch else "")
        share = f"1/{d:g} of the mean's, and the steps{at} are ×{d:g} too short"
    else:
        by, share = "a constant", f"that constant's fraction of the mean's, and the steps{at} as much too short"
    return (f"a mean divided again by {by}: the loss is {what}, already an average over the batch, divided by "
            f"{'it' if known else 'that constant'}, so every gradient is {share} (williamleif/GraphSAGE#12: a "
            f"cross-entropy divided by the batch size twice) — drop the division, or raise the rate by as much")


def _rounded_away(run: Run, th: Thresholds, ends: tuple[float, float], typical: float, wsteps: np.ndarray,
                  dtype: str, lr: object) -> Finding:
    """A flat loss with weights in a low-precision dtype whose updates are far below its spacing: they round away."""
    at = f" (lr {lr:g})" if isinstance(lr, (int, float)) else ""
    f = _tiny_step_finding(
        run, th, ends, typical, wsteps, "",
        f"the weights are in {dtype}, whose spacing is about {sci(2 * ROUNDOFF[dtype])} of a weight's size: an update "
        f"below half of it rounds to nothing, and the steps{at} are ×{sci(ROUNDOFF[dtype] / typical)} smaller than "
        f"that, so most weights never change (Micikevicius et al. 2018, §3.1: an update below 2⁻¹¹ of a float16 "
        f"weight is lost; Zamirai et al. 2020 for bfloat16)",
        remedies("master_weights", "raise_lr"))
    return replace(f, summary=f"the loss does not fall ({sci(ends[0])} → {sci(ends[1])}): the updates round away in "
                              f"{dtype} (update ratio {sci(typical)} a step)",
                   numbers={**f.numbers, "roundoff": ROUNDOFF[dtype]},
                   sources=(*f.sources, "meta param_dtypes"))


def _tiny_step_finding(run: Run, th: Thresholds, ends: tuple[float, float], typical: float, wsteps: np.ndarray,
                       at: str, cause: str, fixes: tuple[str, ...]) -> Finding:
    return _whole_run_warning(
        run,
        summary=f"the loss does not fall ({sci(ends[0])} → {sci(ends[1])}) and no layer moves: update ratio "
                f"{sci(typical)} a step{at}",
        evidence=(f"the logged loss went {sci(ends[0])} → {sci(ends[1])} (medians of its first {th.spike_after} and "
                  f"last {4 * th.window} values); ‖Δw‖/‖w‖ per step is {sci(typical)} in the upper-quartile layer "
                  f"(about 1e-3 is typical), over steps {int(wsteps[0])}–{int(wsteps[-1])}."),
        cause=cause, remedies=fixes,
        numbers={"update_ratio": typical, "loss_first": ends[0], "loss_final": ends[1]},
        sources=("loss (run)", f"update_ratio (layers, {steps_text(int(wsteps[0]), int(wsteps[-1]))})"),
    )


SCALED_CLIP_BELOW = 1e-3  # a clip bound, in the watch's unscaled units, this small ...
USER_BOUNDS = (1e-2, 1e2)  # ... that is a bound a user writes once multiplied by the GradScaler's scale


def _clipped_while_scaled(run: Run, bound: float) -> str:
    """Words for a clip bound that a GradScaler's scale (meta ``loss_scale_last``) turns into one a user writes: the
    gradients were clipped while still scaled, before ``scaler.unscale_(optimizer)``; '' otherwise. Round 45: an
    LSTM at SGD 5 clipping at 0.5 with a CPU GradScaler at 2¹⁶ (pytorch/pytorch#40907), every step 0.5/2¹⁶ =
    7.6·10⁻⁶ long once unscaled, 0.05–0.14 held out against 0.97–0.99, told "max_norm≈7.6e-06" before."""
    scale = run_meta(run).get("loss_scale_last")
    if not isinstance(scale, (int, float)) or not scale > 1 or not 0 < bound < SCALED_CLIP_BELOW:
        return ""
    written = bound * scale
    if not USER_BOUNDS[0] <= written <= USER_BOUNDS[1]:
        return ""
    return (f"the gradients clipped while still scaled: clip_grad_norm_(…, max_norm≈{written:.3g}) ran before "
            f"scaler.unscale_(optimizer), on gradients ×{scale:g} (the GradScaler's scale), so once unscaled each "
            f"step's gradient has a norm of {sci(bound)} = {written:.3g}/{scale:g}, and every update is that short "
            f"(pytorch/pytorch#40907)")


CLIPPED_SPREAD = 1e-4  # a total norm within this relative spread of one value on (nearly) every step is a clip bound


def clipped_findings(run: Run, th: Thresholds) -> list[Finding]:
    """The user's gradient clipping holds on every step: the total norm, read after it, is one value throughout.

    No gradient norm is that constant by itself; ``clip_grad_norm_(params, max_norm)`` with a bound below the
    gradient's own scale makes every update a step of length lr·max_norm (measured: an RNN at SGD with
    max_norm=1e-6 stayed at chance, its update ratios 1.5e-7, with nothing else found). Info when the loss still
    fell to half its start, under an Adam-type optimiser (whose step does not scale with the gradient: it learns
    through it), or where the steps are of an ordinary length all the same — the upper-quartile layer's update
    ratio at least :data:`EPS_TINY_STEP` (round 11: a GRU language model at SGD lr 20 with clip_grad_norm_(…, 0.25),
    pytorch/examples' recipe, learns 2.17 → 1.32; clipping at 1 or 2 instead leaves it above chance); else a warning.
    """
    got = total_grad_norm(run)
    if got is None:
        return []
    steps, total = got
    ok = total[np.isfinite(total) & (total > 0)]
    if len(ok) < th.spike_after + 4 * th.window:
        return []
    bound = float(np.median(ok))
    held = np.abs(ok / bound - 1) < CLIPPED_SPREAD
    if held.mean() < 0.9:
        return _clipped_by_value(run, th)
    ends = loss_ends(run, th)
    # Adam's step does not scale with the gradient: a bound it always meets leaves its updates as they were
    adaptive = run_meta(run).get("optimizer") in ADAM_TYPES
    step, _ = typical_update_ratio(run, th)
    learns = adaptive or halved(ends) or step >= EPS_TINY_STEP  # NaN (not recorded): not known to move
    scaled_clip = _clipped_while_scaled(run, bound)
    return [Finding(
        kind="stalled", severity="info" if learns else "warning", layers=(), steps=(int(steps[0]), int(steps[-1])),
        summary=f"the gradient is clipped on every step: its total norm is {sci(bound)} on {int(held.sum())} of {len(ok)} steps",
        evidence=(f"the total gradient norm, read after the step's clipping, is {sci(bound)} within "
                  f"{CLIPPED_SPREAD:g} on {held.mean():.0%} of the steps"
                  + (f"; the loss went {loss_went(run, th, ends)}" if ends is not None else "")
                  + (f"; the upper-quartile layer moves by {sci(step)} of its norm a step"
                     if math.isfinite(step) else "")
                  + "."),
        cause=scaled_clip or (
            f"a clipping bound below the gradient's own scale (clip_grad_norm_(…, max_norm≈{sci(bound)})): it holds "
            "on every step, so every update has the same length, lr × the bound, whatever the gradient says"),
        remedies=(() if learns else remedies("unscale_before_clip", "raise_clip") if scaled_clip
                  else remedies("raise_clip")),
        numbers={"clip_bound": bound, "held": float(held.mean())},
        sources=(_total_source(steps),),
    )]


VALUE_CLIPPED_SPREAD = 0.05  # every layer's ‖g‖/√n within this of one value c on (nearly) every step: clipped at ±c


def _clipped_by_value(run: Run, th: Thresholds) -> list[Finding]:
    """The user's ``clip_grad_value_(params, c)`` below the gradient's own scale: nearly every element sits at ±c, so
    each layer's gradient norm, read after the clipping, is c·√(its elements) on every step — one c for every
    layer. Round 17: clip_grad_value_(…, 1e-5) on an MLP at SGD 0.05, norms within 3 % of √n·1e-5 for 300 steps,
    the raw gradient 0.42–0.58 (the twin's), "No findings" from the watch and "its gradient is small … a loss on a
    small scale" from the doctor, whose lr ×100 held only while the clip stayed (clip fixed, that rate diverges)."""
    if "grad_norm" not in run.quantities:
        return []
    sizes = {l.get("name"): sum(int(np.prod(shape)) for shape in (l.get("params") or {}).values())
             for l in run_meta(run).get("layers") or () if isinstance(l, dict)}
    s = run.series("grad_norm")
    rows = [i for i, n in enumerate(s.names) if sizes.get(n)]
    if len(rows) < 2:
        return []
    per = s.values[rows] / np.sqrt([[sizes[s.names[i]]] for i in rows])  # ‖g‖/√n: c where every element is ±c
    per = per[:, np.isfinite(per).all(axis=0) & (per > 0).all(axis=0)]
    if per.shape[1] < th.spike_after + 4 * th.window:
        return []
    c = float(np.median(per))
    held = (np.abs(per / c - 1) < VALUE_CLIPPED_SPREAD).all(axis=0)
    if held.mean() < 0.9:
        return []
    ends = loss_ends(run, th)
    step, _ = typical_update_ratio(run, th)
    adaptive = run_meta(run).get("optimizer") in ADAM_TYPES
    learns = adaptive or halved(ends) or step >= EPS_TINY_STEP
    return [Finding(
        kind="stalled", severity="info" if learns else "warning", layers=(), steps=(int(s.steps[0]), int(s.steps[-1])),
        summary=f"the gradient is clipped by value on every step: nearly every element is at ±{sci(c)}",
        evidence=(f"each of {len(rows)} layers' gradient norm, read after the step's clipping, is {sci(c)} × √(its "
                  f"elements) within {VALUE_CLIPPED_SPREAD:.0%} on {held.mean():.0%} of the steps read — what a "
                  f"gradient whose every element sits at ±{sci(c)} has"
                  + (f"; the loss went {loss_went(run, th, ends)}" if ends is not None else "")
                  + (f"; the upper-quartile layer moves by {sci(step)} of its norm a step" if math.isfinite(step)
                     else "") + "."),
        cause=(f"a clipping value below the gradient's own scale (clip_grad_value_(…, clip_value≈{sci(c)})): it cuts "
               f"every element to ±{sci(c)}, so every update is lr × {sci(c)} a weight, whatever the gradient says"),
        remedies=() if learns else remedies("raise_clip"),
        numbers={"clip_value": c, "held": float(held.mean())},
        sources=("grad_norm (layers), meta layers' parameter shapes",),
    )]


def _fading_remedies(run: Run) -> tuple[str, ...]:
    """A faded gradient's remedies: the non-saturating loss where the loss's graph holds a sigmoid or a binary
    cross-entropy (a GAN's generator loss does), the loss on the logits where it holds a sigmoid or a softmax (not
    a log-softmax), then a lower learning rate; both where the loss's graph was not read. Round 29: a BatchNorm
    classifier under cross-entropy, its gradient ×0.009 of a wild start, was offered both."""
    ops = run_meta(run).get("loss_ops")
    if not isinstance(ops, list):
        return ("nonsaturating", "logits_loss", "lower_lr")
    sigmoid = any("Sigmoid" in op or "BinaryCrossEntropy" in op for op in ops)
    squash = sigmoid or "SoftmaxBackward0" in ops
    return (("nonsaturating",) if sigmoid else ()) + (("logits_loss",) if squash else ()) + ("lower_lr",)


def fading_findings(run: Run, th: Thresholds) -> list[Finding]:
    """Vanishing over steps: the whole gradient collapses while the loss has not converged.

    The total norm's median over the last ``4 × window`` steps against its
    median over the first ``spike_after``: below ``vanish_below`` of it, critical, unless the logged loss fell to
    below ``vanish_below`` of its start (converged); below ``fade_below`` of it, a warning where a logged loss
    shows the run did not halve it. Dated from the step the norm stays under ``fade_below`` of its start.
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
    if not (early > 0 and late < th.fade_below * early):
        return []
    ends = loss_ends(run, th, least=th.spike_after + 1)
    if ends is not None and ends[1] < ends[0] and abs(ends[1]) < th.vanish_below * abs(ends[0]):
        return []  # converged (the loss fell to ~0): a vanishing gradient is what a minimum looks like
    if ends is not None and ends[1] < ends[0] and abs(ends[1]) < th.fade_below * abs(ends[0]):
        # ... and one that reached ~0 and ended near it, at a hundredth of its start (round 37: full-batch Rprop on
        # digits, the loss 2.2 → 3·10⁻¹⁰ and back to 0.014 in its last steps' bounces, 0.89 held out: "collapsed")
        loss = run.series("loss", "run").values[0]
        loss = loss[np.isfinite(loss)]
        if len(loss) and float(np.abs(loss).min()) < th.vanish_below * abs(ends[0]):
            return []
    collapsed = late < th.vanish_below * early
    if not collapsed and (ends is None or halved(ends)):
        return []  # faded only to 10⁻²: what a run that learns may show, and without a loss nothing says it did not
    start = since(total < th.fade_below * early, steps, th.window)
    first, final = ends if ends is not None else (math.nan, math.nan)
    return [Finding(
        kind="vanishing", severity="critical" if collapsed else "warning", layers=(), steps=(start, int(steps[-1])),
        summary=f"the whole gradient {'collapsed' if collapsed else 'faded'}: its norm is {sci(late / early)} of what "
                f"it was at the start, under {th.fade_below:.0%} of it since step {start}",
        evidence=(f"the total gradient norm fell from {sci(early)} (median of steps {int(steps[0])}–"
                  f"{int(steps[ok][th.spike_after - 1])}) to {sci(late)} (median of the last {4 * th.window} steps) "
                  + ("while the loss did not converge." if collapsed else
                     f"while the loss did not halve ({sci(first)} → {sci(final)}).")),
        cause="nothing flows back from the loss any more: an output unit (a sigmoid, a softmax) in its flat tails, a "
        "loss on a clamped or detached output, or units that stopped passing a gradient; for a GAN generator trained "
        "with the minimax loss log(1 − D(G(z))), a discriminator that confidently rejects the samples",
        remedies=remedies(*_fading_remedies(run)),
        numbers={"ratio": late / early, "early": early, "late": late},
        sources=(_total_source(steps),) + (("loss (run)",) if "loss" in run.quantities else ()),
    )]


def skipped_steps(run: Run) -> np.ndarray:
    """Steps that optimizer.step() never took (a GradScaler skipping inf/NaN gradients)."""
    if "skipped_step" not in run.quantities:
        return np.zeros(0, dtype=np.int64)
    s = run.series("skipped_step", "run")
    return s.steps[np.nan_to_num(s.values[0]) > 0].astype(np.int64)


def skipped_findings(run: Run, th: Thresholds, skipped: np.ndarray) -> list[Finding]:
    """More than ``skipped_above`` of the steps skipped by a GradScaler; ``skipped``: the run's :func:`skipped_steps`."""
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
        kind="skipped_steps", severity="critical" if persistent else "warning", layers=(),
        steps=(int(skipped[0]), int(skipped[-1])),
        summary=(f"the GradScaler skipped {len(skipped)} of {len(steps)} steps ({frac:.0%}) for inf/NaN gradients"
                 + (", every one of the last ones" if persistent else "")),
        evidence=f"skipped steps {list_steps(skipped)}{scale}.",
        cause="float16 gradients overflow even at a reduced loss scale" if not persistent else
        "the gradients are non-finite at any loss scale: the model itself diverges (or the data holds NaN/Inf)",
        remedies=remedies("bf16", "clip_norm", "lower_lr", "check_data"),
        numbers={"skipped": float(len(skipped)), "fraction": frac},
        sources=("skipped_step (run)",) + (("loss_scale (run)",) if scale else ()),
    )]


def nonfinite_remedies(step: int, half_weights: bool = False) -> tuple[str, ...]:
    """The remedies of a run that goes non-finite at ``step``: at the first step no update has happened yet, so the
    inputs, the loss or the init, not the learning rate. ``half_weights``: the parameters are float16 themselves,
    whose gradients torch.amp.GradScaler refuses ("Attempting to unscale FP16 gradients"): float32 weights under
    autocast in its place."""
    scaler = "fp32_weights" if half_weights else "grad_scaler"
    if step == 0:
        return remedies("check_data", "standardise_inputs", "smaller_init", scaler)
    return remedies("lower_lr", "clip_norm", "check_data", scaler)


def _infinite_ctc(run: Run, loss_step: float) -> str:
    """Words where the loss is a CTC loss (meta ``loss_ops``: ``CtcLossBackward0``) that is +inf at the first
    non-finite step: an input sequence too short to align its target — T frames hold L labels only with a blank
    between each repeated pair, T ≥ L + repeats — has no alignment, so its loss is +inf and its gradient NaN
    (torch.nn.CTCLoss's zero_infinity); '' otherwise. Round 20 (captcha_break#29; mmocr#159's fix): 10 % of the
    clips truncated below their label count, +inf at step 0, told "non-finite values in the forward pass or the
    loss" with input standardisation and re-initialisation, both of which diverged as the baseline did."""
    if "CtcLossBackward0" not in (run_meta(run).get("loss_ops") or ()) or not math.isfinite(loss_step):
        return ""
    loss = run.series("loss", "run")
    at = np.where(loss.steps == loss_step)[0]
    if not len(at) or not np.isposinf(loss.values[0][at[0]]):
        return ""
    return (f"a CTC loss that is +inf from step {int(loss_step)}: an input sequence too short for its target (T frames "
            "hold L labels only with a blank between repeated ones, T ≥ L + repeats) has no alignment, so its loss "
            "is +inf and the gradient NaN — one such sample makes the batch's mean +inf")


FLOAT16_TINY = 2.0 ** -24  # float16's smallest positive number (a subnormal, ≈ 6e-8): an eps below half of it is 0


def _made_by_update(run: Run, loss: np.ndarray, loss_steps: np.ndarray, grads_read_before: bool,
                    step0: int) -> tuple[str, list[str], bool] | None:
    """Where the optimizer's update itself made the weights non-finite: the gradients of the step before ``step0``
    were read and finite, the loss there finite and of its size so far, the loss at ``step0`` non-finite, and the
    update ratio ‖Δw‖/‖w‖ read at that step non-finite (the weights after the update were NaN/Inf). (The cause in
    words, the layers, whether the eps below is it), or None. Under an Adam-type optimizer with float16 weights
    whose eps float16 rounds to 0, that eps (round 18: model.half() with Adam's default eps 1e-8 — every gradient
    finite at step 0, 98 % of the weights NaN after its update: where a gradient entry is 0, m/(√v + eps) is 0/0)."""
    if not (grads_read_before and step0 >= 1 and "update_ratio" in run.quantities):
        return None
    at, before = np.where(loss_steps == step0)[0], np.where(loss_steps == step0 - 1)[0]
    if not (len(at) and len(before) and not np.isfinite(loss[at[0]]) and _ordinary_loss(loss, int(before[0]))):
        return None
    u = run.series("update_ratio")
    col = np.where(u.steps == step0 - 1)[0]
    if not len(col):
        return None  # the update of that step was not read
    broken = [u.names[i] for i in range(len(u.names)) if np.isinf(u.values[i, col[0]]) or
              np.isnan(u.values[i, col[0]])]
    if not broken:
        return None
    meta = run_meta(run)
    eps, adam = meta.get("optimizer_eps"), meta.get("optimizer") in ADAM_TYPES
    half = "float16" in (meta.get("param_dtypes") or ())
    made = (f"the optimizer's update at step {step0 - 1} made the weights non-finite from finite gradients (every "
            f"gradient of step {step0 - 1} finite, its loss finite, ‖Δw‖/‖w‖ of that update non-finite in "
            f"{span(broken)}, the forward pass of step {step0} NaN)")
    if adam and half and isinstance(eps, (int, float)) and 0 <= eps < FLOAT16_TINY / 2:
        return (f"{meta.get('optimizer')}'s eps = {eps:g} is 0 in float16 (its smallest number is 6e-08), and the "
                f"weights are float16 (model.half()): where a gradient entry is 0 the step lr·m/(√v + eps) is 0/0 — "
                + made), broken, True
    return made, broken, False


ORDINARY_LOSS_WITHIN = 10.0  # a loss within this factor of the largest before it has not diverged


def harmless_nan_loss(run: Run) -> Finding | None:
    """An ``info`` finding where the logged loss is non-finite on some steps, finite again after each (its last value
    finite, at most half its steps non-finite), while no gradient was ever non-finite: a value undefined on a batch
    that the backward pass did not carry — a mean over no elements (every target ``ignore_index``: round 35, a
    tagger's ``nn.CrossEntropyLoss(ignore_index=-100)`` on batches without a label, NaN on 10–25 of 300 steps with a
    gradient of exactly 0 there, learning exactly as its twin; told "critical: Post-LN without warm-up"). None
    otherwise."""
    if "loss" not in run.quantities:
        return None
    loss = run.series("loss", "run")
    values, steps = loss.values[0], loss.steps
    bad = ~np.isfinite(values)
    if not bad.any() or bad[-1] or bad.mean() > 0.5:
        return None
    if nonfinite_grads_seen(run):
        return None
    got = total_grad_norm(run)
    if got is not None and np.isinf(got[1]).any():
        return None
    at = steps[bad]
    zero = ""
    if got is not None:
        read = np.isin(got[0], at) & np.isfinite(got[1])
        if read.any():
            zero = (f"; the total gradient norm is 0 on {int((got[1][read] == 0).sum())} of the {int(read.sum())} of "
                    f"those steps read")
    shown = ", ".join(str(int(x)) for x in at[:5]) + (" …" if len(at) > 5 else "")
    return Finding(
        kind="nonfinite", severity="info", layers=(), steps=(int(at[0]), int(at[-1])),
        summary=f"the logged loss is NaN on {len(at)} of {len(values)} steps, with finite gradients",
        evidence=(f"the logged loss is non-finite at step{'s' if len(at) > 1 else ''} {shown}, each followed by finite "
                  f"values, and no gradient read was ever non-finite{zero}."),
        cause=("a loss value undefined on some batches that the backward pass did not carry: a mean over no elements — "
               "a batch whose every target is ignored (nn.CrossEntropyLoss(ignore_index=…) and F.cross_entropy give "
               "0/0 = NaN there, with a gradient of 0: pytorch/pytorch#70348) or masked out; such a step changes "
               "nothing. Log the loss only where the batch has a target, or skip those batches"),
        remedies=(), numbers={"nan_steps": float(len(at))}, sources=("loss (run)", "nonfinite (layers)"),
    )


NONFINITE_CAUSE = "non-finite values in the forward pass or the loss"  # where no measurement says more
SUDDEN_AFTER = 3  # a loss logged finite and of its usual size on this many steps or more before it turned non-finite


def _sudden_in_forward(run: Run, loss_step: float) -> bool:
    """The logged loss turned non-finite at ``loss_step`` after at least :data:`SUDDEN_AFTER` finite steps, its
    last finite value of the size it had so far (:func:`_ordinary_loss`): the forward pass of one batch made the NaN,
    no divergence led to it (the caller has checked the gradient's norm)."""
    if "loss" not in run.quantities or not math.isfinite(loss_step):
        return False
    loss = run.series("loss", "run")
    at = np.where(loss.steps == loss_step)[0]
    if not len(at) or at[0] < SUDDEN_AFTER:
        return False
    before = loss.values[0][: at[0]]
    return bool(np.isfinite(before).all()) and _ordinary_loss(before, len(before) - 1)


def _ordinary_loss(loss: np.ndarray, at: int) -> bool:
    """The loss at index ``at`` is finite and of the size it had so far (at most :data:`ORDINARY_LOSS_WITHIN` times
    the largest magnitude before it; at the first step, finite is enough): a forward pass that did not diverge."""
    here = float(loss[at])
    if not np.isfinite(here):
        return False
    before = loss[:at][np.isfinite(loss[:at])]
    return at == 0 or (len(before) > 0 and abs(here) <= ORDINARY_LOSS_WITHIN * float(np.abs(before).max()))


def _empty_attention_rows(run: Run, step: int) -> tuple[str, float] | None:
    """(attention module, its largest share of query rows without a key over heads) at the last read at or before
    ``step``, for the module where that share is largest; None where no row was empty (or nothing was read)."""
    if "attn_empty_frac" not in run.quantities:
        return None
    best: tuple[str, float] | None = None
    for e in run.entities("attention"):
        t = run.temporal(e.name, "attn_empty_frac")  # (heads, steps)
        cols = np.where(t.steps <= step)[0]
        if not len(cols) or not np.isfinite(t.values[:, cols[-1]]).any():
            continue
        frac = float(np.nanmax(t.values[:, cols[-1]]))
        if frac > 0 and (best is None or frac > best[1]):
            best = (e.name, frac)
    return best


def _root(run: Run) -> str:
    """The model itself as a layer: "(root: the model's own protos)", its own trainable parameters named (round 32:
    "first in layer (root)" left a user to guess which of a model's tensors it was)."""
    own: dict = next((layer.get("params", {}) for layer in run_meta(run).get("layers", ()) if layer.get("name") == ""), {})
    return f"(root: the model's own {', '.join(own)})" if own else "(root)"


def nonfinite_findings(run: Run, th: Thresholds, skipped: np.ndarray) -> list[Finding]:
    """NaN/Inf gradients: the first step and the layer backward reached first; ``skipped``: :func:`skipped_steps`."""
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
    # Read every k-th step there (a budget that thinned the gradient norms, or every=k): the first NaN lies between
    # the last finite read and this one.
    last_finite = int(s.steps[j0 - 1]) if j0 > 0 else None
    when = (f"step {step0}" if last_finite is None or step0 - last_finite == 1 else
            f"step {step0} at the latest (gradient norms read every {step0 - last_finite}th step there; "
            f"finite at step {last_finite})")
    layers_at = [s.names[i] for i in range(len(s.names)) if bad[i, j0]]
    first_back = layers_at[-1]  # backward runs from the output: the deepest layer is reached first
    count = float(np.nansum(s.values[:, j0]))
    steps_bad = len(cols)
    read = len(s.steps)
    # a budget that thinned the reads counts only the steps it read (round 12: "147 steps … in all" of 296)
    in_all = ("in all" if read == int(s.steps[-1]) - int(s.steps[0]) + 1 else
              f"of the {read} steps read (steps {int(s.steps[0])}–{int(s.steps[-1])}, not every one read)")
    shown = repr(first_back) if first_back else _root(run)  # the model itself: parameters of its own, as a pos embedding
    evidence = (f"at step {step0}, {int(count)} parameter tensor{'' if count == 1 else 's'} with NaN/Inf gradients in "
                f"{len(layers_at)} layer{'s' if len(layers_at) > 1 else ''} ({span(layers_at)}); backward reached "
                f"{shown} first; {steps_bad} step{'s' if steps_bad > 1 else ''} with non-finite gradients "
                f"{in_all}")
    sources = [f"nonfinite (layers {span(s.names)}, {steps_text(int(s.steps[0]), int(s.steps[-1]))})"]
    cause = NONFINITE_CAUSE
    got = total_grad_norm(run)
    if got is not None:
        steps, total = got
        before = total[(steps < step0) & np.isfinite(total)]
        if len(before) >= 2 and before[-1] > th.spike_above * np.median(before):
            cause = (f"divergence — the total gradient norm grew from a median of {sci(float(np.median(before)))} to "
                     f"{sci(float(before[-1]))} just before step {step0}")
        elif len(before) and float(before.max()) > th.grad_norm_above:
            # too few steps before it for a growth to show (round 15: raw regression targets, NaN at step 2 on one
            # seed and 6 on the other, told two different causes for one mechanism)
            cause = (f"divergence — the total gradient norm was already {sci(float(before.max()))} before step "
                     f"{step0}, above the bound of {sci(th.grad_norm_above)}")
    loss_note = ""
    loss_step = math.nan  # the first step whose logged loss is non-finite (a gradient may overflow before it)
    half = "float16" in (run_meta(run).get("param_dtypes") or ())
    fixes = nonfinite_remedies(step0, half)
    update = None  # (cause, layers, eps) where the optimizer's update made the weights non-finite
    if "loss" in run.quantities:
        loss = run.series("loss", "run")
        nf = np.where(~np.isfinite(loss.values[0]))[0]
        if len(nf):
            loss_step = float(loss.steps[nf[0]])
            loss_note = f"; the loss is non-finite from step {int(loss_step)}"
            sources.append("loss (run)")
        at = np.where(loss.steps == step0)[0]
        nan_grad = g is not None and g.values.shape == s.values.shape and bool(np.isnan(g.values[:, j0]).any())
        if len(at) and nan_grad and _ordinary_loss(loss.values[0], int(at[0])) and not cause.startswith("divergence"):
            # a finite loss of the size it had so far, and a NaN gradient: the forward pass was fine, the backward
            # made the NaN (round 8's prototype classifier at step 0, torch.sqrt of a squared distance that is 0 where
            # a prototype is its own sample; round 11's siamese net at step 1 or 3, the first identical pair — a
            # lower learning rate or clipping cannot help: ten such doctor rows diverged exactly as the baseline did)
            loss_note += f"; the loss at step {step0} is finite" + ("" if step0 == 0 else ", of the size it had so far")
            when_made = "before any update" if step0 == 0 else "with no growth before it"
            cause = (f"a NaN made in the backward pass: the loss is finite and its gradient is not, {when_made}, "
                     "so an operation's derivative is infinite or undefined where it was evaluated — torch.sqrt or a "
                     "norm at 0, x ** p with p < 1 at 0, a torch.where whose untaken branch is NaN, acos/asin at ±1, "
                     "torch.log of an entry that underflowed to 0 (its derivative 1/x), torch.linalg.eigh or svd of "
                     "a matrix with repeated eigenvalues (its gradient divides by their gaps)")
            fixes = remedies("backward_singularity")
        update = (None if cause.startswith(("divergence", "a NaN made in the backward pass")) else
                  _made_by_update(run, loss.values[0], loss.steps, j0 > 0 and int(s.steps[j0 - 1]) == step0 - 1, step0))
        if update is not None:
            cause = update[0]
            if update[2]:
                fixes = remedies("fp16_eps")
            sources.append(f"update_ratio (layers {span(update[1])}, step {step0 - 1})")
    empty = _empty_attention_rows(run, step0) if loss_step == step0 else None  # the forward pass made it
    if empty is not None and not cause.startswith(("a NaN made in the backward pass", "divergence")):
        # round 16: a padded sequence with every key masked by −inf; softmax of the row is 0/0 at step 0, and the
        # cause said only "the forward pass or the loss", with input standardisation as a remedy
        module, frac = empty
        cause = (f"attention rows with every key masked: {frac:.1%} of the query rows of {module} had no key to attend "
                 f"at step {step0}, and a softmax over a row that is −inf throughout is NaN (0/0)")
        fixes = remedies("masked_rows") + tuple(t for t in fixes if key_of(t) == "check_data")
        sources.append(f"attn_empty_frac (attention {module})")
    logged = log_of_probabilities(run_meta(run).get("loss_paths"))
    if logged and not cause.startswith("a NaN made in the backward pass"):
        # round 13's hand-written BCE: NaN at step 11 of 400, the remedies a lower rate and clipping, neither of
        # which removes a log(0) that any confident output reaches
        cause = (f"the loss takes the logarithm of a {logged}'s output written by hand (log p, log(1 − p)): it is "
                 f"−inf as soon as p rounds to 0 or 1 in float32, which a confident output reaches without any "
                 f"divergence" + ("" if cause.startswith("non-finite") else f"; besides, {cause}"))
        fixes = remedies("logits_loss", "log_space") + fixes
    elif logged:
        # round 30: an entropy −Σ torch.where(p > 0, p·log p, 0) of a sharpened softmax, NaN in the backward pass
        # once a p underflowed to 0; told the singularity and its line, the log_space row never tried (applied by
        # hand it repairs every seed: 0.86–0.87, as the twin written with F.log_softmax)
        cause += (f"; the loss takes the logarithm of a {logged}'s output written by hand: where p underflows to 0, "
                  f"log p is −inf and its backward NaN, while in log space (F.log_softmax) it stays finite")
        fixes = remedies("log_space") + fixes
    product = _log_of_product(run, loss_step)
    if product and not cause.startswith(("a NaN made in the backward pass", "divergence")):
        # round 34: a discrete-time survival likelihood, log(h_t · cumprod(1 − h)) over 200 intervals (lifelines#155,
        # pycox#51), inf at step 0 on every seed, told "the forward pass or the loss" with input standardisation and a
        # re-initialisation as remedies, for inputs already standard and weights at PyTorch's default
        cause = product
        fixes = remedies("log_of_product", "check_data")
        sources.append("meta loss_ops")
    overflow = _exp_in_loss(run, loss_step)
    if overflow and not cause.startswith(("a NaN made in the backward pass", "divergence")) and not product:
        cause, fixes = overflow, remedies("exp_log_space", "check_data")
        sources.append("meta loss_ops; out_rms (layers, the first step)")
    zero_over_zero = _zero_over_zero(run, loss_step)
    if zero_over_zero is not None and not cause.startswith(("a NaN made in the backward pass", "divergence")):
        # round 36: EvoNorm-B0's instance std, torch.var(x, dim=(2, 3)) over a 1×1 map (digantamisra98/EvoNorm#4),
        # NaN at step 0 on every seed, told "the forward pass or the loss" with input standardisation, Xavier and a
        # GradScaler for inputs in [0, 1], default weights and float32
        cause, zero_key, zero_meta = zero_over_zero
        fixes = remedies(zero_key, "check_data")
        sources.append(zero_meta)
    ctc = _infinite_ctc(run, loss_step)
    if ctc and not cause.startswith("a NaN made in the backward pass"):
        cause, fixes = ctc, remedies("ctc_zero_infinity", "check_data")
        sources.append("meta loss_ops")
    held = run_meta(run).get("input_std")
    if isinstance(held, float) and not math.isfinite(held):
        # round 24: a tabular regression with 1 % of its cells missing as NaN, told "the forward pass or the loss"
        # with input standardisation and a re-initialisation first, neither of which can act on a NaN
        cause = ("the inputs hold NaN or Inf: the first training batch's standard deviation is not finite (missing "
                 "values read as NaN, a division by 0 in the preprocessing), and every layer passes them on"
                 + ("" if cause.startswith("non-finite") else f"; besides, {cause}"))
        fixes = remedies("impute_inputs", "check_data")
        sources.append("meta input_std")
    sudden = (cause == NONFINITE_CAUSE and update is None and loss_step == step0
              and _sudden_in_forward(run, loss_step))
    if sudden:
        # round 35: a masked mean written by hand, sum(l·m) / m.sum(), on the first batch with no labelled token
        # (huggingface/trl#3248), NaN at steps 10, 19 and 4 whatever the rate, told "a Post-LN layer without warm-up"
        cause = (f"a NaN made by the forward pass on one batch: the loss was of its usual size up to step "
                 f"{step0 - 1} and is non-finite at step {step0}, with no growth of the gradient before it, so no "
                 f"divergence — an operation undefined on that batch's values: 0/0 (a mean over an empty mask, "
                 f"sum(l·m) / m.sum() on a batch with no entry to average), log 0, sqrt of a negative; a lower "
                 f"learning rate cannot help")
        fixes = remedies("guard_division", "check_data")
    what = "NaN/Inf gradients"
    rows = [i for i in range(len(s.names)) if bad[i, j0]]
    if (g is not None and g.values.shape == s.values.shape and np.isposinf(g.values[rows, j0]).all()
            and "; the loss is non-finite from step" not in loss_note):
        # every norm +Inf and no NaN, the loss still finite: an Inf entry, or finite entries whose squares overflow
        # (round 9: an IRNN whose gradient entries reached 2.3e30, every one finite, "NaN/Inf gradients")
        what = "gradient norms that overflow to Inf"
        evidence = evidence.replace("with NaN/Inf gradients in", "with an Inf gradient norm in")
        loss_note += ("; every such norm is +Inf and none NaN: an Inf entry, or finite entries so large (above "
                      "~1.8e19 in float32) that their squares overflow — a gradient grown out of range, not a NaN")
    return [Finding(
        kind="nonfinite", severity="critical", layers=tuple(layers_at), steps=(step0, int(s.steps[cols[-1]])),
        # a NaN loss reaches every layer in one backward pass: the deepest layer is no first place (round 35)
        summary=(f"{what} from {when}, in {len(layers_at)} layers at once: the loss itself is non-finite there"
                 if sudden else f"{what} from {when}, first in layer {shown} (backward order)"),
        evidence=evidence + loss_note + ".",
        cause=cause,
        remedies=fixes,
        numbers={"step": float(step0), "tensors": count, "steps": float(steps_bad), "loss_step": loss_step,
                 "update_step": float(step0 - 1) if update is not None else math.nan,
                 **({"sudden": 1.0} if sudden else {})},
        sources=tuple(sources),
    )]
