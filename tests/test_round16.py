"""Round 16's set-ups (written from the README alone, each ported from a public source), each against its reference."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

import gradwatch as gw
from gradwatch.zoo.data import accuracy, batches, digits
from gradwatch.doctor import surgery
from gradwatch.doctor.locate import locate_nonfinite
from conftest import SEED_0_FAST


def _digits():
    """The zoo's digits (standardised on its 1,500 training images): ((x, y), (x_test, y_test))."""
    x, y, xt, yt = digits()
    return (x, y), (xt, yt)


def _batches(x, y, seed, size=64):
    return batches(x, y, size, seed)


class SignSTE(torch.autograd.Function):
    """sign(x) forward; backward: the straight-through estimator passing the gradient where |x| ≤ w (Bengio et al.
    2013; Hubara et al. 2016 §1.3 use w = 1)."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x)
        ctx.w = w
        return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (x.abs() <= ctx.w).to(g.dtype), None


class BinNet(nn.Module):
    def __init__(self, w, width=24):
        super().__init__()
        self.w = w
        self.l1, self.l2, self.l3 = nn.Linear(64, width), nn.Linear(width, width), nn.Linear(width, width)
        self.out = nn.Linear(width, 10)

    def forward(self, x):
        h = SignSTE.apply(self.l1(x), self.w)
        h = SignSTE.apply(self.l2(h), self.w)
        h = SignSTE.apply(self.l3(h), self.w)
        return self.out(h)


def _binarised(seed, w):
    """Round 16's binarised MLP on digits (Adam 1e-3, batches of 64): window w = 0.01 passes 1–1.5 % of the units."""
    (x, y), (xt, yt) = _digits()
    torch.manual_seed(seed)
    model = BinNet(w)
    return gw.Trial(model, torch.optim.Adam(model.parameters(), lr=1e-3), _batches(x, y, seed), F.cross_entropy,
                    accuracy(xt, yt))


def test_a_custom_backwards_gain_is_measured_against_its_gradients_by_hand(store):
    """The recorded ``deriv_rms`` of ``l1.SignSTE()`` at step 0 is ‖∂L/∂(its input)‖ / ‖∂L/∂(its output)‖ measured
    with retain_grad on the same step (the forward draws nothing: the same weights and batch give the same pass)."""
    trial = _binarised(0, 0.01)
    x, y = next(_batches(*_digits()[0], 0))
    m = trial.model
    a1 = m.l1(x)
    a1.retain_grad()
    h = SignSTE.apply(a1, m.w)
    h.retain_grad()
    F.cross_entropy(m.out(SignSTE.apply(m.l3(SignSTE.apply(m.l2(h), m.w)), m.w)), y).backward()
    reference = float(a1.grad.norm() / h.grad.norm())
    m.zero_grad()
    with gw.watch(m, trial.optimizer, store=store, name="ste-gain") as w:
        loss = F.cross_entropy(m(x), y)
        trial.optimizer.zero_grad()
        loss.backward()
        trial.optimizer.step()
        w.log(loss=loss)
    run = gw.open_run(w.path)
    s = run.series("deriv_rms", "activation")
    assert s.names == ["l1.SignSTE()", "l2.SignSTE()", "l3.SignSTE()"]  # in depth order, between the layers
    assert s.values[0, 0] == pytest.approx(reference, rel=1e-5)
    assert run.meta["custom_functions"] == ["SignSTE"]
    assert [e.module for e in run.entities("activation")] == ["SignSTE"] * 3


def test_watching_a_custom_backward_leaves_training_bit_identical(store):
    plain = _binarised(1, 0.01)
    for _ in range(20):
        plain.step()
    watched = _binarised(1, 0.01)
    with gw.watch(watched.model, watched.optimizer, store=store, name="ste-same") as w:
        for _ in range(20):
            w.log(loss=watched.step())
    for a, b in zip(plain.model.parameters(), watched.model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("seed", SEED_0_FAST)
def test_a_straight_through_window_too_narrow_is_named_and_its_twin_is_healthy(store, seed):
    """Round 16 (Bengio et al. 2013; Hubara et al. 2016): at w = 0.01 the vanishing across the binarised net was
    blamed on the weights ("orthogonal init", which by hand does not help). Its cause is the STE's backward, whose
    gain the watch measures: the finding names it and the user's Function. The twin at w = 1 (the same weights)
    learns far better, with no problem finding."""
    trial, twin = _binarised(seed, 0.01), _binarised(seed, 1.0)
    with gw.watch(trial.model, trial.optimizer, store=store, name=f"ste-{seed}") as w:
        for _ in range(300):
            w.log(loss=trial.step())
    with gw.watch(twin.model, twin.optimizer, store=store, name=f"ste-twin-{seed}") as tw:
        for _ in range(300):
            tw.log(loss=twin.step())
    assert twin.evaluate(twin.model) > trial.evaluate(trial.model) + 0.25
    depth = [f for f in w.diagnose().problems if f.kind == "vanishing" and f.layers]
    assert depth and depth[0].cause_key == "custom"
    assert depth[0].remedy_keys[0] == "custom_backward"
    assert "SignSTE" in depth[0].cause and depth[0].numbers["activation_factor"] < 0.2
    assert not tw.diagnose().problems


def test_torchs_own_functions_are_no_custom_backward(store):
    """A reentrant checkpoint runs its block inside a torch Function (``CheckpointFunction``): not the user's, so not
    read as an activation between layers."""

    class Checkpointed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)

        def forward(self, x):
            return self.c(checkpoint(lambda h: torch.tanh(self.b(h)), self.a(x), use_reentrant=True))

    torch.manual_seed(0)
    model = Checkpointed()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gw.watch(model, opt, store=store, name="ckpt") as w:
        for _ in range(3):
            loss = model(torch.randn(16, 8)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            w.log(loss=loss)
    assert "custom_functions" not in gw.open_run(w.path).meta


class _Attention(nn.Module):
    """Round 16 (pytorch/pytorch #41508): a hand-written self-attention whose padding mask is filled with −inf; a
    sequence that is all padding leaves a row with no key, and its softmax is NaN."""

    def __init__(self, d=8):
        super().__init__()
        self.emb, self.q, self.k, self.head = nn.Linear(3, d), nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, 2)

    def forward(self, x):
        tok, pad = x[..., :2], x[..., 2] > 0.5  # the padding flag travels as the last feature
        h = self.emb(torch.cat([tok, torch.zeros_like(tok[..., :1])], -1))
        s = self.q(h) @ self.k(h).transpose(1, 2)
        s = s.masked_fill(pad[:, None, :], float("-inf"))
        return self.head((torch.softmax(s, -1) @ h).mean(1))


def _masked(seed, empty):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 5, 3, generator=g)
    x = (x - x.mean(0)) / x.std(0)  # tokens standardised, as a user's would be
    pad = torch.rand(64, 5, generator=g) < 0.5
    pad[:, 0] = False
    pad[:empty] = True  # the first `empty` sequences are all padding
    x[..., 2] = pad.float()
    y = torch.randint(0, 2, (64,), generator=g)

    def batches():
        while True:
            yield x, y

    torch.manual_seed(seed)
    model = _Attention()
    return gw.Trial(model, torch.optim.Adam(model.parameters(), lr=1e-3), batches(), F.cross_entropy)


def test_a_fully_masked_softmax_row_is_named_as_the_nans_origin():
    """The NaN comes from the softmax over a row of −inf (no NaN given to it), at step 0: the origin names that call
    and its line in this file, not the cross-entropy's backward that only received it (round 16: "the backward pass
    of LogSoftmaxBackward0 … created at the gw.doctor line"). With one key kept in every row, no NaN at all."""
    import inspect

    origin = locate_nonfinite(lambda s: _masked(s, empty=3), 0, 0)
    assert origin is not None and origin.phase == "forward" and origin.step == 0 and origin.from_inf
    assert origin.op == "torch.softmax"
    line = inspect.getsource(_Attention.forward).splitlines().index(
        "        return self.head((torch.softmax(s, -1) @ h).mean(1))")
    assert origin.where == f"test_round16.py:{_Attention.forward.__code__.co_firstlineno + line}"
    assert "every key masked" in str(origin)
    healthy = _masked(0, empty=0)
    assert math.isfinite(float(healthy.step())) and locate_nonfinite(lambda s: _masked(s, empty=0), 0, 2) is None


def test_input_standardisation_leaves_flags_of_0_and_1_alone():
    """A 0/1 feature (here a padding flag read as ``x > 0.5``) keeps its values: standardised per batch statistics it
    would read 0.40 where most tokens are padding (round 16: 1199 padding tokens un-masked and a "fix"). The other
    features are standardised; with nothing but flags and centred features, the remedy does not apply."""
    trial = _masked(0, empty=3)
    trial.batches = iter([(torch.cat([b[0][..., :2] * 50 + 7, b[0][..., 2:]], -1), b[1])
                          for b in [next(_masked(0, empty=3).batches)] * 8])
    x = next(_masked(0, empty=3).batches)[0]
    raw = torch.cat([x[..., :2] * 50 + 7, x[..., 2:]], -1)
    fixed = surgery.standardise(trial, {})
    assert fixed is not None
    (inner,) = [m for m in fixed.model.modules() if isinstance(m, surgery.Standardise)]
    z = inner(raw)
    assert torch.equal(z[..., 2], raw[..., 2])  # the flag, untouched
    assert z[..., :2].flatten(0, 1).mean(0).abs().max() < 1e-4  # the rest, standardised
    assert z[..., :2].flatten(0, 1).std(0).sub(1).abs().max() < 1e-3
    untouched = _masked(0, empty=3)  # its tokens are N(0, 1) already, its flag 0/1
    assert surgery.standardise(untouched, {}) is None


def test_a_rare_pixel_of_data_standardised_elsewhere_counts_as_standardised():
    """Digits z-scored over the whole set: in a trial's first 8 batches a few border pixels have std 0.38–0.47 but
    sit at their centre almost always (median |x| ≈ 0.06): nothing for input standardisation to change (round 16
    spent three of its rows on it)."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:1400]
    x, y = ((x - x.mean(0)) / (x.std(0) + 1e-6))[idx], y[idx]  # a training split of data z-scored over the whole set
    net = nn.Linear(64, 10)
    trial = gw.Trial(net, torch.optim.SGD(net.parameters(), lr=0.1), _batches(x, y, 0), F.cross_entropy)
    first = torch.cat([b[0] for b, _ in zip(_batches(x, y, 0), range(8))])
    std = first.std(0)
    assert ((std > 0) & (std < 0.5)).any()  # the rare pixels the old test took for unstandardised
    assert surgery.standardise(trial, {}) is None
    raw = gw.Trial(nn.Linear(64, 10), torch.optim.SGD(nn.Linear(64, 10).parameters(), lr=0.1),
                   _batches(x * 16 + 8, y, 0), F.cross_entropy)
    assert surgery.standardise(raw, {}) is not None  # the same pixels in raw units still are standardised


def test_the_doctor_names_the_fix_of_a_sqrt_at_zero_beside_its_line(tmp_path):
    """Round 16's siamese net with d = sqrt(Σ(a − b)²) over pairs that include identical ones: the doctor named the
    line of the NaN but not what to write there; its message now carries the backward-singularity remedy."""
    (x, y), _ = _digits()

    def setup(seed):
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
        g = torch.Generator().manual_seed(seed)

        def batches():
            while True:
                i = torch.randint(0, len(x), (32,), generator=g)
                j = i.clone()
                j[16:] = torch.randint(0, len(x), (16,), generator=g)  # half the pairs identical: d = 0
                yield torch.stack([x[i], x[j]], 1), (y[i] == y[j]).float()

        def loss_fn(out, same):
            d = torch.sqrt((out[:, 0] - out[:, 1]).pow(2).sum(1))
            return (same * d.pow(2) + (1 - same) * F.relu(1 - d).pow(2)).mean()

        return gw.Trial(net, torch.optim.Adam(net.parameters(), lr=1e-3), batches(), loss_fn)

    report = gw.doctor(setup, steps=30, seeds=2, store=tmp_path, progress=False)
    assert "SqrtBackward0" in report.message
    assert "torch.sqrt(s + 1e-8)" in report.message


class _BNBlock(nn.Module):
    """Round 16's block relu(BN(Linear(h))), a class of the user's named as timm names its residual ones."""

    def __init__(self, skip=False):
        super().__init__()
        self.lin, self.bn, self.skip = nn.Linear(64, 64), nn.BatchNorm1d(64), skip

    def forward(self, h):
        out = F.relu(self.bn(self.lin(h)))
        return h + out if self.skip else out


_BNBlock.__name__ = _BNBlock.__qualname__ = "Block"


def _deep_bn(seed, skip, depth=50):
    """Yang et al. 2019 ("vanilla batch-normalized networks without skip connections are not trainable at large
    depths"): Linear, 50 BatchNorm blocks, Linear, on digits, SGD 0.03 momentum 0.9; scored in eval mode."""
    (x, y), (xt, yt) = _digits()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 64), *[_BNBlock(skip) for _ in range(depth)], nn.Linear(64, 10))

    def score(m):
        was = m.training
        m.eval()
        try:
            return accuracy(xt, yt)(m)
        finally:
            m.train(was)

    return gw.Trial(model, torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9), _batches(x, y, seed),
                    F.cross_entropy, score)


@pytest.mark.parametrize("seed", SEED_0_FAST)
def test_a_deep_batch_normalised_net_without_skips_is_told_of_skip_connections(store, seed):
    """Round 16: the gradient ×1.5·10⁴ across 50 BatchNorm blocks at step 0 was told "re-initialise the weights"
    (which cannot help: Yang et al. 2019), and a user's class named ``Block`` was taken for a residual one. The growth
    per layer is the first read's ‖∂L/∂a‖ ratio (compared with the records), and ReZero and residual connections
    come first. The twin with skips learns (> 0.8 held out) with no problem finding."""
    trial = _deep_bn(seed, skip=False)
    with gw.watch(trial.model, trial.optimizer, store=store, name=f"bn-{seed}") as w:
        for _ in range(60):
            w.log(loss=trial.step())
    run = gw.open_run(w.path)
    s = run.series("out_grad_norm")
    first = [i for i in range(len(s.names)) if s.values[i, 0] == s.values[i, 0]]
    ratio = s.values[first[0], 0] / s.values[first[-1], 0]
    assert ratio > 1e3  # the explosion across depth at step 0, as recorded
    exploding = [f for f in w.diagnose().problems if f.kind == "exploding"]
    assert exploding and exploding[0].remedy_keys[:2] == ("rezero", "residual")
    assert "without skip connections" in exploding[0].cause and "Yang et al. 2019" in exploding[0].cause
    twin = _deep_bn(seed, skip=True)
    with gw.watch(twin.model, twin.optimizer, store=store, name=f"bn-twin-{seed}") as tw:
        for _ in range(300):
            tw.log(loss=twin.step())
    assert twin.evaluate(twin.model) > 0.8
    assert not tw.diagnose().problems


def test_skip_connections_go_around_a_users_blocks_in_a_sequential():
    """add_residual wraps each shape-keeping block of the user's held by a Sequential whole (the input Linear(64,
    64) too), leaves one that adds its input already, and the ReZero-wrapped deep BatchNorm net learns (by hand,
    seed 0: > 0.95 held out, the baseline < 0.4)."""
    from gradwatch.remedies import ReZero, add_residual

    trial = _deep_bn(0, skip=False, depth=3)
    example = next(_batches(*_digits()[0], 0))[0]
    wrapped = add_residual(trial.model, rezero=True, example=example)
    assert [type(m).__name__ for m in wrapped] == ["ReZero"] * 4 + ["Linear"]
    assert all(isinstance(m.block[0], _BNBlock) for m in list(wrapped)[1:4])
    skipped = nn.Sequential(nn.Linear(64, 64), _BNBlock(skip=True), nn.Linear(64, 10))
    out = add_residual(skipped, rezero=True, example=example)
    assert isinstance(out[1], _BNBlock)  # it adds its input already
    base, fixed = _deep_bn(0, skip=False), surgery.rezero(_deep_bn(0, skip=False), {})
    for t in (base, fixed):
        for _ in range(300):
            t.step()
    assert fixed.evaluate(fixed.model) > 0.95 and base.evaluate(base.model) < 0.4
    assert sum(isinstance(m, ReZero) for m in fixed.model.modules()) == 51


def test_the_share_of_attention_rows_without_a_key_is_measured_by_hand(store):
    """``attn_empty_frac``: the share of query rows whose every key is masked — for the hand-written attention
    above (3 of 64 sequences all padding: 3/64 of the rows), and for nn.MultiheadAttention with a key_padding_mask
    that masks 2 of 8 sequences whole (2/8, every head)."""
    from gradwatch.probes.attention import AttentionProbe

    trial = _masked(0, empty=3)
    x, y = next(trial.batches)
    with gw.watch(trial.model, trial.optimizer, store=store, name="empty-rows") as w:
        loss = F.cross_entropy(trial.model(x), y)
        trial.optimizer.zero_grad()
        loss.backward()
        trial.optimizer.step()
        w.log(loss=loss)
    run = gw.open_run(w.path)
    (e,) = run.entities("attention")
    pad = x[..., 2] > 0.5
    assert run.temporal(e.name, "attn_empty_frac").values[0, 0] == pytest.approx(float(pad.all(1).float().mean()))

    class MHA(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, h, mask):
            return self.attn(h, h, h, key_padding_mask=mask)[0]

    model = MHA()
    mask = torch.zeros(8, 5, dtype=torch.bool)
    mask[:2] = True
    mask[2:, 3:] = True
    probe = AttentionProbe(model).attach()
    model(torch.randn(8, 5, 8), mask)
    stats = probe.collect()
    assert [float(stats[("attn", "attn_empty_frac", h)]) for h in (0, 1)] == pytest.approx([0.25, 0.25])


@pytest.mark.parametrize("seed", SEED_0_FAST)
def test_a_nan_from_fully_masked_attention_rows_is_named_by_the_watch(store, seed):
    """Round 16: the watch said "non-finite values in the forward pass or the loss" and offered input
    standardisation. With rows measured empty at the step the loss went NaN, the cause names them and the remedy a
    key every row keeps; with one key kept in every row the run is finite and has no finding."""
    for empty in (3, 0):
        trial = _masked(seed, empty=empty)
        with gw.watch(trial.model, trial.optimizer, store=store, name=f"masked-{seed}-{empty}") as w:
            for _ in range(20):
                w.log(loss=trial.step())
        found = w.diagnose().problems
        if empty:
            (f,) = [f for f in found if f.kind == "nonfinite"]
            assert f.steps[0] == 0 and f.remedy_keys[0] == "masked_rows"
            assert f"{3 / 64:.1%} of the query rows of _Attention had no key to attend at step 0" in f.cause
        else:
            assert not found
