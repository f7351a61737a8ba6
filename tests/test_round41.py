"""The thirty-sixth session's set: round 41 (written from the README alone, each ported from a public source), each
against its reference: a custom Function's backward that leaves out ``grad_output``, backward hooks left on a
model being trained or piled up by ``forward()``, a ReduceLROnPlateau in mode 'max' stepped on a loss, and an
``exp`` in a contrastive loss that overflows."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gradwatch as gw
from gradwatch.doctor import surgery
from gradwatch.watching.user_hooks import module_hooks, param_hooks
from gradwatch.zoo.train import readme_watched
from conftest import SEED_0_FAST, digits_cnn, digits_in_order_123, drawn_batches


def _problems(w) -> list:
    return [f for f in w.diagnose() if f.severity != "info"]


# -- a swish whose backward returns swish'(x) alone (discuss.pytorch.org/t/139574; pytorch/pytorch#995) -------------

class SwishNoChain(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * torch.sigmoid(x)

    @staticmethod
    def backward(ctx, grad_output):
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(x)
        return s * (1 + x * (1 - s))  # the bug: no grad_output *


class SwishFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * torch.sigmoid(x)

    @staticmethod
    def backward(ctx, grad_output):
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(x)
        return grad_output * s * (1 + x * (1 - s))


class _SwishNet(nn.Module):
    def __init__(self, fn: type[torch.autograd.Function]) -> None:
        super().__init__()
        self.fn = fn
        self.l0, self.l1, self.l2 = nn.Linear(10, 64), nn.Linear(64, 64), nn.Linear(64, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(self.fn.apply(self.l1(self.fn.apply(self.l0(x)))))


def _friedman() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import make_friedman1

    x, y = make_friedman1(n_samples=1500, noise=0.5, random_state=0)
    y = (y - y[:1200].mean()) / y[:1200].std()
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)[:, None]


def _swish(seed: int, fn: type[torch.autograd.Function] = SwishNoChain) -> gw.Trial:
    x, y = _friedman()
    torch.manual_seed(seed)
    model = _SwishNet(fn)

    def r2(m: nn.Module) -> float:
        with torch.no_grad():
            p, t = m(x[1200:]), y[1200:]
            return float(1 - ((p - t) ** 2).sum() / ((t - t.mean()) ** 2).sum())

    return gw.Trial(model, torch.optim.Adam(model.parameters(), lr=3e-3), drawn_batches(x, y, 1200, 64, 1000 + seed),
                    F.mse_loss, evaluate=r2)


def _first_site_slope(trial: gw.Trial) -> float:
    """The reference: log|g_in| regressed on log|g_out| over the entries of the first swish's backward, on the
    trial's first batch, by numpy."""
    x, y = next(trial.batches)
    m = trial.model
    a = m.fn.apply(m.l0(x))
    seen = {}
    a.grad_fn.register_hook(lambda gi, go: seen.update(gi=gi[0].detach().clone(), go=go[0].detach().clone()))
    F.mse_loss(m.l2(m.fn.apply(m.l1(a))), y).backward()
    m.zero_grad(set_to_none=True)
    gi, go = seen["gi"].abs().double().numpy().ravel(), seen["go"].abs().double().numpy().ravel()
    ok = (gi > 0) & (go > 0)
    return float(np.polyfit(np.log(go[ok]), np.log(gi[ok]), 1)[0])


def test_the_chain_slope_is_a_regression_over_the_backward_s_entries(tmp_path):
    for fn, near in ((SwishNoChain, 0.0), (SwishFn, 1.0)):
        reference = _first_site_slope(_swish(0, fn))
        assert abs(reference - near) < 0.15, (fn.__name__, reference)  # the chain rule's 1, or none of it: 0
        w = readme_watched(_swish(0, fn), tmp_path, fn.__name__, 2)
        with w.open() as run:
            s = run.series("chain_slope", "activation")
            first = s.values[s.names.index(f"l0.{fn.__name__}()"), 0]
        assert first == pytest.approx(reference, abs=1e-3)


@pytest.mark.parametrize("seed", SEED_0_FAST)
def test_a_backward_that_leaves_out_grad_output_is_told_first(tmp_path, seed):
    bug, twin = _swish(seed), _swish(seed, SwishFn)
    # the reference: the gradient the bug gives the first layer against autograd's own, on one batch
    x, y = next(_swish(seed).batches)
    grads = []
    for fn in (SwishNoChain, SwishFn):
        t = _swish(seed, fn)
        F.mse_loss(t.model(x), y).backward()
        grads.append(t.model.l0.weight.grad.flatten())
    assert F.cosine_similarity(*grads, dim=0) < 0.5 and grads[0].norm() > 10 * grads[1].norm()
    w_bug = readme_watched(bug, tmp_path, "bug", 300)
    w_twin = readme_watched(twin, tmp_path, "twin", 300)
    assert bug.evaluate(bug.model) < 0.2 and twin.evaluate(twin.model) > 0.6
    problems = _problems(w_bug)
    assert problems and all(f.remedy_keys[0] == "chain_grad_output" and "leaves out the gradient it receives"
                            in f.cause for f in problems), [str(f) for f in problems]
    assert not _problems(w_twin)


def test_the_doctor_multiplies_by_grad_output():
    report = gw.doctor(_swish, steps=300, progress=False)
    assert report.best is not None and report.best.parts == ("chain_grad_output",), str(report)
    assert report.best.verdict == "fixes it" and report.best.score > 0.6


# -- guided backpropagation's hooks left on a CNN being trained (utkuozbulak/pytorch-cnn-visualizations) ------------

def _clamp_to_positive(module, grad_in, grad_out):
    return (torch.clamp(grad_in[0], min=0.0),)


def _guided(seed: int, hooks: bool = True) -> gw.Trial:
    def prepare(model: nn.Module) -> None:
        for m in model.modules():
            if hooks and isinstance(m, nn.ReLU):
                m.register_full_backward_hook(_clamp_to_positive)

    return digits_cnn(seed, prepare)


@pytest.mark.parametrize("seed", SEED_0_FAST)
def test_backward_hooks_left_on_a_model_being_trained_are_told_first(tmp_path, seed):
    bug, twin = _guided(seed), _guided(seed, hooks=False)
    w_bug = readme_watched(bug, tmp_path, "bug", 200)
    w_twin = readme_watched(twin, tmp_path, "twin", 200)
    assert bug.evaluate(bug.model) < 0.3 and twin.evaluate(twin.model) > 0.9
    # the reference: the hooks on each module, by a loop over the modules' hook dictionaries
    held = {name: [len(m._backward_hooks)] * 2 for name, m in bug.model.named_modules() if m._backward_hooks}
    with w_bug.open() as run:
        assert run.meta["backward_hooks"] == {"params": {}, "modules": held} and len(held) == 3
    problems = _problems(w_bug)
    assert problems and all(f.remedy_keys[0] == "remove_backward_hooks" and "backward hooks of your own on modules"
                            in f.cause for f in problems), [str(f) for f in problems]
    assert not _problems(w_twin)
    with w_twin.open() as run:
        assert "backward_hooks" not in run.meta


def test_removing_the_hooks_trains_as_the_twin_does(tmp_path):
    trial = _guided(0)
    model = trial.model
    from gradwatch.probes.weakhook import WeakHook

    kept = model[1].register_full_backward_hook(WeakHook(model, "forward"))  # a library's (gradwatch's): kept
    assert surgery.remove_backward_hooks(model) is model
    assert module_hooks(model) == {} and list(model[1]._backward_hooks) == [kept.id]
    kept.remove()
    assert surgery.remove_backward_hooks(model) is None
    readme_watched(trial, tmp_path, "repaired", 200)
    twin = _guided(0, hooks=False)
    readme_watched(twin, tmp_path, "twin", 200)
    assert trial.evaluate(trial.model) == pytest.approx(twin.evaluate(twin.model), abs=1e-6)


def test_a_library_s_hooks_are_not_the_user_s():
    model = nn.Linear(3, 3)

    def opacus_like(module, grad_in, grad_out):
        return None

    opacus_like.__module__ = "opacus.grad_sample.grad_sample_module"
    model.register_full_backward_hook(opacus_like)
    model.weight.register_hook(lambda g: g)
    model.weight.register_hook(lambda g: g)
    assert module_hooks(model) == {} and param_hooks(model) == {"weight": 2}


# -- MuZero's ×0.5 gradient scaling registered inside forward() (dotnet/TorchSharp#1483) ----------------------------

N_USERS, RANK = 300, 4


def _ratings() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    u, i = torch.randn(N_USERS, RANK, generator=g), torch.randn(N_USERS, RANK, generator=g)
    pairs = torch.randint(0, N_USERS, (33000, 2), generator=g)
    r = (u[pairs[:, 0]] * i[pairs[:, 1]]).sum(1) / math.sqrt(RANK) + 0.1 * torch.randn(33000, generator=g)
    return pairs, r


class _Factorised(nn.Module):
    def __init__(self, in_forward: bool) -> None:
        super().__init__()
        self.user, self.item = nn.Embedding(N_USERS, RANK), nn.Embedding(N_USERS, RANK)
        for e in (self.user, self.item):
            nn.init.normal_(e.weight, std=0.3)
        self.in_forward = in_forward
        if not in_forward:
            self._scale()

    def _scale(self) -> None:
        for e in (self.user, self.item):
            e.weight.register_hook(lambda g: g * 0.5)

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        if self.in_forward:  # the bug: one more hook on each table at every call
            self._scale()
        return (self.user(pairs[:, 0]) * self.item(pairs[:, 1])).sum(1)


def _factorised(seed: int, in_forward: bool = True) -> gw.Trial:
    pairs, r = _ratings()
    torch.manual_seed(seed)
    model = _Factorised(in_forward)

    def r2(m: nn.Module) -> float:
        with torch.no_grad():
            p, t = pairs[30000:], r[30000:]
            pred = (m.user(p[:, 0]) * m.item(p[:, 1])).sum(1)  # (not through forward: no hook added)
            return float(1 - ((pred - t) ** 2).mean() / ((t - t.mean()) ** 2).mean())

    batches = drawn_batches(pairs, r, 30000, 256, 2000 + seed)
    return gw.Trial(model, torch.optim.Adam(model.parameters(), lr=0.02), batches, F.mse_loss, evaluate=r2)


@pytest.mark.parametrize("seed", SEED_0_FAST)
def test_hooks_piled_up_by_forward_are_told_first(tmp_path, seed):
    bug, twin = _factorised(seed), _factorised(seed, in_forward=False)
    w_bug = readme_watched(bug, tmp_path, "bug", 300)
    w_twin = readme_watched(twin, tmp_path, "twin", 300)
    assert bug.evaluate(bug.model) < 0.1 and twin.evaluate(twin.model) > 0.5
    # the reference: the hooks on each table, by len() of its hook dictionary
    assert len(bug.model.user.weight._backward_hooks) == 300
    with w_bug.open() as run:
        assert run.meta["backward_hooks"] == {"params": {"user.weight": [0, 300], "item.weight": [0, 300]},
                                              "modules": {}}
    problems = _problems(w_bug)
    assert problems and all(f.remedy_keys[0] == "hook_once" and "carries 300 of them" in f.cause
                            for f in problems), [str(f) for f in problems]
    assert not _problems(w_twin)


# -- ReduceLROnPlateau(mode='max') stepped on a validation loss (FunctionLab/selene#115) ------------------------------

def _tokens(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences of 16 tokens over 12; the label, the most frequent of the tokens 0–3."""
    x = torch.randint(0, 12, (n, 16), generator=g)
    return x, F.one_hot(x, 12)[..., :4].sum(1).argmax(1)


class _GRU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.gru, self.head = nn.Embedding(12, 16), nn.GRU(16, 48, batch_first=True), nn.Linear(48, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.gru(self.emb(x))[1][-1])


class _PlateauTrial(gw.Trial):
    """Steps its ReduceLROnPlateau on the validation loss every 10 steps (an epoch), as the source does."""

    plateau: torch.optim.lr_scheduler.ReduceLROnPlateau
    val: tuple[torch.Tensor, torch.Tensor]
    steps = 0

    def after_step(self) -> None:
        self.steps += 1
        if self.steps % 10 == 0:
            with torch.no_grad():
                self.plateau.step(float(self.loss_fn(self.model(self.val[0]), self.val[1])))

    def step(self) -> torch.Tensor:
        loss = super().step()
        self.after_step()
        return loss


def _plateau(seed: int, mode: str = "max") -> _PlateauTrial:
    test, val = _tokens(2000, torch.Generator().manual_seed(12345)), _tokens(500, torch.Generator().manual_seed(54321))
    torch.manual_seed(seed)
    model = _GRU()
    g = torch.Generator().manual_seed(1000 + seed)

    def batches():
        while True:
            yield _tokens(64, g)

    def accuracy(m: nn.Module) -> float:
        with torch.no_grad():
            return float((m(test[0]).argmax(1) == test[1]).float().mean())

    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    trial = _PlateauTrial(model, opt, batches(), F.cross_entropy, evaluate=accuracy)
    trial.plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode=mode, factor=0.1, patience=2)
    trial.val = val
    return trial


def _plateau_watched(trial: _PlateauTrial, store, name: str) -> object:
    with gw.watch(trial.model, trial.optimizer, store=store, name=name) as w:
        for _ in range(300):
            x, y = next(trial.batches)
            loss = trial.loss_fn(trial.model(x), y)
            trial.optimizer.zero_grad()
            loss.backward()
            trial.optimizer.step()
            trial.after_step()
            w.log(loss=loss)
    return w


@pytest.mark.parametrize("seed", SEED_0_FAST)
def test_a_plateau_scheduler_in_mode_max_on_a_loss_is_told(tmp_path, seed):
    bug, twin = _plateau(seed), _plateau(seed, "min")
    w_bug, w_twin = _plateau_watched(bug, tmp_path, "bug"), _plateau_watched(twin, tmp_path, "twin")
    # the reference: the rate each optimizer ends at
    assert bug.optimizer.param_groups[0]["lr"] < 1e-6 and twin.optimizer.param_groups[0]["lr"] == 1e-3
    assert bug.evaluate(bug.model) < 0.6 and twin.evaluate(twin.model) > 0.85
    with w_bug.open() as run:
        assert run.meta["plateau_schedulers"] == [{"mode": "max", "factor": 0.1, "patience": 2,
                                                   "best": bug.plateau.best}]
    problems = _problems(w_bug)
    assert problems and all(f.remedy_keys[0] == "plateau_mode_min" and "ReduceLROnPlateau in mode='max'" in f.cause
                            for f in problems), [str(f) for f in problems]
    assert not _problems(w_twin)


def test_mode_min_for_a_plateau_scheduler_given_a_loss():
    trial = _plateau(0)
    assert surgery.plateau_mode_min(trial, {}) is trial
    assert trial.plateau.mode == "min" and trial.plateau.best == math.inf
    trial.plateau.step(2.0)
    trial.plateau.step(1.0)  # an improvement now
    assert trial.plateau.num_bad_epochs == 0
    assert surgery.plateau_mode_min(trial, {}) is None


@pytest.mark.slow
def test_the_doctor_sets_the_plateau_scheduler_s_mode():
    report = gw.doctor(_plateau, steps=300, progress=False)
    assert report.best is not None and report.best.parts == ("plateau_mode_min",), str(report)
    assert report.best.verdict == "fixes it" and report.best.score > 0.85


# -- NT-Xent written with torch.exp at τ = 0.01 (Lightning-bolts#811, #320) ------------------------------------------

class _SimCLR(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU())
        self.proj = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(self.enc(views.flatten(0, 1))), dim=1)


def _nt_xent_exp(out: torch.Tensor, _: torch.Tensor, tau: float = 0.01) -> torch.Tensor:
    """lightning-bolts' nt_xent_loss: the exponentials by hand."""
    n = out.shape[0] // 2
    sim = torch.exp(out @ out.t() / tau)
    neg = torch.clamp(sim.sum(-1) - torch.full((2 * n,), 1 / tau).exp(), min=1e-6)
    pos = torch.exp((out[:n] * out[n:]).sum(-1) / tau).repeat(2)
    return -torch.log(pos / (neg + 1e-6)).mean()


def _nt_xent_logits(out: torch.Tensor, _: torch.Tensor, tau: float = 0.01) -> torch.Tensor:
    """#320's fix: the same loss by F.cross_entropy on the similarities over τ."""
    n = out.shape[0] // 2
    logits = (out @ out.t() / tau).masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
    return F.cross_entropy(logits, torch.cat([torch.arange(n, 2 * n), torch.arange(n)]))


def _simclr(seed: int, loss=_nt_xent_exp) -> gw.Trial:
    x, y = digits_in_order_123()
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(2000 + seed)

    def view(v: torch.Tensor) -> torch.Tensor:
        return v * (torch.rand(v.shape, generator=g) > 0.2) + 0.15 * torch.randn(v.shape, generator=g)

    def batches():
        while True:
            v = x[torch.randint(0, 1400, (128,), generator=g)]
            yield torch.stack([view(v), view(v)]), y[:128]

    model = _SimCLR()
    return gw.Trial(model, torch.optim.Adam(model.parameters(), lr=1e-3), batches(), loss)


@pytest.mark.parametrize("seed", SEED_0_FAST)
def test_an_exp_that_overflows_in_the_loss_is_told(tmp_path, seed):
    bug, twin = _simclr(seed), _simclr(seed, _nt_xent_logits)
    # the reference: e^(1/τ) is inf in float32, and the first loss NaN
    assert torch.full((1,), 100.0).exp().isinf().all()
    x, y = next(_simclr(seed).batches)
    assert not _nt_xent_exp(_simclr(seed).model(x), y).isfinite()
    w_bug = readme_watched(bug, tmp_path, "bug", 100)
    w_twin = readme_watched(twin, tmp_path, "twin", 100)
    problems = _problems(w_bug)
    assert problems and all(f.remedy_keys[0] == "exp_log_space" and f.cause.startswith("the loss exponentiates by hand")
                            for f in problems), [str(f) for f in problems]
    assert not _problems(w_twin)
