"""Set-ups written by a helper who read only the README (seventeenth session, "round 10"), labelled by plain
measurement.

gradwatch was wrong on some of them then — the ReLU swap turned a highway net's gates into ReLUs, norms and skips
wrapped only its stem, a OneCycle schedule's blow-up was blamed on the initial weights — and those were fixed
after, so they are no longer held out: they keep the fixes from coming undone. Left out, because the truth module
cannot label them or they are not what they were meant to be: the hand-written GPTs (attention-logit growth is no
kind of the truth module's), the GANs (their score is the modes covered, not a loss), `F.softmax` before the
cross-entropy (it learns to 0.86, over the truth's 0.8) and the LSTM "twin" with forget bias 8 (a plateau at chance,
not healthy). Those stay as tests of their own (``tests/test_round10.py``).
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .common import BenchSetup, Trial, accuracy, digits_trial

# --- residual blocks of the user's own class, without normalisation (Zhang, Dauphin & Ma 2019, §2) ---------------

_DEPTH, _WIDTH = 32, 64


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(_WIDTH, _WIDTH), nn.Linear(_WIDTH, _WIDTH)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(F.relu(self.fc1(x)))


class _ResMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(64, _WIDTH)
        self.blocks = nn.ModuleList([_Block() for _ in range(_DEPTH)])
        self.head = nn.Linear(_WIDTH, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def _residual(seed: int, fixup: bool) -> Trial:
    torch.manual_seed(seed)
    model = _ResMLP()
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    if fixup:  # each branch's last layer at zero, its first scaled by L^(-1/2) (two layers a branch), the head at zero
        with torch.no_grad():
            for block in model.blocks:
                block.fc1.weight.mul_(_DEPTH ** -0.5)
                nn.init.zeros_(block.fc2.weight)
            nn.init.zeros_(model.head.weight)
    return digits_trial(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), seed)


def residual_blocks(seed: int) -> Trial:
    """32 residual blocks x + fc2(relu(fc1(x))) of the user's own class in an ``nn.ModuleList``, He init, no
    normalisation, SGD 0.1 with momentum: the output's variance grows with depth and the run goes non-finite."""
    return _residual(seed, fixup=False)


def residual_blocks_fixup(seed: int) -> Trial:
    """Its twin: Fixup's initialisation (Zhang et al. 2019, §3), the rest the same."""
    return _residual(seed, fixup=True)


# --- a tanh nn.RNN on a long-lag recall task (Bengio et al. 1994; Pascanu et al. 2013) --------------------------

_T, _K, _H = 100, 8, 64


def _recall(g: torch.Generator, batch: int) -> tuple[Tensor, Tensor]:
    """The class of the first of T inputs, to be told at the end; T − 1 one-hot distractors at half amplitude."""
    cls = torch.randint(0, _K, (batch,), generator=g)
    x = torch.zeros(batch, _T, _K + 1)
    x[torch.arange(batch), 0, cls] = 1.0
    x[:, 1:, :_K] = 0.5 * F.one_hot(torch.randint(0, _K, (batch, _T - 1), generator=g), _K).float()
    x[:, -1, _K] = 1.0  # "answer now"
    return x, cls


def _recall_stream(seed: int) -> Iterator[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed + 500)
    while True:
        yield _recall(g, 64)


class _Recurrent(nn.Module):
    def __init__(self, cell: type[nn.RNNBase]) -> None:
        super().__init__()
        self.rnn = cell(_K + 1, _H, batch_first=True)
        self.out = nn.Linear(_H, _K)

    def forward(self, x: Tensor) -> Tensor:
        h, _ = self.rnn(x)
        return self.out(h[:, -1])


def _recall_trial(seed: int, cell: type[nn.RNNBase]) -> Trial:
    torch.manual_seed(seed)
    model = _Recurrent(cell)
    xt, yt = _recall(torch.Generator().manual_seed(4242), 512)
    return Trial(model, torch.optim.Adam(model.parameters(), lr=1e-2), _recall_stream(seed), F.cross_entropy,
                 accuracy(xt, yt))


def tanh_rnn_recall(seed: int) -> Trial:
    """A tanh ``nn.RNN`` (hidden 64, PyTorch's init) that must recall the first of 100 inputs, Adam 1e-2: the
    gradient that reaches t = 0 underflows."""
    return _recall_trial(seed, nn.RNN)


def gru_recall(seed: int) -> Trial:
    """The gated cell the papers recommend on the same task (Cho et al. 2014): the reference fix of the tanh RNN."""
    return _recall_trial(seed, nn.GRU)


# --- highway networks (Srivastava, Greff & Schmidhuber 2015) ----------------------------------------------------


class _Highway(nn.Module):
    def __init__(self, gate_bias: float) -> None:
        super().__init__()
        self.H, self.T = nn.Linear(_WIDTH, _WIDTH), nn.Linear(_WIDTH, _WIDTH)
        nn.init.constant_(self.T.bias, gate_bias)

    def forward(self, x: Tensor) -> Tensor:
        t = torch.sigmoid(self.T(x))
        return torch.tanh(self.H(x)) * t + x * (1 - t)


class _HighwayNet(nn.Module):
    def __init__(self, gate_bias: float) -> None:
        super().__init__()
        self.inp = nn.Linear(64, _WIDTH)
        self.layers = nn.ModuleList([_Highway(gate_bias) for _ in range(30)])
        self.out = nn.Linear(_WIDTH, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x))
        for layer in self.layers:
            h = layer(h)
        return self.out(h)


def _highway(seed: int, gate_bias: float) -> Trial:
    torch.manual_seed(seed)
    model = _HighwayNet(gate_bias)
    return digits_trial(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), seed)


def highway_open(seed: int) -> Trial:
    """30 highway layers whose transform gates start open (b_T = +3): a plain deep tanh net; the gradient vanishes."""
    return _highway(seed, 3.0)


def highway_carry(seed: int) -> Trial:
    """Its twin: the paper's negative gate bias (b_T = −2), so that the layers start by carrying their input. It
    learns slowly: held-out accuracy 0.69 / 0.54 (seeds 0 / 1) at 300 steps, 0.96 / 0.96 at 600, its step count."""
    return _highway(seed, -2.0)


# --- a OneCycle schedule whose peak is 100× the intended one (Smith & Topin 2019) ------------------------------

_ONECYCLE_STEPS = 300


def _onecycle(seed: int, max_lr: float) -> Trial:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(64, 128), nn.ReLU()]
    for _ in range(4):
        layers += [nn.Linear(128, 128), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(128, 10))
    for m in model:
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    opt = torch.optim.SGD(model.parameters(), lr=max_lr / 25, momentum=0.9)
    trial = digits_trial(model, opt, seed)
    trial.step_scheduler(torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=_ONECYCLE_STEPS))
    return trial


def onecycle_high(seed: int) -> Trial:
    """A 6-layer ReLU MLP (He init), SGD with momentum under ``OneCycleLR`` at max_lr 5.0 (0.05 meant): it trains,
    then blows up as the rate climbs."""
    return _onecycle(seed, 5.0)


def onecycle(seed: int) -> Trial:
    """Its twin: max_lr 0.05."""
    return _onecycle(seed, 0.05)


_R10 = "round 10 (a helper, README only): "
SETUPS = [
    BenchSetup("r10_residual_blocks", "nonfinite", 300, residual_blocks, _R10 + "Zhang, Dauphin & Ma 2019 (Fixup) §2"),
    BenchSetup("r10_residual_blocks_fixup", "healthy", 300, residual_blocks_fixup, _R10 + "Fixup §3"),
    BenchSetup("r10_tanh_rnn_recall", "vanishing", 300, tanh_rnn_recall,
               _R10 + "Bengio et al. 1994; Pascanu et al. 2013 §2", slow=True, reference=gru_recall),
    BenchSetup("r10_highway_open", "vanishing", 300, highway_open, _R10 + "Srivastava et al. 2015 §2 (b_T > 0)"),
    BenchSetup("r10_highway_carry", "healthy", 600, highway_carry, _R10 + "Srivastava et al. 2015 §2, §4 (b_T = −2)"),
    BenchSetup("r10_onecycle_high", "nonfinite", _ONECYCLE_STEPS, onecycle_high,
               _R10 + "Smith & Topin 2019 §3; AUTOTRAINER's 'improper learning rate'"),
    BenchSetup("r10_onecycle", "healthy", _ONECYCLE_STEPS, onecycle, _R10 + "Smith & Topin 2019 §3"),
]
