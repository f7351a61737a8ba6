"""The thirty-ninth session: rounds 45 (left over) and 46 (written from the README alone, each ported from a public
source), each against its reference: a CNN fed raw 0–255 pixels whose gradient overflows; a hand-written AdamW whose
decoupled decay is not multiplied by the rate."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gradwatch as gw
from conftest import (SEED_0_FAST, adam_moments, digits_cnn, digits_in_order_123, drawn_batches, held_out_accuracy,
                      watched_pair)


def _problems(w) -> list:
    return [f for f in w.diagnose() if f.severity != "info"]


# -- round 45: a CNN fed raw 0–255 pixels (a Stack Overflow answer: "you forgot to normalise the images") -------------

def _pixel_cnn(seed: int, raw: bool = True) -> gw.Trial:
    """Two 3×3 convs (32, 32), a max-pool and a 64-unit layer, all ReLU, at SGD 0.02 with momentum 0.9, on digits
    stored as 8-bit images (0–255); ``raw=False``: the pixels over 255 (the answer's fix)."""
    x, y = digits_in_order_123()
    x = torch.round(x * 255).view(-1, 1, 8, 8)
    x = x if raw else x / 255
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                          nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 16, 64), nn.ReLU(), nn.Linear(64, 10))
    return gw.Trial(model, torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9),
                    drawn_batches(x, y, 1400, 64, 1000 + seed), F.cross_entropy, evaluate=held_out_accuracy(x, y, 1400))


# seed 1 is the one whose gradient overflows to Inf (step 7): the claim this round added
@pytest.mark.parametrize("seed", (1, pytest.param(0, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow)))
def test_every_finding_of_a_cnn_on_raw_pixels_names_the_inputs_first_an_overflow_too(tmp_path, seed):
    from gradwatch.zoo.train import readme_watched

    runs = {}
    for raw in (True, False):
        trial = _pixel_cnn(seed, raw)
        runs[raw] = readme_watched(trial, tmp_path, f"raw_{raw}", 300), trial.evaluate(trial.model)
    (w_bug, bug), (w_twin, twin) = runs[True], runs[False]
    # the reference: the raw pixels' first batch is far from unit scale, and the net learns once they are over 255
    assert bug < 0.3 and twin > 0.9
    problems = _problems(w_bug)
    assert problems and all(f.remedy_keys[0] == "standardise_inputs" for f in problems), str(w_bug.diagnose())
    assert "the inputs are not standardised" in problems[0].cause
    if seed == 1:
        assert problems[0].kind == "nonfinite"
    assert not _problems(w_twin), str(w_twin.diagnose())


def test_inputs_holding_a_nan_are_no_scale_to_standardise():
    from gradwatch.diagnosis.architecture import raw_inputs

    class _Run:
        meta = {"input_std": float("nan"), "input_abs_mean": float("nan")}

    assert raw_inputs(_Run()) == ""
    _Run.meta = {"input_std": 95.0, "input_abs_mean": 78.0}
    assert "std 95" in raw_inputs(_Run())


# -- round 46: a hand-written AdamW whose decay is not multiplied by the rate (egg-west/AdamW-pytorch#1) ------------

class _PaperAdamW(torch.optim.Optimizer):
    """AdamW written out from Loshchilov & Hutter (2019), Alg. 2: ``p ← p·(1 − λ)`` then Adam's step; ``times_lr``:
    the decay multiplied by the rate (torch.optim.AdamW's rule, the twin)."""

    def __init__(self, params, lr: float, weight_decay: float, times_lr: bool) -> None:
        super().__init__(params, dict(lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay))
        self.times_lr = times_lr

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                m, v, t = adam_moments(self, group, p)
                p.mul_(1 - group["weight_decay"] * (group["lr"] if self.times_lr else 1.0))
                p.addcdiv_(m / (1 - b1 ** t), (v / (1 - b2 ** t)).sqrt().add_(group["eps"]), value=-group["lr"])


def _decayed_cnn(seed: int, times_lr: bool = False) -> gw.Trial:
    """conftest's digits CNN under the hand-written AdamW at lr 1e-3 and torch's recipe's decay 0.05."""
    trial = digits_cnn(seed, lambda model: None)
    trial.optimizer = _PaperAdamW(trial.model.parameters(), lr=1e-3, weight_decay=0.05, times_lr=times_lr)
    return trial


@pytest.mark.parametrize("seed", SEED_0_FAST)
def test_a_hand_written_decay_that_shrinks_every_weight_to_0_is_told_first(tmp_path, seed):
    bug, twin = _decayed_cnn(seed), _decayed_cnn(seed, times_lr=True)
    start = [p.detach().norm() for p in bug.model.parameters()]
    w_bug, w_twin = watched_pair(bug, twin, tmp_path)
    # the reference: every parameter ended at a tenth of its norm or less, the net at chance; with the decay ×
    # lr the same class learns
    assert all(p.detach().norm() <= 0.1 * s for p, s in zip(bug.model.parameters(), start))
    assert bug.evaluate(bug.model) < 0.2 and twin.evaluate(twin.model) > 0.9
    problems = _problems(w_bug)
    assert problems and all(f.remedy_keys[0] == "torch_optimizer" for f in problems), str(w_bug.diagnose())
    assert "_PaperAdamW" in problems[0].cause and "shrank every parameter" in problems[0].cause
    assert not _problems(w_twin), str(w_twin.diagnose())


def test_the_row_takes_torch_s_adamw_with_the_user_s_decay():
    from gradwatch.doctor import surgery

    trial = surgery.torch_optimizer(_decayed_cnn(0), {})
    # the reference: torch's AdamW on the same groups, its decay the user's 0.05 (× lr, torch's rule): the twin's
    group = trial.optimizer.param_groups[0]
    assert type(trial.optimizer) is torch.optim.AdamW and group["weight_decay"] == 0.05 and group["lr"] == 1e-3


@pytest.mark.slow
def test_the_doctor_repairs_the_hand_written_decay_with_torch_s_adamw():
    report = gw.doctor(_decayed_cnn, steps=300, progress=False)
    assert report.best is not None and report.best.parts == ("torch_optimizer",), str(report)
    assert report.best.verdict == "fixes it" and report.best.score > 0.9
