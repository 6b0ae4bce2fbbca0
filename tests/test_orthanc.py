"""Against a real PACS: Orthanc pushes studies to the node and receives the node's reports."""

from __future__ import annotations

import json
import time
from pathlib import Path

import highdicom as hd
import pytest
from pydicom.sr.codedict import codes

from triagenode.inference.phantom import write_phantom_study

from nodes import NODE_AE, NodeProcess, free_port, send, wait_until
from orthanc import Orthanc


def inferring_node(make_node, destination_port: int, **settings) -> NodeProcess:
    return make_node(
        start=False,
        inference={"workers": 1, "device": "cpu"},
        destinations=[{"name": "orthanc", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": destination_port}],
        **settings,
    )


def sr_in_orthanc(orthanc: Orthanc, study_uid: str) -> list[str]:
    """Orthanc IDs of the SR instances in the study."""
    study = orthanc.study_id(study_uid)
    if study is None:
        return []
    instances = []
    for series in orthanc.rest(f"/studies/{study}/series"):
        if series["MainDicomTags"].get("Modality") == "SR":
            instances += series["Instances"]
    return instances


def test_orthanc_pushes_studies_and_finds_the_reports_in_the_same_studies(
    make_node, make_orthanc, tmp_path: Path
) -> None:
    node_port = free_port()
    orthanc = make_orthanc(modalities={"node": (NODE_AE, "127.0.0.1", node_port)})
    node = inferring_node(make_node, orthanc.dicom_port, port=node_port)
    node.start()
    studies = [
        write_phantom_study(tmp_path / "phantoms", seed=91, index=i, positive=i == 0, slices=32, matrix=256)
        for i in range(2)
    ]
    ids = []
    for study in studies:
        for path in sorted(study.directory.glob("*.dcm")):  # type: ignore[union-attr]
            orthanc.upload(path)
        ids.append(orthanc.study_id(study.study_uid))
    started = time.perf_counter()
    job = orthanc.rest(
        "/modalities/node/store", data=json.dumps({"Resources": ids, "Synchronous": True}).encode(), method="POST"
    )
    assert (job["InstancesCount"], job["FailedInstancesCount"]) == (64, 0), job
    for study in studies:
        details = node.wait_for_state(study.study_uid, "sent", timeout=120)
        assert details["calling_aets"] == ["ORTHANC"] and details["instances"] == 32
        [sr_id] = wait_until(lambda s=study: sr_in_orthanc(orthanc, s.study_uid), 30, "the SR in Orthanc")
        target = tmp_path / f"{study.study_uid}.dcm"
        target.write_bytes(orthanc.rest(f"/instances/{sr_id}/file", raw=True))
        report = hd.sr.srread(target)
        assert report.StudyInstanceUID == study.study_uid
        group = report.content.get_image_measurement_groups()[0]
        certainty = group.get_measurements(name=codes.DCM.CertaintyOfFinding)[0]
        assert float(certainty.value) == pytest.approx(details["result"]["probability"], abs=1e-6)
    print(f"Orthanc round trip for 2 studies: {time.perf_counter() - started:.1f} s (stable_seconds=1)")


def test_orthanc_stopped_for_a_while_then_gets_exactly_one_report(make_node, make_orthanc, tmp_path: Path) -> None:
    orthanc = make_orthanc(start=False)
    node = inferring_node(make_node, orthanc.dicom_port, delivery={"initial_backoff_s": 0.5, "max_backoff_s": 2})
    node.start()
    study = write_phantom_study(tmp_path / "phantoms", seed=92, index=0, positive=True, slices=32, matrix=256)
    files = sorted(study.directory.glob("*.dcm"))  # type: ignore[union-attr]
    assert send(node.port, files) == [0] * len(files)
    node.wait_for_state(study.study_uid, "reported", timeout=120)
    wait_until(lambda: node.study(study.study_uid)["deliveries"][0]["attempts"] >= 2, 30, "failed attempts")
    orthanc.start()
    details = node.wait_for_state(study.study_uid, "sent", timeout=30)
    # Sent with nothing pending: no further send is scheduled, so what Orthanc holds now is final
    # (Orthanc answers a C-STORE only once it has stored the instance).
    assert [d["state"] for d in details["deliveries"]] == ["sent"]
    assert len(sr_in_orthanc(orthanc, study.study_uid)) == 1
