"""``gradwatch demo``: a deep tanh MLP that cannot learn beside its healthy twin, both watched."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

import gradwatch as gw
from gradwatch import zoo
from gradwatch.diagnosis.measures import depth_ratio
from gradwatch.report.html import write_html
from gradwatch.report.terminal import findings_text

DEMO_SETUPS = ("deep_tanh_mlp", "deep_relu_he_mlp")
LABELS = {"deep_tanh_mlp": "tanh", "deep_relu_he_mlp": "ReLU + He"}


@dataclass
class DemoRun:
    """What one demo run measured, read back from its store."""

    setup: str
    path: Path
    layers: list[str]
    first: np.ndarray  # per-layer back-propagated gradient ‖∂L/∂a‖ at the first recorded step
    last: np.ndarray  # ... and at the last
    verdict: str  # the diagnosis's: the first problem's kind, or "healthy"
    loss_start: float
    loss_end: float
    accuracy: float
    seconds: float

    @property
    def ratio(self) -> float:
        """First layer's ‖∂L/∂a‖ over the last layer's, at the last recorded step (NaN: it cannot be judged).

        The verdict beside it is the diagnosis's (window medians, its thresholds): the demo judges nothing itself.
        """
        ratio = depth_ratio(self.last)
        return math.nan if ratio is None else ratio


def train(setup: str, out: Path, steps: int, seed: int = 0) -> DemoRun:
    """Train one zoo set-up under a watch; its store goes to ``out/demo-<setup>`` (replaced if there)."""
    start = time.perf_counter()
    path, trial = zoo.train_watched(setup, seed, steps, out, run_name=f"demo-{setup}", overwrite=True)
    seconds = time.perf_counter() - start
    with gw.open_run(path) as run:
        # depth is judged on the back-propagated gradient, as the diagnosis does (DESIGN.md)
        grads = run.series("out_grad_norm")
        loss = run.series("loss", kind="run").values[0]
        problems = gw.diagnose(run).problems
    k = max(1, min(20, steps // 10))  # mean of the first and last k steps: one batch is noisy
    return DemoRun(
        setup,
        path,
        grads.names,
        grads.values[:, 0],
        grads.values[:, -1],
        problems[0].kind if problems else "healthy",
        float(np.mean(loss[:k])),
        float(np.mean(loss[-k:])),
        trial.evaluate(trial.model) if trial.evaluate else math.nan,
        seconds,
    )


def _bar(value: float, lo: float, hi: float, width: int = 10) -> str:
    """A bar whose length is log10(value) on the scale lo..hi (both log10)."""
    if not math.isfinite(value) or value <= 0:
        return "[bold red]NaN/0[/]"
    frac = (math.log10(value) - lo) / max(hi - lo, 1e-12)
    n = max(1, round(frac * width))
    return "█" * n


def render(runs: list[DemoRun], console: Console) -> None:
    """The per-layer table: gradient norm at the first and last step, each setup side by side."""
    finite = np.concatenate([np.r_[r.first, r.last] for r in runs])
    finite = finite[np.isfinite(finite) & (finite > 0)]
    lo, hi = math.log10(finite.min()) - 0.5, math.log10(finite.max())
    width_bar = 10
    table = Table(title="back-propagated gradient ‖∂L/∂a‖ per layer, first → last step", title_justify="left")
    table.add_column("layer", justify="right")
    for r in runs:
        label = LABELS.get(r.setup, r.setup)
        table.add_column(f"{label}\nfirst", justify="right")
        table.add_column(f"{label}\nlast", justify="right")
        table.add_column("log scale", justify="left", no_wrap=True, min_width=width_bar)
    for i, name in enumerate(runs[0].layers):
        row = [name]
        for r in runs:
            row += [f"{r.first[i]:.1e}", f"{r.last[i]:.1e}", _bar(float(r.last[i]), lo, hi)]
        table.add_row(*row)
    console.print(table)
    for r in runs:
        verdict = "[green]healthy[/]" if r.verdict == "healthy" else f"[bold red]{r.verdict}[/]"
        console.print(
            f"[bold]{r.setup}[/]: first/last layer gradient ratio ‖∂L/∂a‖ {r.ratio:.1e} ({verdict}); "
            f"loss {r.loss_start:.3f} → {r.loss_end:.3f}; test accuracy {r.accuracy:.1%}; "
            f"{r.seconds:.1f} s; store: {r.path}"
        )


def run_demo(out: str | Path = "runs", steps: int = 300, console: Console | None = None) -> list[DemoRun]:
    """Train both demo set-ups, print the table, return what was measured."""
    console = console or Console()
    out = Path(out)
    runs = []
    for setup in DEMO_SETUPS:
        console.print(f"[dim]{zoo.get(setup).description}[/]")
        with console.status(f"training {setup} for {steps} steps under gw.watch …"):
            runs.append(train(setup, out, steps))
    render(runs, console)
    for r in runs:
        with gw.open_run(r.path) as run:
            diagnosis = gw.diagnose(run)
            report = write_html(run, r.path / "report.html", diagnosis)
        console.rule(f"[bold]{r.setup}[/]: findings")
        console.print(findings_text(diagnosis))
        console.print(f"HTML report: [bold]{report}[/]")
    console.print(
        "\nRead a run back with [bold]gw.open_run(path)[/] (e.g. [bold].series('grad_norm')[/], the layers × steps "
        "matrix); [bold]gradwatch diagnose PATH[/] and [bold]gradwatch report PATH[/] work on any stored run."
    )
    return runs
