"""What the loss does to the model's output: the autograd operations between the logged loss and the output's
squashing function.

A quadratic cost on a sigmoid (Nielsen, *Neural Networks and Deep Learning*, ch. 3) and a logarithm of a sigmoid's
or softmax's output written by hand (``-(y * log(p) + (1 - y) * log(1 - p))``) are choices of the user's loss
that no module shows; their backward nodes do. Read once, from the first logged loss that has a graph: node names
only (reading them neither runs nor keeps anything of the graph), so watching still never changes training.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

# the operations of a layer (a weight meets its input): the walk from the loss stops there
LAYER_OPS = frozenset({
    "AddmmBackward0", "MmBackward0", "BmmBackward0", "MvBackward0", "ConvolutionBackward0", "LinearBackward0",
    "EmbeddingBackward0", "EmbeddingBagBackward0", "AccumulateGrad",
})
SQUASH = {"SigmoidBackward0": "sigmoid", "TanhBackward0": "tanh", "SoftmaxBackward0": "softmax"}
SQUARED = frozenset({"MseLossBackward0", "PowBackward0", "SmoothL1LossBackward0", "HuberLossBackward0"})
MAX_NODES = 64  # a loss over many outputs (a sum of heads) is read no further than this


def loss_paths(loss: Tensor) -> list[list[str]]:
    """For each squashing function (sigmoid, tanh, softmax) the loss reaches before any layer: the node names
    from the loss down to it, the shortest such path (breadth first). [] when the loss has no graph, or when
    reading it fails in any way (watching never crashes the user's run)."""
    try:
        return _paths(loss)
    except Exception:  # noqa: BLE001 - an exotic graph node (a C++ extension's): nothing to say, nothing lost
        return []


def _paths(loss: Tensor) -> list[list[str]]:
    start = getattr(loss, "grad_fn", None)
    if start is None:
        return []
    parent: dict[int, Any] = {id(start): None}
    todo, n, paths = [start], 0, []
    while todo and n < MAX_NODES:
        node = todo.pop(0)
        n += 1
        name = type(node).__name__
        if name in SQUASH:
            path, at = [], node
            while at is not None:
                path.append(type(at).__name__)
                at = parent[id(at)]
            paths.append(path[::-1])
            continue
        for nxt, _ in node.next_functions:
            if nxt is not None and id(nxt) not in parent and type(nxt).__name__ not in LAYER_OPS:
                parent[id(nxt)] = node
                todo.append(nxt)
    return paths


def quadratic_on_squash(paths: list[list[str]] | None) -> str:
    """'sigmoid'/'tanh' where the loss squares a difference of that function's output (MSE, (p − y)², Huber),
    else ''."""
    for path in paths or ():
        if SQUASH[path[-1]] != "softmax" and SQUARED & set(path[:-1]):
            return SQUASH[path[-1]]
    return ""


def log_of_probabilities(paths: list[list[str]] | None) -> str:
    """'sigmoid'/'softmax' where the loss takes the logarithm of that function's output by hand (log p,
    log(1 − p)), else ''."""
    for path in paths or ():
        if SQUASH[path[-1]] != "tanh" and "LogBackward0" in path[-3:-1]:
            return SQUASH[path[-1]]
    return ""
