"""The thirty-fourth session's second set: round 37 (written from the README alone, each ported from a public source),
each against its reference."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gradwatch as gw
from gradwatch.remedies.init import weight_norm_init, zero_weight_norms
from gradwatch.zoo.train import readme_watched
from conftest import SEED_0_FAST


def _problems(w) -> list:
    return [f for f in w.diagnose() if f.severity != "info"]


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    """Digits standardised on the first 1,300 samples."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32)
    x = (x - x[:1300].mean(0)) / x[:1300].std(0).clamp_min(1e-3)
    return x, torch.tensor(d.target)


def _mlp(head: nn.Module | None = None) -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), head or nn.Linear(64, 10))


def _trial(model: nn.Module, opt: torch.optim.Optimizer, seed: int, batch: int = 64) -> gw.Trial:
    """Batches drawn at random from the first 1,300 samples (all of them each step for ``batch`` ≥ 1300); accuracy
    on the rest."""
    x, y = _digits()
    g = torch.Generator().manual_seed(seed)

    def batches():
        while True:
            i = torch.arange(1300) if batch >= 1300 else torch.randint(0, 1300, (batch,), generator=g)
            yield x[i], y[i]

    def accuracy(m: nn.Module) -> float:
        with torch.no_grad():
            out = m(x[1300:])
            return float((out.argmax(1) == y[1300:]).float().mean()) if torch.isfinite(out).all() else 0.0

    return gw.Trial(model, opt, batches(), F.cross_entropy, evaluate=accuracy)


# -- every weight one constant (D2L §5.4.2, "Breaking the Symmetry") --------------------------------------------------

def _constant_setup(seed: int, constant: bool = True) -> gw.Trial:
    torch.manual_seed(seed)
    model = _mlp()
    if constant:
        for m in model:
            if isinstance(m, nn.Linear):
                nn.init.constant_(m.weight, 0.05)
                nn.init.zeros_(m.bias)
    return _trial(model, torch.optim.Adam(model.parameters(), lr=1e-3), seed)


@pytest.mark.parametrize("seed", SEED_0_FAST)
def test_weights_set_to_one_constant_are_told_as_units_that_stay_copies(tmp_path, seed):
    bug, twin = _constant_setup(seed), _constant_setup(seed, constant=False)
    w_bug = readme_watched(bug, tmp_path, "bug", 200)
    w_twin = readme_watched(twin, tmp_path, "twin", 200)
    # the reference: the hidden units are still exact copies of one another after training
    for layer in (bug.model[0], bug.model[2]):
        assert torch.equal(layer.weight, layer.weight[:1].expand_as(layer.weight))
    assert twin.evaluate(twin.model) > 0.9 > 0.3 > bug.evaluate(bug.model)
    (f,) = _problems(w_bug)
    assert f.kind == "stalled" and f.severity == "critical" and f.remedy_keys == ("he_init",), str(f)
    assert "copies" in f.summary and set(f.layers) == {"0", "2", "4"}
    assert not _problems(w_twin)


def test_the_doctor_breaks_the_symmetry():
    report = gw.doctor(_constant_setup, steps=200, progress=False)
    assert report.best is not None and report.best.parts == ("he_init",), str(report)
    assert report.best.verdict == "fixes it" and report.best.score > 0.9


# -- a zero-initialised layer wrapped in weight_norm (pytorch/pytorch#19126) ------------------------------------------

def _weight_norm_setup(seed: int, zero: bool = True) -> gw.Trial:
    torch.manual_seed(seed)
    head = nn.Linear(64, 10)
    if zero:
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
    model = _mlp(nn.utils.parametrizations.weight_norm(head))
    return _trial(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), seed)


@pytest.mark.parametrize("seed", SEED_0_FAST)
def test_weight_normalisation_of_a_zero_weight_is_told_as_zero_over_zero(tmp_path, seed):
    bug, twin = _weight_norm_setup(seed), _weight_norm_setup(seed, zero=False)
    # the reference: g = ‖v‖ = 0, and g·v/‖v‖ is 0/0 in every entry
    assert bug.model[4].weight.isnan().all()
    w_bug = readme_watched(bug, tmp_path, "bug", 200)
    w_twin = readme_watched(twin, tmp_path, "twin", 200)
    assert twin.evaluate(twin.model) > 0.9
    (f,) = _problems(w_bug)
    assert f.kind == "nonfinite" and f.steps[0] == 0 and f.remedy_keys[0] == "weight_norm_init", str(f)
    assert "all 10 of whose 10 rows are 0" in f.cause and "0/0" in f.cause
    assert not _problems(w_twin)


def test_weight_norm_init_draws_the_zero_rows_and_leaves_the_rest():
    torch.manual_seed(0)
    old = nn.utils.weight_norm(nn.Linear(4, 3))  # the older API: weight_g, weight_v
    with torch.no_grad():
        old.weight_v[1].zero_()
        old.weight_g[1].zero_()
    kept = old.weight_v[[0, 2]].detach().clone(), old.weight_g[[0, 2]].detach().clone()
    new = nn.Linear(3, 2)
    nn.init.zeros_(new.weight)
    model = nn.Sequential(old, nn.utils.parametrizations.weight_norm(new))
    assert [(f["module"], f["zero_rows"], f["rows"]) for f in zero_weight_norms(model)] == [("0", 1, 3), ("1", 2, 2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert model(torch.randn(5, 4)).isnan().all()
    weight_norm_init(model, inplace=True)
    assert zero_weight_norms(model) == [] and model(torch.randn(5, 4)).isfinite().all()
    assert torch.equal(old.weight_v[[0, 2]], kept[0]) and torch.equal(old.weight_g[[0, 2]], kept[1])
    v = model[1].parametrizations.weight.original1
    assert torch.allclose(model[1].parametrizations.weight.original0.flatten(), v.norm(dim=1))  # w = v: the default
    assert torch.allclose(model[1].weight, v)


def test_the_doctor_draws_the_zero_weight_again():
    report = gw.doctor(_weight_norm_setup, steps=150, progress=False)
    assert report.best is not None and report.best.parts == ("weight_norm_init",), str(report)
    assert report.best.verdict == "fixes it" and report.best.score > 0.9
    assert not [t for t in report.trials if t.error]  # a parametrization is no activation to swap (it failed so)


# -- Rprop on mini-batches (Riedmiller & Braun 1993; Hinton's lecture 6e) ---------------------------------------------

def _rprop_setup(seed: int, batch: int = 32) -> gw.Trial:
    torch.manual_seed(seed)
    model = _mlp()
    return _trial(model, torch.optim.Rprop(model.parameters(), lr=1e-3), seed, batch)


@pytest.mark.parametrize("seed", SEED_0_FAST)
def test_rprop_on_mini_batches_is_told_first_and_on_full_batches_it_is_not(tmp_path, seed):
    bug, twin = _rprop_setup(seed), _rprop_setup(seed, batch=1300)
    w_bug = readme_watched(bug, tmp_path, "bug", 200)
    w_twin = readme_watched(twin, tmp_path, "twin", 200)
    # the reference: the same Rprop fits the training set on full batches, and on mini-batches it does not
    x, y = _digits()
    with torch.no_grad():
        fit = [F.cross_entropy(t.model(x[:1300]), y[:1300]).item() for t in (bug, twin)]
    assert fit[1] < 0.1 and fit[0] > 10 * fit[1] and twin.evaluate(twin.model) > 0.85, fit
    problems = _problems(w_bug)
    assert problems and all(f.remedy_keys[0] == "adam" and f.cause.startswith("Rprop on mini-batches")
                            for f in problems), [str(f) for f in problems]
    with w_twin.open() as run:
        assert run.meta["batches_vary"] is False
    assert not _problems(w_twin)


def test_the_doctor_puts_adam_in_place_of_rprop():
    report = gw.doctor(_rprop_setup, steps=200, progress=False)
    assert report.best is not None and report.best.parts == ("adam",), str(report)
    assert report.best.verdict == "fixes it" and "in place of Rprop" in report.best.changed


# -- logits multiplied by a temperature of 0.01 (bowang-lab/BLEEP#5) --------------------------------------------------

class _Scaled(nn.Module):
    def __init__(self, tau: float) -> None:
        super().__init__()
        self.net, self.tau = _mlp(), tau

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * self.tau


def _cold_setup(seed: int, tau: float = 0.01) -> gw.Trial:
    torch.manual_seed(seed)
    model = _Scaled(tau)
    return _trial(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), seed)


@pytest.mark.parametrize("seed", SEED_0_FAST)
def test_logits_multiplied_by_a_small_temperature_are_told(tmp_path, seed):
    bug, twin = _cold_setup(seed), _cold_setup(seed, tau=1.0)
    # the reference: at the same weights, every gradient is τ = 0.01 times what τ = 1 would give at logits 100× as
    # large, and the loss of logits that small is ln 10 to 3 decimals
    x, y = next(bug.batches)
    with torch.no_grad():
        assert abs(F.cross_entropy(bug.model(x), y).item() - torch.log(torch.tensor(10.0)).item()) < 1e-2
    w_bug = readme_watched(bug, tmp_path, "bug", 200)
    w_twin = readme_watched(twin, tmp_path, "twin", 200)
    assert twin.evaluate(twin.model) > 0.9
    (f,) = _problems(w_bug)
    assert f.kind == "stalled" and f.severity == "critical" and f.remedy_keys == ("logit_scale",), str(f)
    assert "logits that stay near 0" in f.cause
    assert not _problems(w_twin)


def test_a_baseline_flat_at_a_constants_loss_did_not_learn_whatever_its_score():
    """A cross-entropy flat at ln 10 (2.302 → 2.301) that ranks a little (0.385 held out, a constant 0.091) was
    called "healthy" by the doctor where no finding named a cause."""
    from gradwatch.doctor.table import TrialResult
    from gradwatch.doctor.verdicts import did_not_learn

    def row(final: float, score: float) -> TrialResult:
        return TrialResult("baseline", final, 2.302, score, [], 1.0, first_loss=2.302, null_loss=math.log(10),
                           null_score=0.0911)

    assert "about a constant output's 2.303" in did_not_learn(row(2.301, 0.385))
    assert did_not_learn(row(0.5, 0.385)) == ""  # the loss fell: it learns
    assert "against a constant output's" in did_not_learn(row(2.301, 0.09))  # no better than a constant
