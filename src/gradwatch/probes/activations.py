"""Activation statistics: saturated and dead units, mean and spread of outputs.

One definition serves every activation: a unit is *inactive* on a sample when
the activation's derivative at its input is below ``INACTIVE_BELOW`` (2 %) of
the activation's peak derivative, because back-propagation multiplies the
gradient by that derivative and an inactive unit passes almost none through.
For tanh that is |y| > 0.99, for sigmoid y outside (0.005, 0.995), for
hardtanh an input outside its linear range, and for ReLU an input ≤ 0.

- ``saturated_frac`` (bounded units: tanh, sigmoid, hardtanh, softsign,
  hardsigmoid): the fraction of unit-samples that are inactive.
- ``dead_frac`` (ReLU-likes: ReLU, ReLU6, LeakyReLU, PReLU, ELU, CELU, SELU,
  GELU, SiLU, Softplus, Hardswish): the fraction of units inactive on *every*
  sample of the batch. A unit is one element of a sample: dimension 0 is
  taken to be the batch. A leaky unit (LeakyReLU, PReLU with a slope ≠ 0) is
  never dead: on its negative side it still passes slope × the gradient, however
  small the slope, so only a derivative of exactly 0 counts as inactive there.
- ``act_mean``, ``act_std``: mean and population standard deviation of the
  output over all its elements.
- ``deriv_rms``: root mean square of the activation's derivative at its
  inputs, the factor by which the unit scales a back-propagated gradient
  (mean-field theory uses E[φ'(h)²]).

Activations applied as functions inside a ``forward`` (``torch.tanh(x)``) are
out of reach of module hooks; :mod:`gradwatch.probes.functional` taps them and
measures each call as the module it stands for, with the functions here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor, nn

from gradwatch.probes.hostcopy import device_tensor

INACTIVE_BELOW = 0.02  # fraction of the peak derivative; tanh: |y| > 0.99

# (module, input, output) -> φ'(input); the module is Any: its settings (alpha, min_val, …) are read
Derivative = Callable[[Any, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class ActivationSpec:
    """How to differentiate one kind of activation, and which way it fails."""

    family: str  # "bounded" (saturates) or "relu" (dies)
    derivative: Derivative
    peak: float  # the largest value the derivative takes
    needs_input: bool = False  # derivative needs the input, lost when computed in place
    indicator: Callable[[Any, Tensor], Tensor] | None = None  # (module, y) -> φ' == peak, where φ' ∈ {0, peak}

    @property
    def quantity(self) -> str:
        """What its inactive fraction is recorded as: ``saturated_frac`` (bounded units) or ``dead_frac``."""
        return "saturated_frac" if self.family == "bounded" else "dead_frac"


def _inside(x: Tensor, lo: float, hi: float) -> Tensor:
    return ((x > lo) & (x < hi)).to(x.dtype)


def _gelu(m: Any, x: Tensor, y: Tensor) -> Tensor:
    if getattr(m, "approximate", "none") == "tanh":
        k = math.sqrt(2.0 / math.pi)
        t = torch.tanh(k * (x + 0.044715 * x**3))
        return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * k * (1 + 3 * 0.044715 * x * x)
    cdf = 0.5 * (1 + torch.erf(x / math.sqrt(2.0)))
    pdf = torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    return cdf + x * pdf


def _silu(m: Any, x: Tensor, y: Tensor) -> Tensor:
    s = torch.sigmoid(x)
    return s * (1 + x * (1 - s))


def _prelu(m: Any, x: Tensor, y: Tensor) -> Tensor:
    w = m.weight.detach()
    if w.numel() > 1 and x.dim() > 1:  # one slope per channel, channels on dim 1
        w = w.view(1, -1, *([1] * (x.dim() - 2)))
    return torch.where(x > 0, torch.ones_like(x), w.to(x.dtype).expand_as(x))


def _softplus(m: Any, x: Tensor, y: Tensor) -> Tensor:
    beta, threshold = m.beta, m.threshold
    return torch.where(x * beta > threshold, torch.ones_like(x), torch.sigmoid(beta * x))


def _hardswish(m: Any, x: Tensor, y: Tensor) -> Tensor:
    mid = (2 * x + 3) / 6
    return torch.where(x < -3, torch.zeros_like(x), torch.where(x > 3, torch.ones_like(x), mid))


# Derivatives are written in the output y wherever it determines them, so that
# in-place activations (whose input tensor *is* the output) are measured right.
# Those that need the input (PReLU, GELU, SiLU, Softplus, Hardswish) are listed
# in NEEDS_INPUT. Order matters: ReLU6 subclasses Hardtanh but dies like a ReLU.
_SPECS: list[tuple[type[nn.Module], str, Derivative, float | None]] = [
    (nn.Tanh, "bounded", lambda m, x, y: 1 - y * y, 1.0),
    (nn.Sigmoid, "bounded", lambda m, x, y: y * (1 - y), 0.25),
    (nn.ReLU6, "relu", lambda m, x, y: _inside(y, 0.0, 6.0), 1.0),
    (nn.Hardtanh, "bounded", lambda m, x, y: _inside(y, m.min_val, m.max_val), 1.0),
    (nn.Softsign, "bounded", lambda m, x, y: (1 - y.abs()) ** 2, 1.0),
    (nn.Hardsigmoid, "bounded", lambda m, x, y: _inside(y, 0.0, 1.0) / 6, 1 / 6),
    (nn.ReLU, "relu", lambda m, x, y: (y > 0).to(y.dtype), 1.0),
    (
        nn.LeakyReLU,
        "relu",
        lambda m, x, y: torch.where(y > 0, torch.ones_like(y), torch.full_like(y, m.negative_slope)),
        None,
    ),
    (nn.PReLU, "relu", _prelu, None),
    (nn.ELU, "relu", lambda m, x, y: torch.where(y > 0, torch.ones_like(y), y + m.alpha), None),
    (nn.CELU, "relu", lambda m, x, y: torch.where(y > 0, torch.ones_like(y), y / m.alpha + 1), 1.0),
    (
        nn.SELU,
        "relu",
        lambda m, x, y: torch.where(y > 0, torch.full_like(y, 1.0507009873554805), y + 1.7580993408473766),
        1.7580993408473766,
    ),
    (nn.GELU, "relu", _gelu, None),
    (nn.SiLU, "relu", _silu, None),
    (nn.Softplus, "relu", _softplus, 1.0),
    (nn.Hardswish, "relu", _hardswish, 1.5),
]


NEEDS_INPUT = (nn.PReLU, nn.GELU, nn.SiLU, nn.Softplus, nn.Hardswish)
# Piecewise-linear units with a slope on the negative side: inactive only where that slope is 0 (never dead).
LEAKY = (nn.LeakyReLU, nn.PReLU)

# Piecewise-linear units whose derivative is 0 or its peak: one boolean mask of
# the output gives every statistic, a fast path for the common ReLU.
def _relu_active(m: Any, y: Tensor) -> Tensor:
    return y > 0


_INDICATORS: list[tuple[type[nn.Module], Callable[[Any, Tensor], Tensor]]] = [
    (nn.ReLU6, lambda m, y: (y > 0) & (y < 6)),
    (nn.Hardtanh, lambda m, y: (y > m.min_val) & (y < m.max_val)),
    (nn.Hardsigmoid, lambda m, y: (y > 0) & (y < 1)),
    (nn.ReLU, _relu_active),
]


def _numeric_peak(module: Any, derivative: Derivative) -> float:
    """Largest derivative on a fine grid; for activations whose peak depends on settings."""
    if isinstance(module, nn.PReLU):  # slopes 1 and a (per channel, as initialised)
        return max(1.0, float(module.weight.detach().abs().max()))
    x = torch.linspace(-20, 20, 40001)
    with torch.no_grad():
        y = module(x.clone())
        return float(derivative(module, x, y).abs().max())


def peak_derivative(module_name: str) -> float:
    """The largest derivative of an activation class, by its class name (tanh 1, sigmoid 1/4); 1 for one whose
    peak depends on its settings (LeakyReLU, PReLU, ELU, …) or that is not measured here."""
    return next((peak for cls, _, _, peak in _SPECS if cls.__name__ == module_name and peak is not None), 1.0)


def activation_spec(module: nn.Module) -> ActivationSpec | None:
    """The spec for an activation module, or None if it is not one we measure."""
    for cls, family, derivative, peak in _SPECS:
        if isinstance(module, cls):
            if peak is None:
                peak = _numeric_peak(module, derivative)
            indicator = next((f for c, f in _INDICATORS if isinstance(module, c)), None)
            return ActivationSpec(family, derivative, peak, isinstance(module, NEEDS_INPUT), indicator)
    return None


def first_tensor(args: tuple) -> Tensor | None:
    for a in args:
        if isinstance(a, Tensor) and a.is_floating_point():
            return a
    return None


_HALF = (torch.float16, torch.bfloat16)


def _moments(rows: Tensor) -> tuple[Tensor, Tensor]:
    """(mean, population variance) of each row of ``rows`` (n, m), accumulated in at least float32, without a
    float32 copy.

    Half precision, and every dtype on the CPU: two plain reductions, mean and ‖y‖² (var = E[y²] − mean²);
    on the CPU they run ~10× faster than the Welford ``var_mean`` (measured: 2 ms against 23 ms for 8 M
    floats on 2 cores). Float32/64 on an accelerator: ``var_mean``, one pass.
    """
    if rows.dtype not in _HALF and rows.device.type != "cpu":
        var, mean = torch.var_mean(rows, dim=1, correction=0)
        return mean, var
    acc = torch.float32 if rows.dtype in _HALF else None
    mean = rows.mean(dim=1, dtype=acc)
    meansq = torch.linalg.vector_norm(rows, dim=1, dtype=acc).square() / rows.shape[1]
    return mean, (meansq - mean * mean).clamp_min(0)


class CallStats(NamedTuple):
    """Statistics of one call of an activation module (0-dim tensors), or of n stacked calls ((n,) each)."""

    mean: Tensor
    var: Tensor  # population variance
    inactive: Tensor  # saturated fraction (bounded units) or dead fraction (ReLU-likes); NaN where unknown
    deriv_ms: Tensor  # E[φ'(x)²]; NaN where unknown


@torch.no_grad()
def call_stats(spec: ActivationSpec, module: Any, x: Tensor, y: Tensor) -> CallStats:
    """Statistics of one call, on the device.

    The inactive fraction is the saturated fraction for bounded units and the
    dead fraction for ReLU-likes; NaN where the derivative cannot be known.
    Under autocast the activation is read as it is (bfloat16 or float16), with
    float32 accumulation: no float32 copy of the activation is made.
    """
    return CallStats(*(t[0] for t in stacked_stats(spec, module, x.detach()[None], y.detach()[None])))


@torch.no_grad()
def stacked_stats(spec: ActivationSpec, module: Any, x: Tensor, y: Tensor) -> CallStats:
    """:func:`call_stats` of n calls of modules of one kind and setting at once: ``x`` and ``y`` are the calls'
    inputs and outputs stacked, (n, *shape); every field is (n,). Elementwise derivatives only (not PReLU's
    per-channel slopes, unless n = 1)."""
    n = y.shape[0]
    rows = y.reshape(n, -1)
    mean, var = _moments(rows)
    if spec.needs_input and getattr(module, "inplace", False):  # the input is gone, so is the derivative
        nan = torch.full_like(mean, float("nan"))
        return CallStats(mean, var, nan, nan)
    if spec.indicator is _relu_active:  # y ≥ 0: active where y ≠ 0; a unit lives if its batch max is > 0
        on = torch.count_nonzero(rows, dim=1).to(mean.dtype) / rows.shape[1]
        frac = 1 - (_per_unit(y).amax(dim=1) > 0).to(mean.dtype).mean(dim=1)
        return CallStats(mean, var, frac, on * spec.peak**2)
    if spec.indicator is not None:
        active = spec.indicator(module, y)
        on = active.reshape(n, -1).sum(dim=1).to(mean.dtype) / rows.shape[1]  # unit-samples with φ' = peak
        if spec.family == "bounded":
            frac = 1 - on
        else:
            frac = 1 - _per_unit(active).any(dim=1).to(mean.dtype).mean(dim=1)
        return CallStats(mean, var, frac, on * spec.peak**2)
    d = spec.derivative(module, x[0], y[0])[None] if n == 1 else spec.derivative(module, x, y)
    inactive = d == 0 if isinstance(module, LEAKY) else d.abs() < INACTIVE_BELOW * spec.peak
    if spec.family == "bounded":
        frac = inactive.reshape(n, -1).to(mean.dtype).mean(dim=1)
    else:
        frac = _per_unit(inactive).all(dim=1).to(mean.dtype).mean(dim=1)
    return CallStats(mean, var, frac, _mean_square(d.reshape(n, -1)).to(mean.dtype))


def _mean_square(rows: Tensor) -> Tensor:
    """E[t²] of each row of (n, m), accumulated in at least float32, without a float32 copy."""
    acc = torch.float32 if rows.dtype in _HALF else None
    return torch.linalg.vector_norm(rows, dim=1, dtype=acc).square() / rows.shape[1]


def _per_unit(stacked: Tensor) -> Tensor:
    """(n, batch, units) of n stacked calls: each call's dimension 0 is the batch, every other element a unit."""
    n = stacked.shape[0]
    return stacked.reshape(n, stacked.shape[1], -1) if stacked.dim() > 2 else stacked.reshape(n, 1, -1)


class Pooled(NamedTuple):
    """Each module's calls of one step pooled: vectors over ``modules``."""

    modules: list[int]
    mean: Tensor
    std: Tensor  # population standard deviation over every element of every call
    inactive: Tensor
    deriv_rms: Tensor  # √E[φ'²]


def pool(calls: dict[int, list[tuple[float, CallStats]]]) -> Pooled:
    """Pool each module's calls in one step, all modules at once.

    ``calls[module] = [(element count, call_stats), …]``; the result is
    pooled over every element of every call (Chan et al.'s parallel variance).
    """
    rows = [(i, n, t) for i in sorted(calls) for n, t in calls[i]]
    s = torch.stack([torch.stack(tuple(t)) for _, _, t in rows])  # (total calls, 4): CallStats' fields
    return pool_rows([i for i, _, _ in rows], [n for _, n, _ in rows], s)


def pool_rows(modules: list[int], counts: list[float], s: Tensor) -> Pooled:
    """:func:`pool` of calls given as rows: row k of ``s`` (calls, 4) holds :class:`CallStats`' fields of a call of
    module ``modules[k]`` over ``counts[k]`` elements, in any order."""
    idx = sorted(set(modules))
    if modules != idx:  # a module called more than once, or rows out of module order: weighted sums per module
        totals = dict.fromkeys(idx, 0.0)
        for i, n in zip(modules, counts):
            totals[i] += n
        w = device_tensor([n / totals[i] for i, n in zip(modules, counts)], s.dtype, s.device)
        seg = device_tensor([idx.index(i) for i in modules], torch.long, s.device)

        def pooled(v: Tensor) -> Tensor:
            return torch.zeros(len(idx), dtype=s.dtype, device=s.device).index_add_(0, seg, w * v)

        mean = pooled(s[:, 0])
        s = torch.stack([mean, pooled(s[:, 1] + (s[:, 0] - mean[seg]) ** 2), pooled(s[:, 2]), pooled(s[:, 3])], 1)
    return Pooled(idx, s[:, 0], s[:, 1].clamp_min(0).sqrt(), s[:, 2], s[:, 3].sqrt())


@torch.no_grad()
def relu_sums(y: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A ReLU call's raw sums, 0-dim tensors accumulated in at least float32: (Σy, ‖y‖₂, elements > 0, units > 0
    on some sample of the batch); :func:`relu_stats` turns the rows of many calls into :class:`CallStats` at once.

    Four reductions over the output as it lies (any strides, no copy, no elementwise pass on a CUDA device), where
    :func:`call_stats` launches ~17 kernels: a hooked ReLU of ResNet-50 on a GPU is bound by the host's launches.
    The counts are ord-0 norms on a CUDA device; on the CPU, whose ord-0 norm and ``count_nonzero`` take ~5 ns an
    element (20 ms for 4 M floats on one core), the sum of ``sign(y)``, which is 0 or 1 since y ≥ 0 (1.2 ms).
    A non-finite output gives non-finite sums: statistics unknown, as NaN.
    """
    acc = torch.float32 if y.dtype in _HALF else None
    units = y.amax(dim=0) if y.dim() > 1 else y  # dimension 0 is the batch: a unit lives if its batch max is > 0
    if y.device.type == "cpu":
        on, live = torch.sign(y).sum(dtype=acc), torch.sign(units).sum(dtype=acc)
    else:
        on = torch.linalg.vector_norm(y, ord=0, dtype=acc)
        live = torch.linalg.vector_norm(units, ord=0, dtype=acc)
    return y.sum(dtype=acc), torch.linalg.vector_norm(y, dtype=acc), on, live


def relu_stats(sums: Tensor, count: Tensor, units: Tensor) -> CallStats:
    """:class:`CallStats` (each (k,)) of k ReLU calls from their :func:`relu_sums` stacked, (k, 4), and their
    element and unit counts, (k,) each. ReLU's derivative is 0 or 1, so E[φ'²] is the active fraction."""
    mean = sums[:, 0] / count
    var = (sums[:, 1].square() / count - mean * mean).clamp_min(0)
    on = sums[:, 2] / count
    return CallStats(mean, var, 1 - sums[:, 3] / units, on)


def combine(calls: dict[int, list[tuple[float, CallStats]]]) -> tuple[list[int], Tensor]:
    """:func:`pool` as (module indices, rows of (mean, std, inactive fraction, rms φ'))."""
    p = pool(calls)
    return p.modules, torch.stack([p.mean, p.std, p.inactive, p.deriv_rms], 1)


@dataclass
class Call:
    """One measured call of an activation module in a sampled step."""

    count: float  # elements of the output
    stats: CallStats | None  # None until a deferred call is measured, at the step's end, or for a ReLU's raw sums
    # Whether the call counts: one whose output takes part in autograd counts only once a backward that fills
    # .grad reaches it (a validation pass without no_grad never does); one whose output cannot be
    # differentiated counts as it is.
    reached: bool
    sums: tuple[Tensor, ...] | None = None  # a large ReLU call's relu_sums, turned into statistics at the step's end
    units: float = 0.0  # elements of one sample (the units), with ``sums``


DEFER_BELOW = 1 << 16  # elements: a smaller call is copied now and measured at the step's end, stacked with its kind


@dataclass
class ActivationProbe:
    """Activation statistics of one step: each call measured, pooled per module, handed back by name.

    A large call is measured as it runs: a ReLU's as four raw sums (:func:`relu_sums`), every ReLU call's arithmetic
    done once at the step's end, and any other kind's statistics in full. A small one (fewer than ``DEFER_BELOW``
    elements) is copied as it runs (its output, and its input where the derivative needs it) and measured at the
    step's end, stacked with the other calls of modules of the same kind, setting and shape, that a backward
    reached: on the CPU each reduction is a call of its own, so a 20-layer MLP's 19 tanh calls cost ~20 calls
    instead of ~400.
    """

    specs: list[ActivationSpec]  # one per watched activation module, by index
    device: torch.device  # where the statistics gather before the step's one host copy
    _calls: dict[int, list[Call]] = field(default_factory=dict)
    # (module class, its settings, shape, dtype, device) -> [(call, module index, module, input copy, output copy)]
    _deferred: dict[tuple, list[tuple[Call, int, nn.Module, Tensor | None, Tensor]]] = field(default_factory=dict)

    def measure(self, i: int, module: nn.Module, args: tuple, output: Any) -> Call | None:
        """Measure a call of activation module ``i`` (or copy it for the step's end); None where there is nothing
        to measure."""
        x = first_tensor(args)
        if x is None or not isinstance(output, Tensor) or not output.is_floating_point() or output.numel() == 0:
            return None
        spec = self.specs[i]
        call = Call(float(output.numel()), None, reached=not output.requires_grad)
        needs_x = spec.needs_input and not getattr(module, "inplace", False)  # (in place: the input is gone)
        if (output.numel() < DEFER_BELOW and not isinstance(module, nn.PReLU)  # PReLU: each module's own slopes
                and (not needs_x or x.shape == output.shape)):
            key = (type(module), module.extra_repr(), tuple(output.shape), output.dtype, output.device)
            self._deferred.setdefault(key, []).append(
                (call, i, module, x.detach().clone() if needs_x else None, output.detach().clone()))
        elif spec.indicator is _relu_active:
            call.sums = relu_sums(output.detach())
            call.units = call.count / output.shape[0] if output.dim() > 1 else call.count
        else:
            call.stats = call_stats(spec, module, x, output)
        self._calls.setdefault(i, []).append(call)
        return call

    def _measure_deferred(self) -> None:
        """Measure the deferred calls that count, stacked by kind, setting and shape."""
        deferred, self._deferred = self._deferred, {}
        for items in deferred.values():
            items = [it for it in items if it[0].reached]
            if not items:
                continue
            _, i, module, x0, _ = items[0]
            y = torch.stack([it[4] for it in items])
            x = torch.stack([it[3] for it in items if it[3] is not None]) if x0 is not None else y
            stats = stacked_stats(self.specs[i], module, x, y)
            for k, it in enumerate(items):
                it[0].stats = CallStats(*(f[k] for f in stats))

    def _rows(self, calls: dict[int, list[Call]]) -> tuple[list[int], list[float], Tensor] | None:
        """The step's calls that count as rows for :func:`pool_rows`: (module of each row, its element count,
        (rows, 4) of :class:`CallStats`' fields on the probe's device), the measured calls first, then the ReLUs'."""
        done = [(i, c) for i, cs in calls.items() for c in cs if c.reached and c.stats is not None]
        raw = [(i, c) for i, cs in calls.items() for c in cs if c.reached and c.sums is not None]
        blocks = []
        if done:
            blocks.append(self._gather([t for _, c in done for t in c.stats]))  # type: ignore[union-attr]
        if raw:
            sums = self._gather([t for _, c in raw for t in c.sums])  # type: ignore[union-attr]
            count = device_tensor([c.count for _, c in raw], sums.dtype, sums.device)
            units = device_tensor([c.units for _, c in raw], sums.dtype, sums.device)
            blocks.append(torch.stack(tuple(relu_stats(sums, count, units)), 1))
        if not blocks:
            return None
        rows = done + raw
        return [i for i, _ in rows], [c.count for _, c in rows], torch.cat(blocks) if len(blocks) > 1 else blocks[0]

    def _gather(self, fields: list[Tensor]) -> Tensor:
        """0-dim tensors, four per call, as (calls, 4) on the probe's device (a model split over devices has some on
        others), in one stack: the widest dtype among them."""
        return torch.stack([t if t.device == self.device else t.to(self.device) for t in fields]).view(-1, 4)

    def take(self) -> list[tuple[str, list[int], Tensor]]:
        """The step's pooled statistics as (quantity, module indices, values); forgets the calls."""
        self._measure_deferred()
        calls, self._calls = self._calls, {}
        rows = self._rows(calls)
        if rows is None:
            return []
        p = pool_rows(*rows)
        out = [("act_mean", p.modules, p.mean), ("act_std", p.modules, p.std)]
        for quantity in ("saturated_frac", "dead_frac"):
            picked = [k for k, i in enumerate(p.modules) if self.specs[i].quantity == quantity]
            if picked:
                at = device_tensor(picked, torch.long, p.inactive.device)
                out.append((quantity, [p.modules[k] for k in picked], p.inactive.index_select(0, at)))
        out.append(("deriv_rms", p.modules, p.deriv_rms))
        return out

    def clear(self) -> None:
        self._calls, self._deferred = {}, {}
