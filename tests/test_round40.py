"""The thirty-fifth session's third set: round 40 (written from the README alone, each ported from a public source),
each against its reference: an embedding's padding row read as data, an optimizer that climbs the loss, a residual
sum added twice in a classifier."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gradwatch as gw
from gradwatch.doctor import surgery
from gradwatch.zoo.train import readme_watched
from conftest import SEED_0_FAST


def _problems(w) -> list:
    return [f for f in w.diagnose() if f.severity != "info"]


# -- the only relation of a graph at padding_idx=0 (ibalazevic/TuckER#17) ---------------------------------------------

N_ENT = 150


def _graph() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Five communities of 30 entities, edges at 0.3 within and 0.01 across; a fifth of the edges held out, with
    four times as many non-edges."""
    g = torch.Generator().manual_seed(7)
    comm = torch.arange(N_ENT) % 5
    a = (torch.rand(N_ENT, N_ENT, generator=g) < torch.where(comm[:, None] == comm[None, :], 0.3, 0.01)).triu(1)
    a = a | a.T
    edges = a.nonzero()
    edges = edges[edges[:, 0] < edges[:, 1]]
    test = edges[torch.randperm(len(edges), generator=g)[: len(edges) // 5]]
    train = a.clone()
    train[test[:, 0], test[:, 1]] = train[test[:, 1], test[:, 0]] = False
    neg = torch.randint(0, N_ENT, (4 * len(test), 2), generator=g)
    return train.float(), test, neg[(~a[neg[:, 0], neg[:, 1]]) & (neg[:, 0] != neg[:, 1])]


class _DistMult(nn.Module):
    def __init__(self, pad: bool) -> None:
        super().__init__()
        self.E = nn.Embedding(N_ENT, 16)
        nn.init.xavier_normal_(self.E.weight)
        self.R = nn.Embedding(1, 16, padding_idx=0 if pad else None)  # one relation, id 0

    def forward(self, s: torch.Tensor) -> torch.Tensor:  # 1-N scoring, as TuckER's
        return (self.E(s) * self.R(torch.zeros_like(s))) @ self.E.weight.T


def _kg(seed: int, pad: bool = True) -> gw.Trial:
    train, pos, neg = _graph()
    torch.manual_seed(seed)
    model = _DistMult(pad)
    g = torch.Generator().manual_seed(1000 + seed)

    def batches():
        while True:
            s = torch.randint(0, N_ENT, (32,), generator=g)
            yield s, train[s]

    def auc(m: nn.Module) -> float:
        with torch.no_grad():
            w, r = m.E.weight, m.R.weight[0]
            sp, sn = ((w[pos[:, 0]] * r) * w[pos[:, 1]]).sum(1), ((w[neg[:, 0]] * r) * w[neg[:, 1]]).sum(1)
            return float((sp[:, None] > sn[None, :]).float().mean() + 0.5 * (sp[:, None] == sn[None, :]).float().mean())

    return gw.Trial(model, torch.optim.Adam(model.parameters(), lr=0.01), batches(), F.binary_cross_entropy_with_logits,
                    evaluate=auc)


@pytest.mark.parametrize("seed", SEED_0_FAST)
def test_a_padding_row_read_as_data_is_told(tmp_path, seed):
    bug, twin = _kg(seed), _kg(seed, pad=False)
    # the reference: the padding row is 0, and with it every gradient, by a loop over .grad
    s, y = next(_kg(seed).batches)
    F.binary_cross_entropy_with_logits(bug.model(s), y).backward()
    assert not bug.model.R.weight.any() and all(not p.grad.any() for p in bug.model.parameters())
    bug.model.zero_grad(set_to_none=True)
    w_bug = readme_watched(bug, tmp_path, "bug", 200)
    w_twin = readme_watched(twin, tmp_path, "twin", 200)
    assert bug.evaluate(bug.model) == 0.5 and twin.evaluate(twin.model) > 0.75
    with w_bug.open() as run:
        assert run.meta["padding_reads"] == [{"module": "R", "padding_idx": 0, "share": 1.0}]
    problems = _problems(w_bug)
    assert problems and all(f.remedy_keys[0] == "padding_idx" and "reads its padding_idx (0) in 100% of its lookups"
                            in f.cause for f in problems), [str(f) for f in problems]
    assert not _problems(w_twin)


def test_a_padding_index_that_is_padding_is_not_read_as_data(tmp_path):
    """Token ids where the padding index is a third of the lookups: measured (1/3), and not told."""
    torch.manual_seed(0)
    emb = nn.Embedding(10, 8, padding_idx=0)
    model = nn.Sequential(emb, nn.Flatten(), nn.Linear(24, 2))
    ids = torch.randint(1, 10, (64, 3))
    ids[:, 2] = 0  # the last position padded
    trial = gw.Trial(model, torch.optim.Adam(model.parameters(), lr=1e-2), iter(lambda: (ids, ids[:, 0] % 2), None),
                     F.cross_entropy)
    w = readme_watched(trial, tmp_path, "padded", 40)
    with w.open() as run:
        (read,) = run.meta["padding_reads"]
    assert read["share"] == pytest.approx(1 / 3, abs=1e-4)
    assert not any("padding" in f.cause for f in w.diagnose())


def test_the_doctor_frees_the_padding_row():
    report = gw.doctor(_kg, steps=200, progress=False)
    assert report.best is not None and report.best.parts == ("padding_idx",), str(report)
    assert report.best.verdict == "fixes it" and report.best.score > 0.75


# -- a step written params += lr·grad, ported as SGD(maximize=True) (the fast.ai forum) ------------------------------

def _breast_cancer() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_breast_cancer

    d = load_breast_cancer()
    x = torch.tensor(d.data, dtype=torch.float32)
    return (x - x[:450].mean(0)) / x[:450].std(0), torch.tensor(d.target)


def _ascent(seed: int, maximize: bool = True) -> gw.Trial:
    x, y = _breast_cancer()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(30, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))
    g = torch.Generator().manual_seed(seed)

    def batches():
        while True:
            i = torch.randint(0, 450, (64,), generator=g)
            yield x[i], y[i]

    def accuracy(m: nn.Module) -> float:
        with torch.no_grad():
            out = m(x[450:])
            return float((out.argmax(1) == y[450:]).float().mean()) if out.isfinite().all() else 0.0

    opt = torch.optim.SGD(model.parameters(), lr=0.05, maximize=maximize)
    return gw.Trial(model, opt, batches(), F.cross_entropy, evaluate=accuracy)


@pytest.mark.parametrize("seed", SEED_0_FAST)
def test_an_optimizer_that_climbs_the_loss_is_told_first(tmp_path, seed):
    bug, twin = _ascent(seed), _ascent(seed, maximize=False)
    # the reference: one step on a batch raises that batch's loss by about lr·‖g‖²
    x, y = next(_ascent(seed).batches)
    probe = _ascent(seed)
    before = F.cross_entropy(probe.model(x), y)
    before.backward()
    probe.optimizer.step()
    assert F.cross_entropy(probe.model(x), y) > before
    w_bug = readme_watched(bug, tmp_path, "bug", 200)
    w_twin = readme_watched(twin, tmp_path, "twin", 200)
    assert twin.evaluate(twin.model) > 0.9 > 0.5 > bug.evaluate(bug.model)
    problems = _problems(w_bug)
    assert problems and all(f.remedy_keys[0] == "minimize" and f.cause.startswith("the optimizer climbs the loss")
                            for f in problems), [str(f) for f in problems]
    assert not _problems(w_twin)


def test_adam_in_place_of_sgd_keeps_maximize():
    """The Adam row once dropped maximize=True, and its "fixes it" was the flag's removal, unsaid."""
    trial = _ascent(0)
    assert surgery.adam(1e-2, trial, {}) is trial
    assert type(trial.optimizer) is torch.optim.Adam and all(g["maximize"] for g in trial.optimizer.param_groups)
    assert surgery.minimize(trial, {}) is trial and not any(g["maximize"] for g in trial.optimizer.param_groups)
    assert surgery.minimize(trial, {}) is None


def test_the_doctor_steps_down_the_gradient():
    report = gw.doctor(_ascent, steps=200, progress=False)
    assert report.best is not None and report.best.parts == ("minimize",), str(report)
    assert report.best.verdict == "fixes it" and report.best.score > 0.9


# -- a residual shortcut added twice (yakhyo/darknet-pytorch#2) ------------------------------------------------------

class _Block(nn.Module):
    def __init__(self, twice: bool) -> None:
        super().__init__()
        self.fc, self.twice = nn.Linear(64, 64), twice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x + torch.relu(self.fc(x))
        return out + x if self.twice else out


def test_a_classifier_whose_loss_starts_in_the_thousands_is_not_told_of_regression_targets(tmp_path):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32)
    x, y = (x - x.mean(0)) / x.std(0).clamp_min(1e-3), torch.tensor(d.target)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), *[_Block(True) for _ in range(10)], nn.Linear(64, 10))
    g = torch.Generator().manual_seed(0)

    def batches():
        while True:
            i = torch.randint(0, 1400, (64,), generator=g)
            yield x[i], y[i]

    trial = gw.Trial(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), batches(), F.cross_entropy)
    # the reference: each block returns 2x + relu(Wx + b), its input about doubled, so ten blocks put the first
    # cross-entropy in the hundreds (a classifier starts near ln 10)
    with torch.no_grad():
        assert F.cross_entropy(model(x[:64]), y[:64]) > 100
    w = readme_watched(trial, tmp_path, "twice", 50)
    exploding = [f for f in _problems(w) if f.kind == "exploding" and "the loss starts at" in f.cause]
    assert exploding and all("classifier" in f.cause and "regression" not in f.cause
                             and "standardise_targets" not in f.remedy_keys for f in exploding), \
        [str(f) for f in exploding]
