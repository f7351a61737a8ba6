"""The run store: readable after SIGKILL, read back as numpy arrays, written off the training thread."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
import torch
from torch import nn

import gradwatch as gw
from conftest import at_step

WRITER = textwrap.dedent(
    """
    import sys, torch, gradwatch as gw
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    w = gw.watch(model, opt, store=sys.argv[1], name="killed")
    step = 0
    while True:
        loss = model(torch.randn(16, 4)).pow(2).mean()
        opt.zero_grad(); loss.backward(); opt.step(); w.log(loss=loss)
        if step % 50 == 49:
            w.flush()  # committed: the parent may now kill us
            print(step, flush=True)
        step += 1
    """
)


def test_store_survives_sigkill(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        flushed = [int(proc.stdout.readline()) for _ in range(4)]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    run = gw.open_run(tmp_path / "killed")
    steps = set(run.records("grad_norm")["step"].tolist())
    assert set(range(flushed[-1] + 1)) <= steps  # every step committed before the kill
    assert run.meta["status"] == "running"  # it never closed
    assert run.layers == ["0", "2"]
    loss = run.series("loss", kind="run")
    assert np.isfinite(loss.values[0, : flushed[-1] + 1]).all()


def test_series_and_records(store):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    norms = []
    with gw.watch(model, opt, every=2, store=store, name="s") as w:
        for _ in range(5):
            opt.zero_grad()
            model(torch.randn(4, 3)).pow(2).sum().backward()
            norms.append([float(model[0].weight.grad.norm() ** 2 + model[0].bias.grad.norm() ** 2) ** 0.5,
                          float(model[2].weight.grad.norm() ** 2 + model[2].bias.grad.norm() ** 2) ** 0.5])
            opt.step()
    run = w.open()
    s = run.series("grad_norm")
    assert s.names == ["0", "2"]
    assert s.steps.tolist() == [0, 2, 4]
    np.testing.assert_allclose(s.values, np.array(norms)[[0, 2, 4]].T, rtol=1e-5)
    rec = run.records()
    assert set(rec) == {"step", "layer", "kind", "quantity", "value", "pos"}
    assert (rec["pos"] == -1).all()  # no positioned quantity in this run
    assert rec["step"].dtype == np.int64 and rec["value"].dtype == np.float64
    assert len({len(v) for v in rec.values()}) == 1
    assert run.meta["steps"] == 5 and run.meta["status"] == "closed"
    assert run.meta["torch"] == torch.__version__
    assert run.meta["seed"] == 0
    assert [l["name"] for l in run.meta["layers"]] == ["0", "2"]
    assert repr(run).startswith("Run(") and "2 layers" in repr(run)


def test_to_dataframe(store):
    pd = pytest.importorskip("pandas")
    model = nn.Linear(3, 1)
    with gw.watch(model, store=store, name="df") as w:
        model(torch.randn(2, 3)).sum().backward()
    df = w.open().to_dataframe()
    assert isinstance(df, pd.DataFrame)
    assert set(df["quantity"]) >= {"grad_norm", "nonfinite"}


def test_writes_happen_off_the_training_thread(store, monkeypatch):
    from gradwatch import store as store_mod

    threads = set()
    original = store_mod.StoreWriter._write_records

    def spy(self, payload):
        threads.add(threading.current_thread().name)
        return original(self, payload)

    monkeypatch.setattr(store_mod.StoreWriter, "_write_records", spy)
    model = nn.Linear(3, 1)
    with gw.watch(model, store=store, name="thr") as w:
        model(torch.randn(2, 3)).sum().backward()
    w.flush()
    assert threads == {"gradwatch-writer"}


def test_one_host_copy_per_recorded_step(store, monkeypatch):
    """Every value of a step reaches the writer as one tensor, not one .item() per parameter."""
    from gradwatch import store as store_mod

    calls = []
    original = store_mod.StoreWriter.records
    monkeypatch.setattr(store_mod.StoreWriter, "records",
                        lambda self, step, keys, values, ready=None, done=None: (calls.append((step, values.numel())),
                                                                                  original(self, step, keys, values, ready, done))[1])
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gw.watch(model, opt, activations=1, update_every=1, store=store, name="one") as w:
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(4, 3)).sum().backward()
            opt.step()
    assert [c[0] for c in calls] == [0, 1, 2]
    assert at_step(w.open(), "grad_norm", 2)
