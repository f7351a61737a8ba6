"""The doctor's remedy catalogue: entries addressed by key, and the expansion from a finding's keys to the entries.

A finding names remedies by key (``Finding.remedy_keys``); :data:`EXPANDS`
maps each key to the catalogue entries that act on that cause (the finding's
own key first), and :func:`catalog` maps each entry's key to the remedies to
try, each a label and a procedure of :mod:`gradwatch.doctor.surgery`. NaN
from step 0 (the forward pass overflows) gets no learning-rate or clipping
remedies (:data:`LR_KEYS`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any

from gradwatch.diagnosis import Diagnosis
from gradwatch.diagnosis.findings import sci
from gradwatch.doctor.knobs import knobs
from gradwatch.doctor.table import TrialResult, decisive
from gradwatch.doctor import surgery as s
from gradwatch.doctor import transformer_surgery
from gradwatch.doctor.surgery import Chain, OnModel, TrialChange


@dataclass(frozen=True)
class Remedy:
    """A remedy the doctor can apply to a fresh trial; it pickles when ``apply`` does (every catalogue entry's does)."""

    key: str  # the vocabulary key of gradwatch.diagnosis.remedies
    label: str
    apply: TrialChange  # (fresh trial, numbers) -> trial to train; None: does not apply
    parts: tuple[str, ...] = ()  # the catalogue keys combined in it (iterative repair); () means (key,)

    def __post_init__(self) -> None:
        if not self.parts:
            object.__setattr__(self, "parts", (self.key,))


# Entries that replace the trial's optimizer: applied first in a combination, so that what the others attach to
# the optimizer (clipping hooks, a warm-up scheduler, a scaled learning rate) acts on the new one.
NEW_OPTIMIZER = {"adam", "torch_optimizer"}


def compose(first: Remedy, second: Remedy) -> Remedy:
    """``first`` then ``second`` on the same fresh trial (None when either does not apply); a remedy that replaces
    the optimizer (:data:`NEW_OPTIMIZER`) goes first whichever is named first."""
    order = (second, first) if NEW_OPTIMIZER & set(second.parts) and not NEW_OPTIMIZER & set(first.parts) else (first, second)
    return Remedy(first.key + "+" + second.key, f"{first.label} + {second.label}", Chain(tuple(r.apply for r in order)),
                  first.parts + second.parts)


# A finding's remedy key -> the catalogue entries that act on that cause (the finding's own key first).
EXPANDS: dict[str, tuple[str, ...]] = {
    "norm": ("norm", "standardise_inputs", "pre_ln"),
    "lower_lr": ("lower_lr", "warmup", "clip_lower_lr"),
    "clip_norm": ("clip_norm", "clip_lower_lr"),
    "residual": ("residual", "fixup", "rezero", "pre_ln"),
    # ... and the ReLU swap: where no activation module is in sight (a Jacobian-only cause) the activations may be
    # torch.tanh/sigmoid calls that the records cannot see but the swap reaches; it does not apply where there are
    # none (a linear stack), so the finding's words need not name it (round 7's sigmoid loop: ReLU + He 0.96)
    "orthogonal_init": ("orthogonal_init", "identity_init", "fixup", "rezero", "pre_ln", "warmup", "relu"),
    "smaller_init": ("smaller_init", "smaller_init_lower_lr", "standardise_inputs", "identity_init"),
    "check_data": ("standardise_inputs", "standardise_targets", "swap_overflow"),
    "leaky": ("leaky", "leaky_lower_lr"),
    "orthogonal_rnn": ("orthogonal_rnn", "identity_init"),
    "smaller_w_hh": ("orthogonal_rnn", "identity_init"),
    "qk_layernorm": ("qk_layernorm", "sigma_reparam", "lower_lr", "warmup"),  # attention-logit growth (issue 15)
    # a rate that suited a gradient summed over steps or over the batch is that much too small once the gradient is
    # one batch's mean (round 9: a loop with no zero_grad() at SGD 0.01 learns to 0.91 as it is, to 0.48 zeroed at
    # the same rate, to 0.97 zeroed at 0.1)
    "zero_grad": ("zero_grad", "zero_grad_raise_lr"),
    "mean_reduction": ("mean_reduction", "mean_reduction_raise_lr"),
}
ACCUMULATED = "÷ the forward passes per step (as each accumulated loss divided by their number)"  # its k, once known
RESCALED = "÷ the gradient's measured growth per layer"  # its factor, once measured


def shown_label(remedy: Remedy, numbers: dict[str, float]) -> str:
    """The remedy's label as its table row shows it: a clipping remedy names the bound it clipped at, the
    accumulation remedy its k."""
    k = numbers.get("passes_per_step", math.nan)
    if "divide_accumulated" in remedy.parts and math.isfinite(k):
        return remedy.label.replace(ACCUMULATED, f"÷{k:g} (as each of the {k:g} accumulated losses divided by {k:g})")
    growth = numbers.get("growth_per_layer", math.nan)
    if "rescale_weights" in remedy.parts and math.isfinite(growth):
        return remedy.label.replace(RESCALED, f"÷{growth:.2g} (the gradient's measured growth per layer)")
    if "clip" not in knobs(remedy.parts):
        return remedy.label
    return remedy.label.replace("clipping", f"clipping at max_norm={sci(s.clip_bound(numbers))}", 1)


# Remedies that change the user's own code, which the doctor cannot reach: its message names them instead (the
# backward singularity beside the line that made the NaN, which the doctor names: round 16's message gave the line
# of a sqrt at 0 but not the fix).
BY_HAND = frozenset({"attention_scale", "check_graph", "gradient_penalty", "logits_loss",
                     "smaller_l1", "custom_backward", "backward_singularity", "masked_rows",
                     "schedule_per_epoch", "raise_clip", "no_zero_clip", "log_of_product", "guard_division",
                     "layer_in_init", "clip_before_step", "logit_scale", "restore_weights", "set_lr",
                     "positive_log_input", "hook_once", "exp_log_space",
                     "smaller_step", "fp32_weights", "no_collapse",
                     "master_weights", "pack", "zero_grad_order", "detach_reference",
                     "one_logit_loss", "scaler_step", "unscale_before_clip", "positive_loss_weights",
                     "bounded_objective", "probability_targets", "keep_state_graph",
                     "entropy_bonus_sign", "scale_free_error", "sample_weights", "loss_floor"})

# Why an entry that a finding named found nothing to change, where one reason covers it (the message says so in
# place of the generic "a step() of the set-up's own, or nothing of the kind in the model").
NOT_APPLIED_WHY = {
    "standardise_inputs": "the inputs are centred and at unit scale already, or flags of 0 and 1",
    "param_groups": "every parameter group has the same learning rate",
    # round 42: Adadelta's run was told "a step() of the set-up's own" for the Adam row
    "adam": "the optimizer is neither SGD, Adagrad nor Rprop, the ones Adam replaces",
    "torch_optimizer": "the optimizer is torch.optim's own",
}

# Learning-rate and clipping remedies cannot help a forward pass that overflows at step 0.
LR_KEYS = {"lower_lr", "adam", "torch_optimizer", "warmup", "finish_warmup", "clip_norm", "clip_lower_lr",
           "leaky_lower_lr", "smaller_init_lower_lr", "param_groups", "divide_accumulated"}


def catalog() -> dict[str, list[Remedy]]:
    """Each catalogue key -> the remedies to try for it, in order."""

    def one(key: str, label: str, apply: TrialChange) -> list[Remedy]:
        return [Remedy(key, label, apply)]

    tenth = partial(s.scale_lr, 0.1)
    return {
        "he_init": one("he_init", "He initialisation", OnModel(s.he)),
        "lecun_init": one("lecun_init", "LeCun normal initialisation", OnModel(s.lecun)),
        "one_factor_init": one("one_factor_init", "one factor of each zero product drawn at random",
                               OnModel(s.one_factor)),
        "rescale_weights": one("rescale_weights", f"weights after the first layer {RESCALED}", s.rescale_weights),
        "orthogonal_init": one("orthogonal_init", "orthogonal initialisation", OnModel(s.orthogonal)),
        "smaller_init": one("smaller_init", "Xavier initialisation", OnModel(s.xavier)),
        # too large a scale from the start diverges at once: a sane init alone may still meet a rate set for the old
        # one (measured: SO 48385830's N(0, 1) net at lr 3 diverges with Xavier alone, learns with Xavier + lr×0.1)
        "smaller_init_lower_lr": one("smaller_init_lower_lr", "Xavier init + learning rate ×0.1",
                                     Chain((OnModel(s.xavier), tenth))),
        "identity_init": one("identity_init", "identity/orthogonal init (linear, recurrent)", s.identity_init),
        "relu": one("relu", "ReLU + He initialisation", s.relu_he),
        "leaky": one("leaky", "LeakyReLU + He initialisation", s.leaky),
        "leaky_lower_lr": one("leaky_lower_lr", "LeakyReLU + He init + learning rate ×0.1",
                              Chain((s.leaky, tenth))),
        "swap_overflow": one("swap_overflow", "ReLU in place of overflowing activations", s.swap_overflow),
        # (He initialisation zeroes every bias too; this row zeroes the constant ones alone)
        "zero_bias": one("zero_bias", "biases that start at one constant set to 0", OnModel(s.zero_constant_biases)),
        "redraw_zero": one("redraw_zero", "layers whose weights are all 0 drawn again (PyTorch's default init)",
                           OnModel(s.redraw_zero_layers)),
        "attention_scale": [],  # the scale is in the user's own forward: nothing the doctor can reach
        "straight_through": one("straight_through", "straight-through estimator around round/floor/sign",
                                s.straight_through),
        "leaky_slope": one("leaky_slope", "LeakyReLU's negative slope 0.01 where it was 1", OnModel(s.leaky_slope)),
        "drop_rounding": one("drop_rounding", "no round/floor/sign between the output and the loss",
                             s.drop_rounding),
        "biased_variance": one("biased_variance", "correction=0 for a variance over one element (not 0/0)",
                               s.biased_variance),
        "padding_idx": one("padding_idx", "padding_idx removed from embeddings that read it as data, the row drawn",
                           OnModel(s.no_padding_idx)),
        "minimize": one("minimize", "maximize=False: the optimizer steps down the gradient", s.minimize),
        "norm_scale_one": one("norm_scale_one", "normalisation scales γ at 1 (PyTorch's default), not 0",
                              OnModel(s.norm_scales_one)),
        "weight_norm_init": one("weight_norm_init", "weight-normalised rows at 0 drawn as PyTorch's default",
                                OnModel(s.weight_norm_init)),
        "layer_in_init": [],  # where the layer is built is the user's model code
        "clip_before_step": [],  # where the loop clips is the user's loop (a Trial's own step())
        "restore_weights": [],  # where the loop evaluates, and with which weights, is the user's loop
        "set_lr": [],  # no rate to scale: the optimizer's is 0
        "positive_log_input": [],  # the loss, and how the user's score reads the output, are the user's
        "step_scheduler": one("step_scheduler",
                              "each group at its scheduler's base rate (initial_lr), the warm-up skipped", s.base_rate),
        "layer_decay_once": one("layer_decay_once",
                                "the schedule removed: each group held at its base rate (initial_lr)", s.held_schedule),
        "logit_scale": [],  # the scale is in the user's forward or loss
        "smaller_l1": [],  # the penalty is in the user's loss
        "custom_backward": [],  # the backward is the user's own Function
        "remove_backward_hooks": one("remove_backward_hooks", "the backward hooks of your own removed from every "
                                     "module", OnModel(s.remove_backward_hooks)),
        "hook_once": [],  # the hook is registered in the user's forward
        "exp_log_space": [],  # the loss is the user's
        "normalise_embeddings": one("normalise_embeddings", "model's output normalised (F.normalize over its last "
                                    "dimension)", s.normalise_output),
        "norm_stats_in_graph": one("norm_stats_in_graph", "hand-written normalisation's backward projected as "
                                   "if its statistics were in the graph", s.project_norm_gradient),
        "chain_grad_output": one("chain_grad_output", "custom autograd.Function backward multiplied by the "
                                 "gradient it receives", s.chain_grad_output),
        "tame_custom_backward": one("tame_custom_backward", "custom autograd.Function backward capped at gain 1",
                                    s.tame_custom_backward),
        "masked_rows": [],  # the mask is built in the user's forward
        # where the scheduler steps is the user's loop: the row holds the rate the schedule starts from
        "detach_reference": [],  # the reference term is computed in the user's loss
        "one_logit_loss": [],  # the loss function is the user's
        "scaler_step": [],  # where the loop steps is the user's
        "unscale_before_clip": [],  # where the loop clips is the user's loop (a Trial's own step())
        "positive_loss_weights": [],  # the loss and its weights are the user's
        "bounded_objective": [],  # the loss is the user's
        "probability_targets": [],  # the targets are the user's data
        "keep_state_graph": [],  # the loop that detaches the state is the user's forward
        "plateau_mode_min": one("plateau_mode_min", "ReduceLROnPlateau in mode='min'", s.plateau_mode_min),
        "schedule_per_epoch": one("schedule_per_epoch", "the schedule's first rate held (it decayed every batch)",
                                  s.held_schedule),
        "smaller_step": [],  # the step size of the user's own update
        "no_collapse": [],  # the loss (its choice of negatives) is the user's
        "pack": [],  # where the output is read, and how the batch is padded, is the user's forward
        "master_weights": [],  # the dtype of the weights, and of the batches the forward takes, is the set-up's own
        "rebuild_optimizer": one("rebuild_optimizer", "the optimizer rebuilt over the model's parameters",
                                 s.optimizer_over_model),
        "gumbel_temperature": one("gumbel_temperature", f"Gumbel-softmax temperature {s.GUMBEL_TAU:g}",
                                  s.gumbel_temperature),
        "check_graph": [],  # a forward that leaves the autograd graph is the user's code: nothing to try
        "residual": one("residual", "residual connections", s.residual),
        "fixup": one("fixup", "Fixup (zero-init residual branches)", s.fixup),
        "rezero": one("rezero", "ReZero residual connections", s.rezero),
        "pre_ln": one("pre_ln", "Pre-LN (norm_first=True)", OnModel(s.pre_ln)),
        "norm": one("norm", "LayerNorm/BatchNorm before activations", s.norm),  # its score: s.PreciseBN
        "standardise_inputs": one("standardise_inputs", "input standardisation", s.standardise),
        "impute_inputs": one("impute_inputs", "missing inputs imputed (the features' means)", s.impute_inputs),
        "standardise_targets": one("standardise_targets", "target standardisation", s.standardise_targets),
        "clip_norm": one("clip_norm", "gradient-norm clipping", s.clip),
        "clip_lower_lr": one("clip_lower_lr", "clipping + learning rate ×0.1", Chain((s.clip, tenth))),
        "lower_lr": [Remedy("lower_lr", "learning rate ×0.1", tenth),
                     Remedy("lower_lr", "learning rate ×0.01", partial(s.scale_lr, 0.01))],
        "raise_lr": [Remedy("raise_lr", "learning rate ×10", partial(s.scale_lr, 10.0)),
                     Remedy("raise_lr", "learning rate ×100", partial(s.scale_lr, 100.0)),
                     Remedy("raise_lr", "learning rate ×1000", partial(s.scale_lr, 1000.0))],
        "warmup": one("warmup", "learning-rate warm-up (LinearLR)", s.warmup),
        "finish_warmup": one("finish_warmup", "a warm-up over the first tenth of the steps, in place of the schedule",
                             s.finish_warmup),
        # ten times PyTorch's default step size: the doctor's trials are short (measured: a GRU cell on Pascanu's
        # adding problem at T = 40 learns it in 300 steps at 10⁻², not in 800 at 10⁻³); combined with "learning
        # rate ×0.1" it is the default. One entry: a combination's parts name catalogue keys, not rates.
        "adam": one("adam", "Adam (lr 1e-2) in place of SGD/Adagrad/Rprop", partial(s.adam, 1e-2)),
        "create_graph": one("create_graph", "torch.autograd.grad with create_graph=True in the set-up's step",
                            s.grad_with_graph),
        "torch_optimizer": one("torch_optimizer", "torch.optim's own optimizer in place of the hand-written one",
                               s.torch_optimizer),
        "param_groups": one("param_groups", "one learning rate for every group", s.unify),
        "orthogonal_rnn": one("orthogonal_rnn", "orthogonal recurrent weights", s.orthogonal_rnn),
        "gated": one("gated", "gated recurrence (GRU for nn.RNN, GRUCell for a cell)", OnModel(s.gated)),
        "irnn": one("irnn", "IRNN: ReLU, identity recurrent weights", OnModel(s.irnn)),
        # Pascanu's regulariser Ω changes the loss through the unrolled states (gradwatch.remedies.pascanu_regularizer):
        # a set-up's own step() computes its loss, so the doctor cannot add Ω to it; the finding still names it.
        "pascanu_reg": [],
        "forget_bias": one("forget_bias", "LSTM forget-gate bias 1", OnModel(s.forget_bias)),
        "chrono_init": one("chrono_init", "chrono init of the LSTM gates", s.chrono),
        "nonsaturating": one("nonsaturating", "non-saturating generator loss", s.nonsaturating),
        "output_activation": one("output_activation", "sigmoid in place of a softmax over one unit", s.output_activation),
        "logits": one("logits", "logits to the loss (the output softmax dropped)", s.logits),
        "drop_output_relu": one("drop_output_relu", "the ReLU after the output layer dropped", s.drop_output_relu),
        "linear_output": one("linear_output", "a linear output (its sigmoid, tanh or ReLU dropped)", s.linear_output),
        "mean_reduction": one("mean_reduction", "the loss averaged over the batch, not summed", s.mean_reduction),
        "checkpoint_inputs": one("checkpoint_inputs", "inputs that require grad (a reentrant checkpoint's)",
                                 s.checkpoint_inputs),
        "log_softmax": one("log_softmax", "log_softmax before the NLL loss", s.log_softmax),
        "ctc_zero_infinity": one("ctc_zero_infinity", "CTC loss at zero_infinity=True", s.ctc_zero_infinity),
        "positions": one("positions", "sinusoidal positions added to the embedding (Vaswani et al. 2017)",
                         s.positions),
        "shuffle": one("shuffle", "batches shuffled", s.shuffled),
        "same_shape": one("same_shape", "the output in its targets' shape before the loss", s.same_shape),
        "divide_accumulated": one("divide_accumulated", f"learning rate {ACCUMULATED}", s.divide_accumulated),
        "mean_reduction_raise_lr": one("mean_reduction_raise_lr", "the loss averaged over the batch + learning rate ×10",
                                       Chain((s.mean_reduction, partial(s.scale_lr, 10.0)))),
        "adam_betas": one("adam_betas", "Adam's betas (0.9, 0.999)", s.adam_betas),
        "adamw": one("adamw", "AdamW in place of Adam (the decay decoupled)", s.adamw),
        "lower_wd": one("lower_wd", "weight decay ×0.001", s.lower_wd),
        "lower_dropout": one("lower_dropout", "dropout rate p → 1 − p (0.9 → 0.1)", s.lower_dropout),
        "lower_eps": one("lower_eps", "Adam's eps 1e-8", s.lower_eps),
        "fp16_eps": one("fp16_eps", "eps 1e-4 for the float16 weights (1e-8 is 0 in float16)", s.fp16_eps),
        "pos_weight": one("pos_weight", "the rare class weighed up", s.pos_weight),
        "class_weight": one("class_weight", "the majority class weighed down to the rest", s.class_weight),
        "prior_bias": one("prior_bias", "the output's bias at the targets' positive rate (Lin et al. 2017)", s.prior_bias),
        "fp32_weights": [],  # the dtype of the weights, and of the batches the forward takes, is the set-up's own
        "zero_grad": one("zero_grad", "gradients zeroed after each optimizer step", s.zero_grad),
        "zero_grad_raise_lr": one("zero_grad_raise_lr", "gradients zeroed + learning rate ×10",
                                  Chain((s.zero_grad, partial(s.scale_lr, 10.0)))),
        "gradient_penalty": [],  # the critic's loss is the set-up's own: nothing the doctor can reach
        "backward_singularity": [],  # the operation is in the user's forward: the doctor names its line instead
        "logits_loss": [],  # the output activation and the loss are the user's
        "zero_grad_order": [],  # where the loop clears .grad is the user's loop (a Trial's own step())
        "no_zero_clip": [],  # ... and where it clips them
        "log_of_product": [],  # the product is the user's loss
        "guard_division": [],  # the division is the user's forward or loss
        "gate_bias": [],  # a gated cell's biases: which gate is which is the cell's own convention
        "lower_momentum": one("lower_momentum", "momentum 0.9", s.lower_momentum),
        "train_mode": one("train_mode", "model.train() (it trained in eval mode)", s.train_mode),
        "group_norm": one("group_norm", "GroupNorm in place of BatchNorm", s.group_norm),
        "zero_reciprocal": one("zero_reciprocal", "0 where 1/x, x^(−p) or a division meets 0", s.zero_reciprocals),
        "reset_weights": one("reset_weights", "the model re-initialised, the optimizer's state cleared",
                             s.reset_weights),
        "prune_per_layer": one("prune_per_layer", "pruned layer by layer at the same sparsity", s.prune_per_layer),
        "sum_reconstruction": one("sum_reconstruction", "the reconstruction summed, as the KL is",
                                  s.sum_reconstruction),
        "smoothing_weights": one("smoothing_weights", "no label smoothing where the classes are weighted",
                                 s.smoothing_weights),
        "tied_init": one("tied_init", "the tied embedding drawn at std 0.02", s.tied_init),
        "squash_before_ratio": one("squash_before_ratio", "a sigmoid/softmax on the output before the loss's ratio",
                                   s.squash_before_ratio),
        "detach_advantage": one("detach_advantage", "the advantage detached in the policy term", s.detach_advantage),
        "entropy_bonus_sign": [],  # the sign is the user's loss
        "scale_free_error": [],  # ... and so is its division
        "loss_floor": [],  # ... and its clamp
        "sample_weights": [],  # the sampler is the user's data loader
        "finite_mask": one("finite_mask", "finfo.min in place of −inf in a product (a mask: 0·(−inf) is NaN)",
                           s.finite_inf_factors),
        "smooth_activation": one("smooth_activation", "Tanh in place of ReLU (a smooth second derivative)",
                                 s.smooth_activation),
        "zero_root": one("zero_root", "0 where a square root meets 0, its gradient too (Moindrot's triplet mask)",
                         s.zero_roots),
        "log_space": one("log_space", "logs of sigmoid/softmax outputs in log space (logsigmoid, log_softmax)",
                         s.log_space),
        "signed_targets": one("signed_targets", "soft-margin targets −1/+1 (2·y − 1 from 0/1 labels)",
                              s.signed_targets),
        "bool_mask": one("bool_mask", "attention masks of 0s and 1s made boolean (mask.bool())", s.bool_masks),
        "drop_single_norm": one("drop_single_norm", "normalisations over a single element dropped or regrouped",
                                s.drop_single_norms),
        "invert_padding_mask": one("invert_padding_mask", "key padding masks inverted (attention_mask == 0)",
                                   s.padding_masks_inverted),
        "batch_first": one("batch_first", "batch_first=True where the batch was read as the sequence", s.batch_first),
        **transformer_surgery.entries(one),  # qk_layernorm, sigma_reparam, z_loss, skip_step
    }


def finding_keys(finding: Any, step0_overflow: bool) -> list[str]:
    """The catalogue keys for one finding's causes: its remedy keys, each expanded to the entries that act on it."""
    keys: list[str] = []
    for key in finding.remedy_keys:
        for k in EXPANDS.get(key, (key,)):
            if k not in keys and not (step0_overflow and k in LR_KEYS):
                keys.append(k)
    return keys


def step0_overflow(diagnosis: Diagnosis) -> bool:
    """Non-finite from step 0: the forward pass itself overflows, before any update could have caused it."""
    return any(f.kind == "nonfinite" and f.steps[0] == 0 for f in diagnosis.problems)


def candidate_keys(diagnosis: Diagnosis) -> list[str]:
    """Catalogue keys of the remedies named by the findings (read off their keys), in order of first mention."""
    overflow = step0_overflow(diagnosis)
    keys: list[str] = []
    for f in diagnosis.problems:
        for key in finding_keys(f, overflow):
            if key not in keys:
                keys.append(key)
    return keys


ROUND_WIDTH = 12  # combinations tried in one round of iterative repair, at most
# What a net needs whose gradient is healthy again but which still learns too slowly in the trial's steps:
# a remedy that removed the findings but "does not learn" is combined with these first.
SLOW_KEYS = ("adam",)


def next_round(done: list[tuple[Remedy, TrialResult]], diagnosis: Diagnosis, catalog: dict[str, list[Remedy]],
               tried: set[tuple[str, ...]], most: int = ROUND_WIDTH) -> list[Remedy]:
    """Iterative repair. First each row that removed the baseline's findings but did not learn, combined with
    :data:`SLOW_KEYS`, so that two remedies that each fall short alone (a gated cell, and Adam) are tried together.
    Then each remedy that removed some of the baseline's findings, but left some or brought new ones, combined with
    the untried remedies that a remaining finding names (the baseline's findings first, then the trial's own new
    ones). The most promising row (fewest findings left, then the best score or the deepest fall of the loss) is
    treated as a new baseline: combined with every remedy its findings name, as round 1 tries every remedy the
    baseline's name; each other row with its first. The round's remaining room goes to the rows in the same order,
    each combined with the remedies the baseline's findings name. No combination changes one knob twice
    (:data:`gradwatch.doctor.knobs.SAME_KNOB`). At most ``most`` combinations, each added to ``tried``."""
    targets = {f.kind for f in diagnosis.problems}
    overflow = step0_overflow(diagnosis)

    def promise(row: TrialResult) -> tuple[int, bool, float]:
        ahead = -row.score if math.isfinite(row.score) else row.final_loss / max(abs(row.first_loss), 1e-12)
        return (len(set(row.findings)), not math.isfinite(row.final_loss), ahead if math.isfinite(ahead) else math.inf)

    todo: list[Remedy] = []

    def add(remedy: Remedy, c: Remedy) -> bool:
        parts = tuple(sorted(remedy.parts + c.parts))
        if parts in tried or len(todo) >= most or set(c.parts) & set(remedy.parts):
            return False
        if knobs(remedy.parts) & knobs(c.parts):  # a learning-rate cut on a cut, clipping on clipping
            return False
        todo.append(compose(remedy, c))
        tried.add(parts)
        return True

    ranked = [(remedy, row) for remedy, row in sorted(done, key=lambda d: promise(d[1])) if not decisive(row)]
    slow = [c for k in SLOW_KEYS if not overflow for c in catalog.get(k, [])]

    def stuck(row: TrialResult) -> bool:  # the baseline's findings gone, a finite loss, and still no repair
        return not targets & set(row.findings) and math.isfinite(row.final_loss)

    # first the rows that only learn too slowly, each with SLOW_KEYS: one combination each, before the room goes
    # to wider searches (pascanu_rnn_radius25: a GRU removed the explosion but learned nothing in 500 steps; with
    # Adam, 0.99 — a round spent on the clipped row's combinations first never reached it)
    for remedy, row in ranked:
        if stuck(row):
            for c in slow:
                add(remedy, c)
    widest = True  # the most promising row that names anything gets all of it
    for remedy, row in ranked:
        left = targets & set(row.findings)
        brought = [f for f in row.problems if f.kind not in targets]
        if left == targets or (not left and not brought):
            continue  # removed nothing, or nothing is left to name a remedy
        follow = [(f, overflow) for f in diagnosis.problems if f.kind in left] + [(f, False) for f in brought]
        named = [c for f, over in follow for k in finding_keys(f, over) for c in catalog.get(k, []) if k not in remedy.parts]
        added = 0
        for c in named:
            if (added and not widest) or not add(remedy, c):
                continue
            added += 1
        widest = widest and not added
    base_named = [c for k in candidate_keys(diagnosis) for c in catalog.get(k, [])]
    for remedy, row in ranked:  # the room left: each row with what the baseline's findings name
        for c in base_named:
            add(remedy, c)
    return todo
