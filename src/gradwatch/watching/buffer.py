"""The steps' values, gathered on the device and sent to the host in one copy per batch of steps.

Every value of a step is queued as ``(keys, values)``: ``keys`` an (n, 3)
array of (entity id, quantity id, pos or −1), ``values`` n numbers on the
device; gradient norms are queued as read (one per parameter) with the
function that derives their records, so that the per-layer sums and the
non-finite counts of many steps cost one handful of ops. Steps that ended wait
until ``STEPS_PER_COPY`` of them are ready, or ``SECONDS_PER_COPY`` have
passed, or someone reads the store; then their records are derived,
concatenated (each step's values contiguous) and copied to the host once
(non-blocking, into pinned memory, on a GPU), and handed to the store's writer
thread in one hand-over. Nothing here reads a value on the host.
"""

from __future__ import annotations

import time
from typing import Sequence, Union

import numpy as np
import torch
from torch import Tensor

from gradwatch.probes.grads import Derive, Pending, Stats
from gradwatch.store import StoreWriter

STEPS_PER_COPY = 32  # on a 2 ms step the copy and the derivation cost ~10 µs a step, against ~100 µs one by one
SECONDS_PER_COPY = 1.0  # ... and a store read from another process is at most a second behind

Item = Union[tuple[np.ndarray, Tensor], Pending]


class StepBuffer:
    """The values of the step in progress, of a step that ended and is held, and of steps ready to be sent.

    A step is *held* after it ends so that values logged between
    ``optimizer.step()`` and the next forward pass (the loss, typically) still
    belong to it; the next forward pass, or the next step's first value,
    releases it into the ready steps, which :meth:`send` sends.
    """

    def __init__(self, writer: StoreWriter, device: torch.device, ids: dict[str, np.ndarray]) -> None:
        self._writer = writer
        self._device = device
        self._ids = ids  # entity ids by kind ("layer", "param", "activation"), indexed as the watch lists them
        self._pending: list[Item] = []
        self._ready: list[tuple[int, list[Item]]] = []
        self._since = 0.0  # when the oldest ready step became ready
        self._key_cache: dict[tuple[str, tuple[int, ...], int], np.ndarray] = {}
        self._derived_keys: dict[tuple[int, int], np.ndarray] = {}  # (id of a derive, its layout) -> keys
        self._scalar_keys: dict[tuple[int, int], np.ndarray] = {}  # (entity, quantity) -> keys of a run-level scalar
        self.held: int | None = None  # the step that ended, its values pending until the next forward pass

    # -- queueing ------------------------------------------------------------------------
    def add(self, kind: str, index: Sequence[int], quantity: str, values: Tensor) -> None:
        """Queue values of entities ``index`` of one kind (the watch's numbering) for one quantity."""
        self.add_keyed(self._keys(kind, index, self._writer.quantity(quantity)), values)

    def add_stats(self, stats: Stats | None) -> None:
        """Queue a probe's per-layer and per-parameter values of this step (each (1, ·) or (·,))."""
        for quantity, (layers, per_layer, pairs, per_pair) in (stats or {}).items():
            self.add("layer", layers, quantity, per_layer)
            if pairs:
                self.add("param", pairs, quantity, per_pair)

    def add_pending(self, pending: Pending | None) -> None:
        """Queue gradient norms as read; their records are derived when the step is sent."""
        if pending is not None:
            self._pending.append(pending)

    def add_positioned(self, entity: int, quantity: str, pos: Sequence[int], values: Tensor) -> None:
        """Queue one entity's values along a sequence (a time step per value; −1: none)."""
        n = len(pos)
        keys = np.stack([np.full(n, entity), np.full(n, self._writer.quantity(quantity)), np.asarray(pos)], axis=1)
        self.add_keyed(keys, values)

    def add_scalar(self, entity: int, quantity: int, value: Tensor) -> None:
        """Queue one run-level value (a one-element tensor, any float dtype: the batch is cast once when sent)."""
        keys = self._scalar_keys.get((entity, quantity))
        if keys is None:
            keys = self._scalar_keys[(entity, quantity)] = np.array([[entity, quantity, -1]])
        self._pending.append((keys, value.reshape(1)))

    def add_keyed(self, keys: np.ndarray, values: Tensor) -> None:
        """Queue values for this step's records; ``keys`` is (n, 3): entity, quantity, pos (−1: none)."""
        self._pending.append((keys, values if values.dim() == 1 else values.reshape(-1)))

    def _keys(self, kind: str, index: Sequence[int], quantity: int) -> np.ndarray:
        """(n, 3) array of (entity id, quantity id, −1), cached: the same sets recur every step."""
        key = (kind, tuple(index), quantity)
        keys = self._key_cache.get(key)
        if keys is None:
            ids = self._ids[kind][list(index)]
            keys = self._key_cache[key] = np.stack([ids, np.full(len(ids), quantity), np.full(len(ids), -1)], axis=1)
        return keys

    # -- sending -------------------------------------------------------------------------
    def hold(self, step: int) -> None:
        """Step ``step`` ended, its values all queued: keep them until :meth:`release`."""
        assert self.held is None, "a held step is released before the next one's values are queued"
        self.held = step

    def release(self) -> None:
        """The held step, if any, is ready; send the ready steps when there are enough, or they waited long enough."""
        step, self.held = self.held, None
        if step is not None:
            self.emit(step, now=False)

    def emit(self, step: int, now: bool = True) -> None:
        """Step ``step``'s queued values are ready (``now``: send every ready step at once)."""
        if self._pending:
            if not self._ready:
                self._since = time.perf_counter()
            self._ready.append((step, self._pending))
            self._pending = []
        if self._ready and (now or len(self._ready) >= STEPS_PER_COPY
                            or time.perf_counter() - self._since >= SECONDS_PER_COPY):
            self.send()

    def send(self) -> None:
        """Derive, concatenate and copy the ready steps' values to the host once; hand each step to the writer."""
        ready, self._ready = self._ready, []
        if not ready:
            return
        tables, derived = self._derive(ready)
        if len(tables) == 1 and len(tables[0][1]) == len(ready) and all(len(items) == 1 for _, items in ready):
            # The common case (gradient norms alone on every step): the derived table is the steps' values, row
            # by row, every step with the same keys. No per-step concatenation.
            keys, table = tables[0]
            values = table.reshape(-1)
            spans = [(step, keys) for step, _ in ready]
        else:
            rows = [table.unbind(0) for _, table in tables]  # one call per table, not an index per step
            pieces: list[Tensor] = []
            spans = []
            for j, (step, items) in enumerate(ready):
                parts = []
                for i, item in enumerate(items):
                    if isinstance(item, Pending):
                        t, r = derived[(j, i)]
                        k, v = tables[t][0], rows[t][r]
                    else:
                        k, v = item
                    parts.append(k)
                    pieces.append(v)
                spans.append((step, np.concatenate(parts) if len(parts) > 1 else parts[0]))
            values = torch.cat(pieces)  # (mixed float dtypes promote; the batch is cast to float64 below)
        values = values.to(torch.float64)
        ready_fn = None
        if values.is_cuda:  # pinned memory, non-blocking: the step never waits for the copy
            host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            host.copy_(values, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            ready_fn = event.synchronize
            values = host
        elif values.device.type != "cpu":
            values = values.cpu()
        # one split (a C loop) instead of a Python slice per step; each step's values are contiguous; one hand-over
        self._writer.steps([(step, step_keys, step_values) for (step, step_keys), step_values
                            in zip(spans, values.split([len(k) for _, k in spans]))], ready_fn)

    def _derive(self, ready: list[tuple[int, list[Item]]]
                ) -> tuple[list[tuple[np.ndarray, Tensor]], dict[tuple[int, int], tuple[int, int]]]:
        """The pending items of the ready steps, derived in one batch per derive function.

        Returns the tables, (keys (m, 3), values (k, m): one row per step that queued that derive), and for each
        pending item (step j, item i) its (table, row).
        """
        groups: dict[int, tuple[Derive, list[tuple[int, int]], list[Tensor]]] = {}
        for j, (_, items) in enumerate(ready):
            for i, item in enumerate(items):
                if isinstance(item, Pending):
                    group = groups.setdefault(id(item.derive), (item.derive, [], []))
                    group[1].append((j, i))
                    group[2].append(item.norms)
        tables: list[tuple[np.ndarray, Tensor]] = []
        where: dict[tuple[int, int], tuple[int, int]] = {}
        for derive, at, norms in groups.values():
            rows = torch.stack(norms) if len({t.dtype for t in norms}) == 1 else torch.stack([t.double() for t in norms])
            stats = derive(rows)
            parts = [(kind, index, quantity, values) for quantity, (layers, per_layer, pairs, per_pair) in stats.items()
                     for kind, index, values in (("layer", layers, per_layer), ("param", pairs, per_pair)) if index]
            table = torch.cat([v for *_, v in parts], dim=1)  # (k, m): one row per step
            layout = (id(derive), table.shape[1])
            keys = self._derived_keys.get(layout)
            if keys is None:
                keys = self._derived_keys[layout] = np.concatenate(
                    [self._keys(kind, index, self._writer.quantity(q)) for kind, index, q, _ in parts])
            where.update((a, (len(tables), r)) for r, a in enumerate(at))
            tables.append((keys, table))
        return tables, where

    def clear(self) -> None:
        """Send the steps that ended; drop the step in progress and the held one (the watch stopped recording)."""
        self._pending, self.held = [], None
        try:
            self.send()
        except Exception:  # noqa: BLE001 - the watch is already failing: keep what was sent, drop the rest
            self._ready = []
