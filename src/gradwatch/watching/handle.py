"""The handle ``gw.watch`` returns: the hooks, the store, and the public API.

The handle places the hooks and runs every hook body under its guard: a
failure stops the recording with a :class:`~gradwatch.GradwatchWarning`,
never the training. What a step records is the
:class:`~gradwatch.watching.steps.StepRecorder`'s; who says when a step's
gradients are ready and when it is over is the driver's
(:mod:`~gradwatch.watching.drivers`).
"""

from __future__ import annotations

import collections
import functools
import math
import numbers
import warnings
import weakref
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np
import torch
from torch import Tensor, nn

from gradwatch._errors import GradwatchWarning, bad_argument
from gradwatch.diagnosis import Diagnosis, Thresholds, diagnose
from gradwatch.layers import anatomy
from gradwatch.probes.functional import through_shapes
from gradwatch.probes.graph_scan import Foreign, held_parameters, made_in_forward, scan_graph
from gradwatch.probes.hostcopy import device_scalar
from gradwatch.probes.input_grads import InputGradients
from gradwatch.probes.layout import LayoutSeen
from gradwatch.probes.loss_ops import (QUADRATIC_TARGETS_MAX, binary_ce_input, derivative_ops, loss_graph, loss_paths,
                                       margin_targets_off_gradient, targets_off_gradient)
from gradwatch.probes.padding import PaddingReads
from gradwatch.probes.weakhook import WeakHook
from gradwatch.store import DB_NAME, NullWriter, Run, RunLock, StoreWriter, open_run
from gradwatch.watching.drivers import ExternalDriver, driver_kind, make_driver
from gradwatch.watching.metadata import max_group, not_in_optimizer, run_metadata
from gradwatch.watching.residual import ResidualSeen, first_tensor
from gradwatch.watching.user_hooks import HookCount
from gradwatch.watching.zeroing import (LrTrack, WrittenCheck, ZeroGradCheck, first_trained, plateau_meta,
                                       smallest_trained)
from gradwatch.watching.options import WatchOptions
from gradwatch.watching.steps import StepRecorder

F = TypeVar("F", bound=Callable[..., Any])
AT_BOUND_ABOVE = 0.25  # a layer whose weights sit at ±max|w| this often or more was clipped there
# A weight matrix whose gradient is exactly 0 on this share of its entries or more, on four in five of its rows and of
# its columns whole (not the rows of dead units alone, nor the columns of absent one-hot inputs alone), at the
# ZERO_GRAD_STEP-th training step: an operation with zero derivative in the weights' own path (round 25:
# torch.round(w / s) * s, a quantiser without its straight-through estimator, left one entry of 8192 a gradient).
# Not the first step: a layer whose successor starts at exactly 0 (a residual branch's last layer zero-initialised,
# Goyal et al. 2017; Fixup) gets no gradient there by design, and one after the first updates.
ZERO_GRAD_ABOVE = 0.99
ZERO_LINES_FROM = 0.8
ZERO_GRAD_STEP = 10


def _guarded(fn: F) -> F:
    """Run a hook body under the watch's guard: on error, stop recording with a warning instead of raising."""

    @functools.wraps(fn)
    def wrapper(self: Watch, *args: Any) -> Any:
        return self._run_guarded(fn, self, *args)

    return wrapper  # type: ignore[return-value]


def _forward_hook(fn: F) -> F:
    """A forward hook body: guarded, and never traced by torch.compile (a compiled forward calls it eagerly, so
    the watch's state and clocks never become guards that recompile the model)."""
    return torch.compiler.disable(_guarded(fn))  # type: ignore[return-value]


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
        self._closed = False
        self._failed: BaseException | None = None
        self._eval_steps, self._eval_first = 0, -1  # steps trained with model.training False, and the first one
        self._batch_sizes: collections.Counter[int] = collections.Counter()  # first dimension of the inputs, by count
        self._input_scale: tuple[float, float] | None = None  # (std, mean |x|) of the first training batch's inputs
        self._batch_marks: list[tuple[tuple[int, ...], float]] = []  # the first two training batches' shapes and sums
        self._samples = SampleCount()  # how many distinct samples the first training batches hold (a sampler's bug)
        self._input_grads = InputGradients()  # gradients taken with respect to the model's inputs: with a graph?
        # the first training pass's output: rows of K ≥ 2 non-negative values that sum to 1 (a softmax the forward
        # calls, which no module shows) → K, else 0; None until a pass with gradient has returned
        self._output_classes: int | None = None
        # the first output's autograd node, its mean sigmoid, and the share of its gradient's entries below 0 (held
        # until the first logged loss: a binary cross-entropy's positive rate against where its output starts)
        self._output_start: tuple[Any, float, float | None] | None = None
        self._output_grad: tuple[Any, Tensor, Tensor | None] | None = None  # the first output's node, value, gradient
        self._loss_read = False  # the first logged loss with a graph has had its operations read (meta loss_paths)
        self._foreign: Foreign = []  # ... and the parameters of its graph that neither the model nor optimizer holds
        self._trained_passes = 0  # training steps whose gradients were ready, up to ZERO_GRAD_STEP (zero_grad_weights)
        self._handles: list[Any] = []
        self._zeroing: ZeroGradCheck | None = None
        self._written: WrittenCheck | None = None
        self._padding: PaddingReads | None = None
        self._user_hooks: HookCount | None = None
        self._plateaus: list[dict[str, Any]] | None = None  # the ReduceLROnPlateau schedulers, once a rate fell
        self._lr_track: LrTrack | None = None
        # the parameters no group of the optimizer holds, and a fingerprint of each at the start (sum and norm, in
        # float64): whether they moved by the end tells a layer never trained from one a second optimizer trains
        unheld = set(not_in_optimizer(model, optimizer))
        self._unheld = {n: _fingerprint(p) for n, p in model.named_parameters() if n in unheld}
        self._forward: dict[str, list[Any]] = {}  # the forward hooks placed now, by kind (placed on sampled steps)
        # On ranks other than 0 of a sharded job the watch measures (its slices join the all-reduce)
        # and keeps nothing.
        self._writer = StoreWriter(run_dir / DB_NAME, lock) if run_dir is not None else NullWriter()
        try:
            kind = driver_kind(driver, optimizer)
            parts = anatomy(model)
            self._steps = steps = StepRecorder(parts, optimizer, options, self._writer, recurrent or [],
                                               self._run_guarded, external=kind == "external", scaler=scaler,
                                               at_step_end=self._check_writer, model=model)
            self._driver = make_driver(kind, self, steps.grads.params, scaler)
            self._writer.meta(run_metadata(model, optimizer, parts, steps.grads.params, steps.probes.temporal.describe(),
                                           steps.device, steps.budget.report()))
            self._place_hooks()
        except BaseException:
            self._remove_hooks()
            self._writer.close()
            raise
        # A watch dropped without close() (or still open at exit) still closes its store: the writer's
        # thread stops, its file handles close, its lock goes. (The callback holds the writer, not the watch.)
        weakref.finalize(self, self._writer.close, {"status": "not closed: the watch was dropped, or the process "
                                                              "exited, without close()"})

    # -- public --------------------------------------------------------------------------
    @property
    def step(self) -> int:
        """Steps completed so far."""
        return self._steps.now.number

    @property
    def closed(self) -> bool:
        return self._closed

    def log(self, **scalars: float | Tensor) -> None:
        """Record run-level scalars such as the loss: ``watch.log(loss=loss)``.

        Tensors are detached and stay on their device until the host copy of
        their batch of steps. A value logged after ``optimizer.step()`` and
        before the next forward pass belongs to the step that just ended (whose
        values are held until that forward pass).
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
                if not self._loss_read and "loss" in key and value.grad_fn is not None:
                    foreign, reductions = scan_graph(value, self._held())
                    self._note_loss_paths(loss_paths(value), self._binary_prior(value),
                                          {**loss_graph(value), **self._targets(value),
                                           "degenerate_reductions": reductions}, foreign)
                # a copy (a running total the caller adds to in place keeps each step's value), of the tensor's own
                # float dtype: its batch of steps is cast to float64 in one call when sent
                value = value.detach()
                if value.device != self._steps.device or not value.is_floating_point():
                    value = value.to(self._steps.device, torch.float64)
                else:
                    value = value.clone()
            elif isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)):  # numpy scalars too
                value = device_scalar(float(value), torch.float64, self._steps.device)
            else:
                raise TypeError(bad_argument("Watch.log", key, "a number or a one-element tensor", value))
            self._run_guarded(self._steps.add_scalar, key, value)

    def _note_loss_paths(self, paths: list[list[str]], prior: dict[str, float] | None = None,
                         graph: dict[str, Any] | None = None, foreign: Foreign | None = None) -> None:
        """Once: what the loss does to the output (a squared error on a sigmoid, a hand-written log), stored as the
        run's meta ``loss_paths``, a binary cross-entropy's positive rate against its mean prediction
        (``loss_prior``, :func:`gradwatch.probes.loss_ops.loss_prior`), an output broadcast against targets of
        another shape and the graph's operations (``loss_broadcast``, ``loss_ops``:
        :func:`gradwatch.probes.loss_ops.loss_graph`); from :meth:`log`, or
        from the doctor, whose trials' steps return the loss detached and read it themselves
        (:attr:`gradwatch.Trial.loss_paths`). ``foreign``: the graph's parameters that neither the model nor the
        optimizer holds (:func:`gradwatch.probes.graph_scan.scan_graph`), told at flush and close if freed since."""
        # (read where the watch saw the loss; a trial read its targets and prior itself): the first output's graph
        # is let go, and with it any parameter only that graph held (made_in_forward)
        self._output_grad = self._output_start = None
        if not self._loss_read:
            self._loss_read = True
            self._foreign = foreign or []
            self._run_guarded(self._writer.meta, {"loss_paths": paths, "loss_prior": prior, **(graph or {})})

    def flush(self) -> None:
        """Wait until every record so far is in the store."""
        if not self._closed:
            self._release()
            self._run_guarded(self._note_setup)
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
        return f"<gradwatch.Watch {state}, step {self.step}, {len(self._steps.layers)} layers, store {str(self.path)!r}>"

    def _repr_html_(self) -> str:
        """In a notebook: the very page :meth:`report` writes."""
        from gradwatch.report.html import notebook_frame

        with self.open() as run:
            return notebook_frame(run, diagnose(run))

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
        self._handles += self._driver.stage_after_backward(when, self._steps.device)

    def _only_external(self, what: str) -> None:
        if not isinstance(self._driver, ExternalDriver):
            by = "the optimizer's step hooks" if self._driver.kind == "optimizer" else "the end of each backward pass"
            raise RuntimeError(f"`Watch.{what}()` drives a watch made with gw.watch(..., driver=\"external\"); "
                               f"this one is driven by {by}")

    # -- hooks, each body under the guard -------------------------------------------------
    def _place_hooks(self) -> None:
        # The step's start: the model's forward pre-hook (and, once the depth order is known, its first layer's,
        # for loops that call a submodule); the per-layer hooks only on the steps whose probes need them.
        steps = self._steps
        self._hook_fns: dict[str, list[tuple[nn.Module, Callable[..., Any]]]] = {
            "layers": [(layer.module, functools.partial(self._on_layer_forward, i)) for i, layer in enumerate(steps.layers)],
            "activations": [(a.module, functools.partial(self._on_act_forward, i)) for i, a in enumerate(steps.acts)],
            "recurrent": [(m, self._on_recurrent_forward) for _, m in steps.probes.temporal.modules],
        }
        self._handles.append(self.model.register_forward_pre_hook(self._on_forward_start))
        # the tensors the model is called with, by name too (input_ids=…, pixel_values=…): a layer may take them
        # without gradient (a layer taking another tensor without one, after layers that made some, is a cut)
        self._handles.append(self.model.register_forward_pre_hook(self._on_model_inputs, with_kwargs=True))
        if steps.tap is not None:  # activation function calls are tapped for the model's pass: closed after it
            self._handles.append(self.model.register_forward_hook(self._on_model_return, always_call=True))
        self._handles.append(self.model.register_forward_hook(self._on_model_output))
        if self._output_classes is None:  # once, on the first pass with gradient: does the model return probabilities?
            self._first_output = self.model.register_forward_hook(self._on_first_output)
            self._handles.append(self._first_output)
        self._handles += self._driver.place()
        self._handles += ResidualSeen(self.model, self._writer.meta, self._run_guarded).handles
        self._handles += LayoutSeen(self.model, self._writer.meta, self._run_guarded).handles
        self._padding = PaddingReads(self.model, self._run_guarded)
        self._handles += self._padding.handles
        self._user_hooks = HookCount(self.model)  # (before the watch's own: those are not counted anyway)
        param = first_trained(self.model, self.optimizer)
        if self.optimizer is not None and param is not None and not steps.grads.sharded:
            self._zeroing = ZeroGradCheck(param, self.optimizer, self._run_guarded, self.model,
                                          first_trained(self.model, self.optimizer, last=True))
            self._handles += self._zeroing.handles
            small = smallest_trained(self.model, self.optimizer)
            if small is not None:
                self._written = WrittenCheck(small, self.optimizer, self._run_guarded)
                self._handles += self._written.handles
        if self.optimizer is not None:
            self._lr_track = LrTrack(self.optimizer, self._run_guarded)
            self._handles += self._lr_track.handles
        steps.start(self)

    def forward_hooks(self, wanted: frozenset[str]) -> None:
        """Place the forward hooks of the kinds in ``wanted`` ("layers", "activations", "recurrent"), remove the rest.

        The same hook objects every time: torch.compile guards on them, and keeps one graph with and one without.
        """
        for kind in ("layers", "activations", "recurrent"):
            if kind in wanted and kind not in self._forward:
                self._forward[kind] = [module.register_forward_hook(hook) for module, hook in self._hook_fns[kind]]
            elif kind not in wanted and kind in self._forward:
                for h in self._forward.pop(kind):
                    h.remove()

    def step_starts_at(self, module: nn.Module) -> None:
        """Tell a step's start by ``module``'s forward pre-hook as well (the first layer; not the model itself)."""
        if module is not self.model:
            self._handles.append(module.register_forward_pre_hook(self._on_forward_start))

    def _remove_hooks(self) -> None:
        for h in self._handles + [h for placed in self._forward.values() for h in placed]:
            h.remove()
        self._handles, self._forward = [], {}
        if getattr(self, "_steps", None) is not None:  # (None when the constructor failed before it)
            self._steps.probes.attention_hooks(False)
            self._steps.model_returned()

    def _run_guarded(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` unless the watch stopped; an error stops the recording, never the training."""
        if self._closed or self._failed is not None:
            return None
        try:
            return fn(*args)
        except Exception as exc:  # noqa: BLE001 - the user's run must go on
            self._fail(exc)
            return None

    @torch.compiler.disable
    def _on_model_return(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._steps.model_returned()  # even after a failure or close: an open tap must not outlive the pass

    @_forward_hook
    def _on_model_output(self, module: nn.Module, args: tuple, output: Any) -> None:
        if torch.is_grad_enabled():  # a training pass: its output's spread across the batch, on sampled steps
            self._steps.model_output(output)

    @torch.compiler.disable
    def _on_first_output(self, module: nn.Module, args: tuple, output: Any) -> None:
        if torch.is_grad_enabled():  # a training pass (an evaluation under no_grad is not what the loss reads)
            self._first_output.remove()
            self._run_guarded(self._note_output, output)

    def _note_output(self, output: Any) -> None:
        """Once: whether the model returns probabilities (``_output_classes``); and its mean sigmoid and autograd node,
        with a hook that counts its gradient's negative entries (:meth:`_binary_prior`)."""
        self._output_classes = 0
        if isinstance(output, Tensor) and output.requires_grad:  # a derivative the forward took of itself (a PINN's)
            ops = derivative_ops(output)
            if ops:
                self._writer.meta({"output_derivative_ops": ops})
        if isinstance(output, Tensor) and output.is_floating_point() and output.requires_grad and output.numel() > 1:
            with torch.no_grad():
                self._output_start = (output.grad_fn, float(torch.sigmoid(output.detach().float()).mean()), None)
                if output.numel() <= QUADRATIC_TARGETS_MAX and self._steps._scaler is None:  # (a scaled gradient: no)
                    self._output_grad = (output.grad_fn, output.detach().float().clone(), None)
            output.register_hook(WeakHook(self, "_on_output_grad"))
        if isinstance(output, Tensor) and output.is_floating_point() and output.dim() >= 2 and output.shape[-1] >= 2:
            with torch.no_grad():
                y = output.detach().float()
                if bool((y >= 0).all()) and float((y.sum(-1) - 1).abs().max()) < 1e-3:
                    self._output_classes = int(output.shape[-1])

    def _on_output_grad(self, grad: Tensor) -> None:
        self._run_guarded(self._output_signs, grad)

    def _output_signs(self, grad: Tensor | None) -> None:
        """The share of the first output's gradient entries below 0: under a binary cross-entropy on logits,
        ∂L/∂z = c·(σ(z) − y) with c > 0, negative exactly where the target is 1 — its positive rate."""
        if grad is not None and self._output_start is not None and self._output_start[2] is None:
            node, mean, _ = self._output_start
            self._output_start = (node, mean, float((grad.detach() < 0).float().mean()))
        if grad is not None and self._output_grad is not None and self._output_grad[2] is None:
            self._output_grad = (self._output_grad[0], self._output_grad[1], grad.detach().float().clone())

    def _targets(self, loss: Tensor) -> dict[str, dict[str, float] | None]:
        """What the first logged loss's targets say, read off the gradient of the model's first output (a trial reads
        them from the loss before its backward pass): a squared error's range, meta ``loss_targets``
        (:func:`gradwatch.probes.loss_ops.targets_off_gradient`), and a soft-margin loss's share at 0, meta
        ``margin_targets`` (:func:`gradwatch.probes.loss_ops.margin_targets_off_gradient`). The output and its
        gradient are let go."""
        got, self._output_grad = self._output_grad, None
        if got is None or got[2] is None:
            return {"loss_targets": None, "margin_targets": None}
        return {"loss_targets": targets_off_gradient(loss, got[0], got[1], got[2]),
                "margin_targets": margin_targets_off_gradient(loss, got[0], got[2])}

    def _held(self) -> set[int]:
        """The ids of the parameters the model or the optimizer holds."""
        return held_parameters(self.model, self.optimizer)

    def _binary_prior(self, loss: Tensor) -> dict[str, float] | None:
        """Where the first logged loss is a binary cross-entropy on the model's own output (through reshapes): its
        targets' positive rate (the signs of the output's gradient) and the output's mean sigmoid at the start, the
        meta ``loss_prior`` (:func:`gradwatch.probes.loss_ops.loss_prior` reads the same from the loss's saved
        tensors, which the backward pass frees before a watch sees the loss). The output's node is let go."""
        start, self._output_start = self._output_start, None
        if start is None or start[2] is None:
            return None
        node, mean, rate = start[0], start[1], start[2]
        if through_shapes(binary_ce_input(loss), lambda n: True if n is node else None) is None:
            return None
        return {"positive_rate": rate, "mean_prob": mean}

    @_forward_hook
    def _on_forward_start(self, module: nn.Module, args: tuple) -> None:
        if module is self.model and args and isinstance(args[0], Tensor) and args[0].dim() and torch.is_grad_enabled():
            self._batch_sizes[args[0].shape[0]] += 1  # the training batch: BatchNorm's statistics rest on it
            if self._input_scale is None and args[0].is_floating_point():  # once: are the inputs standardised?
                x = args[0].detach().float()
                self._input_scale = (float(x.std()) if x.numel() > 1 else 0.0, float(x.abs().mean()))
            if len(self._batch_marks) < 2:  # the first two training batches: one batch each step, or mini-batches?
                # (float32: MPS has no float64)
                self._batch_marks.append((tuple(args[0].shape), float(args[0].detach().float().sum())))
            self._samples.batch(args[0])
            if args[0].requires_grad:  # an input whose own gradient is wanted: a gradient penalty's x̂, an attack's
                self._input_grads.input_seen(args[0])
        if module is self.model:
            self._steps.model_called()
        self._steps.forward_starts()

    @_forward_hook
    def _on_model_inputs(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._steps.pass_inputs(args, kwargs)

    @_forward_hook
    def _on_layer_forward(self, i: int, module: nn.Module, args: tuple, output: Any) -> None:
        self._steps.layer_forward(i, output, first_tensor(args))
        self._steps.norm_layer(i, module, args)

    @_forward_hook
    def _on_act_forward(self, i: int, module: nn.Module, args: tuple, output: Any) -> None:
        self._steps.activation_forward(i, module, args, output)

    @_forward_hook
    def _on_recurrent_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._steps.recurrent_forward(module, args, output)

    # The driver's calls (see gradwatch.watching.drivers).
    @_guarded
    def _gradients_ready(self) -> None:
        if not self.model.training:  # model.eval() left on while training: BatchNorm and Dropout behave otherwise
            self._eval_steps += 1
            if self._eval_first < 0:
                self._eval_first = self.step
        elif self._trained_passes < ZERO_GRAD_STEP:
            self._trained_passes += 1
            if self._trained_passes == ZERO_GRAD_STEP:
                self._run_guarded(self._note_zero_grads)
        self._steps.gradients_ready()

    @torch.no_grad()
    def _note_zero_grads(self) -> None:
        """Once, at the ``ZERO_GRAD_STEP``-th training step's gradients: the layers whose weight matrix got an exactly-0
        gradient on ``ZERO_GRAD_ABOVE`` of its entries or more, whole rows and columns alike —
        ``meta["zero_grad_weights"]``, layer -> [that share, the entries with a gradient, the entries], read at
        ``meta["zero_grad_step"]``. Embeddings (a batch's rows) are not read."""
        if self._steps.grads.sharded:
            return  # a shard is not the layer's matrix
        found = {}
        for layer in self._steps.layers:
            w = getattr(layer.module, "weight", None)
            if (isinstance(layer.module, (nn.Embedding, nn.EmbeddingBag)) or not isinstance(w, torch.Tensor)
                    or w.dim() < 2 or w.numel() < 64 or not w.is_floating_point() or not w.is_leaf
                    or w.grad is None or w.grad.is_sparse):  # (not a leaf: a pruned weight, weight_orig × mask)
                continue
            zero = w.grad.detach().reshape(w.shape[0], -1) == 0
            share = float(zero.float().mean())
            if share < ZERO_GRAD_ABOVE:
                continue
            rows, cols = int(zero.all(1).sum()), int(zero.all(0).sum())
            if rows >= ZERO_LINES_FROM * zero.shape[0] and cols >= ZERO_LINES_FROM * zero.shape[1]:
                found[layer.name] = [share, int((~zero).sum()), int(zero.numel())]
        if found:
            self._writer.meta({"zero_grad_weights": found, "zero_grad_step": ZERO_GRAD_STEP})

    @_guarded
    def _step_done(self) -> None:
        self._steps.step_done()

    @_guarded
    def _step_skipped(self) -> None:
        self._steps.step_skipped()

    @_guarded
    def _backward_step(self) -> None:
        self._steps.backward_step()

    @_guarded
    def _stage(self, scale: Tensor | None) -> None:
        self._steps.stage(scale)

    def _optimizer_stepped(self) -> None:
        self._steps.optimizer_stepped()

    # -- failure and closing -------------------------------------------------------------
    @_guarded
    def _release(self) -> None:
        self._steps.buffer.release()
        self._steps.buffer.send()

    def _check_writer(self) -> None:
        if self._writer.error is not None and self._failed is None:
            self._fail(self._writer.error)

    def _fail(self, exc: BaseException) -> None:
        self._failed = exc
        self._steps.clear()
        warnings.warn(f"gradwatch stopped recording at step {self.step} ({type(exc).__name__}: {exc}); training goes "
                      f"on, and {self.path} keeps what was recorded before.", GradwatchWarning, stacklevel=4)

    def _note_setup(self) -> None:
        """What the set-up shows so far, read at flush and close: clipped weights, and whether ``.grad`` is zeroed."""
        self._note_weight_bounds()
        if self._zeroing is not None:
            self._writer.meta(self._zeroing.meta())
        if self._written is not None:
            self._writer.meta(self._written.meta())
        if self._padding is not None:
            self._writer.meta(self._padding.meta())
        if self._user_hooks is not None:
            self._writer.meta(self._user_hooks.meta())
        if self._foreign:  # parameters of the first loss's graph no one holds, freed since: made in forward()
            self._writer.meta({"made_in_forward": made_in_forward(self._foreign)})
        if self._unheld:
            now = dict(self.model.named_parameters())
            self._writer.meta({"not_in_optimizer_moved": [n for n, f in self._unheld.items()
                                                          if n in now and _fingerprint(now[n]) != f]})
        if self.optimizer is not None:  # the rate now, beside the start's: a schedule that took it to ~0
            self._writer.meta({"optimizer_lr_last": max_group(self.optimizer, "lr"),
                               "optimizer_lr_last_step": self.step})
        if self._lr_track is not None:  # ... and since when
            self._writer.meta(self._lr_track.meta())
            if self._plateaus is None and self._lr_track.low_from is not None:  # (once: a scan of the heap)
                self._plateaus = plateau_meta(self.optimizer)
                self._writer.meta({"plateau_schedulers": self._plateaus})
            self._writer.meta({"optimizer_groups_low": self._low_groups(self._lr_track)})
        if getattr(self, "_driver", None) is not None:  # (a scaler's steps bypassed)
            self._writer.meta(self._driver.meta())

    def _low_groups(self, track: LrTrack) -> dict[str, Any] | None:
        """The parameter groups whose rate a schedule took to ~0 while others kept theirs: the modules they hold,
        their first and last rates and since when, of how many groups (None where none or every group did)."""
        low, groups = track.low_groups(), track.optimizer.param_groups
        if not low or len(low) == len(groups) or len(groups) != len(track.group_first):
            return None
        owner = {id(p): n.rpartition(".")[0] or n for n, p in self.model.named_parameters()}
        return {"of": len(groups), "groups": [
            {"group": i, "modules": list(dict.fromkeys(owner[id(p)] for p in groups[i]["params"] if id(p) in owner)),
             "lr_first": track.group_first[i], "lr_last": float(groups[i]["lr"]), "low_from": at}
            for i, at in low.items()]}

    @torch.no_grad()
    def _note_weight_bounds(self) -> None:
        """The layers whose weights pile up at their largest magnitude, as weight clipping (WGAN's p.clamp_(−c, c))
        leaves them: ``meta["weights_at_bound"]``, layer -> [share of the weights at ±max|w|, max|w|], for a share of
        ``AT_BOUND_ABOVE`` or more, a fifth of it at each sign (a weight matrix drawn from a continuous law has one
        entry at its maximum; one set to a constant has all of them at one sign)."""
        if self._steps.grads.sharded:
            return  # a shard's maximum is not the layer's
        found = {}
        for layer in self._steps.layers:
            w = getattr(layer.module, "weight", None)
            if not isinstance(w, torch.Tensor) or w.dim() < 2 or w.numel() < 64 or not w.is_floating_point():
                continue
            w = w.detach()
            top = w.abs().max()
            if not float(top) > 0:
                continue
            up, down = float((w == top).float().mean()), float((w == -top).float().mean())
            if up + down >= AT_BOUND_ABOVE and min(up, down) >= AT_BOUND_ABOVE / 5:  # at +c and at −c (not a constant)
                found[layer.name] = [up + down, float(top)]
        self._writer.meta({"weights_at_bound": found})

    def _close(self, status: str) -> None:
        if self._closed:
            return
        self._remove_hooks()
        try:
            if self._failed is None:
                self._run_guarded(self._note_setup)
                self._release()
                self._steps.buffer.emit(self.step)  # what the unfinished step has (a value logged after the last one)
        finally:
            self._closed = True
            self._writer.close({"status": status if self._failed is None else f"failed: {self._failed}",
                                "steps": self.step, "eval_mode_steps": self._eval_steps,
                                "eval_mode_first": self._eval_first if self._eval_steps else None,
                                "batch_size": self._batch_sizes.most_common(1)[0][0] if self._batch_sizes else None,
                                # the model's forward passes with gradient per step (gradient accumulation: k)
                                "passes_per_step": (round(sum(self._batch_sizes.values()) / self.step, 2)
                                                    if self.step else None),
                                "input_std": self._input_scale[0] if self._input_scale else None,
                                # the second training batch other than the first (mini-batches), or the same
                                "batches_vary": (self._batch_marks[0] != self._batch_marks[1]
                                                 if len(self._batch_marks) == 2 else None),
                                "input_abs_mean": self._input_scale[1] if self._input_scale else None,
                                "output_probabilities": self._output_classes,
                                "input_gradients": self._input_grads.report(),
                                "batch_samples": self._samples.report(),
                                **self._steps.budget.report()})


SAMPLE_BATCHES = 8  # training batches whose distinct samples are counted
SAMPLE_FEATURES_FROM = 8  # ... where a sample is a float row of this many values or more (not two bits of XOR)


class SampleCount:
    """The distinct samples among the rows of the first :data:`SAMPLE_BATCHES` training batches, each row told by a
    fixed random projection of its values (one matrix product and a ``unique`` a batch): a sampler that draws from a
    handful of samples (``WeightedRandomSampler`` given one weight per class, whose indices then run over the
    classes) repeats them in every batch. Float inputs of :data:`SAMPLE_FEATURES_FROM` values a row or more, batches
    of 16 rows or more; nothing is kept of the data."""

    def __init__(self) -> None:
        self.per_batch: list[tuple[int, int]] = []  # (distinct rows, rows) of each batch read
        self.prints: list[torch.Tensor] = []  # each batch's distinct fingerprints (a few numbers a row)
        self._proj: torch.Tensor | None = None

    @torch.no_grad()
    def batch(self, x: torch.Tensor) -> None:
        if (len(self.per_batch) >= SAMPLE_BATCHES or not x.is_floating_point() or x.dim() < 2 or x.shape[0] < 16
                or x[0].numel() < SAMPLE_FEATURES_FROM):
            return
        rows = x.detach().reshape(x.shape[0], -1).float()
        if self._proj is None or self._proj.shape[0] != rows.shape[1] or self._proj.device != rows.device:
            g = torch.Generator().manual_seed(0)  # (its own generator: the user's random state is not touched)
            self._proj = torch.randn(rows.shape[1], 2, generator=g).to(rows.device)
        prints = torch.unique(rows @ self._proj, dim=0)
        self.per_batch.append((int(prints.shape[0]), int(rows.shape[0])))
        self.prints.append(prints.cpu())

    def report(self) -> dict[str, float] | None:
        """{"distinct_share": the median share of a batch's rows that are distinct, "distinct": the distinct samples
        over the batches read, "rows": their rows, "batches": how many}; None where no batch was read."""
        if not self.per_batch:
            return None
        shares = sorted(d / n for d, n in self.per_batch)
        union = int(torch.unique(torch.cat(self.prints), dim=0).shape[0])
        return {"distinct_share": shares[len(shares) // 2], "distinct": float(union),
                "rows": float(sum(n for _, n in self.per_batch)), "batches": float(len(self.per_batch))}


@torch.no_grad()
def _fingerprint(p: torch.Tensor) -> tuple[float, float]:
    """A parameter's sum and norm in float64: equal before and after only where it did not move (for a test of
    whether a parameter no watched optimizer holds was trained at all)."""
    try:
        x = p.detach().double()
        return float(x.sum()), float(x.norm())
    except Exception:  # noqa: BLE001 - a tensor that will not reduce here (a shard): NaN, never equal: "moved"
        return math.nan, math.nan
