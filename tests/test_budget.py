"""The watch's budget (issue 18): measured costs set each family's schedule; the diagnosis still finds everything.

Which steps a budgeted family samples depends on measured time. Tests that need
exact schedules script the meter's readings (:class:`Scripted`), feed the
:class:`Budget` synthetic costs, or pass explicit schedules; the zoo runs train
under the default budget, where the 20-layer MLPs sit at the floor on any CPU
(checked in test_diagnosis.py, which trains them), so their records are the floor's.
"""

from __future__ import annotations

import itertools
import math
import statistics
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import gradwatch as gw
from gradwatch import zoo
from gradwatch.schedules import BUDGET_FLOOR, DEFAULT_SAMPLED, SPARSEST, every, floor_gap
from gradwatch.watching import WatchOptions
from gradwatch.watching import steps as steps_module
from gradwatch.watching.budget import (BUDGETED, EVALUATE_EVERY, GRADS_DENSE_UNTIL, GRADS_SPARSEST, HEADROOM, TIMED_SECTIONS, Budget,
                                      CostMeter, Rhythm, thread_seconds)

from conftest import at_step, naive_layer_grad_norms, naive_param_grad_norms, sampled_steps, schedule_steps

BUDGETED_ALL = {"grads": BUDGETED, "backprop": BUDGETED, "activations": BUDGETED, "temporal": None,
                "updates": BUDGETED}
GRADS_EVERY_STEP = {**BUDGETED_ALL, "grads": every(1)}  # `every=1`: the sampled families' decisions alone


# -- the floor and the rhythms -------------------------------------------------------------------

def test_the_floor_keeps_five_samples_in_any_320_steps_and_thins_out_with_the_run():
    steps = [s for s in range(3000) if BUDGET_FLOOR(s)]
    assert steps[:13] == [0, 16, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256]
    assert np.all(np.diff(steps)[steps.index(256):] == 64)
    assert sum(BUDGET_FLOOR(s) for s in range(100)) == 7 and sum(BUDGET_FLOOR(s) for s in range(300)) == 13
    for start in range(0, 2600):  # Thresholds.window = 5 samples in any 320 consecutive steps
        assert sum(BUDGET_FLOOR(s) for s in range(start, start + 320)) >= 5, start


@pytest.mark.parametrize("k", [1, 2, 4, 8, 16, 32, 64])
def test_a_rhythm_never_drops_below_the_floor_and_sparser_ones_nest_in_denser_ones(k):
    r, sparser = Rhythm(), Rhythm()
    r.set(0, k)
    sparser.set(0, min(2 * k, SPARSEST))
    for s in range(1200):
        assert r(s) == (s % min(k, floor_gap(s)) == 0)
        assert not BUDGET_FLOOR(s) or r(s)  # the floor's steps are always sampled
        assert not sparser(s) or r(s)  # a sparser family's steps are among the denser one's


# -- the decisions, from synthetic costs --------------------------------------------------------

def feed(budget: Budget, steps: int, step_s: float, cost: dict[str, float], base: float = 0.0, start: int = 0) -> None:
    """Steps start…steps−1 with these per-sample costs and plain step time, as the meter would report them."""
    for step in range(start, steps):
        seconds = {f: cost[f] for f in budget.active(step) if f in cost}
        budget.step_ended(step, seconds, base, step_s + base + sum(seconds.values()))


def expected_cost(budget: Budget, cost: dict[str, float], base: float, step: int) -> float:
    """Per-step cost the decision expects around ``step``: every-step families in full, budgeted ones at their rate."""
    pinned = sum(c for f, c in cost.items() if f not in budget.rhythms)
    return base + pinned + sum(cost[f] * r.rate(step) for f, r in budget.rhythms.items())


@settings(max_examples=60, deadline=None)
@given(step_ms=st.floats(0.5, 500), grads=st.floats(0.0, 0.3), backprop=st.floats(1e-4, 3.0),
       activations=st.floats(1e-4, 3.0), updates=st.floats(1e-4, 1.0), fraction=st.sampled_from([0.01, 0.02, 0.1]))
def test_the_decision_fits_the_budget_cannot_densify_further_and_gives_cheap_families_the_small_k(
        step_ms, grads, backprop, activations, updates, fraction):
    """Costs as fractions of the step. Past the gradient norms' dense start, the decision: within the budget whenever
    the floor allows it; no family could be halved within the headroom; of two families with the same largest k, the
    cheaper never samples more sparsely. Gradient norms: every step before GRADS_DENSE_UNTIL, at least every
    GRADS_SPARSEST-th after, whatever they cost."""
    step_s = step_ms / 1e3
    cost = {"grads": grads * step_s, "backprop": backprop * step_s, "activations": activations * step_s,
            "updates": updates * step_s}
    budget = Budget(fraction, BUDGETED_ALL)
    end = (GRADS_DENSE_UNTIL // EVALUATE_EVERY + 1) * EVALUATE_EVERY + 1  # the first decision past the dense start
    feed(budget, end, step_s, cost)
    assert all(budget.schedules["grads"](s) for s in range(GRADS_DENSE_UNTIL))
    r = budget.rhythms
    k = {f: r[f].k for f in r}
    spent = expected_cost(budget, cost, 0.0, end)
    assert budget.decision["overhead"] == pytest.approx(spent / step_s)
    allowance = fraction * step_s
    at_floor = sum(cost[f] / r[f].sparsest for f in k)
    if abs(spent - allowance) > 1e-9 * allowance:
        assert budget.decision["kept"] == (spent < allowance)
    if at_floor <= HEADROOM * allowance:
        assert spent <= allowance * (1 + 1e-9)
        for f in k:  # maximal: halving any k would leave the headroom
            if k[f] > 1:
                assert spent + cost[f] / k[f] > HEADROOM * allowance * (1 - 1e-9)
    else:  # nothing fits: everything at its floor, unless what runs now already fits (no change: hysteresis)
        assert all(k[f] == r[f].sparsest for f in k) or budget.decision["kept"]
    assert r["grads"].sparsest == GRADS_SPARSEST
    for a in k:
        for b in k:
            if cost[a] < cost[b] and r[a].sparsest == r[b].sparsest:
                assert k[a] <= k[b]
    if k["grads"] > 1 and at_floor <= HEADROOM * allowance and budget.decision["kept"]:  # the gradient norms first:
        assert spent - sum(cost[f] / k[f] - cost[f] / r[f].sparsest for f in k if f != "grads") + cost["grads"] / k[
            "grads"] > HEADROOM * allowance * (1 - 1e-9)  # halving theirs would not fit even with the others at floor
    steps = [s for s in range(end, end + 400) if budget.schedules["grads"](s)]
    assert max(np.diff(steps)) <= GRADS_SPARSEST  # at least every 8th step, whatever it costs


def test_a_cheap_family_goes_every_step_an_expensive_one_stays_at_the_floor_and_noise_changes_nothing():
    budget = Budget(0.02, GRADS_EVERY_STEP)
    cost = {"grads": 20e-6, "backprop": 10e-6, "activations": 5e-3, "updates": 50e-6}  # a 10 ms step: 200 µs
    feed(budget, 4 * EVALUATE_EVERY + 1, 10e-3, cost, base=10e-6)
    # 10 + 20 + 10 + 50 + 5000/64 = 168 µs ≤ 0.9 × 200; activation statistics at every 32nd step would add 78
    assert {f: r.k for f, r in budget.rhythms.items()} == {"backprop": 1, "activations": SPARSEST, "updates": 1}
    assert budget.decision["kept"] and budget.decision["overhead"] == pytest.approx(168.125e-6 / 10e-3)
    # 10 % dearer: 185 µs, over the headroom, within the budget: no change (hysteresis)
    feed(budget, 8 * EVALUATE_EVERY + 1, 10e-3, {f: c * 1.1 for f, c in cost.items()}, 11e-6, 4 * EVALUATE_EVERY + 1)
    assert {f: r.k for f, r in budget.rhythms.items()} == {"backprop": 1, "activations": SPARSEST, "updates": 1}
    # 25 % dearer: 210 µs, over the budget: once the medians have seen it (8 samples of activation statistics, one
    # every 64 steps) the weight copies go to every 2nd step, 179 µs
    feed(budget, 60 * EVALUATE_EVERY + 1, 10e-3, {f: c * 1.25 for f, c in cost.items()}, 12.5e-6,
         8 * EVALUATE_EVERY + 1)
    assert {f: r.k for f, r in budget.rhythms.items()} == {"backprop": 1, "activations": SPARSEST, "updates": 2}
    assert budget.decision["kept"] and budget.decision["overhead"] <= HEADROOM * 0.02


def test_when_the_every_step_costs_alone_exceed_the_budget_it_says_so_and_why():
    budget = Budget(0.02, GRADS_EVERY_STEP)
    feed(budget, 2 * EVALUATE_EVERY + 1, 2e-3, {"grads": 150e-6, "backprop": 400e-6, "activations": 3e-3,
                                                 "updates": 800e-6}, base=30e-6)
    assert all(r.k == SPARSEST for r in budget.rhythms.values())
    report = budget.report()["budget"]
    assert report["kept"] is False and "gradient norms" in report["why_not"]
    assert report["fixed_ms"] == pytest.approx(0.18)  # 30 µs base + 150 µs of gradient norms, every step
    assert report["overhead"] == pytest.approx((180e-6 + 4.2e-3 / 64) / 2e-3)


def test_gradient_norms_run_every_step_early_then_thin_to_every_8th_only_where_they_do_not_fit():
    """A 2 ms step whose gradient norms cost 150 µs (7.5 %, four times a 2 % budget): every step to step 127, every
    8th after; on a 20 ms step the same read fits and stays on every step. The sampled families are told apart."""
    cost = {"grads": 150e-6, "backprop": 40e-6, "activations": 300e-6, "updates": 80e-6}
    tight = Budget(0.02, BUDGETED_ALL)
    feed(tight, 20 * EVALUATE_EVERY + 1, 2e-3, cost, base=10e-6)
    grads = tight.schedules["grads"]
    assert all(grads(s) for s in range(GRADS_DENSE_UNTIL))
    assert tight.rhythms["grads"].k == GRADS_SPARSEST
    assert [s for s in range(GRADS_DENSE_UNTIL, 200) if grads(s)] == list(range(GRADS_DENSE_UNTIL, 200, 8))
    report = tight.report()
    assert report["budget"]["fixed_ms"] == pytest.approx(0.01)  # the gradient norms are budgeted, not fixed
    # 10 + 150/8 + 40/32 + 300/64 + 80/64 = 35.9 µs ≤ 0.9 × 40: ‖∂L/∂a‖ (the cheapest halving) at every 32nd step
    assert {f: r.k for f, r in tight.rhythms.items()} == {"grads": 8, "backprop": 32, "activations": 64, "updates": 64}
    assert report["budget"]["overhead"] == pytest.approx((10e-6 + 150e-6 / 8 + 40e-6 / 32 + 300e-6 / 64
                                                          + 80e-6 / 64) / 2e-3)
    assert "every 8th" in report["schedules"]["grads"]["by"] and report["schedules"]["grads"]["changes"][0] == [0, 1]
    roomy = Budget(0.02, BUDGETED_ALL)
    feed(roomy, 20 * EVALUATE_EVERY + 1, 20e-3, cost, base=10e-6)
    assert roomy.rhythms["grads"].k == 1 and all(roomy.schedules["grads"](s) for s in range(400))


def test_gradient_norms_stay_on_every_step_without_a_budget_with_sharded_parameters_or_beside_the_recorder():
    assert Budget(None, BUDGETED_ALL).schedules["grads"] == every(1)
    sharded = Budget(0.02, BUDGETED_ALL, sharded=True)
    assert sharded.schedules["grads"] == every(1) and "sharded" in sharded.by["grads"]
    why = "every step: the flight recorder reads the gradient norms on every step anyway"
    flight = Budget(0.02, BUDGETED_ALL, pinned={"grads": why})
    assert flight.schedules["grads"] == every(1) and flight.by["grads"] == why and "grads" not in flight.rhythms
    assert WatchOptions().grad_schedule == BUDGETED and WatchOptions(every=1).grad_schedule == every(1)


def test_schedules_you_give_win_are_counted_at_their_rate_and_the_metadata_says_who_set_each():
    budget = Budget(0.02, {**BUDGETED_ALL, "activations": every(2), "updates": None})
    assert budget.schedules["activations"] == every(2) and "activations" not in budget.rhythms
    assert budget.by["activations"].startswith("you (activations=)") and budget.by["updates"] == "off"
    feed(budget, 4 * EVALUATE_EVERY + 1, 10e-3, {"grads": 10e-6, "activations": 100e-6, "backprop": 1e-6})
    assert budget.decision["fixed_ms"] == pytest.approx(1e3 * 100e-6 / 2)  # every(2): half the steps
    assert Budget(None, BUDGETED_ALL).schedules["backprop"] == DEFAULT_SAMPLED  # budget=None: every 10th step
    sharded = Budget(0.02, BUDGETED_ALL, sharded=True)  # every rank must all-reduce on the same steps
    assert sharded.schedules["updates"] == DEFAULT_SAMPLED and "sharded" in sharded.by["updates"]
    assert isinstance(sharded.schedules["backprop"], Rhythm)


def test_the_writer_threads_cpu_counts_as_a_fixed_cost_averaged_over_the_run():
    import threading

    spent = {"s": 3.0}
    budget = Budget(0.02, GRADS_EVERY_STEP, writer_seconds=lambda: spent["s"])
    spent["s"] += 32 * 40e-6  # 40 µs a step of writer CPU over the steps fed below (32 of them, then decision 32)
    feed(budget, 2 * EVALUATE_EVERY + 1, 10e-3, {"grads": 10e-6, "backprop": 1e-6})
    assert budget.decision["writer_ms"] == pytest.approx(1e3 * 32 * 40e-6 / 33)
    assert budget.decision["fixed_ms"] == pytest.approx(1e3 * (10e-6 + 32 * 40e-6 / 33))

    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            sum(range(1000))

    worker = threading.Thread(target=spin)
    worker.start()
    try:
        clock = thread_seconds(worker)
        assert clock is not None
        t0, w0 = time.perf_counter(), clock()
        while time.perf_counter() - t0 < 0.2:
            sum(range(1000))
        assert 0.0 < clock() - w0 < 0.2 + 0.05  # that thread's CPU, never more than the time that passed
    finally:
        stop.set()
        worker.join()


class FakeEvent:
    """A CUDA event as the meter uses it, on a scripted device clock."""

    clock = 0.0

    def __init__(self, enable_timing: bool = False) -> None:
        self.at, self.done = None, True

    def record(self) -> None:
        self.at = FakeEvent.clock

    def query(self) -> bool:
        return self.done

    def elapsed_time(self, end: FakeEvent) -> float:
        return (end.at - self.at) * 1e3  # ms


def test_on_a_gpu_a_family_costs_the_larger_of_its_host_and_device_time_read_without_waiting(monkeypatch):
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    host = itertools.count(0.0, 1e-6)  # every host reading 1 µs after the last
    meter = CostMeter(torch.device("cuda"), clock=lambda: next(host))
    budget = Budget(0.02, BUDGETED_ALL)
    meter.close_step()  # step 0
    t = meter.start("activations")
    FakeEvent.clock += 5e-3  # the device spends 5 ms between the two events
    meter.stop("activations", t)
    late = meter._events[-1][3]
    late.done = False  # the kernels have not finished yet
    seconds, base, interval = meter.close_step()  # step 1
    assert seconds["activations"] == pytest.approx(1e-6)  # host: the launches
    assert meter.device_seconds() == []  # nothing read before the end event completes: no synchronisation
    budget.step_ended(1, seconds, base, interval)
    late.done = True
    budget.step_ended(2, {}, 0.0, 1e-3, meter.device_seconds())
    assert budget._costs["activations"][1] == pytest.approx(5e-3)


def test_on_a_gpu_a_few_sections_per_family_are_timed_on_the_device_and_stand_for_all(monkeypatch):
    """Hooks per layer make hundreds of sections a step; event pairs on the first TIMED_SECTIONS of each family,
    scaled to the family's count, give the device time that one pair per section would (each takes 1 ms here)."""
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    meter = CostMeter(torch.device("cuda"), clock=iter(itertools.count(0.0, 1e-6)).__next__)
    meter.close_step()  # step 0
    for family, sections in (("backprop", 10), ("grads", 1)):
        for _ in range(sections):
            t = meter.start(family)
            FakeEvent.clock += 1e-3
            meter.stop(family, t)
    assert len(meter._events) == TIMED_SECTIONS + 1  # event pairs recorded: 4 of backprop's 10, grads' one
    meter.close_step()
    got = {family: seconds for _, family, seconds in meter.device_seconds()}
    assert got == {"backprop": pytest.approx(10e-3), "grads": pytest.approx(1e-3)}
    assert meter.device_seconds() == []  # each pair read once


# -- arguments and metadata -----------------------------------------------------------------------

def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


@pytest.mark.parametrize("bad,error", [("0.02", TypeError), (True, TypeError), (0, ValueError), (-0.1, ValueError),
                                       (1.5, ValueError), (math.nan, ValueError), (math.inf, ValueError)])
def test_a_bad_budget_is_refused_before_any_hook(store, bad, error):
    model = _mlp()
    with pytest.raises(error, match=r"`watch\(budget=…\)` expects a fraction of the step time in \(0, 1\]"):
        gw.watch(model, store=store, budget=bad)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert not store.exists()
    assert WatchOptions.taken_by("GradwatchCallback", budget=0.05).budget == 0.05  # the callbacks take it
    with pytest.raises(error, match=r"`GradwatchCallback\(budget=…\)`"):
        WatchOptions.taken_by("GradwatchCallback", budget=bad)


def test_the_metadata_names_who_set_each_schedule(store):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gw.watch(model, opt, activations=5, store=store, name="mine") as w:
        _train(model, opt, w, 3)
    meta = w.open().meta
    assert meta["budget"]["fraction"] == 0.02
    assert meta["schedules"]["grads"]["by"] == "the budget: every step to step 127, then at least every 8th"
    assert meta["schedules"]["activations"]["by"] == "you (activations=): the budget does not change it"
    assert meta["schedules"]["activations"]["schedule"] == "every(n=5)"
    assert meta["schedules"]["updates"]["by"] == "the budget"
    with gw.watch(_mlp(), budget=None, store=store, name="none") as w2:
        pass
    meta2 = w2.open().meta
    assert meta2["budget"] == {"fraction": None}
    assert meta2["schedules"]["backprop"]["schedule"] == "every(n=10)"
    assert meta2["schedules"]["grads"]["schedule"] == "every(n=1)"  # budget=None: gradient norms on every step
    assert meta2["schedules"]["updates"]["by"] == "off"  # no optimizer


def _train(model: nn.Module, opt: torch.optim.Optimizer | None, w: gw.Watch | None, steps: int, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)
        loss = nn.functional.cross_entropy(model(x), y)
        if opt is not None:
            opt.zero_grad()
        loss.backward()
        if opt is not None:
            opt.step()
        if w is not None:
            w.log(loss=loss.detach())


# -- a watch under a scripted meter: the records follow the recorded schedule -------------------------

COST = {"grads": 5e-6, "backprop": 1e-6, "activations": 500e-6, "updates": 50e-6}  # of a 1 ms step; budget 20 µs


class Scripted(CostMeter):
    """Reports the scripted cost of each family that ran, and a 1 ms step, instead of what the clock says."""

    def close_step(self):
        seconds, _, _ = super().close_step()
        scripted = {f: COST[f] for f in seconds}
        return scripted, 0.0, 1e-3 + sum(scripted.values())


def script(monkeypatch) -> None:
    """Watches made from now on read scripted costs (and no writer thread's clock)."""
    monkeypatch.setattr(steps_module, "CostMeter", Scripted)
    monkeypatch.setattr(steps_module, "thread_seconds", lambda thread: None)


def test_records_follow_the_schedule_the_metadata_records_and_training_is_bit_identical(store, monkeypatch):
    script(monkeypatch)
    model, twin = _mlp(), _mlp()
    opt, twin_opt = (torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (model, twin))
    with gw.watch(model, opt, store=store, name="scripted") as w:
        _train(model, opt, w, 120)
    _train(twin, twin_opt, None, 120)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)  # watching never changes training, under the budget too
    run = w.open()
    meta = run.meta
    # 20 µs a step: gradient norms 5; ‖∂L/∂a‖ (1 µs a sample) goes every step, weight copies to every 16th,
    # activation statistics (500 µs a sample) stay at the floor: 5 + 1 + 50/16 + 500/64 = 16.9 ≤ 0.9 × 20
    assert meta["schedules"]["backprop"]["changes"] == [[0, 64], [17, 1]]
    assert meta["schedules"]["updates"]["changes"][-1] == [17, 16]
    assert meta["schedules"]["activations"]["changes"] == [[0, 64]]
    assert meta["budget"]["kept"] and meta["budget"]["overhead"] == pytest.approx(
        (5e-6 + 1e-6 + 50e-6 / 16 + 500e-6 / 64) / 1e-3)
    assert sampled_steps(run, "out_grad_norm") == schedule_steps(meta, "backprop", 120)
    assert sampled_steps(run, "saturated_frac", "activation") == schedule_steps(meta, "activations", 120)
    assert sampled_steps(run, "update_ratio") == schedule_steps(meta, "updates", 120)
    assert sampled_steps(run, "grad_norm") == list(range(120))


def test_a_step_that_samples_no_forward_probe_runs_no_hook_per_layer(store, monkeypatch):
    script(monkeypatch)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen: dict[int, tuple[int, int]] = {}
    with gw.watch(model, opt, store=store, name="hooks") as w:
        for step in range(40):
            seen[step] = (len(model[0]._forward_hooks), len(model[1]._forward_hooks))
            _train(model, opt, w, 1, seed=step)
    assert seen[0] == (2, 2)  # the first step: every hook (the depth order), and the residual blocks' reader
    assert seen[20] == (1, 0)  # ‖∂L/∂a‖ every step from step 17, activation statistics only on the floor's steps
    assert seen[32] == (1, 1)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())  # all gone after close


# -- gradient norms read in stacks ----------------------------------------------------------------

class Mixed(nn.Module):
    """Small same-shape layers (read as stacks), a large one (a norm call), a tied and a frozen one."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))
        self.wide = nn.Linear(8, 2048)  # 16384 elements: above the stacking limit
        self.back = nn.Linear(2048, 8)
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(8, 8)
        self.head.weight = self.blocks[1].weight  # tied

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = torch.tanh(b(x))
        return self.head(self.frozen(self.back(torch.relu(self.wide(x)))))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stacked_norms_and_update_ratios_equal_a_naive_loop(store, dtype):
    torch.manual_seed(0)
    model = Mixed().to(dtype)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    probe = gw.watch(model, opt, every=1, update_every=1, store=store, name=f"mixed{dtype}")
    assert probe._steps.grads._all.stacks  # the stacked path is the one under test
    before = {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)}
    opt.zero_grad()
    model(torch.randn(16, 8, dtype=dtype)).pow(2).mean().backward()
    layers, params = naive_layer_grad_norms(model), naive_param_grad_norms(model)
    opt.step()
    probe.close()
    run = probe.open()
    got_layers, got_params = at_step(run, "grad_norm", 0), at_step(run, "grad_norm", 0, "param")
    assert got_layers.keys() == layers.keys() and got_params.keys() == params.keys()
    for name, v in {**layers, **params}.items():
        assert {**got_layers, **got_params}[name] == pytest.approx(v, rel=1e-5)
    ratios = at_step(run, "update_ratio", 0, "param")
    for name, p in model.named_parameters(remove_duplicate=False):
        if not p.requires_grad:
            continue
        ref = float((p.detach() - before[name]).double().norm() / before[name].double().norm())
        assert ratios[name] == pytest.approx(ref, rel=1e-5)
    assert ratios["head.weight"] == ratios["blocks.1.weight"]  # tied: one tensor, under each owner


def test_records_reach_the_store_in_batches_and_a_read_gets_every_step_so_far(store, monkeypatch):
    from gradwatch import store as store_module
    from gradwatch.watching import buffer as buffer_module

    monkeypatch.setattr(buffer_module, "SECONDS_PER_COPY", 600.0)  # a slow machine must not send early here
    calls, batches = [], []
    original = store_module.StoreWriter.steps
    monkeypatch.setattr(store_module.StoreWriter, "steps",
                        lambda self, rows, ready=None: (calls.extend(step for step, _, _ in rows), batches.append(len(rows)),
                                                        original(self, rows, ready))[1])
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w = gw.watch(model, opt, store=store, name="batches")
    _train(model, opt, w, 10)
    assert calls == []  # ten steps wait for a batch (they are 1 s younger than the limit)
    assert sampled_steps(w.open(), "grad_norm") == list(range(10))  # a read sends them first
    assert calls == list(range(10))
    _train(model, opt, w, 40, seed=1)
    w.close()
    assert calls == list(range(50))  # every step once, in order
    assert batches == [10, 32, 8]  # one hand-over per batch: the read's, a full batch, the close's
    assert sampled_steps(w.open(), "loss", "run") == list(range(50))


# -- the diagnosis on sampled records -------------------------------------------------------------

def test_the_diagnosis_reads_sampled_steps_as_missing_never_as_zero(store):
    """A vanishing tanh net sampled on irregular steps: the depth finding's ratio is the median over the last five
    *recorded* steps, its "since" step a recorded one, and the saturation numbers come from recorded steps only."""
    torch.manual_seed(0)
    layers = []
    for _ in range(12):
        lin = nn.Linear(16, 16)
        nn.init.normal_(lin.weight, std=0.3 / 4)
        layers += [lin, nn.Tanh()]
    model = nn.Sequential(*layers, nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sampled = {0, 3, 40, 41, 77, 100, 101, 150}
    with gw.watch(model, opt, activations=lambda s: s in sampled, store=store, name="sparse") as w:
        g = torch.Generator().manual_seed(0)
        for _ in range(160):
            x, y = torch.randn(32, 16, generator=g), torch.randint(0, 3, (32,), generator=g)
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    run = w.open()
    s = run.series("out_grad_norm")
    assert s.steps.tolist() == sorted(sampled)
    (f,) = w.diagnose().of("vanishing")
    ratio = statistics.median(s.values[0, -5:]) / statistics.median(s.values[-1, -5:])
    assert f.numbers["ratio"] == pytest.approx(ratio)
    assert f.steps[0] in sampled and f.steps[1] == 150
    assert "steps 41–150" in f.sources[0]  # the last five recorded steps


@pytest.mark.zoo
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gradient_norms_every_8th_step_are_missing_on_the_others_never_non_finite(store, seed):
    """`every=8` records the gradient norms on every 8th step; the loss is logged on all. The steps between were
    read as a non-finite gradient ("the run went non-finite from step 1", critical) on every healthy run. Now a
    healthy run has no problem, and a real NaN is still found at its own step, a recorded or an unrecorded one."""
    from gradwatch.diagnosis.instability import InstabilityThresholds
    from gradwatch.diagnosis.spikes import events

    trial = zoo.get("deep_relu_he_mlp")(seed)
    with gw.watch(trial.model, trial.optimizer, every=8, store=store, name=f"e8-{seed}") as w:
        for _ in range(160):
            w.log(loss=trial.step())
    assert w.open().series("grad_norm").steps.tolist() == list(range(0, 160, 8))
    assert w.diagnose().problems == []
    steps = np.arange(160)
    loss = np.linspace(2.0, 1.0, 160)
    recorded = steps % 8 == 0
    grad = np.where(recorded, 1.0, np.nan)
    assert events(steps, loss, grad, InstabilityThresholds(), recorded) == []
    nan_loss = loss.copy()
    nan_loss[93:] = np.nan  # the loss goes NaN between two recorded steps
    inf_grad = grad.copy()
    inf_grad[96] = np.inf  # the gradient on a recorded step, the loss still finite
    for lossy, gradded, at in ((nan_loss, grad, 93), (loss, inf_grad, 96)):
        (ev,) = events(steps, lossy, gradded, InstabilityThresholds(), recorded)
        assert (ev.kind, ev.step) == ("nonfinite", at)


def test_a_familys_cost_samples_come_from_its_own_steps_only(store, monkeypatch):
    """The step's end queues ‖∂L/∂a‖ and the activation statistics on every step, an empty take where the family
    did not record; that bookkeeping is the watch's base cost, not a sample of the family's. (Mixed in, the
    near-zero samples of the steps off dragged a CNN's activation statistics' median from 22 ms to 0.01 ms every
    other decision: every step, then every 16th, 1.07× where the budget said 1.02×.)"""
    seen = []
    ended = Budget.step_ended

    def spy(self, step, seconds, base, interval, device=()):
        seen.append((step, set(seconds), self.active(step)))
        return ended(self, step, seconds, base, interval, device)

    monkeypatch.setattr(Budget, "step_ended", spy)
    monkeypatch.setattr(Budget, "_decide", lambda self, start: False)  # the rhythms stay as set below
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gw.watch(model, opt, store=store, name="own") as w:
        w._steps.budget.rhythms["backprop"].set(0, 1)  # ‖∂L/∂a‖ on every step, activation statistics at the floor
        _train(model, opt, w, 40)
    assert any("activations" in on for *_, on in seen) and any("activations" not in on for *_, on in seen)
    for step, families, on in seen:
        assert families <= on, step


@pytest.mark.parametrize("every_k,says", [(8, "from step 136 at the latest (gradient norms read every 8th step there; "
                                             "finite at step 128)"), (1, "from step 131,")])
def test_a_nan_between_two_reads_of_the_gradient_norms_is_dated_by_both(store, every_k, says):
    """Gradient norms read every 8th step (a budget thinning them on a tiny model, or every=8): the first NaN read
    is at step 136, the gradient went NaN at 131 (an Inf in that batch, by construction). The finding says both reads
    instead of "from step 136"; read every step, it says 131."""
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    with gw.watch(model, opt, every=every_k, store=store, name=f"nan-{every_k}") as w:
        for step in range(160):
            x, y = torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)
            if step == 131:
                x[0, 0] = math.inf
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            w.log(loss=loss.detach())
    (f,) = w.diagnose().of("nonfinite")
    assert f.summary.startswith(f"NaN/Inf gradients {says}"), f.summary
    assert "the loss is non-finite from step 132" in f.evidence  # (finite at 131: the Inf reached the weights)
