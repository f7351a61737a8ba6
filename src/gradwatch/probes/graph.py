"""Walking an autograd graph back from a node: the branch of a residual sum, as the watch reads it.

Shared by the residual blocks' reader (:mod:`gradwatch.watching.residual`) and the residual sums that the
activation tap sees in a ``forward`` (:mod:`gradwatch.probes.functional`); :data:`SAME_ELEMENTS` and
:data:`LAYER_OPS` by the loss's readers (:mod:`gradwatch.probes.loss_ops`, :mod:`gradwatch.probes.similarity`,
:mod:`gradwatch.probes.policy_loss`). Nothing is computed: the graph is read.
"""

from __future__ import annotations

from typing import Any

# the backward nodes that keep a tensor's elements, one for one: a squared error on an output carried through them has
# the output's own count, and an embedding carried through them is still the embedding
SAME_ELEMENTS = frozenset({"ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "SqueezeBackward0",
                           "SqueezeBackward1", "SqueezeBackward2", "UnsqueezeBackward0", "TransposeBackward0",
                           "PermuteBackward0", "CloneBackward0"})

# the operations of a layer (a weight meets its input): the walk from the loss stops there
LAYER_OPS = frozenset({
    "AddmmBackward0", "MmBackward0", "BmmBackward0", "MvBackward0", "ConvolutionBackward0", "LinearBackward0",
    "EmbeddingBackward0", "EmbeddingBagBackward0", "AccumulateGrad",
})


def walk_back(end: Any, stop: Any, reach: int) -> tuple[list[Any], bool] | None:
    """The autograd nodes on the paths back from ``end`` that do not pass ``stop`` (``end`` first, ``stop`` itself
    not listed), and whether a path met ``stop``; None when they do not close within ``reach`` nodes — a path goes
    on past the weights and the inputs without gradient, farther than one sum's branch."""
    nodes: list[Any] = []
    queue, seen, met = [end], {id(end)}, False
    while queue:
        node = queue.pop()
        if stop is not None and node is stop:
            met = True
            continue
        if len(seen) > reach:
            return None
        nodes.append(node)
        for nxt, _ in node.next_functions:
            if nxt is not None and id(nxt) not in seen:
                seen.add(id(nxt))
                queue.append(nxt)
    return nodes, met
