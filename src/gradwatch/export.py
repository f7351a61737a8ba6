"""Exporters: the same stored records, written where users already look."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gradwatch.store import Run, open_run


def to_tensorboard(run: Run | str | Path, logdir: str | Path) -> Path:
    """Write a stored run's records to TensorBoard as scalars; returns ``logdir``.

    Tags are ``quantity/layer`` (``loss`` and other logged scalars keep their
    name), at the record's step. Per-time-step records (``temporal_grad_norm``
    and friends, which carry a position) are left out: one scalar series per
    time step would bury the rest. Needs ``pip install tensorboard``
    (``gradwatch[tensorboard]``).
    """
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ImportError("to_tensorboard() needs TensorBoard: pip install tensorboard "
                          "(or gradwatch[tensorboard])") from None
    if not isinstance(run, Run):
        run = open_run(run)
    rec = run.records(positioned=False)
    logdir = Path(logdir)
    writer = SummaryWriter(log_dir=str(logdir))
    try:
        for step, layer, kind, quantity, value in zip(rec["step"], rec["layer"], rec["kind"], rec["quantity"],
                                                      rec["value"]):
            if np.isnan(value):
                continue  # TensorBoard has no "not recorded"; NaN gradients are in the nonfinite counts
            tag = quantity if kind == "run" else f"{quantity}/{layer or '(root)'}"
            writer.add_scalar(tag, float(value), int(step))
    finally:
        writer.close()
    return logdir
