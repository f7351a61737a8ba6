"""Every recorded number against a naive reference computed in the test's own loop."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import gradwatch as gw
from conftest import at_step, make_case, naive_layer_grad_norms, naive_param_grad_norms

CASES = ["mlp", "cnn", "lstm", "tied"]
STEPS = 4


def _train_and_reference(kind, store, optimizer_cls=torch.optim.SGD):
    model, batch, loss_fn = make_case(kind)
    opt = optimizer_cls(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    ref = []
    with gw.watch(model, opt, activations=1, update_every=1, store=store, name=kind) as w:
        for _ in range(STEPS):
            x, y = batch(g)
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            ref.append((naive_layer_grad_norms(model), naive_param_grad_norms(model)))
            opt.step()
    return model, w.open(), ref


@pytest.mark.parametrize("kind", CASES)
def test_grad_norms_equal_naive_loop(kind, store):
    _, run, ref = _train_and_reference(kind, store)
    for step, (layers, params) in enumerate(ref):
        got = at_step(run, "grad_norm", step)
        assert got.keys() == layers.keys()
        for name, value in layers.items():
            assert got[name] == pytest.approx(value, rel=1e-5), name
        got_p = at_step(run, "grad_norm", step, kind="param")
        assert got_p.keys() == params.keys()
        for name, value in params.items():
            assert got_p[name] == pytest.approx(value, rel=1e-5), name
        assert all(v == 0 for v in at_step(run, "nonfinite", step).values())


def test_tied_frozen_and_gradless_parameters(store):
    _, run, ref = _train_and_reference("tied", store)
    layers = set(run.layers)
    assert "frozen" not in layers  # no trainable parameter: not a layer
    assert {"emb", "mid", "head", "unused", ""} <= layers
    got = at_step(run, "grad_norm", 0, kind="param")
    assert got["emb.weight"] == got["head.weight"]  # one tied tensor, under each owner
    assert "unused.weight" not in got and "extra" not in got  # never got a gradient: no record
    assert "unused" in at_step(run, "weight_norm", 0) and "" in at_step(run, "weight_norm", 0)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_weight_norm_and_layer_order(kind, store):
    model, batch, loss_fn = make_case(kind)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    with gw.watch(model, opt, update_every=1, store=store, name=kind) as w:
        x, y = batch(g)
        before = {n: math.sqrt(sum(float(p.detach().double().norm()) ** 2 for p in m.parameters(recurse=False)))
                  for n, m in model.named_modules() if list(m.parameters(recurse=False))}
        loss_fn(model(x), y).backward()
        opt.step()
    run = w.open()
    got = at_step(run, "weight_norm", 0)
    for name, value in before.items():
        assert got[name] == pytest.approx(value, rel=1e-5)
    executed = []
    hooks = [m.register_forward_hook(lambda m, a, o, n=n: executed.append(n))
             for n, m in model.named_modules() if list(m.parameters(recurse=False))]
    model(batch(g)[0])
    for h in hooks:
        h.remove()
    assert run.layers == executed == run.meta["layer_order"]


def _reference_derivative(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        y = module(x.clone())
        (d,) = torch.autograd.grad(y.sum(), x)
    return d


@pytest.mark.parametrize("kind", ["mlp", "cnn", "lstm", "tied"])
def test_activation_stats_equal_naive(kind, store):
    """Mean, std, saturated/dead fraction and rms derivative against autograd on the hooked tensors."""
    model, batch, loss_fn = make_case(kind)
    seen = {}

    def capture(name):
        def hook(m, args, out):
            seen[name] = (m, args[0].detach().clone(), out.detach().clone())
        return hook

    acts = {n: m for n, m in model.named_modules() if type(m) in (nn.Tanh, nn.Sigmoid, nn.GELU, nn.ReLU)}
    # in-place ReLU: its input *is* its output, capture the input before
    pre = {}
    for n, m in acts.items():
        m.register_forward_pre_hook(lambda m, a, n=n: pre.__setitem__(n, a[0].detach().clone()))
        m.register_forward_hook(capture(n))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    with gw.watch(model, opt, activations=1, store=store, name=kind) as w:
        x, y = batch(g)
        loss_fn(model(x), y).backward()
        opt.step()
    run = w.open()
    assert set(run.names("activation")) == set(acts)
    for name, (m, _, out) in seen.items():
        x = pre[name]
        d = _reference_derivative(type(m)(), x) if not isinstance(m, nn.GELU) else _reference_derivative(m, x)
        peak = {nn.Tanh: 1.0, nn.Sigmoid: 0.25, nn.ReLU: 1.0, nn.GELU: 1.1289}[type(m)]
        inactive = d.abs() < 0.02 * peak
        assert at_step(run, "act_mean", 0, "activation")[name] == pytest.approx(float(out.double().mean()), rel=1e-4, abs=1e-6)
        assert at_step(run, "act_std", 0, "activation")[name] == pytest.approx(float(out.double().std(unbiased=False)), rel=1e-4)
        assert at_step(run, "deriv_rms", 0, "activation")[name] == pytest.approx(float(d.double().pow(2).mean().sqrt()), rel=1e-4)
        if isinstance(m, (nn.Tanh, nn.Sigmoid)):
            assert at_step(run, "saturated_frac", 0, "activation")[name] == pytest.approx(float(inactive.double().mean()), abs=1e-6)
        else:
            dead = inactive.reshape(inactive.shape[0], -1).all(0).double().mean()
            assert at_step(run, "dead_frac", 0, "activation")[name] == pytest.approx(float(dead), abs=1e-6)


@pytest.mark.parametrize("kind", ["mlp", "cnn", "tied"])
def test_out_grad_norm_equals_autograd(kind, store):
    """‖∂L/∂a_l‖ at each layer's output against the outputs' own ``.grad`` (retain_grad).

    The reference runs on a copy without in-place ops: after an in-place ReLU,
    ``retain_grad`` on the layer's output would give the ReLU output's gradient.
    """
    model, batch, loss_fn = make_case(kind)
    twin = copy.deepcopy(model)
    for m in twin.modules():
        if getattr(m, "inplace", False):
            m.inplace = False
    outputs = {}

    def keep(m, a, out, n):
        if out.requires_grad:
            out.retain_grad()
            outputs[n] = out

    for n, m in twin.named_modules():
        if any(p.requires_grad for p in m.parameters(recurse=False)):
            m.register_forward_hook(lambda m, a, out, n=n: keep(m, a, out, n))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    with gw.watch(model, opt, activations=1, store=store, name=kind) as w:
        x, y = batch(g)
        loss_fn(model(x), y).backward()
        opt.step()
        loss_fn(twin(x), y).backward()
        ref = {n: float(o.grad.double().norm()) for n, o in outputs.items() if o.grad is not None}
    got = at_step(w.open(), "out_grad_norm", 0)
    assert got.keys() == ref.keys()
    for name, value in ref.items():
        assert got[name] == pytest.approx(value, rel=1e-5), name


def test_module_called_twice_pools_its_calls(store):
    """A block applied twice: its output gradient is the root of both calls' squared norms."""
    torch.manual_seed(0)
    block = nn.Linear(4, 4)
    act = nn.Tanh()
    model = nn.Sequential()
    model.block, model.act = block, act
    model.forward = lambda x: act(block(act(block(x))))  # type: ignore[method-assign]
    outs, acts_in = [], []

    def keep(m, a, o):
        o.retain_grad()
        outs.append(o)

    block.register_forward_hook(keep)
    act.register_forward_hook(lambda m, a, o: acts_in.append(o.detach()))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gw.watch(model, opt, activations=1, store=store, name="twice") as w:
        x = torch.randn(5, 4)
        model(x).pow(2).sum().backward()
        opt.step()
    run = w.open()
    expect = math.sqrt(sum(float(o.grad.double().norm()) ** 2 for o in outs))
    assert at_step(run, "out_grad_norm", 0)["block"] == pytest.approx(expect, rel=1e-5)
    both = torch.cat(acts_in)
    assert at_step(run, "act_mean", 0, "activation")["act"] == pytest.approx(float(both.mean()), rel=1e-5)
    assert at_step(run, "act_std", 0, "activation")["act"] == pytest.approx(float(both.std(unbiased=False)), rel=1e-5)


def test_nonfinite_counts_tensors_per_layer(store):
    """nonfinite: how many of a layer's parameter tensors hold NaN/Inf, against a naive loop over param.grad."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2), nn.Linear(2, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gw.watch(model, opt, store=store, name="nan") as w:
        model(torch.randn(2, 3)).sum().backward()
        model[0].weight.grad[0, :2] = float("nan")
        model[0].bias.grad[1] = float("inf")
        model[1].weight.grad[1, 1] = float("-inf")
        expect = {str(i): float(sum(not bool(torch.isfinite(p.grad).all()) for p in layer.parameters()))
                  for i, layer in enumerate(model)}
        opt.step()
    run = w.open()
    assert expect == {"0": 2.0, "1": 1.0, "2": 0.0}
    assert at_step(run, "nonfinite", 0) == expect
    assert math.isnan(at_step(run, "grad_norm", 0)["0"])
    assert math.isinf(at_step(run, "grad_norm", 0)["1"])


def test_float64_model_out_grad_regression(store):
    """Regression: ‖∂L/∂a‖ of a float64 model failed (the norm was asked to narrow to float32)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    out = {}
    model[0].register_forward_hook(lambda m, a, o: (o.retain_grad(), out.__setitem__("a", o)) and None)
    with gw.watch(model, activations=1, store=store, name="f64") as w:
        model(torch.randn(5, 3, dtype=torch.float64)).sum().backward()
    assert at_step(w.open(), "out_grad_norm", 0)["0"] == pytest.approx(float(out["a"].grad.norm()), rel=1e-12)


# -- the reader of every step: rows of a kept block, read again and again ---------------------------

def test_norms_only_steps_equal_a_naive_loop_on_every_step_past_a_block_of_rows(store, monkeypatch):
    """Gradient norms alone (the batched path that sends a table as it is), held unsent over more steps than a block
    of rows holds: every step's value is its own, as a naive loop over param.grad reads it then, not a later step's."""
    from gradwatch.probes.stacked import StackedNorms
    from gradwatch.watching import buffer as buffer_module

    monkeypatch.setattr(buffer_module, "STEPS_PER_COPY", 10_000)  # nothing sent before the end: every row still held
    monkeypatch.setattr(buffer_module, "SECONDS_PER_COPY", 600.0)

    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(8, 8), nn.Tanh())], nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    steps = StackedNorms.ROWS + 6
    ref = []
    with gw.watch(model, opt, activations=False, update_every=False, store=store, name="rows") as w:
        assert w._steps.grads._all.reader is not None  # the reader under test
        for step in range(steps):
            x = torch.randn(16, 8, generator=torch.Generator().manual_seed(step))
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            ref.append(naive_param_grad_norms(model))
            opt.step()
    run = w.open()
    for step, params in enumerate(ref):
        got = at_step(run, "grad_norm", step, kind="param")
        assert got.keys() == params.keys()
        for name, value in params.items():
            assert got[name] == pytest.approx(value, rel=1e-5), (step, name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_norms_accumulate_in_float32_and_equal_a_naive_loop(store, dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)).to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gw.watch(model, opt, activations=False, update_every=False, store=store, name=f"half{dtype}") as w:
        opt.zero_grad()
        model(torch.randn(4, 8, dtype=dtype)).float().pow(2).mean().backward()
        ref = {n: float(p.grad.float().norm()) for n, p in model.named_parameters()}
        opt.step()
    got = at_step(w.open(), "grad_norm", 0, kind="param")
    for name, value in ref.items():
        assert got[name] == pytest.approx(value, rel=1e-3), name


def test_a_sparse_gradient_falls_back_to_the_general_read_and_equals_a_naive_loop(store):
    """nn.Embedding(sparse=True): the kept-buffer reader cannot stack it; the norms still equal a naive loop."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 8, sparse=True), nn.Flatten(), nn.Linear(16, 8), nn.Linear(8, 8))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref = []
    with gw.watch(model, opt, activations=False, update_every=False, store=store, name="sparse") as w:
        for step in range(3):
            opt.zero_grad()
            model(torch.randint(0, 10, (4, 2), generator=torch.Generator().manual_seed(step))).pow(2).mean().backward()
            ref.append({n: float(p.grad.coalesce().values().norm() if p.grad.is_sparse else p.grad.norm())
                        for n, p in model.named_parameters()})
            opt.step()
    assert w._steps.grads._all.reader is None  # the general read took over at the first sparse gradient
    run = w.open()
    for step, params in enumerate(ref):
        got = at_step(run, "grad_norm", step, kind="param")
        for name, value in params.items():
            assert got[name] == pytest.approx(value, rel=1e-5), (step, name)


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True to a scalar")
def test_gradients_that_require_grad_are_read_without_a_graph_and_training_is_unchanged(store):
    """A create_graph=True backward leaves .grad that requires grad: the reader's out= ops run under no_grad."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))
    twin = copy.deepcopy(model)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, twin)]
    x = torch.randn(8, 4)
    with gw.watch(model, opts[0], activations=False, update_every=False, store=store, name="graph") as w:
        for m, opt in zip((model, twin), opts):
            for _ in range(2):
                opt.zero_grad()
                m(x).pow(2).mean().backward(create_graph=True)
                if m is model:
                    ref = naive_param_grad_norms(model)
                opt.step()
    got = at_step(w.open(), "grad_norm", 1, kind="param")
    for name, value in ref.items():
        assert got[name] == pytest.approx(value, rel=1e-5), name
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
