"""`triagenode infer` and the Structured Report it writes: validated by DICOM tools written by others."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import pytest
from pydicom import dcmread
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from inference.phantom import read_labels, write_phantoms

from conftest import TRIAGENODE
from dicom_factory import ct_slice

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
    checked = subprocess.run(["dciodvfy", str(target)], capture_output=True, text=True, timeout=60)
    errors = [line for line in (checked.stdout + checked.stderr).splitlines() if line.startswith("Error")]
    assert errors == [], "\n".join(errors)
    dumped = subprocess.run(["dsrdump", str(target)], capture_output=True, text=True, timeout=60)
    assert dumped.returncode == 0 and "W:" not in dumped.stderr and "E:" not in dumped.stderr
    assert '"Certainty of Finding"' in dumped.stdout and '(27925004,SCT,"Nodule")' in dumped.stdout
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

    checked = subprocess.run(["dciodvfy", str(target)], capture_output=True, text=True, timeout=60)
    errors = [line for line in (checked.stdout + checked.stderr).splitlines() if line.startswith("Error")]
    assert errors == [], "\n".join(errors)
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
