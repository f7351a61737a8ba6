"""The thirty-third session's set-ups: round 34 (written from the README alone, each ported from a public source),
each against its reference."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gradwatch as gw
from gradwatch.diagnosis.over_steps import _mean_divided_words
from gradwatch.probes.loss_ops import mean_divided, step_ops
from gradwatch.remedies.structure import CappedBackward, DropSteps
from gradwatch.zoo.train import readme_watched
from conftest import SEED_0_FAST, shuffled_batches, stratified_digits


def _mlp(width: int = 64, out: int = 10) -> nn.Module:
    return nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, out))


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def _problems(w) -> list:
    return [f for f in w.diagnose() if f.severity != "info"]


# -- torch.round between the output and the loss (PyTorch forum, "Torch.round() gradient") -------------------------

def _cancer():
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    d = load_breast_cancer()
    xtr, xte, ytr, yte = train_test_split(d.data, d.target, test_size=0.25, random_state=0, stratify=d.target)
    mean, std = xtr.mean(0), xtr.std(0)
    as_t = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return as_t((xtr - mean) / std), as_t(ytr), as_t((xte - mean) / std), as_t(yte)


class _Rounded(nn.Module):
    """A binary classifier whose forward answers 0/1 "so that the loss compares labels": round(sigmoid(z))."""

    def __init__(self, rounded: bool) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(30, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))
        self.rounded = rounded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(self.net(x)).squeeze(1)
        return torch.round(p) if self.rounded else p


def _round_setup(seed: int, rounded: bool = True) -> gw.Trial:
    xtr, ytr, xte, yte = _cancer()
    torch.manual_seed(seed)
    model = _Rounded(rounded)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def accuracy(m: nn.Module) -> float:
        with torch.no_grad():
            return float(((m.net(xte).squeeze(1) > 0).float() == yte).float().mean())

    return gw.Trial(model, opt, shuffled_batches(xtr, ytr, seed), nn.BCELoss(), evaluate=accuracy)


@pytest.mark.parametrize("seed", SEED_0_FAST)
def test_a_rounded_output_is_told_as_the_step_function_it_is(tmp_path, seed):
    bug, twin = _round_setup(seed), _round_setup(seed, rounded=False)
    w_bug = readme_watched(bug, tmp_path, "bug", 200)
    w_twin = readme_watched(twin, tmp_path, "twin", 200)
    # the reference: every parameter's gradient is exactly 0 after a backward through the rounding
    x, y = next(bug.batches)
    bug.optimizer.zero_grad()
    bug.loss_fn(bug.model(x), y).backward()
    assert all(p.grad is not None and not p.grad.any() for p in bug.model.parameters())
    assert twin.evaluate(twin.model) > bug.evaluate(bug.model) + 0.2
    (f,) = _problems(w_bug)
    assert f.kind == "stalled" and f.severity == "critical"
    assert f.remedy_keys[:2] == ("drop_rounding", "straight_through")
    assert "torch.round" in f.cause and "softmax over a single unit" not in f.cause
    assert "adam" not in f.remedy_keys  # no optimiser moves a net whose every gradient is 0
    assert not _problems(w_twin)


def test_step_functions_are_read_off_the_loss_ops_and_dropped_by_their_mode():
    assert step_ops(["BinaryCrossEntropyBackward0", "RoundBackward0", "SignBackward0"]) == ["round", "sign"]
    assert step_ops(["MseLossBackward0"]) == [] and step_ops(None) == []
    z = torch.randn(5, requires_grad=True)
    with DropSteps():
        out = torch.round(torch.sigmoid(z))
    out.sum().backward()
    s = torch.sigmoid(z.detach())
    assert torch.equal(out.detach(), s) and torch.allclose(z.grad, s * (1 - s))  # σ' in closed form
    kept = torch.round(torch.tensor([0.4, 0.6]))  # a tensor without a gradient is rounded as before
    with DropSteps():
        assert torch.equal(torch.round(torch.tensor([0.4, 0.6])), kept)


def test_the_doctor_drops_the_rounding():
    report = gw.doctor(_round_setup, steps=200, progress=False)
    assert report.best is not None and report.best.parts == ("drop_rounding",), str(report)
    assert report.best.verdict == "fixes it" and report.best.score > 0.9 > report.baseline.score


# -- a mean divided by the batch size again (williamleif/GraphSAGE#12) --------------------------------------------

def _divided_setup(seed: int, divided: bool = True) -> gw.Trial:
    xtr, ytr, xte, yte = stratified_digits()
    torch.manual_seed(seed)
    model = _mlp(128)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)

    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(out, y)
        return loss / y.shape[0] if divided else loss

    return gw.Trial(model, opt, shuffled_batches(xtr, ytr, seed), loss_fn, evaluate=lambda m: _accuracy(m, xte, yte))


@pytest.mark.parametrize("seed", SEED_0_FAST)
def test_a_mean_divided_again_by_the_batch_is_found_by_default(tmp_path, seed):
    bug, twin = _divided_setup(seed), _divided_setup(seed, divided=False)
    # the reference: at one initialisation and one batch, every gradient of the bug is exactly 1/64 of the twin's
    x, y = next(_divided_setup(seed).batches)
    grads = []
    for t in (_divided_setup(seed), _divided_setup(seed, divided=False)):
        t.loss_fn(t.model(x), y).backward()
        grads.append(torch.cat([p.grad.flatten() for p in t.model.parameters()]))
    assert torch.allclose(grads[0] * 64, grads[1], rtol=1e-4, atol=1e-9)
    w_bug = readme_watched(bug, tmp_path, "bug", 300)
    w_twin = readme_watched(twin, tmp_path, "twin", 300)
    assert twin.evaluate(twin.model) > bug.evaluate(bug.model) + 0.5
    (f,) = _problems(w_bug)  # the default thresholds: no from_init
    assert f.kind == "stalled" and f.remedy_keys == ("raise_lr", "adam")
    assert "a mean divided again by a constant" in f.cause and "cross-entropy" in f.cause
    assert not _problems(w_twin)


def test_the_quotient_is_read_off_the_graph():
    x = torch.randn(8, 3, requires_grad=True)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    loss = F.cross_entropy(x, y) / 8
    assert mean_divided(loss) == {"loss": "NllLossBackward0", "divisor": 8.0}
    loss.backward()
    assert mean_divided(loss) == {"loss": "NllLossBackward0", "divisor": None}  # the constant freed by backward
    assert mean_divided(F.cross_entropy(x, y)) is None
    assert mean_divided(F.cross_entropy(x, y, reduction="sum") / 8) is None  # a sum divided: a mean, written out
    assert mean_divided(F.mse_loss(x, x.detach() * 2) / x.norm()) is None  # both sides carry a gradient
    assert mean_divided((x ** 2).mean().view(1).squeeze() / 4)["divisor"] == 4.0


def test_accumulations_own_division_is_no_finding():
    """A loss divided by the number of its micro-batches is gradient accumulation done right."""
    divided = {"loss": "NllLossBackward0", "divisor": 4.0}
    assert _mean_divided_words({"mean_divided": divided, "backwards_per_step": 4}, "") == ""
    assert _mean_divided_words({"mean_divided": {**divided, "divisor": None}, "backwards_per_step": 4}, "") == ""
    words = _mean_divided_words({"mean_divided": {**divided, "divisor": 64.0}, "batch_size": 64}, " at lr 0.05")
    assert "divided again by 64, the batch size" in words and "×64 too short" in words


def test_the_doctor_names_the_divisor_and_raises_the_rate():
    report = gw.doctor(_divided_setup, steps=200, budget_s=120, progress=False)
    (base,) = report.diagnosis.problems
    assert "divided again by 64, the batch size" in base.cause  # read before the trial's backward pass
    assert report.best is not None and report.best.verdict == "fixes it" and report.best.score > 0.85


# -- a gradient-reversal layer at a constant λ = 100 (Ganin et al. 2016, §5.2.2; janfreyberg/pytorch-revgrad#6) -----

class _Reverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, lam: float) -> torch.Tensor:
        ctx.lam = lam
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return -ctx.lam * g, None


class _DANN(nn.Module):
    """Features, a label head on them, and a domain head behind a gradient-reversal layer of strength ``lam(step)``."""

    def __init__(self, lam) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU())
        self.label = nn.Linear(64, 10)
        self.domain = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
        self.lam, self.step = lam, 0

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x)
        if self.training:
            self.step += 1
        return self.label(f), self.domain(_Reverse.apply(f, self.lam(self.step))).squeeze(1)


def _dann_setup(seed: int, constant: bool = True, steps: int = 300) -> gw.Trial:
    """Source domain: digits (pixels in [0, 1]) with labels; target domain: the same digits with N(0, 0.25²) noise,
    clipped to [0, 1], unlabelled; both standardised by the source's pixel statistics (std + 0.1). The loss:
    cross-entropy on the source half of each batch, the domain's binary cross-entropy on both halves."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    raw = torch.tensor(d.data, dtype=torch.float32) / 16
    labels = torch.tensor(d.target)
    train, test = train_test_split(range(len(raw)), test_size=0.25, random_state=0, stratify=d.target)
    train, test = torch.tensor(train), torch.tensor(test)
    noisy = (raw + 0.25 * torch.randn(raw.shape, generator=torch.Generator().manual_seed(7))).clamp(0, 1)
    mean, std = raw[train].mean(0), raw[train].std(0) + 0.1
    source, target = (raw - mean) / std, (noisy - mean) / std
    torch.manual_seed(seed)
    ganin = lambda k: 2 / (1 + math.exp(-10 * k / steps)) - 1  # noqa: E731  the paper's ramp from 0 to 1
    model = _DANN((lambda k: 100.0) if constant else ganin)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(1000 + seed)

    def batches():
        while True:
            i, j = train[torch.randint(0, len(train), (2, 32), generator=g)]
            yield torch.cat([source[i], target[j]]), labels[i]

    def loss_fn(out, y):
        logits, domain = out
        n = len(y)
        return F.cross_entropy(logits[:n], y) + F.binary_cross_entropy_with_logits(
            domain, torch.cat([torch.zeros(n), torch.ones(n)]))

    def accuracy(m: nn.Module) -> float:
        m.eval()
        with torch.no_grad():
            out = float((m(source[test])[0].argmax(1) == labels[test]).float().mean())
        m.train()
        return out

    return gw.Trial(model, opt, batches(), loss_fn, evaluate=accuracy)


@pytest.mark.parametrize("seed", SEED_0_FAST)
def test_a_reversal_that_amplifies_is_told_by_its_gain(tmp_path, seed):
    bug, twin = _dann_setup(seed), _dann_setup(seed, constant=False)
    w_bug = readme_watched(bug, tmp_path, "bug", 300)
    w_twin = readme_watched(twin, tmp_path, "twin", 300)
    assert twin.evaluate(twin.model) > 0.9 and twin.evaluate(twin.model) > bug.evaluate(bug.model) + 0.2
    blown = [f for f in _problems(w_bug) if f.kind in ("exploding", "nonfinite")]
    assert blown
    for f in blown:  # the reference: the Function's backward is −λ·g, a gain of exactly 100
        assert f.remedy_keys[0] == "tame_custom_backward" and "_Reverse.backward passes on ×100 " in f.cause, str(f)
    assert not _problems(w_twin)


def test_a_capped_backward_is_the_reversal_at_strength_one():
    torch.manual_seed(0)
    strong, unit = _DANN(lambda k: 100.0), _DANN(lambda k: 1.0)
    unit.load_state_dict(strong.state_dict())
    x = torch.randn(16, 64)
    grads = []
    for model in (CappedBackward(strong), unit):
        label, domain = model(x)
        (label.logsumexp(1).mean() + domain.pow(2).mean()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-7)
    assert list(CappedBackward(strong).parameters()) == list(strong.parameters())


@pytest.mark.slow  # 13 rows of 200 steps (25–35 s)
def test_the_doctor_tames_the_reversal():
    report = gw.doctor(_dann_setup, steps=200, rounds=1, budget_s=120, progress=False)
    assert report.best is not None and report.best.parts == ("tame_custom_backward",), str(report)
    assert report.best.verdict == "fixes it" and report.best.score > 0.85


# -- the log of a cumulative product over 200 intervals (lifelines#155, pycox#51) -------------------------------------

INTERVALS = 200


def _survival_data(n: int, g: torch.Generator):
    """Discrete-time survival: hazard σ(−4.6 + x·β) in each of 200 intervals, censored at the end."""
    x = torch.randn(n, 10, generator=g)
    beta = torch.linspace(-1, 1, 10)
    hazard = torch.sigmoid(-4.6 + x @ beta)
    t = torch.distributions.Geometric(probs=hazard).sample()
    event = (t < INTERVALS).float()
    return x, torch.stack([t.clamp(max=INTERVALS - 1), event], 1)


def _survival_nll(z: torch.Tensor, target: torch.Tensor, log_space: bool) -> torch.Tensor:
    t, event = target[:, 0].long(), target[:, 1]
    if log_space:  # log S_t = Σ_{k ≤ t} log(1 − h_k) = cumsum of logsigmoid(−z)
        log_s = torch.cumsum(F.logsigmoid(-z), 1)
        log_h = F.logsigmoid(z).gather(1, t[:, None]).squeeze(1)
        before = torch.cat([torch.zeros(len(z), 1), log_s[:, :-1]], 1).gather(1, t[:, None]).squeeze(1)
        at = log_s.gather(1, t[:, None]).squeeze(1)
        return -(event * (log_h + before) + (1 - event) * at).mean()
    h = torch.sigmoid(z)
    s = torch.cumprod(1 - h, 1)  # the bug: a product of up to 200 factors near 1/2 underflows to 0
    before = torch.cat([torch.ones(len(z), 1), s[:, :-1]], 1).gather(1, t[:, None]).squeeze(1)
    lik = torch.where(event > 0, h.gather(1, t[:, None]).squeeze(1) * before, s.gather(1, t[:, None]).squeeze(1))
    return -torch.log(lik).mean()


def _survival_setup(seed: int, log_space: bool = False) -> gw.Trial:
    g = torch.Generator().manual_seed(seed)
    x, target = _survival_data(2000, g)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, INTERVALS))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    return gw.Trial(model, opt, shuffled_batches(x, target, seed),
                    lambda z, target: _survival_nll(z, target, log_space))


@pytest.mark.parametrize("seed", SEED_0_FAST)
def test_the_log_of_a_product_that_underflowed_is_named(tmp_path, seed):
    bug, twin = _survival_setup(seed), _survival_setup(seed, log_space=True)
    # the reference: at the initialisation the survival product is exactly 0 in float32 for the late intervals
    x, target = next(_survival_setup(seed).batches)
    with torch.no_grad():
        assert (torch.cumprod(1 - torch.sigmoid(bug.model(x)), 1)[:, -1] == 0).all()
    w_bug = readme_watched(bug, tmp_path, "bug", 150)
    w_twin = readme_watched(twin, tmp_path, "twin", 150)
    (f,) = [f for f in _problems(w_bug) if f.kind == "nonfinite"]
    assert f.steps[0] == 0 and f.remedy_keys == ("log_of_product", "check_data"), str(f)
    assert "torch.cumprod" in f.cause and "underflows to 0" in f.cause
    assert not _problems(w_twin)
