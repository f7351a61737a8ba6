"""Step drivers: who tells the watch that a step's gradients are ready and that the step is over.

- ``optimizer`` (``gw.watch`` with an optimizer): the optimizer's step
  pre-hook says "gradients ready" (accumulated gradients are read once), its
  post-hook "step done"; under ``optimizer.step(closure)`` (L-BFGS) the
  gradients are read after the closure's first evaluation, which computes
  them. A ``GradScaler`` that skips a step for inf/NaN
  gradients never calls ``optimizer.step()``; wrapping the scaler's ``step``
  notices that, and the skipped step is recorded too.
- ``backward`` (no optimizer): a step is one backward pass; at its end the
  gradients are read and the step closes at once.
- ``external`` (a framework's callbacks): the caller says it, through
  :meth:`Watch.gradients_ready` and :meth:`Watch.step_done`; an optimizer
  post-hook only tells a taken step from a skipped one. For trainers that clip
  the gradients before any callback sees them, :meth:`Watch.stage_after_backward`
  reads them at the end of backward instead.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Protocol

import torch
from torch import Tensor, nn

from gradwatch.probes.hostcopy import device_scalar
from gradwatch.probes.weakhook import WeakHook


class Driven(Protocol):
    """The watch as its driver sees it: the steps' sequence (:class:`~gradwatch.watching.handle.Watch`)."""

    optimizer: torch.optim.Optimizer | None

    @property
    def step(self) -> int: ...

    @property
    def closed(self) -> bool: ...

    def _run_guarded(self, fn: Callable[..., Any], *args: Any) -> Any: ...

    def _gradients_ready(self) -> None: ...

    def _step_done(self) -> None: ...

    def _step_skipped(self) -> None: ...

    def _backward_step(self) -> None: ...

    def _stage(self, scale: Tensor | None) -> None: ...

    def _optimizer_stepped(self) -> None: ...


class Driver:
    """Places the hooks that drive a watch's steps."""

    kind = ""

    def __init__(self, watch: Driven, params: list[nn.Parameter], scaler: Any) -> None:
        self.watch = watch  # (read by the check for a model that is already watched)
        self.params = params
        self.scaler = scaler

    def place(self) -> list[Any]:
        """Place the hooks; returns their handles (each with ``remove()``)."""
        raise NotImplementedError

    def meta(self) -> dict[str, Any]:
        """What the driver saw of the set-up, for the run's meta (read at flush and close): with a scaler given,
        ``loss_scale_last``, its scale when read (one host read): the gradients it scales are that many times the
        ones the watch records (a clip applied before ``scaler.unscale_`` bounds the scaled ones)."""
        try:
            if self.scaler is not None and self.scaler.is_enabled():
                return {"loss_scale_last": float(self.scaler.get_scale())}
        except Exception:  # a scaler of another make: nothing said
            pass
        return {}


class OptimizerDriver(Driver):
    """Gradients ready before ``optimizer.step()``, the step done after it; a scaler's skipped steps too."""

    kind = "optimizer"

    def place(self) -> list[Any]:
        optimizer = self.watch.optimizer
        assert optimizer is not None
        handles: list[Any] = [optimizer.register_step_pre_hook(self._before),
                              optimizer.register_step_post_hook(self._after)]
        if self.scaler is not None:
            self._wrap = ScalerStepWrap(self.scaler, self.watch)
            handles.append(self._wrap)
        return handles

    _wrap: ScalerStepWrap | None = None
    outside = 0  # optimizer steps taken outside the scaler's step(optimizer)

    def _before(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if self._wrap is not None and not self._wrap.inside:
            self.outside += 1
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)  # args: (optimizer, closure)
        if callable(closure):
            return read_after_first_call(closure, self.watch, args, kwargs)
        self.watch._gradients_ready()
        return None

    def meta(self) -> dict[str, Any]:
        """With a scaler given: ``steps_outside_scaler``, the optimizer steps not taken through
        ``scaler.step(optimizer)`` — their gradients were never unscaled (round 27: ``optimizer.step()`` where
        ``scaler.step(optimizer)`` belongs, float16 autocast on the CPU, NaN at step 1)."""
        return {**super().meta(), **({"steps_outside_scaler": self.outside} if self._wrap is not None else {})}

    def _after(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        self.watch._step_done()


def read_after_first_call(closure: Callable[[], Any], watch: Driven, args: tuple,
                          kwargs: dict) -> tuple[tuple, dict]:
    """``optimizer.step(closure)``'s arguments as its pre-hook gets them (``args``: the optimizer, then the closure,
    unless passed by name) with the closure wrapped: the step's gradients are the ones its first
    evaluation computes (at the weights the step starts from), so they are read right after it, not before the
    step (round 27's L-BFGS: read in the pre-hook, every step recorded the gradient of the previous step's last
    evaluation, and the first step none). What the closure returns is returned unchanged; an optimizer that never
    calls it has no gradients read that step."""
    called = False

    def first_read() -> Any:
        nonlocal called
        out = closure()
        if not called:
            called = True
            watch._gradients_ready()
        return out

    if "closure" in kwargs:
        return args, {**kwargs, "closure": first_read}
    return (args[0], first_read, *args[2:]), kwargs


class BackwardDriver(Driver):
    """No optimizer: each backward pass is a step, read and closed when the pass ends."""

    kind = "backward"

    def place(self) -> list[Any]:
        self._end = EndOfBackward(self.watch, self.params, self.watch._backward_step)
        return self._end.place()


class ExternalDriver(Driver):
    """The caller drives the steps; the optimizer's post-hook only says that a step was taken."""

    kind = "external"

    def place(self) -> list[Any]:
        optimizer = self.watch.optimizer
        return [optimizer.register_step_post_hook(self._stepped)] if optimizer is not None else []

    def _stepped(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        self.watch._optimizer_stepped()

    def stage_after_backward(self, when: Callable[[], bool], device: torch.device) -> list[Any]:
        """At the end of every backward pass for which ``when()`` holds, stage the gradient statistics."""

        def stage() -> None:
            if when():
                self.watch._stage(current_scale(self.scaler, device))

        self._end = EndOfBackward(self.watch, self.params, stage)
        return self._end.place()


DRIVERS: dict[str, type[Driver]] = {"optimizer": OptimizerDriver, "backward": BackwardDriver, "external": ExternalDriver}


def driver_kind(driver: str, optimizer: torch.optim.Optimizer | None) -> str:
    """The driver ``driver`` names; "auto": the optimizer's hooks with an optimizer, else the end of backward."""
    if driver == "auto":
        return "optimizer" if optimizer is not None else "backward"
    return driver


def make_driver(kind: str, watch: Driven, params: list[nn.Parameter], scaler: Any) -> Driver:
    """The driver of ``kind`` ("optimizer", "backward" or "external") for ``watch``."""
    return DRIVERS[kind](watch, params, scaler)


class EndOfBackward:
    """Calls ``then`` once at the end of every backward pass that accumulates into the parameters' ``.grad``.

    The first parameter's post-accumulate hook of a pass queues an engine
    callback, which runs when the whole pass is over.
    """

    def __init__(self, watch: Driven, params: list[nn.Parameter], then: Callable[[], None]) -> None:
        self.watch = watch
        self._params = params
        self._then = then
        self._queued = False  # the callback of the running backward pass is queued

    def place(self) -> list[Any]:
        return [p.register_post_accumulate_grad_hook(WeakHook(self, "_accumulated")) for p in self._params]

    def _accumulated(self, param: Tensor) -> None:
        self.watch._run_guarded(self._queue)

    def _queue(self) -> None:
        if not self._queued:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._ended)

    def _ended(self) -> None:
        self.watch._run_guarded(self._end)

    def _end(self) -> None:
        self._queued = False
        self._then()


class ScalerStepWrap:
    """Wraps one GradScaler's ``step`` (on the instance) so that a step it skips is recorded.

    ``GradScaler.step(optimizer)`` unscales the gradients, then calls
    ``optimizer.step()`` only if they are all finite. A skipped step therefore
    never reaches the optimizer's hooks, and the watch's step does not end;
    the wrap notices that and records it (gradient statistics with their
    NaN/Inf, ``skipped_step`` = 1 and the ``loss_scale``). ``remove()`` puts the
    class's method back.
    """

    def __init__(self, scaler: Any, watch: Driven) -> None:
        self.scaler = scaler
        self.inside = False  # within the scaler's step (the optimizer's steps it takes are its)
        original = scaler.step

        @functools.wraps(original)
        def step(optimizer: Any, *args: Any, **kwargs: Any) -> Any:
            before = watch.step
            self.inside = True
            try:
                out = original(optimizer, *args, **kwargs)
            finally:
                self.inside = False
            if optimizer is watch.optimizer and watch.step == before and not watch.closed:
                watch._step_skipped()
            return out

        step.__gradwatch__ = watch  # type: ignore[attr-defined]
        scaler.step = step

    def remove(self) -> None:
        self.scaler.__dict__.pop("step", None)


def current_scale(scaler: Any, device: torch.device) -> Tensor | None:
    """The GradScaler's current scale as a float64 device tensor (no host read), or None without one."""
    if scaler is None or not scaler.is_enabled():
        return None
    scale = getattr(scaler, "_scale", None)  # the scaler's own tensor, on the device
    if not isinstance(scale, Tensor):  # not created yet, or a scaler of another make
        return device_scalar(float(scaler.get_scale()), torch.float64, device)
    return scale.detach().to(device, torch.float64).reshape(())


def skipped_scale(scaler: Any, after_update: bool) -> float:
    """The loss scale a skipped step used (a host read, on skipped steps only).

    ``after_update``: read after ``scaler.update()`` backed off (a callback closing the step late).
    """
    scale = float(scaler.get_scale())
    return scale / scaler.get_backoff_factor() if after_update else scale
