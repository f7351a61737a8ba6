"""Round 14's friction and findings, each against its reference."""

from __future__ import annotations

import math

import pytest

import gradwatch as gw
from gradwatch.diagnosis import Diagnosis
from gradwatch.doctor.table import DoctorReport, TrialResult


def test_the_doctor_table_never_cuts_a_label_or_the_findings_left():
    """Round 13: "clipping at max_norm=1 + learning rate ×" — the bound's factor was cut at 40 characters and the
    findings left at 28. Every label and findings list is printed whole, and the columns stay aligned."""
    long = "gradient-norm clipping at max_norm=1 + learning rate ×0.1 + Adam (lr 0.001)"
    base = TrialResult("baseline (no change)", 3.0, 2.0, math.nan, ["saturation", "stalled", "vanishing"], 1.0,
                       verdict="has findings", first_loss=3.0)
    row = TrialResult(long, 0.5, 1.0, math.nan, [], 1.0, verdict="fixes it", first_loss=3.0)
    report = DoctorReport(base, Diagnosis([]), [row], best=row, message="best remedy: …", steps=10, seeds=2)
    lines = str(report).splitlines()
    head = next(l for l in lines if l.startswith("remedy"))
    body = [l for l in lines if l.startswith((long, "baseline"))]
    assert any(l.startswith(long + " ") for l in body)
    assert any("saturation, stalled, vanishing " in l for l in body)
    col = head.index("findings left")
    assert {l[col:].split("  ")[0].strip() for l in body} == {"saturation, stalled, vanishing", "none"}
