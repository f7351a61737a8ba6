"""A VAE's loss read off its graph: a reconstruction averaged over every element beside a Gaussian KL summed.

The evidence lower bound is a sum over each sample's elements of the reconstruction's log-likelihood, minus the KL of
the posterior from the prior summed over the latent dimensions. Written with ``F.binary_cross_entropy(recon, x)``
or ``F.mse_loss`` at their default ``reduction="mean"`` beside ``-0.5 * torch.sum(1 + logvar - mu² - exp(logvar))``,
the KL weighs as many times more as the reconstruction has elements per sample (and per batch, where it sums over the
batch too): the encoder is driven to the prior, the decoder outputs the mean sample whatever z, and the KL falls to 0
— posterior collapse (zdebruine/MMVAE#19; AppliedDataSciencePartners/WorldModels#12; pytorch/examples#296 sums both).

Node names, the reductions autograd keeps (an int) and the shape of the walk are read, once; nothing is computed.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

# the reconstruction losses that take a reduction: 1 is ATen's Reduction::Mean
RECONSTRUCTIONS = frozenset({"BinaryCrossEntropyBackward0", "BinaryCrossEntropyWithLogitsBackward0",
                             "MseLossBackward0", "L1LossBackward0", "SmoothL1LossBackward0"})
_MEAN = 1
# the nodes a loss's terms are combined through: sums, differences, constant factors, a mean over the batch
_TERMS = frozenset({"AddBackward0", "SubBackward0", "MulBackward0", "DivBackward0", "NegBackward0", "MeanBackward0",
                    "MeanBackward1"})
_SUMS = frozenset({"SumBackward0", "SumBackward1"})
KL_REACH = 10  # nodes under a sum looked through for the KL's exp(logvar) and mu²
MAX_NODES = 128


def _name(node: Any) -> str:
    return type(node).__name__


def _gaussian_kl(total: Any) -> bool:
    """The subgraph under the sum ``total`` (within :data:`KL_REACH` nodes, not past a layer) holds an exp and a
    square, 1 + logvar − μ² − exp(logvar): the closed-form KL of a Gaussian posterior from N(0, I)."""
    todo, seen, names = [total], {id(total)}, set()
    while todo and len(seen) <= KL_REACH:
        node = todo.pop(0)
        names.add(_name(node))
        for nxt, _ in node.next_functions:
            if nxt is not None and id(nxt) not in seen and _name(nxt) != "AccumulateGrad":
                seen.add(id(nxt))
                todo.append(nxt)
    return "ExpBackward0" in names and "PowBackward0" in names and bool({"SubBackward0", "AddBackward0"} & names)


def kl_outweighs_reconstruction(loss: Tensor) -> dict[str, Any] | None:
    """``{"reconstruction": its backward node's name}`` where the loss adds a reconstruction at
    ``reduction="mean"`` and a Gaussian KL under a sum (see the module); None otherwise, or where reading fails."""
    try:
        return _read(loss)
    except Exception:  # noqa: BLE001 - an exotic graph node: nothing to say, nothing lost
        return None


def _read(loss: Tensor) -> dict[str, Any] | None:
    start = getattr(loss, "grad_fn", None)
    if start is None:
        return None
    todo, seen = [start], {id(start)}
    mean_recon, summed_kl = "", False
    while todo and len(seen) < MAX_NODES:
        node = todo.pop(0)
        name = _name(node)
        if name in RECONSTRUCTIONS:
            if getattr(node, "_saved_reduction", None) == _MEAN:
                mean_recon = mean_recon or name
            continue
        if name in _SUMS:
            summed_kl |= _gaussian_kl(node)
            continue
        if name not in _TERMS:
            continue
        for nxt, _ in node.next_functions:
            if nxt is not None and id(nxt) not in seen:
                seen.add(id(nxt))
                todo.append(nxt)
    return {"reconstruction": mean_recon} if mean_recon and summed_kl else None
