"""The twenty-fifth session's set-ups: round 20's (written from the README alone, each ported from a public source)
that the watch called healthy, each against its reference."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gradwatch as gw
from gradwatch import trial as trial_module
from gradwatch.diagnosis.findings import sci
from gradwatch.store import open_run
from gradwatch.zoo.train import readme_watched
from conftest import SEED_0_FAST, shuffled_batches as _feed


_train = readme_watched


# -- round 20: a binary classifier of rare positives that answers the majority only ----------------------------------


def _rare(n, seed, rate=0.05, shift=0.8):
    """5 % positives shifted by 0.8 in 3 of 20 standard normal features: the classes overlap."""
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(n, generator=g) < rate).float()
    x = torch.randn(n, 20, generator=g)
    x[:, :3] += shift * y[:, None]
    return x, y[:, None]


def _balanced_accuracy(model, x, y, at=0.0):
    with torch.no_grad():
        said = (model(x) > at).float()
    return 0.5 * (float((said[y == 1] == 1).float().mean()) + float((said[y == 0] == 0).float().mean()))


def _imbalanced(seed, weighted=False, probabilities=False):
    """discuss.pytorch.org t/145203 ("predictions stuck at zero when the positive label is only 16 % of the data"):
    an MLP under Adam 3e-3 and an unweighted BCEWithLogitsLoss; the answer there: pos_weight = n_neg / n_pos.
    ``probabilities``: the same net ending in a sigmoid under nn.BCELoss. Scored by the balanced accuracy."""
    torch.manual_seed(seed)
    xtr, ytr = _rare(6000, 20 + seed)
    xte, yte = _rare(4000, 77)
    layers = [nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 1)] + ([nn.Sigmoid()] if probabilities else [])
    model = nn.Sequential(*layers)
    weight = (1 - ytr).sum() / ytr.sum() if weighted else None
    loss = nn.BCELoss() if probabilities else nn.BCEWithLogitsLoss(pos_weight=weight)
    return gw.Trial(model, torch.optim.Adam(model.parameters(), lr=3e-3), _feed(xtr, ytr, seed), loss,
                    evaluate=lambda m: _balanced_accuracy(m, xte, yte, 0.5 if probabilities else 0.0))


def _two_logits(seed, weighted=False):
    """The same task written as most tutorials write a binary classifier: two logits under nn.CrossEntropyLoss
    (weighted: weight = (n_pos/n_neg, 1) for classes (0, 1), the forum's fix in this form). Balanced accuracy."""
    torch.manual_seed(seed)
    xtr, ytr = _rare(6000, 20 + seed)
    xte, yte = _rare(4000, 77)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 2))
    weight = torch.tensor([float(ytr.sum() / (1 - ytr).sum()), 1.0]) if weighted else None

    def score(m):
        with torch.no_grad():
            said = m(xte).argmax(1).float()
        y = yte[:, 0]
        return 0.5 * (float((said[y == 1] == 1).float().mean()) + float((said[y == 0] == 0).float().mean()))
    return gw.Trial(model, torch.optim.Adam(model.parameters(), lr=3e-3), _feed(xtr, ytr[:, 0].long(), seed),
                    nn.CrossEntropyLoss(weight=weight), evaluate=score)


def test_the_outputs_predicted_share_and_its_targets_positive_share_are_read_as_by_hand(tmp_path):
    """On the steps that read ‖∂L/∂a‖, a one-score-a-sample output's share above 0 and above ½ is the batch's own
    (by hand from the output), and the share of its gradient's entries below 0 is the batch's positive rate (by
    hand from the targets): ∂L/∂z = (σ(z) − y)/B."""
    trial = _imbalanced(0)
    by_hand: dict[int, tuple[float, float, float]] = {}
    with gw.watch(trial.model, trial.optimizer, store=tmp_path, name="shares", budget=None) as w:
        for step in range(40):
            x, y = next(trial.batches)
            out = trial.model(x)
            loss = trial.loss_fn(out, y)
            by_hand[step] = (float((out > 0).float().mean()), float((out > 0.5).float().mean()), float(y.mean()))
            trial.optimizer.zero_grad()
            loss.backward()
            trial.optimizer.step()
            w.log(loss=loss)
    run = open_run(tmp_path / "shares")
    read = {q: run.series(q, "run") for q in ("out_positive", "out_above_half", "target_positive")}
    assert len(read["target_positive"].steps) >= 4
    for column, q in enumerate(read):
        steps, values = read[q].steps, read[q].values[0]
        assert [by_hand[int(s)][column] for s in steps] == pytest.approx(values.tolist(), abs=1e-9), q


@pytest.mark.parametrize("seed", SEED_0_FAST)
def test_a_classifier_that_answers_the_majority_only_is_told_so_and_its_weighted_twin_is_not(store, seed):
    """Round 20: "No findings: the gradients look healthy" on all seeds, at a balanced accuracy of 0.500. By hand the
    model predicts no positive on the held-out set while the loss falls (to below the prior's entropy). The watch now
    says the classifier answers the negative class only, with pos_weight first; the twin (pos_weight = n_neg/n_pos,
    the forum's answer) learns, no finding."""
    trial = _imbalanced(seed)
    w = _train(trial, store, f"rare-{seed}", 300)
    assert trial.evaluate(trial.model) == 0.5
    (f,) = w.diagnose().problems
    assert f.kind == "stalled" and f.summary.startswith("the classifier predicts the negative class only: 0.0% ")
    assert f.remedy_keys[0] == "pos_weight" and "prior_bias" not in f.remedy_keys
    assert 0.02 < f.numbers["positive_rate"] < 0.08  # the batches' rate, by the gradient's signs (the data's 0.05)

    twin = _imbalanced(seed, weighted=True)
    tw = _train(twin, store, f"rare-twin-{seed}", 300)
    assert twin.evaluate(twin.model) > 0.7
    assert not tw.diagnose().problems


def test_a_classifier_of_probabilities_under_bce_answering_the_majority_is_told_so_too(store):
    """The same net ending in a sigmoid under nn.BCELoss: a probability above ½ is a positive answer."""
    trial = _imbalanced(0, probabilities=True)
    w = _train(trial, store, "rare-probabilities", 300)
    assert trial.evaluate(trial.model) == 0.5
    (f,) = w.diagnose().problems
    assert "a probability above ½" in f.evidence and f.remedy_keys[0] == "pos_weight"


def test_the_majority_label_and_the_shares_labelled_and_predicted_otherwise_are_read_as_by_hand():
    """majority_shares by hand from the labels and the argmax: the most common label, the shares of rows labelled
    and predicted otherwise (the rows whose gradient has one negative entry: a cross-entropy's)."""
    from gradwatch.probes.output import majority_shares

    g = torch.Generator().manual_seed(0)
    for classes in (2, 5):
        y = torch.randint(0, classes, (64,), generator=g)
        y[:40] = 1
        z = torch.randn(64, classes, generator=g, requires_grad=True)
        F.cross_entropy(z, y).backward()
        predicted = z.detach().argmax(1)
        top, labelled, said = (float(t) for t in majority_shares(z.grad, predicted))
        assert top == 1.0
        assert labelled == pytest.approx(float((y != 1).float().mean()))
        assert said == pytest.approx(float((predicted != 1).float().mean()))


@pytest.mark.parametrize("seed", SEED_0_FAST)
def test_two_logits_under_cross_entropy_answering_the_majority_are_told_so_and_the_weighted_twin_is_not(store, seed):
    """The binary task as two logits under nn.CrossEntropyLoss: by hand it predicts class 0 for every held-out row
    (balanced accuracy 0.5); told "predicts class 0 only", class_weight first. The twin (weight=) learns, no finding."""
    trial = _two_logits(seed)
    w = _train(trial, store, f"two-{seed}", 300)
    assert trial.evaluate(trial.model) == 0.5
    (f,) = w.diagnose().problems
    assert f.summary.startswith("the classifier predicts class 0 only: 0.0% of its outputs name another class")
    assert f.remedy_keys[0] == "class_weight" and f.numbers["majority_class"] == 0
    assert 0.92 < f.numbers["majority_share"] < 0.98

    twin = _two_logits(seed, weighted=True)
    tw = _train(twin, store, f"two-twin-{seed}", 300)
    assert twin.evaluate(twin.model) > 0.7
    assert not tw.diagnose().problems


def test_class_weight_is_torchs_weight_on_every_cross_entropy_called_within_it():
    """Within ClassWeight(k, w): F.cross_entropy, nn.CrossEntropyLoss and F.nll_loss give what torch gives with
    weight = 1 everywhere but w at class k (by hand); a call with a weight of its own is left as it is."""
    from gradwatch.remedies.structure import ClassWeight

    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(16, 3, generator=g), torch.randint(0, 3, (16,), generator=g)
    weight = torch.tensor([1.0, 0.2, 1.0])
    by_hand = F.cross_entropy(z, y, weight=weight)
    with ClassWeight(1, 0.2):
        assert torch.allclose(F.cross_entropy(z, y), by_hand)
        assert torch.allclose(nn.CrossEntropyLoss()(z, y), by_hand)
        assert torch.allclose(F.nll_loss(F.log_softmax(z, 1), y), by_hand)
        own = torch.tensor([2.0, 1.0, 1.0])
        assert torch.allclose(F.cross_entropy(z, y, own), F.cross_entropy(z, y, weight=own))
    assert not torch.allclose(F.cross_entropy(z, y), by_hand)


def test_positive_weight_is_torchs_pos_weight_on_every_binary_cross_entropy_called_within_it():
    """Within PositiveWeight(w): F.binary_cross_entropy_with_logits and nn.BCEWithLogitsLoss give what torch gives with
    pos_weight=w (by hand), F.binary_cross_entropy and nn.BCELoss on probabilities the same loss (their weight
    1 + (w − 1)·y); a call that weighs its classes itself is left as it is; closed, nothing changes."""
    from gradwatch.remedies.structure import PositiveWeight

    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(16, 1, generator=g), (torch.rand(16, 1, generator=g) < 0.3).float()
    by_hand = F.binary_cross_entropy_with_logits(z, y, pos_weight=torch.tensor(7.0))
    own = F.binary_cross_entropy_with_logits(z, y, pos_weight=torch.tensor(2.0))
    with PositiveWeight(7.0):
        assert torch.allclose(F.binary_cross_entropy_with_logits(z, y), by_hand)
        assert torch.allclose(nn.BCEWithLogitsLoss()(z, y), by_hand)
        assert torch.allclose(F.binary_cross_entropy(torch.sigmoid(z), y), by_hand, atol=1e-6)
        assert torch.allclose(nn.BCELoss()(torch.sigmoid(z), y), by_hand, atol=1e-6)
        assert torch.allclose(nn.BCEWithLogitsLoss(pos_weight=torch.tensor(2.0))(z, y), own)
    assert torch.allclose(F.binary_cross_entropy_with_logits(z, y), F.binary_cross_entropy_with_logits(z, y,
                                                                                                       weight=None))
    assert not torch.allclose(F.binary_cross_entropy_with_logits(z, y), by_hand)


def test_a_constant_that_scores_what_the_trained_model_scores_is_measured(tmp_path):
    """Every constant scores a balanced accuracy of 0.500, as the classifier that answers the majority does: the
    constant's score is measured (it calls the model it was given), so that a row must beat it; an
    evaluate that never calls the model it is given has no null score."""
    trial = _imbalanced(0)
    _, constant = trial_module.null_output(trial)
    assert trial_module.null_score(trial, constant) == 0.5
    trial.evaluate = lambda model: 0.5
    assert math.isnan(trial_module.null_score(trial, constant))


@pytest.mark.slow  # a doctor table on a round's set-up: make test-slow (CI's 20 minutes on 2 cores)
def test_the_doctor_weighs_the_majority_class_of_two_logits_down(tmp_path):
    """The two-logit form: the doctor's row weighs class 0 (1 − m)/m in the set-up's cross-entropy (torch's weighted
    mean: the loss starts near ln 2 and cannot halve over overlapping classes). It removes the finding at a balanced
    accuracy above 0.7 against 0.5, but its loss did not halve: by the verdict's rule no fix, the closest row named
    with both scores."""
    report = gw.doctor(_two_logits, steps=300, budget_s=120, store=tmp_path)
    row = next(t for t in report.trials if t.label == "the majority class weighed down to the rest")
    assert row.score > 0.7 and report.baseline.score == 0.5 and not row.findings
    assert row.final_loss > 0.5 * row.first_loss and row.verdict.startswith("removes the finding; a better score")
    assert report.message.startswith("no remedy fixes it (findings gone and the loss at most half its start); closest: "
                                     "the majority class weighed down to the rest")


@pytest.mark.slow  # a doctor table on a round's set-up: make test-slow (CI's 20 minutes on 2 cores)
def test_the_doctor_weighs_the_rare_class_up(tmp_path):
    """The doctor's row runs the set-up's loss with pos_weight = (1 − π)/π, π the rate the finding measured: it is
    another objective, held to its own start and its own constant output (its loss, 2.0 → 0.81, is not the
    baseline's 0.15): balanced accuracy 0.74 against 0.50, held on another seed — the forum's fix."""
    report = gw.doctor(_imbalanced, steps=300, budget_s=120, store=tmp_path)
    assert report.best is not None and report.best.label == "the rare class weighed up"
    assert report.best.score > 0.7 and report.baseline.score == 0.5 and "held on a seed" in report.message
    assert report.best.changed.startswith("pos_weight = (1 − π)/π = ")


# -- round 20: breast cancer's raw features (the wording of what was found) -----------------------------------------


def _raw_features(seed, standardise=False):
    """stackoverflow.com/q/47807402: a breast-cancer MLP (30 → 32 ReLU → 1) under SGD 0.01 on the raw features (their
    scales 10⁻³ … 4·10³); the fix: standardised inputs (LeCun et al. 1998, §4.3). Scored by accuracy at logit 0."""
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    data = load_breast_cancer()
    x, y = torch.tensor(data.data, dtype=torch.float32), torch.tensor(data.target, dtype=torch.float32)[:, None]
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y[:, 0])
    if standardise:
        mean, std = xtr.mean(0), xtr.std(0)
        xtr, xte = (xtr - mean) / std, (xte - mean) / std
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(30, 32), nn.ReLU(), nn.Linear(32, 1))

    def accuracy(m):
        with torch.no_grad():
            return float(((m(xte) > 0).float() == yte).float().mean())
    return gw.Trial(model, torch.optim.SGD(model.parameters(), lr=1e-2), _feed(xtr, ytr, seed, 32),
                    nn.BCEWithLogitsLoss(), evaluate=accuracy)


@pytest.mark.parametrize("seed", SEED_0_FAST)
def test_raw_features_are_named_first_in_every_finding_and_the_loss_is_told_from_where_it_began(store, seed):
    """Round 20: seed 1's "exploding from step 1" named re-initialisation and clipping, not the inputs its other
    findings named; the dead units' evidence said "the loss went 0.69 → 0.67 … stayed at its start value" of a loss
    that began at 35–40 (medians of the first ten hide it); the vanishing gradient was "since step 0", where it was
    not yet 0. By hand: the first loss; every finding now puts input standardisation first, the first logged loss is
    said, and the onset is a read where the gradient was already 0 (not step 0). The twin learns, no finding."""
    trial = _raw_features(seed)
    x, y = next(trial.batches)
    with torch.no_grad():
        began = float(trial.loss_fn(trial.model(x), y))
    assert began > 5.0
    trial = _raw_features(seed)
    w = _train(trial, store, f"raw-{seed}", 300)
    assert trial.evaluate(trial.model) < 0.7
    problems = w.diagnose().problems
    assert problems and all(f.remedy_keys[0] == "standardise_inputs" for f in problems)
    dead = next(f for f in problems if f.kind == "dead_units")
    assert f"it began at {sci(began)}" in dead.evidence
    assert dead.evidence.count("the loss went") == 1
    vanishing = next(f for f in problems if f.kind == "vanishing")
    run = open_run(store / f"raw-{seed}")
    g = run.series("out_grad_norm", "layer")
    first = g.values[list(g.names).index(vanishing.layers[0])]
    onset = vanishing.steps[0]
    assert onset > 0 and first[list(g.steps).index(onset)] == 0.0

    twin = _raw_features(seed, standardise=True)
    tw = _train(twin, store, f"raw-twin-{seed}", 300)
    assert twin.evaluate(twin.model) > 0.85
    assert not tw.diagnose().problems


def test_an_onset_is_a_step_where_the_condition_held():
    """since(): the final run of flags, judged by the majority around each; the step it returns has its own flag
    True (by hand: flags F T T T T at steps 0, 16, 32, 48, 64 with a window of 5 start at 16 — the majority around
    step 0, F T T, is True), and one False inside the run does not end it."""
    from gradwatch.diagnosis.view import since

    steps = np.array([0, 16, 32, 48, 64])
    assert since(np.array([False, True, True, True, True]), steps, 5) == 16
    assert since(np.array([True, True, False, True, True]), steps, 5) == 0
    assert since(np.array([False, False, True, True, True]), steps, 1) == 32


@pytest.mark.slow  # a doctor table on a round's set-up: make test-slow (CI's 20 minutes on 2 cores)
def test_a_smaller_change_within_the_best_rows_own_seed_spread_is_recommended(tmp_path):
    """Round 20: LeakyReLU + He + learning rate ×0.1 (0.918; 0.936 on its check seed) was chosen over input
    standardisation (0.906, the cause the findings named and the source's fix), 0.012 apart, outside the 0.01 tie,
    where the best row's own two seeds differ by 0.018. A lighter fix within that spread is checked on the same seed
    and, where it holds, recommended, the message saying by how much the other scored higher."""
    report = gw.doctor(_raw_features, steps=300, budget_s=120, store=tmp_path)
    assert report.best is not None and report.best.label == "input standardisation"
    first, second = report.checks
    assert first.verdict == second.verdict == "fixes it" and second.label.startswith("input standardisation")
    heavier = next(t for t in report.trials if t.label == first.label.rsplit(" (seed", 1)[0])
    spread = abs(heavier.score - first.score)
    assert heavier.score - spread <= report.best.score < heavier.score - 0.01
    assert f"within its own two seeds' spread ({spread:.3f}): the smaller change is recommended" in report.message


def test_only_a_lighter_row_within_the_spread_outranks_the_best():
    """_lighter_within_spread by hand: rows of fewer changes whose score lies within the best row's seed spread
    below it (the lightest, then the best scored); none where the spread is within the tie, the check failed, or
    every lighter row lies further down."""
    from gradwatch.doctor.repair import _lighter_within_spread
    from gradwatch.doctor.table import TrialResult

    def row(label, score, parts, verdict="fixes it"):
        return TrialResult(label, 0.1, 0.2, score, [], 1.0, verdict=verdict, parts=parts)

    best = row("heavy", 0.92, ("leaky", "lower_lr"))
    check = row("heavy (seed 1)", 0.94, ("leaky", "lower_lr"))
    light, lighter_worse, far = row("std", 0.906, ("standardise_inputs",)), row("lr", 0.901, ("lower_lr",)), \
        row("adam", 0.89, ("adam",))
    assert _lighter_within_spread([best, light, lighter_worse, far], best, check) is light
    assert _lighter_within_spread([best, far], best, check) is None
    assert _lighter_within_spread([best, light], best, row("heavy (seed 1)", 0.925, best.parts)) is None
    assert _lighter_within_spread([best, light], best, row("heavy (seed 1)", 0.94, best.parts, "no change")) is None


def test_units_of_a_module_named_by_a_bare_index_say_module():
    """Round 19: "the units of 3" read as "the third layer". A bare index (a Sequential's child) is called a module;
    a dotted path is not changed."""
    from gradwatch.diagnosis.findings import modules_span

    assert modules_span(["3"]) == "module 3"
    assert modules_span(["1", "3", "5"]) == "modules 1…5"
    assert modules_span(["net.1"]) == "net.1" and modules_span(["1", "net.3"]) == "1…net.3"


def test_an_output_that_predicts_the_targets_mean_under_a_squared_error_is_no_collapse(tmp_path):
    """Pascanu's adding problem on a hand-unrolled RNN cell with orthogonal recurrent weights (the doctor's first row
    on `pascanu_rnncell_loop`): by hand its held-out R² is about 0 — it predicts the targets' mean, its output spread
    near 0. The collapse rule told it "the model's output collapsed … a triplet or contrastive loss", and the doctor's
    next round followed that finding instead of the baseline's remedies and lost its repair (orthogonal + Adam +
    GRU cell, 0.996). An output that stopped depending on the input under a loss against targets is no collapse."""
    from gradwatch.doctor import catalogue
    from gradwatch.doctor.trial_run import run_trial

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks import setups

    bench = setups.get("pascanu_rnncell_loop")
    remedy = catalogue.catalog()["orthogonal_rnn"][0]
    run = run_trial(bench.make, 0, bench.steps, tmp_path, "orthogonal", remedy, {})
    assert run is not None and abs(run.score) < 0.05
    assert "MseLossBackward0" in (open_run(tmp_path / "orthogonal").meta.get("loss_ops") or ())
    assert not [f for f in run.diagnosis.problems if f.summary.startswith("the model's output collapsed")]
