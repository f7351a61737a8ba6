"""Recurrences written by hand: a layer that one forward pass calls again on what its last call produced.

A vanilla RNN written as ``h = torch.tanh(self.W_xh(x[:, t]) + self.W_hh(h))``
in a Python loop (Karpathy's min-char-rnn) has no ``nn.RNN`` or ``nn.*Cell``
to follow; its recurrence is ``W_hh``, an ``nn.Linear`` called once per time
step, each call on a state that the previous call helped to make. The watch
already hooks every layer's output on a sampled step for ‖∂L/∂a‖
(:mod:`gradwatch.probes.backprop`); for such a layer it keeps the norm of each
call apart: the gradient at the pre-activation of h_1, h_2, …, h_T, which is
‖∂L/∂h_t‖ times the nonlinearity's derivative at that step. Its fall (or
growth) from the last call to the first is the vanishing (exploding) through
time that Pascanu et al. (2013) describe, recorded as ``temporal_grad_norm``;
where the layer is a square ``nn.Linear`` (W_hh), its largest singular value
as ``lambda1`` (up to :data:`LAMBDA1_MOST` rows).

A layer called several times on inputs that do not depend on its own earlier
calls (``W_xh`` on each step's token, one head on two crops) is not a
recurrence: the second call's output is checked, once, for the first call's
autograd node among its ancestors. Normalisation layers and embeddings are
never followed (a LayerNorm shared between the blocks of a deep net is called
again on its own output, but that is depth, which the depth profile reads).
"""

from __future__ import annotations

import inspect
import re

from collections import deque
from typing import Any

import torch
from torch import Tensor, nn

from gradwatch.probes.temporal import lambda1

ANCESTORS_SEARCHED = 64  # a recurrence's state reaches the next call within a few nodes (tanh, add, a gate's product)
LEAST_CALLS = 3  # the through-time diagnosis needs three time steps
LAMBDA1_MOST = 2048  # λ₁ of a larger W_hh is not taken on a training step (an SVD: ~1 s on a CPU at 2048²)
NOT_FOLLOWED = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.Embedding, nn.EmbeddingBag,
                nn.RNNBase, nn.RNNCellBase)  # (norms and embeddings: see above; RNN modules: the temporal probe's)


def loop_candidates(layers: list[tuple[str, nn.Module]]) -> dict[int, tuple[str, nn.Module]]:
    """The layers (index in ``layers``, ``(name, module)`` pairs, -> the pair) that may turn out to be a hand-written
    recurrence: any but the model itself, RNN modules (followed by :class:`~gradwatch.probes.temporal.TemporalProbe`),
    norms and embeddings."""
    rms_norm = getattr(nn, "RMSNorm", ())
    return {i: (name, module) for i, (name, module) in enumerate(layers)
            if name and not isinstance(module, NOT_FOLLOWED + ((rms_norm,) if rms_norm else ()))}


_SIGMOID_CALL = re.compile(r"\bsigmoid_?\(")


def gated_owners(model: nn.Module, names: list[str]) -> list[str]:
    """Of the layers ``names``, those whose owning module is a gated cell written by hand: its class's ``forward``
    calls a sigmoid twice or more (a GRU's z and r, an LSTM's i, f and o), or once beside a ``1 - `` (a GRU's
    (1 − z)); a vanilla RNN with a sigmoid activation calls it once. Read off the source, as the functional tap's
    models are (:func:`gradwatch.probes.functional.calls_activations`)."""
    gated: dict[type, bool] = {}  # by the owner's class: its source is read once
    out = []
    for name in names:
        try:
            owner = type(model.get_submodule(name.rpartition(".")[0]) if "." in name else model)
        except AttributeError:
            continue
        if owner not in gated:
            try:
                source = inspect.getsource(owner.forward)
            except (AttributeError, OSError, TypeError):
                source = ""
            calls = len(_SIGMOID_CALL.findall(source))
            gated[owner] = calls >= 2 or (calls == 1 and re.search(r"\(\s*1(\.0*)?\s*-", source) is not None)
        if gated[owner]:
            out.append(name)
    return out


def feeds(later: Any, earlier: Any, most: int = ANCESTORS_SEARCHED) -> bool:
    """Whether autograd node ``earlier`` is among the first ``most`` ancestors of node ``later`` (breadth first)."""
    seen, queue = {id(later)}, deque([later])
    while queue and len(seen) <= most:
        node = queue.popleft()
        for nxt, _ in node.next_functions:
            if nxt is None or id(nxt) in seen:
                continue
            if nxt is earlier:
                return True
            seen.add(id(nxt))
            queue.append(nxt)
    return False


def _node(output: Any) -> Any:
    """The autograd node of a layer's output (its first tensor that takes part in autograd), or None."""
    if isinstance(output, (tuple, list)):
        output = next((o for o in output if isinstance(o, Tensor) and o.requires_grad), None)
    return output.grad_fn if isinstance(output, Tensor) and output.requires_grad else None


class LoopProbe:
    """Per-call ‖∂L/∂a‖ of the layers that a forward pass calls on their own earlier output, one pass at a time."""

    def __init__(self, candidates: dict[int, tuple[str, nn.Module]], device: torch.device) -> None:
        self.candidates = candidates
        self.device = device
        self.recurrent: dict[int, bool] = {}  # decided on the first pass that calls a layer twice (the model is fixed)
        self._calls: dict[int, int] = {}  # calls in the current forward pass
        self._last: dict[int, Any] = {}  # the last call's autograd node, for a layer not yet decided
        self._norms: dict[tuple[int, int], Tensor] = {}  # (layer, call) -> squared norm, summed over passes
        self._lambda1: dict[int, Tensor] = {}  # λ₁ of a recurrent square nn.Linear, read before the update

    def new_pass(self) -> None:
        """The model's forward pass begins: calls count from 1 again (micro-batches add up call by call)."""
        self._calls.clear()
        self._last.clear()

    def call(self, layer: int, output: Any) -> int:
        """Count a call of ``layer`` (a candidate) in this pass; returns its number (1, 2, …), 0 if not followed."""
        if layer not in self.candidates or self.recurrent.get(layer) is False:
            return 0
        n = self._calls[layer] = self._calls.get(layer, 0) + 1
        if layer not in self.recurrent:
            node = _node(output)
            if n > 1 and node is not None and layer in self._last:
                self.recurrent[layer] = feeds(node, self._last.pop(layer))
            elif node is not None:
                self._last[layer] = node
        return n

    def add(self, layer: int, call: int, norm: Tensor) -> None:
        """The output gradient's norm of call ``call`` of ``layer`` (from the backprop probe's hook)."""
        key = (layer, call)
        sq = norm.double() ** 2
        self._norms[key] = self._norms[key] + sq if key in self._norms else sq

    def read_weights(self) -> None:
        """λ₁ of each recurrent square ``nn.Linear`` that this step called: the weights of its forward pass (call
        it once the gradients are ready, before the optimizer steps)."""
        for layer in {layer for layer, _ in self._norms}:
            module = self.candidates[layer][1]
            if (self.recurrent.get(layer) and isinstance(module, nn.Linear)
                    and module.in_features == module.out_features <= LAMBDA1_MOST):
                self._lambda1[layer] = lambda1(module.weight).to(self.device)

    def take(self) -> list[tuple[str, str, list[int], Tensor]]:
        """Records of each recurrent layer called at least :data:`LEAST_CALLS` times — (name, quantity, positions,
        values): ‖∂L/∂a‖ per call (``temporal_grad_norm``), and λ₁ of a square ``nn.Linear``'s weight as
        :meth:`read_weights` found it (``lambda1``, position −1) — and forgets the calls."""
        by_layer: dict[int, list[tuple[int, Tensor]]] = {}
        for (layer, call), sq in sorted(self._norms.items()):
            if self.recurrent.get(layer):
                by_layer.setdefault(layer, []).append((call, sq))
        weights = self._lambda1
        self.clear()
        out = []
        for layer, rows in by_layer.items():
            if len(rows) < LEAST_CALLS:
                continue
            name = self.candidates[layer][0]
            out.append((name, "temporal_grad_norm", [c for c, _ in rows], torch.stack([v for _, v in rows]).sqrt().to(self.device)))
            if layer in weights:
                out.append((name, "lambda1", [-1], weights[layer]))
        return out

    def clear(self) -> None:
        self._norms, self._lambda1 = {}, {}
        self.new_pass()
