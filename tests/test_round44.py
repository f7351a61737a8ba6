"""The thirty-eighth session: round 44's set-ups (written from the README alone, each ported from a public source),
each against its reference: a hand-written Adam that multiplies by √v̂ where it divides; a VAE whose summed
reconstruction loss is large by construction."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gradwatch as gw
from gradwatch.doctor import surgery
from conftest import SEED_0_FAST, adam_moments, digits_in_order_123, drawn_batches, watched_pair


def _problems(w) -> list:
    return [f for f in w.diagnose() if f.severity != "info"]


# -- a hand-written Adam that multiplies by √v̂ where it divides (oracle/tribuo#401) ---------------------------------

class _HandAdam(torch.optim.Optimizer):
    """Adam written out as a user does (Kingma & Ba 2015, Alg. 1); ``multiply``: the step m̂·(√v̂ + ε) of
    tribuo#401, "multiplying by the squared gradient accumulator rather than dividing by it"."""

    def __init__(self, params, lr: float, multiply: bool, betas=(0.9, 0.999), eps: float = 1e-8) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))
        self.multiply = multiply

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                m, v, t = adam_moments(self, group, p)
                m = m / (1 - b1 ** t)
                root = (v / (1 - b2 ** t)).sqrt().add_(group["eps"])
                p.add_(m * root if self.multiply else m / root, alpha=-group["lr"])


class _Factors(nn.Module):
    """Matrix factorisation with a bias per user and per item (tables of one column, at 0)."""

    def __init__(self, users: int, items: int, dim: int = 16) -> None:
        super().__init__()
        self.u, self.i = nn.Embedding(users, dim), nn.Embedding(items, dim)
        self.ub, self.ib = nn.Embedding(users, 1), nn.Embedding(items, 1)
        for table in (self.u, self.i):
            nn.init.normal_(table.weight, std=0.1)
        for table in (self.ub, self.ib):
            nn.init.zeros_(table.weight)

    def forward(self, x):
        u, i = x[:, 0], x[:, 1]
        return (self.u(u) * self.i(i)).sum(1) + self.ub(u).squeeze(1) + self.ib(i).squeeze(1)


def _ratings(users: int = 300, items: int = 200, n: int = 20000) -> tuple[torch.Tensor, torch.Tensor]:
    """Ratings of a rank-4 model with biases and noise (a fixed draw); the first 16,000 to train on."""
    g = torch.Generator().manual_seed(44)
    u, v = torch.randn(users, 4, generator=g), torch.randn(items, 4, generator=g)
    bu, bi = 0.5 * torch.randn(users, generator=g), 0.5 * torch.randn(items, generator=g)
    uu, ii = torch.randint(0, users, (n,), generator=g), torch.randint(0, items, (n,), generator=g)
    r = (u[uu] * v[ii]).sum(1) / 2 + bu[uu] + bi[ii] + 0.3 * torch.randn(n, generator=g)
    return torch.stack([uu, ii], 1), r


def _r2(x, y, start):
    def score(m):
        with torch.no_grad():
            return float(1 - F.mse_loss(m(x[start:]), y[start:]) / y[start:].var(unbiased=False))
    return score


def _factors(seed: int, multiply: bool = True) -> gw.Trial:
    x, y = _ratings()
    torch.manual_seed(seed)
    model = _Factors(300, 200)
    return gw.Trial(model, _HandAdam(model.parameters(), lr=1e-2, multiply=multiply),
                    drawn_batches(x, y, 16000, 256, 1000 + seed), F.mse_loss, evaluate=_r2(x, y, 16000))


@pytest.mark.parametrize("seed", SEED_0_FAST)
def test_a_hand_written_adam_whose_steps_are_far_below_its_rate_is_told_first(tmp_path, seed):
    bug, twin = _factors(seed), _factors(seed, multiply=False)
    w_bug, w_twin = watched_pair(bug, twin, tmp_path, steps=600)
    # the reference: the bug's embeddings moved, over the run, less than 1e-3 of what one step of lr·‖g‖ moves them
    # (a loop over .grad at the end), and it does not learn where torch's rule, the twin, does
    xb, yb = next(_factors(seed).batches)
    F.mse_loss(bug.model(xb), yb).backward()
    before = _factors(seed).model.u.weight
    moved = float((bug.model.u.weight - before).detach().norm())
    assert moved < 1e-3 * 1e-2 * float(bug.model.u.weight.grad.norm()) * 600
    assert bug.evaluate(bug.model) < 0.05 and twin.evaluate(twin.model) > 0.85
    problems = _problems(w_bug)
    assert problems and problems[0].remedy_keys[0] == "torch_optimizer", str(w_bug.diagnose())
    assert "_HandAdam" in problems[0].cause and "symmetry" not in problems[0].cause
    assert not _problems(w_twin), str(w_twin.diagnose())


def test_the_doctor_puts_torch_s_adam_in_place_of_the_hand_written_one():
    report = gw.doctor(_factors, steps=600, progress=False)
    assert report.best is not None and report.best.parts == ("torch_optimizer",), str(report)
    assert report.best.verdict == "fixes it" and report.best.score > 0.85  # the twin's 0.90


def test_the_row_takes_the_torch_class_the_name_names_with_the_groups_settings():
    model = nn.Linear(3, 2)

    class MyAdamW(_HandAdam):
        pass

    class Lion(_HandAdam):
        pass

    for cls, expected, lr in ((_HandAdam, torch.optim.Adam, 0.05), (MyAdamW, torch.optim.AdamW, 0.05),
                              (Lion, torch.optim.Adam, 1e-3)):
        old = cls([{"params": [model.weight], "lr": 0.05}, {"params": [model.bias], "lr": 0.05, "eps": 1e-4}],
                  lr=0.05, multiply=False, betas=(0.8, 0.99))
        trial = surgery.torch_optimizer(gw.Trial(model, old, iter(()), F.mse_loss), {})
        new = trial.optimizer
        assert type(new) is expected and [g["params"] for g in new.param_groups] == [[model.weight], [model.bias]]
        assert [g["lr"] for g in new.param_groups] == [lr, lr]
        if expected is torch.optim.AdamW:  # the settings kept where the name names the class
            assert new.param_groups[0]["betas"] == (0.8, 0.99) and new.param_groups[1]["eps"] == 1e-4
    assert surgery.torch_optimizer(gw.Trial(model, torch.optim.Adam(model.parameters()), iter(()), F.mse_loss),
                                   {}) is None


# -- a VAE's reconstruction summed over pixels, as pytorch/examples' VAE (pytorch/examples#296) -------------------

class _Vae(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU())
        self.mu, self.logvar = nn.Linear(128, 8), nn.Linear(128, 8)
        self.dec = nn.Sequential(nn.Linear(8, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 64))

    def forward(self, x):
        h = self.enc(x)
        mu, logvar = self.mu(h), self.logvar(h)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return torch.sigmoid(self.dec(z)), mu, logvar


def _elbo(out, x):
    recon, mu, logvar = out
    return (F.binary_cross_entropy(recon, x, reduction="sum")
            - 0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()))


def _explained(x, start):
    """The held-out share of the pixels' variance that the reconstruction from μ explains."""
    def score(m):
        with torch.no_grad():
            recon = torch.sigmoid(m.dec(m.mu(m.enc(x[start:]))))
        return float(1 - ((x[start:] - recon) ** 2).sum() / ((x[start:] - x[:start].mean(0)) ** 2).sum())
    return score


def _vae(seed: int) -> gw.Trial:
    x, _ = digits_in_order_123()
    torch.manual_seed(seed)
    model = _Vae()
    return gw.Trial(model, torch.optim.Adam(model.parameters(), lr=1e-3), drawn_batches(x, x, 1400, 64, 1000 + seed),
                    _elbo, evaluate=_explained(x, 1400))


@pytest.mark.parametrize("seed", SEED_0_FAST)
def test_a_loss_summed_over_pixels_in_0_1_is_not_told_as_raw_regression_targets(tmp_path, seed):
    from gradwatch.zoo.train import readme_watched

    trial = _vae(seed)
    w = readme_watched(trial, tmp_path, "vae", 800)
    # the reference: a summed ELBO starts at about 64 pixels × 64 samples × ln 2 and has a floor far above half of
    # it (the pixels' own entropy), while the run learns: its reconstructions explain half the pixels' variance
    fresh = _vae(seed)
    x = next(fresh.batches)[0]
    with torch.no_grad():
        first = float(_elbo(fresh.model(x), x))
    assert first > 100 and trial.evaluate(trial.model) > 0.4
    assert not _problems(w), str(w.diagnose())
