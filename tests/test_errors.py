"""Bad input: a clear error naming the argument and what was expected, before any hook is placed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradwatch as gw
from gradwatch.schedules import every


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.fixture
def model():
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))


BAD = [
    (dict(model=[1, 2]), TypeError, r"`watch\(model=…\)` expects a torch.nn.Module, got list"),
    (dict(model=nn.Tanh()), ValueError, "no parameters that require grad"),
    (dict(optimizer="adam"), TypeError, r"`watch\(optimizer=…\)` expects a torch.optim.Optimizer or None"),
    (dict(every=0), ValueError, r"`watch\(every=…\)` expects a positive int or a callable step -> bool, got 0"),
    (dict(every=-3), ValueError, "got -3"),
    (dict(every=True), TypeError, r"`watch\(every=…\)`"),
    (dict(every=1.5), TypeError, r"`watch\(every=…\)`.*got 1.5"),
    (dict(activations=0), ValueError, r"`watch\(activations=…\)`"),
    (dict(activations="often"), TypeError, r"`watch\(activations=…\)`"),
    (dict(update_every=-1), ValueError, r"`watch\(update_every=…\)`"),
    (dict(store=42), TypeError, r"`watch\(store=…\)` expects a directory path"),
    (dict(name="a/b"), ValueError, r"`watch\(name=…\)`"),
    (dict(name=""), ValueError, r"`watch\(name=…\)`"),
    (dict(overwrite="yes"), TypeError, r"`watch\(overwrite=…\)`"),
]


@pytest.mark.parametrize("kwargs,error,message", BAD, ids=[str(b[0]) for b in BAD])
def test_bad_arguments(model, store, kwargs, error, message):
    kwargs = {"model": model, "store": store, **kwargs}
    target = kwargs["model"]
    with pytest.raises(error, match=message):
        gw.watch(**kwargs)
    if isinstance(target, nn.Module):
        assert _no_hooks(target)
    assert not (store / "x").exists()


def test_optimizer_of_another_model(model, store):
    other = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"optimizer holds 2 parameter\(s\) that are not the model's"):
        gw.watch(model, torch.optim.SGD(other.parameters(), lr=0.1), store=store)
    assert _no_hooks(model)


def test_frozen_model(store):
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="Linear has no parameters that require grad"):
        gw.watch(frozen, store=store)


def test_unwritable_store(model, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(OSError, match=r"`watch\(store=…\)` cannot create the run directory"):
        gw.watch(model, store=blocker, name="r")
    assert _no_hooks(model)


def test_existing_run_is_not_overwritten(model, store):
    gw.watch(model, store=store, name="r").close()
    with pytest.raises(FileExistsError, match="run 'r' already exists.*overwrite=True"):
        gw.watch(model, store=store, name="r")
    assert _no_hooks(model)
    gw.watch(model, store=store, name="r", overwrite=True).close()


def test_log_rejects_non_numbers(model, store):
    with gw.watch(model, store=store, name="log") as w:
        with pytest.raises(TypeError, match=r"`Watch.log\(loss=…\)` expects a number or a one-element tensor"):
            w.log(loss="low")
        with pytest.raises(ValueError, match=r"`Watch.log\(loss=…\)`"):
            w.log(loss=torch.ones(3))


def test_schedule_rejects_bad_n():
    with pytest.raises(ValueError, match=r"`every\(n=…\)` expects a positive int, got 0"):
        every(0)


def test_open_run_on_a_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"`open_run\(path=…\)` expects a run directory"):
        gw.open_run(tmp_path / "nothing")
