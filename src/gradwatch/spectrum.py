"""Singular values of a network's input–output Jacobian, exactly or by iteration.

For one sample x the network is a map R^n → R^m and J = ∂f/∂x is m × n.
- :func:`full_spectrum`: every singular value, from the Jacobian built by
  ``torch.func.jacrev`` (m vector–Jacobian products) or ``jacfwd`` (n
  Jacobian–vector products), whichever is fewer.
- :func:`top_singular_value`: power iteration on the smaller Gram matrix
  (J Jᵀ or Jᵀ J), applied through ``torch.func.vjp``/``jvp``; it stops when
  the estimate changes by less than ``tol`` (relative) between iterations.
- :func:`lanczos_extremes`: Lanczos with full reorthogonalisation on the
  same Gram matrix; the extreme Ritz values approximate σ_max² and σ_min²,
  each with its residual bound (Parlett, *The Symmetric Eigenvalue Problem*,
  §13.2: some eigenvalue lies within the residual of each Ritz value).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

Fn = Callable[[Tensor], Tensor]  # one sample in, the flattened output out


@torch.no_grad()
def full_spectrum(f: Fn, x: Tensor) -> Tensor:
    """All singular values of J = ∂f/∂x at x, descending (float64)."""
    m = f(x).numel()
    n = x.numel()
    jac = torch.func.jacrev(f)(x) if m <= n else torch.func.jacfwd(f)(x)
    return torch.linalg.svdvals(jac.reshape(m, n).double())


def _gram(f: Fn, x: Tensor) -> tuple[Callable[[Tensor], Tensor], int, Tensor]:
    """A matvec with the smaller of J Jᵀ (m × m) and Jᵀ J (n × n); its size; a template vector."""
    y, vjp_fn = torch.func.vjp(f, x)[:2]  # (output, vjp function)
    m, n = y.numel(), x.numel()

    def jjt(u: Tensor) -> Tensor:  # J (Jᵀ u)
        (jt_u,) = vjp_fn(u.to(y.dtype).reshape(y.shape))
        return torch.func.jvp(f, (x,), (jt_u,))[1].reshape(-1).double()

    def jtj(v: Tensor) -> Tensor:  # Jᵀ (J v)
        jv = torch.func.jvp(f, (x,), (v.to(x.dtype).reshape(x.shape),))[1]
        return vjp_fn(jv)[0].reshape(-1).double()

    return (jjt, m, y) if m <= n else (jtj, n, x)


@dataclass(frozen=True)
class Top:
    """σ_max by power iteration, with the residual bound on its error."""

    sigma_max: float
    error: float  # |σ − σ_true| ≤ error for the singular value the iteration converged to (first order)
    iterations: int


@torch.no_grad()
def top_singular_value(f: Fn, x: Tensor, tol: float = 1e-5, max_iter: int = 500, seed: int = 0) -> Top:
    """σ_max of J by power iteration on the smaller Gram matrix G.

    Stops when the residual ‖G v − λ v‖ of the Rayleigh quotient λ = vᵀ G v
    falls below ``tol`` · λ: some eigenvalue of G then lies within that
    residual of λ, so σ = √λ is within residual / (2σ) of a singular value.
    """
    mv, size, template = _gram(f, x)
    g = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn(size, generator=g, dtype=torch.float64).to(template.device)
    v /= v.norm()
    lam, resid = 0.0, math.inf
    for it in range(1, max_iter + 1):
        w = mv(v)
        lam = float(v @ w)
        resid = float((w - lam * v).norm())
        norm = float(w.norm())
        if norm == 0.0:
            return Top(0.0, 0.0, it)
        if resid <= tol * lam:
            break
        v = w / norm
    sigma = math.sqrt(max(lam, 0.0))
    return Top(sigma, resid / (2 * sigma) if sigma > 0 else math.sqrt(resid), it)


@dataclass(frozen=True)
class Extremes:
    """σ_max and σ_min by Lanczos, each with a bound on its error (in σ)."""

    sigma_max: float
    sigma_min: float
    max_error: float
    min_error: float
    iterations: int


@torch.no_grad()
def lanczos_extremes(f: Fn, x: Tensor, k: int = 64, seed: int = 0) -> Extremes:
    """Extreme singular values of J by ``k`` Lanczos steps on the smaller Gram matrix."""
    mv, size, template = _gram(f, x)
    k = min(k, size)
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(size, generator=g, dtype=torch.float64).to(template.device)
    Q = [q / q.norm()]
    alphas, betas = [], []
    beta = 0.0
    for j in range(k):
        w = mv(Q[j])
        alpha = float(w @ Q[j])
        alphas.append(alpha)
        basis = torch.stack(Q)
        w = w - basis.T @ (basis @ w)  # full reorthogonalisation, twice is enough (Kahan)
        w = w - basis.T @ (basis @ w)
        beta = float(w.norm())
        if j == k - 1 or beta < 1e-12 * max(1.0, abs(alpha)):
            break
        betas.append(beta)
        Q.append(w / beta)
    n = len(alphas)
    T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if n > 1:
        off = torch.tensor(betas[: n - 1], dtype=torch.float64)
        T += torch.diag(off, 1) + torch.diag(off, -1)
    theta, S = torch.linalg.eigh(T)
    resid = abs(beta) * S[-1].abs()  # ‖G y − θ y‖ for each Ritz pair
    lo, hi = float(theta[0].clamp_min(0)), float(theta[-1].clamp_min(0))
    s_max, s_min = math.sqrt(hi), math.sqrt(lo)
    # an eigenvalue within r of θ: the singular value within r / (2σ) (first order), or sqrt(r) near 0
    def err(s: float, r: float) -> float:
        return r / (2 * s) if s > 0 and r < s * s else math.sqrt(r)

    return Extremes(s_max, s_min, err(s_max, float(resid[-1])), err(s_min, float(resid[0])), n)


@dataclass(frozen=True)
class SpectrumSummary:
    """How far a Jacobian is from dynamical isometry (all singular values 1)."""

    mean_sq: float  # mean σ²: >1 stretches, <1 shrinks on average
    spread: float  # σ_max / σ_min
    isometry_gap: float  # root mean square of ln σ; 0 for an isometry
    sigma_max: float
    sigma_min: float


def summarize(sv: Tensor) -> SpectrumSummary:
    sv = sv.double()
    positive = sv[sv > 0]
    gap = float(torch.sqrt(torch.mean(torch.log(positive) ** 2))) if len(positive) else math.inf
    smin = float(sv.min())
    return SpectrumSummary(
        mean_sq=float((sv**2).mean()),
        spread=float(sv.max() / smin) if smin > 0 else math.inf,
        isometry_gap=gap if len(positive) == len(sv) else math.inf,
        sigma_max=float(sv.max()),
        sigma_min=smin,
    )
