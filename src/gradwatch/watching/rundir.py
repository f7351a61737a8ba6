"""The run's directory: named, created and locked before the watch writes a byte."""

from __future__ import annotations

import datetime as _dt
import itertools
from pathlib import Path

from torch import nn

from gradwatch.store import DB_NAME, RunLock, lock_holder


def open_run_dir(root: Path, name: str | None, model: nn.Module, overwrite: bool,
                 caller: str = "watch") -> tuple[Path, RunLock]:
    """The run's directory, created, and its lock, held: no other watch writes it while this one does.

    ``name`` None: the first free name from the model's class and the time. A
    run being written by an open watch is never replaced; a finished one only
    with ``overwrite``.
    """
    if name is None:  # the first free name: not stored, not being written
        base = f"{type(model).__name__}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
        for k in itertools.count(1):
            name = base if k == 1 else f"{base}-{k}"
            if not (root / name / DB_NAME).exists():
                run_dir, lock = _locked_dir(root, name, caller)
                if lock is not None and not (run_dir / DB_NAME).exists():
                    return run_dir, lock
                if lock is not None:
                    lock.release()
    assert name is not None
    run_dir, lock = _locked_dir(root, name, caller)
    if lock is None:
        raise FileExistsError(
            f"`{caller}(name=…)`: run {name!r} in {str(root)!r} is being written by {lock_holder(run_dir)}, "
            f"whose watch is still open; a live run is never replaced: close that watch first, or pick another name"
        )
    db = run_dir / DB_NAME
    if db.exists():
        if not overwrite:
            lock.release()
            raise FileExistsError(
                f"`{caller}(name=…)`: run {name!r} already exists in {str(root)!r}; pick another name, "
                f"or pass overwrite=True to replace it"
            )
        for suffix in ("", "-wal", "-shm"):
            Path(str(db) + suffix).unlink(missing_ok=True)
    return run_dir, lock


def _locked_dir(root: Path, name: str, caller: str) -> tuple[Path, RunLock | None]:
    """Create ``root/name`` and try its lock (None: another watch holds it)."""
    run_dir = root / name
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        return run_dir, RunLock.acquire(run_dir)
    except OSError as exc:
        raise OSError(f"`{caller}(store=…)` cannot create the run directory {str(run_dir)!r}: {exc.strerror or exc}") from None
