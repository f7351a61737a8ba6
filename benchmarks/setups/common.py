"""What the ported set-ups share: the registry entry, the data (nothing downloaded) and the trial builder.

Data sets: scikit-learn's bundled 8×8 digits (standardised, or raw 0–16 / 0–255
where a set-up ports a user who forgot to normalise), scikit-learn's
``make_circles``/``make_blobs`` as AUTOTRAINER's ``data/simplednn.py`` draws
them, Pascanu et al.'s adding task, and token streams from a fixed random
Markov chain for the language models. Debian ships no Fashion-MNIST here
(checked under /usr/share), so nothing larger is used.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from gradwatch.zoo import Trial  # the doctor's set-up protocol (the zoo keeps re-exporting it)
from gradwatch.zoo.data import accuracy, batches  # noqa: F401  (the set-ups import them from here)

# "fails": does not learn, with no gradient pathology beyond the truth module's thresholds on every seed
# (e.g. Xiong et al.'s Post-LN without warm-up): kept out of detection precision/recall, but given to the doctor.
KINDS = ("healthy", "vanishing", "exploding", "saturation", "dead_units", "nonfinite", "stalled", "fails")


@dataclass(frozen=True)
class BenchSetup:
    """A ported set-up: ``seed -> Trial``, its label (measured by plain hooks), its step count and its source."""

    name: str
    label: str  # "healthy" or the pathology kind, as gradwatch names kinds
    steps: int
    make: Callable[[int], Trial]
    source: str  # repository + file, or paper + section
    slow: bool = False  # over ~5 s to train on one core: the label test marks it slow
    # the source's own fix of a pathological set-up (the repository's repaired model, the paper's recipe): where the
    # doctor finds no repair, the benchmark runs it under the doctor's verdict, to tell "out of reach" from "missed"
    reference: Callable[[int], Trial] | None = None

    def __post_init__(self) -> None:
        if self.label not in KINDS:
            raise ValueError(f"`BenchSetup(label=…)` expects one of {KINDS}, got {self.label!r}")

    def __call__(self, seed: int = 0) -> Trial:
        return self.make(seed)


@functools.lru_cache(maxsize=None)
def _digits_raw() -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)  # (1797, 64), values 0..16
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x[perm], y[perm]


def digits(scale: str = "standard", image: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x_train, y_train, x_test, y_test): 1,500 / 297 of scikit-learn's 8×8 digits.

    ``scale``: "standard" (per-pixel z-scores fitted on the training split),
    "unit" (÷16, in [0, 1]), "raw" (0–16) or "pixels" (×255/16: raw 0–255 grey
    values, as a user feeding image bytes would). ``image``: shape (N, 1, 8, 8).
    """
    x, y = _digits_raw()
    if scale == "standard":
        mean, std = x[:1500].mean(0), x[:1500].std(0).clamp_min(1e-3)
        x = (x - mean) / std
    elif scale == "unit":
        x = x / 16
    elif scale == "pixels":
        x = x * (255 / 16)
    elif scale != "raw":
        raise ValueError(f"`digits(scale=…)` expects 'standard', 'unit', 'raw' or 'pixels', got {scale!r}")
    if image:
        x = x.reshape(-1, 1, 8, 8)
    return x[:1500], y[:1500], x[1500:], y[1500:]


def digits_trial(model: nn.Module, opt: torch.optim.Optimizer, seed: int, batch: int = 64, scale: str = "standard",
                 image: bool = False, loss: Callable[[Tensor, Tensor], Tensor] | None = None) -> Trial:
    """A digits classifier trial: shuffled batches from ``seed``, cross-entropy, held-out accuracy."""
    x, y, xt, yt = digits(scale, image)
    return Trial(model, opt, batches(x, y, batch, seed), loss or nn.functional.cross_entropy, accuracy(xt, yt))


def circles() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """AUTOTRAINER's circle set: ``make_circles(1000, noise=0.1, random_state=1)`` scaled to [-1, 1]; 700 / 300."""
    from sklearn.datasets import make_circles

    x_np, y_np = make_circles(n_samples=1000, noise=0.1, random_state=1)
    x = torch.tensor(x_np, dtype=torch.float32)
    lo, hi = x.min(0).values, x.max(0).values
    x = 2 * (x - lo) / (hi - lo) - 1
    y = torch.tensor(y_np, dtype=torch.float32).reshape(-1, 1)
    return x[:700], y[:700], x[700:], y[700:]


def blobs() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """AUTOTRAINER's blob set: ``make_blobs(1000, centers=3, n_features=2, cluster_std=2, random_state=2)``, raw."""
    from sklearn.datasets import make_blobs

    x_np, y_np = make_blobs(n_samples=1000, centers=3, n_features=2, cluster_std=2, random_state=2)
    x = torch.tensor(x_np, dtype=torch.float32)
    y = torch.tensor(y_np, dtype=torch.long)
    return x[:700], y[:700], x[700:], y[700:]


def bce_logits(out: Tensor, y: Tensor) -> Tensor:
    return nn.functional.binary_cross_entropy_with_logits(out, y)


def adding_task(seed: int, length: int, batch: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Pascanu et al. (2013) §5.1 adding problem, sequence first: x (T, B, 2) = (uniform value, marker), y (B, 1).

    Two positions are marked, one in the first half and one in the second; the
    target is the sum of their values (after Hochreiter & Schmidhuber 1997).
    """
    g = torch.Generator().manual_seed(seed)
    while True:
        values = torch.rand(length, batch, generator=g)
        marks = torch.zeros(length, batch)
        first = torch.randint(0, length // 2, (batch,), generator=g)
        second = torch.randint(length // 2, length, (batch,), generator=g)
        marks[first, torch.arange(batch)] = 1.0
        marks[second, torch.arange(batch)] = 1.0
        y = (values * marks).sum(0, keepdim=True).T  # (B, 1)
        yield torch.stack([values, marks], dim=2), y


@functools.lru_cache(maxsize=None)
def _chain(vocab: int, branch: int) -> Tensor:
    """A fixed random Markov chain over ``vocab`` tokens: each token has ``branch`` equally likely successors."""
    g = torch.Generator().manual_seed(1234)
    return torch.stack([torch.randperm(vocab, generator=g)[:branch] for _ in range(vocab)])  # (vocab, branch)


def markov_tokens(seed: int, vocab: int, length: int, batch: int, branch: int = 2) -> Iterator[tuple[Tensor, Tensor]]:
    """Language-model batches from the chain: (tokens (B, T), next tokens (B, T)); the entropy floor is ln(branch)."""
    nxt = _chain(vocab, branch)
    g = torch.Generator().manual_seed(seed)
    while True:
        seq = torch.empty(batch, length + 1, dtype=torch.long)
        seq[:, 0] = torch.randint(0, vocab, (batch,), generator=g)
        for t in range(length):
            pick = torch.randint(0, branch, (batch,), generator=g)
            seq[:, t + 1] = nxt[seq[:, t], pick]
        yield seq[:, :-1], seq[:, 1:]


def lm_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Next-token cross-entropy: logits (B, T, V), target (B, T)."""
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def lm_score(seed: int, vocab: int, length: int, branch: int = 2) -> Callable[[nn.Module], float]:
    """Held-out next-token accuracy on 64 fresh sequences as a fraction of the chain's ceiling 1/branch (1.0: perfect)."""
    x, y = next(markov_tokens(10_000 + seed, vocab, length, 64, branch))

    @torch.no_grad()
    def evaluate(model: nn.Module) -> float:
        was = model.training
        model.eval()
        try:
            return float((model(x).argmax(-1) == y).float().mean()) * branch
        finally:
            model.train(was)

    return evaluate


def adding_score(seed: int, length: int) -> Callable[[nn.Module], float]:
    """1 − MSE / Var(y) on 256 fresh adding-task sequences: 0 for predicting the mean (MSE 1/6), 1 when solved."""
    x, y = next(adding_task(10_000 + seed, length, 256))

    @torch.no_grad()
    def evaluate(model: nn.Module) -> float:
        return float(1 - nn.functional.mse_loss(model(x), y) / y.var(unbiased=False))

    return evaluate


def init_linear(model: nn.Module, weight: Callable[[Tensor], Any], bias: float | None = 0.0) -> nn.Module:
    """Apply ``weight`` to every Linear/Conv weight (in place) and set biases to ``bias`` (None: leave them)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
                weight(m.weight)
                if m.bias is not None and bias is not None:
                    m.bias.fill_(bias)
    return model


def he_uniform_keras(w: Tensor) -> None:
    """Keras ``VarianceScaling(scale=2.0, mode='fan_in', distribution='uniform')``: U(±√(6 / fan_in))."""
    nn.init.kaiming_uniform_(w, a=0.0, nonlinearity="relu")  # bound √(6/fan_in), the same distribution


def keras_random_uniform(w: Tensor) -> None:
    """Keras ``initializers.RandomUniform()`` (Keras 2 default): U(−0.05, 0.05)."""
    nn.init.uniform_(w, -0.05, 0.05)
