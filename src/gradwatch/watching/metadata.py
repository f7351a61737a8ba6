"""What a run's ``meta`` says about the set-up it watched: versions, model, optimizer, schedules."""

from __future__ import annotations

import datetime as _dt
import numbers
import platform
from typing import Any

import torch
from torch import nn

from gradwatch._version import __version__
from gradwatch.layers import Anatomy
from gradwatch.remedies.init import zero_factors, zero_norm_scales, zero_weight_norms


def run_metadata(model: nn.Module, optimizer: torch.optim.Optimizer | None, parts: Anatomy,
                 params: list[nn.Parameter], recurrent: list[dict], device: torch.device,
                 budget: dict[str, Any]) -> dict[str, Any]:
    """The run's metadata at the watch's start (``status`` running); ``budget``: the schedules and the budget
    (:meth:`gradwatch.watching.budget.Budget.report`)."""
    return {
        "gradwatch": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "started": _dt.datetime.now().isoformat(timespec="seconds"),
        "status": "running",
        "seed": torch.initial_seed(),
        "device": str(device),
        "model": type(model).__name__,
        "n_params": sum(p.numel() for p in params),
        "layers": [
            {"name": l.name, "module": type(l.module).__name__, "params": {a: list(p.shape) for a, p in l.params}}
            for l in parts.layers
        ],
        # Layers whose weight matrices are all exactly 0 at the start (an all-zero initialisation): every unit of
        # theirs computes the same output, and the symmetry is never broken. Not the parameters a block of the user's
        # holds beside its layers (a CRF's transitions, a ViT's position embedding or class token at 0: arithmetic of
        # its own forward, no layer's units; round 48's CRF was told "symmetry … He initialisation" first).
        "zero_weight_layers": [l.name for l in parts.layers
                               if any(p.dim() > 1 for _, p in l.params) and not _beside_layers(l.module)
                               and all(not bool(p.detach().any()) for _, p in l.params if p.dim() > 1)],
        # ... and those whose weights all start at one other constant (nn.init.constant_): symmetric all the same.
        "constant_weight_layers": [l.name for l in parts.layers if _constant_weights(l.params)],
        # ... and those whose bias starts at one constant other than 0 in every entry: a detector's prior bias
        # −log((1 − π)/π) (RetinaNet's −4.6) meant for its output, given to every layer (round 41)
        "constant_biases": {l.name: b for l in parts.layers if (b := _constant_bias(l.params)) is not None},
        # Products whose factors all start at exactly 0 (a LoRA adapter's A and B both zero): neither ever moves.
        "zero_factors": [{"module": n, "factors": f} for n, f in zero_factors(model)],
        # Weight-normalised weights with rows at exactly 0: g·v/‖v‖ = 0/0 (a layer zeroed, then wrapped).
        "zero_weight_norms": zero_weight_norms(model),
        # Layers whose weight is an nn.Embedding's own Parameter (weight tying: head.weight = emb.weight), with that
        # matrix's std at the start: nn.Embedding's N(0, 1) made an output layer's logits √d too large (round 48)
        "tied_embeddings": tied_embeddings(model),
        # Normalisation layers whose scale γ starts at 0 in every entry: each outputs its shift, whatever its input.
        "zero_norm_scales": zero_norm_scales(model),
        # Weights that a pruning mask (torch.nn.utils.prune's ``<name>_mask``) removes whole: module -> [the parameter,
        # its entries]. A global magnitude pruning at initialisation takes whole layers (Tanaka et al. 2020, §3).
        "pruned_whole": pruned_whole(model),
        # Every Linear and convolution at PyTorch's default initialisation (a weight std within DEFAULT_INIT_WITHIN of
        # kaiming_uniform_(a=√5)'s 1/√(3·fan_in)): the run starts from its initialisation, not from trained weights.
        "default_init": default_init(model),
        # ... and the largest of those layers' weight std over the default's: a model trained before the watch at a
        # rate that blew its weights up (an LR range test not reset) starts at ×10 or more.
        "init_scale": init_scale(model),
        "activations": [{"name": a.name, "module": type(a.module).__name__} for a in parts.activations],
        "recurrent": recurrent,
        "optimizer": type(optimizer).__name__ if optimizer is not None else None,
        # where its class comes from: torch.optim's own, or a step rule written by hand (round 44)
        "optimizer_module": type(optimizer).__module__ if optimizer is not None else None,
        # The learning rate at the watch's start (largest group) and, when an LR scheduler already wraps
        # the optimizer, the base rate it starts from (`initial_lr`): a warm-up starts below it.
        "optimizer_lr": max_group(optimizer, "lr"),
        "optimizer_initial_lr": max_group(optimizer, "initial_lr"),
        # every group's rate: one value when all layers step alike (a stalled layer then lacks gradient, not rate)
        "optimizer_lrs": sorted({float(g["lr"]) for g in optimizer.param_groups if isinstance(g.get("lr"), numbers.Real)})
                         if optimizer is not None else None,
        "optimizer_weight_decay": max_group(optimizer, "weight_decay"),
        # Adam's, NAdam's, RAdam's decoupled_weight_decay=True (AdamW's decay): else their weight decay is an L2 term
        "optimizer_decoupled_wd": max_group(optimizer, "decoupled_weight_decay"),
        # maximize=True in any group: the optimizer climbs the loss (a step written params += lr·grad, ported so)
        "optimizer_maximize": any(bool(g.get("maximize")) for g in optimizer.param_groups) if optimizer is not None
                              else None,
        "optimizer_momentum": max_group(optimizer, "momentum"),  # SGD's, RMSprop's (Adam's betas are not this)
        "optimizer_betas": first_betas(optimizer),  # Adam's (β1, β2): swapped, the steps run away
        "optimizer_eps": max_group(optimizer, "eps"),  # Adam's, RMSprop's: a step is lr·m/(√v + eps)
        # The floating dtypes the trainable parameters are kept in: float16 weights (model.half()) round an eps of
        # 1e-8 to 0, and torch.amp.GradScaler refuses their gradients.
        "param_dtypes": sorted({str(p.dtype).removeprefix("torch.") for p in params if p.is_floating_point()}),
        "optimizer_max_lr": max_group(optimizer, "max_lr"),  # OneCycleLR's peak: a rate below it climbs (a warm-up)
        # The model's trainable parameters that the optimizer does not hold: they get gradients and never move (a
        # layer added or replaced after the optimizer was built, an optimizer built on a copy) — or a second
        # optimizer trains them (a GAN's); the diagnosis tells the two apart by whether they move.
        "not_in_optimizer": not_in_optimizer(model, optimizer),
        # Every module class in the model: the diagnosis reads the architecture off it (residual blocks,
        # normalisation, activation types) to propose only remedies it does not already have.
        "module_types": sorted({type(m).__name__ for m in model.modules()}),
        # The parameter-free modules after the last layer with parameters, in registration order: what the loss
        # reads (a softmax there, before nn.CrossEntropyLoss, squashes the logits twice).
        "output_modules": output_modules(model),
        # The largest dropout rate (drop probability, PyTorch's p; None without dropout): 0.9 where TF1's keep_prob
        # 0.9 was meant leaves a tenth of the units.
        "dropout_p": max((float(m.p) for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)),
                         default=None),
        # Normalisation layers over a single element (LayerNorm/RMSNorm with normalized_shape 1): their output is the
        # bias (or ±weight) whatever their input, so nothing before them gets a gradient.
        "single_element_norms": single_element_norms(model),
        # LeakyReLU modules whose negative slope is 1 or more: nn.LeakyReLU(True) sets negative_slope=1 (inplace is the
        # second argument), the identity, so the net between its layers is linear.
        "linear_activations": linear_activations(model),
        # Post-LN Transformer layers (norm_first=False), which need a learning-rate warm-up (Xiong et al. 2020).
        "post_ln_layers": sum(isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer))
                              and not m.norm_first for m in model.modules()),
        # The names of the parameters, buffers and modules that carry token positions (pos_emb, wpe,
        # position_embeddings, a rotary module): a Transformer with none sees its tokens as a set (Vaswani et al.
        # 2017, §3.5).
        "position_names": position_names(model),
        **budget,  # "schedules": who set each family's and what it is; "budget": the fraction, what was measured
    }


def tied_embeddings(model: nn.Module) -> list[dict[str, Any]]:
    """[{"embedding": name, "layer": name, "std": the shared matrix's std, "rows": its rows}] for each layer that is
    not an embedding and holds an ``nn.Embedding``'s weight as its own (``head.weight = emb.weight``)."""
    found: list[dict[str, Any]] = []
    try:
        embeddings = {id(m.weight): n for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
        for name, module in model.named_modules():
            weight = getattr(module, "weight", None)
            if isinstance(module, nn.Embedding) or not isinstance(weight, nn.Parameter) or id(weight) not in embeddings:
                continue
            with torch.no_grad():
                std = float(weight.float().std()) if weight.numel() > 1 else 0.0
            found.append({"embedding": embeddings[id(weight)], "layer": name, "std": std, "rows": int(weight.shape[0])})
    except Exception:  # noqa: BLE001 - a weight that will not be read (a meta tensor, a shard): nothing to say
        return []
    return found


def _beside_layers(module: nn.Module) -> bool:
    """A module of the user's own class that holds layers too: its own parameters are arithmetic of its forward
    (added, indexed, concatenated), not a layer's weight known to multiply its input."""
    return not type(module).__module__.startswith("torch.") and any(True for _ in module.children())


def pruned_whole(model: nn.Module) -> dict[str, list]:
    """The modules whose pruning mask (a ``<name>_mask`` buffer beside a ``<name>_orig`` parameter, as
    torch.nn.utils.prune keeps them) is 0 in every entry: {module: [name, entries]}."""
    found: dict[str, list] = {}
    for path, module in model.named_modules():
        for name, mask in module.named_buffers(recurse=False):
            base = name.removesuffix("_mask")
            if (name.endswith("_mask") and isinstance(getattr(module, f"{base}_orig", None), nn.Parameter)
                    and mask.numel() and not bool(mask.any())):
                found[path] = [base, int(mask.numel())]
    return found


DEFAULT_INIT_WITHIN = 1.25  # a weight std within this factor of the default init's (either way) is the default's


def _default_ratios(model: nn.Module) -> list[float]:
    """For every ``nn.Linear`` and convolution of 64 weights or more: its weight std over PyTorch's default
    initialisation's, kaiming_uniform_(a=√5): U(±1/√fan_in), std 1/√(3·fan_in)."""
    ratios = []
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if (isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) and isinstance(weight, torch.Tensor)
                and weight.dim() >= 2 and weight.numel() >= 64 and weight.is_floating_point()):
            ratios.append(float(weight.detach().float().std()) * (3 * weight[0].numel()) ** 0.5)
    return ratios


def default_init(model: nn.Module) -> bool:
    """Every ``nn.Linear`` and convolution (at least one) has a weight std within :data:`DEFAULT_INIT_WITHIN` of
    PyTorch's default initialisation's (:func:`_default_ratios`)."""
    ratios = _default_ratios(model)
    return bool(ratios) and all(1 / DEFAULT_INIT_WITHIN <= r <= DEFAULT_INIT_WITHIN for r in ratios)


def init_scale(model: nn.Module) -> float | None:
    """The largest weight std over the default initialisation's among the Linear and convolution layers (None
    without one; NaN-free: a non-finite weight is left out)."""
    ratios = [r for r in _default_ratios(model) if r == r and r != float("inf")]
    return max(ratios) if ratios else None


POSITION_WORDS = ("pos", "wpe", "rotary", "rope", "alibi", "relative")  # in a name, case aside: token positions


def position_names(model: nn.Module, most: int = 5) -> list[str]:
    """The first ``most`` names of parameters, buffers or modules (or module classes) in which a word of
    :data:`POSITION_WORDS` appears."""
    named = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    named += [n or type(m).__name__ for n, m in model.named_modules()] + [type(m).__name__ for m in model.modules()]
    return list(dict.fromkeys(n for n in named if any(w in n.lower() for w in POSITION_WORDS)))[:most]


def _constant_weights(params: list) -> bool:
    """Whether a layer's weight matrices (one at least, of two rows or more) are each one constant other than 0
    (by reductions alone, which a sharded DTensor's weight supports; False where reading fails)."""
    try:
        weights = [p.detach() for _, p in params if p.dim() > 1]
        return bool(weights) and all(w.shape[0] > 1 and bool(w.any()) and bool(w.amax() == w.amin()) for w in weights)
    except Exception:  # noqa: BLE001 - a weight that cannot be reduced here: nothing to say, nothing lost
        return False


def _constant_bias(params: list) -> float | None:
    """A layer's bias (two entries or more) where every entry is one constant other than 0, that constant; None
    otherwise, or where reading fails."""
    try:
        bias = next((p.detach() for a, p in params if a == "bias" and p.dim() == 1 and p.numel() > 1), None)
        if bias is None or not bool(bias.any()) or not bool(bias.amax() == bias.amin()):
            return None
        return float(bias.amax())
    except Exception:  # noqa: BLE001 - a bias that cannot be reduced here: nothing to say, nothing lost
        return None


def not_in_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> list[str]:
    """The names of the model's parameters that require grad and that no group of ``optimizer`` holds ([] without
    an optimizer)."""
    if optimizer is None:
        return []
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    return [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in held]


def output_modules(model: nn.Module) -> list[str]:
    """Class names of the leaf modules registered after the model's last leaf with parameters, in order
    (:func:`gradwatch.remedies.structure.after_last_layer`: none where no leaf holds a parameter)."""
    from gradwatch.remedies.structure import after_last_layer

    return [type(m).__name__ for m in after_last_layer(model)]


def first_betas(optimizer: torch.optim.Optimizer | None) -> list[float] | None:
    """The first parameter group's ``betas`` (Adam-type optimizers'), as two floats; None without them."""
    betas = optimizer.param_groups[0].get("betas") if optimizer is not None and optimizer.param_groups else None
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        return None
    try:
        return [float(b) for b in betas]
    except (TypeError, ValueError):
        return None


def max_group(optimizer: torch.optim.Optimizer | None, key: str) -> float | None:
    """The largest numeric ``key`` over the optimizer's parameter groups (None when no group has one)."""
    if optimizer is None:
        return None
    got = [float(g[key]) for g in optimizer.param_groups if isinstance(g.get(key), numbers.Real)]
    return max(got) if got else None


def linear_activations(model: nn.Module) -> list[str]:
    """The names of the model's ``nn.LeakyReLU`` modules with a negative slope of 1 or more: at 1 the identity, so a
    net whose every nonlinearity is one is linear (round 35: ``nn.LeakyReLU(True)`` meant as ``inplace=True``,
    PantoMatrix#52, a circles classifier at chance)."""
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.LeakyReLU) and float(m.negative_slope) >= 1]


def single_element_norms(model: nn.Module) -> list[str]:
    """The names of the model's ``nn.LayerNorm``/``nn.RMSNorm`` modules that normalise over one element: x − mean(x)
    is 0 and x/rms(x) is ±1 there, so the output is constant in the input (round 27: a LayerNorm over a regression's
    single output feature, R² ≈ 0 against 0.36–0.45 without it, told "the initialisation shrinks the signal")."""
    kinds = tuple(k for k in (nn.LayerNorm, getattr(nn, "RMSNorm", None)) if k is not None)
    out = []
    for name, m in model.named_modules():
        shape = getattr(m, "normalized_shape", None)
        if isinstance(m, kinds) and isinstance(shape, tuple) and shape and all(int(d) == 1 for d in shape):
            out.append(name)
    return out
