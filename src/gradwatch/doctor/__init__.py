"""``gw.doctor``: short, seeded trials of the remedies the findings point to, and a table that proves which works.

A set-up is a callable ``seed -> Trial`` (:mod:`gradwatch.trial`). The package, by concern:

- :mod:`~gradwatch.doctor.repair` — :func:`doctor` itself: baseline, candidates, rounds of iterative repair;
- :mod:`~gradwatch.doctor.catalogue` — the remedies, addressed by key, and which keys a finding brings;
- :mod:`~gradwatch.doctor.surgery` — what those remedies measure on, or change in, a user's model;
- :mod:`~gradwatch.doctor.trial_run` — one trial under a watch (:func:`run_trial`), the unit of work;
- :mod:`~gradwatch.doctor.execute` — where the trials run: this process, a local pool, Ray, any executor;
- :mod:`~gradwatch.doctor.verdicts` — a loss curve summarised, a trial judged against the baseline;
- :mod:`~gradwatch.doctor.table` — :class:`TrialResult` rows and the :class:`DoctorReport` table.

``gw.doctor`` is the function; ``from gradwatch.doctor import catalogue`` (or any
name above) reaches the package. (``import gradwatch.doctor.catalogue as c`` does
not: it looks the name up on ``gradwatch.doctor``, which is the function.)
"""

from gradwatch.doctor.catalogue import Remedy
from gradwatch.doctor.repair import doctor
from gradwatch.doctor.table import MAX_ROUNDS, DoctorReport, TrialResult
from gradwatch.doctor.trial_run import TrialRun, run_trial

__all__ = ["MAX_ROUNDS", "DoctorReport", "Remedy", "TrialResult", "TrialRun", "doctor", "run_trial"]
