"""Activations called as functions in a ``forward``: ``torch.tanh(layer(x))``, ``F.relu``, ``torch.clamp(h, -1, 1)``.

Module hooks cannot see them, so a net written with ``nn.ModuleList`` and
``torch.tanh`` had no activation statistics: round 7's 8-layer tanh loop at
N(0, 1) weights (CS231n's "almost all neurons completely saturated"; 82–84 %
of its units at |h| > 0.98 by hand) was "healthy". On the sampled steps the
watch now taps those calls with a ``TorchFunctionMode`` held open for the
model's forward pass, and measures each as the activation module it stands for
would be measured (:mod:`gradwatch.probes.activations`; ``torch.clamp(x, a, b)``
as ``nn.Hardtanh(a, b)``, ``clamp(x, min=0)`` as ``nn.ReLU``).

A call counts when the user's own code makes it (not a torch module's
forward, which the module hooks measure) and its input is a pre-activation:
the output of a layer of the model, or a sum with one (``W_xh x + W_hh h``).
The tanh inside a GELU's approximation is neither. The call is named after
that layer: ``layers.3.tanh()`` is the tanh applied to ``layers.3``'s output
(an RNN's tanh at every time step pools under one name, ``W_hh.tanh()``).

A residual add written in ``forward`` (``h = h + torch.tanh(conv(h))``) is
seen by the same tap: an addition one of whose terms is a layer's input (the
skip) and the other a branch that closes on it: every path back from it
ends at the skip or at a weight within ``BRANCH_REACH`` autograd nodes, no
layer met twice (a recurrence is no branch). The activation calls on it sit in a residual
branch (:attr:`FunctionalProbe.branch_calls`), and so do its layers
(:attr:`FunctionalProbe.branch_layers`): the skip carries the gradient past
them, which the diagnosis reads along the layers outside the branches.

A ``F.gumbel_softmax`` call is tapped too (:meth:`FunctionalProbe.relaxed`): the
share of its relaxed samples that are one-hot and its τ, which the diagnosis
reads for a temperature too low (Jang et al. 2017).

The tap is placed only for models that may call activations as functions
(:func:`calls_activations`): a class of the user's whose ``forward`` source
calls one, or that holds one as an attribute (``self.act = torch.tanh``).
"""

from __future__ import annotations

import inspect
import os
import re
import sys
import types
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from gradwatch.probes.activations import ActivationProbe, Call, activation_spec
from gradwatch.probes.graph import walk_back

# the activation functions tapped, as their names appear in a call (`torch.tanh(`, `x.clamp_(`, `F.leaky_relu(`)
_ACT_CALL = re.compile(r"\b(tanh|sigmoid|relu6?|hardtanh|clamp|clip|leaky_relu|gelu|silu|elu|gumbel_softmax)_?\(")
# a dropout called as a function (F.dropout(h, p=0.9, training=self.training)): its rate, read where training
_DROPOUT_CALL = re.compile(r"\b(?:F|functional|torch)\.(?:feature_)?(?:alpha_)?dropout(?:[123]d)?\(")
DROPOUT_FUNCS = frozenset({"dropout", "alpha_dropout", "feature_alpha_dropout", "dropout1d", "dropout2d",
                           "dropout3d"})
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
# frames between the user's call and the mode: Python-level torch functions dispatching to it
_DISPATCH_FILES = tuple(os.path.join(_TORCH_DIR, *p) for p in (("overrides.py",), ("nn", "functional.py"),
                                                               ("_tensor.py",)))
_ADD_NODES = {"AddBackward0", "AddBackward1", "SubBackward0", "SubBackward1"}
_ADD_FUNCS = {"add", "add_", "__add__", "__radd__", "__iadd__"}  # a residual sum, as the tap sees it
BRANCH_REACH = 64  # autograd nodes walked back from a sum's term to the skip's source (weights' leaves count)
_ACTIVATION_CLASS = re.compile(r"(Activation|GELU|GeLU|SiLU|Swish|Mish|ReLU|Tanh|Sigmoid)$")
# autograd nodes that only reshape or select: a Gumbel-softmax's logits are a layer's output seen through them
SHAPE_NODES = {"ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "TransposeBackward0",
                "PermuteBackward0", "SplitBackward0", "UnbindBackward0", "SelectBackward0", "SliceBackward0",
                "CloneBackward0"}
# matrix products: with a constant matrix (no gradient), a propagation of a layer's output (a graph convolution's Â)
_PRODUCT_NODES = {"MmBackward0", "BmmBackward0", "MvBackward0", "SparseAddmmBackward0", "SparseMmBackward0"}
PROPAGATION_REACH = 4  # autograd nodes walked back through products and reshapes to a layer's output
ONE_HOT_ABOVE = 0.99  # a relaxed sample whose largest probability is above this is one-hot
RELAXED = "GumbelSoftmax"  # the entity's module type for a F.gumbel_softmax call site
_KNOWN = {torch.tanh, torch.sigmoid, torch.relu, F.relu, F.relu6, F.hardtanh, F.leaky_relu, F.gelu, F.silu, F.elu,
          torch.clamp, torch.clip, F.tanh, F.sigmoid}


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def stand_in(name: str, args: tuple, kwargs: dict) -> nn.Module | None:
    """The activation module that a call of ``name`` with these arguments computes; None if none does."""
    base = name.rstrip("_")
    if base in ("tanh", "sigmoid", "relu", "relu6", "silu"):
        return {"tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "relu": nn.ReLU, "relu6": nn.ReLU6, "silu": nn.SiLU}[base]()
    def arg(i: int, key: str, default: Any = None) -> Any:
        return args[i] if len(args) > i else kwargs.get(key, default)
    if base in ("clamp", "clip"):
        lo, hi = _number(arg(1, "min")), _number(arg(2, "max"))
        if lo is not None and hi is not None and lo < hi:
            return nn.Hardtanh(lo, hi)
        return nn.ReLU() if lo == 0 and arg(2, "max") is None else None
    if base == "hardtanh":
        lo, hi = _number(arg(1, "min_val", -1.0)), _number(arg(2, "max_val", 1.0))
        return nn.Hardtanh(lo, hi) if lo is not None and hi is not None and lo < hi else None
    if base == "leaky_relu":
        slope = _number(arg(1, "negative_slope", 0.01))
        return nn.LeakyReLU(slope) if slope is not None else None
    if base == "elu":
        alpha = _number(arg(1, "alpha", 1.0))
        return nn.ELU(alpha) if alpha is not None else None
    if base == "gelu":
        approximate = kwargs.get("approximate", "none")
        return nn.GELU(approximate) if approximate in ("none", "tanh") else None
    return None


def _source_calls(obj: Any) -> bool:
    try:
        source = inspect.getsource(obj)
        return bool(_ACT_CALL.search(source) or _DROPOUT_CALL.search(source))
    except (OSError, TypeError):
        return False


def calls_dropout(model: nn.Module) -> bool:
    """Whether a module of the user's own classes (not torch's) has a ``forward`` whose source calls a dropout as a
    function (``F.dropout``, ``torch.dropout``, the 1d/2d/3d and alpha ones)."""
    for m in model.modules():
        if type(m).__module__.startswith("torch."):
            continue
        try:
            if _DROPOUT_CALL.search(inspect.getsource(type(m).forward)):
                return True
        except (OSError, TypeError):
            continue
    return False


def calls_activations(model: nn.Module) -> bool:
    """Whether the model may call an activation (or a dropout, ``F.dropout``) as a function: a module of the user's
    own classes (not torch's, nor an activation class of its own, such as a GELU written out) whose ``forward``
    source calls one, or that holds one — ``torch.tanh``, or a function or lambda whose source calls one — as an
    attribute."""
    for m in model.modules():
        cls = type(m)
        if cls.__module__.startswith("torch.") or _ACTIVATION_CLASS.search(cls.__name__):
            continue
        if _source_calls(cls.forward):
            return True
        for v in vars(m).values():
            if isinstance(v, types.BuiltinFunctionType) and any(v is k for k in _KNOWN):
                return True
            if isinstance(v, types.FunctionType) and (any(v is k for k in _KNOWN) or _source_calls(v)):
                return True
    return False


def called_by_user() -> bool:
    """Whether the torch function being handled was called by code outside torch (frames: the mode's handler, its
    caller's dispatch frames, then the caller)."""
    f: types.FrameType | None = sys._getframe(2)
    while f is not None and f.f_code.co_filename.startswith(_DISPATCH_FILES):
        f = f.f_back
    return f is not None and not f.f_code.co_filename.startswith(_TORCH_DIR)


_CHECKPOINT_FILE = os.path.join(_TORCH_DIR, "utils", "checkpoint.py")
CHECKPOINT_REACH = 40  # frames walked up from a layer's forward hook for a reentrant checkpoint's


def in_reentrant_checkpoint() -> bool:
    """Whether the code running now was called from the forward of ``torch.utils.checkpoint``'s reentrant variant
    (``CheckpointFunction.forward``, which runs its function under ``torch.no_grad()``)."""
    f: types.FrameType | None = sys._getframe(1)
    for _ in range(CHECKPOINT_REACH):
        if f is None:
            return False
        if f.f_code.co_name == "forward" and f.f_code.co_filename == _CHECKPOINT_FILE:
            return True
        f = f.f_back
    return False


SHAPE_REACH = 8  # nodes walked back through reshapes at most


def through_shapes(node: Any, found: Callable[[Any], Any]) -> Any:
    """Walk back from autograd ``node`` through nodes that only reshape or select (:data:`SHAPE_NODES`, their first
    input): ``found(node)`` at the first node where it is not None; None where a node of another kind comes first."""
    for _ in range(SHAPE_REACH):
        if node is None:
            return None
        hit = found(node)
        if hit is not None:
            return hit
        if type(node).__name__ not in SHAPE_NODES or not node.next_functions:
            return None
        node = node.next_functions[0][0]
    return None


def _soft_sample(out: Tensor) -> Tensor | None:
    """The soft sample behind a straight-through Gumbel-softmax's output (y_hard − y_soft.detach() + y_soft): the
    result its softmax node saved; None where there is no such node."""
    node = out.grad_fn
    for next_node, _ in getattr(node, "next_functions", ()):
        if type(next_node).__name__ == "SoftmaxBackward0":
            saved = getattr(next_node, "_saved_result", None)
            return saved.detach() if isinstance(saved, Tensor) else None
    return None


class FunctionalTap(TorchFunctionMode):
    """While the model's forward pass runs on an armed step: hands each activation function call to ``seen(name,
    args, kwargs, input node, output)`` — the input's autograd node taken before the call (an in-place call
    replaces it) — and each dropout's rate, where it trains, to ``dropped(p)``."""

    def __init__(self, seen: Callable[[str, tuple, dict, Any, Tensor], None],
                 summed: Callable[[tuple[Tensor, Any], tuple[Tensor, Any]], None] | None = None,
                 dropped: Callable[[float], None] | None = None) -> None:
        super().__init__()
        self.seen = seen
        self.summed = summed  # each addition's terms as (tensor, its autograd node before the call)
        self.dropped = dropped  # each dropout's p, where it runs in training
        self.open = False

    def enter(self) -> None:
        if not self.open:
            self.open = True
            self.__enter__()

    def leave(self) -> None:
        if self.open:
            self.open = False
            self.__exit__(None, None, None)

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in _ADD_FUNCS and self.summed is not None and len(args) >= 2:
            a, b = args[:2]
            if not (isinstance(a, Tensor) and isinstance(b, Tensor)):
                return func(*args, **kwargs)
            terms = ((a, a.grad_fn), (b, b.grad_fn))  # (an in-place sum replaces the first's node)
            out = func(*args, **kwargs)
            self.summed(*terms)
            return out
        if name in DROPOUT_FUNCS and self.dropped is not None:
            p, training = kwargs.get("p", args[1] if len(args) > 1 else 0.5), kwargs.get(
                "training", args[2] if len(args) > 2 else True)
            if training and isinstance(p, (int, float)) and not isinstance(p, bool) and called_by_user():
                self.dropped(float(p))
            return func(*args, **kwargs)
        if not (_ACT_CALL.match(name + "(") and args and isinstance(args[0], Tensor) and args[0].is_floating_point()):
            return func(*args, **kwargs)
        node = args[0].grad_fn
        out = func(*args, **kwargs)
        if isinstance(out, Tensor) and node is not None and called_by_user():
            self.seen(name, args, kwargs, node, out)
        return out


def propagated(node: Any) -> Any:
    """The node a layer's output was carried from by products with a constant matrix, ``Â @ lin(h)`` (a graph
    convolution's propagation: round 47's GCN layer of the user's own, whose ``F.relu`` after it was "no activation
    seen"), looked for through reshapes, within :data:`PROPAGATION_REACH` nodes; None where ``node`` is none such.
    Only a product whose other factor has no gradient counts: ``x @ W`` with W learned is a layer of its own, and the
    tanh inside a GELU's approximation (a product with a constant *scalar* of a sum) is no propagation."""
    seen_product = False
    for _ in range(PROPAGATION_REACH):
        kind = type(node).__name__
        if kind not in _PRODUCT_NODES and kind not in SHAPE_NODES:
            return node if seen_product else None
        edges = [n for n, _ in node.next_functions if n is not None]
        if len(edges) != 1:
            return None
        seen_product = seen_product or kind in _PRODUCT_NODES
        node = edges[0]
    return None


class LayerOutputs:
    """The autograd nodes of the layers' outputs in the current forward pass, to tell a pre-activation; and the
    layers' inputs, to tell a residual sum's skip."""

    def __init__(self) -> None:
        self._nodes: dict[int, tuple[Any, str, Tensor | None]] = {}  # output node -> (node, layer, its input)
        self._inputs: dict[int, Any] = {}  # the inputs, and their nodes, by id

    def add(self, name: str, output: Any, x: Tensor | None = None) -> None:
        node = getattr(output, "grad_fn", None) if isinstance(output, Tensor) else None
        if node is not None:
            self._nodes[id(node)] = (node, name, x)
        if x is not None:
            self._inputs[id(x)] = x
            if x.grad_fn is not None:
                self._inputs[id(x.grad_fn)] = x.grad_fn

    def is_input(self, x: Tensor, node: Any) -> bool:
        """Whether tensor ``x`` (its node ``node``) was a layer's input in this pass."""
        return self._inputs.get(id(x)) is x or (node is not None and self._inputs.get(id(node)) is node)

    def layer_of(self, node: Any) -> tuple[str, Tensor | None] | None:
        """The layer whose output ``node`` is, and its input."""
        hit = self._nodes.get(id(node))
        return (hit[1], hit[2]) if hit is not None and hit[0] is node else None

    def producer(self, node: Any) -> str | None:
        """The layer whose output is ``node``, or the last of those summed into it (``W_xh x + W_hh h``), or the
        layer whose output a constant matrix propagated (:func:`propagated`)."""
        hit = self.layer_of(node)
        if hit is not None:
            return hit[0]
        if type(node).__name__ in _ADD_NODES:
            names = [h[0] for n, _ in node.next_functions if n is not None and (h := self.layer_of(n)) is not None]
            return names[-1] if names else None
        source = propagated(node)
        hit = self.layer_of(source) if source is not None else None
        return hit[0] if hit is not None else None

    def clear(self) -> None:
        self._nodes = {}
        self._inputs = {}


class FunctionalProbe:
    """Statistics of the activation function calls of one step, one entity per call site (``layers.3.tanh()``),
    measured as their stand-in modules would be (:class:`~gradwatch.probes.activations.ActivationProbe`)."""

    def __init__(self, device: torch.device) -> None:
        self.activations = ActivationProbe([], device)
        self.names: list[str] = []  # by index, as the probe's specs
        self.kinds: list[str] = []  # the stand-in's class name (the entity's module type): "Tanh", "Hardtanh"
        self._index: dict[str, int] = {}
        self.layers = LayerOutputs()
        self._outputs: dict[int, tuple[Any, str]] = {}  # this pass's measured calls: output node -> name
        self.branch_calls: set[str] = set()  # calls seen inside a residual branch, over the run
        self.branch_layers: set[str] = set()  # ... and the layers seen there
        # this step's F.gumbel_softmax calls by site: (Σ one-hot share, calls, lowest τ)
        self._relaxed: dict[str, tuple[Tensor, int, float]] = {}

    def measure(self, fn: str, args: tuple, kwargs: dict, node: Any, out: Tensor) -> tuple[str, Call] | None:
        """Measure one call (the input's node ``node``, the output ``out``): (its name, the call), or None where
        it is not an activation of a layer's output (a Gumbel-softmax's call is measured apart: :meth:`relaxed`)."""
        if fn == "gumbel_softmax":
            self.relaxed(args, kwargs, node, out)
            return None
        layer = self.layers.producer(node)
        module = stand_in(fn, args, kwargs) if layer is not None else None
        spec = activation_spec(module) if module is not None else None
        if spec is None or (fn.endswith("_") and spec.needs_input):  # in place: the input is gone
            return None
        name = f"{layer}.{fn.rstrip('_')}()"
        i = self._index.get(name)
        if i is None:
            i = self._index[name] = len(self.names)
            self.names.append(name)
            self.kinds.append(type(module).__name__)
            self.activations.specs.append(spec)
        call = self.activations.measure(i, module, (out if fn.endswith("_") else args[0],), out)  # type: ignore[arg-type]
        if out.grad_fn is not None:
            self._outputs[id(out.grad_fn)] = (out.grad_fn, name)
        return (name, call) if call is not None else None

    def relaxed(self, args: tuple, kwargs: dict, node: Any, out: Tensor) -> None:
        """A ``F.gumbel_softmax(logits, tau, hard, eps, dim)`` call: the share of its samples that are one-hot
        (largest probability above :data:`ONE_HOT_ABOVE`) and its τ, under the name of the layer whose output the
        logits are (seen through reshapes: ``enc.2.gumbel_softmax()``). With ``hard=True`` the output is one-hot by
        design and the gradient is the soft sample's: that sample is read where autograd saved it (the softmax's
        node under the output's); without a graph, softmax(logits/τ)'s share is taken, the noise left out (no
        random number is drawn: watching never changes training)."""
        def arg(i: int, key: str, default: Any) -> Any:
            return args[i] if len(args) > i else kwargs.get(key, default)
        tau, hard, dim = _number(arg(1, "tau", 1.0)), arg(2, "hard", False), arg(4, "dim", -1)
        if tau is None or not tau > 0 or not isinstance(dim, int) or out.dim() == 0:
            return
        with torch.no_grad():
            y = _soft_sample(out) if hard else out.detach()
            if y is None:
                y = torch.softmax(args[0].detach().float() / tau, dim)
            share = (y.amax(dim) > ONE_HOT_ABOVE).float().mean()
        site = self._site(node)
        name = f"{site}.gumbel_softmax()" if site is not None else "gumbel_softmax()"
        got = self._relaxed.get(name)
        self._relaxed[name] = (share, 1, tau) if got is None else (got[0] + share, got[1] + 1, min(got[2], tau))

    def _site(self, node: Any) -> str | None:
        """The layer whose output ``node`` is, looked for through nodes that only reshape or select."""
        return through_shapes(node, self.layers.producer)

    def kind_of(self, name: str) -> str:
        """The module type an entity of this probe stands for: its stand-in's class, or :data:`RELAXED`."""
        return RELAXED if name.endswith("gumbel_softmax()") else self.kinds[self.names.index(name)]

    def summed(self, a: tuple[Tensor, Any], b: tuple[Tensor, Any]) -> bool:
        """An addition of terms ``a`` and ``b``, each (tensor, its autograd node): when one is a layer's input (the
        skip) and the other a branch that closes on it through measured calls, note those calls and the layers on
        the way as inside a residual branch. True when that adds to what was known."""
        if not self._outputs:
            return False
        before = (len(self.branch_calls), len(self.branch_layers))
        for skip, branch in ((a, b), (b, a)):
            if branch[1] is not None and skip[0] is not branch[0] and self.layers.is_input(*skip):
                self._branch(skip, branch[1])
        return (len(self.branch_calls), len(self.branch_layers)) != before

    def _branch(self, skip: tuple[Tensor, Any], end: Any) -> None:
        """Walk back from ``end``: a residual branch when every path ends at the skip or at a leaf (a weight, an
        input without gradient) within ``BRANCH_REACH`` nodes, a layer on the way took the skip as its input (or the
        walk met the skip's node), and no layer is met twice (a recurrence)."""
        walked = walk_back(end, skip[1], BRANCH_REACH)
        if walked is None:
            return  # it does not close: not a branch of this sum's own
        nodes, reached = walked
        calls, layers = [], []
        for node in nodes:
            hit = self._outputs.get(id(node))
            if hit is not None and hit[0] is node:
                calls.append(hit[1])
            layer = self.layers.layer_of(node)
            if layer is not None:
                if layer[0] in layers:
                    return
                layers.append(layer[0])
                reached = reached or layer[1] is skip[0]
        if reached and calls:
            self.branch_calls.update(calls)
            self.branch_layers.update(layers)

    def new_pass(self) -> None:
        """The model's forward pass begins: the last pass's layers and calls are forgotten."""
        self.layers.clear()
        self._outputs = {}

    def take(self) -> list[tuple[str, str, Tensor]]:
        """The step's statistics as (entity name, quantity, 1-element value); forgets the calls. A Gumbel-softmax
        site's are ``onehot_frac`` (the mean share over its calls) and ``gumbel_tau`` (the lowest τ)."""
        self.layers.clear()
        self._outputs = {}
        relaxed, self._relaxed = self._relaxed, {}
        taken = [(self.names[i], quantity, values[k:k + 1])
                 for quantity, index, values in self.activations.take() for k, i in enumerate(index)]
        for name, (total, calls, tau) in relaxed.items():
            taken.append((name, "onehot_frac", (total / calls).reshape(1)))
            taken.append((name, "gumbel_tau", torch.full((1,), tau, device=total.device)))
        return taken

    def clear(self) -> None:
        self.layers.clear()
        self._outputs = {}
        self._relaxed = {}
        self.activations.clear()
