"""Weights clipped to ±c (a WGAN critic's weight clipping) named as the cause, with the gradient penalty as remedy.

Round 6 found the cause wrong: a 12-layer ReLU critic clipped at ±0.001 read "dead units", one at ±0.1 "a learning
rate too large", and no remedy mentioned the clip or a gradient penalty (Gulrajani et al. 2017, Fig. 1b).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradwatch as gw
from conftest import SEEDS
from gradwatch.diagnosis.remedies import REMEDIES


def _critic(depth: int = 12, width: int = 64) -> nn.Sequential:
    layers: list[nn.Module] = []
    d = 2
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.ReLU()]
        d = width
    return nn.Sequential(*layers, nn.Linear(d, 1))


def _moons() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import make_moons

    m, _ = make_moons(4000, noise=0.05, random_state=0)
    real = torch.tensor((m - m.mean(0)) / m.std(0), dtype=torch.float32)
    fake = torch.randn(4000, 2, generator=torch.Generator().manual_seed(123)) * 0.5 + 1.5  # a fixed "generator"
    return real, fake


def _train_critic(seed: int, clip: float | None, store, steps: int = 300) -> tuple[gw.Watch, nn.Sequential]:
    """Arjovsky et al. 2017's critic update, E[D(fake)] − E[D(real)] under RMSprop 5e-5, every parameter clamped
    to ±clip after each step (their Algorithm 1, c = 0.01); ``clip=None``: the same without clipping."""
    torch.manual_seed(seed)
    critic = _critic()
    opt = torch.optim.RMSprop(critic.parameters(), lr=5e-5)
    real, fake = _moons()
    g = torch.Generator().manual_seed(seed)
    with gw.watch(critic, opt, store=store, name=f"critic-{clip}-{seed}") as w:
        for _ in range(steps):
            r = real[torch.randint(0, 3000, (64,), generator=g)]
            f = fake[torch.randint(0, 3000, (64,), generator=g)]
            loss = critic(f).mean() - critic(r).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            w.log(loss=loss.detach())
            if clip is not None:
                with torch.no_grad():
                    for p in critic.parameters():
                        p.clamp_(-clip, clip)
    return w, critic


@pytest.mark.zoo
@pytest.mark.parametrize("seed", SEEDS)
def test_a_clipped_critic_is_told_of_its_clipping_and_of_the_gradient_penalty(store, seed):
    """The clipped critic vanishes (its weights at ±0.01 pass on ~0.1 a layer): the finding's cause is the clipping,
    its first remedy the gradient penalty. The reference for the weights' share at ±c: counted on the critic's
    weights after training. The same critic without clipping is not told of it."""
    w, critic = _train_critic(seed, 0.01, store)
    at = w.open().meta["weights_at_bound"]
    for i, layer in enumerate(critic):
        if isinstance(layer, nn.Linear) and layer.weight.numel() >= 64:
            share = float((layer.weight.abs() == 0.01).double().mean())  # clamp_ leaves them at exactly ±c
            assert at[str(i)] == pytest.approx([share, 0.01], rel=1e-6)
    vanishing = w.diagnose().of("vanishing")
    assert vanishing and vanishing[0].severity == "critical", str(w.diagnose())
    assert vanishing[0].cause.startswith("weight clipping:") and "±1.0e-02" in vanishing[0].cause
    assert vanishing[0].remedies[0] == REMEDIES["gradient_penalty"]
    w, _ = _train_critic(seed, None, store, steps=100)
    assert w.open().meta["weights_at_bound"] == {}
    assert not any("clipping" in f.cause or REMEDIES["gradient_penalty"] in f.remedies for f in w.diagnose().findings)


def test_weights_set_to_one_constant_are_not_called_clipped(store):
    """All at +0.5 (a constant initialisation) is a symmetry problem, not a clip: both signs must pile up."""
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
    with torch.no_grad():
        model[0].weight.fill_(0.5)
        model[2].weight.copy_(0.3 * torch.sign(torch.randn(16, 16)))  # ±0.3, both signs: as a clip leaves them
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with gw.watch(model, opt, store=store, name="const") as w:
        model(torch.randn(8, 16)).sum().backward()
        opt.step()
    assert set(w.open().meta["weights_at_bound"]) == {"2"}
