"""The brain MRI phantom: valid DICOM, three co-registered contrasts that order the tissues as their sequences do,
and a ground-truth SEG that says what labels.csv says.

The lesion-segmentation model trains and is evaluated on these studies, so the
truth must hold in the pixels (a lesion bright on FLAIR where the SEG marks
it), the SEG must read back on the FLAIR grid, and a PACS that validates what
it stores must accept every object (dciodvfy).
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from test_phantom import dciodvfy, needs_dicom3tools

from triagenode.inference.phantom import LABELS_FILE
from triagenode.inference.phantom_brain import (
    CONTRASTS,
    CSF,
    LESION_CLASSES,
    MR_IMAGE_STORAGE,
    WHITE,
    BrainStudy,
    brain_volume,
    read_brain_labels,
    truth_mask,
    write_brain_phantoms,
    write_brain_study,
)

SEED = 7
SLICES = 20
MATRIX = 128


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[BrainStudy]]:
    """Six small studies, four of them positive (both kinds of lesion among them at this seed)."""
    out = tmp_path_factory.mktemp("brain")
    return out, write_brain_phantoms(out, 6, positive_fraction=4 / 6, seed=SEED, slices=SLICES, matrix=MATRIX)


def _index(study: BrainStudy) -> int:
    assert study.directory is not None
    return int(study.directory.name.removeprefix("study_"))


def _series(study: BrainStudy, contrast: str) -> list[Dataset]:
    assert study.directory is not None
    return [dcmread(path) for path in sorted((study.directory / contrast).glob("*.dcm"))]


def _pixels(study: BrainStudy, contrast: str) -> np.ndarray:
    return np.stack([ds.pixel_array for ds in _series(study, contrast)]).astype(np.float64)


@needs_dicom3tools
def test_every_series_and_the_seg_pass_dciodvfy(phantoms: tuple[Path, list[BrainStudy]]) -> None:
    _, studies = phantoms
    paths: list[Path] = []
    for study in (next(s for s in studies if s.label), next(s for s in studies if not s.label)):
        assert study.directory is not None and study.seg_path is not None
        for contrast in CONTRASTS:
            series = sorted((study.directory / contrast).glob("*.dcm"))
            paths += [series[0], series[-1]]
        paths.append(study.seg_path)
    for path in paths:
        errors, warnings = dciodvfy(path)
        assert errors == [], f"{path}:\n" + "\n".join(errors)
        assert warnings == [], f"{path}:\n" + "\n".join(warnings)


def test_three_co_registered_mr_series_with_their_sequences_and_geometry(
    phantoms: tuple[Path, list[BrainStudy]],
) -> None:
    _, studies = phantoms
    study = studies[0]
    geometry = set()
    for contrast in CONTRASTS:
        series = _series(study, contrast)
        assert len(series) == SLICES
        assert {ds.SeriesInstanceUID for ds in series} == {study.series_uids[contrast]}
        first = series[0]
        assert first.SOPClassUID == MR_IMAGE_STORAGE and first.Modality == "MR"
        assert first.StudyInstanceUID == study.study_uid and first.BodyPartExamined == "BRAIN"
        assert first.SeriesDescription == f"{contrast} AX" and first.MRAcquisitionType == "2D"
        assert (first.Rows, first.Columns, first.BitsAllocated, first.PixelRepresentation) == (MATRIX, MATRIX, 16, 0)
        assert first.PhotometricInterpretation == "MONOCHROME2"
        assert [float(v) for v in first.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert float(first.PixelSpacing[0]) == pytest.approx(230 / MATRIX, abs=1e-6)
        assert float(first.SliceThickness) == float(first.SpacingBetweenSlices) == 5.0
        z = [float(ds.ImagePositionPatient[2]) for ds in series]
        assert np.allclose(np.diff(z), 5.0) and [int(ds.InstanceNumber) for ds in series] == list(
            range(1, SLICES + 1))
        geometry.add((first.FrameOfReferenceUID, tuple(float(v) for v in first.ImagePositionPatient), tuple(z)))
        assert ("InversionTime" in first) == (contrast == "FLAIR")
        if contrast == "FLAIR":
            assert list(first.ScanningSequence) == ["SE", "IR"] and float(first.InversionTime) > 2000
        elif contrast == "T1":
            assert float(first.RepetitionTime) < 1000 and float(first.EchoTime) < 20
        else:
            assert float(first.RepetitionTime) > 2000 and float(first.EchoTime) > 80
    assert len(geometry) == 1, "the three series share one grid and one frame of reference"
    assert len(set(study.series_uids.values())) == 3


def test_each_contrast_orders_fluid_and_white_matter_as_its_sequence_does(
    phantoms: tuple[Path, list[BrainStudy]],
) -> None:
    _, studies = phantoms
    study = studies[0]
    labels = brain_volume(SEED, _index(study), bool(study.label), SLICES, MATRIX).labels
    mean = {contrast: _pixels(study, contrast) for contrast in CONTRASTS}
    csf = {contrast: pixels[labels == CSF].mean() for contrast, pixels in mean.items()}
    white = {contrast: pixels[labels == WHITE].mean() for contrast, pixels in mean.items()}
    assert white["T1"] > 2 * csf["T1"]
    assert csf["T2"] > 2 * white["T2"]
    assert white["FLAIR"] > 3 * csf["FLAIR"]
    # Rician noise: outside the head the signal is a noise floor, not zero and not negative.
    air = mean["T2"][labels == 0]
    assert 10 < air.mean() < 120


def test_a_lesion_is_bright_on_flair_against_white_matter(phantoms: tuple[Path, list[BrainStudy]]) -> None:
    _, studies = phantoms
    kinds = set()
    for study in studies:
        if not study.label:
            continue
        assert study.seg_path is not None
        volume = brain_volume(SEED, _index(study), True, SLICES, MATRIX)
        kinds.add(volume.kind)
        flair = _pixels(study, "FLAIR")
        mask = truth_mask(study.seg_path)
        assert np.array_equal(mask, volume.mask)
        assert flair[mask].mean() > 1.6 * flair[volume.labels == WHITE].mean(), study
    assert kinds == {"tumour", "wmh"}


def test_the_seg_reads_back_with_the_volume_labels_csv_says(phantoms: tuple[Path, list[BrainStudy]]) -> None:
    out, studies = phantoms
    with open(out / LABELS_FILE, newline="") as handle:
        assert next(csv.reader(handle)) == ["study_uid", "label", "lesion_volume_ml"]
    labels = read_brain_labels(out / LABELS_FILE)
    assert labels == {study.study_uid: (study.label, study.lesion_volume_ml) for study in studies}
    assert sum(study.label for study in studies) == 4
    for study in studies:
        assert study.seg_path is not None and study.seg_path.parent.name == "truth"
        seg = dcmread(study.seg_path)
        assert seg.StudyInstanceUID == study.study_uid
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == study.series_uids["FLAIR"]
        flair = _series(study, "FLAIR")
        assert {item.ReferencedSOPInstanceUID for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
                } == {ds.SOPInstanceUID for ds in flair}
        assert seg.FrameOfReferenceUID == flair[0].FrameOfReferenceUID
        assert [item.SegmentLabel for item in seg.SegmentSequence] == list(LESION_CLASSES)
        assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "52988006"
        mask = truth_mask(study.seg_path)
        assert mask.shape == (SLICES, MATRIX, MATRIX) and mask.dtype == bool
        spacing = float(flair[0].PixelSpacing[0])
        volume_ml = mask.sum() * spacing * spacing * float(flair[0].SpacingBetweenSlices) / 1000
        assert labels[study.study_uid] == (study.label, pytest.approx(volume_ml, abs=1e-3))
        assert (volume_ml > 0) == bool(study.label)


def test_a_seed_writes_identical_bytes_and_another_seed_does_not(tmp_path: Path) -> None:
    def write(name: str, seed: int) -> dict[str, bytes]:
        out = tmp_path / name
        write_brain_study(out, seed, 0, positive=True, slices=16, matrix=64)
        return {str(path.relative_to(out)): path.read_bytes() for path in sorted(out.rglob("*")) if path.is_file()}

    first, again, other = write("a", 5), write("b", 5), write("c", 6)
    assert len(first) == 3 * 16 + 1 and first == again
    assert first.keys() == other.keys()
    assert all(first[name] != other[name] for name in first)


def test_read_brain_labels_refuses_a_malformed_row_with_the_file_and_row(tmp_path: Path) -> None:
    path = tmp_path / LABELS_FILE
    good = "1.2.3,1,12.5"
    bad_rows = (
        "1.2.4,2,3.0",  # label 2
        "1.2.4,1,0.0",  # a positive without a lesion
        "1.2.4,0,3.0",  # a negative with one
        "1.2.4,1,-1",  # a negative volume
        "1.2.4,1,nan",  # not a volume
        "1.2.4,x,1.0",  # not a label
        "1.2.4,1",  # a short row
        ",1,1.0",  # no study
    )
    for bad in bad_rows:
        path.write_text(f"study_uid,label,lesion_volume_ml\n{good}\n{bad}\n")
        expected = rf"^{re.escape(str(path))}:3: expected study_uid,label,lesion_volume_ml "
        with pytest.raises(ValueError, match=expected):
            read_brain_labels(path)
    path.write_text(f"study_uid,label,lesion_volume_ml\n{good}\n1.2.4,0,0.000\n")
    assert read_brain_labels(path) == {"1.2.3": (1, 12.5), "1.2.4": (0, 0.0)}
