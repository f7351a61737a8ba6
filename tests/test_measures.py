"""One judgement in one place: gw.check (one batch, before training) and diagnose (a watched run) name the same
cause for the same net, against closed forms; and the shared measures against their references."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from torch import nn

import gradwatch as gw
from gradwatch.diagnosis.measures import Between, by_lag, cause_split, depth_ratio, pascanu
from gradwatch.store import Series

from conftest import SEEDS


def _orthogonal(width: int, scale: float) -> nn.Linear:
    lin = nn.Linear(width, width, bias=False)
    nn.init.orthogonal_(lin.weight)
    lin.weight.data *= scale
    return lin


def orthogonal_sigmoid_out(scale: float = 0.3) -> nn.Sequential:
    """The issue's net: 8 orthogonal layers × ``scale`` with one Sigmoid at the output, none between them."""
    return nn.Sequential(*[_orthogonal(16, scale) for _ in range(8)], nn.Sigmoid())


def deep_tanh_default(depth: int = 20, width: int = 32) -> nn.Sequential:
    """PyTorch's default Linear init: weights U(±1/√fan_in), std 1/√(3·fan_in), so a gain of √(1/3) per layer."""
    layers: list[nn.Module] = []
    for i in range(depth):
        layers.append(nn.Linear(width, width))
        if i < depth - 1:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def sigmoid_mlp(init: str, depth: int = 12, width: int = 32) -> nn.Sequential:
    """A sigmoid between every two layers; weights orthogonal (gain 1) or He (std √(2/fan_in))."""
    layers: list[nn.Module] = []
    for i in range(depth):
        lin = nn.Linear(width, width, bias=False)
        if init == "orthogonal":
            nn.init.orthogonal_(lin.weight)
        else:
            nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
        layers.append(lin)
        if i < depth - 1:
            layers.append(nn.Sigmoid())
    return nn.Sequential(*layers)


def linear_x2() -> nn.Sequential:
    """12 orthogonal linear layers × 2: the gradient doubles at every layer towards the input (2¹¹ > 10³ in all)."""
    return nn.Sequential(*[_orthogonal(16, 2.0) for _ in range(12)])


def both(model: nn.Module, width: int, store, name: str):
    """(gw.check's report, the depth finding of diagnose on a watched run of the same net at lr 0)."""
    g = torch.Generator().manual_seed(0)
    report = gw.check(model, torch.randn(64, width, generator=g), samples=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with gw.watch(model, opt, activations=1, store=store, name=name) as w:
        for _ in range(6):
            opt.zero_grad()
            model(torch.randn(64, width, generator=g)).pow(2).sum().backward()
            opt.step()
    (finding,) = [f for f in w.diagnose() if f.cause_key]  # the depth finding (a ×2 net also trips the norm bound)
    assert report.cause is not None, str(report)
    return report, finding


@pytest.mark.parametrize("seed", SEEDS)
def test_orthogonal_x03_with_an_output_sigmoid_is_the_weights_in_both(store, seed):
    """The issue's disagreement: check blamed the output Sigmoid's derivative (it sits after the last layer, so no
    gradient between layers passes it) and recommended ReLU. The factor is the weights' 0.3 by construction."""
    torch.manual_seed(seed)
    report, f = both(orthogonal_sigmoid_out(0.3), 16, store, "x03")
    assert report.verdict == f.kind == "vanishing"
    assert report.cause.key == f.cause_key == "jacobians"  # no activation module between the layers
    assert report.cause.per_layer == pytest.approx(0.3, rel=1e-4)  # orthogonal × 0.3: exactly 0.3 per layer
    assert f.numbers["per_layer"] == pytest.approx(0.3, rel=1e-4)
    assert report.cause.remedy_keys[0] == "orthogonal_init" and f.remedy_keys[0] == "orthogonal_init"
    assert "relu" not in report.cause.remedy_keys and "relu" not in f.remedy_keys


@pytest.mark.parametrize("seed", SEEDS)
def test_deep_tanh_default_init_is_the_weights_in_both(store, seed):
    torch.manual_seed(seed)
    report, f = both(deep_tanh_default(), 32, store, "tanh")
    assert report.verdict == f.kind == "vanishing"
    assert report.cause.key == f.cause_key == "weights"
    # the default init's gain √(1/3) per layer; tanh near its linear regime passes on almost all
    assert report.cause.weights == pytest.approx(3**-0.5, rel=0.1)
    assert f.numbers["weight_factor"] == pytest.approx(3**-0.5, rel=0.1)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("init,gain", [("orthogonal", 1.0), ("he", 2**0.5)])
def test_sigmoid_mlp_is_the_activation_in_both(store, init, gain, seed):
    """σ' ≤ 1/4 everywhere, so the activations' factor per layer is at most 1/4: at least log 4 of the decay."""
    torch.manual_seed(seed)
    report, f = both(sigmoid_mlp(init), 32, store, f"sigmoid-{init}")
    assert report.verdict == f.kind == "vanishing"
    assert report.cause.key == f.cause_key == "activation"
    for a in (report.cause.activation, f.numbers["activation_factor"]):
        assert 0.15 < a <= 0.25
    # what is left is the weights' gain: 1 for orthogonal weights, √2 for He's std √(2/fan_in)
    assert report.cause.weights == pytest.approx(gain, rel=0.1) and f.numbers["weight_factor"] == pytest.approx(gain, rel=0.1)
    assert report.cause.remedy_keys[0] == "relu" and f.remedy_keys[0] == "relu"


@pytest.mark.parametrize("seed", SEEDS)
def test_deep_linear_x2_explodes_by_the_weights_in_both(store, seed):
    torch.manual_seed(seed)
    report, f = both(linear_x2(), 16, store, "x2")
    assert report.verdict == f.kind == "exploding"
    assert report.cause.key == f.cause_key == "jacobians"
    assert report.cause.per_layer == pytest.approx(2.0, rel=1e-4)
    assert f.numbers["per_layer"] == pytest.approx(2.0, rel=1e-4)
    assert report.ratio == pytest.approx(2.0**11, rel=1e-4)


def test_cause_split_against_closed_form():
    """Two pairs, each decaying ×0.1 with one activation of rms φ' 0.2 between: activation 0.2, weights 0.5."""
    grads = [0.01, 0.1, 1.0]
    pairs = [[Between("a0", "Sigmoid", 0.2)], [Between("a1", "Sigmoid", 0.2)]]
    cause = cause_split(grads, pairs, gw.Thresholds(), vanishing=True)
    assert cause.key == "activation"  # log 0.2 ≤ ½ log 0.1
    assert (cause.per_layer, cause.activation, cause.weights) == pytest.approx((0.1, 0.2, 0.5))
    weak = [[Between("a0", "Tanh", 0.9)], [Between("a1", "Tanh", 0.9)]]
    assert cause_split(grads, weak, gw.Thresholds(), vanishing=True).key == "weights"
    dead = [[Between("a0", "ReLU", 0.5, dead=0.8)], []]
    assert cause_split(grads, dead, gw.Thresholds(), vanishing=True).key == "dead"
    assert cause_split(grads, [[], []], gw.Thresholds(), vanishing=True).key == "jacobians"


def test_depth_ratio_skips_unmeasured_layers_and_counts_zeros():
    assert depth_ratio(np.array([np.nan, 1e-4, 0.5, 1.0])) == pytest.approx(1e-4)
    assert depth_ratio(np.array([0.0, 1.0])) == 0.0  # no gradient reached the first layer: it vanished
    assert depth_ratio(np.array([3.0])) is None and depth_ratio(np.array([1.0, 0.0])) is None


def test_pascanu_verdicts():
    assert pascanu(0.8, 1.0).key == "vanishing" and "sufficient condition for vanishing holds" in pascanu(0.8, 1.0).words
    assert pascanu(1.5, 1.0).key == "exploding" and "explosion possible" in pascanu(1.5, 1.0).words
    assert pascanu(0.5, None).key == "none"


def test_by_lag_aligns_sequences_of_different_lengths_at_their_ends():
    values = np.array([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [np.nan, 40.0]])  # step 0: length 3, step 1: length 4
    s = by_lag(Series("temporal_grad_norm", ["0", "1", "2", "3"], np.array([0, 1]), values))
    assert s.names == ["2", "1", "0"]
    np.testing.assert_array_equal(s.values, [[1.0, 20.0], [2.0, 30.0], [3.0, 40.0]])
