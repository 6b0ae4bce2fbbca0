"""Labelled studies on disk for training and evaluation: part of the model lifecycle, not the runtime.

The labels file names studies, not folders, so the data folder is indexed by
the runtime's own header walker and each study's series is chosen by the
runtime's own :func:`~triagenode.inference.studies.select_series`, with the
model's rules: the lifecycle trains and validates on exactly the series the
node would read for the same study. Everything is checked before any pixel
is decoded, so a bad labels file fails in seconds, not after an hour.

It imports :mod:`inference.phantom` (the labels' types); the runtime never
imports this module (the import-linter contracts in ``pyproject.toml``).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from triagenode.inference.input_spec import InputSpec
from triagenode.inference.outcomes import NotApplicable
from triagenode.inference.phantom import Nodule, PhantomStudy
from triagenode.inference.studies import SeriesCandidate, StudyHeaders, dicom_files, read_studies, select_series


class LabelledDataError(ValueError):
    """Labelled data that training or evaluation cannot use; the text says what to fix."""


@dataclass
class LabelledSeries:
    """A labelled study, its headers, and the series the node would read from it."""

    truth: PhantomStudy
    study: StudyHeaders
    series: SeriesCandidate


def labelled_index(data_dir: Path, labels: Collection[str]) -> dict[str, StudyHeaders]:
    """The headers of every labelled study under ``data_dir``; refuses labels whose study is not there."""
    index = read_studies(dicom_files(data_dir), whole_headers=False)
    missing = [uid for uid in labels if uid not in index]
    if missing:
        raise LabelledDataError(
            f"{len(missing)} labelled studies are not under {data_dir}, e.g. {missing[0]}; "
            "check --data and --labels belong together"
        )
    return index


def labelled_series(data_dir: Path, labels: dict[str, PhantomStudy], spec: InputSpec) -> list[LabelledSeries]:
    """Each labelled study with the series the model reads, refusing missing studies and studies it cannot read."""
    index = labelled_index(data_dir, labels)
    out = []
    for uid, truth in labels.items():
        chosen = select_series(index[uid], spec)
        if isinstance(chosen, NotApplicable):
            raise LabelledDataError(f"study {uid}: {chosen.reason}")
        out.append(LabelledSeries(truth, index[uid], chosen))
    return out


def slice_labels(positions_mm: np.ndarray, nodules: list[Nodule]) -> np.ndarray:
    """1 for slices that pass through a nodule's central 80%, else 0 (slice positions along the normal)."""
    labels = np.zeros(len(positions_mm), dtype=np.int64)
    for nodule in nodules:
        labels[np.abs(positions_mm - nodule.z) <= 0.4 * nodule.diameter] = 1
    return labels


__all__ = ["LabelledDataError", "LabelledSeries", "labelled_index", "labelled_series", "slice_labels"]
