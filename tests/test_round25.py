"""The twenty-eighth session's set-ups: rounds 25 and 26 (written from the README alone, each ported from a public
source), each against its reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F

import gradwatch as gw
from gradwatch.zoo.train import readme_watched
from conftest import SEED_0_FAST, shuffled_batches as _feed, standardised_split

_train = readme_watched


def _accuracy(x, y):
    @torch.no_grad()
    def score(model):
        return float((model(x).argmax(1) == y).float().mean())
    return score


def _digits():
    """Digits scaled to [0, 1] on a fixed 75 / 25 split: (x_train, y_train, x_test, y_test)."""
    d = load_digits()
    x, y = torch.tensor(d.data / 16.0, dtype=torch.float32), torch.tensor(d.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    tr, te = order[:1347], order[1347:]
    return x[tr], y[tr], x[te], y[te]


# -- round 25: fake-quantised weights without a straight-through estimator (Bengio et al. 2013; Hubara et al. 2016) --

class QuantLinear(nn.Linear):
    """4-bit fake-quantised weights, round(w / s)·s with s = max|w| / 7; with ``ste`` the gradient passes straight
    through, w + (q − w).detach()."""

    def __init__(self, *args, ste: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.ste = ste

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        s = w.abs().max() / 7
        q = torch.clamp(torch.round(w / s), -7, 7) * s
        if self.ste:
            q = w + (q - w).detach()
        return F.linear(x, q, self.bias)


def _qat(seed, ste=False):
    xtr, ytr, xte, yte = _digits()
    torch.manual_seed(seed)
    model = nn.Sequential(QuantLinear(64, 128, ste=ste), nn.ReLU(), QuantLinear(128, 128, ste=ste), nn.ReLU(),
                          QuantLinear(128, 10, ste=ste))
    return gw.Trial(model, torch.optim.Adam(model.parameters(), lr=1e-3), _feed(xtr, ytr, seed, 32),
                    nn.CrossEntropyLoss(), evaluate=_accuracy(xte, yte))


@pytest.mark.parametrize("seed", SEED_0_FAST)
def test_weights_behind_a_round_without_its_estimator_are_told_and_their_straight_through_twin_is_not(store, seed):
    """Round 25: the loss 2.3 → 2.27, 0.14–0.27 held out against 0.95 with the estimator, and only an info note
    "look outside the gradients". The reference: a batch's weight gradients by hand, a naive loop over ``param.grad``
    — one nonzero entry per matrix (the path through s = max|w|/7), at any step — are the counts the finding gives
    (read at the tenth step)."""
    trial = _qat(seed)
    x, y = next(_feed(*_digits()[:2], seed, 32))
    trial.loss_fn(trial.model(x), y).backward()
    by_hand = {name: int((m.weight.grad != 0).sum()) for name, m in trial.model.named_children()
               if isinstance(m, QuantLinear)}
    assert by_hand == {"0": 1, "2": 1, "4": 1}
    trial.model.zero_grad(set_to_none=True)

    trial, twin = _qat(seed), _qat(seed, ste=True)
    w = _train(trial, store, f"qat-{seed}", 300)
    tw = _train(twin, store, f"qat-twin-{seed}", 300)
    assert trial.evaluate(trial.model) < 0.4 < 0.9 < twin.evaluate(twin.model)
    (f,) = w.diagnose().problems
    assert f.kind == "vanishing" and f.severity == "critical" and f.remedy_keys[0] == "straight_through", str(f)
    assert f.layers == ("0", "2", "4") and "1 of 8192 entries" in f.evidence and "torch.round" in f.cause
    seen = w.open().meta["zero_grad_weights"]
    assert {name: v[1] for name, v in seen.items()} == {"0": 1, "2": 1, "4": 1}
    assert not tw.diagnose().problems and "zero_grad_weights" not in tw.open().meta


def test_one_hot_inputs_are_not_read_as_a_zero_derivative_in_the_weights_path(store):
    """The rule's other side, by construction: a layer over one-hot inputs (a vocabulary of 2048, 8 in a batch) gets a
    gradient on under 1 % of its weight's entries — whole columns at 0, but every row live (a naive loop over
    ``param.grad``), which the rows-and-columns test keeps out."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2048, 32), nn.Tanh(), nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gw.watch(model, opt, store=store, name="one-hot") as w:
        for step in range(12):  # (read at the tenth step)
            x = F.one_hot(torch.randint(0, 2048, (8,)), 2048).float()
            opt.zero_grad()
            loss = F.cross_entropy(model(x), torch.randint(0, 4, (8,)))
            loss.backward()
            if step == 9:
                zero = model[0].weight.grad == 0
                assert float(zero.float().mean()) > 0.99 and not bool(zero.all(1).any())  # columns only
            opt.step()
            w.log(loss=loss)
    assert "zero_grad_weights" not in w.open().meta


def test_a_straight_through_estimator_is_round_forward_and_the_identity_backward():
    """By hand against x + (round(x) − x).detach(), for round, floor, sign and Tensor.round; a tensor without grad
    and other operations pass as they were made."""
    from gradwatch.remedies.structure import StraightThrough

    x = torch.linspace(-2.3, 2.3, 11, requires_grad=True)
    for op in (torch.round, torch.floor, torch.sign, torch.Tensor.round):
        with StraightThrough():
            y = op(x * 3)
        ref = x * 3 + (op(x.detach() * 3) - x.detach() * 3)
        assert torch.equal(y, ref.detach())
        (g,) = torch.autograd.grad(y.sum(), x)
        assert torch.equal(g, torch.full_like(x, 3.0))
    with StraightThrough():
        plain = torch.round(x.detach())
        other = torch.exp(x)
    assert not plain.requires_grad and torch.equal(other, torch.exp(x))


@pytest.mark.slow  # a doctor table on a round's set-up: make test-slow (CI's 20 minutes on 2 cores)
def test_the_doctor_passes_the_gradient_straight_through_a_quantiser(tmp_path):
    """The straight-through row: 0.95 held out (the twin's level), held on a seed no trial used."""
    report = gw.doctor(_qat, steps=300, budget_s=120, store=tmp_path, progress=False)
    assert report.best is not None and report.best.parts == ("straight_through",), str(report)
    assert report.best.score > 0.9 and report.checks[-1].verdict == "fixes it"


# -- round 25: nn.SoftMarginLoss given the 0/1 labels a binary cross-entropy wants (PyTorch docs: targets ±1) ----------

def _cancer():
    """Breast cancer standardised on a fixed 70 / 30 split: (x_train, y_train, x_test, y_test), labels 0/1."""
    from sklearn.datasets import load_breast_cancer

    d = load_breast_cancer()
    return standardised_split(torch.tensor(d.data, dtype=torch.float32), torch.tensor(d.target, dtype=torch.float32), 398)


def _balanced(x, y):
    @torch.no_grad()
    def score(model):
        pred = model(x).squeeze(-1) > 0
        return float(sum((pred[y == c] == bool(c)).float().mean() for c in (0, 1)) / 2)
    return score


def _margin(seed, signed=False):
    xtr, ytr, xte, yte = _cancer()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(30, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
    loss = (lambda z, y: F.soft_margin_loss(z.squeeze(-1), 2 * y - 1)) if signed else \
        (lambda z, y: F.soft_margin_loss(z.squeeze(-1), y))
    return gw.Trial(model, torch.optim.Adam(model.parameters(), lr=1e-3), _feed(xtr, ytr, seed, 32), loss,
                    evaluate=_balanced(xte, yte))


def test_a_soft_margin_losss_targets_at_0_are_read_off_the_outputs_gradient_as_from_the_loss():
    """By hand: the share of a batch's labels at 0 is what the watch reads off the output's gradient (exactly 0
    where y = 0) and what a trial reads from the loss's saved target; a loss that is not a soft margin, None."""
    from gradwatch.probes.loss_ops import margin_targets, margin_targets_off_gradient

    torch.manual_seed(0)
    z = torch.randn(32, 1, requires_grad=True)
    out = z * 1.0
    y = (torch.rand(32) < 0.4).float()
    loss = F.soft_margin_loss(out.squeeze(-1), y)
    assert margin_targets(loss) == {"at_0": float((y == 0).float().mean())}
    (g,) = torch.autograd.grad(loss, out)
    assert margin_targets_off_gradient(loss, out.grad_fn, g) == {"at_0": float((y == 0).float().mean())}
    assert margin_targets(F.binary_cross_entropy_with_logits(out.squeeze(-1), y)) is None


@pytest.mark.parametrize("seed", SEED_0_FAST)
def test_a_soft_margin_loss_given_0_1_labels_is_told_and_its_signed_twin_is_not(store, seed):
    """Round 25: the loss 0.69 → 0.28, every sample answered 1 (balanced accuracy 0.5 against 0.97 with 2y − 1), and
    "the gradients look healthy". The share told is the first batch's labels at 0, counted by hand."""
    trial, twin = _margin(seed), _margin(seed, signed=True)
    _, y = next(_feed(*_cancer()[:2], seed, 32))
    w = _train(trial, store, f"margin-{seed}", 300)
    tw = _train(twin, store, f"margin-twin-{seed}", 300)
    assert trial.evaluate(trial.model) == 0.5 and twin.evaluate(twin.model) > 0.9
    (f,) = w.diagnose().problems
    assert f.remedy_keys[0] == "signed_targets" and f"{float((y == 0).float().mean()):.0%} of them are 0" in f.cause
    assert not tw.diagnose().problems


@pytest.mark.slow  # a doctor's table on a round's set-up: make test-slow (CI's 20 minutes on 2 cores)
def test_the_doctor_gives_a_soft_margin_loss_signed_targets(tmp_path):
    """The row computes the set-up's own loss with 2y − 1 in place of y (the loss by hand, equal), and repairs it:
    0.978 held out, the signed twin's level, held on a seed no trial used."""
    from gradwatch.remedies.structure import SignedMarginTargets

    z, y = torch.randn(16), (torch.rand(16) < 0.5).float()
    with SignedMarginTargets():
        assert torch.equal(F.soft_margin_loss(z, y), F.soft_margin_loss(z, 2 * y - 1))
        assert torch.equal(nn.SoftMarginLoss()(z, 2 * y - 1), F.soft_margin_loss(z, 2 * y - 1))  # ±1 kept
    report = gw.doctor(_margin, steps=300, budget_s=120, store=tmp_path, progress=False)
    assert report.best is not None and report.best.parts == ("signed_targets",), str(report)
    assert report.best.score > 0.9 and report.checks[-1].verdict == "fixes it"


# -- round 26: a BiGRU under CTC over clips zero-padded to 40 frames (torch.nn.CTCLoss's docs: zero_infinity) ----------

_CTC_C, _CTC_T, _CTC_F = 8, 40, 12  # classes with the blank 0, frames, features


def _clips(n, seed, short):
    """Transcripts of 2–6 symbols, each 2–3 frames of a noisy code vector, zero-padded to 40 frames; a share
    ``short`` of the clips cut to fewer frames than symbols (no alignment: their CTC loss is +inf)."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randn(_CTC_C, _CTC_F, generator=torch.Generator().manual_seed(123))
    codes[0] = 0
    x, y = torch.zeros(n, _CTC_T, _CTC_F), torch.zeros(n, 8, dtype=torch.long)
    for i in range(n):
        labels = torch.randint(1, _CTC_C, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g)
        frames = [s for s in labels.tolist() for _ in range(int(torch.randint(2, 4, (1,), generator=g)))]
        t = len(frames) if torch.rand(1, generator=g).item() >= short else len(labels) - 1
        x[i, :t] = codes[torch.tensor(frames[:t])] + 0.5 * torch.randn(t, _CTC_F, generator=g)
        y[i, :len(labels)], y[i, 6], y[i, 7] = labels, t, len(labels)
    return x, y


class _CTCNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.out = nn.Linear(_CTC_F, 32), nn.Linear(64, _CTC_C)
        self.rnn = nn.GRU(32, 32, batch_first=True, bidirectional=True)

    def forward(self, x):  # (N, T, F) -> (T, N, C) log-probabilities, as nn.CTCLoss takes them
        return self.out(self.rnn(torch.relu(self.inp(x)))[0]).log_softmax(-1).transpose(0, 1)


def _ctc(seed, zero_infinity=False):
    x, y = _clips(1024, seed, 0.1)
    torch.manual_seed(seed)
    model = _CTCNet()
    ctc = nn.CTCLoss(zero_infinity=zero_infinity)
    return gw.Trial(model, torch.optim.Adam(model.parameters(), lr=3e-3), _feed(x, y, seed, 32),
                    lambda out, t: ctc(out, t[:, :6], t[:, 6], t[:, 7]))


def test_a_bigru_under_ctc_over_zero_padded_clips_is_not_told_of_weights_initialised_too_large(store):
    """Round 26: the healthy twin (zero_infinity=True; 0.80–0.84 exact match held out) was told "[warning] exploding
    through time in rnn.l0_reverse at initialisation: recurrent weights initialised too large", ×4.7·10⁴ at step 0 —
    and each of the doctor's zero_infinity rows "brought" it, so none was a fix. By hand: the loss passes exactly no
    gradient to the frames past a clip's length (its log-probabilities' gradient there is 0), so that ratio is
    padding, not a stretch. The pathology's own finding names zero_infinity."""
    trial = _ctc(0, zero_infinity=True)
    x, y = next(_feed(*_clips(1024, 0, 0.1), 0, 32))
    out = trial.model(x).detach().requires_grad_(True)
    (g,) = torch.autograd.grad(trial.loss_fn(out, y), out)
    past = torch.arange(_CTC_T)[:, None] >= y[:, 6][None, :]  # (T, N): frames past each clip's length
    assert past.float().mean() > 0.4 and float(g[past].abs().max()) == 0 and float(g[~past].abs().max()) > 0
    w = _train(trial, store, "ctc-twin", 150)
    run = w.open()
    first = run.temporal("rnn.l0_reverse").values[:, 0]
    assert first[0] / first[-1] > 1e3  # what the rule read as weights initialised too large
    assert not w.diagnose().problems, str(w.diagnose())
    bad = _train(_ctc(0), store, "ctc", 20)
    f = bad.diagnose().problems[0]
    assert f.kind == "nonfinite" and "zero_infinity" in f.cause + " ".join(f.remedies), str(f)


def test_a_reverse_direction_is_read_in_the_order_its_recurrence_runs(store):
    """A bidirectional tanh RNN whose recurrent weights contract (spectral radius 0.3), its loss on h_n — the forward
    direction's state at the last position and the reverse direction's at the first. Both directions' gradients fade
    back through their recurrences, so both are vanishing; read in input time (position 0 first), the reverse
    direction's looked ×10⁴ the other way, "exploding". The reference: the stored ‖∂L/∂h_t‖ of the reverse direction,
    position T − 1 (its first state) against position 0 (its last), is the ratio its finding gives."""
    torch.manual_seed(0)
    rnn = nn.RNN(4, 16, batch_first=True, bidirectional=True)
    with torch.no_grad():
        for w in (rnn.weight_hh_l0, rnn.weight_hh_l0_reverse):
            w.mul_(0.3 / torch.linalg.matrix_norm(w, 2))
    head = nn.Linear(32, 1)
    model = nn.ModuleDict({"rnn": rnn, "head": head})
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with gw.watch(model, opt, store=store, name="birnn", temporal=True) as w:
        for _ in range(20):
            x = torch.randn(8, 30, 4)
            _, h = rnn(x)
            loss = head(torch.cat([h[0], h[1]], 1)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            w.log(loss=loss)
    found = {f.layers[0]: f for f in w.diagnose().findings if f.layers and f.layers[0].startswith("rnn.")}
    assert found["rnn.l0"].kind == "vanishing" and found["rnn.l0_reverse"].kind == "vanishing", str(w.diagnose())
    norms = w.open().temporal("rnn.l0_reverse").values  # input time: row p is position p
    stored = float(np.median(norms[-1, -10:]) / np.median(norms[0, -10:]))
    assert found["rnn.l0_reverse"].numbers["ratio"] == pytest.approx(stored, rel=1e-6) and stored < 1e-4


# -- round 25: a binary cross-entropy written by hand, −(y·log σ(z) + (1 − y)·log(1 − σ(z))) (BCEWithLogitsLoss's docs) --

def _hand_bce(z, y):
    p = torch.sigmoid(z.squeeze(-1))
    return -(y * torch.log(p) + (1 - y) * torch.log(1 - p)).mean()


def _bce(seed):
    xtr, ytr, xte, yte = _cancer()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(30, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
    return gw.Trial(model, torch.optim.Adam(model.parameters(), lr=1e-2), _feed(xtr, ytr, seed, 32), _hand_bce,
                    evaluate=_balanced(xte, yte))


def test_log_space_gives_a_hand_written_bce_the_value_and_gradient_of_bce_with_logits():
    """By hand against F.binary_cross_entropy_with_logits and F.log_softmax, at logits where σ rounds to 0 and 1 in
    float32 (the hand-written loss is then NaN): equal values and gradients; a log of anything else is left alone."""
    from gradwatch.remedies.structure import LogSpace

    z = torch.tensor([-40.0, -3.0, 0.0, 2.0, 40.0], requires_grad=True)
    y = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0])
    assert torch.isnan(_hand_bce(z[:, None], y))
    with LogSpace():
        got = _hand_bce(z[:, None], y)
        soft = torch.log(torch.softmax(z[None], dim=1))
        plain = torch.log(z.detach().abs() + 1)
    ref = F.binary_cross_entropy_with_logits(z, y)
    assert torch.allclose(got, ref) and torch.allclose(soft, F.log_softmax(z[None], 1))
    assert torch.allclose(torch.autograd.grad(got, z)[0], torch.autograd.grad(ref, z)[0])
    assert torch.equal(plain, torch.log(z.detach().abs() + 1))


@pytest.mark.slow  # a doctor's table on a round's set-up: make test-slow (CI's 20 minutes on 2 cores)
def test_the_doctor_computes_a_hand_written_bces_logs_in_log_space(tmp_path):
    """Round 25: NaN at step 12 on every seed; the doctor's best row was a learning rate ×0.01 — finite, 0.946, its
    loss ×10–100 the twin's, the line that makes the NaN left as it was. The log-space row scores the twin's level
    (BCEWithLogitsLoss: 0.95–0.99), held on a seed no trial used; the message still names the line to mend."""
    report = gw.doctor(_bce, steps=300, budget_s=150, store=tmp_path, progress=False)
    assert report.best is not None and report.best.parts == ("log_space",), str(report)
    assert report.best.score > 0.94 and report.checks[-1].verdict == "fixes it"
    assert "1 − p where p rounded to 1" in report.message and "torch.log(1 - p)" in report.message
    assert "may only postpone" not in report.message  # the row mends the operation that made the NaN (round 26)


# -- round 26: a batch-all triplet loss whose distances are sqrt(d²) with d² = 0 on the diagonal (Moindrot 2018) --------

def _distances(e, moindrot=False):
    dot = e @ e.T
    sq = dot.diagonal()
    d2 = (sq[None, :] - 2.0 * dot + sq[:, None]).clamp(min=0.0)
    if not moindrot:
        return d2.sqrt()
    mask = (d2 == 0.0).float()  # his fix: an epsilon where the distance is 0, then the 0s put back
    return (d2 + mask * 1e-16).sqrt() * (1.0 - mask)


def _triplet_loss(emb, labels, moindrot=False, margin=0.5):
    d = _distances(emb, moindrot)
    same = labels[:, None] == labels[None, :]
    valid = (same & ~torch.eye(len(labels), dtype=torch.bool))[:, :, None] & (~same)[:, None, :]
    t = torch.relu((d[:, :, None] - d[:, None, :] + margin) * valid.float())
    return t.sum() / ((t > 1e-16).float().sum() + 1e-16)


def test_zero_roots_gives_a_distance_matrix_moindrots_values_and_a_finite_gradient():
    """By hand against Moindrot's masked square root: the same distances, the same gradient, where the plain sqrt's
    backward makes NaN at the diagonal's 0s; a sqrt of an input without 0s is left as it was."""
    from gradwatch.remedies.structure import ZeroRoots

    torch.manual_seed(0)
    e = torch.randn(6, 3, requires_grad=True)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    (nan,) = torch.autograd.grad(_triplet_loss(e, y), e)
    assert torch.isnan(nan).any()
    with ZeroRoots():
        got = _triplet_loss(e, y)
        plain = torch.sqrt(e.detach().abs() + 1)
    ref = _triplet_loss(e, y, moindrot=True)
    assert torch.allclose(got, ref)
    assert torch.allclose(torch.autograd.grad(got, e)[0], torch.autograd.grad(ref, e)[0])
    assert torch.equal(plain, torch.sqrt(e.detach().abs() + 1))


def _triplet(seed):
    xtr, ytr, xte, yte = _digits()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32))

    @torch.no_grad()
    def one_nn(m):
        return float((ytr[torch.cdist(m(xte), m(xtr)).argmin(1)] == yte).float().mean())
    return gw.Trial(model, torch.optim.Adam(model.parameters(), lr=1e-3), _feed(xtr, ytr, seed, 64), _triplet_loss,
                    evaluate=one_nn)


def test_the_doctor_tries_a_square_root_that_passes_0_at_0_where_its_backward_made_the_first_nan(tmp_path):
    """Round 26: NaN from step 0 (SqrtBackward0 at the diagonal), "no remedy could be tried automatically". Located
    before the trials, the origin brings the zero_root row first: the finding gone, and the 1-NN accuracy of
    Moindrot's fixed loss (0.98). (A triplet loss need not halve in 300 steps — 0.38 → 0.22 here — so the verdict
    says "a better score, but the loss did not halve": issue 12's ruling.)"""
    report = gw.doctor(_triplet, steps=300, budget_s=300, store=tmp_path, progress=False)
    row = next(t for t in report.trials if t.parts == ("zero_root",))
    assert report.trials[0] is row and row.score > 0.95 and not row.findings, str(report)
    assert row.verdict in ("fixes it", "removes the finding; a better score, but the loss did not halve")


# -- round 26: a physics-informed net with ReLU units (deepxde#80: "Don't use relu … Use smooth activations") -----------

class _PINN(nn.Module):
    """u(x) and u''(x) by autograd inside the forward, for u'' = −π² sin πx on [−1, 1] with u(±1) = 0."""

    def __init__(self, act) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, 32), act(), nn.Linear(32, 32), act(), nn.Linear(32, 1))

    def forward(self, x):
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            u = self.net(x)
            du = torch.autograd.grad(u.sum(), x, create_graph=True)[0]
            d2u = torch.autograd.grad(du.sum(), x, create_graph=True)[0]
        return torch.cat([u, d2u], 1)


def _pinn_points(seed):
    g = torch.Generator().manual_seed(seed)
    while True:
        xi = torch.rand(64, 1, generator=g) * 2 - 1
        x = torch.cat([xi, torch.tensor([[-1.0], [1.0]])])
        f = -(math.pi ** 2) * torch.sin(math.pi * xi)
        yield x, torch.cat([torch.cat([torch.zeros(64, 1), f], 1), torch.tensor([[1.0, 0.0], [1.0, 0.0]])])


def _pinn_loss(out, target):  # target: [on the boundary, value]
    bnd = target[:, 0] > 0.5
    return (out[~bnd, 1] - target[~bnd, 1]).pow(2).mean() + (out[bnd, 0] - target[bnd, 1]).pow(2).mean()


def _pinn(seed, act=nn.ReLU):
    torch.manual_seed(seed)
    model = _PINN(act)
    grid = torch.linspace(-1, 1, 201)[:, None]

    def r2(m):
        u, exact = m(grid)[:, 0].detach(), torch.sin(math.pi * grid[:, 0])
        return float(1 - ((u - exact) ** 2).sum() / ((exact - exact.mean()) ** 2).sum())
    return gw.Trial(model, torch.optim.Adam(model.parameters(), lr=3e-3), _pinn_points(seed), _pinn_loss, evaluate=r2)


@pytest.mark.parametrize("seed", SEED_0_FAST)
def test_a_pinn_with_relu_units_is_told_its_second_derivative_is_0_and_its_tanh_twin_is_not(store, seed):
    """Round 26: the loss stuck at 48, R² 0 against 1.000 with tanh, told a saturated output or a GAN's loss. By hand:
    the ReLU net's u'' is exactly 0 at every point, the tanh net's is not; the double backward the watch names is in
    the output's graph."""
    trial, twin = _pinn(seed), _pinn(seed, nn.Tanh)
    x, _ = next(_pinn_points(seed))
    assert float(trial.model(x)[:, 1].abs().max()) == 0 and float(twin.model(x)[:, 1].abs().max()) > 0
    w = _train(trial, store, f"pinn-{seed}", 300)
    tw = _train(twin, store, f"pinn-twin-{seed}", 300)
    assert trial.evaluate(trial.model) < 0.1 and twin.evaluate(twin.model) > 0.95
    (f,) = w.diagnose().problems
    assert f.remedy_keys[0] == "smooth_activation" and "second derivative is 0" in f.cause, str(f)
    assert "ThresholdBackwardBackward0" in w.open().meta["output_derivative_ops"]
    assert not tw.diagnose().problems


@pytest.mark.slow  # a doctor's table on a round's set-up: make test-slow (CI's 20 minutes on 2 cores)
def test_the_doctor_gives_a_pinn_a_smooth_activation(tmp_path):
    """Tanh in place of the ReLUs: R² 1.000 (the twin's), held on a seed no trial used."""
    report = gw.doctor(_pinn, steps=300, budget_s=120, store=tmp_path, progress=False)
    assert report.best is not None and report.best.parts == ("smooth_activation",), str(report)
    assert report.best.score > 0.95 and report.checks[-1].verdict == "fixes it"
    assert not any(isinstance(m, nn.ReLU) for m in report.apply(_pinn(0)).model.modules())


# -- round 26: Hugging Face's attention_mask given as src_key_padding_mask (torch's MHA docs; pytorch#27968) --------

_PAD, _CLS, _VOC, _LEN = 0, 1, 16, 24


def _texts(n, seed):
    """[CLS], 8–20 tokens from 2..15, then padding; label 1 where token 2 occurs more often than token 3."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.full((n, _LEN), _PAD), torch.zeros(n, dtype=torch.long)
    for i in range(n):
        length = int(torch.randint(8, 21, (1,), generator=g))
        while True:
            t = torch.randint(2, _VOC, (length,), generator=g)
            a, b = int((t == 2).sum()), int((t == 3).sum())
            if a != b:
                break
        x[i, 0], x[i, 1:length + 1], y[i] = _CLS, t, int(a > b)
    return x, y


class _Encoder(nn.Module):
    def __init__(self, hf_mask_as_padding_mask: bool) -> None:
        super().__init__()
        self.bug = hf_mask_as_padding_mask
        self.emb, self.pos = nn.Embedding(_VOC, 32), nn.Embedding(_LEN, 32)
        self.enc = nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, batch_first=True)
        self.head = nn.Linear(32, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        attention_mask = (tokens != _PAD).long()  # Hugging Face's: 1 = a real token
        padding = attention_mask.bool() if self.bug else attention_mask == 0  # torch's: True = ignore
        h = self.enc(self.emb(tokens) + self.pos(torch.arange(tokens.shape[1])), src_key_padding_mask=padding)
        return self.head(h[:, 0])  # read at [CLS]


def _masked(seed, bug=True):
    x, y = _texts(2000, seed)
    xt, yt = _texts(500, 999)
    torch.manual_seed(seed)
    model = _Encoder(bug)
    return gw.Trial(model, torch.optim.Adam(model.parameters(), lr=1e-3), _feed(x, y, seed, 32),
                    nn.functional.cross_entropy, evaluate=_accuracy(xt, yt))


def test_a_key_padding_mask_is_read_as_inverted_only_where_it_leaves_one_token_attended():
    from gradwatch.probes.layout import inverted_padding

    x, _ = _texts(8, 0)
    right = x == _PAD
    assert inverted_padding(~right, x) == _PAD  # Hugging Face's attention_mask, as booleans
    as_torch_adds = torch.zeros(x.shape).masked_fill(~right, float("-inf"))  # what a Transformer layer passes on
    assert inverted_padding(as_torch_adds, x) == _PAD
    assert inverted_padding(right, x) is None and inverted_padding(torch.zeros(x.shape).masked_fill(right, -1e9), x) is None
    left = torch.flip(x, [1])  # left padding, masked right: the padding comes first and is hidden
    assert inverted_padding(left == _PAD, left) is None and inverted_padding(left != _PAD, left) == _PAD
    assert inverted_padding(torch.zeros(x.shape, dtype=torch.bool), x) is None  # nothing hidden
    assert inverted_padding(~right, x.float()) is None and inverted_padding(~right, x[:, :-1]) is None


@pytest.mark.parametrize("seed", SEED_0_FAST)
def test_hugging_faces_attention_mask_given_as_the_padding_mask_is_told_and_its_twin_is_not(store, seed):
    """Round 26: every query attended only to the padding, held out 0.48–0.54 against 0.99–1.00, told Post-LN's
    warm-up on two seeds and nothing on the third. Now told first with ``invert_padding_mask``; the twin is quiet."""
    trial, twin = _masked(seed), _masked(seed, bug=False)
    w = _train(trial, store, f"mask-{seed}", 300)
    tw = _train(twin, store, f"mask-twin-{seed}", 300)
    assert trial.evaluate(trial.model) < 0.6 and twin.evaluate(twin.model) > 0.95
    problems = w.diagnose().problems
    assert problems and all(f.remedy_keys[0] == "invert_padding_mask" and "warmup" not in f.remedy_keys
                            for f in problems), problems
    assert w.open().meta["inverted_padding_masks"] == [{"module": "enc.self_attn", "token": _PAD}]
    assert not tw.diagnose().problems and tw.open().meta["inverted_padding_masks"] == []


def test_the_padding_mask_row_gives_the_model_the_twins_mask_in_training_and_evaluation():
    """The row's model computes what the same weights compute under ``attention_mask == 0``: in training mode and in
    evaluation mode, where the layer's fast path goes around its attention module."""
    from gradwatch.doctor.surgery import padding_masks_inverted

    trial, twin = _masked(0), _masked(0, bug=False)
    twin.model.load_state_dict(trial.model.state_dict())
    x, _ = _texts(16, 5)
    assert not torch.allclose(trial.model(x), twin.model(x))
    assert padding_masks_inverted(trial, {}) is trial
    for mode in (True, False):
        trial.model.train(mode), twin.model.train(mode)
        with torch.no_grad():
            assert torch.allclose(trial.model(x), twin.model(x), atol=1e-5)
    plain = gw.Trial(nn.Linear(3, 2), torch.optim.SGD(nn.Linear(3, 2).parameters(), lr=0.1), iter(()), F.mse_loss)
    assert padding_masks_inverted(plain, {}) is None


@pytest.mark.slow  # a doctor's table on a round's set-up: make test-slow (CI's 20 minutes on 2 cores)
def test_the_doctor_inverts_an_inverted_padding_mask(tmp_path):
    """The row scores the twin's 0.99, held on a seed no trial used."""
    report = gw.doctor(_masked, steps=300, budget_s=120, store=tmp_path, progress=False)
    assert report.best is not None and report.best.parts == ("invert_padding_mask",), str(report)
    assert report.best.score > 0.95 and report.checks[-1].verdict == "fixes it"


# -- round 26: Poincaré embeddings kept in the ball by a projection (Nickel & Kiela 2017, Eq. 5) -------------------

def _closure(branching=3, depth=4):
    """A tree's (ancestor, descendant) pairs, its transitive closure, as Nickel & Kiela embed WordNet's."""
    parent, frontier, n = {}, [0], 1
    for _ in range(depth):
        nxt = []
        for p in frontier:
            for _ in range(branching):
                parent[n] = p
                nxt.append(n)
                n += 1
        frontier = nxt
    pairs = []
    for c in range(n):
        p = c
        while p in parent:
            p = parent[p]
            pairs.append((p, c))
    return n, torch.tensor(pairs)


def _poincare_distance(u, v):
    sq, nu, nv = (u - v).pow(2).sum(-1), u.pow(2).sum(-1), v.pow(2).sum(-1)
    return torch.acosh((1 + 2 * sq / ((1 - nu) * (1 - nv))).clamp(min=1 + 1e-6))


def _poincare(seed, project=True):
    n, pairs = _closure()
    related = torch.zeros(n, n, dtype=torch.bool)
    related[pairs[:, 0], pairs[:, 1]] = True
    related = related | related.T | torch.eye(n, dtype=torch.bool)

    class Embedding(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(n, 2)
            nn.init.uniform_(self.emb.weight, -1e-3, 1e-3)

        def forward(self, idx):  # u, its related v, 10 negatives -> −d(u, ·)
            u, cand = idx[:, 0], idx[:, 1:]
            d = _poincare_distance(self.emb(u)[:, None], self.emb(cand))
            return (-d).masked_fill(related[u[:, None], cand] & (torch.arange(cand.shape[1]) > 0), -1e4)

    torch.manual_seed(seed)
    model = Embedding()
    opt = torch.optim.Adam(model.parameters(), lr=5e-2)
    if project:  # back into the ball after every step, as the paper
        def into_ball(optimizer, args, kwargs):
            with torch.no_grad():
                w = model.emb.weight
                norm = w.norm(dim=1, keepdim=True)
                w.copy_(torch.where(norm >= 1, w / norm * (1 - 1e-5), w))
        opt.register_step_post_hook(into_ball)

    def batches():
        g = torch.Generator().manual_seed(seed)
        while True:
            i = torch.randint(0, len(pairs), (64,), generator=g)
            yield torch.cat([pairs[i], torch.randint(0, n, (64, 10), generator=g)], 1), torch.zeros(64, dtype=torch.long)

    g = torch.Generator().manual_seed(5)
    a_b = pairs[torch.randint(0, len(pairs), (4000,), generator=g)]
    c = torch.randint(0, n, (4000,), generator=g)
    keep = ~related[a_b[:, 0], c]
    a, b, c = a_b[keep, 0], a_b[keep, 1], c[keep]

    @torch.no_grad()
    def ranking(m):  # the share of (related, unrelated) pairs the distance orders right
        w = m.emb.weight
        return float((_poincare_distance(w[a], w[b]) < _poincare_distance(w[a], w[c])).float().mean())
    return gw.Trial(model, opt, batches(), F.cross_entropy, evaluate=ranking)


@pytest.mark.parametrize("seed", SEED_0_FAST)
def test_gradient_spikes_while_the_loss_falls_through_them_are_no_alarm(store, seed):
    """Round 26's Poincaré twin: near the ball's edge the Euclidean gradient is ×10³–10⁴ its median on 20–40 steps
    (by a naive loop over param.grad), while the loss falls through them and the ranking reaches 0.90–0.94; it was
    told a critical explosion and "Adam at lr 0.05 with no warm-up". Now it is told of them as info."""
    trial = _poincare(seed)
    norms, losses = [], []
    with gw.watch(trial.model, trial.optimizer, store=store, name=f"poincare-{seed}") as w:
        for _ in range(300):
            x, y = next(trial.batches)
            loss = trial.loss_fn(trial.model(x), y)
            trial.optimizer.zero_grad()
            loss.backward()
            norms.append(float(trial.model.emb.weight.grad.norm()))
            trial.optimizer.step()
            w.log(loss=loss)
            losses.append(float(loss.detach()))
    norms, losses = np.array(norms), np.array(losses)
    out = norms > 1e3
    assert out.sum() >= 10 and norms.max() > 1e3 * np.median(norms)
    first = int(np.argmax(out))
    assert np.median(losses[first:first + 30]) < 0.9 * np.median(losses[max(0, first - 30):first])
    assert trial.evaluate(trial.model) > 0.85
    assert not w.diagnose().problems
