"""What the runtime says about a study: a result, or why the model could not read it.

Kept apart from :mod:`inference.pipeline` so that the report builder
(:mod:`inference.report`) can take them without importing the pipeline, which
itself builds the report: one direction of imports, no cycle.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
from pydicom import Dataset

from triagenode.storage.reports import Outcome

LESION_TYPES: tuple[str, ...] = ("mass", "calcification")
"""The lesion kinds a mammography detector marks: a mass, and a cluster of microcalcifications."""


@dataclass(frozen=True)
class Lesion:
    """One lesion a detector marks on one image (a mammogram's view), with its certainty.

    ``box`` is (x0, y0, x1, y1) in the image's pixel coordinates as DICOM's
    SCOORD uses them: x along the row (column index), y down the column (row
    index), (0, 0) the top left corner of the top left pixel, so pixel (c, r)
    covers [c, c + 1) x [r, r + 1). The same numbers go into the report's
    SCOORD, ``queue show --json`` and the phantoms' ``lesions.csv``.
    """

    sop_instance_uid: str
    series_uid: str
    type: str
    """One of :data:`LESION_TYPES`."""
    box: tuple[float, float, float, float]
    certainty: float
    """The detector's probability that this is a lesion of ``type``, 0 to 1."""
    laterality: str = ""
    """Image Laterality of the image: "L", "R" (or "" when the image does not say)."""
    view: str = ""
    """View Position of the image: "CC", "MLO", ... (or "")."""

    @property
    def centre(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2

    def to_dict(self) -> dict[str, Any]:
        return {
            "sop_instance_uid": self.sop_instance_uid,
            "series_uid": self.series_uid,
            "type": self.type,
            "box": [round(value, 1) for value in self.box],
            "certainty": round(self.certainty, 6),
            "laterality": self.laterality,
            "view": self.view,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Lesion:
        x0, y0, x1, y1 = (float(value) for value in data["box"])
        return cls(str(data["sop_instance_uid"]), str(data.get("series_uid", "")), str(data["type"]),
                   (x0, y0, x1, y1), float(data["certainty"]), str(data.get("laterality", "")),
                   str(data.get("view", "")))


@dataclass(frozen=True)
class Segment:
    """One class a segmentation model outlined in a study: its volume, for the worklist and the report."""

    label: str
    """The class's name in the manifest ("lesion")."""
    volume_ml: float
    voxels: int
    certainty: float
    """The mean probability over the segment's voxels (0 when it is empty)."""

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "volume_ml": round(self.volume_ml, 3), "voxels": self.voxels,
                "certainty": round(self.certainty, 6)}


@dataclass
class SegmentationMask:
    """What a segmentation model outlined, on the reference series' grid: the DICOM SEG's content."""

    labels: np.ndarray
    """(slices, rows, columns) uint8: 0 background, i + 1 the manifest's class i; slices in the order of
    ``source_headers``."""
    probabilities: np.ndarray
    """(classes, slices, rows, columns) float32: each class's probability (a FRACTIONAL SEG may carry them)."""
    source_headers: list[Dataset]
    """The reference series' headers in slice order (ascending along the normal): the SEG's source images."""


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
    lesions: list[Lesion] = field(default_factory=list)
    """A detection model's marks at or above its threshold, most certain first (empty for a classifier).

    For a detector, ``probability`` is the highest certainty of any candidate (the study's
    suspicion), ``key_instance_uid`` the image of the most certain one and ``slices`` the
    number of images read."""
    skipped: list[str] = field(default_factory=list)
    """Images of the study the model did not read, each with its reason (For Processing, say)."""
    segments: list[Segment] = field(default_factory=list)
    """A segmentation model's classes with their volumes (empty for other models); ``probability`` is then
    the triage certainty and ``finding`` whether the lesion volume reaches the manifest's threshold."""
    mask: SegmentationMask | None = field(default=None, repr=False)
    """A segmentation model's mask, for its DICOM SEG; not part of the stored result."""

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in ("evidence", "lesions", "segments", "mask")}
        data["lesions"] = [lesion.to_dict() for lesion in self.lesions]
        data["segments"] = [segment.to_dict() for segment in self.segments]
        return data

    def to_outcome(self) -> Outcome:
        """What the queue records of it (everything but the evidence)."""
        values = {f.name: getattr(self, f.name) for f in fields(Outcome) if hasattr(self, f.name)}
        values["lesions"] = tuple(lesion.to_dict() for lesion in self.lesions)
        values["skipped"] = tuple(self.skipped)
        values["segments"] = tuple(segment.to_dict() for segment in self.segments)
        return Outcome(**values)


__all__ = ["LESION_TYPES", "Lesion", "NotApplicable", "Segment", "SegmentationMask", "StudyResult"]
