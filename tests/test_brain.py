"""The brain-MRI segmenter end to end: three contrasts into the node, a DICOM SEG and its SR out.

A node runs the built-in ``brain-demo`` segmenter. A phantom study's T1, T2 and
FLAIR series arrive over C-STORE (its ground-truth SEG stays with the test);
the destination must receive the node's SEG and its TID 1500 SR, each once,
the SEG's mask must overlap the truth, the SR must reference the SEG, and
``queue show --json`` must give the segments with their volumes. A private
Orthanc must accept both documents into the study.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import highdicom as hd
import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

from triagenode.inference.phantom_brain import BrainStudy, truth_mask, write_brain_study
from triagenode.inference.studies import dicom_files

from nodes import NODE_AE, TRIAGENODE, free_port, send, wait_until

SEG_CLASS, SR_CLASS = "1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.88.34"
MR = [(MRImageStorage, [ExplicitVRLittleEndian])]


@pytest.fixture(scope="module")
def positive(tmp_path_factory: pytest.TempPathFactory) -> BrainStudy:
    study = write_brain_study(tmp_path_factory.mktemp("brain"), 42, 0, positive=True)
    assert study.seg_path is not None and study.lesion_volume_ml > 1
    return study


def images_of(study: BrainStudy) -> list[Path]:
    assert study.directory is not None
    return [path for path in dicom_files(study.directory) if "truth" not in path.parts]


def test_three_contrasts_in_a_seg_and_its_sr_out_overlapping_the_truth(make_node, make_pacs,
                                                                     positive: BrainStudy) -> None:
    pacs = make_pacs()
    node = make_node(
        inference={"workers": 1, "device": "cpu", "model": "brain-demo"},
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}],
    )
    files = images_of(positive)
    assert send(node.port, files, contexts=MR) == [0] * len(files)
    node.wait_for_state(positive.study_uid, "sent", timeout=180)

    shown = node.cli_json("queue", "show", positive.study_uid)
    [segment] = shown["result"]["segments"]
    assert segment["label"] == "lesion" and segment["voxels"] > 0
    assert shown["result"]["finding"] is True
    received = {str(ds.SOPClassUID): ds for ds in pacs.received}
    assert set(received) == {SEG_CLASS, SR_CLASS} and len(pacs.received) == 2, "each document once"

    seg = hd.seg.Segmentation.from_dataset(received[SEG_CLASS])
    headers = [dcmread(path, stop_before_pixels=True) for path in files]
    flair = sorted((ds for ds in headers if ds.SeriesInstanceUID == positive.series_uids["FLAIR"]),
                   key=lambda ds: float(ds.ImagePositionPatient[2]))
    mask = seg.get_pixels_by_source_instance([str(ds.SOPInstanceUID) for ds in flair], combine_segments=True) > 0
    truth = truth_mask(positive.seg_path)  # type: ignore[arg-type]
    dice = 2 * float((mask & truth).sum()) / float(mask.sum() + truth.sum())
    assert dice > 0.5, f"the node's SEG hardly overlaps the truth (Dice {dice:.2f})"
    assert mask.sum() == segment["voxels"]

    sr = hd.sr.Comprehensive3DSR.from_dataset(received[SR_CLASS])
    seg_uid = str(received[SEG_CLASS].SOPInstanceUID)
    [group] = sr.content.get_volumetric_roi_measurement_groups(referenced_sop_instance_uid=seg_uid)
    assert group.referenced_segment is not None and group.referenced_segment.referenced_segment_numbers == [1]
    volume = next(m for m in group.get_measurements() if m.name.value == "118565006")
    assert volume.value == pytest.approx(segment["volume_ml"], rel=1e-3)


def test_a_private_orthanc_accepts_the_seg_and_the_sr_into_the_study(make_node, make_orthanc,
                                                                      positive: BrainStudy) -> None:
    node_port = free_port()
    orthanc = make_orthanc(modalities={"node": (NODE_AE, "127.0.0.1", node_port)})
    node = make_node(
        port=node_port,
        inference={"workers": 1, "device": "cpu", "model": "brain-demo"},
        destinations=[{"name": "orthanc", "ae_title": orthanc.ae_title, "host": "127.0.0.1",
                       "port": orthanc.dicom_port}],
    )
    files = images_of(positive)
    assert send(node.port, files, contexts=MR) == [0] * len(files)
    node.wait_for_state(positive.study_uid, "sent", timeout=180)
    study_id = wait_until(lambda: orthanc.study_id(positive.study_uid), 30, "Orthanc has the study")
    modalities = sorted(orthanc.rest(f"/series/{series}")["MainDicomTags"].get("Modality", "")
                        for series in orthanc.rest(f"/studies/{study_id}")["Series"])
    assert modalities == ["SEG", "SR"], f"the node's two documents, each once, in the study: {modalities}"


@pytest.mark.slow
def test_infer_prints_the_segments_and_writes_the_seg_and_the_sr(positive: BrainStudy, tmp_path: Path) -> None:
    assert positive.directory is not None
    folder = tmp_path / "images"
    for path in images_of(positive):  # the study as a site would hand it over: its images, no truth
        target = folder / path.relative_to(positive.directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    run = subprocess.run(
        [TRIAGENODE, "infer", str(folder), "--model", "brain-demo", "--device", "cpu",
         "--sr-out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert re.search(r": lesion PRESENT \(lesion \d+\.\d\d ml outlined, highest probability", run.stdout), run.stdout
    written = sorted(path.name for path in (tmp_path / "out").iterdir())
    assert written == [f"{positive.study_uid}.dcm", f"{positive.study_uid}.sr.dcm"], written
    assert str(dcmread(tmp_path / "out" / f"{positive.study_uid}.dcm").SOPClassUID) == SEG_CLASS


@pytest.mark.slow
def test_a_segmenter_trains_and_evaluates_through_the_cli(tmp_path: Path) -> None:
    data = tmp_path / "brains"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([TRIAGENODE, *args], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"triagenode {' '.join(args)}: {done.stderr}"
        return done

    cli("phantom", str(data), "--kind", "brain-mri", "--studies", "4", "--slices", "16", "--matrix", "64",
        "--seed", "5")
    package = tmp_path / "segmenter.tnm"
    cli("model", "train", "--task", "segmentation", "--data", str(data), "--labels", str(data / "labels.csv"),
        "--matrix", "64", "--crops-per-epoch", "4", "--batch-size", "2", "--epochs", "1", "--val-fraction", "0.5",
        "--device", "cpu", "--out", str(package))
    manifest = json.loads(cli("model", "info", str(package), "--json").stdout)
    assert manifest["task"] == "segmentation"
    assert [rule["name"] for rule in manifest["segmentation"]["contrasts"]] == ["FLAIR", "T2", "T1"]
    cli("model", "evaluate", "--model", str(package), "--data", str(data), "--labels", str(data / "labels.csv"),
        "--device", "cpu", "--out", str(tmp_path / "eval"))
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert {"dice_mean", "dice_ci95", "hausdorff95_median_mm"} <= set(metrics["summary"])
    assert {"sensitivity", "specificity", "auc"} <= set(metrics["triage"])
