"""Through time: vanishing and exploding along the time steps of a recurrent layer, with Pascanu's verdict."""

from __future__ import annotations

import math

import numpy as np

from gradwatch.diagnosis.findings import Finding, sci
from gradwatch.diagnosis.measures import (by_lag, depth_verdict, halved, layers_per_halving, loss_ends, pascanu,
                                         recorded_lengths, window_median)
from gradwatch.diagnosis.remedies import remedies
from gradwatch.diagnosis.thresholds import Thresholds
from gradwatch.diagnosis.view import since, steps_text
from gradwatch.store import Run, Series


GREW_BY = 2.0  # λ₁(W_hh) at the last read this many times its first: the updates grew the recurrent weights
# A vanishing gradient through time with λ₁(W_hh) this many times 1/γ: not the weights (which stretch most directions
# at that scale) but the derivative (round 7's min-char-rnn: λ₁ grown from 0.16 to 7.7 under Adagrad 0.1, its tanh
# units 94 % saturated). Near 1/γ the weights' other singular values may shrink it as well: no claim there.
STRETCH_ABOVE = 2.0
# A vanishing gradient through time in a run whose logged loss fell to this fraction of its start or below: info. The
# run learned what it had to without the early steps (round 11: one Linear iterated 40 times to a fixed point under a
# spectral norm, h ← tanh(f(h) + u) from h = 0, forgets its start by design — ‖∂L/∂h_1‖ 4·10⁻⁹ of ‖∂L/∂h_40‖ while
# its loss went 2.4 → 0.05 and it scored 0.97; it was critical, and the doctor offered a GRU).
LEARNED_REGARDLESS = 0.1


def temporal_findings(run: Run, th: Thresholds) -> list[Finding]:
    """Vanishing and exploding through time, from ‖∂L/∂h_t‖ of each recurrent layer (``watch(temporal=…)``).

    The cut is the depth cut, lag 0 playing the last layer; λ₁(W_hh) and the cell's γ, where recorded, give
    Pascanu's verdict (:func:`gradwatch.diagnosis.measures.pascanu`).
    """
    if "temporal_grad_norm" not in run.quantities:
        return []
    rows = run.meta.get("recurrent", []) if hasattr(run, "meta") else []
    gammas = {r["name"]: r.get("gamma") for r in rows}
    forget = {r["name"]: r["forget_bias"] for r in rows if isinstance(r.get("forget_bias"), (int, float))}
    lam = run.series("lambda1", "recurrent") if "lambda1" in run.quantities else None
    dead = _dead_recurrent(run, th)
    gated_loops = set(run.meta.get("gated_loops") or ()) if hasattr(run, "meta") else set()
    ends = loss_ends(run, th)
    regardless = ends is not None and ends[0] > 0 and ends[1] <= LEARNED_REGARDLESS * ends[0]
    found = list(dead.values())
    for e in run.entities("recurrent"):
        reverse = e.name.endswith("_reverse")
        s = by_lag(_processing_order(run.temporal(e.name)) if reverse else run.temporal(e.name))
        if reverse:  # its recurrence starts in the padding at the sequences' end: measured over the real steps
            s = _real_steps(run, e.name, s)
        if len(s.names) < 3 or len(s.steps) == 0:
            continue
        med, wsteps = window_median(s, th.window)
        lags = [int(p) for p in s.names]  # the first row is the longest lag, the last is lag 0
        first, last = med[0], med[-1]
        if not (last > 0 and math.isfinite(last) and math.isfinite(first)):
            continue
        ratio = first / last
        k = layers_per_halving(med)
        rel = med / last
        below = [i for i in range(len(med) - 1, -1, -1) if rel[i] < th.memory_below]
        memory = lags[below[0]] if below else None  # the smallest lag at which the gradient is below the cut
        numbers: dict[str, float] = {"ratio": ratio, "halving_steps": k if k else math.nan,
                                     "memory": float(memory) if memory is not None else math.nan,
                                     "seq_len": float(lags[0])}  # recurrent steps from the first state read to the last
        verdict, grown = None, ""
        # a layer called in the user's own loop (gradwatch.probes.loops) is in no cell's row: its nonlinearity is a
        # function call unseen, its derivative bounded by 1 for tanh, sigmoid and ReLU alike
        gamma = gammas[e.name] if e.name in gammas else 1.0
        if lam is not None and e.name in lam.names:
            row = lam.values[lam.names.index(e.name)]
            ok = np.isfinite(row)
            lam1 = float(row[ok][-1]) if ok.any() else math.nan
            numbers["lambda1"] = lam1
            if ok.any() and lam1 > GREW_BY * float(row[ok][0]):
                grown = f"; W_hh grew under the updates, from λ₁ {float(row[ok][0]):.2g} at step {int(lam.steps[ok][0])}"
            if math.isfinite(lam1):
                verdict = pascanu(lam1, gamma)
        said = f"; {verdict.words}" if verdict is not None else ""
        if verdict is not None and verdict.key == "exploding" and depth_verdict(ratio, th) == "vanishing":
            # round 15: "explosion possible" beside a gradient measured to vanish ×0.6 a step read as a contradiction
            said += ("; it is not sufficient, and here the steps contract all the same (a nonlinearity's derivative "
                     "below 1, or the state off W_hh's top direction)")
        sources = (f"temporal_grad_norm ({e.name}, lags {lags[0]}…0 from each sequence's end, "
                   f"{steps_text(int(wsteps[0]), int(wsteps[-1]))})",) + ((f"lambda1 ({e.name})",) if "lambda1" in numbers else ())
        mem_text = (f"effective memory ≈ {memory} steps (‖∂L/∂h‖ below {th.memory_below:g}× its last value beyond that lag)"
                    if memory is not None else f"no lag within the {lags[0]} steps falls below {th.memory_below:g}×")
        with np.errstate(all="ignore"):
            per_step = s.values[0] / s.values[-1]
        kind = depth_verdict(ratio, th)
        if kind == "vanishing":
            decay = (f"the gradient through time halves every {k:.2g} steps (×{2 ** (-1 / k):.2g} per step)"
                     if k and k > 0 else "the gradient through time falls")
            lstm, gated = e.module in ("LSTM", "LSTMCell"), e.module in ("GRU", "GRUCell") or e.name in gated_loops
            cause = ("the recurrent Jacobian ∂h_{t+1}/∂h_t shrinks the gradient at every step"
                     + (" (its largest singular value is below the bound)" if verdict is not None and verdict.key == "vanishing" else "")
                     + (": in an LSTM, forget gates that close" if lstm else
                        ": in a gated cell, gates that overwrite the state at every step" if gated else ""))
            # a gated cell is told of its gates, not of a GRU in its place (round 8: a GRU written by hand, its
            # update gate at z ≈ 0.95 in the (1 − z)·h + z·ñ convention, was told to use a GRU)
            # chrono init, not clipping, second: clipping cannot raise a vanishing gradient (round 12: the doctor's
            # clipping row trained exactly as the baseline; a bias of 1 learned a T = 50 recall on 2 of 3 seeds)
            fixes = (remedies("forget_bias", "chrono_init") if lstm
                     else remedies("gate_bias", "orthogonal_rnn", "pascanu_reg") if gated
                     else remedies("orthogonal_rnn", "gated", "pascanu_reg", "irnn"))
            opened = forget.get(e.name, 0.0) if lstm else 0.0
            if opened >= 1:  # round 10: told to set a forget-gate bias of 1 that was already 8
                cause += (f" — though its forget-gate bias was {opened:.2g} when the watch began (open at 1 or more): "
                          "the gates closed under training, or the task's signal is too weak to hold them open")
                fixes = remedies("clip_norm")
            if verdict is not None and verdict.gamma and verdict.lambda1 >= STRETCH_ABOVE / verdict.gamma:
                cause = (f"λ₁(W_hh) = {verdict.lambda1:.2g} is far above 1/γ, so the recurrent weights would stretch "
                         f"the gradient: the nonlinearity's derivative shrinks it — saturated tanh/sigmoid units (or "
                         f"ReLUs that are off){grown}")
                fixes = remedies(*(("lower_lr",) if grown else ()), "orthogonal_rnn", "gated", "clip_norm")
            if e.name in dead:  # not a Jacobian that shrinks the units: units that pass nothing at all
                cause, fixes = dead[e.name].cause, dead[e.name].remedies
            padding = "" if reverse else _padded_tail(run, e.name, lags[0])
            if padding:
                cause, fixes = f"{padding}; besides, {cause}", remedies("pack") + fixes
                sources += (f"pad_steps ({e.name})",)
            severity = "critical" if ratio < th.vanish_below**2 else "warning"
            if regardless and e.name not in dead:
                assert ends is not None
                severity = "info"
                cause += (f" — but the loss fell {sci(ends[0])} → {sci(ends[1])}: the run learns without the early "
                          f"steps (a loop iterated to a fixed point forgets its start by design; or the task's "
                          f"dependencies are short)")
            elif (e.name not in dead and halved(ends) and math.isfinite(per_step[-1])
                  and depth_verdict(float(per_step[-1]), th) != "vanishing"):
                # round 30: a GRU cell over 20 tokens, its label the first: ‖∂L/∂h_1‖ 10⁻⁴ of the last step's until
                # step 192, 0.49 at the last read, the loss 1.40 → 0.15 and held out 1.000 — warned
                assert ends is not None
                severity = "info"
                cause += (f" — until it recovered: at the last read (step {int(s.steps[-1])}) ‖∂L/∂h‖ at the first "
                          f"step is {sci(float(per_step[-1]))} of the last step's, and the loss fell {sci(ends[0])} → "
                          f"{sci(ends[1])}")
                fixes = ()
            found.append(Finding(
                kind="vanishing", severity=severity, layers=(e.name,),
                steps=(since(per_step < th.vanish_below, s.steps, th.window), int(s.steps[-1])),
                summary=f"through time in {e.name}: ‖∂L/∂h‖ at the first step is {sci(ratio)} of the last step's",
                evidence=f"{decay}; {mem_text}{said}.",
                cause=cause, remedies=fixes, numbers=numbers, sources=sources,
            ))
        elif kind == "exploding" and not reverse and _padded_tail(run, e.name, lags[0]) and not _grows_before_padding(
                med, lags, _pad_median(run, e.name), th):
            pass  # round 22: right-padded sequences under a masked loss — the tail gets no gradient, not the start more
        elif kind == "exploding":
            growth = (f"the gradient through time doubles every {-k:.2g} steps going back (×{2 ** (-1 / k):.2g} per step)"
                      if k and k < 0 else "the gradient through time grows going back")
            found.append(Finding(
                kind="exploding", severity="critical", layers=(e.name,),
                steps=(since(per_step > th.explode_above, s.steps, th.window), int(s.steps[-1])),
                summary=f"through time in {e.name}: ‖∂L/∂h‖ at the first step is {sci(ratio)}× the last step's",
                evidence=f"{growth}{said}.",
                cause="the recurrent Jacobian stretches the gradient at every step",
                remedies=remedies("clip_norm", "smaller_w_hh", "orthogonal_rnn", "gated"),
                numbers=numbers, sources=sources,
            ))
        if kind != "exploding":
            found += _exploding_at_init(e.name, s, lam, gamma, ratio, th)
    return found


STATE_CUT_FROM = 0.9  # a cell whose state is cut from the graph on this share of its later calls: no BPTT at all


def cut_state_findings(run: Run, th: Thresholds) -> list[Finding]:
    """A cell called in a loop whose state is cut from the graph (``h = h.detach()``) on nearly every call after a
    pass's first (``state_cut_frac`` at least :data:`STATE_CUT_FROM`, its median over the reads): no gradient passes
    from a step to the one before, so the cell learns nothing that lies more than one step back. One ``vanishing``
    finding, a warning where the loss did not halve, else ``info`` (one-step backpropagation through time, chosen).
    Truncated backpropagation every k steps reads 1/k. Round 30: a GRU cell over 20 tokens whose label is the first
    token, its state detached at every step (oxwhirl/pymarl#161), at chance (0.27), told only that "none vanishes …
    across depth or time" — no ‖∂L/∂h_t‖ beyond the last step had been recorded; its twin 1.000."""
    if "state_cut_frac" not in run.quantities:
        return []
    s = run.series("state_cut_frac", "recurrent")
    ends = loss_ends(run, th)
    found = []
    for name, row in zip(s.names, s.values):
        ok = np.isfinite(row)
        if not ok.any() or float(np.median(row[ok])) < STATE_CUT_FROM:
            continue
        share = float(np.median(row[ok]))
        learns = halved(ends)
        went = f"; the loss went {sci(ends[0])} → {sci(ends[1])}" if ends is not None else ""
        found.append(Finding(
            kind="vanishing", severity="info" if learns else "warning", layers=(name,),
            steps=(int(s.steps[ok][0]), int(s.steps[ok][-1])),
            summary=f"through time in {name}: the state is cut from the graph at every step, so no gradient passes back",
            evidence=(f"on {share:.0%} of {name}'s calls after the first of a forward pass (median over "
                      f"{int(ok.sum())} reads), the state it was given carried no gradient{went}."),
            cause=("the state is detached inside the loop (h = h.detach() at every step): the gradient reaches each "
                   "call from its own output only, so nothing the cell keeps for later steps is learned — detach "
                   "between sequences or chunks of steps (truncated backpropagation through time), not within one"),
            remedies=() if learns else remedies("keep_state_graph"), numbers={"state_cut_frac": share},
            sources=(f"state_cut_frac ({name})",) + (("loss (run)",) if ends is not None else ())))
    return found


def _processing_order(s: Series) -> Series:
    """A reverse direction's ‖∂L/∂h_t‖, recorded in input time (position 0 first), in the order its recurrence runs:
    each step's own positions reversed, so that its last position is the state it computed last (input position 0)
    — lag 0 of :func:`by_lag`, as the last position is a forward direction's. Read in input time, a reverse
    direction's gradient fading back through its recurrence looked like one growing, and one growing like one
    fading."""
    values = s.values.copy()
    for j, n in enumerate(recorded_lengths(values)):
        values[:n, j] = values[:n, j][::-1]
    return Series(s.quantity, s.names, s.steps, values)


def _real_steps(run: Run, name: str, s: Series) -> Series:
    """A reverse direction's profile by lag (:func:`_processing_order`, :func:`by_lag`) without the padding it
    starts in: where the sequences end in padding of varying length (``pad_steps`` of the layer's first forward
    direction, the same input positions), the median sequence's padding steps — its longest lags — are dropped. A
    reverse direction runs through the padding first, at a fixed point of a constant input, and what the loss sends
    there is nothing the sequence said (round 26: a BiGRU under CTC over clips zero-padded to 40 frames, 0.80–0.84
    held out, told "exploding through time in rnn.l0_reverse … recurrent weights initialised too large")."""
    forward = f"{name.rsplit('.', 1)[0]}.l0"
    pad = _pad_median(run, forward) if _padded_tail(run, forward, len(s.names)) else 0
    if not 0 < pad < len(s.names) - 2:
        return s
    return Series(s.quantity, s.names[pad:], s.steps, s.values[pad:])


PAD_AT_LEAST = 10  # trailing steps that repeat the last input, in the median sequence: padding (and a quarter of T)


def _padded_tail(run: Run, name: str, steps: int) -> str:
    """Words where most sequences end in padding of varying length that the layer runs through (``pad_steps``:
    median, least and most trailing steps that repeat a sequence's last input, :func:`gradwatch.probes.temporal.
    trailing_repeats`); '' otherwise. Lengths that differ are what tells padding from a task whose inputs end in
    a fixed stretch of blanks (the copy task reads its answer after them by design). Round 19 (Dwarampudi & Reddy
    2019; SO 51030782): an LSTM over sequences of 4–8 tokens post-padded to 80 and read at out[:, −1], 72–76 padding
    steps, told "forget gates that close" (at chance; read at each sequence's true last step it learns, 1.0)."""
    if "pad_steps" not in run.quantities:
        return ""
    s = run.temporal(name, "pad_steps")
    if len(s.names) != 3 or not np.isfinite(s.values).all() or not len(s.steps):
        return ""
    median, least, most = (float(np.median(row)) for row in s.values)
    if median < max(PAD_AT_LEAST, steps / 4) or most - least < 2:
        return ""
    return (f"the sequences end in padding: the median one's last {median:.0f} of {steps} steps repeat its last input "
            f"({least:.0f}–{most:.0f} in the batch, lengths that differ), and the layer runs through them, so an output "
            f"read at the last step must carry what the real steps said through that many steps of padding (post-"
            f"padding, Dwarampudi & Reddy 2019)")


def _pad_median(run: Run, name: str) -> int:
    """The median sequence's trailing padding steps (``pad_steps``' first row, its median over the reads)."""
    s = run.temporal(name, "pad_steps")
    return int(np.median(s.values[0])) if len(s.names) == 3 and len(s.steps) else 0


def _grows_before_padding(med: np.ndarray, lags: list[int], pad: int, th: Thresholds) -> bool:
    """Whether ‖∂L/∂h‖ still grows going back when measured from the median sequence's last real step (lag ``pad``)
    rather than from the padded end: a loss that reads the real steps only (a mean over a mask, an output gathered
    at each sequence's length) gives the padding little or no gradient, so the first step is "×10³ the last"
    without anything stretching it. Round 22 (DETR#96's mask, the healthy twin): a GRU over sequences of 6–30 tokens
    right-padded to 30 under a masked mean, 0.98 held out, told "[critical] exploding: ×4.4·10³"."""
    at = [i for i, lag in enumerate(lags) if lag >= pad]
    if not at:
        return False
    real_end = med[at[-1]]
    return bool(real_end > 0 and math.isfinite(real_end) and depth_verdict(med[0] / real_end, th) == "exploding")


def _exploding_at_init(name: str, s: Series, lam: Series | None, gamma: float | None, late: float,
                       th: Thresholds) -> list[Finding]:
    """Exploding through time at the first read, taken at step 0 before any update, where the late window is not:
    an initialisation whose recurrent weights stretch the gradient (λ₁(W_hh) ≥ 1/γ where recorded), masked later
    as the units saturate. Measured: round 7's min-char-rnn with W_hh ~ N(0, (3/√H)²) (λ₁ ≈ 6): ‖∂L/∂h_0‖ is
    1.4–1.8·10⁴× ‖∂L/∂h_19‖ at step 0, 10–60× later, and the net learns 0.22/0.52 of a task its orthogonal twin
    learns fully; it was "healthy" or one loss spike."""
    if not len(s.steps) or s.steps[0] != 0 or not s.values[-1, 0] > 0:
        return []
    first = float(s.values[0, 0] / s.values[-1, 0])
    if not (math.isfinite(first) and first > th.explode_above):
        return []
    lam0, said = math.nan, ""
    if lam is not None and name in lam.names and len(lam.steps) and lam.steps[0] == 0:
        lam0 = float(lam.values[lam.names.index(name), 0])
        if gamma is not None and math.isfinite(lam0):
            if lam0 < 1 / gamma:  # below the necessary condition: the records disagree with theory, say nothing
                return []
            said = f" (λ₁(W_hh) = {lam0:.2g} ≥ 1/γ = {1 / gamma:g} at step 0)"
    return [Finding(
        kind="exploding", severity="warning", layers=(name,), steps=(0, int(s.steps[-1])),
        summary=f"through time in {name} at initialisation: ‖∂L/∂h‖ at the first step is {sci(first)}× the last step's",
        evidence=(f"at step 0, before any update, the gradient through time grows ×{sci(first)} over "
                  f"{s.names[0]} steps going back; later it is ×{sci(late)} (median of the last reads), as the "
                  f"units saturate or the weights shrink"),
        cause=f"recurrent weights initialised too large{said}: each step back stretches the gradient",
        remedies=remedies("smaller_w_hh", "orthogonal_rnn", "clip_norm"),
        numbers={"ratio": first, "late_ratio": late, **({"lambda1": lam0} if math.isfinite(lam0) else {})},
        sources=(f"temporal_grad_norm ({name}, step 0)",) + ((f"lambda1 ({name}, step 0)",) if math.isfinite(lam0) else ()),
    )]


def _dead_recurrent(run: Run, th: Thresholds) -> dict[str, Finding]:
    """Per ReLU recurrent layer whose hidden units are 0 for every sample and time step (``recurrent_dead_frac``)
    above ``dead_above`` over the last ``window`` reads: a dead-units finding.

    Inside a fused ``nn.RNN`` no module hook sees the units; the temporal probe's re-run does. A dead unit's
    derivative is 0, so it carries no gradient back through time, and its weights get none: it stays dead.
    Measured: an IRNN (Le et al. 2015: W_hh = I, zero biases, W_ih ~ N(0, 10⁻³)) on pixel-by-pixel digits starts
    with every unit whose input weight is negative dead — its pre-activation is below 0 for every non-negative
    pixel, 42–53 % of them on seeds 0–2 — and SGD at 0.01 loses the rest by step 50; learning-rate cuts down to
    ×0.01 leave it dead, a GRU (whose gates do not die) trained with Adam learns (0.82). So a gated cell first.
    """
    if "recurrent_dead_frac" not in run.quantities:
        return {}
    s = run.series("recurrent_dead_frac", "recurrent")
    med, wsteps = window_median(s, th.window)
    out = {}
    for i, name in enumerate(s.names):
        if not med[i] > th.dead_above:
            continue
        flags = np.nan_to_num(s.values[i], nan=0.0) > th.dead_above
        over = steps_text(int(wsteps[0]), int(wsteps[-1]))
        out[name] = Finding(
            kind="dead_units", severity="warning", layers=(name,),
            steps=(since(flags, s.steps, th.window), int(s.steps[-1])),
            summary=f"{med[i]:.0%} of the hidden units of {name} are dead",
            evidence=(f"{med[i]:.0%} of the recurrent ReLU's hidden units are 0 for every sample at every time step "
                      f"(median over {over}); a dead unit passes no gradient back through time, and its weights get "
                      f"none to revive it."),
            cause=(f"the recurrent ReLUs died: {med[i]:.0%} of the hidden units of {name} are 0 for every input at "
                   f"every step (pre-activations below 0 throughout: input weights or biases that push them there, or "
                   f"a large step), so the gradient through time has only the rest to pass through"),
            remedies=remedies("gated", "lower_lr", "clip_norm"),
            numbers={"dead_frac": float(med[i])},
            sources=(f"recurrent_dead_frac ({name}, {over})",),
        )
    return out
