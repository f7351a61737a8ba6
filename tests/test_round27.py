"""The twenty-ninth session's set-ups: rounds 27 and 28 (written from the README alone, each ported from a public
source), each against its reference."""

from __future__ import annotations

import math

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

import gradwatch as gw
from gradwatch.doctor import table
from gradwatch.doctor.verdicts import verdict
from gradwatch.zoo.train import readme_watched
from conftest import SEED_0_FAST

_train = readme_watched


# -- round 28: PPO's ratio with the old log-probabilities not detached (huggingface/trl#2769) ---------------------

def _bandit_digits():
    d = load_digits()
    x, y = torch.tensor(d.data / 16.0, dtype=torch.float32), torch.tensor(d.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x[order[:1400]], y[order[:1400]], x[order[1400:]], y[order[1400:]]


def _ppo_loss(detach_old: bool):
    """PPO-clip on a contextual bandit (an action is a class, reward 1 where it is the label), no baseline."""
    def loss(logits, labels):
        dist = torch.distributions.Categorical(logits=logits)
        action = dist.sample()
        reward = (action == labels).float()
        logp = dist.log_prob(action)
        old = logp.detach() if detach_old else logp  # the source's fix is the .detach()
        ratio = torch.exp(logp - old)
        return -torch.min(ratio * reward, torch.clamp(ratio, 0.8, 1.2) * reward).mean()
    return loss


def _ppo(seed, detach_old=False):
    xtr, ytr, xte, yte = _bandit_digits()

    def batches():
        g = torch.Generator().manual_seed(seed)
        while True:
            i = torch.randint(0, len(xtr), (64,), generator=g)
            yield xtr[i], ytr[i]

    @torch.no_grad()
    def accuracy(m):
        return float((m(xte).argmax(1) == yte).float().mean())

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    return gw.Trial(model, torch.optim.Adam(model.parameters(), lr=3e-3), batches(), _ppo_loss(detach_old),
                    evaluate=accuracy)


def test_a_tensor_taken_from_itself_is_read_off_the_loss_graph_and_a_detached_one_is_not():
    from gradwatch.probes.loss_ops import self_cancelling

    z = nn.Linear(3, 4)(torch.randn(5, 3))
    assert self_cancelling((z - z).exp().mean()) == ["SubBackward0"]
    assert self_cancelling((z / z).sum()) == ["DivBackward0"]
    assert self_cancelling((z - z.detach()).exp().mean()) == []
    assert self_cancelling((z - z.mean()).pow(2).mean()) == []  # another node: a centred output
    assert self_cancelling(torch.tensor(1.0)) == []


@pytest.mark.parametrize("seed", SEED_0_FAST)
def test_ppos_ratio_with_its_old_log_probabilities_not_detached_is_told_so(store, seed):
    """Round 28: every gradient is exactly 0 (by hand: each parameter's .grad after one backward), accuracy at chance
    against 0.77–0.86 detached; told "a softmax over a single unit" before. Now the cause names the tensor taken from
    itself, ``detach_reference`` first; the detached twin (0.68–0.86 here) has no problem."""
    trial, twin = _ppo(seed), _ppo(seed, detach_old=True)
    x, y = next(_ppo(seed).batches)
    probe = _ppo(seed)
    probe.loss_fn(probe.model(x), y).backward()
    assert all(float(p.grad.abs().max()) == 0 for p in probe.model.parameters())
    w = _train(trial, store, f"ppo-{seed}", 300)
    tw = _train(twin, store, f"ppo-twin-{seed}", 300)
    assert trial.evaluate(trial.model) < 0.2 and twin.evaluate(twin.model) > 0.5  # chance: 0.1
    (f,) = w.diagnose().problems
    assert f.kind == "stalled" and f.remedy_keys == ("detach_reference",) and "SubBackward0" in f.cause, str(f)
    assert w.open().meta["self_cancelling"] == ["SubBackward0"]
    assert not tw.diagnose().problems


# -- round 28: a score far below its scale (a TD value net's R² of −103) ------------------------------------------

def _row(label, score, first, final, findings=()):
    return table.TrialResult(label, final, final, score, list(findings), 0.0, first_loss=first, learned=final <= first / 2)


def test_a_better_score_is_measured_against_the_baselines_own_scale():
    """Round 28: LayerNorm "fixed" a TD value net at R² −100 against the baseline's −103 (the twin's 0.92–1.00): 0.05
    on a score of that magnitude is no evidence. The margin is 5 % of the baseline's magnitude beyond ±1, and stays
    0.05 on a score within it."""
    from gradwatch.doctor.verdicts import margin

    base = _row("baseline", -103.0, 0.23, 0.02, ["dead_units"])
    assert margin(base) == pytest.approx(5.15)
    assert verdict(base, _row("norm", -100.0, 0.23, 0.003), {"dead_units"}) != "fixes it"
    assert verdict(base, _row("mask", -4.0, 0.23, 0.003), {"dead_units"}) == "fixes it"
    small = _row("baseline", 0.50, 2.3, 0.9, ["vanishing"])
    assert margin(small) == 0.05 and margin(_row("b", math.nan, 1, 1)) == 0.05
    assert verdict(small, _row("he", 0.56, 2.3, 0.3), {"vanishing"}) == "fixes it"
    assert verdict(small, _row("he", 0.54, 2.3, 0.3), {"vanishing"}) != "fixes it"


# -- round 28: a remedy's wrapper and a set-up's evaluate that reads an attribute of its model ---------------------

class _Valued(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 1))

    def forward(self, x):
        return self.net(x)


def test_a_remedys_wrapper_reads_through_to_the_users_model():
    """Round 28: the input-standardisation row failed with "'Standardised' object has no attribute 'net'" where the
    set-up's evaluate read ``model.net``. The wrappers read through to the user's model what they do not have."""
    from gradwatch.doctor.surgery import Standardise, Standardised, TargetScaled
    from gradwatch.remedies.structure import UnderMode

    model = _Valued()
    norm = Standardised(Standardise(torch.zeros(1, 3), torch.ones(1, 3)), model)
    assert norm.net is model.net and norm.norm is not None
    scaled = TargetScaled(model, torch.zeros(1), torch.ones(1), 1)
    assert scaled.net is model.net and scaled.mean.shape == (1,)
    under = UnderMode(model, torch.overrides.TorchFunctionMode)
    assert under.net is model.net
    with pytest.raises(AttributeError, match="nothing"):
        norm.nothing
    x = torch.randn(4, 3)
    assert torch.equal(norm(x), model(x)) and torch.equal(norm.net(x), model.net(x))
