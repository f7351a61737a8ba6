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
# # 7. Gradient masking: when an attack's gradient vanishes
#
# Adversarial attacks such as PGD climb ∂L/∂x. If that gradient vanishes the
# attack stands still and the model *looks* robust. Defensive distillation
# (Papernot et al. 2016) deploys a net whose logits are huge: the softmax
# saturates, float32 rounds the true class's probability to exactly 1, and the
# cross-entropy gradient is exactly zero. The accuracy is untouched; only the
# evaluation is fooled (Carlini & Wagner 2016; Athalye et al. 2018).
#
# `gw.check_attack` measures the input gradient and runs Carlini et al.
# (2019)'s sanity checks. Here: a digits MLP, and its twin with the logits
# ×10⁴ (`gradwatch.attack_zoo`). Needs `pip install 'gradwatch[attack]'`.

# %%
import os
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

import gradwatch as gw
from gradwatch import attack_zoo

OUT = Path(os.environ.get("GRADWATCH_TUTORIAL_OUT") or tempfile.mkdtemp(prefix="gradwatch-tutorial-"))
SEED = int(os.environ.get("GRADWATCH_TUTORIAL_SEED", "0"))
EPS = 0.1  # L∞, pixels in [0, 1]

honest, masked = attack_zoo.digits(None, SEED), attack_zoo.digits("temperature", SEED)
reports = {name: gw.check_attack(s.model, s.x, s.y, eps=EPS, clip=s.clip, steps=10, seed=SEED)
           for name, s in (("honest", honest), ("masked (logits ×10⁴)", masked))}
for name, r in reports.items():
    print(f"--- {name}\n{r}\n")

# %% [markdown]
# PGD with cross-entropy reports ~96 % robust accuracy on the masked model: its
# gradient is exactly zero on almost every sample, and ε does not matter, even
# unbounded. The margin loss max_{j≠y} z_j − z_y does not saturate, and finds the
# honest twin's robust accuracy.

# %%
attacks = ["FGSM (CE)", "PGD (CE)", "PGD (margin)", "random noise"]
fig, ax = plt.subplots(figsize=(6.5, 3.2))
for i, (name, r) in enumerate(reports.items()):
    ax.bar(np.arange(len(attacks)) + 0.4 * i, [r.robust_accuracy(a) for a in attacks], 0.4, label=name)
ax.set_xticks(np.arange(len(attacks)) + 0.2, attacks)
ax.set_ylabel(f"robust accuracy at ε = {EPS}")
ax.legend()
fig.savefig(OUT / "07_masking.png", dpi=80, bbox_inches="tight")
print(f"plot: {OUT / '07_masking.png'}")

# %% [markdown]
# The claims: the honest twin raises no finding; the masked model gets one,
# "gradient masking suspected", with a saturated softmax as its cause and a
# margin loss as its first remedy; PGD + CE claims ≥ 90 % on it while the
# margin loss finds the honest twin's robust accuracy within 10 points.

# %%
h, m = reports.values()
assert not h.findings and [f.kind for f in m.findings] == ["gradient_masking"]
assert "saturated softmax" in m.findings[0].cause and m.findings[0].remedy_keys[0] == "margin_loss"
assert m.robust_accuracy("PGD (CE)") >= 0.9
assert abs(m.robust_accuracy("PGD (margin)") - h.robust_accuracy("PGD (CE)")) <= 0.1
