"""The HTML report in a real browser: Debian's Chromium, headless (installed by .ci/run)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import gradwatch as gw
from gradwatch import zoo

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("CI"),
    reason="Debian's chromium is not installed here (.ci/run installs it; CI never skips this)",
)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
         "--enable-logging=stderr", "--v=0"]


def chromium(page: Path, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    assert CHROMIUM is not None, "chromium is not installed: apt-get install chromium"
    profile = tmp / f"profile-{len(list(tmp.glob('profile-*')))}"
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args, page.resolve().as_uri()],
                          capture_output=True, text=True, timeout=120)


def console_messages(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


def test_harness_sees_console_errors(tmp_path):
    """The negative control: a page that logs an error must be caught, or the real test proves nothing."""
    page = tmp_path / "bad.html"
    page.write_text("<html><body><script>console.error('planted'); missingFunction();</script></body></html>")
    result = chromium(page, tmp_path, "--dump-dom")
    messages = console_messages(result.stderr)
    assert any("planted" in m for m in messages) and any("missingFunction" in m for m in messages)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("browser")
    trial = zoo.get("deep_tanh_mlp")(0)
    with gw.watch(trial.model, trial.optimizer, store=tmp, name="r") as w:
        for _ in range(60):
            w.log(loss=trial.step())
    return w.report(tmp / "report.html")


def test_report_renders_with_no_console_errors(report, tmp_path):
    result = chromium(report, tmp_path, "--dump-dom")
    assert result.returncode == 0, result.stderr[-2000:]
    assert console_messages(result.stderr) == []
    dom = result.stdout
    for fig in ("heatmap", "profile", "heatmap-backprop", "saturation", "loss", "total-norm"):
        assert f'<figure id="{fig}"><svg' in dom, fig
    assert 'data-kind="vanishing"' in dom


def test_report_screenshot(report, tmp_path):
    """The page paints: a screenshot (kept beside the report) with plots in it, not a blank page."""
    import matplotlib.image as mpimg

    shot = report.parent / "report.png"
    result = chromium(report, tmp_path, f"--screenshot={shot}", "--window-size=1100,1800")
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    image = mpimg.imread(shot)[..., :3]
    assert image.shape[:2] == (1800, 1100)
    colourful = (image.max(axis=2) - image.min(axis=2)) > 0.25  # saturated pixels: the heat maps' colours
    assert colourful.mean() > 0.05
