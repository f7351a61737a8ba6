"""Set-ups written by a helper who read only the README (sixteenth session, "round 9"), labelled by plain measurement.

gradwatch was wrong on some of them then — a net whose layers sit in an ``nn.ModuleDict`` got no normalisation
where the same net in an ``nn.ModuleList`` did, a remedy the findings named was skipped silently in a set-up with
its own ``step()``, the clipping advice quoted a dead net's later norms — and those were fixed after, so they are
no longer held out: they keep the fixes from coming undone. Two of the round's set-ups are not here, because the
truth module cannot label them: a loop that never calls ``zero_grad()`` (its gradient grows ×400, under the 10³
cut, and its score passes 0.8 while its loss does not halve) and a forward with two layers under ``torch.no_grad``
by mistake (it learns; those layers get no gradient, which the truth reads as vanishing and gradwatch as stalled).
Both stay as tests of their own (``tests/test_doctor_repairs.py``, ``tests/test_diagnosis.py``).
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .common import BenchSetup, Trial, accuracy, batches, digits, digits_trial

_DILATIONS = (1, 2, 4, 8, 16, 32, 1, 2, 4, 8, 16, 32)


class _DilatedStack(nn.Module):
    """Twelve dilated causal convolutions (kernel 2, 16 channels) kept in an ``nn.ModuleDict`` and called by key,
    each input padded on the left by its dilation; the activation a function; the time-mean into a linear head."""

    def __init__(self, act: str) -> None:
        super().__init__()
        self.act = act
        self.convs = nn.ModuleDict({f"c{i}": nn.Conv1d(1 if i == 0 else 16, 16, 2, dilation=d)
                                    for i, d in enumerate(_DILATIONS)})
        self.head = nn.Linear(16, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = x.unsqueeze(1)
        for i, d in enumerate(_DILATIONS):
            h = self.convs[f"c{i}"](F.pad(h, (d, 0)))
            h = torch.sigmoid(h) if self.act == "sigmoid" else F.relu(h)
        return self.head(h.mean(-1))


def dilated_sigmoid(seed: int) -> Trial:
    """WaveNet's dilated causal stack (van den Oord et al. 2016, §2.1) without its residual and skip connections
    (§2.4), with sigmoid units and PyTorch's default init (Glorot & Bengio 2010, §3–4): digits read as a
    64-step one-channel signal, SGD at 0.1."""
    torch.manual_seed(seed)
    model = _DilatedStack("sigmoid")
    return digits_trial(model, torch.optim.SGD(model.parameters(), lr=0.1), seed)


def dilated_relu(seed: int) -> Trial:
    """Its twin: ReLU units, He init (He et al. 2015, §2.2), Adam at 1e-3; for 700 steps (at round 9's 300 its
    held-out accuracy is 0.73, under the truth module's 0.8 for a run that learned)."""
    torch.manual_seed(seed)
    model = _DilatedStack("relu")
    for m in model.modules():
        if isinstance(m, nn.Conv1d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return digits_trial(model, torch.optim.Adam(model.parameters(), lr=1e-3), seed)


_T, _H = 100, 64


def _adding(seed: int, batch: int) -> Iterator[tuple[Tensor, Tensor]]:
    """The adding problem, batch first: x (B, T, 2) = (uniform value, marker), y (B, 1)."""
    g = torch.Generator().manual_seed(1000 + seed)
    while True:
        v = torch.rand(batch, _T, generator=g)
        m = torch.zeros(batch, _T)
        a = torch.randint(0, _T // 2, (batch,), generator=g)
        b = torch.randint(_T // 2, _T, (batch,), generator=g)
        m[torch.arange(batch), a] = 1
        m[torch.arange(batch), b] = 1
        yield torch.stack([v, m], -1), (v * m).sum(1, keepdim=True)


class _IRNN(nn.Module):
    """A ReLU RNN written by hand: input and recurrent ``nn.Linear`` cells in an ``nn.ModuleDict``, W_hh = I."""

    def __init__(self) -> None:
        super().__init__()
        self.cell = nn.ModuleDict({"xh": nn.Linear(2, _H), "hh": nn.Linear(_H, _H, bias=False)})
        self.out = nn.Linear(_H, 1)
        with torch.no_grad():
            self.cell["hh"].weight.copy_(torch.eye(_H))
            nn.init.normal_(self.cell["xh"].weight, 0, 0.001)
            nn.init.zeros_(self.cell["xh"].bias)

    def forward(self, x: Tensor) -> Tensor:
        h = x.new_zeros(x.shape[0], _H)
        for t in range(x.shape[1]):
            h = F.relu(self.cell["xh"](x[:, t]) + self.cell["hh"](h))
        return self.out(h)


def irnn_adding(seed: int) -> Trial:
    """Le, Jaitly & Hinton (2015), §3 (the IRNN: ReLU units, identity recurrent weights, zero biases) on the adding
    problem at T = 100 (§4.1), trained with plain SGD at 0.01 and without the gradient clipping the paper uses
    (Pascanu et al. 2013, §3). Held-out R²."""
    torch.manual_seed(seed)
    model = _IRNN()
    x, y = next(_adding(seed + 77, 500))

    @torch.no_grad()
    def r2(m: nn.Module) -> float:
        value = float(1 - F.mse_loss(m(x), y) / y.var())
        return value if math.isfinite(value) else -1.0

    return Trial(model, torch.optim.SGD(model.parameters(), lr=0.01), _adding(seed, 32), nn.MSELoss(), evaluate=r2)


class _Clipped(Trial):
    """A trial whose gradient norm is clipped at 1 before every step (Pascanu et al. 2013, §3.2)."""

    def step(self) -> Tensor:
        x, y = next(self.batches)
        loss = self.loss_fn(self.model(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        return loss.detach()


def irnn_adding_clipped(seed: int) -> Trial:
    """The paper's own recipe for :func:`irnn_adding`: the same IRNN, SGD 0.01, with the gradient norm clipped."""
    t = irnn_adding(seed)
    return _Clipped(t.model, t.optimizer, t.batches, t.loss_fn, evaluate=t.evaluate)


_V, _D, _S = 32, 64, 32


def _language(seed: int, batch: int = 32) -> Iterator[tuple[Tensor, Tensor]]:
    """An order-1 Markov language over 32 tokens, each with three likely successors (0.6, 0.25, 0.13)."""
    g = torch.Generator().manual_seed(4242)  # the same language for every seed
    p = torch.full((_V, _V), 0.02 / _V)
    for i in range(_V):
        p[i, torch.randperm(_V, generator=g)[:3]] += torch.tensor([0.6, 0.25, 0.13])
    p = p / p.sum(1, keepdim=True)
    draw = torch.Generator().manual_seed(seed)
    while True:
        x = torch.empty(batch, _S + 1, dtype=torch.long)
        x[:, 0] = torch.randint(0, _V, (batch,), generator=draw)
        for t in range(_S):
            x[:, t + 1] = torch.multinomial(p[x[:, t]], 1, generator=draw).squeeze(1)
        yield x[:, :-1], x[:, 1:]


class _TiedLM(nn.Module):
    """Four ``nn.TransformerEncoderLayer`` blocks in an ``nn.ModuleList``, causal, tied input and output embeddings
    with the input scaled by √d (Vaswani et al. 2017, §3.4); a final LayerNorm with Pre-LN."""

    mask: Tensor

    def __init__(self, norm_first: bool) -> None:
        super().__init__()
        self.emb, self.pos = nn.Embedding(_V, _D), nn.Embedding(_S, _D)
        self.blocks = nn.ModuleList(nn.TransformerEncoderLayer(_D, 4, 4 * _D, dropout=0.0, batch_first=True,
                                                               norm_first=norm_first) for _ in range(4))
        self.final_ln: nn.Module = nn.LayerNorm(_D) if norm_first else nn.Identity()
        self.head = nn.Linear(_D, _V, bias=False)
        self.head.weight = self.emb.weight
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(_S))

    def forward(self, x: Tensor) -> Tensor:
        h = self.emb(x) * math.sqrt(_D) + self.pos(torch.arange(x.shape[1]))
        for block in self.blocks:
            h = block(h, src_mask=self.mask, is_causal=True)
        return self.head(self.final_ln(h))


def _lm_loss(logits: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(logits.reshape(-1, _V), y.reshape(-1))


def postln_lm(seed: int) -> Trial:
    """Xiong et al. (2020), §3.1–3.2: a Post-LN Transformer language model trained with Adam at 1e-2 and no
    learning-rate warm-up."""
    torch.manual_seed(seed)
    model = _TiedLM(norm_first=False)
    return Trial(model, torch.optim.Adam(model.parameters(), lr=1e-2), _language(seed), _lm_loss)


def preln_lm(seed: int) -> Trial:
    """Its twin (Xiong et al. 2020, §3.3–4): Pre-LN with a final LayerNorm, Adam at 1e-3, a 20-step linear
    warm-up."""
    torch.manual_seed(seed)
    model = _TiedLM(norm_first=True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    warmup = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.05, total_iters=20)
    return Trial(model, opt, _language(seed), _lm_loss, scheduler=warmup)


class _LoopMLP(nn.Module):
    """A ReLU MLP 64-128-128-128-10 in an ``nn.ModuleList`` loop."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(64, 128), nn.Linear(128, 128), nn.Linear(128, 128),
                                     nn.Linear(128, 10)])

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return self.layers[-1](x)


class _Accumulating(Trial):
    """The set-up's own step: gradients accumulated over four micro-batches, each loss divided by four (PyTorch's
    gradient-accumulation recipe)."""

    def step(self) -> Tensor:
        self.optimizer.zero_grad()
        total = torch.zeros(())
        for _ in range(4):
            x, y = next(self.batches)
            loss = self.loss_fn(self.model(x), y) / 4
            loss.backward()
            total += loss.detach()
        self.optimizer.step()
        return total


def _accumulating(seed: int, reduction: str, lr: float) -> Trial:
    torch.manual_seed(seed)
    x, y, xt, yt = digits()
    model = _LoopMLP()
    return _Accumulating(model, torch.optim.SGD(model.parameters(), lr=lr), batches(x, y, 128, seed),
                         nn.CrossEntropyLoss(reduction=reduction), evaluate=accuracy(xt, yt))


def summed_loss_accumulated(seed: int) -> Trial:
    """DeepLocalize's and DeepDiagnosis's "loss summed, not averaged" bug class (Stack Overflow 40050397, "Deep-
    Learning Nan loss reasons"): ``reduction='sum'`` with gradient accumulation over 4 × 128 samples, SGD at 0.05,
    a rate meant for a mean."""
    return _accumulating(seed, "sum", 0.05)


def mean_loss_accumulated(seed: int) -> Trial:
    """Its twin: the same loop with ``reduction='mean'`` and SGD at 0.5."""
    return _accumulating(seed, "mean", 0.5)


class _Bf16MLP(nn.Module):
    """Eight ReLU layers of 128 in an ``nn.ModuleList``, He init, the forward under bf16 autocast on the CPU."""

    def __init__(self) -> None:
        super().__init__()
        dims = [64] + [128] * 8
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.out = nn.Linear(128, 10)
        for layer in self.layers:
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            for layer in self.layers:
                x = F.relu(layer(x))
            return self.out(x).float()


def bf16_mlp(seed: int) -> Trial:
    """PyTorch's AMP documentation ("CPU ops that can autocast to bfloat16") on He et al. (2015)'s deep ReLU MLP:
    digits, Adam at 1e-3."""
    torch.manual_seed(seed)
    model = _Bf16MLP()
    return digits_trial(model, torch.optim.Adam(model.parameters(), lr=1e-3), seed)


def _cancer(seed: int, scale: bool) -> Trial:
    from sklearn.datasets import load_breast_cancer

    xd, yd = load_breast_cancer(return_X_y=True)
    x, y = torch.tensor(xd, dtype=torch.float32), torch.tensor(yd, dtype=torch.float32).unsqueeze(1)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = order[:450], order[450:]
    if scale:
        x = (x - x[train].mean(0)) / x[train].std(0)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(30, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))

    @torch.no_grad()
    def evaluate(m: nn.Module) -> float:
        return float(((m(x[test]) > 0).float() == y[test]).float().mean())

    return Trial(model, torch.optim.SGD(model.parameters(), lr=0.01), batches(x[train], y[train], 32, seed),
                 nn.BCEWithLogitsLoss(), evaluate=evaluate)


def cancer_raw(seed: int) -> Trial:
    """DeepLocalize's "missing data normalisation" bugs (Stack Overflow 37213388, "Keras accuracy does not
    change"): breast-cancer features in their raw units (up to ~4000) into a ReLU MLP, SGD at 0.01."""
    return _cancer(seed, scale=False)


def cancer_scaled(seed: int) -> Trial:
    """Its twin: the features standardised on the training split (the answer's StandardScaler)."""
    return _cancer(seed, scale=True)


_R9 = "round 9 (a helper, README only): "
SETUPS = [
    BenchSetup("r9_dilated_sigmoid", "vanishing", 300, dilated_sigmoid,
               _R9 + "van den Oord et al. 2016 (WaveNet) §2.1 without §2.4's skips; Glorot & Bengio 2010 §3–4"),
    BenchSetup("r9_dilated_relu", "healthy", 700, dilated_relu, _R9 + "WaveNet §2.1 with He et al. 2015 §2.2"),
    BenchSetup("r9_irnn_adding", "exploding", 300, irnn_adding,
               _R9 + "Le, Jaitly & Hinton 2015 §3, §4.1 without clipping; Pascanu et al. 2013 §3", slow=True,
               reference=irnn_adding_clipped),
    BenchSetup("r9_postln_lm", "vanishing", 200, postln_lm, _R9 + "Xiong et al. 2020 §3.1–3.2", slow=True),
    BenchSetup("r9_preln_lm", "healthy", 200, preln_lm, _R9 + "Xiong et al. 2020 §3.3–4", slow=True),
    BenchSetup("r9_summed_loss_accumulated", "nonfinite", 150, summed_loss_accumulated,
               _R9 + "Stack Overflow 40050397; DeepLocalize / DeepDiagnosis summed-loss bugs"),
    BenchSetup("r9_mean_loss_accumulated", "healthy", 150, mean_loss_accumulated,
               _R9 + "PyTorch's gradient-accumulation recipe"),
    BenchSetup("r9_bf16_mlp", "healthy", 300, bf16_mlp, _R9 + "PyTorch AMP docs (CPU bfloat16); He et al. 2015 §2.2"),
    BenchSetup("r9_cancer_raw", "vanishing", 300, cancer_raw,
               _R9 + "DeepLocalize 'missing normalisation'; Stack Overflow 37213388"),
    BenchSetup("r9_cancer_scaled", "healthy", 300, cancer_scaled, _R9 + "Stack Overflow 37213388's answer"),
]
