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
    steps = set(run.records("loss")["step"].tolist())
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
    """Every value of a step reaches the writer as one tensor, not one .item() per parameter; the steps of a batch
    in one hand-over."""
    from gradwatch import store as store_mod

    calls = []
    original = store_mod.StoreWriter.steps
    monkeypatch.setattr(store_mod.StoreWriter, "steps",
                        lambda self, rows, ready=None: (calls.extend((step, len(keys), values.numel(), values.dim())
                                                                     for step, keys, values in rows),
                                                        original(self, rows, ready))[1])
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gw.watch(model, opt, activations=1, update_every=1, store=store, name="one") as w:
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(4, 3)).sum().backward()
            opt.step()
    assert [c[0] for c in calls] == [0, 1, 2]
    assert all(n_keys == n_values and dim == 1 for _, n_keys, n_values, dim in calls)
    assert at_step(w.open(), "grad_norm", 2)


# -- issue 14: read-only storage, stale name tables, stores that are not gradwatch runs ----------------

READ_BACK = textwrap.dedent(
    """
    import sys
    import gradwatch as gw
    from gradwatch.cli import main
    run_dir, out = sys.argv[1], sys.argv[2]
    with gw.open_run(run_dir) as run:
        print(run.meta["status"], len(run.records("grad_norm")["step"]), flush=True)
    assert main(["diagnose", run_dir]) == 0
    assert main(["report", run_dir, "-o", out]) == 0
    """
)


def test_a_finished_run_opens_from_read_only_storage(tmp_path_factory):
    import shutil
    import stat
    import tempfile

    base = tempfile.mkdtemp(prefix="gw-ro-")  # under /tmp, so that an unprivileged reader can reach it
    try:
        os.chmod(base, 0o755)
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
        with gw.watch(model, store=base, name="archived"):
            for _ in range(3):
                model(torch.randn(2, 3)).sum().backward()
        run_dir = os.path.join(base, "archived")
        out = os.path.join(base, "out")
        os.mkdir(out)
        os.chmod(out, 0o777)
        for f in os.listdir(run_dir):
            os.chmod(os.path.join(run_dir, f), stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
        os.chmod(run_dir, 0o555)  # read-only: no -wal or -shm can be created next to the file
        cmd = [sys.executable, "-c", READ_BACK, run_dir, os.path.join(out, "r.html")]
        if os.geteuid() == 0:  # root writes anywhere: read as nobody, with a system python of the same version
            py = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"
            if not (os.path.exists(py) and shutil.which("setpriv")):
                pytest.skip("running as root, and no setpriv or system python to read as an unprivileged user")
            import site

            path = os.pathsep.join([os.path.dirname(os.path.dirname(gw.__file__)), *site.getsitepackages()])
            cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "env", f"PYTHONPATH={path}",
                   "HOME=/tmp", "MPLCONFIGDIR=" + out, py, *cmd[1:]]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.splitlines()[0] == "closed 18"  # 3 steps × (2 layers + 4 parameters)
        assert os.path.getsize(os.path.join(out, "r.html")) > 1000
        assert sorted(os.listdir(run_dir)) == ["gradwatch.lock", "gradwatch.sqlite"]  # nothing written beside it
    finally:
        for root, dirs, _ in os.walk(base):
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o755)
        shutil.rmtree(base)


def test_a_run_held_open_during_training_sees_new_names(store):
    """A Run opened while training goes on must not raise KeyError on a name logged after it opened."""
    model = nn.Linear(3, 1)
    with gw.watch(model, store=store, name="stale") as w:
        model(torch.randn(2, 3)).sum().backward()
        run = w.open()
        w.log(acc=0.5)  # a new run-level entity and a new quantity
        model(torch.randn(2, 3)).sum().backward()
        w.flush()
        rec = run.records()
        assert "acc" in rec["layer"].tolist() and "acc" in rec["quantity"].tolist()
        assert run.series("acc", "run").values.tolist() == [[0.5]]
        run.close()


def test_series_of_a_quantity_never_recorded_names_the_recorded_ones(store):
    model = nn.Linear(3, 1)
    with gw.watch(model, store=store, name="typo") as w:
        model(torch.randn(2, 3)).sum().backward()
    with w.open() as run, pytest.raises(KeyError, match=r"`Run.series\(quantity=…\)` expects one of the recorded "
                                                        r"quantities \(.*grad_norm.*\), got 'grad_norms'"):
        run.series("grad_norms")


def _other_sqlite(path):
    import sqlite3

    con = sqlite3.connect(path)
    con.execute("CREATE TABLE t (x)")
    con.commit()
    con.close()


NOT_RUNS = {
    "text": lambda p: p.write_text("hello, I am a text file\n" * 50),
    "empty": lambda p: p.write_bytes(b""),
    "other-sqlite": _other_sqlite,
    "corrupt": lambda p: p.write_bytes(b"SQLite format 3\x00" + bytes(range(256)) * 8),
}


@pytest.mark.parametrize("kind", list(NOT_RUNS))
def test_a_store_that_is_not_a_gradwatch_run_is_named_as_such(tmp_path, kind, capsys):
    from gradwatch.cli import main

    run_dir = tmp_path / "r"
    run_dir.mkdir()
    NOT_RUNS[kind](run_dir / "gradwatch.sqlite")
    with pytest.raises(gw.NotARunError, match=rf"^`{run_dir}` is not a gradwatch run \(.+\)$"):
        gw.open_run(run_dir)
    for command in ("diagnose", "report"):
        assert main([command, str(run_dir)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"`{run_dir}` is not a gradwatch run" in err and "Traceback" not in err


def _watched_steps(store, name, steps=6, **kwargs):
    """A small watched run, and each step's parameter gradient norms read naively from ``param.grad``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    naive = []
    w = gw.watch(model, opt, store=store, name=name, **kwargs)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(4, 3)).pow(2).sum().backward()
        naive.append({n: p.grad.norm().item() for n, p in model.named_parameters()})
        opt.step()
    return w, naive


def test_packed_rows_are_one_per_step_and_read_back_as_the_gradients(store):
    """The store keeps one packed row per step (not one per value); read back, the values are the gradients'."""
    import sqlite3

    w, naive = _watched_steps(store, "packed")
    w.close()
    con = sqlite3.connect(w.path / "gradwatch.sqlite")
    assert con.execute("SELECT COUNT(*) FROM records").fetchone()[0] == 0
    assert sorted(r[0] for r in con.execute("SELECT step FROM packed")) == list(range(6))
    # a layout per set of families recorded (step 0 samples every family, the rest only gradient norms)
    assert con.execute("SELECT COUNT(*) FROM layouts").fetchone()[0] == 2
    con.close()
    rec = gw.open_run(w.path).records("grad_norm", "param")
    for step, values in enumerate(naive):
        at = rec["step"] == step
        got = dict(zip(rec["layer"][at].tolist(), rec["value"][at].tolist()))
        assert got == pytest.approx(values, rel=1e-6)
    assert (np.diff(rec["step"]) >= 0).all()  # step order, as the flat table's reads were


def test_a_store_written_flat_before_packing_reads_as_before(store):
    """A run written row by row into ``records`` (stores before the packed layout) reads back the same records."""
    import sqlite3

    w, _ = _watched_steps(store, "flat")
    w.close()
    packed = gw.open_run(w.path).records()
    con = sqlite3.connect(w.path / "gradwatch.sqlite")
    rows = [(int(s), int(e), int(q), None if np.isnan(v) else float(v), None if p < 0 else int(p))
            for s, e, q, v, p in _rows_with_ids(w.path, packed)]
    con.executemany("INSERT INTO records (step, entity, quantity, value, pos) VALUES (?, ?, ?, ?, ?)", rows)
    con.execute("DROP TABLE packed")
    con.execute("DROP TABLE layouts")
    con.commit()
    con.close()
    flat = gw.open_run(w.path).records()
    for key in ("step", "layer", "kind", "quantity", "pos"):
        assert flat[key].tolist() == packed[key].tolist()
    np.testing.assert_array_equal(flat["value"], packed["value"])


def _rows_with_ids(path, rec):
    import sqlite3

    con = sqlite3.connect(path / "gradwatch.sqlite")
    ents = {(n, k): i for i, n, k in con.execute("SELECT id, name, kind FROM entities")}
    qty = {n: i for i, n in con.execute("SELECT id, name FROM quantities")}
    con.close()
    return zip(rec["step"], [ents[(n, k)] for n, k in zip(rec["layer"], rec["kind"])],
               [qty[q] for q in rec["quantity"]], rec["value"], rec["pos"])


def test_a_run_held_open_reads_the_steps_written_since(store):
    """A Run opened mid-training reads only new packed rows on the next call, and agrees with a fresh one."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gw.watch(model, opt, store=store, name="live") as w:
        def train(n):
            for _ in range(n):
                opt.zero_grad()
                model(torch.randn(4, 3)).pow(2).sum().backward()
                opt.step()
            w.flush()

        train(3)
        run = w.open()
        assert sorted(set(run.records("grad_norm")["step"].tolist())) == [0, 1, 2]
        train(4)
        held = run.records()
        fresh = w.open().records()
        assert sorted(set(held["step"].tolist())) == list(range(7))
        for key in held:
            assert held[key].tolist() == fresh[key].tolist()
        run.close()


def test_undefined_values_are_left_out_when_read(store):
    """An update ratio of a zero weight is NaN ("undefined"): stored in the step's row, left out when read; a NaN
    gradient norm is a finding and is read back."""
    model = nn.Linear(3, 1)
    with torch.no_grad():
        model.weight.zero_()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with gw.watch(model, opt, update_every=1, store=store, name="nan") as w:
        opt.zero_grad()
        model(torch.tensor([[float("nan"), 1.0, 1.0]])).sum().backward()
        opt.step()
    run = w.open()
    assert not np.isnan(run.records("update_ratio")["value"]).any()
    assert np.isnan(run.records("grad_norm", "param")["value"]).any()


def test_a_quantity_held_by_one_kind_reads_without_naming_it(store):
    """`series("saturated_frac")` of a functional tanh (an activation, not a layer) and `series("loss")` (the run's)
    read without `kind=`: the same matrices as with it, the tanh's against a count by hand of tanh' = 1 − y² below
    2 % of its peak; a quantity of layers still reads as the layers'."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 16), nn.Linear(16, 1)

        def forward(self, x):
            self.h = self.a(x)
            return self.b(torch.tanh(self.h))

    torch.manual_seed(0)
    model = Net()
    nn.init.normal_(model.a.weight, std=3.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    by_hand = []
    with gw.watch(model, opt, store=store, name="kinds") as w:
        for _ in range(3):
            loss = model(torch.randn(32, 4)).pow(2).mean()
            by_hand.append(float(((1 - torch.tanh(model.h.detach()) ** 2) < 0.02).double().mean()))
            opt.zero_grad(); loss.backward(); opt.step(); w.log(loss=loss)
    run = w.open()
    sat = run.series("saturated_frac")
    assert sat.names == run.series("saturated_frac", "activation").names == ["a.tanh()"]
    assert sat.values[0].tolist() == pytest.approx([by_hand[t] for t in sat.steps], abs=1e-9) and by_hand[0] > 0.2
    assert np.array_equal(run.series("loss").values, run.series("loss", "run").values)
    assert run.series("grad_norm").names == ["a", "b"]
    assert run.series("saturated_frac", "layer").names == []  # asked for by kind: what that kind holds
