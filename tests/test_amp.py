"""Mixed precision: statistics of the unscaled gradients; a step the GradScaler skips is recorded, not lost."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import gradwatch as gw
from conftest import at_step, naive_layer_grad_norms

STEPS = 24
BAD = (3, 11)  # steps whose batch holds an Inf: the scaler skips them


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))


def _batches():
    g = torch.Generator().manual_seed(1)
    for step in range(STEPS):
        x, y = torch.randn(32, 6, generator=g), torch.randn(32, 1, generator=g)
        if step in BAD:
            x[0, 0] = float("inf")
        yield x, y


def _train(scaled: bool, store=None, reference: list | None = None):
    """The same loop with and without a GradScaler; optionally watched; optionally noting naive unscaled norms."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=5) if scaled else None
    w = gw.watch(model, opt, store=store, name="amp", scaler=scaler) if store is not None else None
    if reference is not None:  # placed after the watch's: sees what the watch saw, before the step
        opt.register_step_pre_hook(lambda *_: reference.append(naive_layer_grad_norms(model)))
    scales = []
    for x, y in _batches():
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        if scaler is None:
            loss.backward()
            if all(torch.isfinite(p.grad).all() for p in model.parameters()):
                opt.step()
        else:
            scales.append(scaler.get_scale())
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        if w is not None:
            w.log(loss=loss)
    if w is not None:
        w.close()
    return model, w, scales


def test_statistics_are_of_the_unscaled_gradients(store, tmp_path):
    ref: list[dict[str, float]] = []
    _, plain, _ = _train(scaled=False, store=tmp_path / "plain", reference=ref)  # float32, no scaler
    _, w, scales = _train(scaled=True, store=store)
    assert max(scales) >= 2.0**12  # the loss really was scaled
    run = w.open()
    taken = [s for s in range(STEPS) if s not in BAD]
    assert len(ref) == len(taken)
    for step, expect in zip(taken, ref):
        got = at_step(run, "grad_norm", step)
        for name, value in expect.items():
            assert got[name] == pytest.approx(value, rel=1e-6), (step, name)
    # ‖∂L/∂a‖ is read during backward, where the scale is still on it: divided by the scale of that step
    expect = at_step(plain.open(), "out_grad_norm", 0)
    assert expect and at_step(run, "out_grad_norm", 0) == pytest.approx(expect, rel=1e-6)


def test_skipped_steps_are_recorded_and_training_is_unchanged(store):
    plain, _, _ = _train(scaled=True)
    watched, w, scales = _train(scaled=True, store=store)
    for a, b in zip(plain.parameters(), watched.parameters()):
        assert torch.equal(a, b)
    run = w.open()
    assert run.meta["steps"] == STEPS  # a skipped step is a step
    skipped = run.series("skipped_step", "run")
    assert skipped.steps.tolist() == list(BAD) and np.all(skipped.values == 1)
    assert run.series("loss_scale", "run").values[0].tolist() == [scales[s] for s in BAD]
    for step in BAD:  # its gradient statistics, NaN/Inf and all, are there
        # the Inf enters through the first layer's input: only its weight gradient is non-finite (tanh caps it)
        assert at_step(run, "nonfinite", step) == {"0": 1.0, "2": 0.0, "4": 0.0}
        assert not math.isfinite(at_step(run, "grad_norm", step)["0"])
    for step in set(range(STEPS)) - set(BAD):
        assert sum(at_step(run, "nonfinite", step).values()) == 0
    # Two skips in 24 steps (8 %) while training went on: a warning about skipping, not a NaN divergence.
    diagnosis = gw.diagnose(run)
    assert "nonfinite" not in diagnosis.kinds
    (f,) = diagnosis.of("skipped_steps")
    assert f.severity == "warning" and f.numbers["skipped"] == 2 and "3, 11" in f.evidence
    quiet = gw.diagnose(run, gw.Thresholds(skipped_above=0.1))
    assert "skipped_steps" not in quiet.kinds


def test_scaler_errors(store):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"watch\(scaler=…\)` expects a torch.amp.GradScaler"):
        gw.watch(model, opt, store=store, scaler=object())
    with pytest.raises(ValueError, match="needs the optimizer"):
        gw.watch(model, store=store, scaler=torch.amp.GradScaler("cpu"))
    scaler = torch.amp.GradScaler("cpu")
    with gw.watch(model, opt, store=store, name="one", scaler=scaler):
        other = _model()
        with pytest.raises(RuntimeError, match="already wrapped"):
            gw.watch(other, torch.optim.SGD(other.parameters(), lr=0.1), store=store, scaler=scaler)
    assert "step" not in scaler.__dict__  # closing put the scaler's own method back
