"""Set-ups of the sixth round nobody tuned gradwatch for (ported from papers and forum questions by a helper who
labelled them by plain measurement): what they broke, each checked on seeds 0–2."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradwatch as gw
from gradwatch.zoo.data import batches, digits

from conftest import SEEDS


class NumpyCut(nn.Module):
    """A forward that applies "numpy's tanh" (Stack Overflow: "gradients are None for the first layers"): the round
    trip through ``.numpy()`` cuts the graph; ``numpy=False`` is the fix, ``torch.tanh``."""

    def __init__(self, numpy: bool) -> None:
        super().__init__()
        self.feat = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128))
        self.head = nn.Linear(128, 10)
        self.numpy = numpy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.feat(x))
        h = torch.from_numpy(np.tanh(h.detach().numpy())) if self.numpy else torch.tanh(h)
        return self.head(h)


@pytest.mark.zoo
@pytest.mark.parametrize("seed", SEEDS)
def test_layers_cut_off_from_the_graph_are_named_as_such(store, seed):
    """They were "stalled: too little gradient, or too small a learning rate", with Adam and normalisation offered.
    The reference: the layers' ``.grad`` by hand, None after the last backward; and the fixed forward quiet."""
    x, y, _, _ = digits()
    for cut in (True, False):
        torch.manual_seed(seed)
        model = NumpyCut(cut)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        with gw.watch(model, opt, store=store, name=f"cut-{cut}-{seed}") as w:
            for (xb, yb), _ in zip(batches(x, y, 64, seed), range(300)):
                loss = F.cross_entropy(model(xb), yb)
                opt.zero_grad()
                loss.backward()
                opt.step()
                w.log(loss=loss.detach())
        problems = w.diagnose().problems
        if cut:
            assert all(p.grad is None for p in model.feat.parameters())
            (f,) = problems
            assert f.layers == ("feat.0", "feat.2") and f.remedy_keys == ("check_graph",), str(w.diagnose())
            assert "graph is cut" in f.cause
        else:
            assert problems == [], str(w.diagnose())


def _summed_mse_trial(seed: int, reduction: str = "sum") -> gw.Trial:
    """A ReLU MLP regression on standardised diabetes features and targets, batches of 256, SGD 0.01, with
    ``F.mse_loss(..., reduction=reduction)``."""
    from sklearn.datasets import load_diabetes

    data = load_diabetes()
    x = torch.tensor((data.data - data.data.mean(0)) / data.data.std(0), dtype=torch.float32)
    y = torch.tensor((data.target - data.target.mean()) / data.target.std(), dtype=torch.float32)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
    g = torch.Generator().manual_seed(seed)

    def sampled():
        while True:
            idx = torch.randint(0, 350, (256,), generator=g)
            yield x[idx], y[idx]

    def r2(m: nn.Module) -> float:
        with torch.no_grad():
            p = m(x[350:]).squeeze(-1)
        return 1 - float(((p - y[350:]) ** 2).mean() / y[350:].var())

    return gw.Trial(model, torch.optim.SGD(model.parameters(), lr=0.01), sampled(),
                    lambda out, t: F.mse_loss(out.squeeze(-1), t, reduction=reduction), evaluate=r2)


@pytest.mark.zoo
@pytest.mark.parametrize("seed", SEEDS)
def test_a_loss_summed_over_the_batch_is_named(store, seed):
    """MSE with reduction='sum' over 256 standardised targets starts near 256 and is NaN within a few steps; the
    finding blamed raw targets ("standardise regression targets", which they are). The reference: the first loss
    per sample by hand, about 1; and the same net with reduction='mean' learns, quiet."""
    trial = _summed_mse_trial(seed)
    with gw.watch(trial.model, trial.optimizer, store=store, name=f"sum-{seed}") as w:
        losses = []
        for _ in range(60):
            losses.append(float(trial.step()))
            w.log(loss=losses[-1])
    assert 0.3 < losses[0] / 256 < 3 and not np.isfinite(losses[-1])
    exploding = [f for f in w.diagnose().problems if f.kind == "exploding"]
    assert exploding and "reduction='sum'" in exploding[0].cause, str(w.diagnose())
    assert exploding[0].remedy_keys[0] == "mean_reduction"
    mean = _summed_mse_trial(seed, "mean")
    with gw.watch(mean.model, mean.optimizer, store=store, name=f"mean-{seed}") as w:
        for _ in range(300):
            w.log(loss=mean.step())
    assert mean.evaluate(mean.model) > 0.3 and w.diagnose().problems == [], str(w.diagnose())


@pytest.mark.zoo
def test_the_doctor_averages_a_summed_loss(store):
    report = gw.doctor(_summed_mse_trial, steps=300, seeds=2, store=store, progress=False)
    (row,) = [t for t in report.trials if t.parts == ("mean_reduction",)]
    assert row.verdict == "fixes it" and row.score > 0.3, report


class WhereSqrt(nn.Module):
    """``torch.where(h > 0, torch.sqrt(h), 0)`` (pytorch#52248): the branch not taken is NaN where h < 0, and its
    gradient is not masked — NaN gradients from the first step, with a finite loss."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(64, 64), nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.l1(x)
        h = torch.where(h > 0, torch.sqrt(h), torch.zeros_like(h))  # the line the doctor must name
        return self.l2(h)


class PairDistance(nn.Module):
    """A Siamese distance by hand, √Σ(a − b)², on pairs that include a sample with itself: the distance is exactly 0
    there, its forward finite and its gradient not."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.head = nn.Linear(64, 16), nn.Linear(1, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.emb(x)
        d = torch.sqrt(((z - z.roll(0, 0)) ** 2).sum(1))  # roll by 0: each sample with itself
        return self.head(d.unsqueeze(1))


class MaskedAttention(nn.Module):
    """Causal attention by hand with a −inf mask: an infinity meant, no NaN anywhere."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k = nn.Linear(8, 8), nn.Linear(8, 8)
        self.out = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.view(-1, 8, 8)
        s = self.q(h) @ self.k(h).transpose(1, 2) / 8 ** 0.5
        s = s.masked_fill(torch.ones(8, 8, dtype=torch.bool).triu(1), float("-inf"))
        return self.out((torch.softmax(s, -1) @ h).flatten(1))


def _digits_trial(model_cls: type[nn.Module]):
    def make(seed: int) -> gw.Trial:
        torch.manual_seed(seed)
        model = model_cls()
        x, y, xt, yt = digits()
        return gw.Trial(model, torch.optim.SGD(model.parameters(), lr=0.05), batches(x, y, 64, seed), F.cross_entropy)
    return make


def _line_of(cls: type, text: str) -> str:
    import inspect

    lines, start = inspect.getsourcelines(cls)
    return f"test_round6.py:{start + next(i for i, line in enumerate(lines) if text in line)}"


def test_the_first_nan_is_located_at_the_users_line():
    """The reference: the lines above, found in this file's source."""
    from gradwatch.doctor.locate import locate_nonfinite

    where = locate_nonfinite(_digits_trial(WhereSqrt), 0, 5)
    assert where is not None and (where.phase, where.op, where.step) == ("forward", "torch.sqrt", 0), where
    assert where.where == _line_of(WhereSqrt, "h = torch.where(h > 0") and where.code.startswith("h = torch.where"), where
    pair = locate_nonfinite(_digits_trial(PairDistance), 0, 5)
    assert pair is not None and pair.phase == "backward" and pair.step == 0, pair
    assert pair.where == _line_of(PairDistance, "d = torch.sqrt"), pair
    assert locate_nonfinite(_digits_trial(MaskedAttention), 0, 5) is None  # −inf meant, and nothing went NaN


@pytest.mark.zoo
def test_the_doctor_names_the_line_that_makes_the_nan_when_no_remedy_can_reach_it(store):
    """Round 6: three set-ups NaN from the user's own arithmetic got "no remedy helped" and nothing else."""
    report = gw.doctor(_digits_trial(WhereSqrt), steps=60, seeds=2, store=store, progress=False)
    assert report.best is None
    assert report.nonfinite_origin is not None and report.nonfinite_origin.op == "torch.sqrt"
    assert f"torch.sqrt at {_line_of(WhereSqrt, 'h = torch.where(h > 0')}" in report.message, report.message
