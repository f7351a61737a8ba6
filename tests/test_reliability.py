"""Regression tests for the reliability sweep (issue 14): nothing lost, nothing misleading."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import gradwatch as gw


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))


def _train(w: gw.Watch, model: nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(8, 3)).pow(2).mean().backward()
        opt.step()


def test_overwrite_refuses_a_run_another_watch_in_this_process_is_writing(store):
    a_model, b_model = _model(), _model()
    a_opt = torch.optim.SGD(a_model.parameters(), lr=0.1)
    a = gw.watch(a_model, a_opt, store=store, name="live")
    _train(a, a_model, a_opt, 3)
    with pytest.raises(FileExistsError, match=rf"run 'live' in .* is being written by process {os.getpid()}"):
        gw.watch(b_model, store=store, name="live", overwrite=True)
    assert all(not m._forward_hooks for m in b_model.modules())
    _train(a, a_model, a_opt, 2)
    a.close()
    run = gw.open_run(store / "live")
    assert run.meta["steps"] == 5 and sorted(set(run.records("grad_norm")["step"].tolist())) == [0, 1, 2, 3, 4]
    run.close()
    gw.watch(b_model, store=store, name="live", overwrite=True).close()  # finished: replacing it is fine


HOLDER = textwrap.dedent(
    """
    import sys, time, torch, gradwatch as gw
    w = gw.watch(torch.nn.Linear(2, 1), store=sys.argv[1], name="held")
    print("ready", flush=True)
    sys.stdin.readline()
    w.close()
    """
)


def test_overwrite_refuses_a_run_another_process_is_writing(store):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(store)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        with pytest.raises(FileExistsError, match=rf"run 'held' .* is being written by process {proc.pid}"):
            gw.watch(_model(), store=store, name="held", overwrite=True)
        with pytest.raises(FileExistsError, match=rf"being written by process {proc.pid}"):
            gw.watch(_model(), store=store, name="held")
    finally:
        proc.communicate("\n", timeout=60)
    assert proc.returncode == 0
    with gw.open_run(store / "held") as run:
        assert run.meta["status"] == "closed"


def test_a_watch_killed_while_creating_its_store_leaves_no_husk(store, monkeypatch):
    """Death between the file's creation and its schema: no store that cannot open, and the name stays free."""
    from gradwatch import store as store_mod

    real = store_mod._connect

    def dies_after_creating(path):
        real(path).close()  # the file now exists, empty
        raise KeyboardInterrupt  # the process goes down here

    monkeypatch.setattr(store_mod, "_connect", dies_after_creating)
    with pytest.raises(KeyboardInterrupt):
        gw.watch(_model(), store=store, name="husk")
    monkeypatch.setattr(store_mod, "_connect", real)
    with pytest.raises(FileNotFoundError):
        gw.open_run(store / "husk")
    gw.watch(_model(), store=store, name="husk").close()  # the name is free: no overwrite needed
    with gw.open_run(store / "husk") as run:
        assert run.meta["status"] == "closed"


class _Named(nn.Module):
    """Layers whose names are rich markup and matplotlib mathtext."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleDict({"head[cls]": nn.Linear(3, 4), "x[/y]": nn.Linear(4, 4),
                                     "[link=file:///etc/passwd]l[/link]": nn.Linear(4, 4), r"$\frac{$": nn.Linear(4, 1)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers.values():
            x = torch.tanh(layer(x))
        return x


def _named_run(store):
    torch.manual_seed(0)
    model = _Named()
    with gw.watch(model, store=store, name="names", activations=1) as w:
        for _ in range(3):
            model(torch.randn(4, 3)).sum().backward()
    return w


def test_layer_names_are_not_parsed_as_rich_markup(store):
    from rich.console import Console

    from gradwatch.report.terminal import render

    w = _named_run(store)
    text = w.summary()
    for name in ("head[cls]", "x[/y]", "[link=file:///etc/passwd]l[/link]"):
        assert f"layers.{name}" in text
    console = Console(record=True, width=200, force_terminal=True, file=__import__("io").StringIO())
    with w.open() as run:
        render(run, w.diagnose(), console)
    assert "file:///etc/passwd" not in "".join(str(s.style) for s in console._record_buffer if s.style)


def test_mathtext_in_a_layer_name_does_not_break_the_report(store, tmp_path):
    w = _named_run(store)
    html = w.report(tmp_path / "r.html").read_text()
    assert "frac" in html and 'id="heatmap"' in html


def _private_run(tmp_path, monkeypatch):
    work = tmp_path / "home" / "someuser" / "project"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    model = _model()
    with gw.watch(model, store=work / "runs", name="private") as w:
        model(torch.randn(2, 3)).sum().backward()
    return w, work


def test_the_html_report_embeds_no_absolute_path(tmp_path, monkeypatch):
    w, work = _private_run(tmp_path, monkeypatch)
    html = w.report(tmp_path / "r.html").read_text()
    assert str(tmp_path) not in html and "someuser" not in html
    assert "private" in html and "runs/private" in html  # the name and the path relative to the working directory


def test_a_redacted_html_report_drops_even_the_relative_path(tmp_path, monkeypatch):
    from gradwatch.cli import main

    w, work = _private_run(tmp_path, monkeypatch)
    html = w.report(tmp_path / "r.html", redact=True).read_text()
    assert "runs/" not in html and "private" not in html and str(tmp_path) not in html
    assert main(["report", str(w.path), "-o", str(tmp_path / "c.html"), "--redact"]) == 0
    assert "private" not in (tmp_path / "c.html").read_text()
    with pytest.raises(TypeError, match=r"`Watch.report\(redact=…\)` expects True or False, got 'yes'"):
        w.report(tmp_path / "x.html", redact="yes")


def test_after_a_writer_failure_the_status_says_failed(store, monkeypatch):
    from gradwatch import store as store_mod

    def full(self, payload):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store_mod.StoreWriter, "_write_records", full)
    model = _model()
    with pytest.warns(gw.GradwatchWarning, match="stopped recording"):
        with gw.watch(model, store=store, name="full") as w:
            for _ in range(3):
                model(torch.randn(2, 3)).sum().backward()
                w.flush() if _ == 0 else None
    with gw.open_run(store / "full") as run:
        assert run.meta["status"].startswith("failed: OSError") and "No space left" in run.meta["status"]


def _open_fds(path_part: str) -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if path_part in target:
            out.append(target)
    return out


def _writer_threads() -> int:
    import threading

    return sum(t.name == "gradwatch-writer" for t in threading.enumerate())


def test_a_watch_dropped_without_close_leaks_no_thread_or_file(store):
    import gc

    before = _writer_threads()

    def train_and_forget():
        model = _model()
        w = gw.watch(model, store=store, name="dropped")
        model(torch.randn(2, 3)).sum().backward()
        assert _writer_threads() == before + 1

    train_and_forget()
    gc.collect()
    assert _writer_threads() == before
    assert _open_fds(str(store)) == []
    with gw.open_run(store / "dropped") as run:
        assert run.meta["status"].startswith("not closed")


class _Sign(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.sign()

    @staticmethod
    def backward(ctx, g):
        return g


class _Functional(nn.Module):
    """Activations called as functions, a residual sum in forward, a user's autograd.Function between layers."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, 8), nn.Linear(8, 8), nn.Linear(8, 1)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        h = h + torch.tanh(self.b(h))
        return self.c(_Sign.apply(h))


class _Unrolled(nn.Module):
    """A cell called once per time step (a loop the watch follows through time) and an LSTM."""

    def __init__(self) -> None:
        super().__init__()
        self.cell, self.lstm, self.out = nn.RNNCell(3, 8), nn.LSTM(8, 8, batch_first=True), nn.Linear(8, 1)

    def forward(self, x):
        h, hs = torch.zeros(x.shape[0], 8), []
        for _ in range(5):
            h = self.cell(x, h)
            hs.append(h)
        y, _ = self.lstm(torch.stack(hs, 1))
        return self.out(y[:, -1])


@pytest.mark.parametrize("make", [_model, _Functional, _Unrolled], ids=["sequential", "functional", "unrolled"])
def test_a_watch_dropped_between_forward_and_backward_leaks_no_thread(store, make):
    """The watch's hooks sit on the pass's graph, and its probes hold nodes of that graph until the step ends: a
    strong hook would close a cycle through autograd's C++ nodes that the collector cannot see, and a watch dropped
    before the backward (an exception in the user's loop) would keep its writer thread for ever."""
    import gc

    before = _writer_threads()

    def forward_and_forget():
        model = make()
        gw.watch(model, store=store, name="mid-step")
        model(torch.randn(4, 3)).sum()
        assert _writer_threads() == before + 1

    forward_and_forget()
    gc.collect()
    assert _writer_threads() == before


def test_summary_leaves_no_file_open(store):
    model = _model()
    with gw.watch(model, store=store, name="sum") as w:
        model(torch.randn(2, 3)).sum().backward()
    import gc
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        w.summary()
        gc.collect()
    assert not [c for c in caught if issubclass(c.category, ResourceWarning)]


def test_concurrent_starts_of_one_name_give_one_run_and_file_exists_errors(store):
    import threading
    import warnings

    results: list[object] = []
    barrier = threading.Barrier(8)

    def start():
        model = _model()
        barrier.wait()
        try:
            results.append(gw.watch(model, store=store, name="race"))
        except FileExistsError as exc:
            results.append(exc)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        threads = [threading.Thread(target=start) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        watches = [r for r in results if isinstance(r, gw.Watch)]
        for w in watches:
            w.close()
    assert len(results) == 8 and len(watches) == 1
    assert all(isinstance(r, FileExistsError) for r in results if r is not watches[0])


# One parent imports gradwatch once and forks a writer per line it reads ("store fifo"): the writer reports on the
# fifo; the parent prints the writer's pid, then its wait status once it is gone. (A fresh interpreter per writer
# spent ~2 s of each kill importing torch.) Nothing runs a torch kernel before the fork.
KILLED_WRITER = textwrap.dedent(
    """
    import os, sys, torch, gradwatch as gw
    for line in sys.stdin:
        store, fifo = line.split()
        pid = os.fork()
        if pid == 0:
            out = open(fifo, "w", buffering=1)
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
            opt = torch.optim.SGD(model.parameters(), lr=0.01)
            print("start", file=out)
            w = gw.watch(model, opt, store=store, name="k")
            step = 0
            while True:
                loss = model(torch.randn(16, 4)).pow(2).mean()
                opt.zero_grad(); loss.backward(); opt.step(); w.log(loss=loss)
                if step % 5 == 4:
                    w.flush()
                    print(step, file=out)  # every step up to here is committed
                step += 1
        print(pid, flush=True)
        print(os.waitpid(pid, 0)[1], flush=True)
    """
)


def test_a_writer_killed_at_20_random_moments_leaves_a_store_that_opens_or_none(tmp_path):
    """Crash safety: SIGKILL at random moments from gw.watch() on, ten of them in its first 50 ms."""
    import random
    import selectors
    import signal
    import time

    rng = random.Random(14)
    delays = [rng.uniform(0, 0.05) for _ in range(10)] + [rng.uniform(0.05, 0.6) for _ in range(10)]
    outcomes = {"absent": 0, "opened": 0}
    parent = subprocess.Popen([sys.executable, "-c", KILLED_WRITER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        for i, delay in enumerate(delays):
            store, fifo = tmp_path / str(i), tmp_path / f"{i}.fifo"
            os.mkfifo(fifo)
            parent.stdin.write(f"{store} {fifo}\n")
            parent.stdin.flush()
            pid = int(parent.stdout.readline())
            with open(fifo) as report:
                assert report.readline().strip() == "start"
                sel = selectors.DefaultSelector()
                sel.register(report, selectors.EVENT_READ)
                flushed = -1
                deadline = time.monotonic() + delay
                while (left := deadline - time.monotonic()) > 0:
                    if sel.select(left):
                        line = report.readline()
                        if line:
                            flushed = int(line)
                os.kill(pid, signal.SIGKILL)
                flushed = max([flushed, *(int(x) for x in report.read().split())])
            status = int(parent.stdout.readline())
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
            try:
                run = gw.open_run(store / "k")
            except FileNotFoundError:
                assert flushed == -1, (i, delay, "store absent although steps were flushed")
                outcomes["absent"] += 1
                gw.watch(_model(), store=store, name="k").close()  # and the name is free
                continue
            with run:
                assert run.meta["status"] == "running"
                if flushed >= 0:
                    steps = set(run.records("loss")["step"].tolist())
                    assert set(range(flushed + 1)) <= steps, (i, delay, flushed)
            outcomes["opened"] += 1
    finally:
        parent.stdin.close()
        parent.wait(timeout=30)
    assert sum(outcomes.values()) == 20


def test_two_steps_with_no_forward_between_them_get_their_own_step_numbers(store):
    model = _model()
    with gw.watch(model, store=store, name="twice") as w:  # a step is a backward pass
        for _ in range(3):
            loss = model(torch.randn(4, 3)).pow(2).mean()
            loss.backward(retain_graph=True)
            loss.backward()
    with w.open() as run:
        rec = run.records("grad_norm", "layer")
        assert rec["step"].tolist() == [s for s in range(6) for _ in range(2)]  # 2 layers a step, once each
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gw.watch(model, opt, store=store, name="steps") as w:  # a step is an optimizer step
        for _ in range(3):
            model(torch.randn(4, 3)).pow(2).mean().backward()
            opt.step()
            opt.step()  # no forward between the two
    with w.open() as run:
        assert run.records("grad_norm", "layer")["step"].tolist() == [s for s in range(6) for _ in range(2)]
        assert run.meta["steps"] == 6


def test_a_gradient_penalty_does_not_inflate_out_grad_norm(store):
    """The tensor hooks also fire in autograd.grad(create_graph=True); only the backward that fills .grad counts."""
    model = _model()
    outputs: dict[str, torch.Tensor] = {}
    for name in ("0", "2"):
        model.get_submodule(name).register_forward_hook(lambda m, a, out, name=name: outputs.__setitem__(name, out))
    x = torch.randn(8, 3, requires_grad=True)
    with gw.watch(model, store=store, name="penalty", activations=1) as w:
        out = model(x)
        (g,) = torch.autograd.grad(out.sum(), x, create_graph=True)
        loss = out.pow(2).mean() + g.pow(2).sum()
        reference = torch.autograd.grad(loss, [outputs["0"], outputs["2"]], retain_graph=True)
        loss.backward()
    with w.open() as run:
        got = {k: v for k, v in zip(run.records("out_grad_norm")["layer"], run.records("out_grad_norm")["value"])}
    assert got["0"] == pytest.approx(float(reference[0].norm()), rel=1e-6)
    assert got["2"] == pytest.approx(float(reference[1].norm()), rel=1e-6)


def test_a_validation_forward_with_grad_enabled_does_not_enter_the_sampled_step(store):
    """Activation statistics come from the forward whose backward completes the step, not an eval() pass before it."""
    def run(name, validate):
        model = _model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(1)
        with gw.watch(model, opt, store=store, name=name, activations=2) as w:
            for step in range(3):
                x = torch.randn(8, 3, generator=g)
                if validate:
                    model.eval()
                    model(x * 1000)  # saturates every tanh unit; no backward, no no_grad
                    model.train()
                opt.zero_grad()
                model(x).pow(2).mean().backward()
                opt.step()
        with w.open() as r:
            return {q: r.series(q, "activation").values.tolist() for q in ("saturated_frac", "act_mean", "act_std")}

    clean, validated = run("clean", False), run("validated", True)
    assert clean["saturated_frac"] == [[0.0, 0.0]]
    assert validated == clean
