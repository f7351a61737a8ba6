"""Round 11: set-ups a helper wrote from the README alone, where gradwatch was wrong, ported with a reference each.

A weight-tied loop iterated to a fixed point (Bai, Kolter & Koltun 2019, §3) under a spectral norm (Miyato et al.
2018): one Linear ``f`` applied 40 times, h ← tanh(f(h) + u) from h = 0. The gradient reaching the first
iterations is tiny by design — the iteration forgets where it started — and the net learns; the watch called it
critical vanishing through time and the doctor offered a GRU.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gradwatch as gw
from gradwatch import zoo

ITERS, WIDTH = 40, 64


class _FixedPoint(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(64, WIDTH)
        f = nn.Linear(WIDTH, WIDTH)
        nn.init.normal_(f.weight, 0.0, 2.0 / WIDTH**0.5)
        self.f = nn.utils.parametrizations.spectral_norm(f)
        self.out = nn.Linear(WIDTH, 10)

    def forward(self, x: torch.Tensor, states: list[torch.Tensor] | None = None) -> torch.Tensor:
        u = self.inp(x)
        h = torch.zeros_like(u)
        for _ in range(ITERS):
            h = torch.tanh(self.f(h) + u)
            if states is not None:
                states.append(h)
        return self.out(h)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_loop_iterated_to_a_fixed_point_that_learns_is_not_a_vanishing_problem(store, seed):
    x, y, _, _ = zoo.digits()
    torch.manual_seed(seed)
    model = _FixedPoint()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    losses = []
    with gw.watch(model, opt, store=store, name=f"fixed-point-{seed}") as w:
        for _ in range(200):
            idx = torch.randint(0, len(x), (64,), generator=g)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            w.log(loss=loss)
            losses.append(float(loss))
    # the reference, by hand: the loss fell by more than ten times, and the first iteration's gradient is tiny
    assert sum(losses[-40:]) / 40 < 0.1 * sum(losses[:10]) / 10
    states: list[torch.Tensor] = []
    loss = F.cross_entropy(model(x[:256], states), y[:256])
    first, last = torch.autograd.grad(loss, [states[0], states[-1]])
    assert float(first.norm() / last.norm()) < 1e-6
    found = w.diagnose()
    through_time = [f for f in found.findings if f.kind == "vanishing" and f.layers == ("f",)]
    assert through_time and all(f.severity == "info" for f in through_time), str(found)
    assert "learns without the early steps" in through_time[0].cause
    assert not found.problems, str(found)
