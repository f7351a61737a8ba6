"""Whether ``.grad`` is zeroed between optimizer steps (round 8: a loop that never calls ``optimizer.zero_grad()``).

PyTorch accumulates into ``.grad``: without ``zero_grad()`` each step applies
the sum of every gradient so far, and training blows up for no reason the
gradient statistics can name (they read the sum). A hook on one trained
parameter, which autograd calls with the fresh gradient before accumulating
it, reads that parameter's ``.grad`` at the first backward after each
optimizer step: it should be None (``set_to_none``, the default) or zero. The
count of steps where it was not stays on the device (no synchronisation) and
is written to the meta at flush and close, ``grads_not_zeroed`` = [steps where
``.grad`` still held a gradient, steps checked] — a ``.grad`` of zeros is left
out of the steps checked, since it is what ``zero_grad(set_to_none=False)``
leaves and also what a sum of zeros leaves (units that died upstream: round
43's loop that zeroed once every 21 steps blew up, its units died, and then
only a third of its steps counted stale). Nothing is changed: the hook
returns nothing, so autograd accumulates the gradient as it would.

The last trained parameter's ``.grad`` (the output layer's: a gradient every
step, where dead units leave the first layer's at 0) is held from each optimizer
step to the next forward pass of the model, with its version counter: a gradient changed in
place in between, and not to zero, was changed after the step had used it — a
``clip_grad_norm_`` placed after ``optimizer.step()`` (round 36: graphstorm#1366)
clips nothing the step applied. ``grads_changed_after_step`` = [steps where it
was, steps checked].

Two more reads of the loop live here: :class:`WrittenCheck`, whether something
other than the optimizer writes the weights between its steps (an EMA copied in
for evaluation and never restored), and :class:`LrTrack`, the learning rates a
schedule takes to ~0, the largest and each group's.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch import Tensor, nn


class ZeroGradCheck:
    """Reads whether one parameter's ``.grad`` was zeroed since the last optimizer step, at each first backward."""

    def __init__(self, param: nn.Parameter, optimizer: torch.optim.Optimizer, guard: Callable[..., Any],
                 model: nn.Module | None = None, last: nn.Parameter | None = None) -> None:
        self.param = param
        self.last = param if last is None else last
        self.stepped = False  # an optimizer step has run since the last check
        self.checks = 0
        # backward passes that reached the parameter, and optimizer steps: gradient accumulation makes several a
        # step, where a net called several times in one graph (a GAN critic's real, fake and interpolated passes, a
        # siamese net's two) makes one (autograd sums a leaf's gradient over its uses before the hook)
        self.backwards = 0
        self.steps = 0
        self._stale: Tensor | None = None  # steps whose .grad was not zeroed, on the device
        self._unclear: Tensor | None = None  # ... and those whose .grad was all 0 (left out of the steps checked)
        self._used: tuple[Tensor, int] | None = None  # the .grad the last step used, and its version then
        self.after_checks = 0
        self._changed: Tensor | None = None  # steps whose used .grad was changed in place (not zeroed), on the device
        self.handles = [param.register_hook(functools.partial(guard, self._fresh)),
                        optimizer.register_step_post_hook(functools.partial(guard, self._stepped))]
        if model is not None:
            self.handles.append(model.register_forward_pre_hook(
                torch.compiler.disable(functools.partial(guard, self._forward))))

    def _stepped(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        self.stepped = True
        self.steps += 1
        grad = self.last.grad
        self._used = None if grad is None else (grad, grad._version)

    @torch.no_grad()
    def _forward(self, module: nn.Module, args: tuple) -> None:
        if self._used is None:
            return
        (grad, version), self._used = self._used, None  # (held no longer than this: its memory is the user's)
        self.after_checks += 1
        if grad._version != version:
            hit = grad.ne(0).any().long()
            self._changed = hit if self._changed is None else self._changed + hit

    @torch.no_grad()
    def _fresh(self, grad: Tensor) -> None:
        self.backwards += 1
        if not self.stepped:
            return  # a later micro-batch of the same step: accumulating is what it should do
        self.stepped = False
        self.checks += 1
        old = self.param.grad
        if old is not None:
            hit = old.ne(0).any().long()
            self._stale = hit if self._stale is None else self._stale + hit
            # a .grad of zeros tells nothing: zeroed (set_to_none=False), or a sum of zeros (dead units upstream)
            self._unclear = 1 - hit if self._unclear is None else self._unclear + 1 - hit

    def meta(self) -> dict[str, Any]:
        unclear = int(self._unclear) if self._unclear is not None else 0
        return {"grads_not_zeroed": [int(self._stale) if self._stale is not None else 0, self.checks - unclear],
                "grads_changed_after_step": [int(self._changed) if self._changed is not None else 0,
                                             self.after_checks],
                "backwards_per_step": round(self.backwards / self.steps, 2) if self.steps else None}


WRITTEN_MAX = 1 << 16  # the parameter read for writes between steps is copied at each step: at most this many entries


class WrittenCheck:
    """Whether something other than the optimizer writes the weights between its steps (round 38: an EMA's averaged
    weights copied into the model for a validation pass every 10 steps and never restored, Open-Sora-Plan#186 —
    training went on from weights ~75 % of the way back to their start, 0.14 held out against 1.00, "the gradients
    look healthy").

    One small trained parameter is copied after each optimizer step, with its version counter; at the first backward
    after the step (autograd's hook on it, which sees the values the forward pass used) a changed version and changed
    values count as a write, and values nearer the parameter's start than the step left them as a write that set the
    weights back. Restoring the step's weights after an evaluation is no write. The counts stay on the device (no
    synchronisation); ``weights_written`` = [steps written, of which set back, steps checked]."""

    def __init__(self, param: nn.Parameter, optimizer: torch.optim.Optimizer, guard: Callable[..., Any]) -> None:
        self.param = param
        self.start = param.detach().clone()
        self.checks = 0
        self._after: tuple[Tensor, int] | None = None
        self._written: Tensor | None = None
        self._back: Tensor | None = None
        self.handles = [optimizer.register_step_post_hook(functools.partial(guard, self._stepped)),
                        param.register_hook(functools.partial(guard, self._backward))]

    @torch.no_grad()
    def _stepped(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        self._after = (self.param.detach().clone(), self.param._version)

    @torch.no_grad()
    def _backward(self, grad: Tensor) -> None:
        if self._after is None:
            return  # before the first step, or a later micro-batch of the same step
        (after, version), self._after = self._after, None
        self.checks += 1
        if self.param._version == version:
            return
        now = self.param.detach()
        hit = now.ne(after).any()
        back = hit & ((now - self.start).norm() < (after - self.start).norm())
        self._written = hit.long() if self._written is None else self._written + hit
        self._back = back.long() if self._back is None else self._back + back

    def meta(self) -> dict[str, Any]:
        return {"weights_written": [int(self._written) if self._written is not None else 0,
                                    int(self._back) if self._back is not None else 0, self.checks]}


def smallest_trained(model: nn.Module, optimizer: Any) -> nn.Parameter | None:
    """The model's smallest floating parameter that requires a gradient and that ``optimizer`` holds, of at most
    :data:`WRITTEN_MAX` entries (None: none)."""
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    found = [p for p in model.parameters() if p.requires_grad and id(p) in held and p.is_floating_point()
             and 0 < p.numel() <= WRITTEN_MAX]
    return min(found, key=lambda p: p.numel(), default=None)


def first_trained(model: nn.Module, optimizer: Any = None, last: bool = False) -> nn.Parameter | None:
    """The model's first (``last``: last) parameter that requires a gradient and, given an optimizer, that it holds
    (its ``zero_grad()`` clears no other: a layer no optimizer holds keeps its .grad whatever the loop does)."""
    held = None if optimizer is None else {id(p) for g in optimizer.param_groups for p in g["params"]}
    params = list(model.parameters())
    return next((p for p in (params[::-1] if last else params)
                 if p.requires_grad and (held is None or id(p) in held)), None)


def plateau_schedulers(optimizer: Any) -> list[Any]:
    """The ``ReduceLROnPlateau`` schedulers built on ``optimizer``, found among the objects that refer to it (an
    optimizer does not know its schedulers; the garbage collector does: a scan of the heap, read once where a rate
    fell)."""
    import gc

    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau
    return [x for x in gc.get_referrers(optimizer) if isinstance(x, plateau) and x.optimizer is optimizer]


def plateau_meta(optimizer: Any) -> list[dict[str, Any]]:
    """Each ``ReduceLROnPlateau`` on ``optimizer`` (:func:`plateau_schedulers`) as its mode, factor, patience and the
    best value it has seen."""
    return [{"mode": str(x.mode), "factor": float(x.factor), "patience": int(x.patience),
             "best": float(x.best) if isinstance(x.best, (int, float)) else None}
            for x in plateau_schedulers(optimizer)]


LR_LOW = 1e-3  # a learning rate at this fraction of its first read, or below, is ~0


class LrTrack:
    """The optimizer's largest learning rate after each of its steps (a Python float, no synchronisation): the step
    from which it stays at :data:`LR_LOW` × its first read or below — a schedule that took it to ~0 early (StepLR
    meant per epoch stepped per batch) rather than at the end, where cosine annealing and OneCycleLR put it."""

    def __init__(self, optimizer: torch.optim.Optimizer, guard: Callable[..., Any]) -> None:
        self.optimizer = optimizer
        self.steps = 0
        self.first: float | None = None
        self.peak: float | None = None  # the largest rate after any step (a warm-up that never ends: below its base)
        self.low_from: int | None = None  # the first step of the stretch at ~0 that lasts to now
        # each group's first rate and the step from which it stays at ~0 (round 38: a layer-wise decay compounded at
        # every step took three of four groups to 10⁻⁴⁰–10⁻¹¹⁶ while the head's kept its rate, and so the largest)
        self.group_first: list[float] = []
        self.group_low_from: list[int | None] = []
        self.handles = [optimizer.register_step_post_hook(functools.partial(guard, self._stepped))]

    def _stepped(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        rates = [g["lr"] for g in optimizer.param_groups if isinstance(g.get("lr"), (int, float))]
        self.steps += 1
        if not rates:
            return
        if len(rates) != len(self.group_first):  # the first step, or groups added since: start their count over
            self.group_first, self.group_low_from = [float(r) for r in rates], [None] * len(rates)
        for i, rate in enumerate(rates):
            low = self.group_first[i] > 0 and rate <= LR_LOW * self.group_first[i]
            self.group_low_from[i] = (self.group_low_from[i] or self.steps) if low else None
        lr = float(max(rates))
        if self.first is None:
            self.first = lr
        self.peak = lr if self.peak is None else max(self.peak, lr)
        if self.first > 0 and lr <= LR_LOW * self.first:
            if self.low_from is None:
                self.low_from = self.steps
        else:
            self.low_from = None

    def low_groups(self) -> dict[int, int]:
        """The groups whose rate has stayed at ~0 (:data:`LR_LOW` × their first read or below) since a step: group
        index -> that step."""
        return {i: at for i, at in enumerate(self.group_low_from) if at is not None}

    def meta(self) -> dict[str, Any]:
        return {"optimizer_lr_low_from": self.low_from, "optimizer_steps": self.steps, "optimizer_lr_peak": self.peak}
