"""Real DICOM CT instances for the tests and benchmarks, written with pydicom.

Small matrices by default so that tests stay fast; the ingest benchmark asks
for 512x512. Patient attributes are filled with recognisable values so that
tests can check none of them reaches a log line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import Dataset
from pydicom.uid import generate_uid

from triagenode.inference.phantom import ct_image_header

PATIENT_NAME = "Testpatient^Hildegard"
PATIENT_ID = "PID-778899"
PATIENT_BIRTH_DATE = "19400229"
ACCESSION_NUMBER = "ACC-4455667"
PATIENT_IDENTIFIERS = (PATIENT_NAME, "Hildegard", PATIENT_ID, PATIENT_BIRTH_DATE, ACCESSION_NUMBER)
"""Strings that must never appear in the node's logs."""


@dataclass(frozen=True)
class Study:
    study_uid: str
    series: dict[str, list[Path]]
    """Series Instance UID -> files."""

    @property
    def files(self) -> list[Path]:
        return [path for paths in self.series.values() for path in paths]


def ct_slice(
    study_uid: str, series_uid: str, index: int, *, rows: int = 32, columns: int = 32, series_number: int = 1
) -> Dataset:
    """One CT Image Storage instance with a file meta, ready for ``save_as`` or a C-STORE.

    The CT header comes from the product's :func:`ct_image_header`, the one the
    phantoms use, so the tests exercise the same geometry and pixel module the
    node reads from phantoms; only the patient, the descriptions and the
    pixels are the tests' own.
    """
    ds = ct_image_header(
        sop_instance_uid=generate_uid(),
        study_uid=study_uid,
        series_uid=series_uid,
        frame_of_reference_uid=generate_uid(entropy_srcs=[study_uid]),
        series_number=series_number,
        instance_number=index + 1,
        position=[-160.0, -160.0, -float(index) * 2.5],
        pixel_spacing=[320.0 / rows, 320.0 / columns],
        slice_thickness=2.5,
        rows=rows,
        columns=columns,
    )
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = PATIENT_BIRTH_DATE
    ds.PatientSex = "F"
    ds.AccessionNumber = ACCESSION_NUMBER
    ds.StudyDate = "20261127"
    ds.StudyTime = "101500"
    ds.StudyID = "1"
    ds.StudyDescription = "CT THORAX"
    ds.SeriesDescription = f"AXIAL {series_number}"
    ds.Manufacturer = "Triage Node tests"
    rng = np.random.default_rng(index)
    ds.PixelData = rng.integers(0, 2000, size=(rows, columns), dtype=np.int16).tobytes()
    return ds


def write_study(
    directory: Path,
    *,
    series: int = 1,
    slices: int = 3,
    rows: int = 32,
    columns: int = 32,
    study_uid: str | None = None,
) -> Study:
    """Write a CT study to ``directory`` (one file per instance)."""
    study_uid = study_uid or generate_uid()
    directory.mkdir(parents=True, exist_ok=True)
    out: dict[str, list[Path]] = {}
    for number in range(1, series + 1):
        series_uid = generate_uid()
        out[series_uid] = []
        for index in range(slices):
            ds = ct_slice(study_uid, series_uid, index, rows=rows, columns=columns, series_number=number)
            path = directory / f"s{number:02d}_{index:04d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            out[series_uid].append(path)
    return Study(study_uid, out)
