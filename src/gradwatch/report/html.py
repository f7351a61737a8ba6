"""One self-contained HTML page per run: inline SVG plots, no network, no script."""

from __future__ import annotations

import datetime as _dt
import html
import os
from pathlib import Path

from gradwatch._errors import bad_argument
from gradwatch.diagnosis import Diagnosis
from gradwatch.diagnosis.findings import FINDINGS_CSS, sci
from gradwatch import plots
from gradwatch.diagnosis.measures import by_lag, total_grad_norm
from gradwatch.report import transformer
from gradwatch.report.rows import UNMEASURED_NOTE, layer_rows
from gradwatch.store import Run, Series

_CSS = FINDINGS_CSS + """
body { font: 14px/1.45 system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 2em auto; max-width: 1100px;
       color: #1d1d1f; padding: 0 1em; }
h1 { font-size: 1.5em; margin-bottom: .2em; } h2 { font-size: 1.15em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
.meta { color: #666; } figure { margin: 1em 0; } figcaption { color: #555; font-size: .9em; }
table { border-collapse: collapse; font-size: 12px; } th, td { padding: 2px 8px; text-align: right; }
th { border-bottom: 1px solid #999; } td:first-child, th:first-child, td.l { text-align: left; }
tr:nth-child(even) { background: #f6f6f6; } .bad { background: #d0021b; color: white; font-weight: 700; }
.unmeasured { color: #b35900; }
.grid { display: grid; grid-template-columns: 1fr 1fr; gap: 0 1.5em; }
figure svg { width: 100%; height: auto; }
"""


def _e(text: object) -> str:
    return html.escape(str(text))


def _num(x: float) -> str:
    return "–" if x != x else sci(x)


def _table(run: Run) -> str:
    head = "<tr><th>layer</th><th>module</th><th>‖∂L/∂W‖</th><th>trend</th><th>‖∂L/∂a‖</th><th>update ratio</th>" \
           "<th>activation</th><th>saturated</th><th>dead</th><th>NaN/Inf</th></tr>"
    rows = []
    layers = layer_rows(run)
    for r in layers:
        bad = ' class="bad"' if r.nonfinite > 0 else ""
        out = '<span class="unmeasured" title="see the note below the table">unmeasured</span>' if r.unmeasured \
            else _num(r.out_grad_norm)
        rows.append(
            f"<tr><td>{_e(r.name or '(root)')}</td><td class=l>{_e(r.module)}</td><td>{_num(r.grad_norm)}</td>"
            f"<td>{'–' if r.trend != r.trend else '×' + sci(r.trend)}</td><td>{out}</td>"
            f"<td>{_num(r.update_ratio)}</td><td class=l>{_e(r.activation)}</td>"
            f"<td>{'' if r.saturated != r.saturated else f'{r.saturated:.0%}'}</td>"
            f"<td>{'' if r.dead != r.dead else f'{r.dead:.0%}'}</td><td{bad}>{int(r.nonfinite) or ''}</td></tr>"
        )
    note = f'<p class="meta" id="unmeasured-note">{_e(UNMEASURED_NOTE)}</p>' if any(r.unmeasured for r in layers) else ""
    return f'<table id="layers">{head}{"".join(rows)}</table>{note}'


def _figure(fig_id: str, svg: str, caption: str) -> str:
    return f'<figure id="{fig_id}">{svg}<figcaption>{_e(caption)}</figcaption></figure>'


def _steps(series: object) -> str:
    steps = series.steps  # type: ignore[attr-defined]
    return f"steps {int(steps[0])}–{int(steps[-1])}, {len(steps)} recorded"


def _where(run: Run, redact: bool) -> str:
    """Where the records are, for the page: the run's path relative to the working directory, never absolute.

    An absolute path usually carries the user's name; ``redact`` drops even the relative one.
    """
    if redact:
        return "the run's store (path redacted)"
    return os.path.relpath(run.path)


def render_html(run: Run, diagnosis: Diagnosis, redact: bool = False) -> str:
    """The report as one HTML string (``redact``: without the run's name and path)."""
    q = set(run.quantities)
    figs = []
    if "grad_norm" in q:
        g = run.series("grad_norm")
        figs.append(_figure("heatmap", plots.heatmap(g, "log₁₀ ‖∂L/∂W‖ per layer and step"),
                            f"The signature plot: grad_norm of every layer (rows, input at the top), {_steps(g)}."))
    out = run.series("out_grad_norm") if "out_grad_norm" in q else None
    grad = run.series("grad_norm") if "grad_norm" in q else None
    if out is not None or grad is not None:
        figs.append(_figure("profile", plots.depth_profile(out, grad),
                            "out_grad_norm (‖∂L/∂a‖, the back-propagated gradient at each layer's output) and "
                            "grad_norm against depth at a few recorded steps."))
    if out is not None:
        figs.append(_figure("heatmap-backprop", plots.heatmap(out, "log₁₀ ‖∂L/∂a‖ per layer and step"),
                            f"out_grad_norm, {_steps(out)}."))
    for quantity, fig_id, title in (("saturated_frac", "saturation", "saturated fraction"),
                                    ("dead_frac", "dead", "dead-unit fraction")):
        if quantity in q:
            s = run.series(quantity, "activation")
            figs.append(_figure(fig_id, plots.heatmap(s, f"{title} per activation and step", log=False, vmin=0, vmax=1,
                                                      cmap="magma", label=quantity),
                                f"{quantity} of each activation module, {_steps(s)}."))
    if "temporal_grad_norm" in q:
        for i, e in enumerate(run.entities("recurrent")):
            lagged = by_lag(run.temporal(e.name))
            if not lagged.names:
                continue
            figs.append(_figure(f"temporal-{i}", plots.heatmap(lagged, f"log₁₀ ‖∂L/∂h_t‖ by lag — {e.name}"),
                                f"temporal_grad_norm of {e.name} ({e.module}), rows: lag from the sequence's end "
                                f"(0 at the bottom), {_steps(lagged)}."))
            figs.append(_figure(f"lag-profile-{i}", plots.lag_profile(lagged),
                                f"temporal_grad_norm of {e.name} against the lag at a few recorded steps."))
    if "loss" in q:
        loss = run.series("loss", "run")
        figs.append(_figure("loss", plots.line(loss, "loss", "loss"), f"loss as logged with watch.log, {_steps(loss)}."))
    got = total_grad_norm(run)
    if got is not None:
        total = Series("total grad_norm", ["total"], got[0], got[1][None, :])
        figs.append(_figure("total-norm", plots.line(total, "total gradient norm", "√Σ grad_norm²", log=True),
                            f"The total gradient norm, from every layer's grad_norm, {_steps(total)}."))
    figs += [_figure(fig_id, svg, caption) for fig_id, svg, caption in transformer.figures(run, diagnosis)]
    meta = run.meta
    title = "gradwatch report" if redact else f"gradwatch report — {run.path.name}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_CSS}</style></head>
<body>
<h1>{_e(title)}</h1>
<p class="meta">{_e(meta.get("model", ""))} · {len(run.layers)} layers · {_e(meta.get("steps", "?"))} steps ·
optimizer {_e(meta.get("optimizer"))} · torch {_e(meta.get("torch", ""))} · gradwatch {_e(meta.get("gradwatch", ""))} ·
started {_e(meta.get("started", ""))} · status {_e(meta.get("status", ""))} · store {_e(_where(run, redact))}</p>
<h2>Findings</h2>
<section id="findings">{diagnosis.to_html()}</section>
<h2>Plots</h2>
<div class="grid">{"".join(figs)}</div>
<h2>Layers</h2>
<p class="meta">Last recorded values; trend is the last grad_norm over the first.</p>
{_table(run)}
<p class="meta">Every number here comes from the records in {_e(_where(run, redact))} (quantity named in each caption);
written {_dt.datetime.now().isoformat(timespec="seconds")}.</p>
</body></html>
"""


def notebook_frame(run: Run, diagnosis: Diagnosis) -> str:
    """The report page for a notebook cell: in an iframe, so that its styles stay its own."""
    page = render_html(run, diagnosis)
    return f'<iframe srcdoc="{html.escape(page)}" style="width: 100%; height: 900px; border: 0"></iframe>'


def write_html(run: Run, path: str | Path, diagnosis: Diagnosis, redact: bool = False) -> Path:
    """Write the report; returns its path. ``redact``: leave out the run's name and path."""
    if not isinstance(redact, bool):
        raise TypeError(bad_argument("Watch.report", "redact", "True or False", redact))
    path = Path(path)
    if path.suffix.lower() not in (".html", ".htm"):
        raise ValueError(f"`report(path=…)` expects a path ending in .html, got {str(path)!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(run, diagnosis, redact), encoding="utf-8")
    return path
