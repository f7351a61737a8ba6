"""Residual blocks recognised by what they compute: a module whose output adds its own input (x + f(x)).

Class names cannot say it (a user's ``Block`` and a plain ``Sequential`` look
alike), and the diagnosis must never propose residual connections to a net
that has them. At the first forward pass that autograd records, a forward
hook on every module that has children reads its output's autograd graph: an
addition within ``REACH`` nodes of the output (walking each node's first
input: an activation, a norm, a dropout after the sum), one of whose inputs is
the node that produced the module's input, is a skip connection. The names are
written to the run's meta as ``residual_blocks``; the hooks then go. Nothing
is computed and no gradient is touched: the graph is only read.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from torch import Tensor, nn

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
    if x is None or out is None or x.grad_fn is None or out.grad_fn is None:
        return False
    node: Any = out.grad_fn  # a torch.autograd.graph.Node, or None past a leaf
    for _ in range(REACH):
        if node is None or not node.next_functions:
            return False
        if type(node).__name__.startswith("AddBackward") and any(nxt is x.grad_fn for nxt, _ in node.next_functions):
            return True
        node = node.next_functions[0][0]  # the data input (weights of a norm come after it)
    return False


class ResidualSeen:
    """Forward hooks that note the residual blocks at the first recorded forward pass and write them to the meta."""

    def __init__(self, model: nn.Module, write: Callable[[dict[str, Any]], None],
                 guard: Callable[..., Any]) -> None:
        self._found: list[str] = []
        self._write = write
        self.handles = [m.register_forward_hook(functools.partial(guard, self._on, name))
                        for name, m in model.named_modules() if name and next(m.children(), None) is not None]
        self.handles.append(model.register_forward_hook(functools.partial(guard, self._finish)))

    def _on(self, name: str, module: nn.Module, args: tuple, out: Any) -> None:
        if adds_input(first_tensor(args), first_tensor(out)) and name not in self._found:
            self._found.append(name)

    def _finish(self, module: nn.Module, args: tuple, out: Any) -> None:
        got = first_tensor(out)
        if got is None or got.grad_fn is None:
            self._found.clear()  # a forward pass autograd did not record (evaluation): wait for a training one
            return
        self._write({"residual_blocks": list(self._found)})
        for h in self.handles:
            h.remove()
