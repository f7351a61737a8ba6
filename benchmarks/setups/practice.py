"""Nets written the way practitioners write them, with the mistakes the practice literature warns about.

- LeCun, Bottou, Orr & Müller (1998), "Efficient BackProp", §4.3
  (normalise the inputs) and §4.4 (sigmoids: keep them out of their flat
  tails): a tanh net fed raw 0–255 pixel values saturates.
- Lu, Shin, Su & Karniadakis (2020), "Dying ReLU and initialization", §1,
  and Karpathy's CS231n notes ("Commonly used activation functions", ReLU:
  "as much as 40 % of your network can be dead … if the learning rate is set
  too high"): a ReLU MLP under a too-high SGD learning rate dies.
- The PyTorch tutorials' style of activations applied as functions inside
  ``forward`` (``torch.tanh(x)``, ``F.relu(x)``), which module hooks cannot
  see; weights tied between two layers (Press & Wolf 2017, §3) and
  ``nn.ReLU(inplace=True)`` (torchvision's VGG/ResNet code).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import BenchSetup, Trial, batches, digits_trial
from .deeplocalize import r_squared
from .deep_mlps import mlp


def tanh_raw_pixels(seed: int) -> Trial:
    """LeCun et al. 1998 §4.3, violated: a 4-layer tanh MLP on raw 0–255 grey values; the first tanh saturates."""
    torch.manual_seed(seed)
    model = mlp(4, 64, nn.Tanh)
    return digits_trial(model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), seed, scale="pixels")


def relu_high_lr(seed: int) -> Trial:
    """Karpathy's CS231n warning: a 6-layer ReLU MLP on [0, 1] pixels under SGD at learning rate 0.5 dies."""
    torch.manual_seed(seed)
    model = mlp(6, 64, nn.ReLU)
    return digits_trial(model, torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9), seed, scale="unit")


class FunctionalMLP(nn.Module):
    """Linear layers in a ModuleList, the activation called as a function in ``forward`` (invisible to module hooks)."""

    def __init__(self, depth: int, width: int, act: str) -> None:
        super().__init__()
        dims = [64] + [width] * (depth - 1) + [10]
        self.layers = nn.ModuleList(nn.Linear(dims[i], dims[i + 1]) for i in range(depth))
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = torch.tanh(layer(x)) if self.act == "tanh" else F.relu(layer(x))
        return self.layers[-1](x)


def functional_tanh(seed: int) -> Trial:
    """A 20-layer net with ``torch.tanh`` inside ``forward`` and PyTorch's default init: the gradient vanishes."""
    torch.manual_seed(seed)
    model = FunctionalMLP(20, 64, "tanh")
    return digits_trial(model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), seed)


def _functional_relu(seed: int, lr: float) -> Trial:
    torch.manual_seed(seed)
    model = FunctionalMLP(8, 64, "relu")
    for layer in model.layers:
        nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
        nn.init.zeros_(layer.bias)
    return digits_trial(model, torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9), seed)


def functional_relu_he(seed: int) -> Trial:
    """An 8-layer net with ``F.relu`` inside ``forward``, He init, SGD at 0.01: a healthy functional net."""
    return _functional_relu(seed, 0.01)


def functional_relu_lr(seed: int) -> Trial:
    """The same functional-ReLU net at SGD learning rate 0.2 (momentum 0.9): the updates blow the net up."""
    return _functional_relu(seed, 0.2)


class TiedAutoencoderClassifier(nn.Module):
    """Encoder–decoder with tied weights (the decoder is the encoder's transpose), in-place ReLUs, and a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.enc1, self.enc2 = nn.Linear(64, 48), nn.Linear(48, 32)
        self.act = nn.ReLU(inplace=True)
        self.head = nn.Linear(32, 10)
        self.dec_bias = nn.Parameter(torch.zeros(64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.act(self.enc2(self.act(self.enc1(x))))  # (B, 32)
        self.recon = F.linear(F.relu(F.linear(z, self.enc2.weight.t())), self.enc1.weight.t(), self.dec_bias)  # (B, 64)
        return self.head(z)


def tied_inplace(seed: int) -> Trial:
    """A tied-weight autoencoder with a classifier head, in-place ReLUs, Adam: a healthy net of unusual wiring."""
    torch.manual_seed(seed)
    model = TiedAutoencoderClassifier()

    def loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out, y)

    return digits_trial(model, torch.optim.Adam(model.parameters(), lr=1e-3), seed, loss=loss)


def _diabetes() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled diabetes data: 10 features (centred and scaled by the file), target 25–346; 350 / 92."""
    from sklearn.datasets import load_diabetes

    d = load_diabetes()
    x, y = torch.tensor(d.data, dtype=torch.float32), torch.tensor(d.target, dtype=torch.float32).reshape(-1, 1)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return x[:350], y[:350], x[350:], y[350:]


def raw_targets_sgd(seed: int) -> Trial:
    """Stack Overflow 63333466 ("Is normalization necessary for regression problem in Neural Network?"): MSE on
    targets left in their own units, trained by SGD, reaches NaN; the answers scale inputs and targets.

    The question's private CSV → scikit-learn's diabetes data (target 25–346, unscaled); its one-layer net → a
    10-64-64-1 ReLU MLP (PyTorch's default init), SGD 0.01, batch 32. The loss starts near 3·10⁴, reaches ~10¹⁰
    within 20 steps, and then every ReLU of both hidden layers is dead; held-out R² −0.4 to −0.7.
    """
    torch.manual_seed(seed)
    x, y, xt, yt = _diabetes()
    model = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    return Trial(model, opt, batches(x, y, 32, seed), F.mse_loss, r_squared(xt, yt))


SETUPS = [
    BenchSetup("tanh_raw_pixels", "saturation", 200, tanh_raw_pixels, "LeCun et al. 1998, Efficient BackProp, §4.3"),
    BenchSetup("relu_high_lr", "dead_units", 200, relu_high_lr,
               "Lu et al. 2020, Dying ReLU and initialization, §1; CS231n notes, ReLU"),
    BenchSetup("functional_tanh", "vanishing", 300, functional_tanh, "PyTorch tutorials' functional style; Glorot & Bengio 2010 §3"),
    BenchSetup("functional_relu_he", "healthy", 300, functional_relu_he, "PyTorch tutorials' functional style; He et al. 2015"),
    BenchSetup("functional_relu_lr", "exploding", 300, functional_relu_lr, "PyTorch tutorials' functional style, too-high rate"),
    BenchSetup("tied_inplace", "healthy", 300, tied_inplace, "Press & Wolf 2017, §3 (tied weights); torchvision (inplace ReLU)"),
    BenchSetup("so_raw_targets_sgd", "exploding", 200, raw_targets_sgd,
               "Stack Overflow 63333466 (MSE on unscaled regression targets, SGD), on scikit-learn's diabetes data"),
]
