"""Where the doctor's trials run: in this process, on a local process pool, on Ray, or on any executor.

A trial is a :class:`Job` (plain data, and a set-up and a remedy that pickle)
run by :func:`run_job`, the one function every worker calls. A
:class:`Runner` submits a round's jobs in order, at most ``capacity`` at a
time, and hands back one :data:`Result` per job in the order submitted, so
the doctor decides the next round exactly as a serial loop would. What
happens on the way:

- **a failing trial** is a :class:`Failure` (one line: the exception, or how
  the worker died), never a lost table. When a worker of the local pool is
  killed, ``concurrent.futures`` breaks the whole pool and fails every trial
  in flight; the runner restarts the pool and reruns those trials one at a
  time, so that only the trial that kills its worker on its own fails.
- **the time budget** stops new remedies from starting (a remedy that started
  runs all its seeds); **Ctrl-C** cancels what is in flight. Either way the
  results so far come back, and the runner says which stopped it.
- **run stores**: the local pool writes them where the driver said (the same
  file system); Ray and other executors may run on other machines, so when
  the user named a store, each trial's run directory comes back as bytes and
  the driver writes it there (``gradwatch report STORE/NAME`` works on it).
"""

from __future__ import annotations

import math
import multiprocessing
import os
import pickle
import shutil
import sys
import tempfile
import time
import types
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

from gradwatch import _reference
from gradwatch._errors import bad_argument
from gradwatch.doctor import trial_run
from gradwatch.doctor.catalogue import Remedy
from gradwatch.store import LOCK_NAME
from gradwatch.trial import SetupFn

Workers = int | str | Executor  # 1: this process; N: a local pool; "ray"; or any concurrent.futures.Executor
DIED = "the worker process died (killed by a signal, out of memory, or a crash in native code)"


class Job(NamedTuple):
    """One trial to run: the arguments of :func:`~gradwatch.doctor.trial_run.run_trial`, and how to run it."""

    setup: SetupFn | str  # a callable, or a 'file.py:NAME' / 'module:NAME' reference the worker imports
    seed: int
    steps: int
    name: str  # the run's name under the store
    remedy: Remedy | None
    numbers: dict[str, float]
    store: str | None  # where the worker writes the run; None: a temporary directory of its own
    ship: bool  # send the run directory's files back (the driver writes them under its store)
    threads: int | None  # torch threads in the worker; None: leave as they are (this process)
    scratch: str | None = None  # the driver's scratch directory: a worker that sees it (this machine) works under it


class Outcome(NamedTuple):
    """What a job sends back: the trial's measurements, its run files when shipped, its wall time in the worker."""

    run: trial_run.TrialRun | None  # None: the remedy does not apply to this set-up
    files: dict[str, bytes] | None
    seconds: float


class Failure(NamedTuple):
    """A trial that raised, or whose worker died; ``error`` is one line."""

    error: str


Result = Outcome | Failure | None  # None: never started (the time budget or Ctrl-C came first)


def run_job(job: Job) -> Outcome:
    """Run one trial (the function every worker calls; module-level, so that it pickles by name)."""
    if job.threads is not None:
        import torch

        torch.set_num_threads(job.threads)
    setup = _reference.load(job.setup, "setup") if isinstance(job.setup, str) else job.setup
    t0 = time.perf_counter()
    if job.store is not None:
        run = trial_run.run_trial(setup, job.seed, job.steps, Path(job.store), job.name, job.remedy, job.numbers)
        return Outcome(run, None, time.perf_counter() - t0)
    # under the driver's scratch directory where this worker shares its file system: the driver removes that at
    # the end, so a worker killed mid-trial (SIGKILL, the pool ended on Ctrl-C or the budget) leaves nothing behind
    scratch = job.scratch if job.scratch is not None and Path(job.scratch).is_dir() else None
    with tempfile.TemporaryDirectory(prefix="gradwatch-trial-", dir=scratch) as tmp:
        run = trial_run.run_trial(setup, job.seed, job.steps, Path(tmp), job.name, job.remedy, job.numbers)
        seconds = time.perf_counter() - t0
        files = None
        if job.ship and (Path(tmp) / job.name).is_dir():
            files = {p.name: p.read_bytes() for p in sorted((Path(tmp) / job.name).iterdir())
                     if p.is_file() and p.name != LOCK_NAME}  # the lock names a pid on another machine
    return Outcome(run, files, seconds)


def describe(exc: BaseException) -> str:
    """One line for a failed trial: the exception's type and first line, or how its worker died."""
    cause = getattr(exc, "cause", None)  # Ray wraps the trial's own exception in a RayTaskError
    if isinstance(cause, BaseException):
        exc = cause
    name = type(exc).__name__
    if isinstance(exc, BrokenProcessPool) or name in ("WorkerCrashedError", "NodeDiedError", "OutOfMemoryError"):
        return DIED if isinstance(exc, BrokenProcessPool) else f"{DIED}: {name}"
    if isinstance(exc, KeyboardInterrupt) or name == "TaskCancelledError":
        return "interrupted"
    text = str(exc).strip().splitlines()
    return f"{name}: {text[0]}" if text else name


# --- the set-up must reach the workers ------------------------------------------------------------------


class _ModulesSeen(pickle.Pickler):
    """A pickler that notes the module of every function and class it pickles by reference."""

    def __init__(self) -> None:
        super().__init__(BytesIO(), protocol=pickle.HIGHEST_PROTOCOL)
        self.modules: set[str] = set()

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, (types.FunctionType, type)):
            self.modules.add(getattr(obj, "__module__", None) or "")
        return NotImplemented


def _serialisers(how: str) -> list[Callable[[Any], bytes]]:
    if how == "ray":
        from ray import cloudpickle as ray_pickle

        return [ray_pickle.dumps]
    if how == "executor":
        try:
            import cloudpickle  # type: ignore[import-untyped]
        except ImportError:
            return [pickle.dumps]
        return [pickle.dumps, cloudpickle.dumps]
    return [pickle.dumps]


def check_shippable(setup: SetupFn | str, how: str) -> None:
    """Raise a ValueError saying how to make ``setup`` shippable when the workers of ``how`` could not receive it.

    ``how``: "pool" (plain pickle, spawned processes re-import ``__main__`` from its file), "ray" (Ray's
    cloudpickle, which ships functions of ``__main__`` and lambdas by value) or "executor" (a user's: plain
    pickle, else cloudpickle when installed, since Dask and submitit use it).
    """
    if isinstance(setup, str):
        return
    hint = ("a set-up the workers can import — a function at the top level of a module or file (or a "
            "functools.partial of one), or a 'path/to/file.py:make_setup' / 'package.module:make_setup' "
            "reference; workers=1 runs any callable in this process")
    reason = ""
    for dumps in _serialisers(how):  # shippable when one of them pickles it
        try:
            dumps(setup)
            break
        except Exception as exc:  # pickle raises PicklingError, AttributeError or TypeError for local objects
            reason = f"it does not pickle ({describe(exc)})"
    else:
        raise ValueError(bad_argument("doctor", "setup", hint, setup) + f": {reason}")
    if how == "pool":  # pickled by name: a spawned worker must be able to import every name it refers to
        seen = _ModulesSeen()
        seen.dump(setup)
        if "__main__" in seen.modules and getattr(sys.modules["__main__"], "__file__", None) is None:
            raise ValueError(bad_argument("doctor", "setup", hint, setup) + ": it is defined in an interactive "
                             "session (__main__ has no file the workers could import)")


def check_main_guarded() -> None:
    """Raise a RuntimeError when ``__main__``'s top-level code calls the doctor outside ``if __name__ == "__main__":``.

    Spawned workers import the script as ``__mp_main__`` to find its functions; unguarded, each worker would
    run the doctor again (multiprocessing then fails them all, long after the start).
    """
    import ast

    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    frame = sys._getframe(1)
    while frame is not None and not (frame.f_globals is getattr(main, "__dict__", None)
                                     and frame.f_code.co_name == "<module>"):
        frame = frame.f_back  # type: ignore[assignment]
    if frame is None or path is None or not Path(path).is_file():
        return  # not called from a script's top level (a test, a notebook, a function of a module)
    try:
        tree = ast.parse(Path(path).read_text())
    except (OSError, SyntaxError, ValueError):
        return
    for node in ast.walk(tree):
        if (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
                and "__name__" in ast.unparse(node.test) and "__main__" in ast.unparse(node.test)
                and node.lineno <= frame.f_lineno <= (node.end_lineno or node.lineno)):
            return
    raise RuntimeError(f"gw.doctor(workers=N) is called at the top level of {path} (line {frame.f_lineno}): put the "
                       "call under `if __name__ == \"__main__\":`, since each spawned worker imports the script")


# --- backends: one way to submit, cancel and restart -----------------------------------------------------


class _Inline(Executor):
    """Runs each job at submission, in this process; a job's exception is its future's, Ctrl-C propagates."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:  # type: ignore[override]
        fut: Future = Future()
        try:
            fut.set_result(fn(*args, **kwargs))
        except Exception as exc:
            fut.set_exception(exc)
        return fut


class _Ray(Executor):
    """Ray tasks behind the Executor interface: each job one task asking for ``resources``, never retried."""

    def __init__(self, resources: Mapping[str, Any]) -> None:
        import ray

        self._ray = ray
        self._remote = ray.remote(run_job).options(**{"max_retries": 0, **resources})
        self._refs: dict[Future, Any] = {}

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:  # type: ignore[override]
        ref = self._remote.remote(*args, **kwargs)
        fut = ref.future()
        self._refs[fut] = ref
        return fut

    def cancel(self, futures: Sequence[Future]) -> None:
        for fut in futures:
            ref = self._refs.get(fut)
            if ref is not None:
                self._ray.cancel(ref, force=True)


class Backend:
    """An executor and how the doctor uses it: capacity, whether run stores come back, torch threads per trial."""

    def __init__(self, make: Callable[[], Executor], capacity: int | None, ship: bool, threads: int | None,
                 restartable: bool) -> None:
        self._make, self.capacity, self.ship, self.threads, self.restartable = make, capacity, ship, threads, restartable
        self.executor = make()

    def restart(self) -> None:
        """A fresh executor in place of a broken one (our own pool only)."""
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.executor = self._make()

    def cancel(self, futures: Sequence[Future]) -> None:
        """Stop what is in flight (Ctrl-C): cancel pending jobs, end running ones where the executor lets us."""
        for fut in futures:
            fut.cancel()
        if isinstance(self.executor, _Ray):
            self.executor.cancel(futures)
        if self.restartable and isinstance(self.executor, ProcessPoolExecutor):
            for proc in list(getattr(self.executor, "_processes", {}).values()):  # no public way to end them
                proc.terminate()


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _ray_capacity(ray: Any, resources: Mapping[str, Any]) -> int:
    """How many trials the cluster runs at once, each asking for ``resources``."""
    total = ray.cluster_resources()
    slots = [total.get("CPU", 1.0) / resources["num_cpus"]] if resources.get("num_cpus") else []
    if resources.get("num_gpus"):
        slots.append(total.get("GPU", 0.0) / resources["num_gpus"])
    return max(1, int(min(slots))) if slots else max(1, int(total.get("CPU", 1.0)))


@contextmanager
def backend(workers: Workers, store_named: bool, ray_resources: Mapping[str, Any] | None = None) -> Iterator[Backend]:
    """The backend ``workers`` names, set up for the doctor and torn down after (a user's executor is left open).

    ``store_named``: the user named a store, so runs from workers that may be elsewhere come back as bytes.
    """
    if isinstance(workers, Executor):
        yield Backend(lambda: workers, getattr(workers, "_max_workers", None), store_named, None, False)
    elif workers == "ray":
        with _ray_backend(store_named, dict(ray_resources or {"num_cpus": 1})) as ray_backend:
            yield ray_backend
    elif workers == 1:
        yield Backend(_Inline, 1, False, None, False)
    else:
        assert isinstance(workers, int)
        threads = max(1, _cores() // workers)  # torch's threads split between the workers
        pool = Backend(lambda: ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")),
                       workers, False, threads, True)
        try:
            yield pool
        finally:
            pool.executor.shutdown(wait=True, cancel_futures=True)


@contextmanager
def _ray_backend(store_named: bool, resources: dict[str, Any]) -> Iterator[Backend]:
    try:
        import ray
    except ImportError:
        raise ImportError("workers='ray' needs Ray: pip install 'gradwatch[ray]'") from None
    started = not ray.is_initialized()
    if started:  # RAY_ADDRESS, or a local cluster of this machine's cores
        import logging

        ray.init(logging_level=logging.WARNING, log_to_driver=False, include_dashboard=False)
    try:
        cpus = resources.get("num_cpus")
        threads = max(1, math.floor(cpus)) if cpus else 1
        yield Backend(lambda: _Ray(resources), _ray_capacity(ray, resources), store_named, threads, False)
    finally:
        if started:
            ray.shutdown()


# --- the runner: a round's jobs in, one result per job out, in order ---------------------------------------


class Runner:
    """Runs rounds of jobs on a backend and keeps one progress bar of trials done, running and failed."""

    def __init__(self, backend: Backend, root: Path, bar: Any, task: Any, scratch: Path | None = None) -> None:
        self.backend, self.root, self.bar, self.task, self.scratch = backend, root, bar, task, scratch
        self.done = self.failed = self.running = 0
        self.stopped = False  # the time budget stopped a round
        self.interrupted = False  # Ctrl-C stopped a round

    def job(self, setup: SetupFn | str, seed: int, steps: int, name: str, remedy: Remedy | None,
            numbers: dict[str, float]) -> Job:
        """A job for this backend: where its run goes, whether it comes back, how many threads it gets."""
        b = self.backend
        local = b.restartable or isinstance(b.executor, _Inline)  # same file system as the driver
        return Job(setup, seed, steps, name, remedy, numbers, str(self.root) if local else None,
                   b.ship and not local, b.threads, str(self.scratch) if self.scratch is not None else None)

    def run(self, groups: Sequence[Sequence[Job]], deadline: float | None = None) -> list[list[Result]]:
        """Each group's results, in order. A group is one remedy's seeds: after ``deadline`` no group starts."""
        jobs = [job for group in groups for job in group]
        group_of = [g for g, group in enumerate(groups) for _ in group]
        results: list[Result] = [None] * len(jobs)
        pending, suspects = deque(range(len(jobs))), deque[int]()
        inflight: dict[Future, int] = {}
        started: set[int] = set()
        cap = self.backend.capacity or len(jobs)  # unknown (a user's executor): submit them all
        try:
            while pending or inflight or suspects:
                while suspects and not inflight:  # after a broken pool: one suspect at a time, alone
                    self._submit(suspects.popleft(), jobs, inflight, results)
                while not suspects and pending and len(inflight) < cap:
                    i = pending[0]
                    if group_of[i] not in started:
                        if deadline is not None and time.perf_counter() > deadline:
                            self.stopped = True
                            pending.clear()
                            break
                        started.add(group_of[i])
                    self._submit(pending.popleft(), jobs, inflight, results)
                if inflight:
                    timeout = None if deadline is None or self.stopped else max(0.0, deadline - time.perf_counter())
                    done, _ = wait(inflight, timeout=timeout, return_when=FIRST_COMPLETED)
                    if not done and not self.stopped:  # the budget is spent: no new remedy starts
                        self.stopped = True
                        pending = deque(i for i in pending if group_of[i] in started)
                        if self.backend.capacity is None:  # submitted is not started there: cancel what waits
                            for fut in [f for f in inflight if f.cancel()]:
                                del inflight[fut]
                    self._collect(done, jobs, inflight, results, suspects)
        except KeyboardInterrupt:
            self.interrupted = True
            self.backend.cancel(list(inflight))
            self.running = 0
            self._show()
        out, k = [], 0
        for group in groups:
            out.append(results[k:k + len(group)])
            k += len(group)
        return out

    def _submit(self, i: int, jobs: list[Job], inflight: dict[Future, int], results: list[Result]) -> None:
        self.running = len(inflight) + 1
        self._show()
        try:
            fut = self.backend.executor.submit(run_job, jobs[i])
        except Exception as exc:  # a user's executor that is shut down or broken, a job Ray cannot serialise
            self._store(i, Failure(describe(exc)), jobs, results)
            return
        if fut.done():  # inline: it ran at submission
            self._collect({fut}, jobs, {fut: i}, results, deque())
        else:
            inflight[fut] = i
        self.running = len(inflight)

    def _collect(self, done: set[Future], jobs: list[Job], inflight: dict[Future, int], results: list[Result],
                 suspects: deque[int]) -> None:
        """Results of finished futures. A killed worker breaks our pool and fails every trial in flight: alone, the
        trial is the culprit; otherwise they all go back as suspects, to be rerun one at a time on a fresh pool."""
        alone = len(inflight) == 1
        crashed = False
        while done:
            for fut in done:
                i = inflight.pop(fut)
                exc = KeyboardInterrupt() if fut.cancelled() else fut.exception()
                if isinstance(exc, BrokenProcessPool) and self.backend.restartable:
                    crashed = True
                    if not alone:
                        suspects.append(i)
                        continue
                self._store(i, Failure(describe(exc)) if exc is not None else fut.result(), jobs, results)
            # the rest of the flight dies with the pool: collect it before starting a fresh one
            done = wait(list(inflight))[0] if crashed and inflight else set()
        if crashed:
            self.backend.restart()
        self.running = len(inflight)
        self._show()

    def _store(self, i: int, result: Outcome | Failure, jobs: list[Job], results: list[Result]) -> None:
        if isinstance(result, Outcome) and result.files is not None:  # a run shipped back: write it under the store
            run_dir = self.root / jobs[i].name
            if run_dir.exists():
                shutil.rmtree(run_dir)
            run_dir.mkdir(parents=True)
            for name, data in result.files.items():
                (run_dir / name).write_bytes(data)
            result = result._replace(files=None)
        results[i] = result
        if isinstance(result, Failure):
            self.failed += 1
        else:
            self.done += 1

    def expect(self, more: int, phase: str) -> None:
        """``more`` trials are coming (the bar's total grows); ``phase`` names them."""
        self.phase = phase
        total = self.done + self.failed + more
        self.bar.update(self.task, total=total)
        self._show()

    def _show(self) -> None:
        phase = getattr(self, "phase", "trials")
        self.bar.update(self.task, completed=self.done + self.failed,
                        description=f"{phase}: {self.done} done, {self.running} running, {self.failed} failed")
