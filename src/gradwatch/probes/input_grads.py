"""Gradients taken with respect to the model's own input: with a graph, or without one.

A gradient penalty — WGAN-GP's λ(‖∇ₓD(x̂)‖ − 1)² (Gulrajani et al. 2017, Alg. 1), R1's ‖∇ₓD(x)‖² — differentiates
the critic's output with respect to an input that requires its gradient (``x̂.requires_grad_(True)``), and then
differentiates the penalty again with respect to the weights: ``torch.autograd.grad(…, create_graph=True)``.
Without ``create_graph`` the gradient is a constant to autograd, and so is the penalty made of it: its value is
added to the loss, none of its gradient reaches the weights, and the critic is unconstrained (mlpack/mlpack#2891;
round 44: a 2-D WGAN-GP whose critic loss ran to 10⁵–10⁶, told "a learning rate too large").

:class:`InputGradients` puts a hook on each such input the model is called on in training (once per tensor); the
hook runs where a gradient with respect to that input is computed, under the grad mode of that computation — on
only where it builds a graph (``create_graph=True``). It counts both and never changes the gradient.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

MAX_INPUTS = 1 << 16  # the inputs hooked in one watch at most (one per step is the usual)


class InputGradients:
    """Counts of the gradients with respect to the model's inputs, taken with a graph (``with_graph``) and without
    one (``without_graph``)."""

    def __init__(self) -> None:
        self.with_graph = 0
        self.without_graph = 0
        self._hooked = 0
        self._seen: weakref.WeakSet[Tensor] = weakref.WeakSet()

    def input_seen(self, x: object) -> None:
        """Hook ``x`` where it is a leaf that requires its gradient and gradients are being recorded (a training
        pass); never fails."""
        try:
            if (not isinstance(x, Tensor) or not x.requires_grad or not x.is_leaf or not torch.is_grad_enabled()
                    or x in self._seen or self._hooked >= MAX_INPUTS):
                return
            self._seen.add(x)
            self._hooked += 1
            x.register_hook(self._on_grad)
        except Exception:  # a watch never fails the run
            return

    def _on_grad(self, grad: Tensor) -> None:
        if torch.is_grad_enabled():
            self.with_graph += 1
        else:
            self.without_graph += 1

    def report(self) -> dict[str, int] | None:
        """The counts (meta ``input_gradients``), None where no input required its gradient."""
        if not self._hooked:
            return None
        return {"inputs": self._hooked, "with_graph": self.with_graph, "without_graph": self.without_graph}
