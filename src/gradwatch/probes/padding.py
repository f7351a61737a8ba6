"""Which embeddings read their padding row, and how often: ``nn.Embedding(…, padding_idx=p)`` keeps row p at 0 and
never gives it a gradient, which is what padding wants and what a real index given ``padding_idx`` does not (round
40: ibalazevic/TuckER#17, the only relation of a graph at padding_idx=0, so every score was 0 and every gradient too).

A forward pre-hook on each embedding with a ``padding_idx`` notes, at its first call with gradient, the share of its
lookups that are the padding index (a device scalar: no synchronisation until the meta is written); then removes
itself. meta ``padding_reads``: [{"module", "padding_idx", "share"}].
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle


class PaddingReads:
    """The share of each padded embedding's first lookups that are its padding index (see the module's docstring)."""

    def __init__(self, model: nn.Module, guard: Callable[..., Any]) -> None:
        self._shares: dict[str, tuple[int, Tensor]] = {}
        self._own: dict[str, RemovableHandle] = {}
        for name, m in model.named_modules():
            if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.padding_idx is not None:
                self._own[name] = m.register_forward_pre_hook(
                    lambda mod, args, name=name: guard(self._on, name, mod, args))
        self.handles = list(self._own.values())

    def _on(self, name: str, module: nn.Module, args: tuple) -> None:  # (indices: no graph to keep out of)
        if not torch.is_grad_enabled() or name in self._shares or not args or not isinstance(args[0], Tensor):
            return
        index = args[0]
        if index.is_floating_point() or not index.numel():
            return
        pad = int(module.padding_idx)  # type: ignore[arg-type]  # set: the hook is placed only where it is
        self._shares[name] = (pad, index.eq(pad).float().mean())
        self._own.pop(name).remove()

    def meta(self) -> dict[str, Any]:
        return {"padding_reads": [{"module": n, "padding_idx": p, "share": round(float(s), 4)}
                                  for n, (p, s) in self._shares.items()]}
