"""From C-STORE to a Structured Report in the destination: the node's whole loop, with real peers."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from pynetdicom.sop_class import Comprehensive3DSRStorage, ComprehensiveSRStorage

from triagenode.inference.phantom import write_phantom_study

from dicom_factory import ct_slice, write_study
from nodes import NODE_AE, TRIAGENODE, NodeProcess, free_port, send, study_events, wait_until


@pytest.fixture
def phantom_study(tmp_path: Path) -> Path:
    study = write_phantom_study(tmp_path / "phantoms", seed=77, index=0, positive=True, slices=32, matrix=256)
    assert study.directory is not None
    return study.directory


def start_inferring_node(make_node, pacs_port: int, **extra) -> NodeProcess:
    return make_node(
        inference={"workers": 1, "device": "cpu"},
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}],
        **extra,
    )


def test_a_study_comes_back_as_a_structured_report(make_node, make_pacs, phantom_study: Path, tmp_path: Path) -> None:
    pacs = make_pacs()
    node = start_inferring_node(make_node, pacs.port)
    files = sorted(phantom_study.glob("*.dcm"))
    if shutil.which("storescu"):
        sent = subprocess.run(
            ["storescu", "-aec", NODE_AE, "127.0.0.1", str(node.port), *map(str, files)],
            env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"}, capture_output=True, timeout=120,
        )
        assert sent.returncode == 0, sent.stderr
    else:
        assert send(node.port, files) == [0] * len(files)
    study_uid = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    details = node.wait_for_state(study_uid, "sent", timeout=120)
    wait_until(lambda: len(pacs.received) == 1, 10, "one SR at the destination")
    sr = pacs.received[0]
    assert sr.StudyInstanceUID == study_uid
    assert sr.SOPClassUID == Comprehensive3DSRStorage

    result = details["result"]
    assert result["model"] == "triagenode-demo-lung-nodule" and result["slices"] == 32
    assert set(result["timings_ms"]) >= {"decode", "preprocess", "model", "report"}
    assert details["deliveries"] == [
        {"destination": "pacs", "state": "sent", "attempts": 1, "next_attempt_at": None, "last_error": None,
         "sent_at": details["deliveries"][0]["sent_at"], "model": "default"}
    ]
    assert [e["to"] for e in study_events(details)][:4] == ["receiving", "queued", "processing", "reported"]
    assert study_events(details) == details["events"], "a one-model node tells each change once, as the study's"
    assert sr.SOPInstanceUID == result["sr_sop_instance_uid"]

    offline = json.loads(
        subprocess.run([TRIAGENODE, "infer", str(phantom_study), "--json", "--device", "cpu"], capture_output=True,
                       text=True, timeout=300).stdout
    )[0]
    assert offline["probability"] == pytest.approx(result["probability"], abs=1e-6)
    assert offline["key_instance_uid"] == result["key_instance_uid"]
    shown = node.cli_json("queue", "show", study_uid)
    assert shown["result"]["probability"] == result["probability"]


def test_with_report_not_applicable_a_localiser_only_study_gets_an_indeterminate_report(make_node, make_pacs) -> None:
    pacs = make_pacs()
    node = make_node(
        inference={"workers": 1, "device": "cpu", "report_not_applicable": True},
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}],
    )
    study_uid, series_uid = generate_uid(), generate_uid()
    scouts = [ct_slice(study_uid, series_uid, index) for index in range(2)]
    for ds in scouts:
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    assert send(node.port, scouts) == [0, 0]
    details = node.wait_for_state(study_uid, "sent", timeout=120)
    assert details["result"]["applicable"] is False and "a localiser" in details["result"]["reason"]
    wait_until(lambda: len(pacs.received) == 1, 10, "one SR at the destination")
    [sr] = pacs.received
    assert sr.StudyInstanceUID == study_uid and "not assessed" in sr.SeriesDescription
    assert sr.SOPInstanceUID == details["result"]["sr_sop_instance_uid"]


def test_a_destination_that_is_down_gets_exactly_one_report_once_it_is_up(
    make_node, make_pacs, phantom_study: Path
) -> None:
    port = free_port()
    node = make_node(
        inference={"workers": 1, "device": "cpu"},
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": port}],
        delivery={"initial_backoff_s": 0.5, "max_backoff_s": 2, "max_attempts": 30},
    )
    files = sorted(phantom_study.glob("*.dcm"))
    assert send(node.port, files) == [0] * len(files)
    study_uid = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    node.wait_for_state(study_uid, "reported", timeout=120)
    wait_until(
        lambda: (s := node.study(study_uid)) and s["deliveries"] and s["deliveries"][0]["attempts"] >= 2,
        30,
        "at least two failed attempts",
    )
    assert "no association" in node.study(study_uid)["deliveries"][0]["last_error"]
    pacs = make_pacs(port=port)
    details = node.wait_for_state(study_uid, "sent", timeout=30)
    [delivery] = details["deliveries"]
    assert delivery["state"] == "sent" and delivery["attempts"] >= 3, "failed attempts, then one that succeeded"
    assert len(pacs.received) == 1, "a sent delivery is not due again: no duplicate can follow"
    assert "delivery.failed" in node.log() and "delivery.sent" in node.log()


def _worker_pids(node: NodeProcess) -> list[int]:
    return [int(line.split("pid=")[1].split()[0]) for line in node.log().splitlines() if "worker.started" in line]


def _children(pid: int) -> set[int]:
    children = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.add(int(stat.parent.name))
    return children


def _node_busy_with_a_study(make_node, tmp_path: Path, slices: int, matrix: int) -> tuple[NodeProcess, str, int]:
    """A node (one CPU worker, two decoders) processing a CT study: (node, study UID, worker pid).

    The study's size makes the time to kill something in; its pixels (noise) do not matter.
    """
    study = write_study(tmp_path / "big", slices=slices, rows=matrix, columns=matrix)
    node = make_node(inference={"workers": 1, "device": "cpu", "decode_processes": 2})
    wait_until(lambda: "worker.ready" in node.log(), 60, "the worker loaded its model")
    assert send(node.port, study.files) == [0] * len(study.files)
    wait_until(lambda: (s := node.study(study.study_uid)) and s["state"] == "processing", 60, "processing", 0.02)
    return node, study.study_uid, _worker_pids(node)[-1]


def test_a_worker_killed_mid_study_is_replaced_and_the_study_is_processed_once(make_node, tmp_path: Path) -> None:
    import os
    import signal

    node, study_uid, victim = _node_busy_with_a_study(make_node, tmp_path, slices=300, matrix=256)
    decoders = _children(victim) - {victim}
    assert len(decoders) >= 2, "the worker decodes in its own processes"
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in decoders), 15, "its decoders exit too")

    details = node.wait_for_state(study_uid, "reported", timeout=120)
    reasons = [e["reason"] for e in study_events(details)]
    assert any("its worker died" in reason for reason in reasons), reasons
    assert [e["to"] for e in study_events(details)].count("reported") == 1
    assert details["processing_attempts"] == 1, "one interrupted run counts; the successful one does not"
    assert details["result"]["slices"] == 300
    assert len(_worker_pids(node)) == 2, "the supervisor started a new worker"
    assert "worker.died" in node.log()


def test_a_decoder_killed_mid_study_is_replaced_and_the_study_is_reported_once(make_node, tmp_path: Path) -> None:
    import os
    import signal

    node, study_uid, worker = _node_busy_with_a_study(make_node, tmp_path, slices=200, matrix=512)
    decoders = _children(worker)
    os.kill(min(decoders), signal.SIGKILL)

    details = node.wait_for_state(study_uid, "reported", timeout=120)
    assert [e["to"] for e in study_events(details)].count("reported") == 1 and details["result"]["slices"] == 200
    # Killed while the study decoded, the death costs one attempt, with its event; killed just before
    # or after (the loader replaces a broken pool at each study's start), it costs none. Never more.
    death = "a decoder process died (out of memory?) on attempt 1 of 3"
    died = [e for e in study_events(details) if death in e["reason"]]
    assert details["processing_attempts"] == len(died) <= 1, details["events"]
    assert _worker_pids(node) == [worker], "the worker itself lives on"
    fresh = _children(worker)
    assert len(fresh) == 2 and not fresh & decoders, "with two fresh decoders"


def test_a_node_killed_before_delivery_delivers_after_restart(make_node, make_pacs, phantom_study: Path) -> None:
    import signal

    port = free_port()
    node = start_inferring_node(make_node, port)
    files = sorted(phantom_study.glob("*.dcm"))
    assert send(node.port, files) == [0] * len(files)
    study_uid = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    node.wait_for_state(study_uid, "reported", timeout=120)
    wait_until(lambda: node.study(study_uid)["deliveries"][0]["attempts"] >= 1, 30, "a failed attempt")
    node.stop(signal.SIGKILL)

    pacs = make_pacs(port=port)
    node.start()
    details = node.wait_for_state(study_uid, "sent", timeout=60)
    assert [d["state"] for d in details["deliveries"]] == ["sent"]
    assert len(pacs.received) == 1
    assert pacs.received[0].StudyInstanceUID == study_uid


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[tuple[int, str, Path]]:
    """DCMTK's storescp as a destination: (port, AE title, the folder it writes what it receives to)."""
    if shutil.which("storescp") is None:
        pytest.skip("needs DCMTK (.ci/run installs it)")
    port, ae_title, out = free_port(), "STORESCP", tmp_path / "received"
    out.mkdir(parents=True)
    process = subprocess.Popen(
        ["storescp", "-aet", ae_title, "-od", str(out), "-uf", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    wait_until(lambda: subprocess.run(["echoscu", "-aec", ae_title, "127.0.0.1", str(port)],
                                      capture_output=True).returncode == 0, 10, "storescp answers")
    yield port, ae_title, out
    process.terminate()
    process.wait(10)


def test_a_hanging_destination_delays_no_other_end_to_end(
    make_node, make_hanging_peer, storescp: tuple[int, str, Path], phantom_study: Path
) -> None:
    """Two destinations: DCMTK storescp and a peer that accepts TCP and never answers (30 s per attempt).

    The healthy one gets the report as soon as the study is reported; the study stays ``reported``
    while the other is pending, and ``status`` shows where reports go.
    """
    hanging = make_hanging_peer()
    port, ae_title, received_dir = storescp
    node = make_node(
        inference={"workers": 1, "device": "cpu"},
        destinations=[{"name": "stuck", "ae_title": "STUCK", "host": "127.0.0.1", "port": hanging.port},
                      {"name": "pacs", "ae_title": "STORESCP", "host": "127.0.0.1", "port": port}],
    )
    files = sorted(phantom_study.glob("*.dcm"))
    assert send(node.port, files) == [0] * len(files)
    study_uid = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    node.wait_for_state(study_uid, "reported", timeout=120)
    reported = time.monotonic()
    wait_until(lambda: list(received_dir.glob("*")), 10, "storescp has the report")
    took = time.monotonic() - reported
    assert took < 5, f"the healthy destination waited {took:.1f} s behind the hanging one"
    details = wait_until(
        lambda: (s := node.study(study_uid))
        and {d["destination"]: d["state"] for d in s["deliveries"]} == {"pacs": "sent", "stuck": "pending"}
        and s,
        5,
        "pacs sent, stuck pending",
    )
    assert details["state"] == "reported"
    [received] = list(received_dir.glob("*"))
    assert dcmread(received).SOPInstanceUID == details["result"]["sr_sop_instance_uid"]
    destinations = {d["name"]: d for d in node.cli_json("status")["destinations"]}
    assert (destinations["pacs"]["sent"], destinations["stuck"]["pending"]) == (1, 1)
    print(f"\nthe healthy destination had the report {took:.2f} s after the study was reported")


def test_resend_builds_the_report_in_the_configured_sr_class(make_node, make_pacs, phantom_study: Path) -> None:
    """An archive that refuses 3D SR: the delivery fails; sr_sop_class = comprehensive and
    ``queue resend`` get it a Comprehensive SR of the same result."""
    archive = make_pacs("ARCHIVE", sr_classes=(ComprehensiveSRStorage,))
    node = make_node(
        inference={"workers": 1, "device": "cpu", "sr_sop_class": "comprehensive3d"},
        destinations=[{"name": "archive", "ae_title": "ARCHIVE", "host": "127.0.0.1", "port": archive.port}],
        delivery={"max_attempts": 1},
    )
    files = sorted(phantom_study.glob("*.dcm"))
    assert send(node.port, files) == [0] * len(files)
    study_uid = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    failed = node.wait_for_state(study_uid, "failed", timeout=120)
    assert "accepts no presentation context" in failed["deliveries"][0]["last_error"]
    old_uid = failed["result"]["sr_sop_instance_uid"]

    node.config_path.write_text(
        node.config_path.read_text().replace('sr_sop_class = "comprehensive3d"', 'sr_sop_class = "comprehensive"')
    )
    resent = node.cli("queue", "resend", study_uid)
    assert "report rebuilt as Comprehensive SR" in resent.stdout, resent.stdout
    node.wait_for_state(study_uid, "sent", timeout=30)
    wait_until(lambda: len(archive.received) == 1, 5, "the archive has the report")
    [sr] = archive.received
    assert sr.SOPClassUID == ComprehensiveSRStorage and sr.StudyInstanceUID == study_uid
    shown = node.cli_json("queue", "show", study_uid)
    assert shown["result"]["sr_sop_instance_uid"] == sr.SOPInstanceUID != old_uid
    assert shown["result"]["probability"] == failed["result"]["probability"]


def test_a_worker_whose_node_dies_while_it_is_still_starting_exits_too(make_node) -> None:
    """Killed before its worker has even imported torch, the node must not leave the worker behind."""
    import os
    import signal

    node = make_node(inference={"workers": 1, "device": "cpu"})
    [worker] = wait_until(lambda: _worker_pids(node), 30, "the worker spawned")
    assert "worker.ready" not in node.log(), "the node is killed while its worker is still starting"
    node.stop(signal.SIGKILL)

    def gone() -> bool:
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            return True
        return Path(f"/proc/{worker}/stat").read_text().split(")")[1].split()[0] == "Z"

    wait_until(gone, 15, f"worker {worker} left behind by its dead node")
