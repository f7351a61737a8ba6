"""Units and layers that fail on their own: saturated units, dead units, layers whose weights stall, and a net
in which no gradient flows at all."""

from __future__ import annotations

import math

import numpy as np

from gradwatch.diagnosis.architecture import padding_read_words, run_meta
from gradwatch.diagnosis.depth import profile
from gradwatch.diagnosis.findings import Finding, layer_name, listed, modules_span, sci, span
from gradwatch.diagnosis.output_range import output_range_words
from gradwatch.diagnosis.measures import FLAT_LOSS_ABOVE, flat_loss_finding, halved, loss_ends, loss_went, window_median
from gradwatch.diagnosis.remedies import remedies
from gradwatch.diagnosis.thresholds import Thresholds
from gradwatch.diagnosis.view import since, steps_text
from gradwatch.probes.activations import peak_derivative
from gradwatch.probes.functional import ONE_HOT_ABOVE
from gradwatch.probes.loss_ops import floor_ops, quadratic_on_softmax, quadratic_on_squash, step_ops
from gradwatch.store import Run, Series


DEAD_BATCH_FROM = 8  # a batch smaller than this shows live units as dead: only a loss that did not halve tells


def activation_findings(run: Run, th: Thresholds) -> list[Finding]:
    """Saturation (``saturated_frac`` above ``saturated_above``) and dead units (``dead_frac`` above ``dead_above``)."""
    found = []
    outputs = output_activations(run)
    for quantity, kind, bound in (("saturated_frac", "saturation", th.saturated_above), ("dead_frac", "dead_units", th.dead_above)):
        if quantity not in run.quantities:
            continue
        s = run.series(quantity, "activation")
        med, wsteps = window_median(s, th.window)
        hit = [i for i in range(len(s.names)) if med[i] > bound and not (kind == "dead_units" and s.names[i] in outputs)]
        if not hit:
            continue
        names = tuple(s.names[i] for i in hit)
        flags = np.nan_to_num(s.values[hit], nan=0.0).mean(axis=0) > bound
        start = since(flags, s.steps, th.window)
        modules = sorted({e.module or "" for e in run.entities("activation") if e.name in names})
        frac = float(np.mean(med[hit]))
        rms = ""
        if "deriv_rms" in run.quantities:
            d = run.series("deriv_rms", "activation")
            dn = dict(zip(d.names, window_median(d, th.window)[0]))
            vals = [dn[n] for n in names if n in dn and math.isfinite(dn[n])]
            if vals:
                rms = f"; they pass on ×{sci(float(np.mean(vals)))} of the gradient on average (rms derivative)"
        unit = "call" if all(n.endswith("()") for n in names) else "module"  # functions called in forward
        where = f"{len(names)} {'/'.join(modules)} {unit}{'s' if len(names) > 1 else ''} ({span(names)})"
        over = steps_text(int(wsteps[0]), int(wsteps[-1]))
        if kind == "saturation":
            summary = f"{frac:.0%} of the units of {modules_span(names)} sit in the flat tails"
            evidence = (f"saturated fraction (φ' < 2 % of its peak) above {bound:g} in {where}, "
                        f"{frac:.0%} on average over {over}{rms}")
            cause = "pre-activations too large for the activation: weights initialised or grown too large"
            fixes = remedies("smaller_init", "norm", "relu", "lower_lr")
            squash = quadratic_on_squash(run_meta(run).get("loss_paths"))
            if squash and set(names) & outputs and not output_range_words(run)[0]:  # (targets outside: its own)
                # round 13's sigmoid autoencoder on a quadratic cost (Nielsen ch. 3): its twin, the same init with
                # cross-entropy on the logits, learns; the init alone was named, never the loss
                cause = (f"a quadratic cost on the output {squash}: its gradient is (a − y)·{squash}′(z), and "
                         f"{squash}′ vanishes wherever the output saturates, on the wrong side too, so those outputs "
                         f"learn slowest where they are most wrong (Nielsen, ch. 3); cross-entropy on the logits has "
                         f"no {squash}′ factor. Besides: " + cause)
                fixes = remedies("logits_loss") + fixes
        else:
            summary = f"{frac:.0%} of the units of {modules_span(names)} are dead"
            evidence = (f"units silent for whole batches above {bound:g} in {where}, {frac:.0%} on average "
                        f"over {over}{rms}")
            cause = "pre-activations at or below 0 for every input: negative biases, a large step that pushed them there, or a poor initialisation"
            fixes = remedies("leaky", "zero_bias", "he_init", "lower_lr", "norm")
        hurt, effect, numbers = _unit_effect(run, names, th)
        batch = run_meta(run).get("batch_size")
        if kind == "dead_units" and isinstance(batch, int) and 0 < batch < DEAD_BATCH_FROM:
            # round 29: GroupNorm over batches of 2 learned to 0.81 with "78 % dead … they cost the gradient"; over
            # the whole training set 52–66 % were 0 on every sample: a unit active on a third of the samples is
            # silent on a whole batch of 2 (2/3)² = 44 % of the time
            evidence += (f"; over batches of {batch} a unit that is active on a third of the samples is silent on a "
                         f"whole batch {(2 / 3) ** batch:.0%} of the time, so the share overstates the dead ones")
            hurt = hurt and not halved(loss_ends(run, th))
        found.append(Finding(
            kind=kind, severity="warning" if hurt else "info", layers=names, steps=(start, int(s.steps[-1])),
            summary=summary, evidence=evidence + "; " + effect + ".", cause=cause, remedies=fixes if hurt else (),
            numbers={quantity: frac, **numbers},
            sources=(f"{quantity} (activations {span(s.names)}, {over})",),
        ))
    return found


RELAXED_ONE_HOT = 0.9  # a Gumbel-softmax whose samples are one-hot this often over the run's first quarter
TEMPERATURE_LOW = 0.5  # ... at a τ below this: Jang et al. (2017, §4) anneal τ from 1 down to 0.5, no lower


def relaxation_findings(run: Run, th: Thresholds) -> list[Finding]:
    """A Gumbel-softmax whose relaxed samples are one-hot from the start (``onehot_frac`` of its call site,
    :meth:`gradwatch.probes.functional.FunctionalProbe.relaxed`): its gradient is mostly zero, at times large.

    At the start the logits have learned nothing, so a sample one-hot then is one the temperature made so (or
    logits far too large for it). Measured (round 15, Jang et al.'s categorical autoencoder on digits, 8 × 8 codes,
    Adam 1e-3, seeds 0–1): one-hot share over the first 120 steps 0.95–0.97 at τ = 0.01 (held-out FVE 0.35–0.37),
    0.64–0.70 at τ = 0.1 (0.46), 0.42–0.53 at 0.2, ≤ 0.29 at 0.5 and ≤ 0.07 at 1 (0.55); late in a healthy run a
    learned code's samples grow confident (0.2–0.6 at τ = 1–0.5), which is why the start is read.
    """
    if "onehot_frac" not in run.quantities:
        return []
    s = run.series("onehot_frac", "activation")
    taus: dict[str, float] = {}
    if "gumbel_tau" in run.quantities:
        t = run.series("gumbel_tau", "activation")
        taus = {n: float(np.nanmin(v)) for n, v in zip(t.names, t.values) if np.isfinite(v).any()}
    ends = loss_ends(run, th)
    found = []
    for name, values in zip(s.names, s.values):
        ok = np.isfinite(values)
        v, steps = values[ok], s.steps[ok]
        if not len(v):
            continue
        n = max(1, len(v) // 4)
        share = float(np.median(v[:n]))
        if share < RELAXED_ONE_HOT:
            continue
        tau = taus.get(name, math.nan)
        hurt = not halved(ends)
        effect = (f"the loss went {loss_went(run, th, ends)}" if ends is not None else "no logged loss")
        evidence = (f"{share:.0%} of its relaxed samples one-hot (largest probability above {ONE_HOT_ABOVE:g}) over "
                    f"{steps_text(int(steps[0]), int(steps[n - 1]))}, the run's first quarter, and "
                    f"{float(np.median(v)):.0%} over the run; τ = {tau:g}; {effect}")
        jacobian = (f"its Jacobian (1/τ)(diag y − y yᵀ) is about 0 on a one-hot row and up to 1/(4τ) = "
                    f"{sci(1 / (4 * tau))} on the others, so the gradient reaching the logits is mostly zero and at "
                    f"times large: an estimate of high variance (Jang, Gu & Poole 2017, §2 and Fig. 1)")
        if tau < TEMPERATURE_LOW:
            cause = (f"a Gumbel-softmax temperature too low (τ = {tau:g}): softmax((logits + g)/τ) is one-hot before "
                     f"the logits have learned anything; " + jacobian)
            fixes = remedies("gumbel_temperature")
        else:
            cause = (f"logits far too large for the temperature (τ = {tau:g}) from the start, as at a large "
                     f"initialisation of the layer that makes them; " + jacobian)
            fixes = remedies("smaller_init")
        found.append(Finding(
            kind="saturation", severity="warning" if hurt else "info", layers=(name,),
            steps=(int(steps[0]), int(steps[-1])),
            summary=f"{share:.0%} of the Gumbel-softmax samples at {name} are one-hot from the start (τ = {tau:g})",
            evidence=evidence + ".", cause=cause, remedies=fixes if hurt else (),
            numbers={"onehot_frac": share, "gumbel_tau": tau},
            sources=(f"onehot_frac, gumbel_tau (activation {name})",),
        ))
    return found


def output_activations(run: Run) -> set[str]:
    """The activation modules after the net's last layer (deeper than every layer entity): what the loss reads."""
    layers = [e.depth for e in run.entities("layer") if e.depth is not None]
    if not layers:
        return set()
    return {e.name for e in run.entities("activation") if e.depth is not None and e.depth > max(layers)}


def dead_output_findings(run: Run, th: Thresholds) -> list[Finding]:
    """Units of an output activation (a ReLU after the last layer) dead for whole batches at each of the last
    ``window`` reads: outputs that are 0 for every input, get no gradient and never come back.

    Under a cross-entropy loss each is a class the model can never predict; in a regression an output stuck at 0.
    One such unit is a fault (round 5's Keras-style ``Dense(10, activation='relu')`` before the softmax loss: two
    of ten classes dead, held-out accuracy 0.73 against 0.93 without the ReLU), so the bound is any unit, not the
    hidden layers' ``dead_above``; dead at every one of the last reads, not at their median, since an output unit
    the layers below revive within the run is not lost.
    """
    if "dead_frac" not in run.quantities:
        return []
    outputs = output_activations(run)
    if not outputs:
        return []
    s = run.series("dead_frac", "activation")
    found = []
    for i, name in enumerate(s.names):
        if name not in outputs:
            continue
        tail = s.values[i, -th.window:]
        if len(tail) < min(th.window, 2) or not (np.isfinite(tail).all() and (tail > 0).all()):
            continue
        flags = np.nan_to_num(s.values[i], nan=0.0) > 0
        start = since(flags, s.steps, th.window)
        frac = float(np.min(tail))
        module = next((e.module for e in run.entities("activation") if e.name == name), None) or "activation"
        over = steps_text(int(s.steps[-len(tail)]), int(s.steps[-1]))
        found.append(Finding(
            kind="dead_units", severity="warning", layers=(name,), steps=(start, int(s.steps[-1])),
            summary=f"{frac:.0%} or more of the outputs of {name} ({module}, after the last layer) are dead",
            evidence=(f"the output activation {name} ({module}) is exactly 0 for a whole batch in {frac:.0%} or more of "
                      f"its units at every read over {over}; a dead output unit gets no gradient, so it does not "
                      f"come back."),
            cause=(f"a {module} after the last layer: the loss reads outputs that it clips at 0, so an output unit "
                   f"pushed below 0 for every input is 0 for good — under a cross-entropy a class the model can never "
                   f"predict"),
            remedies=remedies("drop_output_relu"),
            numbers={"dead_frac": frac},
            sources=(f"dead_frac (activation {name}, {over})",),
        ))
    return found


def _unit_effect(run: Run, acts: tuple[str, ...], th: Thresholds) -> tuple[bool, str, dict[str, float]]:
    """Is the gradient through these activation modules hurt? (hurt, the measurement in words, its numbers).

    Saturated or dead units only matter when they cost the gradient: it decays
    across the stretch of layers they sit in (‖∂L/∂a‖ of the last layer below
    the stretch, not feeding one of them, over that of the first layer after
    it, below ``affected_below`` × what the units pass on at best — the product
    of their peak derivatives: 1/4 for each sigmoid, so a sigmoid net is not
    judged against a gain it can never have), or the loss does not fall. A
    residual net whose skip path carries the gradient past them is not hurt:
    units inside residual branches (the watch's ``residual_branch`` for
    blocks' modules, ``residual_calls`` for sums written in ``forward``) are
    judged along the layers outside the branches, against a gain of 1, the
    skip's. On a loss that fell to ``LEARNED_BELOW`` of its start, a cost is
    info when it is mild (``affected_below``² or more) or when the layers
    below them still move (update ratio ``MOVES_ABOVE`` × the upper
    quartile's or more).
    When no layer lies on both sides of them (a one-hidden-layer net, an output
    activation), the units' own rms derivative against their peak and the loss
    decide: they get past when they pass on at least ``PASSES_ABOVE`` of what
    they can and the loss fell to ``LEARNED_BELOW`` of its start or less. When
    nothing around them was measured, they are taken to hurt.
    """
    prof = profile(run, th)
    depth = {e.name: e.depth for e in run.entities()}
    modules = {e.name: e.module or "" for e in run.entities()}
    d = [x for x in (depth.get(a) for a in acts) if x is not None]
    if prof is None or prof.quantity != "out_grad_norm" or not d:
        return True, "the gradient around them was not measured", {}
    layer_depth = [depth.get(n) for n in prof.names]
    meta = run_meta(run)
    in_blocks = set(meta.get("residual_branch") or ())  # residual blocks' branches (modules), and sums in forward
    skip = set(acts) <= in_blocks | set(meta.get("residual_calls") or ())
    if skip:  # inside residual branches: the gradient past them is the skip path's, read at layers outside them
        branch = in_blocks | set(meta.get("residual_layers") or ())
        layer_depth = [None if n in branch else x for n, x in zip(prof.names, layer_depth)]
    # A layer that feeds one of them directly reads ‖∂L/∂a‖ behind the activation's own derivative: the gradient
    # that got past them is the one at the layers below those feeders.
    feeders = set() if skip else {max((i for i, x in enumerate(layer_depth) if x is not None and x < a), default=None)
                                  for a in d}
    before = [i for i, x in enumerate(layer_depth) if x is not None and x < min(d) and i not in feeders]
    after = [i for i, x in enumerate(layer_depth) if x is not None and x > max(d)]
    if not before or not after:
        return _passes(run, acts, th, output=not after)
    g_in, g_out = prof.median[before[-1]], prof.median[after[0]]
    if g_in == 0 and g_out > 0 and math.isfinite(g_out):
        return True, (f"no gradient gets past them: ‖∂L/∂a‖ is exactly 0 at layer {prof.names[before[-1]]}, below them, "
                      f"against {sci(float(g_out))} at layer {prof.names[after[0]]}"), {"across": 0.0}
    if not (g_in > 0 and g_out > 0 and math.isfinite(g_in) and math.isfinite(g_out)):
        return True, "the gradient across them is not finite", {}
    across = float(g_in / g_out)
    numbers = {"across": across}
    falls = True
    ends = loss_ends(run, th)
    if ends is not None:
        numbers.update(loss_first=ends[0], loss_final=ends[1])
        falls = ends[1] < FLAT_LOSS_ABOVE * ends[0]
    # what an unsaturated stretch passes on; past residual branches, what the skip passes on
    best = 1.0 if skip else math.prod(peak_derivative(modules.get(a, "")) for a in acts)
    numbers["best"] = best
    decays = across < th.affected_below * best
    words = (f"‖∂L/∂a‖ goes ×{sci(across)} from layer {prof.names[after[0]]} down to layer {prof.names[before[-1]]} "
             f"across them" + (" (they sit in residual branches: the skip path's gradient)" if skip else ""))
    learned = ends is not None and ends[1] <= LEARNED_BELOW * ends[0]
    if decays and learned and across >= th.affected_below ** 2:
        # a mild cost on a net that learned: round 7's healthy residual dilated stack (tanh written in forward, 33 %
        # saturated, ×0.31 across eight blocks, loss 2.37 → 0.16, held-out 0.95) is no fault to warn of
        return False, words + ", a mild cost on a loss that fell tenfold (info only)", numbers
    # a mild cost on a loss that halved is judged as one that fell tenfold, by the layers below: round 48's box
    # regressor under 1 − GIoU (58–64 % of a ReLU layer dead, ×0.33 across it, loss 1.88 → 0.33, IoU 0.70) — a
    # GIoU's floor is far from 0 — warned of on every seed
    halved = ends is not None and 0 < ends[1] <= HALVED_BELOW * ends[0] and across >= th.affected_below ** 2
    moves = _least_move(run, [prof.names[i] for i in before], th) if decays and (learned or halved) else None
    if moves is not None and moves >= MOVES_ABOVE:
        # the layers below still learn: round 8's breast-cancer MLP under Adam, 72 % of fc2's ReLUs dead, ×0.18
        # from the head down to fc1, whose update ratio stayed near the others' (loss 17 → 0.26, held-out 0.95)
        numbers["moves"] = moves
        fell = "tenfold" if learned else "to half or less"
        return False, words + (f", yet the layers below them still move (update ratio ×{sci(moves)} of the upper "
                               f"quartile's at least) on a loss that fell {fell} (info only)"), numbers
    if decays:
        return True, words + ": they cost the gradient", numbers
    if not falls:
        return True, words + f", and the loss does not fall ({sci(numbers['loss_first'])} → {sci(numbers['loss_final'])})", numbers
    return False, words + " and the loss falls: the gradient gets past them (info only)", numbers


def _least_move(run: Run, names: list[str], th: Thresholds) -> float | None:
    """The least update ratio (window median) among layers ``names``, over the upper-quartile layer's; None where
    the update ratios were not recorded for them."""
    if "update_ratio" not in run.quantities or not names:
        return None
    s = run.series("update_ratio")
    med = dict(zip(s.names, window_median(s, th.window)[0]))
    ok = [v for v in med.values() if math.isfinite(v)]
    got = [med.get(n, math.nan) for n in names]
    if len(ok) < 3 or not all(math.isfinite(v) for v in got):
        return None
    typical = float(np.percentile(ok, 75))
    return float(min(got)) / typical if typical > 0 else None


MOVES_ABOVE = 0.1  # layers below costly units that still move a tenth of the upper quartile's ratio, or more, learn
PASSES_ABOVE = 0.1  # units passing on a tenth of their peak derivative (rms) or more still carry a gradient
LEARNED_BELOW = 0.1  # ... and a loss that fell tenfold shows it got past them (halving is not enough: measured,
# a tanh net on raw pixels halves its loss at 62 % accuracy while its units pass on ×0.03 of their peak)
HALVED_BELOW = 0.5  # ... but a mild cost (×¼ or more across them) on a halved loss whose lower layers still move


def _passes(run: Run, acts: tuple[str, ...], th: Thresholds, output: bool = False) -> tuple[bool, str, dict[str, float]]:
    """No layer on both sides of the units: their rms derivative against their peak, and the loss, decide.

    ``output``: no layer after them — the net's output activation (a sigmoid under ``nn.BCELoss``). A net that
    learned to answer confidently saturates its output on its 0/1 targets: with the loss fallen tenfold that is
    the fit, not a fault, whatever the units pass on.
    """
    if "deriv_rms" not in run.quantities:
        return True, "no layer on both sides of them to measure the gradient across", {}
    d = run.series("deriv_rms", "activation")
    med = dict(zip(d.names, window_median(d, th.window)[0]))
    modules = {e.name: e.module or "" for e in run.entities()}
    rel = [med[a] / peak_derivative(modules.get(a, "")) for a in acts if math.isfinite(med.get(a, math.nan))]
    ends = loss_ends(run, th)
    if not rel or ends is None or not ends[0] > 0:
        return True, "no layer on both sides of them to measure the gradient across", {}
    passes, (first, final) = float(min(rel)), ends
    numbers = {"passes": passes, "loss_first": first, "loss_final": final}
    words = (f"no layer on both sides of them; the least of them passes on ×{sci(passes)} of its peak derivative (rms), "
             f"and the loss went {loss_went(run, th, ends)}")
    if passes >= PASSES_ABOVE and final <= LEARNED_BELOW * first:
        return False, words + ": the gradient gets past them (info only)", numbers
    if output and final <= OUTPUT_LEARNED_BELOW * first:
        return False, words + (f": the output answers confidently on a loss that fell to "
                               f"{final / first:.2g} of its start (info only)"), numbers
    return True, words, numbers


# an output activation's saturation is the fit where the loss fell to this share of its start: a binary classifier
# starts near ln 2 and answers confidently long before a tenth of it (round 45: a sigmoid head on breast cancer,
# 0.49 → 0.054 and 0.96 held out, 28–36 % of its outputs in the tails, told as a warning)
OUTPUT_LEARNED_BELOW = 0.25


SKIPPED_SHARE = 0.25  # a layer without gradient on at least this share of the late steps, and with one on as many


def _skipped_at_random(g: Series | None, layer: str) -> bool:
    """Whether ``layer`` gets a gradient on some of the run's later steps and none (exactly 0, or no ``.grad``)
    on others, each on at least :data:`SKIPPED_SHARE` of them: a block that stochastic depth or layer drop leaves
    out. SGD leaves it exactly in place on those steps, so the few sampled update ratios can have a median of 0
    while it moves 40 % of its norm over the run; it is not stalled. Judged on the gradient norms (read on far more
    steps than the update ratios, ``g``: the run's ``grad_norm`` series); a layer that died keeps no gradient at
    all late in the run."""
    if g is None or layer not in g.names:
        return False
    late = g.values[g.names.index(layer), g.steps >= g.steps[-1] / 2]
    if len(late) < 8:
        return False
    trained = np.mean(late > 0)
    return bool(trained >= SKIPPED_SHARE and 1 - trained >= SKIPPED_SHARE)


def unoptimised_findings(run: Run, th: Thresholds) -> list[Finding]:
    """Layers whose trainable parameters no optimizer group holds (meta ``not_in_optimizer``) and whose update ratio
    is exactly 0 at every read: they get gradients and never move. Round 17: a classifier head replaced after the
    optimizer was built (PyTorch's fixed-feature-extractor tutorial builds it after), which the watch refused with
    "pass the optimizer that trains this model", and an appended head, "No findings". A layer that moves all the
    same — compared at the end with the start (meta ``not_in_optimizer_moved``) — is trained by another optimizer (a
    GAN's second one): no finding."""
    meta = run_meta(run)
    moved = set(meta.get("not_in_optimizer_moved") or ())  # trained by another optimizer
    missing = [m for m in meta.get("not_in_optimizer") or [] if m not in moved]
    if not missing or "update_ratio" not in run.quantities:
        return []
    s = run.series("update_ratio")
    layers = []
    for name, row in zip(s.names, s.values):
        prefix = f"{name}." if name else ""
        own = [m for m in missing if m.startswith(prefix) and "." not in m[len(prefix):]]
        seen = row[np.isfinite(row)]
        if own and len(seen) and not seen.any():
            layers.append(name)
    if not layers:
        return []
    tensors = [m for m in missing if any(m.startswith(f"{n}." if n else "") for n in layers)]
    grown = ""
    if "grad_norm" in run.quantities:  # optimizer.zero_grad() clears only what it holds: their .grad piles up
        g = run.series("grad_norm")
        rows = [g.values[i] for i, n in enumerate(g.names) if n in layers]
        first = [r[np.isfinite(r)] for r in rows]
        if first and all(len(r) >= 2 for r in first):
            a, b = float(np.mean([r[0] for r in first])), float(np.mean([r[-1] for r in first]))
            if b > 2 * a > 0:
                grown = (f"; their gradient norm grew {sci(a)} → {sci(b)}, as a .grad that optimizer.zero_grad() "
                         f"never clears piles up")
    return [Finding(
        kind="stalled", severity="warning", layers=tuple(layers), steps=(int(s.steps[0]), int(s.steps[-1])),
        summary=(f"layer {layer_name(layers[0])} never moves: no optimizer holds its parameters" if len(layers) == 1
                 else f"layers {span(layers)} never move: no optimizer holds their parameters"),
        evidence=(f"the optimizer holds none of {', '.join(tensors[:6])}{', …' if len(tensors) > 6 else ''}; the "
                  f"update ratio of {span(layers)} is exactly 0 at every read "
                  f"({steps_text(int(s.steps[0]), int(s.steps[-1]))}){grown}."),
        cause=("parameters never given to the optimizer: a layer added or replaced after the optimizer was built, or "
               "an optimizer built on a copy of the model (torch.optim holds the tensors, not the module)"),
        remedies=remedies("rebuild_optimizer"),
        numbers={"layers": float(len(layers)), "tensors": float(len(tensors))},
        sources=("meta not_in_optimizer", "update_ratio (layers)"),
    )]


def _loss_course(run: Run, th: Thresholds) -> tuple[bool, np.ndarray, str]:
    """Whether the logged loss halved (:func:`loss_ends`), its steps, and "; the logged loss went A → B" ('' where
    too few values show its ends) — for a finding of the run as a whole."""
    ends = loss_ends(run, th)
    went = "" if ends is None else f"; the logged loss went {loss_went(run, th, ends)}"
    return ends is not None and halved(ends), run.series("loss", "run").steps, went


def made_in_forward_findings(run: Run, th: Thresholds) -> list[Finding]:
    """Parameters of the loss's graph that neither the model nor the optimizer held, and that were freed since the
    step that made them (meta ``made_in_forward``, :func:`gradwatch.probes.graph_scan.made_in_forward`): a layer
    built inside ``forward``, drawn at random again on every call and never trained. Critical where the loss did not
    halve, a warning where the rest of the net learns around it. Round 36 (thecodeforge.io's "forward() layer bug":
    ``fc = nn.Linear(64, 128)`` inside forward on digits): the loss at ln 10 for 200 steps on three seeds, held out
    0.06–0.10 against 0.95–0.96, told only "look outside the gradients"."""
    shapes = run_meta(run).get("made_in_forward") or []
    if not shapes or "loss" not in run.quantities:
        return []
    learns, steps, went = _loss_course(run, th)
    listed_shapes = ", ".join("×".join(str(d) for d in shape) or "a scalar" for shape in shapes[:6])
    return [Finding(
        kind="stalled", severity="warning" if learns else "critical", layers=(), steps=(int(steps[0]), int(steps[-1])),
        summary=f"{len(shapes)} parameter tensor{'s' * (len(shapes) != 1)} made anew on every forward pass",
        evidence=(f"the first logged loss's graph reads {len(shapes)} parameter tensor{'s' * (len(shapes) != 1)} "
                  f"({listed_shapes}{', …' if len(shapes) > 6 else ''}) that neither the model nor the optimizer "
                  f"holds, and that were freed with that step's graph{went}."),
        cause=("a layer built inside forward() (nn.Linear(…) called where it is made): its weights are drawn at random "
               "again on every call, so the layers after it never see the same features twice, and "
               "model.parameters() never lists it, so no optimizer trains it"),
        remedies=remedies("layer_in_init"),
        numbers={"tensors": float(len(shapes))},
        sources=("meta made_in_forward", "loss (run)"))]


def symmetric_init_findings(found: list[Finding], run: Run, th: Thresholds) -> list[Finding]:
    """Two or more layers whose weights all start at one constant other than 0 (meta ``constant_weight_layers``):
    every unit of each computes the same output and, through the next layer's equal weights, gets the same gradient,
    so they stay copies of one another — a layer as wide as one unit. Where no finding says so already: critical
    where the loss did not halve, a warning otherwise. Round 37 (D2L §5.4.2, "Breaking the Symmetry": every weight
    0.05): the loss 2.30 → 1.81–1.93, held out 0.18–0.19 against 0.95–0.96, and "No findings"."""
    names = run_meta(run).get("constant_weight_layers") or []
    if len(names) < 2 or any(f.severity != "info" for f in found) or "loss" not in run.quantities:
        return []
    learns, steps, went = _loss_course(run, th)
    return [Finding(
        kind="stalled", severity="warning" if learns else "critical", layers=tuple(names),
        steps=(int(steps[0]), int(steps[-1])),
        summary=f"the units of {len(names)} layers start as copies of one another (every weight one constant)",
        evidence=f"every weight of {listed(names)} was one constant other than 0 when the watch started{went}.",
        cause=("the initialisation: weights set to one constant (nn.init.constant_) give every unit of a layer the "
               "same output and the same gradient, so they stay copies — the symmetry is never broken, and each "
               "layer works as one unit"),
        remedies=remedies("he_init"),
        numbers={"layers": float(len(names))},
        sources=("meta constant_weight_layers", "loss (run)"))]


WRITTEN_FROM = 3  # writes between optimizer steps counted from this many ...
WRITTEN_AT_MOST = 0.5  # ... at no more than this share of the checked steps (a constraint at every step is none)
SET_BACK_FROM = 0.9  # ... and this share of them or more set the weights back towards their start


def written_weights_findings(found: list[Finding], run: Run, th: Thresholds) -> list[Finding]:
    """Weights written between optimizer steps by something other than the optimizer, now and then, and each time nearer
    their start than the step left them (meta ``weights_written``: :class:`gradwatch.watching.zeroing.WrittenCheck`), in
    a run whose loss did not halve and where no finding says why: averaged weights loaded into the model and not put
    back. Round 38 (an EMA at 0.999 copied into a small Transformer for a validation pass every 10 steps and never
    restored; Open-Sora-Plan#186, waifu-diffusion#31): written and set back at 29 of 299 steps, the loss 2.3 → 1.9–2.0,
    held out 0.14–0.15 against 1.00, "the gradients look healthy". A weight constraint applied after every step (WGAN's
    clamp) writes at every step, and is left out."""
    got = run_meta(run).get("weights_written")
    if (not isinstance(got, (list, tuple)) or len(got) != 3 or any(f.severity != "info" for f in found)
            or "loss" not in run.quantities):
        return []
    written, back, checks = (int(v) for v in got)
    if not (WRITTEN_FROM <= written <= WRITTEN_AT_MOST * checks and back >= SET_BACK_FROM * written):
        return []
    learns, steps, went = _loss_course(run, th)
    if learns:
        return []
    return [Finding(
        kind="stalled", severity="critical", layers=(), steps=(int(steps[0]), int(steps[-1])),
        summary=f"the weights are set back between optimizer steps ({written} of {checks} steps)",
        evidence=(f"at {written} of {checks} checked steps a parameter's values changed between optimizer.step() and "
                  f"the next backward pass, and at {back} of them they were nearer their start than the step had "
                  f"left them{went}."),
        cause=("something other than the optimizer writes the weights between steps and sets them back: averaged "
               "weights (an EMA's or SWA's copy_to) loaded into the model for an evaluation and never restored, or a "
               "checkpoint reloaded, so training goes on from older weights each time"),
        remedies=remedies("restore_weights"),
        numbers={"written_steps": float(written), "set_back_steps": float(back), "checked_steps": float(checks)},
        sources=("meta weights_written", "loss (run)"))]


def stalled_findings(run: Run, th: Thresholds, vanishing: Finding | None = None) -> list[Finding]:
    """Layers whose update ratio ‖Δw‖/‖w‖ is below ``stalled_below`` × the upper-quartile layer's; ``vanishing``: the
    depth finding, whose cause and remedies these layers share when they lie in its stretch."""
    if "update_ratio" not in run.quantities:
        return []
    s = run.series("update_ratio")
    med, wsteps = window_median(s, th.window)
    ok = np.isfinite(med)
    if ok.sum() < 3:
        return []
    # the upper quartile, not the median: when most layers are the ones that stall (a body left at lr 1e-5 under a
    # head at 5e-2, two layers of three), the median layer is itself a stalled one
    typical = float(np.percentile(med[ok], 75))
    if not typical > 0:
        return []
    low = th.stalled_below * typical
    grads = run.series("grad_norm") if "grad_norm" in run.quantities else None  # read once, not per layer
    cut = set(cut_off_layers(run, grads))  # no gradient at all: cut_graph_findings says why
    hit = [i for i in range(len(s.names)) if ok[i] and med[i] < low and s.names[i] not in cut
           and not _skipped_at_random(grads, s.names[i])]
    if not hit:
        return []
    names = tuple(s.names[i] for i in hit)
    worst = float(np.min(med[hit]))
    flags = np.asarray((s.values[hit] < low).all(axis=0))
    start = since(flags, s.steps, th.window)
    # excused (info only): a norm right after each, so their scale does not matter; or layers in residual branches of
    # a net that learned
    excused = None
    if set(names) <= normed_layers(run):
        excused = ("but a norm follows each",
                   "a normalisation layer takes each one's output next, so the output does not depend on the scale of "
                   "its weights, and its gradient is orthogonal to them: a small ratio there is no loss of learning.", "")
    elif _converged(run, th):
        ends = loss_ends(run, th)
        assert ends is not None
        excused = (f"on a loss that has converged ({sci(ends[0])} → {sci(ends[1])})",
                   f"the loss fell to {sci(ends[1] / ends[0])} of its start with one learning rate for every layer: "
                   "the task is learned, what is left of the gradient is the residual error's, and the layers "
                   "furthest from the loss get least of it; no loss of learning.", "; loss (run)")
    elif _branch_layers_of_a_net_that_learned(run, names, th):
        excused = ("inside residual branches of a net that learned",
                   "they sit in residual branches, which the skip carries the signal past (a branch whose last layer "
                   "starts at zero, Fixup's, gives its first layer little gradient), every layer has the same learning "
                   "rate, and the loss fell tenfold: no loss of learning.", "; loss (run)")
    if excused is not None and vanishing is not None and vanishing.severity == "critical" and set(names) <= set(
            vanishing.layers):
        return []  # a critical vanishing finding tells these layers already: "no loss of learning" would contradict it
    if excused is not None:
        summary, why, more = excused
        return [Finding(
            kind="stalled", severity="info", layers=names, steps=(start, int(s.steps[-1])),
            summary=f"layers {span(names)} barely move, {summary}",
            evidence=(f"‖Δw‖/‖w‖ per optimizer step below {th.stalled_below:g}× the upper-quartile layer's "
                      f"({sci(typical)}), as low as {sci(worst)}; {why}"),
            cause="", remedies=(), numbers={"update_ratio": worst, "median": typical},
            sources=(f"update_ratio (layers {span(s.names)}, {steps_text(int(wsteps[0]), int(wsteps[-1]))}){more}",),
        )]
    if vanishing is not None and set(names) <= set(vanishing.layers):
        cause = f"the vanishing gradient: these layers get {vanishing.numbers['ratio']:.1e} of the last layer's gradient or less"
        fixes = vanishing.remedies
    else:
        cause = "these layers get too little gradient, or too small a learning rate, for their weights"
        fixes = remedies("param_groups", "orthogonal_init", "norm")
    return [Finding(
        kind="stalled", severity="warning", layers=names, steps=(start, int(s.steps[-1])),
        summary=f"layers {span(names)} barely move: update ratio {sci(worst)} against an upper quartile of {sci(typical)}",
        evidence=(f"‖Δw‖/‖w‖ per optimizer step below {th.stalled_below:g}× the upper-quartile layer's ({sci(typical)}) in "
                  f"{len(names)} layer{'s' if len(names) > 1 else ''} ({span(names, len(s.names))}), as low as {sci(worst)}."),
        cause=cause, remedies=fixes,
        numbers={"update_ratio": worst, "median": typical},
        sources=(f"update_ratio (layers {span(s.names)}, {steps_text(int(wsteps[0]), int(wsteps[-1]))})",),
    )]


CONVERGED_BELOW = 1e-3  # a loss at this fraction of its start, or below, has converged


def _converged(run: Run, th: Thresholds) -> bool:
    """The loss (window median) ended at ``CONVERGED_BELOW`` of its start or below, under one learning rate for
    every layer (a group left at a tiny rate is a bug to warn of, converged or not). Round 14's attention twin:
    2.8 → 1e-5 and 1.000 held out by step 75, its embeddings and q, k moving 1e-10 of their norm a step against the
    output layer's 2e-6 — "stalled", a warning, and the same finding kept the doctor from calling 0.28 → 1.000 on
    its unscaled twin a fix."""
    ends = loss_ends(run, th)
    return (ends is not None and ends[0] > 0 and 0 <= ends[1] <= CONVERGED_BELOW * ends[0]
            and len(run_meta(run).get("optimizer_lrs") or ()) <= 1)


def _branch_layers_of_a_net_that_learned(run: Run, names: tuple[str, ...], th: Thresholds) -> bool:
    """Layers inside residual branches (the watch's ``residual_branch``, ``residual_layers``), of an optimizer whose
    groups share one learning rate, on a loss that fell to ``LEARNED_BELOW`` of its start: round 8's residual MLP
    with zero-initialised branch outputs (Goyal et al. 2017; Fixup), whose first branch layers moved ~0.012× the
    upper quartile on both seeds of a net at 0.94. A group left at a tiny rate (a bug to warn of) has its own rate."""
    meta = run_meta(run)
    branch = set(meta.get("residual_branch") or ()) | set(meta.get("residual_layers") or ())
    ends = loss_ends(run, th)
    return (bool(branch) and set(names) <= branch and len(meta.get("optimizer_lrs") or ()) == 1
            and ends is not None and ends[0] > 0 and ends[1] <= LEARNED_BELOW * ends[0])


NORM_TYPES = ("BatchNorm", "LayerNorm", "GroupNorm", "InstanceNorm", "RMSNorm")


def normed_layers(run: Run) -> set[str]:
    """Layers whose output a normalisation layer takes next (the next entity in depth order is a norm: a conv
    before its BatchNorm). Measured: round 7's dilated conv stack with the doctor's norms inserted, whose
    1-channel input convolution (16 weights, one per channel, each normalised away but for its sign) moved
    3.5·10⁻⁵ of its norm a step against 4.9·10⁻³, was a "stalled" warning on a net at 0.97."""
    ordered = sorted((e for e in run.entities() if e.depth is not None and e.kind in ("layer", "activation")),
                     key=lambda e: e.depth or 0)
    return {a.name for a, b in zip(ordered, ordered[1:])
            if a.kind == "layer" and b.kind == "layer" and any(t in (b.module or "") for t in NORM_TYPES)
            and not any(t in (a.module or "") for t in NORM_TYPES)}


def cut_off_layers(run: Run, grads: Series | None) -> tuple[str, ...]:
    """Layers that ran in the forward pass, before a layer that trains, but never had a gradient (not in
    ``grads``, the run's ``grad_norm`` series; None where none was recorded): the graph between them and the loss
    is cut. A layer that runs after every trained one (a decoder branch the loss does not read: the repair
    benchmark's tied autoencoder, trained on its classifier alone) is off the loss's path, not cut from it."""
    if grads is None:
        return ()
    got = set(grads.names)
    depths = [e.depth for e in run.entities("layer") if e.name in got and e.depth is not None]
    if not depths:
        return ()
    return tuple(e.name for e in run.entities("layer")
                 if e.depth is not None and e.name not in got and e.depth < max(depths))


def cut_graph_findings(run: Run, th: Thresholds) -> list[Finding]:
    """Layers whose output was computed but to which no gradient ever came back (:func:`cut_off_layers`).

    Not too little gradient but none at all, ``.grad`` None on every step: something in ``forward`` takes the
    tensor out of the autograd graph — a ``.detach()``, a round trip through ``.numpy()``, ``.item()`` or
    ``.tolist()``, ``torch.no_grad()``, a tensor rebuilt with ``torch.tensor(…)`` — and everything before it
    never learns (round 6: ``torch.from_numpy(np.tanh(h.detach().numpy()))`` in a forward left two of three
    layers at their initial weights, told "too little gradient, or too small a learning rate").
    """
    s = run.series("grad_norm") if "grad_norm" in run.quantities else None
    names = cut_off_layers(run, s)
    if s is None or not names:
        return []
    cause = ("the autograd graph is cut between these layers and the loss: something in forward takes their output "
             "out of the graph (.detach(), a round trip through .numpy(), .item() or .tolist(), torch.no_grad(), "
             "or a tensor rebuilt with torch.tensor(…)), or uses it only through an integer result — the index of an "
             "argmax, topk or sort, a comparison — which carries no gradient (round 38: a hard argmax selection)")
    fixes = remedies("check_graph")
    sources: tuple[str, ...] = ()
    checkpointed = set(run_meta(run).get("reentrant_checkpoint_layers") or ()) & set(names)
    if checkpointed:
        # round 21 (transformers#21381): a frozen stem before checkpoint(blocks, h, use_reentrant=True), whose input
        # needs no gradient, so the blocks never get one — torch warns "None of the inputs have requires_grad=True"
        cause = (f"torch.utils.checkpoint(…, use_reentrant=True) ran {span(tuple(sorted(checkpointed)))}: the "
                 "reentrant variant runs its function under torch.no_grad() and gives it gradients only where one of "
                 "its inputs requires grad, and the input here does not (it comes from frozen layers, or from the "
                 "data)")
        fixes, sources = remedies("checkpoint_inputs"), ("meta reentrant_checkpoint_layers",)
    return [Finding(
        kind="stalled", severity="warning", layers=names, steps=(int(s.steps[0]), int(s.steps[-1])),
        summary=f"no gradient ever reaches layers {span(names)}: they never train",
        evidence=(f"{len(names)} layer{'s' if len(names) > 1 else ''} ({span(names)}) ran in the forward pass, but their "
                  f"parameters' .grad stayed None on every recorded step ({steps_text(int(s.steps[0]), int(s.steps[-1]))}), "
                  f"while {len(s.names)} other{'s' if len(s.names) > 1 else ''} ({span(tuple(s.names))}) got one."),
        cause=cause,
        remedies=fixes,
        numbers={"layers": float(len(names))},
        sources=(f"grad_norm (layers {span(tuple(s.names))}, {steps_text(int(s.steps[0]), int(s.steps[-1]))})",
                 *sources),
    )]


def cut_input_findings(found: list[Finding], run: Run, th: Thresholds) -> list[Finding]:
    """Layers that took a float input carrying no gradient after other layers of the same forward pass had made
    outputs with one (meta ``cut_inputs``; the pass's own inputs are not counted), in a run whose loss did not halve
    and where no finding says the graph is cut already: one ``stalled`` warning. What comes before such a layer
    learns nothing through it; the layers before it still get a gradient by another path, so ``.grad`` is not None
    (:func:`cut_graph_findings` sees nothing). Round 30: a VAE decoding ``Normal(μ, σ).sample()`` (jankrepl/deepdow#101:
    ``rsample()`` was meant), its encoder trained by the KL term alone — 0 of 8 latents active, held out −0.13 to −0.08
    against 0.37–0.40 — and "no findings"."""
    cut = run_meta(run).get("cut_inputs") or []
    if not cut or any("check_graph" in f.remedy_keys for f in found):
        return []
    ends = loss_ends(run, th)
    if ends is None or halved(ends):
        return []
    layers = tuple(cut)
    steps = int(run_meta(run).get("steps") or 0)
    return [Finding(
        kind="stalled", severity="warning", layers=layers, steps=(0, max(steps - 1, 0)),
        summary=f"the autograd graph is cut before {span(layers)}: what comes before learns nothing through it",
        evidence=(f"{span(layers)} took a float input that carries no gradient, though layers before "
                  f"{'them' if len(layers) > 1 else 'it'} in the same forward pass made outputs that do; the loss went "
                  f"{loss_went(run, th, ends)}."),
        cause=("something in forward takes a tensor out of the graph between layers: a distribution's .sample() where "
               ".rsample() is meant (a VAE's latent, a reparameterised policy), .detach(), a round trip through "
               ".numpy(), .item() or .tolist(), or torch.no_grad() around part of the forward"),
        remedies=remedies("check_graph"), numbers={"layers": float(len(layers))},
        sources=("meta cut_inputs", "loss (run)"))]


def softmax_output_findings(run: Run, th: Thresholds) -> list[Finding]:
    """A softmax at the model's output (meta ``output_modules``) in a run whose logged loss stays flat: squashed twice.

    ``nn.CrossEntropyLoss`` applies log-softmax itself; fed probabilities, it sees inputs in [0, 1] whose softmax
    is nearly uniform, so the loss sits near ln K and its gradient is small (a recurring Stack Overflow question).
    The gradients can look healthy: only the flat loss and the module at the output show it. A ``torch.softmax``
    call inside ``forward`` leaves no module to see: the watch reads the first pass's output instead (rows of
    probabilities), and a loss held just above the floor of a cross-entropy on them shows it
    (:func:`_probabilities_floor`), flat or not.
    """
    meta = run_meta(run)
    got = meta.get("output_probabilities")
    classes = got if isinstance(got, int) else 0  # measured on the output, a module's softmax or a call's
    probabilities = classes >= 2
    module = "Softmax" in (meta.get("output_modules") or ())
    if not module and not probabilities:
        return []
    ends = loss_ends(run, th)
    if ends is None or not ends[0] > 0:
        return []
    floor = _probabilities_floor(run, th, ends, classes) if probabilities else []
    if floor or not module or ends[1] < FLAT_LOSS_ABOVE * ends[0]:
        return floor
    return [flat_loss_finding(
        run, th, ends, "critical", f"the loss does not fall ({sci(ends[0])} → {sci(ends[1])}) and the model ends in a "
                                   f"softmax",
        " with nn.Softmax after the last layer; over K classes a loss fed probabilities it squashes again stays near "
        "ln K.",
        "a softmax before a loss that applies its own (nn.CrossEntropyLoss): the outputs are squashed twice, so the "
        "loss can barely move and passes back a small gradient",
        remedies("logits"), ("meta output_modules",))]


def quadratic_softmax_findings(run: Run, th: Thresholds) -> list[Finding]:
    """A squared error on softmax probabilities (meta ``loss_paths``) in a run whose loss did not halve: the gradient
    at the logits is the error times the softmax's Jacobian, each of order 1/K near a uniform output, about K times
    smaller than cross-entropy's p − y (Golik, Doetsch & Ney 2013). Round 17: digits, MSE on softmax outputs against
    one-hot targets, 0.0900 → 0.0887 in 300 steps (0.26–0.36 held out), the logits' gradient 9.6e-4 against
    cross-entropy's 0.048, and no finding; logits with cross-entropy learn to 0.97."""
    if not quadratic_on_softmax(run_meta(run).get("loss_paths")):
        return []
    ends = loss_ends(run, th)
    if ends is None or not ends[0] > 0 or halved(ends):
        return []
    classes = run_meta(run).get("output_probabilities")
    k = f" over {classes} classes" if isinstance(classes, int) and classes >= 2 else ""
    return [flat_loss_finding(
        run, th, ends, "warning", f"a squared error on softmax probabilities: the loss barely falls ({sci(ends[0])} → "
                                  f"{sci(ends[1])})",
        f"; the loss squares the difference of a softmax's output{k} (read off the loss's graph).",
        "a squared error on softmax outputs: its gradient at the logits is the error times the softmax's Jacobian "
        "(p_i(δ_ij − p_j)), both small near a uniform output, so it is about K times smaller than cross-entropy's "
        "p − y and vanishes further wherever the softmax saturates (Golik, Doetsch & Ney 2013)",
        remedies("logits_loss"), ("meta loss_paths",))]


def broadcast_findings(run: Run, th: Thresholds) -> list[Finding]:
    """A loss that broadcast the model's output against targets of another shape (meta ``loss_broadcast``,
    :func:`gradwatch.probes.loss_ops.loss_broadcast`): an output (B, 1) against targets (B,) compares every output
    with every target, B × B, and the loss is least at the batch's mean target whatever the input. Critical where
    the logged loss did not halve, a warning where it did (from an output far off the targets' scale, falling to
    their variance is still "learning"). Round 19 (deepset-ai/FARM#229): a diabetes MLP under ``nn.MSELoss()`` on
    (B, 1) against (B,), 1.14 → 1.01 in 300 steps, R² 0.04, and "the gradients look healthy"; in the same shape
    R² 0.47–0.50."""
    got = run_meta(run).get("loss_broadcast")
    if not isinstance(got, dict) or "loss" not in run.quantities:
        return []
    out, wide = tuple(got.get("output", ())), tuple(got.get("broadcast", ()))
    ends = loss_ends(run, th, least=1)
    steps = run.series("loss", "run").steps
    severity = "warning" if halved(ends) else "critical"
    told = f"; the logged loss went {sci(ends[0])} → {sci(ends[1])}" if ends is not None else ""
    return [Finding(
        kind="stalled", severity=severity, layers=(), steps=(int(steps[0]), int(steps[-1])),
        summary=f"the loss compares every output with every target: the output {out} is broadcast to {wide}",
        evidence=(f"the loss's graph takes the model's output of shape {out} to {wide} ({got.get('op', '?')}) against "
                  f"a target of another shape{told}."),
        cause=(f"targets of another shape than the output {out}: the loss broadcasts the pair to {wide}, every output "
               "against every target, so it is least at the batch's mean target whatever the input (torch warns: "
               "\"Using a target size … that is different to the input size\"; deepset-ai/FARM#229)"),
        remedies=remedies("same_shape"), numbers={"batch": float(out[0]) if out else math.nan},
        sources=("meta loss_broadcast (the loss graph's shapes)", "loss (run)"))]


FLOOR_WITHIN = 1.25  # a loss that ends within this factor above the floor of a cross-entropy fed probabilities


def _probabilities_floor(run: Run, th: Thresholds, ends: tuple[float, float], classes: int) -> list[Finding]:
    """A model that returns probabilities (its forward calls a softmax: meta ``output_probabilities``) whose loss
    ends just above ln(1 + (K − 1)/e), the least ``nn.CrossEntropyLoss`` reaches on them: the best a softmax of
    values in [0, 1] can do is e/(e + K − 1) on the right class. Round 10: ``F.softmax`` before the loss on digits,
    the loss 2.29 → 1.66 (floor 1.46), 0.86 held-out accuracy against its twin's 0.97, the gradients 4–9× smaller
    and no finding. A loss below the floor (NLL on the log, a squared error) is no cross-entropy on probabilities."""
    floor = math.log1p((classes - 1) / math.e)
    if not floor * (1 - 1e-3) <= ends[1] <= FLOOR_WITHIN * floor:
        return []
    return [flat_loss_finding(
        run, th, ends, "warning", f"the loss ends at {sci(ends[1])}, just above {floor:.3g}, the least a cross-entropy "
                                  f"reaches on {classes} probabilities",
        f"; the model returns rows of {classes} non-negative values that sum to 1 (a softmax in its forward), and "
        f"nn.CrossEntropyLoss applied to them cannot go below ln(1 + (K − 1)/e) = {floor:.3g}.",
        "a softmax before a loss that applies its own (nn.CrossEntropyLoss): the outputs are squashed twice, so the "
        "loss is held above that floor and passes back a small gradient",
        remedies("logits"), ("meta output_probabilities",))]


def _loss_at_zero(run: Run, start: int) -> bool:
    """Whether the logged loss is exactly 0 at every logged step from ``start`` on (its floor: every gradient of a
    hinge is 0 there, measured: a triplet loss under Adam reached 0 at step 280, the net at 0.988 held out)."""
    if "loss" not in run.quantities:
        return False
    loss = run.series("loss", "run")
    late = loss.values[0][loss.steps >= start]
    return bool(len(late)) and bool((late == 0).all())


def cleared_grad_findings(run: Run, th: Thresholds) -> list[Finding]:
    """No parameter moved at all — every layer's update ratio exactly 0 on every read step — and no gradient was
    there when the optimizer stepped (no ``grad_norm`` recorded: ``.grad`` None at every step): the gradients are
    cleared between the backward pass and the step. Round 22 (the "where does zero_grad() go" tutorials):
    ``loss.backward(); optimizer.zero_grad(); optimizer.step()`` on breast cancer, nothing moved in 300 steps, the
    loss flat at 0.69, a constant's score — and "the gradients look healthy"."""
    if "update_ratio" not in run.quantities or "grad_norm" in run.quantities:
        return []
    u = run.series("update_ratio")
    if len(u.steps) < th.window or not len(u.names) or not (np.isfinite(u.values).all() and (u.values == 0).all()):
        return []
    reached = "out_grad_norm" in run.quantities
    return [Finding(
        kind="stalled", severity="critical", layers=tuple(u.names), steps=(int(u.steps[0]), int(u.steps[-1])),
        summary="no parameter moved: no layer had a gradient when the optimizer stepped",
        evidence=(f"the update ratio ‖Δw‖/‖w‖ is exactly 0 on all {len(u.names)} layers at every one of the "
                  f"{len(u.steps)} steps read, and no parameter's .grad held a gradient at the step"
                  + (", though the backward pass reached the layers (‖∂L/∂a‖ read)" if reached else "") + "."),
        cause=("the gradients are cleared between loss.backward() and optimizer.step(): a zero_grad() (the "
               "optimizer's or the model's) called in between" if reached else
               "the optimizer steps before any backward pass has filled .grad (optimizer.step() before "
               "loss.backward(), or a zero_grad() between them)"),
        remedies=remedies("zero_grad_order"),
        numbers={"layers": float(len(u.names)), "steps": float(len(u.steps))},
        sources=("update_ratio (layers)", "grad_norm (none recorded)") + (("out_grad_norm",) if reached else ()),
    )]


def zero_factor_words(run: Run) -> str:
    """Words for the products whose factors all started at exactly 0 (meta ``zero_factors``: a LoRA adapter's A and
    B), '' without one: each factor's gradient is a product with the other, 0 while it is 0."""
    found = [f for f in run_meta(run).get("zero_factors") or () if isinstance(f, dict) and f.get("factors")]
    if not found:
        return ""
    names, modules = " and ".join(map(str, found[0]["factors"])), [str(f.get("module")) for f in found]
    return (f"the initialisation: the factors of a product all start at exactly 0 ({names} of {len(found)} "
            f"module{'s' if len(found) > 1 else ''}: {listed(modules)}), and each factor's gradient is a product with "
            f"the other, 0 while it is 0, so none of them ever moves (a LoRA adapter draws A at random and starts B at "
            f"0)")


def _zero_last_layer(run: Run) -> str:
    """The model's last layer where its weights were all exactly 0 at the start (meta ``zero_weight_layers``), ''
    otherwise."""
    meta = run_meta(run)
    layers = [l.get("name") for l in meta.get("layers") or () if isinstance(l, dict)]
    return str(layers[-1]) if layers and layers[-1] in (meta.get("zero_weight_layers") or ()) else ""


ALL_DEAD_FROM = 0.9  # units silent for whole batches this often, where every gradient is 0 besides: all dead


def _all_dead(run: Run) -> list[str]:
    """The activation modules whose units were silent for whole batches at :data:`ALL_DEAD_FROM` or more over the
    run (median of ``dead_frac``): they pass no gradient back."""
    if "dead_frac" not in run.quantities:
        return []
    s = run.series("dead_frac", "activation")
    return [n for n, v in zip(s.names, s.values) if np.isfinite(v).any() and float(np.nanmedian(v)) >= ALL_DEAD_FROM]


def _backward_reached(run: Run, start: int) -> str:
    """Words for a backward pass that carried a gradient to the layers from ``start`` on ("‖∂L/∂a‖ up to 0.31 at
    conv1…fc2"), '' where no layer's ‖∂L/∂a‖ was positive there (not recorded, a loss that passes none)."""
    if "out_grad_norm" not in run.quantities:
        return ""
    a = run.series("out_grad_norm")
    late = a.values[:, a.steps >= start]
    alive = [i for i in range(len(a.names)) if (np.nan_to_num(late[i], nan=0.0) > 0).any()]
    if not alive:
        return ""
    return f"‖∂L/∂a‖ up to {sci(float(np.nanmax(late[alive])))} at {span([a.names[i] for i in alive])}"


def zero_gradient_findings(run: Run, th: Thresholds) -> list[Finding]:
    """Every layer's gradient exactly 0 over the last ``window`` steps: nothing trains (stalled, critical).

    The update-ratio rule compares each layer with the median layer, which is 0 too, and the depth rule needs a
    positive last layer; so a net in which no parameter ever receives a gradient needs a rule of its own. The
    usual cause sits at the output: an activation whose output is constant in its input (a softmax over a single
    unit is the constant 1), or a loss computed on a detached or constant output.
    """
    if "grad_norm" not in run.quantities:
        return []
    s = run.series("grad_norm")
    if not len(s.steps) or not len(s.names):
        return []
    tail = s.values[:, -th.window:]
    if not (np.isfinite(tail).all() and (tail == 0).all()):
        return []
    flags = (np.nan_to_num(s.values, nan=1.0) == 0).all(axis=0)
    start = since(flags, s.steps)
    names = tuple(s.names)
    moved = bool(((np.nan_to_num(s.values, nan=0.0) > 0) & (s.steps < start)).any())
    reached = ""
    if moved and _loss_at_zero(run, start):
        return []  # nothing left to learn: a hinge or margin loss met on every sample (a triplet loss at exactly 0)
    if moved:
        # gradients before, none after: the first updates took the net where its output is flat (round 12: exp of a
        # net's output on raw counts underflowed to exactly 0 after one step, its ReLUs dead; the "softmax over one
        # unit" of a net that had none was offered to the user, untried)
        cause = ("the first updates moved the net to where its output no longer depends on the parameters: units "
                 "that all died (ReLUs off on every input), or an output squashed to a constant (exp or sigmoid "
                 "of a large negative value, 0 in float32) — typically after a step far too large")
        fixes = remedies("lower_lr", "leaky", "standardise_inputs")
    elif factors := zero_factor_words(run):
        # round 31: LoRA adapters with A and B both at 0 (Guitaricet/relora#18), told "units that compute the same
        # output … a ReLU's gradient at 0" and "a softmax over a single unit" of a 10-class model
        cause = factors
        fixes = remedies("one_factor_init")
    elif run_meta(run).get("softmax_over_one") and not {"Softmax", "LogSoftmax"} & set(
            run_meta(run).get("output_modules") or ()):  # (a softmax module of the model's own: output_activation)
        # round 27: nn.CrossEntropyLoss on a binary classifier's one logit, told "a softmax over a single unit (use a
        # sigmoid)" of a model that has no softmax — and a sigmoid added before that loss still passes nothing
        cause = ("the loss does not depend on the parameters: it takes a log-softmax over a single class "
                 "(nn.CrossEntropyLoss on one logit), which is 0 whatever the logit")
        fixes = remedies("one_logit_loss")
    elif cancelling := run_meta(run).get("self_cancelling"):
        # round 28: PPO's ratio exp(logp − logp_old) with logp_old = logp, not detached (huggingface/trl#2769): the
        # ratio is the constant 1, the policy at chance; told "a softmax over a single unit" before
        cause = (f"the loss does not depend on the parameters: it takes a tensor from itself or divides it by itself "
                 f"({', '.join(cancelling)} with one tensor on both sides: x − x, x / x), a constant whose gradient "
                 f"is exactly 0 — as PPO's ratio exp(logp − logp_old) with logp_old the same logp, not detached")
        fixes = remedies("detach_reference")
    elif (step_fns := step_ops(run_meta(run).get("loss_ops"))) and not moved:
        # round 34: BCELoss(torch.round(torch.sigmoid(z)), y), a rounding meant to compare 0/1 answers with the labels
        # (discuss.pytorch.org "Torch.round() gradient"), told "a softmax over a single unit" of a net ending in a
        # sigmoid; without the rounding it learns to 0.96–0.97 where the rounded one stays at 0.48–0.64
        calls = ", ".join(f"torch.{op}" for op in step_fns)
        cause = (f"the loss reads the output through a step function ({calls}) between the last layer and the loss: "
                 f"its derivative is 0 everywhere but at its jumps, so the backward pass carries exactly 0 from the "
                 f"loss — round or threshold the predictions only to report them, and train on the output itself "
                 f"(where the forward pass needs the step, a straight-through estimator passes the gradient past it)")
        fixes = remedies("drop_rounding", "straight_through")
    elif padded := padding_read_words(run):
        # round 40: the only relation of a knowledge graph at padding_idx=0 (ibalazevic/TuckER#17), told "a
        # clip_grad_norm_(…, max_norm=0) or a grad.zero_()" of a loop that had neither
        cause = padded
        fixes = remedies("padding_idx")
    elif reached := _backward_reached(run, start):
        # round 33: clip_grad_norm_(params, 0.0), a max_grad_norm of 0 meant as "no clipping" (OpenNMT/OpenNMT-py#1140),
        # told "a softmax over a single unit … a loss on a detached output" of a CNN whose backward pass was whole
        cause = (f"the gradients are set to 0 between loss.backward() and optimizer.step(): the backward pass reaches "
                 f"the layers ({reached}) but every parameter's .grad is exactly 0 when the optimizer steps — a "
                 f"clip_grad_norm_(…, max_norm=0) or clip_grad_value_(…, 0), a 0 meant as 'no clipping' in a "
                 f"config, or a grad.zero_() or mul_(0) on the gradients")
        fixes = remedies("no_zero_clip")
    elif (last := _zero_last_layer(run)) and not moved:
        # round 42: a supervised contrastive head zero-initialised before F.normalize (pytorch/pytorch#184575): the
        # loss's gradient at the zero output is 0, 0.12 held out against 0.98; told "a softmax over a single unit"
        cause = (f"the last layer's weights start at exactly 0 ({last}): its output is the same whatever the input, "
                 f"and the loss's gradient there is 0 — a loss on F.normalize of a zero vector, on similarities of "
                 f"vectors that are all alike, sits where no direction is preferred — so neither it nor any layer "
                 f"below it ever gets a gradient; draw its weights at random (PyTorch's default init)")
        fixes = remedies("redraw_zero", "he_init")
    elif (dead := _all_dead(run)) and not moved:
        # round 42: every bias of a regression MLP at −2 with a ReLU on its output (facebookresearch/dlrm#358), each
        # unit off on every input from the first step; told "a softmax over a single unit" of a net that has none
        cause = (f"every unit of {listed(dead)} is off on every input from the first step (silent for whole batches "
                 f"{ALL_DEAD_FROM:.0%} of the time or more), so nothing passes a gradient back: pre-activations below "
                 f"0 for every input — negative biases, weights that start too small or shifted")
        fixes = remedies("zero_bias", "leaky", "he_init")
    elif (floors := floor_ops(run_meta(run).get("loss_ops"))) and not moved:
        # round 48: 1 − IoU of boxes that never overlap their targets (lilanxiao/Rotated_IoU#9; Rezatofighi et al.
        # 2019, §1): the intersection's clamp(x₂ − x₁, min=0) is 0 on every sample, IoU 0.00 against GIoU's 0.70;
        # told "a softmax over a single unit" of a net that had none
        calls = ", ".join(f"torch.{op}" for op in floors)
        cause = (f"the loss is flat where it was evaluated: it holds a quantity at a floor ({calls} in its graph) on "
                 f"every sample, whose derivative there is 0 — an overlap of predictions that miss their targets "
                 f"(the IoU of boxes that do not intersect: clamp(x₂ − x₁, min=0) is 0, and so is its gradient), a "
                 f"hinge or a margin held at its bound — so the backward pass carries exactly 0 from the loss")
        fixes = remedies("loss_floor")
    else:
        cause = ("the loss does not depend on the parameters: an output activation constant in its input (a softmax "
                 "over a single unit is the constant 1), or a loss computed on a detached or constant output")
        fixes = remedies("output_activation")
    return [Finding(
        kind="stalled", severity="critical", layers=names, steps=(start, int(s.steps[-1])),
        summary=f"every gradient is exactly zero: no layer trains, since step {start}",
        evidence=(f"grad_norm is exactly 0 in all {len(names)} layers ({span(names)}) at every recorded step from "
                  f"{steps_text(start, int(s.steps[-1]))}; no parameter moves"
                  + (f"; before step {start} they were not." if moved else ".")),
        cause=cause,
        remedies=fixes,
        numbers={"layers": float(len(names))},
        sources=(f"grad_norm (layers {span(names)}, {steps_text(start, int(s.steps[-1]))})",)
        + (("out_grad_norm",) if reached else ()),
    )]
