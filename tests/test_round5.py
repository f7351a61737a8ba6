"""Set-ups of the fifth round nobody tuned gradwatch for (ported from papers and forum questions by a helper who
labelled them by plain measurement): what they broke, each checked on seeds 0–2."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradwatch as gw
from gradwatch.zoo.data import batches, digits

from conftest import SEEDS


class StochasticDepth(nn.Module):
    """Huang et al. 2016: six residual blocks, each kept with probability 0.5 while training (scaled at test)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(64, 64)
        self.blocks = nn.ModuleList([nn.Linear(64, 64) for _ in range(6)])
        self.out = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.inp(x))
        for block in self.blocks:
            if not self.training:
                h = h + 0.5 * F.relu(block(h))
            elif torch.rand(()) < 0.5:
                h = h + F.relu(block(h))
        return self.out(h)


@pytest.mark.zoo
@pytest.mark.parametrize("seed", SEEDS)
def test_blocks_left_out_at_random_are_not_stalled(store, seed):
    """A block that stochastic depth leaves out gets no gradient, so SGD leaves it exactly in place on that step: a
    window median of update ratios can be 0 while every block moves 40–54 % of its norm over the run. That was a
    'stalled' warning on a net that learns (held-out accuracy 0.96–0.97)."""
    torch.manual_seed(seed)
    model = StochasticDepth()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y, xt, yt = digits()
    start = [b.weight.detach().clone() for b in model.blocks]
    with gw.watch(model, opt, store=store, name=f"sd-{seed}") as w:
        for (xb, yb), _ in zip(batches(x, y, 64, seed), range(300)):
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            w.log(loss=loss.detach())
    model.eval()
    with torch.no_grad():
        accuracy = float((model(xt).argmax(1) == yt).float().mean())
    moved = [float((b.weight - w0).norm() / w0.norm()) for b, w0 in zip(model.blocks, start)]
    assert accuracy > 0.9 and min(moved) > 0.2  # the reference: it learns, and every block moved
    ratios = w.open().series("update_ratio")
    assert (ratios.values == 0).any()  # ... while some of its sampled steps left a block exactly in place
    assert w.diagnose().problems == [], str(w.diagnose())


@pytest.mark.zoo
@pytest.mark.parametrize("seed", SEEDS)
def test_an_optimizer_that_also_trains_a_temperature_is_watched_with_a_warning(store, seed):
    """A contrastive or distillation set-up trains a learnable temperature beside the model in one optimizer. The
    watch refused it (ValueError: "pass the optimizer that trains this model"); now it warns, watches the model's
    own parameters, training is bit-identical to the unwatched twin's, and the diagnosis runs. An optimizer of
    another model altogether is still refused (test_errors.py)."""

    def make() -> tuple[nn.Module, nn.Parameter, torch.optim.Optimizer]:
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        log_t = nn.Parameter(torch.zeros(()))
        return model, log_t, torch.optim.Adam([*model.parameters(), log_t], lr=1e-2)

    def train(model, log_t, opt, w) -> None:
        x, y, _, _ = digits()
        for (xb, yb), _ in zip(batches(x, y, 64, seed), range(60)):
            loss = F.cross_entropy(model(xb) / log_t.exp(), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if w is not None:
                w.log(loss=loss.detach())

    model, log_t, opt = make()
    with pytest.warns(UserWarning, match=r"also trains 1 parameter\(s\) outside the model"):
        w = gw.watch(model, opt, store=store, name=f"temp-{seed}")
    with w:
        train(model, log_t, opt, w)
    twin, twin_t, twin_opt = make()
    train(twin, twin_t, twin_opt, None)
    for p, q in zip([*model.parameters(), log_t], [*twin.parameters(), twin_t]):
        assert torch.equal(p, q)
    run = w.open()
    assert sorted(run.series("grad_norm").names) == ["0", "2"]  # the model's layers, not the temperature
    assert w.diagnose().problems == []
