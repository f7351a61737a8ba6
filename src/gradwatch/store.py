"""The run store: one SQLite file per run, written off the training thread.

Records are flat ``(step, layer, quantity, value)``, plus a position ``pos``
for quantities measured along a sequence (the time step t of ‖∂L/∂h_t‖), NULL
for all others. They are stored *packed*: one row per step holds that step's
values as one little-endian float64 blob (``packed``), and the step's keys,
(entity, quantity, pos or −1) for each value, are a *layout* stored once
(``layouts``): a 20-layer MLP's ~100 values a step are one row, not 100, which
is what the writer thread spends its time on. :meth:`Run.records` unpacks
them (and reads the flat ``records`` table of stores written before). Layers (and activation
modules, parameters, run-level scalars) are *entities*: a name as in
``named_modules()``/``named_parameters()``, a kind, and a depth (the order of
first forward execution). SQLite runs in WAL mode with ``synchronous=NORMAL``:
each batch commits atomically, so a process killed with SIGKILL leaves a file
that opens and holds every batch committed before the kill.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import math
import os
import queue
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from gradwatch._errors import NotARunError

DB_NAME = "gradwatch.sqlite"
LOCK_NAME = "gradwatch.lock"  # flock-ed by the process writing the run; holds its pid

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entities (
    id INTEGER PRIMARY KEY, name TEXT NOT NULL, kind TEXT NOT NULL,
    module TEXT, depth INTEGER, UNIQUE (name, kind));
CREATE TABLE IF NOT EXISTS quantities (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS records (
    step INTEGER NOT NULL, entity INTEGER NOT NULL, quantity INTEGER NOT NULL, value REAL, pos INTEGER);
CREATE TABLE IF NOT EXISTS layouts (id INTEGER PRIMARY KEY, keys BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS packed (step INTEGER NOT NULL, layout INTEGER NOT NULL, vals BLOB NOT NULL);
"""
KEY_DTYPE = np.dtype("<i8")  # a layout's keys: (n, 3) of (entity id, quantity id, pos or −1)
VALUE_DTYPE = np.dtype("<f8")  # a packed row's values, in its layout's order

# Quantities whose NaN means "undefined here" (zero weights, an input lost to
# an in-place op); they are left out rather than stored. A NaN gradient norm is
# a finding and is always stored.
SKIP_NAN = frozenset({"update_ratio", "saturated_frac", "dead_frac", "deriv_rms", "chain_slope"})

_BATCH = 64  # queue items per transaction, at most


class RunLock:
    """An exclusive ``flock`` on ``RUN/gradwatch.lock``, held for as long as a watch writes the run.

    ``flock`` locks belong to an open file description, so a second watch in the
    same process conflicts just as one in another process does; the kernel
    drops the lock when its holder dies (even by SIGKILL), so a killed run
    never stays locked.
    """

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    @staticmethod
    def acquire(run_dir: Path) -> RunLock | None:
        """The lock of ``run_dir`` (which must exist), or None if another watch holds it."""
        fd = os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        return RunLock(fd)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor releases the flock
            self._fd = None


def lock_holder(run_dir: Path) -> str:
    """Who holds ``run_dir``'s lock, in words: "process 1234" ("…(this one)" for ours)."""
    try:
        pid = (run_dir / LOCK_NAME).read_text().strip()
    except OSError:
        pid = ""
    if not pid.isdigit():
        return "another process"
    return f"process {pid}" + (" (this one)" if int(pid) == os.getpid() else "")


def _connect(path: Path) -> sqlite3.Connection:
    con = sqlite3.connect(path, check_same_thread=False, timeout=30)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=NORMAL")
    return con


def _create(path: Path) -> None:
    """Create an empty store atomically: schema and first metadata under a temporary name, then a rename.

    A process killed at any moment leaves either no store or one that opens.
    """
    tmp = path.with_name(path.name + ".partial")
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(str(tmp) + suffix).unlink(missing_ok=True)
    con = _connect(tmp)
    try:
        con.executescript(SCHEMA)
        con.execute("INSERT INTO meta (key, value) VALUES ('status', ?)", (json.dumps("running"),))
        con.commit()
    finally:
        con.close()  # checkpoints the WAL into the file and removes it
    os.replace(tmp, path)


def _open_read_only(db: Path) -> sqlite3.Connection:
    """A read-only connection; ``immutable`` where the WAL index cannot be created (read-only storage).

    An immutable read skips the write-ahead log: on read-only storage no watch
    can be writing, and a finished run's log is already folded into the file.
    """
    uri = db.resolve().as_uri()
    con = sqlite3.connect(f"{uri}?mode=ro", uri=True)
    try:
        con.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
        return con
    except sqlite3.OperationalError:  # no -shm next to the file, and none can be made
        con.close()
    return sqlite3.connect(f"{uri}?mode=ro&immutable=1", uri=True)


def _not_a_run_reason(exc: BaseException) -> str:
    text = str(exc)
    if "no such table" in text:
        return f"an SQLite file without gradwatch's tables: {text}"
    if "not a database" in text:
        return "not an SQLite file"
    if isinstance(exc, ValueError):
        return f"its metadata does not parse: {text}"
    return f"damaged: {text}"


class StoreWriter:
    """Owns the SQLite connection; a background thread drains a queue of writes.

    ``lock``: the run's :class:`RunLock`, released when the writer closes.
    """

    def __init__(self, path: Path, lock: RunLock | None = None) -> None:
        self.path = path
        self._lock = lock
        try:
            _create(path)  # raises here, at the API boundary, if the path is unwritable
            self._con = _connect(path)
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        self._queue: queue.Queue[tuple[str, Any] | None] = queue.Queue()
        self.error: BaseException | None = None
        self._entities: dict[tuple[str, str], int] = {}
        self._quantities: dict[str, int] = {}
        self._layouts: dict[bytes, int] = {}  # a layout's key bytes -> its id (the writer thread's)
        self._thread = threading.Thread(target=self._run, name="gradwatch-writer", daemon=True)
        self._thread.start()

    # -- called from the training thread -------------------------------------------------
    def _put(self, kind: str, payload: Any) -> None:
        self._queue.put((kind, payload))

    def entity(self, name: str, kind: str, module: str | None = None) -> int:
        """The id of the entity ``(name, kind)``; the first call allocates it and queues its row."""
        eid = self._entities.get((name, kind))
        if eid is None:
            eid = self._entities[(name, kind)] = len(self._entities) + 1
            self._put("entities", [(eid, name, kind, module)])
        return eid

    def quantity(self, name: str) -> int:
        """The id of a quantity; the first call allocates it and queues its row."""
        qid = self._quantities.get(name)
        if qid is None:
            qid = self._quantities[name] = len(self._quantities) + 1
            self._put("quantities", [(qid, name)])
        return qid

    def entity_ids(self) -> dict[tuple[str, str], int]:
        """Every entity allocated so far: ``(name, kind)`` to id, in order of allocation."""
        return dict(self._entities)

    def meta(self, values: dict[str, Any]) -> None:
        self._put("meta", dict(values))

    def depths(self, rows: Sequence[tuple[int, int]]) -> None:
        """Set entities' depths: ``rows`` of (entity id, depth)."""
        self._put("depths", list(rows))

    def records(self, step: int, keys: np.ndarray, values: Any, ready: Callable[[], None] | None = None) -> None:
        """Queue one step's values: ``keys`` is (n, 3) of (entity id, quantity id, pos or −1), ``values`` a host tensor.

        ``ready`` is called in the writer thread before reading ``values``
        (waits for an asynchronous device-to-host copy).
        """
        self._put("records", (step, keys, values, ready))

    def steps(self, rows: list[tuple[int, np.ndarray, Any]], ready: Callable[[], None] | None = None) -> None:
        """Queue many steps' values at once, ``rows`` of (step, keys, values) as :meth:`records` takes them: one
        hand-over to the writer thread (one wake-up of it) for a batch of steps, not one per step."""
        self._put("steps", (rows, ready))

    def flush(self) -> None:
        """Block until everything queued so far is committed."""
        self._queue.join()

    def close(self, final: dict[str, Any] | None = None) -> None:
        """Write ``final`` metadata, drain the queue, close the file, release the lock. Idempotent.

        After a write failure, ``final`` is still written (its ``status`` then
        says ``failed: <reason>``) in a transaction of its own.
        """
        if not self._thread.is_alive():
            return
        if final is not None:
            self.meta(final)
        self._queue.put(None)
        self._thread.join()
        try:
            if self.error is not None and final is not None:
                self._con.rollback()
                self._write_meta({**final, "status": f"failed: {type(self.error).__name__}: {self.error}"})
                self._con.commit()
            self._con.commit()
        except sqlite3.Error as exc:  # pragma: no cover - disk trouble at the very end
            self.error = self.error or exc
        finally:
            self._con.close()
            if self._lock is not None:
                self._lock.release()

    # -- the writer thread ---------------------------------------------------------------
    def _run(self) -> None:
        while True:
            item = self._queue.get()
            batch = [item]
            while item is not None and len(batch) < _BATCH:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                batch.append(item)
            stop = batch[-1] is None
            work = [b for b in batch if b is not None]
            try:
                if self.error is None:
                    for kind, payload in work:
                        getattr(self, "_write_" + kind)(payload)
                    self._con.commit()
            except BaseException as exc:  # keep draining, so flush() never hangs; the watch reports it
                self.error = exc
            finally:
                for _ in batch:
                    self._queue.task_done()
            if stop:
                return

    def _write_meta(self, values: dict[str, Any]) -> None:
        self._con.executemany(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
            [(k, json.dumps(v)) for k, v in values.items()],
        )

    def _write_entities(self, rows: list[tuple[int, str, str, str | None]]) -> None:
        self._con.executemany("INSERT INTO entities (id, name, kind, module) VALUES (?, ?, ?, ?)", rows)

    def _write_quantities(self, rows: list[tuple[int, str]]) -> None:
        self._con.executemany("INSERT INTO quantities (id, name) VALUES (?, ?)", rows)

    def _write_depths(self, rows: list[tuple[int, int]]) -> None:
        self._con.executemany("UPDATE entities SET depth = ? WHERE id = ?", [(d, i) for i, d in rows])

    def _write_steps(self, payload: tuple) -> None:
        rows, ready = payload
        if ready is not None:
            ready()
        for step, keys, values in rows:
            self._write_records((step, keys, values, None))

    def _write_records(self, payload: tuple) -> None:
        """One step's values as one packed row; its layout is written the first time it is seen."""
        step, keys, values, ready = payload
        if ready is not None:
            ready()
        if len(keys) == 0:
            return
        key_bytes = np.ascontiguousarray(keys, dtype=KEY_DTYPE).tobytes()
        layout = self._layouts.get(key_bytes)
        if layout is None:
            layout = self._layouts[key_bytes] = len(self._layouts) + 1
            self._con.execute("INSERT INTO layouts (id, keys) VALUES (?, ?)", (layout, key_bytes))
        vals = np.ascontiguousarray(values.numpy(), dtype=VALUE_DTYPE)
        self._con.execute("INSERT INTO packed (step, layout, vals) VALUES (?, ?, ?)", (step, layout, vals.tobytes()))


class NullWriter(StoreWriter):
    """A writer that allocates ids and keeps nothing: a sharded job's ranks other than 0 measure, rank 0 writes."""

    def __init__(self) -> None:  # no file, no thread, no lock
        self.error = None
        self._entities, self._quantities = {}, {}

    def _put(self, kind: str, payload: Any) -> None:
        return None

    def flush(self) -> None:
        return None

    def close(self, final: dict[str, Any] | None = None) -> None:
        return None


# -- reading ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Entity:
    """Something records are about: a layer, a parameter, an activation module, or the run itself."""

    name: str
    kind: str  # "layer", "param", "activation" or "run"
    module: str | None  # the module's class name
    depth: int | None  # position in the order outputs are produced; None if it never ran


@dataclass(frozen=True)
class Series:
    """One quantity as a matrix: ``values[i, j]`` is entity ``names[i]`` at step ``steps[j]`` (NaN: not recorded)."""

    quantity: str
    names: list[str]
    steps: np.ndarray
    values: np.ndarray


class Run:
    """A stored run, read back. Open one with :func:`open_run`."""

    def __init__(self, path: str | Path) -> None:
        p = Path(path)
        db = p / DB_NAME if p.is_dir() else p
        if not db.is_file():
            raise FileNotFoundError(f"`open_run(path=…)` expects a run directory holding {DB_NAME}, got {str(path)!r}")
        self.path = db.parent
        try:
            self._con = _open_read_only(db)
        except sqlite3.DatabaseError as exc:
            raise NotARunError(f"`{path}` is not a gradwatch run ({_not_a_run_reason(exc)})") from None
        try:
            self.meta: dict[str, Any] = {k: json.loads(v) for k, v in self._con.execute("SELECT key, value FROM meta")}
            self._load_names()
            tables = {r[0] for r in self._con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        except (sqlite3.DatabaseError, ValueError) as exc:
            self._con.close()
            raise NotARunError(f"`{path}` is not a gradwatch run ({_not_a_run_reason(exc)})") from None
        self._has_packed = "packed" in tables  # a store written before packing has the flat table alone
        self._layout_keys: dict[int, np.ndarray] = {}
        self._unpacked: dict[int, tuple[list[np.ndarray], list[np.ndarray]]] = {}  # layout -> (steps, value rows)
        self._read_upto = 0  # the packed rows' rowid read so far

    def _load_names(self) -> None:
        """(Re)read the entity and quantity tables: a watch still writing adds to them."""
        rows = self._con.execute("SELECT id, name, kind, module, depth FROM entities ORDER BY id").fetchall()
        self._entities: dict[int, tuple[str, str, str | None, int | None]] = {r[0]: r[1:] for r in rows}
        self._quantities: dict[int, str] = dict(self._con.execute("SELECT id, name FROM quantities").fetchall())

    def __repr__(self) -> str:
        packed = self._packed()
        n = self._con.execute("SELECT COUNT(*) FROM records").fetchone()[0] + sum(
            len(self._layout_keys[layout]) * sum(len(s) for s in steps) for layout, (steps, _) in packed.items())
        return f"Run({str(self.path)!r}, {len(self.layers)} layers, {n} records)"

    def close(self) -> None:
        self._con.close()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def entities(self, kind: str | None = None) -> list[Entity]:
        """Entities (of one kind), in depth order; those that never ran last."""
        found = [Entity(n, k, m, d) for _, (n, k, m, d) in sorted(self._entities.items()) if kind in (None, k)]
        return sorted(found, key=lambda e: math.inf if e.depth is None else e.depth)

    def names(self, kind: str = "layer") -> list[str]:
        """Entity names of one kind, in order of first forward execution (never-run ones last)."""
        found = [(d if d is not None else math.inf, i, n) for i, (n, k, _, d) in self._entities.items() if k == kind]
        return [n for _, _, n in sorted(found)]

    @property
    def layers(self) -> list[str]:
        return self.names("layer")

    @property
    def quantities(self) -> list[str]:
        """The quantities with at least one record: a name registered by a step that was never written (a watch
        that stopped recording within it) is not one."""
        mark = self._con.execute("SELECT (SELECT MAX(rowid) FROM records), (SELECT MAX(id) FROM layouts)").fetchone()
        if getattr(self, "_held_mark", None) != mark:  # read again only where a writer added records or a layout
            held = {int(q) for (q,) in self._con.execute("SELECT DISTINCT quantity FROM records")}
            for blob, in self._con.execute("SELECT keys FROM layouts"):
                held.update(np.frombuffer(blob, dtype=KEY_DTYPE).reshape(-1, 3)[:, 1].tolist())
            if not held <= self._quantities.keys():
                self._load_names()
            self._held_mark, self._held = mark, held
        return sorted(n for i, n in self._quantities.items() if i in self._held)

    def records(self, quantity: str | None = None, kind: str | None = None,
                positioned: bool | None = None) -> dict[str, np.ndarray]:
        """All records (optionally of one quantity / entity kind) as numpy arrays.

        Keys: ``step`` (int64), ``layer`` (names), ``kind``, ``quantity``, ``value``
        (float64; NaN for NULL), ``pos`` (int64; −1 where the record has none).
        ``positioned``: True for only records with a position, False for only those without.
        """
        sql = "SELECT step, entity, quantity, value, pos FROM records"
        where: list[str] = []
        args: list[object] = []
        if positioned is not None:
            where.append("pos IS NOT NULL" if positioned else "pos IS NULL")
        if quantity is not None and quantity not in self._quantities.values():
            self._load_names()
        qids = None if quantity is None else [i for i, n in self._quantities.items() if n == quantity]
        if qids is not None:
            where.append(f"quantity IN ({','.join('?' * len(qids)) or 'NULL'})")
            args.extend(qids)
        eids = None if kind is None else [i for i, e in self._entities.items() if e[1] == kind]
        if eids is not None:
            where.append(f"entity IN ({','.join('?' * len(eids)) or 'NULL'})")
            args.extend(eids)
        if where:
            sql += " WHERE " + " AND ".join(where)
        rows = self._con.execute(sql, args).fetchall()
        flat = (np.array([r[0] for r in rows], dtype=np.int64), np.array([r[1] for r in rows], dtype=np.int64),
                np.array([r[2] for r in rows], dtype=np.int64),
                np.array([np.nan if r[3] is None else r[3] for r in rows], dtype=np.float64),
                np.array([-1 if r[4] is None else r[4] for r in rows], dtype=np.int64))
        parts = [flat]
        for layout, (steps, rows_) in self._packed().items():
            keys = self._layout_keys[layout]
            keep = np.ones(len(keys), dtype=bool)
            if positioned is not None:
                keep &= (keys[:, 2] >= 0) if positioned else (keys[:, 2] < 0)
            if qids is not None:
                keep &= np.isin(keys[:, 1], qids)
            if eids is not None:
                keep &= np.isin(keys[:, 0], eids)
            if not keep.any():
                continue
            k = keys[keep]
            values = np.concatenate(rows_)[:, keep]  # (steps, kept)
            step = np.concatenate(steps)
            parts.append((np.repeat(step, len(k)), np.tile(k[:, 0], len(step)), np.tile(k[:, 1], len(step)),
                          values.reshape(-1), np.tile(k[:, 2], len(step))))
        step, ent, qty, value, pos = (np.concatenate(c) for c in zip(*parts))
        if len(ent) and (not set(np.unique(ent).tolist()) <= self._entities.keys()
                         or not set(np.unique(qty).tolist()) <= self._quantities.keys()):
            self._load_names()  # written after this Run opened
        skip = [i for i, n in self._quantities.items() if n in SKIP_NAN]  # NaN there means "undefined": left out
        if skip:
            keep_rows = ~(np.isin(qty, skip) & np.isnan(value))
            step, ent, qty, value, pos = step[keep_rows], ent[keep_rows], qty[keep_rows], value[keep_rows], pos[keep_rows]
        order = np.lexsort((pos, qty, ent, step))
        step, ent, qty, value, pos = step[order], ent[order], qty[order], value[order], pos[order]
        names = {i: e[0] for i, e in self._entities.items()}
        kinds = {i: e[1] for i, e in self._entities.items()}
        return {
            "step": step,
            "layer": np.array([names[i] for i in ent.tolist()], dtype=object),
            "kind": np.array([kinds[i] for i in ent.tolist()], dtype=object),
            "quantity": np.array([self._quantities[i] for i in qty.tolist()], dtype=object),
            "value": value,
            "pos": pos,
        }

    def _packed(self) -> dict[int, tuple[list[np.ndarray], list[np.ndarray]]]:
        """Every packed row so far, by layout: (step arrays, (steps, values) matrices); reads only rows new since
        the last call (a watch may still be writing)."""
        if not self._has_packed:
            return self._unpacked
        new = self._con.execute("SELECT rowid, step, layout, vals FROM packed WHERE rowid > ? ORDER BY rowid",
                                (self._read_upto,)).fetchall()
        if not new:
            return self._unpacked
        self._read_upto = new[-1][0]
        if any(r[2] not in self._layout_keys for r in new):
            for i, blob in self._con.execute("SELECT id, keys FROM layouts"):
                self._layout_keys[i] = np.frombuffer(blob, dtype=KEY_DTYPE).reshape(-1, 3).astype(np.int64)
        by_layout: dict[int, list[tuple[int, bytes]]] = {}
        for _, step, layout, blob in new:
            by_layout.setdefault(layout, []).append((step, blob))
        for layout, items in by_layout.items():
            m = len(self._layout_keys[layout])
            steps, rows = self._unpacked.setdefault(layout, ([], []))
            steps.append(np.array([st for st, _ in items], dtype=np.int64))
            rows.append(np.frombuffer(b"".join(b for _, b in items), dtype=VALUE_DTYPE).reshape(-1, m).astype(np.float64))
            if len(steps) > 1:  # one array each: every records() call concatenates them, so do it once here
                steps[:] = [np.concatenate(steps)]
                rows[:] = [np.concatenate(rows)]
        return self._unpacked

    def series(self, quantity: str, kind: str | None = None) -> Series:
        """One quantity as an (entities × steps) matrix, entities in depth order.

        ``kind``: the entities to read (``"layer"``, ``"activation"``, ``"run"``, ``"recurrent"``, …); by default
        ``"layer"`` where layers hold the quantity, else the one kind that does (``saturated_frac`` lives on
        activations, ``loss`` on the run). A quantity held by several kinds and no layer needs ``kind``.
        """
        if quantity not in self._quantities.values():
            self._load_names()
            if quantity not in self._quantities.values():
                raise KeyError(f"`Run.series(quantity=…)` expects one of the recorded quantities "
                               f"({', '.join(self.quantities)}), got {quantity!r}")
        rec = self.records(quantity, kind, positioned=False)
        if kind is None:  # read once, then keep the kind that holds it
            held = sorted(set(rec["kind"].tolist()))
            if len(held) > 1 and "layer" not in held:
                raise ValueError(f"`Run.series(kind=…)`: {quantity!r} is recorded for entities of kinds "
                                 f"{', '.join(map(repr, held))}; pass one of them")
            kind = "layer" if "layer" in held or not held else held[0]
            keep = rec["kind"] == kind
            rec = {k: v[keep] for k, v in rec.items()}
        present = set(rec["layer"].tolist())
        names = [n for n in self.names(kind) if n in present]
        steps = np.unique(rec["step"])
        values = np.full((len(names), len(steps)), np.nan)
        row = {n: i for i, n in enumerate(names)}
        col = np.searchsorted(steps, rec["step"])
        for name, j, v in zip(rec["layer"], col, rec["value"]):
            values[row[name], j] = v
        return Series(quantity, names, steps, values)

    def temporal(self, name: str, quantity: str = "temporal_grad_norm") -> Series:
        """A positioned quantity of one entity as a (positions × steps) matrix; ``names`` are the positions."""
        rec = self.records(quantity, positioned=True)
        sel = rec["layer"] == name
        steps, pos, vals = rec["step"][sel], rec["pos"][sel], rec["value"][sel]
        us, up = np.unique(steps), np.unique(pos)
        values = np.full((len(up), len(us)), np.nan)
        values[np.searchsorted(up, pos), np.searchsorted(us, steps)] = vals
        return Series(quantity, [str(p) for p in up], us, values)

    def to_dataframe(self) -> Any:
        """The records as a pandas DataFrame (needs pandas: ``pip install pandas``)."""
        try:
            import pandas as pd
        except ImportError:
            raise ImportError("Run.to_dataframe() needs pandas: pip install pandas") from None
        return pd.DataFrame(self.records())


def open_run(path: str | Path) -> Run:
    """Open a stored run (its directory, or the SQLite file) for reading."""
    return Run(path)
