"""``gw.doctor``: short, seeded trials of the remedies the findings point to, and a table that proves which works.

The protocol: a *setup* is a callable ``seed -> Trial`` (a :class:`gradwatch.zoo.Setup`
is one) returning a fresh model, its optimizer, a batch iterator and a loss,
so that every trial starts from the same seed. The doctor

1. trains the baseline under a watch and diagnoses it;
2. picks the remedies that the findings' causes name (not all of them);
3. applies each to a fresh trial and trains it for the same steps and seeds,
   under a watch;
4. compares final loss (mean of the last 10 % of steps), area under the loss
   curve, held-out score where the setup has one, and whether the findings
   are gone — and says which remedy fixed it, or that none did.
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
from gradwatch.diagnosis.remedies import REMEDIES
from gradwatch.zoo import Trial

SetupFn = Callable[[int], Trial]


@dataclass(frozen=True)
class Remedy:
    """A remedy the doctor can apply to a fresh trial."""

    key: str  # the vocabulary key of gradwatch.diagnosis.remedies
    label: str
    apply: Callable[[Trial, dict[str, float]], Trial | None]  # (fresh trial, numbers) -> trial to train; None: n/a


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

    def unify(trial: Trial, numbers: dict[str, float]) -> Trial:
        r.unify_lr(trial.optimizer)
        return trial

    def relu_he(m: nn.Module) -> nn.Module:
        return r.he_init(r.swap_activation(m, nn.ReLU, inplace=True), inplace=True)

    def leaky(m: nn.Module) -> nn.Module:
        r.swap_activation(m, nn.LeakyReLU, replace=(nn.ReLU,), inplace=True)
        return r.he_init(m, inplace=True)

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
        from gradwatch.zoo import GANTrial

        if not isinstance(trial, GANTrial):
            return None  # not a GAN: nothing to apply
        trial.nonsaturating = True
        return trial

    def one(key: str, label: str, fn: Callable[[Trial, dict[str, float]], Trial | None]) -> list[Remedy]:
        return [Remedy(key, label, fn)]

    return {
        "he_init": one("he_init", "He initialisation", _model_remedy(lambda m: r.he_init(m, inplace=True))),
        "orthogonal_init": one("orthogonal_init", "orthogonal initialisation", _model_remedy(lambda m: r.orthogonal_init(m, inplace=True))),
        "smaller_init": one("smaller_init", "Xavier initialisation", _model_remedy(lambda m: r.xavier_init(m, inplace=True))),
        "relu": one("relu", "ReLU + He initialisation", _model_remedy(relu_he)),
        "leaky": one("leaky", "LeakyReLU + He initialisation", _model_remedy(leaky)),
        "zero_bias": [],  # included in the He remedies
        "residual": one("residual", "residual connections", _model_remedy(lambda m: r.add_residual(m, inplace=True))),
        "norm": one("norm", "LayerNorm/BatchNorm before activations", _model_remedy(lambda m: r.add_norm(m, inplace=True))),
        "clip_norm": one("clip_norm", "gradient-norm clipping", clip),
        "lower_lr": [Remedy("lower_lr", "learning rate ×0.1", lower_lr(0.1)),
                     Remedy("lower_lr", "learning rate ×0.01", lower_lr(0.01))],
        "param_groups": one("param_groups", "one learning rate for every group", unify),
        "orthogonal_rnn": one("orthogonal_rnn", "orthogonal recurrent weights", _model_remedy(orthogonal_rnn)),
        "gated": one("gated", "LSTM in place of the RNN", _model_remedy(gated)),
        "forget_bias": one("forget_bias", "LSTM forget-gate bias 1", _model_remedy(forget_bias)),
        "nonsaturating": one("nonsaturating", "non-saturating generator loss", nonsaturating),
    }


def _keys(diagnosis: Diagnosis) -> list[str]:
    """Vocabulary keys of the remedies named by the findings, in order of first mention."""
    text_to_key = {v: k for k, v in REMEDIES.items()}
    keys: list[str] = []
    for f in diagnosis:
        for text in f.remedies:
            key = text_to_key.get(text) or ("clip_norm" if text.startswith("gradient-norm clipping") else None)
            if key and key not in keys:
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
        lines.append(f"{'remedy':<40} {'final loss':>10} {'AUC':>9}" + (f" {'score':>7}" if has_score else "")
                     + f" {'findings left':<28} {'time':>6}  verdict")
        for r in rows:
            lines.append(f"{r.label[:40]:<40} {r.final_loss:>10.4g} {r.auc:>9.4g}"
                         + (f" {r.score:>7.3f}" if has_score else "")
                         + f" {(', '.join(r.findings) or 'none')[:28]:<28} {r.seconds:>5.1f}s  {r.verdict}")
        return "\n".join(lines)


def _run(make: SetupFn, seed: int, steps: int, store: Path, name: str, remedy: Remedy | None,
         numbers: dict[str, float]) -> tuple[list[float], float, list[str], Diagnosis] | None:
    """Train one trial under a watch; None when the remedy does not apply to this set-up."""
    import gradwatch as gw

    trial = make(seed)
    if remedy is not None:
        applied = remedy.apply(trial, numbers)
        if applied is None:
            return None
        trial = applied
    temporal = any(isinstance(m, nn.RNNBase) for m in trial.model.modules())
    losses: list[float] = []
    with gw.watch(trial.model, trial.optimizer, store=store, name=name, overwrite=True, temporal=temporal) as w:
        for _ in range(steps):
            loss = trial.step()
            w.log(loss=loss)
            losses.append(float(loss))
    score = trial.evaluate(trial.model) if trial.evaluate is not None else math.nan
    diagnosis = w.diagnose()
    return losses, score, [f.kind for f in diagnosis.problems], diagnosis


def _summary(label: str, runs: list[tuple[list[float], float, list[str], Diagnosis]], seconds: float) -> TrialResult:
    finals, aucs = [], []
    for losses, _, _, _ in runs:
        arr = np.array(losses, dtype=float)
        tail = arr[-max(1, len(arr) // 10):]
        finals.append(float(np.mean(tail)) if np.isfinite(tail).all() else math.inf)
        aucs.append(float(np.mean(arr)) if np.isfinite(arr).all() else math.inf)
    kinds = sorted({k for _, _, ks, _ in runs for k in ks})
    return TrialResult(label, float(np.mean(finals)), float(np.mean(aucs)), float(np.mean([s for _, s, _, _ in runs])),
                       kinds, seconds)


def _verdict(base: TrialResult, trial: TrialResult, targets: set[str]) -> str:
    """Judged only on what was measured: the findings left, the loss, the held-out score."""
    gone = not (targets & set(trial.findings))
    if not math.isfinite(trial.final_loss):
        return "worse (diverged)"
    if math.isfinite(base.score) and math.isfinite(trial.score):
        better = trial.score > base.score + 0.02
        worse = trial.score < base.score - 0.02
    else:
        better = trial.final_loss < 0.9 * base.final_loss
        worse = trial.final_loss > 1.1 * base.final_loss
    if gone and better:
        return "fixes it"
    if gone and not worse:
        return "removes the finding; no better"
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
        candidates = [r for key in _keys(diagnosis) for r in catalog.get(key, [])]
        targets = {f.kind for f in diagnosis.problems}
        bar.update(task, description="remedies", total=len(candidates) * seeds, completed=0)
        stopped = False
        for remedy in candidates:
            if budget_s is not None and time.perf_counter() - start > budget_s:
                stopped = True
                break
            t0 = time.perf_counter()
            runs = []
            for s in range(seeds):
                got = _run(setup, s, steps, root, f"{remedy.key}-{len(report.trials)}-{s}", remedy, numbers)
                bar.advance(task)
                if got is not None:
                    runs.append(got)
            if not runs:
                continue  # does not apply here
            result = _summary(remedy.label, runs, time.perf_counter() - t0)
            result.verdict = _verdict(base, result, targets)
            report.trials.append(result)
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
        report.message += f" (stopped at the time budget of {budget_s:g} s after {len(report.trials)} of {len(candidates)} remedies)"
    return report
