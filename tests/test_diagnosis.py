"""Diagnosis: the right finding on the pathological zoo, none on healthy nets, closed forms where theory gives one."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import gradwatch as gw
from gradwatch import zoo
from gradwatch.diagnosis.findings import sci
from gradwatch.schedules import BUDGET_FLOOR
from gradwatch.watching.budget import GRADS_DENSE_UNTIL, GRADS_SPARSEST

from conftest import SEEDS, sampled_steps, schedule_steps, watched_classifier

STEPS = 300

HEALTHY = [s.name for s in zoo.SETUPS.values() if s.expect is None]
SICK = [s.name for s in zoo.SETUPS.values() if s.expect is not None]
# A healthy twin must learn: held-out accuracy > 0.85, or for the GAN mode coverage of at least half the 8 modes (its
# saturating twin covers none). Coverage after 300 steps hops between 5 and 8 modes with the seed and the CPU's rounding:
# seeds 0-5 covered 7-8 (native AVX-512), 5-8 (ATEN_CPU_CAPABILITY=default) and 5-8 (AVX2-limited MKL/oneDNN/ATen, as on
# an AMD EPYC, where seed 0 covers 5: the old bar of 6 failed there).
# small_resnet's accuracy at step 300 hops with the seed and the rounding (SGD noise at its learning rate: seed 1 is
# 0.99 at step 300 and 0.98 at 400): seed 0 under ATEN_CPU_CAPABILITY=default on an AMD EPYC ended at 0.8485 in the
# test run, 0.909 in a plain script (2 threads); 0.8 is still eight times chance.
LEARNS_ABOVE = {"gan_ring_nonsaturating": 0.45, "small_resnet": 0.8}


@pytest.mark.zoo
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", HEALTHY)
def test_healthy_runs_have_no_findings(zoo_runs, name, seed):
    run, trial = zoo_runs(name, seed)
    diagnosis = gw.diagnose(run)
    assert diagnosis.problems == [], str(diagnosis)
    assert trial.evaluate(trial.model) > LEARNS_ABOVE.get(name, 0.85)  # and they really are healthy: they learn


@pytest.mark.zoo
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", SICK)
def test_pathology_is_found_first_or_with_its_cause(zoo_runs, name, seed):
    """The zoo trains under the default watch (budget 2 %, issue 18): the sampled families are never sparser than the
    floor (a NaN run stops at its NaN), and the pathology is found in what they sampled."""
    run, _ = zoo_runs(name, seed)
    assert run.meta["budget"]["fraction"] == 0.02
    if "out_grad_norm" in run.quantities:
        got = set(sampled_steps(run, "out_grad_norm"))
        last = int(run.series("grad_norm").steps[-1])
        assert {s for s in range(last) if BUDGET_FLOOR(s)} <= got
    diagnosis = gw.diagnose(run)
    assert zoo.get(name).expect in [f.kind for f in diagnosis.problems], str(diagnosis)


MLPS_20 = ["deep_tanh_mlp", "deep_relu_he_mlp", "exploding_relu_mlp", "residual_tanh_mlp"]


@pytest.mark.zoo
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", MLPS_20)
def test_the_20_layer_mlps_sit_at_the_budgets_floor_and_are_diagnosed_as_without_a_budget(zoo_runs, name, seed):
    """Each sample of their forward-side probes costs more than a step's 2 %, and gradient norms alone exceed it:
    the budget keeps the forward-side families at (or, on a machine busy enough to slow the step more than the
    probes, near) their floor and the gradient norms on every step to step 127, then at least every 8th (thinned:
    they cost ~6 % of these steps), records what it sampled, and the diagnosis finds what it found with the old
    every-10th-step schedule and gradient norms on every step. (Which k a measured cost earns is timing; the decisions are
    tested on scripted costs in test_budget.py.)"""
    run, _ = zoo_runs(name, seed)
    meta = run.meta
    assert meta["budget"]["fraction"] == 0.02  # (kept or not: with the gradient norms thinned it is close, ~2–4 %)
    floor = [s for s in range(STEPS) if BUDGET_FLOOR(s)]
    grads = sampled_steps(run, "grad_norm")
    assert grads == schedule_steps(meta, "grads", STEPS)
    assert grads[:GRADS_DENSE_UNTIL] == list(range(GRADS_DENSE_UNTIL)) and max(np.diff(grads)) <= GRADS_SPARSEST
    assert len(grads) < STEPS  # ... and thinned after step 127: on these steps they cost more than the budget
    for family, quantity in (("backprop", "out_grad_norm"), ("updates", "update_ratio")):
        if family == "updates" and name == "exploding_relu_mlp":
            continue  # its update ratios turn NaN, which the store leaves out
        got = sampled_steps(run, quantity)
        assert got == schedule_steps(meta, family, STEPS) and set(floor) <= set(got)
    expect = zoo.get(name).expect
    kinds = [f.kind for f in gw.diagnose(run).problems]
    assert (expect in kinds) if expect else kinds == []


@pytest.mark.zoo
@pytest.mark.parametrize("seed", SEEDS)
def test_vanishing_tanh_layers_and_weight_cause(zoo_runs, seed):
    run, _ = zoo_runs("deep_tanh_mlp", seed)
    (f,) = gw.diagnose(run).of("vanishing")
    assert f.layers[0] == "0" and len(f.layers) >= 15  # from the input up
    s = run.series("out_grad_norm")
    ratio = np.median(s.values[0, -5:]) / np.median(s.values[-1, -5:])
    assert f.numbers["ratio"] == pytest.approx(ratio)
    assert f.steps[0] == 0
    # tanh in its linear regime (φ' ≈ 1): the weights, not the activation, shrink the signal
    assert f.cause.startswith("weight scale")
    assert f.numbers["activation_factor"] > 0.9
    # PyTorch's default Linear init: weight std 1/sqrt(3·fan_in), so the per-layer gain ≈ sqrt(1/3) ≈ 0.58
    assert f.numbers["weight_factor"] == pytest.approx(3 ** -0.5, rel=0.1)
    assert "halves every" in f.evidence


@pytest.mark.zoo
@pytest.mark.parametrize("seed", SEEDS)
def test_vanishing_sigmoid_blames_the_activation(zoo_runs, seed):
    run, _ = zoo_runs("deep_sigmoid_mlp", seed)
    diagnosis = gw.diagnose(run)
    (f,) = diagnosis.of("vanishing")
    assert f.cause.startswith("activation derivative")
    assert f.numbers["activation_factor"] <= 0.25  # sigmoid' ≤ 1/4
    stalled = diagnosis.of("stalled")
    assert stalled and set(stalled[0].layers) <= set(f.layers)
    assert stalled[0].cause.startswith("the vanishing gradient")


@pytest.mark.zoo
@pytest.mark.parametrize("seed", SEEDS)
def test_saturation_names_every_tanh(zoo_runs, seed):
    run, _ = zoo_runs("saturated_tanh_mlp", seed)
    (f,) = gw.diagnose(run).of("saturation")
    assert list(f.layers) == run.names("activation")
    assert f.severity == "warning"  # it costs the gradient: the net learns to under half the accuracy of its twins


@pytest.mark.zoo
@pytest.mark.parametrize("seed", SEEDS)
def test_dead_units_and_the_vanishing_they_cause(zoo_runs, seed):
    run, _ = zoo_runs("dead_relu_mlp", seed)
    diagnosis = gw.diagnose(run)
    (dead,) = diagnosis.of("dead_units")
    loss = run.series("loss", "run").values[0]
    flat = np.median(loss[-20:]) > 0.9 * np.median(loss[:10])  # the reference: the loss stays at its start
    assert dead.severity == ("critical" if flat else "warning")  # severity follows the effect on training
    s = run.series("dead_frac", "activation")
    expect = [n for n, v in zip(s.names, np.median(s.values[:, -5:], axis=1)) if v > 0.5]
    assert list(dead.layers) == expect and "9" in expect and "1" not in expect
    (van,) = diagnosis.of("vanishing")
    # the reference: the zoo's hidden biases, read off a fresh model of the set-up (round 41's constant-bias cause)
    from gradwatch.zoo import get

    model = get("dead_relu_mlp")(seed).model
    hidden = {n.removesuffix(".bias") for n, p in model.named_parameters() if n.endswith("bias")
              and p.numel() > 1 and bool((p == -1.5).all())}
    assert van.cause.startswith(f"the initialisation: the bias of {len(hidden)} hidden layers") and len(hidden) == 5
    assert "starts at -1.5 in every entry" in van.cause and "the measurement: dead units" in van.cause


@pytest.mark.zoo
@pytest.mark.parametrize("seed", SEEDS)
def test_exploding_across_depth(zoo_runs, seed):
    run, _ = zoo_runs("exploding_relu_mlp", seed)
    depth = [f for f in gw.diagnose(run).of("exploding") if f.layers]
    (f,) = depth
    assert f.layers[0] == "0" and f.numbers["ratio"] > 1e3
    assert "amplify" in f.cause
    # weights N(0, 9/fan_in) through ReLU: per-layer gain sqrt(9/2) ≈ 2.1 in expectation
    assert f.numbers["doubling_layers"] == pytest.approx(1 / math.log2(4.5**0.5), rel=0.15)


@pytest.mark.zoo
@pytest.mark.parametrize("name", ["diverging_mlp", "exploding_relu_mlp"])
@pytest.mark.parametrize("seed", SEEDS)
def test_nonfinite_step_matches_a_plain_run(zoo_runs, name, seed):
    run, _ = zoo_runs(name, seed)
    diagnosis = gw.diagnose(run)
    assert diagnosis.kinds[0] == "nonfinite"
    f = diagnosis[0]
    # The same run without a watch: where is a gradient's norm first not finite (a NaN/Inf entry, or
    # entries so large that the float32 norm overflows, as torch.nn.utils.clip_grad_norm_ would see it)?
    trial = zoo.get(name)(seed)
    first_bad = None
    for step in range(STEPS):
        x, y = next(trial.batches)
        loss = trial.loss_fn(trial.model(x), y)
        trial.optimizer.zero_grad()
        loss.backward()
        if first_bad is None and any(not torch.isfinite(p.grad.norm()) for p in trial.model.parameters()):
            first_bad = step
            break
        trial.optimizer.step()
    assert f.steps[0] == first_bad
    assert "backward order" in f.summary and f.layers


@pytest.mark.zoo
@pytest.mark.parametrize("seed", SEEDS)
def test_stalled_layers_are_the_misconfigured_group(zoo_runs, seed):
    run, _ = zoo_runs("stalled_mlp", seed)
    (f,) = gw.diagnose(run).of("stalled")
    assert f.layers == ("0", "2")  # the parameter group with learning rate 1e-6 × the rest
    assert "parameter groups" in f.remedies[0]


class _TanhBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin, self.act = nn.Linear(width, width), nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.lin(x))


def test_saturation_is_info_where_the_skip_path_carries_the_gradient(store):
    """A deep residual tanh MLP whose last 4 blocks saturate trains well: the skip path carries the gradient.

    Its saturation finding is ``info``, with no remedies; the zoo's saturated plain tanh MLP, which learns to
    under half its twins' accuracy, keeps its warning (test_saturation_names_every_tanh).
    """
    torch.manual_seed(0)
    width = 32
    x, y, _, _ = zoo.digits()
    blocks = [_TanhBlock(width) for _ in range(12)]
    model = nn.Sequential(nn.Linear(64, width), *blocks, nn.Linear(width, 10))
    with torch.no_grad():  # the last 4 blocks' weights ×6: their tanh units sit in the tails
        for b in blocks[-4:]:
            b.lin.weight.mul_(6.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    w, losses = watched_classifier(model, opt, x, y, 150, store, "residual-tanh")
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])  # it trains
    (f,) = w.diagnose().of("saturation")
    assert f.layers[0] == "9.act" and f.layers[-1] == "12.act"
    assert f.severity == "info" and f.remedies == () and "gets past them" in f.evidence
    # the reference, from the stored records: ‖∂L/∂a‖ at the input Linear (below the stretch, the one layer outside
    # every residual branch: block 8's Linear reads behind its own tanh's derivative) over the head's, window medians
    s = w.open().series("out_grad_norm")
    med = dict(zip(s.names, np.median(s.values[:, -5:], axis=1)))
    assert f.numbers["across"] == pytest.approx(med["0"] / med["13"])
    assert f.numbers["across"] > 0.5


def _orthogonal_chain(scale: float, depth: int = 8, width: int = 16, act: type[nn.Module] | None = None) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(depth):
        lin = nn.Linear(width, width, bias=False)
        nn.init.orthogonal_(lin.weight)
        lin.weight.data *= scale
        layers.append(lin)
        if act is not None:
            layers.append(act())
    return nn.Sequential(*layers)


@pytest.mark.parametrize("scale,kind", [(0.25, "vanishing"), (4.0, "exploding")])
def test_decay_rate_against_closed_form(store, scale, kind):
    """Orthogonal weights × c: every layer scales ‖∂L/∂a‖ by exactly c, so log₂ per layer = log₂ c."""
    model = _orthogonal_chain(scale)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with gw.watch(model, opt, activations=1, store=store, name=kind) as w:
        for _ in range(6):
            opt.zero_grad()
            model(torch.randn(32, 16)).pow(2).sum().backward()
            opt.step()
    (f,) = [f for f in w.diagnose().of(kind) if f.layers]  # the depth finding (an x4 net also trips the norm bound)
    assert f.numbers["ratio"] == pytest.approx(scale**7, rel=1e-4)  # g_0 = c⁷ g_7
    per_layer = abs(math.log2(scale))
    key = "halving_layers" if kind == "vanishing" else "doubling_layers"
    assert f.numbers[key] == pytest.approx(1 / per_layer, rel=1e-4)
    assert "no activation is seen between them: in a linear stretch that is the weights' scale alone" in f.cause


def test_cause_split_against_closed_form(store):
    """Tanh on tiny inputs has φ' ≈ 1: the whole decay is the weights' factor c."""
    model = _orthogonal_chain(0.3, act=nn.Tanh)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with gw.watch(model, opt, activations=1, store=store, name="split") as w:
        for _ in range(6):
            opt.zero_grad()
            model(1e-3 * torch.randn(32, 16)).sum().backward()
            opt.step()
    (f,) = w.diagnose().of("vanishing")
    assert f.numbers["weight_factor"] == pytest.approx(0.3, rel=1e-3)
    assert f.numbers["activation_factor"] == pytest.approx(1.0, abs=1e-3)


def _scaled_losses(store, name: str, scales: list[float]):
    """A small ReLU net at lr 0 (every step sees the same weights), its loss on step i multiplied by ``scales[i]``;
    the watch and the total gradient norm of each step read by hand."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    totals = []
    with gw.watch(model, opt, store=store, name=name) as w:
        for scale in scales:
            opt.zero_grad()
            (scale * model(torch.randn(16, 4)).pow(2).mean()).backward()
            totals.append(math.sqrt(sum(float(p.grad.norm()) ** 2 for p in model.parameters())))
            opt.step()
    return w, totals


def test_spike_and_the_clipping_threshold(store):
    w, totals = _scaled_losses(store, "spike", [1000.0 if step == 40 else 1.0 for step in range(60)])
    (f,) = w.diagnose().of("exploding")
    assert f.severity == "warning"  # lr 0: the run does not learn, nothing shows it got over the spike
    assert f.steps == (40, 40)
    assert "step 40" in f.evidence
    assert f.numbers["clip_at"] == pytest.approx(float(np.median(totals[:40])), rel=1e-5)  # the calm before it
    assert f.numbers["peak"] == pytest.approx(totals[40], rel=1e-5)


def test_the_clipping_threshold_comes_from_the_calm_steps_before_the_event_not_a_dead_net_after_it(store):
    """Round 9 (raw breast-cancer features): norms of 177–1176 on the first steps, then 0.05–0.2 once the units had
    died, and the advice was max_norm=0.2, "which would have held every one of these steps". The reference: the
    total norms read by hand, the calm steps before the event and after it at ×10⁻³ of them."""
    w, totals = _scaled_losses(store, "dead-after", [3e4 if step == 30 else 1.0 if step < 30 else 1e-3
                                                      for step in range(80)])
    (f,) = w.diagnose().of("exploding")
    assert f.steps[0] == 30
    clip = float(np.median(totals[:30]))
    assert clip > 30 * float(np.median(totals[31:]))  # the whole run's calm median is the dead net's
    assert f.numbers["clip_at"] == pytest.approx(clip, rel=1e-5)
    assert f"max_norm={sci(clip)}" in " ".join(map(str, f.remedies)), f.remedies
    w, _ = _scaled_losses(store, "large-from-the-start", [3e4] * 4 + [1e-3] * 76)  # no calm steps before it
    (f,) = w.diagnose().of("exploding")
    assert math.isnan(f.numbers["clip_at"]) and "max_norm=" not in " ".join(map(str, f.remedies)), f.remedies


def test_a_spikes_summary_names_its_own_peak_not_a_larger_calm_step_elsewhere(store):
    """A spike at step 10 (×12 the steps before), then a step at ×9 its recent median that is the run's largest
    but no event: the summary said "jumps to" that step's norm while the evidence named step 10's. The reference:
    the total norms read by hand."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    x = torch.randn(16, 4)
    scales = [5.0] * 10 + [60.0] + [7.0] * 30 + [65.0] + [7.0] * 8
    totals = []
    with gw.watch(model, opt, store=store, name="peaks") as w:
        for scale in scales:
            opt.zero_grad()
            (scale * model(x).pow(2).mean()).backward()
            totals.append(math.sqrt(sum(float(p.grad.norm()) ** 2 for p in model.parameters())))
            opt.step()
    (f,) = w.diagnose().of("exploding")
    assert f.steps == (10, 10) and max(totals) == totals[41]
    assert f.numbers["peak"] == pytest.approx(totals[10], rel=1e-5)
    assert f.summary.startswith(f"the total gradient norm jumps to {sci(totals[10])}"), f.summary


def test_injected_nan_is_located(store):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gw.watch(model, opt, store=store, name="nan") as w:
        for step in range(12):
            opt.zero_grad()
            model(torch.randn(16, 4)).pow(2).mean().backward()
            if step == 7:
                model[2].weight.grad[0, 0] = float("nan")
            opt.step()
    (f,) = w.diagnose().of("nonfinite")
    assert f.steps[0] == 7 and f.layers == ("2",)
    assert f.numbers["tensors"] == 1


def test_thresholds_are_parameters(zoo_runs):
    run, _ = zoo_runs("deep_tanh_mlp")
    assert gw.diagnose(run, gw.Thresholds(vanish_below=1e-6)).of("vanishing") == []
    with pytest.raises(TypeError, match=r"`diagnose\(thresholds=…\)` expects a gradwatch.Thresholds"):
        gw.diagnose(run, {"vanish_below": 1e-6})  # type: ignore[arg-type]


def test_every_number_in_a_finding_comes_from_the_store(zoo_runs):
    """Promise 4: the evidence's numbers are the stored records' (window medians, as the source line says)."""
    run, _ = zoo_runs("deep_tanh_mlp")
    (f,) = gw.diagnose(run).of("vanishing")
    s = run.series("out_grad_norm")
    first, last = np.median(s.values[0, -5:]), np.median(s.values[-1, -5:])
    assert f"{first:.1e}" in f.evidence and f"{last:.2g}" in f.evidence
    assert f"steps {int(s.steps[-5])}–{int(s.steps[-1])}" in f.sources[0]


def test_the_root_module_is_named_root_in_findings(store):
    """Regression: a root that owns a parameter is the last layer in depth order, and printed as 'at layer ;'."""

    class RootScaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.chain = _orthogonal_chain(0.25)
            self.scale = nn.Parameter(torch.ones(16))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.chain(x) * self.scale

    model = RootScaled()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with gw.watch(model, opt, activations=1, store=store, name="root") as w:
        for _ in range(6):
            opt.zero_grad()
            model(torch.randn(32, 16)).pow(2).sum().backward()
            opt.step()
    (f,) = [f for f in w.diagnose().of("vanishing") if f.layers]
    assert w.open().series("out_grad_norm").names[-1] == ""  # the root is the last layer
    assert "at layer (root)" in f.evidence and "layer ;" not in f.evidence and "layer  " not in f.evidence


def test_a_nan_first_reached_in_the_models_own_parameter_names_it(store):
    """Round 32: "first in layer (root)" for a NaN whose backward reached the model's own ``protos`` first."""

    class Prototypes(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(8, 4)
            self.protos = nn.Parameter(torch.randn(4, 3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            d = self.embed(x) @ self.protos
            return (d - d.detach()).sqrt()  # sqrt at exactly 0: an infinite derivative, times 0 → NaN

    torch.manual_seed(0)
    model = Prototypes()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gw.watch(model, opt, store=store, name="protos") as w:
        for _ in range(4):
            opt.zero_grad()
            model(torch.randn(16, 8)).sum().backward()
            assert not torch.isfinite(model.protos.grad).all()  # the reference: the gradient itself
            opt.step()
    (f,) = w.diagnose().of("nonfinite")
    assert "first in layer (root: the model's own protos)" in f.summary
    assert "backward reached (root: the model's own protos) first" in f.evidence


@pytest.mark.zoo
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_clipping_threshold_from_steps_already_on_their_way_up(store, seed):
    """Measured (a GRU at SGD lr 0.5, momentum 0.9, NaN by step 11–12): the clip threshold was the median of the
    dozen steps before the NaN, 27, already blowing up; the doctor's clipping at it read "worse" (loss 1273) where
    clip_grad_norm_(…, 1.0) fixes it. Without a calm phase (`spike_after` calm steps) no threshold is measured,
    and the doctor clips at 1."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    x = 4 * torch.randn(64, 4, generator=g)
    y = x.sum(1, keepdim=True) ** 2
    with gw.watch(model, opt, store=store, name=f"early-{seed}") as w:
        for _ in range(30):
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            w.log(loss=loss)
    found = [f for f in w.diagnose().findings if "clip_at" in f.numbers]
    assert found and all(math.isnan(f.numbers["clip_at"]) for f in found), [str(f) for f in found]
    from gradwatch.doctor import surgery
    from gradwatch.zoo import Trial

    trial = Trial(model, opt, iter(()), nn.functional.mse_loss)
    numbers: dict[str, float] = {}
    for f in w.diagnose().findings:  # merged as the doctor merges them: an unmeasured (NaN) value is no value
        numbers.update({k: v for k, v in f.numbers.items() if k not in numbers and not math.isnan(v)})
    surgery.clip(trial, numbers)
    for p in model.parameters():
        p.grad = torch.full_like(p, 100.0)
    opt.step()  # the clipping hook runs before the step, in place
    total = math.sqrt(sum(float(p.grad.norm()) ** 2 for p in model.parameters()))
    assert total == pytest.approx(1.0, rel=1e-5)


class _GRUNext(nn.Module):
    """A GRU predicting the next value of a noisy sum of sines (T = 50): Stack Overflow's "GRU loss suddenly
    becomes nan" at plain SGD lr 0.5 with momentum 0.9 (Pascanu et al. 2013's exploding gradients)."""

    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(1, 64, batch_first=True)
        self.out = nn.Linear(64, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.gru(x)[0])


def _sines(seed: int, batch: int = 32, steps: int = 50):
    g = torch.Generator().manual_seed(seed)
    while True:
        phase, freq = torch.rand(batch, 1, generator=g) * 6.28, 0.1 + 0.3 * torch.rand(batch, 1, generator=g)
        t = torch.arange(steps + 1).float()[None]
        s = 3 * torch.sin(freq * t + phase) + 2 * torch.sin(0.37 * freq * t) + 0.1 * torch.randn(batch, steps + 1, generator=g)
        yield s[:, :steps, None], s[:, 1:, None]


@pytest.mark.zoo
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_divergence_from_an_ordinary_start_blames_the_learning_rate_not_the_init(store, seed):
    """Measured (this GRU at SGD lr 0.5, momentum 0.9, NaN by step 11–12): "too large from the first step: the
    initial scale of the weights", smaller init first. A norm that starts ordinary and grows ×10 or more before
    any calm phase is steps that overshoot: a lower learning rate first. An MLP whose weights are too large from
    the start still hears of its init."""
    torch.manual_seed(seed)
    model = _GRUNext()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    batches = _sines(seed)
    norms = []
    with gw.watch(model, opt, store=store, name=f"gru-{seed}") as w:
        for _ in range(40):
            x, y = next(batches)
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            norms.append(math.sqrt(sum(float(p.grad.norm()) ** 2 for p in model.parameters())))
            opt.step()
            w.log(loss=loss)
    finite = [n for n in norms if math.isfinite(n)]
    assert finite[0] < 100 and max(finite) >= 10 * finite[0]  # the reference: it starts ordinary and grows
    said = [str(f) for f in w.diagnose().findings]
    found = [f for f in w.diagnose().findings if f.kind == "exploding" and "peak" in f.numbers]
    assert found and found[0].cause.startswith("steps that overshoot") and found[0].remedy_keys[0] == "lower_lr", said
    # weights too large from the start (N(0, 5²)): the gradient is huge at step 0 and NaN at once, nothing grew
    torch.manual_seed(seed)
    big = nn.Sequential(nn.Linear(1, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
    for p in big.parameters():
        nn.init.normal_(p, std=5.0)
    opt = torch.optim.SGD(big.parameters(), lr=0.1)
    with gw.watch(big, opt, store=store, name=f"big-{seed}") as w:
        for _ in range(40):
            x, y = next(batches)
            loss = nn.functional.mse_loss(big(x[:, 0]), y[:, 0])
            opt.zero_grad()
            loss.backward()
            opt.step()
            w.log(loss=loss)
    said = [str(f) for f in w.diagnose().findings]
    found = [f for f in w.diagnose().findings if f.kind == "exploding" and "peak" in f.numbers]
    assert found and "scale of" in found[0].cause and found[0].remedy_keys[0] == "smaller_init", said


def test_an_info_finding_prints_no_empty_remedies_line():
    """An info finding has no remedies; its text printed "remedies: " with nothing after it (and the HTML an empty
    list), which reads as if something were missing."""
    from gradwatch.diagnosis.findings import Finding

    info = Finding("exploding", "info", (), (3, 3), "a spike", "one spike.", "a bad batch", ())
    assert "remedies" not in str(info) and "remedies" not in info.to_html()
    warned = Finding("exploding", "warning", (), (3, 3), "a spike", "one spike.", "a bad batch", ("clip it",))
    assert "  remedies: clip it" in str(warned) and "<li>clip it</li>" in warned.to_html()


def test_a_loss_that_rose_is_not_said_to_have_stayed_at_its_start():
    """A run that learned and then diverged read "the loss stayed at its start value (1.6 → 2.3)"."""
    from types import SimpleNamespace

    from gradwatch.diagnosis.findings import Finding
    from gradwatch.diagnosis.severity import by_effect
    from gradwatch.diagnosis.thresholds import Thresholds

    def run(loss):
        series = SimpleNamespace(values=np.asarray(loss, dtype=float)[None], steps=np.arange(len(loss)))
        return SimpleNamespace(quantities=["loss"], series=lambda *a: series)

    warn = Finding("dead_units", "warning", ("3",), (0, 59), "dead", "units silent.", "", ("leaky",))
    (rose,) = by_effect([warn], run([1.6] * 10 + [0.3] * 30 + [2.3] * 20), Thresholds())
    assert rose.severity == "critical" and "ended above its start value (1.6 → 2.3)" in rose.evidence
    (flat,) = by_effect([warn], run([1.6] * 60), Thresholds())
    assert "stayed at its start value (1.6 → 1.6)" in flat.evidence


@pytest.mark.zoo
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dead_units_that_pass_exactly_no_gradient_are_not_called_non_finite(store, seed):
    """Dead units whose layer below gets a gradient of exactly 0 read "the gradient across them is not finite"
    (measured: a ReLU net with biases at −1), though no record is NaN or Inf."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                          nn.Linear(16, 2))
    with torch.no_grad():
        model[2].bias.fill_(-100.0)  # every unit of the second ReLU silent for every input
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(seed)
    with gw.watch(model, opt, store=store, name=f"dead-{seed}") as w:
        for _ in range(80):
            x = torch.randn(32, 4, generator=g)
            loss = nn.functional.cross_entropy(model(x), (x[:, 0] > 0).long())
            opt.zero_grad()
            loss.backward()
            assert model[0].weight.grad.abs().max() == 0  # the reference: nothing reaches below them
            opt.step()
            w.log(loss=loss)
    dead = [f for f in w.diagnose().problems if f.kind == "dead_units"]
    assert dead and "not finite" not in dead[0].evidence and "exactly 0" in dead[0].evidence, str(w.diagnose())


@pytest.mark.zoo
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clipping_that_holds_on_every_step_is_found(store, seed):
    """Stack Overflow's "loss not decreasing after adding clip_grad_norm_": at max_norm=1e-6 every SGD update has
    length lr·1e-6 and the net stays at chance, with nothing found (every layer stuck alike, no stalled layer
    against the others). The total norm, read after the clipping, is the bound on every step: a warning naming it.
    The same net unclipped learns with no such finding; Adam (whose step does not scale with the gradient) learns
    through a bound of 1e-4, and hears of it as info. So does SGD at lr 0.5 clipped at 0.02 (round 11: clipping
    at 0.25 at lr 20 is pytorch/examples' recipe for language models): the loss has not halved in 120 steps, but
    every step moves the first layer by ~1e-3 of its norm, measured by hand — the steps are not short."""
    from gradwatch import zoo

    x, y, _, _ = zoo.digits()
    said, moved = {}, {}
    for case, (opt_cls, lr, bound) in {"sgd": (torch.optim.SGD, 0.1, 1e-6), "free": (torch.optim.SGD, 0.1, None),
                                       "adam": (torch.optim.Adam, 1e-3, 1e-4),
                                       "steady": (torch.optim.SGD, 0.5, 0.02)}.items():
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        opt = opt_cls(model.parameters(), lr=lr)
        g = torch.Generator().manual_seed(seed)
        losses = []
        with gw.watch(model, opt, store=store, name=f"clip-{case}-{seed}") as w:
            for _ in range(120):
                idx = torch.randint(0, len(x), (64,), generator=g)
                loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                if bound is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), bound)
                before = model[0].weight.detach().clone()
                opt.step()
                moved.setdefault(case, []).append(float((model[0].weight.detach() - before).norm() / before.norm()))
                w.log(loss=loss)
                losses.append(float(loss))
        said[case] = [f for f in w.diagnose().findings if "clip_bound" in f.numbers]
        learned = sum(losses[-20:]) / 20 < 0.5 * sum(losses[:10]) / 10
        assert learned == (case not in ("sgd", "steady")), (case, losses[:3], losses[-3:])  # the reference
    (f,) = said["sgd"]
    assert f.severity != "info" and f.remedy_keys[0] == "raise_clip" and f.numbers["clip_bound"] == pytest.approx(1e-6, rel=1e-4)
    assert said["free"] == []
    (f,) = said["adam"]
    assert f.severity == "info" and f.numbers["clip_bound"] == pytest.approx(1e-4, rel=1e-4)
    assert float(np.median(moved["steady"])) > 1e-4 > float(np.median(moved["sgd"]))  # the reference: step lengths
    (f,) = said["steady"]
    assert f.severity == "info" and not f.remedy_keys and f.numbers["clip_bound"] == pytest.approx(0.02, rel=1e-4)
    from types import SimpleNamespace

    from gradwatch.diagnosis.over_steps import clipped_findings
    from gradwatch.diagnosis.thresholds import Thresholds

    flat = np.full(60, 2.3)  # under Adam a bound every step meets is info even where the loss has not halved
    series = {"loss": SimpleNamespace(values=flat[None], steps=np.arange(60), names=["run"]),
              "grad_norm": SimpleNamespace(values=np.full((1, 60), 0.5), steps=np.arange(60), names=["0"])}
    for opt, severity in (("AdamW", "info"), ("SGD", "warning")):
        run = SimpleNamespace(meta={"optimizer": opt}, quantities=["loss", "grad_norm"],
                              series=lambda q, *a: series[q], entities=lambda *a: [])
        (g,) = clipped_findings(run, Thresholds())
        assert g.severity == severity


def test_gradient_norms_that_overflow_are_not_called_nan(store):
    """Round 9: an IRNN whose gradient entries grew to 2.3e30, every one finite, was told "NaN/Inf gradients". The
    reference: the gradients' entries themselves, finite, and their float32 norm, +Inf. Scaled so that one backward
    gives entries of 1e25: the finding says the norms overflow, not that there is a NaN."""
    lin = nn.Linear(4, 4)
    with gw.watch(lin, store=store, name="overflow") as w:
        for scale in (1.0, 1.0, 1e25):
            out = lin(torch.ones(2, 4)).sum() * scale
            lin.zero_grad()
            out.backward()
            w.log(loss=torch.tensor(1.0))
    assert torch.isfinite(lin.weight.grad).all() and not torch.isfinite(torch.linalg.vector_norm(lin.weight.grad))
    (f,) = w.diagnose().of("nonfinite")
    assert f.summary.startswith("gradient norms that overflow to Inf from step 2") and "NaN/Inf gradients" not in f.evidence
    nan = nn.Linear(4, 4)
    with gw.watch(nan, store=store, name="nan") as w:
        for scale in (1.0, 1.0, float("nan")):
            out = nan(torch.ones(2, 4)).sum() * scale
            nan.zero_grad()
            out.backward()
            w.log(loss=torch.tensor(1.0))
    (f,) = w.diagnose().of("nonfinite")
    assert f.summary.startswith("NaN/Inf gradients from step 2")
