"""The probes that run on sampled steps, fed from forward hooks.

On a sampled step each layer's forward hook places a tensor hook on the
layer's output (for ‖∂L/∂a‖), each activation's forward hook measures the call,
each followed recurrent module's call is captured for ‖∂L/∂h_t‖, and the
attention probe's hooks (placed on its steps only) measure each attention
module's logits and entropy and the LM head's log Z. What a
backward pass delivers counts only when that pass fills the parameters'
``.grad``: a ``torch.autograd.grad`` call (a gradient penalty, an input
gradient) runs the same tensor hooks and is left out.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from gradwatch.layers import Activation
from gradwatch.probes.activations import ActivationProbe, Call
from gradwatch.probes.attention import AttentionProbe
from gradwatch.probes.backprop import BackpropProbe, grad_tensors
from gradwatch.probes.custom import CustomBackwardProbe
from gradwatch.probes.functional import FunctionalProbe
from gradwatch.probes.loops import LoopProbe
from gradwatch.probes.temporal import TemporalProbe
from gradwatch.probes.weakhook import WeakHook
from gradwatch.watching.budget import CostMeter
from gradwatch.watching.buffer import StepBuffer

Guard = Callable[..., Any]  # guard(fn, *args): run a hook body, a failure stops the recording instead of training


class WatchedAttention(AttentionProbe):
    """The attention probe as a watch drives it: passes that build a graph only (not an evaluation under
    ``no_grad``), its time counted as the ``attention`` family's cost."""

    def __init__(self, model: nn.Module, meter: CostMeter) -> None:
        super().__init__(model)
        self._meter = meter

    def _guarded(self, fn: Any) -> None:
        if not torch.is_grad_enabled():
            return
        t = self._meter.start("attention")
        try:
            super()._guarded(fn)
        finally:
            self._meter.stop("attention", t)


class SampledProbes:
    """‖∂L/∂a‖ at layer outputs, activation statistics and gradients through time, for one watch."""

    def __init__(self, activations: list[Activation], params: list[nn.Parameter], device: torch.device,
                 recurrent: list[tuple[str, nn.Module]], temporal_auto: bool, guard: Guard, meter: CostMeter,
                 attention: WatchedAttention | None = None,
                 loops: dict[int, tuple[str, nn.Module]] | None = None) -> None:
        self.backprop = BackpropProbe(device)
        self.loops = LoopProbe(loops or {}, device)  # layers called again on their own output: recurrences by hand
        self.functional = FunctionalProbe(device)  # activations called as functions (fed by the watch's tap)
        self.custom = CustomBackwardProbe(self._fills_grad)  # a user's autograd.Function between layers
        self.attention = attention if attention is not None and attention.measures else None
        self.activations = ActivationProbe([a.spec for a in activations], device)
        self.temporal = TemporalProbe(recurrent, device, repeated_only=temporal_auto)
        self._params = params
        self._guard = guard
        self._meter = meter
        self._accumulators: list[Any] | None = None  # the parameters' AccumulateGrad nodes, found at first use
        self._fill_task: tuple[int, bool] = (-1, True)  # (graph task, whether it fills .grad)

    # -- from the forward hooks of a sampled step ------------------------------------------
    def timed(self, family: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` under the guard, its time counted as ``family``'s cost."""
        t = self._meter.start(family)
        try:
            return self._guard(fn, *args)
        finally:
            self._meter.stop(family, t)

    def timed_by_name(self, family: str, method: str, *args: Any) -> Any:
        """:meth:`timed` of this object's method ``method``: the form a hook on the graph takes (a
        :class:`~gradwatch.probes.weakhook.WeakHook`, which holds no bound method of ours)."""
        return self.timed(family, getattr(self, method), *args)

    def layer_output(self, layer: int, output: Any, through_time: bool = False) -> None:
        """Hook the output of layer ``layer``: its gradient's norm is ‖∂L/∂a‖ (and, ``through_time``, a
        hand-written recurrence's ‖∂L/∂a‖ of this call, :mod:`gradwatch.probes.loops`)."""
        call = self.loops.call(layer, output) if through_time else 0
        hook = WeakHook(self, "timed_by_name", "backprop", "_output_grad", layer, call)
        for t in grad_tensors(output):
            t.register_hook(hook)

    def activation_call(self, i: int, module: nn.Module, args: tuple, output: Any) -> None:
        """Measure a call of activation ``i``; it counts once a backward that fills ``.grad`` reaches it."""
        call = self.activations.measure(i, module, args, output)
        if call is not None and output.requires_grad:
            output.register_hook(WeakHook(self, "timed_by_name", "activations", "_reached", call))

    def functional_call(self, fn: str, args: tuple, kwargs: dict, node: Any, output: Tensor) -> str | None:
        """Measure an activation function's call (:mod:`gradwatch.probes.functional`); its name, None if it is not
        one (it counts once a backward that fills ``.grad`` reaches it)."""
        found = self.functional.measure(fn, args, kwargs, node, output)
        if found is None:
            return None
        name, call = found
        if output.requires_grad:
            output.register_hook(WeakHook(self, "timed_by_name", "activations", "_reached", call))
        return name

    def recurrent_call(self, module: nn.Module, args: tuple, output: Any) -> None:
        """Capture a followed recurrent module's call for ‖∂L/∂h_t‖ (its backward hooks timed as temporal)."""
        self.temporal.capture(module, args, output, WeakHook(self, "timed", "temporal"))

    def fills_grad(self) -> bool:
        """Whether the running backward pass fills the parameters' ``.grad`` (:meth:`_fills_grad`)."""
        return self._fills_grad()

    def _output_grad(self, layer: int, call: int, grad: Tensor | None) -> None:
        # a layer's output the loss does not read gets None where another output of the same node gets a gradient
        # (round 22: an nn.LSTM read at h_n only, its sequence output unused)
        if grad is not None and self._fills_grad():
            norm = self.backprop.add(layer, grad)
            if call:
                self.loops.add(layer, call, norm)

    def _reached(self, call: Call, grad: Tensor) -> None:
        if self._fills_grad():
            call.reached = True

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
                    self._accumulators = [torch.autograd.graph.get_gradient_edge(p).node for p in self._params]
                fills = any(torch._C._will_engine_execute_node(n) for n in self._accumulators)
                self._fill_task = (task, fills)
            return self._fill_task[1]
        except RuntimeError:  # not an eager engine's backward (a compiled one): count it, as before
            return True

    # -- into the step's values ----------------------------------------------------------
    def add_temporal(self, buffer: StepBuffer, scale: Tensor | None, ids: dict[str, int]) -> None:
        """Queue ‖∂L/∂h_t‖ and friends (a loss ``scale`` still on the gradients is divided out): the re-runs."""
        t = self._meter.start("temporal")
        for name, quantity, pos, values in self.temporal.take():
            if quantity == "temporal_grad_norm" and scale is not None:
                values = values / scale
            buffer.add_positioned(ids[name], quantity, pos, values)
        self._meter.stop("temporal", t)

    def attention_hooks(self, on: bool) -> None:
        """Place the attention probe's hooks, armed, for a step that records attention; remove them otherwise."""
        a = self.attention
        if a is None:
            return
        if on and a.error is None:
            a.attach(armed=True)
        elif a._handles:
            a.detach()

    def add_attention(self, buffer: StepBuffer, writer: Any) -> None:
        """Queue the step's attention statistics (per head, ``pos`` = head) and the LM head's log Z."""
        if self.attention is None:
            return
        t = self._meter.start("attention")
        stats = self.attention.collect()
        if stats:
            buffer.add_keyed(*self.attention.records(stats, writer))
        self._meter.stop("attention", t)

    def add_step(self, buffer: StepBuffer, scale: Tensor | None, on: frozenset[str],
                 recurrent_id: Callable[[str], int] | None = None,
                 functional_id: Callable[[str], int] | None = None) -> None:
        """Queue the step's ‖∂L/∂a‖ (divided by ``scale``), a hand-written recurrence's per call (entities from
        ``recurrent_id(name)``), and activation statistics (of activation functions too: ``functional_id(name)``).

        Each is timed as its family's cost only on a step ``on`` it: the empty take of a family that did not
        record is bookkeeping, and a near-zero sample among its real ones would drag the budget's median down
        (a CNN's activation statistics: 22 ms a sample, a median of 0.01 ms every other decision).
        """
        t = self._meter.start("backprop") if "backprop" in on else None
        taken = self.backprop.take()
        if taken is not None:
            layers, norms = taken
            buffer.add("layer", layers, "out_grad_norm", norms if scale is None else norms / scale)
        for name, quantity, pos, values in self.loops.take():
            if recurrent_id is not None:
                if quantity == "temporal_grad_norm" and scale is not None:
                    values = values / scale
                buffer.add_positioned(recurrent_id(name), quantity, pos, values)
        if t is not None:
            self._meter.stop("backprop", t)
        t = self._meter.start("activations") if "activations" in on else None
        for quantity, index, values in self.activations.take():
            buffer.add("activation", index, quantity, values)
        for name, quantity, value in self.functional.take():
            if functional_id is not None:
                buffer.add_positioned(functional_id(name), quantity, [-1], value)
        if t is not None:
            self._meter.stop("activations", t)
        for name, quantity, value in self.custom.take():  # (timed as backprop where its hooks ran)
            if functional_id is not None:
                buffer.add_positioned(functional_id(name), quantity, [-1], value)

    def clear(self) -> None:
        """Forget everything measured (the watch stopped recording)."""
        self.backprop.clear()
        self.loops.clear()
        self.functional.clear()
        self.custom.clear()
        self.activations.clear()
        self.temporal.clear()
        if self.attention is not None:
            self.attention.detach()

