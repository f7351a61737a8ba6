"""One step's sequence: what each forward hook and each driver call records, and what it costs.

Flow of one step (steps count optimizer steps when an optimizer is given,
otherwise backward passes):

0. the step begins when the last one ends: the families that record on it
   are decided then (:class:`~gradwatch.watching.budget.Budget`), and the
   forward hooks their probes need are placed, or removed (a step that
   records nothing of the forward pass runs no hook per layer); the detail
   window after a flight-recorder event turns every sampled family on;
1. forward — the model's (or its first layer's) forward pre-hook sends the
   previous step's values on; on sampled steps, activation modules' forward
   hooks compute activation statistics and layers' forward hooks place tensor
   hooks on their outputs (for ‖∂L/∂a‖) (:mod:`~gradwatch.watching.sampled`);
2. backward — those tensor hooks collect the output-gradient norms;
3. gradients ready (the optimizer's pre-step hook, the end of backward, or a
   callback: :mod:`~gradwatch.watching.drivers`) — gradient norms (their
   per-layer records derived later, many steps at once), the flight
   recorder's push and trigger (:mod:`~gradwatch.watching.flight`), and on
   update steps a copy of the weights;
4. step done (the optimizer's post-step hook, or a callback) — update ratios;
   the step's values wait in the :class:`~gradwatch.watching.buffer.StepBuffer`
   for a host copy and go on to the store's writer thread; the step's costs,
   family by family, go to the budget.

The watch runs every call here under its guard: an error stops the recording,
never the training.
"""

from __future__ import annotations


from dataclasses import dataclass
from typing import Any, Callable, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from gradwatch.layers import Anatomy
from gradwatch.probes.attention_read import find_attention, find_softmax_sites
from gradwatch.probes.functional import FunctionalTap, calls_activations, in_reentrant_checkpoint
from gradwatch.probes.grads import GradProbe, Pending
from gradwatch.probes.hostcopy import device_scalar
from gradwatch.probes.loops import gated_owners, loop_candidates
from gradwatch.probes.norms import group_elements, judged as judged_norm
from gradwatch.probes.output import (batch_labels, batch_spread, batch_tensor, binary_shares, labelled,
                                     majority_shares)
from gradwatch.probes.weakhook import WeakHook
from gradwatch.store import StoreWriter
from gradwatch.watching.budget import FORWARD, Budget, CostMeter, thread_seconds
from gradwatch.watching.buffer import StepBuffer
from gradwatch.watching.depth import DepthOrder
from gradwatch.watching.drivers import current_scale, skipped_scale
from gradwatch.watching.flight import WatchFlight
from gradwatch.watching.options import WatchOptions
from gradwatch.watching.sampled import Guard, SampledProbes, WatchedAttention


@dataclass
class Step:
    """The step in progress: its number and what has happened in it so far (a fresh one per step)."""

    number: int
    on: frozenset[str] = frozenset()  # the families that record on this step, decided when it begins
    scale: Tensor | None = None  # the loss scale on the backward pass, if ‖∂L/∂a‖ or ‖∂L/∂h_t‖ was read during it
    staged: Pending | None = None  # gradient norms read at the end of backward (before clipping), to be kept
    stepped: bool = False  # optimizer.step() ran since the gradients were read (external driver: else a skip)
    spread_read: bool = False  # the model's output spread was read on this step (its first pass only)
    predicted: Tensor | None = None  # the class each row of (B, C) scores predicts, read with the spread


class Hooks(Protocol):
    """The watch's hooks as the steps switch them (:class:`~gradwatch.watching.handle.Watch`)."""

    def forward_hooks(self, wanted: frozenset[str]) -> None:
        """Place the forward hooks of these kinds ("layers", "activations", "recurrent"), remove the others."""

    def step_starts_at(self, module: nn.Module) -> None:
        """Also tell a step's start by this module's forward pre-hook (the first layer to run)."""


BACKWARD_READ = frozenset({"backprop", "temporal"})  # read during backward, while a loss scale is on the gradients


class StepRecorder:
    """Turns hooks and driver calls into each step's records: the probes, the step's state, its buffer."""

    def __init__(self, parts: Anatomy, optimizer: torch.optim.Optimizer | None, options: WatchOptions,
                 writer: StoreWriter, recurrent: list[tuple[str, nn.Module]], guard: Guard, *,
                 external: bool, scaler: Any, at_step_end: Callable[[], None], model: nn.Module | None = None) -> None:
        self.layers, self.acts = parts.layers, parts.activations
        self.grads = GradProbe(self.layers)
        self.device = self.grads.device
        self.meter = CostMeter(self.device)
        given = options.given(with_optimizer=optimizer is not None)
        attention = None
        if model is not None and given["attention"] is not None:
            attention = WatchedAttention(model, self.meter)
        # a layer called again on its own output (W_hh as an nn.Linear in a Python loop) is followed through time
        # wherever cells are followed by default ("auto", True), riding the ‖∂L/∂a‖ hooks (gradwatch.probes.loops)
        self._through_time = options.temporal_auto or options.temporal is True
        self.probes = SampledProbes(self.acts, self.grads.params, self.device, recurrent, options.temporal_auto, guard,
                                    self.meter, attention,
                                    loops=loop_candidates([(l.name, l.module) for l in self.layers]) if self._through_time else None)
        if self._through_time and model is not None:  # hand-written gated cells, for the remedies through time
            writer.meta({"gated_loops": gated_owners(model, [l.name for l in self.layers if l.name])})
        if not self.probes.temporal.modules:
            given["temporal"] = None  # nothing to follow through time
        if self.probes.attention is None:
            given["attention"] = None  # no attention module the probe recognises
        capacity = options.flight_steps(has_attention=model is not None and bool(find_attention(model)
                                                                                 or find_softmax_sites(model)))
        flight_on = bool(capacity) and optimizer is not None
        pinned = {"grads": "every step: the flight recorder reads the gradient norms on every step anyway"} if flight_on else {}
        # (the store's writer thread: its records cost CPU there, which the budget counts with the rest)
        self.budget = Budget(options.budget, given, sharded=self.grads.sharded,
                             writer_seconds=thread_seconds(getattr(writer, "_thread", None)), pinned=pinned)
        self._hooks: Hooks | None = None
        self._wanted: frozenset[str] = frozenset()
        self._hooks_for: frozenset[str] | None = None  # the families whose hooks are placed (once the depth is settled)
        self.now = Step(0, self.budget.active(0))
        self._external = external  # driven by a framework's callbacks (skips told by the optimizer's hook)
        self._counts_skips = external and optimizer is not None
        self._scaler = scaler
        self._writer = w = writer
        ids = {"layer": np.array([w.entity(l.name, "layer", type(l.module).__name__) for l in self.layers]),
               "param": np.array([w.entity(n, "param") for n in self.grads.pair_names]),
               "activation": np.array([w.entity(a.name, "activation", type(a.module).__name__) for a in self.acts])}
        self._recurrent_ids = {name: w.entity(name, "recurrent", cell) for name, cell in self.probes.temporal.entities()}
        self._loop_types = {layer.name: type(layer.module).__name__ for layer in self.layers}
        self.buffer = StepBuffer(w, self.device, ids)
        self.flight = None
        if flight_on:
            self.flight = WatchFlight(self.grads, [l.name for l in self.layers], ids["layer"], w, capacity)
            w.meta(self.flight.meta())
        # the families a flight-recorder event turns on: all that record at all (sharded: not the collective ones)
        self._detail = frozenset(n for n, sched in self.budget.schedules.items() if sched is not None
                                 and not (self.grads.sharded and self.budget.families[n].collective))
        self._depth = DepthOrder()
        # activations called as functions in the user's forward (torch.tanh(layer(x))): tapped for the model's
        # forward pass on the steps that record activations (gradwatch.probes.functional)
        self.tap = (FunctionalTap(lambda *a: guard(self._functional_call, *a), lambda *a: guard(self._functional_sum, *a),
                                  lambda p: guard(self._functional_dropout, p))
                    if model is not None and self.budget.schedules.get("activations") is not None
                    and calls_activations(model) else None)
        self._at_step_end = at_step_end  # the watch checks its writer before the next step begins
        self._custom_kinds: list[str] = []  # the user's autograd.Function classes met between layers, so far
        self._dropout_p = 0.0  # the largest rate of a dropout called as a function, so far
        self._ran_without_grad: set[str] = set()  # layers seen running with gradients off
        # a pass's own inputs (their storages) and whether a layer of it has made an output with gradient yet; the
        # layers seen taking a float input with none after that (meta cut_inputs)
        self._pass_inputs: set[int] = set()
        self._pass_grad_out = False
        self._cut_inputs: list[str] = []
        self._checkpointed: list[str] = []  # ... of them, those inside a reentrant checkpoint
        self._norm_checked: set[str] = set()  # layers whose first training call was looked at for a normalisation
        self._norm_layers: dict[str, dict[str, Any]] = {}  # ... those found to normalise (meta normalising_layers)
        self._single_groups: list[str] = []  # GroupNorm layers whose groups held one element (single_element_groups)

    # -- hooks: which are placed ---------------------------------------------------------
    def start(self, hooks: Hooks) -> None:
        """The watch's hooks are ready to be switched: place the first step's."""
        self._hooks = hooks
        self._switch_hooks()

    def _switch_hooks(self) -> None:
        """The forward hooks that this step's families (and, until it is settled, the depth order) need."""
        on, settled = self.now.on, self._depth.settled
        if on is self._hooks_for and "attention" not in on:  # the last step's families (the budget's same set)
            return
        self._hooks_for = on if settled else None
        wanted = frozenset(kind for kind, needed in (("layers", "backprop" in on or not settled),
                                                     ("activations", "activations" in on or not settled),
                                                     ("recurrent", "temporal" in on)) if needed)
        self.probes.attention_hooks("attention" in on)
        if wanted != self._wanted and self._hooks is not None:
            self._hooks.forward_hooks(wanted)
            self._wanted = wanted

    # -- forward hooks -------------------------------------------------------------------
    def forward_starts(self) -> None:
        """A forward pass begins (the model's, or its first layer's call: a submodule called on its own, a siamese
        net's ``model.embed(a)``): a step that ended sends its values on before this one's come; no layer of the pass
        has made an output yet, and an input a layer takes without gradient then is the pass's own."""
        self._pass_grad_out = False
        self.buffer.release()

    def model_called(self) -> None:
        """The model's own forward begins (not a first layer's call in a loop): calls of a layer count anew; on a
        step that records activations (or notes the depth order), activation function calls are tapped."""
        self._pass_grad_out = False
        self.probes.loops.new_pass()
        self.probes.custom.new_pass()
        if (self.tap is not None and torch.is_grad_enabled() and "layers" in self._wanted
                and ("activations" in self.now.on or not self._depth.settled)):
            self.probes.functional.new_pass()
            self.tap.enter()

    def model_output(self, output: Any) -> None:
        """The model's output on a pass with gradient: on a step that reads ‖∂L/∂a‖, the spread of its first pass's
        output across the batch and its rms (:func:`gradwatch.probes.output.batch_spread`), the run's ``out_spread``
        and ``out_rms``."""
        if "backprop" not in self.now.on or self.now.spread_read:
            return
        self.now.spread_read = True
        y = batch_tensor(output)
        if y is not None:
            t = self.meter.start("backprop")
            spread, rms = batch_spread(y)
            self.add_scalar("out_spread", spread)
            self.add_scalar("out_rms", rms)
            if y.requires_grad and y.dim() == 2 and y.shape[1] >= 2:  # class scores: their gradient tells the labels
                self.now.predicted = y.detach().argmax(1)
                y.register_hook(WeakHook(self, "_on_labels_grad"))
            elif y.requires_grad and y.numel() == y.shape[0]:  # one score a sample: its sign, and its targets' share
                above_zero, above_half = binary_shares(y)
                self.add_scalar("out_positive", above_zero)
                self.add_scalar("out_above_half", above_half)
                y.register_hook(WeakHook(self, "_on_binary_grad"))
            self.meter.stop("backprop", t)

    def _on_labels_grad(self, grad: Tensor) -> None:
        self.probes.timed("backprop", self._batch_labels, grad)

    def _on_binary_grad(self, grad: Tensor) -> None:
        self.probes.timed("backprop", self._binary_targets, grad)

    def _binary_targets(self, grad: Tensor | None) -> None:
        """The share of a one-score-a-sample output's gradient entries below 0, in the backward pass that fills
        ``.grad``: under a binary cross-entropy, ∂L/∂z = c·(σ(z) − y) with c > 0 (and ∂L/∂p = (p − y)/(p(1 − p)) on
        probabilities) is negative exactly where the target is 1 — the batch's positive rate, ``target_positive``."""
        if grad is not None and self.probes.fills_grad():
            self.add_scalar("target_positive", (grad.detach() < 0).double().mean())

    def _batch_labels(self, grad: Tensor | None) -> None:
        """The labels of a batch scored by cross-entropy, read off the output's gradient (:func:`gradwatch.probes.
        output.batch_labels`) in the backward pass that fills ``.grad``: the run's ``batch_classes``,
        ``batch_class_min``, ``label_rows`` and ``output_classes``."""
        if grad is not None and self.probes.fills_grad():  # (None: an output the loss does not read)
            rows = labelled(grad)
            for name, value in zip(("batch_classes", "batch_class_min", "label_rows", "output_classes"),
                                   batch_labels(grad, rows)):
                self.add_scalar(name, value)
            if self.now.predicted is not None and self.now.predicted.shape[0] == grad.shape[0]:
                for name, value in zip(("label_top", "label_minority", "pred_minority"),
                                       majority_shares(grad, self.now.predicted, rows)):
                    self.add_scalar(name, value)

    def model_returned(self) -> None:
        """The model's own forward ended (or failed): the tap, if open, closes."""
        if self.tap is not None:
            self.tap.leave()

    def _functional_call(self, fn: str, args: tuple, kwargs: dict, node: Any, output: Tensor) -> None:
        t = self.meter.start("activations")
        name = self.probes.functional_call(fn, args, kwargs, node, output)
        if name is not None:
            self._functional_id(name)  # (the entity before the depth order is settled, so that it gets one)
            self._depth.note(name, "activation")
        self.meter.stop("activations", t)

    def _functional_sum(self, a: tuple[Tensor, Any], b: tuple[Tensor, Any]) -> None:
        f = self.probes.functional
        if f.summed(a, b):  # a residual branch written in forward: its calls and layers, for the diagnosis
            self._writer.meta({"residual_calls": sorted(f.branch_calls), "residual_layers": sorted(f.branch_layers)})

    def _functional_dropout(self, p: float) -> None:
        """A dropout called as a function in training (``F.dropout(h, p)``): the largest rate so far, meta
        ``functional_dropout_p`` (modules' rates are meta ``dropout_p``)."""
        if p > self._dropout_p:
            self._dropout_p = p
            self._writer.meta({"functional_dropout_p": p})

    def _functional_id(self, name: str) -> int:
        kind = self.probes.custom.kinds.get(name)
        return self._writer.entity(name, "activation", kind or self.probes.functional.kind_of(name))

    def _custom_site(self, site: str) -> None:
        """A user's autograd.Function between two layers (:mod:`gradwatch.probes.custom`): an activation entity in
        the depth order before the layer it feeds; its Function's class in meta ``custom_functions``."""
        self._functional_id(site)
        self._depth.note(site, "activation")
        kinds = sorted(set(self.probes.custom.kinds.values()))
        if kinds != self._custom_kinds:
            self._custom_kinds = kinds
            self._writer.meta({"custom_functions": kinds})

    def layer_forward(self, i: int, output: Any, x: Tensor | None = None) -> None:
        self.buffer.release()
        grad = torch.is_grad_enabled()
        if grad:
            self._cut_input(self.layers[i].name, output, x)
        if grad and x is not None and x.grad_fn is not None:  # an autograd.Function of the user's before the layer
            custom = self.probes.custom
            site = custom.layer_input(x, "backprop" in self.now.on, WeakHook(self.probes, "timed", "backprop"))
            if site is not None:
                self._custom_site(site)
        self._depth.note(self.layers[i].name, "layer")
        if not grad and self.layers[i].name not in self._ran_without_grad:
            self._no_grad_layer(self.layers[i].name)
        if grad:
            self.probes.custom.layer_output(self.layers[i].name, output)
        if self.tap is not None and self.tap.open:  # a pre-activation for the activation functions to come
            self.probes.functional.layers.add(self.layers[i].name, output, x)
        if "backprop" in self.now.on and torch.is_grad_enabled():
            t = self.meter.start("backprop")
            self.probes.layer_output(i, output, self._through_time)
            self.meter.stop("backprop", t)

    def norm_layer(self, i: int, module: nn.Module, args: tuple) -> None:
        """A layer of the user's own that may normalise its input, at its first training call: whether it does, and
        whether its backward passes on a gradient along what its forward ignores (:mod:`gradwatch.probes.norms`;
        meta ``normalising_layers``, each such layer once)."""
        name = self.layers[i].name
        if name in self._norm_checked or not (torch.is_grad_enabled() and module.training):
            return
        self._norm_checked.add(name)
        if isinstance(module, nn.GroupNorm) and args and group_elements(module, args[0]) == 1:
            self._single_groups.append(name)  # GroupNorm(C, C) on 1×1 maps: each group one value, the output β
            self._writer.meta({"single_element_groups": list(self._single_groups)})
        t = self.meter.start("backprop")
        try:
            found = judged_norm(module, args)
        finally:
            self.meter.stop("backprop", t)
        if found is not None:
            self._norm_layers[name] = found.as_meta()
            self._writer.meta({"normalising_layers": dict(self._norm_layers)})

    def pass_inputs(self, args: tuple, kwargs: dict) -> None:
        """The tensors the model's forward is called with, positional and by name (a layer may take them without
        gradient); the storages of the first level's, and of those in a tuple or list there."""
        found: set[int] = set()
        for value in (*args, *kwargs.values()):
            for t in (value if isinstance(value, (tuple, list)) else (value,)):
                if isinstance(t, Tensor):
                    found.add(_storage(t))
        self._pass_inputs = found

    def _cut_input(self, name: str, output: Any, x: Tensor | None) -> None:
        """A layer that takes a float input with no gradient, not one of the pass's own inputs, after a layer of the
        same pass made an output with one: the graph is cut between them (a distribution's .sample() where
        .rsample() is meant, a .detach(), a .numpy() round trip) — meta ``cut_inputs``, each layer once. Round 30:
        a VAE decoding Normal(μ, σ).sample(), its encoder trained by the KL term alone, 0 of 8 latents active, and
        "no findings"."""
        # (from the step the depth order settles: its first layer's calls start a pass of their own from then on)
        # (a state of zeros to start a recurrence from is no cut: a hand-written RNN's W_hh takes h_0 = 0 after W_xh)
        if (self._pass_grad_out and self._depth.settled and x is not None and x.is_floating_point()
                and not x.requires_grad and name not in self._cut_inputs and _storage(x) not in self._pass_inputs
                and bool(x.detach().ne(0).any())):
            self._cut_inputs.append(name)
            self._writer.meta({"cut_inputs": list(self._cut_inputs)})
        if not self._pass_grad_out and isinstance(output, Tensor) and output.requires_grad:
            self._pass_grad_out = True

    def _no_grad_layer(self, name: str) -> None:
        """A layer that ran with gradients off, the first time: where that was inside a reentrant
        ``torch.utils.checkpoint`` (which runs its function under no_grad, and gives it gradients only where an input
        requires grad), meta ``reentrant_checkpoint_layers``."""
        self._ran_without_grad.add(name)
        if in_reentrant_checkpoint():
            self._checkpointed.append(name)
            self._writer.meta({"reentrant_checkpoint_layers": list(self._checkpointed)})

    def activation_forward(self, i: int, module: nn.Module, args: tuple, output: Any) -> None:
        self.buffer.release()
        self._depth.note(self.acts[i].name, "activation")
        if "activations" in self.now.on and torch.is_grad_enabled():
            t = self.meter.start("activations")
            self.probes.activation_call(i, module, args, output)
            self.meter.stop("activations", t)

    def recurrent_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        if "temporal" in self.now.on and torch.is_grad_enabled():
            t = self.meter.start("temporal")
            self.probes.recurrent_call(module, args, output)
            self.meter.stop("temporal", t)

    # -- the driver's calls --------------------------------------------------------------
    def gradients_ready(self) -> None:
        """The step's gradients are final (unscaled); the optimizer has not stepped yet."""
        mark = self.meter.mark()
        self.buffer.release()  # a step that ended with no forward pass since: its values go first, as its own
        now = self.now
        now.stepped = False
        if not now.on.isdisjoint(BACKWARD_READ):  # the scale on ‖∂L/∂a‖, ‖∂L/∂h_t‖; read before scaler.update()
            now.scale = current_scale(self._scaler, self.device)
        if "temporal" in now.on:  # before the optimizer step: the re-run needs the weights of the forward pass
            self.probes.add_temporal(self.buffer, now.scale, self._recurrent_ids)
        if "backprop" in now.on:  # (a hand-written recurrence's λ₁(W_hh) too)
            self.probes.loops.read_weights()
        staged, now.staged = now.staged, None  # (staged for the recorder alone on a step without "grads")
        if "grads" in now.on:
            if staged is None:
                t = self.meter.start("grads")
                staged = self.grads.gradients()
                self.meter.stop("grads", t)
            self.buffer.add_pending(staged)
        if self.flight is not None:  # its time counts as the watch's fixed per-step work
            if staged is None:
                staged = self.grads.gradients()
            self.flight.push(now.number, staged, now.on)  # an event: full detail from the next step on
        if "updates" in now.on:
            t = self.meter.start("updates")
            self.grads.snapshot()
            self.meter.stop("updates", t)
        self.meter.base_since(mark)

    def step_done(self) -> None:
        """The optimizer step is over (or was skipped): update ratios, then the step closes."""
        mark = self.meter.mark()
        if self._counts_skips and not self.now.stepped:
            self._mark_skipped()
        if self.grads.has_snapshot:
            t = self.meter.start("updates")
            self.buffer.add_stats(self.grads.updates())
            self.meter.stop("updates", t)
        self._end_step(mark)

    def step_skipped(self) -> None:
        """A GradScaler found inf/NaN and did not call optimizer.step(): the step is recorded anyway."""
        self.gradients_ready()  # the scaler unscaled the gradients before it looked
        self._mark_skipped()
        self.step_done()

    def backward_step(self) -> None:
        """No optimizer: the backward pass that just ended is the step."""
        mark = self.meter.mark()
        self.buffer.release()
        if "temporal" in self.now.on:
            self.probes.add_temporal(self.buffer, self.now.scale, self._recurrent_ids)
        if "grads" in self.now.on:
            t = self.meter.start("grads")
            self.buffer.add_pending(self.grads.gradients())
            self.meter.stop("grads", t)
        self._end_step(mark)

    def stage(self, scale: Tensor | None) -> None:
        """Read the gradient norms now (before clipping), for the step's :meth:`gradients_ready` to keep.

        ``scale``: a loss scale still on the gradients (float16 with a GradScaler that has not unscaled
        them yet); norms are divided by it.
        """
        if "grads" in self.now.on:
            t = self.meter.start("grads")
            self.now.staged = self.grads.gradients(scale)
            self.meter.stop("grads", t)
        elif self.flight is not None:  # the recorder reads them on every step, before clipping too
            mark = self.meter.mark()
            self.now.staged = self.grads.gradients(scale)
            self.meter.base_since(mark)  # its fixed per-step work, as in gradients_ready

    def optimizer_stepped(self) -> None:
        self.now.stepped = True

    def add_scalar(self, name: str, value: Tensor) -> None:
        """A run-level scalar for the step in progress, or for the step held until the next forward pass."""
        self.buffer.add_scalar(self._writer.entity(name, "run"), self._writer.quantity(name), value)

    def _mark_skipped(self) -> None:
        self.add_scalar("skipped_step", device_scalar(1.0, torch.float64, self.device))
        if self._scaler is not None:  # the scale this step used; a callback closes the step after update() backed off
            scale = skipped_scale(self._scaler, after_update=self._external)
            self.add_scalar("loss_scale", device_scalar(scale, torch.float64, self.device))

    def _loop_id(self, name: str) -> int:
        """The entity of a hand-written recurrence (a layer called on its own output), made at its first records."""
        return self._writer.entity(name, "recurrent", self._loop_types.get(name))

    def _end_step(self, mark: tuple[float, float]) -> None:
        self.buffer.release()  # two steps without a forward pass between them
        now = self.now
        if not now.on.isdisjoint(FORWARD):
            self.probes.add_step(self.buffer, now.scale, now.on, self._loop_id, self._functional_id)
        if "attention" in now.on:
            self.probes.add_attention(self.buffer, self._writer)
        self.buffer.hold(now.number)
        if not self._depth.settled:
            layer_of = [self.layers[i].name for i in self.grads.pair_layer]
            self._depth.settle(self._writer, list(zip(self.grads.pair_names, layer_of)))
            first = self._depth.first("layer")
            if first is not None and self._hooks is not None:
                self._hooks.step_starts_at(self.layers[[l.name for l in self.layers].index(first)].module)
        self._at_step_end()
        self.meter.base_since(mark)
        seconds, base, interval = self.meter.close_step()
        device = self.meter.device_seconds() if self.device.type == "cuda" else []
        if self.budget.step_ended(now.number, seconds, base, interval, device):
            self._writer.meta(self.budget.report())
        self.now = Step(now.number + 1, self.on_step(now.number + 1))
        self._switch_hooks()

    def on_step(self, step: int) -> frozenset[str]:
        """The families that record on ``step``: the budget's, or every one in a flight recorder's detail window."""
        on = self.budget.active(step)
        if self.flight is not None and self.flight.detail(step):
            on = on | self._detail
        return on

    def clear(self) -> None:
        """Forget everything measured and pending (the watch stopped recording)."""
        self.buffer.clear()
        self.probes.clear()
        self.grads.drop_snapshot()


def _storage(t: Tensor) -> int:
    """The address of a tensor's storage (its views share it); 0 where it has none (a tensor subclass)."""
    try:
        return int(t.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):
        return 0
