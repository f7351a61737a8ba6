"""A normalisation of the user's own: does its backward differentiate what its forward computes?

A layer written by hand as ``(x - mean) / sqrt(var + eps) * weight + bias``
is a function that does not change when its input is shifted or scaled
within each group it normalises over (a batch-norm channel, a layer-norm
row). Its input gradient is then orthogonal to those directions, per group:
Σ g = 0 and Σ g·(x − mean) = 0. Where the mean or the variance is computed
outside the graph (``.detach()``, ``torch.no_grad()``, ``.data``, ``.item()``),
the backward treats them as constants, and the gradient keeps a part along
those directions that the forward cannot feel: the layers before the
normalisation follow it and grow their weights and biases, which changes
nothing the loss sees (Ioffe & Szegedy 2015, §2: "the model blows up").
Round 42: a 3-conv net on digits with such a hand-written batch norm, 0.53–0.66
held out against 0.95–0.97 with its statistics in the graph, its first conv's
bias ×4, and "the gradients look healthy".

:func:`norm_check` finds such a layer once, on a training pass, from the
layer alone: a leaf module of the user's own (no children, parameters of at
most one dimension: an affine scale and shift) called on one tensor. It
runs the module's ``forward`` again on copies of the input — shifted, then
scaled, by amounts constant within each candidate grouping, from the finest
(each row of the last dimension) to the whole tensor — and keeps the finest
grouping under which the output does not move. Where one holds, a backward of
the module's own on a copy of the input (scaled up where the forward ignores a
scale, so that the ε in √(σ² + ε) weighs nothing), against a fixed pattern as
the output's gradient, says which share of the input gradient lies along the
directions the forward ignores: ~1e-6 for a normalisation whose statistics
are in the graph (float rounding), 0.5–1 where they are not (the pattern is
the output itself, plus 1, plus a fixed pattern: along both directions). The
check runs on the input's first samples, up to about 65k entries.

None of this touches the user's graph, ``.grad`` or random stream: the
re-runs are on detached copies, under a forked random state, and what the
module's forward rebinds or writes in place (a running mean) is put back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

SHIFT = 0.6  # the shifts tried, in units of the input's standard deviation (× a factor per group, 0.5–1.5)
SCALE = 1.7  # the scales tried (× a factor per group, 0.75–1.25)
INVARIANT_TO = 1e-3  # the output moved by at most this share of its size: the forward ignores that direction
STRAY_FROM = 0.01  # a share of the input gradient along what the forward ignores from which the backward is wrong
# (measured on round 42b's batch norms by hand, seeds 0–2: 5e-7–9e-7 with their statistics in the graph, 0.98 with
# them detached)
CHECK_SPREAD = 30.0  # the input's standard deviation for the backward's check, where the forward ignores a scale
CHECKED_ENTRIES = 2 ** 16  # the input's first samples up to about this many entries are what the check runs on


@dataclass(frozen=True)
class NormCheck:
    """What :func:`norm_check` found of one layer."""

    group: str  # the grouping the layer normalises over: row, instance, channel, sample or all
    shift: bool  # its output ignores a shift of its input within each group
    scale: bool  # ... and a scale of it
    stray: float  # the share of its input gradient (a norm's ratio) along the directions its forward ignores

    def as_meta(self) -> dict[str, Any]:
        return {"group": self.group, "shift": self.shift, "scale": self.scale, "stray": self.stray}


def reduced_dims(group: str, ndim: int) -> tuple[int, ...] | None:
    """The dimensions a grouping reduces over for an input of ``ndim`` dimensions (batch first); None where it does
    not apply."""
    if group == "all":
        return tuple(range(ndim))
    if ndim < 2:
        return None
    return {"row": (ndim - 1,), "instance": tuple(range(2, ndim)) if ndim >= 3 else None,
            "channel": (0, *range(2, ndim)), "sample": tuple(range(1, ndim))}[group]


GROUPS = ("row", "instance", "channel", "sample")  # finest first; "all" is tried before them, to turn most away


def group_elements(module: nn.GroupNorm, x: Any) -> int | None:
    """How many values each group of a ``nn.GroupNorm`` normalises over on input ``x`` (N, C, *): C/G times the
    spatial size. 1 makes x − mean(x) exactly 0: the output is the bias β whatever the input (round 43:
    ``GroupNorm(C, C)`` in a CNN's last block, on 1×1 maps; pytorch/pytorch#94288). None for an input it cannot
    take."""
    if not isinstance(x, Tensor) or x.dim() < 2 or x.shape[1] != module.num_channels or not module.num_groups:
        return None
    n = module.num_channels // module.num_groups
    for d in x.shape[2:]:
        n *= int(d)
    return n


def candidate(module: nn.Module, args: tuple) -> bool:
    """A leaf module of the user's own, with parameters of at most one dimension, called on one float tensor."""
    if (type(module).__module__ or "").startswith("torch.") or next(module.children(), None) is not None:
        return False
    params = list(module.parameters(recurse=False))
    if any(p.dim() > 1 or type(p).__name__ == "DTensor" for p in params):
        return False
    return (len(args) == 1 and isinstance(args[0], Tensor) and args[0].is_floating_point()
            and args[0].dim() >= 2 and args[0].numel() >= 16)


def _pattern(shape: torch.Size, n: int, device: torch.device, dtype: torch.dtype, lo: float, hi: float,
             salt: float) -> Tensor:
    """A fixed value in [lo, hi] for each group (shape: 1 along the reduced dimensions), from no random stream."""
    k = torch.arange(n, device=device, dtype=torch.float64)
    u = (torch.sin(k * 12.9898 + salt) * 43758.5453).frac().abs()
    return (lo + (hi - lo) * u).to(dtype).reshape(shape)


def _moved(f: Any, x: Tensor, y: Tensor, changed: Tensor) -> bool:
    """Whether the module's output on ``changed`` differs from ``y`` by more than :data:`INVARIANT_TO` of its size."""
    y2 = f(changed)
    if not isinstance(y2, Tensor) or y2.shape != y.shape:
        return True
    size = float(y.double().norm())
    return not (size > 0 and float((y2.double() - y.double()).norm()) <= INVARIANT_TO * size)


def _invariances(f: Any, x: Tensor, y: Tensor, group: str) -> tuple[bool, bool]:
    dims = reduced_dims(group, x.dim())
    if dims is None:
        return False, False
    shape = torch.Size(1 if d in dims else s for d, s in enumerate(x.shape))
    n = shape.numel()
    spread = float(x.double().std()) or 1.0
    shift = _pattern(shape, n, x.device, x.dtype, 0.5, 1.5, 1.0) * (SHIFT * spread)
    scale = _pattern(shape, n, x.device, x.dtype, 0.75, 1.25, 2.0) * SCALE
    return not _moved(f, x, y, x + shift), not _moved(f, x, y, x * scale)


def _stray(f: Any, x: Tensor, group: str, shift: bool, scale: bool) -> float:
    """The share of the module's input gradient along the directions its forward ignores, per group."""
    xd = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        y = f(xd)
        if not isinstance(y, Tensor) or not y.requires_grad:
            return float("nan")
        # the output's gradient: the output itself (along x's own direction), plus 1 (along the shift), plus a
        # pattern; any one does for a normalisation whose statistics are in the graph, which passes none of it on
        v = y.detach() + 1 + _pattern(y.shape, y.numel(), y.device, y.dtype, -0.5, 0.5, 3.0)
        (g,) = torch.autograd.grad(y, xd, v, allow_unused=True)
    if g is None:
        return float("nan")
    dims = reduced_dims(group, x.dim())
    g, xs = g.double(), x.detach().double()
    n = 1
    for d in dims or ():
        n *= x.shape[d]
    along = g.new_zeros(())
    if shift:
        along = along + (g.sum(dims, keepdim=True) ** 2 / n).sum()
        xs = xs - xs.mean(dims, keepdim=True)
    if scale:
        square = (xs * xs).sum(dims, keepdim=True).clamp(min=1e-30)
        along = along + ((g * xs).sum(dims, keepdim=True) ** 2 / square).sum()
    total = float((g * g).sum())
    return float((along / total).sqrt()) if total > 0 else float("nan")


class _Rerun:
    """Calls of the module's ``forward`` (not its hooks) that leave no trace: the random state forked, what the
    forward rebinds on the module or writes into its parameters and buffers put back afterwards."""

    def __init__(self, module: nn.Module, device: torch.device) -> None:
        self.module, self.device = module, device

    def __enter__(self) -> "_Rerun":
        m = self.module
        self._attrs = dict(m.__dict__)
        self._tensors = [(t, t.detach().clone()) for t in (*m.parameters(recurse=False), *m.buffers(recurse=False))]
        self._rng = torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else [])
        self._rng.__enter__()
        return self

    def __call__(self, x: Tensor) -> Any:
        return self.module.forward(x)

    def __exit__(self, *exc: Any) -> None:
        self._rng.__exit__(None, None, None)
        m = self.module
        for key in [k for k in m.__dict__ if k not in self._attrs]:
            del m.__dict__[key]
        for key, value in self._attrs.items():
            if m.__dict__.get(key) is not value:
                m.__dict__[key] = value
        with torch.no_grad():
            for t, kept in self._tensors:  # (only where changed: a write bumps a version the graph may check)
                if not torch.equal(t, kept):
                    t.copy_(kept)


def judged(module: nn.Module, args: tuple) -> NormCheck | None:
    """:func:`norm_check` of a call ``module(*args)`` where the module is a :func:`candidate` and its input float32 or
    float64, autocast off (a lower precision's rounding would pass for a stray gradient); None otherwise."""
    if not candidate(module, args) or args[0].dtype not in (torch.float32, torch.float64):
        return None
    with torch.autocast(args[0].device.type, enabled=False):
        return norm_check(module, args[0])


def norm_check(module: nn.Module, x: Tensor) -> NormCheck | None:
    """Whether ``module`` normalises ``x`` (its output ignores a shift or a scale of its input within some
    grouping), and where it does, how much of its backward's gradient strays along what the forward ignores; None
    for a module that does not normalise, or whose forward cannot be run again on ``x`` alone."""
    x = x.detach()
    x = x[:max(2, CHECKED_ENTRIES * x.shape[0] // x.numel())]  # (float rounding grows with a group's size)
    with _Rerun(module, x.device) as f:
        try:
            with torch.no_grad():
                y = f(x.clone())
                if not isinstance(y, Tensor) or not y.is_floating_point() or not bool(torch.isfinite(y).all()):
                    return None
                shift, scale = _invariances(f, x, y, "all")
                if not (shift or scale):
                    return None
                group = "all"
                for g in GROUPS:
                    s, c = _invariances(f, x, y, g)
                    if (s or not shift) and (c or not scale):
                        group = g
                        break
            # the backward is judged on the input scaled up to a spread of CHECK_SPREAD (where the forward ignores
            # a scale, what it computes is the same): the ε in √(σ² + ε) then weighs nothing, and a right backward
            # passes on float rounding only (round 42b's batch norm: 1.3e-3 on a channel of small variance, unscaled)
            spread = float(x.double().std())
            big = x * (CHECK_SPREAD / spread) if scale and spread > 0 else x
            return NormCheck(group, shift, scale, _stray(f, big, group, shift, scale))
        except Exception:  # noqa: BLE001 — a forward that wants more than x, or fails on a copy: not one to judge
            return None


__all__ = ["CHECK_SPREAD", "CHECKED_ENTRIES", "GROUPS", "INVARIANT_TO", "NormCheck", "STRAY_FROM", "candidate",
           "group_elements", "judged", "norm_check", "reduced_dims"]
