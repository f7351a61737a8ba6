"""The cut-offs of the instability rules (:mod:`gradwatch.diagnosis.instability`), named for the way they cut."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields
from typing import Any

from gradwatch._errors import bad_argument

_STEPS = frozenset({"window", "lookback"})


@dataclass(frozen=True)
class InstabilityThresholds:
    """Cut-offs of :func:`~gradwatch.diagnosis.instability.instability_findings`; ``Thresholds.instability`` holds them."""

    window: int = 50  # recorded steps behind each robust median/MAD (OLMo: 128, llm-foundry: 100; short runs here)
    spike_z_above: float = 6.0  # OLMo 2's 6σ, as robust SDs (1.4826·MAD) on the log scale
    loss_ratio_above: float = 1.5  # and the loss at least ×1.5 its running median (llm-foundry: ×2 of the mean)
    grad_ratio_above: float = 4.0  # and the total gradient norm at least ×4 its running median
    # A loss spike also rises at least this many times as far above its running median (on the log scale) as any
    # step of the `lookback` steps before it: a loss that swings ×10-×25 every few dozen steps (SGD at the edge
    # of stability on a regression with targets to 125: so_quadratic_fixed, which learns) has no spike at a swing
    # no larger than its last ones (measured there: 1.05× and 0.67× the largest earlier swing, on AVX2 and on
    # the portable kernels); a first spike out of a smooth curve (a language model's loss 3 → 5 after swings of
    # ×1.2: 2.8×) or an injected ×1000 batch stands far above it.
    spike_precedent: float = 1.5
    diverge_above: float = 1.5  # the loss's running median ends ≥ ×1.5 its best running median: diverged
    # ... and gave back at least half of what it had gained since its first 10 steps: a classifier whose loss
    # fell from 2.3 to 0.01 and ends noisy at 0.05 is ×5 its best and has lost 2 % of its progress (zoo twins).
    diverge_lost_above: float = 0.5
    # ... or, where its best running median is in its first 10 steps (it gained nothing to give back), ends ≥ ×3
    # that best: a GRU language model at SGD lr 20 went 3.9 → 51 at step 4 and ended at 12–17 (×3.2–4.5), while a
    # non-saturating GAN's generator loss rises from 0.7 to 1.2 (×1.7) as its discriminator learns, and is healthy.
    diverge_from_start_above: float = 3.0
    lookback: int = 200  # steps before an event searched for the first movers and the mechanism
    layer_z_above: float = 3.5  # a layer's update norm this many robust SDs above its running median moved
    # A max attention logit of 10²: keys 10² below the top get e^−100 of the attention and no gradient through
    # the softmax in any float format. A large logit alone is no pathology: healthy runs measured here
    # (benchmarks/instability.py) reach ~10² with every head still spread (entropy ≥ 0.3 nats), so the finding
    # also needs a one-hot head; failing ones reach 10³–10⁵ with most heads one-hot.
    attn_logit_above: float = 100.0
    logit_growth_above: float = 5.0  # ... reached by growing ×5 or more over the lookback span
    # nats: a head this sharp attends to one key (p_max ≳ 0.96). The 0.1 sat at the edge of the failing runs:
    # tinylm's proxy at lr 0.1 ends at 0.01–0.11 nats over seeds 0–4 on one thread of an AMD EPYC (seed 1: 0.11,
    # heads one-hot by any reading, max logit ×9000), its healthy runs (lr ≤ 0.03, the qk-norm twin) at ≥ 1.04,
    # benchmarks/instability.py's at ≥ 0.3
    entropy_below: float = 0.2
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
            if f.name.endswith("ratio_above") or f.name in ("diverge_above", "diverge_from_start_above",
                                                              "logit_growth_above"):
                if not float(value) > 1:
                    raise ValueError(bad_argument("InstabilityThresholds", f.name, "a ratio above 1", value))


