"""Activation derivatives against autograd, and the inactive-unit threshold against closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import gradwatch as gw
from conftest import at_step
from gradwatch.probes.activations import INACTIVE_BELOW, activation_spec, call_stats

MODULES = [
    nn.Tanh(), nn.Sigmoid(), nn.Hardtanh(-2.0, 1.5), nn.Softsign(), nn.Hardsigmoid(), nn.ReLU(), nn.ReLU6(),
    nn.LeakyReLU(0.1), nn.PReLU(), nn.PReLU(3, init=0.2), nn.ELU(0.7), nn.CELU(1.3), nn.SELU(), nn.GELU(),
    nn.GELU(approximate="tanh"), nn.SiLU(), nn.Softplus(beta=2.0), nn.Hardswish(),
]


@pytest.mark.parametrize("module", MODULES, ids=lambda m: repr(m))
def test_derivative_matches_autograd(module):
    spec = activation_spec(module)
    assert spec is not None
    x = torch.randn(64, 3, 5, dtype=torch.float64) * 4
    x = x[(x - x.round()).abs() > 1e-3].reshape(-1)[:600].reshape(40, 3, 5)  # away from kinks at integers
    xg = x.clone().requires_grad_(True)
    y = module.double()(xg)
    (expect,) = torch.autograd.grad(y.sum(), xg)
    got = spec.derivative(module, x, y.detach())
    torch.testing.assert_close(got.double(), expect, rtol=1e-6, atol=1e-7)
    grid = torch.linspace(-20, 20, 40001, dtype=torch.float64).repeat(3, 1).T.contiguous().requires_grad_(True)
    (d,) = torch.autograd.grad(module(grid).sum(), grid)
    assert spec.peak == pytest.approx(float(d.abs().max()), rel=1e-3)


def test_tanh_threshold_is_y_above_099():
    """Inactive below 2 % of the peak derivative: for tanh, 1 − y² < 0.02 ⇔ |y| > 0.98995."""
    assert INACTIVE_BELOW == 0.02
    y_edge = math.sqrt(1 - INACTIVE_BELOW)
    x = torch.tensor([[math.atanh(y_edge) - 1e-3, math.atanh(y_edge) + 1e-3, -3.0, 0.1]])
    m = nn.Tanh()
    stats = call_stats(activation_spec(m), m, x, m(x))
    assert float(stats.inactive) == pytest.approx(0.5)  # two of four saturated


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(1, 6), st.floats(-3, 3))
def test_dead_fraction_closed_form(batch, units, shift):
    """A ReLU unit is dead when its input is ≤ 0 for the whole batch."""
    g = torch.Generator().manual_seed(batch * 10 + units)
    x = torch.randn(batch, units, generator=g) + shift
    m = nn.ReLU()
    stats = call_stats(activation_spec(m), m, x, m(x))
    expect = float((x <= 0).all(0).double().mean())
    assert float(stats.inactive) == pytest.approx(expect)


@pytest.mark.parametrize("module", [nn.LeakyReLU(0.01), nn.LeakyReLU(0.001), nn.PReLU(init=0.005)], ids=repr)
def test_leaky_units_on_their_negative_side_are_not_dead(module):
    """Bug (at_circle_relu_uniform): LeakyReLU(0.01)'s slope is under 2 % of its peak, so every unit on its
    negative side read "dead" and the doctor judged its own LeakyReLU remedy to leave dead units. A leaky unit
    passes slope × the gradient: the reference is autograd's derivative, never 0 on either side."""
    x = -1.0 - torch.rand(32, 6)  # every unit negative on every sample
    xg = x.clone().requires_grad_(True)
    (d,) = torch.autograd.grad(module(xg).sum(), xg)
    assert bool((d != 0).all())  # the reference: each unit passes gradient
    stats = call_stats(activation_spec(module), module, x, module(x).detach())
    assert float(stats.inactive) == 0.0
    relu = nn.LeakyReLU(0.0)  # a slope of 0 is a ReLU: those units are dead
    assert float(call_stats(activation_spec(relu), relu, x, relu(x)).inactive) == 1.0


def test_inplace_silu_leaves_out_what_it_cannot_measure(store):
    model = nn.Sequential(nn.Linear(3, 4), nn.SiLU(inplace=True), nn.Linear(4, 1))
    with gw.watch(model, activations=1, store=store, name="silu") as w:
        model(torch.randn(5, 3)).sum().backward()
    run = w.open()
    assert "1" in at_step(run, "act_mean", 0, "activation")
    assert "1" not in at_step(run, "dead_frac", 0, "activation")
    assert "1" not in at_step(run, "deriv_rms", 0, "activation")


def test_functional_activations_are_seen_named_after_their_layer(store):
    """torch.tanh inside forward is out of reach of module hooks; the watch's tap measures it
    (gradwatch.probes.functional; values against a reference in tests/test_functional_activations.py)."""

    class F(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            return torch.tanh(self.lin(x))

    with gw.watch(F(), activations=1, store=store, name="f") as w:
        w.model(torch.randn(2, 3)).sum().backward()
    run = w.open()
    assert run.names("activation") == ["lin.tanh()"]
    assert at_step(run, "out_grad_norm", 0)["lin"] > 0  # the gradient evidence is still there


@pytest.mark.parametrize("module", [nn.ReLU(), nn.ReLU6(), nn.Hardtanh(-0.5, 2.0), nn.Hardsigmoid()], ids=repr)
def test_indicator_fast_path_equals_general_path(module):
    import dataclasses

    spec = activation_spec(module)
    assert spec.indicator is not None
    x = torch.randn(16, 4, 3) * 4
    x[:, 0] = -1.0  # a dead / saturated unit column
    y = module(x)
    fast = call_stats(spec, module, x, y)
    slow = call_stats(dataclasses.replace(spec, indicator=None), module, x, y)
    torch.testing.assert_close(fast, slow)


def test_bfloat16_activations_read_in_place_equal_a_float64_reference(store):
    """Under autocast the activations are bfloat16: statistics accumulate in float32 without a float copy."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.GELU(),
                          nn.Linear(64, 1))
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for i in (1, 3, 5):
        model[i].register_forward_hook(lambda m, a, y, i=i: seen.__setitem__(str(i), (a[0].detach(), y.detach())))
    with gw.watch(model, activations=1, store=store, name="bf16") as w:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(torch.randn(256, 16) * 3)
        out.float().sum().backward()
    run = w.open()
    assert all(y.dtype == torch.bfloat16 for _, y in seen.values())
    for name, (x, y) in seen.items():
        y64, x64 = y.double(), x.double()
        assert at_step(run, "act_mean", 0, "activation")[name] == pytest.approx(float(y64.mean()), rel=1e-5, abs=1e-7)
        assert at_step(run, "act_std", 0, "activation")[name] == pytest.approx(float(y64.std(unbiased=False)), rel=1e-5)
        d = activation_spec(model[int(name)]).derivative(model[int(name)], x64, y64)  # φ' in float64
        # gradwatch evaluates φ' in the activation's own bfloat16 (8 bits of mantissa): within 1 %
        assert at_step(run, "deriv_rms", 0, "activation")[name] == pytest.approx(float(d.pow(2).mean().sqrt()),
                                                                                  rel=1e-2)
    assert at_step(run, "saturated_frac", 0, "activation")["1"] == pytest.approx(float((seen["1"][1].double().abs()
                                                                                         > 0.99).double().mean()))
    relu_in = seen["3"][0]
    assert at_step(run, "dead_frac", 0, "activation")["3"] == float((relu_in <= 0).all(dim=0).double().mean())


def test_small_calls_measured_stacked_at_the_step_end_equal_a_per_call_float64_reference(store):
    """Small calls are copied and measured at the step's end, stacked by kind, setting and shape. Against a float64
    reference computed per module from the calls a backward reached: same-kind modules stacked (six tanh), one
    class at two settings (LeakyReLU 0.1 and 0.3: never stacked together), a module called twice (its calls pooled),
    a GELU whose derivative needs the input, and a forward pass the backward never reaches (left out)."""
    torch.manual_seed(0)
    acts = [nn.Tanh() for _ in range(6)] + [nn.LeakyReLU(0.1), nn.LeakyReLU(0.3), nn.GELU(), nn.ReLU()]
    lins = [nn.Linear(32, 32) for _ in acts]
    model = nn.Sequential(*[m for pair in zip(lins, acts) for m in pair], nn.Linear(32, 1))
    calls: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for k, a in enumerate(acts):
        a.register_forward_hook(lambda m, args, y, k=k: calls.setdefault(k, []).append((args[0].detach().double(),
                                                                                         y.detach().double())))
    with gw.watch(model, activations=1, store=store, name="stacked") as w:
        x = torch.randn(16, 32) * 2
        model(torch.randn(16, 32))  # grad enabled, never backpropagated: does not count
        calls.clear()
        out = model(x) + model[-1](acts[3](lins[3](torch.randn(16, 32))))  # tanh #3 called twice
        out.sum().backward()
    run = w.open()
    names = {k: str(2 * k + 1) for k in range(len(acts))}
    assert {k: len(c) for k, c in calls.items()} == {k: 2 if k == 3 else 1 for k in range(len(acts))}
    for k, a in enumerate(acts):
        xs = torch.cat([c[0] for c in calls[k]])
        ys = torch.cat([c[1] for c in calls[k]])
        d = activation_spec(a).derivative(a, xs, ys)
        assert at_step(run, "act_mean", 0, "activation")[names[k]] == pytest.approx(float(ys.mean()), rel=1e-5, abs=1e-7)
        assert at_step(run, "act_std", 0, "activation")[names[k]] == pytest.approx(float(ys.std(unbiased=False)), rel=1e-5)
        assert at_step(run, "deriv_rms", 0, "activation")[names[k]] == pytest.approx(float(d.pow(2).mean().sqrt()),
                                                                                      rel=1e-5)
        if isinstance(a, nn.Tanh):
            assert at_step(run, "saturated_frac", 0, "activation")[names[k]] == pytest.approx(
                float((ys.abs() > 0.99).double().mean()))
    relu_out = calls[9][0][1]
    assert at_step(run, "dead_frac", 0, "activation")[names[9]] == float((relu_out <= 0).all(dim=0).double().mean())


CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                           reason="needs a CUDA device")])


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_large_relu_calls_read_as_raw_sums_equal_a_per_module_float64_reference(store, dtype, device):
    """A large ReLU call (≥ DEFER_BELOW elements) is read as four raw sums and its statistics made at the step's
    end with every other call's (a GPU's hooked ReLU launches 5 kernels, not ~17). Against a float64 reference
    pooled per module over the calls a backward reached: one ReLU module called on a large channels-last map and
    on a small one (raw sums pooled with a deferred call), a large tanh measured in full in the same step, and a
    ReLU whose whole first channel is dead. On a CUDA device the counts are ord-0 norms, on the CPU sums of sign(y).
    """
    from gradwatch.probes.activations import DEFER_BELOW

    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.relu, self.tanh, self.relu2 = nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Tanh(), nn.ReLU()
            self.head = nn.Linear(16, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.conv(x)
            h = h.index_fill(1, torch.tensor([0], device=h.device), -1.0)  # channel 0 below zero on every sample: dead after relu2
            a = self.relu(h.contiguous(memory_format=torch.channels_last))
            b = self.tanh(2 * h)
            c = self.relu2(h)
            small = self.relu(h[:2, :, :4, :4])  # the same module again, a small call
            return self.head((a + b + c).mean((2, 3))).sum() + small.sum()

    model = (Net().to(dtype) if dtype != torch.bfloat16 else Net()).to(device)
    seen: dict[str, list[torch.Tensor]] = {}
    for name in ("relu", "tanh", "relu2"):
        getattr(model, name).register_forward_hook(
            lambda m, a, y, name=name: seen.setdefault(name, []).append(y.detach().double()))
    x = torch.randn(16, 3, 32, 32, dtype=dtype if dtype != torch.bfloat16 else torch.float32).to(device)
    with gw.watch(model, activations=1, store=store, name="raw") as w:
        if dtype == torch.bfloat16:
            with torch.autocast(device, dtype=torch.bfloat16):
                out = model(x)
        else:
            out = model(x)
        out.float().sum().backward()
    run = w.open()
    assert [y.numel() >= DEFER_BELOW for y in seen["relu"]] == [True, False]
    rel = 1e-2 if dtype == torch.bfloat16 else 1e-5
    for name, ys in seen.items():
        y = torch.cat([t.reshape(-1) for t in ys])
        assert at_step(run, "act_mean", 0, "activation")[name] == pytest.approx(float(y.mean()), rel=rel)
        assert at_step(run, "act_std", 0, "activation")[name] == pytest.approx(float(y.std(unbiased=False)), rel=rel)
    for name in ("relu", "relu2"):
        ys = seen[name]
        on = sum(float((t > 0).sum()) for t in ys) / sum(t.numel() for t in ys)
        assert at_step(run, "deriv_rms", 0, "activation")[name] == pytest.approx(math.sqrt(on), rel=1e-6)
        dead = [float((t <= 0).all(dim=0).double().mean()) for t in ys]  # per call, pooled by element count
        expect = sum(d * t.numel() for d, t in zip(dead, ys)) / sum(t.numel() for t in ys)
        assert at_step(run, "dead_frac", 0, "activation")[name] == pytest.approx(expect, rel=1e-6)
    assert at_step(run, "dead_frac", 0, "activation")["relu2"] >= 1 / 16  # channel 0, and a few units by chance
    t = seen["tanh"][0]
    saturated = float((1 - t * t < INACTIVE_BELOW).double().mean())  # φ' below 2 % of its peak (|y| > 0.98995)
    assert at_step(run, "saturated_frac", 0, "activation")["tanh"] == pytest.approx(saturated, abs=rel)  # (rounding)
