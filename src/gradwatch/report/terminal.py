"""The terminal report: one dense line per layer, then the findings in words."""

from __future__ import annotations

import io
import math

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from gradwatch.diagnosis import Diagnosis
from gradwatch.diagnosis.findings import sci
from gradwatch.diagnosis.measures import by_lag, depth_ratio
from gradwatch.report.rows import UNMEASURED_NOTE, LayerRow, layer_rows
from gradwatch.store import Run


def _num(x: float) -> str:
    return "–" if x != x else sci(x)


def _trend(x: float) -> str:
    if x != x:
        return "–"
    arrow = "↑" if x > 1.5 else "↓" if x < 1 / 1.5 else "→"
    return f"{arrow} ×{sci(x)}"


def _act(row: LayerRow) -> str:
    if not row.activation:
        return ""
    if row.saturated == row.saturated:
        return f"{row.activation} sat {row.saturated:.0%}"
    if row.dead == row.dead:
        return f"{row.activation} dead {row.dead:.0%}"
    return row.activation


def _flags(row: LayerRow) -> Text:
    text = Text()
    if row.nonfinite > 0 or (row.grad_norm == row.grad_norm and math.isinf(row.grad_norm)):
        text.append(f"NaN/Inf ×{int(row.nonfinite)}", style="bold white on red")
    elif row.grad_norm != row.grad_norm and row.trend != row.trend and row.out_grad_norm != row.out_grad_norm:
        text.append("no grad", style="yellow")
    if row.zero:
        text.append(" ZERO", style="bold red")
    if row.unmeasured:
        text.append((" " if text else "") + "‖∂L/∂a‖ unmeasured", style="yellow")
    return text


def layer_table(run: Run) -> Table:
    title = f"gradwatch — {run.path.name}: {run.meta.get('model', '')}, {run.meta.get('steps', '?')} steps"
    rows = layer_rows(run)
    table = Table(title=escape(title),
                  title_justify="left", show_edge=False, pad_edge=False,
                  caption=escape(UNMEASURED_NOTE) if any(r.unmeasured for r in rows) else None,
                  caption_justify="left")
    for col, just in (("layer", "left"), ("module", "left"), ("‖∂L/∂W‖", "right"), ("trend", "right"),
                      ("‖∂L/∂a‖", "right"), ("update", "right"), ("activation", "left"), ("flags", "left")):
        table.add_column(col, justify=just, no_wrap=True)  # type: ignore[arg-type]
    for row in rows:
        # Names are the user's (module paths, class names): shown as they are, never read as markup.
        table.add_row(escape(row.name or "(root)"), escape(row.module), _num(row.grad_norm), _trend(row.trend),
                      _num(row.out_grad_norm), _num(row.update_ratio), escape(_act(row)), _flags(row))
    return table


def findings_text(diagnosis: Diagnosis) -> Text:
    if not diagnosis.findings:
        return Text("No findings: the gradients look healthy.", style="green")
    out = Text()
    for i, f in enumerate(diagnosis):
        if i:
            out.append("\n\n")
        style = "bold red" if f.severity == "critical" else "dim" if f.severity == "info" else "bold yellow"
        out.append(f"[{f.severity}] {f.kind}", style=style)
        out.append(f": {f.summary}\n", style="bold")
        out.append(f"  evidence: {f.evidence}\n  cause:    {f.cause}\n  remedies: {'; '.join(f.remedies)}")
        if f.sources:
            out.append(f"\n  source:   {'; '.join(f.sources)}", style="dim")
    return out


def recurrent_table(run: Run) -> Table | None:
    """One line per recurrent layer: the gradient at the first time step over the last, λ₁(W_hh)."""
    if "temporal_grad_norm" not in run.quantities:
        return None
    table = Table(title="through time (last recorded step)", title_justify="left", show_edge=False, pad_edge=False)
    for col in ("recurrent layer", "cell", "steps", "‖∂L/∂h_first‖/‖∂L/∂h_last‖", "λ₁(W_hh)"):
        table.add_column(col, justify="left" if col in ("recurrent layer", "cell") else "right", no_wrap=True)
    lam = run.series("lambda1", "recurrent") if "lambda1" in run.quantities else None
    for e in run.entities("recurrent"):
        s = by_lag(run.temporal(e.name))
        if not s.names:
            continue
        ratio = depth_ratio(s.values[:, -1])  # the first time step's over the last's, as the diagnosis takes it
        l1 = float(lam.values[lam.names.index(e.name), -1]) if lam is not None and e.name in lam.names else float("nan")
        table.add_row(escape(e.name), escape(e.module or ""), str(len(s.names) - 1), _num(math.nan if ratio is None else ratio),
                      _num(l1))
    return table


def render(run: Run, diagnosis: Diagnosis, console: Console) -> None:
    """Print the layer table and the findings."""
    console.print(layer_table(run))
    console.print()
    rec = recurrent_table(run)
    if rec is not None:
        console.print(rec)
        console.print()
    from gradwatch.report.transformer import lines

    for text in lines(run, diagnosis):
        console.print(text, markup=False, highlight=False)
    console.print(findings_text(diagnosis))


def render_text(run: Run, diagnosis: Diagnosis, width: int = 140) -> str:
    """The same report as plain text (no colour), for files and golden tests."""
    console = Console(record=True, width=width, color_system=None, force_terminal=False, file=io.StringIO())
    render(run, diagnosis, console)
    return console.export_text()
