"""The repair benchmark's set-ups (benchmarks/setups/) show their labels, measured by plain hooks, not by gradwatch.

Each set-up declares "healthy" or a pathology kind; benchmarks/setups/truth.py
trains it for its own step count with plain forward and tensor hooks and says
which labels the run shows. The declared label must be among them on seeds 0
and 1. The truth module itself is checked against closed forms first.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import setups  # noqa: E402
from benchmarks.setups import truth  # noqa: E402
from benchmarks.setups.common import Trial  # noqa: E402

# Set-ups whose two seeds train in about a second each on one core: marked zoo (make test; the portable run leaves
# this file out — the labels are the benchmark's ground truth on the machine that runs it, natively). The rest (about 6.5 min on a shared 2-core machine) are marked slow: they check the
# benchmark's labels, not the library, and run with `make test-slow` (before `benchmarks/repair_eval.py`, and
# under ATEN_CPU_CAPABILITY=default by hand), outside `make test`, which keeps CI within its 20 minutes.
FAST = {"at_circle_exp", "at_blob_exp", "at_circle_sigmoid", "at_circle_relu_uniform", "so_nielsen_linear_mse",
        "so_nielsen_fixed", "so_raw_tanh", "so_raw_tanh_fixed", "so_softmax_one_unit", "so_quadratic_lr",
        "tanh_raw_pixels", "relu_high_lr", "tied_inplace", "pascanu_rnn_radius25", "r9_summed_loss_accumulated",
        "r9_mean_loss_accumulated", "r9_bf16_mlp", "r9_cancer_raw", "r9_cancer_scaled", "r10_onecycle_high",
        "r10_onecycle"}


def _cases():
    for name, s in setups.SETUPS.items():
        for seed in (0, 1):
            marks = [pytest.mark.zoo] if name in FAST and not s.slow else [pytest.mark.slow]
            yield pytest.param(name, seed, marks=marks, id=f"{name}-{seed}")


@pytest.mark.parametrize("name,seed", list(_cases()))
def test_label_holds_by_plain_measurement(name, seed):
    s = setups.get(name)
    got = truth.measure(s.make, seed, s.steps)
    assert s.label in got.holds(), f"{name} seed {seed}: label {s.label!r}, measured {sorted(got.holds())}: {got.describe()}"


def _references():
    for name, s in setups.SETUPS.items():
        if s.reference is not None:
            yield pytest.param(name, marks=[pytest.mark.zoo] if name in FAST else [pytest.mark.slow], id=name)


@pytest.mark.parametrize("name", list(_references()))
def test_a_sources_own_fix_removes_the_pathology_it_is_the_reference_for(name):
    # repair_eval counts a set-up as out of reach when this fix does not learn either: it must be a fix
    s = setups.get(name)
    assert s.label != "healthy" and s.reference is not None
    for seed in (0, 1):
        got = truth.measure(s.reference, seed, s.steps)
        assert s.label not in got.holds(), f"{name} seed {seed}: the reference shows {sorted(got.holds())}"


def test_out_of_reach_set_ups_are_counted_apart_from_the_rate_over_all():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import repair_eval

    def entry(repaired: bool, reference: dict | None) -> dict:
        run = {"ok": True, "findings": [{"kind": "vanishing", "severity": "critical"}]}
        trials = [{"label": "fix", "score": 0.9, "final_loss": 0.1, "first_loss": 1.0}] if repaired else []
        return {"label": "vanishing", "steps": 10, "runs": [run, run],
                "doctor": {"repaired": repaired, "best": "fix" if repaired else None, "trials": trials,
                           "message": "no remedy fixes it (findings gone)", "reference": reference}}

    out = {"first_loss": 0.8, "final_loss": 0.5, "score": 0.7, "learns": False}
    missed = {**out, "learns": True}
    results = {"machine": "m", "doctor": True, "setups": {
        "a": entry(True, None), "b": entry(True, None), "c": entry(False, out), "d": entry(False, missed),
        "e": entry(False, None)}}
    lines = repair_eval.render(results)
    summary = lines[-1]
    assert "repair rate (the doctor's \"fixes it\") 2/5 = 0.40" in summary
    assert "1 of the 3 not repaired are out of reach" in summary and "2/4 = 0.50 of those within reach" in summary
    rows = {line.split(" | ")[0].strip("| "): line for line in lines if line.startswith("| ")}
    assert "out of reach" in rows["c"] and "learns: a miss" in rows["d"] and "the source's fix" not in rows["e"]


def test_benchmark_has_enough_setups_and_healthy_ones():
    labels = [s.label for s in setups.SETUPS.values()]
    assert len(labels) >= 36
    assert labels.count("healthy") >= len(labels) / 3
    for s in setups.SETUPS.values():  # every set-up says where it comes from
        assert s.source and s.make.__doc__, s.name


def _fake_trial(model: nn.Module, x: torch.Tensor, loss) -> Trial:
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: every step sees the same weights

    def forever():
        while True:
            yield x, torch.zeros(1)

    return Trial(model, opt, forever(), loss)


def test_depth_ratio_of_an_orthogonal_linear_chain_is_its_gain_to_the_power_of_depth():
    # L = Σ c·a₅ with a_l = s·Q_l a_{l−1}: ∂L/∂a₁ = s⁴ Q₂ᵀ…Q₅ᵀ c, so ‖∂L/∂a₁‖ / ‖∂L/∂a₅‖ = s⁴ exactly.
    torch.manual_seed(0)
    layers = [nn.Linear(8, 8, bias=False) for _ in range(5)]
    for layer in layers:
        nn.init.orthogonal_(layer.weight, gain=0.3)
    model = nn.Sequential(*layers)
    c = torch.randn(8)
    got = truth.measure(lambda seed: _fake_trial(model, torch.randn(4, 8), lambda out, y: (out * c).sum()), 0, 3)
    assert got.depth and all(math.isclose(r, 0.3**4, rel_tol=1e-5) for r in got.depth)
    assert "vanishing" not in got.holds() and "exploding" not in got.holds()


def test_fused_rnn_unrolled_ratio_equals_the_cell_loop_with_the_same_weights():
    # Two independent measurements of ‖∂L/∂h_0‖ / ‖∂L/∂h_{T−1}‖: nn.RNN re-run with retain_grad, and tensor hooks
    # on each call of an nn.RNNCell holding the same weights.
    torch.manual_seed(0)
    rnn, cell = nn.RNN(3, 6), nn.RNNCell(3, 6)
    with torch.no_grad():
        for a, b in zip((rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0),
                        (cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)):
            b.copy_(a)

    class Fused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = rnn

        def forward(self, x):
            return self.rnn(x)[0][-1]

    class Loop(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cell = cell

        def forward(self, x):
            h = x.new_zeros(x.shape[1], 6)
            for t in range(x.shape[0]):
                h = self.cell(x[t], h)
            return h

    x = torch.randn(7, 2, 3)
    loss = lambda out, y: out.pow(2).sum()  # noqa: E731
    fused = truth.measure(lambda s: _fake_trial(Fused(), x, loss), 0, 1)
    loop = truth.measure(lambda s: _fake_trial(Loop(), x, loss), 0, 1)
    assert fused.time and loop.time
    assert math.isclose(fused.time[0], loop.time[0], rel_tol=1e-6)


def test_all_zero_gradients_are_stalled_and_a_nan_loss_is_nonfinite():
    model = nn.Sequential(nn.Linear(3, 1), nn.Softmax(dim=1))  # softmax over one unit: the constant 1
    got = truth.measure(lambda s: _fake_trial(model, torch.randn(4, 3), lambda out, y: out.sum()), 0, 2)
    assert got.zero_grad and "stalled" in got.holds()
    bad = nn.Linear(3, 1)
    got = truth.measure(lambda s: _fake_trial(bad, torch.full((4, 3), math.inf), lambda out, y: out.sum()), 0, 2)
    assert got.nonfinite_step == 0 and "nonfinite" in got.holds()
