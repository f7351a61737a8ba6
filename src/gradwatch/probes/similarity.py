"""Similarity logits of embeddings that are not normalised, read off the loss's graph.

A contrastive loss (SupCon, SimCLR's NT-Xent, CLIP's) takes the products of the
model's embeddings with each other, z_i·z_j / τ, through a softmax or an exp.
Its embeddings are meant to be unit vectors (F.normalize): without it the
logits grow with ‖z‖², the softmax goes one-hot, and at τ = 0.07 an exp
underflows across a whole row, whose log is −inf (HobbitLong/SupContrast
#50, #100, #104: "loss is nan"; round 43: the repository's SupConLoss on raw
features, NaN by step 3–39 on seeds 0–2, told "divergence" or "0/0").

:func:`unnormalised_similarity` finds, in the loss's graph, a matrix product
of two activations (neither a parameter: a layer's product has one) below an
exp, a softmax or a log-softmax, neither of whose factors comes out of a
division by a norm (F.normalize, z / z.norm()). Node names and edges only, so
it can be read after the backward pass.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from gradwatch.probes.graph import SAME_ELEMENTS


MAX_NODES = 96  # nodes of the loss's graph read at most
PRODUCTS = frozenset({"MmBackward0", "BmmBackward0"})
EXP_LIKE = frozenset({"ExpBackward0", "SoftmaxBackward0", "LogSoftmaxBackward0", "LogsumexpBackward0"})
# what keeps an embedding an embedding on its way to a product: reshapes, transposes, concatenations of views
_CARRY = SAME_ELEMENTS | {"TBackward0", "CatBackward0", "UnbindBackward0", "StackBackward0", "SelectBackward0",
                          "SliceBackward0", "ExpandBackward0", "UnsafeSplitBackward0", "SplitBackward0"}
_NORMS = frozenset({"LinalgVectorNormBackward0", "NormBackward0", "NormBackward1", "NormBackward2"})
_DIVISOR = frozenset({"ExpandBackward0", "ClampMinBackward0", "ClampBackward1", "AddBackward0", "UnsqueezeBackward0",
                      "ViewBackward0", "SqrtBackward0", "SumBackward1", "PowBackward0"})


def _source(node: Any) -> Any:
    """The first node back from ``node`` (its first input each time) that is not a reshape or concatenation."""
    for _ in range(16):
        if node is None or type(node).__name__ not in _CARRY:
            return node
        node = node.next_functions[0][0] if node.next_functions else None
    return node


def _normalised(node: Any) -> bool:
    """Whether ``node`` divides by a norm (F.normalize's x / ‖x‖.clamp_min(ε), or z / z.norm(dim=1, keepdim=True))."""
    if type(node).__name__ != "DivBackward0" or len(node.next_functions) < 2:
        return False
    todo = [node.next_functions[1][0]]
    for _ in range(8):
        if not todo:
            return False
        n = todo.pop()
        name = type(n).__name__
        if name in _NORMS:
            return True
        if name in _DIVISOR:
            todo.extend(m for m, _ in n.next_functions if m is not None)
    return False


def _activation(node: Any) -> bool:
    """A factor that is not a parameter (a layer's weight reaches its product through a transpose at most)."""
    src = _source(node)
    return src is not None and type(src).__name__ != "AccumulateGrad"


def unnormalised_similarity(loss: Tensor) -> bool:
    """Whether the loss's graph holds a product of two activations below an exp, a softmax or a log-softmax,
    neither of them normalised (see the module). False on any failure: watching never crashes the run."""
    try:
        start = getattr(loss, "grad_fn", None)
        todo, seen = ([(start, False)] if start is not None else []), dict[int, bool]()
        while todo and len(seen) < MAX_NODES:
            node, below_exp = todo.pop(0)
            if id(node) in seen and (seen[id(node)] or not below_exp):
                continue  # (met again below an exp where it was not before: walked again, for that)
            seen[id(node)] = below_exp
            name = type(node).__name__
            if name in PRODUCTS:
                a, b = (n for n, _ in node.next_functions[:2])
                if (below_exp and _activation(a) and _activation(b) and not _normalised(_source(a))
                        and not _normalised(_source(b))):
                    return True
                continue  # a layer's product: no further
            if name in ("AddmmBackward0", "ConvolutionBackward0", "AccumulateGrad", "EmbeddingBackward0"):
                continue
            below = below_exp or name in EXP_LIKE
            todo.extend((n, below) for n, _ in node.next_functions if n is not None)
        return False
    except Exception:  # noqa: BLE001 - an exotic node: nothing to say
        return False


__all__ = ["unnormalised_similarity"]
