"""The watch's flight recorder: every step's per-layer norms in a device ring buffer, dumped to the store on an event.

Every step, where the gradients are ready, the step's per-layer gradient
norms (derived from the norms the watch reads anyway) and weight norms (one
fused read of the weights) go into a :class:`~gradwatch.probes.flight.FlightRecorder`
on the device. Its trigger — the total gradient norm a robust outlier against
the buffered steps, or a non-finite value — is computed on the host on the
CPU (the buffer is host memory: numpy on a view, cheaper than the tensor
ops) and on the device on a GPU, read one step later there (a non-blocking
copy into pinned memory, read when its event has completed). On an event at step
s:

- the buffered steps up to s go to the store: ``weight_norm`` per layer on
  the steps where update ratios were not recorded, ``grad_norm`` on the steps
  where gradient norms were not (``every`` > 1); nothing twice;
- every sampled family (‖∂L/∂a‖, activation statistics, attention, update
  ratios, …) records on each of the next ``detail_steps`` steps, whatever the
  budget says (with sharded parameters, not the families that join an
  all-reduce: each rank runs a recorder, but on a GPU a rank reads its
  trigger when its copy has landed, so the ranks may learn of an event on
  different steps, and an all-reduce that one rank skips hangs the job);
- ``meta["flight"]["events"]`` lists the events' steps.

Events inside a detail window start no new one, and at most ``MAX_EVENTS``
are dumped (a run that stays non-finite would fire on every step).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from gradwatch.probes.flight import FlightRecorder
from gradwatch.probes.grads import GradProbe, Pending
from gradwatch.store import StoreWriter

QUANTITIES = ("grad_norm", "weight_norm")  # the trigger tests the first (total over layers)
STORED_BY = {"grad_norm": "grads", "weight_norm": "updates"}  # the family that records each on its own steps
DETAIL_STEPS = 20  # steps of full detail after an event
MAX_EVENTS = 8


class WatchFlight:
    """Drives one :class:`FlightRecorder` for a watch: push each step, read the trigger, dump on an event."""

    def __init__(self, grads: GradProbe, names: list[str], layer_ids: np.ndarray, writer: StoreWriter, capacity: int,
                 detail_steps: int = DETAIL_STEPS) -> None:
        self.grads = grads
        self.recorder = FlightRecorder(names, QUANTITIES, capacity=capacity, device=grads.device,
                                       detail_steps=detail_steps)
        self.recorder.values = self.recorder.values.to(torch.float64)  # the norms are float64 already
        self._writer = writer
        self._ids = layer_ids  # store entity id of each layer, in the recorder's order
        self._on: dict[int, frozenset[str]] = {}  # step -> the families that recorded on it (last `capacity` steps)
        self._dumped = -1  # the last step written by a dump
        self._flag: tuple[int, Tensor, Any] | None = None  # (step, pinned host flag, CUDA event) on a GPU

    def meta(self) -> dict[str, Any]:
        """What the run's metadata says about the recorder."""
        r = self.recorder
        return {"flight": {"capacity": r.capacity, "detail_steps": r.detail_steps, "quantities": list(QUANTITIES),
                           "events": list(r.events)}}

    def push(self, step: int, pending: Pending | None, on: frozenset[str]) -> bool:
        """Buffer step ``step``'s norms and test it; True when an event fired (at this step, or the last on a GPU)."""
        fired = self._read_flag()
        if pending is None:  # no gradient at all this step: nothing to buffer
            return fired
        self._on[step] = on
        if len(self._on) > self.recorder.capacity:
            del self._on[next(iter(self._on))]
        self.recorder.push(step, self.grads.layer_norms(pending, weights="updates" not in on))
        if not self.recorder.values.is_cuda:  # the CPU: the trigger computed on the host; another device: a sync
            return self._maybe_fire(step, self.recorder.triggered()) or fired
        host = torch.empty((), dtype=torch.bool, pin_memory=True)
        host.copy_(self.recorder.check(), non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._flag = (step, host, event)
        return fired

    def _read_flag(self) -> bool:
        if self._flag is None or not self._flag[2].query():
            return False
        (step, host, _), self._flag = self._flag, None
        return self._maybe_fire(step, bool(host))

    def _maybe_fire(self, step: int, flag: bool) -> bool:
        r = self.recorder
        if not flag or step <= r.detail_until or len(r.events) >= MAX_EVENTS:
            return False
        self._dump(step)
        r.fire(step)
        self._writer.meta(self.meta())
        return True

    def _dump(self, upto: int) -> None:
        steps, values = self.recorder.buffered(upto)  # (n,), (n, layers, quantities): one host copy
        for s, block in zip(steps.tolist(), values):
            if s <= self._dumped:
                continue
            on = self._on.get(s, frozenset())
            keys, vals = [], []
            for j, quantity in enumerate(QUANTITIES):
                if STORED_BY[quantity] in on:  # the store has it from that step's own records
                    continue
                q = self._writer.quantity(quantity)
                for i in np.flatnonzero(~np.isnan(block[:, j])).tolist():
                    keys.append((int(self._ids[i]), q, -1))
                    vals.append(float(block[i, j]))
            if keys:
                self._writer.records(s, np.array(keys, dtype=np.int64), torch.tensor(vals, dtype=torch.float64))
        self._dumped = max(self._dumped, int(steps[-1]) if len(steps) else -1)

    def detail(self, step: int) -> bool:
        """Whether ``step`` is in the detail window after an event."""
        return self.recorder.schedule(step)
