"""``gw.doctor``: short, seeded trials of the remedies the findings point to, and a table that proves which works.

The protocol: a *setup* is a callable ``seed -> Trial`` (a :class:`gradwatch.zoo.Setup`
is one) returning a fresh model, its optimizer, a batch iterator and a loss,
so that every trial starts from the same seed. The doctor

1. trains the baseline under a watch and diagnoses it;
2. picks the remedies that the findings' causes name (not all of them): each
   finding carries remedy keys (``Finding.remedy_keys``), and each key brings
   the catalogue entries that act on that cause (``_EXPANDS``); NaN from step 0
   (the forward pass overflows) gets no learning-rate or clipping remedies;
3. applies each to a fresh trial and trains it for the same steps and seeds,
   under a watch;
4. compares final loss (mean of the last 10 % of steps), area under the loss
   curve, held-out score where the setup has one, and whether the findings
   are gone — and says which remedy fixed it, or that none did. "fixes it"
   needs the targeted findings gone, a finite loss and real learning (a better
   held-out score, or a final loss at most half the trial's own first finite
   loss and no higher than the baseline's first);
5. iterative repair: a remedy that removed some targeted findings but not all
   is combined with the next remedy a remaining finding names, for at most
   :data:`MAX_ROUNDS` rounds (the table's ``round`` column), same seeds and steps,
   within ``budget_s``.

A remedy may add to the trial at run time: warm-up leaves its
``torch.optim.lr_scheduler.LinearLR`` as ``trial.scheduler`` (stepped by an
optimizer step post-hook); the non-saturating loss acts on any trial with a
boolean ``nonsaturating`` attribute.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from gradwatch._errors import bad_argument
from gradwatch.diagnosis import Diagnosis, diagnose
from gradwatch.zoo import Trial

SetupFn = Callable[[int], Trial]


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


def _rebuild_optimizer(trial: Trial, before: set[int]) -> None:
    """After a structural change: new parameters join the optimizer (with group 0's settings); removed ones leave."""
    params = [p for p in trial.model.parameters() if p.requires_grad]
    now = {id(p) for p in params}
    opt = trial.optimizer
    if now - before and not (before - now):
        opt.add_param_group({"params": [p for p in params if id(p) not in before]})
    elif before - now:
        trial.optimizer = type(opt)(params, **opt.defaults)


def _model_remedy(fn: Callable[[nn.Module], nn.Module | None]) -> Callable[[Trial, dict[str, float]], Trial | None]:
    """A remedy on the trial's model; ``fn`` returns None when it does not apply (the trial is then skipped)."""

    def apply(trial: Trial, numbers: dict[str, float]) -> Trial | None:
        before = {id(p) for p in trial.model.parameters()}
        if fn(trial.model) is None:
            return None
        _rebuild_optimizer(trial, before)
        return trial

    return apply


class _Standardise(nn.Module):
    """(x − mean) / std with per-feature statistics fitted on training batches (buffers, nothing to learn)."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean)  # (1, *features)
        self.register_buffer("std", std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class _Standardised(nn.Module):
    """The user's model behind an input standardisation layer."""

    def __init__(self, norm: _Standardise, model: nn.Module) -> None:
        super().__init__()
        self.norm, self.model = norm, model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.norm(x))


def _peek(trial: Trial, n: int) -> list[Any]:
    """The next ``n`` batches of the trial, put back so that training sees the very same ones ([] when it has none)."""
    import itertools

    taken: list[Any] = []
    try:
        for _ in range(n):
            taken.append(next(trial.batches))
    except (StopIteration, TypeError):
        pass
    trial.batches = itertools.chain(taken, trial.batches)
    return taken


def _compose(first: Remedy, second: Remedy) -> Remedy:
    """``first`` then ``second`` on the same fresh trial (None when either does not apply)."""

    def apply(trial: Trial, numbers: dict[str, float]) -> Trial | None:
        got = first.apply(trial, numbers)
        return None if got is None else second.apply(got, numbers)

    return Remedy(first.key + "+" + second.key, f"{first.label} + {second.label}", apply,
                  first.parts + second.parts)


_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@torch.no_grad()
def _zero_residual_branches(model: nn.Module, x: torch.Tensor) -> int:
    """Fixup on residual blocks of the user's own class (Zhang et al. 2019): a block is a module whose output
    equals its input (or relu of it) once its last weighted layer is zero; that layer stays zero. Returns how many."""
    seen: dict[int, tuple[nn.Module, Any]] = {}
    blocks = [mod for mod in model.modules() if mod is not model and list(mod.children())
              and sum(isinstance(c, _WEIGHTED) for c in mod.modules()) >= 2]
    def keep(mod: nn.Module, a: tuple, o: Any) -> None:  # (returns None: the output stays the module's own)
        seen.setdefault(id(mod), (mod, a))

    hooks = [b.register_forward_hook(keep) for b in blocks]
    was = model.training
    model.eval()
    try:
        model(x)
    except Exception:
        return 0
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    found = 0
    for mod, args in seen.values():
        if not args or not isinstance(args[0], torch.Tensor):
            continue
        last = [c for c in mod.modules() if isinstance(c, _WEIGHTED)][-1]
        kept = [t.clone() for t in (last.weight, last.bias) if t is not None]
        for t in (last.weight, last.bias):
            if t is not None:
                t.zero_()
        try:
            out = mod(*args)
        except Exception:
            out = None
        a = args[0]
        if (isinstance(out, torch.Tensor) and out.shape == a.shape and bool(a.abs().max() > 0)
                and (torch.allclose(out, a) or torch.allclose(out, a.relu()))):
            found += 1
        else:  # not a residual branch: restore
            for t, k in zip([t for t in (last.weight, last.bias) if t is not None], kept):
                t.copy_(k)
    return found


@torch.no_grad()
def _is_affine(model: nn.Module, batches: list[Any]) -> bool:
    """A deep *linear* net, measured (activations may be functional): f(2x) − f(x) = f(x) − f(0) on a real batch."""
    if not batches or not isinstance(batches[0], (tuple, list)) or not isinstance(batches[0][0], torch.Tensor):
        return False
    x = batches[0][0]
    if not x.is_floating_point():
        return False
    was = model.training
    model.eval()
    try:
        f0, f1, f2 = model(torch.zeros_like(x)), model(x), model(2 * x)
    except Exception:
        return False
    finally:
        model.train(was)
    if not all(isinstance(t, torch.Tensor) and torch.isfinite(t).all() for t in (f0, f1, f2)):
        return False
    return bool(torch.allclose(f2 - f1, f1 - f0, rtol=1e-3, atol=1e-5 * float(f1.abs().max().clamp_min(1))))


# A finding's remedy key -> the catalogue entries that act on that cause (the finding's own key first).
_EXPANDS: dict[str, tuple[str, ...]] = {
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
_LR_KEYS = {"lower_lr", "warmup", "clip_norm", "clip_lower_lr", "leaky_lower_lr", "param_groups"}


def _catalog() -> dict[str, list[Remedy]]:
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
        batches = _peek(trial, 8)
        xs = [b[0] for b in batches if isinstance(b, (tuple, list)) and b and isinstance(b[0], torch.Tensor)]
        if not xs or not xs[0].is_floating_point() or xs[0].dim() < 2:
            return None
        x = torch.cat(xs)  # (N, *features)
        mean, std = x.mean(0, keepdim=True), x.std(0, keepdim=True)
        std = torch.where(std > 1e-6 * (1 + mean.abs()), std, torch.ones_like(std))  # constant features: shift only
        trial.model = _Standardised(_Standardise(mean, std), trial.model)
        return trial

    def swap_overflow(trial: Trial, numbers: dict[str, float]) -> Trial | None:
        # Parameter-free leaf modules whose output overflows (non-finite, or 10³× past their input) on a real batch.
        batches = _peek(trial, 1)
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
        batches = _peek(trial, 1)  # blocks of the user's own: found by what they compute
        if not batches or not isinstance(batches[0], (tuple, list)) or not isinstance(batches[0][0], torch.Tensor):
            return None
        return trial if _zero_residual_branches(m, batches[0][0]) else None

    def rezero(m: nn.Module) -> nn.Module | None:
        before = sum(1 for _ in m.modules())
        r.add_residual(m, rezero=True, inplace=True)
        return m if sum(1 for _ in m.modules()) != before else None

    @torch.no_grad()
    def identity_init(trial: Trial, numbers: dict[str, float]) -> Trial | None:
        # Deep linear nets: identity on square layers (Saxe et al. 2014); recurrent weights: orthogonal (Le et al. 2015).
        m, done = trial.model, False
        linear: list[nn.Linear] = [x for x in m.modules() if isinstance(x, nn.Linear)]
        if len(linear) >= 4 and _is_affine(m, _peek(trial, 1)):
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

    leaky_fn = _model_remedy(leaky)

    def leaky_lower(trial: Trial, numbers: dict[str, float]) -> Trial | None:
        got = leaky_fn(trial, numbers)
        return None if got is None else lower_lr(0.1)(got, numbers)

    return {
        "he_init": one("he_init", "He initialisation", _model_remedy(lambda m: r.he_init(m, inplace=True))),
        "orthogonal_init": one("orthogonal_init", "orthogonal initialisation", _model_remedy(lambda m: r.orthogonal_init(m, inplace=True))),
        "smaller_init": one("smaller_init", "Xavier initialisation", _model_remedy(lambda m: r.xavier_init(m, inplace=True))),
        "identity_init": one("identity_init", "identity/orthogonal init (linear, recurrent)", identity_init),
        "relu": one("relu", "ReLU + He initialisation", _model_remedy(relu_he)),
        "leaky": one("leaky", "LeakyReLU + He initialisation", leaky_fn),
        "leaky_lower_lr": one("leaky_lower_lr", "LeakyReLU + He init + learning rate ×0.1", leaky_lower),
        "swap_overflow": one("swap_overflow", "ReLU in place of overflowing activations", swap_overflow),
        "zero_bias": [],  # included in the He remedies
        "residual": one("residual", "residual connections", _model_remedy(lambda m: r.add_residual(m, inplace=True))),
        "fixup": one("fixup", "Fixup (zero-init residual branches)", fixup),
        "rezero": one("rezero", "ReZero residual connections", _model_remedy(rezero)),
        "pre_ln": one("pre_ln", "Pre-LN (norm_first=True)", _model_remedy(pre_ln)),
        "norm": one("norm", "LayerNorm/BatchNorm before activations", _model_remedy(lambda m: r.add_norm(m, inplace=True))),
        "standardise_inputs": one("standardise_inputs", "input standardisation", standardise),
        "clip_norm": one("clip_norm", "gradient-norm clipping", clip),
        "clip_lower_lr": one("clip_lower_lr", "clipping + learning rate ×0.1", clip_lower),
        "lower_lr": [Remedy("lower_lr", "learning rate ×0.1", lower_lr(0.1)),
                     Remedy("lower_lr", "learning rate ×0.01", lower_lr(0.01))],
        "warmup": one("warmup", "learning-rate warm-up (LinearLR)", warmup),
        "param_groups": one("param_groups", "one learning rate for every group", unify),
        "orthogonal_rnn": one("orthogonal_rnn", "orthogonal recurrent weights", _model_remedy(orthogonal_rnn)),
        "gated": one("gated", "LSTM in place of the RNN", _model_remedy(gated)),
        "forget_bias": one("forget_bias", "LSTM forget-gate bias 1", _model_remedy(forget_bias)),
        "nonsaturating": one("nonsaturating", "non-saturating generator loss", nonsaturating),
    }


def _finding_keys(finding: Any, step0_overflow: bool) -> list[str]:
    """The catalogue keys for one finding's causes: its remedy keys, each expanded to the entries that act on it."""
    keys: list[str] = []
    for key in finding.remedy_keys:
        for k in _EXPANDS.get(key, (key,)):
            if k not in keys and not (step0_overflow and k in _LR_KEYS):
                keys.append(k)
    return keys


def _step0_overflow(diagnosis: Diagnosis) -> bool:
    """Non-finite from step 0: the forward pass itself overflows, before any update could have caused it."""
    return any(f.kind == "nonfinite" and f.steps[0] == 0 for f in diagnosis.problems)


def _keys(diagnosis: Diagnosis) -> list[str]:
    """Catalogue keys of the remedies named by the findings (read off their keys), in order of first mention."""
    overflow = _step0_overflow(diagnosis)
    keys: list[str] = []
    for f in diagnosis.problems:
        for key in _finding_keys(f, overflow):
            if key not in keys:
                keys.append(key)
    return keys


@dataclass
class TrialResult:
    """One remedy (or the baseline), averaged over seeds."""

    label: str
    final_loss: float
    auc: float
    score: float  # held-out score (higher is better), NaN when the setup has none
    findings: list[str]  # finding kinds left after the fix (union over seeds)
    seconds: float
    verdict: str = ""
    first_loss: float = math.nan  # the run's first finite loss (mean over seeds; inf when none was finite)
    learned: bool = False  # every seed's final loss is at most half its own first finite loss
    rounds: int = 1  # remedies combined (iterative repair: at most 3)
    parts: tuple[str, ...] = ()  # the catalogue keys of the remedies in it


@dataclass
class DoctorReport:
    """The doctor's table; ``best`` is the remedy it recommends, with its evidence (None: nothing to recommend)."""

    baseline: TrialResult
    diagnosis: Diagnosis
    trials: list[TrialResult] = field(default_factory=list)
    best: TrialResult | None = None
    message: str = ""
    steps: int = 0
    seeds: int = 1

    def __str__(self) -> str:
        head = f"gw.doctor — {self.steps} steps × {self.seeds} seed{'s' if self.seeds > 1 else ''}: {self.message}"
        lines = [head, ""]
        rows = [self.baseline] + self.trials
        has_score = any(math.isfinite(r.score) for r in rows)
        lines.append(f"{'remedy':<40} {'round':>5} {'first loss':>10} {'final loss':>10} {'AUC':>9}"
                     + (f" {'score':>7}" if has_score else "") + f" {'findings left':<28} {'time':>6}  verdict")
        for r in rows:
            lines.append(f"{r.label[:40]:<40} {r.rounds if r is not self.baseline else '-':>5} {r.first_loss:>10.4g} "
                         f"{r.final_loss:>10.4g} {r.auc:>9.4g}"
                         + (f" {r.score:>7.3f}" if has_score else "")
                         + f" {(', '.join(r.findings) or 'none')[:28]:<28} {r.seconds:>5.1f}s  {r.verdict}")
        if any(r.rounds > 1 for r in self.trials):
            lines.append("")
            lines.append(f"round n: n remedies combined (iterative repair, at most {MAX_ROUNDS} rounds)")
        return "\n".join(lines)


MAX_ROUNDS = 3  # iterative repair: at most this many remedies combined
LEARNED_BELOW = 0.5  # "really learns": the final loss is at most this fraction of the run's first finite loss


def _run(make: SetupFn, seed: int, steps: int, store: Path, name: str, remedy: Remedy | None,
         numbers: dict[str, float]) -> tuple[list[float], float, list[str], Diagnosis] | None:
    """Train one trial under a watch; None when the remedy does not apply to this set-up."""
    import gradwatch as gw

    trial = make(seed)
    if remedy is not None:
        applied = remedy.apply(trial, {**numbers, "doctor_steps": float(steps)})
        if applied is None:
            return None
        trial = applied
    # fused nn.RNN/GRU/LSTM: re-run unrolled; otherwise the watch's default finds cells called in a Python loop
    temporal: bool | str = True if any(isinstance(m, nn.RNNBase) for m in trial.model.modules()) else "auto"
    losses: list[float] = []
    with gw.watch(trial.model, trial.optimizer, store=store, name=name, overwrite=True, temporal=temporal) as w:
        for _ in range(steps):
            loss = trial.step()
            w.log(loss=loss)
            losses.append(float(loss))
    score = trial.evaluate(trial.model) if trial.evaluate is not None else math.nan
    diagnosis = w.diagnose()
    return losses, score, [f.kind for f in diagnosis.problems], diagnosis


def _curve(losses: list[float]) -> tuple[float, float, float, bool]:
    """(first finite loss, final loss = mean of the last 10 %, mean loss, learned) of one run's own loss curve."""
    arr = np.array(losses, dtype=float)
    finite = arr[np.isfinite(arr)]
    first = float(finite[0]) if len(finite) else math.inf
    tail = arr[-max(1, len(arr) // 10):]
    final = float(np.mean(tail)) if np.isfinite(tail).all() else math.inf
    auc = float(np.mean(arr)) if np.isfinite(arr).all() else math.inf
    learned = math.isfinite(final) and math.isfinite(first) and first > 0 and final <= LEARNED_BELOW * first
    return first, final, auc, learned


def _summary(label: str, runs: list[tuple[list[float], float, list[str], Diagnosis]], seconds: float) -> TrialResult:
    curves = [_curve(losses) for losses, _, _, _ in runs]
    kinds = sorted({k for _, _, ks, _ in runs for k in ks})
    return TrialResult(label, float(np.mean([c[1] for c in curves])), float(np.mean([c[2] for c in curves])),
                       float(np.mean([s for _, s, _, _ in runs])), kinds, seconds,
                       first_loss=float(np.mean([c[0] for c in curves])), learned=all(c[3] for c in curves))


def _verdict(base: TrialResult, trial: TrialResult, targets: set[str]) -> str:
    """Judged only on what was measured: the findings left, the loss curve, the held-out score.

    "fixes it" needs all three: the targeted findings gone, a finite final loss, and real learning — a better
    held-out score where the set-up has one, otherwise a final loss at most half the trial's own first finite
    loss and no higher than where the untouched baseline started (so inf → 10¹⁰ is never a repair).
    """
    gone = not (targets & set(trial.findings))
    if not math.isfinite(trial.final_loss):
        return "worse (diverged)"
    if math.isfinite(base.score) and math.isfinite(trial.score):
        better = trial.score > base.score + 0.02
        worse = trial.score < base.score - 0.02
        learns = better
    else:
        better = trial.final_loss < 0.9 * base.final_loss
        worse = trial.final_loss > 1.1 * base.final_loss
        learns = trial.learned and not (math.isfinite(base.first_loss) and trial.final_loss > base.first_loss)
    if gone and learns:
        return "fixes it"
    if gone and not worse:
        return "removes the finding; does not learn" if not trial.learned else "removes the finding; no better"
    if better:
        return "helps; finding remains"
    return "worse" if worse else "no change"


def doctor(setup: SetupFn, *, steps: int = 300, seeds: int = 1, budget_s: float | None = None,
           store: str | Path | None = None, progress: bool = True) -> DoctorReport:
    """Diagnose a set-up, try the remedies its findings point to, and report which works.

    Args:
        setup: ``seed -> Trial`` (e.g. ``gradwatch.zoo.get("deep_tanh_mlp")``).
        steps: training steps per trial.
        seeds: seeds per trial (results are averaged).
        budget_s: stop starting new trials after this many seconds; the table is then partial.
        store: where the trials' runs go (default: a temporary directory).
        progress: show a progress bar.
    """
    if not callable(setup):
        raise TypeError(bad_argument("doctor", "setup", "a callable seed -> Trial (e.g. a zoo.Setup)", setup))
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(bad_argument("doctor", "steps", "a positive int", steps))
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(bad_argument("doctor", "seeds", "a positive int", seeds))
    if budget_s is not None and (isinstance(budget_s, bool) or not isinstance(budget_s, (int, float)) or budget_s <= 0):
        raise ValueError(bad_argument("doctor", "budget_s", "a positive number of seconds or None", budget_s))
    tmp = tempfile.TemporaryDirectory() if store is None else None
    root = Path(tmp.name if tmp is not None else store)  # type: ignore[arg-type]
    try:
        return _doctor(setup, steps, seeds, budget_s, root, progress)
    finally:
        if tmp is not None:
            tmp.cleanup()


def _doctor(setup: SetupFn, steps: int, seeds: int, budget_s: float | None, root: Path, progress: bool) -> DoctorReport:
    from rich.progress import Progress

    start = time.perf_counter()
    catalog = _catalog()
    with Progress(transient=True, disable=not progress) as bar:
        task = bar.add_task("baseline", total=seeds)
        base_runs = []
        for s in range(seeds):
            got = _run(setup, s, steps, root, f"baseline-{s}", None, {})
            assert got is not None
            base_runs.append(got)
            bar.advance(task)
        base = _summary("baseline (no remedy)", base_runs, time.perf_counter() - start)
        diagnosis = base_runs[0][3]
        report = DoctorReport(base, diagnosis, steps=steps, seeds=seeds)
        if not diagnosis.problems:
            base.verdict = "healthy"
            report.message = "nothing to fix: the baseline has no findings"
            return report
        numbers: dict[str, float] = {}
        for f in diagnosis:
            numbers.update({k: v for k, v in f.numbers.items() if k not in numbers})
        overflow = _step0_overflow(diagnosis)
        candidates = [r for key in _keys(diagnosis) for r in catalog.get(key, [])]
        targets = {f.kind for f in diagnosis.problems}
        bar.update(task, description="remedies", total=len(candidates) * seeds, completed=0)
        stopped = False
        tried: set[tuple[str, ...]] = set()
        todo = candidates
        for rnd in range(1, MAX_ROUNDS + 1):
            done: list[tuple[Remedy, TrialResult]] = []
            for remedy in todo:
                if budget_s is not None and time.perf_counter() - start > budget_s:
                    stopped = True
                    break
                tried.add(tuple(sorted(remedy.parts)))
                t0 = time.perf_counter()
                runs = []
                for s in range(seeds):
                    got = _run(setup, s, steps, root, f"{'.'.join(remedy.parts)}-{len(report.trials)}-{s}", remedy, numbers)
                    bar.advance(task)
                    if got is not None:
                        runs.append(got)
                if not runs:
                    continue  # does not apply here
                result = _summary(remedy.label, runs, time.perf_counter() - t0)
                result.verdict = _verdict(base, result, targets)
                result.rounds, result.parts = rnd, remedy.parts
                report.trials.append(result)
                done.append((remedy, result))
            if stopped or rnd == MAX_ROUNDS or any(t.verdict == "fixes it" for t in report.trials):
                break
            # Iterative repair: a remedy that removed some targeted findings but not all is combined with
            # the first remedy that a remaining finding names (same seeds, same steps).
            todo = []
            for remedy, result in done:
                left = targets & set(result.findings)
                if not left or left == targets:
                    continue
                nxt = next((c for f in diagnosis.problems if f.kind in left for k in _finding_keys(f, overflow)
                            for c in catalog.get(k, []) if k not in remedy.parts
                            and tuple(sorted(remedy.parts + (k,))) not in tried), None)
                if nxt is not None and len(todo) < 3:
                    todo.append(_compose(remedy, nxt))
                    tried.add(tuple(sorted(todo[-1].parts)))
            if not todo:
                break
            bar.update(task, total=(len(candidates) + len(todo)) * seeds)
    base.verdict = f"findings: {', '.join(f.kind for f in diagnosis.problems)}"
    fixed = [t for t in report.trials if t.verdict == "fixes it"]
    key = (lambda t: -t.score) if math.isfinite(base.score) else (lambda t: t.final_loss)
    if fixed:
        report.best = min(fixed, key=key)
        b = report.best
        evidence = (f"score {b.score:.3f} against {base.score:.3f}" if math.isfinite(b.score)
                    else f"final loss {b.final_loss:.4g} against {base.final_loss:.4g}")
        report.message = f"best remedy: {b.label} — the findings are gone and {evidence}"
    else:
        report.message = "no remedy helped" if report.trials else "no remedy could be tried automatically"
    if stopped:
        report.message += (f" (stopped at the time budget of {budget_s:g} s after {len(report.trials)} trials; "
                           f"{len(candidates)} remedies in round 1)")
    return report
