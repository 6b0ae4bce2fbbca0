"""A lesion segmenter's documents: the DICOM SEG of the mask and the TID 1500 SR that measures it.

Built from the brain phantom (its FLAIR headers and its ground-truth mask as the model's result), checked by
dicom3tools' dciodvfy and DCMTK's dsrdump, and read back with highdicom.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import Comprehensive3DSRStorage

from triagenode.config.settings import InferenceSettings
from triagenode.inference.input_spec import InputSpec
from triagenode.inference.model_package import LESION, Manifest, SegmentationSpec
from triagenode.inference.outcomes import Segment, SegmentationMask, StudyResult
from triagenode.inference.phantom_brain import truth_mask, write_brain_study
from triagenode.inference.report import DocumentOptions, Predecessor, report_series_uid, reports_for
from triagenode.inference.segmentation_report import (
    SEG_SERIES_NUMBER,
    SEGMENTATION_STORAGE,
    build_segmentation,
    build_volumetric_report,
)

needs_dicom3tools = pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools not installed")
needs_dcmtk = pytest.mark.skipif(shutil.which("dsrdump") is None, reason="DCMTK not installed")

NODE = "TRIAGENODE"
NOW = datetime(2031, 5, 6, 7, 8, 9)
MANIFEST = Manifest(
    name="triagenode-test-brain",
    version="1.0.0",
    architecture="test",
    task="segmentation",
    input=InputSpec(modality="MR"),
    finding=LESION,
    segmentation=SegmentationSpec(),
)


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Dataset], np.ndarray, str]:
    """A positive phantom: its FLAIR headers in slice order, its truth mask, its study UID."""
    written = write_brain_study(tmp_path_factory.mktemp("brain"), 5, 0, positive=True, slices=16, matrix=64)
    assert written.directory is not None and written.seg_path is not None
    return flair_headers(written.directory / "FLAIR"), truth_mask(written.seg_path), written.study_uid


def flair_headers(folder: Path) -> list[Dataset]:
    """The FLAIR headers ascending along the normal (the order the segmenter's mask has)."""
    headers = [dcmread(path, stop_before_pixels=True) for path in sorted(folder.glob("*.dcm"))]
    orientation = np.array(headers[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(orientation[:3], orientation[3:])
    return sorted(headers, key=lambda ds: float(np.dot(normal, np.array(ds.ImagePositionPatient, dtype=float))))


def result_of(headers: list[Dataset], mask: np.ndarray, study_uid: str, probability: float = 0.97) -> StudyResult:
    """What the segmenter hands the reports: the mask as its labels, its volume as the segment's."""
    labels = mask.astype(np.uint8)
    voxels = int(labels.sum())
    spacing = [float(v) for v in headers[0].PixelSpacing]
    voxel_ml = spacing[0] * spacing[1] * float(headers[0].SliceThickness) / 1000.0
    volume = voxels * voxel_ml
    key = headers[int(np.argmax(labels.sum(axis=(1, 2))))]
    return StudyResult(
        study_uid=study_uid,
        series_uid=str(headers[0].SeriesInstanceUID),
        finding=volume >= 1.0,
        probability=probability if voxels else 0.12,
        threshold=0.5,
        model=MANIFEST.name,
        model_version=MANIFEST.version,
        key_instance_uid=str(key.SOPInstanceUID),
        slices=len(headers),
        evidence=headers,
        segments=[Segment("lesion", volume, voxels, 0.9 if voxels else 0.0)],
        mask=SegmentationMask(labels, labels[None].astype(np.float32), headers),
    )


def options(**more: Any) -> DocumentOptions:
    return DocumentOptions(node_ae_title=NODE, now=NOW, **more)


def documents(result: StudyResult, **more: Any) -> tuple[Dataset, Dataset]:
    seg = build_segmentation(result, MANIFEST, options(**more))
    return seg, build_volumetric_report(result, MANIFEST, seg, options(**more))


def saved(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    checked = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    lines = (checked.stdout + checked.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")], [line for line in lines if line.startswith("Warning")]


def items(content: Any) -> list[Dataset]:
    found = []
    for item in content or []:
        found.append(item)
        found += items(item.get("ContentSequence"))
    return found


def named(content: Any, code_value: str) -> list[Dataset]:
    return [i for i in items(content) if "ConceptNameCodeSequence" in i and i.ConceptNameCodeSequence[0].CodeValue
            == code_value]


def groups(sr: Dataset) -> list[Dataset]:
    """The measurement groups of the TID 1500, the study's first."""
    return named(sr.ContentSequence, "125007")


def negative(study: tuple[list[Dataset], np.ndarray, str]) -> StudyResult:
    headers, mask, study_uid = study
    return result_of(headers, np.zeros_like(mask), study_uid)


@needs_dicom3tools
@pytest.mark.parametrize("positive", [True, False], ids=["lesion", "empty-mask"])
def test_both_documents_pass_dciodvfy(tmp_path: Path, study: Any, positive: bool) -> None:
    result = result_of(*study) if positive else negative(study)
    seg, sr = documents(result)
    for name, document in (("seg.dcm", seg), ("sr.dcm", sr)):
        errors, warnings = dciodvfy(saved(document, tmp_path / name))
        assert errors == [], (name, errors)
        assert warnings == [], (name, warnings)


def test_highdicom_reads_the_seg_back_to_the_same_mask(tmp_path: Path, study: Any) -> None:
    headers, mask, study_uid = study
    assert mask.any()
    seg = hd.seg.segread(saved(build_segmentation(result_of(*study), MANIFEST, options()), tmp_path / "seg.dcm"))
    assert seg.SOPClassUID == SEGMENTATION_STORAGE
    assert seg.SegmentationType == "BINARY"
    assert int(seg.NumberOfFrames) == len(headers), "every slice kept, the empty ones too"
    assert int(seg.SeriesNumber) == SEG_SERIES_NUMBER
    assert seg.SeriesDescription == "AI segmentation: lesion (not for diagnosis)"
    assert seg.SeriesInstanceUID == report_series_uid(study_uid, MANIFEST.name, MANIFEST.version, kind="seg")
    assert seg.StudyInstanceUID == study_uid
    description = seg.get_segment_description(1)
    assert description.segmented_property_category.value == "49755003"
    assert description.segmented_property_type.value == "52988006"
    assert description.algorithm_type == hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
    assert description.algorithm_identification[0].AlgorithmName == MANIFEST.name
    back = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[str(ds.SOPInstanceUID) for ds in headers], segment_numbers=[1]
    )
    assert back.shape == (*mask.shape, 1)
    np.testing.assert_array_equal(back[..., 0] > 0, mask)


def test_the_sr_measures_the_segs_segment_in_ml(study: Any) -> None:
    result = result_of(*study)
    seg, sr = documents(result)
    assert sr.SOPClassUID == Comprehensive3DSRStorage
    assert int(sr.SeriesNumber) == 9901
    assert sr.SeriesInstanceUID == report_series_uid(result.study_uid, MANIFEST.name, MANIFEST.version)
    study_group, volumetric = groups(sr)
    assert named(study_group.ContentSequence, "52988006")[0].ConceptCodeSequence[0].CodeValue == "52101004"  # Present
    assert named(study_group.ContentSequence, "363698007")[0].ConceptCodeSequence[0].CodeValue == "12738006"  # Brain
    certainty = named(study_group.ContentSequence, "111012")[0].MeasuredValueSequence[0]
    assert float(certainty.NumericValue) == pytest.approx(result.probability)
    threshold = named(study_group.ContentSequence, "122411")[0].MeasuredValueSequence[0]
    assert float(threshold.NumericValue) == 1.0
    assert threshold.MeasurementUnitsCodeSequence[0].CodeValue == "ml"
    comment = named(study_group.ContentSequence, "121106")[0].TextValue
    assert comment.startswith(f"Brain lesion: present, {round(result.segments[0].volume_ml, 3):g} ml outlined")
    assert "not for diagnosis" in comment
    segment = named(volumetric.ContentSequence, "121191")[0]  # Referenced Segment
    reference = segment.ReferencedSOPSequence[0]
    assert reference.ReferencedSOPInstanceUID == seg.SOPInstanceUID
    assert reference.ReferencedSOPClassUID == SEGMENTATION_STORAGE
    assert int(reference.ReferencedSegmentNumber) == 1
    volume = named(volumetric.ContentSequence, "118565006")[0].MeasuredValueSequence[0]
    assert float(volume.NumericValue) == pytest.approx(result.segments[0].volume_ml, rel=1e-6)
    assert volume.MeasurementUnitsCodeSequence[0].CodeValue == "ml"
    assert volume.MeasurementUnitsCodeSequence[0].CodingSchemeDesignator == "UCUM"
    assert named(volumetric.ContentSequence, "121071")[0].ConceptCodeSequence[0].CodeValue == "52988006"
    evidence = {ref.ReferencedSOPInstanceUID for study_item in sr.CurrentRequestedProcedureEvidenceSequence
                for series in study_item.ReferencedSeriesSequence for ref in series.ReferencedSOPSequence}
    assert evidence == {seg.SOPInstanceUID, *(str(ds.SOPInstanceUID) for ds in result.mask.source_headers)}
    content = hd.sr.Comprehensive3DSR.from_dataset(sr).content
    found = content.get_volumetric_roi_measurement_groups(referenced_sop_instance_uid=seg.SOPInstanceUID)
    assert len(found) == 1 and found[0].referenced_segment.referenced_segment_numbers == [1]


def test_the_same_result_gives_the_same_uids_and_another_mask_another(study: Any) -> None:
    headers, mask, study_uid = study
    seg, sr = documents(result_of(*study))
    again_seg, again_sr = documents(result_of(*study))
    assert (again_seg.SOPInstanceUID, again_sr.SOPInstanceUID) == (seg.SOPInstanceUID, sr.SOPInstanceUID)
    assert again_seg.DimensionOrganizationSequence[0].DimensionOrganizationUID == \
        seg.DimensionOrganizationSequence[0].DimensionOrganizationUID
    grown = mask.copy()
    assert not grown[0, 0, 0]
    grown[0, 0, 0] = True  # one voxel more
    other_seg, other_sr = documents(result_of(headers, grown, study_uid))
    assert other_seg.SOPInstanceUID != seg.SOPInstanceUID
    assert other_sr.SOPInstanceUID != sr.SOPInstanceUID
    assert documents(result_of(*study), route="brain")[0].SOPInstanceUID != seg.SOPInstanceUID


def test_no_element_of_the_seg_carries_the_time_it_was_built(study: Any) -> None:
    seg = build_segmentation(result_of(*study), MANIFEST, options())
    today = datetime.now().strftime("%Y%m%d")
    stamped = [element for ds in [seg, *items_of(seg)] for element in ds
               if element.VR in ("DA", "DT") and element.value and str(element.value).startswith(today)]
    assert stamped == []
    assert {str(seg.ContentDate), str(seg.SeriesDate), str(seg.InstanceCreationDate)} == {"20310506"}
    assert {str(seg.ContentTime), str(seg.SeriesTime), str(seg.InstanceCreationTime)} == {"070809"}


def items_of(ds: Dataset) -> list[Dataset]:
    """Every nested data set of ``ds``."""
    found = []
    for element in ds:
        if element.VR == "SQ":
            for item in element.value:
                found += [item, *items_of(item)]
    return found


def test_an_empty_mask_gives_valid_documents_saying_absent(tmp_path: Path, study: Any) -> None:
    result = negative(study)
    seg, sr = documents(result)
    back = hd.seg.segread(saved(seg, tmp_path / "seg.dcm"))
    assert int(back.NumberOfFrames) == len(result.mask.source_headers)
    assert not back.pixel_array.any()
    study_group, volumetric = groups(sr)
    assert named(study_group.ContentSequence, "52988006")[0].ConceptCodeSequence[0].CodeValue == "272519000"  # Absent
    assert named(study_group.ContentSequence, "121106")[0].TextValue.startswith("Brain lesion: absent, 0 ml outlined")
    assert float(named(volumetric.ContentSequence, "118565006")[0].MeasuredValueSequence[0].NumericValue) == 0.0


@needs_dcmtk
def test_dsrdump_reads_the_sr(tmp_path: Path, study: Any) -> None:
    _, sr = documents(result_of(*study))
    dumped = subprocess.run(["dsrdump", str(saved(sr, tmp_path / "sr.dcm"))], capture_output=True, text=True,
                            timeout=60)
    assert dumped.returncode == 0, dumped.stderr
    assert dumped.stderr.strip() == ""
    assert dumped.stdout.startswith("Comprehensive 3D SR")
    assert '<contains NUM:(,,"Volume")=' in dumped.stdout
    assert '<contains IMAGE:(,,"Referenced Segment")=(SG image,,1)>' in dumped.stdout


def test_reports_for_gives_the_seg_then_the_sr_each_replacing_its_own_class(study: Any) -> None:
    result = result_of(*study)
    inference = InferenceSettings()
    seg, sr = reports_for(result, MANIFEST, inference, NODE)
    assert seg.SOPClassUID == SEGMENTATION_STORAGE and sr.SOPClassUID == Comprehensive3DSRStorage
    assert named(sr.ContentSequence, "121191")[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == \
        seg.SOPInstanceUID
    earlier_seg = Predecessor(result.study_uid, "1.2.3", SEGMENTATION_STORAGE, "1.2.3.4")
    earlier_sr = Predecessor(result.study_uid, "1.2.3", Comprehensive3DSRStorage, "1.2.3.5")
    for first, more in ((earlier_seg, (earlier_sr,)), (earlier_sr, (earlier_seg,))):
        _, new_sr = reports_for(result, MANIFEST, inference, NODE, first, more_predecessors=more)
        replaced = [ref.ReferencedSOPInstanceUID for s in new_sr.PredecessorDocumentsSequence
                    for series in s.ReferencedSeriesSequence for ref in series.ReferencedSOPSequence]
        assert replaced == ["1.2.3.5"]
    only_seg = reports_for(result, MANIFEST, inference, NODE, earlier_seg)[1]
    assert "PredecessorDocumentsSequence" not in only_seg


def test_a_result_without_its_mask_is_refused(study: Any) -> None:
    with pytest.raises(ValueError, match="no mask"):
        build_segmentation(replace(result_of(*study), mask=None), MANIFEST, options())
