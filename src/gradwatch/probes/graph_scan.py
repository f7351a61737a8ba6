"""What the whole graph of the first logged loss shows that no module does: parameters that neither the model nor
the optimizer holds, and a variance taken over no more elements than its correction.

A layer built inside ``forward`` (``fc = nn.Linear(64, 128); h = fc(x)``) is made anew, at random, on every call:
``model.parameters()`` never lists it, no optimizer holds it, and its parameters are freed with the step's graph.
Its weights are leaves of the loss's graph like any layer's; what tells them apart is that nothing keeps them
alive (:func:`made_in_forward`). ``torch.var`` and ``torch.std`` divide by n − 1 by default (Bessel's correction):
over a single element per output, as an instance statistic over a 1×1 feature map, that is 0/0, NaN on every
forward pass (:func:`degenerate_reductions`).

Read once, from the first logged loss that has a graph: node names, the shapes autograd keeps on each node and the
scalars a node saved (none of which a backward pass frees), never a tensor's values; at most
:data:`MAX_GRAPH_NODES` nodes. Watching still never changes training, and reading never fails the run.
"""

from __future__ import annotations

import math
import weakref
from collections import deque
from typing import Any

from torch import Tensor, nn

MAX_GRAPH_NODES = 50_000  # a large Transformer's graph has a few thousand nodes: read once, a few milliseconds
# the reductions whose correction (Bessel's n − 1 by default) divides by the count of elements less the correction
REDUCTIONS = {"VarBackward0": "torch.var", "StdBackward0": "torch.std", "VarMeanBackward0": "torch.var_mean",
              "StdMeanBackward0": "torch.std_mean"}

Foreign = list[tuple["weakref.ref[Tensor]", list[int]]]


def scan_graph(loss: Tensor, held: set[int]) -> tuple[Foreign, list[dict[str, Any]]]:
    """One walk of the whole graph of ``loss``: the ``nn.Parameter`` leaves whose ``id`` is not in ``held`` (the
    model's and the optimizer's parameters), each as a weak reference and its shape, and the variances with no
    degrees of freedom (:func:`degenerate_reductions`'s entries). ([], []) where the loss has no graph, or reading
    fails in any way."""
    try:
        return _scan(loss, held)
    except Exception:  # noqa: BLE001 - an exotic graph node (a C++ extension's): nothing to say, nothing lost
        return [], []


def _scan(loss: Tensor, held: set[int]) -> tuple[Foreign, list[dict[str, Any]]]:
    start = getattr(loss, "grad_fn", None)
    foreign: Foreign = []
    degenerate: list[dict[str, Any]] = []
    if start is None:
        return foreign, degenerate
    todo, seen = deque([start]), {id(start)}
    while todo and len(seen) <= MAX_GRAPH_NODES:
        node = todo.popleft()
        name = type(node).__name__
        if name == "AccumulateGrad":
            leaf = node.variable
            if isinstance(leaf, nn.Parameter) and id(leaf) not in held:
                foreign.append((weakref.ref(leaf), [int(d) for d in leaf.shape]))
            continue
        if name in REDUCTIONS:
            got = _degenerate(node, REDUCTIONS[name])
            if got is not None and got not in degenerate:
                degenerate.append(got)
        for nxt, _ in node.next_functions:
            if nxt is not None and id(nxt) not in seen:
                seen.add(id(nxt))
                todo.append(nxt)
    return foreign, degenerate


def _degenerate(node: Any, op: str) -> dict[str, Any] | None:
    """The reduction at ``node`` where its correction is at least the elements each output reduces (0/0 or a
    negative count: NaN or ±inf): its call, its input's shape, dimensions, correction and that count; else None."""
    producer, index = node.next_functions[0]
    if producer is None:
        return None
    shape = (list(producer.variable.shape) if type(producer).__name__ == "AccumulateGrad"
             else list(producer._input_metadata[index].shape))
    out = math.prod(int(d) for d in node._input_metadata[0].shape)
    correction = node._saved_correction
    correction = 1.0 if correction is None else float(correction)  # (torch.var(x) keeps no correction: Bessel's)
    if not out or not math.prod(shape):
        return None
    over = math.prod(shape) // out
    if over > correction:
        return None
    dims = node._saved_dim
    return {"op": op, "input": [int(d) for d in shape], "dims": None if dims is None else [int(d) for d in dims],
            "correction": correction, "over": int(over)}


def held_parameters(model: nn.Module, optimizer: Any) -> set[int]:
    """The ids of the parameters ``model`` or ``optimizer`` (None: none) holds: :func:`scan_graph`'s ``held``."""
    held = {id(p) for p in model.parameters()}
    for group in getattr(optimizer, "param_groups", None) or ():
        held.update(id(p) for p in group["params"])
    return held


def made_in_forward(foreign: Foreign) -> list[list[int]]:
    """The shapes of the parameters among ``foreign`` (from :func:`scan_graph`) that have been freed since: made for
    one forward pass and dropped with its graph, as a layer built inside ``forward`` is. A parameter another model
    holds (a GAN's discriminator, read through the generator's loss) is still alive."""
    return [shape for ref, shape in foreign if ref() is None]
