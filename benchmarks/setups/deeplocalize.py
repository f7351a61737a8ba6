"""Stack Overflow bugs from the DeepLocalize benchmark (Wardat, Le & Rajan, ICSE 2021), re-written in PyTorch.

Source: github Wardat-ISU/DeepLocalize, ``Benchmark/StackOverflow/<question id>/Buggy Code``
and ``Correct Code``. Each function names its question. Where a question
trains on MNIST, the 8×8 digits stand in (same preprocessing: ÷ the pixel
maximum); where it generates its data, the same generator is used.
"""

from __future__ import annotations

import torch
from torch import nn

from typing import Callable

from .common import BenchSetup, Trial, accuracy, batches, digits


def _quadratic(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SO 48934338's data: x = 0, 0.1, …, 4.9 and y = 5x² + ε³, ε ~ N(0, 1) (50 points)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.arange(0.0, 5.0, 0.1).reshape(-1, 1)
    return x, 5 * x**2 + torch.randn(50, 1, generator=g) ** 3


def r_squared(x: torch.Tensor, y: torch.Tensor) -> Callable[[nn.Module], float]:
    """The coefficient of determination on (x, y): 1 − MSE / Var(y); a constant prediction scores 0 or less."""

    @torch.no_grad()
    def evaluate(model: nn.Module) -> float:
        was = model.training
        model.eval()
        try:
            return float(1 - nn.functional.mse_loss(model(x), y) / y.var(unbiased=False))
        finally:
            model.train(was)

    return evaluate


def _quadratic_trial(seed: int, lr: float) -> Trial:
    torch.manual_seed(seed)
    x, y = _quadratic(seed)
    l2 = nn.Linear(50, 30)
    nn.init.uniform_(l2.weight, -0.05, 0.05)  # init='uniform' on the second layer
    model = nn.Sequential(nn.Linear(1, 50), nn.ReLU(), l2, nn.ReLU(), nn.Linear(30, 1))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    return Trial(model, opt, batches(x, y, 32, seed), nn.functional.mse_loss, r_squared(x, y))


def quadratic_lr01(seed: int) -> Trial:
    """SO 48934338 (buggy): a 1-50-30-1 ReLU regression of y = 5x² with MSE and SGD at lr 0.1.

    The first steps' gradients (the loss starts near 3·10³) throw every ReLU of a layer below zero: the
    net then predicts a constant (R² ≈ 0), the dying-ReLU failure of a too-high learning rate.
    """
    return _quadratic_trial(seed, 0.1)


def quadratic_lr0001(seed: int) -> Trial:
    """SO 48934338 (correct code): the same net at lr 0.001."""
    return _quadratic_trial(seed, 0.001)


def _digits_nielsen(seed: int, fixed: bool) -> Trial:
    torch.manual_seed(seed)
    x, y, xt, yt = digits("unit")
    hidden, out = nn.Linear(64, 30), nn.Linear(30, 10)
    for layer in (hidden, out):  # RandomNormal(stddev=1) for weights and biases
        nn.init.normal_(layer.weight, 0.0, 1.0)
        nn.init.normal_(layer.bias, 0.0, 1.0)
    if fixed:  # correct code: sigmoid hidden layer, softmax output, cross-entropy
        model = nn.Sequential(hidden, nn.Sigmoid(), out)
        loss = nn.functional.cross_entropy
    else:  # buggy code: no activations at all, MSE on one-hot targets
        model = nn.Sequential(hidden, out)

        def loss(out_: torch.Tensor, y_: torch.Tensor) -> torch.Tensor:
            return nn.functional.mse_loss(out_, nn.functional.one_hot(y_, 10).float())
    opt = torch.optim.SGD(model.parameters(), lr=3.0)
    return Trial(model, opt, batches(x, y, 10, seed), loss, accuracy(xt, yt))


def nielsen_linear_mse(seed: int) -> Trial:
    """SO 48385830 (buggy): 784-30-10 *linear* layers, N(0, 1) init, MSE on one-hot targets, SGD at lr 3.0."""
    return _digits_nielsen(seed, fixed=False)


def nielsen_sigmoid_ce(seed: int) -> Trial:
    """SO 48385830 (correct code): sigmoid hidden layer and softmax cross-entropy, still SGD at lr 3.0."""
    return _digits_nielsen(seed, fixed=True)


def _linear_data(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SO 33969059's data: x ~ U(0, 10000)³, y = x·(2, 1, 0.5) + 2.2 (here divided by its scale, 35000)."""
    g = torch.Generator().manual_seed(seed)
    x = 10_000 * torch.rand(n, 3, generator=g)
    y = (x @ torch.tensor([[2.0], [1.0], [0.5]]) + 2.2) / 35_000
    return x, y


def _raw_regression(seed: int, standardise: bool) -> Trial:
    torch.manual_seed(seed)
    x, y = _linear_data(seed, 4096)
    if standardise:
        x = (x - 5000) / 2887  # U(0, 10⁴) has mean 5000 and std 10⁴/√12
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2), nn.Tanh(), nn.Linear(2, 1))
    for m in model:  # buggy: init='uniform', Keras 1's U(−0.05, 0.05); fixed: Keras 2's glorot_uniform
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight) if standardise else nn.init.uniform_(m.weight, -0.05, 0.05)
            nn.init.zeros_(m.bias)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    xt, yt = _linear_data(10_000 + seed, 512)
    if standardise:
        xt = (xt - 5000) / 2887
    return Trial(model, opt, batches(x, y, 32, seed), nn.functional.mse_loss, r_squared(xt, yt))


def raw_tanh_regression(seed: int) -> Trial:
    """SO 33969059 (buggy): inputs up to 10⁴ straight into Dense(3)+tanh, Dense(2)+tanh: the first tanh saturates.

    The question's single-unit softmax output (a second bug, a constant output) is left out here so that
    this set-up shows one cause; the target is divided by its scale, as the answer suggests.
    """
    return _raw_regression(seed, standardise=False)


def standardised_tanh_regression(seed: int) -> Trial:
    """SO 33969059 (fixed as the answer says): the same net on standardised inputs, Keras 2's default init."""
    return _raw_regression(seed, standardise=True)


def softmax_one_unit(seed: int) -> Trial:
    """SO 31880720 (buggy): a 128-50-50-1 ReLU net with ``softmax`` on its single output and binary cross-entropy.

    Softmax over one unit is the constant 1, so every gradient is exactly zero: nothing trains.
    """
    torch.manual_seed(seed)
    x = torch.cat([torch.ones(512, 128), torch.zeros(512, 128)])
    y = torch.cat([torch.ones(512, 1), torch.zeros(512, 1)])
    model = nn.Sequential(nn.Linear(128, 50), nn.ReLU(), nn.Dropout(0.2), nn.Linear(50, 50), nn.ReLU(),
                          nn.Dropout(0.2), nn.Linear(50, 1), nn.Softmax(dim=1))
    opt = torch.optim.RMSprop(model.parameters(), lr=1e-3)
    return Trial(model, opt, batches(x, y, 32, seed), nn.functional.binary_cross_entropy)


def _x4(held_out: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """SO 52800582's data: x = −100, −99.5, …, 99.5 and y = x⁴ (up to 10⁸), unscaled; held out: the midpoints."""
    x = torch.arange(-99.75 if held_out else -100.0, 100.0, 0.5).reshape(-1, 1)
    return x, x**4


def _keras_dense_init(model: nn.Module) -> nn.Module:
    """Keras's Dense defaults: glorot-uniform kernels, zero biases."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
    return model


def _x4_trial(seed: int, fixed: bool) -> Trial:
    torch.manual_seed(seed)
    (x, y), (xt, yt) = _x4(False), _x4(True)
    if fixed:  # the correct code: StandardScaler on x and on y (fitted on the training grid)
        xm, xs, ym, ys = x.mean(), x.std(unbiased=False), y.mean(), y.std(unbiased=False)
        x, xt, y, yt = (x - xm) / xs, (xt - xm) / xs, (y - ym) / ys, (yt - ym) / ys
    model = _keras_dense_init(nn.Sequential(nn.Linear(1, 50), nn.ReLU() if fixed else nn.Sigmoid(), nn.Linear(50, 50),
                                            nn.ELU(), nn.Linear(50, 1)))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    return Trial(model, opt, batches(x, y, len(x), seed), nn.functional.mse_loss, r_squared(xt, yt))


def x4_raw(seed: int) -> Trial:
    """SO 52800582 (buggy): fit y = x⁴ on x in [−100, 100) with Dense(50)+sigmoid, Dense(50)+ELU, Dense(1), MSE, Adam.

    x and y are left unscaled (y up to 10⁸), full-batch steps at Keras's Adam 10⁻³: the loss stays at 1.1·10¹⁵
    and the held-out R² at −0.56; the gradient neither vanishes across depth nor grows over the steps: what stops
    learning is the targets' scale against Adam's ~10⁻³ steps. Keras → PyTorch, 1000 epochs → 300 steps, R² on
    the grid's midpoints as the score.
    """
    return _x4_trial(seed, fixed=False)


def x4_standardised(seed: int) -> Trial:
    """SO 52800582 (correct code): x and y standardised (StandardScaler), ReLU for the sigmoid; R² 0.99."""
    return _x4_trial(seed, fixed=True)


def _keras_categorical_crossentropy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Keras's ``categorical_crossentropy`` on an output that is not a softmax: rescaled to sum 1, clipped."""
    p = (out / out.sum(1, keepdim=True)).clamp(1e-7, 1 - 1e-7)
    return -(nn.functional.one_hot(y, out.shape[1]).float() * p.log()).sum(1).mean()


def raw_pixels_sigmoid_out(seed: int) -> Trial:
    """SO 55328966 (buggy): raw 0–255 pixels into Dense(784), Dense(50)+ReLU, Dense(10)+sigmoid, SGD 10⁻⁴.

    Kept: the unscaled pixels, a linear first Dense of the input's width, a sigmoid output under Keras's
    categorical cross-entropy (which rescales and clips it), SGD at 10⁻⁴, batch 32, glorot-uniform init. The 8×8
    digits (×255/16) stand in for MNIST, so Dense(784) is Dense(64). The output sigmoids saturate (97–99 %);
    held-out accuracy 0.03–0.12. The correct code divides by 255 and uses a softmax.
    """
    torch.manual_seed(seed)
    x, y, xt, yt = digits("pixels")
    model = _keras_dense_init(nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 50), nn.ReLU(), nn.Linear(50, 10),
                                            nn.Sigmoid()))
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    return Trial(model, opt, batches(x, y, 32, seed), _keras_categorical_crossentropy, accuracy(xt, yt))


_SO = "github Wardat-ISU/DeepLocalize, Benchmark/StackOverflow/"
SETUPS = [
    BenchSetup("so_quadratic_lr", "dead_units", 150, quadratic_lr01, _SO + "48934338/Buggy Code/48934338.py"),
    BenchSetup("so_quadratic_fixed", "healthy", 1500, quadratic_lr0001, _SO + "48934338/Correct Code/48934338.py"),
    BenchSetup("so_nielsen_linear_mse", "exploding", 150, nielsen_linear_mse, _SO + "48385830/Buggy Code/48385830.py"),
    BenchSetup("so_nielsen_fixed", "healthy", 300, nielsen_sigmoid_ce, _SO + "48385830/Correct Code/48385830.py"),
    BenchSetup("so_raw_tanh", "saturation", 200, raw_tanh_regression, _SO + "33969059/Buggy Code/33969059.py"),
    BenchSetup("so_raw_tanh_fixed", "healthy", 200, standardised_tanh_regression,
               _SO + "33969059 (the answer: standardise the inputs)"),
    BenchSetup("so_softmax_one_unit", "stalled", 100, softmax_one_unit, _SO + "31880720/Buggy Code/31880720.py"),
    BenchSetup("so_x4_raw", "fails", 300, x4_raw, _SO + "52800582/Buggy Code/untitled35.py"),
    BenchSetup("so_x4_standardised", "healthy", 300, x4_standardised, _SO + "52800582/Correct Code/untitled35.py"),
    BenchSetup("so_raw_pixels_sigmoid_out", "saturation", 300, raw_pixels_sigmoid_out,
               _SO + "55328966/Buggy Code/55328966.py"),
]
