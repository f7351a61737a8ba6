"""The GPU overhead benchmark's script runs end to end (tiny models on the CPU: the script, not the numbers)."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_overhead_smoke(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("lightning")
    bench = runpy.run_path(str(ROOT / "benchmarks" / "gpu_overhead.py"))
    assert bench["main"](["--smoke", "--models", "gpt2", "--rounds", "1", "--steps", "2", "--out", str(tmp_path)]) == 0
    table = (tmp_path / "gpu_overhead.md").read_text()
    for row in list(bench["EXTRA"]) + list(bench["WATCHES"]) + ["floor: read every gradient once"]:
        assert f"| {row}" in table
    assert "| plain | 1.000× |" in table
