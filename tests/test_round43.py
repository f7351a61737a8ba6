"""The thirty-seventh session: round 42's hand-written batch norm whose statistics are detached (Ioffe & Szegedy 2015,
§2), missed until now, and round 43's set-ups, each against its reference."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gradwatch as gw
from gradwatch.probes.norms import STRAY_FROM, norm_check
from gradwatch.remedies.norm_backward import project
from gradwatch.zoo.train import readme_watched
from conftest import (ALL_SLOW, SEED_0_FAST, adam_moments, digits_in_order_123, drawn_batches, held_out_accuracy,
                      watched_pair)


def _problems(w) -> list:
    return [f for f in w.diagnose() if f.severity != "info"]


def _told_first(w_bug, w_twin, key: str) -> list:
    """The bug's problem findings, each with ``key`` as its first remedy, where its twin has none."""
    problems = _problems(w_bug)
    assert problems and all(f.remedy_keys[0] == key for f in problems), str(w_bug.diagnose())
    assert not _problems(w_twin), str(w_twin.diagnose())
    return problems


def _trained(trial: gw.Trial, steps: int = 200) -> gw.Trial:
    """``trial`` after ``steps`` plain steps."""
    for _ in range(steps):
        trial.step()
    return trial


# -- a normalisation written by hand, its statistics detached or in the graph -----------------------------------------

class _HandNorm(nn.Module):
    """(x − mean)/√(var + ε)·γ + β over ``dims`` (kept), the statistics detached where ``detach``; over the last
    dimension without the mean where ``rms``. It keeps a running mean and counts its calls, as a hand-written batch
    norm does: a re-run of its forward must leave both as they were."""

    def __init__(self, c: int, detach: bool, dims: tuple[int, ...] = (0, 2, 3), rms: bool = False) -> None:
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))
        self.detach, self.dims, self.rms = detach, dims, rms
        self.register_buffer("running_mean", torch.zeros(c))
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.rms:
            mean, var = torch.zeros_like(x[..., :1]), x.pow(2).mean(-1, keepdim=True)
        else:
            mean, var = x.mean(self.dims, keepdim=True), x.var(self.dims, keepdim=True, unbiased=False)
            with torch.no_grad():
                self.running_mean.mul_(0.9).add_(0.1 * mean.reshape(-1)[: len(self.running_mean)])
        if self.detach:
            mean, var = mean.detach(), var.detach()
        shape = [1] * x.dim()
        shape[1 if x.dim() == 4 else -1] = -1
        return (x - mean) / torch.sqrt(var + 1e-5) * self.weight.view(shape) + self.bias.view(shape)


class _HandBnCnn(nn.Module):
    def __init__(self, detach: bool) -> None:
        super().__init__()
        self.c1, self.n1 = nn.Conv2d(1, 16, 3, padding=1), _HandNorm(16, detach)
        self.c2, self.n2 = nn.Conv2d(16, 32, 3, padding=1), _HandNorm(32, detach)
        self.c3, self.n3 = nn.Conv2d(32, 32, 3, padding=1), _HandNorm(32, detach)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.n1(self.c1(x.view(-1, 1, 8, 8))))
        h = F.relu(self.n2(self.c2(h)))
        h = F.relu(self.n3(self.c3(h)))
        return self.fc(h.mean((2, 3)))


def _hand_bn(seed: int, detach: bool = True) -> gw.Trial:
    """Round 42b: digits (pixels standardised) through three 3×3 convs, each followed by a batch norm written by hand
    and a ReLU, at SGD 0.1, batches of 64 drawn from the first 1400; held-out accuracy on the rest."""
    x, y = digits_in_order_123()
    x = (x - x[:1400].mean(0)) / x[:1400].std(0).clamp(min=1e-3)
    torch.manual_seed(seed)
    model = _HandBnCnn(detach)

    return gw.Trial(model, torch.optim.SGD(model.parameters(), lr=0.1), drawn_batches(x, y, 1400, 64, 1000 + seed),
                    F.cross_entropy, evaluate=held_out_accuracy(x, y, 1400))


@pytest.mark.parametrize("detach", [False, True])
@pytest.mark.parametrize("case", ["batch", "batch1d", "layer", "rms"])
def test_the_norm_check_and_its_projection_against_autograd(case, detach):
    torch.manual_seed(0)
    shape, dims, group, shift = {"batch": ((32, 8, 6, 6), (0, 2, 3), "channel", True),
                                 "batch1d": ((64, 12), (0,), "channel", True),
                                 "layer": ((16, 5, 24), (2,), "row", True),
                                 "rms": ((16, 5, 24), (2,), "row", False)}[case]
    c = shape[1] if case.startswith("batch") else shape[-1]
    m = _HandNorm(c, detach, dims=dims, rms=case == "rms")
    with torch.no_grad():
        m.weight.uniform_(0.5, 2.0)
        m.bias.normal_()
    x = torch.randn(shape) * 3 + 1
    kept, calls, rng = m.running_mean.clone(), m.calls, torch.get_rng_state()
    found = norm_check(m, x)
    # the re-runs leave the module's buffer, its attributes and the random stream as they were
    assert torch.equal(m.running_mean, kept) and m.calls == calls and torch.equal(torch.get_rng_state(), rng)
    assert found is not None and found.group == group and found.shift == shift and found.scale
    # the reference: autograd through the same module with its statistics in the graph
    m_ref = _HandNorm(c, False, dims=dims, rms=case == "rms")
    m_ref.load_state_dict(m.state_dict())
    xs = x.clone().requires_grad_(True)
    g_out = torch.randn(shape)
    (g_ref,) = torch.autograd.grad(m_ref(xs), xs, g_out)
    (g_got,) = torch.autograd.grad(m(xs), xs, g_out)
    if detach:
        assert found.stray > 0.5 and not torch.allclose(g_got, g_ref, atol=1e-3)
        assert torch.allclose(project(g_got, x, dims, shift, True), g_ref, atol=1e-4, rtol=1e-3)
    else:
        assert found.stray < STRAY_FROM / 10 and torch.allclose(g_got, g_ref, atol=1e-5)


def test_modules_that_do_not_normalise_are_left_alone():
    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.g = nn.Parameter(torch.full((8,), 2.0))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.tanh(x * self.g)

    x = torch.randn(16, 8)
    assert norm_check(Scale(), x) is None  # neither shift nor scale leaves a tanh of a scaled input unmoved


@pytest.mark.parametrize("seed", SEED_0_FAST)
def test_a_batch_norm_by_hand_with_detached_statistics_is_found(tmp_path, seed):
    bug, twin = _hand_bn(seed), _hand_bn(seed, detach=False)
    w_bug, w_twin = watched_pair(bug, twin, tmp_path)
    # the reference, by plain measurement: the detached one holds out far less, its first conv's weights grow
    assert bug.evaluate(bug.model) < 0.8 and twin.evaluate(twin.model) > 0.9
    assert float(bug.model.c1.weight.detach().norm()) > 1.8 * float(twin.model.c1.weight.detach().norm())
    found = [f for f in _problems(w_bug) if "norm_stats_in_graph" in f.remedy_keys]
    assert found and found[0].layers == ("n1", "n2", "n3") and found[0].severity == "critical"
    assert found[0].numbers["stray_share"] > 0.5
    assert not _problems(w_twin)
    with w_twin.open() as run:  # the twin's layers were checked and found to normalise, with nothing astray
        seen = run.meta["normalising_layers"]
    assert set(seen) == {"n1", "n2", "n3"} and all(v["stray"] < STRAY_FROM / 10 for v in seen.values())


def test_watching_a_norm_by_hand_leaves_training_bit_identical(tmp_path):
    plain, watched = _hand_bn(0), _hand_bn(0)
    for _ in range(5):
        plain.step()
    readme_watched(watched, tmp_path, "w", 5)
    for (n, p), q in zip(plain.model.named_parameters(), watched.model.parameters()):
        assert torch.equal(p, q), n
    for b, c in zip(plain.model.buffers(), watched.model.buffers()):
        assert torch.equal(b, c)
    calls = [(a.calls, b.calls) for a, b in ((plain.model.n1, watched.model.n1), (plain.model.n3, watched.model.n3))]
    assert all(a == b for a, b in calls), calls


@pytest.mark.parametrize("seed", ALL_SLOW)
def test_the_doctor_projects_a_detached_norm_backward(seed):
    report = gw.doctor(lambda s: _hand_bn(seed + s), steps=200, progress=False)
    assert report.best is not None and report.best.parts == ("norm_stats_in_graph",), str(report)
    assert report.best.verdict == "fixes it"
    # the reference: the repaired set-up, trained by a plain loop on another seed, holds out near the twin
    fixed, twin = report.apply(_hand_bn(seed + 7)), _hand_bn(seed + 7, detach=False)
    for _ in range(200):
        fixed.step()
        twin.step()
    assert fixed.evaluate(fixed.model) > twin.evaluate(twin.model) - 0.06


# -- GroupNorm(C, C) in a CNN's last block, on 1×1 maps: each group one value (pytorch/pytorch#94288) ---------------

class _GnCnn(nn.Module):
    """Four blocks of a 3×3 conv, a GroupNorm and a ReLU on digits (8×8 → 4×4 → 2×2 → 1×1 by max-pools), and a
    linear head; GroupNorm(C, C) in every block (groups of one channel) or GroupNorm(C // 8, C)."""

    def __init__(self, groups_of_one: bool) -> None:
        super().__init__()
        chans, blocks = [1, 16, 32, 64, 64], []
        for i in range(4):
            c = chans[i + 1]
            blocks += [nn.Conv2d(chans[i], c, 3, padding=1), nn.GroupNorm(c if groups_of_one else c // 8, c), nn.ReLU()]
            if i < 3:
                blocks.append(nn.MaxPool2d(2))
        self.features, self.head = nn.Sequential(*blocks), nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.view(-1, 1, 8, 8)).flatten(1))


def _gn(seed: int, groups_of_one: bool = True) -> gw.Trial:
    x, y = digits_in_order_123()
    x = (x - x[:1400].mean()) / x[:1400].std()
    torch.manual_seed(seed)
    model = _GnCnn(groups_of_one)

    return gw.Trial(model, torch.optim.Adam(model.parameters(), lr=1e-3), drawn_batches(x, y, 1400, 64, 1000 + seed),
                    F.cross_entropy, evaluate=held_out_accuracy(x, y, 1400))


@pytest.mark.parametrize("seed", SEED_0_FAST)
def test_a_group_norm_whose_groups_hold_one_value_is_told_first(tmp_path, seed):
    bug, twin = _gn(seed), _gn(seed, groups_of_one=False)
    # the reference: on 1×1 maps GroupNorm(64, 64) outputs its bias whatever its input (up to float rounding of x −
    # mean(x), ×1/√ε), and no gradient reaches the first conv (a loop over .grad)
    probe = _gn(seed).model
    last = probe.features[13]
    with torch.no_grad():
        last.bias.normal_()
    h = torch.randn(5, 64, 1, 1)
    assert torch.allclose(last(h), last.bias.view(1, -1, 1, 1).expand(5, -1, 1, 1), atol=1e-3)
    xb, yb = next(_gn(seed).batches)
    F.cross_entropy(probe(xb), yb).backward()
    assert float(probe.features[0].weight.grad.norm()) < 1e-5
    w_bug, w_twin = watched_pair(bug, twin, tmp_path)
    assert bug.evaluate(bug.model) < 0.2 and twin.evaluate(twin.model) > 0.9
    problems = _told_first(w_bug, w_twin, "drop_single_norm")
    assert "GroupNorm" in problems[0].cause and "'features.13'" in problems[0].cause


@pytest.mark.parametrize("seed", ALL_SLOW)
def test_the_doctor_regroups_a_group_norm_of_single_values(seed):
    report = gw.doctor(lambda s: _gn(seed + s), steps=200, progress=False)
    assert report.best is not None and report.best.parts == ("drop_single_norm",), str(report)
    fixed = _trained(report.apply(_gn(seed + 7)))
    model = fixed.model.inner if hasattr(fixed.model, "inner") else fixed.model
    # found at its first call: the 1×1 block's 64 channels in groups of 8; the others' groups had 16 values or more
    assert [model.features[i].num_groups for i in (1, 5, 9, 13)] == [16, 32, 64, 8]
    assert fixed.evaluate(fixed.model) > 0.9  # the twin's 0.99 by plain measurement


# -- LAMB without its guard for ‖w‖ = 0 on a net whose head starts at 0 (cybertronai/pytorch-lamb#6) ----------------

class _Lamb(torch.optim.Optimizer):
    """LAMB as cybertronai/pytorch-lamb writes it: Adam's step with decoupled weight decay, scaled by the trust ratio
    ‖w‖/‖step‖; ``guard`` is
    its PR #6, a ratio of 1 where either norm is 0 (without it a weight at 0 never moves)."""

    def __init__(self, params, lr: float, guard: bool, betas=(0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.01) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.guard = guard

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                m, v, _ = adam_moments(self, group, p)
                step = m / (v.sqrt() + group["eps"]) + group["weight_decay"] * p
                w_norm, s_norm = p.norm().clamp(0, 10), step.norm()
                ratio = w_norm / s_norm
                if self.guard and (w_norm == 0 or s_norm == 0):
                    ratio = torch.ones(())
                p.add_(step, alpha=-group["lr"] * float(ratio))


def _lamb(seed: int, guard: bool = False) -> gw.Trial:
    """Digits through 64→128→128 ReLU layers and a head zero-initialised (weights and bias, as ViTs' heads are)
    under LAMB at lr 0.01; held-out accuracy."""
    x, y = digits_in_order_123()
    x = (x - x[:1400].mean(0)) / x[:1400].std(0).clamp(min=1e-3)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    nn.init.zeros_(model[4].weight)
    nn.init.zeros_(model[4].bias)

    return gw.Trial(model, _Lamb(model.parameters(), lr=0.01, guard=guard), drawn_batches(x, y, 1400, 64, 1000 + seed),
                    F.cross_entropy, evaluate=held_out_accuracy(x, y, 1400))


@pytest.mark.parametrize("seed", SEED_0_FAST)
def test_a_zero_head_that_lamb_never_moves_is_told_first(tmp_path, seed):
    bug, twin = _lamb(seed), _lamb(seed, guard=True)
    w_bug, w_twin = watched_pair(bug, twin, tmp_path)
    # the reference, by plain measurement: the head is still exactly 0, the body moved by its weight decay alone, at
    # chance
    head = bug.model[4].weight
    assert not head.detach().any() and bug.evaluate(bug.model) < 0.2 and twin.evaluate(twin.model) > 0.9
    x, y = next(_lamb(seed).batches)
    F.cross_entropy(bug.model(x), y).backward()
    assert float(head.grad.norm()) > 0 and not bug.model[0].weight.grad.any()
    problems = _told_first(w_bug, w_twin, "redraw_zero")
    assert "never move" in problems[0].cause and "_Lamb" in problems[0].cause


@pytest.mark.parametrize("seed", ALL_SLOW)
def test_the_doctor_draws_the_head_lamb_never_moved_again(seed):
    report = gw.doctor(lambda s: _lamb(seed + s), steps=200, progress=False)
    # the first row is the finding's first remedy; He initialisation draws the head again too, and may do as well
    row = report.trials[0]
    assert row.parts == ("redraw_zero",) and row.verdict == "fixes it", str(report)
    assert report.best is not None and report.best.verdict == "fixes it"
    fixed = _trained(report.apply(_lamb(seed + 7), row))
    assert fixed.evaluate(fixed.model) > 0.9


# -- optimizer.zero_grad() once an epoch, optimizer.step() every batch (pytorch/pytorch#47175) ----------------------

@pytest.mark.parametrize("seed", SEED_0_FAST)
def test_gradients_zeroed_once_an_epoch_are_told_as_such(tmp_path, seed):
    from test_round8 import _accumulating

    trial, stale, clear = _accumulating(seed), 0, 0
    first = next(p for p in trial.model.parameters() if p.requires_grad)
    with gw.watch(trial.model, trial.optimizer, store=tmp_path, name="epoch") as w:
        for step in range(300):
            x, y = next(trial.batches)
            loss = trial.loss_fn(trial.model(x), y)
            if step % 21 == 0:  # an "epoch" of 21 batches
                trial.optimizer.zero_grad()
            # the reference, counted by hand after each step: a .grad still holding a gradient, and the checks a
            # .grad of zeros leaves unclear (units died once the run blew up) left out
            nonzero = first.grad is not None and bool(first.grad.ne(0).any())
            stale += nonzero
            clear += step > 0 and (first.grad is None or nonzero)
            loss.backward()
            trial.optimizer.step()
            w.log(loss=loss.detach())
    assert w.open().meta["grads_not_zeroed"] == [stale, clear] and 0.5 * clear < stale < clear
    problems = w.diagnose().problems
    assert problems and all(f.cause.startswith("the gradients are zeroed only now and then") for f in problems)
    assert all(f.remedy_keys[0] == "zero_grad" for f in problems)


# -- SupCon's loss on features that were never normalised (HobbitLong/SupContrast#50, #100, #104) -------------------

def _supcon_loss(out: torch.Tensor, y: torch.Tensor, tau: float = 0.07) -> torch.Tensor:
    """SupContrast's SupConLoss (contrast_mode 'all') on two views stacked as (2B, D): the row max subtracted, the
    self-similarity masked out of the denominator, the log-probabilities of the positives averaged."""
    labels = torch.cat([y, y])
    logits = out @ out.T / tau
    logits = logits - logits.max(1, keepdim=True).values.detach()
    not_self = 1 - torch.eye(len(labels))
    positive = (labels[:, None] == labels[None, :]).float() * not_self
    log_prob = logits - torch.log((torch.exp(logits) * not_self).sum(1, keepdim=True))
    return -((positive * log_prob).sum(1) / positive.sum(1)).mean()


class _SupConNet(nn.Module):
    def __init__(self, normalise: bool) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 32))
        self.normalise = normalise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.head(self.encoder(x))
        return F.normalize(z, dim=1) if self.normalise else z


def _supcon(seed: int, normalise: bool = False) -> gw.Trial:
    """Digits (standardised) in two noisy views each (pixels dropped at 20 %, noise 0.3), SupCon at τ 0.07 under
    main_supcon.py's SGD (0.05, momentum 0.9, weight decay 1e-4); held-out 5-nearest-neighbour accuracy on the
    encoder's normalised features."""
    x, y = digits_in_order_123()
    x = (x - x[:1400].mean(0)) / x[:1400].std(0).clamp(min=1e-3)
    torch.manual_seed(seed)
    model = _SupConNet(normalise)

    def views():
        g = torch.Generator().manual_seed(2000 + seed)
        for xb, yb in drawn_batches(x, y, 1400, 64, 1000 + seed):
            two = [xb * (torch.rand(xb.shape, generator=g) > 0.2) + 0.3 * torch.randn(xb.shape, generator=g)
                   for _ in range(2)]
            yield torch.cat(two), yb

    def knn(m: nn.Module) -> float:
        with torch.no_grad():
            bank, query = F.normalize(m.encoder(x[:1400]), dim=1), F.normalize(m.encoder(x[1400:]), dim=1)
            if not (torch.isfinite(bank).all() and torch.isfinite(query).all()):
                return 0.0
            votes = y[:1400][(query @ bank.T).topk(5, dim=1).indices]
            return float((votes.mode(1).values == y[1400:]).float().mean())

    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    return gw.Trial(model, opt, views(), _supcon_loss, evaluate=knn)


def test_similarity_logits_of_unnormalised_embeddings_are_read_off_the_loss():
    from gradwatch.probes.similarity import unnormalised_similarity

    torch.manual_seed(0)
    lin, x, y = nn.Linear(8, 4), torch.randn(6, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    z = lin(x[:3])
    assert unnormalised_similarity(_supcon_loss(lin(x[:6]), y[:3]))
    assert not unnormalised_similarity(_supcon_loss(F.normalize(lin(x[:6]), dim=1), y[:3]))
    assert not unnormalised_similarity(_supcon_loss(lin(x[:6]) / lin(x[:6]).norm(dim=1, keepdim=True), y[:3]))
    assert not unnormalised_similarity(F.cross_entropy(lin(x), y))  # a layer's product: a weight is a factor
    assert not unnormalised_similarity(((z @ z.T) - 1).pow(2).mean())  # a Gram matrix with no exp: a style loss
    loss = F.cross_entropy(z @ z.T / 0.1, torch.arange(3))
    loss.backward()
    assert unnormalised_similarity(loss)  # (node names and edges: read after the backward pass too)


@pytest.mark.parametrize("seed", SEED_0_FAST)
def test_a_contrastive_loss_on_unnormalised_features_is_told_first(tmp_path, seed):
    bug, twin = _supcon(seed), _supcon(seed, normalise=True)
    w_bug, w_twin = watched_pair(bug, twin, tmp_path)
    # the reference, by plain measurement: the bug's loss went non-finite, the twin's features hold out 0.95 or more
    assert not all(torch.isfinite(p).all() for p in bug.model.parameters()) or bug.evaluate(bug.model) < 0.5
    assert twin.evaluate(twin.model) > 0.95
    assert _told_first(w_bug, w_twin, "normalise_embeddings")[0].kind == "nonfinite"


@pytest.mark.parametrize("seed", ALL_SLOW)
def test_the_doctor_normalises_the_embeddings(seed):
    report = gw.doctor(lambda s: _supcon(seed + s), steps=200, progress=False)
    row = report.trials[0]
    assert row.parts == ("normalise_embeddings",) and not row.findings, str(report)
    fixed = _trained(report.apply(_supcon(seed + 7), row))
    assert fixed.evaluate(fixed.model) > 0.95  # as the twin, whose loss does not halve either (SupCon's floor)
