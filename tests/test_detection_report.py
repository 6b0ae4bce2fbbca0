"""A lesion detector's reports: the TID 1500 (one region per lesion) and the Mammography CAD SR (TID 4000).

Built from mammogram headers made here (Digital Mammography For Presentation, four views), checked by
dicom3tools' dciodvfy, DCMTK's dsrdump and dsr2html, and read back with highdicom.
"""

from __future__ import annotations

import html
import re
import shutil
import subprocess
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.data import get_charset_files
from pydicom.sr.codedict import codes
from pydicom.uid import Comprehensive3DSRStorage, ComprehensiveSRStorage, generate_uid

from triagenode.config.settings import InferenceSettings
from triagenode.inference.detection_report import build_detection_report
from triagenode.inference.input_spec import InputSpec
from triagenode.inference.mammo_cad_sr import MAMMOGRAPHY_CAD_SR, build_mammography_cad_sr
from triagenode.inference.model_package import (
    BREAST,
    DEMO_MODEL,
    LEFT_BREAST,
    LESION,
    RIGHT_BREAST,
    DetectionSpec,
    Manifest,
    read_manifest,
)
from triagenode.inference.outcomes import Lesion, NotApplicable, StudyResult
from triagenode.inference.report import (
    DocumentOptions,
    Predecessor,
    build_measurement_report,
    report_for,
    report_series_uid,
    reports_for,
)

from dicom_factory import ct_slice

needs_dicom3tools = pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools not installed")
needs_dcmtk = pytest.mark.skipif(shutil.which("dsrdump") is None, reason="DCMTK not installed")

NODE = "TRIAGENODE"
MANIFEST = Manifest(
    name="triagenode-test-mammo",
    version="1.0.0",
    architecture="test",
    task="detection",
    input=InputSpec(modality="MG"),
    finding=LESION,
    finding_site=BREAST,
    threshold=0.5,
    detection=DetectionSpec(),
)
DIGITAL_MAMMOGRAPHY = "1.2.840.10008.5.1.4.1.1.1.2"
VIEWS = {"CC": ("399162004", "cranio-caudal"), "MLO": ("399368009", "medio-lateral oblique")}
TEMPLATE_NOT_CHECKED = "W: Check for template constraints not yet supported"
"""DCMTK checks TID 1500's constraints but not TID 4000's, and says so; nothing else may be said."""


def mammograms(rows: int = 256, columns: int = 208, seed: str = "mg") -> list[Dataset]:
    """Headers of one screening study: L CC, L MLO, R CC, R MLO (no pixels: a report needs none)."""
    study_uid = str(generate_uid(entropy_srcs=[seed, "study"]))
    series_uid = str(generate_uid(entropy_srcs=[seed, "series"]))
    headers = []
    for number, (laterality, view) in enumerate([("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO")], start=1):
        ds = Dataset()
        ds.SOPClassUID = DIGITAL_MAMMOGRAPHY
        ds.SOPInstanceUID = str(generate_uid(entropy_srcs=[seed, str(number)]))
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.Modality = "MG"
        ds.PatientName, ds.PatientID = "Testpatient^Maria", "PID-42"
        ds.PatientBirthDate, ds.PatientSex = "19610101", "F"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20261127", "101500", "7", "ACC-42"
        ds.ReferringPhysicianName = ""
        ds.ContentDate, ds.ContentTime = "20261127", "101600"
        ds.SeriesNumber, ds.InstanceNumber = 1, number
        ds.ImageLaterality, ds.ViewPosition = laterality, view
        view_code = Dataset()
        view_code.CodeValue, view_code.CodingSchemeDesignator = VIEWS[view][0], "SCT"
        view_code.CodeMeaning = VIEWS[view][1]
        view_code.ViewModifierCodeSequence = []
        ds.ViewCodeSequence = [view_code]
        ds.PatientOrientation = ["A", "R"] if laterality == "L" else ["P", "L"]
        ds.Rows, ds.Columns = rows, columns
        ds.ImagerPixelSpacing = [0.35, 0.35]
        headers.append(ds)
    return headers


Box = tuple[float, float, float, float]


def lesions_on(headers: list[Dataset], box: Box = (30.0, 40.0, 90.5, 120.25)) -> list[Lesion]:
    """A mass on the L CC and a calcification cluster on the R MLO, most certain first."""
    return [
        Lesion(str(headers[0].SOPInstanceUID), str(headers[0].SeriesInstanceUID), "mass", box, 0.91, "L", "CC"),
        Lesion(str(headers[3].SOPInstanceUID), str(headers[3].SeriesInstanceUID), "calcification",
               (100.0, 60.0, 130.0, 84.0), 0.62, "R", "MLO"),
    ]


def result_of(headers: list[Dataset], lesions: list[Lesion] | None = None, probability: float | None = None,
              threshold: float = 0.5) -> StudyResult:
    """What the detector hands the report for ``headers``: the marks at or above the threshold."""
    lesions = lesions_on(headers) if lesions is None else lesions
    probability = max((lesion.certainty for lesion in lesions), default=0.31) if probability is None else probability
    key = lesions[0].sop_instance_uid if lesions else str(headers[0].SOPInstanceUID)
    return StudyResult(
        study_uid=str(headers[0].StudyInstanceUID), series_uid=str(headers[0].SeriesInstanceUID),
        finding=probability >= threshold, probability=probability, threshold=threshold, model=MANIFEST.name,
        model_version=MANIFEST.version, key_instance_uid=key, slices=len(headers), evidence=headers, lesions=lesions,
    )


def tid1500(result: StudyResult, manifest: Manifest = MANIFEST, **options: Any) -> Dataset:
    return build_detection_report(result, manifest, result.evidence, DocumentOptions(node_ae_title=NODE, **options))


def cad(result: StudyResult, manifest: Manifest = MANIFEST, **options: Any) -> Dataset:
    return build_mammography_cad_sr(result, manifest, result.evidence, DocumentOptions(node_ae_title=NODE, **options))


def saved(sr: Dataset, path: Path) -> Path:
    sr.save_as(path, enforce_file_format=True)
    return path


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """(errors, warnings) that dicom3tools' dciodvfy reports for one file."""
    checked = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    lines = (checked.stdout + checked.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")], [line for line in lines if line.startswith("Warning")]


def dsrdump(path: Path) -> str:
    """DCMTK's dump of the SR; it must read it with no error and no warning but the template one."""
    dumped = subprocess.run(["dsrdump", str(path)], capture_output=True, text=True, timeout=60)
    assert dumped.returncode == 0, dumped.stderr
    assert [line for line in dumped.stderr.splitlines() if line.strip() and line != TEMPLATE_NOT_CHECKED] == []
    return dumped.stdout


def rendered(path: Path) -> str:
    """What a reader sees of the SR in DCMTK's dsr2html: the page's text, whitespace collapsed."""
    page = subprocess.run(["dsr2html", str(path)], capture_output=True, text=True, timeout=60)
    assert page.returncode == 0 and "E:" not in page.stderr, page.stderr
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", page.stdout)).split())


def items(content: Any) -> list[Dataset]:
    """Every content item of a tree, depth first."""
    found = []
    for item in content or []:
        found.append(item)
        found += items(item.get("ContentSequence"))
    return found


def named(content: Any, code_value: str) -> list[Dataset]:
    return [i for i in items(content) if "ConceptNameCodeSequence" in i and i.ConceptNameCodeSequence[0].CodeValue
            == code_value]


@needs_dicom3tools
@needs_dcmtk
@pytest.mark.parametrize("marks", [2, 0], ids=["two-lesions", "no-lesion"])
def test_both_documents_pass_dciodvfy_and_dsrdump(tmp_path: Path, marks: int) -> None:
    headers = mammograms()
    result = result_of(headers, lesions_on(headers)[:marks])
    report = saved(tid1500(result), tmp_path / "tid1500.dcm")
    mammo = saved(cad(result), tmp_path / "cad.dcm")
    assert dciodvfy(report) == ([], [])
    assert dciodvfy(mammo) == ([], [])
    assert dsrdump(report).startswith("Comprehensive 3D SR")
    dumped = dsrdump(mammo)
    assert dumped.startswith("Mammography CAD SR Document")
    assert '<CONTAINER:(,,"Mammography CAD Report")=SEPARATE>' in dumped
    summary = '111242,DCM,"All algorithms succeeded; with findings"' if marks else \
        '111241,DCM,"All algorithms succeeded; without findings"'
    assert f'<contains CODE:(,,"CAD Processing and Findings Summary")=({summary})>' in dumped
    assert dumped.count('"Single Image Finding"') == marks
    assert dumped.count("<selected from 1.2.") == 2 * marks, "Center and Outline, each selected from its image"


@needs_dcmtk
def test_the_rendered_reports_name_each_lesion_its_view_and_certainty(tmp_path: Path) -> None:
    headers = mammograms()
    result = result_of(headers)
    report = rendered(saved(tid1500(result), tmp_path / "tid1500.dcm"))
    for expected in (
        "Comment: Breast lesion: present, 2 lesions marked (highest certainty 0.91, at or above the operating "
        "threshold 0.5; model triagenode-test-mammo 1.0.0; not for diagnosis)",
        "Lesion: Present (52101004, SCT)",
        "Finding Site = Breast (76752008, SCT)",
        "Threshold Value: 0.5 1",
        'Tracking Identifier = "lesion 1: mammographic breast mass, L CC"',
        "Finding: Mammographic breast mass (129788004, SCT)",
        "Finding Site = Left breast (80248007, SCT)",
        "Certainty of Finding: 0.91 1",
        'Tracking Identifier = "lesion 2: calcification cluster, R MLO"',
        "Finding: Calcification Cluster (129769006, SCT)",
        "Finding Site = Right breast (73056007, SCT)",
        "Certainty of Finding: 0.62 1",
        "Procedure reported = Mammography (71651007, SCT)",
    ):
        assert expected in report, f"{expected!r} not in the rendered TID 1500:\n{report}"
    mammo = rendered(saved(cad(result), tmp_path / "cad.dcm"))
    for expected in (
        "Impression Description: lesion 1: mammographic breast mass, L CC, certainty 0.91",
        "Single Image Finding: Mammography breast density (129793001, SCT)",
        "Certainty of Finding = 91.0 %",
        "Impression Description: lesion 2: calcification cluster, R MLO, certainty 0.62",
        "Single Image Finding: Calcification Cluster (129769006, SCT)",
        "Certainty of Finding = 62.0 %",
        "Image View = cranio-caudal (399162004, SCT)",
        "Image View = medio-lateral oblique (399368009, SCT)",
        "Image Laterality = Left breast (80248007, SCT)",
        "Rendering Intent = Presentation Required: Rendering device is expected to present (111150, DCM)",
        "Summary of Detections: Succeeded (111222, DCM)",
        "Summary of Analyses: Not Attempted (111225, DCM)",
        'Algorithm Name = "triagenode-test-mammo"',
    ):
        assert expected in mammo, f"{expected!r} not in the rendered Mammography CAD SR:\n{mammo}"


@pytest.mark.parametrize("sr_class", ["comprehensive3d", "comprehensive"])
def test_highdicom_reads_one_region_per_lesion_back_to_the_same_pixels(tmp_path: Path, sr_class: str) -> None:
    headers = mammograms()
    result = result_of(headers)
    stored = dcmread(saved(tid1500(result, sr_class=sr_class), tmp_path / "tid1500.dcm"))
    document = hd.sr.Comprehensive3DSR if sr_class == "comprehensive3d" else hd.sr.ComprehensiveSR
    assert stored.SOPClassUID == (Comprehensive3DSRStorage if sr_class == "comprehensive3d" else ComprehensiveSRStorage)
    content = document.from_dataset(stored).content

    [study] = content.get_image_measurement_groups()
    assert study.finding_type == codes.SCT.Lesion and study.finding_sites[0].value == codes.SCT.Breast
    assert study.get_qualitative_evaluations(name=codes.SCT.Lesion)[0].value == codes.SCT.Present
    assert study.get_measurements(name=codes.DCM.CertaintyOfFinding)[0].value == pytest.approx(0.91)
    assert study.get_measurements(name=codes.DCM.ThresholdValue)[0].value == pytest.approx(0.5)

    groups = content.get_planar_roi_measurement_groups()
    assert len(groups) == len(result.lesions) == 2
    sides = [LEFT_BREAST, RIGHT_BREAST]
    for number, (group, lesion, side) in enumerate(zip(groups, result.lesions, sides, strict=True), start=1):
        x0, y0, x1, y1 = lesion.box
        assert group.roi.GraphicType == "POLYLINE"
        np.testing.assert_array_equal(group.roi.value, [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]])
        [source] = group.roi.ContentSequence
        assert source.RelationshipType == "SELECTED FROM"
        assert source.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == lesion.sop_instance_uid
        assert source.ReferencedSOPSequence[0].ReferencedSOPClassUID == DIGITAL_MAMMOGRAPHY
        where = "mammographic breast mass, L CC" if number == 1 else "calcification cluster, R MLO"
        assert group.tracking_identifier == f"lesion {number}: {where}"
        assert group.finding_type.value == MANIFEST.detection.code_of(lesion.type).value  # type: ignore[union-attr]
        assert group.finding_sites[0].value.value == side.value
        certainty = group.get_measurements(name=codes.DCM.CertaintyOfFinding)[0]
        assert certainty.value == pytest.approx(lesion.certainty) and certainty.unit == codes.UCUM.NoUnits


def test_no_lesion_at_the_threshold_says_absent_in_both_documents() -> None:
    headers = mammograms()
    result = result_of(headers, [], probability=0.31)
    report = tid1500(result)
    content = hd.sr.Comprehensive3DSR.from_dataset(report).content
    assert content.get_planar_roi_measurement_groups() == []
    [study] = content.get_image_measurement_groups()
    assert study.get_qualitative_evaluations(name=codes.SCT.Lesion)[0].value == codes.SCT.Absent
    assert study.get_measurements(name=codes.DCM.CertaintyOfFinding)[0].value == pytest.approx(0.31)
    [comment] = named(report.ContentSequence, "121106")
    assert comment.TextValue == (
        "Breast lesion: absent, no lesion reached the threshold (highest certainty 0.31, below the operating "
        "threshold 0.5; model triagenode-test-mammo 1.0.0; not for diagnosis)"
    )
    mammo = cad(result)
    [summary] = named(mammo.ContentSequence, "111017")
    assert summary.ConceptCodeSequence[0].CodeValue == "111241"  # All algorithms succeeded; without findings
    assert named(mammo.ContentSequence, "111034") == [] and named(mammo.ContentSequence, "111059") == []
    assert len(named(mammo.ContentSequence, "111022")) == 2, "still says which detections ran"


def test_the_cad_sr_marks_the_box_centre_and_outline_on_the_image_library_entry() -> None:
    headers = mammograms()
    result = result_of(headers)
    mammo = cad(result)
    assert mammo.SOPClassUID == MAMMOGRAPHY_CAD_SR == mammo.file_meta.MediaStorageSOPClassUID
    assert mammo.ContentTemplateSequence[0].TemplateIdentifier == "4000"
    assert mammo.ContentTemplateSequence[0].MappingResource == "DCMR"
    assert (mammo.CompletionFlag, mammo.VerificationFlag, mammo.ContentQualification) == (
        "COMPLETE", "UNVERIFIED", "RESEARCH")
    assert (mammo.PatientName, mammo.PatientID, mammo.StudyInstanceUID, mammo.AccessionNumber) == (
        headers[0].PatientName, headers[0].PatientID, headers[0].StudyInstanceUID, headers[0].AccessionNumber)
    [evidence] = mammo.CurrentRequestedProcedureEvidenceSequence
    assert {ref.ReferencedSOPInstanceUID for ref in evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence} == {
        ds.SOPInstanceUID for ds in headers}

    [library] = named(mammo.ContentSequence, "111028")
    assert list(mammo.ContentSequence).index(library) + 1 == 2
    entries = list(library.ContentSequence)
    assert len(entries) == 4 and all(entry.ValueType == "IMAGE" for entry in entries)
    findings = named(mammo.ContentSequence, "111059")
    assert [f.ConceptCodeSequence[0].CodeValue for f in findings] == ["129793001", "129769006"]
    for finding, lesion in zip(findings, result.lesions, strict=True):
        [centre] = [i for i in finding.ContentSequence if i.get("ValueType") == "SCOORD"
                    and i.ConceptNameCodeSequence[0].CodeValue == "111010"]
        [outline] = [i for i in finding.ContentSequence if i.get("ValueType") == "SCOORD"
                     and i.ConceptNameCodeSequence[0].CodeValue == "111041"]
        assert centre.GraphicType == "POINT" and list(centre.GraphicData) == pytest.approx(list(lesion.centre))
        assert outline.GraphicType == "POLYLINE"
        x0, y0, x1, y1 = lesion.box
        assert list(outline.GraphicData) == pytest.approx([x0, y0, x1, y0, x1, y1, x0, y1, x0, y0])
        for scoord in (centre, outline):
            [selected] = scoord.ContentSequence
            assert selected.RelationshipType == "SELECTED FROM" and "ValueType" not in selected
            root, container, position = selected.ReferencedContentItemIdentifier
            assert (root, container) == (1, 2)
            image = entries[position - 1].ReferencedSOPSequence[0]
            assert image.ReferencedSOPInstanceUID == lesion.sop_instance_uid
        [certainty] = [i for i in finding.ContentSequence if i.get("ValueType") == "NUM"]
        assert certainty.ConceptNameCodeSequence[0].CodeValue == "111012"
        value = certainty.MeasuredValueSequence[0]
        assert float(value.NumericValue) == pytest.approx(lesion.certainty * 100)
        assert value.MeasurementUnitsCodeSequence[0].CodeValue == "%"
        intent = [i for i in finding.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "111056"]
        assert intent[0].ConceptCodeSequence[0].CodeValue == "111150"
        entry = entries[selected.ReferencedContentItemIdentifier[2] - 1]
        laterality = [i for i in entry.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "111027"]
        assert laterality[0].ConceptCodeSequence[0].CodeValue == (LEFT_BREAST if lesion.laterality == "L"
                                                                   else RIGHT_BREAST).value


def test_both_documents_keep_their_uid_for_the_same_content_and_change_it_for_another() -> None:
    headers = mammograms()
    base = result_of(headers)
    later = datetime.now() + timedelta(hours=5)
    again = replace(base, evidence=list(reversed(headers)))  # the same result, its images in another order
    assert tid1500(again, now=later).SOPInstanceUID == tid1500(base).SOPInstanceUID
    assert cad(again, now=later).SOPInstanceUID == cad(base).SOPInstanceUID

    moved = result_of(headers, lesions_on(headers, box=(31.0, 40.0, 90.5, 120.25)))
    assert tid1500(moved).SOPInstanceUID != tid1500(base).SOPInstanceUID
    assert cad(moved).SOPInstanceUID != cad(base).SOPInstanceUID
    tracking = [g.tracking_uid for g in hd.sr.Comprehensive3DSR.from_dataset(tid1500(base)).content
                .get_planar_roi_measurement_groups()]
    moved_tracking = [g.tracking_uid for g in hd.sr.Comprehensive3DSR.from_dataset(tid1500(moved)).content
                      .get_planar_roi_measurement_groups()]
    assert tracking[1] == moved_tracking[1] and tracking[0] != moved_tracking[0], "the moved lesion alone is new"
    assert cad(base, product=True).SOPInstanceUID != cad(base).SOPInstanceUID

    report, mammo = tid1500(base), cad(base)
    assert report.SOPInstanceUID != mammo.SOPInstanceUID
    assert (report.SeriesInstanceUID, report.SeriesNumber) == (
        report_series_uid(base.study_uid, MANIFEST.name, MANIFEST.version), 9901)
    assert (mammo.SeriesInstanceUID, mammo.SeriesNumber) == (
        report_series_uid(base.study_uid, MANIFEST.name, MANIFEST.version, kind="mammography-cad"), 9902)
    assert mammo.SeriesInstanceUID != report.SeriesInstanceUID
    assert report.SeriesDescription == "AI triage: breast lesion (not for diagnosis)"
    assert mammo.SeriesDescription == "AI CAD: mammography (not for diagnosis)"
    routed = cad(base, route="screening")
    assert routed.SeriesDescription == "AI CAD screening: mammography (not for diagnosis)"
    assert routed.SeriesInstanceUID == report_series_uid(
        base.study_uid, MANIFEST.name, MANIFEST.version, "screening", kind="mammography-cad")
    assert routed.SeriesInstanceUID != mammo.SeriesInstanceUID
    assert mammo.file_meta.MediaStorageSOPInstanceUID == mammo.SOPInstanceUID


def test_each_document_names_only_a_predecessor_of_its_own_form() -> None:
    headers = mammograms()
    first = result_of(headers, lesions_on(headers)[:1])
    second = result_of(headers)
    old_report, old_cad = Predecessor.of(tid1500(first)), Predecessor.of(cad(first))
    assert old_cad.sop_class_uid == MAMMOGRAPHY_CAD_SR != old_report.sop_class_uid

    def named_predecessors(sr: Dataset) -> list[str]:
        return [ref.ReferencedSOPInstanceUID for study in sr.get("PredecessorDocumentsSequence", [])
                for series in study.ReferencedSeriesSequence for ref in series.ReferencedSOPSequence]

    assert named_predecessors(tid1500(second, predecessor=old_report)) == [old_report.sop_instance_uid]
    assert named_predecessors(tid1500(second, predecessor=old_cad)) == []
    newer_cad = cad(second, predecessor=old_cad)
    assert named_predecessors(newer_cad) == [old_cad.sop_instance_uid]
    assert named_predecessors(cad(second, predecessor=old_report)) == []
    rerun = cad(second, predecessor=Predecessor.of(newer_cad))
    assert rerun.SOPInstanceUID == newer_cad.SOPInstanceUID
    assert named_predecessors(rerun) == [old_cad.sop_instance_uid], "a re-run keeps the history, never itself"

    # mammo_sr = "both": the worker hands over the earlier TID 1500 and the earlier CAD SR beside it;
    # each new document names the one of its own form.
    report, cad_sr = reports_for(second, MANIFEST, InferenceSettings(mammo_sr="both"), NODE, old_report,
                                 more_predecessors=[old_cad])
    assert named_predecessors(report) == [old_report.sop_instance_uid]
    assert named_predecessors(cad_sr) == [old_cad.sop_instance_uid]


def test_reports_for_gives_the_documents_mammo_sr_names() -> None:
    headers = mammograms()
    result = result_of(headers)
    classes = {
        "tid1500": [Comprehensive3DSRStorage],
        "mammography-cad": [MAMMOGRAPHY_CAD_SR],
        "both": [Comprehensive3DSRStorage, MAMMOGRAPHY_CAD_SR],
    }
    for form, expected in classes.items():
        site = InferenceSettings(mammo_sr=form)  # type: ignore[arg-type]
        documents = reports_for(result, MANIFEST, site, NODE)
        assert [sr.SOPClassUID for sr in documents] == expected, form
        assert report_for(result, MANIFEST, site, NODE).SOPInstanceUID == documents[0].SOPInstanceUID  # type: ignore[union-attr]
        other = "tid1500" if form != "tid1500" else "mammography-cad"
        overridden = reports_for(result, MANIFEST, site, NODE, mammo_sr=other)  # type: ignore[arg-type]
        assert [sr.SOPClassUID for sr in overridden] == classes[other], "a [[models]] entry's mammo_sr wins"
    both = reports_for(result, MANIFEST, InferenceSettings(mammo_sr="both"), NODE, route="screening")
    assert both[0].SeriesDescription == "AI triage screening: breast lesion (not for diagnosis)"
    assert both[1].SeriesDescription == "AI CAD screening: mammography (not for diagnosis)"

    demo = read_manifest(DEMO_MODEL)
    study_uid, series_uid = str(generate_uid()), str(generate_uid())
    ct = [ct_slice(study_uid, series_uid, index) for index in range(16)]
    ct_result = StudyResult(study_uid, series_uid, True, 0.97, demo.threshold, demo.name, demo.version,
                            str(ct[3].SOPInstanceUID), 16, evidence=ct)
    [classifier] = reports_for(ct_result, demo, InferenceSettings(mammo_sr="both"), NODE)
    assert classifier.SOPInstanceUID == build_measurement_report(
        ct_result, demo, ct, DocumentOptions(node_ae_title=NODE)).SOPInstanceUID, "a classifier's report as before"
    nothing = NotApplicable(result.study_uid, "no mammogram the model can read", headers)
    assert reports_for(nothing, MANIFEST, InferenceSettings(mammo_sr="both"), NODE) == []
    assert report_for(nothing, MANIFEST, InferenceSettings(), NODE) is None
    [indeterminate] = reports_for(nothing, MANIFEST, InferenceSettings(report_not_applicable=True), NODE)
    assert named(indeterminate.ContentSequence, "121106")[0].TextValue.startswith("Not assessed: no mammogram")


def test_a_lesion_the_report_cannot_place_is_refused() -> None:
    headers = mammograms()
    stray = replace(lesions_on(headers)[0], sop_instance_uid="1.2.3.4")
    with pytest.raises(ValueError, match="not among the images read"):
        tid1500(result_of(headers, [stray]))
    with pytest.raises(ValueError, match="not among the images read"):
        cad(result_of(headers, [stray]))
    unknown = replace(lesions_on(headers)[0], type="distortion")
    with pytest.raises(ValueError, match="'distortion' is not one of"):
        cad(result_of(headers, [unknown]))


@pytest.mark.parametrize("sample", ["chrH31.dcm", "chrI2.dcm"], ids=["japanese", "korean"])
def test_the_cad_sr_keeps_a_patient_name_in_iso_2022(tmp_path: Path, sample: str) -> None:
    """Images in ``\\ISO 2022 IR 87`` (an empty first value), which highdicom refuses: written in UTF-8."""
    source = dcmread(get_charset_files(sample)[0])
    encoded = source.get_item(0x00100010).value
    headers = mammograms()
    for ds in headers:
        ds.SpecificCharacterSet = source.SpecificCharacterSet
        ds.add_new(0x00100010, "PN", encoded)
    path = saved(cad(result_of(headers)), tmp_path / "cad.dcm")
    back = dcmread(path)
    assert back.SpecificCharacterSet == "ISO_IR 192"
    assert str(back.PatientName) == str(source.PatientName) and "?" not in str(back.PatientName)
    if shutil.which("dciodvfy"):
        assert dciodvfy(path)[0] == []
