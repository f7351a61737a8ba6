"""Named, seeded, small set-ups that show each pathology and its healthy twin.

Every set-up builds from a seed with nothing downloaded: data comes from
scikit-learn's bundled sets or is synthetic. A :class:`Setup` makes a fresh
:class:`Trial` (model, optimizer, batches, loss) per seed, so that trials of
the same set-up start identical.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

Batch = tuple[Tensor, Tensor]


@dataclass
class Trial:
    """One seeded instance of a set-up, ready to train."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    batches: Iterator[Batch]
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    evaluate: Callable[[nn.Module], float] | None = None  # held-out accuracy, if the task has one

    def step(self) -> Tensor:
        """One training step on the next batch; returns the (detached) loss."""
        x, y = next(self.batches)
        loss = self.loss_fn(self.model(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach()


@dataclass(frozen=True)
class Setup:
    """A named recipe for a :class:`Trial`; ``expect`` is the pathology it shows (None: healthy)."""

    name: str
    description: str
    expect: str | None
    make: Callable[[int], Trial]

    def __call__(self, seed: int = 0) -> Trial:
        return self.make(seed)


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


def _batches(x: Tensor, y: Tensor, batch_size: int, seed: int) -> Iterator[Batch]:
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x) - batch_size + 1, batch_size):
            idx = perm[i : i + batch_size]
            yield x[idx], y[idx]


def _accuracy(x: Tensor, y: Tensor) -> Callable[[nn.Module], float]:
    @torch.no_grad()
    def evaluate(model: nn.Module) -> float:
        was = model.training
        model.eval()
        try:
            return float((model(x).argmax(1) == y).float().mean())
        finally:
            model.train(was)

    return evaluate


def mlp(depth: int, width: int, activation: Callable[[], nn.Module], n_in: int = 64, n_out: int = 10) -> nn.Sequential:
    """``depth`` Linear layers, an activation module after each but the last."""
    dims = [n_in] + [width] * (depth - 1) + [n_out]
    layers: list[nn.Module] = []
    for i in range(depth):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < depth - 1:
            layers.append(activation())
    return nn.Sequential(*layers)


def _he_init(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return model


DEPTH, WIDTH, BATCH, LR = 20, 64, 64, 0.005


def _digits_trial(model: nn.Module, seed: int) -> Trial:
    x, y, xt, yt = digits()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    return Trial(model, opt, _batches(x, y, BATCH, seed), nn.functional.cross_entropy, _accuracy(xt, yt))


def _deep_tanh_mlp(seed: int) -> Trial:
    torch.manual_seed(seed)
    return _digits_trial(mlp(DEPTH, WIDTH, nn.Tanh), seed)


def _deep_relu_he_mlp(seed: int) -> Trial:
    torch.manual_seed(seed)
    return _digits_trial(_he_init(mlp(DEPTH, WIDTH, nn.ReLU)), seed)


SETUPS: dict[str, Setup] = {
    s.name: s
    for s in [
        Setup(
            "deep_tanh_mlp",
            f"{DEPTH}-layer tanh MLP (width {WIDTH}, PyTorch's default init) on digits: the default "
            "init's weight gain (std 1/sqrt(3·fan_in)) times tanh' ≤ 1 shrinks the gradient at every layer",
            "vanishing",
            _deep_tanh_mlp,
        ),
        Setup(
            "deep_relu_he_mlp",
            f"its healthy twin: the same {DEPTH} layers with ReLU and He initialisation",
            None,
            _deep_relu_he_mlp,
        ),
    ]
}


def get(name: str) -> Setup:
    """The set-up of that name."""
    try:
        return SETUPS[name]
    except KeyError:
        raise KeyError(f"`zoo.get(name=…)` expects one of {sorted(SETUPS)}, got {name!r}") from None


def names() -> list[str]:
    return list(SETUPS)
