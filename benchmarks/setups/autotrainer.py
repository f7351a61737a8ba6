"""Set-ups from AUTOTRAINER (Zhang et al., ICSE 2021) and the model files DeepDiagnosis (Wardat et al., ICSE 2022) ran.

Sources read and re-written here in PyTorch (Keras originals):

- github shiningrain/AUTOTRAINER, ``AutoTrainer/data/simplednn.py`` (the circle
  and blob data) and the repairs its logs name (``vanish_selu``, ``relu_bn``).
  Its ``Improper_Activation_case/demo_activation.py`` (a ReLU on the 3-way
  output) is not here: in PyTorch it trains (loss 4 → 0.8), and its fixed
  version reaches only 0.76–0.79 held-out accuracy on the raw blobs in 200–400
  steps (logistic regression: 0.85), short of the truth module's 0.8;
- github DeepDiagnosis/ICSE2022, ``AUTOTRAINER Model Code/Models_Circle.py``,
  ``Models_Blob.py`` and ``Models_MNIST.py``: width-5 dense stacks of 8–16
  layers with ``exponential``, ``sigmoid`` or ``relu`` activations, He-uniform
  (``VarianceScaling(2.0, 'fan_in', 'uniform')``) or ``RandomUniform()`` init,
  and LeNet-5 variants followed by 8–16 dense layers. MNIST becomes the 8×8
  digits here (kernels 3×3 instead of 5×5, so the shapes fit).
"""

from __future__ import annotations

import torch
from torch import nn

from .common import (BenchSetup, Trial, accuracy, batches, bce_logits, blobs, circles, digits_trial, he_uniform_keras,
                     init_linear, keras_random_uniform)


class Exp(nn.Module):
    """Keras's ``Activation('exponential')``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.exp(x)


def dense_stack(n_in: int, width: int, hidden: int, n_out: int, act: type[nn.Module]) -> nn.Sequential:
    """``hidden`` Dense(width) layers each followed by ``act``, then Dense(n_out) (its sigmoid/softmax is in the loss)."""
    layers: list[nn.Module] = []
    for i in range(hidden):
        layers += [nn.Linear(n_in if i == 0 else width, width), act()]
    layers.append(nn.Linear(width if hidden else n_in, n_out))
    return nn.Sequential(*layers)


def _circle_trial(model: nn.Module, seed: int, opt: str = "sgd", lr: float = 0.01) -> Trial:
    x, y, xt, yt = circles()
    optim = (torch.optim.Adam(model.parameters(), lr=lr) if opt == "adam"
             else torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9))
    return Trial(model, optim, batches(x, y, 32, seed), bce_logits, accuracy(xt, yt))


def _blob_trial(model: nn.Module, seed: int, lr: float) -> Trial:
    x, y, xt, yt = blobs()
    optim = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    return Trial(model, optim, batches(x, y, 32, seed), nn.functional.cross_entropy, accuracy(xt, yt))


def circle_exp(seed: int) -> Trial:
    """Models_Circle.py ``model_0ae2cd88``: 8 × (Dense(5), exponential), He-uniform, sigmoid output: overflows."""
    torch.manual_seed(seed)
    return _circle_trial(init_linear(dense_stack(2, 5, 8, 1, Exp), he_uniform_keras), seed)


def blob_exp(seed: int) -> Trial:
    """Models_Blob.py ``model_0b6f114d``: 9 × (Dense(5), exponential) on the raw blob inputs (|x| up to ~15)."""
    torch.manual_seed(seed)
    return _blob_trial(init_linear(dense_stack(2, 5, 9, 3, Exp), he_uniform_keras), seed, lr=0.01)


def circle_sigmoid(seed: int) -> Trial:
    """Models_Circle.py ``model_5ab0aeda``: 11 × (Dense(5), sigmoid), He-uniform, SGD: the gradient vanishes."""
    torch.manual_seed(seed)
    return _circle_trial(init_linear(dense_stack(2, 5, 11, 1, nn.Sigmoid), he_uniform_keras), seed)


def circle_relu_uniform(seed: int) -> Trial:
    """Models_Circle.py ``model_8de47bdc``: 8 × (Dense(5), relu) with ``RandomUniform()`` (±0.05): the signal dies out."""
    torch.manual_seed(seed)
    model = init_linear(dense_stack(2, 5, 8, 1, nn.ReLU), keras_random_uniform)
    he_uniform_keras(model[-1].weight)  # the output layer keeps VarianceScaling, as in the file
    return _circle_trial(model, seed)


def circle_selu(seed: int) -> Trial:
    """AUTOTRAINER's ``vanish_selu`` repair of ``model_5ab0aeda``: the 11 dense layers with SELU (LeCun normal), Adam."""
    torch.manual_seed(seed)
    model = init_linear(dense_stack(2, 32, 11, 1, nn.SELU), lambda w: nn.init.kaiming_normal_(w, nonlinearity="linear"))
    return _circle_trial(model, seed, opt="adam", lr=2e-3)


def circle_relu_bn(seed: int) -> Trial:
    """AUTOTRAINER's ``relu_bn`` repair: 8 × (Dense, BatchNorm, relu), He-uniform, Adam."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(8):
        layers += [nn.Linear(2 if i == 0 else 16, 16), nn.BatchNorm1d(16), nn.ReLU()]
    model = init_linear(nn.Sequential(*layers, nn.Linear(16, 1)), he_uniform_keras)
    return _circle_trial(model, seed, opt="adam", lr=1e-2)


def blob_tanh_al19(seed: int) -> Trial:
    """Models_Blob.py ``model_al_19``: 17 × (Dense(5), tanh), the file's ``Activation('tanh')`` written twice after
    the 14th, He-uniform kernels (a ReLU init on tanh) on the raw blob inputs: the first tanh saturates (52–70 %)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(17):
        layers += [nn.Linear(2 if i == 0 else 5, 5), nn.Tanh()] + ([nn.Tanh()] if i == 13 else [])
    return _blob_trial(init_linear(nn.Sequential(*layers, nn.Linear(5, 3)), he_uniform_keras), seed, lr=0.01)


def circle_relu16(seed: int) -> Trial:
    """Models_Circle.py ``model_8e28bdef``: 16 × (Dense(5), relu), He-uniform: a deep 5-wide ReLU stack whose units
    die (Lu et al. 2020, "Dying ReLU and initialization"): on seed 1 the last ReLU layer is all dead at once."""
    torch.manual_seed(seed)
    return _circle_trial(init_linear(dense_stack(2, 5, 16, 1, nn.ReLU), he_uniform_keras), seed)


class LeNetDeep(nn.Module):
    """Models_MNIST.py's LeNet-5 variants on 8×8 digits: two conv+pool stages, Dense(120), ``n_dense`` more dense layers."""

    def __init__(self, act: type[nn.Module], n_dense: int, width: int, channels: tuple[int, int] = (6, 16)) -> None:
        super().__init__()
        c1, c2 = channels
        self.features = nn.Sequential(nn.Conv2d(1, c1, 3, padding=1), act(), nn.MaxPool2d(2),   # (B, c1, 4, 4)
                                      nn.Conv2d(c1, c2, 3, padding=1), act(), nn.MaxPool2d(2))  # (B, c2, 2, 2)
        self.classifier = dense_stack(c2 * 4, width, n_dense, 10, act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


def lenet_sigmoid(seed: int) -> Trial:
    """Models_MNIST.py ``model_2af630c4``: sigmoid LeNet + Dense(120) + 8 × Dense(84), He-normal, SGD: vanishing."""
    torch.manual_seed(seed)
    model = init_linear(LeNetDeep(nn.Sigmoid, 9, 84), lambda w: nn.init.kaiming_normal_(w, nonlinearity="relu"))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return digits_trial(model, opt, seed, image=True)


def lenet_relu_uniform(seed: int) -> Trial:
    """Models_MNIST.py ``tmp_lenet5``: relu LeNet (32/64 channels) + 16 × Dense(64), all ``RandomUniform()``, SGD."""
    torch.manual_seed(seed)
    model = init_linear(LeNetDeep(nn.ReLU, 16, 64, channels=(32, 64)), keras_random_uniform)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return digits_trial(model, opt, seed, image=True)


def lenet_relu_he(seed: int) -> Trial:
    """The healthy twin: the relu LeNet with 4 dense layers and He init (the usual LeNet-5 depth), SGD."""
    torch.manual_seed(seed)
    model = init_linear(LeNetDeep(nn.ReLU, 4, 64, channels=(32, 64)), lambda w: nn.init.kaiming_normal_(w, nonlinearity="relu"))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return digits_trial(model, opt, seed, image=True)


_SRC = "github DeepDiagnosis/ICSE2022, AUTOTRAINER Model Code/"
SETUPS = [
    BenchSetup("at_circle_exp", "nonfinite", 150, circle_exp, _SRC + "Models_Circle.py model_0ae2cd88",
               reference=circle_relu_bn),
    BenchSetup("at_blob_exp", "nonfinite", 150, blob_exp, _SRC + "Models_Blob.py model_0b6f114d"),
    BenchSetup("at_circle_sigmoid", "vanishing", 200, circle_sigmoid, _SRC + "Models_Circle.py model_5ab0aeda",
               reference=circle_relu_bn),
    BenchSetup("at_circle_relu_uniform", "vanishing", 200, circle_relu_uniform,
               _SRC + "Models_Circle.py model_8de47bdc", reference=circle_relu_bn),
    BenchSetup("at_blob_tanh", "saturation", 200, blob_tanh_al19, _SRC + "Models_Blob.py model_al_19"),
    BenchSetup("at_circle_relu16", "dead_units", 200, circle_relu16, _SRC + "Models_Circle.py model_8e28bdef",
               reference=circle_relu_bn),
    BenchSetup("at_lenet_sigmoid", "vanishing", 200, lenet_sigmoid, _SRC + "Models_MNIST.py model_2af630c4"),
    BenchSetup("at_lenet_relu_uniform", "vanishing", 200, lenet_relu_uniform, _SRC + "Models_MNIST.py tmp_lenet5"),
    BenchSetup("at_circle_selu", "healthy", 400, circle_selu,
               "github shiningrain/AUTOTRAINER, the vanish_selu repair in AutoTrainer/demo_case/Gradient_Vanish_Case"),
    BenchSetup("at_circle_relu_bn", "healthy", 400, circle_relu_bn,
               "github shiningrain/AUTOTRAINER, the relu_bn repair (AutoTrainer/utils/repair.py)"),
    BenchSetup("at_lenet_relu_he", "healthy", 200, lenet_relu_he, _SRC + "Models_MNIST.py (tmp_lenet5, He init, 4 dense)"),
]
