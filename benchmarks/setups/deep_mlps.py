"""Deep MLPs from the papers that named the problem, on the 8×8 digits.

- Glorot & Bengio (2010), "Understanding the difficulty of training deep
  feedforward neural networks", §3 (sigmoid nets with the standard init
  U[−1/√n, 1/√n] — PyTorch's default ``nn.Linear`` init — saturate and stall)
  and §4.2 (normalised init, eq. 16, keeps tanh nets trainable).
- He, Zhang, Ren & Sun (2015), "Delving deep into rectifiers", §2.2 and
  Fig. 3: a 30-layer ReLU net with Xavier init stalls; with their init
  (std √(2/n)) it trains.
- Zhang, Dauphin & Ma (2019), "Fixup initialization", §2: a residual net
  without normalisation and with He init explodes (its output variance grows
  with the number of blocks); Fixup (§3: zero-init the last layer of each
  branch, rescale the others by L^(−1/(2m−2))) trains it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .common import BenchSetup, Trial, digits_trial, init_linear


def mlp(depth: int, width: int, act: type[nn.Module], n_in: int = 64, n_out: int = 10) -> nn.Sequential:
    """``depth`` Linear layers with ``act`` after each but the last (PyTorch's default init)."""
    dims = [n_in] + [width] * (depth - 1) + [n_out]
    layers: list[nn.Module] = []
    for i in range(depth):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < depth - 1:
            layers.append(act())
    return nn.Sequential(*layers)


def _sgd(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)


def glorot_sigmoid5(seed: int) -> Trial:
    """Glorot & Bengio §3.1 / Fig. 2: 5 sigmoid hidden layers, standard init, SGD: the net stalls at chance.

    The paper sees the top hidden layer driven towards 0; at this scale the measured effect is the
    back-propagated gradient, ×10⁻⁴ from the last layer to the first, with the loss flat.
    """
    torch.manual_seed(seed)
    model = mlp(6, 64, nn.Sigmoid)
    return digits_trial(model, _sgd(model, 0.01), seed)


def sigmoid10(seed: int) -> Trial:
    """A 10-layer sigmoid MLP (Glorot & Bengio's sigmoid net made deeper): stuck at the majority class."""
    torch.manual_seed(seed)
    model = mlp(10, 64, nn.Sigmoid)
    return digits_trial(model, _sgd(model, 0.01), seed)


def glorot_tanh_normalised(seed: int) -> Trial:
    """Glorot & Bengio §4.2, eq. 16: 5 tanh hidden layers with the normalised (Xavier) init train."""
    torch.manual_seed(seed)
    model = init_linear(mlp(6, 64, nn.Tanh), nn.init.xavier_uniform_)
    return digits_trial(model, _sgd(model, 0.01), seed)


def he_relu30_xavier(seed: int) -> Trial:
    """He et al. 2015 Fig. 3: a 30-layer ReLU MLP with Xavier init (std √(1/n)): the signal halves per 2 layers."""
    torch.manual_seed(seed)
    model = init_linear(mlp(30, 64, nn.ReLU), lambda w: nn.init.normal_(w, 0.0, math.sqrt(1.0 / w.shape[1])))
    return digits_trial(model, _sgd(model, 0.01), seed)


def he_relu30_he(seed: int) -> Trial:
    """He et al. 2015 Fig. 3: the same 30-layer ReLU MLP with their init (std √(2/n)), a lower rate: it trains."""
    torch.manual_seed(seed)
    model = init_linear(mlp(30, 64, nn.ReLU), lambda w: nn.init.normal_(w, 0.0, math.sqrt(2.0 / w.shape[1])))
    return digits_trial(model, _sgd(model, 0.002), seed)


class Block(nn.Module):
    """A residual MLP block without normalisation: x + W₂ relu(W₁ x) (Zhang et al. 2019, §2)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(x)))


class ResMLP(nn.Module):
    """Input layer, ``blocks`` residual blocks, output layer."""

    def __init__(self, blocks: int, width: int = 64) -> None:
        super().__init__()
        self.inp = nn.Linear(64, width)
        self.blocks = nn.Sequential(*[Block(width) for _ in range(blocks)])
        self.out = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.blocks(self.inp(x)))


def resmlp30_he(seed: int) -> Trial:
    """Zhang et al. 2019 §2: 30 residual blocks, no normalisation, He init everywhere: the forward signal explodes."""
    torch.manual_seed(seed)
    model = init_linear(ResMLP(30), lambda w: nn.init.kaiming_normal_(w, nonlinearity="relu"))
    return digits_trial(model, _sgd(model, 0.01), seed)


def resmlp30_fixup(seed: int) -> Trial:
    """Zhang et al. 2019 §3 (Fixup): the same net, branch's last layer zero, first layer He × L^(−1/2) (m = 2)."""
    torch.manual_seed(seed)
    model = init_linear(ResMLP(30), lambda w: nn.init.kaiming_normal_(w, nonlinearity="relu"))
    with torch.no_grad():
        for b in model.blocks:
            b.fc1.weight.mul_(30 ** -0.5)
            b.fc2.weight.zero_()
    return digits_trial(model, _sgd(model, 0.01), seed)


_GLOROT = "Glorot & Bengio 2010, AISTATS, "
SETUPS = [
    BenchSetup("glorot_sigmoid5", "vanishing", 300, glorot_sigmoid5, _GLOROT + "§3.1, Fig. 2"),
    BenchSetup("sigmoid10", "vanishing", 300, sigmoid10, _GLOROT + "§3 (deeper)"),
    BenchSetup("glorot_tanh_xavier", "healthy", 300, glorot_tanh_normalised, _GLOROT + "§4.2, eq. 16"),
    BenchSetup("he_relu30_xavier", "vanishing", 200, he_relu30_xavier, "He et al. 2015, ICCV, §2.2, Fig. 3"),
    BenchSetup("he_relu30_he", "healthy", 500, he_relu30_he, "He et al. 2015, ICCV, §2.2, Fig. 3"),
    BenchSetup("fixup_resmlp30_he", "exploding", 100, resmlp30_he, "Zhang, Dauphin & Ma 2019, ICLR, §2"),
    BenchSetup("fixup_resmlp30_fixup", "healthy", 200, resmlp30_fixup, "Zhang, Dauphin & Ma 2019, ICLR, §3"),
]
