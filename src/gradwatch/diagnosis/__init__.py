"""Diagnosis: stored records in, findings out (no model, no hooks)."""

from gradwatch.diagnosis.findings import Diagnosis, Finding
from gradwatch.diagnosis.remedies import REMEDIES
from gradwatch.diagnosis.rules import diagnose
from gradwatch.diagnosis.thresholds import Thresholds

__all__ = ["REMEDIES", "Diagnosis", "Finding", "Thresholds", "diagnose"]
