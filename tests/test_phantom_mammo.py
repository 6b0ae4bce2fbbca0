"""The screening-mammography phantom: valid DICOM, the views a workstation hangs by, and lesions where the CSV says.

The mammography detector trains and is evaluated on these studies, so what
``lesions.csv`` claims must hold in the pixels: every lesion on both views of
its breast, its box inside the image and the breast, a mass brighter than the
tissue around it, a cluster's specks brighter than anything near it. And a PACS
that validates what it stores must accept every view (dciodvfy).
"""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from test_phantom import dciodvfy, needs_dicom3tools

from triagenode.inference.outcomes import LESION_TYPES
from triagenode.inference.phantom import LABELS_FILE, read_labels
from triagenode.inference.phantom_mammo import (
    DIGITAL_MAMMOGRAPHY_FOR_PRESENTATION,
    FULL_FIELD_COLUMNS,
    FULL_FIELD_ROWS,
    FULL_FIELD_SPACING_MM,
    LESIONS_FILE,
    MAMMO_LESION_TYPES,
    MammoStudy,
    mammo_columns,
    mammo_pixel_spacing,
    read_lesions,
    write_mammo_phantoms,
    write_mammo_study,
)

ROWS = 256
EXPECTED_VIEWS = [
    (1, "L", "CC", ["A", "R"]),
    (2, "L", "MLO", ["A", "FR"]),
    (3, "R", "CC", ["P", "L"]),
    (4, "R", "MLO", ["P", "FL"]),
]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[MammoStudy]]:
    """Eight small studies, six of them positive: enough lesions of both kinds to check the boxes."""
    out = tmp_path_factory.mktemp("mammo")
    return out, write_mammo_phantoms(out, 8, positive_fraction=0.75, seed=11, rows=ROWS)


def _views(study: MammoStudy) -> dict[str, tuple[Dataset, np.ndarray]]:
    """SOP Instance UID -> (header, pixels) of a study's four images."""
    assert study.directory is not None
    out = {}
    for path in sorted(study.directory.glob("*.dcm")):
        ds = dcmread(path)
        out[str(ds.SOPInstanceUID)] = (ds, ds.pixel_array)
    return out


@needs_dicom3tools
def test_every_view_passes_dciodvfy(phantoms: tuple[Path, list[MammoStudy]]) -> None:
    _, studies = phantoms
    study = next(s for s in studies if s.label == 1)
    assert study.directory is not None
    paths = sorted(study.directory.glob("*.dcm"))
    assert len(paths) == 4
    for path in paths:
        errors, warnings = dciodvfy(path)
        assert errors == [], f"{path.name}:\n" + "\n".join(errors)
        # View Position CC/MLO is what mammography images carry, though not among DX's defined terms.
        assert all("View Position" in line for line in warnings), f"{path.name}:\n" + "\n".join(warnings)


def test_the_four_views_are_12_bit_mammograms_with_their_laterality_and_orientation(
    phantoms: tuple[Path, list[MammoStudy]],
) -> None:
    _, studies = phantoms
    for study in studies[:2]:
        views = sorted(_views(study).values(), key=lambda view: int(view[0].InstanceNumber))
        assert [
            (int(ds.InstanceNumber), ds.ImageLaterality, ds.ViewPosition, list(ds.PatientOrientation))
            for ds, _ in views
        ] == EXPECTED_VIEWS
        assert len({ds.SeriesInstanceUID for ds, _ in views}) == 1
        for ds, pixels in views:
            assert ds.SOPClassUID == DIGITAL_MAMMOGRAPHY_FOR_PRESENTATION and ds.Modality == "MG"
            assert ds.StudyInstanceUID == study.study_uid and ds.PatientSex == "F"
            assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (16, 12, 11, 0)
            assert ds.PhotometricInterpretation == "MONOCHROME2" and ds.PresentationIntentType == "FOR PRESENTATION"
            assert (ds.Rows, ds.Columns) == pixels.shape == (ROWS, mammo_columns(ROWS))
            assert pixels.dtype == np.uint16 and 0 <= pixels.min() and pixels.max() <= 4095
            code = ds.ViewCodeSequence[0]
            assert (code.CodeValue, code.CodingSchemeDesignator) == (
                {"CC": "399162004", "MLO": "399368009"}[ds.ViewPosition], "SCT")
            # The chest wall (tissue, bright) is where Patient Orientation puts the posterior: column 0 on the
            # left breast's images, the last column on the right's; the far side is air.
            chest_wall, far_side = pixels[:, :8].mean(), pixels[:, -8:].mean()
            if ds.ImageLaterality == "R":
                chest_wall, far_side = far_side, chest_wall
            assert chest_wall > 500 > far_side


def test_a_seed_writes_identical_bytes_and_another_seed_does_not(tmp_path: Path) -> None:
    def write(name: str, seed: int) -> dict[str, bytes]:
        out = tmp_path / name
        write_mammo_phantoms(out, 2, positive_fraction=0.5, seed=seed, rows=128)
        return {str(path.relative_to(out)): path.read_bytes() for path in sorted(out.rglob("*")) if path.is_file()}

    first, again, other = write("a", 5), write("b", 5), write("c", 6)
    assert len(first) == 2 * 4 + 2 and first == again
    assert first.keys() == other.keys()
    assert all(first[name] != other[name] for name in first)


def test_every_lesion_shows_on_both_views_of_its_breast_inside_the_image_and_the_breast(
    phantoms: tuple[Path, list[MammoStudy]],
) -> None:
    _, studies = phantoms
    kinds = set()
    spacing = mammo_pixel_spacing(ROWS)
    for study in studies:
        assert study.label == int(bool(study.lesions))
        if not study.lesions:
            continue
        views = _views(study)
        numbers = sorted({lesion.lesion for lesion in study.lesions})
        assert 1 <= len(numbers) <= 3 and numbers == list(range(1, len(numbers) + 1))
        for number in numbers:
            rows = [lesion for lesion in study.lesions if lesion.lesion == number]
            headers = [views[lesion.sop_instance_uid][0] for lesion in rows]
            assert sorted(ds.ViewPosition for ds in headers) == ["CC", "MLO"]
            assert len({ds.ImageLaterality for ds in headers}) == 1
            assert len({lesion.type for lesion in rows}) == 1
            # The same depth from the chest wall on both views: the box centres' columns agree.
            centres = [(lesion.box[0] + lesion.box[2]) / 2 for lesion in rows]
            widths = [lesion.box[2] - lesion.box[0] for lesion in rows]
            assert abs(centres[0] - centres[1]) <= 0.3 * max(widths) + 1
            for lesion in rows:
                kinds.add(lesion.type)
                ds, pixels = views[lesion.sop_instance_uid]
                x0, y0, x1, y1 = lesion.box
                assert all(value == round(value, 1) for value in lesion.box)
                assert 0 <= x0 < x1 <= pixels.shape[1] and 0 <= y0 < y1 <= pixels.shape[0]
                size_mm = max(x1 - x0, y1 - y0) * spacing
                if lesion.type == "mass":
                    assert 4.5 <= size_mm <= 42, lesion
                else:
                    assert 2 <= size_mm <= 20, lesion
                c0, r0, c1, r1 = math.floor(x0), math.floor(y0), math.ceil(x1), math.ceil(y1)
                inside = pixels[r0:r1, c0:c1].astype(np.float64)
                assert inside.min() > 300, f"{lesion} reaches out of the breast"
                band = max(2, round(0.3 * max(c1 - c0, r1 - r0)))
                around = pixels[max(r0 - band, 0):r1 + band, max(c0 - band, 0):c1 + band].astype(np.float64)
                ring = np.ones(around.shape, dtype=bool)
                ring[r0 - max(r0 - band, 0):r0 - max(r0 - band, 0) + (r1 - r0),
                     c0 - max(c0 - band, 0):c0 - max(c0 - band, 0) + (c1 - c0)] = False
                if lesion.type == "mass":
                    assert inside.mean() > around[ring].mean() + 50, lesion
                else:
                    assert inside.max() > around[ring].max() + 200, lesion
    assert kinds == {"mass", "calcification"}


def test_the_csvs_say_what_was_written_and_labels_csv_reads_as_labels(
    phantoms: tuple[Path, list[MammoStudy]],
) -> None:
    out, studies = phantoms
    with open(out / LABELS_FILE, newline="") as handle:
        assert next(csv.reader(handle)) == ["study_uid", "label"]
    labels = read_labels(out / LABELS_FILE)
    assert {uid: study.label for uid, study in labels.items()} == {s.study_uid: s.label for s in studies}
    assert all(not study.nodules for study in labels.values())
    with open(out / LESIONS_FILE, newline="") as handle:
        assert next(csv.reader(handle)) == ["study_uid", "lesion", "sop_instance_uid", "type", "x0", "y0", "x1", "y1"]
    lesions = read_lesions(out / LESIONS_FILE)
    assert lesions == {study.study_uid: study.lesions for study in studies if study.label}
    assert sum(study.label for study in studies) == 6


def test_read_lesions_refuses_a_malformed_row_with_the_file_and_row(tmp_path: Path) -> None:
    path = tmp_path / LESIONS_FILE
    good = "1.2.3,1,1.2.3.4,mass,10.0,20.0,30.5,40.5"
    bad_rows = (
        "1.2.3,1,1.2.3.4,tumour,10.0,20.0,30.5,40.5",  # an unknown type
        "1.2.3,0,1.2.3.4,mass,10.0,20.0,30.5,40.5",  # lesions count from 1
        "1.2.3,1,1.2.3.4,mass,30.0,20.0,10.0,40.5",  # x0 > x1
        "1.2.3,1,1.2.3.4,mass,10.0,20.0",  # a short row
        "1.2.3,x,1.2.3.4,mass,1,2,3,4",  # not a number
        ",1,1.2.3.4,mass,1,2,3,4",  # no study
    )
    for bad in bad_rows:
        path.write_text(f"study_uid,lesion,sop_instance_uid,type,x0,y0,x1,y1\n{good}\n{bad}\n")
        expected = rf"^{re.escape(str(path))}:3: expected study_uid,lesion,sop_instance_uid,type,x0,y0,x1,y1 "
        with pytest.raises(ValueError, match=expected):
            read_lesions(path)
    path.write_text(f"study_uid,lesion,sop_instance_uid,type,x0,y0,x1,y1\n{good}\n")
    (lesion,) = read_lesions(path)["1.2.3"]
    assert (lesion.lesion, lesion.type, lesion.box) == (1, "mass", (10.0, 20.0, 30.5, 40.5))


def test_the_lesion_types_are_the_detectors() -> None:
    assert MAMMO_LESION_TYPES == LESION_TYPES


def test_smaller_matrices_keep_the_detector_aspect_and_grow_the_pixels() -> None:
    assert (mammo_columns(FULL_FIELD_ROWS), mammo_pixel_spacing(FULL_FIELD_ROWS)) == (2560, 0.07)
    assert (mammo_columns(512), mammo_pixel_spacing(512)) == (394, 0.455)
    for rows in (128, 256, 384, 1000, 2048):
        columns = mammo_columns(rows)
        assert columns % 2 == 0 and abs(columns / rows - FULL_FIELD_COLUMNS / FULL_FIELD_ROWS) < 2 / rows
        assert abs(mammo_pixel_spacing(rows) * rows - FULL_FIELD_ROWS * FULL_FIELD_SPACING_MM) < 1e-3


def test_the_default_matrix_is_the_full_field_detector(tmp_path: Path) -> None:
    study = write_mammo_study(tmp_path, seed=0, index=0, positive=False)
    assert study.directory is not None
    path = sorted(study.directory.glob("*.dcm"))[0]
    ds = dcmread(path, stop_before_pixels=True)
    assert (ds.Rows, ds.Columns) == (FULL_FIELD_ROWS, FULL_FIELD_COLUMNS) == (3328, 2560)
    assert [float(value) for value in ds.ImagerPixelSpacing] == [FULL_FIELD_SPACING_MM] * 2 == [0.07, 0.07]
    assert [float(value) for value in ds.PixelSpacing] == [0.07, 0.07]
    assert path.stat().st_size > 3328 * 2560 * 2


def test_a_512_row_matrix(tmp_path: Path) -> None:
    study = write_mammo_study(tmp_path, seed=0, index=1, positive=True, rows=512)
    assert study.directory is not None
    ds = dcmread(sorted(study.directory.glob("*.dcm"))[0], stop_before_pixels=True)
    assert (ds.Rows, ds.Columns) == (512, 394)
    assert [float(value) for value in ds.ImagerPixelSpacing] == [0.455, 0.455]
