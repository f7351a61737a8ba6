"""One trial under a watch: a set-up at one seed, with or without a remedy, trained for a number of steps.

:func:`run_trial` is the unit of work of the doctor's table. Its arguments
and its result are plain data (the set-up and the remedy excepted: they are
the caller's callables), so that trials can run in any order, in this
process or in another.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

from torch import nn

from gradwatch.diagnosis import Diagnosis, Thresholds
from gradwatch.doctor.catalogue import Remedy
from gradwatch.doctor.surgery import PreciseBN
from gradwatch.trial import SetupFn, null_output, null_score
from gradwatch.watching import watch


class TrialRun(NamedTuple):
    """What one trial measured."""

    losses: list[float]  # the loss at every step
    score: float  # held-out score after training (higher is better); NaN when the set-up has none
    findings: list[str]  # the kinds of the diagnosis's problems
    diagnosis: Diagnosis
    null_loss: float = math.nan  # the loss of a constant output on the next batches (gradwatch.trial.null_loss)
    judge_by_score: bool = False  # the set-up says its loss does not show learning: the score decides
    null_score: float = math.nan  # the held-out score of the constant output (gradwatch.trial.null_score)
    rescored_bn: bool = False  # scored after re-estimating inserted BatchNorm statistics (surgery.PreciseBN)
    changed: str = ""  # what the remedy changed, where a change says (surgery: where the skip connections went)
    own_objective: bool = False  # the remedy weighs the loss's samples otherwise: its loss is another objective


def run_trial(setup: SetupFn, seed: int, steps: int, store: Path, name: str, remedy: Remedy | None,
              numbers: dict[str, float]) -> TrialRun | None:
    """Train ``setup(seed)`` (with ``remedy`` applied) under a watch stored as ``store/name``; None when the remedy
    does not apply to this set-up. ``numbers`` are the findings' numbers the remedy may use (e.g. ``clip_at``)."""
    trial = setup(seed)
    if remedy is not None:
        applied = remedy.apply(trial, {**numbers, "doctor_steps": float(steps)})
        if applied is None:
            return None
        trial = applied
    # fused nn.RNN/GRU/LSTM: re-run unrolled; otherwise the watch's default finds cells called in a Python loop
    temporal: bool | str = True if any(isinstance(m, nn.RNNBase) for m in trial.model.modules()) else "auto"
    null, constant = null_output(trial)
    losses: list[float] = []
    # budget=None: the fixed default schedules (gradient norms every step, the forward-side probes every 10th).
    # The doctor's verdicts compare trials' findings, so what each trial records must not depend on the clock:
    # the budget thins by measured time, which differs between a loaded machine, a pool worker and a Ray node
    # (the table is promised the same however the trials run). The trials are the doctor's own short experiments,
    # not the user's training, and every 10th step keeps 10 samples of a 100-step trial for the depth, activation
    # and stalled-layer rules (the budget's floor keeps 7).
    with watch(trial.model, trial.optimizer, store=store, name=name, overwrite=True, temporal=temporal,
               budget=None) as w:
        for _ in range(steps):
            loss = trial.step()
            w.log(loss=loss)
            losses.append(float(loss))
        paths = getattr(trial, "loss_paths", None)  # the default step() read its loss's graph (one of the set-up's own may not)
        if paths is not None:
            w._note_loss_paths(paths, getattr(trial, "loss_prior", None), getattr(trial, "loss_graph", None),
                               getattr(trial, "loss_foreign", None))
    score = trial.evaluate(trial.model) if trial.evaluate is not None else math.nan
    diagnosis = w.diagnose(Thresholds(from_init=True))  # a trial starts from its set-up's initialisation
    return TrialRun(losses, score, list(dict.fromkeys(f.kind for f in diagnosis.problems)), diagnosis, null,
                    bool(getattr(trial, "judge_by_score", False)), null_score(trial, constant),
                    isinstance(trial.evaluate, PreciseBN), str(getattr(trial, "doctor_changed", "")),
                    bool(getattr(trial, "doctor_own_objective", False)))
