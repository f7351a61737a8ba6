"""Exporters: the same stored records, written where users already look."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np

from gradwatch._errors import bad_argument
from gradwatch.store import Run, open_run


def scalars(run: Run | str | Path) -> Iterator[tuple[int, dict[str, float]]]:
    """A run's records as (step, {tag: value}) in step order, the tags every exporter uses.

    Tags are ``quantity/layer`` (``quantity/param`` for a parameter's own
    record; ``loss`` and other logged scalars keep their name). Per-time-step
    records (``temporal_grad_norm`` and friends, which carry a position) are
    left out: one series per time step would bury the rest. NaN (a value not
    defined at that step, or a NaN gradient norm, which the ``nonfinite``
    counts report) is left out too: dashboards have no "not recorded".
    """
    if not isinstance(run, Run):
        run = open_run(run)
    rec = run.records(positioned=False)
    order = np.argsort(rec["step"], kind="stable")
    step_now: int | None = None
    row: dict[str, float] = {}
    for i in order:
        value = float(rec["value"][i])
        if np.isnan(value):
            continue
        step = int(rec["step"][i])
        if step != step_now:
            if row:
                yield step_now, row  # type: ignore[misc]
            step_now, row = step, {}
        kind, quantity, layer = rec["kind"][i], rec["quantity"][i], rec["layer"][i]
        row[quantity if kind == "run" else f"{quantity}/{layer or '(root)'}"] = value
    if row:
        yield step_now, row  # type: ignore[misc]


def to_tensorboard(run: Run | str | Path, logdir: str | Path) -> Path:
    """Write a stored run's records to TensorBoard as scalars; returns ``logdir``.

    Tags as in :func:`scalars`, at the record's step. Needs ``pip install
    tensorboard`` (``gradwatch[tensorboard]``).
    """
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ImportError("to_tensorboard() needs TensorBoard: pip install tensorboard "
                          "(or gradwatch[tensorboard])") from None
    logdir = Path(logdir)
    writer = SummaryWriter(log_dir=str(logdir))
    try:
        for step, row in scalars(run):
            for tag, value in row.items():
                writer.add_scalar(tag, value, step)
    finally:
        writer.close()
    return logdir


def to_wandb(run: Run | str | Path, wandb_run: Any = None, **init: Any) -> Any:
    """Log a stored run's records to Weights & Biases; returns the W&B run.

    With ``wandb_run`` (an active ``wandb.init()`` run) the records go into
    it, at their own steps, and it is left open. Otherwise a run is started
    with ``wandb.init(**init)`` (say ``project=…``, ``mode="offline"``,
    ``dir=…``), its config set to the gradwatch run's metadata, and finished
    at the end. Tags as in :func:`scalars`. Needs ``pip install wandb``
    (``gradwatch[wandb]``).
    """
    try:
        import wandb
    except ImportError:
        raise ImportError("to_wandb() needs Weights & Biases: pip install wandb (or gradwatch[wandb])") from None
    if not isinstance(run, Run):
        run = open_run(run)
    own = wandb_run is None
    if own:
        init.setdefault("name", Path(run.path).name)
        init.setdefault("config", {"gradwatch": {k: v for k, v in run.meta.items() if k not in ("layers",)}})
        wandb_run = wandb.init(**init)
    elif init:
        raise TypeError(bad_argument("to_wandb", "wandb_run", "None when wandb.init() arguments are given",
                                     wandb_run))
    elif not hasattr(wandb_run, "log"):
        raise TypeError(bad_argument("to_wandb", "wandb_run", "an active wandb run (from wandb.init()) or None",
                                     wandb_run))
    try:
        for step, row in scalars(run):
            wandb_run.log(row, step=step)
    finally:
        if own:
            wandb_run.finish()
    return wandb_run
