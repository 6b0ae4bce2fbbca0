"""One study through the model: pick the series, decode, preprocess, infer, aggregate.

This is what a worker runs for every queued study and what ``triagenode
infer`` runs on a folder, so both give the same number. Headers are read
once, to choose the series and lay its slices out; decoder processes
(:mod:`inference.loader`) decode and preprocess runs of slices while the
model works on the batches already in, under ``torch.inference_mode``
(bf16 autocast on CUDA, pinned memory and non-blocking copies). Every stage
is timed for the result.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError

from triagenode.inference.loader import DecodeTimings, SliceLoader
from triagenode.inference.model_package import ModelPackage
from triagenode.inference.preprocessing import InputSpec, SeriesGeometryError, layout_series
from triagenode.inference.studies import aggregate, batch_probabilities

_NON_IMAGE_MODALITIES = {"SR", "PR", "KO", "SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "REG", "DOC"}


@dataclass
class SeriesCandidate:
    """One series of a study as its headers describe it."""

    series_uid: str
    modality: str
    files: list[Path]
    slice_thickness: float | None
    localizer: bool
    has_pixels: bool
    headers: list[Dataset] = field(default_factory=list, repr=False)
    """Header of each file (no pixel data): the report's evidence, read once."""


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


def files_by_study(root: Path) -> dict[str, list[Path]]:
    """Every DICOM file under ``root`` (a file or a folder), grouped by Study Instance UID."""
    paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    studies: dict[str, list[Path]] = {}
    for path in paths:
        try:
            ds = dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID"])
        except (InvalidDicomError, OSError, ValueError):
            continue
        uid = str(ds.get("StudyInstanceUID", ""))
        if uid:
            studies.setdefault(uid, []).append(path)
    return studies


def describe_series(files: Sequence[Path]) -> list[SeriesCandidate]:
    """Group files into series from their headers (no pixel data read)."""
    series: dict[str, SeriesCandidate] = {}
    for path in files:
        try:
            ds = dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError):
            continue
        uid = str(ds.get("SeriesInstanceUID", ""))
        if not uid:
            continue
        if uid not in series:
            image_type = [str(v).upper() for v in ds.get("ImageType", [])]
            thickness = ds.get("SliceThickness")
            series[uid] = SeriesCandidate(
                series_uid=uid,
                modality=str(ds.get("Modality", "")),
                files=[],
                slice_thickness=float(thickness) if thickness not in (None, "") else None,
                localizer="LOCALIZER" in image_type,
                has_pixels="Rows" in ds and str(ds.get("Modality", "")) not in _NON_IMAGE_MODALITIES,
            )
        series[uid].files.append(path)
        series[uid].headers.append(ds)
    return list(series.values())


def select_series(
    study_uid: str, candidates: Sequence[SeriesCandidate], spec: InputSpec
) -> SeriesCandidate | NotApplicable:
    """The series the model reads: right modality, images only, no localisers, enough slices;
    then the thinnest slices, then the most instances. Otherwise why none fits."""
    reasons = []
    suitable = []
    for candidate in candidates:
        if candidate.modality != spec.modality:
            reasons.append(f"{candidate.modality or 'unknown'} series")
        elif not candidate.has_pixels:
            reasons.append("a series without images")
        elif candidate.localizer:
            reasons.append("a localiser")
        elif len(candidate.files) < spec.min_slices:
            count = len(candidate.files)
            reasons.append(f"a {spec.modality} series of {count} slice{'' if count == 1 else 's'} (needs {spec.min_slices})")
        else:
            suitable.append(candidate)
    if not suitable:
        found = ", ".join(sorted(set(reasons))) or "no readable series"
        return NotApplicable(study_uid, f"no {spec.modality} image series the model can read ({found})")
    return min(suitable, key=lambda s: (s.slice_thickness or float("inf"), -len(s.files)))


def run_study(
    package: ModelPackage,
    study_uid: str,
    files: Sequence[Path],
    device: torch.device | str = "cpu",
    batch_size: int = 32,
    loader: SliceLoader | None = None,
) -> StudyResult | NotApplicable:
    """Run the model on one study's files; raises SeriesGeometryError for a series that is not one volume.

    ``loader`` holds the worker's decoder processes; without one, slices are
    decoded by a thread of this process, ahead of the model.
    """
    manifest = package.manifest
    started = time.perf_counter()
    candidates = describe_series(files)
    chosen = select_series(study_uid, candidates, manifest.input)
    if isinstance(chosen, NotApplicable):
        chosen.evidence = [header for candidate in candidates for header in candidate.headers]
        return chosen
    layout = layout_series(chosen.headers)
    selected = time.perf_counter()
    device = torch.device(device)
    owned = loader is None
    loader = loader or SliceLoader(0)
    loading = DecodeTimings()
    ordered = [chosen.files[i] for i in layout.order]
    parts, model_s = [], 0.0
    package.network.eval()
    try:
        pin = device.type == "cuda"
        for batch in loader.batches(ordered, layout, manifest.input, batch_size, loading, pin_memory=pin):
            mark = time.perf_counter()
            parts.append(batch_probabilities(package.network, batch, device))
            model_s += time.perf_counter() - mark
    finally:
        if owned:
            loader.close()
    probabilities = torch.cat(parts).numpy()
    probability = aggregate(probabilities, manifest.aggregation)
    key = int(np.argmax(probabilities))
    timings = {
        "select": (selected - started) * 1000,
        "decode": loading.decode_ms,
        "preprocess": loading.preprocess_ms,
        "input_wait": loading.wait_ms,
        "model": model_s * 1000,
        "total": (time.perf_counter() - started) * 1000,
    }
    return StudyResult(
        study_uid=study_uid,
        series_uid=chosen.series_uid,
        finding=probability >= manifest.threshold,
        probability=round(probability, 6),
        threshold=manifest.threshold,
        model=manifest.name,
        model_version=manifest.version,
        key_instance_uid=layout.sop_instance_uids[key],
        slices=len(probabilities),
        timings_ms={k: round(v, 1) for k, v in timings.items()},
        evidence=chosen.headers,
    )


__all__ = ["NotApplicable", "SeriesGeometryError", "StudyResult", "run_study", "select_series"]
