"""The flight recorder catches an injected spike (a batch scaled ×1000 at a known step) and returns the steps before it."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

from gradwatch.probes.flight import FlightRecorder

SPIKE_AT, CAPACITY = 40, 16


def _run(seed: int, steps: int = 80, scale_at: int | None = SPIKE_AT, nan_at: int | None = None):
    """SGD on a small MLP regression, the recorder pushed every step with naive per-layer gradient norms.

    Returns (recorder, the first step whose check fired or None, {step: naive norms}).
    """
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))
    layers = [m for m in model if isinstance(m, nn.Linear)]
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    rec = FlightRecorder(["0", "2", "4"], ("grad_norm",), capacity=CAPACITY)
    g = torch.Generator().manual_seed(seed)
    w_true = torch.randn(8, 1, generator=g)
    fired, naive = None, {}
    for step in range(steps):
        x = torch.randn(32, 8, generator=g)
        y = torch.tanh(x @ w_true)
        if step == scale_at:
            x = x * 1000
        loss = F.mse_loss(model(x), y)
        if step == nan_at:
            loss = loss * math.nan
        opt.zero_grad()
        loss.backward()
        # the naive reference: a loop over param.grad, per layer
        norms = [math.sqrt(sum(float(p.grad.norm()) ** 2 for p in layer.parameters())) for layer in layers]
        naive[step] = norms
        rec.push(step, torch.tensor(norms)[:, None])
        if fired is None and rec.triggered():
            fired = step
            rec.fire(step)
        opt.step()
    return rec, fired, naive


@pytest.mark.zoo
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_catches_the_injected_spike_and_returns_the_steps_before_it(seed):
    rec, fired, naive = _run(seed, steps=SPIKE_AT + 1)
    assert fired == SPIKE_AT
    rows = rec.records(upto=SPIKE_AT)
    steps = sorted({r[0] for r in rows})
    assert steps == list(range(SPIKE_AT - CAPACITY + 1, SPIKE_AT + 1))  # the buffer: N steps up to the event
    for step, layer, quantity, value in rows:
        assert quantity == "grad_norm"
        assert value == pytest.approx(naive[step][["0", "2", "4"].index(layer)], rel=1e-6)


@pytest.mark.zoo
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_trigger_in_an_ordinary_run(seed):
    _, fired, _ = _run(seed, scale_at=None)
    assert fired is None


def test_a_nan_step_fires_and_the_detail_window_follows():
    rec, fired, _ = _run(0, steps=60, scale_at=None, nan_at=30)
    assert fired == 30
    assert [rec.schedule(s) for s in (30, 31, 50, 51)] == [False, True, True, False]
    # later steps overwrote the oldest slots: what is left before the event comes back, nothing after it
    steps = sorted({r[0] for r in rec.records(upto=30)})
    assert steps == list(range(60 - CAPACITY, 31))


def test_values_of_the_wrong_shape_and_bad_arguments():
    rec = FlightRecorder(["a", "b"], ("grad_norm", "update_norm"), capacity=4)
    with pytest.raises(ValueError, match=r"`FlightRecorder.push\(values=…\)` expects a tensor of shape \(2, 2\)"):
        rec.push(0, torch.ones(3, 2))
    with pytest.raises(ValueError, match=r"`FlightRecorder\(capacity=…\)` expects a positive int"):
        FlightRecorder(["a"], capacity=0)
    with pytest.raises(ValueError, match=r"`FlightRecorder\(ratio_above=…\)` expects a number above 1"):
        FlightRecorder(["a"], ratio_above=1)
    rec.push(0, torch.tensor([[1.0, math.nan], [2.0, math.nan]]))  # update norms not measured this step
    assert not rec.triggered()
    assert rec.records() == [(0, "a", "grad_norm", 1.0), (0, "b", "grad_norm", 2.0)]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-3, 3), min_size=1, max_size=40), st.integers(0, 39), st.sampled_from([0.0, 2.0, 8.0]),
       st.sampled_from(["none", "nan", "all-nan", "inf", "zero", "weights-nan"]), st.integers(4, 12))
def test_the_host_trigger_answers_as_the_device_one(logs, at, jump, odd, capacity):
    """On the CPU triggered() computes the test in numpy; it answers as check()'s tensor ops on every push:
    spikes of several sizes, NaN/Inf, all-zero gradients (log 0), a non-finite weight norm, a wrapped buffer."""
    rec = FlightRecorder(["a", "b", "c"], ("grad_norm", "weight_norm"), capacity=capacity, warmup=3)
    g = torch.Generator().manual_seed(len(logs))
    for i, x in enumerate(logs):
        values = torch.rand(3, 2, generator=g) * math.exp(x)
        if i % 2:
            values[:, 1] = math.nan  # weight norms not measured on this step
        if i == at:
            values[:, 0] *= math.exp(jump)
            if odd == "nan":
                values[1, 0] = math.nan
            elif odd == "all-nan":  # the first quantity is measured on every step: all NaN is non-finite
                values[:, 0] = math.nan
            elif odd == "inf":
                values[0, 0] = math.inf
            elif odd == "zero":
                values[:, 0] = 0.0
            elif odd == "weights-nan":
                values[2, 1] = math.nan
                values[0, 1] = 1.0
        rec.push(i, values)
        assert rec.triggered() == bool(rec.check()), (i, x)
