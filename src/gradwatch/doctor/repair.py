"""``doctor()``: the baseline, the remedies its findings name, rounds of iterative repair, and the verdicts.

The doctor

1. trains the baseline under a watch and diagnoses it, on every seed (a kind of problem that only a later seed
   shows is a target too);
2. picks the remedies that the findings' causes name (not all of them): each
   finding carries remedy keys, and each key brings the catalogue entries that
   act on that cause (:mod:`gradwatch.doctor.catalogue`);
3. applies each to a fresh trial and trains it for the same steps and seeds,
   under a watch (:func:`gradwatch.doctor.trial_run.run_trial`);
4. compares final loss (mean of the last 10 % of steps), area under the loss
   curve, held-out score where the setup has one, and whether the findings
   are gone — and says which remedy fixed it, or that none did. "fixes it"
   needs the targeted findings gone and no new critical one, a finite loss
   and real learning (:mod:`gradwatch.doctor.verdicts`); a fix that ends
   above half a constant output's loss is marginal, and the search goes on
   (:func:`~gradwatch.doctor.table.decisive`);
5. iterative repair: a remedy that removed some targeted findings but left
   some, or brought new ones, is combined with the remedies those findings
   name (:func:`~gradwatch.doctor.catalogue.next_round`), for at most
   :data:`~gradwatch.doctor.table.MAX_ROUNDS` rounds (the table's ``round``
   column), same seeds and steps, within ``budget_s``.

Where the trials run — in this process, a local process pool, Ray or any
executor — is :mod:`gradwatch.doctor.execute`'s business: each round's
trials are submitted together and come back in order, so the table is the
same however they ran.
"""

from __future__ import annotations

import math
import re
import tempfile
import time
from dataclasses import replace
from collections.abc import Mapping
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

from gradwatch import _reference
from gradwatch._errors import bad_argument
from gradwatch.diagnosis import Diagnosis
from gradwatch.diagnosis.remedies import REMEDIES
from gradwatch.doctor import catalogue, execute
from gradwatch.doctor.catalogue import Remedy, candidate_keys, step0_overflow
from gradwatch.doctor.execute import Failure, Outcome, Result, Runner, Workers
from gradwatch.doctor.knobs import weight
from gradwatch.doctor.table import MAX_ROUNDS, DoctorReport, TrialResult, decisive, loss_text
from gradwatch.doctor.verdicts import NULL_BELOW, did_not_learn, fits_only_training, is_better, learns, summary, verdict
from gradwatch.remedies.structure import RECIPROCALS, ROOT_BACKWARDS
from gradwatch.trial import SetupFn


DEFAULT_STEPS = 300  # per trial, where neither the call nor the set-up says

# the rows that change the operation that made a first NaN (not a row that keeps the run away from it): where the
# best row holds one of them, the message does not say it may only postpone the NaN (round 26: a CTC loss's
# zero_infinity, the source's own fix, was told so)
MENDS_THE_ORIGIN = frozenset({"zero_reciprocal", "finite_mask", "zero_root", "log_space", "ctc_zero_infinity",
                              "biased_variance", "weight_norm_init"})


def doctor(setup: SetupFn | str, *, steps: int | None = None, seeds: int = 1, rounds: int = MAX_ROUNDS,
           budget_s: float | None = None, check_seed: bool = True,
           store: str | Path | None = None, progress: bool = True, workers: Workers = 1,
           ray_resources: Mapping[str, Any] | None = None) -> DoctorReport:
    """Diagnose a set-up, try the remedies its findings point to, and report which works.

    Args:
        setup: ``seed -> Trial`` (e.g. ``gradwatch.zoo.get("deep_tanh_mlp")``), or a reference to one,
            ``"path/to/file.py:make_setup"`` or ``"package.module:make_setup"``, which each worker imports.
        steps: training steps per trial; by default the set-up's own ``steps`` where it has one (a
            :class:`~gradwatch.trial.Setup` may say how long its trials need to show learning), else 300.
        seeds: seeds per trial (results are averaged).
        rounds: rounds of iterative repair, 1 to 3 (default 3): 1 tries each remedy the findings name alone.
        budget_s: start no new remedy after this many seconds; the table is then partial.
        check_seed: run the remedy that fixes it once more on a seed none of the trials used (seed ``seeds``):
            the best of many rows on the same seeds flatters itself. Where it does not hold there, the next
            "fixes it" row is checked (at most :data:`CHECKED` rows); the checks are ``report.checks``, and the
            best remedy is the first that held (or, where none did, the best row, with the message saying so).
        store: where the trials' runs go, one directory per trial and seed, named in each row's ``runs``
            (default: a temporary directory, removed at the end). Runs from Ray or an executor of your own
            come back to this machine and are written here.
        progress: show a progress bar (trials done, running, failed).
        workers: where the trials run: ``1`` (default) in this process, one after another; ``N`` a local pool of
            N spawned processes, torch's threads split between them; ``"ray"`` Ray tasks on the cluster that
            ``ray.init()`` connects to (``RAY_ADDRESS``, or a local one it starts; call ``ray.init(address=…)``
            first for another); or any ``concurrent.futures.Executor`` (Dask's, submitit's). The table is the
            same however they run. A round's trials are submitted together and the next round is decided from
            all of them, as in serial.
        ray_resources: what each trial asks Ray for (default ``{"num_cpus": 1}``; e.g. ``{"num_gpus": 1}``);
            any option of Ray's ``.options()`` (``memory``, ``max_retries``, …) goes through.

    A trial that raises, or whose worker dies, is a row with its error (``verdict`` "failed: …"). Ctrl-C
    returns the table so far once the baseline is done (before that it propagates).
    """
    if isinstance(setup, str):
        try:
            spec = _reference.normalise(setup)
            loaded = _reference.load(spec, "setup")
        except (ValueError, ImportError, OSError) as exc:
            raise ValueError(bad_argument("doctor", "setup", "a callable seed -> Trial or a "
                                          "'path/to/file.py:make_setup' reference", setup) + f": {exc}") from None
        if not callable(loaded):
            raise TypeError(bad_argument("doctor", "setup", f"{setup!r} to name a callable seed -> Trial", loaded))
    elif not callable(setup):
        raise TypeError(bad_argument("doctor", "setup", "a callable seed -> Trial (e.g. a zoo.Setup)", setup))
    if steps is None:
        own = getattr(loaded if isinstance(setup, str) else setup, "steps", None)
        steps = own if isinstance(own, int) and not isinstance(own, bool) and own >= 1 else DEFAULT_STEPS
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(bad_argument("doctor", "steps", "a positive int or None (the set-up's own)", steps))
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(bad_argument("doctor", "seeds", "a positive int", seeds))
    if isinstance(rounds, bool) or not isinstance(rounds, int) or not 1 <= rounds <= MAX_ROUNDS:
        raise ValueError(bad_argument("doctor", "rounds", f"an int from 1 to {MAX_ROUNDS}", rounds))
    if not isinstance(check_seed, bool):
        raise TypeError(bad_argument("doctor", "check_seed", "True or False", check_seed))
    if budget_s is not None and (isinstance(budget_s, bool) or not isinstance(budget_s, (int, float)) or budget_s <= 0):
        raise ValueError(bad_argument("doctor", "budget_s", "a positive number of seconds or None", budget_s))
    if not (isinstance(workers, Executor) or workers == "ray"
            or (isinstance(workers, int) and not isinstance(workers, bool) and workers >= 1)):
        raise ValueError(bad_argument("doctor", "workers", "a positive int, 'ray' or a concurrent.futures.Executor",
                                      workers))
    if ray_resources is not None and (workers != "ray" or not isinstance(ray_resources, Mapping)
                                      or not all(isinstance(k, str) for k in ray_resources)):
        raise ValueError(bad_argument("doctor", "ray_resources", "a dict of Ray task options such as "
                                      "{'num_cpus': 1}, with workers='ray'", ray_resources))
    if isinstance(workers, int) and workers > 1:
        execute.check_main_guarded()
    if workers != 1 and not isinstance(setup, str):
        execute.check_shippable(setup, "ray" if workers == "ray" else "executor" if isinstance(workers, Executor)
                                else "pool")
    # in this process the loaded set-up itself; workers import the reference
    job_setup: SetupFn | str = (loaded if workers == 1 else spec) if isinstance(setup, str) else setup
    # the driver's scratch directory: the runs when no store is named, and the trials of workers that share this
    # file system, so that it is all removed at the end, even what a killed worker could not remove
    scratch = tempfile.TemporaryDirectory(prefix="gradwatch-doctor-")
    root = Path(scratch.name) if store is None else Path(store)
    try:
        from rich.progress import Progress

        with execute.backend(workers, store is not None, ray_resources) as backend, \
                Progress(transient=True, disable=not progress) as bar:
            runner = Runner(backend, root, bar, bar.add_task("baseline", total=seeds), Path(scratch.name))
            return _doctor(job_setup, steps, seeds, rounds, budget_s, runner, check_seed)
    finally:
        scratch.cleanup()


_SEVERITY = {"critical": 0, "warning": 1, "info": 2}


def _every_seed(diagnoses: list[Diagnosis]) -> Diagnosis:
    """The baseline's diagnosis over its seeds: the first seed's findings, and each kind of problem that only a
    later seed showed (a 5-wide ReLU stack whose units all die on seed 1, not on seed 0), most severe first. The
    remedies are chosen for all of them, and a fix must remove them on every seed."""
    first = diagnoses[0]
    seen = {f.kind for f in first.problems}
    extra = []
    for seed, d in enumerate(diagnoses[1:], start=1):
        for f in d.problems:
            if f.kind not in seen:
                seen.add(f.kind)
                extra.append(replace(f, evidence=f"{f.evidence} (the baseline's seed {seed}; seed 0 did not show it)"))
    if not extra:
        return first
    findings = sorted(first.findings + extra, key=lambda f: _SEVERITY.get(f.severity, 3))  # stable: order kept within
    return Diagnosis(findings, first.run)


def _too_short(base: TrialResult, trials: list[TrialResult], steps: int) -> str:
    """Where remedies removed the findings but no trial at all got clearly below a constant output's loss, the
    trials may be too short for the task to show learning (a long adding task needs ~1000 steps): say so."""
    cleared = [t for t in trials if not t.error and t.verdict.startswith("removes the finding")
               and "brings" not in t.verdict]  # a row that brought a critical finding is no sign of too few steps
    null = base.null_loss

    def learned(t: TrialResult) -> bool:  # a row that weighs its samples otherwise is held to its own constant's loss
        own = t.null_loss if t.own_objective else null
        return own > 0 and t.final_loss < NULL_BELOW * own
    ran = [t for t in trials if not t.error and math.isfinite(t.final_loss)]
    if not cleared or not null > 0 or any(learned(t) for t in ran):
        return ""
    return (f"; {len(cleared)} remed{'y' if len(cleared) == 1 else 'ies'} removed the findings, but no trial got "
            f"below {NULL_BELOW:g} × the loss of a constant output ({null:.4g}) in {steps} steps: the task may need "
            f"longer trials to show learning (gw.doctor(…, steps={4 * steps}))")


def _nonfinite_origin(report: DoctorReport, setup: SetupFn | str, steps: int, deadline: float | None,
                      whose: str = "") -> str:
    """For a baseline that goes non-finite: the operation and line of the set-up's code that made its first NaN/Inf
    (:func:`gradwatch.doctor.locate.locate_nonfinite`, on the seed that showed it), stored as
    ``report.nonfinite_origin``; the words to add to the message ('' when there is nothing to add), ``whose``
    put before them where a remedy fixed the run."""
    from gradwatch.doctor.locate import locate_nonfinite

    found = next((f for f in report.diagnosis.problems if f.kind == "nonfinite"), None)
    if found is None or (deadline is not None and time.perf_counter() > deadline):
        return ""
    if math.isfinite(found.numbers.get("update_step", math.nan)):
        return ""  # the optimizer's update made it from finite gradients (its cause says so): no operation of autograd
    hit = re.search(r"the baseline's seed (\d+)", found.evidence)
    seed = int(hit.group(1)) if hit else 0
    try:
        local = _reference.load(setup, "setup") if isinstance(setup, str) else setup
        # to the first non-finite loss where the gradient overflowed before it (round 14's accumulation without
        # the division: norms Inf at step 38, the forward's first NaN at step 40; the re-run stopped at 39)
        last = found.steps[0] + 1
        loss_step = found.numbers.get("loss_step", math.nan)
        if math.isfinite(loss_step):
            last = max(last, int(loss_step) + 1)
        until = min(steps - 1, last)
        origin = report.nonfinite_origin or locate_nonfinite(local, seed, until)  # (located early for a remedy)
    except Exception as exc:  # noqa: BLE001 - the user's set-up, re-run once more: its failure is told, not raised
        return f"; the first NaN/Inf could not be located ({type(exc).__name__}: {exc})"
    report.nonfinite_origin = origin
    if origin is None:
        return (f"; re-run to step {until} under anomaly detection, no operation was seen to make the first NaN/Inf "
                f"(a gradient whose norm overflows while every entry is finite, or an operation outside PyTorch's)")
    words = str(origin)
    return f"; {whose}{words[4:]}" if whose and words.startswith("the ") else f"; {words}"


CHECKED = 2  # "fixes it" rows run again on a fresh seed, best first, until one holds


def _check_seed(setup: SetupFn | str, steps: int, seeds: int, ranked: list[TrialResult],
                remedy_of: dict[int, Remedy], base: TrialResult, targets: set[str], numbers: dict[str, float],
                runner: Runner, deadline: float | None, report: DoctorReport) -> TrialResult | None:
    """Run the best "fixes it" rows once more on seed ``seeds``, which no trial used, judged against the same
    baseline row and targets; the first row whose check also "fixes it" (None: none held, or the time budget came
    first). Each check is appended to ``report.checks``."""
    for row in ranked[:CHECKED]:
        remedy = remedy_of[id(row)]
        name = f"check-{'.'.join(remedy.parts)}-{seeds}"
        runner.expect(1, f"seed check (seed {seeds})")
        [results] = runner.run([[runner.job(setup, seeds, steps, name, remedy, numbers)]], deadline)
        checked = _row(f"{row.label} (seed {seeds})", results, [name])
        if checked is None:
            return None  # the time budget or Ctrl-C came first: unchecked
        if not checked.error:
            checked.verdict = verdict(base, checked, targets)
        checked.rounds, checked.parts, checked.remedy = row.rounds, row.parts, remedy
        report.checks.append(checked)
        if checked.verdict == "fixes it":
            return row
    return None


def _by_hand(diagnosis: Diagnosis, catalog: Mapping[str, list[Remedy]]) -> str:
    """Words on the remedies the findings name that the doctor cannot try: a change to the user's own code (the
    scale in a hand-written attention, the loss on the logits, a straight-through estimator). Round 14: the watch
    put "scale the attention logits by 1/√d_head" first, and the doctor's message never mentioned it."""
    keys = dict.fromkeys(k for f in diagnosis.problems for k in f.remedy_keys if k in catalogue.BY_HAND
                         and not catalog.get(k))
    if not keys:
        return ""
    texts = [REMEDIES[k].split(":")[0] for k in keys]
    return f"; named by the findings, for you to change in your code (the doctor does not rewrite it): {'; '.join(texts)}"


SCORE_TIE = 0.01  # "fixes it" rows whose held-out scores lie this close to the best one's tie


def _seed_spread(best: TrialResult, check: TrialResult) -> float | None:
    """How far ``best``'s score and its seed check's (``check``) lie apart, where the check held and both are
    measured; else None."""
    if check.verdict != "fixes it" or not (math.isfinite(best.score) and math.isfinite(check.score)):
        return None
    return abs(best.score - check.score)


def _lighter_within_spread(ranked: list[TrialResult], best: TrialResult, check: TrialResult) -> TrialResult | None:
    """A "fixes it" row of fewer changes (:func:`gradwatch.doctor.knobs.weight`) than ``best`` whose score lies
    within the spread of ``best``'s own two seeds (its row's and its seed check's, ``check``) below it — the lightest,
    then the best scored; None where there is none, or the spread is not measured or within :data:`SCORE_TIE`
    (those rows tie already). Round 20: LeakyReLU + He + learning rate ×0.1 (0.918, 0.936 on its check seed) was
    chosen over input standardisation (0.906; by hand 0.901 / 0.930 / 0.924), the source's fix and the cause the
    findings named, 0.012 apart where the seeds differ by 0.018."""
    spread = _seed_spread(best, check)
    if spread is None:
        return None
    lighter = [t for t in ranked if weight(t.parts) < weight(best.parts) and math.isfinite(t.score)
               and best.score - spread <= t.score < best.score - SCORE_TIE]
    return min(lighter, key=lambda t: (weight(t.parts), -t.score), default=None)


# rows that ease a run's steps whatever made them too large: among fixes that tie, the remedy a finding names first
# for its cause goes before them
SYMPTOMATIC = frozenset({"lower_lr", "clip_norm", "clip_lower_lr", "warmup", "skip_step"})


def _ranked(fixed: list[TrialResult], trials: list[TrialResult],
            firsts: frozenset[str] = frozenset()) -> list[TrialResult]:
    """The "fixes it" rows, best first: by held-out score where they have one (else final loss), and among rows
    that tie — scores within :data:`SCORE_TIE` of the best, or the same final loss — the lightest
    (:func:`gradwatch.doctor.knobs.weight`) first, then one holding a remedy that a finding names first for its cause
    (``firsts``, the baseline's findings' first remedies, less those that only ease the steps, :data:`SYMPTOMATIC`;
    round 29: "learning rate ×0.01", 0.972, the non-finite finding's first, was recommended over averaging a
    cross-entropy summed over a batch of 256, 0.976, the first remedy of the finding that named the sum), then the
    one the findings named first (the table's order).
    Round 14: "clipping at max_norm=32 + learning rate ×0.1" was chosen over "learning rate ×0.1", which it trained
    exactly as (its clipping never acted); Adam's learning rate ×100 (0.982) over setting back the eps the
    diagnosis named as the cause (0.980), one test sample in 397. Round 15: a baseline that diverged has no score,
    its fixes do — the lower training loss (R² 0.42, overfitted) was chosen over the better held-out one (0.60)."""
    scored = any(math.isfinite(t.score) for t in fixed)
    at = {id(t): i for i, t in enumerate(trials)}

    causes = firsts - SYMPTOMATIC

    def lightest_first(t: TrialResult) -> tuple[int, bool, int]:
        return weight(t.parts), not set(t.parts) & causes, at[id(t)]

    if not scored:
        return sorted(fixed, key=lambda t: (t.final_loss, *lightest_first(t)))
    top = max((t.score for t in fixed if math.isfinite(t.score)), default=math.inf)
    tied = sorted((t for t in fixed if t.score >= top - SCORE_TIE), key=lightest_first)
    rest = sorted((t for t in fixed if t.score < top - SCORE_TIE), key=lambda t: (-t.score, *lightest_first(t)))
    return tied + rest + [t for t in fixed if not math.isfinite(t.score)]  # unscored last


def _better_with_a_finding_left(report: DoctorReport, base: TrialResult, best: TrialResult) -> str:
    """Words on a row that learned clearly better than the best fix but is no fix because a finding it did not
    target stayed (round 13's RealNVP: clipping alone 0.80 with the dead-units finding its healthy twin has too;
    clipping + learning rate ×0.1, chosen, 0.54): the user should see the trade, measured. "" where there is none."""
    better = [t for t in report.trials if not t.error and t.verdict.startswith("helps") and not t.critical
              and learns(base, t) and is_better(best, t)]
    if not better:
        return ""
    t = max(better, key=lambda t: t.score) if math.isfinite(best.score) else min(better, key=lambda t: t.final_loss)
    evidence = (f"score {t.score:.3f}, against {best.score:.3f}" if math.isfinite(best.score)
                else f"final loss {loss_text(t.final_loss)}, against {loss_text(best.final_loss)}")
    return (f"; {t.label} learned better ({evidence}) "
            f"but left {', '.join(t.findings)} (not critical): where that finding costs nothing, it is the better choice")


def _checked_words(checks: list[TrialResult], seeds: int) -> str:
    """What the seed checks say, for the message ('' where none ran); a check that held before the last one is a
    row the last one outranked (:func:`_lighter_within_spread`), told by the caller."""
    if not checks:
        return ""
    if checks[-1].verdict == "fixes it":
        words = f"; it held on a seed no trial used (seed {seeds}: final loss {loss_text(checks[-1].final_loss)})"
        for c in checks[:-1]:
            if c.verdict != "fixes it":
                words += (f"; {c.label.rsplit(' (seed', 1)[0]} ranked higher but did not hold on seed {seeds} "
                          f"({c.verdict})")
        return words
    return (f"; but on a seed no trial used (seed {seeds}) it did not hold: {checks[0].verdict} — read the fix as "
            f"seed-dependent")


def _row(label: str, results: list[Result], names: list[str]) -> TrialResult | None:
    """One remedy's row from its seeds' results; None when it does not apply here or did not run to the end."""
    failed = next((r for r in results if isinstance(r, Failure)), None)
    if failed is not None:
        row = TrialResult.failed(label, failed.error)
    elif any(r is None for r in results):
        return None  # stopped (time budget, Ctrl-C) before all its seeds ran: nothing to judge
    else:
        outcomes = [r for r in results if isinstance(r, Outcome)]
        runs = [o.run for o in outcomes if o.run is not None]
        if not runs:
            return None  # does not apply here
        row = summary(label, runs, sum(o.seconds for o in outcomes))
    row.runs = tuple(n for n, r in zip(names, results) if isinstance(r, Outcome) and r.run is not None)
    return row


def _doctor(setup: SetupFn | str, steps: int, seeds: int, rounds: int, budget_s: float | None,
            runner: Runner, check_seed: bool = True) -> DoctorReport:
    start = time.perf_counter()
    deadline = None if budget_s is None else start + budget_s
    catalog = catalogue.catalog()
    names = [f"baseline-{s}" for s in range(seeds)]
    runner.expect(seeds, "baseline")
    [results] = runner.run([[runner.job(setup, s, steps, names[s], None, {}) for s in range(seeds)]])
    if runner.interrupted:
        raise KeyboardInterrupt  # no baseline, no table
    base = _row("baseline (no remedy)", results, names)
    assert base is not None
    if base.error:
        report = DoctorReport(base, Diagnosis([]), steps=steps, seeds=seeds)
        report.message = f"the baseline failed ({base.error}): nothing to compare remedies against"
        return report
    # TrialRun.diagnosis, read by position as before: stand-ins for run_trial in tests return plain tuples
    diagnosis = _every_seed([r.run[3] for r in results if isinstance(r, Outcome) and r.run is not None])
    report = DoctorReport(base, diagnosis, steps=steps, seeds=seeds)
    if not diagnosis.problems:
        stuck = did_not_learn(base)
        base.verdict = "no findings; did not learn" if stuck else "healthy"
        report.message = (f"no remedy tried: the baseline has no findings, but it did not learn ({stuck}), and no "
                          "finding names a cause to try a remedy for" if stuck
                          else "nothing to fix: the baseline has no findings")
        if stuck and (fits := fits_only_training(base)):
            report.message += f"; {fits}"
        return report
    numbers: dict[str, float] = {}
    for f in diagnosis:
        numbers.update({k: v for k, v in f.numbers.items() if k not in numbers and not math.isnan(v)})  # NaN: unmeasured
    report.numbers = numbers
    candidates = [r for key in candidate_keys(diagnosis) for r in catalog.get(key, [])]
    # where its operation names a remedy, the first NaN is located before the trials: one made at step 0, or by one
    # batch's forward pass at an ordinary loss later on (round 35: a masked mean's 0/0 on a batch with no label)
    sudden = any(f.kind == "nonfinite" and f.numbers.get("sudden") for f in diagnosis.problems)
    if step0_overflow(diagnosis) or sudden:
        _nonfinite_origin(report, setup, steps, deadline)
        made = report.nonfinite_origin
        if (made is not None and made.phase == "forward" and not made.from_inf
                and made.op.rpartition(".")[2] in RECIPROCALS):
            candidates = catalog["zero_reciprocal"] + candidates
        elif made is not None and made.phase == "forward" and made.inf_factor:
            candidates = catalog["finite_mask"] + candidates  # round 46: (1 − m)·(−inf), NaN at every kept score
        elif made is not None and made.phase == "backward" and made.op in ROOT_BACKWARDS:
            candidates = catalog["zero_root"] + candidates  # round 26: a triplet loss's sqrt of a 0 distance
        elif made is not None and made.phase == "input" and all(r.key != "impute_inputs" for r in candidates):
            candidates = catalog["impute_inputs"] + candidates
    targets = {f.kind for f in diagnosis.problems}
    tried: set[tuple[str, ...]] = set()
    remedy_of: dict[int, Remedy] = {}  # id(row) -> the remedy it tried: the seed check runs it again
    why_not: dict[str, str] = {}  # a named remedy that found nothing to change -> why, where its catalogue says
    finished_first = 0  # round-1 remedies that ran on every seed before any budget ran out
    named = {k for f in diagnosis.problems for k in f.remedy_keys}  # the remedies the findings name (not expansions)
    todo = candidates
    count = 0  # remedies submitted so far: numbers the run names, the same in every mode
    for rnd in range(1, rounds + 1):
        runner.expect(len(todo) * seeds, "remedies" if rnd == 1 else f"round {rnd}")
        run_names = [[f"{'.'.join(r.parts)}-{count + k}-{s}" for s in range(seeds)] for k, r in enumerate(todo)]
        count += len(todo)
        tried.update(tuple(sorted(r.parts)) for r in todo)
        groups = runner.run([[runner.job(setup, s, steps, ns[s], remedy, numbers) for s in range(seeds)]
                             for remedy, ns in zip(todo, run_names)], deadline)
        done: list[tuple[Remedy, TrialResult]] = []
        for remedy, results, ns in zip(todo, groups, run_names):
            if rnd == 1 and results and all(r is not None for r in results):
                finished_first += 1  # ran to the end (a row, a failure, or nothing here to change)
            result = _row(catalogue.shown_label(remedy, numbers), results, ns)
            if result is None:
                if (rnd == 1 and remedy.key in named and results
                        and all(isinstance(r, Outcome) and r.run is None for r in results)):
                    # a remedy a finding names found nothing here to change
                    report.not_applied.append(catalogue.shown_label(remedy, numbers))
                    why_not[report.not_applied[-1]] = catalogue.NOT_APPLIED_WHY.get(remedy.key, "")
                continue
            if not result.error:
                result.verdict = verdict(base, result, targets)
                done.append((remedy, result))
                remedy_of[id(result)] = remedy
            result.remedy = remedy
            result.rounds, result.parts = rnd, remedy.parts
            report.trials.append(result)
        if runner.stopped or runner.interrupted or rnd == rounds or any(decisive(t) for t in report.trials):
            break
        # Iterative repair: what a remedy left (or brought) names the next remedy to combine with it.
        todo = catalogue.next_round(done, diagnosis, catalog, tried)
        if not todo:
            break
    base.verdict = f"findings: {', '.join(dict.fromkeys(f.kind for f in diagnosis.problems))}"  # each kind once
    fixed = [t for t in report.trials if t.verdict == "fixes it"]
    if fixed:
        firsts = frozenset(f.remedy_keys[0] for f in report.diagnosis.problems if f.remedy_keys)
        ranked = _ranked(fixed, report.trials, firsts)
        held = (_check_seed(setup, steps, seeds, ranked, remedy_of, base, targets, numbers, runner, deadline, report)
                if check_seed and not runner.interrupted else None)
        lighter = None if held is None else _lighter_within_spread(ranked, held, report.checks[-1])
        outranked = ""
        if held is not None and lighter is not None:  # as good within the seeds' own spread, and a smaller change: checked, it is chosen
            spread = _seed_spread(held, report.checks[-1])
            if _check_seed(setup, steps, seeds, [lighter], remedy_of, base, targets, numbers, runner, deadline,
                           report) is not None:
                outranked = (f"; {held.label} scored {held.score:.3f} against this one's {lighter.score:.3f}, "
                             f"within its own two seeds' spread ({spread:.3f}): the smaller change is recommended")
                held = lighter
        report.best = b = held if held is not None else ranked[0]
        evidence = (f"score {b.score:.3f} against {base.score:.3f}" if math.isfinite(b.score)
                    else f"final loss {loss_text(b.final_loss)} against {loss_text(base.final_loss)}")
        left = f" ({', '.join(b.findings)} left, none of them critical)" if b.findings else ""
        where = f" ({b.changed})" if b.changed else ""
        report.message = f"best remedy: {b.label}{where} — the baseline's findings are gone{left} and {evidence}"
        report.message += _checked_words(report.checks, seeds) + outranked
        report.message += _better_with_a_finding_left(report, base, b)
        # a fix that keeps a run finite over these steps may only postpone its NaN (round 13: a hand-written BCE,
        # fixed by LayerNorm for 400 steps, NaN again at step 2,299): the line that made the baseline's is told too
        origin = _nonfinite_origin(report, setup, steps, deadline, "the baseline's ")
        made = report.nonfinite_origin
        if (origin and made is not None and made.phase != "input" and not made.overflowed
                and not set(b.parts) & MENDS_THE_ORIGIN):
            # round 24: input standardisation kept a mixture density net's log of an underflowed density finite
            # for 300 steps, and NaN came back at steps 879–1922 on 3 of 4 seeds
            origin += (" — a row that keeps these trials finite may only postpone a NaN that an operation of yours "
                       "makes: mend that line")
        report.message += origin
    else:
        report.message = "no remedy helped" if report.trials else "no remedy could be tried automatically"
        closest = [t for t in report.trials if not t.error and t.verdict.startswith(("removes the finding", "helps"))
                   and is_better(base, t)]
        if closest:  # not a fix, as measured; but a user should hear of a row that got this far
            scored = all(math.isfinite(t.score) for t in closest)
            c = min(closest, key=(lambda t: -t.score) if scored else (lambda t: t.final_loss))
            evidence = (f"score {c.score:.3f} against {base.score:.3f}" if math.isfinite(c.score) and math.isfinite(base.score)
                        else f"final loss {loss_text(c.final_loss)} against {loss_text(base.final_loss)}")
            report.message = (f"no remedy fixes it (findings gone and the loss at most half its start); closest: "
                              f"{c.label} — {c.verdict}, {evidence}, loss {c.first_loss:.4g} → {loss_text(c.final_loss)}")
        report.message += _too_short(base, report.trials, steps)
        report.message += _nonfinite_origin(report, setup, steps, deadline)
    known = [f"{label} ({why_not[label]})" for label in report.not_applied if why_not.get(label)]
    unknown = [label for label in report.not_applied if not why_not.get(label)]
    if known:
        report.message += f"; not tried, as nothing needs it here: {'; '.join(known)}"
    if unknown:
        report.message += (f"; not tried, finding nothing here to change (a step() of the set-up's own that computes "
                           f"the loss, or nothing of the kind in the model): {'; '.join(unknown)} — apply "
                           f"it by hand if it fits")
    report.message += _by_hand(diagnosis, catalog)
    if runner.stopped:
        report.message += (f" (stopped at the time budget of {budget_s:g} s after {len(report.trials)} trials; "
                           f"{finished_first} of the {len(candidates)} remedies of round 1 tried, those that found "
                           f"nothing to change here without a row)")
    if runner.interrupted:
        report.message += f" (interrupted by Ctrl-C after {len(report.trials)} trials: the table is partial)"
    return report
