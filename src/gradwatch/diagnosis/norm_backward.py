"""A normalisation of the user's own whose backward passes on what its forward ignores (detached statistics)."""

from __future__ import annotations

import numpy as np

from gradwatch.diagnosis.architecture import run_meta
from gradwatch.diagnosis.findings import Finding, sci, span
from gradwatch.diagnosis.measures import halved, loss_ends, loss_went
from gradwatch.diagnosis.remedies import remedies
from gradwatch.diagnosis.thresholds import Thresholds
from gradwatch.probes.norms import STRAY_FROM
from gradwatch.store import Run

_GROUPS = {"row": "each row of its last dimension", "instance": "each channel of each sample",
           "channel": "each channel across the batch", "sample": "each sample", "all": "the whole batch"}


def _grown(run: Run, skip: set[str]) -> tuple[str, float] | None:
    """The layer (not in ``skip``) whose weight norm grew most over the run, and by how much; None without reads."""
    if "weight_norm" not in run.quantities:
        return None
    s = run.series("weight_norm", "layer")
    best: tuple[str, float] | None = None
    for name, values in zip(s.names, s.values):
        seen = values[np.isfinite(values)]
        if name in skip or len(seen) < 2 or seen[0] <= 0:
            continue
        if best is None or seen[-1] / seen[0] > best[1]:
            best = (name, float(seen[-1] / seen[0]))
    return best


def detached_norm_findings(found: list[Finding], run: Run, th: Thresholds) -> list[Finding]:
    """Layers of the user's own that normalise their input (meta ``normalising_layers``,
    :mod:`gradwatch.probes.norms`) and whose backward passes on a share of :data:`STRAY_FROM` or more of its gradient
    along the shift and scale their forward ignores: their mean or variance is outside the graph. One ``stalled``
    finding, critical where the loss did not halve. Round 42: a 3-conv net on digits with a hand-written batch norm
    whose statistics were detached (Ioffe & Szegedy 2015, §2), 0.53–0.66 held out against 0.95–0.97 with them in the
    graph, and "the gradients look healthy"."""
    seen = {name: got for name, got in (run_meta(run).get("normalising_layers") or {}).items()
            if isinstance(got, dict) and float(got.get("stray") or 0) >= STRAY_FROM}
    if not seen:
        return []
    layers = tuple(seen)
    first = seen[layers[0]]
    stray = max(float(got["stray"]) for got in seen.values())
    ignores = " and ".join(w for w, on in (("a shift", first.get("shift")), ("a scale", first.get("scale"))) if on)
    stats = " and ".join(w for w, on in (("mean", first.get("shift")), ("variance", first.get("scale"))) if on)
    ends = loss_ends(run, th)
    went = "" if ends is None else f"; the logged loss went {loss_went(run, th, ends)}"
    grown = _grown(run, set(layers))
    grew = (f"; the weights of {grown[0]} grew ×{grown[1]:.2g} over the run" if grown is not None and grown[1] >= 1.2
            else "")
    numbers = {"stray_share": stray}
    if grown is not None:
        numbers["weight_growth"] = grown[1]
    steps = int(run_meta(run).get("steps") or 0)
    one = len(layers) == 1
    its = "its" if one else "their"
    return [Finding(
        kind="stalled", severity="warning" if halved(ends) else "critical", layers=layers,
        steps=(0, max(steps - 1, 0)),
        summary=(f"{span(layers)} normalise{'s' if one else ''} {its} input, but {its} backward does not follow: "
                 f"{its} {stats} {'are' if ' and ' in stats else 'is'} outside the graph"),
        evidence=(f"run again on a copy of its input at its first training call, {layers[0]}'s output does not move "
                  f"when the input is given {ignores} within {_GROUPS.get(str(first.get('group')), 'each group')}, "
                  f"yet {sci(stray)} of the gradient its backward passes on lies along those directions (one whose "
                  f"statistics are in the graph passes about 1e-6: float rounding){grew}{went}."),
        cause=(f"the {stats} of a normalisation written by hand computed outside the graph (.detach(), "
               f"torch.no_grad(), .data, .item()): the backward treats them as constants, so the layers before it "
               f"are pushed along directions the normalisation removes — their weights and biases grow while what "
               f"the loss sees does not change, and the useful part of the gradient is what is left (Ioffe & "
               f"Szegedy 2015, §2)"),
        remedies=remedies("norm_stats_in_graph"), numbers=numbers,
        sources=("meta normalising_layers (a re-run of each layer's forward and backward on a copy of its input)",))]


__all__ = ["detached_norm_findings"]
