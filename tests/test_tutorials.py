"""Every tutorial in docs/tutorials runs, prints and plots what its text claims, and its assertions hold.

The tutorials read GRADWATCH_TUTORIAL_OUT (where plots and run stores go) and
GRADWATCH_TUTORIAL_SEED. Their claims are properties: each runs on seeds 0, 1
and 2, and (marked zoo) again under ATEN_CPU_CAPABILITY=default in CI.
"""

from __future__ import annotations

import importlib.util
import runpy
from pathlib import Path

import pytest

TUTORIALS = sorted((Path(__file__).resolve().parent.parent / "docs" / "tutorials").glob("[0-9][0-9]_*.py"))


def test_all_seven_tutorials_are_here() -> None:
    assert [p.name[:2] for p in TUTORIALS] == ["01", "02", "03", "04", "05", "06", "07"]


@pytest.mark.zoo
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("path", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_runs_and_its_claims_hold(path: Path, seed: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    if "gradient_masking" in path.name and importlib.util.find_spec("art") is None:
        pytest.skip("needs gradwatch[attack] (the Adversarial Robustness Toolbox)")
    text = path.read_text()
    assert text.count("# %%") >= 4 and "jupytext" in text  # percent format: it opens as a notebook
    monkeypatch.setenv("GRADWATCH_TUTORIAL_OUT", str(tmp_path))
    monkeypatch.setenv("GRADWATCH_TUTORIAL_SEED", str(seed))
    monkeypatch.chdir(tmp_path)
    import matplotlib.pyplot as plt

    try:
        runpy.run_path(str(path), run_name="__main__")
    finally:
        plt.close("all")
    assert list(tmp_path.glob("*.png")), "the tutorial saved no plot"
    assert "plot:" in capsys.readouterr().out
