"""The zoo's data: scikit-learn's bundled digits (nothing downloaded), their batches, the one digits trial builder."""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from gradwatch.trial import Batch, Trial

BATCH = 64  # digits images per batch


@functools.lru_cache(maxsize=1)
def digits() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's 8×8 digits, standardised: (x_train, y_train, x_test, y_test); 1,500 / 297 images."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    x_train, x_test = x[:1500], x[1500:]
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-3)
    return (x_train - mean) / std, y[:1500], (x_test - mean) / std, y[1500:]


def batches(x: Tensor, y: Tensor, batch_size: int, seed: int) -> Iterator[Batch]:
    """Endless epochs of ``(x, y)`` batches, reshuffled each epoch by a generator seeded with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x) - batch_size + 1, batch_size):
            idx = perm[i : i + batch_size]
            yield x[idx], y[idx]


def accuracy(x: Tensor, y: Tensor) -> Callable[[nn.Module], float]:
    """A held-out score: the model's classification accuracy on ``(x, y)``, in eval mode (its mode is restored).

    Several outputs: the argmax over dim 1; one output (a binary classifier's logit): positive means class 1.
    """

    @torch.no_grad()
    def evaluate(model: nn.Module) -> float:
        was = model.training
        model.eval()
        try:
            out = model(x)
            pred = out.argmax(1) if out.dim() > 1 and out.shape[1] > 1 else (out.reshape(-1) > 0).long()
            return float((pred == y.reshape(pred.shape)).float().mean())
        finally:
            model.train(was)

    return evaluate


def digits_trial(model: nn.Module, seed: int, lr: float, *, adam: bool = False, momentum: float = 0.9,
                 params: Any = None) -> Trial:
    """``model`` on the digits: batches of 64 shuffled by ``seed``, cross-entropy, held-out accuracy.

    The optimizer is SGD with ``momentum`` at ``lr`` (Adam at ``lr`` with
    ``adam=True``) over ``params`` (default: the model's parameters; a list of
    param groups for a set-up that misconfigures them).
    """
    x, y, xt, yt = digits()
    params = model.parameters() if params is None else params
    opt = torch.optim.Adam(params, lr=lr) if adam else torch.optim.SGD(params, lr=lr, momentum=momentum)
    return Trial(model, opt, batches(x, y, BATCH, seed), nn.functional.cross_entropy, accuracy(xt, yt))
