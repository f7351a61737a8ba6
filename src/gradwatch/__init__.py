"""gradwatch: find, explain and fix vanishing and exploding gradients in PyTorch."""

from gradwatch._version import __version__

from gradwatch._errors import GradwatchWarning, NotARunError  # noqa: E402
from gradwatch.attack import AttackReport, check_attack  # noqa: E402
from gradwatch.checkup import CheckReport, check  # noqa: E402
from gradwatch.diagnosis import Diagnosis, Finding, Thresholds, diagnose  # noqa: E402
from gradwatch.doctor import DoctorReport, doctor  # noqa: E402
from gradwatch.store import Entity, Run, Series, open_run  # noqa: E402
from gradwatch.trial import Setup, Trial  # noqa: E402
from gradwatch.watching import Watch, watch  # noqa: E402

__all__ = [
    "AttackReport", "CheckReport", "Diagnosis", "DoctorReport", "Entity", "Finding", "GradwatchWarning", "NotARunError", "Run",
    "Series", "Setup", "Thresholds", "Trial", "Watch", "__version__", "check", "check_attack", "diagnose", "doctor", "open_run", "watch",
]
