"""Remedies that fit the architecture: nothing the model already has, what a deep plain net or a Post-LN stack
without warm-up needs, and the learning rate where Adam runs hot."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable

import numpy as np

from gradwatch.diagnosis.findings import Finding, listed, sci, span
from gradwatch.diagnosis.measures import (EPS_TINY_STEP, FLAT_LOSS_ABOVE, flat_loss, flat_loss_finding, halved,
                                         loss_ends, loss_went, nonfinite_grads_seen, total_grad_norm,
                                         typical_update_ratio, went_below_zero)
from gradwatch.diagnosis.remedies import key_of, remedies
from gradwatch.diagnosis.spikes import update_norms
from gradwatch.diagnosis.thresholds import Thresholds
from gradwatch.probes.loss_ops import penalty_on_relu
from gradwatch.store import Run

# Module classes that say what the architecture already has (class names, as `module_types` in the run's meta
# and the entities' modules record them).
RESIDUAL_TYPES = frozenset({"TransformerEncoderLayer", "TransformerDecoderLayer", "BasicBlock", "Bottleneck",
                            "GPT2Block", "BertLayer", "ViTLayer", "Block", "ResidualBlock"})
RELU_TYPES = frozenset({"ReLU", "ReLU6", "LeakyReLU", "PReLU", "RReLU", "ELU", "CELU", "SELU", "GELU", "SiLU",
                        "Mish", "Hardswish", "Softplus"})
SATURATING_TYPES = frozenset({"Tanh", "Sigmoid", "Hardtanh", "Softsign", "Hardsigmoid", "LogSigmoid", "Tanhshrink"})
ADAM_TYPES = frozenset({"Adam", "AdamW", "NAdam", "RAdam", "Adamax"})
# Adam's step moves every weight by about lr from the first step on (its update is normalised): above 3·10⁻³
# without a warm-up, attention and LayerNorm'd nets (Xiong et al. 2020; Liu et al. 2020) commonly collapse.
ADAM_LR_ABOVE = 3e-3
RAW_INPUT_ABOVE = 10.0  # inputs whose std or mean |x| is beyond this were not standardised (pixels 0–255, raw features)
TINY_BATCH = 4  # BatchNorm on batches this small: Wu & He 2018 measure its error climbing steeply below 8
DROPOUT_FROM = 0.75  # a dropout rate this high keeps a quarter of the units or fewer (0.9 for TF1's keep_prob 0.9)
CLIMB_ABOVE = 10.0  # a schedule's peak this many times the starting rate or more: OneCycleLR's default div_factor is 25
MOMENTUM_ABOVE = 0.99  # SGD's momentum at or above this: a step sums 1/(1 − momentum) ≥ 100 past gradients
WD_SHRINK_ABOVE = 1e-2  # lr × weight_decay: every weight shrinks by 1 % a step or more (SGD, and AdamW's decoupled decay)
ADAM_LR_PLAIN_ABOVE = 3e-2  # ... and a net with neither: 30× Adam's default (1e-2 trains an LSTM or a small CNN)
# A net of this many weighted layers or more, with no skip connection, is deep enough that residual connections
# (ReZero/Fixup-initialised, so that they start at the identity) are the depth remedy: He et al. 2016's plain-net
# degradation, and a 30-layer ReLU MLP that stalls at Xavier init but trains with ReZero (measured: 0.09 → 0.96).
DEEP_LAYERS = 10
_DEPTH_KINDS = ("vanishing", "exploding", "nonfinite", "stalled")
_BLOWUP_KINDS = ("exploding", "nonfinite")
# Findings of layers that move too little: under plain SGD each moves lr·g, so an adaptive optimiser (its step
# normalised by the gradient's own rms) is the last remedy they name, after those of the architecture.
_TOO_LITTLE_KINDS = ("vanishing", "stalled", "saturation")
# Findings a weight decay that shrinks the net towards zero explains: too little signal, units that went silent.
_SHRUNK_KINDS = ("vanishing", "stalled", "dead_units")
_ANY_KIND = ("vanishing", "exploding", "nonfinite", "stalled", "dead_units", "saturation")
# Findings inputs far from unit scale explain: the first layer's units saturate or die, the signal dies with them,
# and the first layer's gradient (∂L/∂W = δ·xᵀ) is as large as the inputs (round 20: breast cancer's raw features,
# the total gradient norm above 10³ from step 1 on one seed, told of re-initialisation and clipping alone); and a
# gradient that grew from there out of float32's range, from a loss finite at first (raw_inputs_diverged).
_INPUT_KINDS = ("vanishing", "exploding", "stalled", "dead_units", "saturation")


def run_meta(run: Run) -> dict:
    """The run's metadata; empty for a view or a run that has none."""
    return getattr(run, "meta", {}) or {}


def module_types(run: Run) -> set[str]:
    """The module classes of the run's model: its meta's ``module_types`` and its entities' modules."""
    meta = run_meta(run)
    types = set(meta.get("module_types") or ())
    return types | {e.module for e in run.entities() if e.module}


def lr_without_warmup(run: Run) -> str:
    """Words for Adam-type optimisation at a high learning rate with no warm-up seen ('' when that is not the case).

    High is above ``ADAM_LR_ABOVE`` for a net with attention or normalisation layers (what Xiong et al. and Liu et
    al. measured), above ``ADAM_LR_PLAIN_ABOVE`` for one with neither: an LSTM or a plain CNN trains at Adam's
    1e-2 (the doctor's own Adam remedy runs there), and blaming that rate for a recurrence that forgets misleads.
    """
    meta = run_meta(run)
    opt, lr = meta.get("optimizer"), meta.get("optimizer_lr")
    if opt not in ADAM_TYPES or not isinstance(lr, (int, float)) or warmup_seen(run):
        return ""
    types = module_types(run)
    sensitive = any("Norm" in t or "Attention" in t or t in RESIDUAL_TYPES for t in types)
    if lr <= (ADAM_LR_ABOVE if sensitive else ADAM_LR_PLAIN_ABOVE):
        return ""
    why = ("which a deep net with attention or normalisation often does not survive" if sensitive else
           f"{lr / 1e-3:g}× PyTorch's default rate for {opt}, too large a step for most weights")
    return (f"the learning rate: {opt} at lr {lr:g} with no warm-up (no scheduler had lowered it when the watch "
            f"started) moves every weight by about lr from the first step, {why}")


def heavy_weight_decay(run: Run) -> str:
    """Words for a weight decay that shrinks every weight by ``WD_SHRINK_ABOVE`` or more a step ('' otherwise)."""
    meta = run_meta(run)
    wd, lr, opt = meta.get("optimizer_weight_decay"), meta.get("optimizer_lr"), meta.get("optimizer")
    if not isinstance(wd, (int, float)) or not isinstance(lr, (int, float)) or wd * lr < WD_SHRINK_ABOVE:
        return ""
    return (f"the weight decay: {opt} with weight_decay {wd:g} at lr {lr:g} shrinks every weight by about "
            f"{wd * lr:.0%} a step, which pulls the net towards zero faster than its gradient can move it "
            f"(over-regularised: it ends predicting one answer)")


def swapped_betas(run: Run) -> str:
    """Words for Adam-type betas outside Adam's convergence condition, γ = β1²/√β2 < 1 (Kingma & Ba 2015,
    Theorem 4.1) — ('' otherwise): (0.999, 0.9), the usual (0.9, 0.999) the other way round, averages the first
    moment over ~1000 steps and the second over ~10, so m̂/√v̂ is no longer held near 1 and the steps run away.
    Round 22: a CNN on digits under Adam(betas=(0.999, 0.9)), its weights moved ×400 the twin's, 0.81–0.85 held out
    against 0.94–0.96, "the gradients look healthy"."""
    meta = run_meta(run)
    betas, opt = meta.get("optimizer_betas"), meta.get("optimizer")
    if opt not in ADAM_TYPES or not isinstance(betas, list) or len(betas) != 2:
        return ""
    b1, b2 = betas
    if not (0 <= b1 < 1 and 0 < b2 < 1) or b1 * b1 < math.sqrt(b2):
        return ""
    return (f"{opt}'s betas=({b1:g}, {b2:g}): β1²/√β2 = {b1 * b1 / math.sqrt(b2):.3g} ≥ 1, outside Adam's convergence "
            f"condition (Kingma & Ba 2015, Thm 4.1) — the first moment averages ~{1 / (1 - b1):.0f} steps and the "
            f"second ~{1 / (1 - b2):.0f}, so m̂/√v̂ is not held near 1 and the steps run away"
            + (" (the usual (0.9, 0.999), swapped)" if b1 > b2 else ""))


def swapped_betas_findings(found: list[Finding], run: Run, th: Thresholds) -> list[Finding]:
    """Adam-type betas outside the convergence condition (:func:`swapped_betas`) where no rule found a problem: one
    ``exploding`` warning of its own (its words join any other finding's cause through :func:`fit_architecture`)."""
    words = swapped_betas(run)
    if not words or any(f.severity != "info" for f in found):
        return []
    steps = run.series("loss", "run").steps if "loss" in run.quantities else np.array([0])
    ends = loss_ends(run, th)
    went = "" if ends is None else f"; the logged loss went {loss_went(run, th, ends)}"
    return [Finding(
        kind="exploding", severity="warning", layers=(), steps=(int(steps[0]), int(steps[-1])),
        summary="Adam's betas are outside its convergence condition: its steps are not held near the learning rate",
        evidence=f"read off the optimizer's first parameter group{went}.",
        cause=words, remedies=remedies("adam_betas"),
        sources=("meta optimizer_betas",))]


def heavy_momentum(run: Run) -> str:
    """Words for a momentum of ``MOMENTUM_ABOVE`` or more ('' otherwise): the velocity sums 1/(1 − momentum) past
    gradients, so a rate tuned for 0.9 makes steps that much longer (measured: an MLP on digits at SGD lr 0.05 and
    momentum 0.999 reaches a loss of 0.02 and then diverges to chance; at 0.9 it reaches 0.965)."""
    meta = run_meta(run)
    mom, opt, lr = meta.get("optimizer_momentum"), meta.get("optimizer"), meta.get("optimizer_lr")
    if not isinstance(mom, (int, float)) or not MOMENTUM_ABOVE <= mom < 1:
        return ""
    at = f" at lr {lr:g}" if isinstance(lr, (int, float)) else ""
    return (f"the momentum: {opt} with momentum {mom:g}{at} sums about {1 / (1 - mom):.0f} past gradients into each "
            f"step, {(1 - 0.9) / (1 - mom):.0f}× the usual 0.9's, so the steps overshoot once the gradient turns")


def zero_init(run: Run) -> str:
    """Words for layers whose weights were all exactly 0 when the watch started ('' otherwise): every unit of such
    a layer computes the same thing and gets the same gradient, and a ReLU's is 0 at 0 (measured: a 6-layer ReLU
    MLP initialised at 0 keeps every hidden gradient exactly 0 for 300 steps; He init learns). The last layer alone
    at 0 is a common, harmless choice (its gradient is not 0), and so is a residual branch that starts at 0 (Fixup,
    ReZero): those are left out, and so are the products whose factors are all 0 (meta ``zero_factors``:
    :func:`gradwatch.diagnosis.units.zero_factor_words`)."""
    meta = run_meta(run)
    layers = [l.get("name") for l in meta.get("layers") or () if isinstance(l, dict)]
    factored = {str(f.get("module")) for f in meta.get("zero_factors") or () if isinstance(f, dict)}
    single = single_unit_layers(run)
    names = [n for n in meta.get("zero_weight_layers") or ()
             if (not layers or n != layers[-1]) and n not in factored and n not in single]
    if not names or has_residual(run):
        return ""
    return (f"the initialisation: the weights of {len(names)} layer{'s' if len(names) > 1 else ''} ({listed(names)}) "
            f"start at exactly 0, so their units compute the same output and get the same gradient — the symmetry is "
            f"never broken — and a ReLU's gradient at 0 is 0")


def single_unit_layers(run: Run) -> set[str]:
    """The layers (meta ``layers``) whose weight has one output unit: an ``nn.Embedding``'s last dimension of 1 (a
    bias per user or item), a ``Linear``'s or a convolution's first. Such a layer has no units to be copies of each
    other, so a zero start breaks no symmetry (round 44: a recommender's bias tables ``nn.Embedding(n, 1)`` at 0,
    the layers that moved most, were told as the symmetric initialisation of a model with no ReLU)."""
    found = set()
    for layer in run_meta(run).get("layers") or ():
        shape = (layer.get("params") or {}).get("weight") if isinstance(layer, dict) else None
        if isinstance(shape, list) and len(shape) >= 2:
            units = shape[-1] if layer.get("module") in ("Embedding", "EmbeddingBag") else shape[0]
            if units == 1:
                found.add(str(layer.get("name")))
    return found


STEP_FLOOR = 1e-3  # a hand-written optimizer's step this share, or less, of both SGD's and Adam's at its rate
WEIGHTS_SHRUNK_TO = 0.25  # ... or every weight's norm ended at this share of its first read or less (≤ 0.22 measured)


def hand_written_steps(run: Run) -> str:
    """Words for an optimizer of a class outside ``torch`` (meta ``optimizer_module``) that does not do what its rate
    says: its step for some parameters is :data:`STEP_FLOOR` or less of both steps its rate stands for — SGD's,
    lr·‖g‖, and Adam's, about lr per weight (lr·√n) — at the median over the run's reads, with one rate for every
    group (the smallest of the run's first and last), or it shrank every parameter's norm to
    :data:`WEIGHTS_SHRUNK_TO` of its first read or less (:func:`shrinking_steps`); '' otherwise. A torch.optim
    class takes one of the two; a rule written by hand that takes neither does not do what its rate says. Round 44: a
    hand-written Adam that multiplies by √v̂ where it divides (oracle/tribuo#401), the embeddings of a recommender
    moved 3·10⁻⁴ of lr·‖g‖ and R² stayed at 0 (0.90 with torch's Adam), told "the initialisation … a ReLU's gradient
    at 0" before."""
    meta = run_meta(run)
    module, lrs = meta.get("optimizer_module"), meta.get("optimizer_lrs") or ()
    if (not isinstance(module, str) or module == "torch" or module.startswith("torch.") or len(lrs) != 1
            or not {"update_ratio", "weight_norm", "grad_norm"} <= set(run.quantities)):
        return ""
    if shrunk := shrinking_steps(run):
        return shrunk
    rates = [r for r in (meta.get("optimizer_lr"), meta.get("optimizer_lr_last")) if isinstance(r, (int, float))]
    lr = min(rates, default=0.0)
    if not lr > 0:
        return ""
    sizes = {f"{l.get('name')}.{attr}": math.prod(shape) for l in meta.get("layers") or () if isinstance(l, dict)
             for attr, shape in (l.get("params") or {}).items() if isinstance(shape, list)}
    got = update_norms(run, "param")  # ‖Δw‖ per parameter: update_ratio · weight_norm, on the steps both read
    if got is None or got[0] != "update":
        return ""
    names, steps, moved = got[1]
    g = run.series("grad_norm", "param")
    keep = np.isin(steps, g.steps)
    grads = {n: v[np.isin(g.steps, steps[keep])] for n, v in zip(g.names, g.values)}
    short, worst = [], 1.0
    for name, step in zip(names, moved[:, keep]):
        if name not in grads or not sizes.get(name):
            continue
        floor = lr * np.minimum(grads[name], math.sqrt(sizes[name]))
        ok = np.isfinite(step) & (floor > 0)
        if ok.sum() < 3:
            continue
        share = float(np.median(step[ok] / floor[ok]))
        if share <= STEP_FLOOR:
            short.append(name.rpartition(".")[0])
            worst = min(worst, share)
    if not short:
        return ""
    return (f"the optimizer's own step rule: {meta.get('optimizer')} (from {module}, not torch.optim) moves "
            f"{listed(sorted(set(short)))} by {sci(worst)} of what its rate lr = {lr:g} stands for — less than SGD's "
            f"step lr·‖g‖ and Adam's, about lr per weight — so the update written by hand does not do what its rate "
            f"says (an Adam that multiplies by √v̂ where it divides: oracle/tribuo#401)")


def shrinking_steps(run: Run) -> str:
    """Words for a hand-written optimizer (see :func:`hand_written_steps`, which checks its class) under which every
    parameter that got a gradient ended at :data:`WEIGHTS_SHRUNK_TO` of its norm's first read or less, '' otherwise: a
    decay written by hand that the step cannot hold. Round 46: a hand-written AdamW doing
    ``p.mul_(1 − weight_decay)``, the paper's Algorithm 2 at η = 1 (egg-west/AdamW-pytorch#1;
    tensorflow/addons#2282), given torch's recipe's 0.05: every weight of a CNN at ~0 in 300 steps, chance held out
    (0.95 with the decay × lr, torch.optim.AdamW's rule), told "dead units … negative biases, a large step" before."""
    w, g = run.series("weight_norm", "param"), run.series("grad_norm", "param")
    if len(w.steps) < 3 or not len(w.names):
        return ""
    first, last = w.values[:, 0], w.values[:, -1]
    # the parameters the steps moved with a gradient: one that gets none shrinks under any decay (round 43: LAMB's
    # zero head passed no gradient below it, and its decay alone shrank the layers there)
    fed = np.array([n in g.names and float(np.nanmedian(g.values[g.names.index(n)])) > 0 for n in w.names])
    ok = np.isfinite(first) & np.isfinite(last) & (first > 0) & fed
    if not ok.any() or not (last[ok] <= WEIGHTS_SHRUNK_TO * first[ok]).all() or not np.isfinite(w.values).all():
        return ""
    ratios = last[ok] / first[ok]
    span_steps = max(int(w.steps[-1] - w.steps[0]), 1)
    meta = run_meta(run)
    return (f"the optimizer's own step rule: {meta.get('optimizer')} (from {meta.get('optimizer_module')}, not "
            f"torch.optim) shrank every parameter to {sci(float(ratios.max()))} of its norm or less in {span_steps} "
            f"steps (the median one ×{float(np.median(ratios)) ** (1 / span_steps):.3g} a step) — a decay written "
            f"by hand that its step cannot hold: a decoupled weight decay not multiplied by the rate "
            f"(torch.optim.AdamW multiplies it by lr; Loshchilov & Hutter 2019, Alg. 2, by the schedule's η), or a "
            f"step that pulls the weights to 0")


def penalty_without_graph(run: Run) -> str:
    """Words for gradients with respect to the model's own input taken only without a graph (meta
    ``input_gradients``: :mod:`gradwatch.probes.input_grads`), '' otherwise: a gradient penalty made of them is a
    constant to backward. Round 44: a 2-D WGAN-GP with ``torch.autograd.grad(…, create_graph=False)``
    (mlpack/mlpack#2891), its critic loss at 10⁵–10⁶ and its samples covering 0.00–0.14 of four modes (0.70–0.77
    with ``create_graph=True``), told "a sharp region … or a learning rate too large" before."""
    got = run_meta(run).get("input_gradients")
    if not isinstance(got, dict) or got.get("with_graph") or not got.get("without_graph"):
        return ""
    return (f"gradients with respect to the model's own input, taken {got['without_graph']} times and never with a "
            f"graph (create_graph=True): a gradient penalty made of them — WGAN-GP's λ(‖∇ₓD(x̂)‖ − 1)², R1's "
            f"‖∇ₓD(x)‖² — is a constant to backward, its value added to the loss and none of its gradient passed to "
            f"the weights, so the critic it should constrain is left unconstrained (mlpack/mlpack#2891)")


NEGATIVE_BIAS_TO = -1.0  # a layer's bias that starts at one constant this negative, or more, in every entry


def negative_constant_biases(run: Run) -> str:
    """Words for hidden layers whose bias starts at one constant of :data:`NEGATIVE_BIAS_TO` or below in every
    entry (meta ``constant_biases``; the last layer's, a detector's prior for its output, is left out), '' for none.
    Round 41: RetinaNet's prior bias −log((1 − π)/π) = −4.6 given to every conv of a digits CNN
    (kuangliu/pytorch-retinanet#10), every ReLU dead, 0.08–0.10 held out against 0.96; round 42: every bias of a
    regression MLP at −2 (facebookresearch/dlrm#358), R² −2.9 against 0.43–0.50."""
    meta = run_meta(run)
    layers = [l.get("name") for l in meta.get("layers") or () if isinstance(l, dict)]
    found = {n: b for n, b in (meta.get("constant_biases") or {}).items()
             if isinstance(b, (int, float)) and b <= NEGATIVE_BIAS_TO and (not layers or n != layers[-1])}
    if not found:
        return ""
    values = sorted(set(found.values()))
    value = f"{values[0]:.3g}" if len(values) == 1 else f"{values[0]:.3g} to {values[-1]:.3g}"
    return (f"the initialisation: the bias of {len(found)} hidden layer{'s' * (len(found) > 1)} ({listed(list(found))})"
            f" starts at {value} in every entry, so a ReLU after it is off wherever w·x stays below {-values[-1]:.3g}"
            f" — on most inputs from the first step — and passes no gradient back (a detector's prior bias "
            f"−log((1 − π)/π) belongs on its classification output alone)")


def unmoved_zero_layer(run: Run) -> str:
    """Words for layers whose weights started at exactly 0 (meta ``zero_weight_layers``) and stayed there at every
    read of ``weight_norm`` (3 or more) while their gradient was not 0: the optimizer's step for them is 0; '' for
    none. Round 43: LAMB without its guard for ‖w‖ = 0 (cybertronai/pytorch-lamb#6) on a ViT whose head starts at 0
    — the trust ratio ‖w‖/‖u‖ is 0, the head never moves, and nothing below it gets a gradient: ln 10 throughout,
    0.08 held out against 0.87–0.90, told "an operation with zero derivative … or ReLU units all dead"."""
    meta = run_meta(run)
    zero = set(meta.get("zero_weight_layers") or ())
    if not zero or not {"weight_norm", "grad_norm"} <= set(run.quantities):
        return ""
    w, g = run.series("weight_norm", "param"), run.series("grad_norm", "param")
    grads = dict(zip(g.names, g.values))
    unheld = set(meta.get("not_in_optimizer") or ())  # (a layer no optimizer holds: unoptimised_findings says so)
    stuck = []
    for name, values in zip(w.names, w.values):
        layer, _, attr = name.rpartition(".")
        seen, grad = values[np.isfinite(values)], grads.get(name)
        if (layer in zero and attr == "weight" and name not in unheld and len(seen) >= 3 and not seen.any()
                and grad is not None
                and np.isfinite(grad).any() and float(np.nanmedian(grad)) > 0):
            stuck.append(layer)
    if not stuck:
        return ""
    layers = [l.get("name") for l in meta.get("layers") or () if isinstance(l, dict)]
    below = (" — and since they are the output layer's, nothing below it gets a gradient either (∂L/∂h = Wᵀ·g = 0)"
             if layers and layers[-1] in stuck else "")
    optimizer = meta.get("optimizer") or "the optimizer"
    return (f"weights that start at 0 and never move: the weights of {listed(stuck)} are exactly 0 at every read "
            f"though their gradient is not, so {optimizer}'s step for them is 0 — an optimizer whose step is "
            f"proportional to the weights' norm (LAMB's or LARS's trust ratio ‖w‖/‖u‖ with no guard for ‖w‖ = 0) "
            f"never moves a weight that is 0{below}")


def zero_norm_scales(run: Run) -> str:
    """Words for normalisation layers whose scale γ was exactly 0 in every entry when the watch started (meta
    ``zero_norm_scales``) in a net without skip connections ('' otherwise): each outputs its shift β whatever its
    input, so nothing below it gets a gradient through it. Round 39: every BatchNorm's γ at 0 in a plain CNN on
    digits (tensorpack#420; Goyal et al. 2017 zero only a residual block's last), the ReLUs after them all at 0 and
    every gradient below them exactly 0, 0.08–0.11 held out against 0.98–0.99, told "negative biases, a large step …
    or a poor initialisation". A residual net's zero γ is the Goyal trick, and is left out."""
    names = [n for n in run_meta(run).get("zero_norm_scales") or () if isinstance(n, str)]
    if not names or has_residual(run):
        return ""
    return (f"the initialisation: the scale γ of {len(names)} normalisation layer{'s' * (len(names) > 1)} "
            f"({listed(names)}) starts at exactly 0, so each outputs its shift β whatever its input, and no gradient "
            f"passes it to the layers below (a γ of 0 belongs only to the last norm of a residual branch)")


def heavy_dropout(run: Run) -> str:
    """Words for a dropout rate of ``DROPOUT_FROM`` or more ('' otherwise): PyTorch's ``p`` is the probability to
    drop a unit, TF1's ``keep_prob`` the probability to keep one (measured: an MLP on digits with Dropout(0.9)
    ends at held-out accuracy 0.50–0.60 with most of its ReLUs silent for whole batches; at p = 0.1, 0.97)."""
    p = dropout_rate(run)
    if not DROPOUT_FROM <= p < 1:
        return ""
    how = "F.dropout(…, p=" if run_meta(run).get("functional_dropout_p") == p else "Dropout(p="
    return (f"the dropout rate: {how}{p:g}) drops {p:.0%} of the units on every step (PyTorch's p is the "
            f"probability to drop, not to keep), so each unit learns from {1 - p:.0%} of the samples")


def dropout_rate(run: Run) -> float:
    """The largest dropout rate of the run: its modules' (meta ``dropout_p``) or a dropout called as a function
    in training (``functional_dropout_p``); 0 without one."""
    meta = run_meta(run)
    rates = [p for p in (meta.get("dropout_p"), meta.get("functional_dropout_p"))
             if isinstance(p, (int, float)) and not isinstance(p, bool)]
    return float(max(rates, default=0.0))


COUPLED_TYPES = frozenset({"Adam", "NAdam", "RAdam", "Adamax"})  # their weight_decay is an L2 term in the gradient
HELD_WITHIN = 2.0  # the loss's gradient within this factor of λ‖w‖ on the median layer: the L2 term holds the weights
HELD_LOSS_ABOVE = 0.15  # ... and the loss ends above this share of its start (measured 0.32–0.33; at λ = 0.03, 0.09)


def coupled_decay_findings(found: list[Finding], run: Run, th: Thresholds) -> list[Finding]:
    """An Adam-type optimizer whose ``weight_decay`` λ is an L2 term added to the gradient (meta ``optimizer``, not
    ``decoupled_weight_decay``), strong enough to hold the weights: over the last third of the reads, the loss's
    gradient on the median layer is within :data:`HELD_WITHIN` of λ‖w‖ — where the two balance, Adam's normalised
    step is near 0 and the weights stop where the L2 pull meets the loss's — the loss ending above
    :data:`HELD_LOSS_ABOVE` of its start, and no rule found a problem: one ``stalled`` warning. Loshchilov & Hutter
    2019: in Adam, L2 is not weight decay; AdamW decouples it.

    Measured (round 21, mapbox/robosat#166: a digits MLP at Adam(lr=1e-3, weight_decay=0.1), the decay of an AdamW
    recipe): ‖g‖/(λ‖w‖) 1.1–1.8 on every layer, ‖W‖ held at 2–2.7, the loss 2.3 → 0.73, 0.84 held out against
    AdamW's 0.97 (its layers 0.25–1.3 of λ‖w‖ — under AdamW that ratio means nothing, and it is not read). Adam at
    λ = 0.03 on the same net: 2.3 on the median layer, the loss 2.2 → 0.19, 0.96 held out — no finding; at 0.01,
    0.98."""
    meta = run_meta(run)
    lam, opt = meta.get("optimizer_weight_decay"), meta.get("optimizer")
    if (opt not in COUPLED_TYPES or meta.get("optimizer_decoupled_wd") or not isinstance(lam, (int, float))
            or not lam > 0 or any(f.severity != "info" for f in found)
            or not {"grad_norm", "weight_norm"} <= set(run.quantities)):
        return []
    g, w = run.series("grad_norm"), run.series("weight_norm")
    steps = np.intersect1d(g.steps, w.steps)
    if len(steps) < 2 * th.window:
        return []
    last = steps[-max(th.window, len(steps) // 3):]
    ratios = {}
    for name in g.names:
        if name in w.names:
            gv = g.values[g.names.index(name)][np.isin(g.steps, last)]
            wv = w.values[w.names.index(name)][np.isin(w.steps, last)]
            if np.isfinite(gv).all() and np.isfinite(wv).all() and np.median(wv) > 0:
                ratios[name] = float(np.median(gv) / (lam * np.median(wv)))
    if not ratios:
        return []
    held = float(np.median(list(ratios.values())))
    if not 1 / HELD_WITHIN <= held <= HELD_WITHIN:
        return []
    ends = loss_ends(run, th)
    if ends is not None and ends[0] > 0 and ends[1] <= HELD_LOSS_ABOVE * ends[0]:
        return []
    went = "" if ends is None else f"; the logged loss went {loss_went(run, th, ends)}"
    low, high = min(ratios.values()), max(ratios.values())
    return [Finding(
        kind="stalled", severity="warning", layers=tuple(ratios), steps=(int(last[0]), int(last[-1])),
        summary=f"{opt}'s weight_decay={lam:g} is an L2 term that holds the weights: the loss's gradient is "
                f"{sci(held)}× λ‖w‖ on the median layer",
        evidence=(f"over the last {len(last)} reads (steps {int(last[0])}–{int(last[-1])}) the loss's gradient norm is "
                  f"{sci(low)}–{sci(high)}× λ‖w‖ across the {len(ratios)} layers (median {sci(held)}){went}."),
        cause=(f"{opt}'s weight_decay adds λ·w to the gradient (L2), which {opt} then normalises with it: at "
               f"λ = {lam:g} the pull towards 0 balances the loss's gradient, and the weights stop where the two meet "
               f"instead of where the loss is least (Loshchilov & Hutter 2019: in Adam, L2 is not weight decay; "
               f"AdamW decouples it)"),
        remedies=remedies("adamw", "lower_wd"),
        numbers={"weight_decay": float(lam), "grad_over_decay": held},
        sources=("grad_norm, weight_norm (layers)", "meta optimizer, optimizer_weight_decay"))]


def heavy_dropout_findings(found: list[Finding], run: Run, th: Thresholds) -> list[Finding]:
    """A dropout rate of ``DROPOUT_FROM`` or more (:func:`heavy_dropout`) in a run whose loss did not halve, where no
    rule found a problem: one ``stalled`` warning of its own, for :func:`fit_architecture` to give that cause and
    its remedy (the loss need not be flat: a tenth of the units still learns a little). Round 21 (TF1's keep_prob
    0.9 ported as ``F.dropout(h, p=0.9)``, and as ``nn.Dropout(0.9)``): the loss 2.6 → 2.2 in 300 steps, 0.61–0.67
    held out against 0.96–0.97 at p = 0.1, and "the gradients look healthy"."""
    words = heavy_dropout(run)
    if not words or any(f.severity != "info" for f in found):
        return []
    ends = loss_ends(run, th)
    if ends is None or not ends[0] > 0 or halved(ends):
        return []
    p = dropout_rate(run)
    return [flat_loss_finding(
        run, th, ends, "warning", f"the loss did not halve ({sci(ends[0])} → {sci(ends[1])}) under a dropout rate of "
                                  f"{p:g}", f", and the model drops {p:.0%} of its units on every step.",
        "a loss that did not halve while no gradient was at fault", (), ("meta dropout_p, functional_dropout_p",))]


def trained_in_eval_mode(run: Run) -> str:
    """Words for a model that trained in eval mode on at least half its steps, where that changes what it computes
    (BatchNorm, Dropout); '' otherwise."""
    meta = run_meta(run)
    n, steps, first = meta.get("eval_mode_steps"), meta.get("steps"), meta.get("eval_mode_first")
    if not isinstance(n, int) or not isinstance(steps, int) or steps < 1 or n < 0.5 * steps:
        return ""
    modes = sorted({t for t in module_types(run) if "BatchNorm" in t or "Dropout" in t})
    if not modes:
        return ""
    return (f"the model trained in eval mode: model.training was False on {n} of {steps} steps (from step {first}), "
            f"so its {', '.join(modes)} layers ran as at evaluation — BatchNorm normalising with running statistics "
            f"instead of the batch's, Dropout off")


def batch_norm_on_tiny_batches(run: Run) -> str:
    """Words for BatchNorm trained on batches of ``TINY_BATCH`` samples or fewer (the watch's most common
    ``batch_size``); '' otherwise."""
    meta = run_meta(run)
    size = meta.get("batch_size")
    modes = sorted(t for t in module_types(run) if "BatchNorm" in t)
    if not modes or not isinstance(size, int) or size > TINY_BATCH:
        return ""
    return (f"BatchNorm on batches of {size}: {', '.join(modes)} normalises each unit with the mean and variance of "
            f"{size} samples, which are noise at that size (Ioffe & Szegedy 2015; Wu & He 2018, Fig. 1), and the "
            f"running statistics used at evaluation follow that noise")


def _and_more(seen: list) -> str:
    """" and 3 more" after the first of ``seen`` named, '' where it is the only one."""
    return f" and {len(seen) - 1} more" if len(seen) > 1 else ""


def batch_axis_misread(run: Run) -> str:
    """Words for attention or recurrent layers built to read (seq, batch, feature) and given batches whose dimension
    0 is the batch (meta ``batch_axis_misread``, :mod:`gradwatch.probes.layout`); '' otherwise. Round 23: a 2-layer
    ``nn.TransformerEncoder`` at ``batch_first=False`` fed (64, 8, 32), at chance on seeds 0–2 and told "Post-LN
    without warm-up"; the same layers at ``batch_first=True`` reach 1.00."""
    seen = run_meta(run).get("batch_axis_misread") or []
    if not seen:
        return ""
    first, more = seen[0], _and_more(seen)
    shape = "×".join(str(n) for n in first["input"])
    return (f"the batch read as the sequence: {first['module']} ({first['type']}){more} reads its input as (seq, batch, "
            f"feature) — batch_first=False — but is given {shape}, whose dimension 0 is the batch of "
            f"{first['batch']} samples the model outputs; it attends or recurs across the samples of the batch at "
            f"each position, so the steps of one sequence never meet and each sample's output depends on the others "
            f"in its batch")


# the double-backward nodes of piecewise-linear activations: their derivative is a step, its derivative 0
PIECEWISE_DOUBLE = {"ThresholdBackwardBackward0": "ReLU", "LeakyReluBackwardBackward0": "LeakyReLU",
                    "HardtanhBackwardBackward0": "ReLU6/Hardtanh"}


AMPLIFIES_FROM = 10.0  # a backward of the user's own that passes on this many times the gradient it receives, or more


CHAIN_SLOPE_TO = 0.3  # log|g_in| against log|g_out| across a backward's entries: about 1 by the chain rule, 0 without


def ignored_grad_output(run: Run) -> str:
    """Words for a ``torch.autograd.Function`` of the user's own whose backward does not multiply by the gradient it
    receives (its ``chain_slope``, the slope of log|g_in| against log|g_out| across its entries, at a median of
    :data:`CHAIN_SLOPE_TO` or below over 3 reads or more: a backward g_out·φ'(x), as the chain rule makes every one,
    has a slope of about 1 whatever φ' is); '' otherwise. Round 41: a Transformer's GELU and an MLP's swish written
    as Functions whose backward returned φ'(x), leaving out ``grad_output *`` (pytorch/pytorch#995;
    discuss.pytorch.org/t/139574): the gradient ×10³–10⁵ the true one and at a cosine of about 0 with it, 0.37 held
    out against 0.98–0.99 and R² 0 against 0.74–0.76; the one told "a backward … amplifies the gradient", the other
    "the gradients passed every check"."""
    custom = set(run_meta(run).get("custom_functions") or ())
    if not custom or "chain_slope" not in run.quantities:
        return ""
    s = run.series("chain_slope", "activation")
    modules = {e.name: e.module for e in run.entities("activation")}
    for name, values in zip(s.names, s.values):
        seen = values[np.isfinite(values)]
        if modules.get(name) not in custom or len(seen) < 3 or float(np.median(seen)) > CHAIN_SLOPE_TO:
            continue
        return (f"a backward of your own leaves out the gradient it receives: across its entries, what "
                f"{modules[name]}.backward passes on ({name}) does not follow what it received — log|g_in| against "
                f"log|g_out| at a slope of {float(np.median(seen)):.2f} (median of {len(seen)} reads), where a "
                f"backward g_out·φ'(x) has about 1 whatever φ' is: it returns the local derivative φ'(x) without "
                f"grad_output ×, so the layers below it get a gradient of the activations, not of the loss")
    return ""


HOOKS_PILED_FROM = 10  # backward hooks of the user's own on one parameter or module that grew by this many in a run


def _hooks(run: Run) -> list[tuple[str, str, int, int]]:
    """The user's backward hooks (meta ``backward_hooks``) as (``param`` or ``module``, its name, how many when
    the watch began, how many at the end)."""
    seen = run_meta(run).get("backward_hooks") or {}
    return [(part.removesuffix("s"), name, int(n[0]), int(n[1])) for part in ("params", "modules")
            for name, n in (seen.get(part) or {}).items() if isinstance(n, (list, tuple)) and len(n) == 2]


def piled_hooks(run: Run) -> str:
    """Words for backward hooks of the user's own that piled up on a parameter or module while the watch ran
    (:data:`HOOKS_PILED_FROM` more or above at its end: one registered at every call of ``forward()``); ''
    otherwise. Round 41: MuZero's ×0.5 gradient scaling (dotnet/TorchSharp#1483) registered on embedding weights
    inside ``forward()``: 302 hooks by step 300, the embeddings' gradient ×0.5³⁰² = 0, R² −0.06 against 0.73–0.96
    registered once, told "a zero initialisation"."""
    piled = sorted(((last - first, part, name, last) for part, name, first, last in _hooks(run)
                    if last - first >= HOOKS_PILED_FROM), reverse=True)
    if not piled:
        return ""
    _, part, name, last = piled[0]
    more = f" (and {len(piled) - 1} more)" if len(piled) > 1 else ""
    call = "register_hook" if part == "param" else "register_full_backward_hook"
    return (f"backward hooks of your own pile up: {part} {name}{more} carries {last} of them at the end, "
            f"{last - piled[0][0]} when the watch began — a {call} called in forward() adds one at every call, and "
            f"every one applies at each backward after it: a hook that scales the gradient by 0.5 scales it by "
            f"0.5^{last}, and one that clamps it, {last} times")


def rewriting_hooks(run: Run) -> str:
    """Words for modules with backward hooks of the user's own (meta ``backward_hooks``, those that did not pile
    up: :func:`piled_hooks`), '' for none: a hook that returns a tensor replaces the gradient the module passes on.
    Round 41: a guided-backpropagation visualiser (utkuozbulak/pytorch-cnn-visualizations) left on a CNN being
    trained, every ReLU's gradient clamped to ≥ 0: 0.09–0.12 held out against 0.96–0.97 with the hooks removed,
    told "negative biases, a large step or the initialisation"."""
    held = [name for part, name, first, last in _hooks(run)
            if part == "module" and last and last - first < HOOKS_PILED_FROM]
    if not held:
        return ""
    where = "every module (a global hook)" if held == ["*"] else f"module{'s' if len(held) > 1 else ''} {listed(held)}"
    return (f"backward hooks of your own on {where} (register_full_backward_hook or a backward pre-hook): one that "
            f"returns a tensor replaces the gradient the module passes on, so the layers below train on that, not "
            f"on the loss's gradient — guided backpropagation's clamp to ≥ 0 (Springenberg et al. 2015) is for "
            f"saliency maps, and a visualiser's hooks left on a model being trained rewrite every step")


def amplifying_backward(run: Run) -> str:
    """Words for a ``torch.autograd.Function`` of the user's own (meta ``custom_functions``) whose backward passes on
    :data:`AMPLIFIES_FROM` × the gradient it receives or more (its ``deriv_rms``, the gain the watch measures on
    it: :mod:`gradwatch.probes.custom`; the median of the steps read), '' for none. Round 34: a gradient-reversal
    layer at a constant λ = 100 (DANN, Ganin et al. 2016, §5.2.2; janfreyberg/pytorch-revgrad#6), NaN by step 42–63
    on two seeds, told "a learning rate too large" while its gain of 100.0 was in the store (its twin, Ganin's ramp
    of λ from 0 to 1: 0.92, and 0.95–0.96 held out)."""
    custom = set(run_meta(run).get("custom_functions") or ())
    if not custom or "deriv_rms" not in run.quantities or ignored_grad_output(run):
        return ""  # (a backward that ignores what it receives passes on much more than it, told as that)
    s = run.series("deriv_rms", "activation")
    modules = {e.name: e.module for e in run.entities("activation")}
    gains = []
    for name, values in zip(s.names, s.values):
        seen = values[np.isfinite(values)]
        if modules.get(name) in custom and len(seen):
            gains.append((float(np.median(seen)), name, str(modules[name])))
    gain, name, cls = max(gains, default=(0.0, "", ""))
    if gain < AMPLIFIES_FROM:
        return ""
    return (f"a backward of your own amplifies the gradient: {cls}.backward passes on ×{gain:.3g} of the gradient it "
            f"receives ({name}, measured), so every layer below it gets ×{gain:.3g} what the loss asks of it — a "
            f"gradient-reversal layer's λ far above 1 (Ganin et al. 2016 ramp it from 0 to 1, λ = 2/(1 + e^(−10p)) − "
            f"1 at progress p), or a surrogate derivative far steeper than the step it stands for")


def derivative_through_relu(run: Run) -> str:
    """Words for a model whose forward differentiates itself through a piecewise-linear activation (meta
    ``output_derivative_ops``: its output's graph holds that activation's double backward — ``torch.autograd.grad``
    with ``create_graph=True`` inside the forward); '' otherwise. A ReLU net is piecewise linear in its input: its
    second derivative is 0 almost everywhere, so a residual on u'' passes no gradient to the weights. Round 26: a
    physics-informed net for u'' = −π² sin πx with ReLU units (deepxde#80: "Don't use relu … Use smooth activations,
    e.g., tanh"), its loss stuck at 48 and R² 0 against 1.000 with tanh, told a saturated output or a GAN's loss."""
    ops = [PIECEWISE_DOUBLE[o] for o in run_meta(run).get("output_derivative_ops") or () if o in PIECEWISE_DOUBLE]
    if not ops:
        return ""
    return (f"the model's output holds a derivative it took of itself through {', '.join(ops)} (a double backward in "
            f"its graph: torch.autograd.grad with create_graph=True in the forward): a {ops[0]} net is piecewise linear "
            f"in its input, so its second derivative is 0 almost everywhere and a loss on it (a physics-informed "
            f"residual on u'') passes the weights no gradient")


def float_masks(run: Run) -> str:
    """Words for attention modules given a float mask of 0s and 1s (meta ``float_01_masks``,
    :func:`gradwatch.probes.layout.float_01`); '' otherwise. Round 24: a Transformer LM whose causal mask was
    ``torch.triu(torch.ones(T, T), 1)`` — float, so added to the scores — saw the next token: its training loss fell
    to 0.1 while its held-out causal accuracy stayed at 0.11 against 0.52 with ``mask.bool()``; "no findings"."""
    seen = run_meta(run).get("float_01_masks") or []
    if not seen:
        return ""
    first, more = seen[0], _and_more(seen)
    return (f"an attention mask of 0s and 1s given as floats: {first['module']}'s {first['mask']}{more} — "
            f"nn.MultiheadAttention adds a float mask to the attention scores, so its 1s raise those scores by 1 and "
            f"mask nothing: the model attends to what the mask was meant to hide (under a causal mask, the tokens it "
            f"is to predict), and what it learns does not hold where they are hidden")


def single_element_norm(run: Run) -> str:
    """Words for normalisation layers over a single element (meta ``single_element_norms``, and
    ``single_element_groups``: GroupNorm layers whose groups held one value on their first training call); ''
    otherwise."""
    groups = run_meta(run).get("single_element_groups") or []
    seen = (run_meta(run).get("single_element_norms") or []) + groups
    if not seen:
        return ""
    where = ("x − mean(x) is 0 (LayerNorm, a GroupNorm whose groups hold one value: GroupNorm(C, C) on 1×1 maps) or "
             "x / rms(x) is ±1 (RMSNorm)" if groups else "x − mean(x) is 0 (LayerNorm) or x / rms(x) is ±1 (RMSNorm)")
    return (f"a normalisation over a single element: module '{seen[0]}'{_and_more(seen)} normalises over a shape of 1, where "
            f"{where}: its output is its bias whatever its input, so no layer before it gets a gradient")


def identity_activations(run: Run) -> str:
    """Words for LeakyReLU modules with a negative slope of 1 or more (meta ``linear_activations``) where they are
    every nonlinearity the model has: its layers compose to one linear map; '' otherwise."""
    seen = run_meta(run).get("linear_activations") or []
    deepest = max((e.depth for e in run.entities("layer") if e.depth is not None), default=None)
    between = [e.name for e in run.entities("activation") if e.depth is not None and deepest is not None
               and e.depth < deepest]  # (an output's sigmoid is no nonlinearity between layers)
    if not seen or not between or not set(between) <= set(seen):
        return ""
    modules = f"module{'s' if len(seen) > 1 else ''} {listed(seen)}"
    return (f"a linear net: every activation is an nn.LeakyReLU with a negative slope of 1 ({modules}), the identity "
            f"— nn.LeakyReLU(True) sets negative_slope=1, not inplace=True (its second argument) — so the layers "
            f"compose to one linear map, which cannot fit a task that is not linear")


def unbounded_loss_weights(run: Run) -> str:
    """Words for a loss of terms never below 0 weighed by parameters (meta ``loss_weights``) whose logged value went
    below 0: a learned weight went through 0, and the loss is unbounded below; '' otherwise. Round 27: Σ wᵢ·Lᵢ over
    a regression's and a classifier's losses, NaN by step 53–60, told "a learning rate too large"."""
    if not run_meta(run).get("loss_weights") or "loss" not in run.quantities:
        return ""
    ls = run.series("loss", "run")
    below = np.flatnonzero(np.isfinite(ls.values[0]) & (ls.values[0] < 0))
    if not len(below):
        return ""
    at = int(ls.steps[below[0]])
    return (f"loss weights learned as free multipliers: a parameter weighs terms of a loss that are never below 0, "
            f"and the logged loss went below 0 from step {at} ({sci(float(ls.values[0][below[0]]))}) — a weight the "
            f"optimizer drove through 0, below which the loss is unbounded: each step then raises that task's loss")


UNBOUNDED_BELOW = 10.0  # a positive loss that falls below −this × its start has no floor the model stops at ...
# ... where it reaches −this × its start's size at its lowest: a likelihood without its constant term goes below 0
# and stops (round 39: a Poisson NLL on log-rates, 0.7 → −11 on one batch of large counts, −5.4 at the end), where a
# loss without a minimum runs away (a flipped log-determinant to −1.8·10⁶ from 4.7, a pinball loss at q = 90 to −10²⁵)
UNBOUNDED_DEPTH = 1000.0
TARGETS_OUTSIDE_FROM = 0.1  # a binary cross-entropy with this share of its targets outside [0, 1] has no minimum


def _bce_targets(run: Run) -> tuple[dict, float]:
    """A binary cross-entropy's targets as read at the first logged loss (meta ``loss_targets`` marked
    ``bce_logits``; {} otherwise) and the share of them outside [0, 1] (0 without them)."""
    targets = run_meta(run).get("loss_targets")
    if not isinstance(targets, dict) or not targets.get("bce_logits"):
        return {}, 0.0
    return targets, float(targets.get("below_0") or 0.0) + float(targets.get("above_1") or 0.0)


def bce_targets_outside(run: Run) -> str:
    """Words for a binary cross-entropy on logits whose targets, read off the output's gradient at the first logged
    loss (meta ``loss_targets`` marked ``bce_logits``), lie outside [0, 1] for :data:`TARGETS_OUTSIDE_FROM` of them
    or more; '' otherwise. −y·log σ(z) − (1 − y)·log(1 − σ(z)) is linear in z for large |z| with slope 1 − y above
    and −y below: for y > 1 it falls without bound as z → +∞, for y < 0 as z → −∞. Round 30: an autoencoder under
    BCEWithLogitsLoss on digits standardised as torchvision's Normalize does (86 % of the targets outside [0, 1]),
    its loss 0.70 → −2.3·10⁵, held out −0.56 against 0.58 on pixels in [0, 1]; the doctor's lower learning rates
    only postponed the fall, and were called fixes."""
    targets, outside = _bce_targets(run)
    if outside < TARGETS_OUTSIDE_FROM:
        return ""
    return (f"a binary cross-entropy on targets outside [0, 1]: {outside:.0%} of them at the first step, from "
            f"{sci(float(targets['min']))} to {sci(float(targets['max']))} — BCEWithLogitsLoss wants probabilities; "
            f"for a target above 1 its loss falls without bound as the logit grows, for one below 0 as it falls, so "
            f"the loss has no minimum and the logits run off (standardised inputs used as targets, as "
            f"transforms.Normalize makes them)")


def unnormalised_similarities(run: Run) -> str:
    """Words for a loss that takes similarity logits of embeddings that are not normalised (meta
    ``unnormalised_similarity``, :mod:`gradwatch.probes.similarity`); '' otherwise. Round 43: SupContrast's
    SupConLoss (τ = 0.07) on raw features (HobbitLong/SupContrast#50), NaN by step 3–39 on seeds 0–2 and told
    "divergence" or "0/0 over an empty mask"; F.normalize before it holds out 0.98."""
    if not run_meta(run).get("unnormalised_similarity"):
        return ""
    return ("similarity logits of embeddings that are not normalised: the loss takes products z_i·z_j of the model's "
            "outputs (÷ a temperature) through an exp or a softmax, and neither factor is divided by its norm, so "
            "the logits grow with ‖z‖² — the softmax goes one-hot and, at a temperature such as 0.07, an exp "
            "underflows across a whole row, whose log is −inf (a contrastive loss wants unit vectors: F.normalize)")


def loss_unbounded_below(run: Run) -> str:
    """Words for a logged loss that started above 0 and fell below −:data:`UNBOUNDED_BELOW` × its start (the median of
    its first values), on to −:data:`UNBOUNDED_DEPTH` × it or below; '' otherwise, and where learned loss weights say
    why (:func:`unbounded_loss_weights`). Said only beside a blow-up: a likelihood that converges below 0 (a density
    fitted to concentrated data) has no growing gradient. Round 29: a RealNVP whose loss was −(log N(z) − log|det J|),
    its log-determinant's sign flipped (pytorch-flows#16), went 4.7 → −1.8·10⁶ with its gradient at 10¹⁰, told "unstable
    steps … a learning rate too large" and "the weights amplify the gradient ×3.8 per layer"; the twin, +log|det J|,
    ends at 1.4."""
    if run_meta(run).get("loss_weights") or "loss" not in run.quantities or bce_targets_outside(run):
        return ""
    ls = run.series("loss", "run")
    finite = np.isfinite(ls.values[0])
    values, steps = ls.values[0][finite], ls.steps[finite]
    if len(values) < 2:
        return ""
    # the start: the median of its first values before it first went below 0 (round 39: a pinball loss given q = 90
    # for 0.9 went 6.3 → −212 → … → −10²⁵ in seven steps, and the median of its first ten was itself negative); a
    # loss below 0 from its first value (the same loss on another seed) by UNBOUNDED_BELOW² × that value's size
    if values[0] >= 0:
        negative = np.flatnonzero(values < 0)
        start, times = float(np.median(values[:min(10, negative[0]) if len(negative) else 10])), UNBOUNDED_BELOW
    else:
        start, times = float(values[0]), UNBOUNDED_BELOW ** 2
    below = np.flatnonzero(values < -times * abs(start))
    low = int(np.argmin(values))
    if start == 0 or not len(below) or values[low] > -UNBOUNDED_DEPTH * abs(start):
        return ""
    return (f"a loss unbounded below: the logged loss started at {sci(start)} and fell below −{times:g}× "
            f"{'that' if start > 0 else 'its size'} from step {int(steps[below[0]])}, to {sci(float(values[low]))} at "
            f"step {int(steps[low])} — an objective the model can drive towards −∞ (a log-determinant or log-variance "
            f"term with the wrong sign, as a flow's −log|det J| where +log|det J| belongs; a learned variance or scale "
            f"with no floor; a pinball loss given q = 90 for the quantile 0.9), whose gradient grows as it falls: no "
            f"learning rate or clipping gives it a minimum")


NAN_LOSS_SHARE = 0.5  # a loss non-finite on this share of its steps or more since it first was


def log_of_nonpositive(run: Run) -> str:
    """Words for a logged loss non-finite at its last value and on :data:`NAN_LOSS_SHARE` of its steps or more since it
    first was, while no gradient read was ever non-finite, with a logarithm in its graph (meta ``loss_ops``:
    ``LogBackward0``) ('' otherwise): the log of values ≤ 0 makes the value NaN, while its derivative 1/x stays finite
    and keeps training, towards ever more negative inputs. Round 39: ``nn.PoissonNLLLoss(log_input=False)`` given a
    linear output (pytorch/pytorch#184030), the loss NaN from step 0 on two seeds and the outputs driven to −4·10⁴, told
    "unstable steps … a learning rate too large"."""
    meta = run_meta(run)
    if "LogBackward0" not in (meta.get("loss_ops") or ()) or "loss" not in run.quantities:
        return ""
    loss = run.series("loss", "run")
    bad = ~np.isfinite(loss.values[0])
    if not bad.any():
        return ""
    first = int(np.argmax(bad))
    if not bad[-1] or bad[first:].mean() < NAN_LOSS_SHARE:
        return ""
    if nonfinite_grads_seen(run):
        return ""
    since = "its first step" if first == 0 else f"step {int(loss.steps[first])}"
    return (f"the loss takes the logarithm of values at or below 0: it is NaN from {since} on {int(bad.sum())} of "
            f"{len(bad)} logged steps while every gradient read is finite (log's derivative "
            f"1/x is finite below 0, and drives the input further down) — the model's raw output given where the loss "
            f"expects a positive quantity: nn.PoissonNLLLoss(log_input=False) reads its input as the rate itself "
            f"(log_input=True, the default, as a log-rate), a hand-written log of an output that is not kept positive")


def scaler_bypassed(run: Run) -> str:
    """Words for a GradScaler given to the watch whose ``step`` the loop went around (meta ``steps_outside_scaler``:
    optimizer steps not taken through ``scaler.step(optimizer)``); '' otherwise. Round 27: float16 autocast on the
    CPU with ``optimizer.step()`` where ``scaler.step(optimizer)`` belongs — the gradients of a loss ×65536, never
    unscaled, NaN at step 1 — told "the scale of the forward pass at init" and offered a GradScaler."""
    meta = run_meta(run)
    outside, steps = meta.get("steps_outside_scaler"), meta.get("steps")
    if not isinstance(outside, int) or outside < 1:
        return ""
    of = f" of {steps}" if isinstance(steps, int) else ""
    return (f"a GradScaler that scales the loss while the optimizer steps outside it: {outside}{of} optimizer steps "
            f"were not taken through scaler.step(optimizer), so their gradients were never unscaled — each step "
            f"applied the gradient × the loss scale (65536 by default) — and no step with NaN/Inf was skipped")


def inverted_padding_masks(run: Run) -> str:
    """Words for attention modules given a key-padding mask that hides the text and leaves the padding (meta
    ``inverted_padding_masks``, :func:`gradwatch.probes.layout.inverted_padding`); '' otherwise. Round 26: Hugging
    Face's ``attention_mask`` (1 = a real token) given as ``src_key_padding_mask`` (True = ignore) — every query
    attended only to the padding, held-out accuracy 0.48–0.54 against 0.99–1.00 with ``attention_mask == 0``, told
    Post-LN's missing warm-up on two seeds and nothing on the third."""
    seen = run_meta(run).get("inverted_padding_masks") or []
    if not seen:
        return ""
    first, more = seen[0], _and_more(seen)
    return (f"a key padding mask inverted: {first['module']}{more} attended only to keys holding token "
            f"{first['token']} (the padding) and ignored every other — PyTorch's key_padding_mask ignores the keys "
            f"where it is True, the inverse of Hugging Face's attention_mask (1 = a real token), so no query sees the "
            f"text")


CLIPPED_LAYERS = 0.5  # the share of the weighted layers whose weights sit at ±c for the net to be called clipped


def clipped_weights(run: Run) -> str:
    """Words for weights clipped to ±c — a WGAN critic's weight clipping — when at least ``CLIPPED_LAYERS`` of the
    weighted layers have a quarter or more of their weights at ±max|w| (the watch's ``weights_at_bound``); ''
    otherwise."""
    meta = run_meta(run)
    at = meta.get("weights_at_bound") or {}
    layers = [layer["name"] for layer in meta.get("layers") or ()
              if any(len(shape) >= 2 for shape in (layer.get("params") or {}).values())]
    if not at or len(at) < CLIPPED_LAYERS * max(len(layers), 1):
        return ""
    names = [n for n in layers if n in at] or sorted(at)
    share = min(at[n][0] for n in names)
    bounds = sorted({float(at[n][1]) for n in names})
    bound = f"±{sci(bounds[0])}" if bounds[-1] <= bounds[0] * (1 + 1e-6) else f"±{sci(bounds[0])}…{sci(bounds[-1])}"
    return (f"weight clipping: {share:.0%} or more of the weights of {len(names)} of {max(len(layers), len(names))} "
            f"layers sit at {bound}, their largest magnitude (a WGAN critic's clip bound, Arjovsky et al. 2017); "
            f"clipping fixes each layer's gain by the bound and the width instead of letting it learn, so the "
            f"gradient vanishes across the layers for a small bound and explodes for a large one (Gulrajani et al. "
            f"2017, Fig. 1b)")


def _most_checked_steps(run: Run, key: str) -> tuple[int, int] | None:
    """The watch's [steps where a check hit, steps checked] under meta ``key``, where it hit at half of them or more
    (three checked at least); None otherwise."""
    hits, checks = run_meta(run).get(key) or (0, 0)
    return (hits, checks) if checks >= 3 and hits >= 0.5 * checks else None


def grads_not_zeroed(run: Run) -> str:
    """Words for a loop that never zeroes ``.grad``: at half of the checked steps or more (three at least), the first
    backward after an optimizer step found a parameter's ``.grad`` still holding a gradient (the watch's
    ``grads_not_zeroed``); '' otherwise."""
    got = _most_checked_steps(run, "grads_not_zeroed")
    if got is None:
        return ""
    stale, checks = got
    if stale < checks:  # round 43: zero_grad() once an epoch (every 21 batches), step() at every batch
        return (f"the gradients are zeroed only now and then: at {stale} of {checks} steps .grad still held the last "
                f"step's gradient when the next backward began (optimizer.zero_grad() called less often than "
                f"optimizer.step(): once an epoch, not once a batch), so each step applies the sum of every gradient "
                f"since the last zeroing")
    return (f"the gradients are not zeroed between steps: at {stale} of {checks} steps .grad still held the last "
            f"step's gradient when the next backward began (no optimizer.zero_grad()), so each step applies the sum of "
            f"every gradient so far")


def clipped_after_step(run: Run) -> str:
    """Words for a gradient changed in place after each optimizer step had used it, not to zero: at half of the
    checked steps or more (three at least), the ``.grad`` a step used had changed by the next forward pass (the
    watch's ``grads_changed_after_step``) — a clip placed after ``optimizer.step()``; '' otherwise. Round 36
    (awslabs/graphstorm#1366, fixed by moving the clip before the step): SGD at 0.3 with momentum diverged on three
    seeds, R² −1.37 / −1.02 / −0.08 against 0.86–0.98, told "clip the gradient norm" by a loop that clipped."""
    got = _most_checked_steps(run, "grads_changed_after_step")
    if got is None:
        return ""
    changed, checks = got
    return (f"the gradient is changed after the optimizer has used it: at {changed} of {checks} steps the .grad a step "
            f"had applied was changed in place before the next forward pass — a clip_grad_norm_ (or clip_grad_value_) "
            f"called after optimizer.step(), which clips nothing that step applied, so the steps are unclipped")


PADDING_READ_FROM = 0.5  # an embedding whose lookups are its padding index this often reads it as data


def padding_read_words(run: Run) -> str:
    """Words for embeddings whose first lookups were their ``padding_idx`` for :data:`PADDING_READ_FROM` of them or
    more (meta ``padding_reads``), '' without one: that row is 0 and gets no gradient, and whatever multiplies it
    gets none either."""
    found = [r for r in run_meta(run).get("padding_reads") or ()
             if isinstance(r, dict) and isinstance(r.get("share"), (int, float)) and r["share"] >= PADDING_READ_FROM]
    if not found:
        return ""
    read = "; ".join(f"{r['module']} reads its padding_idx ({r['padding_idx']}) in {r['share']:.0%} of its lookups"
                     for r in found[:3])
    return (f"an embedding's padding row read as data: {read} — nn.Embedding keeps that row at 0 and never gives it a "
            f"gradient, so it and everything multiplied by it stay at 0: padding_idx given to an index that is real "
            f"data (a relation, a token)")


def ascending(run: Run) -> str:
    """Words for an optimizer with ``maximize=True`` in a group (meta ``optimizer_maximize``), '' otherwise: it steps
    along the gradient, up the loss. Round 40 (the fast.ai forum's "why do we always subtract the gradients": a step
    written params += lr·grad, ported as SGD(maximize=True)): the loss rose from its first step and went NaN at steps
    30–50, 0.35 held out against 0.96–0.98, told "a learning rate too large"."""
    if run_meta(run).get("optimizer_maximize") is not True:
        return ""
    return (f"the optimizer climbs the loss: {run_meta(run).get('optimizer') or 'it'} was built with maximize=True, "
            f"so each step adds lr·grad where training subtracts it (params −= lr·grad) — wrong wherever the logged "
            f"loss is the quantity to lower")


def rprop_on_minibatches(run: Run) -> str:
    """Words for ``torch.optim.Rprop`` on batches that change from step to step (meta ``batches_vary``): a full-batch
    method (Riedmiller & Braun 1993) whose per-weight steps follow the gradient's sign alone, growing ×1.2 while two
    successive signs agree, to 50; on mini-batches the signs are the batches' noise (Hinton's lecture 6e: "rprop
    does not work with mini-batches"; RMSprop is its mini-batch form). '' otherwise. Round 37: digits in batches of
    32, the loss ending above its start on three seeds, told "a learning rate too large", which for Rprop is only its
    first step."""
    meta = run_meta(run)
    if meta.get("optimizer") != "Rprop" or meta.get("batches_vary") is not True:
        return ""
    return ("Rprop on mini-batches: torch.optim.Rprop steps each weight by the sign of its gradient alone, its step "
            "growing ×1.2 (to 50) while two successive signs agree — a full-batch method (Riedmiller & Braun 1993); "
            "from batch to batch the signs follow the batches' noise, and the steps run away whatever the learning "
            "rate, which is only its first step — use Adam or RMSprop (Rprop's mini-batch form), or full batches")


def raw_inputs(run: Run) -> str:
    """Words for inputs far from unit scale (the first training batch's std or mean |x| above ``RAW_INPUT_ABOVE``,
    as the watch measured them once); '' otherwise."""
    meta = run_meta(run)
    std, mean = meta.get("input_std"), meta.get("input_abs_mean")
    if (not isinstance(std, (int, float)) or not isinstance(mean, (int, float)) or not math.isfinite(std + mean)
            or max(std, mean) <= RAW_INPUT_ABOVE):
        return ""  # a NaN in the inputs is no scale: the data's own finding (check_data) tells it
    return (f"the inputs are not standardised: the first batch has std {sci(std)} and mean |x| {sci(mean)}, where an "
            f"initialisation (He, Xavier) expects about 1, so the first layer's pre-activations are that much too "
            f"large: saturated or dead from the start")


def pruned_layers(run: Run) -> str:
    """Words for layers whose every weight a pruning mask removes (meta ``pruned_whole``), '' otherwise. Round 47:
    ``prune.global_unstructured`` at 95 % at initialisation took every weight of two of three layers (layer
    collapse, Tanaka et al. 2020, §3), chance held out against 0.92–0.94 pruned layer by layer; told "torch.round …
    or ReLU units all dead" before."""
    whole = run_meta(run).get("pruned_whole") or {}
    if not isinstance(whole, dict) or not whole:
        return ""
    return (f"pruning: the masks of torch.nn.utils.prune remove every weight of {listed(sorted(whole))} — no signal "
            f"passes them, and no step brings a pruned weight back (the mask zeroes it at every forward pass); a "
            f"global magnitude pruning at initialisation takes whole layers, those whose weights start smaller "
            f"(layer collapse: Tanaka et al. 2020, §3)")


def relative_error_loss(run: Run) -> str:
    """Words for a loss that divides an absolute error by a tensor without gradient (meta ``relative_error``:
    :func:`gradwatch.probes.loss_ops.relative_error`), '' otherwise. Round 47: tsai's MAPE,
    |ŷ − y| / clamp_min(y, 1e-8), on a series that crosses 0 (timeseriesAI/tsai#524): the loss at 4·10⁷ and NaN
    by step 1, told "a squared error on targets in their raw units" of targets within ±1.6."""
    if not run_meta(run).get("relative_error"):
        return ""
    return ("the loss divides the error by the targets (a relative or percentage error, |ŷ − y| / y): wherever a "
            "target is near 0 — a series that crosses 0, a divisor clamped to a tiny ε — the loss and its gradient "
            "are that many times larger, and percentage errors are infinite or undefined at 0 (Hyndman & Koehler "
            "2006, §3.2)")


def weighted_smoothing(run: Run) -> str:
    """Words for a class-weighted cross-entropy with label smoothing whose minimum is away from the label for some
    classes (meta ``smoothing_outweighs``: :func:`gradwatch.probes.loss_ops.smoothing_outweighs`), '' otherwise.
    Round 48: a BiGRU tagger, 'O' 90 % of the tokens, sklearn's balanced weights and ``label_smoothing=0.1``
    (pytorch/pytorch#104776), answered its 0.5 % tag: 0.04–0.06 held out against 0.95–0.96; "no findings" before."""
    got = run_meta(run).get("smoothing_outweighs")
    if not isinstance(got, dict) or not got.get("labels"):
        return ""
    labels = [str(y) for y in got["labels"]]
    return (f"label smoothing under class weights: nn.CrossEntropyLoss weighs the smoothing term by the class weights "
            f"too (pytorch/pytorch#104776), so with ε = {got['epsilon']:g} class {got['toward']}'s weight × ε/K "
            f"outweighs the label's own share for label{'s' if len(labels) > 1 else ''} {', '.join(labels[:6])}"
            f"{' …' if len(labels) > 6 else ''}: the loss is least where the model answers class {got['toward']} "
            f"for them, whatever it learns")


def weighted_smoothing_findings(found: list[Finding], run: Run, th: Thresholds) -> list[Finding]:
    """A class-weighted, label-smoothed cross-entropy whose minimum answers another class (:func:`weighted_smoothing`)
    where no rule found a problem: one ``stalled`` warning of its own (the loss falls, towards the wrong answer)."""
    if any(f.severity != "info" for f in found) or not weighted_smoothing(run):
        return []
    got = run_meta(run)["smoothing_outweighs"]
    return [set_up_warning(run, "stalled", (), f"the loss's minimum answers class {got['toward']} for labels it "
                           f"should not", "the cross-entropy's class weights and label smoothing, read off the loss's "
                           "graph (meta smoothing_outweighs).", weighted_smoothing(run), "smoothing_weights",
                           "meta smoothing_outweighs")]


TIED_STD_FROM = 0.3  # a tied matrix drawn at this std or more: an embedding's N(0, 1), no output layer's scale
TIED_LOSS_FROM = 3.0  # ... where the cross-entropy starts at this × ln C or more (C: the tied matrix's rows)


def tied_embedding_scale(run: Run) -> str:
    """Words for an output layer tied to an ``nn.Embedding`` left at its N(0, 1) (meta ``tied_embeddings``: std
    :data:`TIED_STD_FROM` or more) where a cross-entropy (an NLL of a log-softmax in the loss's graph) started at
    :data:`TIED_LOSS_FROM` × ln C or more, '' otherwise. Round 48: a 2-layer Transformer LM whose head was tied to
    its embedding and nothing re-initialised (NX-AI/xlstm#83; transformers #26441): the loss 53 on 64 tokens, the
    logits at rms 474, 0.18 held out against 0.61–0.63 with the matrix at std 0.02; "no findings" before."""
    meta = run_meta(run)
    tied = [t for t in meta.get("tied_embeddings") or () if isinstance(t, dict)
            and float(t.get("std") or 0) >= TIED_STD_FROM and int(t.get("rows") or 0) > 1]
    if not tied or not {"NllLossBackward0", "LogSoftmaxBackward0"} <= set(meta.get("loss_ops") or ()) \
            or "loss" not in run.quantities:
        return ""
    values = run.series("loss", "run").values[0]
    finite = values[np.isfinite(values)]
    t = tied[0]
    guess = math.log(int(t["rows"]))
    if not len(finite) or not finite[0] >= TIED_LOSS_FROM * guess:
        return ""
    return (f"weight tying at an embedding's scale: layer {t['layer']} shares its weight with the embedding "
            f"{t['embedding']}, drawn at std {t['std']:.2g} (nn.Embedding's N(0, 1)), so the logits start about √d "
            f"times too large — the cross-entropy starts at {sci(float(finite[0]))} against a uniform guess's "
            f"ln {t['rows']} = {guess:.2f} — and the run spends its steps shrinking a matrix that is also its input "
            f"(GPT-2 draws the tied matrix at std 0.02; T5 scales the output by d^(−1/2))")


def raw_ratio_loss(run: Run) -> str:
    """Words for a loss that divides by a linear function of the raw output (meta ``raw_ratio``:
    :func:`gradwatch.probes.loss_ops.raw_ratio`), '' otherwise. Round 48: a soft Dice given a U-Net's logits where it
    wants probabilities (jakeret/tf_unet#15, fixed in #16), IoU 0.00–0.10 held out against 0.69, told a loss spike
    with skip-step and warm-up (seeds 0–1) and nothing but info (seed 2)."""
    if not run_meta(run).get("raw_ratio"):
        return ""
    return ("the loss divides by a sum of the raw outputs — a soft Dice or IoU, (2Σp·y + s)/(Σp + Σy + s), written "
            "for probabilities and given the logits, no sigmoid or softmax between: logits take either sign, so the "
            "denominator crosses 0, the ratio has no bound and the loss no floor, and it spikes wherever the sum "
            "nears 0")


FEW_DISTINCT = 0.5  # batches whose rows are this share distinct or less (a median) repeat their samples ...
FEW_SAMPLES = 0.5  # ... from a pool of at most this share of one batch's rows over all the batches read


def few_samples(run: Run) -> str:
    """Words for batches drawn from a handful of samples (meta ``batch_samples``: the watch counts the distinct rows
    of the first training batches), '' otherwise. Round 47: ``WeightedRandomSampler`` given ten class weights where it
    wants one per sample (deep-voice/soundbay#49), every batch drawn from samples 0–9, 0.37–0.43 balanced accuracy
    against 0.92–0.95, and no finding."""
    seen = run_meta(run).get("batch_samples")
    if not isinstance(seen, dict) or not seen.get("batches"):
        return ""
    share, distinct, rows, batches = (float(seen.get(k) or 0) for k in ("distinct_share", "distinct", "rows",
                                                                          "batches"))
    if share > FEW_DISTINCT or distinct > FEW_SAMPLES * rows / batches:
        return ""
    return (f"the batches repeat a handful of samples: the first {batches:g} training batches, {rows:g} rows, hold "
            f"{distinct:g} distinct inputs between them ({share:.0%} of a batch's rows distinct at the median), so the "
            f"model sees almost none of the data — a sampler that draws from a few indices (WeightedRandomSampler "
            f"given one weight per class where it wants one per sample: its indices run over the weights' length), "
            f"or a data set indexed wrongly")


def collapsing_posterior(run: Run) -> str:
    """Words for a VAE's loss whose reconstruction is averaged over every element while its Gaussian KL is summed
    (meta ``kl_outweighs_reconstruction``: :mod:`gradwatch.probes.elbo`), '' otherwise. Round 44: a VAE on digits
    with ``F.binary_cross_entropy(recon, x)`` beside a summed KL (zdebruine/MMVAE#19), its reconstructions the mean
    digit (explained variance 0.00 against 0.50–0.54), told "no findings" or dead units."""
    found = run_meta(run).get("kl_outweighs_reconstruction")
    if not isinstance(found, dict):
        return ""
    return (f"the VAE's loss: its reconstruction ({found.get('reconstruction', '?').removesuffix('Backward0')}) is "
            f"averaged over every element while its KL is summed, so the KL weighs as many times more as a sample "
            f"has elements — the encoder is pulled to the prior, the decoder outputs the mean sample whatever z, and "
            f"the KL falls to 0: posterior collapse (the ELBO sums both over a sample's elements)")


def undetached_advantage(run: Run) -> str:
    """Words for a policy-gradient loss whose advantage carries a gradient of its own (meta ``policy_loss``:
    :func:`gradwatch.probes.policy_loss.policy_loss`), '' otherwise. Round 46: an actor-critic on a digits bandit
    with −log π(a)·(R − V) not detached (coreylynch/async-rl#8): V ran to 1.5 on rewards in [0, 1], 0.17–0.35 held
    out against the twin's 0.93–0.94, and no finding."""
    if not (run_meta(run).get("policy_loss") or {}).get("advantage_with_grad"):
        return ""
    return ("the policy-gradient loss: the weight of log π(a) — the advantage R − V — carries a gradient of its own, "
            "so the policy term trains the critic too, pushing V up wherever log π(a) < 0, and the policy is "
            "pushed off whatever it samples (the advantage must be a constant to the policy term: "
            "coreylynch/async-rl#8)")


def entropy_minimised(run: Run) -> str:
    """Words for a policy-gradient loss that holds the policy's entropy with a plus sign (meta ``policy_loss``),
    '' otherwise. Round 44: REINFORCE on a digits bandit with ``pg + β·H`` (google-deepmind/open_spiel#962), the
    policy one-hot in 30 steps, 0.10–0.20 held out against the twin's 0.84–0.89, and no finding."""
    if (run_meta(run).get("policy_loss") or {}).get("entropy_sign") != 1:
        return ""
    return ("the policy-gradient loss adds the policy's entropy, + β·H(π), to a loss that is minimised: the steps "
            "lower the entropy, and the policy turns one-hot within a few dozen steps, its softmax saturated and "
            "log π(a) of what it samples near 0 — an entropy bonus is subtracted (google-deepmind/open_spiel#962)")


def raw_inputs_diverged(run: Run) -> str:
    """:func:`raw_inputs`' words where the run's first logged loss was finite: its non-finite values came later, a
    gradient grown from those inputs out of float32's range (round 45: a CNN on 0–255 pixels, Inf at step 7 on one
    seed of three, told "divergence" with a lower rate first); '' otherwise — a loss non-finite from the first step
    is the forward pass's or the loss's own (round 5: log(0) of a hand-written BCE, told with check_data)."""
    if "loss" not in run.quantities:
        return ""
    values = run.series("loss", "run").values[0]
    return raw_inputs(run) if len(values) and np.isfinite(values[0]) else ""


def activation_penalty(run: Run) -> str:
    """Words for a loss that penalises a ReLU's outputs themselves (an L1 sparsity term, read off the logged loss's
    graph: :func:`gradwatch.probes.loss_ops.penalty_on_relu`); '' otherwise. Round 15: a sparse autoencoder at
    λ = 1 lost every latent (100 % silent, its encoder's gradient exactly 0) and was told of negative biases and
    the init, never of its own penalty; at λ = 0.01 its twin keeps them."""
    if not penalty_on_relu(run_meta(run).get("loss_paths")):
        return ""
    return ("the loss's penalty on the ReLU units' outputs (an L1 term on the activations: its gradient pushes every "
            "active unit towards 0, and a unit pushed below 0 for every input gets no gradient back): its coefficient "
            "is too large for the units to stay alive (Bricken et al. 2023)")


def warmup_seen(run: Run) -> bool:
    """A learning-rate scheduler had lowered the rate below its base when the watch started, or below the peak it
    climbs to (``OneCycleLR``'s ``max_lr``): a warm-up."""
    meta = run_meta(run)
    lr = meta.get("optimizer_lr")
    return isinstance(lr, (int, float)) and any(isinstance(top, (int, float)) and lr < top for top in
                                                 (meta.get("optimizer_initial_lr"), meta.get("optimizer_max_lr")))


def climbing_schedule(run: Run) -> str:
    """Words for a learning-rate schedule that climbs to a peak (OneCycleLR's ``max_lr``) ``CLIMB_ABOVE``× or more
    above the rate the watch started at ('' otherwise): a blow-up in such a run comes as the rate rises (round 10:
    max_lr 5.0 where 0.05 was meant, NaN at steps 18–20 of the climb; its depth ratio 1.07 at the start)."""
    meta = run_meta(run)
    lr, top = meta.get("optimizer_lr"), meta.get("optimizer_max_lr")
    if not isinstance(lr, (int, float)) or not isinstance(top, (int, float)) or not 0 < CLIMB_ABOVE * lr <= top:
        return ""
    return (f"the learning-rate schedule: the rate climbs ×{top / lr:.3g}, from {lr:g} when the watch started to a "
            f"peak of {top:g} (the scheduler's max_lr), and steps that large overshoot as it climbs")


def post_ln_without_warmup(run: Run) -> str:
    """Words for Post-LN Transformer layers trained without a warm-up ('' when that is not the case)."""
    meta = run_meta(run)
    n = meta.get("post_ln_layers")
    if not isinstance(n, int) or n < 1 or warmup_seen(run):
        return ""
    if meta.get("batch_axis_misread") or meta.get("float_01_masks") or meta.get("inverted_padding_masks"):
        return ""  # the layers are fed what they cannot learn from (round 23: its twin, as Post-LN, learned to 1.00)
    return (f"the architecture: {n} Post-LN Transformer layer{'s' if n > 1 else ''} (norm_first=False) trained with no "
            f"learning-rate warm-up; at initialisation Post-LN's gradients near the output are large and those of the "
            f"early layers small, which without a warm-up stage stalls or derails training (Xiong et al. 2020, §3)")


POST_LN_IMBALANCE = 0.1  # Post-LN's stall shows as the first layer's gradient under this share of the last layer's


def post_ln_stall(run: Run) -> str:
    """:func:`post_ln_without_warmup`'s words for a stalled run only where the gradient shows Post-LN's imbalance: the
    first layer's ‖∂L/∂a‖ under :data:`POST_LN_IMBALANCE` of the last layer's (window medians, the depth rule's
    profile); '' otherwise. Xiong et al.'s mechanism is that imbalance, and where the gradients are balanced something
    else stalls the run. Measured: the 4-layer Post-LN ViT at Adam 1e-2 (fifteenth session) ran at 1.5·10⁻³–3·10⁻²;
    round 32's causal Transformer classified from position 0 (which attends to itself only: rasbt/
    MachineLearning-QandAI-book#18) at 0.24–0.42, told "Post-LN without warm-up" where its twin, the same Post-LN
    layers without a warm-up read at the last position, learns to 1.00."""
    from gradwatch.diagnosis.depth import profile

    words = post_ln_without_warmup(run)
    prof = profile(run, Thresholds()) if words else None
    if prof is not None and prof.median[-1] > 0 and math.isfinite(prof.median[0] / prof.median[-1]) and (
            prof.median[0] / prof.median[-1] >= POST_LN_IMBALANCE):
        return ""
    return words


ATTENTION_TYPES = frozenset({"TransformerEncoderLayer", "TransformerDecoderLayer", "MultiheadAttention"})
ORDERED_TYPES = frozenset({"RNN", "LSTM", "GRU", "RNNCell", "LSTMCell", "GRUCell", "Conv1d", "Conv2d"})


def no_positions(run: Run) -> str:
    """Words for a Transformer over embedded tokens with nothing that carries their positions ('' otherwise): torch's
    attention layers over an ``nn.Embedding``, no recurrence or convolution, and no parameter, buffer or module whose
    name speaks of positions (meta ``position_names``: pos, rotary, rope, alibi). Attention without positions is
    blind to the tokens' order (Vaswani et al. 2017, §3.5). Round 19: a 2-layer encoder on "first token > last
    token", 0.51 at chance, told "Post-LN without warm-up" — its twin, the same Post-LN layers with a learned
    positional embedding, learns (0.97–0.99)."""
    meta, types = run_meta(run), module_types(run)
    if (meta.get("position_names", ["?"]) or not types & ATTENTION_TYPES or "Embedding" not in types
            or types & ORDERED_TYPES):
        return ""
    return ("no positional encoding: attention over embedded tokens with no parameter, buffer or module for their "
            "positions sees each sequence as a set, blind to the tokens' order — a task that needs the order cannot "
            "be learned (Vaswani et al. 2017, §3.5)")


# A class name any user may give a block of their own: residual only where the watch did not read the graph for
# skips (round 16: 50 plain blocks relu(BN(Linear(h))) of a class "Block" were taken for timm's residual ones)
GENERIC_RESIDUAL_NAMES = frozenset({"Block"})


def has_residual(run: Run) -> bool:
    """Skip connections, by what the modules compute (the watch's ``residual_blocks``), by a residual sum written in
    ``forward`` (``residual_calls``) or by the modules' class names (a generic one, :data:`GENERIC_RESIDUAL_NAMES`,
    only where ``residual_blocks`` was not measured)."""
    meta = run_meta(run)
    names = RESIDUAL_TYPES - GENERIC_RESIDUAL_NAMES if "residual_blocks" in meta else RESIDUAL_TYPES
    return (bool(meta.get("residual_blocks")) or bool(meta.get("residual_calls"))
            or bool(module_types(run) & names))


# The causes in the set-up that fit_architecture puts before a finding's own, with the remedies they bring first and
# the kinds of finding they explain, in the order they are said (the last said goes first in the cause).
SET_UP_CAUSES: tuple[tuple[Callable[[Run], str], tuple[str, ...], tuple[str, ...]], ...] = (
    (climbing_schedule, ("lower_lr",), _BLOWUP_KINDS),
    (post_ln_without_warmup, ("warmup", "pre_ln"), _BLOWUP_KINDS + ("vanishing",)),
    (post_ln_stall, ("warmup", "pre_ln"), ("stalled",)),
    (no_positions, ("positions",), ("stalled",)),
    (lr_without_warmup, ("warmup", "lower_lr"), _DEPTH_KINDS),
    (heavy_weight_decay, ("lower_wd",), _SHRUNK_KINDS),
    (heavy_momentum, ("lower_momentum",), _ANY_KIND),
    (rprop_on_minibatches, ("adam",), _ANY_KIND),
    (ascending, ("minimize",), _ANY_KIND),
    (padding_read_words, ("padding_idx",), _ANY_KIND),
    (swapped_betas, ("adam_betas",), _ANY_KIND),
    (heavy_dropout, ("lower_dropout",), _ANY_KIND),
    (zero_init, ("he_init",), _ANY_KIND),
    (pruned_layers, ("prune_per_layer",), _ANY_KIND),
    (zero_norm_scales, ("norm_scale_one",), _ANY_KIND),
    (negative_constant_biases, ("zero_bias",), _SHRUNK_KINDS),
    (unmoved_zero_layer, ("redraw_zero",), _ANY_KIND),
    (hand_written_steps, ("torch_optimizer",), _SHRUNK_KINDS),
    (penalty_without_graph, ("create_graph",), _BLOWUP_KINDS),
    (raw_inputs, ("standardise_inputs",), _INPUT_KINDS),
    (raw_inputs_diverged, ("standardise_inputs",), ("nonfinite",)),
    (relative_error_loss, ("scale_free_error",), _BLOWUP_KINDS + ("stalled",)),
    (raw_ratio_loss, ("squash_before_ratio",), _ANY_KIND),
    (tied_embedding_scale, ("tied_init",), _ANY_KIND),
    (weighted_smoothing, ("smoothing_weights",), _ANY_KIND),
    (collapsing_posterior, ("sum_reconstruction",), _ANY_KIND),
    (undetached_advantage, ("detach_advantage",), _ANY_KIND),
    (entropy_minimised, ("entropy_bonus_sign",), _ANY_KIND),
    (batch_norm_on_tiny_batches, ("group_norm",), _ANY_KIND),
    (clipped_weights, ("gradient_penalty",), _ANY_KIND),
    (grads_not_zeroed, ("zero_grad",), _ANY_KIND),
    (clipped_after_step, ("clip_before_step",), _ANY_KIND),
    (trained_in_eval_mode, ("train_mode",), _ANY_KIND),
    (activation_penalty, ("smaller_l1",), _SHRUNK_KINDS),
    (batch_axis_misread, ("batch_first",), _ANY_KIND),
    (float_masks, ("bool_mask",), _ANY_KIND),
    (inverted_padding_masks, ("invert_padding_mask",), _ANY_KIND),
    (single_element_norm, ("drop_single_norm",), _ANY_KIND),
    (scaler_bypassed, ("scaler_step",), _ANY_KIND),
    (unnormalised_similarities, ("normalise_embeddings",), _ANY_KIND),
    (loss_unbounded_below, ("bounded_objective",), _BLOWUP_KINDS),
    (log_of_nonpositive, ("positive_log_input",), _ANY_KIND),
    (bce_targets_outside, ("probability_targets", "bounded_objective"), _ANY_KIND),
    (unbounded_loss_weights, ("positive_loss_weights",), _ANY_KIND),
    (derivative_through_relu, ("smooth_activation",), _SHRUNK_KINDS),
    (amplifying_backward, ("tame_custom_backward",), _BLOWUP_KINDS),
    (ignored_grad_output, ("chain_grad_output",), _ANY_KIND),
    (rewriting_hooks, ("remove_backward_hooks",), _ANY_KIND),
    (piled_hooks, ("hook_once",), _ANY_KIND),
    (identity_activations, ("leaky_slope",), ("stalled",)),
)


# the set-up causes that act through the size of the steps (a rate, its warm-up): none of them makes a NaN that one
# batch's forward pass makes at an ordinary loss (round 35: a masked mean over an empty mask, told "Post-LN without
# warm-up")
_STEP_CAUSES = frozenset({climbing_schedule, post_ln_without_warmup, lr_without_warmup})


def set_up_causes(run: Run) -> list[str]:
    """The words of every cause in the set-up (:data:`SET_UP_CAUSES`) that explains a stalled run, in their order;
    [] for none."""
    return [w for cause, _, kinds in SET_UP_CAUSES if "stalled" in kinds and (w := cause(run))]


def stale_grad_findings(found: list[Finding], run: Run, th: Thresholds) -> list[Finding]:
    """A loop that never zeroes ``.grad`` (:func:`grads_not_zeroed`), where no rule found a problem to give that cause
    to: one ``exploding`` warning of its own. Each step then applies the sum of every gradient so far, a step that
    grows with the run whatever the gradients look like (round 9: an MLP on digits at SGD 0.01 without
    ``zero_grad()``, its accumulated gradient ×400 in 300 steps, the loss never halving, and "the gradients look
    healthy"; zeroed at lr 0.1 it reaches 0.97)."""
    if any(f.severity != "info" for f in found) or not grads_not_zeroed(run):
        return []
    stale, checks = run_meta(run).get("grads_not_zeroed") or (0, 0)
    evidence = (f"at {stale} of {checks} checked steps the first backward after an optimizer step found a parameter's "
                f".grad still holding the last step's gradient")
    cause, numbers, sources = "", {"stale_steps": float(stale), "checked_steps": float(checks)}, ["meta grads_not_zeroed"]
    got = total_grad_norm(run)
    steps = got[0] if got is not None else np.array([0, run_meta(run).get("steps") or 0])
    if got is not None and len(got[1]) >= 2 * th.window:
        early, late = float(np.nanmedian(got[1][:th.window])), float(np.nanmedian(got[1][-th.window:]))
        evidence += (f"; the total gradient norm, what each step applies, went {sci(early)} → {sci(late)} (medians of "
                     f"its first and last {th.window} reads)")
        cause = f"the gradient each step applies grew ×{sci(late / early)} over the run" if early > 0 else ""
        numbers.update(grad_norm_first=early, grad_norm_last=late)
        sources.append("grad_norm (every layer), total = √Σ layer²")
    return [Finding(
        kind="exploding", severity="warning", layers=(), steps=(int(steps[0]), int(steps[-1])),
        summary=("the gradients are never zeroed: each step applies the sum of every gradient so far" if stale >= checks
                 else "the gradients are zeroed only now and then: a step applies every gradient since the last "
                      "zeroing"),
        evidence=evidence + ".", cause=cause or "the sum of every gradient so far, applied at every step",
        remedies=(), numbers=numbers, sources=tuple(sources),
    )]


def first_loss(run: Run) -> float | None:
    """The first finite logged loss, None without one."""
    if "loss" not in run.quantities:
        return None
    values = run.series("loss", "run").values[0]
    seen = values[np.isfinite(values)]
    return float(seen[0]) if len(seen) else None


def unexplained_flat_findings(found: list[Finding], run: Run, th: Thresholds) -> list[Finding]:
    """A loss that stays flat while no rule finds a problem in the gradients, in a set-up with a known cause: one
    ``stalled`` warning, for :func:`fit_architecture` to give that cause and its remedies (else nothing here: a
    flat loss alone is also a converged run resumed; :func:`outside_gradients_note` says so last).

    Measured (fifteenth session): a 4-layer Post-LN ViT on digits at Adam 1e-2 without warm-up, on one thread of
    an AMD EPYC, seed 0: loss 2.35 → 2.20 in 120 steps, the embedding's gradient 1.5·10⁻³–3·10⁻² of the head's
    (above the vanishing cut), no finding at all, "the gradients look healthy"; seeds 1 and 2 vanish below the cut
    and were found. At Adam 1e-3 every seed learns (2.3 → 1.1–1.3).
    """
    if any(f.severity != "info" for f in found):
        return []
    flat, first = flat_loss(run, th), first_loss(run)
    ends = loss_ends(run, th)
    if flat is None and first is not None and ends is not None and first > 0 and ends[1] > FLAT_LOSS_ABOVE * first:
        # round 42: Adam at lr 1.0 (OpenNMT-py#253), the loss 2.3 → 10–21 in its first steps and back to 2.1–3.3: the
        # median of its first values, 9.8, made a loss that never fell below its first value look like one that fell
        flat, after = ends, (f"; its first value was {sci(first)}: the loss rose at once, and ended above "
                             f"{FLAT_LOSS_ABOVE:g} × it{_flat_after(run)}")
        summary = _FLAT_SUMMARY.format(sci(first), sci(ends[1]))
    elif flat is not None:
        after, summary = _flat_after(run), _FLAT_SUMMARY.format(sci(flat[0]), sci(flat[1]))
    if flat is None or not set_up_causes(run):
        return []
    return [flat_loss_finding(run, th, flat, "warning", summary, after, "a flat loss that the gradients do not explain",
                              ())]


def set_up_warning(run: Run, kind: str, layers: tuple[str, ...], summary: str, evidence: str, cause: str,
                   key: str, *sources: str, numbers: dict[str, float] | None = None) -> Finding:
    """A warning of its own for a cause read off the set-up (meta entries, ``sources``) where no rule found a problem
    to give it to: over the whole run, ``key``'s remedy (:func:`fit_architecture` puts a set-up cause's words
    first)."""
    steps = int(run_meta(run).get("steps") or 0)
    return Finding(kind=kind, severity="warning", layers=layers, steps=(0, max(steps - 1, 0)), summary=summary,
                   evidence=evidence, cause=cause, remedies=remedies(key), numbers=dict(numbers or {}),
                   sources=sources)


def bce_target_findings(found: list[Finding], run: Run, th: Thresholds) -> list[Finding]:
    """A binary cross-entropy on targets outside [0, 1] (:func:`bce_targets_outside`) where no rule found a problem to
    give that cause to (the logits have not run off yet: a lower learning rate only postpones it): one ``exploding``
    finding of its own, ``probability_targets`` first — critical once the logged loss went below 0, which a
    cross-entropy of probabilities never does, else a warning."""
    if any(f.severity != "info" for f in found) or not bce_targets_outside(run):
        return []
    targets, outside = _bce_targets(run)
    told, _, below = went_below_zero(run)
    if below is not None:
        told += f", below 0 from step {below}: a cross-entropy of probabilities never is"
    finding = set_up_warning(
        run, "exploding", (), f"a binary cross-entropy on targets outside [0, 1] ({outside:.0%} of them): its loss "
        f"has no minimum", f"the targets read at the first step lie from {sci(float(targets.get('min', 0.0)))} to "
        f"{sci(float(targets.get('max', 0.0)))}{told}.", "the logits run off to lower a loss that has no floor",
        "probability_targets", "meta loss_targets", "loss (run)", numbers={"outside_range": outside})
    return [replace(finding, severity="critical" if below is not None else "warning")]


CONFIDENTLY_WRONG = 2.0  # a cross-entropy ending at this multiple of a uniform guess's ln C or more
BLOWN_UP_FROM = 5.0  # weights that start at this multiple of the default initialisation's std or more


def few_samples_findings(found: list[Finding], run: Run, th: Thresholds) -> list[Finding]:
    """Batches drawn from a handful of samples (:func:`few_samples`) where no rule found a problem: one ``stalled``
    warning of its own (the loss may fall: the model fits the few samples it sees). Not a cause given to other
    findings: a data set of a few distinct inputs repeats them too (the repair benchmark's SO 31880720, all-ones and
    all-zeros rows under a softmax over one unit, was told "sample weights" first)."""
    if any(f.severity != "info" for f in found) or not few_samples(run):
        return []
    told, _, _ = went_below_zero(run)
    seen = run_meta(run).get("batch_samples") or {}
    return [set_up_warning(run, "stalled", (), f"the batches repeat {float(seen.get('distinct') or 0):g} samples: "
                           f"the model sees almost none of the data", f"the distinct inputs of the first training "
                           f"batches (meta batch_samples){told}.", few_samples(run), "sample_weights",
                           "meta batch_samples", "loss (run)",
                           numbers={k: float(v) for k, v in seen.items() if isinstance(v, (int, float))})]


def raw_ratio_findings(found: list[Finding], run: Run, th: Thresholds) -> list[Finding]:
    """A loss that divides by a sum of the raw outputs (:func:`raw_ratio_loss`) where no rule found a problem and the
    logged loss went below 0 — a 1 − Dice or 1 − IoU never does on probabilities: one ``exploding`` warning of its
    own (round 48's seed 2: the spikes' damage read as recovered, IoU 0.00)."""
    if any(f.severity != "info" for f in found) or not raw_ratio_loss(run):
        return []
    told, _, below = went_below_zero(run)
    if below is None:
        return []
    return [set_up_warning(run, "exploding", (), f"the loss went below 0 at step {below}: a ratio of raw outputs "
                           f"without a floor", f"the loss's graph divides by a sum of the model's outputs with no "
                           f"sigmoid or softmax between (meta raw_ratio){told}.", raw_ratio_loss(run),
                           "squash_before_ratio", "meta raw_ratio", "loss (run)")]


def tied_embedding_findings(found: list[Finding], run: Run, th: Thresholds) -> list[Finding]:
    """An output layer tied to an embedding at N(0, 1) whose cross-entropy started far above a guess's
    (:func:`tied_embedding_scale`) where no rule found a problem: one ``exploding`` warning of its own."""
    words = tied_embedding_scale(run)
    if any(f.severity != "info" for f in found) or not words:
        return []
    t = next(t for t in run_meta(run).get("tied_embeddings") or () if float(t.get("std") or 0) >= TIED_STD_FROM)
    return [set_up_warning(run, "exploding", (str(t["layer"]),), f"the logits of {t['layer']} start far too large: "
                           f"its weight is the embedding {t['embedding']}'s, at std {t['std']:.2g}",
                           "the first logged loss against ln C (C the tied matrix's rows) and the tied matrix's std "
                           "at the start (meta tied_embeddings).", words, "tied_init", "meta tied_embeddings",
                           "loss (run)")]


def confidently_wrong_findings(found: list[Finding], run: Run, th: Thresholds) -> list[Finding]:
    """A cross-entropy (an NLL of a log-softmax, read off the loss's graph) whose logged loss ended at
    :data:`CONFIDENTLY_WRONG` × ln C or more — worse than answering every class alike, so the model is confident
    where it is wrong — where no rule found a problem: one ``exploding`` warning, its cause the weights' scale at the
    start where they were :data:`BLOWN_UP_FROM` × the default initialisation's or more (meta ``init_scale``). Round
    47: a model left by a learning-rate range test that was not reset (davidtvs/pytorch-lr-finder#11), its weights
    at ×14–18 the default's, the loss 276 → 6–67 against ln 10 = 2.3, 0.69–0.77 held out against 0.96–0.97, told
    only "dead units" (info) before."""
    if any(f.severity != "info" for f in found) or "output_classes" not in run.quantities:
        return []
    ops = set(run_meta(run).get("loss_ops") or ())
    if not {"NllLossBackward0", "LogSoftmaxBackward0"} <= ops:
        return []
    classes = float(np.nanmedian(run.series("output_classes", "run").values[0]))
    ends = loss_ends(run, th)
    if not classes >= 2 or ends is None or not ends[1] >= CONFIDENTLY_WRONG * math.log(classes):
        return []
    scale = run_meta(run).get("init_scale")
    blown = isinstance(scale, (int, float)) and scale >= BLOWN_UP_FROM
    cause = (f"weights far from an initialisation: when the watch started the largest layer's weights were ×"
             f"{scale:.3g} the std of PyTorch's default initialisation, so the logits are huge and every mistake "
             f"costs more than a guess — a model trained before this run at a rate that blew its weights up (a "
             f"learning-rate range test whose model and optimizer were not reset: davidtvs/pytorch-lr-finder#11)"
             if blown else "logits grown so large that each wrong answer costs more than a guess")
    return [Finding(
        kind="exploding", severity="warning", layers=(), steps=(0, int(run.series("loss", "run").steps[-1])),
        summary=f"the cross-entropy ends at {sci(ends[1])}, above {CONFIDENTLY_WRONG:g} × a uniform guess's "
                f"ln {classes:g} = {math.log(classes):.3g}: confident wrong answers",
        evidence=(f"the logged loss went {sci(ends[0])} → {sci(ends[1])} (medians of its first {th.spike_after} and "
                  f"last {4 * th.window} values), a cross-entropy over {classes:g} classes (its graph: an NLL of a "
                  f"log-softmax), whose value for outputs that answer every class alike is ln {classes:g}"
                  + (f"; the weights at the start: ×{scale:.3g} the default initialisation's std (meta init_scale)."
                     if blown else ".")),
        cause=cause, remedies=remedies("reset_weights") if blown else remedies("lower_lr", "clip_norm"),
        numbers={"loss_first": ends[0], "loss_final": ends[1], "classes": classes,
                 **({"init_scale": float(scale)} if blown and scale is not None else {})},
        sources=("loss (run)", "meta loss_ops", "output_classes (run)", *(("meta init_scale",) if blown else ())),
    )]


def policy_loss_findings(found: list[Finding], run: Run, th: Thresholds) -> list[Finding]:
    """A policy-gradient loss whose advantage carries a gradient (:func:`undetached_advantage`) or that adds the
    policy's entropy (:func:`entropy_minimised`), or a VAE's loss whose KL outweighs its reconstruction
    (:func:`collapsing_posterior`), where no rule found a problem to give that cause to: one warning of its own, read
    off the loss's graph (the gradients look healthy: the loss itself points them the wrong way) — ``stalled`` for
    the advantage and the collapse, ``saturation`` for the entropy (the policy's softmax goes one-hot)."""
    if any(f.severity != "info" for f in found):
        return []
    told, _, _ = went_below_zero(run)
    if undetached_advantage(run):
        return [set_up_warning(run, "stalled", (), "a policy-gradient loss whose advantage is not detached: the "
                               "policy term trains the critic", f"the loss's graph: a log-probability of the chosen "
                               f"actions times a weight with a gradient of its own, from outside it{told}.",
                               "a policy term that moves the critic", "detach_advantage", "meta policy_loss",
                               "loss (run)")]
    if collapsing_posterior(run):
        return [set_up_warning(run, "stalled", (), "a VAE's loss whose KL outweighs its reconstruction: the posterior "
                               "collapses", f"the loss's graph: a reconstruction at reduction='mean' beside a "
                               f"Gaussian KL under a sum{told}.", "a decoder that learns to ignore its code",
                               "sum_reconstruction", "meta kl_outweighs_reconstruction", "loss (run)")]
    if entropy_minimised(run):
        return [set_up_warning(run, "saturation", (), "a policy-gradient loss that adds the policy's entropy: the "
                               "steps lower it", f"the loss's graph: a log-probability of the chosen actions times a "
                               f"weight, beside Σ p·log p of the policy taken with the sign of +H{told}.",
                               "an entropy minimised where a bonus was meant", "entropy_bonus_sign",
                               "meta policy_loss", "loss (run)")]
    return []


def attention_mask_findings(found: list[Finding], run: Run, th: Thresholds) -> list[Finding]:
    """Attention modules given a float mask of 0s and 1s (:func:`float_masks`), or a key-padding mask that reads
    as inverted (:func:`inverted_padding_masks`), where no rule found a problem to give that cause to (the loss
    falls, on what the mask should have hidden; or nothing read the flat loss): one ``stalled`` warning of its
    own, ``bool_mask`` or ``invert_padding_mask`` first."""
    if any(f.severity != "info" for f in found):
        return []
    meta = run_meta(run)
    if seen := meta.get("float_01_masks") or []:
        return [set_up_warning(
            run, "stalled", tuple(dict.fromkeys(str(x["module"]) for x in seen)),
            f"{len(seen)} attention mask{'s' if len(seen) > 1 else ''} of 0s and 1s given as floats mask nothing",
            "at the first training pass, " + "; ".join(f"{x['module']}'s {x['mask']} held only 0.0 and 1.0"
                                                      for x in seen) + ".",
            "a float mask is added to the attention scores", "bool_mask", "meta float_01_masks")]
    if seen := meta.get("inverted_padding_masks") or []:
        return [set_up_warning(
            run, "stalled", tuple(dict.fromkeys(str(x["module"]) for x in seen)),
            f"{len(seen)} key padding mask{'s hide' if len(seen) > 1 else ' hides'} the text and leave"
            f"{'' if len(seen) > 1 else 's'} the padding",
            "at the first training pass, " + "; ".join(f"{x['module']}'s key_padding_mask left attended only keys "
                                                      f"holding token {x['token']}, and hid keys holding others"
                                                      for x in seen) + ".",
            "the key padding mask is inverted", "invert_padding_mask", "meta inverted_padding_masks")]
    return []


BLOWN_UP_ABOVE = 10.0  # a positive loss logged this many times its first value or more has blown up


def loss_blew_up_by(run: Run, step: int) -> bool:
    """Whether the logged loss was non-finite, or above :data:`BLOWN_UP_ABOVE` × its first finite value (a positive
    one), at some step up to ``step``. Round 27: L-BFGS without a line search, its loss 2.3 → 10¹⁷ by step 8 and NaN
    from step 11 — its first layer's tanh units fully saturated at step 10 passed exactly 0, and that was told as an
    operation with zero derivative in the weights' path (the non-finite finding dated from step 11)."""
    if "loss" not in run.quantities:
        return False
    loss = run.series("loss", "run")
    upto = loss.values[0][loss.steps <= step]
    finite = upto[np.isfinite(upto)]
    if len(finite) < len(upto):
        return True
    return bool(len(finite)) and finite[0] > 0 and bool((finite > BLOWN_UP_ABOVE * finite[0]).any())


def zero_path_findings(found: list[Finding], run: Run, th: Thresholds) -> list[Finding]:
    """Weight matrices that got an exactly-0 gradient on nearly every entry at a training step early in the run
    (``meta["zero_grad_step"]``, the tenth), whole rows and columns alike (meta ``zero_grad_weights``,
    :data:`gradwatch.watching.handle.ZERO_GRAD_ABOVE`): an operation with zero derivative in the weights' own path. One ``vanishing`` finding, critical where the loss did not halve,
    ``straight_through`` first; layers a finding already gives that remedy (a step between the layers) are not told
    again. Round 25: 4-bit fake-quantised weights, ``torch.round(w / s) * s`` with no straight-through estimator — one
    entry of each matrix had a gradient (through s = max|w|/7), the loss went 2.3 → 2.27, 0.14–0.27 held out against
    0.95 with the estimator, and the watch found nothing at fault."""
    meta = run_meta(run)
    seen, read = meta.get("zero_grad_weights") or {}, meta.get("zero_grad_step")
    if not seen or not isinstance(read, int):
        return []
    if any(f.kind == "dead_units" or f.cause_key == "dead" for f in found):
        return []  # units that pass nothing leave their weights without a gradient too: that finding says why
    if any(f.kind in ("nonfinite", "exploding") and f.severity == "critical" and f.steps[0] <= read
           for f in found) or loss_blew_up_by(run, read):
        return []  # a run that blew up before the read: what is left of its gradients says nothing of the path
    # ... nor where no layer gets any gradient at all (a softmax over one unit): that finding says why
    # ... and where a finding names an operation between the layers (a step, a backward of the user's own) for them
    told = {layer for f in found if {"straight_through", "custom_backward"} & set(f.remedy_keys)
            or f.cause_key in ("blocked", "custom") or f.kind == "stalled" and f.severity == "critical"
            for layer in f.layers}
    layers = tuple(name for name in seen if name not in told)
    if not layers:
        return []
    ends = loss_ends(run, th)
    stuck = ends is not None and ends[0] > 0 and not halved(ends)
    parts = [f"layer {name}'s weight {seen[name][1]} of {seen[name][2]} entries ({1 - seen[name][0]:.2%})"
             for name in layers]
    went = "" if ends is None else f"; the logged loss went {loss_went(run, th, ends)}"
    steps = int(run_meta(run).get("steps") or 0)
    return [Finding(
        kind="vanishing", severity="critical" if stuck else "warning", layers=layers, steps=(0, max(steps - 1, 0)),
        summary=(f"the weights of {span(layers)} get a gradient on almost none of their entries: an operation with zero "
                 f"derivative in their path"),
        evidence=(f"at training step {read} the gradient was nonzero on {'; '.join(parts)} — whole rows and whole "
                  f"columns at 0, not a dead unit's row or an absent input's column{went}."),
        cause=("an operation with zero derivative between the weights and the loss — torch.round, floor, sign or a "
               "quantiser applied to the weights (fake quantisation without its straight-through estimator) — passes "
               "them no gradient; what reaches an entry at all goes around it (a scale computed from max|w|)"),
        remedies=remedies("straight_through"), numbers={"zero_share": min(seen[name][0] for name in layers)},
        sources=(f"meta zero_grad_weights (training step {read}'s weight gradients)",))]


def misread_batch_findings(found: list[Finding], run: Run, th: Thresholds) -> list[Finding]:
    """Layers that read the batch as the sequence (:func:`batch_axis_misread`) where no rule found a problem to give
    that cause to (a loss that falls all the same, on what each position tells alone): one ``stalled`` warning of its
    own, ``batch_first`` first."""
    seen = run_meta(run).get("batch_axis_misread") or []
    if not seen or any(f.severity != "info" for f in found):
        return []
    names = tuple(str(x["module"]) for x in seen)
    return [set_up_warning(
        run, "stalled", names,
        f"{len(names)} attention or recurrent layer{'s' if len(names) > 1 else ''} read the batch as the sequence",
        "at the first training pass, " + "; ".join(
            f"{x['module']} ({x['type']}, batch_first=False) got {'×'.join(map(str, x['input']))} while the model "
            f"output {x['batch']} samples" for x in seen) + ".",
        "each sample's output mixes the others in its batch", "batch_first", "meta batch_axis_misread")]


_FLAT_SUMMARY = "the loss does not fall ({} → {}), and no rule finds the gradients at fault"
_FLAT_AFTER = (" while the gradients passed every check: none vanishes or explodes across depth{}, no layer "
               "stalls, no unit saturates or dies.")


def _flat_after(run: Run) -> str:
    """:data:`_FLAT_AFTER`, "or time" in it only where ‖∂L/∂h_t‖ was recorded (round 30: said of a cell whose state
    the loop detached, no step but the last one read)."""
    return _FLAT_AFTER.format(" or time" if "temporal_grad_norm" in run.quantities else "")


COLD_LOGITS_BELOW = 0.05  # logits whose rms stays below this at every read: a softmax over them is ~uniform (at
# PyTorch's default initialisation a classifier's logits start at an rms of about 0.3–0.5: round 37's twins 0.34–0.46)


def cold_logits_findings(found: list[Finding], run: Run, th: Thresholds) -> list[Finding]:
    """A flat cross-entropy (meta ``loss_ops``: a log-softmax) whose logits stayed near 0 at every read (``out_rms``
    below :data:`COLD_LOGITS_BELOW`), where nothing else was found: the softmax is uniform, the loss sits at ln C, and
    every gradient before the logits is as small as they are — a constant that shrinks them. Round 37: a temperature
    multiplied where it should divide (bowang-lab/BLEEP#5), logits × 0.01, rms 0.005–0.007 for 200 steps, the loss
    2.303 → 2.301 on three seeds, told only "look outside the gradients" (the twin's logits reach an rms of 28)."""
    flat = flat_loss(run, th)
    ops = set(run_meta(run).get("loss_ops") or ())
    if (flat is None or any(f.severity != "info" for f in found) or "LogSoftmaxBackward0" not in ops
            or "out_rms" not in run.quantities):
        return []
    rms = run.series("out_rms", "run").values[0]
    rms = rms[np.isfinite(rms)]
    if len(rms) < th.window or not float(rms.max()) < COLD_LOGITS_BELOW:
        return []
    scaled = (", and the loss's graph scales the output by a constant before its softmax"
              if ops & {"MulBackward0", "DivBackward0"} else "")
    cause = (f"logits that stay near 0: their rms is at most {sci(float(rms.max()))} at every read (a classifier "
             f"at PyTorch's default initialisation starts near 0.3), so the softmax over them is uniform, the loss "
             f"sits at ln C, and every gradient before them is as small — a constant that shrinks the logits (a "
             f"temperature that multiplies where it should divide, z · 0.01){scaled}")
    return [flat_loss_finding(run, th, flat, "critical", "the logits stay near 0: a uniform softmax",
                              f"; the logits' rms stayed below {COLD_LOGITS_BELOW} at all {len(rms)} reads.", cause,
                              remedies("logit_scale"), ("out_rms (run)", "meta loss_ops"))]


def outside_gradients_note(found: list[Finding], run: Run, th: Thresholds) -> list[Finding]:
    """A flat loss where, after every rule, nothing was found: an ``info`` note that the cause, if the run should
    learn, lies outside the gradients (a converged run resumed is flat too: no warning). Round 22: inputs no longer
    paired with their labels — a view where a transpose was meant, a padding mask inverted — at chance, and "the
    gradients look healthy"."""
    flat = flat_loss(run, th)
    if flat is None or any(f.severity != "info" for f in found):
        return []
    cause = ("a flat loss the gradients do not explain: if the run should learn, look outside the gradients — the "
             "inputs' pairing with their targets (a view or reshape where a transpose was meant, inputs and targets "
             "shuffled apart), a mask that keeps the wrong entries, targets that carry no signal")
    step = typical_update_ratio(run, th)[0]
    if 0 < step < EPS_TINY_STEP:
        # round 34: a cross-entropy divided by the batch size again, read by default as "look outside the gradients"
        # while every gradient was 1/64 of its twin's; under from_init the steps are the finding
        cause += (f"; or, where the run started from its initialisation, steps too short for this loss: the "
                  f"upper-quartile layer moves by {sci(step)} of its norm a step (about 1e-3 is typical) — a loss on a "
                  f"small scale (a sum divided by a large constant, a distillation loss without its T² factor); a "
                  f"converged run resumed takes steps as short, so diagnose(gw.Thresholds(from_init=True)) tells "
                  f"them apart only where you know it started from its initialisation")
    return [flat_loss_finding(
        run, th, flat, "info", _FLAT_SUMMARY.format(sci(flat[0]), sci(flat[1])), _flat_after(run), cause, ())]


GROWS_AT_START = 10.0  # the first read's ‖∂L/∂a‖ at the first layer this many times the last's: growth across depth


def growth_at_start(run: Run) -> tuple[float, float, int] | None:
    """(first layer's ‖∂L/∂a‖ over the last's, the geometric growth per layer, the layers) at the first read of
    ``out_grad_norm`` where both ends were measured; None where that ratio is below :data:`GROWS_AT_START`."""
    if "out_grad_norm" not in run.quantities:
        return None
    s = run.series("out_grad_norm")
    rows = [i for i in range(len(s.names)) if np.isfinite(s.values[i]).any()]
    if len(rows) < 3:
        return None
    values = s.values[rows]
    cols = np.where(np.isfinite(values[0]) & np.isfinite(values[-1]) & (values[-1] > 0))[0]
    if not len(cols):
        return None
    ratio = float(values[0, cols[0]] / values[-1, cols[0]])
    if not ratio >= GROWS_AT_START:
        return None
    return ratio, ratio ** (1 / (len(rows) - 1)), len(rows)


def _batch_norm_without_skips(run: Run, deep_plain: bool) -> str:
    """Words for a deep net with BatchNorm and no skip connection whose gradient grows across depth at the start:
    BatchNorm itself makes it grow at init (Yang et al. 2019, "A mean field theory of batch normalization": "vanilla
    batch-normalized networks without skip connections are not trainable at large depths"); "" otherwise. Round 16:
    50 blocks relu(BN(Linear)), ×1.2 a block at step 0, ×1.5·10⁴ across the net, told "re-initialise the weights",
    which cannot help; ReZero around each block learns to 0.98."""
    if not deep_plain or not any(t.startswith("BatchNorm") for t in module_types(run)):
        return ""
    got = growth_at_start(run)
    if got is None:
        return ""
    ratio, per_layer, n = got
    return (f"a deep batch-normalised net without skip connections: at the first read the gradient grows ×"
            f"{sci(per_layer)} per layer towards the input (×{sci(ratio)} across {n} layers), which BatchNorm itself "
            f"causes at initialisation in a net without skips (Yang et al. 2019); skip connections around the "
            f"blocks remove it")


# Remedies whose cause no optimiser can help: no gradient at all, a layer no optimizer holds, a rate scheduled to ~0
# or still warming up, gradients cleared or clipped to 0 before the step, layers a reentrant checkpoint cut off, a
# rounding between the output and the loss
_NOT_THE_OPTIMISER = frozenset({"adam", "output_activation", "check_graph", "rebuild_optimizer", "schedule_per_epoch",
                                "zero_grad_order", "checkpoint_inputs", "no_zero_clip", "finish_warmup",
                                "drop_rounding", "loss_floor"})


def fit_architecture(found: list[Finding], run: Run) -> list[Finding]:
    """Remedies that fit the architecture: nothing the model already has, no swap of activations it does not use,
    LeCun normal in place of He for a net whose only activation is SELU.

    A vanishing net of ``DEEP_LAYERS`` weighted layers or more without skip connections is told of residual
    connections, and one with BatchNorm whose gradient explodes across depth from the start, of ReZero and
    residual connections first (:func:`_batch_norm_without_skips`); with Post-LN Transformer layers and no
    warm-up, the depth findings name warm-up and Pre-LN first; with Adam at a high learning rate and no warm-up,
    the learning rate; layers that move too little under plain SGD (or Adagrad) are told of Adam, last (not where
    no optimiser can help: :data:`_NOT_THE_OPTIMISER`).
    """
    types = module_types(run)
    meta = run_meta(run)
    residual = has_residual(run)
    deep_plain = not residual and len(meta.get("layers") or ()) >= DEEP_LAYERS
    drop = set()
    if residual:
        drop.add("residual")
    if any("Norm" in t for t in types):
        drop.add("norm")
    unnormed_residual = residual and "norm" not in drop
    if warmup_seen(run):  # it warms up already (its rate was below the schedule's base or peak at the start)
        drop.add("warmup")
    relu_type = bool(types & RELU_TYPES) or bool(types & {"TransformerEncoderLayer", "TransformerDecoderLayer"})
    if not types & SATURATING_TYPES and (relu_type or run.entities("activation")):
        drop.add("relu")  # nothing tanh/sigmoid-like to swap
    causes = [(cause(run), first, kinds, cause in _STEP_CAUSES) for cause, first, kinds in SET_UP_CAUSES]
    # a SELU net's init is LeCun normal, not He's doubled variance (round 14's 32-layer SELU net: He diverged at once)
    selu_only = "SELU" in types and not types & ((RELU_TYPES | SATURATING_TYPES) - {"SELU"})
    bn_plain = _batch_norm_without_skips(run, deep_plain)
    sgd = meta.get("optimizer") in ("SGD", "Adagrad")  # steps that shrink with the gradient (and, Adagrad's, with time)
    out = []
    for f in found:
        fixes = tuple(t for t in f.remedies if key_of(t) not in drop)
        if selu_only and "he_init" in map(key_of, fixes):
            fixes = tuple(remedies("lecun_init")[0] if key_of(t) == "he_init" else t for t in fixes)
        cause = f.cause
        if deep_plain and f.kind == "vanishing" and f.layers and f.severity != "info" and "residual" not in map(key_of, fixes):
            fixes += remedies("residual")
        if unnormed_residual and f.kind == "exploding" and f.severity != "info" and "fixup" not in map(key_of, fixes):
            # a residual net without normalisation grows its output's variance with every block (Zhang et al. 2019,
            # §2): round 8's 16-block MLP, He in both branch layers, NaN at step 2; zero-initialised branch ends 0.94
            fixes += remedies("fixup")
        if bn_plain and f.kind == "exploding" and f.severity != "info" and f.steps[0] <= 1:
            fixes = remedies("rezero", "residual") + tuple(t for t in fixes if key_of(t) not in ("rezero", "residual"))
            cause = f"{bn_plain}; the measurement: {cause}"
        keys = set(map(key_of, fixes))  # no gradient at all (a loss that passes none): no optimiser can help
        if sgd and f.kind in _TOO_LITTLE_KINDS and f.severity != "info" and not keys & _NOT_THE_OPTIMISER:
            fixes += remedies("adam")
        # NaN at the second step, not made in the backward pass: raw inputs blow a forward up as they saturate or kill
        # units elsewhere (round 12: exp of a net's output on raw counts, NaN from step 1 on one seed, told only "the
        # forward pass or the loss"; the other seed's explosion named the inputs). At step 0 the finding's own
        # remedies already begin with the data and the inputs.
        early_blowup = f.kind == "nonfinite" and f.steps[0] == 1 and f.remedy_keys != ("backward_singularity",)
        said: list[str] = []
        for words, first, kinds, steps_cause in causes:  # the last said goes first
            if steps_cause and f.numbers.get("sudden"):
                continue  # a NaN one batch made in the forward pass, at an ordinary loss: no step size made it
            if words and f.severity != "info" and (f.kind in kinds or early_blowup and "standardise_inputs" in first):
                fixes = remedies(*first) + tuple(t for t in fixes if key_of(t) not in first)
                if words not in cause:  # a set-up's warning of its own is these words already (round 25: said twice)
                    said.insert(0, words)
        if said:
            cause = "; ".join(said) + f"; the measurement: {cause}"
        out.append(f if fixes == f.remedies and cause == f.cause else replace(f, remedies=fixes, cause=cause))
    return out
