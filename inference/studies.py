"""A study's series from their headers, the one series a model reads, and a model's per-slice scores.

One header walker (:func:`read_studies`) and one selection routine
(:func:`select_series`), whose rules are the model's own (its manifest's
:class:`InputSpec`: modality, SOP classes, excluded image types, the fewest
slices, the order of preference). The node's workers, ``triagenode infer``,
training and evaluation all go through both, so a model is trained and
validated on the very series the node later gives it for the same study.
Before, the lifecycle picked the series with the most instances while the
node picked the thinnest slices: on a study with a thin and a thick series the
model was validated on pixels it never saw in production.

Nothing here knows about labels: the model lifecycle (:mod:`inference.labelled`)
builds on this module, never the other way round.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from torch import nn

from triagenode.inference.input_spec import InputSpec
from triagenode.inference.outcomes import NotApplicable

NON_IMAGE_MODALITIES = frozenset({"SR", "PR", "KO", "SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "REG", "DOC"})

SELECTION_TAGS = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "SOPClassUID",
    "Modality",
    "ImageType",
    "SliceThickness",
    "Rows",
    "Columns",
    "PixelSpacing",
    "ImageOrientationPatient",
    "ImagePositionPatient",
    "ImageLaterality",
    "Laterality",
    "ViewPosition",
    "PresentationIntentType",
    "SeriesDescription",
    "EchoTime",
    "RepetitionTime",
    "InversionTime",
)
"""Every element selection (:func:`select_series`, a detection model's ``select_images``, a segmentation
model's ``select_contrasts``) and layout (``layout_series``) read.

Reading only these keeps the lifecycle's index of thousands of studies small;
the node reads whole headers because the report copies patient and study from
them. The choice and the layout are the same either way (a test holds it)."""


@dataclass
class SeriesCandidate:
    """One series of a study as its headers describe it."""

    study_uid: str
    series_uid: str
    modality: str
    files: list[Path]
    slice_thickness: float | None
    image_type: tuple[str, ...]
    sop_classes: frozenset[str]
    has_pixels: bool
    headers: list[Dataset] = field(default_factory=list, repr=False)
    """Header of each file (no pixel data), in the order of ``files``: layout and the report's evidence, read once."""

    @property
    def localizer(self) -> bool:
        return "LOCALIZER" in self.image_type


@dataclass
class StudyHeaders:
    """Every readable instance of one study, grouped by series, from one pass over the headers."""

    study_uid: str
    series: list[SeriesCandidate] = field(default_factory=list)
    read_ms: float = 0.0
    """Time spent reading this study's headers: part of the result's 'select' timing."""

    @property
    def headers(self) -> list[Dataset]:
        """Headers of every instance: the evidence of a "not applicable" report."""
        return [header for series in self.series for header in series.headers]


def dicom_files(root: Path) -> list[Path]:
    """``root`` itself when it is a file, else every file below it, in a stable order."""
    return [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())


def read_studies(paths: Iterable[Path], whole_headers: bool = True) -> dict[str, StudyHeaders]:
    """The header walker: files grouped by study, then series, headers only (no pixel data).

    Files that are not DICOM, or lack a Study or Series Instance UID, are
    skipped. ``whole_headers=False`` keeps only :data:`SELECTION_TAGS` (the
    lifecycle, which writes no report and may index thousands of studies).
    """
    tags = None if whole_headers else list(SELECTION_TAGS)
    studies: dict[str, StudyHeaders] = {}
    series: dict[tuple[str, str], SeriesCandidate] = {}
    for path in paths:
        started = time.perf_counter()
        try:
            ds = dcmread(path, stop_before_pixels=True, specific_tags=tags)
        except (InvalidDicomError, OSError, ValueError):
            continue
        study_uid, series_uid = str(ds.get("StudyInstanceUID", "")), str(ds.get("SeriesInstanceUID", ""))
        if not study_uid or not series_uid:
            continue
        study = studies.setdefault(study_uid, StudyHeaders(study_uid))
        candidate = series.get((study_uid, series_uid))
        if candidate is None:
            modality = str(ds.get("Modality", ""))
            thickness = ds.get("SliceThickness")
            candidate = SeriesCandidate(
                study_uid=study_uid,
                series_uid=series_uid,
                modality=modality,
                files=[],
                slice_thickness=float(thickness) if thickness not in (None, "") else None,
                image_type=tuple(str(v).upper() for v in _values(ds.get("ImageType"))),
                sop_classes=frozenset(),
                has_pixels="Rows" in ds and modality not in NON_IMAGE_MODALITIES,
            )
            series[(study_uid, series_uid)] = candidate
            study.series.append(candidate)
        candidate.files.append(path)
        candidate.headers.append(ds)
        candidate.sop_classes |= {str(ds.get("SOPClassUID", ""))}
        study.read_ms += (time.perf_counter() - started) * 1000
    return studies


def read_study(study_uid: str, files: Iterable[Path]) -> StudyHeaders:
    """One study's headers from its files (a worker's claimed study); files of other studies are left out."""
    return read_studies(files).get(study_uid) or StudyHeaders(study_uid)


def _values(value: object) -> list[object]:
    if value is None or value == "":
        return []
    return [value] if isinstance(value, str) else list(value)  # type: ignore[call-overload]


def select_series(study: StudyHeaders, spec: InputSpec) -> SeriesCandidate | NotApplicable:
    """The series the model reads, by the rules in its manifest; otherwise why none fits.

    Qualifies: the model's modality, images, an accepted SOP class, no excluded
    image type (localisers), at least ``min_slices`` instances. Among those,
    ``spec.series_preference`` decides (by default the thinnest slices, then the
    most instances), then the Series Instance UID, so that the same study gives
    the same series whatever order its files came in.
    """
    reasons = []
    suitable = []
    for candidate in study.series:
        excluded = [value for value in spec.excluded_image_types if value.upper() in candidate.image_type]
        if candidate.modality != spec.modality:
            reasons.append(f"{candidate.modality or 'unknown'} series")
        elif not candidate.has_pixels:
            reasons.append("a series without images")
        elif excluded:
            reasons.append("a localiser" if excluded[0].upper() == "LOCALIZER" else f"a {excluded[0]} series")
        elif spec.sop_classes and not candidate.sop_classes <= set(spec.sop_classes):
            other = sorted(candidate.sop_classes - set(spec.sop_classes))
            reasons.append(f"a {spec.modality} series of SOP class {other[0]}")
        elif len(candidate.files) < spec.min_slices:
            count = len(candidate.files)
            slices = f"{count} slice{'' if count == 1 else 's'}"
            reasons.append(f"a {spec.modality} series of {slices} (needs {spec.min_slices})")
        else:
            suitable.append(candidate)
    if not suitable:
        found = ", ".join(sorted(set(reasons))) or "no readable series"
        return NotApplicable(
            study.study_uid, f"no {spec.modality} image series the model can read ({found})", study.headers
        )
    return min(suitable, key=lambda s: (*(_rank(s, rule) for rule in spec.series_preference), s.series_uid))


def _rank(series: SeriesCandidate, rule: str) -> float:
    """Lower ranks first; a series without Slice Thickness comes last for either thickness rule."""
    thickness = series.slice_thickness
    if rule == "thinnest":
        return thickness if thickness is not None else float("inf")
    if rule == "thickest":
        return -thickness if thickness is not None else float("inf")
    if rule == "most_slices":
        return -len(series.files)
    if rule == "fewest_slices":
        return len(series.files)
    raise ValueError(f"unknown series preference {rule!r}")


@torch.inference_mode()
def slice_probabilities(
    network: nn.Module, inputs: torch.Tensor, batch_size: int = 64, device: torch.device | str = "cpu"
) -> np.ndarray:
    """Probability of the finding (class 1) for each slice of inputs already in memory (training's validation)."""
    network.eval()
    device = torch.device(device)
    out = [batch_probabilities(network, inputs[start : start + batch_size], device)
           for start in range(0, len(inputs), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)


@torch.inference_mode()
def batch_probabilities(network: nn.Module, batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """One forward pass: channels-last input, bf16 autocast on CUDA; the probabilities back on the CPU."""
    batch = batch.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits = network(batch)
    return torch.softmax(logits.float(), dim=1)[:, 1].cpu()


def aggregate(probabilities: np.ndarray, how: str = "max") -> float:
    """A study's probability from its slices'."""
    if len(probabilities) == 0:
        return 0.0
    if how == "max":
        return float(np.max(probabilities))
    if how == "mean":
        return float(np.mean(probabilities))
    raise ValueError(f"unknown aggregation {how!r}; use 'max' or 'mean'")


__all__ = [
    "SELECTION_TAGS",
    "SeriesCandidate",
    "StudyHeaders",
    "aggregate",
    "batch_probabilities",
    "dicom_files",
    "read_studies",
    "read_study",
    "select_series",
    "slice_probabilities",
]
