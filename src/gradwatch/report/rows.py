"""One row per layer: the numbers both reports show, read from the stored records."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from gradwatch.store import Run, Series


@dataclass(frozen=True)
class LayerRow:
    """What one layer looks like at the end of the run (last recorded values)."""

    name: str
    module: str
    grad_norm: float  # at the last recorded step
    trend: float  # last recorded grad_norm over the first
    out_grad_norm: float  # ‖∂L/∂a‖ at the last sampled step
    update_ratio: float  # at the last update step
    activation: str  # the activation module after this layer, if any
    saturated: float  # its saturated fraction (bounded units) at the last sampled step
    dead: float  # its dead fraction (ReLU-likes)
    nonfinite: float  # parameter tensors with NaN/Inf gradients, summed over the run
    zero: bool  # the gradient is exactly zero at the last step
    unmeasured: bool = False  # ‖∂L/∂a‖ was recorded for other layers, never for this one, though its parameters got gradients


# Why a layer can have ‖∂L/∂W‖ and no ‖∂L/∂a‖: both reports print this under their layer table.
UNMEASURED_NOTE = ("‖∂L/∂a‖ unmeasured: the gradient reached the layer's parameters, but autograd never ran the hook "
                   "on its output; it drops that hook when the output is modified in place (e.g. `h += 1` on a 3-D "
                   "nn.Linear's output). Its ‖∂L/∂W‖ is still measured.")


def _last(series: Series | None, name: str) -> float:
    if series is None or name not in series.names:
        return math.nan
    row = series.values[series.names.index(name)]
    ok = np.where(~np.isnan(row))[0]
    return float(row[ok[-1]]) if len(ok) else math.nan


def _first(series: Series | None, name: str) -> float:
    if series is None or name not in series.names:
        return math.nan
    row = series.values[series.names.index(name)]
    ok = np.where(~np.isnan(row))[0]
    return float(row[ok[0]]) if len(ok) else math.nan


def layer_rows(run: Run) -> list[LayerRow]:
    """Rows in depth order."""
    q = set(run.quantities)

    def get(quantity: str, kind: str = "layer") -> Series | None:
        return run.series(quantity, kind) if quantity in q else None

    grad, out, upd, nonf = get("grad_norm"), get("out_grad_norm"), get("update_ratio"), get("nonfinite")
    sat, dead = get("saturated_frac", "activation"), get("dead_frac", "activation")
    got_grad = set() if grad is None else {n for n, r in zip(grad.names, grad.values) if np.isfinite(r).any()}
    got_out = set() if out is None else {n for n, r in zip(out.names, out.values) if (~np.isnan(r)).any()}
    entities = run.entities()
    layers = [e for e in entities if e.kind == "layer"]
    acts = [e for e in entities if e.kind == "activation" and e.depth is not None]
    rows = []
    for i, e in enumerate(layers):
        nxt = layers[i + 1].depth if i + 1 < len(layers) and layers[i + 1].depth is not None else math.inf
        after = [a for a in acts if e.depth is not None and e.depth < a.depth < nxt]  # type: ignore[operator]
        act = after[0].name if after else ""
        g_last, g_first = _last(grad, e.name), _first(grad, e.name)
        total_nf = 0.0
        if nonf is not None and e.name in nonf.names:
            total_nf = float(np.nansum(nonf.values[nonf.names.index(e.name)]))
        rows.append(LayerRow(
            name=e.name,
            module=e.module or "",
            grad_norm=g_last,
            trend=g_last / g_first if g_first and math.isfinite(g_first) and g_first != 0 else math.nan,
            out_grad_norm=_last(out, e.name),
            update_ratio=_last(upd, e.name),
            activation=(after[0].module or "") if after else "",
            saturated=_last(sat, act) if act else math.nan,
            dead=_last(dead, act) if act else math.nan,
            nonfinite=total_nf,
            zero=g_last == 0.0,
            unmeasured=bool(got_out) and e.name in got_grad and e.name not in got_out,
        ))
    return rows
