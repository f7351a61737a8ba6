"""The measures that turn gradient norms into evidence, each judged in one place.

``gw.check`` (one batch, before training), ``diagnose`` (a stored run), the
reports and the demo all call these; two answers to the same question from
two code paths is a bug (DESIGN.md, "One judgement in one place"):

- the depth cut: :func:`depth_ratio` (‖∂L/∂a‖ at the first layer over the
  last's) and :func:`depth_verdict` (vanishing below ``vanish_below``,
  exploding above ``explode_above``);
- the affected stretch, :func:`affected_upto`, and the cause split,
  :func:`cause_split` (how much of the per-layer decay the activations'
  derivative explains against the weights' gain), with the remedies that
  address each cause;
- the halving fit, :func:`layers_per_halving` and :func:`real_fit`;
- the total gradient norm, :func:`total_grad_norm`;
- temporal series re-indexed by lag, :func:`by_lag`;
- Pascanu's verdict on a recurrent weight matrix, :func:`pascanu`;
- the loss at the start and end of a run, :func:`loss_ends`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from gradwatch.diagnosis.findings import Finding, modules_span, sci, span
from gradwatch.diagnosis.thresholds import Thresholds
from gradwatch.store import Run, Series


def window_median(series: Series, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Per entity, the median over the last ``window`` recorded steps (NaN-aware); and those steps."""
    cols = series.values[:, -window:]
    if cols.shape[1] == 0:
        return np.full(len(series.names), np.nan), series.steps[-window:]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows: a median of NaN is the answer
        return np.nanmedian(cols, axis=1), series.steps[-window:]


# -- across depth ------------------------------------------------------------------------------------------


def depth_ratio(grads: np.ndarray) -> float | None:
    """‖∂L/∂a‖ at the first layer over the last layer's, ``grads`` in depth order; None when it cannot be judged.

    Layers whose gradient was not measured (NaN) are left out; an exact 0 is a measurement (no gradient
    reached the layer's output: it vanished). Fewer than two measured layers, a last layer without a positive
    finite gradient, or a non-finite first one: nothing to judge.
    """
    g = np.asarray(grads, dtype=float)
    g = g[~np.isnan(g)]
    if len(g) < 2 or not (g[-1] > 0 and math.isfinite(g[-1]) and math.isfinite(g[0])):
        return None
    return float(g[0] / g[-1])


def depth_verdict(ratio: float | None, th: Thresholds) -> str:
    """'vanishing' below ``th.vanish_below``, 'exploding' above ``th.explode_above``, else 'trainable'."""
    if ratio is None:
        return "trainable"
    if ratio < th.vanish_below:
        return "vanishing"
    return "exploding" if ratio > th.explode_above else "trainable"


def affected_upto(rel: np.ndarray, vanishing: bool, th: Thresholds) -> int:
    """Index of the last layer of the affected stretch, from the input up; ``rel``: each layer's gradient over the last's.

    The first layer always belongs; the next ones while their gradient stays below ``affected_below``
    (vanishing) or above ``affected_above`` (exploding) times the last layer's. The last layer never belongs.
    """
    upto = 0
    while upto + 1 < len(rel) - 1 and (rel[upto + 1] < th.affected_below if vanishing
                                       else rel[upto + 1] > th.affected_above):
        upto += 1
    return upto


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


# -- the cause of a decay (or growth) across depth -----------------------------------------------------------


@dataclass(frozen=True)
class Between:
    """An activation module whose output comes between two consecutive layers' outputs, as measured."""

    name: str
    module: str  # its class, e.g. "Tanh"
    deriv_rms: float  # √E[φ'(x)²]: the factor it applies to a back-propagated gradient (NaN: not measured)
    saturated: float = math.nan  # saturated fraction (tanh/sigmoid-like units)
    dead: float = math.nan  # dead fraction (ReLU-like units)


# The remedies (vocabulary keys, gradwatch.diagnosis.remedies) that address each cause, vanishing or exploding.
CAUSE_REMEDIES: dict[tuple[str, bool], tuple[str, ...]] = {
    # normalisation second: it centres each unit's pre-activations over the batch, so no unit is off for a whole
    # batch (round 11: a plain 20-conv ReLU stack at PyTorch's default init, its signal ×0.4 a layer, then its units
    # off by their biases' sign — BatchNorm learns to 0.92–0.96, He init diverges; a doctor's budget of 180 s
    # reached five remedies and never tried it)
    ("dead", True): ("leaky", "norm", "zero_bias", "he_init", "lower_lr"),
    ("saturation", True): ("smaller_init", "norm", "relu", "lower_lr"),
    ("saturation", False): ("smaller_init", "norm", "relu", "lower_lr"),
    ("activation", True): ("relu", "norm", "residual"),
    ("weights", True): ("orthogonal_init", "he_init", "residual", "norm"),
    # the measured growth divided out of the weights: the one init that knows an activation no formula does (round
    # 15: SIREN's sin(30·x) under nn.Linear's default init, ×12 a layer; Xavier and orthogonal are larger still)
    ("weights", False): ("orthogonal_init", "rescale_weights", "clip_norm", "norm", "lower_lr"),
    ("jacobians", True): ("orthogonal_init", "residual", "norm"),
    ("jacobians", False): ("orthogonal_init", "rescale_weights", "clip_norm", "norm"),
    ("blocked", True): ("straight_through", "leaky"),
    ("custom", True): ("custom_backward",),
}


@dataclass(frozen=True)
class Cause:
    """Why the gradient decays (or grows) across a stretch of layers.

    ``key`` is one of: ``dead`` (dead units between the layers, vanishing only), ``saturation`` (saturated
    units), ``activation`` (the activations' derivative explains at least half the decay, vanishing only),
    ``weights`` (the rest: the weights' gain), ``jacobians`` (no activation module is visible between the
    layers: the whole factor is the layers' Jacobians, functional activations included), ``unmeasured``
    (no layer-to-layer ratio could be measured), ``blocked`` (exactly no gradient below a layer that has one, and
    no dead unit seen to explain it: an operation with zero derivative, or units dead inside functions),
    ``custom`` (as ``activation``, where every measured activation is a user's ``autograd.Function``: its own
    backward, a straight-through estimator or a surrogate derivative, passes on too little).
    """

    key: str
    vanishing: bool
    per_layer: float = math.nan  # geometric mean of ‖g_l‖ / ‖g_{l+1}‖ over the stretch
    activation: float = math.nan  # geometric mean, over the pairs with visible activations, of their Π rms φ'
    weights: float = math.nan  # per_layer / activation: what the layers' weights do
    modules: tuple[str, ...] = ()  # the activation modules between the layers (dead or saturated ones for those keys)
    types: tuple[str, ...] = ()  # their classes, sorted
    fraction: float = math.nan  # mean dead or saturated fraction of ``modules`` (those keys)

    @property
    def remedy_keys(self) -> tuple[str, ...]:
        """The remedies that address this cause (vocabulary keys), most direct first."""
        return CAUSE_REMEDIES.get((self.key, self.vanishing), ())

    @property
    def numbers(self) -> dict[str, float]:
        """The measured values behind the cause, as a finding reports them."""
        if self.key == "dead":
            return {"dead_frac": self.fraction}
        if self.key == "saturation":
            return {"saturated_frac": self.fraction}
        if self.key == "jacobians":
            return {"per_layer": self.per_layer}
        if self.key in ("activation", "weights", "custom"):
            return {"per_layer": self.per_layer, "activation_factor": self.activation, "weight_factor": self.weights}
        return {}

    @property
    def words(self) -> str:
        """The cause in words, with its numbers: a depth finding's cause line, and gw.check's reason."""
        acts = "/".join(self.types) or "activation"
        if self.key == "dead":
            return (f"dead units — {self.fraction:.0%} of the units of {modules_span(self.modules)} are silent for whole "
                    f"batches, so no gradient passes them")
        if self.key == "saturation" and not self.vanishing:  # saturated units shrink a gradient; they cannot grow it
            return (f"weights large enough to grow the gradient across depth though {self.fraction:.0%} of the "
                    f"unit-samples of {span(self.modules)} sit in {acts}'s flat tails, which shrink it: the weights' "
                    f"scale, which also drives the units into saturation")
        if self.key == "saturation":
            return f"{acts} saturation — {self.fraction:.0%} of the unit-samples of {span(self.modules)} sit in the flat tails"
        if self.key == "jacobians":
            return (f"the layers' Jacobians scale the gradient by ×{sci(self.per_layer)} per layer, and no "
                    f"activation is seen between them: in a linear stretch that is the weights' scale alone; an "
                    f"operation the watch cannot see (a module of a type it does not know, arithmetic of your own) "
                    f"would be part of it")
        if self.key == "custom":
            return (f"a backward of your own — {acts}, a torch.autograd.Function between the layers, passes on "
                    f"×{sci(self.activation)} of the gradient (its backward's gain, measured) per layer, the weights "
                    f"×{sci(self.weights)}: a straight-through estimator or surrogate derivative that lets the gradient "
                    f"through for few of its inputs")
        if self.key == "activation":
            return (f"activation derivative — {acts}' passes on ×{sci(self.activation)} (rms) per layer, the weights "
                    f"×{sci(self.weights)}")
        if self.key == "weights" and self.vanishing:
            return (f"weight scale — the weights pass on ×{sci(self.weights)} of the gradient per layer while {acts}' "
                    f"passes on ×{sci(self.activation)}: the initialisation shrinks the signal")
        if self.key == "weights":
            return (f"weight scale — the weights amplify the gradient ×{sci(self.weights)} per layer ({acts}' "
                    f"×{sci(self.activation)})")
        if self.key == "blocked":
            return ("no gradient at all gets below a layer that has one (exactly 0): an operation with zero derivative "
                    "between them — torch.round, floor, sign, argmax, a comparison or an integer cast — passes none "
                    "(a straight-through estimator does), or ReLU units applied as functions all dead")
        return "no layer-to-layer ratio could be measured"


def _usable(x: float) -> bool:
    return x > 0 and math.isfinite(x)


def cause_split(grads: Sequence[float] | np.ndarray, between: Sequence[Sequence[Between]], th: Thresholds,
                vanishing: bool, custom: frozenset[str] = frozenset()) -> Cause:
    """Split the change of ‖∂L/∂a‖ over a stretch of layers into the activations' derivative and the weights' gain.

    ``grads[0..m]`` are ‖∂L/∂a‖ at consecutive layers (input first); ``between[i]`` the activation modules
    between layer i and i+1. For each pair, r = ‖∂L/∂a_l‖ / ‖∂L/∂a_{l+1}‖ ≈ (Π rms φ' of the activations
    between them) × (the gain through layer l+1's weights), so the weights' factor is r over the measured
    rms derivative. Dead units (vanishing) and then saturated units come first: they are the activations'
    failure, whatever the factors say. The activation is the cause when its log-factor is at least half
    the decay's (log a ≤ ½ log r); ``custom`` when every activation measured is of a type in ``custom`` (a user's
    ``autograd.Function``, meta ``custom_functions``).
    """
    seen = [b for pair in between for b in pair]
    types = tuple(sorted({b.module for b in seen if b.module}))
    dead = [b for b in seen if b.dead > th.dead_above]
    if dead and vanishing:
        return Cause("dead", vanishing, modules=tuple(b.name for b in dead), types=types,
                     fraction=float(np.mean([b.dead for b in dead])))
    sat = [b for b in seen if b.saturated > th.saturated_above]
    if sat:
        return Cause("saturation", vanishing, modules=tuple(b.name for b in sat), types=types,
                     fraction=float(np.mean([b.saturated for b in sat])))
    log_r, log_a = [], []
    for i, pair in enumerate(between):
        if i + 1 >= len(grads) or not (_usable(grads[i]) and _usable(grads[i + 1])):
            continue
        log_r.append(math.log(grads[i] / grads[i + 1]))
        d = [b.deriv_rms for b in pair]
        log_a.append(sum(math.log(x) for x in d) if d and all(_usable(x) for x in d) else math.nan)
    names = tuple(b.name for b in seen)
    blocked = any(grads[i] == 0 and _usable(grads[i + 1]) for i in range(len(grads) - 1))
    if not log_r:
        return Cause("blocked" if blocked and vanishing else "unmeasured", vanishing, modules=names, types=types)
    r = math.exp(float(np.mean(log_r)))
    if all(math.isnan(x) for x in log_a):
        return Cause("jacobians", vanishing, per_layer=r, modules=names, types=types)
    a = math.exp(float(np.nanmean(log_a)))
    key = "activation" if vanishing and math.log(a) <= 0.5 * math.log(r) else "weights"
    measured = {b.module for pair in between for b in pair if _usable(b.deriv_rms)}
    if key == "activation" and measured and measured <= custom:
        key = "custom"
    return Cause(key, vanishing, per_layer=r, activation=a, weights=r / a, modules=names, types=types)


# -- over steps --------------------------------------------------------------------------------------------


def nonfinite_grads_seen(run: Run) -> bool:
    """Whether any layer's gradient was non-finite at any recorded step (the ``nonfinite`` counts)."""
    return "nonfinite" in run.quantities and bool((np.nan_to_num(run.series("nonfinite").values, nan=0.0) > 0).any())


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


# an update ratio below this a step is too short to learn from the initialisation (1e-3 is typical); an Adam eps of
# ADAM_EPS_FROM or more with steps this short is the eps (gradwatch.diagnosis.over_steps.tiny_step_findings)
EPS_TINY_STEP = 1e-4


def typical_update_ratio(run: Run, th: Thresholds) -> tuple[float, np.ndarray]:
    """The upper-quartile layer's update ratio ‖Δw‖/‖w‖ a step (of its window medians), and the windows' steps;
    NaN where not recorded."""
    if "update_ratio" not in run.quantities:
        return math.nan, np.zeros(0)
    med, wsteps = window_median(run.series("update_ratio"), th.window)
    med = med[np.isfinite(med)]
    return (float(np.percentile(med, 75)) if len(med) else math.nan), wsteps


FLAT_LOSS_ABOVE = 0.9  # the loss is "flat at its start" when its late median is above this fraction of its early one


def loss_ends(run: Run, th: Thresholds, least: int | None = None) -> tuple[float, float] | None:
    """(start, end) of the logged loss: medians of its first ``spike_after`` and last ``4 × window`` finite values.

    None without a logged loss, or with fewer than ``least`` finite values (default ``spike_after + 4 × window``).
    """
    if "loss" not in run.quantities:
        return None
    loss = run.series("loss", "run").values[0]
    loss = loss[np.isfinite(loss)]
    if len(loss) < (th.spike_after + 4 * th.window if least is None else least) or not len(loss):
        return None
    return float(np.median(loss[: th.spike_after])), float(np.median(loss[-4 * th.window:]))


BEGAN_OFF_BY = 3.0  # a first logged loss this far from the start's median is said beside it


def loss_went(run: Run, th: Thresholds, ends: tuple[float, float]) -> str:
    """"A → B" for :func:`loss_ends`'s (start, end), with the first logged value beside them where it is
    ``BEGAN_OFF_BY``× off the start's median (round 20: "the loss went 0.69 → 0.67" of a run whose logged loss began
    at 40 and was 310 at step 1, on breast cancer's raw features, before every unit died)."""
    words = f"{sci(ends[0])} → {sci(ends[1])}"
    loss = run.series("loss", "run").values[0] if "loss" in run.quantities else np.array([])
    loss = loss[np.isfinite(loss)]
    if not len(loss) or not ends[0] > 0 or ends[0] / BEGAN_OFF_BY <= abs(float(loss[0])) <= BEGAN_OFF_BY * ends[0]:
        return words
    return (f"{words}, medians of its first {min(th.spike_after, len(loss))} and last {min(4 * th.window, len(loss))} "
            f"logged values; it began at {sci(float(loss[0]))}")


def went_below_zero(run: Run) -> tuple[str, tuple[int, int], int | None]:
    """The logged loss's first and last finite values in words ("; the logged loss went A → B", '' without one), the
    steps they span ((0, 0) without one), and the first step it was below 0 (None: never) — for a loss that a model
    of probabilities can never take below 0."""
    if "loss" not in run.quantities:
        return "", (0, 0), None
    s = run.series("loss", "run")
    values, at = s.values[0], s.steps
    ok = np.isfinite(values)
    if not ok.any():
        return "", (0, 0), None
    negative = np.flatnonzero(ok & (values < 0))
    return (f"; the logged loss went {sci(float(values[ok][0]))} → {sci(float(values[ok][-1]))}",
            (int(at[ok][0]), int(at[ok][-1])), int(at[negative[0]]) if len(negative) else None)


def halved(ends: tuple[float, float] | None) -> bool:
    """Whether a positive loss ends at half its start or below (``ends``: :func:`loss_ends`'s; None: nothing says)."""
    return ends is not None and 0 < ends[1] <= 0.5 * ends[0]


def flat_loss(run: Run, th: Thresholds) -> tuple[float, float] | None:
    """(start, end) of a logged loss that stayed at its start value, else None.

    Flat means the end is above ``FLAT_LOSS_ABOVE`` × the start (a positive loss), start and end as
    :func:`loss_ends` takes them. Without a logged loss, or with too few values, nothing shows the run's
    progress: None.
    """
    ends = loss_ends(run, th)
    return ends if ends is not None and ends[0] > 0 and ends[1] > FLAT_LOSS_ABOVE * ends[0] else None


def flat_loss_finding(run: Run, th: Thresholds, ends: tuple[float, float], severity: str, summary: str, after: str,
                      cause: str, fixes: tuple[str, ...], sources: tuple[str, ...] = ()) -> Finding:
    """A ``stalled`` finding about the logged loss as a whole: the loss's steps, its evidence the medians
    :func:`loss_ends` took, then ``after`` (what else was measured, from "; " or " with …", ending with a full
    stop); ``sources`` beside the loss's."""
    steps = run.series("loss", "run").steps
    return Finding(
        kind="stalled", severity=severity, layers=(), steps=(int(steps[0]), int(steps[-1])), summary=summary,
        evidence=(f"the logged loss went {sci(ends[0])} → {sci(ends[1])} (medians of its first {th.spike_after} and "
                  f"last {4 * th.window} values){after}"),
        cause=cause, remedies=fixes, numbers={"loss_first": ends[0], "loss_final": ends[1]},
        sources=("loss (run)", *sources),
    )


# -- through time ------------------------------------------------------------------------------------------


def recorded_lengths(values: np.ndarray) -> list[int]:
    """Per column (training step) of a (positions × steps) temporal matrix, the positions recorded: one past the
    last that is not NaN (0 where none is)."""
    ok = ~np.isnan(values)
    return [int(np.where(ok[:, j])[0].max()) + 1 if ok[:, j].any() else 0 for j in range(values.shape[1])]


def by_lag(s: Series) -> Series:
    """Re-index a (positions × steps) temporal series by lag from each step's last position.

    Sequence lengths may differ between steps (Pascanu's adding task draws
    one); aligned at their ends, row ``i`` of the result is lag
    ``len − 1 − i`` (the last row is lag 0) and only lags that every step has
    are kept. ``names`` are the lags.
    """
    lengths = recorded_lengths(s.values)
    cols = [j for j, n in enumerate(lengths) if n > 0]
    if not cols:
        return Series(s.quantity, [], s.steps[:0], np.zeros((0, 0)))
    depth = min(lengths[j] for j in cols)
    values = np.stack([s.values[lengths[j] - depth : lengths[j], j] for j in cols], axis=1)
    return Series(s.quantity, [str(depth - 1 - i) for i in range(depth)], s.steps[cols], values)


def pascanu_gamma(mode: str | None) -> float | None:
    """Pascanu's γ, a bound on the recurrent nonlinearity's derivative: 1 for tanh (|tanh'| ≤ 1) and ReLU
    (ReLU' ∈ {0, 1}) cells; None for gated cells (LSTM, GRU), where the condition gives no verdict."""
    return 1.0 if mode in ("RNN_TANH", "RNN_RELU") else None


@dataclass(frozen=True)
class Pascanu:
    """Pascanu, Mikolov & Bengio (2013), §2.1: ‖∂h_{t+1}/∂h_t‖ ≤ γ λ₁(W_hh).

    λ₁ < 1/γ is sufficient for the gradient through time to vanish; λ₁ > 1/γ is necessary for it to explode.
    """

    key: str  # "vanishing" (the sufficient condition holds), "exploding" (the necessary one holds) or "none"
    lambda1: float
    gamma: float | None

    @property
    def words(self) -> str:
        """The verdict in words, with the numbers it rests on."""
        lam, gamma = self.lambda1, self.gamma or 1.0
        if self.key == "vanishing":
            return (f"λ₁(W_hh) = {lam:.2g} < 1/γ = {1 / gamma:g}: Pascanu's sufficient condition for vanishing "
                    f"holds — each step multiplies the gradient through time by at most ×{gamma * lam:.2g}")
        if self.key == "exploding":
            return (f"λ₁(W_hh) = {lam:.2g} ≥ 1/γ = {1 / gamma:g}: explosion possible (Pascanu's necessary "
                    f"condition for exploding holds)")
        return (f"λ₁(W_hh) = {lam:.2g}; gated cell: gradients also flow along the additive cell/gate path, so "
                f"Pascanu's condition (for vanilla RNNs) gives no verdict")


def pascanu(lambda1: float, gamma: float | None) -> Pascanu:
    """Pascanu's verdict on a recurrent weight matrix with largest singular value ``lambda1`` (γ None: gated cell)."""
    if gamma is None or not math.isfinite(gamma) or not math.isfinite(lambda1):
        return Pascanu("none", lambda1, gamma)
    return Pascanu("vanishing" if lambda1 < 1 / gamma else "exploding", lambda1, gamma)
