"""One step's sequence: what each forward hook and each driver call records.

Flow of one step (steps count optimizer steps when an optimizer is given,
otherwise backward passes):

1. forward — the step's first forward hook sends the previous step's values
   on; on sampled steps, activation modules' forward hooks compute activation
   statistics and layers' forward hooks place tensor hooks on their outputs
   (for ‖∂L/∂a‖) (:mod:`~gradwatch.watching.sampled`);
2. backward — those tensor hooks collect the output-gradient norms;
3. gradients ready (the optimizer's pre-step hook, the end of backward, or a
   callback: :mod:`~gradwatch.watching.drivers`) — gradient norms and
   non-finite counts, and on update steps a copy of the weights;
4. step done (the optimizer's post-step hook, or a callback) — update ratios;
   the step's values wait in the :class:`~gradwatch.watching.buffer.StepBuffer`
   for one host copy and go on to the store's writer thread.

The watch runs every call here under its guard: an error stops the recording,
never the training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from gradwatch.layers import Anatomy
from gradwatch.probes.grads import GradProbe, Stats
from gradwatch.store import StoreWriter
from gradwatch.watching.buffer import StepBuffer
from gradwatch.watching.depth import DepthOrder
from gradwatch.watching.drivers import current_scale, skipped_scale
from gradwatch.watching.options import WatchOptions
from gradwatch.watching.sampled import Guard, SampledProbes


@dataclass
class Step:
    """The step in progress: its number and what has happened in it so far (a fresh one per step)."""

    number: int
    sampled: bool | None = None  # the activations schedule's answer, asked at the step's first forward pass
    scale: Tensor | None = None  # the loss scale on the backward pass, if ‖∂L/∂a‖ or ‖∂L/∂h_t‖ was read during it
    staged: Stats | None = None  # gradient statistics read at the end of backward (before clipping), to be kept
    stepped: bool = False  # optimizer.step() ran since the gradients were read (external driver: else a skip)


class StepRecorder:
    """Turns hooks and driver calls into each step's records: the probes, the step's state, its buffer."""

    def __init__(self, parts: Anatomy, optimizer: torch.optim.Optimizer | None, options: WatchOptions,
                 writer: StoreWriter, recurrent: list[tuple[str, nn.Module]], guard: Guard, *,
                 external: bool, scaler: Any, at_step_end: Callable[[], None]) -> None:
        self.layers, self.acts = parts.layers, parts.activations
        self.every, self.sampled = options.grad_schedule, options.sampled_schedule
        self.update = options.update_schedule if optimizer is not None else None
        self.grads = GradProbe(self.layers)
        self.device = self.grads.device
        self.probes = SampledProbes(self.acts, self.grads.params, self.device, recurrent, options.temporal_auto, guard)
        self.now = Step(0)
        self._external = external  # driven by a framework's callbacks (skips told by the optimizer's hook)
        self._counts_skips = external and optimizer is not None
        self._scaler = scaler
        self._writer = w = writer
        ids = {"layer": np.array([w.entity(l.name, "layer", type(l.module).__name__) for l in self.layers]),
               "param": np.array([w.entity(n, "param") for n in self.grads.pair_names]),
               "activation": np.array([w.entity(a.name, "activation", type(a.module).__name__) for a in self.acts])}
        self._recurrent_ids = {name: w.entity(name, "recurrent", cell) for name, cell in self.probes.temporal.entities()}
        self.buffer = StepBuffer(w, self.device, ids)
        self._depth = DepthOrder()
        self._at_step_end = at_step_end  # the watch checks its writer before the next step begins

    # -- forward hooks -------------------------------------------------------------------
    def layer_forward(self, i: int, output: Any) -> None:
        self.buffer.release()  # a step that ended: its values go on before this one's come
        self._depth.note(self.layers[i].name, "layer")
        if self._sampling():
            self.probes.layer_output(i, output)

    def activation_forward(self, i: int, module: nn.Module, args: tuple, output: Any) -> None:
        self.buffer.release()
        self._depth.note(self.acts[i].name, "activation")
        if self._sampling():
            self.probes.activation_call(i, module, args, output)

    def recurrent_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._sampling():
            self.probes.recurrent_call(module, args, output)

    def _sampling(self) -> bool:
        """Whether this step's forward-side probes run (asked once per step), and autograd records the pass."""
        now = self.now
        if now.sampled is None:
            now.sampled = self.sampled is not None and bool(self.sampled(now.number))
        return now.sampled and torch.is_grad_enabled()

    # -- the driver's calls --------------------------------------------------------------
    def gradients_ready(self) -> None:
        """The step's gradients are final (unscaled); the optimizer has not stepped yet."""
        self.buffer.release()  # a step that ended with no forward pass since: its values go first, as its own
        now = self.now
        now.stepped = False
        now.scale = current_scale(self._scaler, self.device) if now.sampled else None  # before scaler.update()
        # Before the optimizer step: the temporal probe's re-run needs the weights of the forward pass.
        self.probes.add_temporal(self.buffer, now.scale, self._recurrent_ids)
        staged, now.staged = now.staged, None
        if staged is not None:
            self.buffer.add_stats(staged)
        elif self.every(now.number):
            self.buffer.add_stats(self.grads.gradients())
        if self.update is not None and self.update(now.number):
            self.grads.snapshot()

    def step_done(self) -> None:
        """The optimizer step is over (or was skipped): update ratios, then the step closes."""
        if self._counts_skips and not self.now.stepped:
            self._mark_skipped()
        if self.grads.has_snapshot:
            self.buffer.add_stats(self.grads.updates())
        self._end_step()

    def step_skipped(self) -> None:
        """A GradScaler found inf/NaN and did not call optimizer.step(): the step is recorded anyway."""
        self.gradients_ready()  # the scaler unscaled the gradients before it looked
        self._mark_skipped()
        self.step_done()

    def backward_step(self) -> None:
        """No optimizer: the backward pass that just ended is the step."""
        self.buffer.release()
        self.probes.add_temporal(self.buffer, self.now.scale, self._recurrent_ids)
        if self.every(self.now.number):
            self.buffer.add_stats(self.grads.gradients())
        self._end_step()

    def stage(self, scale: Tensor | None) -> None:
        """Read the gradient statistics now (before clipping), for the step's :meth:`gradients_ready` to keep.

        ``scale``: a loss scale still on the gradients (float16 with a GradScaler that has not unscaled
        them yet); norms are divided by it.
        """
        if self.every(self.now.number):
            self.now.staged = self.grads.gradients(scale)

    def optimizer_stepped(self) -> None:
        self.now.stepped = True

    def add_scalar(self, name: str, value: Tensor) -> None:
        """A run-level scalar for the step in progress, or for the step held until the next forward pass."""
        self.buffer.add_keyed(np.array([[self._writer.entity(name, "run"), self._writer.quantity(name), -1]]), value)

    def _mark_skipped(self) -> None:
        self.add_scalar("skipped_step", torch.tensor(1.0, dtype=torch.float64, device=self.device))
        if self._scaler is not None:  # the scale this step used; a callback closes the step after update() backed off
            scale = skipped_scale(self._scaler, after_update=self._external)
            self.add_scalar("loss_scale", torch.tensor(scale, dtype=torch.float64, device=self.device))

    def _end_step(self) -> None:
        self.buffer.release()  # two steps without a forward pass between them
        now = self.now
        self.probes.add_step(self.buffer, now.scale)
        self.buffer.hold(now.number)
        if not self._depth.settled:
            layer_of = [self.layers[i].name for i in self.grads.pair_layer]
            self._depth.settle(self._writer, list(zip(self.grads.pair_names, layer_of)))
        self._at_step_end()
        self.now = Step(now.number + 1)

    def clear(self) -> None:
        """Forget everything measured and pending (the watch stopped recording)."""
        self.buffer.clear()
        self.probes.clear()
        self.grads.drop_snapshot()
