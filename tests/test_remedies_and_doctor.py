"""The remedies library (each does what it says on a model built for it) and gw.doctor (measured verdicts)."""

from __future__ import annotations

import math
import pickle
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import gradwatch as gw
from gradwatch import remedies, zoo

from conftest import SEEDS


def _mlp(act=nn.Tanh, depth=6, width=32):
    torch.manual_seed(0)
    return zoo.mlp(depth, width, act, n_in=width, n_out=width)


def test_init_remedies_copy_by_default_and_set_the_scale():
    model = _mlp(nn.ReLU)
    before = [p.clone() for p in model.parameters()]
    he = remedies.he_init(model)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the user's model is untouched
    for m in he.modules():
        if isinstance(m, nn.Linear):
            assert not m.bias.any()
            assert float(m.weight.std()) == pytest.approx(math.sqrt(2 / m.in_features), rel=0.1)
    ortho = remedies.orthogonal_init(_mlp(nn.Tanh))
    w = ortho[0].weight
    gain = nn.init.calculate_gain("tanh")
    torch.testing.assert_close(w @ w.T, gain**2 * torch.eye(32), atol=1e-5, rtol=0)
    xav = remedies.xavier_init(_mlp(nn.Tanh))
    assert float(xav[0].weight.std()) == pytest.approx(gain * math.sqrt(2 / 64), rel=0.1)


def test_lsuv_gives_unit_variance_outputs():
    model = _mlp(nn.Tanh)
    x = torch.randn(256, 32)
    lsuv = remedies.lsuv_init(model, x)
    outs = []
    hooks = [m.register_forward_hook(lambda m, a, o: outs.append(o.var().item())) for m in lsuv.modules()
             if isinstance(m, nn.Linear)]
    lsuv(x)
    for h in hooks:
        h.remove()
    assert all(abs(v - 1) < 0.05 for v in outs), outs


def test_structural_remedies():
    model = _mlp(nn.Sigmoid)
    swapped = remedies.swap_activation(model)
    assert not any(isinstance(m, nn.Sigmoid) for m in swapped.modules())
    assert sum(isinstance(m, nn.ReLU) for m in swapped.modules()) == 5
    res = remedies.add_residual(_mlp(nn.Tanh))
    blocks = [m for m in res.modules() if isinstance(m, remedies.Residual)]
    assert len(blocks) == 6  # every Linear(32, 32) group
    x = torch.randn(4, 32)
    b = blocks[0]
    torch.testing.assert_close(b(x), x + b.block(x))
    rz = remedies.add_residual(_mlp(nn.Tanh), rezero=True)
    torch.testing.assert_close(rz(x), x)  # ReZero starts as the identity (α = 0) … and the head, also residual here
    normed = remedies.add_norm(_mlp(nn.Tanh))
    assert sum(isinstance(m, nn.LayerNorm) for m in normed.modules()) == 5
    seq = list(normed)
    assert all(isinstance(seq[i - 1], nn.LayerNorm) for i, m in enumerate(seq) if isinstance(m, nn.Tanh))


def test_fixup_zero_init_makes_blocks_identity():
    torch.manual_seed(0)
    net = zoo.SmallResNet()
    fixed = remedies.fixup_zero_init(net)
    x = torch.randn(2, 16, 8, 8)
    for block in fixed.blocks:
        block.eval()
        torch.testing.assert_close(block(x), x)


def test_clipping_remedies():
    torch.manual_seed(0)
    model = nn.Linear(6, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    h = remedies.clip_grad_value(opt, 0.01)
    (1000 * model(torch.randn(5, 6)).sum()).backward()
    opt.step()
    assert all(float(p.grad.abs().max()) <= 0.01 + 1e-9 for p in model.parameters())
    h.remove()
    opt.zero_grad()
    h = remedies.adaptive_clip(opt, clipping=0.01)
    (1000 * model(torch.randn(5, 6)).sum()).backward()
    opt.step()
    w, g = model.weight.detach(), model.weight.grad
    ratio = g.norm(dim=1) / w.norm(dim=1).clamp_min(1e-3)
    assert float(ratio.max()) <= 0.01 * (1 + 1e-5)  # unit-wise ‖G_i‖/max(‖W_i‖, ε) ≤ λ (Brock et al. 2021)
    h.remove()
    opt2 = torch.optim.SGD([{"params": [model.weight], "lr": 1e-6}, {"params": [model.bias], "lr": 0.1}])
    remedies.unify_lr(opt2)
    assert [g["lr"] for g in opt2.param_groups] == [0.1, 0.1]
    remedies.scale_lr(opt2, 0.5)
    assert [g["lr"] for g in opt2.param_groups] == [0.05, 0.05]


def test_a_trial_steps_its_scheduler_after_every_optimizer_step_even_in_a_step_of_its_own():
    class OwnStep(gw.Trial):  # a step() that knows nothing of schedules
        def step(self) -> torch.Tensor:
            self.optimizer.step()
            return torch.zeros(())

    for cls in (gw.Trial, OwnStep):
        model = nn.Linear(2, 1)
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        trial = cls(model, opt, iter([(torch.ones(1, 2), torch.ones(1, 1))] * 3), nn.functional.mse_loss,
                    scheduler=torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5))
        for _ in range(3):
            trial.step()
        assert opt.param_groups[0]["lr"] == 0.5**3  # closed form: halved once per step


def test_the_zoo_registry_is_read_only_and_every_setup_pickles_to_the_same_trial():
    """Set-ups can travel to another process: each one pickles, and the copy builds the very same trial."""
    with pytest.raises(TypeError):
        zoo.SETUPS["mine"] = zoo.get("deep_tanh_mlp")  # type: ignore[index]
    for name in zoo.names():
        setup = zoo.get(name)
        copy = pickle.loads(pickle.dumps(setup))
        assert copy.name == name
        a, b = setup(1), copy(1)
        assert all(torch.equal(p, q) for p, q in zip(a.model.state_dict().values(), b.model.state_dict().values()))


def test_every_remedy_and_a_trial_run_pickle_so_trials_can_run_in_another_process(tmp_path):
    from gradwatch.doctor import catalogue, run_trial

    for remedy in [r for entries in catalogue.catalog().values() for r in entries]:
        copy = pickle.loads(pickle.dumps(remedy))
        assert (copy.key, copy.label, copy.parts) == (remedy.key, remedy.label, remedy.parts)
        a, b = remedy.apply(zoo.get("deep_tanh_mlp")(0), {}), copy.apply(zoo.get("deep_tanh_mlp")(0), {})
        assert (a is None) == (b is None), remedy.label
        if a is not None:  # the copy does what the original does
            assert [g["lr"] for g in a.optimizer.param_groups] == [g["lr"] for g in b.optimizer.param_groups]
            for p, q in zip(a.model.state_dict().values(), b.model.state_dict().values()):
                assert torch.equal(p, q), remedy.label
    run = run_trial(zoo.get("deep_tanh_mlp"), 0, 12, tmp_path, "pickled", catalogue.catalog()["relu"][0], {})
    assert run is not None and pickle.loads(pickle.dumps(run)) == run


def test_doctor_on_a_healthy_setup_has_nothing_to_fix():
    report = gw.doctor(zoo.get("deep_relu_he_mlp"), steps=60, progress=False)
    assert report.message.startswith("nothing to fix") and report.trials == [] and report.best is None


def test_doctor_repairs_the_vanishing_tanh_mlp():
    report = gw.doctor(zoo.get("deep_tanh_mlp"), steps=200, progress=False)
    assert report.diagnosis.kinds == ["vanishing"]
    tried = [t.label for t in report.trials]
    assert "gradient-norm clipping" not in tried  # only what the cause points to, not everything
    assert report.best is not None and report.best.verdict == "fixes it"
    for t in report.trials:  # never a claim it did not measure
        if t.verdict == "fixes it":
            assert "vanishing" not in t.findings and t.score > report.baseline.score + 0.02
    assert report.best.label in report.message and "fixes it" in str(report)


def test_doctor_finds_the_misconfigured_parameter_group():
    report = gw.doctor(zoo.get("stalled_mlp"), steps=150, progress=False)
    assert report.best is not None and report.best.label == "one learning rate for every group"


def test_doctor_says_when_no_remedy_helped(monkeypatch):
    from gradwatch.doctor import catalogue  # the package; gw.doctor is the function

    idle = catalogue.Remedy("he_init", "does nothing", lambda trial, numbers: trial)
    monkeypatch.setattr(catalogue, "catalog", lambda: {k: [idle] for k in ("orthogonal_init", "he_init", "residual", "norm")})
    report = gw.doctor(zoo.get("deep_tanh_mlp"), steps=60, progress=False)
    assert report.message == "no remedy helped" and report.best is None
    assert {t.verdict for t in report.trials} == {"no change"}


def _seed_tagged(seed: int):
    """The zoo's deep tanh MLP, its trial told its seed (for remedies that behave differently on one)."""
    trial = zoo.get("deep_tanh_mlp")(seed)
    trial.seed_tag = seed
    return trial


def test_the_best_remedy_is_checked_on_a_seed_no_trial_used():
    """The best "fixes it" row runs once more on seed ``seeds``. Reference: the same remedy's trial on that seed run
    by hand (``run_trial``), to the bit; and a remedy that helps only on the seeds it was chosen on is caught there,
    the next row that holds is named best instead, and where none holds the message says so."""
    from gradwatch.doctor import catalogue
    from gradwatch.doctor.trial_run import run_trial

    steps = 60
    report = gw.doctor(zoo.get("deep_tanh_mlp"), steps=steps, progress=False)
    assert report.best is not None and len(report.checks) == 1
    (check,) = report.checks
    assert check.label == f"{report.best.label} (seed 1)" and check.verdict == "fixes it"
    assert "it held on a seed no trial used (seed 1" in report.message and "seed check" in str(report)
    remedy = next(r for r in catalogue.catalog()[report.best.parts[0]] if r.label == report.best.label)
    with tempfile.TemporaryDirectory() as tmp:
        by_hand = run_trial(zoo.get("deep_tanh_mlp"), 1, steps, Path(tmp), "by-hand", remedy, {})
    assert check.final_loss == pytest.approx(float(np.mean(by_hand.losses[-max(1, steps // 10):])), rel=1e-12)
    assert gw.doctor(zoo.get("deep_tanh_mlp"), steps=steps, progress=False, check_seed=False).checks == []


def test_a_remedy_that_fixes_only_its_own_seeds_is_not_the_best(monkeypatch):
    from gradwatch.doctor import catalogue

    he = catalogue.catalog()["he_init"][0]
    lucky = catalogue.Remedy("he_init", "He init, seed 0 only",
                             lambda trial, numbers: he.apply(trial, numbers) if trial.seed_tag < 1 else trial)
    steady = catalogue.Remedy("he_init", "He init, every seed", he.apply)
    monkeypatch.setattr(catalogue, "catalog", lambda: {"he_init": [lucky, steady]})
    report = gw.doctor(_seed_tagged, steps=60, progress=False)
    fixed = [t for t in report.trials if t.verdict == "fixes it"]
    assert [t.label for t in fixed] == ["He init, seed 0 only", "He init, every seed"]
    assert fixed[0].final_loss == fixed[1].final_loss  # on seed 0 the two are one trial: a tie, the first ranks higher
    assert [c.label for c in report.checks] == ["He init, seed 0 only (seed 1)", "He init, every seed (seed 1)"]
    shaky = report.checks[0].verdict  # the baseline on seed 1, untouched
    assert shaky != "fixes it" and report.checks[1].verdict == "fixes it"
    assert report.best is fixed[1]
    assert f"He init, seed 0 only ranked higher but did not hold on seed 1 ({shaky})" in report.message

    monkeypatch.setattr(catalogue, "catalog", lambda: {"he_init": [lucky]})
    report = gw.doctor(_seed_tagged, steps=60, progress=False)
    assert report.best is not None and report.best.label == "He init, seed 0 only"  # the best row, said to be shaky
    assert [c.verdict for c in report.checks] == [shaky]
    assert f"on a seed no trial used (seed 1) it did not hold: {shaky}" in report.message


def test_doctor_stops_at_its_time_budget():
    report = gw.doctor(zoo.get("deep_tanh_mlp"), steps=40, budget_s=1e-6, progress=False)
    assert "stopped at the time budget" in report.message and report.trials == []


@pytest.mark.parametrize("kwargs,error", [(dict(setup=3), TypeError), (dict(steps=0), ValueError),
                                         (dict(seeds=0), ValueError), (dict(budget_s=-1), ValueError),
                                         (dict(check_seed=1), TypeError)])
def test_doctor_bad_arguments(kwargs, error):
    args = dict(setup=zoo.get("deep_tanh_mlp")) | kwargs
    with pytest.raises(error, match=r"`doctor\("):
        gw.doctor(**args)


@pytest.mark.zoo
@pytest.mark.parametrize("seed", SEEDS)
def test_gan_generator_gradient_collapse_is_diagnosed(zoo_runs, seed):
    """The minimax generator loss log(1 − D(G(z))): once D wins, the generator's whole gradient fades."""
    run, trial = zoo_runs("gan_ring_saturating", seed)
    findings = gw.diagnose(run).of("vanishing")
    assert findings and "whole gradient collapsed" in findings[0].summary
    assert findings[0].numbers["ratio"] < 1e-3
    assert "non-saturating" in findings[0].remedies[0]
    # the reference: the generator's total gradient norm, from a naive loop over param.grad of the trained trial
    trial.step()
    total = math.sqrt(sum(float(p.grad.norm()) ** 2 for p in trial.model.parameters()))
    assert total < 1e-3 * findings[0].numbers["early"]
    assert trial.evaluate(trial.model) == 0.0  # and it covers no mode


def test_mode_metrics_closed_form():
    centers, std = zoo.mixture_centers("ring")
    samples = torch.cat([centers[:3] + 0.5 * std, centers[:1] + 10 * std])  # 3 good samples, 1 far off
    covered, quality = zoo.mode_metrics(samples, centers, std)
    assert covered == 3 and quality == pytest.approx(0.75)
    grid, s = zoo.mixture_centers("grid")
    assert grid.shape == (25, 2) and s == 0.05


def test_cli_doctor(tmp_path, capsys):
    from gradwatch.cli import main

    assert main(["doctor", "zoo:stalled_mlp", "--steps", "100"]) == 0
    out = capsys.readouterr().out
    assert "best remedy: one learning rate for every group" in out and "seed check" in out
    assert main(["doctor", "zoo:stalled_mlp", "--steps", "100", "--no-seed-check"]) == 0
    out = capsys.readouterr().out
    assert "best remedy: one learning rate for every group" in out and "seed check" not in out
    (tmp_path / "mine.py").write_text("from gradwatch import zoo\ndef make(seed):\n    return zoo.get('deep_relu_he_mlp')(seed)\n")
    assert main(["doctor", f"{tmp_path / 'mine.py'}:make", "--steps", "30"]) == 0
    assert "nothing to fix" in capsys.readouterr().out
    assert main(["doctor", "zoo:nope"]) == 2
    assert "expects one of" in capsys.readouterr().err


@pytest.mark.slow  # 30 s here, ~110 s under the portable kernels: make test-slow and make test-portable-rest
@pytest.mark.portable
@pytest.mark.zoo
def test_doctor_fixes_the_saturating_gan_with_the_nonsaturating_loss():
    """The doctor's choice, and its score over three seeds, in 150 steps a trial. Under the native kernels make
    test covers what it measures, at the zoo's 300 steps: the saturating GAN's finding and its non-saturating
    twin's learning, seeds 0–2 (test_diagnosis.py)."""
    report = gw.doctor(zoo.get("gan_ring_saturating"), steps=150, seeds=len(SEEDS), progress=False)
    assert "vanishing" in report.diagnosis.kinds
    assert report.baseline.score == 0.0  # no mode covered, on any of the seeds
    assert report.best is not None and report.best.label == "non-saturating generator loss"
    # findings left: the union over the seeds; the score: their mean modes covered, as VEEGAN counts them. Measured
    # at 150 steps: 0.833 (native AVX-512, and ATEN_CPU_CAPABILITY=default), 0.875 (AVX2-limited); 0.917 at 300.
    assert report.best.findings == [] and report.best.score >= 0.6
