"""Seeded set-ups for :func:`gradwatch.check_attack`: classifiers whose gradients are masked, beside honest twins.

Every masked model is its honest twin with one masking layer added, so the two
share their weights and a sound attack should find the same robust accuracy
for both (up to what the layer really changes):

- **rounding**: the input is rounded to a few grey levels first (bit-depth
  reduction, the "feature squeezing" of Xu et al. 2018): its derivative is zero
  almost everywhere, so ∂L/∂x = 0 and gradient attacks stand still. BPDA
  (identity on the backward pass) gets through.
- **temperature**: the logits are multiplied by 10⁴, what defensive distillation
  deploys (Papernot et al. 2016: trained at temperature T, evaluated at 1): the
  softmax saturates and in float32 the cross-entropy gradient is exactly zero;
  the argmax, and so the accuracy, is the twin's. A margin (CW) loss on the
  logits gets through.

Data are scikit-learn's bundled digits (8×8, pixels scaled to [0, 1]) and a
synthetic token task; nothing is downloaded.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

LEVELS = 16  # grey levels kept by InputRounding: steps of 1/15, so an ε = 0.1 perturbation survives the rounding
SCALE = 1e4  # logit scale of the temperature-masked model: margins above ~0.01 saturate float32's softmax


class InputRounding(nn.Module):
    """Round inputs in [0, 1] to ``levels`` evenly spaced values (a zero-almost-everywhere derivative)."""

    def __init__(self, levels: int = LEVELS) -> None:
        super().__init__()
        self.levels = levels

    def forward(self, x: Tensor) -> Tensor:
        k = self.levels - 1
        return torch.round(x.clamp(0, 1) * k) / k


class LogitScale(nn.Module):
    """Multiply the logits by ``scale``: a softmax at temperature 1/scale, saturated for any real margin."""

    def __init__(self, scale: float = SCALE) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, z: Tensor) -> Tensor:
        return z * self.scale


@dataclass
class AttackSetup:
    """A model and the labelled batch to evaluate it on; ``clip`` is the valid input range, ``embedding`` a module name."""

    model: nn.Module
    x: Tensor
    y: Tensor
    clip: tuple[float, float] | None = (0.0, 1.0)
    embedding: str | None = None


@functools.lru_cache(maxsize=1)
def digits01() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's digits, pixels / 16 in [0, 1]: (x_train, y_train, x_test, y_test), 1,500 / 297 images."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))  # the split of gradwatch.zoo.digits
    x, y = x[perm], y[perm]
    return x[:1500], y[:1500], x[1500:], y[1500:]


@functools.lru_cache(maxsize=8)
def _trained_digits_mlp(seed: int, steps: int) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    x, y, _, _ = digits01()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=g)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def digits(masking: str | None, seed: int = 0, steps: int = 400) -> AttackSetup:
    """A 64-128-10 ReLU MLP trained on digits (Adam, ``steps`` batches of 64), with the test set.

    ``masking``: None (the honest twin), "rounding" (InputRounding in front) or
    "temperature" (LogitScale behind); the weights are the honest twin's.
    """
    import copy

    net = copy.deepcopy(_trained_digits_mlp(seed, steps))
    if masking == "rounding":
        model: nn.Module = nn.Sequential(InputRounding(), net)
    elif masking == "temperature":
        model = nn.Sequential(net, LogitScale())
    elif masking is None:
        model = net
    else:
        raise ValueError(f"`digits(masking=…)` expects None, 'rounding' or 'temperature', got {masking!r}")
    _, _, xt, yt = digits01()
    return AttackSetup(model.eval(), xt, yt)


VOCAB, LENGTH = 16, 12  # token 1 is the keyword; 0 is never drawn


class TinyTextClassifier(nn.Module):
    """Embedding → one Transformer encoder layer (d = 16, 2 heads) → mean over tokens → 2 logits."""

    def __init__(self, vocab: int = VOCAB, d: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(LENGTH, d) * 0.1)
        self.encoder = nn.TransformerEncoderLayer(d, 2, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d, 2)

    def forward(self, tokens: Tensor) -> Tensor:  # (B, L) int -> (B, 2)
        h = self.encoder(self.embed(tokens) + self.pos)  # (B, L, d)
        return self.head(h.mean(1))


def keyword_batch(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Sequences of ``LENGTH`` tokens from 2…VOCAB−1; half get the keyword (token 1) at a random place; label: has it."""
    tokens = torch.randint(2, VOCAB, (n, LENGTH), generator=g)
    label = torch.randint(0, 2, (n,), generator=g)
    where = torch.randint(0, LENGTH, (n,), generator=g)
    tokens[label == 1, where[label == 1]] = 1
    return tokens, label


@functools.lru_cache(maxsize=4)
def _trained_text(seed: int, steps: int) -> TinyTextClassifier:
    torch.manual_seed(seed)
    model = TinyTextClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = keyword_batch(64, g)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def text(masking: str | None, seed: int = 0, steps: int = 150) -> AttackSetup:
    """The tiny Transformer text classifier on the keyword task, honest (None) or with ``masking="temperature"``."""
    import copy

    net = copy.deepcopy(_trained_text(seed, steps))
    if masking == "temperature":
        model: nn.Module = nn.Sequential(net, LogitScale())
        embedding = "0.embed"
    elif masking is None:
        model, embedding = net, "embed"
    else:
        raise ValueError(f"`text(masking=…)` expects None or 'temperature', got {masking!r}")
    x, y = keyword_batch(256, torch.Generator().manual_seed(10_000 + seed))
    return AttackSetup(model.eval(), x, y, clip=None, embedding=embedding)


SETUPS: dict[str, Callable[[int], AttackSetup]] = {
    "digits_honest": lambda seed: digits(None, seed),
    "digits_rounding": lambda seed: digits("rounding", seed),
    "digits_temperature": lambda seed: digits("temperature", seed),
    "text_honest": lambda seed: text(None, seed),
    "text_temperature": lambda seed: text("temperature", seed),
}
