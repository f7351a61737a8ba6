"""The package type-checks (STYLE.md: types in annotations, mypy on the package)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_mypy_passes_on_the_package():
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--ignore-missing-imports", "--no-error-summary", str(ROOT / "src" / "gradwatch")],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
