"""Gradient statistics: per-layer and per-parameter norms, non-finite counts, update ratios.

Everything is computed on the parameters' device with fused ops and handed
back as tensors; nothing here copies to the host.

- ``grad_norm``: L2 norm of the gradient; a layer's is over every trainable
  parameter it directly owns (a tied parameter counts in each owner).
- ``nonfinite``: the number of NaN/Inf gradient entries. A tensor's norm is
  finite exactly when all its entries are, so entries are only counted in
  tensors whose norm is not finite.
- ``weight_norm``: L2 norm of the weights before the optimizer step.
- ``update_ratio``: ‖w_after − w_before‖ / ‖w_before‖ across the real
  optimizer step, so it is right for Adam as well as SGD. It needs a copy of
  the weights taken before the step (memory: one more copy of the trainable
  parameters, held only during that step), hence its sparser schedule.
  Undefined, and not recorded, where ‖w_before‖ = 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gradwatch.layers import Layer, param_name

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def fused_norms(tensors: list[Tensor], device: torch.device) -> Tensor:
    """L2 norm of each tensor, as one float64 vector on ``device``; one fused kernel per (device, dtype)."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    sparse: list[int] = []
    for i, t in enumerate(tensors):
        if t.is_sparse:
            sparse.append(i)
        else:
            groups.setdefault((t.device, t.dtype), []).append(i)
    parts: list[Tensor] = []
    order: list[int] = []
    for (_, dtype), idx in groups.items():
        ts = [tensors[i] for i in idx]
        if dtype in _LOW_PRECISION:  # accumulate in float32, never in half precision
            res = torch._foreach_norm(ts, 2, dtype=torch.float32)
        else:
            res = torch._foreach_norm(ts, 2)
        parts.append(torch.stack(res).to(device=device, dtype=torch.float64))
        order.extend(idx)
    for i in sparse:
        parts.append(torch.linalg.vector_norm(tensors[i].coalesce().values().double()).to(device).reshape(1))
        order.append(i)
    out = torch.cat(parts) if len(parts) > 1 else parts[0]
    if order != list(range(len(tensors))):
        out = torch.empty_like(out).index_copy_(0, torch.tensor(order, device=device), out)
    return out


@dataclass
class _Plan:
    """Index tensors for one set of parameters that have gradients."""

    pair_pos: Tensor  # for each (layer, param) pair present: position of its param among those present
    pair_layer: Tensor  # ... and its layer's index
    pairs: list[int]  # pair indices present
    layers: list[int]  # layer indices with at least one gradient
    layer_index: Tensor  # same, as a tensor


class GradProbe:
    """Reads ``param.grad`` and the weights of the watched layers."""

    def __init__(self, layers: list[Layer]) -> None:
        self.layer_names = [layer.name for layer in layers]
        self.params: list[torch.nn.Parameter] = []
        position: dict[int, int] = {}
        self.pair_param: list[int] = []  # one entry per (layer, attribute)
        self.pair_layer: list[int] = []
        self.pair_names: list[str] = []
        for li, layer in enumerate(layers):
            for attr, p in layer.params:
                if id(p) not in position:
                    position[id(p)] = len(self.params)
                    self.params.append(p)
                self.pair_param.append(position[id(p)])
                self.pair_layer.append(li)
                self.pair_names.append(param_name(layer.name, attr))
        self.device = self.params[0].device
        self._plans: dict[tuple[int, ...], _Plan] = {}
        self._before: list[Tensor] | None = None

    def _plan(self, present: tuple[int, ...]) -> _Plan:
        plan = self._plans.get(present)
        if plan is None:
            pos = {p: k for k, p in enumerate(present)}
            pairs = [j for j, p in enumerate(self.pair_param) if p in pos]
            layers = sorted({self.pair_layer[j] for j in pairs})
            dev = self.device
            plan = _Plan(
                pair_pos=torch.tensor([pos[self.pair_param[j]] for j in pairs], device=dev),
                pair_layer=torch.tensor([self.pair_layer[j] for j in pairs], device=dev),
                pairs=pairs,
                layers=layers,
                layer_index=torch.tensor(layers, device=dev),
            )
            self._plans[present] = plan
        return plan

    def _per_layer(self, per_pair: Tensor, plan_pair_layer: Tensor) -> Tensor:
        total = torch.zeros(len(self.layer_names), dtype=per_pair.dtype, device=per_pair.device)
        return total.index_add_(0, plan_pair_layer, per_pair)

    @torch.no_grad()
    def gradients(self) -> dict[str, tuple[list[int], list[int], Tensor, Tensor]] | None:
        """Gradient norms and non-finite counts of the gradients present now.

        Returns ``{quantity: (layer indices, pair indices, per-layer values, per-pair values)}``,
        or None when no parameter has a gradient.
        """
        present = tuple(i for i, p in enumerate(self.params) if p.grad is not None)
        if not present:
            return None
        plan = self._plan(present)
        grads = [self.params[i].grad for i in present]
        norms = fused_norms(grads, self.device)  # (n_present,)
        pair_norm = norms[plan.pair_pos]
        layer_norm = self._per_layer(pair_norm * pair_norm, plan.pair_layer).sqrt()[plan.layer_index]

        counts = torch.zeros_like(norms)
        bad = ~torch.isfinite(norms)
        # A host check; free on the CPU. TODO(ecosystem issue): avoid the sync on CUDA.
        if bool(bad.any()):
            for k in bad.nonzero().flatten().tolist():
                g = grads[k]
                g = g.coalesce().values() if g.is_sparse else g
                counts[k] = (~torch.isfinite(g)).sum()
        pair_count = counts[plan.pair_pos]
        layer_count = self._per_layer(pair_count, plan.pair_layer)[plan.layer_index]
        return {
            "grad_norm": (plan.layers, plan.pairs, layer_norm, pair_norm),
            "nonfinite": (plan.layers, plan.pairs, layer_count, pair_count),
        }

    @torch.no_grad()
    def snapshot(self) -> None:
        """Copy the weights before the optimizer step (for the update ratio)."""
        self._before = [p.detach().clone() for p in self.params]

    @property
    def has_snapshot(self) -> bool:
        return self._before is not None

    @torch.no_grad()
    def updates(self) -> dict[str, tuple[list[int], list[int], Tensor, Tensor]]:
        """Weight norms before the step and update ratios across it; frees the snapshot."""
        before, self._before = self._before, None
        assert before is not None, "updates() without snapshot()"
        after = [p.detach() for p in self.params]
        diffs = torch._foreach_sub(after, before)
        delta = fused_norms(diffs, self.device)
        weight = fused_norms(before, self.device)
        del diffs, before
        pp = torch.tensor(self.pair_param, device=self.device)
        pl = torch.tensor(self.pair_layer, device=self.device)
        pair_w, pair_d = weight[pp], delta[pp]
        layer_w = self._per_layer(pair_w * pair_w, pl).sqrt()
        layer_d = self._per_layer(pair_d * pair_d, pl).sqrt()
        nan = torch.tensor(float("nan"), dtype=torch.float64, device=self.device)
        all_layers = list(range(len(self.layer_names)))
        all_pairs = list(range(len(self.pair_names)))
        return {
            "weight_norm": (all_layers, all_pairs, layer_w, pair_w),
            "update_ratio": (
                all_layers,
                all_pairs,
                torch.where(layer_w > 0, layer_d / layer_w, nan),
                torch.where(pair_w > 0, pair_d / pair_w, nan),
            ),
        }
