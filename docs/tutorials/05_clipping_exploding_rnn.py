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
# # 5. Clipping an exploding RNN
#
# When the per-step Jacobians have norm above 1 the gradient through time
# grows geometrically. The zoo's `rnn_exploding` is a ReLU RNN with
# W_hh = 2.5·(orthogonal) on the adding task (T = 20): its first loss is
# already huge, its gradient larger still, and one SGD step at lr 0.01 sends
# the weights to infinity. Pascanu et al. (2013)'s remedy rescales the whole
# gradient when its norm exceeds a threshold: g ← g · min(1, c/‖g‖). The
# direction is kept; only the step's length is bounded.

# %%
import math
import os
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

import gradwatch as gw
from gradwatch import remedies, zoo

OUT = Path(os.environ.get("GRADWATCH_TUTORIAL_OUT") or tempfile.mkdtemp(prefix="gradwatch-tutorial-"))
SEED = int(os.environ.get("GRADWATCH_TUTORIAL_SEED", "0"))
STEPS, CLIP = 60, 1.0

# %%
losses: dict[str, list[float]] = {}
diagnoses = {}
for name in ("plain SGD", f"clipped at {CLIP}"):
    trial = zoo.get("rnn_exploding")(SEED)
    if name != "plain SGD":
        remedies.clip_grad_norm(trial.optimizer, CLIP)  # a step pre-hook: torch.nn.utils.clip_grad_norm_
    with gw.watch(trial.model, trial.optimizer, store=OUT, name=f"clip-{len(losses)}", overwrite=True) as watch:
        losses[name] = [float(trial.step()) for _ in range(STEPS)]
    diagnoses[name] = watch.diagnose()
    first_bad = next((i for i, v in enumerate(losses[name]) if not math.isfinite(v)), None)
    print(f"{name}: first loss {losses[name][0]:.2e}, last {losses[name][-1]:.3g}, first non-finite step {first_bad}; "
          f"findings {diagnoses[name].kinds}")

# %%
fig, ax = plt.subplots(figsize=(6, 3.2))
for name, values in losses.items():
    ax.semilogy([v if math.isfinite(v) else float("nan") for v in values], label=name)
ax.axhline(1 / 24, color="gray", ls=":", label="chance (predict 0.5)")
ax.set_xlabel("step")
ax.set_ylabel("MSE")
ax.legend()
fig.savefig(OUT / "05_clipping.png", dpi=80, bbox_inches="tight")
print(f"plot: {OUT / '05_clipping.png'}")

# %% [markdown]
# The claims: without clipping the loss is non-finite within 5 steps and the
# watch's diagnosis says so (a non-finite or exploding finding); with clipping
# every loss is finite and it falls more than ×10⁵ from its start (above 10⁵):
# clipping bounds each step, so the descent proceeds instead of jumping to infinity.

# %%
plain, clipped = losses["plain SGD"], losses[f"clipped at {CLIP}"]
assert any(not math.isfinite(v) for v in plain[:5])
assert {"nonfinite", "exploding"} & set(diagnoses["plain SGD"].kinds)
assert all(math.isfinite(v) for v in clipped) and clipped[0] > 1e5 and clipped[-1] < 1e-5 * clipped[0], clipped[::10]
