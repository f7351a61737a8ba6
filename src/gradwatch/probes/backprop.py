"""The back-propagated gradient ‖∂L/∂a_l‖ at each layer's output.

This, not the weight-gradient norm, is the signal that vanishes or explodes
across depth: ‖∂L/∂W_l‖ also scales with the layer's input (DESIGN.md). It is
captured by a tensor hook placed on the output from a forward hook, which,
unlike ``register_full_backward_hook``, survives in-place ops after the layer
(a hook on a tensor modified in place still receives the gradient with
respect to the value it had). A module called several times in one step
(a recurrent cell, a shared block) gets the root of the summed squares.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import Tensor

from gradwatch.probes.hostcopy import device_tensor


def grad_tensors(output: Any) -> Iterator[Tensor]:
    """The floating tensors in a module's output that take part in autograd."""
    if isinstance(output, Tensor):
        if output.requires_grad and output.is_floating_point():
            yield output
    elif isinstance(output, (tuple, list)):
        for o in output:
            yield from grad_tensors(o)
    elif isinstance(output, dict):
        for o in output.values():
            yield from grad_tensors(o)


class BackpropProbe:
    """Collects squared output-gradient norms per layer during one backward pass."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._layers: list[int] = []
        self._norms: list[Tensor] = []

    @torch.no_grad()
    def add(self, layer: int, grad: Tensor) -> Tensor:
        """Keep ``‖grad‖`` for ``layer`` (on the probe's device); returns it."""
        self._layers.append(layer)
        g = grad.detach()
        # accumulate half precision in float32; never narrow a float64 gradient
        norm = torch.linalg.vector_norm(g, dtype=torch.float32) if g.dtype in (torch.float16, torch.bfloat16) else torch.linalg.vector_norm(g)
        self._norms.append(norm := norm.to(self.device))
        return norm

    def take(self) -> tuple[list[int], Tensor] | None:
        """Per-layer ‖∂L/∂a‖ collected since the last take, and forget them."""
        if not self._layers:
            return None
        layers, norms = self._layers, torch.stack(self._norms).double()
        self.clear()
        unique = sorted(set(layers))
        if len(unique) == len(layers):  # one output gradient per layer: no pooling
            return layers, norms
        seg = device_tensor([unique.index(k) for k in layers], torch.long, norms.device)
        pooled = torch.zeros(len(unique), dtype=norms.dtype, device=norms.device).index_add_(0, seg, norms * norms)
        return unique, pooled.sqrt()

    def clear(self) -> None:
        self._layers, self._norms = [], []
