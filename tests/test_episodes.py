"""Issue 20, the diagnosis half: findings over the whole run, robust spike baselines, severity from the
effect on training, halving rates only from a real fit, remedies that fit the architecture."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import gradwatch as gw
from gradwatch.diagnosis.rules import real_fit


def _scaled_chain(scales: list[float], width: int = 16) -> nn.Sequential:
    """Linear layers with orthogonal weights × scales[i]: ‖∂L/∂a_{i-1}‖ = scales[i] · ‖∂L/∂a_i‖ exactly."""
    torch.manual_seed(0)
    layers = []
    for s in scales:
        lin = nn.Linear(width, width, bias=False)
        nn.init.orthogonal_(lin.weight)
        lin.weight.data *= s
        layers.append(lin)
    return nn.Sequential(*layers)


def test_a_halving_rate_is_quoted_only_for_a_real_fit(store):
    """Regression (ViT at lr 1e-2): "halves every 53 layers (×0.99 per layer)" for a profile with no steady decay.

    The profile here is one drop at the first layer and a zig-zag above it: a least-squares line through it
    has a slope, but not one the points follow.
    """
    g = [1e-4, 0.3, 0.1, 0.3, 0.1, 0.3, 0.1, 0.3, 1.0]  # ‖∂L/∂a‖ per layer, relative to the last
    scales = [1.0] + [g[i - 1] / g[i] for i in range(1, len(g))]
    model = _scaled_chain(scales)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with gw.watch(model, opt, store=store, name="zigzag") as w:
        for _ in range(6):
            opt.zero_grad()
            model(torch.randn(32, 16)).pow(2).sum().backward()
            opt.step()
    (f,) = [f for f in w.diagnose().of("vanishing") if f.layers]
    s = w.open().series("out_grad_norm")
    ref = np.median(s.values[:, -5:], axis=1) / np.median(s.values[-1, -5:])
    assert ref == pytest.approx(g, rel=1e-3)  # the stored profile is the one built
    assert f.numbers["ratio"] == pytest.approx(1e-4, rel=1e-3)
    assert "halves every" not in f.evidence and "no steady decay" in f.evidence
    assert math.isnan(f.numbers["halving_layers"])
    # a real decay keeps its rate: ×0.25 per layer, exactly
    assert real_fit(np.array([0.25 ** (8 - i) for i in range(9)]))
    assert not real_fit(np.array([0.9, 1.1, 0.95, 1.05, 1.0]))  # no meaningful total change
