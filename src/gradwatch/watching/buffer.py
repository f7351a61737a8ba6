"""One step's values, gathered on the device and sent to the host in one copy.

Every value of a step is queued as ``(keys, values)``: ``keys`` an (n, 3)
array of (entity id, quantity id, pos or −1), ``values`` n numbers on the
device. At the step's end they are concatenated and copied to the host once
(non-blocking, into pinned memory, on a GPU) and handed to the store's writer
thread. Nothing here reads a value on the host.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from gradwatch.probes.grads import Stats
from gradwatch.store import StoreWriter


class StepBuffer:
    """The values of the step in progress, or of a step that ended and is held until the next forward pass.

    A step is *held* after it ends so that values logged between
    ``optimizer.step()`` and the next forward pass (the loss, typically) still
    travel in its copy; the next forward pass, or the next step's first
    value, releases it.
    """

    def __init__(self, writer: StoreWriter, device: torch.device, ids: dict[str, np.ndarray]) -> None:
        self._writer = writer
        self._device = device
        self._ids = ids  # entity ids by kind ("layer", "param", "activation"), indexed as the watch lists them
        self._pending: list[tuple[np.ndarray, Tensor]] = []
        self._key_cache: dict[tuple[str, tuple[int, ...], int], np.ndarray] = {}
        self.held: int | None = None  # the step that ended, its values pending until the next forward pass

    # -- queueing ------------------------------------------------------------------------
    def add(self, kind: str, index: Sequence[int], quantity: str, values: Tensor) -> None:
        """Queue values of entities ``index`` of one kind (the watch's numbering) for one quantity."""
        self.add_keyed(self._keys(kind, index, self._writer.quantity(quantity)), values)

    def add_stats(self, stats: Stats | None) -> None:
        """Queue the gradient probe's per-layer and per-parameter values."""
        for quantity, (layers, per_layer, pairs, per_pair) in (stats or {}).items():
            self.add("layer", layers, quantity, per_layer)
            if pairs:
                self.add("param", pairs, quantity, per_pair)

    def add_positioned(self, entity: int, quantity: str, pos: Sequence[int], values: Tensor) -> None:
        """Queue one entity's values along a sequence (a time step per value; −1: none)."""
        n = len(pos)
        keys = np.stack([np.full(n, entity), np.full(n, self._writer.quantity(quantity)), np.asarray(pos)], axis=1)
        self.add_keyed(keys, values)

    def add_keyed(self, keys: np.ndarray, values: Tensor) -> None:
        """Queue values for this step's one host copy; ``keys`` is (n, 3): entity, quantity, pos (−1: none)."""
        self._pending.append((keys, values.reshape(-1).to(self._device, torch.float64)))

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
        """Send the held step's values on, if a step is held."""
        step, self.held = self.held, None
        if step is not None:
            self.emit(step)

    def emit(self, step: int) -> None:
        """One device-to-host copy of every value queued, handed to the writer thread as step ``step``."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        keys = np.concatenate([k for k, _ in pending])
        values = torch.cat([v for _, v in pending])
        ready = None
        if values.is_cuda:  # pinned memory, non-blocking: the step never waits for the copy
            host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            host.copy_(values, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            ready = event.synchronize
            values = host
        elif values.device.type != "cpu":
            values = values.cpu()
        self._writer.records(step, keys, values, ready)

    def clear(self) -> None:
        """Drop everything queued and held (the watch stopped recording)."""
        self._pending, self.held = [], None
