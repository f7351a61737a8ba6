"""``diagnose``: stored records in, findings out. Pure functions; no model, no hooks.

Each family of rules is a module of its own: :mod:`~gradwatch.diagnosis.over_steps` (spikes, ramps,
fading, skipped and non-finite steps), :mod:`~gradwatch.diagnosis.instability` (loss spikes and divergence
with the layers that moved first, attention-logit growth, output-logit divergence; one spike finding with
over_steps', see :func:`merge_spikes`), :mod:`~gradwatch.diagnosis.depth` (vanishing and exploding across
depth, now and in episodes), :mod:`~gradwatch.diagnosis.through_time` (along a recurrent layer's time steps)
and :mod:`~gradwatch.diagnosis.units` (saturated and dead units, stalled layers). Their measures are
:mod:`~gradwatch.diagnosis.measures`'; :mod:`~gradwatch.diagnosis.severity` and
:mod:`~gradwatch.diagnosis.architecture` then adjust every finding to the run's effect and architecture.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from gradwatch.diagnosis.architecture import (coupled_decay_findings, fit_architecture, heavy_dropout_findings, run_meta,
                                              outside_gradients_note, stale_grad_findings, swapped_betas_findings,
                                              unexplained_flat_findings, misread_batch_findings,
                                              attention_mask_findings, bce_target_findings, confidently_wrong_findings,
                                              few_samples_findings, policy_loss_findings, raw_ratio_findings,
                                              tied_embedding_findings, weighted_smoothing_findings,
                                              cold_logits_findings, zero_path_findings)
from gradwatch.diagnosis.batches import unshuffled
from gradwatch.diagnosis.collapse import collapse_findings
from gradwatch.diagnosis.depth import depth_findings, earlier_episodes, past_depth_findings
from gradwatch.diagnosis.findings import Diagnosis, Finding
from gradwatch.diagnosis.instability import instability_findings
from gradwatch.diagnosis.log_probs import nll_on_scores_findings
from gradwatch.diagnosis.norm_backward import detached_norm_findings
from gradwatch.diagnosis.output_range import margin_target_findings, output_range_findings
from gradwatch.diagnosis.majority import majority_findings
from gradwatch.diagnosis.remedies import key_of, remedies
from gradwatch.diagnosis.over_steps import (
    RECOVERED, clipped_findings, fading_findings, group_lr_collapse_findings, harmless_nan_loss, loss_scale_findings,
    lr_collapse_findings, nonfinite_findings, nonfinite_remedies, skipped_findings, skipped_steps, spike_findings,
    tiny_step_findings, unfinished_warmup_findings, zero_lr_findings,
)
from gradwatch.diagnosis.severity import by_effect
from gradwatch.diagnosis.thresholds import Thresholds
from gradwatch.diagnosis.through_time import cut_state_findings, temporal_findings
from gradwatch.diagnosis.units import (
    activation_findings, broadcast_findings, cleared_grad_findings, cut_graph_findings, cut_input_findings,
    dead_output_findings, made_in_forward_findings, quadratic_softmax_findings, relaxation_findings,
    softmax_output_findings, stalled_findings, symmetric_init_findings, unoptimised_findings, written_weights_findings,
    zero_gradient_findings,
)
from gradwatch.diagnosis.view import RunView
from gradwatch.store import Run

# Most severe first: within a severity, what breaks training outright before what slows it.
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
        view: Run = RunView(run, found[0].steps[0] if found else np.inf, drop)  # type: ignore[assignment]
    else:
        view = run
    said_nonfinite = bool(found)  # where a non-finite finding says it already, a bare non-finite event goes
    harmless = None if said_nonfinite else harmless_nan_loss(view)  # NaN losses the backward pass never carried
    for f in merge_spikes(spike_findings(view, th), instability_findings(view, th.instability)):
        if not _bare_nonfinite_event(f):
            found.append(f)
        elif harmless is not None:
            found.append(harmless)
            harmless, said_nonfinite = None, True
        elif not said_nonfinite:
            found.append(_as_nonfinite(f))
    found += fading_findings(view, th) + depth_findings(view, th) + temporal_findings(view, th) + clipped_findings(view, th)
    found += cut_state_findings(view, th)  # a cell in a loop whose state is detached at every step: no BPTT at all
    found += broadcast_findings(view, th)  # an output (B, 1) against targets (B,): whatever else, the loss is wrong
    if not found:  # a loss far from its targets' scale that crawls, with nothing else to explain it
        found += loss_scale_findings(view, th)
    if not found:  # a flat loss while nothing moves: a rate a schedule took to ~0, or too small a rate
        found += (zero_lr_findings(view, th) or lr_collapse_findings(view, th) or group_lr_collapse_findings(view, th)
                  or unfinished_warmup_findings(view, th)  # a warm-up the run never ends
                  or tiny_step_findings(view, th))
    found += activation_findings(view, th) + relaxation_findings(view, th) + dead_output_findings(view, th) + skipped
    # no gradient at all (a softmax over one unit), or none left when the optimizer steps: that finding says why
    zero = zero_gradient_findings(view, th) or cleared_grad_findings(view, th)
    unheld = unoptimised_findings(view, th)  # layers no optimizer holds: they never move, and that says why
    stalled = [f for f in stalled_findings(view, th, next((f for f in found if f.kind == "vanishing"), None))
               if not (unheld and set(f.layers) <= set(unheld[0].layers))]
    found += unheld + made_in_forward_findings(view, th) + (zero or stalled)
    if not zero:
        found += softmax_output_findings(view, th) + cut_graph_findings(view, th)
        if not any(f.severity != "info" for f in found):  # a squared error on probabilities, which crawls
            found += quadratic_softmax_findings(view, th)
    found = earlier_episodes(found, view, th) + past_depth_findings(view, th, found)
    found += stale_grad_findings(found, view, th)  # .grad never zeroed, where no finding took it as its cause
    found += unexplained_flat_findings(found, view, th)  # a set-up cause for a flat loss no gradient rule explains
    found += misread_batch_findings(found, view, th)  # layers reading the batch as the sequence, the loss falling
    found += zero_path_findings(found, view, th)  # weights behind an operation with zero derivative (round, no STE)
    found += detached_norm_findings(found, view, th)  # a normalisation by hand whose statistics are detached
    found += cut_input_findings(found, view, th)  # a layer fed a tensor cut from the graph (.sample() for .rsample())
    found += attention_mask_findings(found, view, th)  # masks of 0s and 1s as floats (masking nothing), or inverted
    found += bce_target_findings(found, view, th)  # a binary cross-entropy on targets outside [0, 1]: no minimum
    found += policy_loss_findings(found, view, th)  # an advantage not detached, an entropy bonus added
    found += few_samples_findings(found, view, th)  # batches drawn from a handful of samples (a sampler's bug)
    found += raw_ratio_findings(found, view, th)  # a Dice or IoU on logits: a denominator that crosses 0
    found += tied_embedding_findings(found, view, th)  # an output layer tied to an embedding left at N(0, 1)
    found += weighted_smoothing_findings(found, view, th)  # label smoothing weighed by class weights: a wrong minimum
    found += confidently_wrong_findings(found, view, th)  # a cross-entropy ending above a uniform guess's
    found += heavy_dropout_findings(found, view, th)  # a dropout rate of 0.75 or more, where the loss did not halve
    found += coupled_decay_findings(found, view, th)  # Adam's L2 weight_decay strong enough to hold the weights
    found += swapped_betas_findings(found, view, th)  # Adam's betas swapped: steps no longer held near lr
    found += symmetric_init_findings(found, view, th)  # weights set to one constant: units that stay copies
    found += written_weights_findings(found, view, th)  # weights set back between steps (an EMA copy not restored)
    found += collapse_findings(found, view, th)  # an output that stopped depending on the input, as a last resort
    found += majority_findings(found, view, th)  # a binary classifier that answers one class only, as a last resort
    found = _rare_positives(_accumulated(fit_architecture(by_effect(found, view, th), view), view), view)
    found = unshuffled(found, view, th)  # batches that hold a few classes each, in turn: the cause comes first
    found = nll_on_scores_findings(found, view, th)  # an NLL loss on raw scores: unbounded below, whatever else
    found = output_range_findings(found, view, th)  # a squared error's targets outside its output's range
    found = margin_target_findings(found, view, th)  # a soft-margin loss given 0/1 labels: the 0s pass no gradient
    found += cold_logits_findings(found, view, th)  # a flat cross-entropy whose logits stayed near 0
    found += outside_gradients_note(found, view, th)  # a flat loss with nothing found: the cause is elsewhere
    found.sort(key=lambda f: (f.severity != "critical", _ORDER[f.kind]))
    return Diagnosis(found, str(run.path))


ACCUMULATED_FROM = 1.5  # backward passes per optimizer step from which a step sums several
# Optimizers whose step(closure) runs the forward and backward passes itself, several a step: no accumulation (round
# 27: L-BFGS's 18–24 closure evaluations a step were told "a loss not divided by their number", lr ÷18 first)
CLOSURE_OPTIMIZERS = frozenset({"LBFGS"})


def _accumulated(found: list[Finding], run: Run) -> list[Finding]:
    """An explosion or a NaN whose remedies lower the learning rate, in a run that made k ≥ 2 backward passes per
    optimizer step (meta ``backwards_per_step``; the forward passes with gradient, ``passes_per_step``, in a store
    that has no backward count): the words and the remedy for gradient accumulation whose losses were not divided by
    k, which applies the sum of k mean gradients, a learning rate ×k (round 14: k = 16, "a learning rate too large",
    accumulation never named). A siamese net's two passes, or a GAN critic's three, in one graph are one backward
    and no accumulation. Said as a question all the same."""
    meta = run_meta(run)
    # backward passes a step where recorded: one backward through several calls of the net is no accumulation (round
    # 33: a WGAN critic's real, fake and interpolated passes, 3.2 a step, were told "divide each micro-batch's loss")
    k = meta.get("backwards_per_step", meta.get("passes_per_step"))
    if not isinstance(k, (int, float)) or k < ACCUMULATED_FROM or meta.get("optimizer") in CLOSURE_OPTIMIZERS:
        return found  # (an optimizer that evaluates a closure several times a step makes those passes itself)
    out = []
    for f in found:
        if f.kind in ("exploding", "nonfinite") and f.severity != "info" and "lower_lr" in f.remedy_keys:
            f = replace(f, cause=f"{f.cause}; each optimizer step followed {k:g} backward passes: if that "
                                 f"is gradient accumulation, a loss not divided by their number makes the step the sum "
                                 f"of their gradients, a learning rate ×{k:g}",
                        remedies=remedies("divide_accumulated") + f.remedies,
                        numbers={**f.numbers, "passes_per_step": float(k)})
        out.append(f)
    return out


RARE_POSITIVES = 0.05  # a binary cross-entropy's targets positive at this rate or below are rare
PRIOR_OFF_BY = 10.0  # ... and an output that starts at this many times their rate (and at 0.1 or more) ignores it
_PRIOR_KINDS = ("exploding", "vanishing", "dead_units", "stalled", "nonfinite")


def _rare_positives(found: list[Finding], run: Run) -> list[Finding]:
    """The problems of a run whose binary cross-entropy starts with its output at a probability far above its
    targets' positive rate (meta ``loss_prior``, read at the first logged loss): a classifier's bias at 0 for rare
    positives. The first steps' loss and gradient then come from the many easy negatives, and the first updates
    push the net hard (Lin et al. 2017, §3.3, which initialises the output's bias to the prior π). Round 18: a dense
    1-D detector, 0.4 % of 2,048 anchor-class outputs positive, BCE summed over them / the positives: the first
    loss 668–710 against 14–15 with the prior bias, the total gradient norm 170–181 against 3.1–3.3, then 97–100 %
    dead channels and chance AP, told "dead units" with a generic cause. The cause and the remedy are put first."""
    prior = run_meta(run).get("loss_prior")
    if not isinstance(prior, dict):
        return found
    rate, mean = prior.get("positive_rate"), prior.get("mean_prob")
    if not (isinstance(rate, (int, float)) and isinstance(mean, (int, float)) and 0 < rate <= RARE_POSITIVES
            and mean >= max(0.1, PRIOR_OFF_BY * rate)):
        return found
    # the loss per output at the start, against outputs at the targets' rate (its entropy): closed form
    at_start = -(rate * math.log(mean) + (1 - rate) * math.log1p(-min(mean, 1 - 1e-12)))
    at_rate = -(rate * math.log(rate) + (1 - rate) * math.log1p(-rate))
    words = (f"a binary cross-entropy whose output starts at a probability of {mean:.2f} where {rate:.2%} of the "
             f"targets are positive: a bias at 0 for rare positives makes the first loss {at_start / at_rate:.0f}× "
             f"that of outputs at the targets' rate, its gradient comes from the many easy negatives, and the first "
             f"updates push the net hard (Lin et al. 2017, §3.3)")
    out = []
    for f in found:
        if (f.kind in _PRIOR_KINDS and f.severity != "info" and "prior_bias" not in f.remedy_keys
                and "pos_weight" not in f.remedy_keys):  # a model that answers the majority only: no bias towards it
            f = replace(f, cause=f"{words}; besides, {f.cause}", remedies=remedies("prior_bias") + f.remedies,
                        numbers={**f.numbers, "positive_rate": float(rate)},
                        sources=(*f.sources, "meta loss_prior"))
        out.append(f)
    return out


_RANK = {"critical": 0, "warning": 1, "info": 2}


def _bare_nonfinite_event(f: Finding) -> bool:
    """An instability finding that only says the run went non-finite — no layer that moved first, no mechanism, no
    gradient spike or ramp folded in. As "exploding" it claimed a growth nobody measured (round 6: a log of a
    softmax that underflowed to 0, the gradient calm before it): where a non-finite finding says it already, it
    goes; where none does (the gradients of that step were not read), it becomes one (:func:`_as_nonfinite`)."""
    return (f.kind == "exploding" and f.summary.startswith("the run went non-finite") and not f.layers
            and not {"attention_logit_growth", "output_logit_divergence", "peak"} & set(f.numbers))


def _as_nonfinite(f: Finding) -> Finding:
    """A bare non-finite event as the non-finite finding it is: the forward pass or the loss, as
    :func:`~gradwatch.diagnosis.over_steps.nonfinite_findings` words a NaN that no growth led up to."""
    return replace(f, kind="nonfinite", summary=f"the loss is non-finite from step {f.steps[0]}",
                   cause="non-finite values in the forward pass or the loss", remedies=nonfinite_remedies(f.steps[0]))


def merge_spikes(over_steps: list[Finding], unstable: list[Finding]) -> list[Finding]:
    """One finding per event: a total-norm finding (over_steps) whose steps overlap an instability finding is folded
    into it — the instability finding's words, attribution and mechanism, the total norm's evidence and its
    clipping threshold added, the more severe of the two severities; a ramp keeps its own summary, onset and
    peak."""
    out = list(unstable)
    for o in over_steps:
        hit = next((i for i, u in enumerate(out) if u.steps[0] <= o.steps[1] and o.steps[0] <= u.steps[1]), None)
        if hit is None:
            out.append(o)
            continue
        u = out[hit]
        theirs = {key_of(r): r for r in o.remedies}  # over_steps words clipping with its threshold: that one wins
        fixes = tuple(dict.fromkeys([theirs.get(key_of(r), r) for r in u.remedies] + list(o.remedies)))
        ramp = "onset" in o.numbers  # a ramp's onset and peak, against the calm steps, say more than a spike's step
        severity = min(u.severity, o.severity, key=_RANK.__getitem__)
        evidence, theirs_numbers = o.evidence, o.numbers
        learned_through = (u.severity == "info" and o.severity == "warning" and u.summary.startswith("loss spike")
                           and not {"attention_logit_growth", "output_logit_divergence"} & set(u.numbers))
        if learned_through:
            # the loss came back and the run learned through its spikes (instability._recovered): the gradient-norm
            # spikes at the same steps are that event, not a second warning (round 13's ReLU CNN leaving its plateau:
            # norm ×300 at step 272, 0.947 held out — a warning on a healthy twin, with clipping offered)
            severity = "info"
            evidence = evidence.rstrip(".") + ("; the loss came back after them and the run learned through them "
                                               "(info only).")
        if o.numbers.get("recovered") and severity != o.severity:  # "the run recovered … (info only)" would contradict
            evidence = evidence[:evidence.index("; " + RECOVERED)] + "."  # the worse finding it now belongs to
            theirs_numbers = {k: v for k, v in o.numbers.items() if k != "recovered"}
        if severity == "info":  # a run that got over it and learned: nothing to do (round 12: an LSTM's escape from
            fixes = ()  # its plateau, told to clip and skip the very steps in which it learned the task)
        out[hit] = replace(u, severity=severity,
                           summary=o.summary if ramp else u.summary,
                           steps=(min(u.steps[0], o.steps[0]), max(u.steps[1], o.steps[1])),
                           evidence=u.evidence.rstrip(".") + "; " + evidence, remedies=fixes,
                           numbers={**u.numbers, **theirs_numbers} if ramp else {**theirs_numbers, **u.numbers}, sources=tuple(dict.fromkeys(u.sources + o.sources)))
    return out
