"""The mammography detector end to end: four views into the node, lesion marks out, on the true lesions.

A node runs the built-in ``mammo-demo`` detector; a recording destination
stands for the PACS. A four-view phantom study arrives over C-STORE; the SR
the destination receives must mark lesions on that study's true lesions (the
phantom's boxes, by the evaluation's own hit rule), on the image each lies
on, and ``queue show --json`` must list the same lesions. A study whose only
images are For Processing is not read, with that reason. Then the same
study through ``triagenode infer``, and a short training and evaluation
through the CLI, so the lifecycle commands of a detector are held too.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import highdicom as hd
import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from triagenode.inference.froc import hits
from triagenode.inference.phantom_mammo import (
    DIGITAL_MAMMOGRAPHY_FOR_PRESENTATION,
    DIGITAL_MAMMOGRAPHY_FOR_PROCESSING,
    MammoStudy,
    write_mammo_phantoms,
)

from nodes import TRIAGENODE, send

ROWS = 512
"""The demo detector's own input size: the phantoms it was trained on."""
MG_CONTEXTS = [
    (DIGITAL_MAMMOGRAPHY_FOR_PRESENTATION, [ExplicitVRLittleEndian]),
    (DIGITAL_MAMMOGRAPHY_FOR_PROCESSING, [ExplicitVRLittleEndian]),
]
SEED = 42
"""Phantoms of a seed the demo never saw (it was trained on seed 1, evaluated on seed 2)."""


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[MammoStudy]]:
    out = tmp_path_factory.mktemp("mammo")
    return out, write_mammo_phantoms(out, 4, positive_fraction=0.5, seed=SEED, rows=ROWS)


def _positive(studies: list[MammoStudy]) -> MammoStudy:
    return next(study for study in studies if study.label == 1)


def test_a_four_view_study_gets_an_sr_whose_marks_lie_on_its_true_lesions(
    make_node, make_pacs, phantoms: tuple[Path, list[MammoStudy]]
) -> None:
    """And, on the same node, a study of For Processing images only is not read, with each image's reason."""
    _, studies = phantoms
    study = _positive(studies)
    assert study.directory is not None
    pacs = make_pacs()
    node = make_node(
        inference={"workers": 1, "device": "cpu", "model": "mammo-demo", "mammo_sr": "both"},
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}],
    )
    files = sorted(study.directory.iterdir())
    assert send(node.port, files, contexts=MG_CONTEXTS) == [0] * 4
    node.wait_for_state(study.study_uid, "sent", timeout=120)

    shown = node.cli_json("queue", "show", study.study_uid)
    lesions = shown["result"]["lesions"]
    assert lesions, f"the demo marked nothing on a positive study: {shown['result']}"
    truth = {(lesion.sop_instance_uid, lesion.box) for lesion in study.lesions}
    for lesion in lesions:
        assert set(lesion) >= {"sop_instance_uid", "type", "box", "certainty"}
        assert lesion["certainty"] >= shown["result"]["threshold"]
        assert any(uid == lesion["sop_instance_uid"] and hits(tuple(lesion["box"]), box) for uid, box in truth), (
            f"mark {lesion} is on no true lesion of {study.lesions}"
        )
    assert shown["result"]["probability"] == max(lesion["certainty"] for lesion in lesions)

    received = {str(ds.SOPClassUID): ds for ds in pacs.received}
    assert set(received) == {"1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.88.50"}, received
    assert len(pacs.received) == 2  # each document once
    sr = hd.sr.Comprehensive3DSR.from_dataset(received["1.2.840.10008.5.1.4.1.1.88.34"])
    groups = sr.content.get_planar_roi_measurement_groups()
    assert len(groups) == len(lesions)
    for group, lesion in zip(groups, lesions, strict=True):
        region = group.roi
        assert region is not None
        points = region.value  # the closed POLYLINE box, in the image's pixels
        xs, ys = points[:, 0], points[:, 1]
        box = (float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max()))
        assert box == pytest.approx(tuple(lesion["box"]), abs=0.05)
        [source] = region.ContentSequence  # SELECTED FROM the image the box is on
        image = source.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        assert image == lesion["sop_instance_uid"]
        assert any(uid == image and hits(box, true_box) for uid, true_box in truth)

    raw_uid = send_for_processing_copy(node.port, study)
    node.wait_for_state(raw_uid, "reported", timeout=60)
    raw = node.cli_json("queue", "show", raw_uid)
    result = raw["result"]
    assert result["applicable"] is False and result["lesions"] == [], result
    assert result["reason"].startswith("no MG image the model can read"), result["reason"]
    assert result["reason"].count("For Processing (raw detector data), not read") == 4, result["reason"]
    assert raw["report_objects"] == [], "no report for a study the model did not read (report_not_applicable off)"
    assert len(pacs.received) == 2


def send_for_processing_copy(port: int, study: MammoStudy) -> str:
    """The study's images as a new study of For Processing images (the detector's raw data); its UID."""
    assert study.directory is not None
    study_uid, series_uid = generate_uid(), generate_uid()
    raw = []
    for path in sorted(study.directory.iterdir()):
        ds = dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = DIGITAL_MAMMOGRAPHY_FOR_PROCESSING
        ds.PresentationIntentType = "FOR PROCESSING"
        raw.append(ds)
    assert send(port, raw, contexts=MG_CONTEXTS) == [0] * 4
    return str(study_uid)


@pytest.mark.slow
def test_infer_prints_the_lesions_and_writes_both_documents(
    phantoms: tuple[Path, list[MammoStudy]], tmp_path: Path
) -> None:
    _, studies = phantoms
    study = _positive(studies)
    assert study.directory is not None
    run = subprocess.run(
        [TRIAGENODE, "infer", str(study.directory), "--model", "mammo-demo", "--device", "cpu",
         "--sr-out", str(tmp_path / "sr")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "TRIAGENODE_INFERENCE__MAMMO_SR": "both"},
    )
    assert run.returncode == 0, run.stderr
    written = sorted(path.name for path in (tmp_path / "sr").iterdir())
    assert written == [f"{study.study_uid}.dcm", f"{study.study_uid}.mammo-cad.dcm"]
    report = dcmread(tmp_path / "sr" / f"{study.study_uid}.dcm")
    groups = hd.sr.Comprehensive3DSR.from_dataset(report).content.get_planar_roi_measurement_groups()
    lines = [line for line in run.stdout.splitlines() if line.startswith("  lesion ")]
    assert groups and len(lines) == len(groups), run.stdout
    assert "lesion marked on 4 images" in run.stdout or "lesions marked on 4 images" in run.stdout, run.stdout
    assert all(re.match(r"  lesion \d+: (mass|calcification), [LR] (CC|MLO), box ", line) for line in lines), lines


@pytest.mark.slow
def test_a_detector_trains_and_evaluates_through_the_cli_in_seconds(tmp_path: Path) -> None:
    data = tmp_path / "phantoms"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([TRIAGENODE, *args], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"triagenode {' '.join(args)}: {done.stderr}"
        return done

    cli("phantom", str(data), "--kind", "mammo", "--studies", "4", "--matrix", "256", "--seed", "5")
    assert (data / "lesions.csv").exists()
    package = tmp_path / "detector.tnm"
    cli("model", "train", "--task", "detection", "--data", str(data), "--labels", str(data / "labels.csv"),
        "--matrix", "256", "--crop", "128", "--crops-per-epoch", "32", "--batch-size", "16", "--epochs", "1",
        "--val-fraction", "0.5", "--device", "cpu", "--out", str(package))
    manifest = json.loads(cli("model", "info", str(package), "--json").stdout)
    assert manifest["task"] == "detection" and manifest["input"]["modality"] == "MG"
    assert [c["name"] for c in manifest["detection"]["classes"]] == ["mass", "calcification"]
    cli("model", "evaluate", "--model", str(package), "--data", str(data), "--labels", str(data / "labels.csv"),
        "--device", "cpu", "--out", str(tmp_path / "eval"))
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(metrics["froc"]["sensitivity_at"]) == {"0.25", "0.5", "1", "2", "4"}
    assert "centre" in metrics["hit_rule"] and "0.3" in metrics["hit_rule"]
    assert {"auc", "auc_ci95", "accuracy", "sensitivity", "specificity", "ppv", "f1"} <= set(metrics["study"])
    assert {"recall", "precision", "f1"} <= set(metrics["lesion"])
    assert (tmp_path / "eval" / "froc.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_bad_detection_data_is_refused_by_the_cli_with_one_line(tmp_path: Path) -> None:
    """The checks themselves are in tests/test_detection.py; here, that the CLI says them in one line."""
    data = tmp_path / "phantoms"
    write_mammo_phantoms(data, 2, positive_fraction=0.5, seed=8, rows=128)
    labels = data / "labels.csv"
    (data / "lesions.csv").unlink()

    def refused(*args: str) -> str:
        done = subprocess.run([TRIAGENODE, *args, "--device", "cpu"], capture_output=True, text=True, timeout=120)
        assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
        return done.stderr.strip().splitlines()[-1]

    assert "use a multiple of 8" in refused(
        "model", "train", "--task", "detection", "--data", str(data), "--labels", str(labels), "--crop", "36",
        "--out", str(tmp_path / "m.tnm"))
    assert "lesions.csv does not exist; give the lesion boxes with --lesions" in refused(
        "model", "evaluate", "--model", "mammo-demo", "--data", str(data), "--labels", str(labels))
