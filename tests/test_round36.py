"""The thirty-fourth session's set: round 36 (written from the README alone, each ported from a public source),
each against its reference."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gradwatch as gw
from gradwatch.doctor.table import DoctorReport, TrialResult
from gradwatch.remedies.structure import NoEmptyVariance
from gradwatch.zoo.train import readme_watched
from conftest import SEED_0_FAST


def _problems(w) -> list:
    return [f for f in w.diagnose() if f.severity != "info"]


def _digits(images: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float32)
    return (x.reshape(-1, 1, 8, 8) if images else x), torch.tensor(d.target)


def _trial(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, seed: int,
           loss_fn=F.cross_entropy, score: str = "accuracy") -> gw.Trial:
    """Batches of 64 drawn at random from the first 1,300 samples; the held-out score on the rest."""
    g = torch.Generator().manual_seed(seed)

    def batches():
        while True:
            i = torch.randint(0, 1300, (64,), generator=g)
            yield x[i], y[i]

    def evaluate(m: nn.Module) -> float:
        with torch.no_grad():
            out = m(x[1300:])
            if not torch.isfinite(out).all():
                return -1.0
            if score == "accuracy":
                return float((out.argmax(1) == y[1300:]).float().mean())
            t = y[1300:]
            return float(1 - ((out - t) ** 2).sum() / ((t - t.mean()) ** 2).sum())

    return gw.Trial(model, opt, batches(), loss_fn, evaluate=evaluate)


# -- a layer built inside forward() (thecodeforge.io, "the forward() layer bug") --------------------------------------

class _ForwardLayerNet(nn.Module):
    """64 → 128 → 128 → 10 with ReLUs; the first layer built in forward (the bug) or in __init__ (the fix)."""

    def __init__(self, in_forward: bool) -> None:
        super().__init__()
        self.in_forward = in_forward
        if not in_forward:
            self.fc1 = nn.Linear(64, 128)
        self.fc2, self.fc3 = nn.Linear(128, 128), nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fc1 = nn.Linear(64, 128) if self.in_forward else self.fc1
        return self.fc3(F.relu(self.fc2(F.relu(fc1(x)))))


def _layer_setup(seed: int, in_forward: bool = True) -> gw.Trial:
    x, y = _digits()
    torch.manual_seed(seed)
    model = _ForwardLayerNet(in_forward)
    return _trial(model, torch.optim.Adam(model.parameters(), lr=1e-3), x, y, seed)


@pytest.mark.parametrize("seed", SEED_0_FAST)
def test_a_layer_built_inside_forward_is_told_and_its_twin_is_not(tmp_path, seed):
    bug, twin = _layer_setup(seed), _layer_setup(seed, in_forward=False)
    # the reference: the bug's model and optimizer hold exactly the twin's parameters less nn.Linear(64, 128)'s
    held = sum(p.numel() for g in bug.optimizer.param_groups for p in g["params"])
    assert held == sum(p.numel() for p in twin.model.parameters()) - (64 * 128 + 128)
    w_bug = readme_watched(bug, tmp_path, "bug", 200)
    w_twin = readme_watched(twin, tmp_path, "twin", 200)
    assert twin.evaluate(twin.model) > 0.8 > 0.2 > bug.evaluate(bug.model)
    with w_bug.open() as run:
        assert sorted(run.meta["made_in_forward"]) == sorted([[128, 64], [128]])
    (f,) = _problems(w_bug)
    assert f.kind == "stalled" and f.severity == "critical" and f.remedy_keys == ("layer_in_init",), str(f)
    assert "inside forward()" in f.cause
    assert not _problems(w_twin)


def test_a_parameter_another_model_holds_is_not_made_in_forward(tmp_path):
    """A GAN's generator loss reads the discriminator's parameters, which its optimizer does not hold: alive at the
    end, they were not made for one pass."""
    torch.manual_seed(0)
    gen, disc = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), nn.Linear(2, 1)
    opt = torch.optim.Adam(gen.parameters(), lr=1e-3)
    with gw.watch(gen, opt, store=tmp_path, name="gen") as w:
        for _ in range(20):
            loss = F.softplus(-disc(gen(torch.randn(16, 4)))).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            w.log(loss=loss)
    with w.open() as run:
        assert run.meta.get("made_in_forward") == []
    assert not [f for f in w.diagnose() if "made anew" in f.summary]


def test_the_doctor_names_the_layer_built_in_forward_for_you_to_move():
    report = gw.doctor(_layer_setup, steps=100, progress=False)
    assert report.baseline.findings == ["stalled"] and report.best is None, str(report)
    assert "build every layer in __init__" in report.message


# -- torch.var over a 1×1 map with Bessel's correction (digantamisra98/EvoNorm#4) -------------------------------------

class _EvoNormB0(nn.Module):
    """EvoNorm-B0 (Liu et al. 2020): x / max(√(batch var + ε), v·x + instance std) · γ + β, the instance std by
    ``torch.var(x, dim=(2, 3), unbiased=…)`` as the EvoNorm repository wrote it."""

    def __init__(self, channels: int, unbiased: bool) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.v = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.unbiased = unbiased

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.var(dim=(0, 2, 3), keepdim=True, unbiased=False)
        std = (x.var(dim=(2, 3), keepdim=True, unbiased=self.unbiased) + 1e-5).sqrt()
        return x / torch.max((var + 1e-5).sqrt(), self.v * x + std) * self.gamma + self.beta


def _evonorm_setup(seed: int, unbiased: bool = True) -> gw.Trial:
    x, y = _digits(images=True)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), _EvoNormB0(16, unbiased), nn.MaxPool2d(2),
                          nn.Conv2d(16, 32, 3, padding=1), _EvoNormB0(32, unbiased), nn.MaxPool2d(2),
                          nn.Conv2d(32, 64, 3, padding=1), nn.MaxPool2d(2), _EvoNormB0(64, unbiased),  # 1×1 here
                          nn.Flatten(), nn.Linear(64, 10))
    return _trial(model, torch.optim.Adam(model.parameters(), lr=1e-3), x, y, seed)


@pytest.mark.parametrize("seed", SEED_0_FAST)
def test_a_variance_over_one_element_is_told_as_zero_over_zero(tmp_path, seed):
    bug, twin = _evonorm_setup(seed), _evonorm_setup(seed, unbiased=False)
    # the reference: over one element, Σ(x − x̄)² / (n − 1) is 0/0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.randn(3, 1, 1).var(dim=(1, 2), unbiased=True).isnan().all()
    w_bug = readme_watched(bug, tmp_path, "bug", 200)
    w_twin = readme_watched(twin, tmp_path, "twin", 200)
    assert twin.evaluate(twin.model) > 0.8
    (f,) = _problems(w_bug)
    assert f.kind == "nonfinite" and f.steps[0] == 0 and f.remedy_keys[0] == "biased_variance", str(f)
    assert f.cause.startswith("torch.var over dims (2, 3) of a 64×64×1×1 input reduces 1 element") and "0/0" in f.cause
    assert not _problems(w_twin)


def test_no_empty_variance_takes_a_single_elements_variance_as_zero_and_leaves_the_rest():
    x = torch.randn(4, 3, 1, 1, requires_grad=True)
    z = torch.randn(4, 3, 2, 2)
    with NoEmptyVariance():
        got = [x.var(dim=(2, 3), keepdim=True), torch.std(x, (2, 3), True, True), torch.var(x, dim=3),
               torch.var_mean(x, dim=(2, 3))[0], x.std(dim=(2, 3), correction=1),
               z.var(dim=(2, 3)), torch.std(z, dim=(2, 3), unbiased=True), z.var()]
    for v in got[:5]:  # one element per output: its spread, 0, where n − 1 made 0/0
        assert torch.equal(v, torch.zeros_like(v))
    assert got[0].shape == (4, 3, 1, 1) and got[1].shape == (4, 3, 1, 1) and got[2].shape == (4, 3, 1)
    for v, want in zip(got[5:], [z.var(dim=(2, 3)), z.std(dim=(2, 3)), z.var()]):  # more elements: as made
        assert torch.equal(v, want)
    got[0].sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))  # a finite gradient: d(0)/dx


def test_the_doctor_repairs_the_variance_over_one_element():
    report = gw.doctor(_evonorm_setup, steps=150, progress=False)
    assert report.best is not None and report.best.parts == ("biased_variance",), str(report)
    assert report.best.verdict == "fixes it" and report.best.score > 0.9
    assert "torch.var" in report.message.lower() or "Tensor.var" in report.message
    assert "correction=0" in report.message and "may only postpone" not in report.message


# -- clip_grad_norm_ after optimizer.step() (awslabs/graphstorm#1366) ------------------------------------------------

def _regression() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import make_regression

    x, y = make_regression(n_samples=1700, n_features=20, n_informative=10, noise=10.0, random_state=0)
    x = torch.tensor((x - x.mean(0)) / x.std(0), dtype=torch.float32)
    return x, torch.tensor((y - y.mean()) / y.std(), dtype=torch.float32).unsqueeze(1)


def _clip_setup(seed: int) -> gw.Trial:
    x, y = _regression()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(20, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 1))
    return _trial(model, torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9), x, y, seed, F.mse_loss, "r2")


def _clipped_run(trial: gw.Trial, tmp_path, name: str, clip: str, steps: int = 200):
    """The loop with clip_grad_norm_(…, 1) "before" or "after" optimizer.step(); the total gradient norm the step
    applied, by a loop over ``param.grad`` at the step (the reference), each step."""
    applied = []

    def at_step(opt, args, kwargs):
        applied.append(math.sqrt(sum(float(p.grad.pow(2).sum()) for p in trial.model.parameters())))

    hook = trial.optimizer.register_step_pre_hook(at_step)
    with gw.watch(trial.model, trial.optimizer, store=tmp_path, name=name) as w:
        for _ in range(steps):
            x, y = next(trial.batches)
            loss = trial.loss_fn(trial.model(x), y)
            trial.optimizer.zero_grad()
            loss.backward()
            if clip == "before":
                torch.nn.utils.clip_grad_norm_(trial.model.parameters(), 1.0)
            trial.optimizer.step()
            if clip == "after":
                torch.nn.utils.clip_grad_norm_(trial.model.parameters(), 1.0)
            w.log(loss=loss)
    hook.remove()
    return w, applied


@pytest.mark.parametrize("seed", SEED_0_FAST)
def test_a_clip_after_the_step_is_told_and_not_taken_for_unshuffled_batches(tmp_path, seed):
    bug, twin = _clip_setup(seed), _clip_setup(seed)
    w_bug, applied_bug = _clipped_run(bug, tmp_path, "bug", "after")
    w_twin, applied_twin = _clipped_run(twin, tmp_path, "twin", "before")
    # the reference: clipped before the step, no step applies more than a norm of 1; after it, steps do
    assert max(applied_twin) <= 1.0 + 1e-4 and max(applied_bug) > 10
    assert twin.evaluate(twin.model) > 0.8 > 0.0 > bug.evaluate(bug.model)
    problems = _problems(w_bug)
    assert problems and all(f.remedy_keys[0] == "clip_before_step" for f in problems), [str(f) for f in problems]
    assert all("after optimizer.step()" in f.cause and "not shuffled" not in f.cause for f in problems)
    with w_twin.open() as run:
        assert run.meta["grads_changed_after_step"][0] == 0
    assert not _problems(w_twin)


def test_gradients_zeroed_in_place_are_not_changed_after_the_step(tmp_path):
    """zero_grad(set_to_none=False) writes the .grad in place too, to 0: no clip."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gw.watch(model, opt, store=tmp_path, name="zeroed") as w:
        for _ in range(20):
            x = torch.randn(16, 4)
            loss = F.mse_loss(model(x), x[:, :1])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=False)
            w.log(loss=loss)
    with w.open() as run:
        assert run.meta["grads_changed_after_step"] == [0, 19]


# -- the doctor's table says which rows that fix it no seed check ran -------------------------------------------------

def test_the_table_says_which_fixing_rows_were_judged_on_the_trials_seeds_alone():
    def row(label: str, parts: tuple[str, ...], verdict: str) -> TrialResult:
        return TrialResult(label, 0.1, 0.2, 0.9, [], 1.0, verdict=verdict, first_loss=1.0, parts=parts)

    best, other, third = row("a", ("a",), "fixes it"), row("b", ("b",), "fixes it"), row("c", ("c",), "no change")
    report = DoctorReport(baseline=row("baseline", (), "findings: exploding"), diagnosis=gw.Diagnosis([], ""),
                          trials=[best, other, third], best=best, checks=[row("a (seed 1)", ("a",), "fixes it")])
    assert report.unchecked_fixes() == [other]
    assert "the other row that fixes it was judged on the trials' seed alone" in str(report)
