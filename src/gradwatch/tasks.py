"""Pascanu, Mikolov & Bengio (2013)'s synthetic tasks and the copy task of Arjovsky et al. (2016).

Generators follow the definitions of the paper's published code (sequence
first: inputs are (T, B, features)); every one is seeded by a
``torch.Generator``. Each :class:`Task` carries its loss, its success
criterion (Pascanu et al.: a task is solved when fewer than 1 % of sequences
are wrong) and its chance baseline.

- **adding**: 2 channels, values U(0, 1) and markers; length T + U{0..T/10−1};
  one marker in the first 10 % of the sequence, one in [10 %, 50 %); target
  the mean of the two marked values. A sequence is wrong when its squared
  error exceeds 0.04. Predicting the constant 0.5 scores MSE 1/24 ≈ 0.0417.
- **multiplication**: the same with the product as target (constant MSE 7/144).
- **temporal order**: 6 one-hot symbols; A or B at a position in [10 %, 20 %)
  and another in [50 %, 60 %), distractors c–f elsewhere; classify the order
  (AA, AB, BA, BB) at the end. Chance error 3/4.
- **3-bit temporal order**: three such symbols, in [10 %, 20 %), [30 %, 40 %),
  [60 %, 70 %); 8 classes. Chance error 7/8.
- **random permutation**: one-hot symbols from 100; the first is 0 or 1 and
  must be predicted at the end; the rest are random from 2–99. Chance error 1/2.
- **noiseless memorisation**: a pattern of 10 symbols from 5 shown first, then
  T blanks with a marker, then the pattern is to be reproduced in the last 10
  steps (targets: a "blank" class before). A sequence is wrong when any
  reproduced symbol is; chance error 1 − 5⁻¹⁰.
- **copy** (Arjovsky et al. 2016): 10 symbols from 8, T−1 blanks, a delimiter,
  10 blanks; reproduce the 10 symbols at the end. Chance cross-entropy
  10·ln 8 / (T + 20) (blanks predicted, symbols guessed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

Generate = Callable[[int, int, torch.Generator], tuple[Tensor, Tensor]]  # (batch, T, generator) -> (x, y)


@dataclass(frozen=True)
class Task:
    """A synthetic sequence task: its data, loss, success criterion and chance level."""

    name: str
    n_in: int
    n_out: int
    output: str  # "last" (one prediction at the end) or "all" (one per step)
    generate: Generate
    loss: Callable[[Tensor, Tensor], Tensor]  # (predictions, targets) -> scalar
    wrong: Callable[[Tensor, Tensor], Tensor]  # (predictions, targets) -> (B,) bool: this sequence is wrong
    chance_error: float  # error rate of the best input-blind predictor
    chance_loss: Callable[[int], float]  # the same predictor's loss at length T

    def error_rate(self, predictions: Tensor, targets: Tensor) -> float:
        return float(self.wrong(predictions, targets).float().mean())


def _markers(b: int, t: int, g: torch.Generator) -> tuple[Tensor, Tensor, Tensor, int]:
    length = t + int(torch.randint(max(1, int(t * 0.1)), (1,), generator=g))
    p0 = torch.randint(max(1, int(length * 0.1)), (b,), generator=g)
    p1 = torch.randint(max(1, int(length * 0.4)), (b,), generator=g) + int(length * 0.1)
    x = torch.rand(length, b, 2, generator=g)
    x[:, :, 0] = 0.0
    idx = torch.arange(b)
    x[p0, idx, 0] = 1.0
    x[p1, idx, 0] = 1.0
    return x, x[p0, idx, 1], x[p1, idx, 1], length


def _adding(b: int, t: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    x, a, c, _ = _markers(b, t, g)
    return x, ((a + c) / 2).unsqueeze(1)


def _multiplication(b: int, t: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    x, a, c, _ = _markers(b, t, g)
    return x, (a * c).unsqueeze(1)


def _one_hot_symbols(vals: Tensor, n: int) -> Tensor:
    return nn.functional.one_hot(vals, n).float()


def _temporal_order(bits: int) -> Generate:
    starts = {2: (0.1, 0.5), 3: (0.1, 0.3, 0.6)}[bits]

    def generate(b: int, t: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        vals = torch.randint(4, (t, b), generator=g) + 2  # distractors c, d, e, f
        target = torch.zeros(b, dtype=torch.long)
        idx = torch.arange(b)
        for k, start in enumerate(starts):
            p = torch.randint(max(1, int(t * 0.1)), (b,), generator=g) + int(t * start)
            v = torch.randint(2, (b,), generator=g)  # A or B
            vals[p, idx] = v
            target += v << k
        return _one_hot_symbols(vals, 6), target

    return generate


def _permutation(b: int, t: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    vals = torch.randint(98, (t, b), generator=g) + 2
    v = torch.randint(2, (b,), generator=g)
    vals[0] = v
    return _one_hot_symbols(vals, 100), v


MEM_VALUES, MEM_POS = 5, 10


def _memorization(b: int, t: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    total = t + 2 * MEM_POS
    x = torch.zeros(total, b, MEM_VALUES + 2)
    x[MEM_POS:, :, -2] = 1.0  # blank
    x[t + MEM_POS, :, -2] = 0.0
    x[t + MEM_POS, :, -1] = 1.0  # "now reproduce"
    pattern = torch.randint(MEM_VALUES, (MEM_POS, b), generator=g)
    x[:MEM_POS] = _one_hot_symbols(pattern, MEM_VALUES + 2)
    y = torch.full((total, b), MEM_VALUES, dtype=torch.long)  # class MEM_VALUES: blank
    y[-MEM_POS:] = pattern
    return x, y


COPY_SYMBOLS, COPY_LEN = 8, 10


def _copy(b: int, t: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    total = t + 2 * COPY_LEN
    seq = torch.randint(1, COPY_SYMBOLS + 1, (COPY_LEN, b), generator=g)
    vals = torch.zeros(total, b, dtype=torch.long)
    vals[:COPY_LEN] = seq
    vals[t + COPY_LEN - 1] = COPY_SYMBOLS + 1  # delimiter
    y = torch.zeros(total, b, dtype=torch.long)
    y[-COPY_LEN:] = seq
    return _one_hot_symbols(vals, COPY_SYMBOLS + 2), y


# A NaN/Inf prediction is wrong: a diverged net must not score (NaN > 0.04 is False, argmax of NaN is arbitrary).
def _sq_wrong(p: Tensor, y: Tensor) -> Tensor:
    return ~(((p.reshape(-1) - y.reshape(-1)) ** 2) <= 0.04)


def _class_wrong(p: Tensor, y: Tensor) -> Tensor:
    return (p.argmax(-1) != y) | ~torch.isfinite(p).all(-1)


def _seq_wrong(p: Tensor, y: Tensor) -> Tensor:  # (T, B, C) vs (T, B): any step wrong
    return ((p.argmax(-1) != y) | ~torch.isfinite(p).all(-1)).any(0)


def _seq_ce(p: Tensor, y: Tensor) -> Tensor:
    return nn.functional.cross_entropy(p.reshape(-1, p.shape[-1]), y.reshape(-1))


TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task("adding", 2, 1, "last", _adding, nn.functional.mse_loss, _sq_wrong, 0.36, lambda T: 1 / 24),
        # the constant 1/4: P(ab < 0.05) + P(ab > 0.45), with P(ab < s) = s − s ln s for a, b ~ U(0, 1)
        Task("multiplication", 2, 1, "last", _multiplication, nn.functional.mse_loss, _sq_wrong,
             (0.05 - 0.05 * math.log(0.05)) + 1 - (0.45 - 0.45 * math.log(0.45)), lambda T: 7 / 144),
        Task("temporal_order", 6, 4, "last", _temporal_order(2), nn.functional.cross_entropy, _class_wrong, 0.75,
             lambda T: math.log(4)),
        Task("temporal_order_3bit", 6, 8, "last", _temporal_order(3), nn.functional.cross_entropy, _class_wrong, 0.875,
             lambda T: math.log(8)),
        Task("permutation", 100, 100, "last", _permutation, nn.functional.cross_entropy, _class_wrong, 0.5,
             lambda T: math.log(2)),
        Task("memorization", MEM_VALUES + 2, MEM_VALUES + 1, "all", _memorization, _seq_ce, _seq_wrong,
             1 - MEM_VALUES ** -MEM_POS, lambda T: MEM_POS * math.log(MEM_VALUES) / (T + 2 * MEM_POS)),
        Task("copy", COPY_SYMBOLS + 2, COPY_SYMBOLS + 1, "all", _copy, _seq_ce, _seq_wrong,
             1 - COPY_SYMBOLS ** -COPY_LEN, lambda T: COPY_LEN * math.log(COPY_SYMBOLS) / (T + 2 * COPY_LEN)),
    ]
}


def task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"`task(name=…)` expects one of {sorted(TASKS)}, got {name!r}") from None
