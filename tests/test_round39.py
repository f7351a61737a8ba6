"""The thirty-fifth session's second set: round 39 (written from the README alone, each ported from a public source),
each against its reference: every BatchNorm scale at 0 in a plain CNN, a pinball loss given its quantile in percent."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gradwatch as gw
from gradwatch.remedies.init import norm_scales_one, zero_norm_scales
from gradwatch.zoo.train import readme_watched
from conftest import SEED_0_FAST


def _problems(w) -> list:
    return [f for f in w.diagnose() if f.severity != "info"]


# -- every BatchNorm's γ at 0 in a plain CNN (tensorpack#420; Goyal et al. 2017 §5.1 zero a residual block's last) ---

def _digit_images() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1), torch.tensor(d.target)


class _CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _zero_gamma(seed: int, zero: bool = True) -> gw.Trial:
    torch.manual_seed(seed)
    model = _CNN()
    if zero:
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                nn.init.zeros_(m.weight)
    x, y = _digit_images()
    g = torch.Generator().manual_seed(seed)

    def batches():
        while True:
            i = torch.randint(0, 1300, (64,), generator=g)
            yield x[i], y[i]

    def accuracy(m: nn.Module) -> float:
        was = m.training
        m.eval()
        with torch.no_grad():
            acc = float((m(x[1300:]).argmax(1) == y[1300:]).float().mean())
        m.train(was)
        return acc

    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return gw.Trial(model, opt, batches(), F.cross_entropy, evaluate=accuracy)


@pytest.mark.parametrize("seed", SEED_0_FAST)
def test_zero_normalisation_scales_are_told_as_the_cause(tmp_path, seed):
    bug, twin = _zero_gamma(seed), _zero_gamma(seed, zero=False)
    # the reference: with γ = 0 every gradient below the last BatchNorm is exactly 0 (a loop over .grad)
    x, y = next(_zero_gamma(seed).batches)
    F.cross_entropy(bug.model(x), y).backward()
    assert all(not p.grad.any() for p in bug.model.features[:8].parameters())
    bug.model.zero_grad(set_to_none=True)
    w_bug = readme_watched(bug, tmp_path, "bug", 200)
    w_twin = readme_watched(twin, tmp_path, "twin", 200)
    assert twin.evaluate(twin.model) > 0.9 > 0.2 > bug.evaluate(bug.model)
    problems = _problems(w_bug)
    assert problems and all(f.remedy_keys[0] == "norm_scale_one" and "the scale γ of 3 normalisation layers" in f.cause
                            for f in problems), [str(f) for f in problems]
    # layers whose gradient is exactly 0 are not also excused as "no loss of learning" because a norm follows each
    assert not any("no loss of learning" in f.evidence for f in w_bug.diagnose())
    assert not _problems(w_twin)


def test_zero_scales_are_found_and_set_to_one_and_a_residual_branch_is_left_alone(tmp_path):
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.BatchNorm1d(4), nn.GroupNorm(2, 4))
    for i in (1, 3):
        nn.init.zeros_(model[i].weight)
    with torch.no_grad():
        model[2].weight[1:] = 0  # one entry of 1 left: not a zero scale
    assert zero_norm_scales(model) == ["1", "3"]
    kept = model[2].weight.detach().clone()
    norm_scales_one(model, inplace=True)
    assert zero_norm_scales(model) == [] and torch.equal(model[1].weight, torch.ones(4))
    assert torch.equal(model[3].weight, torch.ones(4)) and torch.equal(model[2].weight, kept)

    class Block(nn.Module):  # Goyal et al.'s zero γ on a residual branch's last norm: the skip carries the signal
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.bn = nn.Linear(16, 16), nn.BatchNorm1d(16)
            nn.init.zeros_(self.bn.weight)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.bn(torch.relu(self.fc(x)))

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), Block(), Block(), nn.Linear(16, 2))
    xs, ys = torch.randn(256, 8), torch.randint(0, 2, (256,))
    trial = gw.Trial(net, torch.optim.SGD(net.parameters(), lr=0.05), iter(lambda: (xs, ys), None), F.cross_entropy)
    w = readme_watched(trial, tmp_path, "residual", 60)
    assert all("normalisation layer" not in f.cause for f in w.diagnose()), [str(f) for f in w.diagnose()]


@pytest.mark.slow
def test_the_doctor_sets_the_scales_to_one():
    report = gw.doctor(_zero_gamma, steps=200, progress=False)
    assert report.best is not None and report.best.parts == ("norm_scale_one",), str(report)
    assert report.best.verdict == "fixes it" and report.best.score > 0.9


# -- a pinball loss given the quantile in percent (tensorflow/addons#579: "tau: a float between 0 and 1") ------------

def _pinball(q: float):
    def loss(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        e = y - pred
        return torch.maximum(q * e, (q - 1) * e).mean()
    return loss


def _regression(x: torch.Tensor, y: torch.Tensor, seed: int, width: int, train: int,
                optimizer: type, lr: float, loss) -> gw.Trial:
    """A two-hidden-layer ReLU MLP of ``width`` with one output, batches of 64 drawn at random from the first
    ``train`` samples, trained by ``optimizer`` at ``lr`` (SGD with momentum 0.9)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(x.shape[1], width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                          nn.Linear(width, 1), nn.Flatten(0))
    g = torch.Generator().manual_seed(seed)

    def batches():
        while True:
            i = torch.randint(0, train, (64,), generator=g)
            yield x[i], y[i]

    extra = {"momentum": 0.9} if optimizer is torch.optim.SGD else {}
    return gw.Trial(model, optimizer(model.parameters(), lr=lr, **extra), batches(), loss)


def _quantile(seed: int, q: float = 90.0) -> gw.Trial:
    from sklearn.datasets import make_regression

    xs, ys = make_regression(n_samples=1000, n_features=10, n_informative=8, noise=10.0, random_state=0)
    x = torch.tensor((xs - xs.mean(0)) / xs.std(0), dtype=torch.float32)
    y = torch.tensor((ys - ys.mean()) / ys.std(), dtype=torch.float32)
    return _regression(x, y, seed, 64, 750, torch.optim.SGD, 1e-2, _pinball(q))


@pytest.mark.parametrize("seed", SEED_0_FAST)
def test_a_quantile_given_in_percent_is_told_as_a_loss_unbounded_below(tmp_path, seed):
    bug, twin = _quantile(seed), _quantile(seed, q=0.9)
    # the reference: at q = 90 the loss's derivative in every output is −q/B or −(q − 1)/B: negative everywhere,
    # so raising every output lowers the loss without end
    x, y = next(_quantile(seed).batches)
    pred = bug.model(x).detach().requires_grad_()
    _pinball(90.0)(pred, y).backward()
    assert (pred.grad < 0).all()
    w_bug = readme_watched(bug, tmp_path, "bug", 200)
    w_twin = readme_watched(twin, tmp_path, "twin", 200)
    problems = _problems(w_bug)
    assert problems and all(f.cause.startswith("a loss unbounded below") and f.remedy_keys[0] == "bounded_objective"
                            for f in problems), [str(f) for f in problems]
    assert not _problems(w_twin)


# -- PoissonNLLLoss(log_input=False) given a linear output (pytorch/pytorch#184030) ----------------------------------

def _poisson(seed: int, log_input: bool = False) -> gw.Trial:
    import numpy as np

    rng = np.random.default_rng(0)
    xs = rng.normal(size=(2000, 10)).astype(np.float32)
    ys = rng.poisson(np.exp(0.5 + xs @ rng.normal(scale=0.4, size=10).astype(np.float32))).astype(np.float32)
    return _regression(torch.tensor(xs), torch.tensor(ys), seed, 32, 1500, torch.optim.Adam, 1e-2,
                       nn.PoissonNLLLoss(log_input=log_input))


@pytest.mark.parametrize("seed", SEED_0_FAST)
def test_a_rate_given_raw_to_a_log_is_told(tmp_path, seed):
    bug, twin = _poisson(seed), _poisson(seed, log_input=True)
    # the reference: the loss's value is NaN where an output is below 0, and its gradient there finite
    out = torch.tensor([-0.5, 0.5], requires_grad=True)
    value = nn.PoissonNLLLoss(log_input=False, reduction="none")(out, torch.tensor([2.0, 2.0]))
    value.sum().backward()
    assert value[0].isnan() and value[1].isfinite() and out.grad.isfinite().all()
    w_bug = readme_watched(bug, tmp_path, "bug", 200)
    w_twin = readme_watched(twin, tmp_path, "twin", 200)
    with w_bug.open() as run:
        ends_nan = not torch.tensor(run.series("loss", "run").values[0][-1]).isfinite()
    # on seed 1 every output starts above 0 and the identity link learns (measured: finite from step 0, −5.4 at
    # the end): no pathology, and the cause must not be told; on seeds 0 and 2 the loss is NaN from step 0 to the end
    assert ends_nan == (seed != 1)
    problems = _problems(w_bug)
    told = [f for f in problems if "positive_log_input" in f.remedy_keys]
    if ends_nan:
        assert problems and all(f.remedy_keys[0] == "positive_log_input" and "logarithm of values at or below 0"
                                in f.cause for f in problems), [str(f) for f in problems]
    else:
        assert not told, [str(f) for f in told]
    assert not _problems(w_twin)
