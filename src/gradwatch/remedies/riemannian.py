"""Riemannian optimizers that keep weight matrices on the Stiefel manifold (orthonormal columns).

The alternative to :func:`gradwatch.remedies.orthogonal_recurrent`'s
parametrisation: the weight itself stays orthogonal, and each step

1. projects the Euclidean gradient G onto the tangent space at W,
   ξ = G − W·sym(WᵀG), sym(A) = (A + Aᵀ)/2 (the Stiefel manifold with the
   Euclidean metric; Edelman, Arias & Smith 1998, eq. 2.4 for n = p;
   Absil, Mahony & Sepulchre 2008, §3.6.1);
2. steps along −ξ;
3. retracts onto the manifold: by the Q factor of W − lr·ξ with a positive
   diagonal in R (Absil et al. 2008, eq. 4.8), or by the Cayley transform
   (Wen & Yin 2013; in the form of Li, Fuxin & Todorovic 2020, eq. 5).

Momentum (and Adam's first moment) is carried to the new point by projecting
it onto the new tangent space: the vector transport by projection (Absil et
al. 2008, §8.1.3), as geoopt's ``EuclideanStiefel`` does.

A matrix with more columns than rows is kept with orthonormal *rows* (its
transpose is on the manifold). Parameter groups with ``stiefel=False`` take
plain Euclidean steps (SGD with momentum, or Adam), so one optimizer can
drive a whole model::

    groups = recurrent_groups(model)       # weight_hh_* on the manifold, the rest Euclidean
    opt = RiemannianAdam(groups, lr=3e-3)
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from gradwatch._errors import bad_argument

Retraction = Callable[[Tensor, Tensor], Tensor]  # (W (n, p) on the manifold, tangent step ξ (n, p)) -> W' (n, p)
ON_MANIFOLD_ATOL = 1e-3  # max |WᵀW − I| accepted at construction: float32 orthogonal_ gives ~1e-6


def sym(a: Tensor) -> Tensor:
    """The symmetric part (A + Aᵀ) / 2 of a square matrix."""
    return (a + a.transpose(-1, -2)) / 2


def tangent(w: Tensor, g: Tensor) -> Tensor:
    """The projection of a Euclidean gradient ``g`` onto the Stiefel tangent space at ``w``: G − W·sym(WᵀG)."""
    return g - w @ sym(w.transpose(-1, -2) @ g)


def qr_retraction(w: Tensor, xi: Tensor) -> Tensor:
    """qf(W + ξ): the Q factor of W + ξ, signs chosen so that R has a positive diagonal (unique, hence smooth)."""
    q, r = torch.linalg.qr(w + xi)
    sign = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return q * sign.unsqueeze(-2)


def cayley_retraction(w: Tensor, xi: Tensor) -> Tensor:
    """The Cayley retraction (I − A/2)⁻¹(I + A/2)·W with A = Ŵ − Ŵᵀ, Ŵ = ξWᵀ − ½W(WᵀξWᵀ) (n × n, skew).

    For a tangent ξ, A·W = ξ, so the curve's velocity at W is ξ; the Cayley
    transform of a skew matrix is orthogonal, so W' stays on the manifold. The
    n × n solve runs in float64: over thousands of steps a float32 solve lets
    ‖WᵀW − I‖ drift by its rounding each step, where QR starts afresh.
    """
    w64, xi64 = w.double(), xi.double()
    w_hat = xi64 @ w64.T - 0.5 * w64 @ (w64.T @ xi64 @ w64.T)  # (n, n)
    a = w_hat - w_hat.T
    eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    return torch.linalg.solve(eye - a / 2, (eye + a / 2) @ w64).to(w.dtype)


RETRACTIONS: dict[str, Retraction] = {"qr": qr_retraction, "cayley": cayley_retraction}


def recurrent_groups(module: nn.Module) -> list[dict[str, Any]]:
    """Parameter groups for a recurrent model: every ``weight_hh*`` on the manifold, every other parameter Euclidean.

    Each recurrent weight must already be orthogonal (``torch.nn.init.orthogonal_``).
    For a vanilla ``nn.RNN`` W_hh is square: the orthogonal group. For an LSTM or
    GRU the gates' blocks are stacked (4H × H): the columns of the stack are kept
    orthonormal, not each gate's block.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(bad_argument("recurrent_groups", "module", "a torch.nn.Module", module))
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    manifold = [p for n, p in named if n.rsplit(".", 1)[-1].startswith("weight_hh")]
    if not manifold:
        raise ValueError(bad_argument("recurrent_groups", "module", "a module with weight_hh_* parameters", module))
    rest = [p for n, p in named if not n.rsplit(".", 1)[-1].startswith("weight_hh")]
    return [{"params": manifold, "stiefel": True}, {"params": rest, "stiefel": False}]


def _oriented(t: Tensor) -> Tensor:
    """The view of a matrix that has at least as many rows as columns (the transpose of a wide one)."""
    return t if t.shape[0] >= t.shape[1] else t.T


class _StiefelOptimizer(torch.optim.Optimizer):
    """Shared set-up: validation of the arguments, the ``stiefel`` flag per group, the retraction."""

    _name = "RiemannianSGD"

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]) -> None:
        lr, retraction = defaults["lr"], defaults["retraction"]
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
            raise ValueError(bad_argument(self._name, "lr", "a positive number", lr))
        if retraction not in RETRACTIONS:
            raise ValueError(bad_argument(self._name, "retraction", "'qr' or 'cayley'", retraction))
        super().__init__(params, {**defaults, "stiefel": True})
        for group in self.param_groups:
            if group["stiefel"]:
                for p in group["params"]:
                    self._check_on_manifold(p)

    def _check_on_manifold(self, p: Tensor) -> None:
        if p.dim() != 2:
            raise ValueError(bad_argument(self._name, "params", "matrices (2-D) in a stiefel group",
                                          f"a tensor of shape {tuple(p.shape)}"))
        w = _oriented(p.detach())
        gap = float((w.T @ w - torch.eye(w.shape[1], dtype=w.dtype, device=w.device)).abs().max())
        if not gap <= ON_MANIFOLD_ATOL:
            raise ValueError(bad_argument(
                self._name, "params",
                "matrices with orthonormal columns or rows (initialise them with torch.nn.init.orthogonal_)",
                f"a {p.shape[0]}×{p.shape[1]} matrix with max |WᵀW − I| = {gap:.2g}"))

    def _retract(self, group: dict[str, Any], w: Tensor, xi: Tensor) -> None:
        """W ← R_W(ξ), in place (``w`` may be a transposed view of the parameter)."""
        w.copy_(RETRACTIONS[group["retraction"]](w, xi))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One step for every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            on_manifold = group["stiefel"]
            for p in group["params"]:
                if p.grad is not None:
                    w, g = (_oriented(p), _oriented(p.grad)) if on_manifold else (p, p.grad)
                    self._update(group, self.state[p], w, g, on_manifold)
        return loss

    def _update(self, group: dict[str, Any], state: dict[str, Any], w: Tensor, g: Tensor, on_manifold: bool) -> None:
        """One parameter's step; ``w`` and ``g`` are oriented tall (a wide matrix's transposes)."""
        raise NotImplementedError


class RiemannianSGD(_StiefelOptimizer):
    """SGD on the Stiefel manifold: tangent projection, step, retraction (QR or Cayley); momentum transported.

    With ``momentum`` μ the buffer follows PyTorch's SGD (b ← ξ on the first
    step, b ← μ·b + ξ after; the step is −lr·b) with ξ the Riemannian gradient,
    and after the retraction b is projected onto the new tangent space.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-2, momentum: float = 0.0,
                 retraction: str = "qr") -> None:
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
            raise ValueError(bad_argument("RiemannianSGD", "momentum", "a number in [0, 1)", momentum))
        super().__init__(params, {"lr": lr, "momentum": float(momentum), "retraction": retraction})

    def _update(self, group: dict[str, Any], state: dict[str, Any], w: Tensor, g: Tensor, on_manifold: bool) -> None:
        lr, mu = group["lr"], group["momentum"]
        d = tangent(w, g) if on_manifold else g
        if mu:
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = d.clone()
            else:
                state["momentum_buffer"].mul_(mu).add_(d)
            d = state["momentum_buffer"]
        if on_manifold:
            self._retract(group, w, -lr * d)
            if mu:
                d.copy_(tangent(w, d))  # transport by projection onto the new tangent space
        else:
            w.add_(d, alpha=-lr)


class RiemannianAdam(_StiefelOptimizer):
    """Adam on the Stiefel manifold (after Bécigneul & Ganea 2019): moments of the Riemannian gradient.

    The first moment is transported by projection after each retraction; the
    second moment is element-wise, as in geoopt's ``RiemannianAdam``. The
    element-wise scaling takes the step out of the tangent space, so it is
    projected back before the retraction (geoopt retracts it unprojected).
    Euclidean groups (``stiefel=False``) take PyTorch's Adam step (no weight decay).
    """

    _name = "RiemannianAdam"

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, retraction: str = "qr") -> None:
        if not (isinstance(betas, tuple) and len(betas) == 2 and all(0 <= b < 1 for b in betas)):
            raise ValueError(bad_argument("RiemannianAdam", "betas", "a pair of numbers in [0, 1)", betas))
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "retraction": retraction})

    def _update(self, group: dict[str, Any], state: dict[str, Any], w: Tensor, g: Tensor, on_manifold: bool) -> None:
        lr, (b1, b2), eps = group["lr"], group["betas"], group["eps"]
        rg = tangent(w, g) if on_manifold else g
        if not state:
            state.update(step=0, exp_avg=torch.zeros_like(rg), exp_avg_sq=torch.zeros_like(rg))
        state["step"] += 1
        m, v, t = state["exp_avg"], state["exp_avg_sq"], state["step"]
        m.mul_(b1).add_(rg, alpha=1 - b1)
        v.mul_(b2).addcmul_(rg, rg, value=1 - b2)
        direction = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
        if on_manifold:
            self._retract(group, w, -lr * tangent(w, direction))
            m.copy_(tangent(w, m))  # transport by projection
        else:
            w.add_(direction, alpha=-lr)
