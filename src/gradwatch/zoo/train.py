"""Train a zoo set-up under a watch: the one loop the tests, the benchmarks and the demo share."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from torch import nn

from gradwatch.trial import Trial
from gradwatch.watching import watch
from gradwatch.zoo.registry import get


def train_watched(name: str, seed: int, steps: int, store: str | Path, run_name: str | None = None,
                  **watch_options: Any) -> tuple[Path, Trial]:
    """Train set-up ``name`` at ``seed`` for ``steps`` steps under a watch, logging the loss; (its store, the trial).

    Recurrent set-ups are watched with ``temporal=True``. The tests, the
    benchmarks and the demo all train the zoo through this one function.
    """
    trial = get(name)(seed)
    watch_options.setdefault("temporal", any(isinstance(m, nn.RNNBase) for m in trial.model.modules()))
    with watch(trial.model, trial.optimizer, store=store, name=run_name or f"{name}-seed{seed}",
               **watch_options) as w:
        for _ in range(steps):
            w.log(loss=trial.step())
    return w.path, trial


def readme_loop(trial: Trial, w: Any, steps: int) -> None:
    """``steps`` steps of the README's loop on ``trial`` under the watch ``w``: forward, loss, zero_grad, backward,
    step, and the loss logged with its graph (so that the watch reads what the loss does to the output, which a
    detached ``trial.step()`` hides). A trial's scheduler steps itself after each optimizer step."""
    for _ in range(steps):
        x, y = next(trial.batches)
        loss = trial.loss_fn(trial.model(x), y)
        trial.optimizer.zero_grad()
        loss.backward()
        trial.optimizer.step()
        w.log(loss=loss)


def readme_watched(trial: Trial, store: str | Path, name: str, steps: int, **watch_options: Any) -> Any:
    """:func:`readme_loop` for ``steps`` steps under a watch stored as ``store/name``, the set-up's own warnings
    silenced (a pathology's set-up warns by design: a broadcast MSE, a ctc_loss that is +inf); the watch, closed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with watch(trial.model, trial.optimizer, store=store, name=name, **watch_options) as w:
            readme_loop(trial, w, steps)
    return w
