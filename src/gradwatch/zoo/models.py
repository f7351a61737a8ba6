"""The zoo's models: MLPs, CNNs, residual nets, row-sequence readers of the digits and RNNs for the synthetic tasks."""

from __future__ import annotations

from typing import Callable, TypeVar

import torch
from torch import Tensor, nn

from gradwatch.probes.temporal import unroll
from gradwatch.remedies import he_init
from gradwatch.remedies.structure import ResidualBlock

M = TypeVar("M", bound=nn.Module)


def mlp(depth: int, width: int, activation: Callable[[], nn.Module], n_in: int = 64, n_out: int = 10) -> nn.Sequential:
    """``depth`` Linear layers, an activation module after each but the last."""
    dims = [n_in] + [width] * (depth - 1) + [n_out]
    layers: list[nn.Module] = []
    for i in range(depth):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < depth - 1:
            layers.append(activation())
    return nn.Sequential(*layers)



def he_initialised(model: M) -> M:
    """``model`` with He initialisation and zero biases, in place."""
    he_init(model, inplace=True)
    return model


def scaled_init(model: M, gain: float, bias: float = 0.0) -> M:
    """Weights N(0, gain²/fan_in), biases constant."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=gain / m.in_features**0.5)
            nn.init.constant_(m.bias, bias)
    return model


class SmallResNet(nn.Module):
    """A stem, residual blocks (four pre-activation ones by default) and a linear head, for 8×8 digit images."""

    def __init__(self, channels: int = 16, blocks: int = 4, block: Callable[[int], nn.Module] = ResidualBlock) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, channels, 3, padding=1)
        self.blocks = nn.Sequential(*[block(channels) for _ in range(blocks)])
        self.head = nn.Linear(channels, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = self.blocks(self.stem(x.reshape(-1, 1, 8, 8)))
        return self.head(h.mean((2, 3)))




class RowSequenceModel(nn.Module):
    """Reads an 8×8 digit as a sequence of its 8 rows (tokens of 8 pixels)."""

    def __init__(self, kind: str, width: int = 32) -> None:
        super().__init__()
        self.kind = kind
        self.embed = nn.Linear(8, width)
        if kind == "transformer":
            self.pos = nn.Parameter(torch.randn(8, width) * 0.1)
            layer = nn.TransformerEncoderLayer(width, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True)
            self.body: nn.Module = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        else:
            self.body = nn.LSTM(width, width, batch_first=True)
        self.head = nn.Linear(width, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x.reshape(-1, 8, 8))  # (B, T=8, width)
        if self.kind == "transformer":
            return self.head(self.body(h + self.pos).mean(1))
        out, _ = self.body(h)
        return self.head(out[:, -1])




class TaskRNN(nn.Module):
    """A recurrent net for the synthetic tasks: cell → linear read-out (of the last step, or of every step).

    Sequence first: inputs (T, B, n_in). With ``unrolled=True`` the forward pass
    runs the same weights step by step (for Pascanu's regulariser, which needs
    every hidden state); ``last_runs`` then holds them.
    """

    def __init__(self, cell: str, n_in: int, hidden: int, n_out: int, output: str = "last",
                 nonlinearity: str = "tanh") -> None:
        super().__init__()
        self.output, self.unrolled = output, False
        self.rnn: nn.RNNBase
        if cell == "rnn":
            self.rnn = nn.RNN(n_in, hidden, nonlinearity=nonlinearity)
        elif cell == "lstm":
            self.rnn = nn.LSTM(n_in, hidden)
        elif cell == "gru":
            self.rnn = nn.GRU(n_in, hidden)
        else:
            raise ValueError(f"`TaskRNN(cell=…)` expects 'rnn', 'lstm' or 'gru', got {cell!r}")
        self.head = nn.Linear(hidden, n_out)
        self.last_runs: list = []

    def forward(self, x: Tensor) -> Tensor:
        if self.unrolled:
            out, _, _, self.last_runs = unroll(self.rnn, x)
        else:
            out, _ = self.rnn(x)
        return self.head(out[-1] if self.output == "last" else out)


def scale_recurrent(rnn: nn.RNNBase, norm: float) -> None:
    """W_hh ← ``norm`` × a random orthogonal matrix, in place: every singular value equals ``norm``."""
    w = rnn.weight_hh_l0
    assert isinstance(w, Tensor)
    with torch.no_grad():
        nn.init.orthogonal_(w)
        w.mul_(norm)


class DigitsCNN(nn.Module):
    """A plain CNN for the 8×8 digits: ``depth`` 3×3 convolutions (optionally BatchNorm), global pooling, a head."""

    def __init__(self, depth: int, act: Callable[[], nn.Module], norm: bool = False, width: int = 16) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = 1
        for _ in range(depth):
            layers.append(nn.Conv2d(c, width, 3, padding=1))
            if norm:
                layers.append(nn.BatchNorm2d(width))
            layers.append(act())
            c = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x.reshape(-1, 1, 8, 8)).mean((2, 3)))


class PlainResBlock(nn.Module):
    """x + conv(relu(conv(x))) without normalisation."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1, self.relu, self.conv2 = nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(self.relu(self.conv1(x)))


class PlainResNet(SmallResNet):
    """The same residual CNN with eight blocks that have no normalisation."""

    def __init__(self, blocks: int = 8, channels: int = 16) -> None:
        super().__init__(channels, blocks, PlainResBlock)
