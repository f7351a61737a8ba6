"""gw.check_attack: the input-gradient health against a naive loop, the sanity checks, and the masked zoo pairs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradwatch as gw
from conftest import SEEDS
from gradwatch import attack_zoo
from gradwatch.attack import _random_search
from gradwatch.attack_health import MarginLoss, gradient_health, margins, straight_through

pytest.importorskip("art")


def test_margins_match_a_loop() -> None:
    z = torch.randn(20, 7, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 7, (20,), generator=torch.Generator().manual_seed(1))
    expected = torch.tensor([max(z[i, j] for j in range(7) if j != y[i]) - z[i, y[i]] for i in range(20)])
    torch.testing.assert_close(margins(z, y), expected)
    torch.testing.assert_close(MarginLoss()(z, nn.functional.one_hot(y, 7).float()), expected.mean())


def _per_sample_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    """The reference: one sample at a time, its own autograd call."""
    out = []
    for i in range(len(x)):
        xi = x[i : i + 1].clone().requires_grad_(True)
        z = model(xi)
        value = nn.functional.cross_entropy(z, y[i : i + 1]) if loss == "ce" else margins(z, y[i : i + 1]).sum()
        (g,) = torch.autograd.grad(value, xi)
        out.append(g[0])
    return torch.stack(out)


def test_gradient_health_matches_a_per_sample_loop() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4), attack_zoo.LogitScale(1000.0)).eval()
    x = torch.randn(40, 6)
    y = torch.randint(0, 4, (40,))
    h = gradient_health(model, x, y)
    ce, mg = _per_sample_grads(model, x, y, "ce"), _per_sample_grads(model, x, y, "margin")
    ce_norm, m_norm = ce.flatten(1).double().norm(dim=1), mg.flatten(1).double().norm(dim=1)
    q = torch.quantile(ce_norm, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
    assert h.ce_norm_quantiles == pytest.approx(q.tolist(), rel=1e-4)
    assert h.margin_norm_median == pytest.approx(float(m_norm.median()), rel=1e-5)
    zero = (ce.flatten(1) == 0).all(1)
    assert h.zero_frac == pytest.approx(float(zero.double().mean()))
    assert 0 < h.zero_frac < 1  # the scale saturates some samples' softmax, not all: the count is tested, not a constant
    assert h.nonfinite_frac == 0 and h.dies_at == () and not h.random


def test_the_layer_that_stops_the_gradient_is_named_and_bpda_passes_it() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(5, 3)
    model = nn.Sequential(attack_zoo.InputRounding(4), lin).eval()
    x, y = torch.rand(10, 5), torch.randint(0, 3, (10,))
    h = gradient_health(model, x, y)
    assert h.dies_at == ("0",) and h.zero_frac == 1.0
    xg = x.clone().requires_grad_(True)
    with straight_through(model, h.dies_at):
        out = model(xg)
        out.sum().backward()
    torch.testing.assert_close(out, lin(torch.round(x * 3) / 3))  # the forward is still the rounding's
    torch.testing.assert_close(xg.grad, lin.weight.sum(0).expand(10, 5))  # the backward is the identity's
    assert len(model[0]._forward_hooks) == 0


def test_random_search_stays_in_the_ball_and_keeps_unflipped_samples() -> None:
    torch.manual_seed(1)  # a net whose predictions on U(0, 1)⁸ are not all one class
    model = nn.Sequential(nn.Linear(8, 3)).eval()
    x = torch.rand(50, 8)
    y = model(x).argmax(1)
    adv = _random_search(model, x, y, 0.3, "linf", (0.0, 1.0), draws=20)
    assert float((adv - x).abs().max()) <= 0.3 + 1e-6 and float(adv.min()) >= 0 and float(adv.max()) <= 1
    moved = (adv != x).any(1)
    with torch.no_grad():
        assert bool((model(adv).argmax(1)[moved] != y[moved]).all())  # a moved sample is a flipped one
    assert 0 < int(moved.sum()) < 50
    adv2 = _random_search(model, x, y, 0.3, "l2", None, draws=20)
    assert float((adv2 - x).norm(dim=1).max()) <= 0.3 + 1e-5 and bool((adv2 != x).any())


def test_check_attack_leaves_the_model_and_rngs_as_they_were() -> None:
    s = attack_zoo.digits("rounding", seed=0)
    s.model.train()
    s.model[1][0].weight.grad = torch.ones_like(s.model[1][0].weight)
    before = {k: v.clone() for k, v in s.model.state_dict().items()}
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    gw.check_attack(s.model, s.x[:64], s.y[:64], eps=0.1, clip=(0, 1), steps=5)
    assert torch.equal(torch.rand(3), expected_draw)
    assert all(torch.equal(v, s.model.state_dict()[k]) for k, v in before.items())
    assert all(m.training for m in s.model.modules())
    assert torch.equal(s.model[1][0].weight.grad, torch.ones_like(s.model[1][0].weight))
    assert all(p.requires_grad for p in s.model.parameters())
    assert not any(m._forward_hooks for m in s.model.modules())


def test_bad_arguments_name_the_argument() -> None:
    s = attack_zoo.digits(None, seed=0)
    with pytest.raises(ValueError, match=r"`check_attack\(eps=…\)` expects a positive number, got 0"):
        gw.check_attack(s.model, s.x, s.y, eps=0)
    with pytest.raises(TypeError, match=r"`check_attack\(y=…\)` expects class indices"):
        gw.check_attack(s.model, s.x, s.y.float(), eps=0.1)
    with pytest.raises(TypeError, match=r"`check_attack\(x=…\)` expects a floating-point batch"):
        gw.check_attack(s.model, s.x.long(), s.y, eps=0.1)
    with pytest.raises(ValueError, match=r"`check_attack\(norm=…\)` expects 'linf' or 'l2'"):
        gw.check_attack(s.model, s.x, s.y, eps=0.1, norm="l1")
    with pytest.raises(ValueError, match=r"`check_attack\(embedding=…\)` expects a submodule"):
        gw.check_attack(s.model, s.x, s.y, eps=0.1, embedding="nope")



@pytest.mark.zoo
@pytest.mark.parametrize("seed", SEEDS)
def test_masked_digits_are_flagged_and_their_honest_twin_is_not(seed: int) -> None:
    honest = attack_zoo.digits(None, seed)
    h = gw.check_attack(honest.model, honest.x, honest.y, eps=0.1, clip=(0, 1), seed=seed)
    assert not h.findings and all(c.passed for c in h.checks), str(h)
    assert h.health.zero_frac == 0 and h.health.dies_at == ()
    honest_robust = h.robust_accuracy("PGD (CE)")
    assert honest_robust < h.clean_accuracy - 0.2  # the twin is not robust at ε = 0.1: there is something to hide

    for masking, stronger in [("rounding", "PGD (CE, BPDA)"), ("temperature", "PGD (margin)")]:
        s = attack_zoo.digits(masking, seed)
        r = gw.check_attack(s.model, s.x, s.y, eps=0.1, clip=(0, 1), seed=seed)
        claimed = r.robust_accuracy("PGD (CE)")
        assert claimed >= 0.9 and claimed == pytest.approx(r.clean_accuracy), str(r)  # PGD + CE: "robust"
        assert [f.kind for f in r.findings] == ["gradient_masking"], str(r)
        failed = {c.name for c in r.checks if not c.passed}
        assert "success grows with ε and reaches ~100 % unbounded" in failed
        assert abs(r.robust_accuracy(stronger) - honest_robust) <= 0.15, str(r)  # the sound attack finds the twin's
        f = r.findings[0]
        assert f.severity == "critical"
        if masking == "rounding":
            assert f.layers == ("0",) and "bpda" in f.remedy_keys and "BPDA not much stronger" in f.evidence
        else:
            assert f.remedy_keys[0] == "margin_loss" and "saturated softmax" in f.cause
            assert "margin loss not much stronger than cross-entropy" in failed


@pytest.mark.zoo
@pytest.mark.parametrize("seed", SEEDS)
def test_embedding_gradients_of_a_tiny_transformer(seed: int) -> None:
    honest, masked = attack_zoo.text(None, seed), attack_zoo.text("temperature", seed)
    h = gw.check_attack(honest.model, honest.x, honest.y, eps=None, embedding=honest.embedding)
    m = gw.check_attack(masked.model, masked.x, masked.y, eps=None, embedding=masked.embedding)
    assert h.clean_accuracy >= 0.95 and m.clean_accuracy == h.clean_accuracy
    assert not h.findings and h.health.zero_frac == 0 and h.health.ce_norm_quantiles[0] > 0, str(h)
    assert m.health.wrt == "e" and m.health.zero_frac > 0.9 and m.health.margin_zero_frac == 0
    assert [f.kind for f in m.findings] == ["gradient_masking"] and m.findings[0].remedy_keys[0] == "margin_loss"
    assert not h.attacks and not m.attacks
    page = m._repr_html_()
    assert "gradient masking suspected" in page and "∂CE/∂e" in page and "<pre>" in page


def test_cli_check_attack_prints_the_verdict_and_answers_mistakes_in_one_line(tmp_path, capsys) -> None:
    from gradwatch.cli import main

    factory = tmp_path / "masked.py"
    factory.write_text("from gradwatch import attack_zoo\n"
                       "def make():\n    return attack_zoo.text('temperature', 0)\n"
                       "def wrong():\n    return 3\n")
    assert main(["check-attack", f"{factory}:make", "--eps", "0.1"]) == 0
    assert "verdict: gradient masking suspected" in capsys.readouterr().out
    for args, message in [([f"{factory}:wrong", "--eps", "0.1"], "must return (model, x, y) or an AttackSetup"),
                          (["zoo:nope", "--eps", "0.1"], "no attack set-up 'nope'"),
                          ([f"{factory}:missing", "--eps", "0.1"], "has no factory 'missing'")]:
        assert main(["check-attack", *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert main(["check-attack", "zoo:text_honest", "--eps", "0.1"]) == 0
    assert "verdict: no sign of gradient masking" in capsys.readouterr().out
