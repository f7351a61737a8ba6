"""gradwatch: find, explain and fix vanishing and exploding gradients in PyTorch."""

__version__ = "0.1.0"

from gradwatch._errors import GradwatchWarning  # noqa: E402
from gradwatch.store import Run, Series, open_run  # noqa: E402
from gradwatch.watch import Watch, watch  # noqa: E402

__all__ = ["GradwatchWarning", "Run", "Series", "Watch", "__version__", "open_run", "watch"]
