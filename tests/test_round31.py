"""The thirty-first session's set-ups: rounds 31 and 32 (written from the README alone, each ported from a public
source), each against its reference."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F

import gradwatch as gw
from gradwatch import remedies
from gradwatch.zoo.train import readme_watched
from conftest import SEED_0_FAST, stratified_digits


def _digit_batches(x, y, seed, size=64):
    g = torch.Generator().manual_seed(1000 + seed)
    while True:
        i = torch.randint(0, len(x), (size,), generator=g)
        yield x[i], y[i]


# -- round 31: LoRA adapters whose A and B both start at 0 (Guitaricet/relora#18; nvidia-cosmos/cosmos-predict2.5#15) --

class LoRALinear(nn.Module):
    """A frozen pre-trained linear layer plus a trainable low-rank update scale·B·A, written as the LoRA tutorials
    write it (A: rank × in, B: out × rank, both parameters of this module)."""

    def __init__(self, base: nn.Linear, rank: int = 4, zero_a: bool = False) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.zeros(rank, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))
        if not zero_a:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale = 2.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * (x @ self.lora_A.T) @ self.lora_B.T


_BASE: dict[str, dict] = {}


def _pretrained():
    """A 64-64-64-10 ReLU MLP trained 200 Adam steps on digits' own labels (once): the base model."""
    xtr, ytr, _, _ = stratified_digits()
    if "state" not in _BASE:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        opt = torch.optim.Adam(net.parameters(), 1e-3)
        for (x, y), _ in zip(_digit_batches(xtr, ytr, 0), range(200)):
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
        _BASE["state"] = copy.deepcopy(net.state_dict())
    net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    net.load_state_dict(_BASE["state"])
    return net


def _lora(seed, zero_a=True):
    """The base model fine-tuned through LoRA adapters on a new label map (each digit's label + 1 mod 10)."""
    xtr, ytr, xte, yte = stratified_digits()
    base = _pretrained()
    torch.manual_seed(seed)
    model = nn.Sequential(LoRALinear(base[0], zero_a=zero_a), nn.ReLU(), LoRALinear(base[2], zero_a=zero_a), nn.ReLU(),
                          LoRALinear(base[4], zero_a=zero_a))

    @torch.no_grad()
    def accuracy(m):
        return float((m(xte).argmax(1) == (yte + 1) % 10).float().mean())

    return gw.Trial(model, torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3),
                    _digit_batches(xtr, (ytr + 1) % 10, seed), F.cross_entropy, evaluate=accuracy)


@pytest.mark.parametrize("seed", SEED_0_FAST)  # seeds 1 and 2: make test-slow
def test_lora_factors_both_at_zero_are_named_and_the_twin_is_quiet(store, seed):
    """Round 31: LoRA with A and B both 0 never moves — by hand, every adapter's .grad is exactly 0 — and was told
    "units that compute the same output … a ReLU's gradient at 0" and "a softmax over a single unit" of a 10-class
    model. Now the zero product is named and its one-factor init offered. The twin (A at random, B at 0) learns
    and the watch is quiet."""
    bug = _lora(seed)
    x, y = next(bug.batches)
    F.cross_entropy(bug.model(x), y).backward()
    assert all(p.grad is not None and not p.grad.any() for p in bug.model.parameters() if p.requires_grad)
    bug.optimizer.zero_grad()
    problems = readme_watched(bug, store, f"lora_{seed}", 200).diagnose().problems
    assert problems and problems[0].kind == "stalled" and problems[0].severity == "critical", problems
    assert "lora_A and lora_B of 3 modules" in problems[0].cause and "softmax" not in problems[0].cause
    assert problems[0].remedy_keys == ("one_factor_init",), problems[0]
    twin = _lora(seed, zero_a=False)
    w = readme_watched(twin, store, f"lora_twin_{seed}", 200)
    assert twin.evaluate(twin.model) > 0.85 and not w.diagnose().problems, w.diagnose()


def test_one_factor_init_keeps_the_output_and_gives_every_factor_a_gradient():
    """The remedy draws the first factor of each zero product and leaves the rest at 0: the model's output at the
    start is the base model's, to the bit, and after one step of SGD both factors have a gradient; the frozen base
    is not touched. A plain Linear layer at 0 is no product (two zero Linear layers in a row are he_init's)."""
    trial = _lora(0)
    x, y = next(trial.batches)
    before = trial.model(x)
    fixed = remedies.one_factor_init(trial.model)
    assert torch.equal(fixed(x), before)
    assert [p.any().item() for n, p in fixed.named_parameters() if "lora" in n] == [True, False] * 3
    for a, b in zip(fixed.modules(), trial.model.modules()):
        if isinstance(a, nn.Linear):
            assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    opt = torch.optim.SGD([p for p in fixed.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(fixed(x), y).backward()
        opt.step()
    assert all(p.grad.any() for n, p in fixed.named_parameters() if "lora" in n)
    assert remedies.zero_factors(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)).apply(
        lambda m: nn.init.zeros_(m.weight) if isinstance(m, nn.Linear) else None)) == []


@pytest.mark.parametrize("init", ["he_init", "lecun_init", "orthogonal_init", "xavier_init"])
def test_the_init_remedies_leave_a_frozen_layer_as_it_is(init):
    """Round 31: the doctor's He-init row drew the frozen pre-trained base of a LoRA net anew and zeroed its biases
    (its own task 0.95 → 0.11). An init remedy draws the trainable layers only."""
    frozen, trained = nn.Linear(8, 8).requires_grad_(False), nn.Linear(8, 8)
    model = nn.Sequential(frozen, nn.ReLU(), trained)
    keep = copy.deepcopy(model)
    out = getattr(remedies, init)(model)
    assert torch.equal(out[0].weight, keep[0].weight) and torch.equal(out[0].bias, keep[0].bias)
    assert not torch.equal(out[2].weight, keep[2].weight)


def test_the_doctor_repairs_lora_factors_at_zero_with_the_base_untouched(tmp_path):
    """The doctor's row for the zero product fixes it (by hand: the row's model trained plainly learns the new
    labels, its frozen base the same tensors as the set-up's), where its only row was He init over the frozen base,
    rated "helps"."""
    report = gw.doctor(_lora, steps=200, seeds=1, progress=False, store=tmp_path / "runs")
    assert report.best is not None and report.best.parts == ("one_factor_init",), report
    assert report.best.verdict == "fixes it"
    assert all(t.parts != ("he_init",) for t in report.trials)
    trial = report.apply(_lora(1), report.best)
    for m, b in zip(trial.model.modules(), _lora(1).model.modules()):
        if isinstance(m, nn.Linear):
            assert torch.equal(m.weight, b.weight)
    for _ in range(200):
        trial.step()
    assert trial.evaluate(trial.model) > 0.85


def test_the_doctors_init_rows_do_not_apply_to_a_net_whose_layers_are_all_frozen():
    """Where every weighted layer is frozen, the doctor's init rows find nothing to change (None: "not tried")."""
    from gradwatch.doctor import surgery

    frozen = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).requires_grad_(False)
    assert all(change(frozen) is None for change in (surgery.he, surgery.lecun, surgery.orthogonal, surgery.xavier))
    assert surgery.he(nn.Sequential(frozen, nn.Linear(2, 2))) is not None


# -- round 32: ZCA whitening by torch.linalg.eigh of a rank-deficient batch covariance (torch.linalg.eigh's docs;
# Huang et al. 2018), and an arccos over a Gram matrix whose diagonal is masked only afterwards (pytorch/pytorch#8069) --

class Whiten(nn.Module):
    """Batch whitening of a layer's output (Decorrelated BatchNorm): by eigh (ZCA) or by a Cholesky factor."""

    def __init__(self, how: str, eps: float = 1e-3) -> None:
        super().__init__()
        self.how, self.eps = how, eps

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        c = h - h.mean(0)
        cov = c.T @ c / (len(h) - 1) + self.eps * torch.eye(h.shape[1])
        if self.how == "zca":
            lam, u = torch.linalg.eigh(cov)
            return c @ (u @ torch.diag(lam.rsqrt()) @ u.T)
        return c @ torch.linalg.inv(torch.linalg.cholesky(cov)).T


def _whitened(seed, how="zca"):
    """Batches of 16 whitened over 32 features: the covariance has rank 15, so 17 of its eigenvalues are equal. The
    pixels in [0, 1], as round 32 scaled them (standardised ones reach the NaN later or not in 30 steps)."""
    d = load_digits()
    order = torch.randperm(len(d.data), generator=torch.Generator().manual_seed(123))[:1400]
    xtr, ytr = torch.tensor(d.data, dtype=torch.float32)[order] / 16, torch.tensor(d.target)[order]
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 32), Whiten(how), nn.ReLU(), nn.Linear(32, 10))
    return gw.Trial(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                    _digit_batches(xtr, ytr, seed, 16), F.cross_entropy)


def _angular(seed):
    """Prototypes on the sphere with MHE's angular energy, mean 1/arccos(p_i·p_j) over i ≠ j, the arccos taken over
    the whole Gram matrix (its diagonal at 1) and the diagonal left out only afterwards."""
    xtr, ytr, _, _ = stratified_digits()
    torch.manual_seed(seed)
    body = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    protos = nn.Parameter(torch.randn(10, 32))
    model = nn.Module()
    model.body, model.protos = body, protos
    model.forward = lambda x: 10.0 * F.normalize(body(x), dim=-1) @ F.normalize(protos, dim=-1).T

    def loss_fn(out, y):
        p = F.normalize(protos, dim=-1)
        theta = torch.acos((p @ p.T).clamp(-1, 1))
        return F.cross_entropy(out, y) + 0.1 * (1 / theta[~torch.eye(10, dtype=torch.bool)]).mean()

    return gw.Trial(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                    _digit_batches(xtr, ytr, seed, 64), loss_fn)


@pytest.mark.parametrize("make,op,words", [(_whitened, "LinalgEighBackward0", "gaps between eigenvalues"),
                                           (_angular, "AcosBackward0", "infinite at ±1")], ids=["eigh", "acos"])
def test_a_nan_made_by_a_decompositions_or_an_arccos_backward_is_told_what_that_operation_needs(tmp_path, make, op,
                                                                                                  words):
    """Round 32: both NaNs were placed at their lines, then told "keep the arguments of sqrt off 0 … logarithms in
    log space" alone. By hand: the loss is finite and a gradient is not at the same step, and the operation's own
    condition holds there — eigenvalues of the covariance equal to float precision, a cosine of exactly 1."""
    trial, made = make(0), False
    for _ in range(30):
        x, y = next(trial.batches)
        loss = trial.loss_fn(trial.model(x), y)
        trial.optimizer.zero_grad()
        loss.backward()
        made = not all(torch.isfinite(p.grad).all() for p in trial.model.parameters() if p.grad is not None)
        if made:
            break
        trial.optimizer.step()
    assert made and torch.isfinite(loss)  # the backward made it
    report = gw.doctor(make, steps=30, progress=False, store=tmp_path / "runs")
    origin = str(report.nonfinite_origin)
    assert op in origin and words in origin and words in report.message, report.message
    (f,) = [f for f in report.diagnosis.problems if f.kind == "nonfinite"]
    assert "a NaN made in the backward pass" in f.cause and "eigh" in f.cause


# -- round 32: a causally masked Transformer classified from position 0, which attends to itself only
# (rasbt/MachineLearning-QandAI-book#18, salesforce/progen#8) ------------------------------------------------------

class CausalClassifier(nn.Module):
    """Two Post-LN encoder layers under a causal mask over 12 tokens, classified from one position's state."""

    def __init__(self, read: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(8, 32)
        self.pos = nn.Parameter(torch.randn(12, 32) * 0.1)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 2)
        self.read = read
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(12))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.emb(x) + self.pos, mask=self.mask, is_causal=True)[:, self.read])


def _counting(seed, read=0):
    """More 1s than 2s among 12 tokens of 8 (the whole sequence decides), Adam at 1e-3, no warm-up."""
    def batches():
        g = torch.Generator().manual_seed(seed)
        while True:
            x = torch.randint(0, 8, (64, 12), generator=g)
            yield x, ((x == 1).sum(1) > (x == 2).sum(1)).long()

    torch.manual_seed(seed)
    model = CausalClassifier(read)
    return gw.Trial(model, torch.optim.Adam(model.parameters(), lr=1e-3), batches(), F.cross_entropy)


@pytest.mark.parametrize("seed", SEED_0_FAST)  # seeds 1 and 2: make test-slow
def test_a_stall_with_balanced_gradients_is_not_blamed_on_post_ln(store, seed):
    """Round 32: classified from position 0, the net cannot see past its first token; it stalled and was told "2
    Post-LN layers trained with no warm-up" — its twin, the same Post-LN layers without a warm-up read at the last
    position, learns. By hand, the embedding's ‖∂L/∂a‖ is a sizeable share of the head input's (Post-LN's stall
    shows as an imbalance of 10⁻³–10⁻² — the fifteenth session's ViT): the Post-LN cause is no longer said, and the
    flat loss is told as one the gradients do not explain (info: a flat loss alone is also a converged run resumed)."""
    bug = _counting(seed)
    w = readme_watched(bug, store, f"first_{seed}", 300)
    found = w.diagnose().findings
    assert [f.kind for f in found] == ["stalled"] and "look outside the gradients" in found[0].cause, w.diagnose()
    assert all("Post-LN" not in f.cause and "warmup" not in f.remedy_keys for f in found), w.diagnose()
    twin = _counting(seed, read=-1)
    readme_watched(twin, store, f"last_{seed}", 300)
    with torch.no_grad():
        x, y = next(twin.batches)
        assert float((twin.model(x).argmax(1) == y).float().mean()) > 0.9
