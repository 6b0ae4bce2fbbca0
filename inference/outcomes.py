"""What the runtime says about a study: a result, or why the model could not read it.

Kept apart from :mod:`inference.pipeline` so that the report builder
(:mod:`inference.report`) can take them without importing the pipeline, which
itself builds the report: one direction of imports, no cycle.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from pydicom import Dataset

from triagenode.storage.reports import Outcome


@dataclass
class NotApplicable:
    """The study has nothing this model can read; the reason is shown and stored."""

    study_uid: str
    reason: str
    evidence: list[Dataset] = field(default_factory=list, repr=False)
    """Headers of every instance of the study, for a report that says so (when the site wants one)."""


@dataclass
class StudyResult:
    """What the model found in a study; stored in the queue and carried by the report."""

    study_uid: str
    series_uid: str
    finding: bool
    probability: float
    threshold: float
    model: str
    model_version: str
    key_instance_uid: str
    slices: int
    timings_ms: dict[str, float] = field(default_factory=dict)
    evidence: list[Dataset] = field(default_factory=list, repr=False)
    """Headers of the evaluated series (for the report); not part of the stored result."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "evidence"}

    def to_outcome(self) -> Outcome:
        """What the queue records of it (everything but the evidence)."""
        return Outcome(**{f.name: getattr(self, f.name) for f in fields(Outcome) if hasattr(self, f.name)})


__all__ = ["NotApplicable", "StudyResult"]
