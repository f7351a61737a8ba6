"""Diagnosis misses and false alarms of the repair benchmark (issue 12), each on the set-up that showed it.

Every claim about a trained set-up holds on seeds 0-2 (zoo-marked: CI reruns it under the portable kernels);
references are plain measurements — a naive loop over ``param.grad``, forward hooks, held-out accuracy.
"""

from __future__ import annotations

import math

import numpy as np
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import gradwatch as gw
from conftest import SEEDS

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import setups  # noqa: E402


def _watched(make, seed: int, steps: int, store, hooks=None):
    """Train ``make(seed)`` under a watch as a user would, logging the loss; (diagnosis, trial, total norms)."""
    trial = make(seed)
    norms = []
    with gw.watch(trial.model, trial.optimizer, store=store, name=f"run-{seed}") as w:
        for _ in range(steps):
            w.log(loss=trial.step())
            # the reference: the total gradient norm by a naive loop over param.grad (left by the step)
            norms.append(math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in trial.model.parameters()
                                       if p.grad is not None)))
    return w.diagnose(), trial, norms


def _one_unit_softmax(seed: int) -> gw.Trial:
    """SO 31880720 made small: softmax over the single output unit, then binary cross-entropy."""
    g = torch.Generator().manual_seed(99)
    x = torch.randn(256, 10, generator=g)
    y = (x[:, :1] > 0).float()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 1), nn.Softmax(dim=1))

    def forever():
        gen = torch.Generator().manual_seed(seed)
        while True:
            idx = torch.randint(0, 256, (32,), generator=gen)
            yield x[idx], y[idx]

    return gw.Trial(model, torch.optim.SGD(model.parameters(), lr=0.1), forever(), nn.functional.binary_cross_entropy)


@pytest.mark.zoo
@pytest.mark.parametrize("seed", SEEDS)
def test_every_gradient_exactly_zero_is_a_critical_stall(store, seed):
    """Bug (so_softmax_one_unit): every gradient is exactly 0 and the diagnosis said nothing, so the doctor had
    nothing to fix. Now: stalled, critical, naming the output activation; the doctor's remedy swaps the softmax over
    one unit for a sigmoid, and the gradient flows."""
    diagnosis, trial, norms = _watched(_one_unit_softmax, seed, 30, store)
    assert all(n == 0 for n in norms)  # the reference: not one gradient entry is non-zero
    (f,) = diagnosis.problems
    assert (f.kind, f.severity, f.remedy_keys) == ("stalled", "critical", ("output_activation",)), str(diagnosis)
    assert f.steps[0] == 0
    from gradwatch.doctor import catalogue

    (remedy,) = catalogue.catalog()["output_activation"]
    fixed = remedy.apply(_one_unit_softmax(seed), {})
    x, y = next(fixed.batches)
    torch.testing.assert_close(fixed.model(x), fixed.model[:3](x).sigmoid())
    nn.functional.binary_cross_entropy(fixed.model(x), y).backward()
    assert all(p.grad.abs().sum() > 0 for p in fixed.model.parameters())


@pytest.mark.zoo
@pytest.mark.parametrize("seed", SEEDS)
def test_a_large_gradient_that_does_not_grow_is_not_exploding(store, seed):
    """Bug (so_quadratic_fixed, SO 48934338's correct code): "critical exploding" from the absolute 10³ bound on the
    total norm, on a regression whose targets reach 125: the norm is large because the loss is, and it never grows."""
    s = setups.get("so_quadratic_fixed")
    diagnosis, trial, norms = _watched(s.make, seed, s.steps, store)
    start = sorted(norms[:10])[5]
    assert max(norms) > 1e3 and max(norms) < 10 * start  # the reference: over the bound, never 10x its start
    assert trial.evaluate(trial.model) > 0.8  # it learns (held-out R²)
    assert "exploding" not in [f.kind for f in diagnosis.problems], str(diagnosis)


@pytest.mark.zoo
@pytest.mark.parametrize("seed", SEEDS)
def test_a_divergence_with_no_calm_phase_names_a_smaller_init_before_clipping(store, seed):
    """A net at N(0, 1) weights whose gradient is huge from step 0 and NaN by step 4: no calm steps to clip at, so
    the scale of the weights comes first (the doctor's Xavier + lower rate), not clipping at a norm never seen."""
    torch.manual_seed(seed)
    x = torch.randn(128, 20)
    y = x.sum(1, keepdim=True)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 1))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    norms = []
    with gw.watch(model, opt, store=store, name=f"div-{seed}") as w:
        for _ in range(40):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            norms.append(math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in model.parameters())))
            opt.step()
            w.log(loss=loss)
    finite = [n for n in norms if math.isfinite(n)]
    assert len(finite) < 10 and norms[0] > 1e2  # the reference: large from the start, not finite for 10 steps
    f = next(f for f in w.diagnose().problems if f.kind == "exploding")
    assert f.remedy_keys[0] == "smaller_init" and "from the first step" in f.cause, str(f)
    # the weights' own norm against He's says which scale it is: not the targets' (round 7 told a classifier of them)
    assert "the scale of the weights (layer " in f.cause and "targets" not in f.cause, str(f)


@pytest.mark.zoo
@pytest.mark.parametrize("seed", SEEDS)
def test_a_saturated_sigmoid_layer_in_a_net_that_learns_is_info(store, seed):
    """Bug (so_nielsen_fixed, SO 48385830's correct code): a saturation warning on a sigmoid net that learns. No
    layer sits on both sides of its one sigmoid layer, and the old rule then took the units to hurt; now the units'
    rms derivative against their peak (1/4) and the loss decide. Its contrast, tanh on raw pixels (LeCun et al.'s
    unnormalised inputs), stays a warning."""
    saturated = []
    s = setups.get("so_nielsen_fixed")

    def make(seed_: int) -> gw.Trial:
        t = s.make(seed_)
        t.model[1].register_forward_hook(  # the reference: σ outputs in the flat tails, σ' < 2 % of 1/4
            lambda m, a, y: saturated.append(float(((y < 0.005) | (y > 0.995)).float().mean())))
        return t

    diagnosis, trial, _ = _watched(make, seed, s.steps, store)
    assert sum(saturated[-20:]) / 20 > 0.25 and trial.evaluate(trial.model) > 0.8
    found = diagnosis.of("saturation")
    assert found and all(f.severity == "info" for f in found), str(diagnosis)
    raw = setups.get("tanh_raw_pixels")
    diagnosis, trial, _ = _watched(raw.make, seed, raw.steps, store / "raw")
    assert trial.evaluate(trial.model) < 0.8
    assert "saturation" in [f.kind for f in diagnosis.problems], str(diagnosis)


def _breast_cancer(seed: int, double: bool) -> gw.Trial:
    """A sigmoid output under nn.BCELoss on scikit-learn's breast-cancer data (standardised); ``double``: the same
    sigmoid before BCEWithLogitsLoss, the forum bug that squashes twice (the loss cannot go below ~0.31)."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    x = torch.tensor(data.data, dtype=torch.float32)
    x = (x - x.mean(0)) / x.std(0)
    y = torch.tensor(data.target, dtype=torch.float32)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(30, 32), nn.ReLU(), nn.Linear(32, 1), nn.Sigmoid(), nn.Flatten(0))
    g = torch.Generator().manual_seed(seed)

    def batches():
        while True:
            idx = torch.randint(0, 450, (64,), generator=g)
            yield x[idx], y[idx]

    @torch.no_grad()
    def accuracy(m: nn.Module) -> float:
        return float(((m(x[450:]) > 0.5).float() == y[450:]).float().mean())

    loss = nn.BCEWithLogitsLoss() if double else nn.BCELoss()
    return gw.Trial(model, torch.optim.Adam(model.parameters(), lr=1e-2), batches(), loss, evaluate=accuracy)


@pytest.mark.zoo
@pytest.mark.parametrize("seed", SEEDS)
def test_a_confident_output_sigmoid_is_not_saturation_but_a_squashed_twice_one_is(store, seed):
    """Bug (a helper's healthy twin): a sigmoid output under nn.BCELoss that learned (loss 0.68 → 0.01, accuracy
    0.97) was a saturation warning, "weights initialised or grown too large". An output activation that saturates
    on its 0/1 targets while the loss fell tenfold is the fit (info). The reference: the saturated fraction by a
    forward hook, and the loss. Its contrast, a sigmoid before BCEWithLogitsLoss, whose loss cannot fall tenfold,
    stays a problem."""
    saturated: list[float] = []

    def make(seed_: int) -> gw.Trial:
        t = _breast_cancer(seed_, double=False)
        t.model[3].register_forward_hook(lambda m, a, y: saturated.append(float(((y < 0.005) | (y > 0.995)).float().mean())))
        return t

    diagnosis, trial, _ = _watched(make, seed, 400, store)
    assert sum(saturated[-20:]) / 20 > 0.5 and trial.evaluate(trial.model) > 0.9
    assert not diagnosis.problems, str(diagnosis)
    diagnosis, trial, _ = _watched(lambda s_: _breast_cancer(s_, double=True), seed, 400, store / "double")
    with torch.no_grad():
        xb, yb = next(trial.batches)
        assert float(trial.loss_fn(trial.model(xb), yb)) > 0.3  # squashed twice: stuck above the floor
    assert "saturation" in [f.kind for f in diagnosis.problems], str(diagnosis)


@pytest.mark.zoo
@pytest.mark.parametrize("seed", SEEDS)
def test_stalled_layers_are_found_when_they_are_most_of_the_net(store, seed):
    """Bug (a helper's port of torch.optim's "per-parameter options"): the body's two layers at lr 1e-5 under a head
    at 5e-2 went unflagged, because the rule compared each layer with the median layer — itself a stalled one. The
    reference: ‖Δw‖/‖w‖ per layer by a plain loop over the weights before and after each step."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16
    y = torch.tensor(data.target)
    ratios: dict[int, list[float]] = {0: [], 2: [], 4: []}

    def make(seed_: int) -> gw.Trial:
        torch.manual_seed(seed_)
        g = torch.Generator().manual_seed(seed_)
        model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        opt = torch.optim.SGD([{"params": [*model[0].parameters(), *model[2].parameters()], "lr": 1e-5},
                               {"params": model[4].parameters()}], lr=0.05)
        before: dict[int, torch.Tensor] = {}
        opt.register_step_pre_hook(lambda o, a, k: before.update({i: model[i].weight.detach().clone() for i in ratios}))
        opt.register_step_post_hook(lambda o, a, k: [ratios[i].append(float((model[i].weight.detach() - before[i]).norm()
                                                                             / before[i].norm())) for i in ratios])
        batches = ((x[i], y[i]) for i in iter(lambda: torch.randint(0, len(x), (32,), generator=g), None))
        return gw.Trial(model, opt, batches, nn.functional.cross_entropy)

    diagnosis, _, _ = _watched(make, seed, 200, store)
    head = sum(ratios[4][-50:]) / 50
    assert all(sum(ratios[i][-50:]) / 50 < 0.01 * head for i in (0, 2))  # the reference: 100× slower than the head
    [f] = [f for f in diagnosis.of("stalled")]
    assert set(f.layers) == {"0", "2"} and "param_groups" in f.remedy_keys, str(diagnosis)


@pytest.mark.zoo
@pytest.mark.parametrize("seed", SEEDS)
def test_a_gan_burst_that_left_no_damage_is_not_a_problem(store, seed):
    """Bug (goodfellow_gan_nonsaturating seed 0): a ×10 adversarial burst read "exploding, warning", because the
    recovery rule wanted the loss to halve, which a generator loss need not. Now a burst after which the norm is back
    at its calm level and the loss ends no higher than before it is info. The reference: the generator reaches the
    data (held-out fraction of samples near it)."""
    s = setups.get("goodfellow_gan_nonsaturating")
    diagnosis, trial, _ = _watched(s.make, seed, s.steps, store)
    assert trial.evaluate(trial.model) > 0.8
    assert not diagnosis.problems, str(diagnosis)


# --- remedies that fit the architecture (issues 12 and 20) ------------------------------------------------------


class _Stage(nn.Module):
    """A residual block under a class name no list knows: x + W₂ relu(W₁ x)."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(x)))


class _TwoSums(nn.Module):
    """GPT-2's block shape, Pre-LN: y = x + f(ln₁ x); out = y + g(ln₂ y)."""

    def __init__(self) -> None:
        super().__init__()
        self.ln1, self.f, self.ln2, self.g = nn.LayerNorm(8), nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x + self.f(self.ln1(x))
        return y + self.g(self.ln2(y))


def _meta_after_one_step(model: nn.Module, x: torch.Tensor, store) -> dict:
    with gw.watch(model, store=store, name="meta") as w:
        with torch.no_grad():
            model(x)  # an evaluation pass first: autograd records nothing, so nothing can be read yet
        model(x).sum().backward()
    return w.open().meta


def test_residual_blocks_are_recognised_by_what_they_compute(store):
    """Issue 20: residual blocks were recognised by class name only, so a user's own block class was told to add
    residual connections. The watch now reads each module's autograd graph at the first recorded forward pass."""
    x = torch.randn(4, 8, requires_grad=False)
    users = nn.Sequential(nn.Linear(8, 8), _Stage(), _Stage(), nn.Linear(8, 2))
    assert {"1", "2"} <= set(_meta_after_one_step(users, x, store / "a")["residual_blocks"])
    plain = nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 8), nn.ReLU()), nn.Linear(8, 2))
    assert _meta_after_one_step(plain, x, store / "b")["residual_blocks"] == []
    gpt = nn.Sequential(nn.Linear(8, 8), _TwoSums(), nn.Linear(8, 2))
    assert "1" in _meta_after_one_step(gpt, x, store / "c")["residual_blocks"]
    post = nn.Sequential(nn.Linear(8, 8), nn.TransformerEncoder(
        nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), 2, enable_nested_tensor=False))
    meta = _meta_after_one_step(post, torch.randn(2, 3, 8), store / "d")
    assert {"1.layers.0", "1.layers.1"} <= set(meta["residual_blocks"]) and meta["post_ln_layers"] == 2
    # the model is the same afterwards: the hooks are gone and training is untouched
    assert all(not m._forward_hooks for m in users.modules())


class _Basic(nn.Module):
    """He et al. 2016's basic block shape, with one ReLU module used in the branch and again after the sum:
    relu(x + fc2(relu(norm(fc1 x))))."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.fc1, self.norm, self.fc2, self.relu = nn.Linear(width, width), nn.LayerNorm(width), nn.Linear(width, width), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(x + self.fc2(self.relu(self.norm(self.fc1(x)))))


class _TanhBlock(nn.Module):
    """x + tanh(fc x), its activation a module."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.fc, self.act = nn.Linear(width, width), nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.fc(x))


def test_the_modules_on_a_residual_branch_are_told_from_those_on_the_trunk(store):
    """Which modules every call of which lies on a branch that a block adds to its input, against the blocks'
    construction: a tanh block's fc and act; a basic block's fc1, norm and fc2 but not its ReLU, which also follows
    the sum (it sits on the trunk there); nothing of the layers around the blocks, nor of a plain net."""
    x = torch.randn(4, 8)
    model = nn.Sequential(nn.Linear(8, 8), _TanhBlock(), _Basic(), nn.Linear(8, 2))
    meta = _meta_after_one_step(model, x, store / "a")
    assert meta["residual_blocks"] == ["1", "2"]
    assert sorted(meta["residual_branch"]) == ["1.act", "1.fc", "2.fc1", "2.fc2", "2.norm"]
    plain = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    assert _meta_after_one_step(plain, x, store / "b")["residual_branch"] == []


def _fake_run(**meta):
    from types import SimpleNamespace

    return SimpleNamespace(meta=meta, entities=lambda kind=None: [], quantities=())  # no series recorded


def _vanishing():
    from gradwatch.diagnosis.findings import Finding
    from gradwatch.diagnosis.remedies import remedies

    return Finding("vanishing", "critical", ("0", "1"), (0, 90), "", "", "dead units",
                   remedies("leaky", "zero_bias", "he_init", "lower_lr"))


def test_a_deep_plain_net_is_told_of_residual_connections_and_a_residual_one_is_not():
    """he_relu30_xavier: a 30-layer ReLU MLP at Xavier init was offered LeakyReLU, He init and lower rates (0.59 at
    best), never residual connections, which the doctor's ReZero turns into 0.96. A net with skip connections found
    by what they compute (not by class name) is never offered them."""
    from gradwatch.diagnosis.architecture import fit_architecture

    layers = [{"name": str(i), "module": "Linear"} for i in range(30)]
    (f,) = fit_architecture([_vanishing()], _fake_run(layers=layers, module_types=["Linear", "ReLU", "Sequential"]))
    assert f.remedy_keys[-1] == "residual"
    (f,) = fit_architecture([_vanishing()], _fake_run(layers=layers[:6], module_types=["Linear", "ReLU"]))
    assert "residual" not in f.remedy_keys  # six layers: not deep
    from dataclasses import replace

    from gradwatch.diagnosis.remedies import remedies

    named = replace(_vanishing(), remedies=_vanishing().remedies + remedies("residual"))
    (f,) = fit_architecture([named], _fake_run(layers=layers, module_types=["Stage", "Linear"], residual_blocks=["3"]))
    assert "residual" not in f.remedy_keys


def test_post_ln_without_warmup_names_warmup_and_pre_ln_first():
    """xiong_post_ln24: 24 Post-LN layers under Adam 1e-3 with no warm-up vanish, and the finding named only
    orthogonal init (the Adam rule starts at 3e-3). Post-LN layers without a warm-up now name warm-up and Pre-LN
    (Xiong et al. 2020); with a warm-up under way (lr below its scheduler's base) they do not."""
    from gradwatch.diagnosis.architecture import fit_architecture

    base = dict(post_ln_layers=24, optimizer="Adam", optimizer_lr=1e-3, module_types=["TransformerEncoderLayer"])
    (f,) = fit_architecture([_vanishing()], _fake_run(**base))
    assert f.remedy_keys[:2] == ("warmup", "pre_ln") and "Xiong et al. 2020" in f.cause
    (f,) = fit_architecture([_vanishing()], _fake_run(**{**base, "optimizer_lr": 1e-5, "optimizer_initial_lr": 1e-3}))
    assert "pre_ln" not in f.remedy_keys
    (f,) = fit_architecture([_vanishing()], _fake_run(**{**base, "post_ln_layers": 0}))
    assert "pre_ln" not in f.remedy_keys


def test_an_ongoing_findings_onset_survives_one_noisy_sample(store):
    """Issue 20: "since step N" came from raw per-step flags, so one sample back above the cut moved the onset to
    after it. A chain of orthogonal layers whose first layer is scaled ×10⁻⁴ from step 10 on (one step, 25, back
    at ×1): the first/last ratio is exactly that scale, so the onset is step 10."""
    torch.manual_seed(0)
    layers = [nn.Linear(16, 16, bias=False) for _ in range(6)]
    for lin in layers:
        nn.init.orthogonal_(lin.weight)
    model = nn.Sequential(*layers)
    w0 = layers[1].weight.detach().clone()  # ‖∂L/∂a₀‖ = scale · ‖∂L/∂a₁‖ (a₁ = W₁ a₀)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    scale = {s: 1.0 if s < 10 or s == 25 else 1e-4 for s in range(40)}
    with gw.watch(model, opt, activations=1, store=store, name="onset") as w:
        for step in range(40):
            with torch.no_grad():
                layers[1].weight.copy_(w0 * scale[step])
            opt.zero_grad()
            model(torch.randn(32, 16)).pow(2).sum().backward()
            opt.step()
    s = w.open().series("out_grad_norm")
    ratio = s.values[0] / s.values[-1]
    assert ratio[25] > 1e-3 and ratio[24] < 1e-3  # the stored ratio: one sample back above the cut
    (f,) = [f for f in w.diagnose().of("vanishing") if f.layers]
    assert f.steps[0] == 10, f.summary


def _ramped(store, name: str, end: int, log_loss: bool) -> tuple[gw.Watch, list[float]]:
    """lr 0 and the loss × 1.15^(step − 100) from step 100 to ``end``, × 1 after: every gradient scales exactly with
    the factor, so a ramp's onset is step 100 by construction. Totals by a naive loop over param.grad."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    g = torch.Generator().manual_seed(0)
    totals = []
    with gw.watch(model, opt, every=1, store=store, name=name) as w:  # every step: the naive loop's steps
        for step in range(160):
            factor = 1.15 ** (step - 100) if 100 <= step <= end else 1.0
            opt.zero_grad()
            loss = factor * model(torch.randn(16, 4, generator=g)).pow(2).mean()
            loss.backward()
            totals.append(math.sqrt(sum(float(p.grad.norm()) ** 2 for p in model.parameters())))
            opt.step()
            if log_loss:
                w.log(loss=loss.detach())
    return w, totals


def test_a_ramp_into_divergence_is_found_from_the_gradient_alone(store):
    """Issue 20: ramps needed a logged loss; without one a ramp into divergence went unseen. Now the gradient alone
    shows it when the norm still climbs, as a real log-linear trend, at the last step seen; a ramp that came back
    down is left to the loss (logged: it is judged; not logged: nothing confirms it)."""
    w, totals = _ramped(store, "to-the-end", 159, log_loss=False)
    (f,) = w.diagnose().of("exploding")
    assert abs(f.numbers["onset"] - 100) <= 5 and abs(f.steps[0] - 100) <= 5
    assert f.numbers["peak_step"] == int(np.argmax(totals)) >= 150  # the reference: a naive loop over param.grad
    assert "the gradient alone" in f.evidence
    w, _ = _ramped(store, "came-back", 130, log_loss=False)
    assert not [f for f in w.diagnose().of("exploding") if "ramp" in f.evidence]
    w, _ = _ramped(store, "logged", 130, log_loss=True)  # with the loss: the existing judgement
    assert any("while the loss did not fall" in f.evidence for f in w.diagnose().of("exploding"))
