"""The phantoms are the project's test and demo data: every object they hold must be valid DICOM.

A site tries the node with ``triagenode phantom`` before it sends a patient, and
a PACS that validates what it stores (or a viewer that is strict) would refuse
an invalid object; so dicom3tools' ``dciodvfy`` checks one instance of each
kind of object the phantom command writes (today: CT slices) against its IOD.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from pydicom import dcmread

from nodes import TRIAGENODE

needs_dicom3tools = pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools not installed")


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """(errors, warnings) that dciodvfy reports for one file."""
    checked = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    lines = (checked.stdout + checked.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")], [line for line in lines if line.startswith("Warning")]


@needs_dicom3tools
@pytest.mark.parametrize("matrix", [64, 96])  # 96: a pixel size whose decimals do not end (350/96 mm)
def test_every_kind_of_phantom_object_passes_dciodvfy(tmp_path: Path, matrix: int) -> None:
    out = tmp_path / "phantoms"
    written = subprocess.run(
        [TRIAGENODE, "phantom", str(out), "--studies", "2", "--positive-fraction", "0.5", "--seed", "3",
         "--slices", "16", "--matrix", str(matrix)],
        capture_output=True, text=True, timeout=120,
    )
    assert written.returncode == 0, written.stderr
    kinds: dict[tuple[str, str], Path] = {}
    for path in sorted(out.rglob("*.dcm")):
        ds = dcmread(path, stop_before_pixels=True)
        kinds.setdefault((str(ds.Modality), str(ds.SOPClassUID)), path)
    assert kinds, "the phantom command wrote no DICOM files"
    assert ("CT", "1.2.840.10008.5.1.4.1.1.2") in kinds
    for (modality, sop_class), path in kinds.items():
        errors, warnings = dciodvfy(path)
        assert errors == [], f"{modality} ({sop_class}) {path.name}:\n" + "\n".join(errors)
        assert warnings == [], f"{modality} ({sop_class}) {path.name}:\n" + "\n".join(warnings)
