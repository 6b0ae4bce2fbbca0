"""`triagenode infer` and the Structured Report it writes: validated by DICOM tools written by others."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import highdicom as hd
import pytest
from pydicom import Dataset, dcmread
from pydicom.data import get_charset_files
from pydicom.sr.codedict import codes
from pydicom.uid import Comprehensive3DSRStorage, ComprehensiveSRStorage, generate_uid

from triagenode.inference.model_package import DEMO_MODEL, Manifest, read_manifest
from triagenode.inference.phantom import read_labels, write_phantom_study, write_phantoms
from triagenode.inference.pipeline import StudyResult
from triagenode.inference.report import (
    DocumentOptions,
    Predecessor,
    build_measurement_report,
    convert_report,
    read_predecessor,
)

from dicom_factory import ct_slice
from nodes import TRIAGENODE, send, wait_until

needs_dicom3tools = pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools not installed")
needs_dcmtk = pytest.mark.skipif(shutil.which("dsrdump") is None, reason="DCMTK not installed")


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("infer")
    write_phantoms(out, 2, positive_fraction=0.5, seed=31, slices=32, matrix=256)
    return out


def infer(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TRIAGENODE, "infer", *args, "--device", "cpu"], capture_output=True, text=True, timeout=300)


def test_infer_prints_a_result_per_study_and_writes_reports(studies: Path, tmp_path: Path) -> None:
    result = infer(str(studies), "--json", "--sr-out", str(tmp_path / "sr"))
    assert result.returncode == 0, result.stderr
    entries = json.loads(result.stdout)
    labels = read_labels(studies / "labels.csv")
    assert {e["study_uid"] for e in entries} == set(labels)
    for entry in entries:
        assert entry["status"] == "reported" and entry["model"] == "triagenode-demo-lung-nodule"
        assert 0.0 <= entry["probability"] <= 1.0 and entry["slices"] == 32
        assert entry["finding"] == (entry["probability"] >= entry["threshold"])
        timings = entry["timings_ms"]
        assert set(timings) == {"select", "decode", "preprocess", "input_wait", "model", "total"}
        assert timings["total"] >= timings["select"] + timings["model"]
        sr = dcmread(entry["sr"]["path"])
        assert sr.StudyInstanceUID == entry["study_uid"]
        assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"
        assert sr.SeriesDescription == "AI triage: nodule (not for diagnosis)"
        assert (sr.CompletionFlag, sr.VerificationFlag, sr.ContentQualification) == (
            "COMPLETE",
            "UNVERIFIED",
            "RESEARCH",
        )
        parsed = hd.sr.srread(entry["sr"]["path"])
        group = parsed.content.get_image_measurement_groups()[0]
        nodule = group.get_qualitative_evaluations(name=codes.SCT.Nodule)[0]
        assert nodule.value == (codes.SCT.Present if entry["finding"] else codes.SCT.Absent)
        certainty = group.get_measurements(name=codes.DCM.CertaintyOfFinding)[0]
        assert certainty.value == pytest.approx(entry["probability"], abs=1e-6)
        evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
        assert evidence.SeriesInstanceUID == entry["series_uid"]
        assert len(evidence.ReferencedSOPSequence) == 32

    again = json.loads(infer(str(studies), "--json", "--sr-out", str(tmp_path / "sr2")).stdout)
    assert [e["sr"]["sop_instance_uid"] for e in again] == [e["sr"]["sop_instance_uid"] for e in entries], (
        "the same study, model and result give the same report"
    )
    assert [e["probability"] for e in again] == [e["probability"] for e in entries]


@needs_dicom3tools
@needs_dcmtk
@pytest.mark.parametrize("sr_class", ["comprehensive3d", "comprehensive"])
def test_the_report_passes_dciodvfy_and_dsrdump(studies: Path, tmp_path: Path, sr_class: str) -> None:
    config = tmp_path / "node.toml"
    config.write_text(f'[inference]\nsr_sop_class = "{sr_class}"\n')
    target = tmp_path / "report.dcm"
    result = infer(str(studies / "study_00000"), "--config", str(config), "--sr-out", str(target))
    assert result.returncode == 0, result.stderr
    assert dciodvfy(target) == ([], [])
    dumped = subprocess.run(["dsrdump", str(target)], capture_output=True, text=True, timeout=60)
    assert dumped.returncode == 0 and "W:" not in dumped.stderr and "E:" not in dumped.stderr
    assert '"Certainty of Finding"' in dumped.stdout and '(27925004,SCT,"Nodule")' in dumped.stdout
    assert '(24627-2,LN,"CT Chest")' in dumped.stdout, "a chest model's procedure is CT Chest"
    expected = "Comprehensive 3D SR" if sr_class == "comprehensive3d" else "Comprehensive SR"
    assert dumped.stdout.startswith(expected)


def test_a_study_without_a_suitable_series_is_not_applicable(tmp_path: Path) -> None:
    study_uid = generate_uid()
    localizer_uid, short_uid = generate_uid(), generate_uid()
    localizer = [ct_slice(study_uid, localizer_uid, i) for i in range(3)]
    for ds in localizer:
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    short = [ct_slice(study_uid, short_uid, i) for i in range(4)]
    for index, ds in enumerate(localizer + short):
        ds.save_as(tmp_path / f"{index}.dcm", enforce_file_format=True)
    result = infer(str(tmp_path), "--json", "--sr-out", str(tmp_path / "none.dcm"))
    assert result.returncode == 0, result.stderr
    [entry] = json.loads(result.stdout)
    assert entry["status"] == "not applicable"
    assert "a localiser" in entry["reason"] and "series of 4 slices (needs 16)" in entry["reason"]
    assert "sr" not in entry and not (tmp_path / "none.dcm").exists(), "no report unless the site asks for one"


@needs_dicom3tools
@needs_dcmtk
def test_a_site_can_have_a_report_for_a_study_the_model_cannot_read(tmp_path: Path) -> None:
    study_uid, localizer_uid = generate_uid(), generate_uid()
    studies = tmp_path / "study"
    studies.mkdir()
    for index in range(3):
        ds = ct_slice(study_uid, localizer_uid, index)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.save_as(studies / f"{index}.dcm", enforce_file_format=True)
    config = tmp_path / "node.toml"
    config.write_text("[inference]\nreport_not_applicable = true\n")
    target = tmp_path / "report.dcm"
    result = infer(str(studies), "--json", "--config", str(config), "--sr-out", str(target))
    assert result.returncode == 0, result.stderr
    [entry] = json.loads(result.stdout)
    assert entry["status"] == "not applicable" and entry["sr"]["path"] == str(target)

    assert dciodvfy(target) == ([], [])
    dumped = subprocess.run(["dsrdump", str(target)], capture_output=True, text=True, timeout=60)
    assert dumped.returncode == 0 and "E:" not in dumped.stderr
    assert '(82334004,SCT,"Indeterminate")' in dumped.stdout and "Certainty of Finding" not in dumped.stdout
    assert '<contains TEXT:(,,"Comment")="Not assessed: ' in dumped.stdout
    report = dcmread(target)

    def texts(items: object) -> list[str]:
        found = []
        for item in items or []:  # type: ignore[attr-defined]
            found += [item.TextValue] if "TextValue" in item else []
            found += texts(item.get("ContentSequence"))
        return found

    assert "Not assessed: no CT image series the model can read (a localiser)" in texts(report.ContentSequence)
    assert report.StudyInstanceUID == study_uid and "not assessed" in report.SeriesDescription
    [evidence] = report.CurrentRequestedProcedureEvidenceSequence
    assert evidence.ReferencedSeriesSequence[0].SeriesInstanceUID == localizer_uid
    again = infer(str(studies), "--json", "--config", str(config), "--sr-out", str(tmp_path / "again.dcm"))
    assert json.loads(again.stdout)[0]["sr"]["sop_instance_uid"] == report.SOPInstanceUID, "the same report again"


@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.80"])  # JPEG 2000 / JPEG-LS lossless
def test_compressed_input_gives_the_same_result(studies: Path, tmp_path: Path, syntax: str) -> None:
    compressed = tmp_path / "compressed"
    compressed.mkdir()
    for path in sorted((studies / "study_00001").glob("*.dcm")):
        ds = dcmread(path)
        ds.compress(syntax, generate_instance_uid=False)
        ds.save_as(compressed / path.name, enforce_file_format=True)
    assert dcmread(next(compressed.iterdir())).file_meta.TransferSyntaxUID == syntax
    plain = json.loads(infer(str(studies / "study_00001"), "--json").stdout)[0]
    packed = json.loads(infer(str(compressed), "--json").stdout)[0]
    assert packed["probability"] == pytest.approx(plain["probability"], abs=1e-6)
    assert packed["key_instance_uid"] == plain["key_instance_uid"]


def test_a_study_holding_only_a_report_is_not_applicable(studies: Path, tmp_path: Path) -> None:
    report = tmp_path / "only-sr" / "report.dcm"
    result = infer(str(studies / "study_00000"), "--sr-out", str(report))
    assert result.returncode == 0, result.stderr
    [entry] = json.loads(infer(str(report.parent), "--json").stdout)
    assert entry["status"] == "not applicable" and "SR series" in entry["reason"]


# --- The report built from headers: identity, history, class conversion, rendering, character sets ---

MANIFEST = read_manifest(DEMO_MODEL)
NODE = "TRIAGENODE"


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """(errors, warnings) that dicom3tools' dciodvfy reports for one file."""
    checked = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    lines = (checked.stdout + checked.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")], [line for line in lines if line.startswith("Warning")]


def rendered(path: Path) -> str:
    """What a reader sees of the SR in DCMTK's dsr2html: the page's text, whitespace collapsed."""
    page = subprocess.run(["dsr2html", str(path)], capture_output=True, text=True, timeout=60)
    assert page.returncode == 0 and "E:" not in page.stderr, page.stderr
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", page.stdout)).split())


def headers(folder: Path) -> list[Dataset]:
    return [dcmread(path, stop_before_pixels=True) for path in sorted(folder.glob("*.dcm"))]


def result_of(evidence: list[Dataset], probability: float = 0.97, key: int = 5, **changes: Any) -> StudyResult:
    """The result the model would give for ``evidence``, as a worker hands it to the report."""
    threshold = changes.pop("threshold", MANIFEST.threshold)
    return StudyResult(
        study_uid=str(evidence[0].StudyInstanceUID),
        series_uid=str(evidence[0].SeriesInstanceUID),
        finding=probability >= threshold,
        probability=probability,
        threshold=threshold,
        model=MANIFEST.name,
        model_version=changes.pop("model_version", MANIFEST.version),
        key_instance_uid=str(evidence[key].SOPInstanceUID),
        slices=len(evidence),
        evidence=evidence,
    )


def build(result: StudyResult, manifest: Manifest = MANIFEST, **options: Any) -> Dataset:
    return build_measurement_report(result, manifest, result.evidence, DocumentOptions(node_ae_title=NODE, **options))


def test_the_report_uid_follows_its_content(studies: Path) -> None:
    evidence = headers(studies / "study_00000")
    first = evidence[:-1]  # the study before its late slice arrived
    base = build(result_of(first))
    [series] = base.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
    assert len(series.ReferencedSOPSequence) == 31
    later = datetime.now() + timedelta(hours=3)
    same = build(result_of(list(reversed(first)), key=len(first) - 1 - 5), now=later)  # the same key slice
    assert same.SOPInstanceUID == base.SOPInstanceUID, "the same content (in any arrival order, at any time)"
    assert same.ContentTime != base.ContentTime

    newer = replace(MANIFEST, version="1.0.1")
    variants = {
        "a late slice": build(result_of(evidence)),
        "the other SR class": build(result_of(first), sr_class="comprehensive"),
        "another key slice": build(result_of(first, key=7)),
        "another threshold": build(result_of(first, threshold=0.5)),
        "another probability": build(result_of(first, probability=0.96)),
        "another model version": build(result_of(first, model_version="1.0.1"), manifest=newer),
        "PRODUCT": build(result_of(first), product=True),
    }
    uids = {name: str(sr.SOPInstanceUID) for name, sr in variants.items()}
    assert base.SOPInstanceUID not in uids.values(), uids
    assert len(set(uids.values())) == len(uids), uids
    for sr in variants.values():
        assert sr.file_meta.MediaStorageSOPInstanceUID == sr.SOPInstanceUID
        assert sr.file_meta.MediaStorageSOPClassUID == sr.SOPClassUID


@needs_dicom3tools
@needs_dcmtk
def test_a_newer_report_names_the_one_it_replaces(studies: Path, tmp_path: Path) -> None:
    evidence = headers(studies / "study_00000")
    first = build(result_of(evidence[:-1]))
    assert "PredecessorDocumentsSequence" not in first
    first.save_as(tmp_path / "first.dcm", enforce_file_format=True)
    previous = read_predecessor(tmp_path / "first.dcm")
    assert previous == Predecessor(
        str(first.StudyInstanceUID), str(first.SeriesInstanceUID), str(first.SOPClassUID), str(first.SOPInstanceUID)
    )

    second = build(result_of(evidence), predecessor=previous)
    second.save_as(tmp_path / "second.dcm", enforce_file_format=True)
    assert second.SOPInstanceUID != first.SOPInstanceUID and second.SeriesInstanceUID == first.SeriesInstanceUID
    [study] = second.PredecessorDocumentsSequence
    [series] = study.ReferencedSeriesSequence
    [document] = series.ReferencedSOPSequence
    assert (study.StudyInstanceUID, series.SeriesInstanceUID) == (first.StudyInstanceUID, first.SeriesInstanceUID)
    assert (document.ReferencedSOPClassUID, document.ReferencedSOPInstanceUID) == (
        Comprehensive3DSRStorage,
        first.SOPInstanceUID,
    )
    assert dciodvfy(tmp_path / "second.dcm") == ([], [])
    dumped = subprocess.run(["dsrdump", str(tmp_path / "second.dcm")], capture_output=True, text=True, timeout=60)
    assert dumped.returncode == 0 and "E:" not in dumped.stderr

    # The same result again (a re-run, a cancel and retry): the same document, its history kept, no self-reference.
    again = build(result_of(evidence), predecessor=read_predecessor(tmp_path / "second.dcm"))
    assert again.SOPInstanceUID == second.SOPInstanceUID
    assert again.PredecessorDocumentsSequence == second.PredecessorDocumentsSequence
    assert read_predecessor(tmp_path / "gone.dcm") is None, "a lost earlier report does not stop the new one"


@needs_dicom3tools
@needs_dcmtk
def test_a_stored_report_is_rebuilt_in_the_other_sr_class(studies: Path, tmp_path: Path) -> None:
    result = result_of(headers(studies / "study_00001"))
    build(result).save_as(tmp_path / "3d.dcm", enforce_file_format=True)
    stored = dcmread(tmp_path / "3d.dcm")

    converted = convert_report(stored, "comprehensive")
    converted.save_as(tmp_path / "comprehensive.dcm", enforce_file_format=True)
    assert converted.SOPClassUID == ComprehensiveSRStorage != stored.SOPClassUID
    assert converted.SOPInstanceUID == build(result, sr_class="comprehensive").SOPInstanceUID, (
        "converting gives the UID that building the same result in that class gives"
    )
    assert converted.SOPInstanceUID != stored.SOPInstanceUID
    assert (converted.SeriesInstanceUID, converted.ContentDate, converted.ContentTime) == (
        stored.SeriesInstanceUID, stored.ContentDate, stored.ContentTime,
    )
    assert converted.ContentSequence == stored.ContentSequence
    [study] = converted.PredecessorDocumentsSequence
    [document] = study.ReferencedSeriesSequence[0].ReferencedSOPSequence
    assert (document.ReferencedSOPClassUID, document.ReferencedSOPInstanceUID) == (
        Comprehensive3DSRStorage,
        stored.SOPInstanceUID,
    )
    back = dcmread(tmp_path / "comprehensive.dcm")
    assert back.file_meta.MediaStorageSOPClassUID == ComprehensiveSRStorage
    assert back.file_meta.MediaStorageSOPInstanceUID == converted.SOPInstanceUID
    assert dciodvfy(tmp_path / "comprehensive.dcm") == ([], [])
    dumped = subprocess.run(["dsrdump", str(tmp_path / "comprehensive.dcm")], capture_output=True, text=True)
    assert dumped.returncode == 0 and "E:" not in dumped.stderr and dumped.stdout.startswith("Comprehensive SR")
    group = hd.sr.srread(tmp_path / "comprehensive.dcm").content.get_image_measurement_groups()[0]
    assert group.get_measurements(name=codes.DCM.CertaintyOfFinding)[0].value == pytest.approx(result.probability)

    assert convert_report(back, "comprehensive3d").SOPInstanceUID == stored.SOPInstanceUID, "and back again"
    assert convert_report(stored, "comprehensive3d").SOPInstanceUID == stored.SOPInstanceUID, "already that class"
    with pytest.raises(ValueError, match="not a Comprehensive"):
        convert_report(headers(studies / "study_00001")[0], "comprehensive")


@needs_dicom3tools
@needs_dcmtk
@pytest.mark.parametrize(
    ("probability", "words"),
    [
        (0.999982, "Lung nodule: present (model probability 0.999982, at or above the operating threshold 0.742656;"),
        (0.63, "Lung nodule: absent (model probability 0.63, below the operating threshold 0.742656;"),
        (0.742656, "Lung nodule: present (model probability 0.742656, at or above the operating threshold 0.742656;"),
    ],
)
def test_the_rendered_report_says_what_was_found_against_which_threshold(
    studies: Path, tmp_path: Path, probability: float, words: str
) -> None:
    """dsr2html used to read "0.999982 1 ¹ Present CT image": no label, no threshold."""
    target = tmp_path / "report.dcm"
    sr = build(result_of(headers(studies / "study_00000"), probability=probability))
    sr.save_as(target, enforce_file_format=True)
    text = rendered(target)
    present = probability >= MANIFEST.threshold
    for expected in (
        f"Comment: {words} model triagenode-demo-lung-nodule 1.0.0; not for diagnosis)",
        "Procedure reported = CT Chest (24627-2, LN)",
        "Finding: Nodule (27925004, SCT)",
        "Finding Site = Lung (39607008, SCT)",
        f"Certainty of Finding: {probability} 1",
        f"Threshold Value: {MANIFEST.threshold} 1",
        f"Nodule: {'Present (52101004' if present else 'Absent (272519000'}, SCT)",
        'Algorithm Name = "triagenode-demo-lung-nodule"',
        'Algorithm Version = "1.0.0"',
    ):
        assert expected in text, f"{expected!r} not in the rendered report:\n{text}"
    assert (sr.SeriesDate, sr.SeriesTime) == (sr.ContentDate, sr.ContentTime)
    assert dciodvfy(target) == ([], [])


@needs_dicom3tools
@needs_dcmtk
@pytest.mark.parametrize("sample", ["chrH31.dcm", "chrI2.dcm"], ids=["japanese", "korean"])
def test_a_study_in_iso_2022_with_an_empty_first_value_gets_its_report_with_the_name_intact(
    studies: Path, tmp_path: Path, sample: str
) -> None:
    """``\\ISO 2022 IR 87`` / ``\\ISO 2022 IR 149``, the usual form at Japanese and Korean sites, made
    highdicom refuse the report and the study ``failed``."""
    source = dcmread(get_charset_files(sample)[0])
    assert source.SpecificCharacterSet[0] == ""
    encoded = source.get_item(0x00100010).value  # the name's bytes as the sample site wrote them
    study = tmp_path / "study"
    study.mkdir()
    for path in sorted((studies / "study_00001").glob("*.dcm")):
        ds = dcmread(path)
        ds.SpecificCharacterSet = source.SpecificCharacterSet
        ds.add_new(0x00100010, "PN", encoded)
        ds.save_as(study / path.name, enforce_file_format=True)
    assert dcmread(next(study.iterdir())).get_item(0x00100010).value == encoded

    target = tmp_path / "report.dcm"
    result = infer(str(study), "--json", "--sr-out", str(target))
    assert result.returncode == 0, result.stderr
    [entry] = json.loads(result.stdout)
    assert entry["status"] == "reported"
    report = dcmread(target)
    assert str(report.PatientName) == str(source.PatientName)
    assert str(report.PatientName).split("=")[1:] and "?" not in str(report.PatientName)
    assert report.SpecificCharacterSet == "ISO_IR 192"
    assert report.PatientID == dcmread(next(study.iterdir())).PatientID
    errors, _ = dciodvfy(target)
    assert errors == []
    dumped = subprocess.run(["dsrdump", "+U8", str(target)], capture_output=True, text=True, timeout=60)
    assert dumped.returncode == 0 and "E:" not in dumped.stderr
    family = str(source.PatientName).split("=")[1].split("^")[0]  # 山田 / 洪
    assert family in dumped.stdout


def test_a_late_slice_gives_a_new_report_that_names_the_first(make_node: Any, tmp_path: Path) -> None:
    """A study re-opened by a late slice: the worker's new report (more evidence, so a new UID) names
    the first one in its Predecessor Documents Sequence."""
    phantom = write_phantom_study(tmp_path / "phantoms", seed=41, index=0, positive=True, slices=24, matrix=128)
    assert phantom.directory is not None
    files = sorted(phantom.directory.glob("*.dcm"))
    node = make_node(inference={"workers": 1, "device": "cpu"})
    assert send(node.port, files[:-1]) == [0] * (len(files) - 1)
    first = node.wait_for_state(phantom.study_uid, "reported", timeout=120)["result"]["sr_sop_instance_uid"]
    assert send(node.port, files[-1:]) == [0]
    details = wait_until(
        lambda: (s := node.study(phantom.study_uid)) and s["state"] == "reported"
        and s["result"]["sr_sop_instance_uid"] != first and s,
        120,
        "the re-opened study reported again",
    )
    second = details["result"]["sr_sop_instance_uid"]
    reports = node.data_dir / "reports" / phantom.study_uid
    newer = dcmread(reports / f"{second}.dcm")
    [series] = newer.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
    assert len(series.ReferencedSOPSequence) == 24
    [study] = newer.PredecessorDocumentsSequence
    [document] = study.ReferencedSeriesSequence[0].ReferencedSOPSequence
    assert document.ReferencedSOPInstanceUID == first
    assert (reports / f"{first}.dcm").is_file(), "the first report stays as it was sent"
