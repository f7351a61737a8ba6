"""What the loss does to the model's output: the autograd operations between the logged loss and the output's
squashing function.

A quadratic cost on a sigmoid (Nielsen, *Neural Networks and Deep Learning*, ch. 3) and a logarithm of a sigmoid's
or softmax's output written by hand (``-(y * log(p) + (1 - y) * log(1 - p))``) are choices of the user's loss
that no module shows; their backward nodes do. Read once, from the first logged loss that has a graph: node names
only (reading them neither runs nor keeps anything of the graph), so watching still never changes training.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

from torch import Tensor

from gradwatch.probes.elbo import kl_outweighs_reconstruction
from gradwatch.probes.graph import LAYER_OPS, SAME_ELEMENTS
from gradwatch.probes.policy_loss import policy_loss
from gradwatch.probes.similarity import unnormalised_similarity

SQUASH = {"SigmoidBackward0": "sigmoid", "TanhBackward0": "tanh", "SoftmaxBackward0": "softmax",
          "ReluBackward0": "relu"}
# a penalty on the size of the units' outputs: |z| or a norm of them (an L1 on a ReLU's output, an SAE's sparsity)
MAGNITUDE = frozenset({"AbsBackward0", "NormBackward0", "NormBackward1", "LinalgVectorNormBackward0"})
SQUARED = frozenset({"MseLossBackward0", "PowBackward0", "SmoothL1LossBackward0", "HuberLossBackward0"})
MAX_NODES = 64  # a loss over many outputs (a sum of heads) is read no further than this


def loss_paths(loss: Tensor) -> list[list[str]]:
    """For each squashing function (sigmoid, tanh, softmax) or ReLU the loss reaches before any layer: the node
    names from the loss down to it, one path for each operation that reads its output (breadth first). [] when the
    loss has no graph, or when reading it fails in any way (watching never crashes the user's run)."""
    try:
        return _paths(loss)
    except Exception:  # noqa: BLE001 - an exotic graph node (a C++ extension's): nothing to say, nothing lost
        return []


def _paths(loss: Tensor) -> list[list[str]]:
    start = getattr(loss, "grad_fn", None)
    if start is None:
        return []
    if type(start).__name__ in SQUASH:
        return [[type(start).__name__]]
    parent: dict[int, Any] = {id(start): None}
    todo, n, paths = [start], 0, []
    while todo and n < MAX_NODES:
        node = todo.pop(0)
        n += 1
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            name = type(nxt).__name__
            if name in SQUASH and (name != "ReluBackward0" or _after_layer(nxt)):
                # every route to it, each through its own parent (an MSE and an L1 on one ReLU); a ReLU only where it
                # is a unit of the model's (a hinge on distances, relu(d_ap − d_an + α), is the loss's own)
                path, at = [name], node
                while at is not None:
                    path.append(type(at).__name__)
                    at = parent[id(at)]
                if path[::-1] not in paths:
                    paths.append(path[::-1])
            elif id(nxt) not in parent and name not in LAYER_OPS:
                parent[id(nxt)] = node
                todo.append(nxt)
    return paths


def loss_graph(loss: Tensor) -> dict[str, Any]:
    """What a watch stores of the loss's graph beside :func:`loss_paths`: ``loss_broadcast``
    (:func:`loss_broadcast`), ``loss_ops``, the names of the backward operations between the loss and the layers
    (at most :data:`MAX_NODES`, sorted; ``CtcLossBackward0`` for a CTC loss), ``nll_on_scores``
    (:func:`nll_on_scores`), ``self_cancelling`` (:func:`self_cancelling`), ``softmax_over_one``
    (:func:`softmax_over_one`), ``loss_weights`` (:func:`loss_weights`), ``mean_divided`` (:func:`mean_divided`),
    ``unnormalised_similarity`` (:func:`gradwatch.probes.similarity.unnormalised_similarity`), ``policy_loss``
    (:func:`gradwatch.probes.policy_loss.policy_loss`), ``relative_error`` (:func:`relative_error`),
    ``kl_outweighs_reconstruction`` (:func:`gradwatch.probes.elbo.kl_outweighs_reconstruction`) and ``raw_ratio``
    (:func:`raw_ratio`) and ``smoothing_outweighs`` (:func:`smoothing_outweighs`). Reads only; never fails the run."""
    return {"loss_broadcast": loss_broadcast(loss), "loss_ops": loss_ops(loss), "nll_on_scores": nll_on_scores(loss),
            "self_cancelling": self_cancelling(loss), "softmax_over_one": softmax_over_one(loss),
            "loss_weights": loss_weights(loss), "mean_divided": mean_divided(loss),
            "unnormalised_similarity": unnormalised_similarity(loss), "policy_loss": policy_loss(loss),
            "relative_error": relative_error(loss), "kl_outweighs_reconstruction": kl_outweighs_reconstruction(loss),
            "raw_ratio": raw_ratio(loss), "smoothing_outweighs": smoothing_outweighs(loss)}


# the loss functions whose value is never below 0: a sum of them with positive weights is not either
NON_NEGATIVE = frozenset({"MseLossBackward0", "L1LossBackward0", "SmoothL1LossBackward0", "HuberLossBackward0",
                          "BinaryCrossEntropyBackward0", "BinaryCrossEntropyWithLogitsBackward0", "NllLossBackward0"})


def loss_weights(loss: Tensor) -> bool:
    """Whether a parameter multiplies a term of a loss made of losses that are never below 0 (:data:`NON_NEGATIVE`):
    a learned loss weight, ``(w * losses).sum()``, which the optimizer can drive through 0 — below it the loss is
    unbounded below (round 27: two task losses weighed by free multipliers, Kendall et al. 2018's log σ² form the
    fix). False where there is none, or reading fails."""
    try:
        nodes = list(_walk(loss))
        names = {type(n).__name__ for n in nodes}
        return bool(NON_NEGATIVE & names) and any(
            type(n).__name__ in ("MulBackward0", "DivBackward0")
            and any(m is not None and type(m).__name__ == "AccumulateGrad" for m, _ in n.next_functions)
            for n in nodes)
    except Exception:  # noqa: BLE001 - an exotic graph node: nothing to say, nothing lost
        return False


def softmax_over_one(loss: Tensor) -> bool:
    """Whether the loss's graph (:func:`_walk`) takes a log-softmax over a dimension of size 1 — a cross-entropy on a
    single logit (``nn.CrossEntropyLoss`` on a (B, 1) output): the log-softmax of one value is 0 whatever the value,
    so the loss passes the output no gradient (round 27: a binary classifier with one
    output unit under ``nn.CrossEntropyLoss``). False where there is none, or reading fails."""
    try:
        for n in _walk(loss):
            if type(n).__name__ == "LogSoftmaxBackward0":  # (a softmax of the model's own: output_activation)
                # the shape autograd keeps on the node (its forward output's; a backward pass frees the saved result)
                shape, dim = list(n._input_metadata[0].shape), int(n._saved_dim)
                if shape and shape[dim] == 1:
                    return True
        return False
    except Exception:  # noqa: BLE001 - an exotic graph node: nothing to say, nothing lost
        return False


# the operations that give a constant when both operands are one tensor: x − x = 0, x / x = 1
CANCELLING = frozenset({"SubBackward0", "DivBackward0"})


def self_cancelling(loss: Tensor) -> list[str]:
    """The operations between the loss and the layers (:func:`_walk`) that take one tensor from itself or divide it
    by itself — both operands the same output of the same node, as in ``logp - logp`` — sorted; their result is a
    constant whose gradient is exactly 0 (``loss_graph``'s ``self_cancelling``). PPO's ratio
    ``exp(logp - logp_old)`` with ``logp_old`` not detached is one (huggingface/trl#2769): the policy never moves.
    [] where there is none, or reading fails (never the user's run)."""
    try:
        return sorted({type(n).__name__ for n in _walk(loss) if type(n).__name__ in CANCELLING
                       and len(n.next_functions) == 2 and n.next_functions[0][0] is not None
                       and n.next_functions[0] == n.next_functions[1]})
    except Exception:  # noqa: BLE001 - an exotic graph node: nothing to say, nothing lost
        return []


NLL = frozenset({"NllLossBackward0", "NllLoss2DBackward0", "NllLoss2dBackward0"})
# the operations that make log-probabilities (or logarithms of anything): an NLL loss after one of them is fed logs
LOG_OPS = frozenset({"LogSoftmaxBackward0", "LogBackward0", "LogsumexpBackward0", "LogSigmoidBackward0",
                     "Log1PBackward0", "Log2Backward0", "Log10Backward0", "XlogyBackward0"})
NLL_REACH = 16  # nodes walked back from an NLL loss's input for a logarithm before the layers


def nll_on_scores(loss: Tensor) -> bool:
    """Whether an NLL loss (``nn.NLLLoss``, ``F.nll_loss``) in the loss's graph takes the model's scores with no
    logarithm between them and the layers (no ``log_softmax``, no ``log``): the loss −z_y of raw scores is unbounded
    below. Every route back from its input must reach a layer or a leaf within :data:`NLL_REACH` nodes; a walk cut
    short says nothing (False), and so does a graph that cannot be read (never the user's run).
    ``nn.CrossEntropyLoss`` is log_softmax and NLL in one: its graph holds ``LogSoftmaxBackward0``."""
    try:
        node = _first_node(loss, NLL)
        if node is None:
            return False
        todo = [n for n, _ in node.next_functions if n is not None]
        reached, walked = False, 0
        while todo:
            walked += 1
            if walked > NLL_REACH:
                return False
            at = todo.pop(0)
            name = type(at).__name__
            if name in LOG_OPS:
                return False
            if name in LAYER_OPS:
                reached = True
                continue
            todo.extend(n for n, _ in at.next_functions if n is not None)
        return reached
    except Exception:  # noqa: BLE001 - an exotic graph node: nothing to say, nothing lost
        return False


# the step functions: a derivative of 0 everywhere but at their jumps (where the loss's graph holds one between the
# output and the loss, no gradient leaves the loss)
STEP_NODES = {"RoundBackward0": "round", "RoundBackward1": "round", "FloorBackward0": "floor", "CeilBackward0": "ceil",
              "TruncBackward0": "trunc", "SignBackward0": "sign", "SgnBackward0": "sgn"}


# operations that hold a quantity at a floor (or a ceiling) with derivative 0 there: an overlap's clamp(w, min=0)
FLOOR_NODES = {"ClampMinBackward0": "clamp", "ClampBackward1": "clamp", "ClampBackward0": "clamp",
               "MaximumBackward0": "maximum", "MinimumBackward0": "minimum", "ReluBackward0": "relu",
               "ThresholdBackward0": "threshold"}


def floor_ops(ops: object) -> list[str]:
    """The operations among the loss's (meta ``loss_ops``) that hold a value at a floor with derivative 0 there
    (:data:`FLOOR_NODES`), by their torch names, sorted; [] for none."""
    return sorted({FLOOR_NODES[o] for o in ops if o in FLOOR_NODES}) if isinstance(ops, (list, tuple)) else []


def step_ops(ops: object) -> list[str]:
    """The step functions (:data:`STEP_NODES`) among the loss's operations (meta ``loss_ops``), by their torch names,
    sorted; [] for none."""
    return sorted({STEP_NODES[o] for o in ops if o in STEP_NODES}) if isinstance(ops, (list, tuple)) else []


# the loss functions that average over their elements by default (``reduction='mean'``, read from the node) and
# torch.mean itself
MEAN_LOSSES = frozenset({"NllLossBackward0", "NllLoss2DBackward0", "MseLossBackward0", "L1LossBackward0",
                         "SmoothL1LossBackward0", "HuberLossBackward0", "BinaryCrossEntropyBackward0",
                         "BinaryCrossEntropyWithLogitsBackward0", "KlDivBackward0", "MeanBackward0", "MeanBackward1"})
_REDUCTION_MEAN = 1  # ATen's Reduction::Mean


def mean_divided(loss: Tensor) -> dict[str, Any] | None:
    """Where the logged loss is a mean-reduced loss divided again by a constant — ``F.cross_entropy(out, y) /
    batch_size``, a mean that is divided by the batch twice (williamleif/GraphSAGE#12): ``{"loss": the mean's node,
    "divisor": the constant}``, the divisor None where the backward pass has freed it (a tensor saved by the division:
    a loss logged after ``backward()``). None where the loss is no such quotient, or reading fails (never the user's
    run). Every gradient is then the divisor's fraction of the mean's."""
    try:
        node = _past_same_elements(getattr(loss, "grad_fn", None))
        if node is None or type(node).__name__ not in ("DivBackward0", "DivBackward1"):
            return None
        nxt = node.next_functions
        if len(nxt) == 2 and nxt[1][0] is not None:  # a quotient of two tensors that both carry a gradient
            return None
        mean = _past_same_elements(nxt[0][0])
        name = type(mean).__name__ if mean is not None else ""
        if name not in MEAN_LOSSES or (not name.startswith("Mean")
                                       and getattr(mean, "_saved_reduction", None) != _REDUCTION_MEAN):
            return None
        try:
            other = node._saved_other
            divisor = float(other.item() if isinstance(other, Tensor) else other)
        except Exception:  # noqa: BLE001 - freed by the backward pass: the quotient is known, its constant not
            divisor = None
        return {"loss": name, "divisor": divisor}
    except Exception:  # noqa: BLE001 - an exotic graph node: nothing to say, nothing lost
        return None


def loss_ops(loss: Tensor) -> list[str]:
    """The names of the backward operations between the loss and the layers, sorted ([] where reading fails)."""
    try:
        return sorted({type(n).__name__ for n in _walk(loss)} - LAYER_OPS)
    except Exception:  # noqa: BLE001 - an exotic graph node: nothing to say, nothing lost
        return []


def loss_broadcast(loss: Tensor) -> dict[str, Any] | None:
    """Where the loss broadcasts the model's output against a target of another shape across the batch — an output
    (B, 1) against targets (B,) — so that every output is compared with every target: ``{"output": (B, 1),
    "broadcast": (B, B), "op": the node}``; None where it does not, or reading fails (never the user's run).

    Read from the shapes autograd keeps on each node (its forward output's), which the backward pass does not free:
    an operation before any layer with one differentiable operand (the other a target: ``nn.MSELoss`` expands its
    input, ``(out − y) ** 2`` subtracts) whose output has the batch size B along a dimension where its input had 1
    (or none), and B times its input's elements. A distance between outputs (both operands differentiable) is not
    one. Source: deepset-ai/FARM#229; torch warns "Using a target size … that is different to the input size"."""
    try:
        return _broadcast(loss)
    except Exception:  # noqa: BLE001 - an exotic graph node: nothing to say, nothing lost
        return None


def _shape(node: Any) -> tuple[int, ...] | None:
    meta = getattr(node, "_input_metadata", None)
    return tuple(int(d) for d in meta[0].shape) if meta else None


def _broadcast(loss: Tensor) -> dict[str, Any] | None:
    for node in _walk(loss):
        inputs = [n for n, _ in node.next_functions if n is not None]
        out = _shape(node)
        if (type(node).__name__ not in LAYER_OPS and len(inputs) == 1 and out is not None
                and type(inputs[0]).__name__ != "AccumulateGrad"):
            src = _shape(inputs[0])
            if src and _across_batch(src, out):
                return {"output": list(src), "broadcast": list(out), "op": type(node).__name__}
    return None


def _across_batch(src: tuple[int, ...], out: tuple[int, ...]) -> bool:
    """Whether ``src`` broadcast to ``out`` gains a dimension of the batch size ``src[0]`` (≥ 2), B times the
    elements."""
    batch = src[0]
    if batch < 2 or len(out) < len(src) or math.prod(out) != batch * math.prod(src):
        return False
    padded = (1,) * (len(out) - len(src)) + src
    return any(p == 1 and o == batch for p, o in zip(padded, out))


UNIT_REACH = 3  # nodes walked back from a ReLU for the layer whose output it takes (a view, a bias added between)


def _after_layer(node: Any) -> bool:
    """Whether a layer's operation or a parameter is within :data:`UNIT_REACH` nodes before ``node``."""
    todo = [node]
    for _ in range(UNIT_REACH):
        todo = [n for t in todo for n, _ in t.next_functions if n is not None]
        if any(type(n).__name__ in LAYER_OPS for n in todo):
            return True
    return False


def quadratic_on_squash(paths: list[list[str]] | None) -> str:
    """'sigmoid'/'tanh' where the loss squares a difference of that function's output (MSE, (p − y)², Huber),
    else ''."""
    for path in paths or ():
        if SQUASH.get(path[-1]) in ("sigmoid", "tanh") and SQUARED & set(path[:-1]):
            return SQUASH[path[-1]]
    return ""


def quadratic_on_softmax(paths: list[list[str]] | None) -> bool:
    """Whether the loss squares a difference of a softmax's output (MSE on probabilities against one-hot targets)."""
    return any(SQUASH.get(path[-1]) == "softmax" and SQUARED & set(path[:-1]) for path in paths or ())


def penalty_on_relu(paths: list[list[str]] | None) -> bool:
    """Whether the loss adds a penalty on a ReLU's outputs themselves, before any layer: |z|, a norm of z, or z
    summed or averaged directly (z ≥ 0, so that is its L1) — a sparsity penalty (an SAE's λ‖z‖₁)."""
    for path in paths or ():
        if SQUASH.get(path[-1]) == "relu" and len(path) > 1 and (
                MAGNITUDE & set(path[:-1]) or path[-2].startswith(("SumBackward", "MeanBackward"))):
            return True
    return False


# what keeps a probability off 0 before its log: log(p + ε), log(p.clamp(min=ε))
_GUARDS = frozenset({"AddBackward0", "AddBackward1", "ClampBackward1", "ClampMinBackward0", "MaximumBackward0"})


def log_of_probabilities(paths: list[list[str]] | None) -> str:
    """'sigmoid'/'softmax' where the loss takes the logarithm of that function's output by hand (log p,
    log(1 − p), log of a selection of p), else ''. Not log(p + ε) nor log(p.clamp(min=ε)): finite, with a finite
    derivative (round 48: kornia's focal loss, whose NaN came from (1 − p)^0.5 at p = 1, was told the logs first)."""
    for path in paths or ():
        if SQUASH.get(path[-1]) in ("sigmoid", "softmax") and len(path) > 1 and (path[-2] == "LogBackward0" or (
                len(path) > 2 and path[-3] == "LogBackward0" and path[-2] not in _GUARDS)):
            return SQUASH[path[-1]]
    return ""


BINARY_CE = frozenset({"BinaryCrossEntropyWithLogitsBackward0", "BinaryCrossEntropyBackward0"})


def loss_prior(loss: Tensor) -> dict[str, float] | None:
    """For a binary cross-entropy in the loss's graph (``F.binary_cross_entropy_with_logits``, ``nn.BCELoss``):
    the share of positive targets and the mean predicted probability, read from the tensors its backward node saved
    (``{"positive_rate": π, "mean_prob": p̄}``); None where there is none, or its targets are not in [0, 1] — or the
    backward pass has run (it frees them: a trial reads it before; a watch reads the signs of the output's gradient,
    :meth:`gradwatch.Watch.log`). The output's start against the targets' rate (a detector's bias at 0 for rare
    positives, Lin et al. 2017 §3.3). Reads only; never fails the user's run."""
    try:
        return _prior(loss)
    except Exception:  # noqa: BLE001 - an exotic graph: nothing to say, nothing lost
        return None


def relative_error(loss: Tensor) -> bool:
    """The loss takes an absolute error divided by a tensor with no gradient, |ŷ − y| / d or |(ŷ − y) / d| — a
    relative or percentage error (MAPE), whose divisor is the targets: wherever a target is near 0 (a series that
    crosses 0, clamped to a tiny ε) the loss and its gradient are that many times larger (Hyndman & Koehler 2006,
    §3.2). False where it has none, or reading fails."""
    try:
        for node in _walk(loss):
            inputs = [n for n, _ in node.next_functions]
            name = type(node).__name__
            if name == "DivBackward0" and len(inputs) == 2 and inputs[1] is None and inputs[0] is not None:
                if type(_past_same_elements(inputs[0])).__name__ == "AbsBackward0":
                    return True
            if name == "AbsBackward0" and inputs and inputs[0] is not None:
                inner = _past_same_elements(inputs[0])
                parts = [n for n, _ in inner.next_functions] if inner is not None else []
                if type(inner).__name__ == "DivBackward0" and len(parts) == 2 and parts[1] is None and any(
                        type(n).__name__ == "SubBackward0" for n in parts[:1]):
                    return True
    except Exception:  # noqa: BLE001 - an exotic graph node: nothing to say, nothing lost
        return False
    return False


# nodes through which a denominator stays a linear function of the output, its sign the output's: sums, means,
# differences, selections and views (a product counts where one factor has no gradient: p·mask)
_LINEAR = frozenset({"SumBackward0", "SumBackward1", "MeanBackward0", "MeanBackward1", "AddBackward0", "AddBackward1",
                     "SubBackward0", "SubBackward1", "SelectBackward0", "SliceBackward0", "IndexBackward0",
                     "SplitBackward0", "UnbindBackward0", "MulBackward0", "MulBackward1"}) | SAME_ELEMENTS
_RATIO_REACH = 24  # nodes walked back from a division's denominator


def raw_ratio(loss: Tensor) -> bool:
    """The loss divides by a linear function of a layer's raw output — a sum of logits, no sigmoid or softmax
    between: a soft Dice or IoU, 1 − (2Σp·y + s)/(Σp + Σy + s), written for probabilities and given the logits
    (jakeret/tf_unet#15; ScrollPrize/villa#1644: "the denominator crosses zero"). Its denominator takes either
    sign, so the loss has no floor and spikes where the sum nears 0. False where it has none, or reading fails."""
    try:
        for node in _walk(loss):
            inputs = [n for n, _ in node.next_functions]
            if type(node).__name__ == "DivBackward0" and len(inputs) == 2 and inputs[0] is not None \
                    and inputs[1] is not None and _linear_in_output(inputs[1]):
                return True
    except Exception:  # noqa: BLE001 - an exotic graph node: nothing to say, nothing lost
        return False
    return False


def smoothing_outweighs(loss: Tensor) -> dict[str, Any] | None:
    """Where a cross-entropy with class weights and label smoothing (read off its graph: (1 − ε)·NLL + (ε/K)·the
    weighted smoothing term, as ``F.cross_entropy`` builds them) has its minimum away from the label for some
    classes: ``{"epsilon": ε, "labels": [y…], "toward": k}``, else None. PyTorch weighs the smoothing term by the class
    weights too (pytorch/pytorch#104776), so for a sample labelled y the loss is least at p_k ∝ w_k·ε/K +
    [k = y]·w_y·(1 − ε): where max_k w_k·ε/K > w_y·(1 − ε + ε/K), class k, not y. Reads only; None where reading
    fails."""
    try:
        for node in _walk(loss):
            if type(node).__name__ != "AddBackward0":
                continue
            parts = [n for n, _ in node.next_functions if n is not None]
            scales = [(p, getattr(p, "_saved_other", None)) for p in parts if type(p).__name__ == "MulBackward1"]
            if len(scales) != 2 or not all(isinstance(v, (int, float)) for _, v in scales):
                continue
            nll = next(((p, v) for p, v in scales if type(p.next_functions[0][0]).__name__ == "NllLossBackward0"), None)
            if nll is None:
                continue
            weight = getattr(nll[0].next_functions[0][0], "_saved_weight", None)
            eps = 1.0 - float(nll[1] or 0.0)
            if not isinstance(weight, Tensor) or weight.dim() != 1 or weight.numel() < 2 or not 0 < eps < 1:
                continue
            w = weight.detach().double().cpu()
            k = w.numel()
            toward = int(w.argmax())
            heaviest = float(w[toward]) * eps / k
            wrong = [y for y in range(k) if y != toward and heaviest > float(w[y]) * (1 - eps + eps / k)]
            if wrong:
                return {"epsilon": round(eps, 6), "labels": wrong, "toward": toward}
    except Exception:  # noqa: BLE001 - an exotic graph node: nothing to say, nothing lost
        return None
    return None


def _linear_in_output(node: Any) -> bool:
    """Whether a path from ``node`` back reaches a layer's output (:data:`LAYER_OPS`) through :data:`_LINEAR` nodes
    only (a product where one factor has no gradient)."""
    todo, seen = [node], 0
    while todo and seen < _RATIO_REACH:
        at = todo.pop()
        seen += 1
        name = type(at).__name__
        if name in LAYER_OPS:
            return name != "AccumulateGrad"  # a learned scalar divisor is no output
        if name not in _LINEAR:
            continue
        nxt = [n for n, _ in at.next_functions if n is not None]
        if name.startswith("Mul") and len(nxt) != 1:
            continue  # a product of two tensors with gradient: no longer linear
        todo.extend(nxt)
    return False


def _walk(loss: Tensor) -> Iterator[Any]:
    """The nodes of the loss's graph, breadth first, each once, at most :data:`MAX_NODES`; a layer's node is
    yielded, not walked past."""
    start = getattr(loss, "grad_fn", None)
    todo, seen = [start] if start is not None else [], set[int]()
    while todo and len(seen) < MAX_NODES:
        node = todo.pop(0)
        if id(node) in seen:
            continue
        seen.add(id(node))
        yield node
        if type(node).__name__ not in LAYER_OPS:
            todo.extend(n for n, _ in node.next_functions if n is not None)


QUADRATIC_TARGETS_MAX = 1 << 16  # outputs up to which a squared error's targets are read (one small copy, once)


def target_range(target: Tensor) -> dict[str, float] | None:
    """What a watch keeps of a squared error's targets: their least and largest, and the shares of them below 0,
    above 1 and below −1 (the ranges of a ReLU, a sigmoid and a tanh output); None for no finite target."""
    import torch

    with torch.no_grad():
        y = target.detach().float().reshape(-1)
        y = y[torch.isfinite(y)]
        if not y.numel():
            return None
        return {"min": float(y.min()), "max": float(y.max()), "below_0": float((y < -RANGE_SLACK).float().mean()),
                "above_1": float((y > 1 + RANGE_SLACK).float().mean()),
                "below_m1": float((y < -1 - RANGE_SLACK).float().mean())}


RANGE_SLACK = 0.01  # a target this far past an output's bound is outside it (0 and 1 themselves are a sigmoid's)


def quadratic_targets(loss: Tensor) -> dict[str, float] | None:
    """The range of the targets of a squared error (``nn.MSELoss``, ``F.mse_loss``) or of a binary cross-entropy on
    logits (marked ``bce_logits``: 1; where the graph holds no squared error) in the loss's graph
    (:func:`target_range`), read from the tensor its backward node saved; None where there is none — or the
    backward pass has run (a trial reads it before; a watch reads them off the output's gradient,
    :func:`targets_off_gradient`). Reads only; never fails the user's run."""
    try:
        node = _first_node(loss, frozenset({"MseLossBackward0"}))  # a squared error's first, as before
        if node is not None:
            return target_range(node._saved_target)
        node = _first_node(loss, frozenset({BCE_LOGITS}))
        got = None if node is None else target_range(node._saved_target)
        return None if got is None else {**got, "bce_logits": 1.0}  # (marked as a binary cross-entropy's)
    except Exception:  # noqa: BLE001 - an exotic graph, or its tensors freed: nothing to say, nothing lost
        return None


def targets_off_gradient(loss: Tensor, output: Any, value: Tensor, grad: Tensor) -> dict[str, float] | None:
    """The range of a squared error's targets (:func:`target_range`) read off the gradient ``grad`` of the model's
    ``output`` (its autograd node, and ``value``), where the loss *is* an MSE of that output (its graph's first
    node, the output reached through nodes that keep its elements one for one): ∂L/∂a = 2(a − y)/N under a mean
    (N, the output's elements) and 2(a − y) under a sum, so y = a − g·N/2 or a − g/2. Likewise an unweighted
    binary cross-entropy on logits (y = σ(z) − g·N or σ(z) − g), its range marked ``bce_logits``: 1. None otherwise
    (a loss that adds terms, weighs the loss, or reads part of the output). Reads only; never fails the user's
    run."""
    try:
        node: Any = getattr(loss, "grad_fn", None)
        name = type(node).__name__
        if name not in ("MseLossBackward0", BCE_LOGITS) or node._saved_reduction not in (1, 2):
            return None
        if not _reads_whole(node, output) or value.numel() != grad.numel():
            return None
        if name == BCE_LOGITS:
            # round 30: ∂L/∂z = (σ(z) − y)/N under a mean, (σ(z) − y) under a sum, unweighted only
            if node._saved_weight is not None or node._saved_pos_weight is not None:
                return None
            scale = value.numel() if node._saved_reduction == 1 else 1.0
            got = target_range(value.reshape(-1).float().sigmoid() - grad.reshape(-1).float() * scale)
            return None if got is None else {**got, "bce_logits": 1.0}
        scale = value.numel() / 2 if node._saved_reduction == 1 else 0.5
        return target_range(value.reshape(-1) - grad.reshape(-1) * scale)
    except Exception:  # noqa: BLE001 - an exotic graph: nothing to say, nothing lost
        return None


BCE_LOGITS = "BinaryCrossEntropyWithLogitsBackward0"


DERIVATIVE_NODES = 4096  # nodes of the model's output graph walked for a derivative taken inside the forward, once


def derivative_ops(output: Tensor) -> list[str]:
    """The double-backward operations in the graph of the model's ``output`` (``ThresholdBackwardBackward0`` for a
    ReLU's): the forward differentiates itself, ``torch.autograd.grad(..., create_graph=True)`` — a physics-informed
    net's u'' — and its output holds that derivative. Sorted names, at most :data:`DERIVATIVE_NODES` nodes walked;
    [] where there is none. Reads only; never fails the user's run."""
    try:
        start = getattr(output, "grad_fn", None)
        todo, seen, found = [start] if start is not None else [], set[int](), set[str]()
        while todo and len(seen) < DERIVATIVE_NODES:
            node = todo.pop()
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            name = type(node).__name__
            if name.endswith("BackwardBackward0"):
                found.add(name)
            todo.extend(n for n, _ in node.next_functions)
        return sorted(found)
    except Exception:  # noqa: BLE001 - an exotic graph: nothing to say, nothing lost
        return []


# a loss whose targets are −1 and +1: a target of 0 gives its sample the constant loss log 2 and no gradient at all
MARGIN_LOSSES = frozenset({"SoftMarginLossBackward0"})


def margin_targets(loss: Tensor) -> dict[str, float] | None:
    """Where the loss's graph holds a soft-margin loss (``nn.SoftMarginLoss``, ``F.soft_margin_loss``, which expects
    targets of ±1): the share of its targets at exactly 0 — 0/1 labels given where −1/+1 were meant — read from the
    tensor its backward node saved, before the backward pass frees it (a trial; a watch reads the same off the
    output's gradient, :func:`margin_targets_off_gradient`). None where there is none. Never fails the user's run."""
    try:
        node = _first_node(loss, MARGIN_LOSSES)
        if node is None:
            return None
        y = node._saved_target.detach().reshape(-1)
        return {"at_0": float((y == 0).float().mean())} if y.numel() else None
    except Exception:  # noqa: BLE001 - an exotic graph, or its tensors freed: nothing to say, nothing lost
        return None


def margin_targets_off_gradient(loss: Tensor, output: Any, grad: Tensor) -> dict[str, float] | None:
    """:func:`margin_targets` read off the gradient ``grad`` of the model's ``output`` (its autograd node) where the
    loss *is* a soft-margin loss of that output (its graph's first node, reached through nodes that keep its elements
    one for one): ∂L/∂z = −y·σ(−yz)/N is exactly 0 where y = 0 and nowhere else short of |z| > 100. None otherwise.
    Never fails the user's run."""
    try:
        node: Any = getattr(loss, "grad_fn", None)
        if type(node).__name__ not in MARGIN_LOSSES:
            return None
        if not _reads_whole(node, output) or not grad.numel():
            return None
        return {"at_0": float((grad == 0).float().mean())}
    except Exception:  # noqa: BLE001 - an exotic graph: nothing to say, nothing lost
        return None


def _reads_whole(node: Any, output: Any) -> bool:
    """Whether the loss node ``node``'s input is the model's ``output`` node itself, reached through nodes that keep
    its elements one for one (views, squeezes, transposes)."""
    return _past_same_elements(node.next_functions[0][0], output) is output


def _past_same_elements(node: Any, stop: Any = None) -> Any:
    """The first node from ``node`` back (its first input each time) that does not keep its input's elements one for
    one (:data:`gradwatch.probes.graph.SAME_ELEMENTS`: views, squeezes, transposes), or ``stop`` where the walk meets
    it first."""
    while node is not None and node is not stop and type(node).__name__ in SAME_ELEMENTS:
        node = node.next_functions[0][0]
    return node


def _first_node(loss: Tensor, names: frozenset[str]) -> Any:
    """The first node named in ``names`` on :func:`_walk`; None where there is none."""
    return next((n for n in _walk(loss) if type(n).__name__ in names), None)


def binary_ce_input(loss: Tensor) -> Any:
    """The autograd node of the input of a binary cross-entropy on logits in the loss's graph (names only: it can
    be read after the backward pass); None where there is none."""
    node = _first_node(loss, frozenset({"BinaryCrossEntropyWithLogitsBackward0"}))
    return node.next_functions[0][0] if node is not None and node.next_functions else None


def _prior(loss: Tensor) -> dict[str, float] | None:
    import torch

    node = _first_node(loss, BINARY_CE)
    if node is None:
        return None
    with torch.no_grad():
        target, out = node._saved_target.detach().float(), node._saved_self.detach().float()
        if not target.numel() or bool((target < 0).any() or (target > 1).any()):
            return None
        prob = torch.sigmoid(out) if type(node).__name__.endswith("WithLogitsBackward0") else out
        return {"positive_rate": float(target.mean()), "mean_prob": float(prob.mean())}
