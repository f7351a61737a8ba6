"""Notebook displays (`_repr_html_`): a watch shows the page `report()` writes; a diagnosis, a check and the doctor's
report show their findings, tables and plots, with every number the object's own."""

from __future__ import annotations

import html
import re
import shutil

import torch
from torch import nn

import gradwatch as gw
from gradwatch.diagnosis.findings import sci
from gradwatch.doctor.table import DoctorReport, TrialResult


def _sigmoid_run(store, steps=12):
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(6) for m in (nn.Linear(8, 8), nn.Sigmoid())], nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    with gw.watch(model, opt, store=store, name="nb", activations=1) as w:
        for _ in range(steps):
            x, y = torch.randn(32, 8, generator=g), torch.randint(0, 3, (32,), generator=g)
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            w.log(loss=loss.detach())
    return model, w


def _without_timestamp(page: str) -> str:
    return re.sub(r"written \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", "written …", page)


def test_a_watch_shows_the_page_that_report_writes(store, tmp_path):
    _, w = _sigmoid_run(store)
    shown = w._repr_html_()
    srcdoc = re.fullmatch(r'<iframe srcdoc="(.*)" style="[^"]*"></iframe>', shown, flags=re.S)
    assert srcdoc is not None
    written = w.report(tmp_path / "page.html").read_text(encoding="utf-8")
    assert _without_timestamp(html.unescape(srcdoc.group(1))) == _without_timestamp(written)


def test_a_diagnosis_shows_each_finding_and_the_runs_plots_while_the_run_exists(store):
    _, w = _sigmoid_run(store)
    finding = gw.Finding(kind="vanishing", severity="critical", layers=("0", "10"), steps=(0, 11),
                         summary="the gradient <fades> & stops", evidence="ratio 1e-6", cause="sigmoid' ≤ 1/4",
                         remedies=("ReLU", "He init"))
    diagnosis = gw.Diagnosis([finding], run=str(w.path))
    shown = diagnosis._repr_html_()
    assert "the gradient &lt;fades&gt; &amp; stops" in shown and "<li>He init</li>" in shown  # escaped, every remedy
    assert 'class="finding critical"' in shown
    assert shown.count("<svg") == 2  # the signature heat map and the depth profile, from the stored records
    shutil.rmtree(w.path)
    gone = diagnosis._repr_html_()
    assert "<svg" not in gone and "the gradient &lt;fades&gt;" in gone  # the findings outlive the run's folder
    assert "No findings" in gw.Diagnosis([])._repr_html_()


def test_a_check_shows_its_verdict_its_table_and_the_depth_profile():
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(8) for m in (nn.Linear(16, 16), nn.Sigmoid())], nn.Linear(16, 2))
    report = gw.check(model, torch.randn(32, 16))
    shown = report._repr_html_()
    assert f"gw.check: {report.verdict.upper()}" in shown
    assert shown.count("<svg") == 1
    for layer in report.layers:  # every row, with the report's own numbers
        assert f"<td>{sci(layer.out_grad_norm)}</td>" in shown
    assert all(html.escape(r) in shown for r in report.reasons)


def test_the_doctors_report_shows_every_row_and_the_baseline_findings():
    finding = gw.Finding(kind="saturation", severity="warning", layers=("1",), steps=(0, 9), summary="tanh saturates",
                         evidence="90 % in the tails", cause="raw inputs", remedies=("standardise the inputs",))
    base = TrialResult("baseline (no remedy)", 2.3, 2.3, 0.1, ["saturation"], 1.0, verdict="findings: saturation",
                       first_loss=2.3)
    fixed = TrialResult("input standardisation", 0.2, 0.5, 0.95, [], 1.2, verdict="fixes it", first_loss=2.3)
    report = DoctorReport(base, gw.Diagnosis([finding]), [fixed], best=fixed, message="best remedy: input standardisation",
                          steps=10, seeds=1)
    shown = report._repr_html_()
    assert "best remedy: input standardisation" in shown
    assert "<td>fixes it</td>" in shown and "<td>0.950</td>" in shown and "<td>0.2</td>" in shown
    assert "tanh saturates" in shown
