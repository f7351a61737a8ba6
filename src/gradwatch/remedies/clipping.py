"""Optimizer-side remedies: clipping (by norm, by value, adaptive) and learning-rate changes.

Each acts on the optimizer it is given, through a step pre-hook or its param
groups, and returns a handle (``.remove()`` undoes a hook) or the optimizer.
"""

from __future__ import annotations

import torch
from torch.utils.hooks import RemovableHandle

from gradwatch._errors import bad_argument


def _params(optimizer: torch.optim.Optimizer, call: str) -> list[torch.Tensor]:
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(bad_argument(call, "optimizer", "a torch.optim.Optimizer", optimizer))
    return [p for g in optimizer.param_groups for p in g["params"]]


def _positive(call: str, arg: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(bad_argument(call, arg, "a positive number", value))
    return float(value)


def clip_grad_norm(optimizer: torch.optim.Optimizer, max_norm: float) -> RemovableHandle:
    """Clip the total gradient norm to ``max_norm`` before every ``optimizer.step()`` (Pascanu et al. 2013)."""
    params = _params(optimizer, "clip_grad_norm")
    limit = _positive("clip_grad_norm", "max_norm", max_norm)
    def clip(opt: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        torch.nn.utils.clip_grad_norm_(params, limit)

    return optimizer.register_step_pre_hook(clip)


def clip_grad_value(optimizer: torch.optim.Optimizer, clip_value: float) -> RemovableHandle:
    """Clamp every gradient entry to [−clip_value, clip_value] before every step (element-wise clipping,
    as Mikolov (2012) used for recurrent nets; ``torch.nn.utils.clip_grad_value_``)."""
    params = _params(optimizer, "clip_grad_value")
    limit = _positive("clip_grad_value", "clip_value", clip_value)
    return optimizer.register_step_pre_hook(lambda opt, a, k: torch.nn.utils.clip_grad_value_(params, limit))


@torch.no_grad()
def agc_(params: list[torch.Tensor], clipping: float = 0.01, eps: float = 1e-3) -> None:
    """Adaptive gradient clipping (Brock et al. 2021), unit-wise: ‖G_i‖ / max(‖W_i‖, ε) ≤ λ for every output unit i."""
    for p in params:
        if p.grad is None:
            continue
        dims = tuple(range(1, p.dim())) if p.dim() > 1 else None  # a unit: one row (output) of the weight
        w_norm = (p.norm(dim=dims, keepdim=True) if dims else p.abs()).clamp_min(eps)
        g_norm = p.grad.norm(dim=dims, keepdim=True) if dims else p.grad.abs()
        limit = clipping * w_norm
        scale = torch.where(g_norm > limit, limit / g_norm.clamp_min(1e-6), torch.ones_like(g_norm))
        p.grad.mul_(scale)


def adaptive_clip(optimizer: torch.optim.Optimizer, clipping: float = 0.01, eps: float = 1e-3) -> RemovableHandle:
    """AGC before every step (Brock et al. 2021, "High-performance large-scale image recognition without normalization")."""
    params = _params(optimizer, "adaptive_clip")
    lam = _positive("adaptive_clip", "clipping", clipping)
    return optimizer.register_step_pre_hook(lambda opt, a, k: agc_(params, lam, eps))


def scale_lr(optimizer: torch.optim.Optimizer, factor: float) -> torch.optim.Optimizer:
    """Multiply every param group's learning rate by ``factor`` (in place): the first remedy for divergence."""
    _params(optimizer, "scale_lr")
    f = _positive("scale_lr", "factor", factor)
    for g in optimizer.param_groups:
        g["lr"] *= f
    return optimizer


def unify_lr(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Give every param group the largest learning rate among them (a group left at a tiny rate by mistake)."""
    _params(optimizer, "unify_lr")
    top = max(g["lr"] for g in optimizer.param_groups)
    for g in optimizer.param_groups:
        g["lr"] = top
    return optimizer
