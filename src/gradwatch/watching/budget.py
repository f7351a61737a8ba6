"""The watch's budget: the share of the step time that watching may cost, measured per family, kept by schedules.

A watch records *families* of quantities, each on its own schedule, and
times each family's own work as it runs (:class:`CostMeter`: ``perf_counter``
on the host, CUDA events as well on a GPU). The step time is the time between
two step ends less the watch's own part of it. Every ``EVALUATE_EVERY`` steps
the :class:`Budget` sets how often each family left to it records, so that the
watch's expected cost per step stays within ``budget`` × the step time:

- gradient norms and non-finite counts run on every step for the first
  ``GRADS_DENSE_UNTIL`` (128) steps, where most runs that blow up or collapse
  do it (the ramp's onset, the first NaN, "what it was at the start" live
  there), then on every k-th step with k at most ``GRADS_SPARSEST`` (8), and
  only when they do not fit: on a 1.6 ms step of a 20-layer MLP reading 40
  norms costs ~0.1 ms, five times a 2 % budget, while on most models they
  stay on every step. A spike later in the run still shows in the loss,
  which the user logs on every step; with ``budget=None``, the flight
  recorder (it reads them on every step anyway) or sharded parameters they
  run on every step;
- the others (‖∂L/∂a‖, activation statistics, ‖∂L/∂h_t‖'s re-runs, weight
  copies for update ratios) record every k-th step, k a power of two from 1
  to ``SPARSEST``; cheap ones get the small k first (greedy: halve the k whose
  halving adds the least cost while the total fits, the gradient norms' before
  any other);
- never sparser than the floor, :func:`gradwatch.schedules.floor_gap`: the
  depth, activation and stalled-layer rules take medians over the last
  ``Thresholds.window`` (5) samples, so a family keeps a sample at least
  every 16 steps up to step 127, every 32 up to step 255, every 64 after: a
  100-step run keeps 7 samples, a 300-step run 13, and any 320 steps hold 5
  (:data:`gradwatch.schedules.BUDGET_FLOOR`). Every zoo pathology is still
  found with a plain every-64th-step schedule on seeds 0–2: the floor has
  room to spare.

A schedule given by the user (``every=``, an int or callable ``activations=``
or ``update_every=``) wins: that family is left as it is, its cost counted
against the budget; the run's ``meta["schedules"]`` says who set each one and
``meta["budget"]`` what was measured, the k of every change, and whether the
budget was kept (and why not).

Which steps a budgeted family samples depends on measured time, so two runs
of the same seed may record different steps (never different values, and
never different training: the budget reads clocks, not the model). Records
that must be reproducible come from ``budget=None`` or explicit schedules.

A new family (a probe added to the step) declares itself in ``FAMILIES`` and
times its work with ``meter.start(name)`` / ``meter.stop(name, t)``: its cost
counts, and a budgeted one gets a rhythm, with no change here.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Union

import torch

from gradwatch.schedules import DEFAULT_SAMPLED, SPARSEST, Schedule, every, floor_gap

BUDGETED = "budget"  # a family left to the budget: its argument was True (or, for `every`, not given)
Given = Union[Schedule, str, None]  # a family's schedule as given: yours, BUDGETED, or None (off)

EVALUATE_EVERY = 16  # steps between two decisions
KEEP = 8  # recent cost samples per family; a decision uses their median (a preempted step is an outlier)
STEP_SAMPLES = 16  # recent step times; a decision uses their median
HEADROOM = 0.9  # densify only while the total stays under 90 % of the budget; thin out above 100 %
GRADS_DENSE_UNTIL = 128  # gradient norms on every step before this one (the onset of most blow-ups and collapses)
GRADS_SPARSEST = 8  # ... and at least every 8th step after it (measured: the zoo and the repair benchmark's pathologies
# are found; every 8th step over the whole run misses the ones that explode or collapse within the first steps)


@dataclass(frozen=True)
class Family:
    """A family of quantities recorded on one schedule, whose work the watch times as one cost."""

    name: str
    argument: str  # the `gw.watch` argument that schedules it by hand
    records: str  # what it records (for the metadata)
    title: str  # what it is called in words
    sparsest: int = SPARSEST  # the budget's largest k for it (within the floor)
    dense_until: int = 0  # every step before this one, whatever the budget (it starts at k = 1 then)
    collective: bool = False  # with sharded parameters every rank joins its all-reduce: the same steps everywhere
    forward: bool = False  # measured from forward hooks, placed on its steps only


FAMILIES = (
    Family("grads", "every", "grad_norm, nonfinite", "gradient norms", collective=True, sparsest=GRADS_SPARSEST,
           dense_until=GRADS_DENSE_UNTIL),
    Family("backprop", "activations", "out_grad_norm, out_spread, out_rms", "‖∂L/∂a‖ and the output's spread", forward=True),
    Family("activations", "activations", "saturated_frac, dead_frac, act_mean, act_std, deriv_rms, onehot_frac",
           "activation statistics", forward=True),
    Family("temporal", "activations",
           "temporal_grad_norm, step_jacobian_norm, lambda1, recurrent_dead_frac, state_cut_frac",
           "re-runs through time", forward=True),
    Family("attention", "attention",
           "attn_logit_max, attn_logit_rms, attn_entropy, attn_empty_frac, logz_mean, logz_max",
           "attention statistics", forward=True),
    Family("updates", "update_every", "weight_norm, update_ratio", "weight copies", collective=True),
)
FORWARD = frozenset(f.name for f in FAMILIES if f.forward)


class Rhythm:
    """A budgeted family's schedule: steps where ``step % min(k, floor_gap(step)) == 0``, k set by the budget.

    k is a power of two, so the steps of a sparser family are among those of
    a denser one (a step with activation statistics has ‖∂L/∂a‖ too when its
    k is no smaller). It starts at ``k`` (the floor for a sampled family) and
    moves as the budget decides, never above ``sparsest``; every step before
    ``dense_until`` records whatever k is.
    """

    def __init__(self, k: int = SPARSEST, sparsest: int = SPARSEST, dense_until: int = 0) -> None:
        self.k = k
        self.sparsest = sparsest
        self.dense_until = dense_until
        self.changes: list[tuple[int, int]] = [(0, k)]  # (first step, k)

    def __call__(self, step: int) -> bool:
        return step < self.dense_until or step % min(self.k, floor_gap(step)) == 0

    def rate(self, step: int, k: int | None = None) -> float:
        """The share of steps it records from ``step`` on at ``k`` (its own by default), the floor aside."""
        return 1.0 if step < self.dense_until else 1 / (self.k if k is None else k)

    def set(self, step: int, k: int) -> None:
        """From ``step`` on, every k-th step (within the floor)."""
        self.k = k
        self.changes.append((step, k))

    def __repr__(self) -> str:
        if self.dense_until:
            return f"budget(every step to step {self.dense_until - 1}, then k={self.k} now; k ≤ {self.sparsest})"
        return f"budget(k={self.k} now; never sparser than BUDGET_FLOOR)"


TIMED_SECTIONS = 4  # event pairs per family per step on a GPU; the family's other sections count at their mean


class CostMeter:
    """Times the watch's own work within each step, per family: ``perf_counter``, and CUDA events on a GPU.

    On a GPU a family's cost on a step is the larger of its host time (the
    launches) and its device time (the kernels, read from event pairs once
    they have completed: no synchronisation). The device time is read on the
    first ``TIMED_SECTIONS`` sections of a family in a step and scaled to all
    of them: a pair of events is recorded on the host and queried until done,
    and one per section (a hook per layer: ~300 a step on ResNet-50, queried
    ~900 times) cost more host time than a 2 % budget allows (measured on an
    H200, benchmarks/RESULTS.md). Sections may run on autograd's worker
    thread (backward hooks); the GIL keeps the sums whole.
    """

    def __init__(self, device: torch.device, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock  # seconds, monotonic (a test may script it)
        self.seconds: dict[str, float] = {}  # this step's host seconds per family
        self.family_total = 0.0  # their sum, for the time outside families
        self.base = 0.0  # this step's host seconds outside every family (the drivers, hooks, the records)
        self._cuda = device.type == "cuda"
        self._events: list[list[Any]] = []  # [step, family, start, end, scale] not read yet
        self._sections: dict[str, list[int]] = {}  # this step: family -> [sections timed on the device, all]
        self._spare: list[Any] = []
        self.step = 0
        self._last_end: float | None = None

    def start(self, family: str) -> Any:
        """A section of ``family``'s work begins; pass the token to :meth:`stop`."""
        if self._cuda:
            counts = self._sections.setdefault(family, [0, 0])
            counts[1] += 1
            if counts[0] < TIMED_SECTIONS:
                counts[0] += 1
                ev = self._event()
                ev.record()
                return self.clock(), ev
            return self.clock(), None
        return self.clock()

    def stop(self, family: str, token: Any) -> None:
        """The section begun with ``token`` was ``family``'s work."""
        if self._cuda:
            t0, ev0 = token
            if ev0 is not None:
                ev1 = self._event()
                ev1.record()
                self._events.append([self.step, family, ev0, ev1, 1.0])
        else:
            t0 = token
        dt = self.clock() - t0
        self.seconds[family] = self.seconds.get(family, 0.0) + dt
        self.family_total += dt

    def mark(self) -> tuple[float, float]:
        """Start of a stretch of the watch's own work (a driver call) that may contain family sections."""
        return self.clock(), self.family_total

    def base_since(self, mark: tuple[float, float]) -> None:
        """The stretch begun at ``mark`` ends: its time outside the families counts as the base cost."""
        self.base += self.clock() - mark[0] - (self.family_total - mark[1])

    def close_step(self) -> tuple[dict[str, float], float, float | None]:
        """(seconds per family, base seconds, seconds since the previous step's end) of the step that ends now."""
        now = self.clock()
        out = (self.seconds, self.base, None if self._last_end is None else now - self._last_end)
        for pair in self._events:  # this step's timed sections stand for all of their family's
            if pair[0] == self.step and pair[1] in self._sections:
                timed, every = self._sections[pair[1]]
                pair[4] = every / timed
        self._sections = {}
        self.seconds, self.family_total, self.base = {}, 0.0, 0.0
        self._last_end = now
        self.step += 1
        return out

    def device_seconds(self) -> list[tuple[int, str, float]]:
        """(step, family, device seconds) of the event pairs that have completed since the last call."""
        done: dict[tuple[int, str], float] = {}
        waiting = []
        for pair in self._events:
            step, family, ev0, ev1, scale = pair
            if step < self.step and ev1.query():  # (a step still in progress may get more sections)
                done[(step, family)] = done.get((step, family), 0.0) + scale * ev0.elapsed_time(ev1) / 1e3
                self._spare += [ev0, ev1]
            else:
                waiting.append(pair)
        self._events = waiting
        return [(s, f, v) for (s, f), v in done.items()]

    def _event(self) -> Any:
        return self._spare.pop() if self._spare else torch.cuda.Event(enable_timing=True)


def thread_seconds(thread: Any) -> Callable[[], float] | None:
    """A function giving ``thread``'s CPU seconds so far (the store's writer: records cost there too), if the
    platform can read another thread's clock."""
    ident = getattr(thread, "ident", None)
    if ident is None or not hasattr(time, "pthread_getcpuclockid"):
        return None
    try:
        clock = time.pthread_getcpuclockid(ident)
        time.clock_gettime(clock)
    except (OSError, OverflowError):  # pragma: no cover - a platform without per-thread clocks
        return None
    return lambda: time.clock_gettime(clock) if thread.is_alive() else 0.0


class Budget:
    """Each family's schedule, and every ``EVALUATE_EVERY`` steps the k of the budgeted ones, from measured costs."""

    def __init__(self, fraction: float | None, given: dict[str, Given], sharded: bool = False,
                 families: tuple[Family, ...] = FAMILIES, writer_seconds: Callable[[], float] | None = None,
                 pinned: dict[str, str] | None = None) -> None:
        """``pinned``: families left to the budget that run on every step anyway, with the reason (the metadata's)."""
        self.fraction = fraction
        self._writer_seconds = writer_seconds  # the writer thread's CPU so far: its share counts as a fixed cost
        self._writer_start = writer_seconds() if writer_seconds is not None else 0.0
        self.families = {f.name: f for f in families}
        self.schedules: dict[str, Schedule | None] = {}
        self.by: dict[str, str] = {}  # who set each schedule
        for f in families:
            s = given.get(f.name)
            if s is None:
                self.schedules[f.name], self.by[f.name] = None, "off"
            elif not isinstance(s, str):
                self.schedules[f.name], self.by[f.name] = s, f"you ({f.argument}=): the budget does not change it"
            elif pinned and f.name in pinned:
                self.schedules[f.name], self.by[f.name] = every(1), pinned[f.name]
            elif fraction is None:
                self.schedules[f.name], self.by[f.name] = ((every(1), "every step (budget=None)") if f.dense_until else
                                                           (DEFAULT_SAMPLED, "the default (budget=None)"))
            elif sharded and f.collective:
                why = "sharded parameters join an all-reduce on the same steps on every rank"
                self.schedules[f.name], self.by[f.name] = ((every(1), f"every step: {why}") if f.dense_until else
                                                           (DEFAULT_SAMPLED, f"the default: {why}"))
            elif f.dense_until:
                self.schedules[f.name] = Rhythm(1, f.sparsest, f.dense_until)
                self.by[f.name] = (f"the budget: every step to step {f.dense_until - 1}, then at least every "
                                   f"{f.sparsest}th")
            else:
                self.schedules[f.name], self.by[f.name] = Rhythm(SPARSEST, f.sparsest), "the budget"
        self.rhythms = {n: s for n, s in self.schedules.items() if isinstance(s, Rhythm)}
        self._on = [(n, s) for n, s in self.schedules.items() if s is not None]
        self._calls = [s for _, s in self._on]
        self._sets: dict[tuple[bool, ...], frozenset[str]] = {}  # one set object per combination: no set per step
        self._costs: dict[str, dict[int, float]] = {f.name: {} for f in families}  # family: {step: seconds}
        self._base: deque[float] = deque(maxlen=2 * EVALUATE_EVERY)
        self._plain: deque[float] = deque(maxlen=STEP_SAMPLES)
        self.decision: dict[str, Any] = {}  # the last decision's numbers, for the metadata

    def active(self, step: int) -> frozenset[str]:
        """The families that record on ``step`` (the same object for the same families: compare with ``is``)."""
        key = tuple([bool(s(step)) for s in self._calls])
        on = self._sets.get(key)
        if on is None:
            on = self._sets[key] = frozenset(n for (n, _), yes in zip(self._on, key) if yes)
        return on

    def step_ended(self, step: int, seconds: dict[str, float], base: float, interval: float | None,
                   device: list[tuple[int, str, float]] = ()) -> bool:  # type: ignore[assignment]
        """Take step ``step``'s measured costs; decide when it is time. Returns whether a schedule changed.

        Step 0 is left out of every sample: it pays one-time costs (plans, caches, the depth order).
        """
        for s, family, dev in device:  # a GPU family costs the larger of its host and device time
            costs = self._costs[family]
            if s in costs:
                costs[s] = max(costs[s], dev)
        if step == 0:
            return False
        for family, sec in seconds.items():
            costs = self._costs.setdefault(family, {})
            costs[step] = sec
            if len(costs) > KEEP:
                del costs[next(iter(costs))]
        self._base.append(base)
        if interval is not None:
            self._plain.append(interval - base - sum(seconds.values()))
        if self.rhythms and self.fraction is not None and step % EVALUATE_EVERY == 0:
            return self._decide(step + 1)
        return False

    def _decide(self, start: int) -> bool:
        """Set the budgeted families' k from step ``start`` on."""
        if not self._plain:
            return False
        step_s = statistics.median(self._plain)
        if step_s <= 0:
            return False
        allowance = self.fraction * step_s  # type: ignore[operator]
        writer = 0.0
        if self._writer_seconds is not None:  # averaged over the run: the writer works in batches of steps
            writer = max(0.0, self._writer_seconds() - self._writer_start) / start
        fixed = (statistics.fmean(self._base) if self._base else 0.0) + writer
        for name, s in self._on:  # the families the budget does not set: their cost at their own rate
            costs = self._costs.get(name)
            if name not in self.rhythms and costs:
                rate = sum(bool(s(x)) for x in range(max(0, start - SPARSEST), start)) / min(SPARSEST, start)
                fixed += statistics.median(costs.values()) * rate
        cost = {n: statistics.median(c.values()) for n, c in self._costs.items() if n in self.rhythms and c}
        k = {n: self.rhythms[n].sparsest for n in cost}
        spent = fixed + sum(cost[n] / k[n] for n in cost)
        while True:  # halve the k whose halving adds the least, while the total fits; gradient norms first
            options = [(not self.rhythms[n].dense_until, cost[n] / k[n], n) for n in cost
                       if k[n] > 1 and spent + cost[n] / k[n] <= HEADROOM * allowance]
            if not options:
                break
            _, add, n = min(options)
            k[n] //= 2
            spent += add
        current = fixed + sum(cost[n] * self.rhythms[n].rate(start) for n in cost)
        adopt = current > allowance or any(k[n] < self.rhythms[n].k for n in cost)
        if adopt:
            current = fixed + sum(cost[n] * self.rhythms[n].rate(start, k[n]) for n in cost)
        changed = False
        for n in cost:
            if adopt and k[n] != self.rhythms[n].k:
                self.rhythms[n].set(start, k[n])
                changed = True
        self.decision = {"step": start, "step_ms": step_s * 1e3, "fixed_ms": fixed * 1e3, "writer_ms": writer * 1e3,
                         "cost_ms": {n: c * 1e3 for n, c in cost.items()},
                         "overhead": current / step_s, "kept": current <= allowance}
        return changed

    def report(self) -> dict[str, Any]:
        """What the run's metadata says about the schedules and the budget."""
        schedules: dict[str, dict[str, Any]] = {
            f: {"by": self.by[f], "schedule": repr(self.schedules[f]), "records": self.families[f].records}
            for f in self.schedules}
        for n, r in self.rhythms.items():
            schedules[n]["changes"] = [list(c) for c in r.changes]  # (first step, k): the steps it sampled
        out: dict[str, Any] = {"schedules": schedules}
        if self.fraction is not None:
            d = dict(self.decision)
            if d and not d["kept"]:
                pinned = [self.families[n].title for n, _ in self._on if n not in self.rhythms]
                d["why_not"] = (f"what runs on every step or on your schedules (the watch's fixed per-step work, the "
                                f"store's writer thread{''.join(', ' + p for p in pinned)}: {d['fixed_ms']:.3g} ms of a "
                                f"{d['step_ms']:.3g} ms step) "
                                f"leaves less than the budget for the rest; the budgeted families sit at their floor"
                                if d["fixed_ms"] >= self.fraction * d["step_ms"] else
                                "the budgeted families cost more than the budget even at their floor (gradient "
                                f"norms: every step to step {GRADS_DENSE_UNTIL - 1}, then at least every "
                                f"{GRADS_SPARSEST}th)")
            out["budget"] = {"fraction": self.fraction, **d}
        else:
            out["budget"] = {"fraction": None}
        return out

