"""A ``torch.autograd.Function`` of the user's own between two layers: its backward's gain.

A binarised or spiking net calls ``SignSTE.apply(layer(x))``: a forward of
its own (a sign, a spike) and a backward of its own (a straight-through
estimator, a surrogate derivative). Neither module hooks nor the functional
tap see it (``Function.apply`` does not reach a ``TorchFunctionMode``), so a
depth finding across such a net read "no activation module is visible" and
blamed the weights (round 16: an STE that passes the gradient only where
|x| ≤ 0.01, 1–1.5 % of the units, told orthogonal init; a window of 1, as
Hubara et al. 2016, learns to 0.91–0.94 against 0.42–0.51).

The watch finds such a node where a layer's input comes from one (through
reshapes), on the passes whose layers it hooks: a node of a
:class:`torch.autograd.function.BackwardCFunction` class, whose Function is
not torch's own (``torch.utils.checkpoint`` and the like re-run layers, they
are no activation). It is named after the layer whose output it
takes, as an activation function's call is: ``l1.SignSTE()``, an activation
entity of module type ``SignSTE``, placed in the depth order before the layer
it feeds. On the steps that record ‖∂L/∂a‖ a hook on the node measures its
backward's gain √(Σ‖g_in‖² / Σ‖g_out‖²), recorded as the entity's
``deriv_rms``: for an elementwise backward g·φ'(x) that is the rms of φ'
weighted by the gradient, what an activation's ``deriv_rms`` is. Beside it,
``chain_slope`` is the slope of log|g_in| against log|g_out| over the
entries (where both are non-zero): a backward that multiplies by what it
receives, as the chain rule makes every one, g_in = g_out·φ'(x), has a slope
of about 1 whatever φ' is (a gradient reversal's −λ, a straight-through
window's 0 or 1); one that returns φ'(x) and leaves out ``grad_output *`` has
a slope of about 0 (round 41: a GELU and a swish written so). The node's
class is in the run's meta ``custom_functions``, for the diagnosis to say
whose backward it is. Nothing is computed on the forward pass; the hook reads
the gradients the backward makes anyway.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from gradwatch.probes.functional import through_shapes
from gradwatch.probes.weakhook import WeakHook


def custom_node(x: Any) -> Any:
    """The node of a user's elementwise ``autograd.Function`` that made ``x`` (seen through reshapes); None if none."""
    node = through_shapes(getattr(x, "grad_fn", None),
                          lambda n: n if isinstance(n, torch.autograd.function.BackwardCFunction) else None)
    return node if node is not None and _users(node) else None


def function_name(node: Any) -> str:
    """The class name of the Function behind a custom node (``SignSTE`` for ``SignSTEBackward``)."""
    cls = getattr(node, "_forward_cls", None)
    return getattr(cls, "__name__", None) or type(node).__name__.removesuffix("Backward")


def _users(node: Any) -> bool:
    cls = getattr(node, "_forward_cls", None)
    return not (getattr(cls, "__module__", "") or "").startswith("torch.")


CHAIN_VAR_FROM = 0.01  # log|g_out| must vary across the entries by this much (a variance, in nats²) for a slope


def _log_moments(a: Tensor, b: Tensor) -> list[Tensor]:
    """n, Σx, Σy, Σxy, Σy² of x = log|a|, y = log|b| over the entries where both are finite and non-zero (all 0
    where the shapes differ: a backward that is not entry by entry)."""
    if a.shape != b.shape:
        return [a.new_zeros(())] * 5
    a, b = a.abs(), b.abs()
    ok = (a > 0) & (b > 0) & torch.isfinite(a) & torch.isfinite(b)
    x, y = torch.where(ok, a, 1).log(), torch.where(ok, b, 1).log()
    return [ok.sum().float(), x.sum(), y.sum(), (x * y).sum(), (y * y).sum()]


class CustomBackwardProbe:
    """The custom Function nodes met at layers' inputs in one pass, and their backward's gain on armed steps."""

    def __init__(self, fills_grad: Callable[[], bool]) -> None:
        self._fills_grad = fills_grad  # whether the running backward accumulates into .grad
        # this pass's layer outputs: node id -> layer. Ids only: a dict holding autograd nodes keeps their hooks, and
        # through them the watch, alive past a dropped watch (the nodes are C++ objects the collector cannot see
        # through); within a pass the ids are the live graph's, and each pass starts a new map.
        self._outputs: dict[int, str] = {}
        self._hooked: set[int] = set()  # nodes hooked in this pass
        self.kinds: dict[str, str] = {}  # site name -> the Function's class name
        self._gain: dict[str, list[Tensor]] = {}  # site -> [Σ‖g_in‖², Σ‖g_out‖²] over this step's calls

    def new_pass(self) -> None:
        self._outputs = {}
        self._hooked = set()

    def layer_output(self, layer: str, output: Any) -> None:
        node = getattr(output, "grad_fn", None)
        if node is not None:
            self._outputs[id(node)] = layer

    def _producer(self, node: Any) -> str | None:
        """The layer whose output the custom node took (through reshapes)."""
        for n, _ in node.next_functions:
            hit = through_shapes(n, lambda m: self._outputs.get(id(m)))
            if hit is not None:
                return hit
        return None

    def layer_input(self, x: Any, armed: bool, timed: Callable[..., Any]) -> str | None:
        """A layer's input ``x``: the site's name where a custom node made it (hooked when ``armed``, its hook's
        time counted by ``timed(fn, *args)``); None where none did."""
        node = custom_node(x)
        if node is None:
            return None
        fn = function_name(node)
        producer = self._producer(node)
        name = f"{producer}.{fn}()" if producer is not None else f"{fn}()"
        self.kinds[name] = fn
        if armed and id(node) not in self._hooked:
            self._hooked.add(id(node))
            node.register_hook(WeakHook(self, "_timed_read", timed, name))
        return name

    def _timed_read(self, timed: Callable[..., Any], name: str, grad_in: tuple, grad_out: tuple) -> None:
        timed(self._read, name, grad_in, grad_out)

    def _read(self, name: str, grad_in: tuple, grad_out: tuple) -> None:
        if not self._fills_grad():
            return
        gi = next((g for g in grad_in if isinstance(g, Tensor)), None)
        go = next((g for g in grad_out if isinstance(g, Tensor)), None)
        if gi is None or go is None:
            return
        a, b = gi.detach().float(), go.detach().float()
        sums = torch.stack([a.square().sum(), b.square().sum(), *_log_moments(a, b)])
        got = self._gain.get(name)
        self._gain[name] = [sums] if got is None else [got[0] + sums]

    def take(self) -> list[tuple[str, str, Tensor]]:
        """The step's gains and chain slopes as (site, ``deriv_rms`` or ``chain_slope``, 1-element value); forgets
        them."""
        gain, self._gain = self._gain, {}
        out = []
        for name, (s,) in gain.items():
            n, sa, sb, sab, sbb = s[2:]
            var = sbb - sb * sb / n.clamp(min=1)
            cov = sab - sa * sb / n.clamp(min=1)
            slope = torch.where((n >= 2) & (var > CHAIN_VAR_FROM * n), cov / var, torch.nan)
            out += [(name, "deriv_rms", (s[0] / s[1]).sqrt().reshape(1)), (name, "chain_slope", slope.reshape(1))]
        return out

    def clear(self) -> None:
        self._outputs, self._hooked, self._gain = {}, set(), {}
