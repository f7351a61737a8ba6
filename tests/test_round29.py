"""The thirtieth session's set-ups: round 29 (written from the README alone, each ported from a public source), each
against its reference."""

from __future__ import annotations

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F

import gradwatch as gw
from gradwatch.zoo.train import readme_watched


def _digits():
    """Digits, 1257 to train on, standardised with the training part's statistics (constant pixels left at 0)."""
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    tr, te = order[:1257], order[1257:]
    x = (x - x[tr].mean(0)) / x[tr].std(0).clamp_min(1e-3)
    y = torch.tensor(d.target)
    return x[tr], y[tr], x[te], y[te]


def _digit_batches(x, y, seed, size):
    g = torch.Generator().manual_seed(1000 + seed)
    while True:
        i = torch.randint(0, len(x), (size,), generator=g)
        yield x[i], y[i]


# -- round 29: BatchNorm trained on batches of 2 (Wu & He 2018, §1 and Fig. 1), its twin GroupNorm --------------

def _normed(seed, group_norm):
    xtr, ytr, _, _ = _digits()
    torch.manual_seed(seed)
    norm = (lambda c: nn.GroupNorm(8, c)) if group_norm else nn.BatchNorm1d
    model = nn.Sequential(nn.Linear(64, 128), norm(128), nn.ReLU(), nn.Linear(128, 128), norm(128), nn.ReLU(),
                          nn.Linear(128, 10))
    return gw.Trial(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                    _digit_batches(xtr, ytr, seed, 2), F.cross_entropy)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_units_silent_on_a_batch_of_two_are_not_told_dead_where_the_loss_fell(store, seed):
    """Round 29: GroupNorm over batches of 2 learned (0.81–0.86 held out) and seed 2 was warned "78 % dead … they
    cost the gradient"; by hand over the whole training set 52–66 % of those units were 0 on every sample. A unit
    active on a share p of the samples is silent on a batch of 2 with probability (1 − p)²: the share overstates
    the dead. BatchNorm on the same batches is still found, and named."""
    twin = _normed(seed, group_norm=True)
    xtr = _digits()[0]
    w = readme_watched(twin, store, f"gn2_{seed}", 300)
    with torch.no_grad():  # by hand: units 0 on every training sample, against units 0 on some batch of 2
        h = twin.model[:6](xtr)
    dead = float((h.amax(0) <= 0).float().mean())
    found = [f for f in w.diagnose().findings if f.kind == "dead_units"]
    assert found and all(f.severity == "info" for f in found), found
    assert found[0].numbers["dead_frac"] > dead + 0.05 and "overstates" in found[0].evidence
    bug = _normed(seed, group_norm=False)
    wb = readme_watched(bug, store, f"bn2_{seed}", 300)
    problems = wb.diagnose().problems
    assert problems and "BatchNorm on batches of 2" in problems[0].cause and "group_norm" in problems[0].remedy_keys
