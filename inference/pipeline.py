"""One study through the model: pick the series, decode, preprocess, infer, aggregate, report.

One path for everyone who turns a study into a number. :func:`analyse_study`
(headers in, outcome and SR out) is what a worker runs for every queued study
and what ``triagenode infer`` runs on a folder, so both give the same number
and the same report. :func:`score_study` is its model part, which evaluation
runs on labelled studies, so the evaluated probability is the one the node
would report; training reads its inputs through :func:`series_inputs`, the
same decoders and preprocessing. Headers are read once
(:func:`inference.studies.read_studies`), to choose the series and lay its
slices out; decoder processes (:mod:`inference.loader`) decode and preprocess
runs of slices while the model works on the batches already in, under
``torch.inference_mode`` (bf16 autocast on CUDA, pinned memory and
non-blocking copies). Every stage is timed for the result.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from pydicom import Dataset

from triagenode.config.settings import InferenceSettings, MammoSr
from triagenode.inference.detection import detect_study
from triagenode.inference.input_spec import InputSpec
from triagenode.inference.loader import DecodeTimings, SliceLoader
from triagenode.inference.model_package import ModelPackage
from triagenode.inference.outcomes import NotApplicable, StudyResult
from triagenode.inference.preprocessing import SeriesGeometryError, SeriesLayout, layout_series
from triagenode.inference.report import Predecessor, reports_for
from triagenode.inference.segmentation import segment_study
from triagenode.inference.studies import (
    SeriesCandidate,
    StudyHeaders,
    aggregate,
    batch_probabilities,
    read_study,
    select_series,
)


@dataclass
class StudyAnalysis:
    """A study run through the model: the outcome, and the SR the site gets for it (None when it gets none)."""

    outcome: StudyResult | NotApplicable
    report: Dataset | None
    report_ms: float = 0.0
    """Time spent building the report (the worker adds it to the result's timings)."""
    more_reports: list[Dataset] = field(default_factory=list)
    """The site's other documents for the outcome, sent with ``report`` (a detector's Mammography CAD SR
    beside its TID 1500, with ``mammo_sr = "both"``)."""

    @property
    def reports(self) -> list[Dataset]:
        """Every document, the primary first."""
        return ([self.report] if self.report is not None else []) + self.more_reports


def analyse_study(
    package: ModelPackage,
    study: StudyHeaders,
    device: torch.device | str,
    batch_size: int,
    loader: SliceLoader | None,
    inference_settings: InferenceSettings,
    node_ae_title: str,
    predecessor: Predecessor | None = None,
    with_report: bool = True,
    route: str | None = None,
    mammo_sr: MammoSr | None = None,
    more_predecessors: Sequence[Predecessor] = (),
) -> StudyAnalysis:
    """Run study -> result -> SR: the one path of the node's workers and ``triagenode infer``.

    Raises :class:`SeriesGeometryError` for a chosen series that is not one
    volume. ``predecessor`` is the study's earlier report, which the new one
    replaces; ``with_report=False`` skips building the SR (``infer`` without
    ``--sr-out``), nothing else changes. ``route``: the ``[[models]]`` entry the
    report is for (None for the node's one model); ``mammo_sr``: the entry's detection report
    (None: ``[inference] mammo_sr``); ``more_predecessors``: the earlier report's other documents.
    """
    outcome = score_study(package, study, device, batch_size, loader)
    started = time.perf_counter()
    documents = (
        reports_for(outcome, package.manifest, inference_settings, node_ae_title, predecessor, route, mammo_sr,
                    more_predecessors)
        if with_report
        else []
    )
    elapsed = round((time.perf_counter() - started) * 1000, 1)
    return StudyAnalysis(outcome, documents[0] if documents else None, elapsed, documents[1:])


def score_study(
    package: ModelPackage,
    study: StudyHeaders,
    device: torch.device | str = "cpu",
    batch_size: int = 32,
    loader: SliceLoader | None = None,
) -> StudyResult | NotApplicable:
    """Select the series by the manifest's rules, decode, preprocess, infer, aggregate: the node's and evaluation's.

    A detection model (``task = "detection"``) reads the study image by image instead
    (:func:`inference.detection.detect_study`): its result carries the lesions it marks.

    ``loader`` holds the worker's decoder processes; without one, slices are
    decoded by a thread of this process, ahead of the model. Raises
    :class:`SeriesGeometryError` for a series that is not one volume. The
    time spent reading the study's headers counts in 'select' and 'total'.
    """
    if package.manifest.task == "detection":
        return detect_study(package, study, device, batch_size, loader)
    if package.manifest.task == "segmentation":
        return segment_study(package, study, device)
    started = time.perf_counter()
    series = select_series(study, package.manifest.input)
    if isinstance(series, NotApplicable):
        return series
    manifest = package.manifest
    layout, ordered = ordered_files(series)
    selected = time.perf_counter()
    device = torch.device(device)
    loading = DecodeTimings()
    parts, model_s = [], 0.0
    package.network.eval()
    with _loader(loader) as slices:
        pin = device.type == "cuda"
        for batch in slices.batches(ordered, layout, manifest.input, batch_size, loading, pin_memory=pin):
            mark = time.perf_counter()
            parts.append(batch_probabilities(package.network, batch, device))
            model_s += time.perf_counter() - mark
    probabilities = torch.cat(parts).numpy()
    probability = aggregate(probabilities, manifest.aggregation)
    key = int(np.argmax(probabilities))
    timings = {
        "select": (selected - started) * 1000 + study.read_ms,
        "decode": loading.decode_ms,
        "preprocess": loading.preprocess_ms,
        "input_wait": loading.wait_ms,
        "model": model_s * 1000,
        "total": (time.perf_counter() - started) * 1000 + study.read_ms,
    }
    return StudyResult(
        study_uid=series.study_uid,
        series_uid=series.series_uid,
        finding=probability >= manifest.threshold,
        probability=round(probability, 6),
        threshold=manifest.threshold,
        model=manifest.name,
        model_version=manifest.version,
        key_instance_uid=layout.sop_instance_uids[key],
        slices=len(probabilities),
        timings_ms={k: round(v, 1) for k, v in timings.items()},
        evidence=series.headers,
    )


def series_inputs(
    series: SeriesCandidate, spec: InputSpec, loader: SliceLoader | None = None, batch_size: int = 64
) -> tuple[SeriesLayout, torch.Tensor]:
    """A whole series as the model's input (slices, channels, matrix, matrix), with its layout.

    Training holds its studies in memory; it reads them through the node's
    decoders and preprocessing, so it trains on the numbers the node computes.
    """
    layout, ordered = ordered_files(series)
    with _loader(loader) as slices:
        batches = list(slices.batches(ordered, layout, spec, batch_size, DecodeTimings()))
    return layout, torch.cat(batches)


def ordered_files(series: SeriesCandidate) -> tuple[SeriesLayout, list[Path]]:
    """The series' layout from its headers and its files in slice order; raises SeriesGeometryError."""
    layout = layout_series(series.headers)
    return layout, [series.files[i] for i in layout.order]


@contextmanager
def _loader(loader: SliceLoader | None) -> Iterator[SliceLoader]:
    """The caller's loader as it is (a worker's, kept for its life), or a one-thread loader closed afterwards."""
    if loader is not None:
        yield loader
        return
    own = SliceLoader(0)
    try:
        yield own
    finally:
        own.close()


def run_study(
    package: ModelPackage,
    study_uid: str,
    files: Sequence[Path],
    device: torch.device | str = "cpu",
    batch_size: int = 32,
    loader: SliceLoader | None = None,
) -> StudyResult | NotApplicable:
    """:func:`score_study` on one study's files (headers read here): for callers that hold paths, not headers."""
    return score_study(package, read_study(study_uid, files), device, batch_size, loader)


__all__ = [
    "NotApplicable",
    "SeriesGeometryError",
    "StudyAnalysis",
    "StudyResult",
    "analyse_study",
    "ordered_files",
    "run_study",
    "score_study",
    "select_series",
    "series_inputs",
]
