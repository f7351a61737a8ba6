"""Residual blocks recognised by what they compute: a module whose output adds its own input (x + f(x)).

Class names cannot say it (a user's ``Block`` and a plain ``Sequential`` look
alike), and the diagnosis must never propose residual connections to a net
that has them. At the first forward pass that autograd records, a forward
hook on every module that has children reads its output's autograd graph
(and one on every module notes its outputs): an
addition within ``REACH`` nodes of the output (walking each node's first
input: an activation, a norm, a dropout after the sum), one of whose inputs is
the node that produced the module's input, is a skip connection. The names are
written to the run's meta as ``residual_blocks``. The modules whose every
call in that pass lies on a branch that closes on its block's input (every
path back from the sum's other term ends at the input or at a weight) are
written as ``residual_branch``: the diagnosis judges saturated or dead units
there by the gradient that the skip carries past them. The hooks then go.
Nothing is computed and no gradient is touched: the graph is only read.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from torch import Tensor, nn

from gradwatch.probes.graph import walk_back

REACH = 4  # nodes walked back from the output: relu(x + f(x)); Post-LN norm2(y + g(y)), y = norm1(x + f(x))


def first_tensor(value: Any) -> Tensor | None:
    """The first tensor in a module's input or output (itself, or inside a tuple, list or dict)."""
    if isinstance(value, Tensor):
        return value
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (tuple, list)) else ()
    return next((t for t in (first_tensor(v) for v in items) if t is not None), None)


def adds_input(x: Tensor | None, out: Tensor | None) -> bool:
    """True when ``out``'s autograd graph sums ``x`` with something within ``REACH`` steps of ``out``, walking each
    node's first input (a sum of sums, x + f(x) + g(x + f(x)) as in GPT-2's block, is found through its inner sum)."""
    return residual_sum(x, out) is not None


def residual_sum(x: Tensor | None, out: Tensor | None) -> Any:
    """The autograd node of the sum of :func:`adds_input` (the skip's), or None."""
    if x is None or out is None or x.grad_fn is None or out.grad_fn is None:
        return None
    node: Any = out.grad_fn  # a torch.autograd.graph.Node, or None past a leaf
    for _ in range(REACH):
        if node is None or not node.next_functions:
            return None
        if type(node).__name__.startswith("AddBackward") and any(nxt is x.grad_fn for nxt, _ in node.next_functions):
            return node
        node = node.next_functions[0][0]  # the data input (weights of a norm come after it)
    return None


BRANCH_REACH = 256  # nodes of one residual branch walked, once, at the first recorded forward pass


class ResidualSeen:
    """Forward hooks that note the residual blocks at the first recorded forward pass and write them to the meta:
    ``residual_blocks``, the blocks; ``residual_branch``, the modules every call of which lies on a branch that a
    block adds to its input (x + f(x): f's layers and activations; not a ReLU that also follows the sum)."""

    def __init__(self, model: nn.Module, write: Callable[[dict[str, Any]], None],
                 guard: Callable[..., Any]) -> None:
        self._found: list[str] = []
        self._calls: dict[str, list[Any]] = {}  # every module's output nodes in the pass
        self._branch: set[int] = set()  # the nodes met on the blocks' branches
        self._write = write
        self.handles = [m.register_forward_hook(functools.partial(guard, self._on, name))
                        for name, m in model.named_modules() if name]
        self.handles.append(model.register_forward_hook(functools.partial(guard, self._finish)))

    def _on(self, name: str, module: nn.Module, args: tuple, out: Any) -> None:
        got = first_tensor(out)
        if got is not None and got.grad_fn is not None:
            self._calls.setdefault(name, []).append(got.grad_fn)
        if next(module.children(), None) is None:
            return
        x = first_tensor(args)
        node = residual_sum(x, got)
        if node is None:
            return
        if name not in self._found:
            self._found.append(name)
        for term, _ in node.next_functions:
            if term is not None and term is not x.grad_fn:  # type: ignore[union-attr]
                walked = walk_back(term, x.grad_fn, BRANCH_REACH)  # type: ignore[union-attr]
                if walked is not None and walked[1]:  # it closes on the block's input
                    self._branch.update(id(n) for n in walked[0])

    def _finish(self, module: nn.Module, args: tuple, out: Any) -> None:
        got = first_tensor(out)
        if got is None or got.grad_fn is None:
            self._found.clear()  # a forward pass autograd did not record (evaluation): wait for a training one
            self._calls.clear()
            self._branch.clear()
            return
        branch = [name for name, nodes in self._calls.items() if all(id(n) in self._branch for n in nodes)]
        self._write({"residual_blocks": list(self._found), "residual_branch": branch})
        self._calls.clear()
        for h in self.handles:
            h.remove()
