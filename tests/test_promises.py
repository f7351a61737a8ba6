"""DESIGN.md's promises: watching never changes training, never crashes it, never leaks hooks."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import gradwatch as gw
from conftest import at_step, make_case


def _dropout_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Dropout(0.3), nn.Linear(32, 32), nn.ReLU(),
                         nn.Dropout(0.3), nn.Linear(32, 3))


def _train(optimizer_cls, steps, watch_kwargs=None):
    torch.manual_seed(0)
    model = _dropout_mlp()
    opt = optimizer_cls(model.parameters(), lr=0.01)
    w = gw.watch(model, opt, **watch_kwargs) if watch_kwargs is not None else None
    for _ in range(steps):
        x = torch.randn(16, 6)  # the global generator: any draw by the watch would shift it
        y = torch.randint(0, 3, (16,))
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if w is not None:
            w.log(loss=loss)
    if w is not None:
        w.close()
    return model, opt


@pytest.mark.parametrize("optimizer_cls", [torch.optim.SGD, torch.optim.Adam])
def test_watching_never_changes_training(optimizer_cls, store):
    plain, plain_opt = _train(optimizer_cls, 50)
    watched, watched_opt = _train(optimizer_cls, 50, dict(activations=1, update_every=1, store=store, name="w"))
    for (name, a), (_, b) in zip(plain.named_parameters(), watched.named_parameters()):
        assert torch.equal(a, b), name
    for sa, sb in zip(plain_opt.state.values(), watched_opt.state.values()):
        for key in sa:
            assert torch.equal(torch.as_tensor(sa[key]), torch.as_tensor(sb[key])), key


def _hook_state(model: nn.Module, opt: torch.optim.Optimizer):
    state = []
    for m in model.modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                     "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs"):
            state.append(dict(getattr(m, attr)))
    for p in model.parameters():
        state.append(dict(p._backward_hooks or {}))
        state.append(dict(getattr(p, "_post_accumulate_grad_hooks", None) or {}))
    state.append(dict(opt._optimizer_step_pre_hooks))
    state.append(dict(opt._optimizer_step_post_hooks))
    return state


@pytest.mark.parametrize("with_optimizer", [True, False])
def test_close_removes_every_hook(with_optimizer, store):
    model, batch, loss_fn = make_case("cnn")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = _hook_state(model, opt)
    w = gw.watch(model, opt if with_optimizer else None, store=store, name="h")
    assert _hook_state(model, opt) != before
    x, y = batch(torch.Generator().manual_seed(0))
    loss_fn(model(x), y).backward()
    opt.step()
    w.close()
    w.close()  # idempotent
    assert _hook_state(model, opt) == before
    assert w.closed and w.step == 1


def test_exception_in_the_loop_still_removes_hooks(store):
    model, batch, loss_fn = make_case("mlp")
    opt = torch.optim.Adam(model.parameters())
    before = _hook_state(model, opt)
    with pytest.raises(ZeroDivisionError):
        with gw.watch(model, opt, store=store, name="boom") as w:
            x, y = batch(torch.Generator().manual_seed(0))
            loss_fn(model(x), y).backward()
            opt.step()
            1 / 0
    assert _hook_state(model, opt) == before
    run = gw.open_run(w.path)
    assert run.meta["status"] == "interrupted by ZeroDivisionError"
    assert len(at_step(run, "grad_norm", 0)) == 4  # what was recorded before the error is kept


def test_a_failing_probe_warns_and_training_goes_on(store, monkeypatch):
    model, batch, loss_fn = make_case("mlp")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    w = gw.watch(model, opt, store=store, name="fail")
    x, y = batch(g)
    loss_fn(model(x), y).backward()
    opt.step()

    def broken():
        raise RuntimeError("probe exploded")

    monkeypatch.setattr(w._steps.grads, "gradients", broken)
    with pytest.warns(gw.GradwatchWarning, match="probe exploded"):
        for _ in range(3):
            x, y = batch(g)
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
    w.close()
    run = gw.open_run(w.path)
    assert sorted(set(run.records("grad_norm")["step"].tolist())) == [0]
    assert run.meta["status"].startswith("failed: probe exploded")


def test_a_second_watch_on_the_same_model_is_refused(store):
    model, _, _ = make_case("mlp")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gw.watch(model, opt, activations=False, store=store, name="one"):
        with pytest.raises(RuntimeError, match="already watched"):
            gw.watch(model, store=store, name="two")
    with gw.watch(model, store=store, name="two"):  # after close: fine
        pass


def test_steps_without_optimizer_count_backward_passes(store):
    model, batch, loss_fn = make_case("mlp")
    g = torch.Generator().manual_seed(0)
    with gw.watch(model, every=2, store=store, name="nopt") as w:
        for _ in range(5):
            x, y = batch(g)
            model.zero_grad()
            loss_fn(model(x), y).backward()
    run = w.open()
    assert w.step == 5
    assert sorted(set(run.records("grad_norm")["step"].tolist())) == [0, 2, 4]
    assert "update_ratio" not in run.quantities  # needs an optimizer


def test_gradient_accumulation_records_once_per_optimizer_step(store):
    model, batch, loss_fn = make_case("mlp")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    with gw.watch(model, opt, store=store, name="accum") as w:
        opt.zero_grad()
        for _ in range(3):
            x, y = batch(g)
            loss_fn(model(x), y).backward()
        expect = float(model[0].weight.grad.norm())
        opt.step()
    run = w.open()
    assert w.step == 1
    assert at_step(run, "grad_norm", 0, "param")["0.weight"] == pytest.approx(expect, rel=1e-6)


def test_loss_logged_after_the_step_belongs_to_that_step(store):
    model, batch, loss_fn = make_case("mlp")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    losses = []
    with gw.watch(model, opt, store=store, name="loss") as w:
        for i in range(4):
            x, y = batch(g)
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            if i % 2:
                w.log(loss=loss)  # before the step
                opt.step()
            else:
                opt.step()
                w.log(loss=loss)  # after it
            losses.append(float(loss.detach()))
    rec = w.open().records("loss", "run")
    assert rec["step"].tolist() == [0, 1, 2, 3]
    assert rec["value"].tolist() == pytest.approx(losses)


def test_no_recording_under_no_grad(store):
    """A no_grad forward (evaluation) just before a training step is not pooled into that step's statistics.

    Rewritten: the old test ended no step, so it passed even when the probes ignored the grad mode. Here the
    no_grad forward sees inputs ×50 (the Tanh saturates, its mean moves), the step's own forward plain ones;
    the recorded act_std must be the training forward's alone, from a plain forward hook.
    """
    model, batch, loss_fn = make_case("mlp")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    seen: list[float] = []
    hook = model[1].register_forward_hook(lambda m, a, out: seen.append(float(out.double().std(unbiased=False))))
    with gw.watch(model, opt, activations=1, store=store, name="eval") as w:
        for _ in range(3):
            x, y = batch(g)
            with torch.no_grad():
                model(50 * x + 3)
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
    hook.remove()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run = w.open()
    rec = run.records("act_std", "activation")
    got = {int(s): v for s, n, v in zip(rec["step"], rec["layer"], rec["value"]) if n == "1"}
    train_stds = seen[1::2]  # the hook saw: no_grad, train, no_grad, train, …
    assert sorted(got) == [0, 1, 2]
    for step, std in got.items():
        assert std == pytest.approx(train_stds[step], abs=1e-5)
        assert seen[2 * step] > std + 0.2  # the saturated no_grad forward's spread is far larger: pooling would show
