"""The README's snippets and every script in examples/ run as written."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_readme_snippets_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert len(blocks) >= 2
    namespace: dict = {}
    for block in blocks:  # later blocks use names from earlier ones, as a reader would
        exec(compile(block, "README.md", "exec"), namespace)
    run = namespace["run"]
    assert run.layers[0] == "0" and len(run.layers) == 20
    assert run.series("grad_norm").values.shape == (20, 100)


@pytest.mark.parametrize("script", sorted((ROOT / "examples").glob("*.py")), ids=lambda p: p.name)
def test_example_runs(script, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out
    assert "store:" in out
    assert list((tmp_path / "runs").glob("*/gradwatch.sqlite"))


def test_sigmoid_example_shows_vanishing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(ROOT / "examples" / "sigmoid_breast_cancer.py"), run_name="__main__")
    ratio = float(re.search(r"back-propagated gradient: ([0-9.e+-]+)", capsys.readouterr().out).group(1))
    assert ratio < 1e-2
