"""Round 14's friction and findings, each against its reference."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

import gradwatch as gw
from gradwatch.diagnosis import Diagnosis
from gradwatch.doctor.table import DoctorReport, TrialResult
from conftest import SEED_0_FAST


def test_the_doctor_table_never_cuts_a_label_or_the_findings_left():
    """Round 13: "clipping at max_norm=1 + learning rate ×" — the bound's factor was cut at 40 characters and the
    findings left at 28. Every label and findings list is printed whole, and the columns stay aligned."""
    long = "gradient-norm clipping at max_norm=1 + learning rate ×0.1 + Adam (lr 0.001)"
    base = TrialResult("baseline (no change)", 3.0, 2.0, math.nan, ["saturation", "stalled", "vanishing"], 1.0,
                       verdict="has findings", first_loss=3.0)
    row = TrialResult(long, 0.5, 1.0, math.nan, [], 1.0, verdict="fixes it", first_loss=3.0)
    report = DoctorReport(base, Diagnosis([]), [row], best=row, message="best remedy: …", steps=10, seeds=2)
    lines = str(report).splitlines()
    head = next(l for l in lines if l.startswith("remedy"))
    body = [l for l in lines if l.startswith((long, "baseline"))]
    assert any(l.startswith(long + " ") for l in body)
    assert any("saturation, stalled, vanishing " in l for l in body)
    col = head.index("findings left")
    assert {l[col:].split("  ")[0].strip() for l in body} == {"saturation, stalled, vanishing", "none"}


def _row(label, score, final, findings=(), verdict="", learned=True, critical=()):
    return TrialResult(label, final, final, score, list(findings), 1.0, verdict=verdict, first_loss=3.0,
                       learned=learned, critical=list(critical))


def test_a_row_that_learned_better_with_a_harmless_finding_left_is_told_beside_the_fix():
    """Round 13's RealNVP: clipping alone scored 0.80 and left the dead-units finding (its healthy twin has it too);
    clipping + learning rate ×0.1 removed it, "fixes it" at 0.54, and was the only row the message named. The
    message now names the better-scoring row, its score against the fix's, and the finding it left; not where that
    row is no better, left a critical finding, or did not learn."""
    from gradwatch.doctor.repair import _better_with_a_finding_left

    base = _row("baseline", 0.10, 2.9, ["exploding", "dead_units"], learned=False)
    fix = _row("clipping at max_norm=1 + learning rate ×0.1", 0.537, 0.9, verdict="fixes it")
    clip = _row("gradient-norm clipping at max_norm=1", 0.796, 0.6, ["dead_units"], "helps; finding remains")
    report = DoctorReport(base, Diagnosis([]), [clip, fix], best=fix)
    words = _better_with_a_finding_left(report, base, fix)
    assert words.startswith("; gradient-norm clipping at max_norm=1 learned better (score 0.796, against 0.537) "
                            "but left dead_units (not critical)")
    for other in (_row(clip.label, 0.56, 0.6, ["dead_units"], clip.verdict),  # within the margin of the fix
                  _row(clip.label, 0.796, 0.6, ["dead_units"], clip.verdict, critical=["dead_units"]),
                  _row(clip.label, 0.796, 2.0, ["dead_units"], clip.verdict, learned=False)):
        assert _better_with_a_finding_left(DoctorReport(base, Diagnosis([]), [other, fix], best=fix), base, fix) == ""


V, L, K, D = 2000, 40, 4, 64  # vocabulary, tokens per document, classes, embedding width


def _keyword_docs(n, g):
    """Documents of L random tokens, each carrying 3 of its class's 10 keywords."""
    x = torch.randint(K * 10, V, (n, L), generator=g)
    y = torch.randint(0, K, (n,), generator=g)
    for _ in range(3):
        x[torch.arange(n), torch.randint(0, L, (n,), generator=g)] = y * 10 + torch.randint(0, 10, (n,), generator=g)
    return x, y


class _Bag(nn.Module):
    """fastText's bag of embeddings (Joulin et al. 2017) summed into a tanh, at nn.EmbeddingBag's N(0, 1) default."""

    def __init__(self):
        super().__init__()
        self.emb, self.fc = nn.EmbeddingBag(V, D, mode="sum"), nn.Linear(D, K)

    def forward(self, tokens):
        return self.fc(torch.tanh(self.emb(tokens)))


def _saturated(model, x):
    with torch.no_grad():
        return float(((1 - torch.tanh(model.emb(x)) ** 2) < 0.02).double().mean())


@pytest.mark.parametrize("seed", SEED_0_FAST)
def test_xavier_draws_an_oversized_embedding_again_and_the_bag_of_words_then_learns(seed):
    """Round 13: the watch named the init of a tanh 68 % saturated from step 0, but the doctor's Xavier row left the
    EmbeddingBag (its cause) at N(0, 1): "no change", 0.72. An embedding is a linear map from a one-hot input, so its
    Xavier variance is 2 / (1 + dim) (closed form below); drawn again at it, the tanh is < 5 % saturated (by hand)
    and 400 SGD steps reach ≥ 0.95 held out where the default stays below 0.8. An embedding already smaller (a
    GPT's N(0, 0.02)) and its padding row are left as they were."""
    g = torch.Generator().manual_seed(7)
    (xtr, ytr), (xte, yte) = _keyword_docs(3000, g), _keyword_docs(1000, g)
    scores = {}
    for fix in (False, True):
        torch.manual_seed(seed)
        model = _Bag()
        opt = torch.optim.SGD(model.parameters(), lr=0.5)  # built before the remedy, as a user's set-up is
        if fix:
            assert _saturated(model, xte) > 0.5
            gw.remedies.xavier_init(model, inplace=True)
            assert float(model.emb.weight.detach().std()) == pytest.approx(math.sqrt(2 / (1 + D)), rel=0.02)
            assert _saturated(model, xte) < 0.05
        rng = torch.Generator().manual_seed(seed)
        for _ in range(400):
            i = torch.randint(0, len(xtr), (64,), generator=rng)
            loss = nn.functional.cross_entropy(model(xtr[i]), ytr[i])
            opt.zero_grad(); loss.backward(); opt.step()
        with torch.no_grad():
            scores[fix] = float((model(xte).argmax(1) == yte).float().mean())
    assert scores[False] < 0.8 and scores[True] >= 0.95, scores

    small = nn.Embedding(100, 32, padding_idx=0)
    nn.init.normal_(small.weight, std=0.02)
    before = small.weight.detach().clone()
    gw.remedies.xavier_init(nn.Sequential(small, nn.Linear(32, 2)), inplace=True)
    assert torch.equal(small.weight, before)
    big = nn.Embedding(100, 32, padding_idx=0)
    gw.remedies.xavier_init(nn.Sequential(big, nn.Linear(32, 2)), inplace=True)
    assert float(big.weight.detach().std()) < math.sqrt(2 / 33) * 1.1 and not big.weight[0].any()


def test_the_loss_graph_names_a_quadratic_cost_or_a_hand_written_log_on_a_squashed_output():
    """The backward nodes between the loss and the last layer, against losses whose structure is known by
    construction: a squared error on a sigmoid/tanh output, a log of a sigmoid's or softmax's output written by
    hand; not a loss on the logits, not BCE on a sigmoid beside an L2 penalty (its Pow is on the weights), not
    nn.CrossEntropyLoss on a softmax (LogSoftmax, no hand-written log), not a hidden sigmoid behind a layer."""
    from gradwatch.probes.loss_ops import log_of_probabilities, loss_paths, quadratic_on_squash

    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(4, 8), nn.Sigmoid(), nn.Linear(8, 3))
    x, y = torch.randn(5, 4), torch.rand(5, 3)
    f = nn.functional
    cases = {
        "mse on sigmoid": (f.mse_loss(torch.sigmoid(body(x)), y), "sigmoid", ""),
        "(tanh - y)² by hand": (((torch.tanh(body(x)) - y) ** 2).sum(), "tanh", ""),
        "hand-written BCE": ((lambda p: -(y * torch.log(p) + (1 - y) * torch.log(1 - p)).mean())(torch.sigmoid(body(x))),
                             "", "sigmoid"),
        "-log softmax by hand": (-torch.log(torch.softmax(body(x), -1)).mean(), "", "softmax"),
        "BCE with logits": (f.binary_cross_entropy_with_logits(body(x), y), "", ""),
        "BCE + L2": (f.binary_cross_entropy(torch.sigmoid(body(x)), y) + sum(p.pow(2).sum() for p in body.parameters()),
                     "", ""),
        "CE on a softmax": (f.cross_entropy(torch.softmax(body(x), -1), y.argmax(1)), "", ""),
        "mse on logits": (f.mse_loss(body(x), y), "", ""),
    }
    for name, (loss, quadratic, logged) in cases.items():
        paths = loss_paths(loss)
        assert (quadratic_on_squash(paths), log_of_probabilities(paths)) == (quadratic, logged), (name, paths)
    assert loss_paths(torch.tensor(1.0)) == []


def _digits_ae(seed, cross_entropy):
    """Nielsen's ch. 3 set-up, ported: a sigmoid autoencoder 64-100-64 on digits (pixels in [0, 1]), every weight
    and bias N(0, 1), SGD 0.2, the quadratic cost on the sigmoid output or cross-entropy on its logits."""
    from sklearn.datasets import load_digits

    x = torch.tensor(load_digits().data / 16.0, dtype=torch.float32)
    train, test = x[:1400], x[1400:]
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 100), nn.Sigmoid(), nn.Linear(100, 64), nn.Sigmoid())
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 1.0)
    return model, train, test


@pytest.mark.parametrize("seed", SEED_0_FAST)
def test_a_quadratic_cost_on_a_saturated_sigmoid_output_is_named_with_the_loss_on_the_logits(store, seed):
    """Round 13: the sigmoid autoencoder under the quadratic cost was told "weights initialised too large" while its
    twin — the very same N(0, 1) init with cross-entropy on the logits — learns (Nielsen ch. 3). Reference by hand:
    its held-out reconstruction is worse than the twin's by more than half the mean image's error, and its output
    sigmoid is saturated (> 25 % of units, σ′ < 2 % of its peak). The saturation finding now names the quadratic
    cost and puts the loss on the logits first; the twin's own (hidden-unit) saturation does not name it; a loss
    logged detached has no graph to read, and the cause stays the init's."""
    scores, findings = {}, {}
    for twin in (False, True):
        model, train, test = _digits_ae(seed, twin)
        net = model[:3] if twin else model
        opt = torch.optim.SGD(net.parameters(), lr=0.2)
        g = torch.Generator().manual_seed(seed)
        with gw.watch(net, opt, store=store, name=f"ae-{twin}-{seed}") as w:
            for _ in range(300):
                xb = train[torch.randint(0, len(train), (64,), generator=g)]
                out = net(xb)
                loss = (nn.functional.binary_cross_entropy_with_logits(out, xb, reduction="sum") if twin
                        else 0.5 * ((out - xb) ** 2).sum()) / len(xb)
                opt.zero_grad(); loss.backward(); opt.step(); w.log(loss=loss)
        with torch.no_grad():
            rec = torch.sigmoid(net(test)) if twin else net(test)
            scores[twin] = 1 - float(((rec - test) ** 2).mean()) / float(((test - train.mean(0)) ** 2).mean())
            if not twin:
                a = net(test)
                assert float((a * (1 - a) < 0.02 * 0.25).float().mean()) > 0.25  # the output saturated, by hand
        findings[twin] = [f for f in w.diagnose().problems if f.kind == "saturation"]
    assert scores[True] - scores[False] > 0.5, scores
    f = findings[False][0]
    assert f.remedy_keys[0] == "logits_loss" and "quadratic cost on the output sigmoid" in f.cause, str(f)
    assert all("quadratic cost" not in t.cause and "logits_loss" not in t.remedy_keys for t in findings[True])


def _hand_bce(seed, watch_store=None, detach=False):
    """A breast-cancer MLP with a sigmoid output and the hand-written BCE, Adam 1e-2 (round 13's port of the
    recurring "loss becomes NaN with my own BCE" question): log(1 − p) = −inf once p rounds to 1."""
    from sklearn.datasets import load_breast_cancer

    d = load_breast_cancer()
    x = torch.tensor((d.data - d.data.mean(0)) / d.data.std(0), dtype=torch.float32)
    y = torch.tensor(d.target, dtype=torch.float32)[:, None]
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(30, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1), nn.Sigmoid())
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    w = gw.watch(model, opt, store=watch_store, name=f"bce-{seed}-{detach}") if watch_store else None
    losses = []
    for _ in range(150):
        i = torch.randint(0, 450, (64,), generator=g)
        p = model(x[i])
        loss = -(y[i] * torch.log(p) + (1 - y[i]) * torch.log(1 - p)).mean()
        opt.zero_grad(); loss.backward(); opt.step()
        if w is not None:
            w.log(loss=loss.detach() if detach else loss)
        losses.append(float(loss.detach()))
    if w is not None:
        w.close()
    return model, losses, w


@pytest.mark.parametrize("seed", SEED_0_FAST)
def test_a_hand_written_log_of_a_sigmoid_is_named_as_the_cause_of_its_nan(store, seed):
    """The loss goes non-finite after some steps of ordinary size (by hand); the non-finite finding names the
    hand-written logarithm of the sigmoid's output and puts the loss on the logits first (it was a lower learning
    rate and clipping, which only postpone it). Reading the loss's graph changes no parameter (bit-identical to an
    unwatched run), and a loss logged detached leaves the cause as it was."""
    plain, losses, _ = _hand_bce(seed)
    first = next(i for i, v in enumerate(losses) if not math.isfinite(v))
    assert first > 0 and all(math.isfinite(v) and v < 10 for v in losses[:first])
    watched, _, w = _hand_bce(seed, store)
    for a, b in zip(plain.state_dict().values(), watched.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    f = next(f for f in w.diagnose().problems if f.kind == "nonfinite")
    assert f.steps[0] == first and f.remedy_keys[0] == "logits_loss", str(f)
    assert "logarithm of a sigmoid's output written by hand" in f.cause
    _, _, w = _hand_bce(seed, store, detach=True)
    f = next(f for f in w.diagnose().problems if f.kind == "nonfinite")
    assert "logits_loss" not in f.remedy_keys and "logarithm" not in f.cause


def test_among_fixes_that_tie_the_simplest_and_the_one_named_first_is_best():
    """Round 14: the row "clipping + learning rate ×0.1", which trained exactly as "learning rate ×0.1" (its clipping
    never acted), was chosen over it; Adam's learning rate ×100 (0.982) over setting back the eps the diagnosis
    named first (0.980). Rows within 0.01 of the best score tie: the fewest entries and knobs first, then the
    table's order (the findings' own). A clearly better score still wins; without scores, the final loss."""
    from gradwatch.doctor.repair import _ranked

    def row(label, parts, score, final=0.1):
        return TrialResult(label, final, final, score, [], 1.0, verdict="fixes it", parts=parts)

    clip_lr = row("clipping at max_norm=32 + learning rate ×0.1", ("clip_lower_lr",), 0.980)
    lr = row("learning rate ×0.1", ("lower_lr",), 0.980)
    norm = row("LayerNorm/BatchNorm before activations", ("norm",), 0.980)
    assert _ranked([clip_lr, lr, norm], [clip_lr, lr, norm])[:2] == [lr, norm]  # lightest, then named first
    # round 29: the remedy a finding names first for its cause goes before one that only eases the steps, though
    # lower_lr is a finding's first too (a non-finite finding's)
    mean = row("the loss averaged over the batch", ("mean_reduction",), 0.976)
    assert _ranked([lr, mean], [lr, mean], frozenset({"lower_lr", "mean_reduction"})) == [mean, lr]
    assert _ranked([lr, mean], [lr, mean], frozenset({"lower_lr"})) == [lr, mean]
    lines = str(DoctorReport(row("baseline", (), 0.1, 2.0), Diagnosis([]), [clip_lr, lr], best=lr)).splitlines()
    assert f"{clip_lr.label}: trained exactly as {lr.label} (every number equal): what it adds never acted" in "\n".join(lines)
    eps = row("Adam's eps at 1e-8", ("lower_eps",), 0.980)
    raise_lr = row("learning rate ×100", ("raise_lr",), 0.982)
    assert _ranked([eps, raise_lr], [eps, raise_lr]) == [eps, raise_lr]
    clearly = row("learning rate ×100", ("raise_lr",), 0.995)
    assert _ranked([eps, clearly], [eps, clearly])[0] is clearly
    a, b = row("learning rate ×0.1", ("lower_lr",), math.nan, 0.2), row("Adam", ("adam",), math.nan, 0.1)
    assert _ranked([a, b], [a, b]) == [b, a]


class _Recall(nn.Module):
    """Round 14's associative recall, ported smaller (d = 256): 8 (key, value) pairs of 16 symbols and a query key;
    one scaled dot-product attention head (Vaswani et al. 2017) reads the value stored under the query."""

    D, P, V = 256, 8, 16

    def __init__(self):
        super().__init__()
        d, v = self.D, self.V
        self.ek, self.ev = nn.Embedding(v, d), nn.Embedding(v, d)
        self.q, self.k, self.v, self.out = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, v)

    def forward(self, x):
        p = self.P
        h = self.ek(x[:, :p]) + self.ev(x[:, p:2 * p])
        logits = self.q(self.ek(x[:, 2 * p]))[:, None] @ self.k(h).transpose(1, 2) / math.sqrt(self.D)
        return self.out((torch.softmax(logits, -1) @ self.v(h))[:, 0])

    @classmethod
    def sample(cls, n, g):
        keys = torch.argsort(torch.rand(n, cls.V, generator=g), -1)[:, :cls.P]
        vals = torch.randint(0, cls.V, (n, cls.P), generator=g)
        i = torch.randint(0, cls.P, (n,), generator=g)
        return torch.cat([keys, vals, keys[torch.arange(n), i][:, None]], 1), vals[torch.arange(n), i]


@pytest.mark.slow  # (over 20 min of CI on an AVX2 EPYC with it: `make test-slow` runs it)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_layers_that_barely_move_on_a_converged_loss_are_not_stalled(store, seed):
    """Round 14's healthy attention twin: the loss falls from 2.8 to ~5e-5 and every query is answered, while the
    key embedding moves under 1 % of the upper-quartile layer's update ratio a step (by hand, below) — the residual
    error's gradient reaches it last. It was a "stalled" warning, and the same finding kept the doctor from calling
    its unscaled twin's 0.28 → 1.000 a fix. With one learning rate and a loss at 1e-3 of its start or below it is
    info; the same layer left at a learning rate of its own (a parameter-group bug) is still a warning."""
    for own_rate in (False, True):
        g = torch.Generator().manual_seed(1000 + seed)
        torch.manual_seed(seed)
        model = _Recall()
        groups = ([{"params": model.ek.parameters(), "lr": 1e-6},
                   {"params": [p for n, p in model.named_parameters() if not n.startswith("ek.")]}]
                  if own_rate else model.parameters())
        opt = torch.optim.SGD(groups, lr=0.03, momentum=0.9)
        losses, ratios = [], {n: [] for n, _ in model.named_modules() if n}
        with gw.watch(model, opt, store=store, name=f"recall-{seed}-{own_rate}") as w:
            for step in range(600):
                x, y = _Recall.sample(64, g)
                loss = nn.functional.cross_entropy(model(x), y)
                before = {n: m.weight.detach().clone() for n, m in model.named_modules() if n}
                opt.zero_grad(); loss.backward(); opt.step(); w.log(loss=loss)
                losses.append(float(loss.detach()))
                if step >= 550:
                    for n, m in model.named_modules():
                        if n:
                            ratios[n].append(float((m.weight.detach() - before[n]).norm() / before[n].norm()))
        med = {n: float(np.median(r)) for n, r in ratios.items()}
        assert med["ek"] < 0.01 * float(np.percentile(list(med.values()), 75))  # barely moves, by hand
        stalled = [f for f in w.diagnose() if f.kind == "stalled"]
        if not own_rate:
            assert np.median(losses[-20:]) <= 1e-3 * np.median(losses[:5])  # converged, by hand
            assert stalled and all(f.severity == "info" and not f.remedies for f in stalled), stalled
        else:
            assert any(f.severity == "warning" and "ek" in f.layers for f in stalled), stalled


def _small_setup(conv):
    def make(seed):
        torch.manual_seed(seed)
        if conv:
            model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                                  nn.Flatten(), nn.Linear(4 * 8 * 8, 3), nn.Sigmoid())
            x = torch.randn(64, 1, 8, 8)
        else:
            model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3),
                                  nn.Sigmoid())
            x = torch.randn(64, 8)
        y = torch.rand(64, 3)

        def batches():
            while True:
                yield x, y

        return gw.Trial(model, torch.optim.SGD(model.parameters(), lr=0.1), batches(), nn.functional.mse_loss,
                        evaluate=lambda m: -float(nn.functional.mse_loss(m(x), y).detach()))
    return make


def test_the_doctors_trials_read_the_loss_graph_and_say_which_rows_were_scored_with_batchnorm_re_estimated(tmp_path):
    """The default Trial.step() returns its loss detached, so the doctor's watch could not read what the loss does
    to the output: the step reads it once (a squared error on this set-up's sigmoid, by construction) and the
    trial's run stores it. The norm remedy inserts BatchNorm into a conv net (its score read with the statistics
    re-estimated, PreciseBN) and LayerNorm into an MLP (nothing re-estimated): the TrialRun says which, and the
    table names such rows under it."""
    from gradwatch.doctor.catalogue import catalog
    from gradwatch.doctor.trial_run import run_trial

    trial = _small_setup(False)(0)
    assert trial.loss_paths is None
    trial.step()
    assert trial.loss_paths == [["MseLossBackward0", "SigmoidBackward0"]]
    norm = catalog()["norm"][0]
    got = {}
    for conv in (True, False):
        run = run_trial(_small_setup(conv), 0, 12, tmp_path, f"n{conv}", norm, {})
        got[conv] = run.rescored_bn
        assert gw.open_run(tmp_path / f"n{conv}").meta["loss_paths"] == [["MseLossBackward0", "SigmoidBackward0"]]
    assert got == {True: True, False: False}

    base = TrialResult("baseline (no remedy)", 1.0, 1.0, 0.1, ["vanishing"], 1.0, first_loss=1.0)
    bn = TrialResult(norm.label, 0.1, 0.1, 0.9, [], 1.0, verdict="fixes it", first_loss=1.0, rescored_bn=True)
    text = str(DoctorReport(base, Diagnosis([]), [bn], best=bn))
    assert f"BatchNorm layers inserted, over 16 training batches (PreciseBN" in text and text.endswith(norm.label)
    assert "PreciseBN" not in str(DoctorReport(base, Diagnosis([]), [replace(bn, rescored_bn=False)]))


def test_remedies_in_the_users_own_code_are_named_in_the_doctors_message():
    """Round 14: the watch put "scale the attention logits q·k by 1/√d_head" first for a hand-written attention;
    the doctor cannot rewrite a forward, tried other rows, and its message never named it. Remedies the findings
    name that only the user can make are now listed, once each, in the findings' order; none where every named
    remedy has catalogue rows."""
    from gradwatch.diagnosis.findings import Finding
    from gradwatch.diagnosis.remedies import REMEDIES, remedies
    from gradwatch.doctor.catalogue import catalog
    from gradwatch.doctor.repair import _by_hand

    def finding(*keys):
        return Finding(kind="exploding", severity="critical", layers=("q",), steps=(0, 10), summary="", evidence="",
                       cause="", remedies=remedies(*keys), numbers={}, sources=())

    words = _by_hand(Diagnosis([finding("attention_scale", "lower_lr"), finding("logits_loss", "attention_scale")]),
                     catalog())
    scale, logits = (REMEDIES[k].split(":")[0] for k in ("attention_scale", "logits_loss"))
    assert words == f"; named by the findings, for you to change in your code (the doctor does not rewrite it): {scale}; {logits}"
    assert _by_hand(Diagnosis([finding("lower_lr", "clip_norm")]), catalog()) == ""


class _Accumulating(gw.Trial):
    """Gradient accumulation over K micro-batches of 16 (the PyTorch forum's "How to implement gradient
    accumulation?", Hugging Face's `loss / gradient_accumulation_steps`), the division optional."""

    K = 16
    divide = True

    def step(self):
        self.optimizer.zero_grad()
        total = 0.0
        for _ in range(self.K):
            x, y = next(self.batches)
            loss = self.loss_fn(self.model(x), y)
            (loss / self.K if self.divide else loss).backward()
            total += float(loss.detach()) / self.K
        self.optimizer.step()
        return torch.tensor(total)


def _accumulating(seed, divide, lr=0.05):
    from gradwatch.zoo.data import accuracy, batches, digits

    x, y, xt, yt = digits()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    trial = _Accumulating(model, torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9), batches(x, y, 16, seed),
                          nn.functional.cross_entropy, evaluate=accuracy(xt, yt))
    trial.divide = divide
    return trial


@pytest.mark.parametrize("seed", SEED_0_FAST)
def test_an_explosion_under_accumulation_asks_whether_the_loss_was_divided(store, seed):
    """Round 14: 16 micro-batches per step, each loss not divided by 16 (a learning rate ×16), blew up on every
    seed and was told "a learning rate too large", accumulation never named. The watch counts the forward passes
    with gradient per optimizer step (16, by construction) and the explosion's first remedy is the division; the
    twin that divides has no such finding. The doctor's row for it, every rate ÷16, takes the same steps as the
    division (SGD with momentum is linear in the gradient: parameters equal by hand after 20 steps)."""
    from gradwatch.doctor import surgery

    for divide in (False, True):
        trial = _accumulating(seed, divide)
        with gw.watch(trial.model, trial.optimizer, store=store, name=f"acc-{seed}-{divide}") as w:
            for _ in range(60):
                w.log(loss=trial.step())
        assert w.open().meta["passes_per_step"] == 16 and w.open().meta["backwards_per_step"] == 16
        blown = [f for f in w.diagnose().problems if f.kind in ("exploding", "nonfinite")]
        if divide:
            assert not blown and trial.evaluate(trial.model) > 0.8
        else:
            assert not trial.evaluate(trial.model) > 0.5  # blown up, by hand (NaN counts)
            assert blown and all(f.remedy_keys[0] == "divide_accumulated" for f in blown), blown
            assert "16 backward passes" in blown[0].cause

    divided, scaled = _accumulating(seed, True), _accumulating(seed, False)
    surgery.divide_accumulated(scaled, {"passes_per_step": 16.0})
    for _ in range(20):
        divided.step(), scaled.step()
    for a, b in zip(divided.model.parameters(), scaled.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert surgery.divide_accumulated(_accumulating(seed, False), {}) is None
    from gradwatch.doctor.catalogue import catalog, shown_label

    assert shown_label(catalog()["divide_accumulated"][0], {"passes_per_step": 16.0}).startswith("learning rate ÷16 (")


@pytest.mark.parametrize("seed", SEED_0_FAST)
def test_gradient_spikes_a_run_learned_through_are_told_not_warned(store, seed):
    """Round 13's healthy twin (a 7-conv LeNet-style ReLU CNN on digits, SGD 0.05 m0.9, PyTorch's default init;
    Glorot, Bordes & Bengio 2011) sits on a plateau, then leaves it with gradient-norm spikes hundreds of times the
    median (by hand) and learns. The loss's own spike finding said "recovered" (info); the gradient norm's, merged
    into it, made it a warning with clipping and skipped steps offered. Now info, no remedies, wherever the run
    learned through them (by hand, 250 steps after it left its plateau: loss at a fifth of its start or below, > 0.85
    held out)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor((d.data - d.data.mean(0)) / (d.data.std(0) + 1e-6), dtype=torch.float32).view(-1, 1, 8, 8)
    y = torch.tensor(d.target)
    perm = torch.tensor(np.random.RandomState(0).permutation(len(x)))
    tr, te = perm[:1400], perm[1400:]

    def epochs(seed):  # shuffled epochs of 64, as round 13's harness drew them
        g = torch.Generator().manual_seed(seed)
        while True:
            p = tr[torch.randperm(len(tr), generator=g)]
            for k in range(0, len(p) - 63, 64):
                yield p[k:k + 64]

    def train(seed):
        torch.manual_seed(seed)
        layers, c = [], 1
        for i in range(7):
            layers += [nn.Conv2d(c, 16, 3, padding=1), nn.ReLU()]
            c = 16
            if i == 3:
                layers.append(nn.MaxPool2d(2))
        model = nn.Sequential(*layers, nn.Flatten(), nn.Linear(16 * 16, 10))
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        batches = epochs(seed)
        losses, norms = [], []
        left = None  # the step it left its plateau (the last 20 losses' median below 1); when is chaotic across seeds
        # and thread counts (by hand, seeds 0–2 on 1 and 2 threads: steps 213–722), so it trains 250 steps past it
        with gw.watch(model, opt, store=store, name=f"cnn-{seed}") as w:
            for step in range(1200):
                i = next(batches)
                loss = nn.functional.cross_entropy(model(x[i]), y[i])
                opt.zero_grad(); loss.backward()
                norms.append(float(torch.cat([p.grad.flatten() for p in model.parameters()]).norm()))
                opt.step(); w.log(loss=loss)
                losses.append(float(loss.detach()))
                if left is None and step >= 20 and np.median(losses[-20:]) < 1.0:
                    left = step
                if left is not None and step >= max(500, left + 250):
                    break
        return model, w, losses, norms, left

    # A seed whose net never leaves the plateau is not this test's run: on an AVX2 CPU seed 1 stays at chance for
    # 4,000 steps (by hand), under the portable kernels it leaves at step 331. The next of its residue class then.
    for candidate in (seed, seed + 3, seed + 6):
        model, w, losses, norms, left = train(candidate)
        if left is not None:
            break
    assert left is not None, "no candidate seed left its plateau"
    with torch.no_grad():
        score = float((model(x[te]).argmax(1) == y[te]).float().mean())
    assert score > 0.85 and np.median(losses[-50:]) < 0.2 * np.median(losses[:10])  # it learned, by hand
    problems = [f for f in w.diagnose().problems if f.kind == "exploding"]
    assert not problems, problems
    if max(norms) > 50 * np.median(norms):  # the spikes, by hand (seeds 0 and 1 measured: ×18 and ×300)
        told = [f for f in w.diagnose() if f.kind == "exploding"]
        assert told and all(f.severity == "info" and not f.remedies for f in told), told


def _selu_net(seed):
    """Round 14's self-normalising MLP (Klambauer et al. 2017): 32 SELU layers of 64 at nn.Linear's default init."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(64, 64), nn.SELU()]
    for _ in range(31):
        layers += [nn.Linear(64, 64), nn.SELU()]
    return nn.Sequential(*layers, nn.Linear(64, 10))


def test_lecun_init_draws_one_over_fan_in():
    """LeCun normal: Var(w) = 1 / fan_in (Klambauer et al. 2017, §3), zero biases; He's is twice that."""
    net = gw.remedies.lecun_init(nn.Sequential(nn.Linear(400, 300), nn.SELU(), nn.Conv2d(8, 16, 3)))
    assert float(net[0].weight.detach().std()) == pytest.approx(1 / math.sqrt(400), rel=0.02)
    assert float(net[2].weight.detach().std()) == pytest.approx(1 / math.sqrt(8 * 9), rel=0.05)
    assert not net[0].bias.any() and not net[2].bias.any()


@pytest.mark.parametrize("seed", SEED_0_FAST)
def test_a_selu_net_is_told_lecun_normal_not_he_and_the_doctors_row_repairs_it(store, seed):
    """Round 14: a 32-layer SELU net at PyTorch's default init (Var 1/(3 fan_in): the signal shrinks ×0.58 a
    layer) vanishes; its remedies named He "for ReLU-type nets", and the doctor's He row diverged (inf). SELU's own
    init is LeCun normal (torch.nn.SELU's docs): the finding names it in He's place, and the doctor's row — the
    catalogue's own change — trains the net to ≥ 0.85 held out (the source's fix by hand: 0.91–0.92) where the
    default stays below 0.2."""
    from gradwatch.doctor.catalogue import catalog
    from gradwatch.zoo.data import digits_trial

    trial = digits_trial(_selu_net(seed), seed, 0.01, momentum=0.0)
    with gw.watch(trial.model, trial.optimizer, store=store, name=f"selu-{seed}") as w:
        for _ in range(200):
            w.log(loss=trial.step())
    vanishing = [f for f in w.diagnose().problems if f.kind == "vanishing"]
    assert vanishing and trial.evaluate(trial.model) < 0.2
    keys = {k for f in w.diagnose().findings for k in f.remedy_keys}
    assert "lecun_init" in vanishing[0].remedy_keys and "he_init" not in keys

    fixed = digits_trial(_selu_net(seed), seed, 0.01, momentum=0.0)
    fixed = catalog()["lecun_init"][0].apply(fixed, {})
    assert fixed is not None
    assert float(fixed.model[2].weight.detach().std()) == pytest.approx(1 / 8, rel=0.05)
    for _ in range(400):
        fixed.step()
    assert fixed.evaluate(fixed.model) >= 0.85
