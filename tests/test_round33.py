"""The thirty-second session's set-ups: round 33 (written from the README alone, each ported from a public source),
each against its reference."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gradwatch as gw
from gradwatch.doctor import surgery
from gradwatch.zoo.train import readme_watched
from conftest import SEED_0_FAST, shuffled_batches, stratified_digits


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


# -- a warm-up longer than the run (Morizeyao/GPT2-Chinese#60: warmup=2000 in a shorter run) --------------------------

def _linear_warmup_decay(optimizer: torch.optim.Optimizer, warmup: int, total: int):
    """transformers.get_linear_schedule_with_warmup, written out: 0 → the base rate over ``warmup`` steps, then down
    to 0 at ``total``."""
    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _warmup_setup(seed: int, warmup: int, steps: int = 300) -> gw.Trial:
    """A digits MLP under AdamW at 1e-3 with a linear warm-up of ``warmup`` steps (the bug: 2000, copied from a long
    run; the twin: a tenth of the run)."""
    xtr, ytr, xte, yte = stratified_digits()
    torch.manual_seed(seed)
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return gw.Trial(model, opt, shuffled_batches(xtr, ytr, seed), F.cross_entropy,
                    evaluate=lambda m: _accuracy(m, xte, yte),
                    scheduler=_linear_warmup_decay(opt, warmup, max(steps, warmup)))


@pytest.mark.parametrize("seed", SEED_0_FAST)
def test_a_warmup_longer_than_the_run_is_found_and_its_twin_is_not(tmp_path, seed):
    bug, twin = _warmup_setup(seed, 2000), _warmup_setup(seed, 30)
    w_bug = readme_watched(bug, tmp_path, "bug", 300)
    w_twin = readme_watched(twin, tmp_path, "twin", 300)
    # the reference: the rate the schedule reached, read off the optimizer, and the held-out scores
    assert bug.optimizer.param_groups[0]["lr"] <= 0.2 * 1e-3 and twin.evaluate(twin.model) > bug.evaluate(bug.model) + 0.1
    (f,) = [f for f in w_bug.diagnose() if f.severity != "info"]
    assert f.kind == "stalled" and f.remedy_keys[0] == "finish_warmup" and "warm-up longer than the run" in f.cause
    assert f"{bug.optimizer.param_groups[0]['lr']:.2g}" in f.summary and "0.001" in f.summary
    assert not [f for f in w_twin.diagnose() if f.severity != "info"]


def test_the_doctors_warmup_reaches_the_base_rate_in_a_tenth_of_the_steps():
    trial = _warmup_setup(0, 2000)
    assert trial.optimizer.param_groups[0]["lr"] == 0.0  # the schedule's own start: 0 × the base
    surgery.finish_warmup(trial, {"doctor_steps": 300})
    rates = []
    for _ in range(40):
        trial.step()
        rates.append(trial.optimizer.param_groups[0]["lr"])
    # LinearLR from 1 % of the base over 30 steps: closed form base · (0.01 + 0.99 · k/30), then the base
    assert rates[0] == pytest.approx(1e-3 * (0.01 + 0.99 / 30))
    assert rates[29:] == pytest.approx([1e-3] * 11)
    plain = _mlp()  # no scheduler of its own: nothing warms up, nothing to replace
    assert surgery.finish_warmup(gw.Trial(plain, torch.optim.SGD(plain.parameters(), 0.1), iter(()), F.cross_entropy),
                                 {}) is None


def test_the_doctor_finishes_the_warmup():
    report = gw.doctor(lambda seed: _warmup_setup(seed, 2000), steps=300, progress=False)
    assert report.best is not None and report.best.label.startswith("a warm-up over the first tenth")
    assert report.best.verdict == "fixes it" and report.best.score > report.baseline.score + 0.1


# -- clip_grad_norm_(params, 0.0): a max_grad_norm of 0 meant "no clipping" (OpenNMT/OpenNMT-py#1140) -------------

@pytest.mark.parametrize("seed", SEED_0_FAST)
def test_gradients_clipped_to_zero_are_told_as_such_not_as_a_constant_output(tmp_path, seed):
    xtr, ytr, _, _ = stratified_digits()
    runs = {}
    for bound in (0.0, 1.0):
        torch.manual_seed(seed)
        model = _mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        with gw.watch(model, opt, store=tmp_path, name=f"clip{bound:g}") as w:
            for _, (x, y) in zip(range(200), shuffled_batches(xtr, ytr, seed)):
                opt.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), bound)
                if bound == 0:  # the reference: every gradient the optimizer sees is exactly 0
                    assert all(not p.grad.any() for p in model.parameters())
                opt.step()
                w.log(loss=loss)
        runs[bound] = w.diagnose()
    (f,) = runs[0.0]
    assert f.kind == "stalled" and f.remedy_keys == ("no_zero_clip",)
    assert "between loss.backward() and optimizer.step()" in f.cause and "max_norm=0" in f.cause
    assert "softmax over a single unit" not in f.cause
    assert not [f for f in runs[1.0] if f.severity != "info"]


# -- one backward through several calls of the net is no gradient accumulation (round 33's WGAN critic) -----------

def test_a_net_called_three_times_in_one_graph_is_not_told_of_gradient_accumulation(tmp_path):
    """A WGAN-GP critic's real, fake and interpolated passes (3.2 forward passes a step with the generator's) were told
    "if that is gradient accumulation … divide each micro-batch's loss by 3.2"; the reference: autograd calls a
    leaf's hook once per backward, whatever the number of uses, and real accumulation stays k (round 14's test)."""
    xtr, _, _, _ = stratified_digits()
    torch.manual_seed(0)
    critic = _mlp()
    opt = torch.optim.SGD(critic.parameters(), lr=3.0)  # far too large: an explosion to be explained
    g = torch.Generator().manual_seed(0)
    with gw.watch(critic, opt, store=tmp_path, name="critic") as w:
        for _ in range(60):
            i = torch.randint(0, len(xtr), (3, 64), generator=g)
            real, fake, mixed = critic(xtr[i[0]]), critic(xtr[i[1]] + 1.0), critic(0.5 * (xtr[i[0]] + xtr[i[2]]))
            loss = (fake.logsumexp(1) - real.logsumexp(1) + mixed.pow(2).mean(1)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            w.log(loss=loss)
    meta = w.open().meta
    assert meta["passes_per_step"] == 3 and meta["backwards_per_step"] == 1
    blown = [f for f in w.diagnose().problems if f.kind in ("exploding", "nonfinite")]
    assert blown and not any("divide_accumulated" in f.remedy_keys or "backward passes" in f.cause for f in blown)
