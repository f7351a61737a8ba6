"""``gw.watch``: hooks on, a handle back; records every step on a schedule.

Flow of one step (steps count optimizer steps when an optimizer is given,
otherwise backward passes):

1. forward — on sampled steps, activation modules' forward hooks compute
   activation statistics and layers' forward hooks place tensor hooks on
   their outputs (for ‖∂L/∂a‖);
2. backward — those tensor hooks collect the output-gradient norms;
3. optimizer pre-step hook (or the end of backward) — gradient norms and
   non-finite counts, and on update steps a copy of the weights;
4. optimizer post-step hook — update ratios; every value of the step goes to
   the host in one copy and on to the store's writer thread.

Hooks read under ``no_grad``, never return a modified gradient, and catch
their own errors: a failure stops the recording with a warning, never the
training.
"""

from __future__ import annotations

import datetime as _dt
import functools
import itertools
import numbers
import platform
import re
import warnings
import weakref
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np
import torch
from torch import Tensor, nn

from gradwatch import schedules
from gradwatch._version import __version__
from gradwatch._errors import GradwatchWarning, bad_argument
from gradwatch.diagnosis import Diagnosis, Thresholds, diagnose
from gradwatch.layers import anatomy, is_floating
from gradwatch.probes import activations as act_probe
from gradwatch.probes.backprop import BackpropProbe, grad_tensors
from gradwatch.probes.grads import GradProbe
from gradwatch.probes.temporal import TemporalProbe, find_recurrent
from gradwatch.schedules import Schedule
from gradwatch.store import DB_NAME, Run, RunLock, StoreWriter, lock_holder, open_run

F = TypeVar("F", bound=Callable[..., Any])


def _guarded(fn: F) -> F:
    """Run a hook body; on error, stop recording with a warning instead of raising into training."""

    @functools.wraps(fn)
    def wrapper(self: Watch, *args: Any, **kwargs: Any) -> Any:
        if self._closed or self._failed is not None:
            return None
        try:
            return fn(self, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - the user's run must go on
            self._fail(exc)
            return None

    return wrapper  # type: ignore[return-value]


class Watch:
    """The handle returned by :func:`watch`: holds the hooks and the run store.

    Use it as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        every: Schedule,
        sampled: Schedule | None,
        update: Schedule | None,
        run_dir: Path | None,
        temporal: list[tuple[str, nn.Module]] | None = None,
        driver: str = "auto",
        scaler: Any = None,
        lock: RunLock | None = None,
        temporal_auto: bool = False,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        # Who says "the gradients are ready" and "the step is over": the optimizer's step hooks,
        # the end of each backward pass, or an integration (Lightning, Hugging Face) calling
        # _gradients_ready() and _step_done() from its own callbacks.
        self._driver = driver if driver != "auto" else ("optimizer" if optimizer is not None else "backward")
        self._scaler = scaler
        self._stage_when: Callable[[], bool] | None = None  # external driver: stage statistics after backward
        self._stepped = False  # optimizer.step() ran since the gradients were read
        self._staged: dict | None = None  # gradient statistics read early (before clipping), for the step
        self._step_scale: Tensor | None = None  # the loss scale on this step's backward pass
        self.path: Path = run_dir  # type: ignore[assignment]  # None on a shard follower (rank ≠ 0)
        self._every, self._sampled = every, sampled
        self._update = update if optimizer is not None else None
        self._closed = False
        self._failed: BaseException | None = None
        self._step = 0
        self._handles: list[Any] = []

        parts = anatomy(model)
        self._layers, self._acts = parts.layers, parts.activations
        self._grads = GradProbe(self._layers)
        self._backprop = BackpropProbe(self._grads.device)
        self._device = self._grads.device
        self._layer_of = {layer.module: i for i, layer in enumerate(self._layers)}
        self._act_of = {a.module: i for i, a in enumerate(self._acts)}
        # Depth: the order in which each module's output is first produced. For
        # leaf modules this is first-forward execution order; a module that owns
        # parameters *and* contains others (a model root holding a positional
        # embedding) comes after its children, where its output is.
        self._order: list[tuple[str, str]] = []
        self._order_seen: set[tuple[str, str]] = set()
        self._order_settled = False
        self._act_calls: dict[int, list[list[Any]]] = {}  # per activation: [element count, stats, reached]
        self._pending: list[tuple[np.ndarray, Tensor]] = []  # (keys (n, 2), values (n,))
        self._scalars: list[tuple[int, Tensor]] = []
        self._sample_step = -1
        self._sample_on = False
        self._held: int | None = None  # a step that ended, its values pending until the next forward
        self._callback_queued = False
        self._key_cache: dict[tuple[str, tuple[int, ...], int], np.ndarray] = {}
        self._accumulators: list[Any] | None = None  # the parameters' AccumulateGrad nodes
        self._fill_task: tuple[int, bool] = (-1, True)  # (graph task, whether it fills .grad)

        # On ranks other than 0 of a sharded job the watch measures (its slices join the all-reduce)
        # and keeps nothing.
        self._writer: Any = StoreWriter(run_dir / DB_NAME, lock) if run_dir is not None else _Discard()
        self._entity: dict[tuple[str, str], int] = {}
        self._quantity: dict[str, int] = {}
        self._layer_ids = np.array([self._entity_id(l.name, "layer", type(l.module).__name__) for l in self._layers])
        self._pair_ids = np.array([self._entity_id(n, "param", None) for n in self._grads.pair_names])
        self._act_ids = np.array([self._entity_id(a.name, "activation", type(a.module).__name__) for a in self._acts])
        self._temporal = TemporalProbe(temporal or [], self._device, repeated_only=temporal_auto)
        self._recurrent_ids = {name: self._entity_id(name, "recurrent", cell) for name, cell in self._temporal.entities()}
        self._writer.meta(self._metadata())
        # A watch dropped without close() (or still open at exit) still closes its store: the writer's
        # thread stops, its file handles close, its lock goes. (The callback holds the writer, not the watch.)
        weakref.finalize(self, self._writer.close, {"status": "not closed: the watch was dropped, or the process "
                                                              "exited, without close()"})
        try:
            self._place_hooks()
        except BaseException:
            self._remove_hooks()
            self._writer.close()
            raise

    # -- public --------------------------------------------------------------------------
    @property
    def step(self) -> int:
        """Steps completed so far."""
        return self._step

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
            if self._failed is not None:
                continue
            self._scalars.append((self._entity_id(key, "run", None), value))
        if self._held is not None:  # joins the step that just ended
            self._add_scalars()

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

    def close(self) -> None:
        """Remove every hook, write what is pending, close the store. Idempotent."""
        self._close(status="closed")

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: object) -> None:
        self._close(status="closed" if exc_type is None else f"interrupted by {exc_type.__name__}")

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("failed" if self._failed else "open")
        return f"<gradwatch.Watch {state}, step {self._step}, {len(self._layers)} layers, store {str(self.path)!r}>"

    # -- hooks ---------------------------------------------------------------------------
    def _place_hooks(self) -> None:
        for layer in self._layers:
            self._handles.append(layer.module.register_forward_hook(self._on_layer_forward))
        for a in self._acts:
            self._handles.append(a.module.register_forward_hook(self._on_act_forward))
        for _, module in self._temporal.modules:
            self._handles.append(module.register_forward_hook(self._on_recurrent_forward))
        if self._driver == "optimizer":
            assert self.optimizer is not None
            self._handles.append(self.optimizer.register_step_pre_hook(self._on_optimizer_pre))
            self._handles.append(self.optimizer.register_step_post_hook(self._on_optimizer_post))
        elif self._driver == "backward":
            for p in self._grads.params:
                self._handles.append(p.register_post_accumulate_grad_hook(_WeakHook(self, "_on_grad_accumulated")))
        elif self.optimizer is not None:  # external: only to tell a skipped step from a taken one
            self._handles.append(self.optimizer.register_step_post_hook(self._on_optimizer_stepped))
        if self._scaler is not None and self._driver != "external":  # an integration tells skipped steps itself
            self._handles.append(_ScalerStepWrap(self._scaler, self))

    def _remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _sampling(self) -> bool:
        if self._sample_step != self._step:
            self._sample_step = self._step
            self._sample_on = self._sampled is not None and bool(self._sampled(self._step))
        return self._sample_on and torch.is_grad_enabled()

    @_guarded
    def _on_layer_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._held is not None:
            self._release()
        if not self._order_settled:
            self._note_order(self._layers[self._layer_of[module]].name, "layer")
        if self._sampling():
            hook = functools.partial(self._on_output_grad, self._layer_of[module])
            for t in grad_tensors(output):
                t.register_hook(hook)

    @_guarded
    def _on_output_grad(self, layer: int, grad: Tensor) -> None:
        if self._fills_grad():
            self._backprop.add(layer, grad)

    def _fills_grad(self) -> bool:
        """Whether the running backward pass accumulates into the parameters' ``.grad`` (decided once per pass).

        A tensor hook also fires inside ``torch.autograd.grad`` (a gradient
        penalty's ``create_graph=True`` pass, an input gradient); that pass
        runs none of the parameters' AccumulateGrad nodes, so it is left out.
        """
        try:
            task = torch._C._current_graph_task_id()
            if self._fill_task[0] != task:
                if self._accumulators is None:
                    self._accumulators = [torch.autograd.graph.get_gradient_edge(p).node for p in self._grads.params]
                fills = any(torch._C._will_engine_execute_node(n) for n in self._accumulators)
                self._fill_task = (task, fills)
            return self._fill_task[1]
        except RuntimeError:  # not an eager engine's backward (a compiled one): count it, as before
            return True

    @_guarded
    def _on_act_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._held is not None:
            self._release()
        if not self._order_settled:
            self._note_order(self._acts[self._act_of[module]].name, "activation")
        if not self._sampling():
            return
        x = act_probe.first_tensor(args)
        if x is None or not is_floating(output) or output.numel() == 0:
            return
        i = self._act_of[module]
        stats = act_probe.call_stats(self._acts[i].spec, module, x, output)
        # [element count, stats, reached]: a call whose output takes part in autograd counts only once a
        # backward that fills .grad reaches it (a validation pass without no_grad never does); one whose
        # output cannot be differentiated counts as it is.
        call: list[Any] = [float(output.numel()), stats.to(self._device), not output.requires_grad]
        self._act_calls.setdefault(i, []).append(call)
        if output.requires_grad:
            output.register_hook(functools.partial(self._on_act_grad, call))

    @_guarded
    def _on_act_grad(self, call: list[Any], grad: Tensor) -> None:
        if self._fills_grad():
            call[2] = True

    @_guarded
    def _on_recurrent_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._sampling():
            self._temporal.capture(module, args, output, self._guarded_call)

    def _guarded_call(self, fn: Callable[[], None]) -> None:
        """Run a tensor-hook body under the watch's guard (the temporal probe's hooks)."""
        if self._closed or self._failed is not None:
            return
        try:
            fn()
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)

    def _add_temporal(self) -> None:
        for name, quantity, pos, values in self._temporal.take():
            if quantity == "temporal_grad_norm" and self._step_scale is not None:
                values = values / self._step_scale
            eid, qid = self._recurrent_ids[name], self._quantity_id(quantity)
            keys = np.stack([np.full(len(pos), eid), np.full(len(pos), qid), np.asarray(pos)], axis=1)
            self._add(keys, values)

    @_guarded
    def _on_grad_accumulated(self, param: Tensor) -> None:
        if not self._callback_queued:
            self._callback_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._on_backward_end)

    @_guarded
    def _on_backward_end(self) -> None:
        self._callback_queued = False
        if self._stage_when is None:
            self._collect_and_end()
        elif self._stage_when():
            self._stage_gradients(self._scale_now())

    @_guarded
    def _collect_and_end(self) -> None:
        self._release_held()
        self._add_temporal()
        if self._every(self._step):
            self._add_grad_stats()
        self._end_step()

    @_guarded
    def _on_optimizer_pre(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        self._gradients_ready()
        self._stepped = True  # (the GradScaler wrap reads it: this step was not skipped)

    @_guarded
    def _on_optimizer_post(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        self._step_done()

    def _on_optimizer_stepped(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        self._stepped = True

    @_guarded
    def _on_scaler_skipped(self) -> None:
        """GradScaler.step() found inf/NaN and did not call optimizer.step(): record the step anyway."""
        self._gradients_ready()  # the scaler unscaled the gradients before it looked
        self._mark_skipped()
        self._step_done()

    def _loss_scale(self) -> Tensor | None:
        """The loss scale on this step's backward if ‖∂L/∂a‖ or ‖∂L/∂h_t‖ was read during it, else None.

        Taken before the step: ``scaler.update()`` changes it afterwards.
        """
        if not (self._sample_on and self._sample_step == self._step):
            return None
        return self._scale_now()

    def _scale_now(self) -> Tensor | None:
        """The GradScaler's current scale as a float64 device tensor (no host read), or None without one."""
        if self._scaler is None or not self._scaler.is_enabled():
            return None
        scale = getattr(self._scaler, "_scale", None)  # the scaler's own tensor, on the device
        if not isinstance(scale, Tensor):  # not created yet, or a scaler of another make
            return torch.tensor(float(self._scaler.get_scale()), dtype=torch.float64, device=self._device)
        return scale.detach().to(self._device, torch.float64).reshape(())

    def _mark_skipped(self) -> None:
        self.log(skipped_step=1.0)
        if self._scaler is not None:  # the scale this step used; a host read, on skipped steps only
            scale = float(self._scaler.get_scale())
            if self._driver == "external":  # an integration closes the step after scaler.update() backed off
                scale /= self._scaler.get_backoff_factor()
            self.log(loss_scale=scale)

    # -- the two calls an integration makes ----------------------------------------------
    @_guarded
    def _stage_gradients(self, scale: Tensor | float | None = None) -> None:
        """Read the gradient statistics now (before clipping), to be kept by the next _gradients_ready().

        ``scale``: a loss scale still on the gradients (float16 with a GradScaler that has not unscaled
        them yet); norms are divided by it. A later call replaces an earlier one.
        """
        if self._every(self._step):
            stats = self._grads.gradients()
            if stats is not None and scale is not None:
                layers, per_layer, pairs, per_pair = stats["grad_norm"]
                stats["grad_norm"] = (layers, per_layer / scale, pairs, per_pair / scale)
            self._staged = stats

    def _stage_after_backward(self, when: Callable[[], bool]) -> None:
        """At the end of every backward pass for which ``when()`` holds, stage the gradient statistics.

        For trainers that clip the gradients before any callback sees them (Hugging Face): the
        statistics are read as backward leaves them, before clipping and before the scaler (if the
        watch has one) unscales them, so they are divided by its scale. External driver only.
        """
        assert self._driver == "external", "staging is for a watch driven by an integration"
        self._stage_when = when
        for p in self._grads.params:
            self._handles.append(p.register_post_accumulate_grad_hook(_WeakHook(self, "_on_grad_accumulated")))

    @_guarded
    def _gradients_ready(self) -> None:
        """The step's gradients are final (unscaled); the optimizer has not stepped yet."""
        self._release_held()
        self._stepped = False
        self._step_scale = self._loss_scale()
        self._add_temporal()  # before the step: the re-run needs the weights of the forward pass
        staged, self._staged = self._staged, None
        if staged is not None:
            self._add_pairs(staged)
        elif self._every(self._step):
            self._add_grad_stats()
        if self._update is not None and self._update(self._step):
            self._grads.snapshot()

    @_guarded
    def _step_done(self) -> None:
        """The optimizer step is over (or was skipped): update ratios, then close the step.

        Driven by an integration, a step is skipped when no optimizer.step() ran since the gradients
        were read (the other drivers learn of a skip from the GradScaler wrap).
        """
        if self._driver == "external" and self.optimizer is not None and not self._stepped:
            self._mark_skipped()
        if self._grads.has_snapshot:
            self._add_pairs(self._grads.updates())
        self._end_step()

    # -- one step's values ---------------------------------------------------------------
    def _add_grad_stats(self) -> None:
        stats = self._grads.gradients()
        if stats is not None:
            self._add_pairs(stats)

    def _add_pairs(self, stats: dict[str, tuple[list[int], Tensor, list[int], Tensor]]) -> None:
        for quantity, (layers, per_layer, pairs, per_pair) in stats.items():
            q = self._quantity_id(quantity)
            self._add(self._keys("layer", layers, q), per_layer)
            if pairs:
                self._add(self._keys("param", pairs, q), per_pair)

    def _keys(self, kind: str, index: list[int], quantity: int) -> np.ndarray:
        """(n, 2) array of (entity id, quantity id), cached: the same sets recur every step."""
        key = (kind, tuple(index), quantity)
        keys = self._key_cache.get(key)
        if keys is None:
            ids = {"layer": self._layer_ids, "param": self._pair_ids, "activation": self._act_ids}[kind][list(index)]
            keys = self._key_cache[key] = np.stack([ids, np.full(len(ids), quantity), np.full(len(ids), -1)], axis=1)
        return keys

    def _add(self, keys: np.ndarray, values: Tensor) -> None:
        """Queue values for this step's one host copy; ``keys`` is (n, 3): entity, quantity, pos (−1: none)."""
        self._pending.append((keys, values.reshape(-1).to(self._device, torch.float64)))

    def _end_step(self) -> None:
        if self._held is not None:  # two steps without a forward pass between them
            self._release()
        step = self._step
        taken = self._backprop.take()
        if taken is not None:
            norms = taken[1] if self._step_scale is None else taken[1] / self._step_scale
            self._add(self._keys("layer", taken[0], self._quantity_id("out_grad_norm")), norms)
        self._step_scale = None
        if self._act_calls:
            self._add_activation_stats()
        if self._scalars:
            self._add_scalars()
        self._held = step
        if not self._order_settled:
            self._settle_order()
        self._check_writer()
        self._step += 1

    def _add_activation_stats(self) -> None:
        every, self._act_calls = self._act_calls, {}
        calls = {i: [(n, t) for n, t, reached in c if reached] for i, c in every.items()}
        calls = {i: c for i, c in calls.items() if c}
        if not calls:
            return
        idx, stats = act_probe.combine(calls)  # (acts, 4): mean, std, frac, rms φ'
        for col, name in enumerate(("act_mean", "act_std")):
            self._add(self._keys("activation", idx, self._quantity_id(name)), stats[:, col])
        for family in ("bounded", "relu"):
            rows = [k for k, i in enumerate(idx) if self._acts[i].spec.family == family]
            if rows:
                quantity = "saturated_frac" if family == "bounded" else "dead_frac"
                self._add(self._keys("activation", [idx[k] for k in rows], self._quantity_id(quantity)), stats[rows, 2])
        self._add(self._keys("activation", idx, self._quantity_id("deriv_rms")), stats[:, 3])

    def _add_scalars(self) -> None:
        scalars, self._scalars = self._scalars, []
        ids = np.array([e for e, _ in scalars])
        values = torch.stack([v for _, v in scalars])
        names = {e: n for (n, k), e in self._entity.items() if k == "run"}
        for e, v in zip(ids, values):
            self._add(np.array([[e, self._quantity_id(names[int(e)]), -1]]), v)

    def _release_held(self) -> None:
        """A new step's values are coming with no forward pass since the last step ended: send that one on first.

        Otherwise the two steps' values would travel in one copy, under one step number.
        """
        if self._held is not None:
            self._release()

    @_guarded
    def _release(self) -> None:
        """Send the held step's values on: one copy, to the writer."""
        step, self._held = self._held, None
        if step is not None:
            self._emit(step)

    def _emit(self, step: int) -> None:
        """One device-to-host copy of every value of the step, handed to the writer thread."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        keys = np.concatenate([k for k, _ in pending])
        values = torch.cat([v for _, v in pending])
        ready = None
        if values.is_cuda:  # pinned memory, non-blocking: the step never waits for the copy
            host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            host.copy_(values, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            ready = event.synchronize
            values = host
        elif values.device.type != "cpu":
            values = values.cpu()
        self._writer.records(step, keys, values, ready)

    def _note_order(self, name: str, kind: str) -> None:
        if (name, kind) not in self._order_seen:
            self._order_seen.add((name, kind))
            self._order.append((name, kind))

    def _settle_order(self) -> None:
        """After the first step: depths from the order in which outputs were first produced."""
        self._order_settled = True
        depth = {key: d for d, key in enumerate(self._order)}
        rows = []
        for (name, kind), eid in self._entity.items():
            if (name, kind) in depth:
                rows.append((eid, depth[(name, kind)]))
        for j, pname in enumerate(self._grads.pair_names):
            layer = self._layers[self._grads.pair_layer[j]].name
            if (layer, "layer") in depth:
                rows.append((self._entity[(pname, "param")], depth[(layer, "layer")]))
        self._writer.depths(rows)
        self._writer.meta({"layer_order": [n for n, k in self._order if k == "layer"]})

    # -- registry, metadata, failure -----------------------------------------------------
    def _entity_id(self, name: str, kind: str, module: str | None) -> int:
        key = (name, kind)
        eid = self._entity.get(key)
        if eid is None:
            eid = self._entity[key] = len(self._entity) + 1
            self._writer.entities([(eid, name, kind, module)])
        return eid

    def _quantity_id(self, name: str) -> int:
        qid = self._quantity.get(name)
        if qid is None:
            qid = self._quantity[name] = len(self._quantity) + 1
            self._writer.quantities([(qid, name)])
        return qid

    def _metadata(self) -> dict[str, Any]:
        return {
            "gradwatch": __version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "started": _dt.datetime.now().isoformat(timespec="seconds"),
            "status": "running",
            "seed": torch.initial_seed(),
            "device": str(self._device),
            "model": type(self.model).__name__,
            "n_params": sum(p.numel() for p in self._grads.params),
            "layers": [
                {"name": l.name, "module": type(l.module).__name__, "params": {a: list(p.shape) for a, p in l.params}}
                for l in self._layers
            ],
            "activations": [{"name": a.name, "module": type(a.module).__name__} for a in self._acts],
            "recurrent": self._temporal.describe(),
            "optimizer": type(self.optimizer).__name__ if self.optimizer is not None else None,
            # The learning rate at the watch's start (largest group) and, when an LR scheduler already wraps
            # the optimizer, the base rate it starts from (`initial_lr`): a warm-up starts below it.
            "optimizer_lr": _max_group(self.optimizer, "lr"),
            "optimizer_initial_lr": _max_group(self.optimizer, "initial_lr"),
            # Every module class in the model: the diagnosis reads the architecture off it (residual blocks,
            # normalisation, activation types) to propose only remedies it does not already have.
            "module_types": sorted({type(m).__name__ for m in self.model.modules()}),
            "schedules": {"every": repr(self._every), "sampled": repr(self._sampled), "update": repr(self._update)},
        }

    def _check_writer(self) -> None:
        if self._writer.error is not None and self._failed is None:
            self._fail(self._writer.error)

    def _fail(self, exc: BaseException) -> None:
        self._failed = exc
        self._pending, self._scalars, self._act_calls, self._held = [], [], {}, None
        self._backprop.clear()
        self._temporal.clear()
        self._grads._before = None
        warnings.warn(
            f"gradwatch stopped recording at step {self._step} ({type(exc).__name__}: {exc}); "
            f"training goes on, and {self.path} keeps what was recorded before.",
            GradwatchWarning,
            stacklevel=3,
        )

    def _close(self, status: str) -> None:
        if self._closed:
            return
        self._remove_hooks()
        try:
            if self._failed is None:
                self._release()
                if self._scalars:
                    self._add_scalars()
                self._emit(self._step)
        finally:
            self._closed = True
            self._writer.close({"status": status if self._failed is None else f"failed: {self._failed}",
                                "steps": self._step})


def _max_group(optimizer: torch.optim.Optimizer | None, key: str) -> float | None:
    """The largest numeric ``key`` over the optimizer's parameter groups (None when no group has one)."""
    if optimizer is None:
        return None
    got = [float(g[key]) for g in optimizer.param_groups if isinstance(g.get(key), numbers.Real)]
    return max(got) if got else None


class _WeakHook:
    """A parameter hook that calls a watch's method through a weak reference.

    Hooks on tensors live in C++, where Python's garbage collector cannot see
    the cycle watch → model → parameter → hook → watch; a strong hook there
    would keep a dropped watch (and its writer thread and files) alive for
    ever. The module hooks, in Python dicts, keep the watch alive while its
    model lives; this one does not pin it.
    """

    def __init__(self, watch: Watch, method: str) -> None:
        self._ref = weakref.ref(watch)
        self._method = method

    @property
    def __self__(self) -> Watch | None:  # (read by _already_watched, as a bound method's)
        return self._ref()

    def __call__(self, *args: Any) -> Any:
        watch = self._ref()
        return None if watch is None else getattr(watch, self._method)(*args)


class _Discard:
    """A store writer that keeps nothing: ranks other than 0 of a sharded job."""

    error = None

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


class _ScalerStepWrap:
    """Wraps one GradScaler's ``step`` (on the instance) so that a step it skips is recorded.

    ``GradScaler.step(optimizer)`` unscales the gradients, then calls
    ``optimizer.step()`` only if they are all finite. A skipped step therefore
    never reaches the optimizer's hooks; the wrap notices that and records it
    (gradient statistics with their NaN/Inf, ``skipped_step`` = 1 and the
    ``loss_scale``). ``remove()`` puts the class's method back.
    """

    def __init__(self, scaler: Any, watch: Watch) -> None:
        self.scaler = scaler
        original = scaler.step

        @functools.wraps(original)
        def step(optimizer: Any, *args: Any, **kwargs: Any) -> Any:
            watch._stepped = False
            out = original(optimizer, *args, **kwargs)
            if optimizer is watch.optimizer and not watch._stepped and not watch._closed:
                watch._on_scaler_skipped()
            return out

        step.__gradwatch__ = watch  # type: ignore[attr-defined]
        scaler.step = step

    def remove(self) -> None:
        self.scaler.__dict__.pop("step", None)


class _NotRankZero(Watch):
    """What the watches of ranks other than 0 share: reading back is rank 0's."""

    rank: int

    def flush(self) -> None:
        return None

    def _only_rank_0(self, what: str) -> RuntimeError:
        return RuntimeError(f"`Watch.{what}()` on rank {self.rank}: only rank 0 records and writes the store; "
                            f"call it on rank 0 (torch.distributed.get_rank() == 0)")

    def open(self) -> Run:
        raise self._only_rank_0("open")

    def diagnose(self, thresholds: Thresholds | None = None) -> Diagnosis:
        raise self._only_rank_0("diagnose")

    def report(self, path: str | Path = "report.html", thresholds: Thresholds | None = None,
               redact: bool = False) -> Path:
        raise self._only_rank_0("report")

    def summary(self, thresholds: Thresholds | None = None) -> str:
        raise self._only_rank_0("summary")


class FollowerWatch(_NotRankZero):
    """What ``watch`` returns on a rank other than 0 of a ``torch.distributed`` job: it records nothing.

    Under DDP every rank holds the same, all-reduced gradients after backward,
    so rank 0's records are the job's; the other ranks place no hook and open
    no store. Logging and closing work (as no-ops); reading back is rank 0's.
    """

    def __init__(self, rank: int) -> None:  # noqa: D107 - no hooks, no store
        self.rank = rank
        self.path = None  # type: ignore[assignment]
        self._closed = False

    @property
    def step(self) -> int:
        return 0

    def log(self, **scalars: float | Tensor) -> None:
        return None

    def _close(self, status: str) -> None:
        self._closed = True

    # The integrations' calls: nothing to record on this rank.
    def _gradients_ready(self) -> None:
        return None

    def _step_done(self) -> None:
        return None

    def _stage_after_backward(self, when: Callable[[], bool]) -> None:
        return None

    def __repr__(self) -> str:
        return f"<gradwatch.Watch follower on rank {self.rank}: only rank 0 records>"


class ShardFollowerWatch(_NotRankZero):
    """What ``watch`` returns on a rank other than 0 when the model's parameters are sharded (FSDP2).

    Each rank holds a slice of every parameter, so every rank reads its own
    slices and takes part in the all-reduce of squared norms; only rank 0
    keeps the result. Activation statistics are rank 0's alone (its batch).
    Reading back is rank 0's.
    """

    def __init__(self, rank: int, *args: Any, **kwargs: Any) -> None:
        self.rank = rank
        super().__init__(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<gradwatch.Watch shard follower on rank {self.rank}, step {self._step}: only rank 0 records>"


def _uses_fsdp1(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:
        return False
    return any(isinstance(m, FullyShardedDataParallel) for m in model.modules())


def _is_sharded(model: nn.Module) -> bool:
    from gradwatch.probes.grads import _is_dtensor

    return any(_is_dtensor(p) for p in model.parameters())


def _rank() -> int:
    """This process's rank in an initialised torch.distributed job, else 0."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


# -- the entry point -----------------------------------------------------------------------

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _schedule(arg: str, value: Any, default: Schedule | None, allow_off: bool, caller: str = "watch") -> Schedule | None:
    expected = "a positive int or a callable step -> bool" + (", or True/False" if allow_off else "")
    if isinstance(value, bool):
        if not allow_off:
            raise TypeError(bad_argument(caller, arg, expected, value))
        return default if value else None
    if isinstance(value, int):
        if value < 1:
            raise ValueError(bad_argument(caller, arg, expected, value))
        return schedules.every(value)
    if callable(value):
        return value
    raise TypeError(bad_argument(caller, arg, expected, value))


def _already_watched(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> Watch | None:
    def owner(hooks: Any) -> Watch | None:
        for h in (hooks or {}).values():
            h = h.func if isinstance(h, functools.partial) else h
            owner_ = getattr(h, "__self__", None)
            if isinstance(owner_, Watch):
                return owner_
        return None

    for m in model.modules():
        found = owner(m._forward_hooks) or owner(m._forward_pre_hooks)
        if found is not None:
            return found
    for p in model.parameters():
        found = owner(getattr(p, "_post_accumulate_grad_hooks", None))
        if found is not None:
            return found
    if optimizer is not None:
        return owner(optimizer._optimizer_step_pre_hooks)
    return None


def _shared_module(model: nn.Module, other: Watch) -> tuple[str, str] | None:
    """(name, class) of a module of ``model`` that another watch's model also holds, if ``model`` is not that model."""
    if other.model is model:
        return None
    theirs = {id(m) for m in other.model.modules()}
    for name, m in model.named_modules():
        if id(m) in theirs:
            return name or "(root)", type(m).__name__
    return None


def _run_dir(store: Any, name: str | None, model: nn.Module, overwrite: bool,
             caller: str = "watch") -> tuple[Path, RunLock]:
    """The run's directory, created, and its lock, held: no other watch writes it while this one does."""
    if store is None:
        root = Path("runs")
    elif isinstance(store, (str, Path)):
        root = Path(store)
    else:
        raise TypeError(bad_argument(caller, "store", "a directory path (str or Path) or None", store))
    if name is not None and (not isinstance(name, str) or not _NAME.match(name)):
        raise ValueError(bad_argument(caller, "name", "a run name of letters, digits, '.', '_' or '-'", name))
    if name is None:  # the first free name: not stored, not being written
        base = f"{type(model).__name__}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
        for k in itertools.count(1):
            name = base if k == 1 else f"{base}-{k}"
            if not (root / name / DB_NAME).exists():
                run_dir, lock = _locked_dir(root, name, caller)
                if lock is not None and not (run_dir / DB_NAME).exists():
                    return run_dir, lock
                if lock is not None:
                    lock.release()
    assert name is not None
    run_dir, lock = _locked_dir(root, name, caller)
    if lock is None:
        raise FileExistsError(
            f"`{caller}(name=…)`: run {name!r} in {str(root)!r} is being written by {lock_holder(run_dir)}, "
            f"whose watch is still open; a live run is never replaced: close that watch first, or pick another name"
        )
    db = run_dir / DB_NAME
    if db.exists():
        if not overwrite:
            lock.release()
            raise FileExistsError(
                f"`{caller}(name=…)`: run {name!r} already exists in {str(root)!r}; pick another name, "
                f"or pass overwrite=True to replace it"
            )
        for suffix in ("", "-wal", "-shm"):
            Path(str(db) + suffix).unlink(missing_ok=True)
    return run_dir, lock


def _locked_dir(root: Path, name: str, caller: str) -> tuple[Path, RunLock | None]:
    """Create ``root/name`` and try its lock (None: another watch holds it)."""
    run_dir = root / name
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        return run_dir, RunLock.acquire(run_dir)
    except OSError as exc:
        raise OSError(f"`{caller}(store=…)` cannot create the run directory {str(run_dir)!r}: {exc.strerror or exc}") from None


def watch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    every: int | Schedule = 1,
    activations: bool | int | Schedule = True,
    update_every: bool | int | Schedule = True,
    store: str | Path | None = None,
    name: str | None = None,
    overwrite: bool = False,
    temporal: bool | str | list[str] = "auto",
    scaler: torch.amp.GradScaler | None = None,
) -> Watch:
    """Watch a model's gradients while it trains; returns the :class:`Watch` handle.

    Args:
        model: the module to watch. Its *layers* are the modules that directly
            own trainable parameters, named by their ``named_modules()`` path.
        optimizer: when given, a step is one ``optimizer.step()`` and update
            ratios are measured across it; otherwise a step is one backward pass.
        every: gradient norms and non-finite counts on these steps (an int n:
            steps 0, n, 2n, …; or a callable ``step -> bool``).
        activations: activation statistics and the back-propagated gradient
            ‖∂L/∂a‖ at each layer's output, on these steps. True: every 10th
            step (:data:`gradwatch.schedules.DEFAULT_SAMPLED`); False: never.
        update_every: weight norms and update ratios on these steps (needs an
            optimizer; each costs a copy of the weights during that step).
            True: every 10th step.
        store: directory that holds the runs (default ``runs``).
        name: this run's name, a directory under ``store`` (default: the model's
            class and the time).
        overwrite: replace an existing run of the same name.
        In a ``torch.distributed`` job only rank 0 records. Under DDP every
        rank holds the same all-reduced gradients, and the other ranks get a
        :class:`FollowerWatch` that does nothing. With sharded parameters
        (FSDP2's ``fully_shard``) every rank must call ``watch`` with the same
        schedules: each reads its slices, one all-reduce of squared norms per
        recorded step gives the whole tensors' norms, and rank 0 writes.
        temporal: record ‖∂L/∂h_t‖ at every time step of recurrent modules, on
            the ``activations`` schedule. "auto" (the default): every
            ``nn.RNNCell``/``GRUCell``/``LSTMCell`` that one forward pass calls
            more than once (a cell in a Python loop), nothing else, and nothing
            when ``activations=False``. True: every ``nn.RNN``/``nn.GRU``/
            ``nn.LSTM`` and ``nn.*Cell`` (fused modules are re-run unrolled);
            or the names of the modules to follow (a cell of your own, called
            once per time step, whose output is its new hidden state). See
            :mod:`gradwatch.probes.temporal` for what it costs.
        scaler: the ``torch.amp.GradScaler`` of a mixed-precision loop. The
            statistics are always of the unscaled gradients (the scaler
            unscales before ``optimizer.step()``); with the scaler given, a step
            it skips for inf/NaN gradients is recorded too — its gradient
            statistics, ``skipped_step`` = 1 and ``loss_scale`` — instead of
            vanishing from the record, and ‖∂L/∂a‖, ‖∂L/∂h_t‖ (read during
            backward, while the scale is on them) are divided by the scale.
    """
    return _make_watch(model, optimizer, every=every, activations=activations, update_every=update_every,
                       store=store, name=name, overwrite=overwrite, temporal=temporal, scaler=scaler)


def _make_watch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    *,
    every: int | Schedule = 1,
    activations: bool | int | Schedule = True,
    update_every: bool | int | Schedule = True,
    store: str | Path | None = None,
    name: str | None = None,
    overwrite: bool = False,
    temporal: bool | str | list[str] = False,
    scaler: Any = None,
    driver: str = "auto",
    caller: str = "watch",
) -> Watch:
    """``watch`` with the driver chosen: "auto", or "external" for an integration's callbacks."""
    if not isinstance(model, nn.Module):
        raise TypeError(bad_argument(caller, "model", "a torch.nn.Module", model))
    if _uses_fsdp1(model):
        raise NotImplementedError(
            f"`{caller}(model=…)`: the model is wrapped in FullyShardedDataParallel (FSDP1), whose flat parameters "
            f"hide the layers' own tensors; shard it with torch.distributed.fsdp.fully_shard (FSDP2) instead, "
            f"which gradwatch measures exactly"
        )
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(
            f"`{caller}(model=…)`: {type(model).__name__} has no parameters that require grad, so there is nothing to watch"
        )
    if optimizer is not None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(bad_argument(caller, "optimizer", "a torch.optim.Optimizer or None", optimizer))
        own = {id(p) for p in model.parameters()}
        foreign = sum(1 for g in optimizer.param_groups for p in g["params"] if id(p) not in own)
        if foreign:
            raise ValueError(
                f"`{caller}(optimizer=…)`: the optimizer holds {foreign} parameter(s) that are not the model's; "
                f"pass the optimizer that trains this model"
            )
    every_s = _schedule("every", every, None, allow_off=False, caller=caller)
    assert every_s is not None
    sampled = _schedule("activations", activations, schedules.DEFAULT_SAMPLED, allow_off=True, caller=caller)
    update = _schedule("update_every", update_every, schedules.DEFAULT_SAMPLED, allow_off=True, caller=caller)
    if not isinstance(overwrite, bool):
        raise TypeError(bad_argument(caller, "overwrite", "True or False", overwrite))
    if optimizer is None and not isinstance(update_every, bool) and driver != "external":  # (callbacks: the trainer's)
        raise ValueError(f"`{caller}(update_every=…)` measures updates across optimizer.step(): "
                         f"pass optimizer=… as well")
    auto = isinstance(temporal, str) and temporal == "auto"
    if auto and sampled is None:
        temporal = False  # the default rides the activations schedule: off with it
    if temporal is not False and sampled is None:
        raise ValueError(f"`{caller}(temporal=…)` rides the activations schedule: pass activations=True or an int, not False")
    if scaler is not None:
        if not isinstance(scaler, torch.amp.GradScaler):
            raise TypeError(bad_argument(caller, "scaler", "a torch.amp.GradScaler or None", scaler))
        if optimizer is None:
            raise ValueError(f"`{caller}(scaler=…)` needs the optimizer the scaler steps: pass optimizer=… as well")
        if "step" in scaler.__dict__:
            raise RuntimeError(f"`{caller}(scaler=…)`: this GradScaler's step() is already wrapped "
                               f"(another watch holds it); close that watch first")
    recurrent = find_recurrent(model, temporal)
    other = _already_watched(model, optimizer)
    shared = _shared_module(model, other) if other is not None else None
    if other is not None and shared is not None:
        raise RuntimeError(
            f"`{caller}(model=…)`: its module {shared[0]!r} ({shared[1]}) is shared with a model another watch holds "
            f"(store {str(other.path)!r}); one module's hooks cannot tell the two models' passes apart: "
            f"give each model its own instance, or close that watch first"
        )
    if other is not None:
        raise RuntimeError(
            f"`{caller}(model=…)`: this model is already watched (store {str(other.path)!r}); "
            f"close that watch first"
        )
    rank = _rank()
    if rank != 0 and _is_sharded(model):  # FSDP: every rank holds a slice; all take part, rank 0 writes
        return ShardFollowerWatch(rank, model, optimizer, every_s, None, update, None, None, driver=driver,
                                  scaler=scaler)
    if rank != 0:  # DDP: the gradients are the same on every rank after backward; rank 0 writes
        return FollowerWatch(rank)
    run_dir, lock = _run_dir(store, name, model, overwrite, caller)
    try:
        return Watch(model, optimizer, every_s, sampled, update, run_dir, recurrent, driver=driver, scaler=scaler,
                     lock=lock, temporal_auto=auto)
    except BaseException:
        lock.release()  # (idempotent: the writer may have released it already)
        raise
