"""Every threshold the diagnosis uses, named for the way it cuts, with the reason for its default."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields

from gradwatch._errors import bad_argument
from gradwatch.diagnosis.instability_thresholds import InstabilityThresholds

_COUNTS = frozenset({"window", "spike_after", "spike_window"})  # numbers of steps
_FRACTIONS = frozenset({"affected_below", "saturated_above", "dead_above", "skipped_above"})  # shares, in (0, 1)
_BELOW_ONE = frozenset({"vanish_below", "stalled_below", "memory_below", "fade_below"})  # ratios that cut below 1
_ABOVE_ONE = frozenset({"explode_above", "affected_above", "spike_above"})  # ratios that cut above 1


def _check(name: str, value: object) -> None:
    """Raise the template error for a bad threshold value."""
    if name in _COUNTS:
        if not isinstance(value, numbers.Integral) or isinstance(value, bool):
            raise TypeError(bad_argument("Thresholds", name, "a positive int", value))
        if value < 1:
            raise ValueError(bad_argument("Thresholds", name, "a positive int", value))
        return
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(bad_argument("Thresholds", name, "a positive finite number", value))
    x = float(value)
    if name in _FRACTIONS and not 0 < x < 1:
        raise ValueError(bad_argument("Thresholds", name, "a fraction in (0, 1)", value))
    if not (math.isfinite(x) and x > 0):
        raise ValueError(bad_argument("Thresholds", name, "a positive finite number", value))
    if name in _BELOW_ONE and not x < 1:
        raise ValueError(bad_argument("Thresholds", name, "a number below 1 (a ratio that cuts downwards)", value))
    if name in _ABOVE_ONE and not x > 1:
        raise ValueError(bad_argument("Thresholds", name, "a number above 1 (a ratio that cuts upwards)", value))


@dataclass(frozen=True)
class Thresholds:
    """Cut-offs for the findings. Pass your own to :func:`gradwatch.diagnose`."""

    # ‖∂L/∂a‖ at the first layer over the last layer's. Healthy nets measured
    # here (zoo twins, ResNet, Transformer, LSTM, LayerNorm MLP) stay within
    # ~20× of 1; at 10⁻³ the first layer learns a thousand times slower than
    # the last, which no learning rate fixes for both.
    vanish_below: float = 1e-3
    explode_above: float = 1e3  # the mirror image: the first layer gets 1000× the last layer's gradient
    # Findings judge the last `window` recorded steps of a quantity (medians),
    # so that one noisy batch neither raises nor hides a finding.
    window: int = 5
    # A layer belongs to a vanishing (exploding) stretch when its gradient is
    # below half (above twice) the last layer's.
    affected_below: float = 0.5
    affected_above: float = 2.0
    # A quarter of the unit-samples in tanh's/sigmoid's flat tails (φ' < 2 % of
    # its peak) already costs the layer a quarter of its gradient paths;
    # healthy tanh nets measured here sit near 0.
    saturated_above: float = 0.25
    # Half of a ReLU layer's units silent for whole batches, step after step.
    dead_above: float = 0.5
    # A layer whose update ratio ‖Δw‖/‖w‖ is below 1 % of the upper-quartile layer's
    # moves 100× slower than the network around it.
    stalled_below: float = 1e-2
    # Through time: the "effective memory" is the lag at which ‖∂L/∂h_t‖ falls
    # below this fraction of its value at the last step (lag 0); beyond it the
    # loss barely reaches back (1 %, as the first/last cut-offs above are
    # 10⁻³: a dependency at that lag gets a hundredth of the gradient).
    memory_below: float = 0.01
    # Over steps: the whole gradient at this fraction of its start while the loss did not halve is a warning (below
    # `vanish_below` of it, critical), dated from the step it stays under it. A GAN generator on the minimax loss
    # fell to 1 % of its start by step 77 of 300 and to 1.0–1.1·10⁻³ by the end, covering none of the modes.
    fade_below: float = 1e-2
    # A step whose total gradient norm exceeds `spike_above` × the median of
    # every step before it (judged from the `spike_after`-th step on); and an
    # absolute bound on that norm (losses on normalised data give totals of
    # order 0.1–10). The median of all earlier steps, not of a recent window:
    # a converged net's gradient shrinks, and its ordinary 10× batch-to-batch
    # swings late in training (measured on the LayerNorm zoo MLP) are no spike.
    # A spike must also exceed every norm of the first `spike_after` steps: a
    # net that returns to its initial gradient scale while it learns (the zoo
    # LSTM under Adam) has not exploded.
    # A spike must also stand 10× above the last `spike_window` steps: a net
    # whose gradient grows steadily from a small start (zero-initialised
    # residual branches, the Fixup zoo ResNet) is learning, not exploding.
    # In a run whose loss halves, the absolute bound on the total norm counts
    # only on steps where the norm also stands `spike_above`× above the median
    # of its first `spike_after` steps: a loss that is large from the start
    # (unnormalised regression targets) gives a large gradient that does not grow.
    spike_above: float = 10.0
    spike_after: int = 10
    spike_window: int = 20
    grad_norm_above: float = 1e3
    # A GradScaler skips a step whose float16 gradients overflow and halves its
    # scale; a handful of skips while the scale settles is its normal working.
    # More than 5 % of the steps skipped means the gradients overflow even at a
    # reduced scale: the model is losing that share of its updates.
    skipped_above: float = 0.05
    # Loss spikes with attribution, attention-logit growth, output-logit divergence (gradwatch.diagnosis.instability).
    instability: InstabilityThresholds = InstabilityThresholds()
    # The run starts from its initialisation, as the doctor's trials do. A loss that stays flat while every layer's
    # steps are short (the upper-quartile update ratio below 1e-4) is then a run that never learned, whatever the
    # learning rate; a watch alone cannot tell it from a converged run resumed, whose gradient is small too, so by
    # default only a rate small by any standard is blamed (round 13: a distillation loss at temperature 20 without
    # its T² factor, every gradient 1/400 of its twin's at SGD 0.01, chance accuracy, "the gradients look healthy").
    from_init: bool = False

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "from_init":
                if not isinstance(value, bool):
                    raise TypeError(bad_argument("Thresholds", f.name, "a bool", value))
                continue
            if f.name == "instability":
                if not isinstance(value, InstabilityThresholds):
                    raise TypeError(bad_argument("Thresholds", f.name, "a gradwatch.diagnosis.InstabilityThresholds", value))
                continue
            _check(f.name, value)
            # numpy scalars become plain Python numbers (frozen: set through object)
            object.__setattr__(self, f.name, int(value) if f.name in _COUNTS else float(value))
