# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 2. Backpropagation through time and Pascanu's condition
#
# An RNN h_{t+1} = tanh(W_hh h_t + W_ih x_{t+1} + b) unrolled over T steps is
# a T-layer net with one shared weight. The gradient reaching step t is
# ∂L/∂h_t = (∂h_{t+1}/∂h_t)ᵀ ∂L/∂h_{t+1}, and each factor has norm at most
# ‖W_hh‖·γ, γ = max tanh' = 1. Pascanu, Mikolov & Bengio (2013): if the largest
# singular value λ₁ of W_hh is below 1/γ the gradient **must** vanish,
# at least as fast as λ₁^k over k steps; λ₁ > 1 is necessary for it to explode.
#
# We build W_hh = ρ·(orthogonal) for ρ = 0.5 and ρ = 1, let `gw.check` judge
# Pascanu's condition, and let a watch record ‖∂L/∂h_t‖ at every time step.

# %%
import os
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import nn

import gradwatch as gw

OUT = Path(os.environ.get("GRADWATCH_TUTORIAL_OUT") or tempfile.mkdtemp(prefix="gradwatch-tutorial-"))
SEED = int(os.environ.get("GRADWATCH_TUTORIAL_SEED", "0"))
T, HIDDEN = 40, 64


class LastStep(nn.Module):
    """A tanh RNN read out at its last step; inputs (T, B, 1)."""

    def __init__(self, rho: float) -> None:
        super().__init__()
        self.rnn = nn.RNN(1, HIDDEN)
        with torch.no_grad():
            nn.init.orthogonal_(self.rnn.weight_hh_l0)
            self.rnn.weight_hh_l0.mul_(rho)
        self.head = nn.Linear(HIDDEN, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[-1])


# %% [markdown]
# One watched step on random sequences: the watch re-runs the fused RNN step
# by step and records ‖∂L/∂h_t‖ (`temporal_grad_norm`) for every t.

# %%
profiles, verdicts = {}, {}
for rho in (0.5, 1.0):
    torch.manual_seed(SEED)
    model = LastStep(rho)
    x = 0.1 * torch.randn(T, 32, 1, generator=torch.Generator().manual_seed(SEED))
    y = torch.randn(32, 1, generator=torch.Generator().manual_seed(SEED + 1))
    verdicts[rho] = gw.check(model, x, samples=0).recurrent[0]
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with gw.watch(model, opt, temporal=True, store=OUT, name=f"bptt-{rho}", overwrite=True) as watch:
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    series = watch.open().temporal("rnn.l0")
    prof = series.values[:, 0]  # ‖∂L/∂h_t‖ for t = 1 … T (one training step)
    profiles[rho] = prof[~np.isnan(prof)]
    r = verdicts[rho]
    lag20 = profiles[rho][-21] / profiles[rho][-1]
    print(f"ρ = {rho}: λ₁ = {r.lambda1:.3f}, 1/γ = {1 / r.gamma:.0f} -> {r.verdict}; "
          f"‖∂L/∂h_T−20‖ / ‖∂L/∂h_T‖ = {lag20:.2e} (bound λ₁^20 = {r.lambda1 ** 20:.2e})")

# %%
fig, ax = plt.subplots(figsize=(6, 3.2))
for rho, prof in profiles.items():
    lags = np.arange(len(prof))[::-1]
    ax.semilogy(lags, prof / prof[-1], label=f"W_hh = {rho}·orthogonal")
    ax.semilogy(lags, float(verdicts[rho].lambda1) ** lags, ":", color="gray")
ax.set_xlabel("lag k (steps before the end)")
ax.set_ylabel("‖∂L/∂h_{T−k}‖ / ‖∂L/∂h_T‖")
ax.legend()
fig.savefig(OUT / "02_bptt.png", dpi=80, bbox_inches="tight")
print(f"plot: {OUT / '02_bptt.png'}")

# %% [markdown]
# The claims: with λ₁ = 0.5 `gw.check` says Pascanu's sufficient condition
# for vanishing holds, and the measured gradient obeys the bound
# ‖∂L/∂h_{T−k}‖ ≤ λ₁^k ‖∂L/∂h_T‖ at every lag; with λ₁ = 1 (orthogonal)
# the condition does not hold and the gradient 20 steps back is still more
# than 10⁴ times larger, relative to the end, than with ρ = 0.5.

# %%
half, one = profiles[0.5], profiles[1.0]
lags = np.arange(len(half))[::-1]
assert "vanish" in verdicts[0.5].verdict and "vanish" not in verdicts[1.0].verdict, verdicts
assert np.all(half / half[-1] <= 0.5**lags * (1 + 1e-4)), "Pascanu's bound is violated"
assert (one[-21] / one[-1]) > 1e4 * (half[-21] / half[-1])
