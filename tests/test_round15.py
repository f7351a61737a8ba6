"""Round 15's set-ups (written from the README alone, each ported from a public source), each against its reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import gradwatch as gw
from gradwatch.diagnosis import over_steps
from gradwatch.doctor import surgery
from gradwatch.doctor.catalogue import catalog
from gradwatch.zoo.train import readme_loop
from conftest import SEED_0_FAST


def _diabetes(seed, standardise=False):
    """Stack Overflow's "NaN loss when training a regression network" (q/37232782; answer: normalise the targets):
    an MLP on scikit-learn's diabetes data, features standardised, targets ×100 (2.5e3–3.5e4) as a price would come,
    MSE, SGD 0.01, batches of 32. ``standardise``: the twin, trained on (y − mean)/std."""
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True)
    x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y * 100, dtype=torch.float32)[:, None]
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    tr, te = idx[:342], idx[342:]
    x = (x - x[tr].mean(0)) / x[tr].std(0)
    mean, std = (float(y[tr].mean()), float(y[tr].std())) if standardise else (0.0, 1.0)

    def batches():
        g = torch.Generator().manual_seed(seed)
        while True:
            perm = tr[torch.randperm(len(tr), generator=g)]
            for i in range(0, len(perm) - 31, 32):
                yield x[perm[i:i + 32]], (y[perm[i:i + 32]] - mean) / std

    @torch.no_grad()
    def r2(model):  # R² on the held-out samples, in the targets' own units
        p = model(x[te]) * std + mean
        return float(1 - ((p - y[te]) ** 2).mean() / ((y[te] - y[te].mean()) ** 2).mean())

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
    return gw.Trial(model, torch.optim.SGD(model.parameters(), lr=0.01), batches(), nn.functional.mse_loss, r2)


@pytest.mark.parametrize("seed", SEED_0_FAST)
def test_a_regression_on_raw_targets_at_an_ordinary_init_is_told_to_standardise_them_first(store, seed):
    """Round 15: the loss starts at 2.6–3.1e8 (E[y²]: the outputs start near 0) and NaN follows within 6 steps;
    the explosion was told "weights re-initialised" first though every layer sat at nn.Linear's default scale
    (below He's, measured here). The targets' standardisation comes first, with the weights' scale named; the
    twin on standardised targets has no finding and learns (R² ≥ 0.4 held out)."""
    for standardise in (False, True):
        trial = _diabetes(seed, standardise)
        linears = [m for m in trial.model if isinstance(m, nn.Linear)]
        assert all(float(m.weight.detach().norm()) < np.sqrt(2 * m.weight.shape[0]) for m in linears)  # below He's
        with gw.watch(trial.model, trial.optimizer, store=store, name=f"diabetes-{seed}-{standardise}") as w:
            for _ in range(150):
                w.log(loss=trial.step())
        found = w.diagnose().problems
        if standardise:
            assert not found and trial.evaluate(trial.model) >= 0.4
            continue
        exploding = [f for f in found if f.kind == "exploding"]
        assert exploding, found
        keys = exploding[0].remedy_keys
        assert keys.index("standardise_targets") < keys.index("smaller_init"), keys
        assert "of the targets" in exploding[0].cause and "He's scale" in exploding[0].cause
        # one mechanism, one cause: NaN at step 2 on one seed and 6 on another was "divergence" once, "non-finite
        # values in the forward pass or the loss" the other time
        assert all(f.cause.startswith("divergence") for f in found if f.kind == "nonfinite"), found


@pytest.mark.parametrize("seed", SEED_0_FAST)
def test_the_doctors_standardised_targets_are_not_told_their_loss_is_in_raw_units(store, seed):
    """Round 15: the doctor's target-standardisation row reached the twin's R² (0.61 against −inf) yet kept a
    "stalled" warning — "the loss starts at 4.7e7 … a regression on targets in their raw units" — on a model the
    row itself made predict mean + std·output (its loss stays in the user's units; at R² 0.6 a squared error need
    not halve). A run of that model has no such finding, and learns (R² ≥ 0.4, by hand)."""
    assert surgery.TargetScaled.__name__ == over_steps.TARGETS_STANDARDISED
    trial = catalog()["standardise_targets"][0].apply(_diabetes(seed), {})
    assert trial is not None and isinstance(trial.model, surgery.TargetScaled)
    with gw.watch(trial.model, trial.optimizer, store=store, name=f"scaled-{seed}") as w:
        for _ in range(300):
            w.log(loss=trial.step())
    assert not [f for f in w.diagnose().problems if f.kind == "stalled"], w.diagnose()
    assert trial.evaluate(trial.model) >= 0.4


def test_fixes_of_a_baseline_without_a_score_are_ranked_by_their_own_held_out_scores():
    """Round 15: the raw-target baseline diverged (R² −inf), so its fixes were ranked by training loss: target
    standardisation + Adam (loss 9.1e6, R² 0.42, overfitted) over clipping + Adam (3.1e7, R² 0.60) — by hand on
    seeds 0–2, 0.38–0.45 against 0.58–0.61. The rows' own scores decide wherever they have them."""
    from gradwatch.doctor.repair import _ranked
    from gradwatch.doctor.table import TrialResult

    lower_loss = TrialResult("target standardisation + Adam", 9.07e6, 1.9e7, 0.419, [], 1.0, verdict="fixes it",
                             parts=("standardise_targets", "adam"))
    better_score = TrialResult("clipping + Adam", 3.08e7, 1.1e8, 0.602, [], 1.0, verdict="fixes it",
                               parts=("clip_norm", "adam"))
    assert _ranked([lower_loss, better_score], [lower_loss, better_score]) == [better_score, lower_loss]


class _SAE(nn.Module):
    """A sparse autoencoder (Bricken et al. 2023, "Towards Monosemanticity"): 64 → 256 ReLU latents → 64, returning
    (reconstruction, latents) as SAE code does."""

    def __init__(self):
        super().__init__()
        self.enc, self.act, self.dec = nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64)

    def forward(self, x):
        z = self.act(self.enc(x))
        return self.dec(z), z


def _sae(seed, lam):
    """Digits reconstructed under MSE + λ·‖z‖₁ (mean over the batch), Adam 1e-2; held out: the fraction of variance
    explained."""
    from gradwatch.zoo.data import batches, digits

    x, _, xt, _ = digits()

    def loss_fn(out, target):
        recon, z = out
        return nn.functional.mse_loss(recon, target) + lam * z.abs().sum(1).mean()

    @torch.no_grad()
    def explained(model):
        recon, _ = model(xt)
        return 1 - float(((recon - xt) ** 2).sum() / ((xt - xt.mean(0)) ** 2).sum())

    torch.manual_seed(seed)
    model = _SAE()
    return gw.Trial(model, torch.optim.Adam(model.parameters(), lr=1e-2), ((b, b) for b, _ in batches(x, x, 64, seed)),
                    loss_fn, explained)


def _train(trial, w, steps=400):
    """The README's loop: the loss logged with its graph (the watch reads what it does to the output once)."""
    readme_loop(trial, w, steps)


def test_the_loss_graph_tells_a_penalty_on_relu_outputs_from_other_losses():
    """The walk from the loss reaches a ReLU's output through |z|, a norm, or a sum of it (z ≥ 0: its L1); an MSE or
    a cross-entropy on a ReLU's output is no penalty."""
    from gradwatch.probes.loss_ops import loss_paths, penalty_on_relu, quadratic_on_squash

    z = torch.relu(torch.randn(4, 8, requires_grad=True))
    target = torch.randn(4, 8)
    assert penalty_on_relu(loss_paths(((z - target) ** 2).mean() + 0.1 * z.abs().sum(1).mean()))
    assert penalty_on_relu(loss_paths(z.norm(p=1, dim=1).mean()))
    assert penalty_on_relu(loss_paths(z.sum()))
    assert not penalty_on_relu(loss_paths(nn.functional.mse_loss(z, target)))
    assert not penalty_on_relu(loss_paths(nn.functional.cross_entropy(z, torch.zeros(4, dtype=torch.long))))
    assert quadratic_on_squash(loss_paths(nn.functional.mse_loss(z, target))) == ""  # no "quadratic cost on a ReLU"


@pytest.mark.slow  # (over 20 min of CI on an AVX2 EPYC with it: `make test-slow` runs it)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_an_autoencoder_whose_l1_penalty_killed_its_latents_is_told_so_and_no_worse_loss_is_a_fix(store, seed):
    """Round 15: at λ = 1 every latent is silent on the training data after 400 steps (measured here) and the
    reconstruction is the mean's (explained variance ≈ 0); the findings named negative biases and the init, never
    the penalty, and the doctor called LeakyReLU + He + lr ×0.1 a fix — explained 0.12, final loss 9.1 against the
    baseline's 0.95 (the twin at λ = 0.01: 0.82). The findings now name the penalty first, a change to the user's
    loss; no row whose final loss ends above twice the baseline's is "fixes it"."""
    trial = _sae(seed, 1.0)
    with gw.watch(trial.model, trial.optimizer, store=store, name=f"sae-{seed}") as w:
        _train(trial, w)
    from gradwatch.zoo.data import digits

    with torch.no_grad():
        _, z = trial.model(digits()[0])
    assert float((z.max(0).values > 0).float().mean()) < 0.05 and trial.evaluate(trial.model) < 0.05
    dead = [f for f in w.diagnose().problems if f.kind in ("dead_units", "vanishing")]
    assert dead and all(f.remedy_keys[0] == "smaller_l1" and "penalty on the ReLU" in f.cause for f in dead), dead

    twin = _sae(seed, 0.01)
    with gw.watch(twin.model, twin.optimizer, store=store, name=f"sae-twin-{seed}") as w:
        _train(twin, w)
    assert not [f for f in w.diagnose().problems if f.severity != "info"] and twin.evaluate(twin.model) > 0.7

    if seed == 0:  # the doctor's table: 2 seeds of its own
        report = gw.doctor(lambda s: _sae(s, 1.0), steps=400, seeds=2, budget_s=120, progress=False,
                           store=store / "doctor")
        base = report.trials[0]
        fixes = [t for t in report.trials[1:] if t.verdict == "fixes it"]
        assert all(t.final_loss <= 2 * base.final_loss for t in fixes), [(t.label, t.final_loss) for t in fixes]
        assert any("the baseline's" in t.verdict and "ends at" in t.verdict for t in report.trials), report
        assert "for you to change in your code" in report.message and "L1 penalty" in report.message


def test_inputs_standardised_already_are_not_standardised_again():
    """Round 15: the doctor tried "input standardisation" on the user's standardised digits (meta input_std 0.98):
    a row of its budget spent on "no change". Inputs whose varying features are centred and of unit scale already
    (constant pixels aside) get no such row; raw pixels and features at std 57 still do."""
    from gradwatch.zoo.data import batches, digits

    x, y, _, _ = digits()
    model = nn.Linear(64, 10)
    standardised = gw.Trial(model, torch.optim.SGD(model.parameters(), lr=0.1), batches(x, y, 64, 0),
                            nn.functional.cross_entropy)
    assert catalog()["standardise_inputs"][0].apply(standardised, {}) is None
    for scale, shift in ((16.0, 0.0), (57.7, 0.0), (1.0, 3.0)):
        model = nn.Linear(64, 10)
        raw = gw.Trial(model, torch.optim.SGD(model.parameters(), lr=0.1), batches(x * scale + shift, y, 64, 0),
                       nn.functional.cross_entropy)
        fixed = catalog()["standardise_inputs"][0].apply(raw, {})
        assert fixed is not None and isinstance(fixed.model, surgery.Standardised)


class _Iterated(nn.Module):
    """One Linear + tanh block applied 30 times in a forward pass (Haber & Ruthotto 2017, §2–3; Dehghani et al.
    2019): h ← tanh(W h + b), or the forward-Euler step h ← h + 0.1·tanh(W h + b) (``euler``, the twin)."""

    def __init__(self, euler):
        super().__init__()
        self.enc, self.block, self.head, self.euler = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 10), euler

    def forward(self, x):
        h = self.enc(x)
        for _ in range(30):
            h = h + 0.1 * torch.tanh(self.block(h)) if self.euler else torch.tanh(self.block(h))
        return self.head(h)


@pytest.mark.parametrize("seed", SEED_0_FAST)
def test_a_block_applied_thirty_times_is_told_across_its_calls_not_per_layer(store, seed):
    """Round 15: the depth finding said "halves every 0.044 layers (×1.5e-07 per layer) from layer enc down to
    layer enc" and "no activation module is visible" — the 30 calls of one block counted as one layer, beside a
    tanh the run had measured. By hand (retain_grad on each h_t): ‖∂L/∂h_0‖ / ‖∂L/∂h_30‖ below 1e-4, so the encoder
    gets nothing and the net stays at chance. The finding now names the calls and leaves the rate per call to the
    finding through time; the Euler twin learns with no warning."""
    from gradwatch.zoo.data import digits_trial

    for euler in (False, True):
        trial = digits_trial(_Iterated(euler), seed, 0.05)
        with gw.watch(trial.model, trial.optimizer, store=store, name=f"loop-{seed}-{euler}") as w:
            for _ in range(200):
                w.log(loss=trial.step())
        found = w.diagnose().problems
        if euler:
            assert not [f for f in found if f.severity != "info"] and trial.evaluate(trial.model) > 0.9
            continue
        x, y = next(trial.batches)
        hs = [trial.model.enc(x)]
        for _ in range(30):
            hs.append(torch.tanh(trial.model.block(hs[-1])))
        for h in hs:
            h.retain_grad()
        nn.functional.cross_entropy(trial.model.head(hs[-1]), y).backward()
        assert float(hs[0].grad.norm() / hs[-1].grad.norm()) < 1e-4 and trial.evaluate(trial.model) < 0.2
        depth = [f for f in found if f.kind == "vanishing" and f.cause_key == "loop"]
        assert depth and "across the 30 calls of block" in depth[0].evidence, found
        assert "halves every" not in depth[0].evidence and "no activation is seen" not in depth[0].cause
        through = [f for f in found if f.kind == "vanishing" and "through time in block" in f.summary]
        per_call = 2 ** (-1 / through[0].numbers["halving_steps"])
        assert 0.4 < per_call < 0.8, per_call  # by hand (the helper's retain_grad): ×0.62 a call
        assert "not sufficient" in through[0].evidence  # λ₁ ≥ 1 beside a gradient measured to vanish


def test_a_nan_made_by_torchs_own_loss_or_modules_is_placed_in_the_trial_not_at_the_doctors_call():
    """Round 15: "the first NaN/Inf is made by torch.nn.functional.mse_loss at doctor.py:8 (`report = gw.doctor(…)`)"
    — no line of the user's computed it: ``F.mse_loss`` was the set-up's ``loss_fn``, called by the default
    ``Trial.step()``. By hand, the diabetes ×100 set-up's loss first overflows at a step ≤ 10; the origin names the
    loss_fn and that step. A NaN made inside torch's own modules (an nn.Sequential) names the model."""
    from gradwatch.doctor.locate import locate_nonfinite

    trial, first = _diabetes(0), None
    for step in range(12):
        if not torch.isfinite(torch.as_tensor(trial.step())):
            first = step
            break
    assert first is not None
    origin = locate_nonfinite(_diabetes, 0, first + 1)
    assert origin is not None and origin.step == first and "mse_loss" in origin.op, origin
    assert "the set-up's loss_fn" in str(origin) and "test_round15.py" not in origin.where

    def overflowing(seed):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(4, 4), nn.Softplus(beta=1.0, threshold=1e9), nn.Linear(4, 1))
        with torch.no_grad():
            model[0].weight.fill_(1e38)
        x = torch.ones(8, 4)
        return gw.Trial(model, torch.optim.SGD(model.parameters(), lr=0.1), iter([(x, torch.zeros(8, 1))] * 4),
                        nn.functional.mse_loss)

    origin = locate_nonfinite(overflowing, 0, 1)
    assert origin is not None and origin.step == 0 and "the set-up's model" in str(origin), origin
    # round 29: a layer's product that overflows is the divergence, not a line to mend
    assert origin.overflowed and "overflowed the float range" in str(origin), origin


class _Sine(nn.Module):
    """SIREN's activation, sin(ω₀·x) with ω₀ = 30 (Sitzmann et al. 2020): a module of a type the watch does not know."""

    def forward(self, x):
        return torch.sin(30.0 * x)


def _siren(seed, paper_init=False):
    """A SIREN 1-64-64-64-1 fitting a 1-D signal on 300 grid points (full batch, MSE, Adam 1e-4, the paper's), scored
    by R² on the 299 midpoints. PyTorch's default init leaves every hidden pre-activation at std ≈ 12; the paper's
    (supplement §1) draws hidden weights U(±√(6/n)/ω₀) and the first U(±1/n)."""
    import math

    def signal(x):
        return torch.sin(2 * math.pi * 3 * x) + 0.5 * torch.sin(2 * math.pi * 7 * x + 1) + 0.3 * torch.tanh(20 * x)

    x = torch.linspace(-1, 1, 300)[:, None]
    xt = (x[:-1] + x[1:]) / 2
    y, yt = signal(x), signal(xt)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(1, 64), _Sine(), nn.Linear(64, 64), _Sine(), nn.Linear(64, 64), _Sine(),
                          nn.Linear(64, 1))
    if paper_init:
        with torch.no_grad():
            for i, layer in enumerate(m for m in model if isinstance(m, nn.Linear)):
                bound = 1.0 if i == 0 else math.sqrt(6 / layer.in_features) / 30.0
                layer.weight.uniform_(-bound, bound)

    @torch.no_grad()
    def r2(m):
        return float(1 - ((m(xt) - yt) ** 2).mean() / ((yt - yt.mean()) ** 2).mean())

    def batches():
        while True:
            yield x, y

    return gw.Trial(model, torch.optim.Adam(model.parameters(), lr=1e-4), batches(), nn.functional.mse_loss, r2)


@pytest.mark.parametrize("seed", SEED_0_FAST)
def test_a_siren_at_the_default_init_is_repaired_by_dividing_out_its_measured_growth(store, seed):
    """Round 15: SIREN under nn.Linear's default init — ‖∂L/∂a‖ ×12 a layer (by hand: first/last Linear ≈ 1.8e3),
    the training points memorised (loss ~1e-8), R² < 0 between them; told "orthogonal or Xavier", both larger than
    the default here, and the doctor had no row that makes weights smaller. The finding now offers dividing the
    weights after the first layer by the measured growth, and the doctor's row doing that learns the signal
    (R² ≥ 0.9 held out, as the paper's init does) where the baseline stays below 0.5."""
    from gradwatch.doctor.catalogue import shown_label

    trial = _siren(seed)
    with gw.watch(trial.model, trial.optimizer, store=store, name=f"siren-{seed}") as w:
        for _ in range(300):
            w.log(loss=trial.step())
    assert trial.evaluate(trial.model) < 0.5
    exploding = [f for f in w.diagnose().problems if f.kind == "exploding"]
    assert exploding and "rescale_weights" in exploding[0].remedy_keys, exploding
    growth = exploding[0].numbers["growth_per_layer"]
    assert 5 < growth < 30, growth  # by hand: ≈ 12
    assert "does not know" in exploding[0].cause

    remedy = catalog()["rescale_weights"][0]
    assert "÷" in shown_label(remedy, {"growth_per_layer": growth})
    fixed = remedy.apply(_siren(seed), {"growth_per_layer": growth})
    assert fixed is not None
    first = [m for m in fixed.model if isinstance(m, nn.Linear)][0]
    assert torch.equal(first.weight, [m for m in _siren(seed).model if isinstance(m, nn.Linear)][0].weight)
    for _ in range(300):
        fixed.step()
    twin = _siren(seed, paper_init=True)
    for _ in range(300):
        twin.step()
    assert fixed.evaluate(fixed.model) >= 0.9 and twin.evaluate(twin.model) >= 0.9


def test_a_model_that_returns_a_tuple_has_a_constant_outputs_loss():
    """Round 15: the SAE returns (reconstruction, latents), so the loss of a constant output — the doctor's ceiling
    for a fix — was silently NaN. It is now the lower of every tensor at zeros and the one shaped like the targets
    at their mean: here the mean's reconstruction error, λ·0 for the latents (by hand on the same batches)."""
    from gradwatch.trial import NULL_BATCHES, null_loss

    value = null_loss(_sae(0, 1.0))
    reference = _sae(0, 1.0)
    batches = [next(reference.batches) for _ in range(NULL_BATCHES)]
    mean = torch.cat([y for _, y in batches]).mean(0)
    by_hand = float(np.mean([float(nn.functional.mse_loss(mean.expand_as(y), y)) for _, y in batches]))
    assert value == pytest.approx(by_hand, rel=1e-5) and 0.5 < value < 1.5  # standardised digits: about 1
