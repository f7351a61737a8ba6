"""A policy-gradient loss read off its graph: the log-probability of a chosen action times a weight, and the entropy
of the policy with the sign the loss gives it.

REINFORCE and actor-critic losses are written by hand, ``-(log π(a|s)·A).mean() − β·H(π)``, and two of their
mistakes leave every gradient looking healthy while the policy learns nothing:

- an advantage ``A = R − V(s)`` that is not detached (coreylynch/async-rl#8; astariul/encode-attend-navigate-
  pytorch#2): the policy term then trains the critic too, pushing V up wherever log π(a) < 0, and the policy is
  pushed off whatever it samples. In the graph: a product of a gathered log-probability and a weight that has a
  gradient of its own, from outside that log-probability (a focal loss's weight (1 − p)^γ is the log-probability's
  own, and is no advantage);
- an entropy bonus added with the wrong sign (google-deepmind/open_spiel#962; rlworkgroup/garage#628): the loss
  then lowers the entropy, and the policy turns one-hot in a few dozen steps. In the graph: a product p·log p of a
  softmax and a log-softmax whose sign in the loss makes ``+H`` of it, beside a policy-gradient product.

The walk tracks the sign each node is taken with in the loss (negations, subtractions, products with a constant of
known sign, means and sums, ops that keep the elements) as far as it is known. Nothing is computed: node names and
the constants autograd saved (0-dim ones only) are read, once; a constant that backward freed is taken as positive.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from gradwatch.probes.graph import LAYER_OPS, SAME_ELEMENTS

# the nodes that keep a term's sign: reductions with a positive count, views, a clamp of log-probabilities
_SIGN_KEEPING = SAME_ELEMENTS | frozenset({"MeanBackward0", "MeanBackward1", "SumBackward0", "SumBackward1",
                                            "ClampBackward1", "ClampMinBackward0", "ExpandBackward0",
                                            "SelectBackward0", "SliceBackward0", "IndexBackward0",
                                            "GatherBackward0", "CatBackward0", "StackBackward0"})
_GATHERS = frozenset({"GatherBackward0", "IndexBackward0", "TakeAlongDimBackward0"})
_PASS = SAME_ELEMENTS | frozenset({"ClampBackward1", "ClampMinBackward0", "ExpandBackward0"})
MAX_NODES = 256  # nodes walked from the loss, once
WEIGHT_REACH = 48  # nodes of a weight's own graph walked for the log-probability it multiplies (a focal weight)


def _name(node: Any) -> str:
    return type(node).__name__


def _past(node: Any) -> Any:
    """``node`` past the element-keeping ops (views, squeezes, a clamp) of a single input."""
    while node is not None and _name(node) in _PASS:
        inputs = [n for n, _ in node.next_functions if n is not None]
        if len(inputs) != 1:
            break
        node = inputs[0]
    return node


def _log_prob(node: Any) -> bool:
    """A log-probability: a log-softmax, logits minus their logsumexp (torch.distributions.Categorical's), or the log
    of a softmax."""
    node = _past(node)
    name = _name(node) if node is not None else ""
    if name == "LogSoftmaxBackward0":
        return True
    inputs = [_past(n) for n, _ in node.next_functions if n is not None] if node is not None else []
    if name == "SubBackward0":
        return any(n is not None and _name(n) == "LogsumexpBackward0" for n in inputs)
    if name == "LogBackward0":
        return any(n is not None and _name(n) == "SoftmaxBackward0" for n in inputs)
    return False


def _probability(node: Any) -> bool:
    """A probability: a softmax, or the exp of a log-probability."""
    node = _past(node)
    if node is None:
        return False
    if _name(node) == "SoftmaxBackward0":
        return True
    return _name(node) == "ExpBackward0" and any(_log_prob(n) for n, _ in node.next_functions if n is not None)


def gathered_log_prob(node: Any) -> Any:
    """The log-probability node a gather of a chosen action reads (None where ``node`` is none)."""
    node = _past(node)
    if node is None or _name(node) not in _GATHERS:
        return None
    source = next((n for n, _ in node.next_functions if n is not None), None)
    return _past(source) if source is not None and _log_prob(source) else None


def _constant_sign(node: Any, i: int) -> int | None:
    """The sign of the constant operand of a product or quotient ``node`` whose input ``i`` is the term: +1, −1, or
    None where the other operand has a gradient or is not a 0-dim constant. A constant that backward freed already
    (the watch reads the loss once it is logged, after ``backward()``) is taken as positive: a coefficient, β or ½,
    with any minus written as a subtraction or a negation."""
    if node.next_functions[1 - i][0] is not None:
        return None  # a product of two terms with gradients: its sign is the data's
    try:
        other = getattr(node, "_saved_other" if i == 0 else "_saved_self", None)
    except RuntimeError:  # freed by backward
        return 1
    if isinstance(other, (int, float)):
        value = float(other)
    elif isinstance(other, Tensor) and other.dim() == 0 and not other.requires_grad:
        value = float(other)
    else:
        return None
    return 1 if value > 0 else -1 if value < 0 else None


def reaches(start: Any, target: Any, reach: int) -> bool:
    """A path back from ``start`` meets ``target`` within ``reach`` nodes (not past a layer)."""
    queue, seen = [start], {id(start)}
    while queue and len(seen) <= reach:
        node = queue.pop()
        if node is target:
            return True
        for nxt, _ in node.next_functions:
            if nxt is not None and id(nxt) not in seen and _name(nxt) not in LAYER_OPS:
                seen.add(id(nxt))
                queue.append(nxt)
    return False


def policy_loss(loss: Tensor) -> dict[str, Any] | None:
    """What the loss's graph shows of a policy-gradient loss (see the module): ``{"terms": n, "advantage_with_grad":
    bool, "entropy_sign": +1 | −1 | None}`` — ``n`` products of a gathered log-probability and a weight, whether one
    weight has a gradient of its own (from outside that log-probability), and the sign the loss gives the policy's
    entropy H (−1: the loss holds −β·H, a bonus; +1: +β·H, the entropy minimised; None: no entropy term, or its
    sign unknown). None where the loss has no such product, no graph, or reading it fails."""
    try:
        return _policy_loss(loss)
    except Exception:  # noqa: BLE001 - an exotic graph node: nothing to say, nothing lost
        return None


def _policy_loss(loss: Tensor) -> dict[str, Any] | None:
    start = getattr(loss, "grad_fn", None)
    if start is None:
        return None
    sign: dict[int, int | None] = {id(start): 1}
    queue, n = [start], 0
    terms, with_grad, entropy = 0, False, []
    while queue and n < MAX_NODES:
        node = queue.pop(0)
        n += 1
        s, name = sign[id(node)], _name(node)
        inputs = [m for m, _ in node.next_functions]
        if name == "MulBackward0" and len(inputs) == 2 and all(m is not None for m in inputs):
            a, b = inputs
            if _probability(a) and _log_prob(b) or _probability(b) and _log_prob(a):
                entropy.append(None if s is None else -s)  # s·Σ p log p = −s·H
                continue
            for mine, other in ((a, b), (b, a)):
                source = gathered_log_prob(mine)
                if source is not None:
                    terms += 1
                    with_grad |= not reaches(other, source, WEIGHT_REACH)
        elif name == "MulBackward0" and len(inputs) == 2:
            if any(m is not None and gathered_log_prob(m) is not None for m in inputs):
                terms += 1  # a log-probability times a weight without a gradient: a detached advantage
        for i, m in enumerate(inputs):
            if m is None or id(m) in sign or _name(m) in LAYER_OPS:
                continue
            sign[id(m)] = _input_sign(node, name, i, s)
            queue.append(m)
    if not terms:
        return None
    known = [e for e in entropy if e is not None]
    return {"terms": terms, "advantage_with_grad": with_grad,
            "entropy_sign": known[0] if known and len(set(known)) == 1 else None}


def _input_sign(node: Any, name: str, i: int, s: int | None) -> int | None:
    """The sign input ``i`` of ``node`` enters the loss with, ``node``'s own being ``s`` (None: unknown)."""
    if s is None:
        return None
    if name in _SIGN_KEEPING or name == "AddBackward0" and i == 0:
        return s
    if name == "NegBackward0":
        return -s
    if name in ("AddBackward0", "SubBackward0"):
        alpha = getattr(node, "_saved_alpha", 1)
        alpha = 1 if not isinstance(alpha, (int, float)) or alpha > 0 else -1 if alpha < 0 else 0
        if not alpha:
            return None
        return s if name == "SubBackward0" and i == 0 else s * alpha * (-1 if name == "SubBackward0" else 1)
    if name in ("MulBackward0", "MulBackward1", "DivBackward0", "DivBackward1"):
        if name.startswith("Div") and i != 0:
            return None
        c = _constant_sign(node, i)
        return None if c is None else s * c
    return None
