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
# # 3. ReLU and He initialisation
#
# For ReLU, φ'(h) is 1 on half the units and 0 on the other half, so each
# layer multiplies the squared gradient by χ = σ_w²/2 (He et al. 2015):
# σ_w² = 2 keeps it at 1. PyTorch's default `nn.Linear` initialisation,
# U(±1/√fan_in), has σ_w² = 1/3: χ = 1/6, and ‖∂L/∂a‖ shrinks by √(1/6) ≈ 0.41
# per layer. The forward signal shrinks by the same factor. We check a
# 20-layer ReLU MLP both ways with `gw.check` and fix it with
# `gradwatch.remedies.he_init`.

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
from gradwatch.diagnosis.measures import layers_per_halving
from gradwatch.remedies import he_init

OUT = Path(os.environ.get("GRADWATCH_TUTORIAL_OUT") or tempfile.mkdtemp(prefix="gradwatch-tutorial-"))
SEED = int(os.environ.get("GRADWATCH_TUTORIAL_SEED", "0"))
torch.manual_seed(SEED)
WIDTH, DEPTH = 256, 20

layers: list[nn.Module] = []
for _ in range(DEPTH):
    layers += [nn.Linear(WIDTH, WIDTH), nn.ReLU()]
default = nn.Sequential(*layers[:-1])
he = he_init(default)  # a copy with Kaiming-normal weights (σ_w² = 2) and zero biases
x = torch.randn(512, WIDTH)

# %%
reports = {"PyTorch default": gw.check(default, x, samples=0), "He": gw.check(he, x, samples=0)}
factors = {}
for name, report in reports.items():
    grads = np.array([row.out_grad_norm for row in report.layers])
    stds = np.array([row.out_std for row in report.layers])
    k = layers_per_halving(grads)
    factors[name] = 2 ** (-1 / k) if k else 1.0  # ‖∂L/∂a‖ per layer, towards the input
    print(f"{name}: verdict {report.verdict}; gradient ×{factors[name]:.3f} per layer, first/last {grads[0] / grads[-1]:.1e}; "
          f"forward std first {stds[0]:.2f}, last {stds[-1]:.2e}")

# %%
fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
for name, report in reports.items():
    axes[0].semilogy([r.out_grad_norm for r in report.layers], "o-", label=name)
    axes[1].semilogy([r.out_std for r in report.layers], "o-", label=name)
axes[0].set_title("backward: ‖∂L/∂a‖")
axes[1].set_title("forward: std of each layer's output")
for ax in axes:
    ax.set_xlabel("layer")
    ax.legend()
fig.savefig(OUT / "03_relu_he.png", dpi=80, bbox_inches="tight")
print(f"plot: {OUT / '03_relu_he.png'}")

# %% [markdown]
# The claims: the default initialisation vanishes at √(σ_w²/2) = √(1/6) per
# layer (within 10 %), He's keeps the gradient within 10 % of ×1 per layer, and
# `gw.check` tells them apart.

# %%
assert reports["PyTorch default"].verdict == "vanishing" and reports["He"].verdict == "trainable"
assert abs(factors["PyTorch default"] - np.sqrt(1 / 6)) / np.sqrt(1 / 6) < 0.1, factors
assert abs(factors["He"] - 1.0) < 0.1, factors
he_grads = [r.out_grad_norm for r in reports["He"].layers]
assert 0.5 < he_grads[0] / he_grads[-1] < 2
