"""Re-initialisation remedies. Each returns the model (a deep copy unless ``inplace=True``)."""

from __future__ import annotations

import copy
import math
from typing import Callable, TypeGuard

import torch
from torch import Tensor, nn

from gradwatch.remedies.structure import Residual, ResidualBlock

_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _target(model: nn.Module, inplace: bool) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"expects a torch.nn.Module, got {type(model).__name__}")
    return model if inplace else copy.deepcopy(model)


def _gain(model: nn.Module) -> float:
    """torch.nn.init.calculate_gain of the model's first activation module (linear: 1)."""
    for m in model.modules():
        for cls, name in ((nn.Tanh, "tanh"), (nn.Sigmoid, "sigmoid"), (nn.ReLU, "relu"), (nn.LeakyReLU, "leaky_relu"),
                          (nn.SELU, "selu")):
            if isinstance(m, cls):
                return nn.init.calculate_gain(name, getattr(m, "negative_slope", None))  # type: ignore[arg-type]
    return 1.0


def _trainable(m: nn.Module) -> TypeGuard[nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d]:
    """Whether ``m`` is a weighted layer whose weight trains: a frozen one (``requires_grad=False``: a pre-trained
    base under LoRA adapters, a frozen backbone) is the user's to keep, and no init remedy touches it (round 31: He
    init drawn over a LoRA net's frozen base took its own task from 0.95 to 0.11)."""
    return isinstance(m, _WEIGHTED) and m.weight.requires_grad


@torch.no_grad()
def _each(model: nn.Module, init: Callable[[Tensor], object]) -> nn.Module:
    for m in model.modules():
        if _trainable(m):
            init(m.weight)
            if m.bias is not None and m.bias.requires_grad:
                nn.init.zeros_(m.bias)
    return model


def he_init(model: nn.Module, inplace: bool = False) -> nn.Module:
    """He (Kaiming) normal initialisation for ReLU nets, zero biases (He et al. 2015)."""
    return _each(_target(model, inplace), lambda w: nn.init.kaiming_normal_(w, nonlinearity="relu"))


def lecun_init(model: nn.Module, inplace: bool = False) -> nn.Module:
    """LeCun normal initialisation, Var(w) = 1/fan_in, zero biases: the init a SELU net's self-normalisation assumes
    (Klambauer et al. 2017, §3; ``torch.nn.SELU``'s docs: ``kaiming_normal_`` with ``nonlinearity='linear'``). He's
    ×2 variance on a 32-layer SELU net diverges (round 14: inf from the first steps)."""
    return _each(_target(model, inplace), lambda w: nn.init.kaiming_normal_(w, nonlinearity="linear"))


def xavier_init(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Glorot (Xavier) normal initialisation with the gain of the model's activation (Glorot & Bengio 2010).

    An ``nn.Embedding``/``nn.EmbeddingBag`` is a linear map from a one-hot input (fan-in 1), so Xavier's variance
    for it is 2 / (1 + dim); one whose weights are larger than that (PyTorch's default N(0, 1): round 13's bag of
    40 embeddings summed into a tanh, 68 % saturated) is drawn again at it, one already smaller (a GPT's 0.02) is
    left as it is."""
    m = _target(model, inplace)
    gain = _gain(m)
    _shrink_embeddings(m)
    return _each(m, lambda w: nn.init.xavier_normal_(w, gain=gain))


@torch.no_grad()
def _shrink_embeddings(model: nn.Module) -> None:
    for e in model.modules():
        if isinstance(e, (nn.Embedding, nn.EmbeddingBag)) and e.weight.numel() > 1 and e.weight.requires_grad:
            std = math.sqrt(2.0 / (1 + e.weight.shape[1]))
            if float(e.weight.std()) > std:
                nn.init.normal_(e.weight, std=std)
                pad = getattr(e, "padding_idx", None)
                if pad is not None:
                    e.weight[pad].zero_()


def orthogonal_init(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Orthogonal weights scaled by the activation's gain (Saxe et al. 2014), zero biases."""
    m = _target(model, inplace)
    gain = _gain(m)
    return _each(m, lambda w: nn.init.orthogonal_(w, gain=gain))


@torch.no_grad()
def lsuv_init(model: nn.Module, batch: Tensor, inplace: bool = False, tol: float = 0.05, max_iter: int = 10) -> nn.Module:
    """Layer-sequential unit-variance initialisation (Mishkin & Matas 2016).

    Orthogonal weights first; then, layer by layer in forward order, the
    weights are rescaled until the layer's output variance on ``batch`` is 1
    (within ``tol``).
    """
    m = _target(model, inplace)
    orthogonal_init(m, inplace=True)
    was = m.training
    m.eval()
    layers = [x for x in m.modules() if _trainable(x)]
    try:
        for layer in layers:
            out: dict[str, Tensor] = {}
            h = layer.register_forward_hook(lambda mod, a, o: out.__setitem__("y", o))
            for _ in range(max_iter):
                m(batch)
                var = float(out["y"].var())
                if not math.isfinite(var) or var == 0 or abs(var - 1) < tol:
                    break
                layer.weight.div_(math.sqrt(var))
            h.remove()
    finally:
        m.train(was)
    return m


@torch.no_grad()
def fixup_zero_init(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Fixup-style zero initialisation of residual branches (Zhang et al. 2019): each branch's last layer starts at 0.

    Works on the residual blocks gradwatch knows (:class:`ResidualBlock`,
    :class:`Residual`): a net of them starts as the identity plus its stem and head.
    """
    m = _target(model, inplace)
    for block in m.modules():
        last: nn.Module | None = None
        if isinstance(block, ResidualBlock):
            last = block.conv2
        elif isinstance(block, Residual):
            last = [x for x in block.block.modules() if isinstance(x, _WEIGHTED)][-1]
        if last is not None and _trainable(last):
            nn.init.zeros_(last.weight)
            if last.bias is not None:
                nn.init.zeros_(last.bias)
    return m


def zero_factors(model: nn.Module) -> list[tuple[str, list[str]]]:
    """The modules of ``model`` that hold, as parameters of their own, two or more trainable matrices all exactly 0
    whose shapes chain (one's rows the other's columns: the factors B·A of a product, a LoRA adapter's), with those
    parameters' names in registration order: (module name, names). Each factor's gradient is a product with the
    other, 0 while the other is 0, so none of them ever moves (round 31: LoRA with A and B both at 0,
    Guitaricet/relora#18). The weights of Linear or convolution layers are left out: zero layers in a row are
    :func:`he_init`'s (their units are symmetric as well, which one factor drawn at random would not mend)."""
    found = []
    for name, m in model.named_modules():
        if isinstance(m, _WEIGHTED):
            continue
        zeros = [(n, p) for n, p in m.named_parameters(recurse=False)
                 if p.requires_grad and p.dim() == 2 and not bool(p.detach().any())]
        if len(zeros) < 2:
            continue
        chained = [n for n, p in zeros
                   if any(q is not p and (p.shape[0] == q.shape[1] or p.shape[1] == q.shape[0]) for _, q in zeros)]
        if len(chained) >= 2:
            found.append((name, chained))
    return found


def weight_norms(model: nn.Module) -> list[tuple[str, Tensor, Tensor]]:
    """The weight-normalised weights of ``model``, each as (module name, g, v): ``nn.utils.parametrizations.
    weight_norm``'s ``original0``/``original1`` and the older ``nn.utils.weight_norm``'s ``weight_g``/``weight_v``."""
    from torch.nn.utils import parametrize

    found: list[tuple[str, Tensor, Tensor]] = []
    for name, m in model.named_modules():
        plist = getattr(getattr(m, "parametrizations", None), "weight", None)
        pairs = [(getattr(m, "weight_g", None), getattr(m, "weight_v", None))]
        if isinstance(plist, parametrize.ParametrizationList) and any(type(p).__name__ == "_WeightNorm" for p in plist):
            pairs.append((getattr(plist, "original0", None), getattr(plist, "original1", None)))
        found += [(name, g, v) for g, v in pairs if isinstance(g, Tensor) and isinstance(v, Tensor)
                  and v.dim() >= 2 and g.numel() == v.shape[0]]
    return found


@torch.no_grad()
def zero_weight_norms(model: nn.Module) -> list[dict]:
    """The weight-normalised weights (:func:`weight_norms`) with rows of v exactly 0: g·v/‖v‖ is 0/0 there, NaN on
    every forward pass (a layer initialised at 0, then wrapped): module, the weight's shape, its rows, those at 0.
    [] where reading fails (a sharded weight): a watch never fails the run for it."""
    found = []
    try:
        for name, g, v in weight_norms(model):
            zero = int((v.reshape(v.shape[0], -1).norm(dim=1) == 0).sum())
            if zero:
                found.append({"module": name, "shape": list(v.shape), "rows": int(v.shape[0]), "zero_rows": zero})
    except Exception:  # noqa: BLE001 - nothing to say, nothing lost
        return []
    return found


@torch.no_grad()
def weight_norm_init(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Every row of a weight-normalised v at exactly 0 (:func:`zero_weight_norms`) drawn as ``nn.Linear`` draws
    its weight (Kaiming uniform, a = √5), and its g set to that row's norm: the layer's default start, where
    g·v/‖v‖ was 0/0."""
    m = _target(model, inplace)
    for _, g, v in weight_norms(m):
        rows = v.reshape(v.shape[0], -1)
        zero = rows.norm(dim=1) == 0
        if bool(zero.any()):
            fresh = torch.empty_like(v)
            nn.init.kaiming_uniform_(fresh, a=math.sqrt(5))
            v[zero] = fresh[zero]
            g.copy_(torch.where(zero, rows.norm(dim=1), g.reshape(-1)).reshape(g.shape))
    return m


NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)  # those with a scale γ (their weight)


@torch.no_grad()
def zero_norm_scales(model: nn.Module) -> list[str]:
    """The normalisation layers (BatchNorm, InstanceNorm, LayerNorm, GroupNorm) whose scale γ is exactly 0 in every
    entry: each outputs its shift β whatever its input, and passes no gradient below it. [] where reading fails (a
    sharded weight): a watch never fails the run for it."""
    try:
        return [n for n, m in model.named_modules() if isinstance(m, NORM_TYPES)
                and isinstance(getattr(m, "weight", None), Tensor) and m.weight.numel() and not bool(m.weight.any())]
    except Exception:  # noqa: BLE001 - nothing to say, nothing lost
        return []


@torch.no_grad()
def norm_scales_one(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Every normalisation layer's scale γ that is 0 in every entry (:func:`zero_norm_scales`) set to 1, PyTorch's
    default: a γ of 0 is meant for the last norm of a residual branch only (Goyal et al. 2017, §5.1), where the skip
    carries the signal and the gradient past it."""
    m = _target(model, inplace)
    for name in zero_norm_scales(m):
        weight = m.get_submodule(name).weight
        assert isinstance(weight, Tensor)  # zero_norm_scales found a tensor there
        nn.init.ones_(weight)
    return m


@torch.no_grad()
def one_factor_init(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Of each product whose factors all start at exactly 0 (:func:`zero_factors`), the first factor drawn as
    ``nn.Linear`` draws its weight (Kaiming uniform, a = √5), the others left at 0: the product, and so the model's
    output, is still 0 at the start, and every factor now has a gradient (LoRA's own init: A at random, B at 0; Hu et
    al. 2021, §4.1)."""
    m = _target(model, inplace)
    for name, names in zero_factors(m):
        nn.init.kaiming_uniform_(getattr(m.get_submodule(name), names[0]), a=math.sqrt(5))
    return m
