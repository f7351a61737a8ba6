"""Structural remedies: activation swap, residual connections, normalisation. Deep copies unless ``inplace=True``.

The residual blocks the remedies build (:class:`Residual`, :class:`ReZero`) or recognise
(:class:`ResidualBlock`, a pre-activation block) live here too.
"""

from __future__ import annotations

import contextlib
import copy
import math
import weakref
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from gradwatch._errors import bad_argument
from gradwatch.probes.custom import custom_node
from gradwatch.probes.functional import DROPOUT_FUNCS

SATURATING = (nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Softsign, nn.Hardsigmoid)


def _target(model: nn.Module, inplace: bool) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"expects a torch.nn.Module, got {type(model).__name__}")
    return model if inplace else copy.deepcopy(model)


def output_activations(model: nn.Module, example: Any = None) -> set[int]:
    """The ids of the activation modules that act on the net's output: those after its last layer with parameters.

    Order is the order a forward pass on ``example`` (an input batch, or a tuple of
    arguments) calls the leaf modules, or without one the order they were
    registered in (``nn.Sequential``'s, and most models' ``__init__``). A module
    called both inside the net and at its output counts as an output one. Such
    an activation is what the loss reads: a sigmoid under ``nn.BCELoss`` must stay
    in [0, 1], and a LayerNorm over its single unit would make the output a constant.
    """
    from gradwatch.probes.activations import activation_spec

    return {id(x) for x in after_last_layer(model, example) if activation_spec(x) is not None}


def after_last_layer(model: nn.Module, example: Any = None) -> list[nn.Module]:
    """The leaf modules after the model's last leaf with parameters, in the order of :func:`output_activations`."""
    order = call_order(model, example)
    last = max((i for i, x in enumerate(order) if any(True for _ in x.parameters(recurse=False))), default=None)
    if last is None:  # no leaf holds a parameter (a model's own nn.Parameter used in its forward): order unknown
        return []
    return list(dict.fromkeys(order[last + 1:]))


def swap_activation(model: nn.Module, to: type[nn.Module] = nn.ReLU, replace: tuple[type[nn.Module], ...] = SATURATING,
                    inplace: bool = False, output: bool = False, example: Any = None) -> nn.Module:
    """Replace activation modules of the given classes by ``to()`` (tanh/sigmoid → ReLU by default).

    ReLU's derivative is 1 wherever the unit is active (Nair & Hinton 2010;
    Glorot, Bordes & Bengio 2011), where sigmoid's is at most 1/4. Only
    activation *modules* are reachable; ``torch.tanh(x)`` inside a forward is not.
    The output activation (:func:`output_activations`, found in the order of a
    forward pass on ``example`` where given) stays, unless ``output=True``: the
    loss reads it (a ReLU in place of a sigmoid under ``nn.BCELoss`` fails).
    """
    m = _target(model, inplace)
    keep = set() if output else output_activations(m, example)
    replace_modules(m, lambda child: to() if isinstance(child, replace) and not isinstance(child, to)
                    and id(child) not in keep else None)
    return m


def replace_modules(model: nn.Module, new: Callable[[nn.Module], nn.Module | None]) -> int:
    """Each submodule for which ``new`` returns a module is replaced by it in its parent, in place (the modules
    as they were before: a replacement is not visited); the number replaced."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            got = new(child)
            if got is not None:
                setattr(parent, name, got)
                count += 1
    return count


class Residual(nn.Module):
    """x + f(x) around a shape-preserving block (He et al. 2016)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block(x)


class ReZero(nn.Module):
    """x + α·f(x) with α a learnable scalar starting at 0 (Bachlechner et al. 2020)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block
        self.alpha = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.alpha * self.block(x)


class ResidualBlock(nn.Module):
    """x + conv(relu(bn(conv(relu(bn(x)))))), pre-activation style (He et al. 2016)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(channels), nn.Conv2d(channels, channels, 3, padding=1)
        self.bn2, self.conv2 = nn.BatchNorm2d(channels), nn.Conv2d(channels, channels, 3, padding=1)
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(self.relu1(self.bn1(x)))
        return x + self.conv2(self.relu2(self.bn2(h)))


WEIGHTED_LEAVES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def shape_preserving(layer: nn.Module) -> bool:
    """A layer whose output has its input's shape: Linear(n, n), or a convolution with as many channels out as in,
    stride 1 and 'same' padding (so that x + layer(x) is defined)."""
    if isinstance(layer, nn.Linear):
        return layer.in_features == layer.out_features
    if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        if layer.in_channels != layer.out_channels or any(s != 1 for s in layer.stride):
            return False
        if isinstance(layer.padding, str):
            return layer.padding == "same"
        return all(2 * p == d * (k - 1) for p, d, k in zip(layer.padding, layer.dilation, layer.kernel_size))
    return False


def call_order(model: nn.Module, example: Any = None) -> list[nn.Module]:
    """The model's leaf modules in the order a forward pass on ``example`` calls them (a module called twice
    appears twice; in eval mode, no gradient, the random stream untouched), or without one in registration order."""
    leaves = [x for x in model.modules() if not list(x.children())]
    if example is None:
        return leaves
    called: list[nn.Module] = []
    hooks = [x.register_forward_hook(lambda mod, a, o: called.append(mod)) for x in leaves]
    try:
        dry_run(model, example)
    finally:
        for h in hooks:
            h.remove()
    return called


def dry_run(model: nn.Module, example: Any, *within: Any, graph: bool = False) -> None:
    """One forward pass of ``model`` on ``example`` (a batch, or a tuple of arguments) that changes nothing: in eval
    mode (no running statistics move, no dropout mask), without gradient (``graph``: building the autograd graph,
    never run backward), the random stream put back, each module's mode restored after; inside the context
    managers ``within`` as well."""
    modes = [(x, x.training) for x in model.modules()]
    model.eval()
    try:
        with contextlib.ExitStack() as stack:
            for context in (torch.enable_grad() if graph else torch.no_grad(), torch.random.fork_rng(devices=[]), *within):
                stack.enter_context(context)
            model(*example) if isinstance(example, tuple) else model(example)
    finally:
        for x, training in modes:
            x.training = training


def recurrent_layers(model: nn.Module, example: Any) -> list[nn.Module]:
    """The layers that one forward pass of ``model`` on ``example`` calls again on their own output (W_hh as an
    ``nn.Linear`` in a Python loop): the watch's judgement (:class:`gradwatch.probes.loops.LoopProbe`), on a dry
    run that builds the graph. [] where the forward pass fails on ``example``."""
    from gradwatch.layers import anatomy
    from gradwatch.probes.loops import LoopProbe, loop_candidates

    layers = [(layer.name, layer.module) for layer in anatomy(model).layers]
    probe = LoopProbe(loop_candidates(layers), torch.device("cpu"))
    handles = [module.register_forward_hook(lambda m, a, out, i=i: probe.call(i, out) and None)
               for i, (_, module) in probe.candidates.items()]
    try:
        dry_run(model, example, graph=True)
    except Exception:  # noqa: BLE001 - a forward the example does not fit: no loop found
        return []
    finally:
        for h in handles:
            h.remove()
    return [layers[i][1] for i, recurrent in probe.recurrent.items() if recurrent]


def _calls_its_layers(module: nn.Module) -> bool:
    """A module whose ``forward`` is the user's (a class not from torch: the model, a block of the user's) or a
    container a user's ``forward`` indexes (``nn.ModuleList``, ``nn.ModuleDict``); not ``nn.Sequential`` nor
    torch's own layers (attention, a Transformer layer), whose remedies are their own."""
    if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
        return True
    return not type(module).__module__.startswith("torch.")


def loose_layers(model: nn.Module, example: Any = None) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, name, layer) for each weighted layer (:data:`WEIGHTED_LEAVES`) held directly by the model or by a
    module whose ``forward`` calls it (:func:`_calls_its_layers`: a block class of the user's, an ``nn.ModuleList``
    or ``nn.ModuleDict``) — layers called in a loop or one by one, with activations that may be functions
    (``F.relu``) no structural remedy can see — but the net's last layer (its output). Layers inside
    ``nn.Sequential`` and torch's own modules (attention) are left to those."""
    order = list(dict.fromkeys(x for x in call_order(model, example) if isinstance(x, WEIGHTED_LEAVES)))
    last = order[-1] if order else None
    out: list[tuple[nn.Module, str, nn.Module]] = []
    for parent in [model, *(x for x in model.modules() if x is not model and _calls_its_layers(x))]:
        for name, child in parent.named_children():
            if isinstance(child, WEIGHTED_LEAVES) and child is not last and (example is None or child in order):
                out.append((parent, name, child))
    return out


def skip_blocks(model: nn.Module, example: Any) -> set[int]:
    """The ids of the user's blocks (:func:`_calls_its_layers`, not the model itself nor a container) whose
    ``forward`` already adds its input to its output, x + f(x): with every parameter of a copy set to zero the
    copy returns its input, on the input a forward pass of ``model`` on ``example`` gave it (a block of plain
    layers returns act(0) instead). Empty without ``example``."""
    if example is None:
        return set()
    blocks = [x for x in model.modules() if x is not model and not isinstance(x, (nn.ModuleList, nn.ModuleDict))
              and _calls_its_layers(x) and any(True for _ in x.parameters())]
    seen: dict[int, tuple[Any, ...]] = {}

    def keep(mod: nn.Module, args: tuple[Any, ...]) -> None:
        seen.setdefault(id(mod), tuple(a.detach().clone() if isinstance(a, Tensor) else a for a in args))

    hooks = [x.register_forward_pre_hook(keep) for x in blocks]
    try:
        dry_run(model, example)
    finally:
        for h in hooks:
            h.remove()
    found: set[int] = set()
    for block in blocks:
        args = seen.get(id(block))
        if not args or not isinstance(args[0], Tensor) or not args[0].is_floating_point():
            continue
        zeroed = copy.deepcopy(block).eval()
        with torch.no_grad():
            for p in zeroed.parameters():
                p.zero_()
            try:
                out = zeroed(*args)
            except Exception:  # noqa: BLE001 - a block that will not run alone: not known to add its input
                continue
        if isinstance(out, Tensor) and out.shape == args[0].shape and torch.equal(out, args[0]):
            found.add(id(block))
    return found


def _keeps_shape(m: nn.Module) -> bool:
    """A module without weights whose output has its input's shape: PyTorch's element-wise activations (all of
    ``torch.nn.modules.activation`` but its attention), dropout, identity. Not a pooling, flattening or resizing
    module: a skip around one is undefined (round 13: a Conv–Sigmoid–MaxPool group wrapped whole, "size of tensor
    a (8) must match … b (4)", in every residual row of a LeNet-style stack and of the benchmark's VGG)."""
    if list(m.parameters(recurse=False)) or isinstance(m, nn.MultiheadAttention):
        return False
    return (type(m).__module__ == "torch.nn.modules.activation"
            or isinstance(m, (nn.modules.dropout._DropoutNd, nn.Identity)))


def _pairs(seq: nn.Sequential, blocks: frozenset[int] = frozenset()) -> list[tuple[int, int]]:
    """(start, end) of each shape-preserving layer (:func:`shape_preserving`), or block of the user's among
    ``blocks`` (ids), followed by the modules after it that keep the shape too (:func:`_keeps_shape`), inside a
    Sequential."""
    items = list(seq)
    spans, i = [], 0
    while i < len(items):
        layer = items[i]
        if shape_preserving(layer) or id(layer) in blocks:
            j = i + 1
            while j < len(items) and _keeps_shape(items[j]):
                j += 1
            spans.append((i, j))
            i = j
        else:
            i += 1
    return spans


# autograd nodes of element-wise activations: a block whose output is one ends in its activation
_ACTIVATION_NODES = frozenset({"ReluBackward0", "TanhBackward0", "SigmoidBackward0", "GeluBackward0", "SiluBackward0",
                               "EluBackward0", "LeakyReluBackward0", "HardtanhBackward0", "ClampBackward1",
                               "ClampMinBackward0", "ThresholdBackward0", "SoftplusBackward0", "MishBackward0",
                               "HardswishBackward0", "HardsigmoidBackward0"})


def _shape_keeping_blocks(model: nn.Module, example: Any,
                          listed: bool = False) -> frozenset[int]:
    """The ids of the user's blocks held by an ``nn.Sequential`` (a class of their own with parameters) whose output
    had their input's shape in a forward pass on ``example``, and that do not add their input already
    (:func:`skip_blocks`): a skip connection goes around each whole (round 16: 50 blocks relu(BN(Linear(h))) in a
    Sequential, where the skip went around the input Linear alone). Empty without ``example``.

    ``listed``: those an ``nn.ModuleList`` or ``nn.ModuleDict`` holds instead, whose output is no element-wise
    activation (``Â @ lin(h)``, the activation after it the caller's): x + block(x) then keeps the form
    act(x + f(x)), where a block ending in its own activation keeps its skip around its layer, inside."""
    if example is None:
        return frozenset()
    holders = (nn.ModuleList, nn.ModuleDict) if listed else (nn.Sequential,)
    held = [c for x in model.modules() if isinstance(x, holders) for c in x.children()
            if not isinstance(c, (nn.Sequential, nn.ModuleList, nn.ModuleDict)) and _calls_its_layers(c)
            and any(True for _ in c.parameters())]
    if not held:
        return frozenset()
    same: set[int] = set()

    def keep(mod: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        x = next((a for a in args if isinstance(a, Tensor)), None)
        if x is not None and isinstance(out, Tensor) and out.shape == x.shape and not (
                listed and type(out.grad_fn).__name__ in _ACTIVATION_NODES):
            same.add(id(mod))

    hooks = [c.register_forward_hook(keep) for c in held]
    try:
        dry_run(model, example, graph=listed)
    except Exception:  # noqa: BLE001 - a forward the dry run cannot follow: no block is known to keep its shape
        return frozenset()
    finally:
        for h in hooks:
            h.remove()
    return frozenset(same - skip_blocks(model, example))


def add_residual(model: nn.Module, rezero: bool = False, inplace: bool = False, example: Any = None) -> nn.Module:
    """Wrap every shape-preserving layer + activation group of each ``nn.Sequential`` in a skip connection
    (Linear(n, n), or a convolution keeping channels and size: :func:`shape_preserving`; a block of the user's
    that keeps its input's shape on ``example``, whole: :func:`_shape_keeping_blocks`); where the model has
    none, each such block of the user's that an ``nn.ModuleList`` or ``nn.ModuleDict`` holds and that does not end in
    its own activation, whole, and every
    other shape-preserving layer that a ``forward`` calls itself (:func:`loose_layers`: held by the model, a
    block of the user's, an ``nn.ModuleList`` or ``nn.ModuleDict``; activations that may be functions), alone —
    x + layer(x), the activation after it — but those inside a block of the user's that already adds its input
    (:func:`skip_blocks`).

    ``rezero=True`` wraps in :class:`ReZero` instead (a learnable α starting at 0). ``example``: an input batch,
    to find the output layer by a forward pass (it is never wrapped).
    """
    m = _target(model, inplace)
    wrapped = False
    blocks = _shape_keeping_blocks(m, example)
    for parent in [x for x in m.modules() if isinstance(x, nn.Sequential)]:
        spans = _pairs(parent, blocks)
        if not spans:
            continue
        items = list(parent)
        new: list[nn.Module] = []
        i = 0
        for start, end in spans:
            new += items[i:start]
            block = nn.Sequential(*items[start:end])
            new.append(ReZero(block) if rezero else Residual(block))
            i = end
        new += items[i:]
        _replace_children(parent, new)
        wrapped = True
    if not wrapped:
        # the user's blocks that a ModuleList holds and that keep their input's shape, whole (round 47: a GCN layer
        # Â·lin(h) of the user's own in a loop, whose skip went around its Linear, inside the propagation by Â)
        listed = _shape_keeping_blocks(m, example, listed=True)
        inside = {id(y) for x in m.modules() if id(x) in listed for y in x.modules()}
        for container in [x for x in m.modules() if isinstance(x, (nn.ModuleList, nn.ModuleDict))]:
            for name, child in list(container.named_children()):
                if id(child) in listed:
                    setattr(container, name, ReZero(child) if rezero else Residual(child))
        skips = skip_blocks(m, example)  # a skip inside a block that has one compounds: x + x + ... per block
        for holder, name, layer in loose_layers(m, example):
            if shape_preserving(layer) and id(holder) not in skips and id(holder) not in inside:
                setattr(holder, name, ReZero(layer) if rezero else Residual(layer))
    return m


_WEIGHTED_CALLS = frozenset({"linear", "conv1d", "conv2d", "conv3d", "bilinear", "matmul", "bmm", "addmm"})


_PRODUCTS = frozenset({"mul", "__mul__", "__rmul__", "mul_", "rsub", "__rsub__", "sub", "__sub__", "addcmul", "lerp"})


class _CallCounter(TorchFunctionMode):
    """Within one forward pass: the torch function calls by name, in order; ``swap`` maps a call (its name and how
    many calls of that name came before it) to the function to run instead. ``gates``: the ``sigmoid`` calls whose
    output a product or a difference then reads (t·H + (1 − t)·x: a highway's or a hand-written LSTM's gate)."""

    def __init__(self, swap: dict[tuple[str, int], Callable[..., Any]] | None = None) -> None:
        super().__init__()
        self.calls: list[tuple[str, int]] = []  # (name, calls of that name before it)
        self.seen: dict[str, int] = {}
        self.swap = swap or {}
        self.gates: set[tuple[str, int]] = set()
        self._sigmoids: dict[int, tuple[tuple[str, int], Tensor]] = {}  # id → (call, output): kept alive, ids unique

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = getattr(func, "__name__", "")
        k = self.seen.get(name, 0)
        self.seen[name] = k + 1
        self.calls.append((name, k))
        if name in _PRODUCTS and not self.swap:
            for a in args:
                got = self._sigmoids.get(id(a)) if isinstance(a, Tensor) else None
                if got is not None and got[1] is a:
                    self.gates.add(got[0])
        instead = self.swap.get((name, k))
        if instead is not None and args and isinstance(args[0], Tensor):
            return instead(args[0])
        out = func(*args, **(kwargs or {}))
        if name == "sigmoid" and not self.swap and isinstance(out, Tensor):
            self._sigmoids[id(out)] = ((name, k), out)
        return out


class Wrapper(nn.Module):
    """A module around the user's model (the attribute named by ``wraps``) that reads through to it the attributes
    it does not have itself: the set-up's ``evaluate(model)`` may read ``model.net`` or call a method of its own on
    the model a remedy handed it (round 28: the input-standardisation row failed with "'Standardised' object has no
    attribute 'net'")."""

    wraps = "inner"

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == self.wraps:
                raise
            return getattr(super().__getattr__(self.wraps), name)


class FunctionalSwap(Wrapper):
    """A model whose activations are functions called in its ``forward`` (``torch.tanh``, ``F.sigmoid``,
    ``F.relu``), with some of them replaced: each call of a name in ``swap`` that comes before the forward's last
    weighted call (a linear or a convolution, found on ``example``) runs ``swap[name]`` instead; calls after it act
    on the net's output and stay (a sigmoid under ``nn.BCELoss``), and so do sigmoids that gate (their output
    multiplies another tensor: a highway's T, a hand-written LSTM's gates; round 10's ReLU "gate" diverged). The
    model's parameters are its own: an optimizer over them trains the swapped model. Calls are matched by their
    order within a forward pass, so the forward must call them in the same order every time (no data-dependent
    branches). ``output=True`` swaps the calls after the last weighted call instead (a softmax on the logits)."""

    def __init__(self, model: nn.Module, swap: dict[str, Callable[[Tensor], Tensor]], example: Any,
                 output: bool = False) -> None:
        super().__init__()
        self.inner = model
        probe = _CallCounter()
        dry_run(model, example, probe)
        last = max((i for i, (name, _) in enumerate(probe.calls) if name in _WEIGHTED_CALLS), default=-1)
        calls = probe.calls[last + 1:] if output and last >= 0 else probe.calls[:max(last, 0)]
        self.plan: dict[tuple[str, int], Callable[[Tensor], Tensor]] = {  # a gate stays a gate (in [0, 1])
            call: swap[call[0]] for call in calls if call[0] in swap and call not in probe.gates}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with _CallCounter(self.plan):
            return self.inner(*args, **kwargs)


def swap_functional(model: nn.Module, swap: dict[str, Callable[[Tensor], Tensor]], example: Any,
                    output: bool = False) -> FunctionalSwap | None:
    """:class:`FunctionalSwap` of ``model``, or None when no call before its last layer is one to swap; with
    ``output=True`` the calls after its last layer instead (a softmax the forward applies to the logits)."""
    if example is None:
        return None
    wrapped = FunctionalSwap(model, swap, example, output=output)
    return wrapped if wrapped.plan else None


class _Rebinding(TorchFunctionMode):
    """A function mode that changes the arguments of some of ``torch.nn.functional``'s calls made while it is open:
    ``signatures`` names each such function's positional parameters; :meth:`rebind` gets every call's arguments bound
    by name and returns those it is made with. Every other call runs as it was made."""

    signatures: ClassVar[dict[str, tuple[str, ...]]] = {}

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", "")
        if name not in self.signatures or getattr(func, "__module__", "") != "torch.nn.functional":
            return func(*args, **kwargs)
        return func(**self.rebind(name, {**dict(zip(self.signatures[name], args)), **kwargs}))

    def rebind(self, name: str, bound: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError


class _Temperature(_Rebinding):
    """Every ``F.gumbel_softmax`` call made while it is open runs at a temperature of at least ``tau``."""

    signatures = {"gumbel_softmax": ("logits", "tau", "hard", "eps", "dim")}

    def __init__(self, tau: float) -> None:
        super().__init__()
        self.tau = tau

    def rebind(self, name: str, bound: dict[str, Any]) -> dict[str, Any]:
        if float(bound.get("tau", 1.0)) < self.tau:
            bound["tau"] = self.tau
        return bound


class ZeroInfinity(_Rebinding):
    """Every ``F.ctc_loss`` call made while it is open (``nn.CTCLoss``'s too) runs with ``zero_infinity=True``: a
    sample with no alignment adds 0 to the loss, not +inf."""

    signatures = {"ctc_loss": ("log_probs", "targets", "input_lengths", "target_lengths", "blank", "reduction",
                               "zero_infinity")}

    def rebind(self, name: str, bound: dict[str, Any]) -> dict[str, Any]:
        return {**bound, "zero_infinity": True}


class NoWeightedSmoothing(_Rebinding):
    """Every ``F.cross_entropy`` call made while it is open (``nn.CrossEntropyLoss``'s too) that weighs its classes
    runs without label smoothing: PyTorch weighs the smoothing term by the class weights too (pytorch/pytorch#104776),
    which puts the loss's minimum on the heaviest class. A call without ``weight`` keeps its smoothing."""

    signatures = {"cross_entropy": ("input", "target", "weight", "size_average", "ignore_index", "reduce",
                                    "reduction", "label_smoothing")}

    def rebind(self, name: str, bound: dict[str, Any]) -> dict[str, Any]:
        return {**bound, "label_smoothing": 0.0} if bound.get("weight") is not None else bound


class PositiveWeight(_Rebinding):
    """Every binary cross-entropy called while it is open weighs its positive targets ``weight``×: an
    ``F.binary_cross_entropy_with_logits`` with no ``pos_weight`` gets ``pos_weight=weight``
    (``nn.BCEWithLogitsLoss``'s too), an ``F.binary_cross_entropy`` on probabilities with no ``weight`` gets
    ``weight = 1 + (weight − 1)·target`` (``nn.BCELoss``'s too), the same loss for targets in {0, 1}. A call that
    weighs its classes itself is left as it is."""

    signatures = {
        "binary_cross_entropy_with_logits": ("input", "target", "weight", "size_average", "reduce", "reduction",
                                             "pos_weight"),
        "binary_cross_entropy": ("input", "target", "weight", "size_average", "reduce", "reduction")}

    def __init__(self, weight: float) -> None:
        super().__init__()
        self.weight = weight

    def rebind(self, name: str, bound: dict[str, Any]) -> dict[str, Any]:
        if name == "binary_cross_entropy_with_logits":
            if bound.get("pos_weight") is None:
                target = bound["target"]
                bound["pos_weight"] = torch.tensor(self.weight, dtype=target.dtype, device=target.device)
        elif bound.get("weight") is None:
            bound["weight"] = 1 + (self.weight - 1) * bound["target"].detach()
        return bound


class ClassWeight(_Rebinding):
    """Every cross-entropy over class scores called while it is open (``F.cross_entropy``, ``nn.CrossEntropyLoss``,
    ``F.nll_loss``) with no ``weight`` of its own weighs class ``majority`` by ``weight`` and every other class by 1:
    torch's own ``weight=`` argument, a vector over the classes."""

    signatures = {
        "cross_entropy": ("input", "target", "weight", "size_average", "ignore_index", "reduce", "reduction",
                          "label_smoothing"),
        "nll_loss": ("input", "target", "weight", "size_average", "ignore_index", "reduce", "reduction")}

    def __init__(self, majority: int, weight: float) -> None:
        super().__init__()
        self.majority, self.weight = majority, weight

    def rebind(self, name: str, bound: dict[str, Any]) -> dict[str, Any]:
        scores = bound["input"]
        classes = scores.shape[1] if scores.dim() >= 2 else scores.shape[0]
        if bound.get("weight") is None and 0 <= self.majority < classes:
            weight = torch.ones(classes, dtype=scores.dtype, device=scores.device)
            weight[self.majority] = self.weight
            bound["weight"] = weight
        return bound


class LogProbabilities(_Rebinding):
    """Every ``F.nll_loss`` called while it is open (``nn.NLLLoss``'s too) takes the log_softmax of its input over
    the classes (dim 1; dim 0 for one sample's scores): the NLL of log-probabilities, a cross-entropy. For an input
    of log-probabilities already it changes nothing (log_softmax of log-probabilities is themselves)."""

    signatures = {"nll_loss": ("input", "target", "weight", "size_average", "ignore_index", "reduce", "reduction")}

    def rebind(self, name: str, bound: dict[str, Any]) -> dict[str, Any]:
        scores = bound["input"]
        return {**bound, "input": F.log_softmax(scores, dim=1 if scores.dim() >= 2 else 0)}


class DropoutKept(_Rebinding):
    """Every dropout called as a function while it is open (``F.dropout``, ``F.dropout1d/2d/3d``, the alpha ones) at
    a rate of ``at_least`` or more runs at 1 − p: the keep probability it was likely meant as (TF1's keep_prob)."""

    signatures = {name: ("input", "p", "training", "inplace") for name in DROPOUT_FUNCS}

    def __init__(self, at_least: float) -> None:
        super().__init__()
        self.at_least = at_least

    def rebind(self, name: str, bound: dict[str, Any]) -> dict[str, Any]:
        p = bound.get("p", 0.5)
        if isinstance(p, (int, float)) and self.at_least <= p < 1:
            bound["p"] = 1.0 - p
        return bound


# the operations that make ±inf of an entry that is exactly 0: a power with a negative exponent, 1/x, rsqrt, x/0
RECIPROCALS = frozenset({"pow", "__pow__", "rsqrt", "reciprocal", "div", "true_divide", "__truediv__",
                         "__rdiv__", "__rtruediv__"})


class ZeroReciprocals(TorchFunctionMode):
    """While open, every power with a negative exponent, reciprocal, rsqrt and division by a tensor is 0 where its
    base (divisor) is exactly 0, in place of ±inf or NaN — what pygcn does to a zero degree's D^(−1/2)
    (``r_inv[np.isinf(r_inv)] = 0.``) and PyG's ``gcn_norm`` with its ``masked_fill``. Computed on a base with 1 at
    those entries and then set to 0 there, so that no 1/0 reaches the backward pass either (its gradient there is
    0). Every other call runs as it was made."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name not in RECIPROCALS or not args:
            return func(*args, **kwargs)
        if name in ("pow", "__pow__"):
            at = 0 if len(args) > 1 and isinstance(args[1], (int, float)) and args[1] < 0 else None
        elif name in ("rsqrt", "reciprocal", "__rdiv__", "__rtruediv__"):
            at = 0
        else:
            at = 1 if len(args) > 1 and isinstance(args[1], Tensor) else None
        base = args[at] if at is not None else None
        if at is None or not isinstance(base, Tensor) or not base.is_floating_point():
            return func(*args, **kwargs)
        return _zero_at_zeros(func, args, at, kwargs)


def _zero_at_zeros(func: Any, args: tuple, at: int, kwargs: dict) -> Any:
    """``func(*args, **kwargs)``, computed with 1 in place of ``args[at]``'s exact zeros and then 0 there: neither
    the value nor the backward pass meets the operation at 0 (its inf, and inf·0 = NaN). As made where there is none."""
    base = args[at]
    zero = base == 0
    if not bool(zero.any()):
        return func(*args, **kwargs)
    safe = list(args)
    safe[at] = torch.where(zero, torch.ones_like(base), base)
    out = func(*safe, **kwargs)
    return torch.where(zero, torch.zeros_like(out), out)


# the products a mask is applied by: s·m + (1 − m)·(−inf) (the operator's own names and torch's functions)
PRODUCT_OPS = frozenset({"mul", "mul_", "multiply", "__mul__", "__rmul__", "__imul__"})


class FiniteInfFactors(TorchFunctionMode):
    """While open, every product (:data:`PRODUCT_OPS`) given a number that is ±inf itself takes the dtype's extreme
    finite value in its place (``torch.finfo(dtype).min`` for −inf), so that 0·(−inf) is 0 and 1·(−inf) a score no
    softmax keeps: a mask applied by multiplying, ``(1 − m)·float('-inf')``, is NaN wherever m = 1 (cerebroai/
    reformers#3: "Changed to * -1e9 has fixed it"). Every other call runs as it was made."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") not in PRODUCT_OPS or not any(
                isinstance(a, float) and math.isinf(a) for a in args):
            return func(*args, **kwargs)
        tensor = next((a for a in args if isinstance(a, Tensor) and a.is_floating_point()), None)
        if tensor is None:
            return func(*args, **kwargs)
        big = torch.finfo(tensor.dtype).max
        return func(*(math.copysign(big, a) if isinstance(a, float) and math.isinf(a) else a for a in args), **kwargs)


class DetachedAdvantage(TorchFunctionMode):
    """While open, a product of a gathered log-probability (a policy's log π(a)) and a weight that has a gradient of
    its own from outside it (an advantage R − V not detached) takes the weight detached: the policy term moves the
    policy alone, and the critic learns from its own loss (coreylynch/async-rl#8). Every other call runs as made."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        from gradwatch.probes.policy_loss import WEIGHT_REACH, gathered_log_prob, reaches

        kwargs = kwargs or {}
        if (getattr(func, "__name__", "") not in PRODUCT_OPS or len(args) != 2
                or not all(isinstance(a, Tensor) and a.grad_fn is not None for a in args)):
            return func(*args, **kwargs)
        a, b = args
        for i, (mine, other) in enumerate(((a, b), (b, a))):
            source = gathered_log_prob(mine.grad_fn)
            if source is not None and not reaches(other.grad_fn, source, WEIGHT_REACH):
                return func(*((a, b.detach()) if i == 0 else (a.detach(), b)), **kwargs)
        return func(*args, **kwargs)


class SummedReconstruction(TorchFunctionMode):
    """While open, a reconstruction loss called at ``reduction="mean"`` (its default) — ``F.binary_cross_entropy``,
    ``F.binary_cross_entropy_with_logits``, ``F.mse_loss``, ``F.l1_loss``, ``F.smooth_l1_loss``, and the loss modules
    that call them — sums instead, as a VAE's KL is summed (pytorch/examples' VAE). Every other call runs as made."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _RECONSTRUCTIONS and len(args) <= 2 and kwargs.get("reduction", "mean") == "mean" and not (
                kwargs.get("size_average") is not None or kwargs.get("reduce") is not None):
            return func(*args, **{**kwargs, "reduction": "sum"})
        return func(*args, **kwargs)


_RECONSTRUCTIONS = frozenset({F.binary_cross_entropy, F.binary_cross_entropy_with_logits, F.mse_loss, F.l1_loss,
                              F.smooth_l1_loss})


# the step-like operations a straight-through estimator passes the gradient around: zero derivative almost everywhere
STEP_LIKE = frozenset({"round", "floor", "ceil", "trunc", "fix", "sign", "sgn"})


class StraightThrough(TorchFunctionMode):
    """While open, every rounding and sign of a tensor that requires grad is ``x + (f(x) − x).detach()``: f(x)
    forward, the identity's gradient backward — the straight-through estimator (Bengio, Léonard & Courville 2013;
    Hubara et al. 2016 for quantised weights). Every other call runs as it was made."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        x = args[0] if args else None
        if (getattr(func, "__name__", "") not in STEP_LIKE or not isinstance(x, Tensor) or not x.requires_grad
                or not isinstance(out, Tensor) or out.shape != x.shape or not out.is_floating_point()):
            return out
        return x + (out - x).detach()


class DropSteps(TorchFunctionMode):
    """While open, every rounding and sign of a tensor that requires grad returns its input: the value the loss
    should have read, where a step function sat between a model's output and its loss only to report 0/1 answers
    (``BCELoss(torch.round(torch.sigmoid(z)), y)``: its derivative is 0 everywhere, so no gradient ever leaves the
    loss). Every other call runs as it was made."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        x = args[0] if args else None
        if getattr(func, "__name__", "") in STEP_LIKE and isinstance(x, Tensor) and x.requires_grad:
            return x
        return func(*args, **kwargs)


VARIANCES = frozenset({"var", "std", "var_mean", "std_mean"})


class NoEmptyVariance(TorchFunctionMode):
    """While open, a variance or standard deviation (``torch.var``, ``torch.std``, their ``_mean`` forms and the
    tensor methods) that reduces no more elements per output than its correction — Bessel's n − 1, their default,
    over a single element: 0/0 — is taken with ``correction=0``, the 0 a single element's spread is. Every other
    call, and every reduction over more elements, runs as it was made."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        x = args[0] if args else kwargs.get("input")
        if getattr(func, "__name__", "") in VARIANCES and isinstance(x, Tensor) and x.is_floating_point():
            call = _without_correction(x, args[1:], {k: v for k, v in kwargs.items() if k != "input"})
            if call is not None:
                return func(x, **call)
        return func(*args, **kwargs)


def _without_correction(x: Tensor, rest: tuple, kwargs: dict) -> dict | None:
    """The keyword arguments of the same reduction with ``correction=0`` where the given call reduces no more
    elements per output than its correction; None where it reduces more (the call stands as made)."""
    dim, unbiased = kwargs.get("dim"), kwargs.get("unbiased")
    keepdim, correction = bool(kwargs.get("keepdim", False)), kwargs.get("correction")
    for a in rest:  # positional: (dim, unbiased, keepdim), or (unbiased,)
        if isinstance(a, bool):
            if unbiased is None:
                unbiased = a
            else:
                keepdim = a
        else:
            dim = a
    if correction is None:
        correction = 0 if unbiased is False else 1
    dims = (range(x.dim()) if dim is None or (isinstance(dim, (tuple, list)) and not dim)
            else [dim] if isinstance(dim, int) else list(dim))
    over = 1
    for d in dims:
        over *= x.shape[d] if x.dim() else 1
    if over > float(correction):
        return None
    return {"dim": dim, "keepdim": keepdim, "correction": 0}


class SignedMarginTargets(TorchFunctionMode):
    """While open, a soft-margin loss (``F.soft_margin_loss``, ``nn.SoftMarginLoss``) whose targets are all 0 or 1
    gets 2·y − 1: the −1/+1 targets it expects, from the 0/1 labels a binary cross-entropy wants. Every other call
    runs as it was made."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = dict(kwargs or {})
        if func is not torch.nn.functional.soft_margin_loss:
            return func(*args, **kwargs)
        y = args[1] if len(args) > 1 else kwargs.get("target")
        if isinstance(y, Tensor) and y.numel() and bool(((y == 0) | (y == 1)).all()):
            if len(args) > 1:
                args = (args[0], 2 * y - 1, *args[2:])
            else:
                kwargs["target"] = 2 * y - 1
        return func(*args, **kwargs)


class LogSpace(TorchFunctionMode):
    """While open, the logarithm of a sigmoid's or softmax's output is computed in log space: ``log(sigmoid(z))`` as
    ``F.logsigmoid(z)``, ``log(1 − sigmoid(z))`` as ``F.logsigmoid(−z)``, ``log(softmax(z))`` as ``F.log_softmax(z)``
    — finite where p rounds to 0 or 1 in float32 (a hand-written binary cross-entropy's 0·log 0 = NaN), the same
    value elsewhere. The outputs it made are remembered until :meth:`forget` (one step: the doctor's trial calls it
    as each forward pass starts); every other call runs as it was made."""

    def __init__(self) -> None:
        super().__init__()
        self.made: dict[int, tuple[Any, str, Tensor, int]] = {}  # id(output) -> (weakref, kind, logits, dim)

    def forget(self) -> None:
        self.made.clear()

    def _of(self, x: Any) -> tuple[str, Tensor, int] | None:
        got = self.made.get(id(x)) if isinstance(x, Tensor) else None
        return got[1:] if got is not None and got[0]() is x else None

    def _note(self, out: Any, kind: str, z: Tensor, dim: int = -1) -> Any:
        if isinstance(out, Tensor):
            self.made[id(out)] = (weakref.ref(out), kind, z, dim)
        return out

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        x = args[0] if args else None
        if name == "sigmoid" and isinstance(x, Tensor):
            return self._note(func(*args, **kwargs), "sigmoid", x)
        if name == "softmax" and isinstance(x, Tensor):
            dim = args[1] if len(args) > 1 else kwargs.get("dim")
            out = func(*args, **kwargs)
            return self._note(out, "softmax", x, dim) if isinstance(dim, int) else out
        p = (x if name in ("__rsub__", "rsub") and len(args) > 1 and _is_one(args[1])  # 1 - p
             else args[1] if name in ("__sub__", "sub") and _is_one(x) and len(args) > 1 else None)  # torch.sub(1, p)
        if p is not None:
            got = self._of(p)
            out = func(*args, **kwargs)
            return self._note(out, "sigmoid", -got[1]) if got is not None and got[0] == "sigmoid" else out
        if name == "log" and not kwargs:
            got = self._of(x)
            if got is not None:
                kind, z, dim = got
                return F.logsigmoid(z) if kind == "sigmoid" else F.log_softmax(z, dim)
        return func(*args, **kwargs)


def _is_one(v: Any) -> bool:
    return isinstance(v, (int, float)) and v == 1


# the backward functions of a root at 0: d√x/dx = 1/(2√x) is inf there, and inf·0 a NaN
ROOT_BACKWARDS = frozenset({"SqrtBackward0", "PowBackward0", "PowBackward1"})


class ZeroRoots(TorchFunctionMode):
    """While open, a square root (``torch.sqrt``, ``x ** p`` and ``pow`` with 0 < p < 1) of a tensor that requires
    grad is 0 where its input is exactly 0, computed on 1 there so that its backward passes 0 in place of inf (and
    inf·0 = NaN) — Moindrot's "add a small epsilon where distances == 0.0, then zero them again" for a pairwise
    distance matrix's diagonal. Every other call runs as it was made."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        x = args[0] if args else None
        root = name == "sqrt" or (name in ("pow", "__pow__") and len(args) > 1 and isinstance(args[1], float)
                                  and 0 < args[1] < 1)
        if not root or not isinstance(x, Tensor) or not x.requires_grad or not x.is_floating_point():
            return func(*args, **kwargs)
        return _zero_at_zeros(func, args, 0, kwargs)


class UnderMode(Wrapper):
    """A model whose forward runs under a torch function mode, ``mode(*args)`` (its calls rewritten:
    :class:`DropoutKept`, :class:`_Temperature`). The model's parameters are its own (an optimizer over them trains
    it)."""

    def __init__(self, model: nn.Module, mode: Callable[..., TorchFunctionMode], *args: Any) -> None:
        super().__init__()
        self.inner = model
        self.mode, self.args = mode, args

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self.mode(*self.args):
            return self.inner(*args, **kwargs)


class NormalisedOutput(Wrapper):
    """A model whose float tensor outputs of two dimensions or more (each one of a tuple or list too) are divided by
    their norm over the last dimension, ``F.normalize(out, dim=-1)``. The model's parameters are its own (an
    optimizer over them trains it)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.inner = model

    @staticmethod
    def _unit(out: Any) -> Any:
        if isinstance(out, Tensor) and out.is_floating_point() and out.dim() >= 2:
            return F.normalize(out, dim=-1)
        if isinstance(out, (tuple, list)):
            return type(out)(NormalisedOutput._unit(o) for o in out)
        return out

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._unit(self.inner(*args, **kwargs))


class CappedBackward(Wrapper):
    """A model whose ``torch.autograd.Function`` nodes of the user's own, met at its modules' inputs, pass on no more
    gradient than they receive: a hook on each such node (:func:`gradwatch.probes.custom.custom_node`, as the watch
    finds them) scales what its backward returns down to the norm of what it received wherever it is larger — a
    gradient-reversal layer at λ = 100 becomes one at λ = 1, its sign kept; a gain of 1 or less is left as it is.
    The model's parameters are its own (an optimizer over them trains it)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.inner = model
        self._capped: set[int] = set()  # the nodes hooked in this forward pass (ids: a node lives for one step)
        self._hooks = [m.register_forward_pre_hook(self._cap) for m in model.modules()]

    def _cap(self, module: nn.Module, args: tuple) -> None:
        for x in args:
            node = custom_node(x) if isinstance(x, Tensor) else None
            if node is not None and id(node) not in self._capped:
                self._capped.add(id(node))
                node.register_hook(type(self)._node_hook)

    @staticmethod
    def _node_hook(grad_inputs: tuple, grad_outputs: tuple) -> tuple | None:
        return _no_gain(grad_inputs, grad_outputs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self._capped.clear()
        return self.inner(*args, **kwargs)


def _no_gain(grad_inputs: tuple, grad_outputs: tuple) -> tuple | None:
    """A node's hook: its gradients scaled to the norm of the gradient it received where they are larger."""
    given = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grad_inputs if isinstance(g, Tensor)))
    got = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grad_outputs if isinstance(g, Tensor)))
    if not (given > got > 0) or not math.isfinite(given):
        return None
    return tuple(g * (got / given) if isinstance(g, Tensor) else g for g in grad_inputs)


class ChainedBackward(CappedBackward):
    """A model whose ``torch.autograd.Function`` nodes of the user's own, met at its modules' inputs, multiply what
    their backward returns by the gradient they received, entry by entry, wherever the shapes agree: the chain rule's
    ``grad_output *`` put back into a backward that returns the local derivative φ'(x) alone. A backward that already
    multiplies by it would be multiplied twice: this is for one measured to ignore it. The model's parameters are its
    own (an optimizer over them trains it)."""

    @staticmethod
    def _node_hook(grad_inputs: tuple, grad_outputs: tuple) -> tuple | None:
        return _chained(grad_inputs, grad_outputs)


def _chained(grad_inputs: tuple, grad_outputs: tuple) -> tuple | None:
    """A node's hook: its gradients multiplied by the one it received where the shapes agree."""
    got = next((g for g in grad_outputs if isinstance(g, Tensor)), None)
    if got is None:
        return None
    return tuple(g * got if isinstance(g, Tensor) and g.shape == got.shape else g for g in grad_inputs)


class GumbelTemperature(UnderMode):
    """A model whose ``F.gumbel_softmax`` calls run at a temperature of at least ``tau``: a call at a lower τ gets
    ``tau``, its other arguments kept. The model's parameters are its own (an optimizer over them trains it)."""

    def __init__(self, model: nn.Module, tau: float = 1.0) -> None:
        super().__init__(model, _Temperature, tau)
        self.tau = tau


def gumbel_temperature(model: nn.Module, tau: float = 1.0) -> GumbelTemperature:
    """``model`` with every Gumbel-softmax in its forward at temperature ``tau`` or above (Jang, Gu & Poole 2017:
    near τ = 1 the relaxed samples are soft and the gradient's variance moderate; they anneal τ from 1 to 0.5). For
    code of one's own, the remedy is the ``tau=`` argument itself; this wrapper reaches a ``forward`` it cannot
    edit (the doctor's trials)."""
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not tau > 0:
        raise ValueError(bad_argument("gumbel_temperature", "tau", "a positive number", tau))
    return GumbelTemperature(model, float(tau))


ATTENTION = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.MultiheadAttention)


def sinusoids(length: int, width: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Vaswani et al. 2017's positional encoding, (length, width): sin(p/10000^(2i/d)) in the even columns,
    cos in the odd."""
    pos = torch.arange(length, dtype=torch.float64, device=device)[:, None]
    rate = torch.exp(-math.log(10000.0) * torch.arange(0, width, 2, dtype=torch.float64, device=device) / width)
    out = torch.zeros(length, width, dtype=torch.float64, device=device)
    out[:, 0::2] = torch.sin(pos * rate)
    out[:, 1::2] = torch.cos(pos * rate)[:, : width // 2]
    return out.to(dtype)


class Positioned(nn.Module):
    """An embedding whose output has each token's sinusoidal position added (Vaswani et al. 2017, §3.5), along
    dimension 1 (``batch_first``) or 0. The embedding's parameters are its own: an optimizer over them still holds
    them."""

    def __init__(self, embedding: nn.Module, batch_first: bool) -> None:
        super().__init__()
        self.embedding = embedding
        self.batch_first = batch_first

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        out = self.embedding(*args, **kwargs)
        length = out.shape[1] if self.batch_first else out.shape[0]
        pe = sinusoids(length, out.shape[-1], out.device, out.dtype)
        return out + (pe if self.batch_first else pe[:, None, :])


def add_positions(model: nn.Module, inplace: bool = False) -> nn.Module:
    """``model`` with its first ``nn.Embedding`` giving each token's sinusoidal position too (:class:`Positioned`): a
    Transformer that had no positional encoding sees its tokens' order (Vaswani et al. 2017, §3.5). The sequence
    dimension is that of the model's first attention layer (``batch_first``). Raises ValueError for a model without
    an ``nn.Embedding`` or without torch's attention layers."""
    model = _target(model, inplace)
    attention = next((m for m in model.modules() if isinstance(m, ATTENTION)), None)
    if attention is None or not any(isinstance(m, nn.Embedding) for m in model.modules()):
        raise ValueError(bad_argument("add_positions", "model",
                                      "a model with an nn.Embedding and torch's attention layers", type(model).__name__))
    batch_first = bool(getattr(attention, "batch_first", getattr(getattr(attention, "self_attn", None),
                                                                  "batch_first", False)))
    done: list[nn.Module] = []

    def wrap(m: nn.Module) -> nn.Module | None:
        if isinstance(m, nn.Embedding) and not done:
            done.append(m)
            return Positioned(m, batch_first)
        return None

    replace_modules(model, wrap)
    return model


def _replace_children(parent: nn.Sequential, modules: list[nn.Module]) -> None:
    for key in list(parent._modules):
        del parent._modules[key]
    for i, mod in enumerate(modules):
        parent.add_module(str(i), mod)


def add_norm(model: nn.Module, inplace: bool = False, example: Any = None) -> nn.Module:
    """Insert LayerNorm (after a Linear) or BatchNorm (after a Conv) before every activation of each ``nn.Sequential``
    but the output one (:func:`output_activations`; ``example``: an input batch, to find it by a forward pass).
    Where the model has no such group, a norm goes after every layer that its ``forward`` calls itself
    (:func:`loose_layers`: held by the model, a block of the user's, an ``nn.ModuleList`` or ``nn.ModuleDict``;
    activations that may be functions) but the output layer.

    BatchNorm: Ioffe & Szegedy (2015); LayerNorm: Ba, Kiros & Hinton (2016).
    Both keep each layer's pre-activations at unit scale, out of the flat tails.
    The output's are the net's answer, not a hidden layer's: normalised, a
    single output unit would be a constant.
    """
    from gradwatch.probes.activations import activation_spec

    m = _target(model, inplace)
    keep = output_activations(m, example)
    inserted = False
    for parent in [x for x in m.modules() if isinstance(x, nn.Sequential)]:
        items = list(parent)
        new: list[nn.Module] = []
        for mod in items:
            if activation_spec(mod) is not None and new and id(mod) not in keep:
                norm = _norm_after(new[-1])
                if norm is not None:
                    new.append(norm)
            new.append(mod)
        if len(new) != len(items):
            _replace_children(parent, new)
            inserted = True
    if not inserted:  # a forward that calls its layers itself, activations as functions: a norm after each layer
        for holder, name, layer in loose_layers(m, example):
            norm = _norm_after(layer)
            if norm is not None:
                setattr(holder, name, nn.Sequential(layer, norm))
    return m


def _norm_after(layer: nn.Module) -> nn.Module | None:
    """The normalisation for a layer's output: LayerNorm after a Linear, BatchNorm after a convolution."""
    if isinstance(layer, nn.Linear):
        return nn.LayerNorm(layer.out_features)
    if isinstance(layer, nn.Conv3d):
        return nn.BatchNorm3d(layer.out_channels)
    if isinstance(layer, nn.Conv2d):
        return nn.BatchNorm2d(layer.out_channels)
    if isinstance(layer, nn.Conv1d):
        return nn.BatchNorm1d(layer.out_channels)
    return None
