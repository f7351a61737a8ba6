"""The model's output across the batch: how much it still depends on the input.

``out_spread`` is ‖Y − Ȳ‖_F / ‖Y‖_F for the model's output Y (batch × the rest, flattened), Ȳ its mean over the
batch: the share of the output's norm that differs from one sample to the next. 1 for outputs centred at 0, 0
when every sample gets the same output — a model collapsed to a constant (FaceNet's "collapsed model (i.e.
f(x) = 0)" under the hardest negatives, Schroff et al. 2015 §3.2; a GAN generator's mode collapse). It is
computed from two reductions, ‖Y‖² and ‖Ȳ‖² (‖Y − Ȳ‖² = ‖Y‖² − B·‖Ȳ‖²), without a centred copy of Y, on the
first ``SPREAD_FEATURES`` features of each sample at most (a language model's logits are sampled, not copied).
``out_rms`` = ‖Y‖_F/√B beside it: their product, the rms distance of a sample from the batch's mean, tells a
collapse (it falls) from outputs that moved to an offset (a GAN generator's samples reaching data far from 0: the
relative spread falls while the samples spread ×10 wider, measured).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

SPREAD_FEATURES = 1 << 16  # features per sample read at most (of B × T × V logits: the first 65,536 of T × V)


def batch_tensor(output: Any) -> Tensor | None:
    """The first floating tensor of a model's output (itself, or in a tuple, list or dict — a Hugging Face
    output's loss, a 0-d tensor, is passed over) with a batch of two samples or more along dimension 0."""
    if isinstance(output, Tensor):
        return output if output.is_floating_point() and output.dim() >= 1 and output.shape[0] >= 2 else None
    items = output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else ()
    return next((t for t in (batch_tensor(v) for v in items) if t is not None), None)


@torch.no_grad()
def batch_spread(y: Tensor) -> tuple[Tensor, Tensor]:
    """(‖Y − Ȳ‖_F / ‖Y‖_F, ‖Y‖_F / √B) over the batch (dimension 0): the relative spread (0 for an all-zero
    output) and each sample's rms norm, so that their product is the rms distance of a sample from the batch's mean;
    float64 0-d tensors on ``y``'s device. See the module. Accumulated in at least float32."""
    rows = y.detach().reshape(y.shape[0], -1)[:, :SPREAD_FEATURES]
    if rows.dtype not in (torch.float32, torch.float64):
        rows = rows.float()
    total = rows.pow(2).sum()
    mean = rows.mean(0)
    share = 1 - rows.shape[0] * mean.pow(2).sum() / total.clamp_min(torch.finfo(rows.dtype).tiny)
    return (torch.where(total > 0, share.clamp(0, 1), 0.0).sqrt().double(),
            (total / rows.shape[0]).sqrt().double())


@torch.no_grad()
def labelled(grad: Tensor) -> tuple[Tensor, Tensor]:
    """For class scores (B, C) under cross-entropy, their gradient ``grad`` (∂L/∂z = c·(softmax(z) − onehot(y)) with
    c > 0, negative exactly at each row's label): (which rows have exactly one negative entry, each row's label — the
    column of its first negative entry), read once for :func:`batch_labels` and :func:`majority_shares`."""
    neg = grad.detach() < 0
    return neg.sum(1) == 1, neg.float().argmax(1)


@torch.no_grad()
def batch_labels(grad: Tensor, rows: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The labels of a batch of class scores (B, C) under cross-entropy, read off the loss's gradient there
    (:func:`labelled`, or its ``rows`` where read already): (the number of distinct labels among the rows with
    exactly one negative entry, the smallest of them — C where there is none — the share of rows with exactly one,
    C), float64 0-d tensors on ``grad``'s device, with no host sync. A loss that is not a cross-entropy on these
    scores shows as a share of such rows below 1."""
    one, labels = labelled(grad) if rows is None else rows
    classes = grad.shape[1]
    seen = torch.zeros(classes + 1, device=grad.device).index_add_(
        0, torch.where(one, labels, classes), torch.ones(len(labels), device=grad.device))[:classes]
    first = torch.where(one, labels, classes).min()
    return ((seen > 0).sum().double(), first.double(), one.double().mean(),
            torch.tensor(float(classes), dtype=torch.float64, device=grad.device))


@torch.no_grad()
def binary_shares(y: Tensor) -> tuple[Tensor, Tensor]:
    """The shares of a one-score-a-sample output's entries above 0 (logits: predicted positive) and above ½
    (probabilities: predicted positive), float64 0-d tensors on ``y``'s device, with no host sync."""
    flat = y.detach().reshape(-1)
    return (flat > 0).double().mean(), (flat > 0.5).double().mean()


@torch.no_grad()
def majority_shares(grad: Tensor, predicted: Tensor,
                    rows: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """For class scores (B, C) under cross-entropy, their gradient ``grad`` (negative exactly at each row's label,
    :func:`labelled`, or its ``rows`` where read already) and the class each row predicts (``predicted``, the scores'
    argmax): (the batch's most common label, the share of rows labelled otherwise, the share of rows predicted
    otherwise), over the rows with exactly one negative entry; float64 0-d tensors, with no host sync. A classifier
    that answers the majority class only predicts otherwise for none of its rows, where the labels do for some."""
    one, labels = labelled(grad) if rows is None else rows
    counts = torch.zeros(grad.shape[1], device=grad.device).index_add_(0, labels, one.float())
    top = counts.argmax()
    counted = one.double().sum().clamp_min(1)
    return (top.double(), ((labels != top) & one).double().sum() / counted,
            ((predicted.to(labels.device) != top) & one).double().sum() / counted)
