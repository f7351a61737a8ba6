"""gw.doctor's trials in parallel (issue 17): the same table in this process, on a local process pool and on Ray;
a killed worker is a failed row; every trial's run store opens afterwards; Ctrl-C returns the partial table.

The set-ups are module-level functions (and partials of them), so that they pickle by name: spawned pool workers
find this module through the ``sys.path`` that ``spawn`` hands them, Ray workers through the ``PYTHONPATH`` that
the module's one Ray cluster gives them. The reference for every parallel table is the serial one, computed in
this process by the same seeds.
"""

from __future__ import annotations

import functools
import math
import os
import re
import signal
import sys
import tempfile
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from torch import nn

import gradwatch as gw
from gradwatch.doctor.execute import DIED

STEPS = 20  # the tiny set-up's vanishing and stalled findings are there by step 20, and a trial takes ~0.2 s
DRIVER = os.getpid()


def _batches(x: torch.Tensor, y: torch.Tensor, seed: int):
    g = torch.Generator().manual_seed(seed)
    while True:
        idx = torch.randint(0, len(x), (32,), generator=g)
        yield x[idx], y[idx]


def tiny(seed: int) -> gw.Trial:
    """A 12-layer tanh MLP (width 16, default init) on random 4-class data, its first two layers in a parameter
    group at learning rate 1e-7: vanishing *and* stalled, so that no single remedy removes both and iterative
    repair runs a second round."""
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(256, 16, generator=g)
    y = (x @ torch.randn(16, 4, generator=g)).argmax(1)
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for _ in range(12):
        layers += [nn.Linear(16, 16), nn.Tanh()]
    model = nn.Sequential(*layers, nn.Linear(16, 4))
    first = [p for m in list(model)[:4] for p in m.parameters()]
    rest = [p for m in list(model)[4:] for p in m.parameters()]
    opt = torch.optim.SGD([{"params": first, "lr": 1e-7}, {"params": rest, "lr": 0.1}])
    return gw.Trial(model, opt, _batches(x, y, seed), nn.functional.cross_entropy)


NORM_LABEL = "LayerNorm/BatchNorm before activations"


def _has_norm(model: nn.Module) -> bool:
    return any(isinstance(m, (nn.LayerNorm, nn.BatchNorm1d)) for m in model.modules())


class _Sabotaged(gw.Trial):
    """The tiny trial whose step 3, once the normalisation remedy is in its model, does ``act`` (outside the
    process ``driver`` only, when ``worker_only``)."""

    act: str = ""
    driver: int = 0
    steps: int = 0

    def step(self) -> torch.Tensor:
        self.steps += 1
        if self.steps == 3 and _has_norm(self.model):
            if self.act == "kill" and os.getpid() != self.driver:
                os.kill(os.getpid(), signal.SIGKILL)  # the worker dies mid-trial, as from the OOM killer
            if self.act == "interrupt":
                os.kill(self.driver, signal.SIGINT)  # Ctrl-C at the driver, while this trial runs
        return super().step()


def sabotaged(act: str, driver: int, seed: int) -> gw.Trial:
    t = tiny(seed)
    trial = _Sabotaged(t.model, t.optimizer, t.batches, t.loss_fn)
    trial.act, trial.driver = act, driver
    return trial


def _rows(report: gw.DoctorReport) -> list:
    return [report.baseline] + report.trials


def _assert_same_row(got, want) -> None:
    assert (got.label, got.verdict, got.findings, got.rounds, got.parts) == \
        (want.label, want.verdict, want.findings, want.rounds, want.parts)
    for field in ("first_loss", "final_loss", "auc", "score"):
        a, b = getattr(got, field), getattr(want, field)
        assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-6), (got.label, field)


def _assert_same_table(got: gw.DoctorReport, want: gw.DoctorReport) -> None:
    assert got.message == want.message
    assert len(_rows(got)) == len(_rows(want)), f"{got}\n\n{want}"
    for a, b in zip(_rows(got), _rows(want)):
        _assert_same_row(a, b)


def _assert_stores_open(report: gw.DoctorReport, store: Path) -> None:
    """Every row's run store opens, and the loss it holds is the loss the row's first loss was read from."""
    for row in _rows(report):
        if row.error:
            continue
        assert row.runs, row.label
        for name in row.runs:
            with gw.open_run(store / name) as run:
                loss = run.series("loss", kind="run").values[0]
                assert len(loss) == STEPS
        with gw.open_run(store / row.runs[0]) as run:  # one seed: the row's first loss is that run's first
            assert float(run.series("loss", kind="run").values[0][0]) == pytest.approx(row.first_loss, rel=1e-6)


@pytest.fixture(scope="module")
def serial() -> gw.DoctorReport:
    report = gw.doctor(tiny, steps=STEPS, progress=False)
    # what this module tests: a second round of iterative repair, and a normalisation row to sabotage
    assert max(t.rounds for t in report.trials) >= 2 and NORM_LABEL in [t.label for t in report.trials], str(report)
    return report


# --- a local process pool ---------------------------------------------------------------------------------


def test_a_process_pool_gives_the_serial_table_and_every_trials_store(serial, tmp_path):
    # the set-up as a reference to a file of the user's, which each worker imports
    source = tmp_path / "mine.py"
    source.write_text(f"import sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
                      "from test_doctor_parallel import tiny as make_setup\n")
    report = gw.doctor(f"{source}:make_setup", steps=STEPS, progress=False, workers=2, store=tmp_path / "runs")
    _assert_same_table(report, serial)
    _assert_stores_open(report, tmp_path / "runs")


@pytest.mark.slow  # (over 20 min of CI on an AVX2 EPYC with it: `make test-slow` runs it)
def test_a_killed_pool_worker_is_a_failed_row_and_the_rest_of_the_table_stands(serial):
    report = gw.doctor(functools.partial(sabotaged, "kill", os.getpid()), steps=STEPS, progress=False, workers=2)
    rows = {t.label: t for t in report.trials}
    killed = rows.pop(NORM_LABEL)
    assert killed.error == DIED and killed.verdict == f"failed: {DIED}" and math.isnan(killed.final_loss)
    _assert_same_row(report.baseline, serial.baseline)
    first_round = [t for t in serial.trials if t.rounds == 1 and t.label != NORM_LABEL]
    assert first_round and all(t.label in rows for t in first_round)  # the pool's other trials were rerun, not lost
    for want in first_round:
        _assert_same_row(rows[want.label], want)
    assert NORM_LABEL in str(report) and "failed: the worker process died" in str(report)


class _Plain(Executor):
    """An executor of the user's that says nothing of its capacity (as Dask's and submitit's do not)."""

    def __init__(self) -> None:
        self._inner = ThreadPoolExecutor(1)

    def submit(self, fn, /, *args, **kwargs):
        return self._inner.submit(fn, *args, **kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._inner.shutdown(wait, cancel_futures=cancel_futures)


class _Slow(_Plain):
    """The same, each task starting 0.2 s late: a round of the tiny set-up's ~0.05 s trials outlasts a budget."""

    def submit(self, fn, /, *args, **kwargs):
        def late():
            time.sleep(0.2)
            return fn(*args, **kwargs)

        return super().submit(late)


def test_an_executor_of_your_own_gives_the_serial_table_and_ships_the_stores_back(serial, tmp_path):
    with _Plain() as executor:
        report = gw.doctor(tiny, steps=STEPS, progress=False, workers=executor, store=tmp_path)
        _assert_same_table(report, serial)
        _assert_stores_open(report, tmp_path)
    # all of a round is submitted at once; past the budget, what has not started is cancelled (the round's ~17
    # trials take 0.25 s each here, the budget leaves 0.3 s after the baseline: a few start at most)
    with _Slow() as executor:
        cut = gw.doctor(tiny, steps=STEPS, progress=False, workers=executor, budget_s=report.baseline.seconds + 0.5)
    assert "stopped at the time budget" in cut.message and len(cut.trials) < len(report.trials)
    # the message says how many round-1 remedies ran, of how many (round 16: "16 remedies in round 1" beside 12
    # rows): at least the rows shown (a remedy that found nothing to change ran, and has none), at most them all
    ran, of = map(int, re.search(r"(\d+) of the (\d+) remedies of round 1 tried", cut.message).groups())
    assert sum(1 for t in cut.trials if t.rounds == 1) <= ran <= of
    for got, want in zip(cut.trials, report.trials):
        _assert_same_row(got, want)


def test_a_set_up_the_workers_cannot_receive_is_refused_with_how_to_ship_it(monkeypatch):
    with pytest.raises(ValueError, match=r"`doctor\(setup=…\)` expects a set-up the workers can import.*"
                                         r"'path/to/file\.py:make_setup'.*does not pickle"):
        gw.doctor(lambda seed: tiny(seed), steps=STEPS, workers=2)
    # a function of an interactive session: it pickles by name, but a spawned worker has no __main__ file to import
    main = type(sys)("__main__")
    monkeypatch.setitem(sys.modules, "__main__", main)

    def make_setup(seed: int) -> gw.Trial:
        return tiny(seed)

    make_setup.__module__, make_setup.__qualname__ = "__main__", "make_setup"
    main.make_setup = make_setup  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match=r"interactive session"):
        gw.doctor(make_setup, steps=STEPS, workers=2)
    with pytest.raises(ValueError, match=r"`doctor\(setup=…\)`.*no such file"):
        gw.doctor("no/such/file.py:make_setup", workers=2)
    with pytest.raises(ValueError, match=r"`doctor\(workers=…\)` expects a positive int, 'ray'"):
        gw.doctor(tiny, workers=0)
    with pytest.raises(ValueError, match=r"`doctor\(ray_resources=…\)`.*with workers='ray'"):
        gw.doctor(tiny, workers=2, ray_resources={"num_cpus": 1})


@pytest.fixture
def ctrl_c_raises():
    """Ctrl-C as a terminal delivers it: SIGINT raises KeyboardInterrupt in the main thread. (In a full run some
    earlier test in the same worker process left another SIGINT handler in place, and the signal was lost: the
    doctor ran to its end.)"""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


@pytest.mark.parametrize("workers", [1, 2])
def test_ctrl_c_returns_the_partial_table(serial, workers, ctrl_c_raises):
    assert NORM_LABEL in [t.label for t in serial.trials]  # the trial that presses Ctrl-C runs at all
    report = gw.doctor(functools.partial(sabotaged, "interrupt", os.getpid()), steps=STEPS, progress=False,
                       workers=workers)
    assert "interrupted by Ctrl-C" in report.message and "partial" in report.message
    _assert_same_row(report.baseline, serial.baseline)
    want = {t.label: t for t in serial.trials}
    assert NORM_LABEL not in [t.label for t in report.trials] and len(report.trials) < len(serial.trials)
    for row in report.trials:  # what finished before Ctrl-C is what the serial run measured
        _assert_same_row(row, want[row.label])
    if workers == 1:  # in this process, the trials before the interrupted one are all there, in order
        labels = [t.label for t in serial.trials]
        assert [t.label for t in report.trials] == labels[:labels.index(NORM_LABEL)]


def test_a_failing_trial_in_this_process_is_a_row_too(serial, monkeypatch):
    from gradwatch.doctor import trial_run

    real = trial_run.run_trial

    def run(setup, seed, steps, store, name, remedy, numbers):
        if remedy is not None and remedy.label == NORM_LABEL:
            raise FloatingPointError("boom\nsecond line")
        return real(setup, seed, steps, store, name, remedy, numbers)

    monkeypatch.setattr(trial_run, "run_trial", run)
    report = gw.doctor(tiny, steps=STEPS, progress=False)
    row = next(t for t in report.trials if t.label == NORM_LABEL)
    assert row.error == "FloatingPointError: boom" and row.verdict == "failed: FloatingPointError: boom"
    assert [t.label for t in report.trials if t.rounds == 1] == [t.label for t in serial.trials if t.rounds == 1]


# --- Ray: one local cluster of 2 CPUs for the module ------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    here = str(Path(__file__).parent)  # this module, importable in the Ray workers too
    path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH", "")) if p)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": path}})
    yield ray
    ray.shutdown()


@pytest.mark.slow  # one Ray test in make test (the CLI's), this one in make test-slow (CI's 20 minutes)
def test_ray_gives_the_serial_table_and_ships_every_trials_store_back(serial, ray_cluster, tmp_path):
    report = gw.doctor(tiny, steps=STEPS, progress=False, workers="ray", ray_resources={"num_cpus": 1}, store=tmp_path)
    _assert_same_table(report, serial)
    _assert_stores_open(report, tmp_path)
    assert ray_cluster.is_initialized()  # the doctor leaves a cluster it did not start running


def _trial_dirs() -> set[Path]:
    # a trial's own directory at the top of the temporary directory: left only by a worker killed mid-trial (the
    # doctors' scratch directories, gradwatch-doctor-*, come and go with the doctors other tests run meanwhile)
    return set(Path(tempfile.gettempdir()).glob("gradwatch-trial-*"))


@pytest.mark.slow  # (over 20 min of CI on an AVX2 EPYC with it: `make test-slow` runs it)
def test_a_killed_ray_worker_is_a_failed_row(serial, ray_cluster):
    before = _trial_dirs()
    report = gw.doctor(functools.partial(sabotaged, "kill", os.getpid()), steps=STEPS, progress=False, workers="ray")
    # the killed worker could not remove its trial's directory: it was under the doctor's, which the doctor removed
    assert _trial_dirs() <= before
    rows = {t.label: t for t in report.trials}
    killed = rows.pop(NORM_LABEL)
    assert killed.error.startswith(DIED) and killed.verdict.startswith("failed: the worker process died")
    for want in [t for t in serial.trials if t.rounds == 1 and t.label != NORM_LABEL]:
        _assert_same_row(rows[want.label], want)


@pytest.mark.slow  # (50–65 s: make test-slow, CI's 20 minutes on 2 cores)
def test_cli_doctor_on_ray_stores_the_runs_that_gradwatch_report_opens(serial, ray_cluster, tmp_path, capsys):
    from gradwatch.cli import main

    source = tmp_path / "mine.py"
    source.write_text(f"import sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
                      "from test_doctor_parallel import tiny as make_setup\n")
    store = tmp_path / "runs"
    assert main(["doctor", f"{source}:make_setup", "--steps", str(STEPS), "--ray", "--cpus-per-trial", "1",
                 "--store", str(store)]) == 0
    out = capsys.readouterr().out
    assert serial.message in out and f"gradwatch report {store / 'baseline-0'}" in out
    assert main(["report", str(store / serial.trials[-1].runs[0])]) == 0  # a trial from the last round
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize("argv,error", [
    (["--workers", "0"], r"--workers: expects a positive int"),
    (["--workers", "2", "--ray"], r"not allowed with argument"),
    (["--cpus-per-trial", "1"], r"gradwatch doctor: --cpus-per-trial and --gpus-per-trial ask Ray .* add --ray"),
    (["--budget", "-1"], r"gradwatch doctor: `doctor\(budget_s=…\)` expects a positive number"),
])
def test_cli_doctor_mistakes_are_one_line(argv, error, capsys):
    from gradwatch.cli import main

    try:
        code = main(["doctor", "zoo:deep_tanh_mlp", *argv])
    except SystemExit as exc:  # argparse's own errors: usage, then one line
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert re.search(error, err.strip().splitlines()[-1]), err
