"""Figures drawn with matplotlib and returned as inline SVG text: the HTML report's, and the notebook displays'.

They read series only (no diagnosis), so every floor that renders can use them.
"""

from __future__ import annotations

import io
import math
import re

from pathlib import Path

import numpy as np

from gradwatch.store import DB_NAME, Series

# svg.hashsalt: element ids from a hash of their content instead of random ones, so the same records draw the same page
_STYLE = {"font.size": 9, "axes.titlesize": 10, "svg.fonttype": "none", "figure.dpi": 100, "svg.hashsalt": "gradwatch"}


def _svg(fig: object) -> str:
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")  # type: ignore[attr-defined]
    plt.close(fig)  # type: ignore[arg-type]
    text = buf.getvalue()
    text = re.sub(r"<\?xml[^>]*\?>\s*", "", text)
    text = re.sub(r"<!DOCTYPE[^>]*>\s*", "", text)
    return re.sub(r"<metadata>.*?</metadata>\s*", "", text, flags=re.S)  # creator links: nothing to fetch, nothing to show


def _plt():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    plt.rcParams.update(_STYLE)
    return plt


def _plain(text: str) -> str:
    """Text that matplotlib shows as it is: a ``$`` would start mathtext (and a bad formula raises)."""
    return text.replace("$", r"\$")


def _labels(names: list[str]) -> list[str]:
    return [_plain(n or "(root)") for n in names]


def heatmap(series: Series, title: str, log: bool = True, vmin: float | None = None, vmax: float | None = None,
            cmap: str = "viridis", label: str = "") -> str:
    """Entities (rows, depth order, first at the top) × steps."""
    plt = _plt()
    values = series.values.copy()
    if log:
        with np.errstate(all="ignore"):
            values = np.where(values > 0, np.log10(values), np.nan)
    height = max(2.2, min(9.0, 0.22 * len(series.names) + 1.2))
    fig, ax = plt.subplots(figsize=(7.5, height))
    steps = series.steps
    extent = (float(steps[0]) - 0.5, float(steps[-1]) + 0.5, len(series.names) - 0.5, -0.5)
    im = ax.imshow(np.ma.masked_invalid(values), aspect="auto", interpolation="nearest", cmap=cmap,
                   extent=extent, vmin=vmin, vmax=vmax)
    ax.set_yticks(range(len(series.names)))
    ax.set_yticklabels(_labels(series.names), fontsize=7 if len(series.names) > 20 else 8)
    if len(series.names) > 40:
        ax.set_yticks(range(0, len(series.names), max(1, len(series.names) // 30)))
        ax.set_yticklabels(_labels(series.names[:: max(1, len(series.names) // 30)]))
    ax.set_xlabel("step")
    ax.set_title(_plain(title))
    fig.colorbar(im, ax=ax, label=_plain(label or ("log₁₀ " + series.quantity if log else series.quantity)), pad=0.02)
    return _svg(fig)


def depth_profile(out: Series | None, grad: Series | None, k: int = 4, title: str = "gradient against depth",
                  legend: bool = True) -> str:
    """‖∂L/∂a‖ (solid) and ‖∂L/∂W‖ (dashed) against depth at a few steps."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 3.4))
    main = out if out is not None else grad
    assert main is not None
    names = main.names
    cols = sorted({int(round(x)) for x in np.linspace(0, len(main.steps) - 1, min(k, len(main.steps)))})
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(cols)))
    for c, j in zip(colors, cols):
        step = int(main.steps[j])
        ax.plot(range(len(names)), main.values[:, j], "-o", color=c, ms=3, label=f"step {step}")
        if out is not None and grad is not None and step in set(grad.steps.tolist()):
            jg = int(np.searchsorted(grad.steps, step))
            g = [grad.values[grad.names.index(n), jg] if n in grad.names else math.nan for n in names]
            ax.plot(range(len(names)), g, "--", color=c, lw=1, alpha=0.7)
    ax.set_yscale("log")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(_labels(names), rotation=90, fontsize=7 if len(names) > 20 else 8)
    ax.set_xlabel("layer (depth order: input → output)")
    ax.set_ylabel("‖∂L/∂a‖ (solid)" + (", ‖∂L/∂W‖ (dashed)" if out is not None and grad is not None else ""))
    ax.set_title(_plain(title))
    if legend:
        ax.legend(fontsize=7, ncol=len(cols))
    ax.grid(alpha=0.3, which="both")
    return _svg(fig)


def line(series: Series, title: str, ylabel: str, log: bool = False) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 2.6))
    ax.plot(series.steps, series.values[0], lw=1.2)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(_plain(ylabel))
    ax.set_title(_plain(title))
    ax.grid(alpha=0.3)
    return _svg(fig)


def lag_profile(series: Series, k: int = 4) -> str:
    """‖∂L/∂h_t‖ against the lag from the sequence's end, at a few recorded steps (``series`` by lag)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 3.0))
    lags = np.array([int(n) for n in series.names])
    cols = sorted({int(round(x)) for x in np.linspace(0, len(series.steps) - 1, min(k, len(series.steps)))})
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(cols)))
    for c, j in zip(colors, cols):
        ax.plot(lags, series.values[:, j], "-", color=c, lw=1.3, label=f"step {int(series.steps[j])}")
    ax.set_yscale("log")
    ax.invert_xaxis()
    ax.set_xlabel("lag (time steps before the end of the sequence)")
    ax.set_ylabel("‖∂L/∂h_t‖")
    ax.set_title("gradient through time")
    ax.legend(fontsize=7, ncol=len(cols))
    ax.grid(alpha=0.3, which="both")
    return _svg(fig)


def figures_of_run(path: str | Path) -> str:
    """The signature plot (log ‖∂L/∂W‖, layers × steps) and the depth profile of a stored run, as HTML figures.

    Empty when there is no run at ``path`` any more (a diagnosis outlives the folder it was made from).
    """
    from gradwatch.store import open_run

    if not path or not (Path(path) / DB_NAME).exists():
        return ""
    with open_run(path) as run:
        q = set(run.quantities)
        grad = run.series("grad_norm") if "grad_norm" in q else None
        out = run.series("out_grad_norm") if "out_grad_norm" in q else None
    figs = []
    if grad is not None:
        figs.append(heatmap(grad, "log₁₀ ‖∂L/∂W‖ per layer and step"))
    if out is not None or grad is not None:
        figs.append(depth_profile(out, grad))
    return "".join(f"<figure>{svg}</figure>" for svg in figs)


def timeline(steps: np.ndarray, loss: np.ndarray | None, total: np.ndarray | None, z: Series | None,
             events: list[int], title: str = "spike timeline") -> str:
    """Around an event: the loss, the total gradient norm (log) and per-layer update z-scores (layers × steps)."""
    plt = _plt()
    panels = [p for p in (loss, total) if p is not None] + ([z] if z is not None and len(z.names) else [])
    heights = [1.0] * (len(panels) - (z is not None and len(z.names) > 0)) + ([1.6] if z is not None and len(z.names) else [])
    fig, axes = plt.subplots(len(panels), 1, figsize=(7.5, 1.5 + 1.6 * len(panels)), sharex=True,
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    i = 0
    for values, label, log in ((loss, "loss", False), (total, "√Σ grad_norm²", True)):
        if values is None:
            continue
        ax = axes[i, 0]
        ax.plot(steps, values, lw=1.2)
        if log:
            ax.set_yscale("log")
        ax.set_ylabel(_plain(label))
        ax.grid(alpha=0.3)
        i += 1
    if z is not None and len(z.names):
        ax = axes[i, 0]
        extent = (float(z.steps[0]) - 0.5, float(z.steps[-1]) + 0.5, len(z.names) - 0.5, -0.5)
        im = ax.imshow(np.ma.masked_invalid(z.values), aspect="auto", interpolation="nearest", cmap="RdBu_r",
                       extent=extent, vmin=-10, vmax=10)
        ax.set_yticks(range(len(z.names)))
        ax.set_yticklabels(_labels(z.names), fontsize=6 if len(z.names) > 20 else 7)
        fig.colorbar(im, ax=ax, label=_plain(z.quantity), pad=0.02)
    for row in axes[:, 0]:
        for e in events:
            row.axvline(e, color="#d0021b", lw=0.8, ls="--")
    axes[-1, 0].set_xlabel("step")
    axes[0, 0].set_title(_plain(title))
    return _svg(fig)
