"""Depth: the order in which each layer's and activation's output is first produced.

For leaf modules this is first-forward execution order; a module that owns
parameters *and* contains others (a model root holding a positional
embedding) comes after its children, where its output is. A forward hook runs
when the output exists, so noting names as forward hooks fire gives exactly
this order. It is settled after the first step and written to the store once.
"""

from __future__ import annotations

from gradwatch.store import StoreWriter


class DepthOrder:
    """Notes outputs as they are first produced during the first step, then writes every entity's depth."""

    def __init__(self) -> None:
        self._order: list[tuple[str, str]] = []  # (name, kind), first output first
        self._seen: set[tuple[str, str]] = set()
        self.settled = False

    def note(self, name: str, kind: str) -> None:
        """An output of ``(name, kind)`` was produced (noted until the order is settled)."""
        if not self.settled and (name, kind) not in self._seen:
            self._seen.add((name, kind))
            self._order.append((name, kind))

    def first(self, kind: str) -> str | None:
        """The name of the first output of ``kind`` ("layer", "activation") produced, if any yet."""
        return next((name for name, k in self._order if k == kind), None)

    def settle(self, writer: StoreWriter, params: list[tuple[str, str]]) -> None:
        """Write the depths: each entity's own, each parameter its layer's (``params``: (parameter, layer) names)."""
        self.settled = True
        depth = {key: d for d, key in enumerate(self._order)}
        rows = [(eid, depth[key]) for key, eid in writer.entity_ids().items() if key in depth]
        rows += [(writer.entity(p, "param"), depth[(layer, "layer")]) for p, layer in params if (layer, "layer") in depth]
        writer.depths(rows)
        writer.meta({"layer_order": [n for n, k in self._order if k == "layer"]})
