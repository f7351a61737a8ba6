"""Bad input: a clear error naming the argument and what was expected, before any hook is placed."""

from __future__ import annotations

import os
import re
import threading

import numpy as np
import pytest
import torch
from torch import nn

import gradwatch as gw
from gradwatch.schedules import every


def _id(case: object, most: int | None = None) -> str:
    """A test id that is the same in every process (no object addresses), so pytest-xdist workers agree."""
    text = re.sub(r" at 0x[0-9a-f]+", "", repr(case) if most else str(case))
    return text[:most] if most else text


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.fixture
def model():
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))


BAD = [
    (dict(model=[1, 2]), TypeError, r"`watch\(model=…\)` expects a torch.nn.Module, got list"),
    (dict(model=None), TypeError, r"`watch\(model=…\)` expects a torch.nn.Module, got None"),
    (dict(model=nn.Linear), TypeError, r"`watch\(model=…\)` expects a torch.nn.Module"),
    (dict(optimizer=42), TypeError, r"`watch\(optimizer=…\)` expects a torch.optim.Optimizer or None, got 42"),
    (dict(every="10"), TypeError, r"`watch\(every=…\)` expects a positive int or a callable step -> bool, got '10'"),
    (dict(every="8"), TypeError, r"`watch\(every=…\)`.*got '8'"),
    (dict(activations=-2), ValueError, r"`watch\(activations=…\)`.*or True/False, got -2"),
    (dict(activations=0.5), TypeError, r"`watch\(activations=…\)`.*got 0.5"),
    (dict(update_every="x"), TypeError, r"`watch\(update_every=…\)`"),
    (dict(update_every=5), ValueError, r"`watch\(update_every=…\)` measures updates across optimizer.step\(\): "
                                       r"pass optimizer=… as well"),
    (dict(update_every=lambda s: True), ValueError, r"`watch\(update_every=…\)`.*pass optimizer=…"),
    (dict(store=["runs"]), TypeError, r"`watch\(store=…\)` expects a directory path \(str or Path\) or None, got list"),
    (dict(name=3), ValueError, r"`watch\(name=…\)` expects a run name of letters, digits, '.', '_' or '-', got 3"),
    (dict(name=".hidden"), ValueError, r"`watch\(name=…\)`.*got '.hidden'"),
    (dict(name="a b"), ValueError, r"`watch\(name=…\)`.*got 'a b'"),
    (dict(name="../escape"), ValueError, r"`watch\(name=…\)`"),
    (dict(overwrite=1), TypeError, r"`watch\(overwrite=…\)` expects True or False, got 1"),
    (dict(driver="callbacks"), ValueError, r"`watch\(driver=…\)` expects 'auto' or 'external', got 'callbacks'"),
    (dict(temporal="lstm"), TypeError, r"`watch\(temporal=…\)` expects True, False or a list of module names"),
    (dict(temporal=["nope"]), ValueError, r"`watch\(temporal=…\)`: no module named 'nope'"),
    (dict(temporal=True, activations=False), ValueError, r"`watch\(temporal=…\)` rides the activations schedule"),
    (dict(scaler="amp"), TypeError, r"`watch\(scaler=…\)` expects a torch.amp.GradScaler or None, got 'amp'"),
    (dict(scaler=torch.amp.GradScaler("cpu", enabled=False)), ValueError, r"`watch\(scaler=…\)` needs the optimizer"),
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


def _threads() -> int:
    return sum(t.name == "gradwatch-writer" for t in threading.enumerate())


def _files(under) -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if str(under) in target:
            out.append(target)
    return out


@pytest.fixture
def nothing_left(store):
    """After the test: no writer thread, no file open under the store."""
    threads = _threads()
    yield
    assert _threads() == threads and _files(store) == []


@pytest.mark.parametrize("kwargs,error,message", BAD, ids=[_id(b[0]) for b in BAD])
def test_bad_arguments(model, store, kwargs, error, message, nothing_left):
    kwargs = {"model": model, "store": store, **kwargs}
    target = kwargs["model"]
    with pytest.raises(error, match=message):
        gw.watch(**kwargs)
    if isinstance(target, nn.Module):
        assert _no_hooks(target)
    assert not store.exists() or not any(store.iterdir())  # no run directory made


def test_optimizer_of_another_model(model, store):
    """An optimizer that holds none of the model's parameters is the user's bug to see, not a refusal (round 17: a
    head replaced after the optimizer was built): a warning that names them, and the watch goes on."""
    other = nn.Linear(2, 2)
    with pytest.warns(UserWarning, match=r"the optimizer holds none of the model's parameters \(2 of its own"):
        w = gw.watch(model, torch.optim.SGD(other.parameters(), lr=0.1), store=store)
    w.close()
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


# -- Watch.log, after the watch is made --------------------------------------------------

LOG_BAD = [
    ({"": 1.0}, ValueError, r"`Watch.log\(\w*=…\)` expects a non-empty scalar name"),
    ({"acc": None}, TypeError, r"`Watch.log\(acc=…\)` expects a number or a one-element tensor, got None"),
    ({"acc": True}, TypeError, r"`Watch.log\(acc=…\)`.*got True"),
    ({"acc": [0.5]}, TypeError, r"`Watch.log\(acc=…\)`.*got list"),
    ({"acc": torch.zeros(0)}, ValueError, r"`Watch.log\(acc=…\)`"),
    ({"acc": np.ones(2)}, TypeError, r"`Watch.log\(acc=…\)`"),
]


@pytest.mark.parametrize("scalars,error,message", LOG_BAD, ids=[_id(b[0], 30) for b in LOG_BAD])
def test_log_bad_scalars(model, store, scalars, error, message):
    with gw.watch(model, store=store, name="logbad") as w:
        with pytest.raises(error, match=message):
            w.log(**scalars)


def test_log_accepts_numpy_scalars(model, store):
    with gw.watch(model, store=store, name="np") as w:
        model(torch.randn(2, 3)).sum().backward()
        w.log(acc=np.float32(0.5), n=np.int64(3))
    with w.open() as run:
        assert run.series("acc", "run").values.tolist() == [[0.5]]
        assert run.series("n", "run").values.tolist() == [[3.0]]


def test_log_after_close(model, store):
    w = gw.watch(model, store=store, name="late")
    w.close()
    with pytest.raises(RuntimeError, match=r"`Watch.log\(\)` after close\(\)"):
        w.log(loss=1.0)


def test_two_models_sharing_an_activation_module(store):
    act = nn.Tanh()
    a, b = nn.Sequential(nn.Linear(2, 2), act), nn.Sequential(nn.Linear(2, 2), act)
    with gw.watch(a, store=store, name="a"):
        with pytest.raises(RuntimeError, match=r"`watch\(model=…\)`: its module '1' \(Tanh\) is shared with a "
                                               r"model another watch holds"):
            gw.watch(b, store=store, name="b")
        assert _no_hooks(b[0])


# -- thresholds ------------------------------------------------------------------------------

THRESHOLDS_BAD = [
    (dict(window=2.5), TypeError, r"`Thresholds\(window=…\)` expects a positive int, got 2.5"),
    (dict(window=0), ValueError, r"`Thresholds\(window=…\)` expects a positive int, got 0"),
    (dict(window=-1), ValueError, r"`Thresholds\(window=…\)`"),
    (dict(window=True), TypeError, r"`Thresholds\(window=…\)`.*got True"),
    (dict(spike_after="10"), TypeError, r"`Thresholds\(spike_after=…\)` expects a positive int"),
    (dict(spike_window=0), ValueError, r"`Thresholds\(spike_window=…\)`"),
    (dict(vanish_below="1e-3"), TypeError, r"`Thresholds\(vanish_below=…\)` expects a positive finite number, got '1e-3'"),
    (dict(vanish_below=float("nan")), ValueError, r"`Thresholds\(vanish_below=…\)` expects a positive finite number, got nan"),
    (dict(vanish_below=0.0), ValueError, r"`Thresholds\(vanish_below=…\)`"),
    (dict(explode_above=float("inf")), ValueError, r"`Thresholds\(explode_above=…\)`.*got inf"),
    (dict(explode_above=-5), ValueError, r"`Thresholds\(explode_above=…\)`"),
    (dict(grad_norm_above=None), TypeError, r"`Thresholds\(grad_norm_above=…\)`"),
    (dict(saturated_above=1.5), ValueError, r"`Thresholds\(saturated_above=…\)` expects a fraction in \(0, 1\), got 1.5"),
    (dict(dead_above=0), ValueError, r"`Thresholds\(dead_above=…\)` expects a fraction"),
    (dict(skipped_above=2), ValueError, r"`Thresholds\(skipped_above=…\)`"),
    (dict(vanish_below=10.0), ValueError, r"`Thresholds\(vanish_below=…\)` expects a number below 1"),
    (dict(explode_above=0.5), ValueError, r"`Thresholds\(explode_above=…\)` expects a number above 1"),
]


@pytest.mark.parametrize("kwargs,error,message", THRESHOLDS_BAD, ids=[_id(b[0]) for b in THRESHOLDS_BAD])
def test_bad_thresholds(kwargs, error, message):
    with pytest.raises(error, match=message):
        gw.Thresholds(**kwargs)


def test_thresholds_accept_numpy_and_int_values():
    th = gw.Thresholds(window=np.int64(3), vanish_below=np.float32(1e-4), explode_above=100)
    assert th.window == 3


# -- reading back, reports ---------------------------------------------------------------


def test_report_path_must_be_html(model, store, tmp_path):
    with gw.watch(model, store=store, name="rep") as w:
        model(torch.randn(2, 3)).sum().backward()
    with pytest.raises(ValueError, match=r"`report\(path=…\)` expects a path ending in .html, got"):
        w.report(tmp_path / "r.txt")


def test_open_run_on_a_file_that_is_not_a_run(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("hello")
    with pytest.raises(gw.NotARunError, match=r"is not a gradwatch run \(not an SQLite file\)"):
        gw.open_run(f)


# -- the command line: one line on stderr, exit 2 -----------------------------------------

CLI_BAD = [
    (["diagnose", "{tmp}/missing"], r"gradwatch diagnose: `open_run\(path=…\)` expects a run directory"),
    (["report", "{tmp}/missing"], r"gradwatch report: `open_run\(path=…\)` expects a run directory"),
    (["diagnose", "{tmp}/text.txt"], r"gradwatch diagnose: `.*text.txt` is not a gradwatch run"),
    (["report", "{run}", "-o", "{tmp}/r.txt"], r"gradwatch report: `report\(path=…\)` expects a path ending in .html"),
    (["check", "nomodule_xyz:f", "--input-shape", "2,3"], r"gradwatch check: No module named 'nomodule_xyz'"),
    (["check", "{tmp}/none.py:f", "--input-shape", "2,3"], r"gradwatch check: no such file"),
    (["check", "nocolon", "--input-shape", "2,3"], r"gradwatch check: expects MODULE:FACTORY"),
    (["doctor", "zoo:no_such_setup"], r"gradwatch doctor: "),
    (["check", "{tmp}/f.py:not_a_model", "--input-shape", "2,3"], r"gradwatch check: .*f.py:not_a_model: "
                                                                   r"`check\(model=…\)` expects a torch.nn.Module"),
]


@pytest.mark.parametrize("argv,message", CLI_BAD, ids=[" ".join(a[0])[:40] for a in CLI_BAD])
def test_cli_user_mistakes_get_one_line(tmp_path, store, argv, message, capsys):
    from gradwatch.cli import main

    (tmp_path / "text.txt").write_text("hello")
    (tmp_path / "f.py").write_text("def not_a_model():\n    return 3\n")
    model = nn.Linear(2, 1)
    with gw.watch(model, store=store, name="cli") as w:
        model(torch.randn(2, 2)).sum().backward()
    argv = [a.format(tmp=tmp_path, run=w.path) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert re.search(message, err), err


# -- the callbacks: checked when the callback is made ---------------------------------------

CALLBACK_BAD = [
    (dict(every=0), ValueError, r"`GradwatchCallback\(every=…\)` expects a positive int"),
    (dict(activations="x"), TypeError, r"`GradwatchCallback\(activations=…\)`"),
    (dict(update_every=-1), ValueError, r"`GradwatchCallback\(update_every=…\)`"),
    (dict(store=1), TypeError, r"`GradwatchCallback\(store=…\)` expects a directory path"),
    (dict(name="a/b"), ValueError, r"`GradwatchCallback\(name=…\)`"),
    (dict(overwrite="no"), TypeError, r"`GradwatchCallback\(overwrite=…\)` expects True or False"),
]


@pytest.mark.parametrize("framework", ["lightning", "hf"])
@pytest.mark.parametrize("kwargs,error,message", CALLBACK_BAD, ids=[_id(b[0]) for b in CALLBACK_BAD])
def test_callback_bad_arguments(framework, kwargs, error, message, store, nothing_left):
    module = {"lightning": "gradwatch.integrations.lightning", "hf": "gradwatch.integrations.hf"}[framework]
    callback = pytest.importorskip(module).GradwatchCallback
    with pytest.raises(error, match=message):
        callback(**{"store": store, **kwargs})
    assert not store.exists()


def test_log_keeps_each_tensor_dtype_exactly(model, store):
    """Tensors of any dtype are kept as logged (float16, bfloat16 and float32 as they are until their batch is sent,
    integers cast): the stored values are the tensors' own, read back as float64 — the reference is ``float(t)``."""
    logged = {"f32": torch.tensor(0.1), "f16": torch.tensor(0.1, dtype=torch.float16),
              "bf16": torch.tensor([0.1], dtype=torch.bfloat16), "f64": torch.tensor(1 / 3, dtype=torch.float64),
              "i64": torch.tensor(7), "grad": torch.tensor(2.5, requires_grad=True) * 1.1}
    with gw.watch(model, store=store, name="dtypes") as w:
        model(torch.randn(2, 3)).sum().backward()
        w.log(**logged)
    with w.open() as run:
        for name, value in logged.items():
            assert run.series(name, "run").values.tolist() == [[float(value)]], name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_log_keeps_the_value_of_a_running_total_changed_in_place(model, store, dtype):
    """``total += loss`` changes the logged tensor in place after log(): each step keeps the value it logged."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    total = torch.zeros((), dtype=dtype)
    with gw.watch(model, opt, store=store, name="total") as w:
        for step in range(4):
            opt.zero_grad()
            model(torch.randn(2, 3)).sum().backward()
            opt.step()
            total += step + 1
            w.log(total=total)
    with w.open() as run:
        assert run.series("total", "run").values[0].tolist() == [1.0, 3.0, 6.0, 10.0]
