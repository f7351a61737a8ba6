"""The doctor's remedy catalogue: entries addressed by key, and the expansion from a finding's keys to the entries.

A finding names remedies by key (``Finding.remedy_keys``); :data:`EXPANDS`
maps each key to the catalogue entries that act on that cause (the finding's
own key first), and :func:`catalog` maps each entry's key to the remedies to
try. NaN from step 0 (the forward pass overflows) gets no learning-rate or
clipping remedies (:data:`LR_KEYS`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from gradwatch.diagnosis import Diagnosis
from gradwatch.doctor.surgery import Standardise, Standardised, is_affine, rebuild_optimizer, zero_residual_branches
from gradwatch.trial import Trial, peek

@dataclass(frozen=True)
class Remedy:
    """A remedy the doctor can apply to a fresh trial."""

    key: str  # the vocabulary key of gradwatch.diagnosis.remedies
    label: str
    apply: Callable[[Trial, dict[str, float]], Trial | None]  # (fresh trial, numbers) -> trial to train; None: n/a
    parts: tuple[str, ...] = ()  # the catalogue keys combined in it (iterative repair); () means (key,)

    def __post_init__(self) -> None:
        if not self.parts:
            object.__setattr__(self, "parts", (self.key,))



def model_remedy(fn: Callable[[nn.Module], nn.Module | None]) -> Callable[[Trial, dict[str, float]], Trial | None]:
    """A remedy on the trial's model; ``fn`` returns None when it does not apply (the trial is then skipped)."""

    def apply(trial: Trial, numbers: dict[str, float]) -> Trial | None:
        before = {id(p) for p in trial.model.parameters()}
        if fn(trial.model) is None:
            return None
        rebuild_optimizer(trial, before)
        return trial

    return apply


def compose(first: Remedy, second: Remedy) -> Remedy:
    """``first`` then ``second`` on the same fresh trial (None when either does not apply)."""

    def apply(trial: Trial, numbers: dict[str, float]) -> Trial | None:
        got = first.apply(trial, numbers)
        return None if got is None else second.apply(got, numbers)

    return Remedy(first.key + "+" + second.key, f"{first.label} + {second.label}", apply,
                  first.parts + second.parts)



# A finding's remedy key -> the catalogue entries that act on that cause (the finding's own key first).
EXPANDS: dict[str, tuple[str, ...]] = {
    "norm": ("norm", "standardise_inputs", "pre_ln"),
    "lower_lr": ("lower_lr", "warmup", "clip_lower_lr"),
    "clip_norm": ("clip_norm", "clip_lower_lr"),
    "residual": ("residual", "fixup", "rezero", "pre_ln"),
    "orthogonal_init": ("orthogonal_init", "identity_init", "fixup", "rezero", "pre_ln", "warmup"),
    "smaller_init": ("smaller_init", "standardise_inputs", "identity_init"),
    "check_data": ("standardise_inputs", "swap_overflow"),
    "leaky": ("leaky", "leaky_lower_lr"),
    "orthogonal_rnn": ("orthogonal_rnn", "identity_init"),
    "smaller_w_hh": ("orthogonal_rnn", "identity_init"),
}
# Learning-rate and clipping remedies cannot help a forward pass that overflows at step 0.
LR_KEYS = {"lower_lr", "warmup", "clip_norm", "clip_lower_lr", "leaky_lower_lr", "param_groups"}


def catalog() -> dict[str, list[Remedy]]:
    from gradwatch import remedies as r

    def clip(trial: Trial, numbers: dict[str, float]) -> Trial:
        limit = numbers.get("clip_at", math.nan)
        r.clip_grad_norm(trial.optimizer, limit if math.isfinite(limit) and limit > 0 else 1.0)
        return trial

    def lower_lr(factor: float) -> Callable[[Trial, dict[str, float]], Trial]:
        def apply(trial: Trial, numbers: dict[str, float]) -> Trial:
            r.scale_lr(trial.optimizer, factor)
            return trial

        return apply

    def clip_lower(trial: Trial, numbers: dict[str, float]) -> Trial:
        return lower_lr(0.1)(clip(trial, numbers), numbers)

    def warmup(trial: Trial, numbers: dict[str, float]) -> Trial:
        # Linear warm-up over the first fifth of the trial from 1 % of the rate (Goyal et al. 2017; Xiong et al. 2020).
        steps = int(numbers.get("doctor_steps", 300))
        sched = torch.optim.lr_scheduler.LinearLR(trial.optimizer, start_factor=0.01, total_iters=max(1, steps // 5))
        trial.optimizer.register_step_post_hook(lambda opt, a, k: sched.step())
        trial.scheduler = sched  # type: ignore[attr-defined]  # the doctor's addition to the trial, for the user to read
        return trial

    def unify(trial: Trial, numbers: dict[str, float]) -> Trial:
        r.unify_lr(trial.optimizer)
        return trial

    def standardise(trial: Trial, numbers: dict[str, float]) -> Trial | None:
        batches = peek(trial, 8)
        xs = [b[0] for b in batches if isinstance(b, (tuple, list)) and b and isinstance(b[0], torch.Tensor)]
        if not xs or not xs[0].is_floating_point() or xs[0].dim() < 2:
            return None
        x = torch.cat(xs)  # (N, *features)
        mean, std = x.mean(0, keepdim=True), x.std(0, keepdim=True)
        std = torch.where(std > 1e-6 * (1 + mean.abs()), std, torch.ones_like(std))  # constant features: shift only
        trial.model = Standardised(Standardise(mean, std), trial.model)
        return trial

    def swap_overflow(trial: Trial, numbers: dict[str, float]) -> Trial | None:
        # Parameter-free leaf modules whose output overflows (non-finite, or 10³× past their input) on a real batch.
        batches = peek(trial, 1)
        if not batches or not isinstance(batches[0], (tuple, list)):
            return None
        bad: list[nn.Module] = []

        def check(mod: nn.Module, args: tuple, out: Any) -> None:
            if not (args and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor)):
                return
            a, o = args[0].detach().float(), out.detach().float()
            if torch.isfinite(a).all() and (not torch.isfinite(o).all()
                                            or o.abs().max() > 1e3 * max(1.0, float(a.abs().max()))):
                bad.append(mod)

        leaves = [m for m in trial.model.modules() if not list(m.children()) and not list(m.parameters(recurse=False))]
        hooks = [m.register_forward_hook(check) for m in leaves]
        try:
            with torch.no_grad():
                trial.model(batches[0][0])
        except Exception:
            pass
        finally:
            for h in hooks:
                h.remove()
        if not bad:
            return None
        kinds = tuple({type(m) for m in bad})  # every instance of an overflowing activation's class
        for parent in list(trial.model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, kinds):
                    setattr(parent, name, nn.ReLU())
        return trial

    def relu_he(m: nn.Module) -> nn.Module:
        return r.he_init(r.swap_activation(m, nn.ReLU, inplace=True), inplace=True)

    def leaky(m: nn.Module) -> nn.Module:
        r.swap_activation(m, nn.LeakyReLU, replace=(nn.ReLU,), inplace=True)
        return r.he_init(m, inplace=True)

    def pre_ln(m: nn.Module) -> nn.Module | None:
        layers = [x for x in m.modules() if isinstance(x, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer))
                  and not x.norm_first]
        for x in layers:
            x.norm_first = True
        for stack in m.modules():  # Pre-LN needs a final norm after the stack (Xiong et al. 2020, Fig. 1b)
            if isinstance(stack, (nn.TransformerEncoder, nn.TransformerDecoder)) and stack.norm is None and layers:
                first: Any = stack.layers[0]
                stack.norm = nn.LayerNorm(first.norm1.normalized_shape, eps=first.norm1.eps)
        return m if layers else None

    def fixup(trial: Trial, numbers: dict[str, float]) -> Trial | None:
        from gradwatch.zoo import ResidualBlock

        m = trial.model
        if any(isinstance(x, (ResidualBlock, r.Residual)) for x in m.modules()):
            r.fixup_zero_init(m, inplace=True)
            return trial
        batches = peek(trial, 1)  # blocks of the user's own: found by what they compute
        if not batches or not isinstance(batches[0], (tuple, list)) or not isinstance(batches[0][0], torch.Tensor):
            return None
        return trial if zero_residual_branches(m, batches[0][0]) else None

    def rezero(m: nn.Module) -> nn.Module | None:
        before = sum(1 for _ in m.modules())
        r.add_residual(m, rezero=True, inplace=True)
        return m if sum(1 for _ in m.modules()) != before else None

    @torch.no_grad()
    def identity_init(trial: Trial, numbers: dict[str, float]) -> Trial | None:
        # Deep linear nets: identity on square layers (Saxe et al. 2014); recurrent weights: orthogonal (Le et al. 2015).
        m, done = trial.model, False
        linear: list[nn.Linear] = [x for x in m.modules() if isinstance(x, nn.Linear)]
        if len(linear) >= 4 and is_affine(m, peek(trial, 1)):
            for x in linear:
                if x.in_features == x.out_features:
                    nn.init.eye_(x.weight)
                else:
                    nn.init.orthogonal_(x.weight)
                if x.bias is not None:
                    nn.init.zeros_(x.bias)
            done = True
        for cell in m.modules():
            if isinstance(cell, (nn.RNN, nn.RNNCell)):
                for name, w in cell.named_parameters():
                    if "weight_hh" in name:
                        nn.init.orthogonal_(w)
                done = True
        return trial if done else None

    def orthogonal_rnn(m: nn.Module) -> nn.Module | None:
        rnns = [x for x in m.modules() if isinstance(x, nn.RNN)]
        for x in rnns:
            r.orthogonal_recurrent(x)
        return m if rnns else None

    def forget_bias(m: nn.Module) -> nn.Module | None:
        lstms = [x for x in m.modules() if isinstance(x, nn.LSTM)]
        for x in lstms:
            r.lstm_forget_bias(x)
        return m if lstms else None

    def gated(m: nn.Module) -> nn.Module | None:
        if not any(isinstance(x, nn.RNN) for x in m.modules()):
            return None
        for parent in list(m.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.RNN):
                    lstm = nn.LSTM(child.input_size, child.hidden_size, child.num_layers, batch_first=child.batch_first,
                                   bidirectional=child.bidirectional)
                    setattr(parent, name, r.lstm_forget_bias(lstm))
        return m

    def nonsaturating(trial: Trial, numbers: dict[str, float]) -> Trial | None:
        # Any trial that says it is a GAN by a boolean `nonsaturating` attribute (zoo.GANTrial, or the user's own).
        if not isinstance(getattr(trial, "nonsaturating", None), bool):
            return None  # not a GAN: nothing to apply
        trial.nonsaturating = True  # type: ignore[attr-defined]
        return trial

    def one(key: str, label: str, fn: Callable[[Trial, dict[str, float]], Trial | None]) -> list[Remedy]:
        return [Remedy(key, label, fn)]

    leaky_fn = model_remedy(leaky)

    def leaky_lower(trial: Trial, numbers: dict[str, float]) -> Trial | None:
        got = leaky_fn(trial, numbers)
        return None if got is None else lower_lr(0.1)(got, numbers)

    return {
        "he_init": one("he_init", "He initialisation", model_remedy(lambda m: r.he_init(m, inplace=True))),
        "orthogonal_init": one("orthogonal_init", "orthogonal initialisation", model_remedy(lambda m: r.orthogonal_init(m, inplace=True))),
        "smaller_init": one("smaller_init", "Xavier initialisation", model_remedy(lambda m: r.xavier_init(m, inplace=True))),
        "identity_init": one("identity_init", "identity/orthogonal init (linear, recurrent)", identity_init),
        "relu": one("relu", "ReLU + He initialisation", model_remedy(relu_he)),
        "leaky": one("leaky", "LeakyReLU + He initialisation", leaky_fn),
        "leaky_lower_lr": one("leaky_lower_lr", "LeakyReLU + He init + learning rate ×0.1", leaky_lower),
        "swap_overflow": one("swap_overflow", "ReLU in place of overflowing activations", swap_overflow),
        "zero_bias": [],  # included in the He remedies
        "residual": one("residual", "residual connections", model_remedy(lambda m: r.add_residual(m, inplace=True))),
        "fixup": one("fixup", "Fixup (zero-init residual branches)", fixup),
        "rezero": one("rezero", "ReZero residual connections", model_remedy(rezero)),
        "pre_ln": one("pre_ln", "Pre-LN (norm_first=True)", model_remedy(pre_ln)),
        "norm": one("norm", "LayerNorm/BatchNorm before activations", model_remedy(lambda m: r.add_norm(m, inplace=True))),
        "standardise_inputs": one("standardise_inputs", "input standardisation", standardise),
        "clip_norm": one("clip_norm", "gradient-norm clipping", clip),
        "clip_lower_lr": one("clip_lower_lr", "clipping + learning rate ×0.1", clip_lower),
        "lower_lr": [Remedy("lower_lr", "learning rate ×0.1", lower_lr(0.1)),
                     Remedy("lower_lr", "learning rate ×0.01", lower_lr(0.01))],
        "warmup": one("warmup", "learning-rate warm-up (LinearLR)", warmup),
        "param_groups": one("param_groups", "one learning rate for every group", unify),
        "orthogonal_rnn": one("orthogonal_rnn", "orthogonal recurrent weights", model_remedy(orthogonal_rnn)),
        "gated": one("gated", "LSTM in place of the RNN", model_remedy(gated)),
        "forget_bias": one("forget_bias", "LSTM forget-gate bias 1", model_remedy(forget_bias)),
        "nonsaturating": one("nonsaturating", "non-saturating generator loss", nonsaturating),
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
