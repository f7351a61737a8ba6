"""Remedies that fit the architecture: nothing the model already has, the learning rate where Adam runs hot."""

from __future__ import annotations

from dataclasses import replace

from gradwatch.diagnosis.findings import Finding
from gradwatch.diagnosis.remedies import key_of, remedies
from gradwatch.store import Run

# Module classes that say what the architecture already has (class names, as `module_types` in the run's meta
# and the entities' modules record them).
RESIDUAL_TYPES = frozenset({"TransformerEncoderLayer", "TransformerDecoderLayer", "BasicBlock", "Bottleneck",
                            "GPT2Block", "BertLayer", "ViTLayer", "Block", "ResidualBlock"})
RELU_TYPES = frozenset({"ReLU", "ReLU6", "LeakyReLU", "PReLU", "RReLU", "ELU", "CELU", "SELU", "GELU", "SiLU",
                        "Mish", "Hardswish", "Softplus"})
SATURATING_TYPES = frozenset({"Tanh", "Sigmoid", "Hardtanh", "Softsign", "Hardsigmoid", "LogSigmoid", "Tanhshrink"})
ADAM_TYPES = frozenset({"Adam", "AdamW", "NAdam", "RAdam", "Adamax"})
# Adam's step moves every weight by about lr from the first step on (its update is normalised): above 3·10⁻³
# without a warm-up, attention and LayerNorm'd nets (Xiong et al. 2020; Liu et al. 2020) commonly collapse.
ADAM_LR_ABOVE = 3e-3


def module_types(run: Run) -> set[str]:
    """The module classes of the run's model: its meta's ``module_types`` and its entities' modules."""
    meta = getattr(run, "meta", {}) or {}
    types = set(meta.get("module_types") or ())
    return types | {e.module for e in run.entities() if e.module}


def lr_without_warmup(run: Run) -> str:
    """Words for Adam-type optimisation at a high learning rate with no warm-up seen ('' when that is not the case)."""
    meta = getattr(run, "meta", {}) or {}
    opt, lr, initial = meta.get("optimizer"), meta.get("optimizer_lr"), meta.get("optimizer_initial_lr")
    if opt not in ADAM_TYPES or not isinstance(lr, (int, float)) or lr <= ADAM_LR_ABOVE:
        return ""
    if isinstance(initial, (int, float)) and lr < initial:
        return ""  # a scheduler started below its base rate: a warm-up
    return (f"the learning rate: {opt} at lr {lr:g} with no warm-up (no scheduler had lowered it when the watch "
            f"started) moves every weight by about lr from the first step, which a deep net with attention or "
            f"normalisation often does not survive")


def fit_architecture(found: list[Finding], run: Run) -> list[Finding]:
    """Remedies that fit the architecture: nothing the model already has, no swap of activations it does not use.

    With Adam at a high learning rate and no warm-up, the depth and spike findings name the learning rate.
    """
    types = module_types(run)
    drop = set()
    if types & RESIDUAL_TYPES:
        drop.add("residual")
    if any("Norm" in t for t in types):
        drop.add("norm")
    relu_type = bool(types & RELU_TYPES) or bool(types & {"TransformerEncoderLayer", "TransformerDecoderLayer"})
    if not types & SATURATING_TYPES and (relu_type or run.entities("activation")):
        drop.add("relu")  # nothing tanh/sigmoid-like to swap
    lr_words = lr_without_warmup(run)
    out = []
    for f in found:
        fixes = tuple(t for t in f.remedies if key_of(t) not in drop)
        cause = f.cause
        if lr_words and f.severity != "info" and f.kind in ("vanishing", "exploding", "nonfinite", "stalled"):
            first = remedies("warmup", "lower_lr")
            fixes = first + tuple(t for t in fixes if key_of(t) not in ("warmup", "lower_lr"))
            cause = f"{lr_words}; the measurement: {cause}"
        out.append(f if fixes == f.remedies and cause == f.cause else replace(f, remedies=fixes, cause=cause))
    return out
