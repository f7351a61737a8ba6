"""The set-up protocol the doctor trains: a *set-up* is a callable ``seed -> Trial``.

A set-up builds a fresh :class:`Trial` (model, optimizer, batches, loss) from a
seed, so that every trial of it starts identical: the doctor calls it once for
the baseline and once for each remedy, with the same seeds. The zoo's set-ups
are one source; any function of your own is another::

    def my_setup(seed: int) -> gw.Trial:
        torch.manual_seed(seed)
        model = ...
        return gw.Trial(model, torch.optim.SGD(model.parameters(), lr=0.1), my_batches(seed), loss_fn)

    gw.doctor(my_setup, steps=200)

What remedies act on. Remedies that change the model or the optimizer need
nothing more than the four fields. Remedies that change the inputs, the
learning-rate schedule or the loss read what the trial says about itself:

- **inputs** — ``batches`` yields ``(inputs, targets)`` with the batch first,
  and ``model(inputs)`` is the forward pass. Input standardisation fits its
  statistics on the next batches, and the overflow, Fixup and deep-linear
  checks run the model on one; they read them with :func:`peek`, which puts
  them back, so training sees the very same batches. Target standardisation
  fits the targets' mean and spread the same way; it applies where ``loss_fn``
  is ``F.mse_loss``, ``F.l1_loss`` or their modules, whose gradient's scale it
  knows.
- **schedule** — ``scheduler``: the trial's learning-rate scheduler, stepped
  after every optimizer step by an optimizer step post-hook (so a ``step()``
  of your own needs no change). The remedies keep it: a lower learning rate
  scales the whole schedule, the warm-up's ``LinearLR`` runs before it
  (``SequentialLR``; without one it stands alone, left here), parameters a
  remedy adds join the first group, and Adam in place of SGD takes it over.
- **loss** — a GAN says so with a boolean attribute ``nonsaturating`` that its
  own ``step()`` reads: ``False`` trains the generator on Goodfellow et al.
  (2014)'s minimax loss log(1 − D(G(z))), ``True`` on the non-saturating
  −log D(G(z)). The non-saturating remedy sets it to ``True``; a trial without
  the attribute is not a GAN and the remedy does not apply
  (``gradwatch.zoo.GANTrial`` is one such trial).
- **score** — ``evaluate(model) -> float``, a held-out score, higher is
  better, on a scale where 1 is perfect (accuracy, R², modes covered): where a
  set-up has one, a remedy must raise it by at least 0.05 to count as a fix.
- **what learning means** — by default the training loss: a fix must bring
  each seed's final loss (mean of the last 10 % of steps) to at most half its
  own first finite loss, at most half where the untouched set-up started, and
  below :func:`null_loss` (the loss of a model that outputs zeros: chance for
  cross-entropy). A set-up whose loss does not show learning says so with
  ``judge_by_score=True``; then the held-out score alone decides. A GAN is the
  case in point: its generator loss measures the generator against a
  discriminator that learns too, so it need not fall while the samples reach
  the data (Goodfellow et al. 2014, §3; the saturating loss is negative and
  rises towards 0 as the generator loses). ``gradwatch.zoo.GANTrial`` sets it.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import Tensor, nn

Batch = tuple[Tensor, Tensor]


@dataclass
class Trial:
    """One seeded instance of a set-up, ready to train; ``step()`` trains it on the next batch."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    batches: Iterator[Batch]
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    evaluate: Callable[[nn.Module], float] | None = None  # held-out score (higher is better), if the task has one
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None  # stepped after every optimizer step
    judge_by_score: bool = False  # the loss does not show learning (a GAN's): the doctor reads ``evaluate`` alone
    _stepping: Any = field(default=None, init=False, repr=False, compare=False)  # the hook that steps ``scheduler``
    # what the loss does to the output (gradwatch.probes.loss_ops.loss_paths), read at the first step(): the step
    # returns its loss detached, so a watch's log cannot read it there
    loss_paths: list[list[str]] | None = field(default=None, init=False, repr=False, compare=False)
    # ... and the rest a watch stores of its graph (loss_ops.loss_graph: a broadcast, the operations), then too
    loss_graph: dict[str, Any] | None = field(default=None, init=False, repr=False, compare=False)
    # ... and a binary cross-entropy's positive rate against its mean prediction (loss_ops.loss_prior)
    loss_prior: dict[str, float] | None = field(default=None, init=False, repr=False, compare=False)
    # ... and a squared error's targets' range (loss_ops.quadratic_targets), read before the backward pass frees them
    loss_targets: dict[str, float] | None = field(default=None, init=False, repr=False, compare=False)
    # ... and a soft-margin loss's share of targets at 0 (loss_ops.margin_targets), read at the same moment
    margin_targets: dict[str, float] | None = field(default=None, init=False, repr=False, compare=False)
    # ... and a mean-reduced loss divided again by a constant, with that constant (loss_ops.mean_divided)
    mean_divided: dict[str, Any] | None = field(default=None, init=False, repr=False, compare=False)
    # ... and a class-weighted cross-entropy whose label smoothing moves its minimum (loss_ops.smoothing_outweighs:
    # the class weights are saved tensors the backward pass frees, so a watch's log cannot read them)
    smoothing_outweighs: dict[str, Any] | None = field(default=None, init=False, repr=False, compare=False)
    # ... and the parameters of its graph that neither the model nor the optimizer holds (graph_scan.scan_graph)
    loss_foreign: list[Any] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.scheduler is not None:
            self.step_scheduler(self.scheduler)

    def step_scheduler(self, scheduler: torch.optim.lr_scheduler.LRScheduler | None) -> None:
        """Step ``scheduler`` (it becomes ``self.scheduler``) after every step of ``self.optimizer``, in place of the
        one stepped so far: an optimizer step post-hook, so that a subclass's own step() runs it too."""
        if self._stepping is not None:
            self._stepping.remove()
            self._stepping = None
        self.scheduler = scheduler
        if scheduler is not None:
            self._stepping = self.optimizer.register_step_post_hook(lambda opt, args, kwargs: scheduler.step())

    def step(self) -> Tensor:
        """One training step on the next batch; returns the (detached) loss. A parametrized weight (an orthogonal
        W_hh the doctor put on its manifold) is computed once for the step, not at each of a loop's calls."""
        from torch.nn.utils import parametrize

        x, y = next(self.batches)
        with parametrize.cached():
            loss = self.loss_fn(self.model(x), y)
            if self.loss_paths is None:  # (the targets a binary cross-entropy saved are freed by the backward pass)
                from gradwatch.probes.loss_ops import (loss_prior, margin_targets, mean_divided, quadratic_targets,
                                                       smoothing_outweighs)

                self.loss_prior = loss_prior(loss)
                self.loss_targets = quadratic_targets(loss)
                self.margin_targets = margin_targets(loss)
                self.mean_divided = mean_divided(loss)  # (the division's constant is freed by the backward pass too)
                self.smoothing_outweighs = smoothing_outweighs(loss)  # (and the class weights)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        self.optimizer.step()
        if self.loss_paths is None:
            from gradwatch.probes.graph_scan import held_parameters, scan_graph
            from gradwatch.probes.loss_ops import loss_graph, loss_paths

            self.loss_paths = loss_paths(loss)
            self.loss_foreign, reductions = scan_graph(loss, held_parameters(self.model, self.optimizer))
            self.loss_graph = {**loss_graph(loss), "loss_targets": self.loss_targets,
                               "margin_targets": self.margin_targets, "mean_divided": self.mean_divided,
                               "smoothing_outweighs": self.smoothing_outweighs, "degenerate_reductions": reductions}
        return loss.detach()


SetupFn = Callable[[int], Trial]  # the protocol: seed -> a fresh Trial


@dataclass(frozen=True)
class Setup:
    """A named recipe for a :class:`Trial`; ``expect`` is the pathology it shows (None: healthy).

    ``steps``: how many training steps its trials need before a repaired net can show that it learns (a long
    adding task needs more than the doctor's default 300); :func:`gradwatch.doctor` trains that long unless
    told otherwise. None: the caller's default.
    """

    name: str
    description: str
    expect: str | None
    make: Callable[[int], Trial]
    steps: int | None = None

    def __call__(self, seed: int = 0) -> Trial:
        return self.make(seed)


def peek(trial: Any, n: int) -> list[Any]:
    """The next ``n`` batches of the trial, put back so that training sees the very same ones ([] when it has none)."""
    taken: list[Any] = []
    try:
        for _ in range(n):
            taken.append(next(trial.batches))
    except (StopIteration, TypeError):
        pass
    trial.batches = itertools.chain(taken, trial.batches)
    return taken


NULL_BATCHES = 8  # batches the constant output is judged on: one batch of 32 estimates Var(y) only to ±25 %


BEST_CONSTANT_SIZE = 4096  # outputs per sample up to which the best constant is searched for (one small tensor)
FAR_OFF = 0.5  # the searched constant counts where its loss is below this fraction of the zeros' or the mean's: the
# loss transforms the output. (Cross-entropy's class prior, a few % below chance, is left to the chance level the
# verdicts were measured against.)


def _constant_loss(trial: Any, c: Tensor, outs: list[Tensor], ys: list[Any]) -> float:
    """The mean loss over the batches of the constant output ``c`` (one sample's shape)."""
    return float(np.mean([float(trial.loss_fn(c.expand_as(o), y)) for o, y in zip(outs, ys)]))


def _best_constant(trial: Any, start: Tensor, outs: list[Tensor], ys: list[Any]) -> tuple[float, Tensor]:
    """The loss of the best constant output, and that output, searched for from ``start`` (L-BFGS, a few dozen
    steps): the loss may transform the output (a model that outputs log y under a loss on exp of it), where neither zeros nor the
    targets' mean is the constant a model learns first (its loss of zeros, exp(0) = 1 against targets near 150:
    29,273 where the best constant's is Var(y), 5,808)."""
    c = start.detach().clone().requires_grad_(True)
    opt = torch.optim.LBFGS([c], lr=1, max_iter=50, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = torch.stack([trial.loss_fn(c.expand_as(o), y) for o, y in zip(outs, ys)]).mean()
        loss.backward()
        return loss

    try:
        with torch.enable_grad():
            opt.step(closure)
        with torch.no_grad():
            value = _constant_loss(trial, c.detach(), outs, ys)
    except Exception:  # noqa: BLE001 — a loss with no gradient to the output, or one that fails there: no search
        return math.inf, start
    return (value, c.detach()) if math.isfinite(value) else (math.inf, start)


def null_loss(trial: Any) -> float:
    """The loss of the best constant output the doctor knows (:func:`null_output`)."""
    return null_output(trial)[0]


@torch.no_grad()
def null_output(trial: Any) -> tuple[float, Tensor | None]:
    """The loss of the best constant output the doctor knows, on the trial's next batches (put back), and that
    output (one sample's shape): a ceiling for a fix, since a model that learned only a constant has learned
    nothing of its inputs.

    The lowest of: zeros (cross-entropy on logits: chance, ln(classes); a sigmoid output with binary cross-entropy:
    ln 2); where the output has the targets' shape and they are floats, the targets' mean per output (mean squared
    error: Var(y), the loss of predicting the mean, not E[y²]); and the best constant searched for from the better
    of those two (:func:`_best_constant`), where it is far lower (:data:`FAR_OFF`): a loss on exp of the output, or
    any other transform of it, whose best constant neither zeros nor the mean is. Measured
    over the next :data:`NULL_BATCHES` batches. The model runs in eval mode to learn its output's shape (no
    running statistic, random number or training flag changes). NaN where it cannot be computed: no
    ``(inputs, targets)`` batches, an output that is not a float tensor, a loss that fails or is not finite (the
    output then None; None too where the outputs' shapes differ between batches).
    """
    taken = [b for b in peek(trial, NULL_BATCHES) if isinstance(b, (tuple, list)) and len(b) >= 2]
    if not taken:
        return math.nan, None
    model = trial.model
    modes = [(m, m.training) for m in model.modules()]
    drawn = [(g, g.get_state()) for g in own_generators(trial.loss_fn)]  # (put back: training draws the same)
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]):
            outs = [model(b[0]) for b in taken]
            if all(_float_tuple(o) for o in outs):
                return _tuple_null(trial, outs, [b[1] for b in taken]), None
            if not all(isinstance(o, Tensor) and o.is_floating_point() for o in outs):
                return math.nan, None
            ys = [b[1] for b in taken]
            value = float(np.mean([float(trial.loss_fn(torch.zeros_like(o), y)) for o, y in zip(outs, ys)]))
            shape = outs[0].shape[1:]
            start = torch.zeros(shape, dtype=outs[0].dtype, device=outs[0].device)
            if all(isinstance(y, Tensor) and y.is_floating_point() and y.shape == o.shape for o, y in zip(outs, ys)):
                mean = torch.cat([y.reshape(-1, *o.shape[1:]) for o, y in zip(outs, ys)]).mean(0)
                at_mean = _constant_loss(trial, mean, outs, ys)
                if at_mean < value:
                    start, value = mean, at_mean
            same_shape = all(o.shape[1:] == shape for o in outs)
            constant = start if same_shape else None
            if same_shape and shape.numel() <= BEST_CONSTANT_SIZE:
                best, at_best = _best_constant(trial, start, outs, ys)
                if best < FAR_OFF * value:  # a loss that transforms the output: zeros and the mean are far off
                    value, constant = best, at_best
    except Exception:  # noqa: BLE001 — a set-up whose loss takes more than (output, target): no ceiling
        return math.nan, None
    finally:
        for m, was in modes:
            m.training = was
        for g, state in drawn:
            g.set_state(state)
    return (value, constant) if math.isfinite(value) else (math.nan, None)


GENERATOR_REACH = 64  # objects looked through for a loss function's own random generators


def own_generators(fn: Any) -> list[torch.Generator]:
    """The ``torch.Generator`` objects a loss function draws from besides torch's global one: those its closure
    holds, a ``functools.partial``'s arguments, and the attributes of the object it is a method of or is (one level).
    A loss that samples (a policy's actions from ``torch.multinomial(…, generator=g)``) draws from them each time it
    is called; the doctor's extra calls put their states back (round 46: an actor-critic's baseline in the doctor
    scored 0.20 where the same run plainly scored 0.35)."""
    found: list[torch.Generator] = []
    todo: list[Any] = [fn]
    seen: set[int] = set()
    while todo and len(seen) < GENERATOR_REACH:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Generator):
            found.append(obj)
            continue
        for cell in getattr(obj, "__closure__", None) or ():
            try:
                todo.append(cell.cell_contents)
            except ValueError:  # an empty cell
                pass
        if isinstance(obj, functools.partial):
            todo += [obj.func, *obj.args, *obj.keywords.values()]
        for holder in (getattr(obj, "__self__", None), obj):  # a method's object, a loss module's own attributes
            if holder is not None and not isinstance(holder, type) and hasattr(holder, "__dict__"):
                todo += [v for v in vars(holder).values() if isinstance(v, torch.Generator)]
    return found


def _float_tuple(out: Any) -> bool:
    """A tuple or list of float tensors: a model that returns (reconstruction, code), (logits, aux), …"""
    return isinstance(out, (tuple, list)) and bool(out) and all(isinstance(o, Tensor) and o.is_floating_point() for o in out)


def _tuple_null(trial: Any, outs: list, ys: list) -> float:
    """The null loss of a model that returns several tensors: each at zeros, or, where one has the targets' shape
    and they are floats, that one at the targets' mean — the lower (round 15: a sparse autoencoder's
    (reconstruction, latents) had no ceiling, and a row ending at 9× the baseline's loss passed as a fix). NaN where
    the loss fails or is not finite; no constant output is kept (the score of a constant is not measured)."""

    def rebuilt(o: Any, parts: list[Tensor]) -> Any:
        try:
            return type(o)(parts)
        except TypeError:  # a namedtuple takes its fields one by one
            return type(o)(*parts)

    def loss(fill: Callable[[Tensor, Any], Tensor]) -> float:
        return float(np.mean([float(trial.loss_fn(rebuilt(o, [fill(t, y) for t in o]), y)) for o, y in zip(outs, ys)]))

    value = loss(lambda t, y: torch.zeros_like(t))
    if all(isinstance(y, Tensor) and y.is_floating_point() for y in ys):
        mean = torch.cat([y.reshape(-1, *y.shape[1:]) for y in ys]).mean(0)
        value = min(value, loss(lambda t, y: mean.expand_as(t) if t.shape == y.shape else torch.zeros_like(t)))
    return value if math.isfinite(value) else math.nan


class ConstantModel(nn.Module):
    """A model that answers every input with one constant output (one sample's shape), as many rows as the first
    tensor of its input has: what a net that learned nothing of its inputs would predict at best. Given the model it
    stands for (``like``), each of that model's submodules' names reads as this constant model itself."""

    def __init__(self, output: Tensor, like: nn.Module | None = None) -> None:
        super().__init__()
        self.output = nn.Parameter(output.detach().clone(), requires_grad=False)
        self.calls = 0  # forward passes: an evaluate that never calls its argument did not score this model
        # the names of ``like``'s submodules (every part of their paths): an evaluate that calls ``model.net(x)``
        # calls this constant too (round 28: a TD value net's evaluate read ``model.net``; no constant's score was
        # measured, and a remedy at R² −49 against a baseline's −103 was called a fix)
        names = [name for name, _ in like.named_modules()] if like is not None else []
        self._parts = frozenset(part for name in names for part in name.split(".") if part)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name != "_parts" and name in self.__dict__.get("_parts", ()):
                return self
            raise

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        self.calls += 1
        first = _first_tensor((args, kwargs))
        if first is None or first.dim() == 0:
            raise ValueError("ConstantModel: no batched tensor in the input to take the batch size from")
        return self.output.expand(first.shape[0], *self.output.shape).clone()


def _first_tensor(obj: Any) -> Tensor | None:
    """The first tensor in a nest of tuples, lists and dicts (None: none)."""
    if isinstance(obj, Tensor):
        return obj
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (tuple, list)) else ()
    for item in items:
        found = _first_tensor(item)
        if found is not None:
            return found
    return None


def null_score(trial: Any, output: Tensor | None) -> float:
    """The set-up's held-out score of :class:`ConstantModel` answering ``output`` (from :func:`null_output`):
    where a score has no fixed chance level (R², D², a reward), the level a remedy must beat to have learned
    anything of the inputs. NaN where it cannot be measured: no evaluate, no constant, an evaluate that fails on
    such a model, or one that never calls it (an evaluate that ignores its argument and reads the trained model).
    A constant may score exactly what the trained model scored: round 20's classifier of 5 % positives that
    predicts none scores a balanced accuracy of 0.500, as every constant does — it learned nothing a constant
    would not (a score equal to the trained model's was once taken for an evaluate that ignores its argument). Runs
    under a forked random state: training's random numbers are not touched."""
    if output is None or getattr(trial, "evaluate", None) is None:
        return math.nan
    model = ConstantModel(output, like=getattr(trial, "model", None))
    try:
        with torch.random.fork_rng(devices=[]):
            value = float(trial.evaluate(model))
    except Exception:  # noqa: BLE001 — an evaluate that reads the model's own parts or inputs: no null score
        return math.nan
    return value if math.isfinite(value) and model.calls else math.nan
