"""The thirty-ninth session: rounds 45 (left over) and 46 (written from the README alone, each ported from a public
source), each against its reference: a CNN fed raw 0–255 pixels whose gradient overflows."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gradwatch as gw
from conftest import digits_in_order_123, drawn_batches, held_out_accuracy


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
