"""The handle ``gw.watch`` returns: hooks on, records every step on a schedule.

Flow of one step (steps count optimizer steps when an optimizer is given,
otherwise backward passes):

1. forward — the first forward hook of the step sends the previous step's
   values on; on sampled steps, activation modules' forward hooks compute
   activation statistics and layers' forward hooks place tensor hooks on
   their outputs (for ‖∂L/∂a‖) (:mod:`~gradwatch.watching.sampled`);
2. backward — those tensor hooks collect the output-gradient norms;
3. gradients ready (the optimizer's pre-step hook, the end of backward, or a
   callback: :mod:`~gradwatch.watching.drivers`) — gradient norms and
   non-finite counts, and on update steps a copy of the weights;
4. step done (the optimizer's post-step hook, or a callback) — update ratios;
   the step's values wait in the :class:`~gradwatch.watching.buffer.StepBuffer`
   for one host copy and go on to the store's writer thread.

Hooks read under ``no_grad``, never return a modified gradient, and catch
their own errors: a failure stops the recording with a warning, never the
training.
"""

from __future__ import annotations

import functools
import numbers
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np
import torch
from torch import Tensor, nn

from gradwatch._errors import GradwatchWarning, bad_argument
from gradwatch.diagnosis import Diagnosis, Thresholds, diagnose
from gradwatch.layers import anatomy
from gradwatch.probes.grads import GradProbe, Stats
from gradwatch.store import DB_NAME, NullWriter, Run, RunLock, StoreWriter, open_run
from gradwatch.watching.buffer import StepBuffer
from gradwatch.watching.depth import DepthOrder
from gradwatch.watching.drivers import ExternalDriver, current_scale, make_driver, skipped_scale
from gradwatch.watching.metadata import run_metadata
from gradwatch.watching.options import WatchOptions
from gradwatch.watching.sampled import SampledProbes

F = TypeVar("F", bound=Callable[..., Any])


def _guarded(fn: F) -> F:
    """Run a hook body under the watch's guard: on error, stop recording with a warning instead of raising."""

    @functools.wraps(fn)
    def wrapper(self: Watch, *args: Any) -> Any:
        return self._run_guarded(fn, self, *args)

    return wrapper  # type: ignore[return-value]


@dataclass
class Step:
    """The step in progress: its number and what has happened in it so far (a fresh one per step)."""

    number: int
    sampled: bool | None = None  # the activations schedule's answer, asked at the step's first forward pass
    scale: Tensor | None = None  # the loss scale on the backward pass, if ‖∂L/∂a‖ or ‖∂L/∂h_t‖ was read during it
    staged: Stats | None = None  # gradient statistics read at the end of backward (before clipping), to be kept
    stepped: bool = False  # optimizer.step() ran since the gradients were read (external driver: else a skip)


class Watch:
    """The handle returned by :func:`gradwatch.watch`: holds the hooks and the run store.

    Use it as a context manager, or call :meth:`close`. A watch made with
    ``driver="external"`` is driven by its caller through
    :meth:`gradients_ready`, :meth:`step_done` and, for trainers that clip
    before a callback sees the gradients, :meth:`stage_after_backward`.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, options: WatchOptions, *,
                 run_dir: Path | None, lock: RunLock | None = None, recurrent: list[tuple[str, nn.Module]] | None = None,
                 driver: str = "auto", scaler: Any = None) -> None:
        self.model = model
        self.optimizer = optimizer
        self.path: Path = run_dir  # type: ignore[assignment]  # None on a shard follower (rank ≠ 0)
        self._every, self._sampled = options.grad_schedule, options.sampled_schedule
        self._update = options.update_schedule if optimizer is not None else None
        self._scaler = scaler
        self._closed = False
        self._failed: BaseException | None = None
        self._now = Step(0)
        self._handles: list[Any] = []

        parts = anatomy(model)
        self._layers, self._acts = parts.layers, parts.activations
        self._grads = GradProbe(self._layers)
        self._device = self._grads.device
        self._probes = SampledProbes(self._acts, self._grads.params, self._device, recurrent or [],
                                     options.temporal_auto, self._run_guarded)
        # On ranks other than 0 of a sharded job the watch measures (its slices join the all-reduce)
        # and keeps nothing.
        self._writer = StoreWriter(run_dir / DB_NAME, lock) if run_dir is not None else NullWriter()
        w = self._writer
        ids = {"layer": np.array([w.entity(l.name, "layer", type(l.module).__name__) for l in self._layers]),
               "param": np.array([w.entity(n, "param") for n in self._grads.pair_names]),
               "activation": np.array([w.entity(a.name, "activation", type(a.module).__name__) for a in self._acts])}
        self._recurrent_ids = {name: w.entity(name, "recurrent", cell) for name, cell in self._probes.temporal.entities()}
        self._buffer = StepBuffer(w, self._device, ids)
        self._depth = DepthOrder()
        self._driver = make_driver(driver, self, self._grads.params, scaler)
        w.meta(run_metadata(model, optimizer, parts, self._grads.params, self._probes.temporal.describe(), self._device,
                            {"every": self._every, "sampled": self._sampled, "update": self._update}))
        # A watch dropped without close() (or still open at exit) still closes its store: the writer's
        # thread stops, its file handles close, its lock goes. (The callback holds the writer, not the watch.)
        weakref.finalize(self, w.close, {"status": "not closed: the watch was dropped, or the process "
                                                   "exited, without close()"})
        try:
            self._place_hooks()
        except BaseException:
            self._remove_hooks()
            w.close()
            raise

    # -- public --------------------------------------------------------------------------
    @property
    def step(self) -> int:
        """Steps completed so far."""
        return self._now.number

    @property
    def closed(self) -> bool:
        return self._closed

    def log(self, **scalars: float | Tensor) -> None:
        """Record run-level scalars such as the loss: ``watch.log(loss=loss)``.

        Tensors are detached and stay on their device until the step's one host
        copy. A value logged after ``optimizer.step()`` and before the next
        forward pass belongs to the step that just ended (whose values are held
        until that forward pass, so that they still travel in one copy).
        """
        if self._closed:
            raise RuntimeError("`Watch.log()` after close(): the run is finished; log before closing the watch, "
                               "or start a new one")
        for key, value in scalars.items():
            if not key:
                raise ValueError(bad_argument("Watch.log", key, "a non-empty scalar name (log(loss=…))", key))
            if isinstance(value, Tensor):
                if value.numel() != 1:
                    raise ValueError(bad_argument("Watch.log", key, "a number or a one-element tensor", value))
                value = value.detach().reshape(()).to(self._device, torch.float64)
            elif isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)):  # numpy scalars too
                value = torch.tensor(float(value), dtype=torch.float64, device=self._device)
            else:
                raise TypeError(bad_argument("Watch.log", key, "a number or a one-element tensor", value))
            if self._failed is None:  # the step in progress, or the one held until the next forward pass
                self._buffer.add_keyed(np.array([[self._writer.entity(key, "run"), self._writer.quantity(key), -1]]),
                                       value)

    def flush(self) -> None:
        """Wait until every record so far is in the store."""
        if not self._closed:
            self._release()
        self._writer.flush()
        self._check_writer()

    def open(self) -> Run:
        """The records so far, read back from the store (flushes first)."""
        self.flush()
        return open_run(self.path)

    def diagnose(self, thresholds: Thresholds | None = None) -> Diagnosis:
        """Findings in words from what was recorded so far (see :func:`gradwatch.diagnose`)."""
        with self.open() as run:
            return diagnose(run, thresholds)

    def report(self, path: str | Path = "report.html", thresholds: Thresholds | None = None,
               redact: bool = False) -> Path:
        """Write the self-contained HTML report of this run; returns its path.

        The page names the run and its path relative to the working directory;
        ``redact=True`` leaves out both (for a report to share).
        """
        from gradwatch.report.html import write_html

        with self.open() as run:
            return write_html(run, path, diagnose(run, thresholds), redact)

    def summary(self, thresholds: Thresholds | None = None) -> str:
        """The terminal report as plain text: one line per layer, then the findings."""
        from gradwatch.report.terminal import render_text

        with self.open() as run:
            return render_text(run, diagnose(run, thresholds))

    def close(self, interrupted_by: BaseException | str | None = None) -> None:
        """Remove every hook, write what is pending, close the store. Idempotent.

        ``interrupted_by``: training stopped early, because of this exception
        (the run's status reads "interrupted by KeyboardInterrupt") or for this
        reason ("interrupted: <reason>").
        """
        if interrupted_by is None:
            self._close("closed")
        elif isinstance(interrupted_by, BaseException):
            self._close(f"interrupted by {type(interrupted_by).__name__}")
        else:
            self._close(f"interrupted: {interrupted_by}")

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: object) -> None:
        self._close("closed" if exc_type is None else f"interrupted by {exc_type.__name__}")

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("failed" if self._failed else "open")
        return f"<gradwatch.Watch {state}, step {self.step}, {len(self._layers)} layers, store {str(self.path)!r}>"

    # -- the public driver interface (driver="external") -----------------------------------
    def gradients_ready(self) -> None:
        """The step's gradients are final: after backward (and a scaler's unscale), before clipping and the step.

        Reads the gradient statistics (or keeps those staged at the end of
        backward) and, on update steps, copies the weights. Accumulating
        micro-batches: call it once, after the last one.
        """
        self._only_external("gradients_ready")
        self._gradients_ready()

    def step_done(self) -> None:
        """The optimizer step is over, or was skipped: update ratios, then the step closes.

        With an optimizer, a step in which ``optimizer.step()`` did not run
        since :meth:`gradients_ready` is recorded as skipped (``skipped_step``).
        """
        self._only_external("step_done")
        self._step_done()

    def stage_after_backward(self, when: Callable[[], bool]) -> None:
        """Read the gradient statistics at the end of every backward pass for which ``when()`` holds.

        For trainers that clip the gradients before any callback sees them
        (Hugging Face): the statistics are read as backward leaves them, and
        :meth:`gradients_ready` records the last ones staged. Gradients still
        carry the loss scale there: with the watch's ``scaler`` given, the
        norms are divided by its scale. A later backward replaces an earlier one.
        """
        self._only_external("stage_after_backward")
        assert isinstance(self._driver, ExternalDriver)
        self._handles += self._driver.stage_after_backward(when, self._device)

    def _only_external(self, what: str) -> None:
        if not isinstance(self._driver, ExternalDriver):
            by = "the optimizer's step hooks" if self._driver.kind == "optimizer" else "the end of each backward pass"
            raise RuntimeError(f"`Watch.{what}()` drives a watch made with gw.watch(..., driver=\"external\"); "
                               f"this one is driven by {by}")

    # -- hooks ---------------------------------------------------------------------------
    def _place_hooks(self) -> None:
        for i, layer in enumerate(self._layers):
            self._handles.append(layer.module.register_forward_hook(functools.partial(self._on_layer_forward, i)))
        for i, a in enumerate(self._acts):
            self._handles.append(a.module.register_forward_hook(functools.partial(self._on_act_forward, i)))
        for _, module in self._probes.temporal.modules:
            self._handles.append(module.register_forward_hook(self._on_recurrent_forward))
        self._handles += self._driver.place()

    def _remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _sampling(self) -> bool:
        """Whether this step's forward-side probes run (asked once per step), and autograd records the pass."""
        now = self._now
        if now.sampled is None:
            now.sampled = self._sampled is not None and bool(self._sampled(now.number))
        return now.sampled and torch.is_grad_enabled()

    @_guarded
    def _on_layer_forward(self, i: int, module: nn.Module, args: tuple, output: Any) -> None:
        self._buffer.release()  # a step that ended: its values go on before this one's come
        self._depth.note(self._layers[i].name, "layer")
        if self._sampling():
            self._probes.layer_output(i, output)

    @_guarded
    def _on_act_forward(self, i: int, module: nn.Module, args: tuple, output: Any) -> None:
        self._buffer.release()
        self._depth.note(self._acts[i].name, "activation")
        if self._sampling():
            self._probes.activation_call(i, module, args, output)

    @_guarded
    def _on_recurrent_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._sampling():
            self._probes.recurrent_call(module, args, output)

    def _run_guarded(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` unless the watch stopped; an error stops the recording, never the training."""
        if self._closed or self._failed is not None:
            return None
        try:
            return fn(*args)
        except Exception as exc:  # noqa: BLE001 - the user's run must go on
            self._fail(exc)
            return None

    # -- one step, as the driver tells it -------------------------------------------------
    @_guarded
    def _gradients_ready(self) -> None:
        self._buffer.release()  # a step that ended with no forward pass since: its values go first, as its own
        now = self._now
        now.stepped = False
        now.scale = current_scale(self._scaler, self._device) if now.sampled else None  # before scaler.update()
        self._probes.add_temporal(self._buffer, now.scale, self._recurrent_ids)  # before the step: the re-run needs
        staged, now.staged = now.staged, None                                     # the forward pass's weights
        if staged is not None:
            self._buffer.add_stats(staged)
        elif self._every(now.number):
            self._buffer.add_stats(self._grads.gradients())
        if self._update is not None and self._update(now.number):
            self._grads.snapshot()

    @_guarded
    def _step_done(self) -> None:
        if isinstance(self._driver, ExternalDriver) and self.optimizer is not None and not self._now.stepped:
            self._mark_skipped()
        if self._grads.has_snapshot:
            self._buffer.add_stats(self._grads.updates())
        self._end_step()

    @_guarded
    def _step_skipped(self) -> None:
        """GradScaler.step() found inf/NaN and did not call optimizer.step(): record the step anyway."""
        self._gradients_ready()  # the scaler unscaled the gradients before it looked
        self._mark_skipped()
        self._step_done()

    @_guarded
    def _backward_step(self) -> None:
        """No optimizer: the backward pass that just ended is the step."""
        self._buffer.release()
        self._probes.add_temporal(self._buffer, self._now.scale, self._recurrent_ids)
        if self._every(self._now.number):
            self._buffer.add_stats(self._grads.gradients())
        self._end_step()

    @_guarded
    def _stage(self, scale: Tensor | None) -> None:
        """Read the gradient statistics now (before clipping), for the step's gradients_ready() to keep.

        ``scale``: a loss scale still on the gradients (float16 with a GradScaler that has not unscaled
        them yet); norms are divided by it.
        """
        if self._every(self._now.number):
            stats = self._grads.gradients()
            if stats is not None and scale is not None:
                layers, per_layer, pairs, per_pair = stats["grad_norm"]
                stats["grad_norm"] = (layers, per_layer / scale, pairs, per_pair / scale)
            self._now.staged = stats

    def _optimizer_stepped(self) -> None:
        self._now.stepped = True

    def _mark_skipped(self) -> None:
        self.log(skipped_step=1.0)
        if self._scaler is not None:  # the scale this step used; a callback closes the step after update() backed off
            self.log(loss_scale=skipped_scale(self._scaler, after_update=isinstance(self._driver, ExternalDriver)))

    def _end_step(self) -> None:
        self._buffer.release()  # two steps without a forward pass between them
        now = self._now
        self._probes.add_step(self._buffer, now.scale)
        self._buffer.hold(now.number)
        if not self._depth.settled:
            layer_of = [self._layers[i].name for i in self._grads.pair_layer]
            self._depth.settle(self._writer, list(zip(self._grads.pair_names, layer_of)))
        self._check_writer()
        self._now = Step(now.number + 1)

    # -- failure and closing -------------------------------------------------------------
    @_guarded
    def _release(self) -> None:
        self._buffer.release()

    def _check_writer(self) -> None:
        if self._writer.error is not None and self._failed is None:
            self._fail(self._writer.error)

    def _fail(self, exc: BaseException) -> None:
        self._failed = exc
        self._buffer.clear()
        self._probes.clear()
        self._grads.drop_snapshot()
        warnings.warn(
            f"gradwatch stopped recording at step {self.step} ({type(exc).__name__}: {exc}); "
            f"training goes on, and {self.path} keeps what was recorded before.",
            GradwatchWarning,
            stacklevel=4,
        )

    def _close(self, status: str) -> None:
        if self._closed:
            return
        self._remove_hooks()
        try:
            if self._failed is None:
                self._release()
                self._buffer.emit(self.step)  # what the unfinished step has (a value logged after the last one)
        finally:
            self._closed = True
            self._writer.close({"status": status if self._failed is None else f"failed: {self._failed}",
                                "steps": self.step})
