"""The GPU overhead benchmark's script runs end to end (tiny models on the CPU: the script, not the numbers)."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # (over 20 min of CI on an AVX2 EPYC with it: `make test-slow` runs it)
def test_gpu_overhead_smoke(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("lightning")
    bench = runpy.run_path(str(ROOT / "benchmarks" / "gpu_overhead.py"))
    assert bench["main"](["--smoke", "--models", "gpt2", "--rounds", "1", "--steps", "2", "--steady-steps", "2",
                          "--steady-after", "3", "--inspect", "plain", "gradwatch: gradient statistics every step",
                          "--out", str(tmp_path)]) == 0
    table = (tmp_path / "gpu_overhead.md").read_text()
    for row in list(bench["EXTRA"]) + list(bench["WATCHES"]) + [bench["STEADY"], "floor: read every gradient once"]:
        assert f"| {row}" in table
    assert "| plain | 1.000× | 1.000× |" in table
    assert "the default watch's own account" in table
    inspected = (tmp_path / "inspect_gpt2.txt").read_text()
    assert "## plain" in inspected and "## gradwatch: gradient statistics every step" in inspected


def test_instability_sweep_smoke(tmp_path):
    bench = runpy.run_path(str(ROOT / "benchmarks" / "instability.py"))
    assert bench["main"](["--smoke", "--lrs", "0.001", "0.3", "--variants", "plain", "qk-norm", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "instability_smoke.png").stat().st_size > 0
    import json

    results = json.loads((tmp_path / "instability_smoke.json").read_text())
    assert sorted((r["variant"], r["lr"]) for r in results) == [("plain", 0.001), ("plain", 0.3), ("qk-norm", 0.001),
                                                                 ("qk-norm", 0.3)]
