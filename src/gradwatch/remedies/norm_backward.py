"""A normalisation of the user's own whose statistics are outside the graph, given the backward it should have.

A layer that normalises its input (its output ignores a shift and a scale of
the input within each group, :mod:`gradwatch.probes.norms`) has the Jacobian
(γ/σ)·(I − 11ᵀ/n − x̂x̂ᵀ/n) per group: its input gradient is orthogonal to 1
and to x̂ there. One whose mean or variance is detached returns (γ/σ)·g_out,
or that less some part along 1 or x̂; projecting what it returns onto the
complement of those directions, group by group, gives the gradient of the
function its forward computes — exactly, up to the ε in √(σ² + ε). The
forward is left as it is.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from gradwatch.probes.norms import STRAY_FROM, judged, reduced_dims
from gradwatch.remedies.structure import Wrapper


def project(g: Tensor, x: Tensor, dims: tuple[int, ...], shift: bool, scale: bool) -> Tensor:
    """``g`` less its parts along 1 (``shift``) and along x − mean (``scale``; along x itself where the forward
    ignores a scale only) within each group reduced over ``dims``."""
    if shift:
        g = g - g.mean(dims, keepdim=True)
        x = x - x.mean(dims, keepdim=True)
    if scale:
        g = g - x * (g * x).sum(dims, keepdim=True) / (x * x).sum(dims, keepdim=True).clamp(min=1e-30)
    return g


class _Projected(torch.autograd.Function):
    """The identity forward; a backward that projects the gradient (:func:`project`)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, dims: tuple[int, ...], shift: bool, scale: bool) -> Tensor:
        ctx.save_for_backward(x)
        ctx.how = (dims, shift, scale)
        return x.clone()

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None, None, None]:
        (x,) = ctx.saved_tensors
        return project(g, x, *ctx.how), None, None, None


class _ProjectedForward:
    """A module's own ``forward`` with its input passed through :class:`_Projected` on training calls that build a
    graph: set as the module's ``forward`` attribute, so that whatever calls it (its ``__call__``, a watch re-running
    it) gets the projected backward."""

    def __init__(self, module: nn.Module, group: str, shift: bool, scale: bool) -> None:
        self.module, self.own = module, module.forward
        self.how = (group, shift, scale)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        x = args[0] if args else None
        if isinstance(x, Tensor) and x.requires_grad and torch.is_grad_enabled() and self.module.training:
            dims = reduced_dims(self.how[0], x.dim())
            if dims is not None:
                args = (_Projected.apply(x, dims, self.how[1], self.how[2]), *args[1:])
        return self.own(*args, **kwargs)


class ProjectedNormBackward(Wrapper):
    """A model whose normalisations of the user's own that pass on a gradient along what their forward ignores
    (:func:`gradwatch.probes.norms.norm_check`, a share of :data:`~gradwatch.probes.norms.STRAY_FROM` or more, judged
    at each one's first training call) get their input through :class:`_Projected`: their backward's gradient with
    those parts taken out (:class:`_ProjectedForward`). Others are left as they are. The model's parameters are its
    own (an optimizer over them trains it)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.inner = model
        self.fixed: dict[str, tuple[str, bool, bool]] = {}  # name -> (its grouping, shift, scale)
        self._hooks = {name: m.register_forward_pre_hook(self._hook(name)) for name, m in model.named_modules()
                       if not (type(m).__module__ or "").startswith("torch.")}

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple) -> None:
            if not (torch.is_grad_enabled() and module.training):
                return
            self._hooks.pop(name).remove()  # judged once, at its first training call
            found = judged(module, args)
            if found is not None and found.stray >= STRAY_FROM:
                self.fixed[name] = (found.group, found.shift, found.scale)
                module.forward = _ProjectedForward(module, *self.fixed[name])  # type: ignore[method-assign]
        return hook

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner(*args, **kwargs)


__all__ = ["ProjectedNormBackward", "project"]
