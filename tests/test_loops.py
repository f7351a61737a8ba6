"""Recurrences written by hand with nn.Linear (gradwatch.probes.loops): followed through time without `temporal=`."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

import gradwatch as gw
from conftest import SEEDS, watched_trial
from gradwatch.doctor.catalogue import catalog

V, T, H = 8, 20, 64  # the recall task: vocabulary, sequence length, hidden units


class CharRNN(nn.Module):
    """Karpathy's min-char-rnn (gist karpathy/d4dee566867f8291f086) in PyTorch: h = tanh(W_xh x + W_hh h + b),
    W_hh an nn.Linear called once per time step in a Python loop; "karpathy": every weight N(0, 0.01²) as there,
    "big": the same but W_hh ~ N(0, (3/√H)²), "orthogonal": W_hh orthogonal, the rest PyTorch's default."""

    def __init__(self, init: str, hidden: int = H) -> None:
        super().__init__()
        self.hidden = hidden
        self.Wxh = nn.Linear(V, hidden, bias=False)
        self.Whh = nn.Linear(hidden, hidden)
        self.Why = nn.Linear(hidden, V)
        if init in ("karpathy", "big"):
            for layer in (self.Wxh, self.Whh, self.Why):
                nn.init.normal_(layer.weight, 0, 0.01)
            nn.init.zeros_(self.Whh.bias)
            nn.init.zeros_(self.Why.bias)
            if init == "big":  # radius ≈ 3: Pascanu's necessary condition for exploding holds (λ₁ ≈ 6)
                nn.init.normal_(self.Whh.weight, 0, 3 / math.sqrt(hidden))
        else:
            nn.init.orthogonal_(self.Whh.weight)
            nn.init.zeros_(self.Whh.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # tokens (B, T)
        x = F.one_hot(tokens, V).float()  # (B, T, V)
        h = torch.zeros(x.shape[0], self.hidden)
        for t in range(x.shape[1]):
            h = torch.tanh(self.Wxh(x[:, t]) + self.Whh(h))
        return self.Why(h)


def _whh_grads(model: CharRNN) -> tuple[list[torch.Tensor], torch.utils.hooks.RemovableHandle]:
    """Keep each W_hh call's output and its .grad (retain_grad): the reference per call."""
    outs: list[torch.Tensor] = []

    def keep(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        out.retain_grad()
        outs.append(out)

    return outs, model.Whh.register_forward_hook(keep)


def test_a_linear_called_on_its_own_output_is_followed_through_time(store):
    """‖∂L/∂a‖ of each W_hh call, against retain_grad on the same calls; W_xh (called on each step's token) and the
    head (called once) are not recurrences."""
    torch.manual_seed(0)
    model = CharRNN("orthogonal", hidden=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    tokens = torch.randint(0, V, (5, 12))
    outs, hook = _whh_grads(model)
    with gw.watch(model, opt, store=store, name="loop") as w:  # no temporal=
        F.cross_entropy(model(tokens), tokens[:, 0]).backward()
        opt.step()
    hook.remove()
    run = w.open()
    assert [e.name for e in run.entities("recurrent")] == ["Whh"]
    series = run.temporal("Whh")
    assert series.names == [str(t) for t in range(1, 13)]
    reference = torch.stack([o.grad.norm() for o in outs]).double()
    torch.testing.assert_close(torch.tensor(series.values[:, 0]), reference, rtol=1e-5, atol=0)


def test_micro_batches_add_up_call_by_call(store):
    """Two forward passes before one step: call t of each pass is time step t; their squares add up."""
    torch.manual_seed(1)
    model = CharRNN("orthogonal", hidden=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    batches = [torch.randint(0, V, (4, 6)) for _ in range(2)]
    outs, hook = _whh_grads(model)
    with gw.watch(model, opt, store=store, name="micro") as w:
        for tokens in batches:
            F.cross_entropy(model(tokens), tokens[:, 0]).backward()
        opt.step()
    hook.remove()
    per_pass = torch.stack([o.grad.norm() for o in outs]).double().reshape(2, 6)
    series = w.open().temporal("Whh")
    assert series.names == [str(t) for t in range(1, 7)]
    torch.testing.assert_close(torch.tensor(series.values[:, 0]), per_pass.pow(2).sum(0).sqrt(), rtol=1e-5, atol=0)


class _Shared(nn.Module):
    """Layers called more than once on inputs that do not come from their own earlier calls, and a LayerNorm
    shared by three blocks (called on its own output, but depth, not time)."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(8, 8)
        self.blocks = nn.ModuleList([nn.Linear(8, 8) for _ in range(3)])
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        views = [self.encoder(x), self.encoder(x.flip(0)), self.encoder(x * 2)]  # one encoder, three views
        h = sum(views)
        for block in self.blocks:
            h = self.norm(torch.tanh(block(h)))
        return self.head(h)


def test_shared_layers_that_are_not_recurrences_are_not_followed(store):
    torch.manual_seed(0)
    model = _Shared()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 8), torch.randint(0, 2, (16,))
    with gw.watch(model, opt, store=store, name="shared") as w:
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    run = w.open()
    assert "temporal_grad_norm" not in run.quantities
    assert "out_grad_norm" in run.quantities  # the layers themselves are watched as ever


def test_watching_a_hand_written_rnn_leaves_training_bit_identical(store):
    def train(watched: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = CharRNN("karpathy", hidden=16)
        opt = torch.optim.Adagrad(model.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(0)
        watch = gw.watch(model, opt, store=store, name="bits", overwrite=True, activations=1) if watched else None
        for _ in range(6):
            tokens = torch.randint(0, V, (8, 10), generator=g)
            opt.zero_grad()
            F.cross_entropy(model(tokens), tokens[:, 0]).backward()
            opt.step()
        if watch is not None:
            watch.close()
            assert "temporal_grad_norm" in watch.open().quantities
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(train(False), train(True)):
        assert torch.equal(a, b)


def _recall_batches(seed: int, batch: int = 64):
    """Recall the first of T tokens at the end (every token uniform over V)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        x = torch.randint(0, V, (batch, T), generator=g)
        yield x, x[:, 0].clone()


def _char_rnn_trial(init: str, seed: int) -> gw.Trial:
    """min-char-rnn as its gist trains it (Adagrad 0.1, each gradient entry clipped to ±5), or the orthogonal twin
    with Adam 3·10⁻³; held-out recall accuracy on 1000 sequences (chance 1/8)."""
    torch.manual_seed(seed)
    model = CharRNN(init)
    if init in ("karpathy", "big"):
        opt: torch.optim.Optimizer = torch.optim.Adagrad(model.parameters(), lr=0.1)
        opt.register_step_pre_hook(lambda o, a, k: [p.grad.clamp_(-5, 5) for p in model.parameters() if p.grad is not None]
                                   and None)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    held_out = torch.randint(0, V, (1000, T), generator=torch.Generator().manual_seed(999))

    @torch.no_grad()
    def accuracy(m: nn.Module) -> float:
        return float((m(held_out).argmax(-1) == held_out[:, 0]).float().mean())

    return gw.Trial(model, opt, _recall_batches(seed), F.cross_entropy, evaluate=accuracy)


@pytest.mark.zoo
@pytest.mark.parametrize("seed", SEEDS)
def test_karpathy_char_rnn_vanishing_through_time_is_found(store, seed):
    """Round 7's miss: min-char-rnn's N(0, 0.01²) weights on a task that needs 19 steps of memory. Measured by hand
    (retain_grad on h_t at step 299): ‖∂L/∂h_0‖ 0–2·10⁻⁴ against 0.15 at h_19, recall 0.13–0.25 (chance 0.125).
    Found now as vanishing through time in W_hh; its orthogonal twin with Adam learns the task and stays quiet."""
    sick = _char_rnn_trial("karpathy", seed)
    at_init = float(torch.linalg.svdvals(sick.model.Whh.weight.detach().double())[0])  # ≈ 0.01·2√64 = 0.16
    w = watched_trial(sick, store, f"karpathy-{seed}")
    lam = w.open().series("lambda1", "recurrent")
    assert lam.names == ["Whh"] and lam.steps[0] == 0
    assert lam.values[0, 0] == pytest.approx(at_init, rel=1e-9)  # read before step 0's update
    assert lam.values[0, -1] == pytest.approx(float(torch.linalg.svdvals(sick.model.Whh.weight.detach().double())[0]),
                                             rel=0.05)  # the last read, a few steps before the end
    outs, hook = _whh_grads(sick.model)  # by hand, after training: the gradient at each call's output
    tokens, target = next(sick.batches)
    F.cross_entropy(sick.model(tokens), target).backward()
    hook.remove()
    assert outs[0].grad.norm() < 1e-2 * outs[-1].grad.norm()  # it does vanish through time
    found = [f for f in w.diagnose().problems if f.kind == "vanishing" and f.layers == ("Whh",)]
    assert found, str(w.diagnose())
    assert "through time" in found[0].summary
    # Adagrad 0.1 grows W_hh from λ₁ 0.16 to ~8 while the tanh units saturate: the derivative shrinks it, not W_hh
    assert lam.values[0, -1] > 2 * at_init and "saturated" in found[0].cause and "grew" in found[0].cause
    assert found[0].remedy_keys[0] == "lower_lr"
    assert sick.evaluate(sick.model) < 0.5

    twin = _char_rnn_trial("orthogonal", seed)
    w = watched_trial(twin, store, f"orthogonal-{seed}")
    assert not w.diagnose().problems, str(w.diagnose())
    assert twin.evaluate(twin.model) > 0.9
    assert math.isfinite(float(w.open().temporal("Whh").values[-1, -1]))


@pytest.mark.slow  # (over 20 min of CI on an AVX2 EPYC with it: `make test-slow` runs it)
@pytest.mark.zoo
def test_the_doctors_orthogonal_rows_reach_the_karpathy_char_rnn(store):
    """Round 7: "nothing to fix" (the vanishing went unseen). Now the baseline names it, and the orthogonal rows act
    on the hand-written W_hh: kept orthogonal, W_hh removes the finding on both seeds. A repair is not claimed here:
    this set-up trains chaotically (Adagrad 0.1 on saturating units). Measured over seeds 0–4 by hand, Adam 10⁻²
    alone reaches a recall of 1.0, 0.91, 0.50, 0.12, 0.69, orthogonal W_hh init + Adam 1.0, 1.0, 0.58, 1.0, 1.0; and
    the doctor's own best on seeds 0–1 (Adam, 0.96 with native kernels) does not survive ATEN_CPU_CAPABILITY=default
    (no remedy there halves the loss)."""
    report = gw.doctor(lambda seed: _char_rnn_trial("karpathy", seed), steps=300, seeds=2, rounds=1, store=store,
                       progress=False)
    assert "vanishing" in report.baseline.findings, str(report)
    rows = {t.label: t for t in report.trials}
    kept = rows.get("orthogonal recurrent weights")
    assert kept is not None and kept.findings == [], str(report)  # it reached the nn.Linear W_hh
    assert "identity/orthogonal init (linear, recurrent)" in rows, str(report)


def test_orthogonal_recurrent_weights_reach_a_hand_written_w_hh():
    """The doctor's orthogonal rows find W_hh by the watch's judgement (a dry run): W_hh kept orthogonal
    (a parametrization), W_xh and the head untouched; the orthogonal init row, W_hh only."""
    trial = _char_rnn_trial("karpathy", 0)
    remedy = next(r for rs in catalog().values() for r in rs if r.key == "orthogonal_rnn")
    fixed = remedy.apply(trial, {})
    assert fixed is not None
    assert parametrize.is_parametrized(fixed.model.Whh, "weight")
    assert not parametrize.is_parametrized(fixed.model.Wxh) and not parametrize.is_parametrized(fixed.model.Why)
    w = fixed.model.Whh.weight.detach()
    torch.testing.assert_close(w @ w.T, torch.eye(H), atol=1e-5, rtol=0)
    trained = {id(p) for g in fixed.optimizer.param_groups for p in g["params"]}
    assert {id(p) for p in fixed.model.parameters()} <= trained  # the new parametrization's weight is trained

    trial = _char_rnn_trial("karpathy", 0)
    before = trial.model.Wxh.weight.detach().clone()
    init = next(r for rs in catalog().values() for r in rs if r.key == "identity_init")
    fixed = init.apply(trial, {})
    w = fixed.model.Whh.weight.detach()
    torch.testing.assert_close(w @ w.T, torch.eye(H), atol=1e-5, rtol=0)
    assert torch.equal(fixed.model.Wxh.weight, before)


@pytest.mark.zoo
@pytest.mark.parametrize("seed", SEEDS)
def test_exploding_through_time_at_initialisation_is_found(store, seed):
    """Round 7's miss: min-char-rnn with W_hh ~ N(0, (3/√H)²) — "healthy" or one loss spike, recall 0.22/0.52
    where the orthogonal twin reaches 1.0. At step 0 the gradient through time grows ×10⁴ over 19 steps (by hand,
    below); later the saturated units mask it. Found now as exploding through time at initialisation, with λ₁(W_hh)
    at step 0 against svdvals."""
    sick = _char_rnn_trial("big", seed)
    at_init = float(torch.linalg.svdvals(sick.model.Whh.weight.detach().double())[0])
    outs, hook = _whh_grads(sick.model)  # by hand, at step 0: the gradient at each call's output
    tokens, target = next(sick.batches)
    F.cross_entropy(sick.model(tokens), target).backward()
    hook.remove()
    sick.optimizer.zero_grad()
    assert outs[0].grad.norm() > 1e3 * outs[-1].grad.norm()
    sick.batches = itertools.chain([(tokens, target)], sick.batches)  # the watched run starts on the same batch
    w = watched_trial(sick, store, f"big-{seed}")
    found = [f for f in w.diagnose().problems if f.kind == "exploding" and f.layers == ("Whh",)]
    assert found and "initialisation" in found[0].summary, str(w.diagnose())
    assert found[0].numbers["lambda1"] == pytest.approx(at_init, rel=1e-9)
    assert found[0].numbers["ratio"] == pytest.approx(float(outs[0].grad.norm() / outs[-1].grad.norm()), rel=1e-4)
    assert found[0].remedy_keys[0] == "smaller_w_hh"
