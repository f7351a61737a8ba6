"""The thirty-third session's second set: round 35 (written from the README alone, each ported from a public source),
each against its reference."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gradwatch as gw
from gradwatch.remedies.structure import ZeroReciprocals
from gradwatch.zoo.train import readme_watched
from conftest import SEED_0_FAST

V, T, IGNORE = 8, 6, -100


def _problems(w) -> list:
    return [f for f in w.diagnose() if f.severity != "info"]


# -- a tagger whose batches are at times wholly unlabelled (huggingface/trl#3248; pytorch/pytorch#70348) -------------

def _tag_batch(g: torch.Generator, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random tokens; each position's label is the token before it (the first position's, its own). A sequence is
    labelled with probability 1/2, else every label is ``ignore_index``: a batch of 4 has none 1/16 of the time."""
    x = torch.randint(0, V, (size, T), generator=g)
    y = torch.cat([x[:, :1], x[:, :-1]], 1)
    unlabelled = torch.rand(size, generator=g) < 0.5
    return x, y.masked_fill(unlabelled[:, None], IGNORE).flatten()


class _Tagger(nn.Module):
    """Token and position embeddings, one Post-LN encoder layer, a head per position (logits flattened)."""

    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(V, d), nn.Embedding(T, d)
        self.enc = nn.TransformerEncoderLayer(d, 2, 64, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d, V)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.tok(x) + self.pos(torch.arange(x.shape[1])))).reshape(-1, V)


def _masked_mean(logits: torch.Tensor, y: torch.Tensor, guarded: bool) -> torch.Tensor:
    """The mean over the labelled tokens, written by hand: sum(l·m) / m.sum() — 0/0 on a batch with none."""
    per_token = F.cross_entropy(logits, y.clamp(min=0), reduction="none")
    mask = (y != IGNORE).float()
    count = mask.sum().clamp(min=1) if guarded else mask.sum()
    return (per_token * mask).sum() / count


def _tagger_setup(seed: int, loss: str = "masked") -> gw.Trial:
    torch.manual_seed(seed)
    model = _Tagger()
    g = torch.Generator().manual_seed(seed)
    test = _tag_batch(torch.Generator().manual_seed(999), 1000)

    def batches():
        while True:
            yield _tag_batch(g, 4)

    def accuracy(m: nn.Module) -> float:
        with torch.no_grad():
            x, y = test
            keep = y != IGNORE
            return float((m(x).argmax(1)[keep] == y[keep]).float().mean())

    loss_fn = (nn.CrossEntropyLoss(ignore_index=IGNORE) if loss == "builtin"
               else lambda out, y: _masked_mean(out, y, guarded=loss == "guarded"))
    return gw.Trial(model, torch.optim.Adam(model.parameters(), lr=3e-3), batches(), loss_fn, evaluate=accuracy)


@pytest.mark.parametrize("seed", SEED_0_FAST)
def test_a_masked_mean_over_an_empty_mask_is_told_as_one_batchs_nan(tmp_path, seed):
    bug, twin = _tagger_setup(seed), _tagger_setup(seed, "guarded")
    w_bug = readme_watched(bug, tmp_path, "bug", 300)
    w_twin = readme_watched(twin, tmp_path, "twin", 300)
    # the reference: the first batch of the seed's stream with no label, where the hand-written mean is 0/0
    g = torch.Generator().manual_seed(seed)
    first = next(k for k in range(1000) if (_tag_batch(g, 4)[1] == IGNORE).all())
    assert twin.evaluate(twin.model) > 0.9
    (f,) = [f for f in _problems(w_bug) if f.kind == "nonfinite"]
    assert f.steps[0] == first and f.remedy_keys[0] == "guard_division", str(f)
    assert "0/0" in f.cause and "Post-LN" not in f.cause and "warmup" not in f.remedy_keys
    assert not _problems(w_twin)


@pytest.mark.parametrize("seed", SEED_0_FAST)
def test_nan_losses_the_backward_pass_never_carried_are_info(tmp_path, seed):
    """nn.CrossEntropyLoss(ignore_index=…) on a batch whose every label is ignored is 0/0 = NaN with a gradient of 0:
    the run learns as its twin (the guarded mean) does, and was told "critical: Post-LN without warm-up"."""
    builtin, twin = _tagger_setup(seed, "builtin"), _tagger_setup(seed, "guarded")
    # the reference: on an unlabelled batch the loss is NaN and every gradient exactly 0
    x, y = _tag_batch(torch.Generator().manual_seed(5), 4)
    y = torch.full_like(y, IGNORE)
    loss = builtin.loss_fn(builtin.model(x), y)
    loss.backward()
    assert loss.isnan() and all(not p.grad.any() for p in builtin.model.parameters() if p.grad is not None)
    builtin.optimizer.zero_grad(set_to_none=True)
    w = readme_watched(builtin, tmp_path, "builtin", 300)
    readme_watched(twin, tmp_path, "twin", 300)
    score = builtin.evaluate(builtin.model)
    assert score > 0.9 and abs(score - twin.evaluate(twin.model)) < 0.05
    assert not _problems(w)
    (f,) = [f for f in w.diagnose() if f.kind == "nonfinite"]
    assert f.severity == "info" and "with finite gradients" in f.summary and "ignore_index" in f.cause


def test_a_zero_reciprocal_in_the_loss_makes_the_empty_mean_zero():
    logits = torch.randn(T * 4, V, requires_grad=True)
    y = torch.full((T * 4,), IGNORE)
    assert _masked_mean(logits, y, guarded=False).isnan()
    with ZeroReciprocals():
        loss = _masked_mean(logits, y, guarded=False)
    loss.backward()
    assert loss.item() == 0.0 and not logits.grad.any()  # what the guarded mean gives: 0 / 1


# -- nn.LeakyReLU(True): a negative slope of 1, not inplace=True (PantoMatrix#52) ------------------------------------

def _circles_setup(seed: int, slope_one: bool = True) -> gw.Trial:
    from sklearn.datasets import make_circles

    x, y = make_circles(1200, noise=0.05, factor=0.5, random_state=seed)
    x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)
    torch.manual_seed(seed)
    act = (lambda: nn.LeakyReLU(True)) if slope_one else (lambda: nn.LeakyReLU(inplace=True))  # noqa: E731
    model = nn.Sequential(nn.Linear(2, 32), act(), nn.Linear(32, 32), act(), nn.Linear(32, 1))
    g = torch.Generator().manual_seed(seed)

    def batches():
        while True:
            i = torch.randint(0, 900, (64,), generator=g)
            yield x[i], y[i]

    def accuracy(m: nn.Module) -> float:
        with torch.no_grad():
            return float(((m(x[900:]).squeeze(1) > 0).float() == y[900:]).float().mean())

    return gw.Trial(model, torch.optim.Adam(model.parameters(), lr=1e-2), batches(),
                    lambda out, t: F.binary_cross_entropy_with_logits(out.squeeze(1), t), evaluate=accuracy)


@pytest.mark.parametrize("seed", SEED_0_FAST)
def test_a_net_of_leaky_relus_at_slope_one_is_told_linear(tmp_path, seed):
    bug, twin = _circles_setup(seed), _circles_setup(seed, slope_one=False)
    # the reference: the bug's activations are the identity, so the net is one affine map of its input
    assert all(m.negative_slope == 1.0 for m in bug.model if isinstance(m, nn.LeakyReLU))
    h = torch.randn(5, 2)
    with torch.no_grad():
        w = bug.model[4].weight @ bug.model[2].weight @ bug.model[0].weight
        b = bug.model[4].weight @ (bug.model[2].weight @ bug.model[0].bias + bug.model[2].bias) + bug.model[4].bias
        assert torch.allclose(bug.model(h), h @ w.T + b, atol=1e-5)
    w_bug = readme_watched(bug, tmp_path, "bug", 300)
    w_twin = readme_watched(twin, tmp_path, "twin", 300)
    assert twin.evaluate(twin.model) > 0.95 > 0.6 > bug.evaluate(bug.model)
    (f,) = _problems(w_bug)
    assert f.kind == "stalled" and f.remedy_keys == ("leaky_slope",) and "a linear net" in f.cause
    assert not _problems(w_twin)


def test_the_doctor_gives_the_leaky_relus_their_slope():
    report = gw.doctor(_circles_setup, steps=200, progress=False)
    assert report.best is not None and report.best.parts == ("leaky_slope",), str(report)
    assert report.best.verdict == "fixes it" and report.best.score > 0.95


# -- a gradient norm of 0 on a step is no warning printed to the user ---------------------------------------------

def test_a_step_without_gradient_prints_no_warning(tmp_path):
    """The spike trigger compares log norms: a norm of 0 is −inf there, and −inf − (−inf) printed numpy's
    "invalid value encountered in scalar subtract" on the user's console (round 35)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with gw.watch(model, opt, store=tmp_path, name="zeros", flight=True) as w:
            for k in range(60):
                x = torch.randn(16, 4)
                scale = 0.0 if k % 7 == 6 else 1.0  # a loss of 0 · …: every gradient exactly 0 on those steps
                loss = scale * F.cross_entropy(model(x), (x[:, 0] > 0).long())
                opt.zero_grad()
                loss.backward()
                assert scale or all(not p.grad.any() for p in model.parameters())
                opt.step()
                w.log(loss=loss)
    assert not [c for c in caught if issubclass(c.category, RuntimeWarning) and "gradwatch" in c.filename], caught
