"""The health of the gradient an attack follows: ∂L/∂x (or ∂L/∂e at an embedding) for cross-entropy and a margin loss.

Also where the gradient stops (a module whose output receives a non-zero
gradient and whose input receives none) and a straight-through hook that lets
an attack pass such modules (BPDA, Athalye, Carlini & Wagner 2018, §4.1).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from gradwatch._errors import bad_argument
from gradwatch.diagnosis.findings import sci


class MarginLoss(nn.Module):
    """The Carlini–Wagner margin max_{j≠y} z_j − z_y on the logits, averaged; an attacker maximises it.

    Unlike cross-entropy it does not saturate with the softmax: its gradient is
    a difference of two logits' gradients, whatever their scale. ``y`` may be
    class indices or one-hot rows (ART passes one-hot).
    """

    def forward(self, z: Tensor, y: Tensor) -> Tensor:
        return margins(z, y.argmax(1) if y.dim() == 2 else y).mean()


def margins(z: Tensor, y: Tensor) -> Tensor:
    """Per-sample max_{j≠y} z_j − z_y: (N, C) logits and (N,) labels -> (N,); positive means misclassified."""
    true = z.gather(1, y[:, None]).squeeze(1)
    others = z.masked_fill(nn.functional.one_hot(y, z.shape[1]).bool(), float("-inf"))
    return others.max(1).values - true


@dataclass(frozen=True)
class GradientHealth:
    """The cross-entropy and margin gradients with respect to the input (or the embedding output), per sample."""

    wrt: str  # "x", or "e" (the embedding output) for token inputs
    n: int
    ce_norm_quantiles: tuple[float, float, float]  # 10 %, 50 %, 90 % of the finite per-sample ‖∂CE/∂x‖
    zero_frac: float  # samples whose ∂CE/∂x is exactly zero in every entry
    zero_entry_frac: float  # entries of ∂CE/∂x that are exactly zero
    nonfinite_frac: float  # samples with a NaN/Inf entry in ∂CE/∂x
    margin_norm_median: float  # median per-sample ‖∂margin/∂x‖
    margin_zero_frac: float
    ce_over_margin: float  # median per-sample ‖∂CE/∂x‖ / ‖∂margin/∂x‖ (samples with a non-zero margin gradient)
    logit_zero_frac: float  # samples whose ∂CE/∂z is exactly zero at the logits: a saturated softmax
    dies_at: tuple[str, ...]  # modules that receive a gradient at their output and pass none to their input
    random: bool  # two forward passes on the same input differed

    def cause(self) -> str:
        """The likely cause, in words, from what was measured."""
        if self.logit_zero_frac > 0.5:
            return (f"a saturated softmax: ∂CE/∂z is exactly zero at the logits on {self.logit_zero_frac:.0%} of the "
                    "samples (float32 rounds the true class's probability to 1), so nothing flows back; a margin on "
                    "the logits does not saturate")
        if self.dies_at:
            return (f"the gradient stops at {', '.join(self.dies_at)}: a non-zero gradient reaches the output and "
                    "none leaves through the input (a derivative zero almost everywhere: rounding, quantisation, "
                    "thresholds)")
        if self.nonfinite_frac > 0:
            return f"non-finite input gradients on {self.nonfinite_frac:.0%} of the samples (undefined derivatives)"
        if self.random:
            return "the model's output is random (two passes differ): one gradient is one draw of a noisy estimate"
        return ("the cross-entropy gradient does not lead where a stronger attack goes: shattered or misleading "
                "gradients rather than zero ones")

    def __str__(self) -> str:
        q = " / ".join(sci(v) for v in self.ce_norm_quantiles)
        return (f"∂CE/∂{self.wrt}: norm 10/50/90 % {q}; exactly zero on {self.zero_frac:.0%} of the samples "
                f"({self.zero_entry_frac:.0%} of entries), non-finite on {self.nonfinite_frac:.0%}; ∂CE/∂z zero at "
                f"the logits on {self.logit_zero_frac:.0%}\n"
                f"∂margin/∂{self.wrt}: median norm {sci(self.margin_norm_median)}, zero on {self.margin_zero_frac:.0%}; "
                f"‖∂CE‖ / ‖∂margin‖ median {sci(self.ce_over_margin)}\n"
                f"gradient stops at: {', '.join(self.dies_at) or 'no layer'}; "
                f"output {'random (two passes differ)' if self.random else 'deterministic'}")


def _module(model: nn.Module, embedding: nn.Module | str) -> nn.Module:
    if isinstance(embedding, nn.Module):
        if not any(m is embedding for m in model.modules()):
            raise ValueError(bad_argument("check_attack", "embedding", "a submodule of the model", embedding))
        return embedding
    named = dict(model.named_modules())
    if not isinstance(embedding, str) or embedding not in named:
        raise ValueError(bad_argument("check_attack", "embedding", "a submodule or its named_modules() name", embedding))
    return named[embedding]


def _per_sample_norm(g: Tensor) -> Tensor:
    return g.detach().flatten(1).double().norm(dim=1)


@contextlib.contextmanager
def _death_hooks(model: nn.Module, n: int) -> Iterator[dict[str, list[Tensor | None]]]:
    """Per leaf module, the per-sample gradient norms that reach its output and its input: {name: [out, in]}."""
    seen: dict[str, list[Tensor | None]] = {}
    handles = []

    def hook(name: str) -> Any:
        def forward(module: nn.Module, args: tuple, out: Any) -> None:
            inp = args[0] if args else None
            if not (isinstance(out, Tensor) and isinstance(inp, Tensor) and out.requires_grad and inp.requires_grad
                    and out.dim() > 0 and inp.dim() > 0 and out.shape[0] == n and inp.shape[0] == n):
                return
            slot: list[Tensor | None] = [None, None]
            seen.setdefault(name, slot)

            def store(i: int) -> Any:
                def tensor_hook(g: Tensor) -> None:
                    slot[i] = _per_sample_norm(g)
                return tensor_hook

            out.register_hook(store(0))
            inp.register_hook(store(1))
        return forward

    for name, m in model.named_modules():
        if not any(True for _ in m.children()):
            handles.append(m.register_forward_hook(hook(name)))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def gradient_health(model: nn.Module, x: Tensor, y: Tensor, *, embedding: nn.Module | str | None = None) -> GradientHealth:
    """Measure ∂CE/∂x and ∂margin/∂x per sample (at the embedding's output if ``embedding`` is given).

    The model should be in eval mode (``check_attack`` puts it there): samples are
    then independent, so the gradient of the summed loss is every sample's own.
    """
    captured: list[Tensor] = []
    handle = None
    if embedding is not None:
        def leaf(module: nn.Module, args: tuple, out: Tensor) -> Tensor:
            e = out.detach().requires_grad_(True)
            captured.append(e)
            return e

        handle = _module(model, embedding).register_forward_hook(leaf)
    try:
        def forward(with_deaths: bool) -> tuple[Tensor, Tensor, dict[str, list[Tensor | None]]]:
            captured.clear()
            xg = x.detach().clone().requires_grad_(embedding is None)
            seen: dict[str, list[Tensor | None]] = {}
            with contextlib.ExitStack() as stack, torch.enable_grad():
                if with_deaths:
                    seen = stack.enter_context(_death_hooks(model, len(x)))
                z = model(xg)
            return (captured[0] if embedding is not None else xg), z, seen

        target, z, seen = forward(True)
        z.retain_grad()
        nn.functional.cross_entropy(z, y, reduction="sum").backward()
        g_ce, g_z = target.grad, z.grad
        assert g_ce is not None and g_z is not None
        target_m, z_m, _ = forward(False)
        (g_m,) = torch.autograd.grad(margins(z_m, y).sum(), target_m)
        with torch.no_grad():
            random = not torch.equal(model(x), model(x))
    finally:
        if handle is not None:
            handle.remove()
    finite = torch.isfinite(g_ce).flatten(1).all(1)
    ce_norm, m_norm = _per_sample_norm(g_ce), _per_sample_norm(g_m)
    fin_norms = ce_norm[finite]
    q = torch.quantile(fin_norms, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)) if len(fin_norms) else torch.full((3,), float("nan"))
    ratio = (ce_norm / m_norm)[finite & (m_norm > 0)]
    return GradientHealth(
        wrt="x" if embedding is None else "e",
        n=len(x),
        ce_norm_quantiles=(float(q[0]), float(q[1]), float(q[2])),
        zero_frac=float((g_ce.flatten(1) == 0).all(1).double().mean()),
        zero_entry_frac=float((g_ce == 0).double().mean()),
        nonfinite_frac=float((~finite).double().mean()),
        margin_norm_median=float(m_norm.median()),
        margin_zero_frac=float((m_norm == 0).double().mean()),
        ce_over_margin=float(ratio.median()) if len(ratio) else float("nan"),
        logit_zero_frac=float((g_z == 0).all(1).double().mean()),
        dies_at=_dead_modules(seen),
        random=random,
    )


def _dead_modules(seen: dict[str, list[Tensor | None]]) -> tuple[str, ...]:
    """Modules where most samples whose output got a non-zero gradient passed none (or a zero one) to the input."""
    dead = []
    for name, (out, inp) in seen.items():
        if out is None:
            continue
        reached = out > 0
        passed = inp > 0 if inp is not None else torch.zeros_like(reached)
        if int(reached.sum()) and int((reached & ~passed).sum()) > 0.5 * int(reached.sum()):
            dead.append(name)
    return tuple(dead)


@contextlib.contextmanager
def straight_through(model: nn.Module, names: tuple[str, ...]) -> Iterator[None]:
    """BPDA with the identity: the named shape-preserving modules keep their forward and pass the gradient unchanged.

    y = x + (f(x) − x).detach(): the value is f(x), the derivative is I. Modules
    whose output shape differs from their input's are left as they are.
    """
    named = dict(model.named_modules())

    def through(module: nn.Module, args: tuple, out: Any) -> Any:
        inp = args[0] if args else None
        if isinstance(inp, Tensor) and isinstance(out, Tensor) and inp.shape == out.shape and out.is_floating_point():
            return inp + (out - inp).detach()
        return None

    handles = [named[n].register_forward_hook(through) for n in names if n in named]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
