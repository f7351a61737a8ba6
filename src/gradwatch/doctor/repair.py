"""``doctor()``: the baseline, the remedies its findings name, rounds of iterative repair, and the verdicts.

The doctor

1. trains the baseline under a watch and diagnoses it;
2. picks the remedies that the findings' causes name (not all of them): each
   finding carries remedy keys, and each key brings the catalogue entries that
   act on that cause (:mod:`gradwatch.doctor.catalogue`);
3. applies each to a fresh trial and trains it for the same steps and seeds,
   under a watch (:func:`gradwatch.doctor.trial_run.run_trial`);
4. compares final loss (mean of the last 10 % of steps), area under the loss
   curve, held-out score where the setup has one, and whether the findings
   are gone — and says which remedy fixed it, or that none did. "fixes it"
   needs the targeted findings gone, a finite loss and real learning (a better
   held-out score, or a final loss at most half the trial's own first finite
   loss and no higher than the baseline's first; :mod:`gradwatch.doctor.verdicts`);
5. iterative repair: a remedy that removed some targeted findings but not all
   is combined with the next remedy a remaining finding names, for at most
   :data:`~gradwatch.doctor.table.MAX_ROUNDS` rounds (the table's ``round``
   column), same seeds and steps, within ``budget_s``.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

from gradwatch._errors import bad_argument
from gradwatch.doctor import catalogue, trial_run
from gradwatch.doctor.catalogue import Remedy, candidate_keys, compose, finding_keys, step0_overflow
from gradwatch.doctor.table import MAX_ROUNDS, DoctorReport, TrialResult
from gradwatch.doctor.verdicts import summary, verdict
from gradwatch.trial import SetupFn


def doctor(setup: SetupFn, *, steps: int = 300, seeds: int = 1, budget_s: float | None = None,
           store: str | Path | None = None, progress: bool = True) -> DoctorReport:
    """Diagnose a set-up, try the remedies its findings point to, and report which works.

    Args:
        setup: ``seed -> Trial`` (e.g. ``gradwatch.zoo.get("deep_tanh_mlp")``).
        steps: training steps per trial.
        seeds: seeds per trial (results are averaged).
        budget_s: stop starting new trials after this many seconds; the table is then partial.
        store: where the trials' runs go (default: a temporary directory).
        progress: show a progress bar.
    """
    if not callable(setup):
        raise TypeError(bad_argument("doctor", "setup", "a callable seed -> Trial (e.g. a zoo.Setup)", setup))
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(bad_argument("doctor", "steps", "a positive int", steps))
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(bad_argument("doctor", "seeds", "a positive int", seeds))
    if budget_s is not None and (isinstance(budget_s, bool) or not isinstance(budget_s, (int, float)) or budget_s <= 0):
        raise ValueError(bad_argument("doctor", "budget_s", "a positive number of seconds or None", budget_s))
    tmp = tempfile.TemporaryDirectory() if store is None else None
    root = Path(tmp.name if tmp is not None else store)  # type: ignore[arg-type]
    try:
        return _doctor(setup, steps, seeds, budget_s, root, progress)
    finally:
        if tmp is not None:
            tmp.cleanup()


def _doctor(setup: SetupFn, steps: int, seeds: int, budget_s: float | None, root: Path, progress: bool) -> DoctorReport:
    from rich.progress import Progress

    start = time.perf_counter()
    catalog = catalogue.catalog()
    with Progress(transient=True, disable=not progress) as bar:
        task = bar.add_task("baseline", total=seeds)
        base_runs = []
        for s in range(seeds):
            got = trial_run.run_trial(setup, s, steps, root, f"baseline-{s}", None, {})
            assert got is not None
            base_runs.append(got)
            bar.advance(task)
        base = summary("baseline (no remedy)", base_runs, time.perf_counter() - start)
        diagnosis = base_runs[0][3]
        report = DoctorReport(base, diagnosis, steps=steps, seeds=seeds)
        if not diagnosis.problems:
            base.verdict = "healthy"
            report.message = "nothing to fix: the baseline has no findings"
            return report
        numbers: dict[str, float] = {}
        for f in diagnosis:
            numbers.update({k: v for k, v in f.numbers.items() if k not in numbers})
        overflow = step0_overflow(diagnosis)
        candidates = [r for key in candidate_keys(diagnosis) for r in catalog.get(key, [])]
        targets = {f.kind for f in diagnosis.problems}
        bar.update(task, description="remedies", total=len(candidates) * seeds, completed=0)
        stopped = False
        tried: set[tuple[str, ...]] = set()
        todo = candidates
        for rnd in range(1, MAX_ROUNDS + 1):
            done: list[tuple[Remedy, TrialResult]] = []
            for remedy in todo:
                if budget_s is not None and time.perf_counter() - start > budget_s:
                    stopped = True
                    break
                tried.add(tuple(sorted(remedy.parts)))
                t0 = time.perf_counter()
                runs = []
                for s in range(seeds):
                    got = trial_run.run_trial(setup, s, steps, root, f"{'.'.join(remedy.parts)}-{len(report.trials)}-{s}", remedy, numbers)
                    bar.advance(task)
                    if got is not None:
                        runs.append(got)
                if not runs:
                    continue  # does not apply here
                result = summary(remedy.label, runs, time.perf_counter() - t0)
                result.verdict = verdict(base, result, targets)
                result.rounds, result.parts = rnd, remedy.parts
                report.trials.append(result)
                done.append((remedy, result))
            if stopped or rnd == MAX_ROUNDS or any(t.verdict == "fixes it" for t in report.trials):
                break
            # Iterative repair: a remedy that removed some targeted findings but not all is combined with
            # the first remedy that a remaining finding names (same seeds, same steps).
            todo = []
            for remedy, result in done:
                left = targets & set(result.findings)
                if not left or left == targets:
                    continue
                nxt = next((c for f in diagnosis.problems if f.kind in left for k in finding_keys(f, overflow)
                            for c in catalog.get(k, []) if k not in remedy.parts
                            and tuple(sorted(remedy.parts + (k,))) not in tried), None)
                if nxt is not None and len(todo) < 3:
                    todo.append(compose(remedy, nxt))
                    tried.add(tuple(sorted(todo[-1].parts)))
            if not todo:
                break
            bar.update(task, total=(len(candidates) + len(todo)) * seeds)
    base.verdict = f"findings: {', '.join(f.kind for f in diagnosis.problems)}"
    fixed = [t for t in report.trials if t.verdict == "fixes it"]
    key = (lambda t: -t.score) if math.isfinite(base.score) else (lambda t: t.final_loss)
    if fixed:
        report.best = min(fixed, key=key)
        b = report.best
        evidence = (f"score {b.score:.3f} against {base.score:.3f}" if math.isfinite(b.score)
                    else f"final loss {b.final_loss:.4g} against {base.final_loss:.4g}")
        report.message = f"best remedy: {b.label} — the findings are gone and {evidence}"
    else:
        report.message = "no remedy helped" if report.trials else "no remedy could be tried automatically"
    if stopped:
        report.message += (f" (stopped at the time budget of {budget_s:g} s after {len(report.trials)} trials; "
                           f"{len(candidates)} remedies in round 1)")
    return report
