"""A flight recorder: the last N steps' per-layer norms in one preallocated device tensor, and a spike trigger.

Every step costs one on-device copy of a (layers × quantities) tensor the
watch already computes (its fused per-layer norms); nothing goes to the host
until an event. The trigger is a robust outlier test of the step's total norm
against the buffered steps, or a non-finite value; it is computed on the
device and returned as a 0-d bool tensor, so the caller chooses when to pay
the host sync (:meth:`FlightRecorder.triggered` answers on the host; on the
CPU it computes the same test there, in numpy). When it fires, :meth:`FlightRecorder.records` returns the
buffered steps up to the event in record form, and :meth:`FlightRecorder.schedule`
answers True for the next ``detail_steps`` steps, so the watch can switch its
full-detail probes on after the event.

How a driver uses it (:mod:`gradwatch.watching.flight` is the watch's, with
per-layer gradient and weight norms):

1. Construction, with the watch: ``FlightRecorder(layer_names, ("grad_norm",
   "update_norm"), capacity=N, device=watch_device, detail_steps=M)``; the
   first quantity is the one the trigger tests (total over layers).
2. Every step, where the per-layer gradient norms are ready (``_gradients_ready``
   / after the fused ``_foreach_norm``): ``recorder.push(step, values)`` with
   ``values`` (layers, quantities) on the device (a quantity not measured this
   step: NaN). Then ``flag = recorder.check()`` (device, no sync).
3. Put ``flag`` into the step's one device-to-host copy; when the writer side
   sees it set for step s (a lag of ℓ steps leaves N − ℓ buffered steps before
   the event): ``rows = recorder.records(upto=s)`` go to the store (their step
   numbers are the original ones; quantity names as given), and
   ``recorder.fire(s)`` starts the detail window.
4. OR ``recorder.schedule`` into the sampled schedules (activations,
   attention probes, update ratios): it is a plain ``step -> bool`` callable.

Under FSDP2 every rank runs a recorder and pushes every step: the norms of
its slices, all-reduced (the same all-reduce the watch makes for its own
gradient norms, one more for the weight norms), so the buffer holds the
whole tensors' norms, identical on every rank; only rank 0 writes.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from gradwatch._errors import bad_argument


def _lower_median(x: np.ndarray) -> float:
    """The median of the non-NaN values, the lower of the two middle ones for an even count (as ``torch.nanmedian``
    takes it); NaN if there are none."""
    x = x[~np.isnan(x)]
    if not len(x):
        return math.nan
    k = (len(x) - 1) // 2
    return float(np.partition(x, k)[k])


class FlightRecorder:
    """A ring buffer of the last ``capacity`` steps' per-layer norms on the device, with a spike/non-finite trigger."""

    def __init__(self, names: Sequence[str], quantities: Sequence[str] = ("grad_norm",), capacity: int = 64,
                 device: torch.device | str = "cpu", z_above: float = 6.0, ratio_above: float = 4.0,
                 warmup: int = 8, detail_steps: int = 20) -> None:
        for arg, value in (("capacity", capacity), ("warmup", warmup), ("detail_steps", detail_steps)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(bad_argument("FlightRecorder", arg, "a positive int", value))
        if not names or not quantities:
            raise ValueError(bad_argument("FlightRecorder", "names" if not names else "quantities",
                                          "a non-empty sequence of names", names if not names else quantities))
        if isinstance(z_above, bool) or not isinstance(z_above, (int, float)) or not z_above > 0:
            raise ValueError(bad_argument("FlightRecorder", "z_above", "a positive number", z_above))
        if isinstance(ratio_above, bool) or not isinstance(ratio_above, (int, float)) or not ratio_above > 1:
            raise ValueError(bad_argument("FlightRecorder", "ratio_above", "a number above 1", ratio_above))
        self.names, self.quantities = list(names), list(quantities)
        self.capacity, self.warmup, self.detail_steps = capacity, warmup, detail_steps
        self.z_above, self.log_ratio = float(z_above), math.log(ratio_above)
        # (capacity, layers, quantities), NaN until written: the only memory the recorder holds
        self.values = torch.full((capacity, len(self.names), len(self.quantities)), math.nan, device=device)
        self.steps = np.full(capacity, -1, dtype=np.int64)  # host: the step number in each slot
        self.count = 0  # pushes so far
        self.detail_until = -1  # last step of the detail window after an event
        self.events: list[int] = []  # steps at which fire() was called
        # on the CPU, each slot's log total norm (float64) on the host: triggered() needs no tensor op
        self._totals = np.full(capacity, math.nan) if self.values.device.type == "cpu" else None

    def push(self, step: int, values: Tensor) -> None:
        """Write one step's (layers, quantities) norms into the next slot (an on-device copy; no host sync)."""
        if values.shape != self.values.shape[1:]:
            raise ValueError(bad_argument("FlightRecorder.push", "values",
                                          f"a tensor of shape {tuple(self.values.shape[1:])} (layers, quantities)", values))
        slot = self.count % self.capacity
        self.values[slot].copy_(values.detach(), non_blocking=True)
        self.steps[slot] = step
        self.count += 1
        if self._totals is not None:  # the log total norm, as check() computes it, for the host-side trigger
            first = self.values[slot, :, 0].numpy().astype(np.float64)
            empty = np.isnan(first).all()
            with np.errstate(divide="ignore", over="ignore"):  # log 0 = -inf, and inf for an overflow, as on the device
                self._totals[slot] = math.nan if empty else np.log(np.linalg.norm(np.nan_to_num(first, nan=0.0)))

    def check(self) -> Tensor:
        """A 0-d bool tensor on the device: the last pushed step is a spike or holds a non-finite value.

        Spike: the log of its total norm √Σ_layers (first quantity)² stands
        above the median of the other buffered steps' by ``z_above`` robust
        SDs (1.4826·MAD) and by a factor ``ratio_above`` (OLMo's 6σ, on the log
        scale, with a floor for very steady runs); tested from ``warmup``
        buffered steps on. Non-finite: any NaN/Inf in the first quantity (which
        must be pushed every step), or in another one that was measured this
        step (a quantity NaN in every layer counts as not measured).
        """
        if self.count == 0:
            return torch.zeros((), dtype=torch.bool, device=self.values.device)
        slot = (self.count - 1) % self.capacity
        now = self.values[slot]  # (layers, quantities)
        measured = ~torch.isnan(now).all(dim=0)  # (quantities,): the first is measured on every step by contract
        measured.select(0, 0).fill_(True)  # (fill_, not `[0] = True`: that copies a host scalar, and waits)
        nonfinite = (~torch.isfinite(now) & measured).any()
        if min(self.count, self.capacity) - 1 < self.warmup:
            return nonfinite
        total = torch.linalg.vector_norm(self.values[:, :, 0].nan_to_num(0.0), dim=1).log()  # (capacity,)
        empty = torch.isnan(self.values[:, :, 0]).all(dim=1)  # an empty slot stays out of the median
        total = torch.where(empty, torch.full_like(total, math.nan), total)  # (where, not a masked store: no sync)
        history = total.clone()
        history.select(0, slot).fill_(math.nan)
        med = history.nanmedian()
        mad = 1.4826 * (history - med).abs().nanmedian()
        rise = total[slot] - med
        return nonfinite | ((rise > self.log_ratio) & (rise > self.z_above * mad))

    def triggered(self) -> bool:
        """``check()``'s answer as a bool: on the CPU computed on the host (the buffer is host memory: ~10 small
        numpy ops instead of ~15 tensor ops), elsewhere ``check()`` read back (one sync)."""
        totals = self._totals  # (None: not on the CPU)
        if totals is None:
            return bool(self.check())
        if self.count == 0:
            return False
        slot = (self.count - 1) % self.capacity
        now = self.values[slot].numpy()  # (layers, quantities), a view
        nan = np.isnan(now)
        measured = ~nan.all(axis=0)
        measured[0] = True
        if (~np.isfinite(now) & measured).any():
            return True
        if min(self.count, self.capacity) - 1 < self.warmup:
            return False
        history = np.delete(totals, slot)
        # a norm of 0 is a log of −inf: −inf − (−inf) is NaN, no rise (and no warning for the user to read)
        with np.errstate(invalid="ignore"):
            if not totals[slot] - np.nanmin(history) > self.log_ratio:  # the rise over the median is at most this
                return False  # (most steps: no sort needed)
            med = _lower_median(history)
            mad = 1.4826 * _lower_median(np.abs(history - med))
            rise = totals[slot] - med
        return bool(rise > self.log_ratio and rise > self.z_above * mad)

    def fire(self, step: int) -> None:
        """An event at ``step``: :meth:`schedule` answers True for the next ``detail_steps`` steps."""
        self.events.append(step)
        self.detail_until = max(self.detail_until, step + self.detail_steps)

    def schedule(self, step: int) -> bool:
        """A ``step -> bool`` schedule: the detail window after the last event."""
        return bool(self.events) and self.events[-1] < step <= self.detail_until

    def buffered(self, upto: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values): the buffered steps ≤ ``upto`` in step order and their (steps, layers, quantities) values.

        One host copy of the buffer.
        """
        n = min(self.count, self.capacity)
        order = [(self.count - n + i) % self.capacity for i in range(n)]  # oldest first
        steps = self.steps[order]
        keep = steps <= upto if upto is not None else np.ones(n, dtype=bool)
        values = self.values.cpu().numpy().astype(np.float64)[order]
        return steps[keep], values[keep]

    def records(self, upto: int | None = None) -> list[tuple[int, str, str, float]]:
        """The buffered steps ≤ ``upto`` as flat records (step, layer, quantity, value), unmeasured (NaN) left out."""
        steps, values = self.buffered(upto)
        out = []
        for s, block in zip(steps.tolist(), values):
            for i, name in enumerate(self.names):
                for j, quantity in enumerate(self.quantities):
                    v = float(block[i, j])
                    if not math.isnan(v):
                        out.append((s, name, quantity, v))
        return out

    def __repr__(self) -> str:
        return (f"FlightRecorder({len(self.names)} layers × {self.quantities}, {min(self.count, self.capacity)}/"
                f"{self.capacity} steps, events {self.events})")
