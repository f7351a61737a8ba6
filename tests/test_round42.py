"""The thirty-sixth session's second set: round 42 (written from the README alone, each ported from a public source)
and round 41's prior bias, each against its reference: every bias at one negative constant, and a contrastive head
that starts at exactly 0 before F.normalize."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gradwatch as gw
from gradwatch.doctor import surgery
from gradwatch.zoo.train import readme_watched
from conftest import ALL_SLOW, SEED_0_FAST, digits_cnn, digits_in_order_123


def _problems(w) -> list:
    return [f for f in w.diagnose() if f.severity != "info"]


def _split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(1234))
    return order[: int(0.8 * n)], order[int(0.8 * n):]


# -- every bias of DLRM's MLP at a large negative value (facebookresearch/dlrm#358, pytorch/benchmark#1927) ----------

class _Mlp(nn.Module):
    def __init__(self, bias: float) -> None:
        super().__init__()
        self.l1, self.l2, self.out = nn.Linear(10, 64), nn.Linear(64, 64), nn.Linear(64, 1)
        for lin in (self.l1, self.l2, self.out):  # DLRM's create_mlp: W ~ N(0, √(2/(m+n)))
            m, n = lin.weight.shape
            nn.init.normal_(lin.weight, 0.0, (2.0 / (m + n)) ** 0.5)
            nn.init.constant_(lin.bias, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.out(torch.relu(self.l2(torch.relu(self.l1(x)))))).squeeze(1)  # a ReLU on top too


def _dlrm(seed: int, bias: float = -2.0) -> gw.Trial:
    from sklearn.datasets import load_diabetes

    d = load_diabetes()
    x, y = torch.tensor(d.data, dtype=torch.float32), torch.tensor(d.target, dtype=torch.float32)
    x, y = (x - x.mean(0)) / x.std(0), (y - y.min()) / (y.max() - y.min())
    train, test = _split(len(x))
    torch.manual_seed(seed)
    model = _Mlp(bias)
    g = torch.Generator().manual_seed(seed)

    def batches():
        while True:
            i = train[torch.randint(0, len(train), (32,), generator=g)]
            yield x[i], y[i]

    def r2(m: nn.Module) -> float:
        with torch.no_grad():
            p, t = m(x[test]), y[test]
            return float(1 - ((p - t) ** 2).sum() / ((t - t.mean()) ** 2).sum())

    return gw.Trial(model, torch.optim.Adam(model.parameters(), lr=1e-3), batches(), F.mse_loss, evaluate=r2)


@pytest.mark.parametrize("seed", SEED_0_FAST)
def test_biases_at_one_negative_constant_are_told_first(tmp_path, seed):
    bug, twin = _dlrm(seed), _dlrm(seed, bias=0.0)
    # the reference: on the first batch every unit of the second layer is off and every gradient exactly 0, by a loop
    # over .grad
    x, y = next(_dlrm(seed).batches)
    probe = _dlrm(seed).model
    F.mse_loss(probe(x), y).backward()
    assert (probe.l2(torch.relu(probe.l1(x))) < 0).all() and all(not p.grad.any() for p in probe.parameters())
    w_bug = readme_watched(bug, tmp_path, "bug", 300)
    w_twin = readme_watched(twin, tmp_path, "twin", 300)
    assert bug.evaluate(bug.model) < -1 and twin.evaluate(twin.model) > 0.3
    with w_bug.open() as run:
        assert run.meta["constant_biases"] == {"l1": -2.0, "l2": -2.0}  # (the one-output layer's bias: one entry)
    problems = _problems(w_bug)
    assert problems and all(f.remedy_keys[0] == "zero_bias" and "starts at -2 in every entry" in f.cause
                            for f in problems), [str(f) for f in problems]
    stalled = [f for f in problems if f.kind == "stalled"]
    assert stalled and all("softmax over a single unit" not in f.cause for f in stalled)
    assert not _problems(w_twin)


def test_the_constant_biases_and_the_output_s_at_the_same_value_are_set_to_0():
    model = _dlrm(0).model
    assert surgery.zero_constant_biases(model) is model
    assert all(not m.bias.any() for m in (model.l1, model.l2, model.out))
    assert surgery.zero_constant_biases(model) is None
    fresh = nn.Linear(4, 1)  # a default layer: its one-entry bias is no constant that another bias shares
    assert surgery.zero_constant_biases(fresh) is None and fresh.bias.any()


@pytest.mark.slow
def test_the_doctor_sets_the_biases_to_0():
    report = gw.doctor(_dlrm, steps=200, progress=False)
    assert report.best is not None and report.best.parts == ("zero_bias",), str(report)
    assert report.best.verdict == "fixes it" and report.best.score > 0.3


# -- RetinaNet's prior bias −log((1 − π)/π) on every conv, not its output alone (kuangliu/pytorch-retinanet#10) -------

def _prior(seed: int, everywhere: bool = True) -> gw.Trial:
    def prepare(model: nn.Module) -> None:
        for m in model:
            if isinstance(m, (nn.Conv2d, nn.Linear)) and (everywhere or m is model[-1]):
                nn.init.constant_(m.bias, -math.log((1 - 0.01) / 0.01))

    return digits_cnn(seed, prepare)


@pytest.mark.parametrize("seed", SEED_0_FAST)
def test_a_prior_bias_given_to_every_layer_is_told_first_and_on_the_output_alone_it_is_not(tmp_path, seed):
    bug, twin = _prior(seed), _prior(seed, everywhere=False)
    w_bug = readme_watched(bug, tmp_path, "bug", 200)
    w_twin = readme_watched(twin, tmp_path, "twin", 200)
    assert bug.evaluate(bug.model) < 0.2 and twin.evaluate(twin.model) > 0.9
    problems = _problems(w_bug)
    assert problems and all(f.remedy_keys[0] == "zero_bias" and "hidden layers (0, 2, 6) starts at -4.6" in f.cause
                            for f in problems), [str(f) for f in problems]
    assert not _problems(w_twin)
    with w_twin.open() as run:
        assert list(run.meta["constant_biases"]) == ["8"]  # the output's prior: there, and not told


# -- a contrastive head that starts at exactly 0 before F.normalize (pytorch/pytorch#184575) --------------------------

def _supcon(z: torch.Tensor, y: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """Khosla et al. 2020's supervised contrastive loss on normalised embeddings, in log space."""
    eye = torch.eye(len(y), dtype=torch.bool)
    sim = (z @ z.t() / tau).masked_fill(eye, -1e9)
    logp = sim - torch.logsumexp(sim, 1, keepdim=True)
    pos = (y[:, None] == y[None, :]) & ~eye
    return -(logp * pos).sum(1).div(pos.sum(1).clamp(min=1)).mean()


class _Embed(nn.Module):
    def __init__(self, zero_head: bool) -> None:
        super().__init__()
        self.backbone, self.head = nn.Sequential(nn.Linear(64, 128), nn.ReLU()), nn.Linear(128, 32)
        if zero_head:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.backbone(x)), dim=1)


def _embedding(seed: int, zero_head: bool = True) -> gw.Trial:
    x, y = digits_in_order_123()
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    torch.manual_seed(seed)
    model = _Embed(zero_head)
    g = torch.Generator().manual_seed(seed)

    def batches():
        while True:
            i = torch.randint(0, 1400, (64,), generator=g)
            yield x[i], y[i]

    def nearest(m: nn.Module) -> float:
        with torch.no_grad():
            a, b = m(x[:1400]), m(x[1400:])
            return float((y[:1400][(b @ a.t()).argmax(1)] == y[1400:]).float().mean())

    return gw.Trial(model, torch.optim.Adam(model.parameters(), lr=1e-3), batches(), _supcon, evaluate=nearest)


@pytest.mark.parametrize("seed", SEED_0_FAST)
def test_a_last_layer_at_zero_whose_loss_has_no_gradient_there_is_told(tmp_path, seed):
    bug, twin = _embedding(seed), _embedding(seed, zero_head=False)
    # the reference: at a zero output the loss's gradient is exactly 0 (Σ_j c_ij z_j / τ with every z_j = 0)
    x, y = next(_embedding(seed).batches)
    z = _embedding(seed).model(x).detach().requires_grad_(True)
    _supcon(z, y).backward()
    assert not z.any() and not z.grad.any()
    w_bug = readme_watched(bug, tmp_path, "bug", 300)
    w_twin = readme_watched(twin, tmp_path, "twin", 300)
    assert bug.evaluate(bug.model) < 0.2 and twin.evaluate(twin.model) > 0.9
    problems = _problems(w_bug)
    assert problems and all(f.remedy_keys[0] == "redraw_zero" and "last layer's weights start at exactly 0 (head)"
                            in f.cause for f in problems), [str(f) for f in problems]
    assert not _problems(w_twin)


def test_the_doctor_draws_the_zero_layer_again():
    report = gw.doctor(_embedding, steps=200, progress=False)
    assert report.best is not None and report.best.parts == ("redraw_zero",), str(report)
    assert report.best.verdict == "fixes it" and report.best.score > 0.9
    model = _embedding(0).model
    assert surgery.redraw_zero_layers(model) is model and model.head.weight.any()
    assert surgery.redraw_zero_layers(model) is None


# -- a rate set far from what the optimizer is built for (tensorflow#36785, pytorch/pytorch#78917, OpenNMT-py#253) ---

class _RowGru(nn.Module):
    """A GRU reading an 8×8 digit row by row, its last state to a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.gru, self.head = nn.GRU(8, 32, batch_first=True), nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.gru(x)[0][:, -1])


def _rows(seed: int, make_optimizer) -> gw.Trial:
    x, y = digits_in_order_123()
    x = x.view(-1, 8, 8)
    x = (x - x.mean()) / x.std()
    torch.manual_seed(seed)
    model = _RowGru()
    g = torch.Generator().manual_seed(1000 + seed)

    def batches():
        while True:
            i = torch.randint(0, 1400, (64,), generator=g)
            yield x[i], y[i]

    def accuracy(m: nn.Module) -> float:
        with torch.no_grad():
            return float((m(x[1400:]).argmax(1) == y[1400:]).float().mean())

    optimizer, scheduler = make_optimizer(model.parameters())
    return gw.Trial(model, optimizer, batches(), F.cross_entropy, evaluate=accuracy, scheduler=scheduler)


def _adadelta(lr: float):
    return lambda params: (torch.optim.Adadelta(params, lr=lr), None)


def _rate_in_the_lambda(twice: bool):
    def make(params):
        opt = torch.optim.Adam(params, lr=3e-3)
        decay = (lambda x: 3e-3 * (1 + 1e-3 * x) ** -0.75) if twice else (lambda x: (1 + 1e-3 * x) ** -0.75)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, decay)
    return make


def _adam(lr: float):
    return lambda params: (torch.optim.Adam(params, lr=lr), None)


@pytest.mark.parametrize("seed", ALL_SLOW)  # (a GRU watched through time: 30–80 s a run here; the rule below)
@pytest.mark.parametrize("bug, twin, key, words", [
    (_adadelta(1e-3), _adadelta(1.0), "raise_lr", "Adadelta at lr 0.001, 1/1000 of PyTorch's default for it (1)"),
    (_rate_in_the_lambda(True), _rate_in_the_lambda(False), "raise_lr", "its scheduler's base rate 0.003 squared"),
    (_adam(1.0), _adam(1e-3), "warmup", "Adam at lr 1 with no warm-up"),
], ids=["adadelta_at_keras_rate", "rate_in_the_lambda", "adam_at_adadelta_rate"])
def test_a_rate_far_from_the_optimizer_s_is_told(tmp_path, seed, bug, twin, key, words):
    bugged, healthy = _rows(seed, bug), _rows(seed, twin)
    w_bug = readme_watched(bugged, tmp_path, "bug", 300)
    w_twin = readme_watched(healthy, tmp_path, "twin", 300)
    assert bugged.evaluate(bugged.model) < 0.6 and healthy.evaluate(healthy.model) > 0.8
    problems = _problems(w_bug)
    assert problems and all(f.remedy_keys[0] == key and words in f.cause for f in problems), \
        [str(f) for f in problems]
    assert not _problems(w_twin)
    # the reference: the rate the optimizer stepped at, and the rate PyTorch builds it with
    import inspect

    rate = bugged.optimizer.param_groups[0]["lr"]
    default = inspect.signature(type(bugged.optimizer)).parameters["lr"].default
    assert rate <= 0.01 * default or rate >= 100 * default


def test_a_rate_set_low_is_read_against_pytorch_s_default_and_the_scheduler_s_base():
    import inspect

    from gradwatch.diagnosis.over_steps import _default_lr, _rate_set_low

    for name in ("Adadelta", "Adam", "SGD", "RMSprop"):  # the reference: the optimizer's own signature
        assert _default_lr(name) == inspect.signature(getattr(torch.optim, name)).parameters["lr"].default
    assert _default_lr("NoSuchOptimizer") is None
    assert "1/1000 of PyTorch's default" in _rate_set_low({"optimizer": "Adadelta", "optimizer_lr": 1e-3})
    assert _rate_set_low({"optimizer": "Adadelta", "optimizer_lr": 0.5}) == ""
    assert "base rate 0.003 squared" in _rate_set_low({"optimizer": "Adam", "optimizer_lr": 9e-6,
                                                        "optimizer_initial_lr": 3e-3})
    assert _rate_set_low({"optimizer": "Adam", "optimizer_lr": 3e-3, "optimizer_initial_lr": 3e-3}) == ""
