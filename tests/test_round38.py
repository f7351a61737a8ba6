"""The thirty-fifth session's first set: round 38 (written from the README alone, each ported from a public source),
each against its reference: a scheduler never stepped, a layer-wise decay compounded at every step, an EMA copied in
and never restored, a hard argmax selection."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gradwatch as gw
from gradwatch.diagnosis.remedies import REMEDIES
from gradwatch.doctor import surgery
from gradwatch.watching.zeroing import WrittenCheck
from gradwatch.zoo.train import readme_watched
from conftest import SEED_0_FAST


def _problems(w) -> list:
    return [f for f in w.diagnose() if f.severity != "info"]


# -- a small Transformer that must route the first token to every position ("first token", T = 8, 10 tokens) --------

T, V = 8, 10
_TEST = torch.randint(0, V, (500, T), generator=torch.Generator().manual_seed(12345))


class _Tiny(nn.Module):
    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.emb, self.pos = nn.Embedding(V, d), nn.Embedding(T, d)
        self.layers = nn.ModuleList(nn.TransformerEncoderLayer(d, 2, 64, dropout=0.0, batch_first=True)
                                    for _ in range(2))
        self.head = nn.Linear(d, V)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x) + self.pos(torch.arange(x.shape[1]))
        for layer in self.layers:
            h = layer(h)
        return self.head(h.mean(1))


def _first_token(model: nn.Module) -> float:
    was = model.training
    model.eval()
    with torch.no_grad():
        acc = float((model(_TEST).argmax(1) == _TEST[:, 0]).float().mean())
    model.train(was)
    return acc


def _batches(seed: int):
    g = torch.Generator().manual_seed(1000 + seed)
    while True:
        x = torch.randint(0, V, (64, T), generator=g)
        yield x, x[:, 0].clone()


def _warmup(step: int) -> float:
    """transformers' get_linear_schedule_with_warmup(30, 600): 0 at step 0."""
    return step / 30 if step < 30 else max(0.0, (600 - step) / 570)


# -- a warm-up scheduler built and never stepped (huggingface/transformers#2331) --------------------------------------

def _never_stepped(seed: int, stepped: bool = False) -> gw.Trial:
    torch.manual_seed(seed)
    model = _Tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup)
    return gw.Trial(model, opt, _batches(seed), F.cross_entropy, evaluate=_first_token,
                    **({"scheduler": sched} if stepped else {}))


@pytest.mark.parametrize("seed", SEED_0_FAST)
def test_a_scheduler_never_stepped_is_told_as_a_rate_of_zero(tmp_path, seed):
    bug, twin = _never_stepped(seed), _never_stepped(seed, stepped=True)
    start = [p.detach().clone() for p in bug.model.parameters()]
    w_bug = readme_watched(bug, tmp_path, "bug", 200)
    w_twin = readme_watched(twin, tmp_path, "twin", 200)
    # the reference: at lr 0 no weight ever moved, while the same schedule stepped learns the task
    assert all(torch.equal(p, s) for p, s in zip(bug.model.parameters(), start))
    assert twin.evaluate(twin.model) > 0.9 > 0.2 > bug.evaluate(bug.model)
    (f,) = _problems(w_bug)
    assert f.kind == "stalled" and f.severity == "critical" and f.remedy_keys == ("step_scheduler",), str(f)
    assert "never stepped" in f.cause and "initial_lr" in f.cause and "0.003" in f.cause
    assert not _problems(w_twin)


def test_a_rate_of_zero_without_a_scheduler_is_named_as_such(tmp_path):
    torch.manual_seed(0)
    model = _Tiny()
    trial = gw.Trial(model, torch.optim.SGD(model.parameters(), lr=0.0), _batches(0), F.cross_entropy)
    (f,) = _problems(readme_watched(trial, tmp_path, "zero", 120))
    assert f.remedy_keys[0] == "set_lr" and "learning rate is 0" in f.cause, str(f)


def test_base_rate_sets_the_groups_at_zero_to_their_initial_rate_and_no_other():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    opt = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.1}, {"params": model[1].parameters(), "lr": 0.2}])
    torch.optim.lr_scheduler.LambdaLR(opt, [lambda s: 0.0, lambda s: 0.5])
    trial = gw.Trial(model, opt, iter(()), F.mse_loss)
    assert [g["lr"] for g in opt.param_groups] == [0.0, 0.1]
    assert surgery.base_rate(trial, {}) is trial
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.1]  # the first at its initial_lr; the second untouched
    assert surgery.base_rate(trial, {}) is None  # nothing at 0 any more


def test_the_doctor_gives_the_rate_back():
    report = gw.doctor(_never_stepped, steps=200, progress=False)
    assert report.best is not None and report.best.parts == ("step_scheduler",), str(report)
    assert report.best.verdict == "fixes it" and report.best.score > 0.9


# -- a layer-wise decay compounded at every step (jaehyunnn/ViTPose_pytorch#20) ---------------------------------------

def _layer_decay(seed: int, every_step: bool = True) -> gw.Trial:
    torch.manual_seed(seed)
    model = _Tiny()
    groups = [[*model.emb.parameters(), *model.pos.parameters()], *[list(l.parameters()) for l in model.layers],
              list(model.head.parameters())]
    opt = torch.optim.AdamW([{"params": g} for g in groups], lr=3e-3)
    scales = [0.75 ** (len(groups) - 1 - i) for i in range(len(groups))]
    if every_step:  # the bug: lr_i = lr · s_i^(step + 1)
        lambdas = [(lambda s: (lambda step: s ** (step + 1)))(s) for s in scales]
    else:
        lambdas = [(lambda s: (lambda step: s))(s) for s in scales]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambdas)
    return gw.Trial(model, opt, _batches(seed), F.cross_entropy, evaluate=_first_token, scheduler=sched)


@pytest.mark.parametrize("seed", SEED_0_FAST)
def test_groups_whose_rate_compounds_to_zero_are_told(tmp_path, seed):
    bug, twin = _layer_decay(seed), _layer_decay(seed, every_step=False)
    w_bug = readme_watched(bug, tmp_path, "bug", 300)
    w_twin = readme_watched(twin, tmp_path, "twin", 300)
    # the reference: the schedule's own rates, 3e-3 · s_i^301 for the groups below the head
    rates = [g["lr"] for g in bug.optimizer.param_groups]
    assert rates[-1] == pytest.approx(3e-3) and all(r < 1e-30 for r in rates[:-1]), rates
    assert twin.evaluate(twin.model) > 0.9 > 0.5 > bug.evaluate(bug.model)
    (f,) = _problems(w_bug)
    assert f.kind == "stalled" and f.remedy_keys[0] == "layer_decay_once", str(f)
    assert "3 of 4 parameter groups" in f.summary and f.layers and all(not n.startswith("head") for n in f.layers)
    with w_bug.open() as run:
        low = run.meta["optimizer_groups_low"]
    assert [g["group"] for g in low["groups"]] == [0, 1, 2] and low["of"] == 4
    assert [g["lr_last"] for g in low["groups"]] == pytest.approx(rates[:-1], rel=1e-6)
    assert not _problems(w_twin)


def test_the_doctor_holds_the_groups_rates():
    report = gw.doctor(_layer_decay, steps=200, progress=False)
    assert report.best is not None and report.best.parts == ("layer_decay_once",), str(report)
    assert report.best.verdict == "fixes it" and report.best.score > 0.9


# -- an EMA copied in for validation and never restored (PKU-YuanGroup/Open-Sora-Plan#186) ----------------------------

@pytest.mark.parametrize("seed", SEED_0_FAST)
def test_weights_set_back_between_steps_are_told(tmp_path, seed):
    runs = {}
    for restore in (False, True):
        torch.manual_seed(seed)
        model = _Tiny()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        shadow = [p.detach().clone() for p in model.parameters()]
        batches = _batches(seed)
        with gw.watch(model, opt, store=tmp_path, name=f"ema-{restore}") as w:
            for step in range(1, 301):
                x, y = next(batches)
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                w.log(loss=loss)
                with torch.no_grad():
                    for s, p in zip(shadow, model.parameters()):
                        s.mul_(0.999).add_(p, alpha=0.001)
                    if step % 10 == 0:  # validation on the averaged weights
                        kept = [p.detach().clone() for p in model.parameters()]
                        for s, p in zip(shadow, model.parameters()):
                            p.copy_(s)
                        _first_token(model)
                        if restore:
                            for k, p in zip(kept, model.parameters()):
                                p.copy_(k)
        runs[restore] = (w, _first_token(model))
    (w_bug, bug_score), (w_twin, twin_score) = runs[False], runs[True]
    assert twin_score > 0.9 > 0.3 > bug_score
    # the reference: 30 validations, 29 of them followed by a backward pass; the step before each is checked, 299
    with w_bug.open() as run:
        assert run.meta["weights_written"] == [29, 29, 299]
    with w_twin.open() as run:
        assert run.meta["weights_written"] == [0, 0, 299]
    (f,) = _problems(w_bug)
    assert f.kind == "stalled" and f.severity == "critical" and f.remedy_keys == ("restore_weights",), str(f)
    assert not _problems(w_twin)


def test_a_write_at_every_step_counts_and_a_restored_one_does_not():
    """WGAN's clamp after every step writes at every check (and so is no occasional set-back); a copy put back before
    the next backward is none."""
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    check = WrittenCheck(model.bias, opt, lambda f, *a: f(*a))
    for step in range(6):
        opt.zero_grad()
        model(torch.randn(8, 4)).pow(2).mean().backward()
        opt.step()
        with torch.no_grad():
            if step < 3:
                model.bias.clamp_(-1e-3, 1e-3)  # written, and (from a bias far from 0) not set back
            else:
                kept = model.bias.detach().clone()
                model.bias.zero_()
                model.bias.copy_(kept)  # written and restored: no change
    opt.zero_grad()
    model(torch.randn(8, 4)).pow(2).mean().backward()
    written, back, checks = check.meta()["weights_written"]
    assert (written, checks) == (3, 6) and back <= written


# -- a hard argmax selection (DynamicViT §3.2; Stack Overflow 67570529) ----------------------------------------------

class _Selector(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.scorer = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))
        self.cls = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.emb(x)
        s = self.scorer(e).squeeze(-1)
        w = F.one_hot(s.argmax(1), s.shape[1]).to(e.dtype)  # no gradient reaches the scorer
        return self.cls((w.unsqueeze(-1) * e).sum(1))


def test_a_hard_argmax_is_named_among_the_cuts(tmp_path):
    torch.manual_seed(0)
    model = _Selector()
    g = torch.Generator().manual_seed(0)

    def batches():
        while True:
            x = torch.randint(0, 10, (64, 12), generator=g)
            y = torch.randint(0, 10, (64,), generator=g)
            x[torch.arange(64), torch.randint(0, 12, (64,), generator=g)] = 10 + y
            yield x, y

    trial = gw.Trial(model, torch.optim.Adam(model.parameters(), lr=1e-2), batches(), F.cross_entropy)
    w = readme_watched(trial, tmp_path, "argmax", 100)
    assert all(p.grad is None for p in model.scorer.parameters())  # the reference: the cut, by a loop over .grad
    (f,) = _problems(w)
    assert f.remedy_keys == ("check_graph",) and "argmax" in f.cause, str(f)
    assert "gumbel_softmax" in REMEDIES["check_graph"]
