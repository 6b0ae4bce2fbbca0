"""A node killed mid-transfer loses nothing it answered Success for, and resumes where it was."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import generate_uid

from dicom_factory import ct_slice
from nodes import NODE_AE, TRIAGENODE, NodeProcess, free_port, store_scu, wait_until


def test_sigkill_mid_transfer_keeps_every_acknowledged_instance(make_node, tmp_path: Path) -> None:
    node: NodeProcess = make_node(stable_seconds=2)
    study_uid, series_uid = generate_uid(), generate_uid()
    slices = [ct_slice(study_uid, series_uid, i, rows=256, columns=256) for i in range(400)]
    acknowledged: list[str] = []
    enough = threading.Event()

    def sender() -> None:
        assoc = store_scu("MODALITY").associate("127.0.0.1", node.port, ae_title=NODE_AE)
        try:
            for ds in slices:
                status = assoc.send_c_store(ds)
                if not status or "Status" not in status:
                    return  # the node died under us
                if status.Status == 0:
                    acknowledged.append(ds.SOPInstanceUID)
                if len(acknowledged) >= 40:
                    enough.set()
        finally:
            enough.set()
            if assoc.is_established:
                assoc.abort()

    thread = threading.Thread(target=sender)
    thread.start()
    assert enough.wait(60), "the node never acknowledged 40 instances"
    node.stop(signal.SIGKILL)
    thread.join(60)
    assert 40 <= len(acknowledged) < 400, "the kill should land in the middle of the study"

    node.start()
    details = node.study(study_uid)
    assert details is not None
    stored = {}
    for path in (node.data_dir / "studies").rglob("*.dcm"):
        stored[path.stem] = path
    missing = [uid for uid in acknowledged if uid not in stored]
    assert missing == [], f"{len(missing)} acknowledged instances lost"
    for uid in acknowledged:
        ds = dcmread(stored[uid])
        assert ds.SOPInstanceUID == uid and len(ds.PixelData) == 256 * 256 * 2
    assert details["instances"] >= len(acknowledged)
    assert details["instances"] == len(stored), "database and disk must agree"
    assert not any((node.data_dir / "spool").iterdir()), "the restart must empty the spool"
    assert "receiving_studies_resumed=1" in node.log()

    # The restart gave the study a full stability window again, then it completed.
    assert details["state"] == "receiving"
    node.wait_for_state(study_uid, "queued", timeout=20)


def test_sigterm_finishes_the_open_association_before_stopping(make_node, tmp_path: Path) -> None:
    node: NodeProcess = make_node(shutdown_grace_s=20)
    study_uid, series_uid = generate_uid(), generate_uid()
    slices = [ct_slice(study_uid, series_uid, i, rows=128, columns=128) for i in range(60)]
    statuses: list[int] = []
    started = threading.Event()

    def sender() -> None:
        assoc = store_scu("MODALITY").associate("127.0.0.1", node.port, ae_title=NODE_AE)
        for ds in slices:
            status = assoc.send_c_store(ds)
            statuses.append(int(status.Status) if status and "Status" in status else -1)
            started.set()
        assoc.release()

    thread = threading.Thread(target=sender)
    thread.start()
    assert started.wait(30)
    assert node.stop(signal.SIGTERM, timeout=60) == 0
    thread.join(30)
    assert statuses == [0] * 60, "an association open at SIGTERM may finish within the grace period"
    log = node.log()
    assert "node.stopping signal=SIGTERM" in log and "node.stopped" in log
    wait_until(lambda: "receiver.stopped" in node.log(), 5, "receiver stop logged")


def test_a_second_node_on_the_same_data_dir_is_refused(node: NodeProcess) -> None:
    result = subprocess.run(
        [TRIAGENODE, "serve", "--config", str(node.config_path)],
        env={**os.environ, "TRIAGENODE_NODE__PORT": str(free_port())},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert f"another node (pid {node.process.pid}) is running with data_dir {node.data_dir}" in result.stderr
    assert node.cli("status").returncode == 0, "the first node keeps running"


def test_a_port_in_use_is_a_clear_error(make_node, node: NodeProcess) -> None:
    other = make_node("other", start=False)
    other.config_path.write_text(other.config_path.read_text().replace(f"port = {other.port}", f"port = {node.port}"))
    result = subprocess.run(
        [TRIAGENODE, "serve", "--config", str(other.config_path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    assert f"cannot start on 127.0.0.1:{node.port}" in result.stderr and "Address already in use" in result.stderr
