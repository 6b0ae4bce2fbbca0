"""Success means stored: no failure path, race, full disk or lost file may leave a Success without its file."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from pynetdicom.sop_class import CTImageStorage

from triagenode.storage.queue import ReceivedInstance, StudyQueue

from dicom_factory import ct_slice
from nodes import NODE_AE, NodeProcess, send, store_scu


def stored_file(node: NodeProcess, sop_instance_uid: str) -> Path | None:
    """The file the node's row for an instance points at, or None when there is no row."""
    with sqlite3.connect(node.data_dir / "triagenode.db") as db:
        row = db.execute("SELECT path FROM instances WHERE sop_instance_uid = ?", (sop_instance_uid,)).fetchone()
    return None if row is None else node.data_dir / row[0]


def test_a_resend_while_the_first_handler_times_out_on_a_locked_database_keeps_its_file(
    node: NodeProcess,
) -> None:
    """The modality's own timeout makes it send X again on a new association while the first still waits.

    Another process holds the database's write lock for 35 s: the first
    handler gives up after the 30 s busy timeout (0xA702), the second (sent
    10 s later) gets the lock and answers Success. Its file must be there,
    and stay there.
    """
    instance = ct_slice(generate_uid(), generate_uid(), 0)
    statuses: dict[str, int] = {}

    def send_on_own_association(name: str) -> None:
        ae = store_scu(name)
        ae.dimse_timeout = 90
        assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AE)
        status = assoc.send_c_store(instance)
        statuses[name] = int(status.Status) if status and "Status" in status else -1
        assoc.release()

    lock = sqlite3.connect(node.data_dir / "triagenode.db", isolation_level=None, timeout=30)
    lock.execute("BEGIN EXCLUSIVE")
    first = threading.Thread(target=send_on_own_association, args=("FIRST",))
    second = threading.Thread(target=send_on_own_association, args=("SECOND",))
    first.start()
    time.sleep(10)  # the first handler's 30 s busy timeout ends at ~30 s, the second's at ~40 s
    second.start()
    time.sleep(25)
    lock.execute("ROLLBACK")  # at ~35 s: after the first gave up, while the second still waits
    lock.close()
    first.join(90)
    second.join(90)

    assert statuses == {"FIRST": 0xA702, "SECOND": 0x0000}, statuses
    path = stored_file(node, instance.SOPInstanceUID)
    assert path is not None and path.is_file(), "Success was answered for a file that is not on disk"
    assert send(node.port, [instance]) == [0], "a later re-send is a duplicate of a stored file"
    assert path.is_file()
    assert not any((node.data_dir / "spool").iterdir())


def test_a_row_whose_file_is_missing_is_not_a_duplicate_and_a_resend_restores_it(node: NodeProcess) -> None:
    """A crash between an instance's row and its rename leaves a row without a file; a re-send fills it in."""
    instance = ct_slice(generate_uid(), generate_uid(), 0)
    relative = f"studies/{instance.StudyInstanceUID}/{instance.SeriesInstanceUID}/{instance.SOPInstanceUID}.dcm"
    queue = StudyQueue(node.overview._engine)
    queue.record_instance(
        ReceivedInstance(
            study_uid=instance.StudyInstanceUID,
            series_uid=instance.SeriesInstanceUID,
            sop_instance_uid=instance.SOPInstanceUID,
            sop_class_uid=CTImageStorage,
            transfer_syntax_uid="1.2.840.10008.1.2.1",
            path=relative,
            size=1,
            calling_ae="CRASHED",
        )
    )
    assert not (node.data_dir / relative).exists()
    assert send(node.port, [instance]) == [0]
    assert (node.data_dir / relative).is_file(), "the re-send was taken for a duplicate and stored nothing"


def _mount_tmpfs(directory: Path, size_mb: int) -> None:
    directory.mkdir(parents=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(directory)], capture_output=True, text=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root): {result.stderr.strip()}")


@pytest.fixture
def small_disk(tmp_path: Path):
    mount_point = tmp_path / "small-disk"
    _mount_tmpfs(mount_point, 48)
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_an_instance_larger_than_the_free_space_is_refused_early_and_the_node_keeps_working(
    make_node, small_disk: Path
) -> None:
    node: NodeProcess = make_node(data_dir=str(small_disk / "data"), min_free_disk_mb=1)
    node.data_dir = small_disk / "data"
    study_uid, series_uid = generate_uid(), generate_uid()
    too_big = ct_slice(study_uid, series_uid, 0, rows=6144, columns=6144)  # 72 MiB on a 48 MiB disk
    small = ct_slice(study_uid, series_uid, 1)
    assert send(node.port, [too_big, small]) == [0xA700, 0x0000], "refused with a status, association intact"
    assert not any((node.data_dir / "spool").iterdir()), "the partial data set left the spool at once"
    assert "spool.refused" in node.log()
    assert node.cli("status").returncode == 0

    # Now fill the disk to the last byte: status and stop still work.
    filler = small_disk / "filler"
    subprocess.run(["fallocate", "-l", f"{shutil.disk_usage(small_disk).free}", str(filler)], check=False)
    with open(filler, "ab") as handle:  # whatever fallocate left
        try:
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
        except OSError:
            pass
    assert send(node.port, [ct_slice(study_uid, series_uid, 2)]) == [0xA700]
    status = node.cli("status", check=False)
    assert status.returncode == 0 and "running" in status.stdout, status.stdout + status.stderr
    assert node.stop(timeout=20) == 0
    assert "Traceback" not in node.log()


def test_the_nodes_own_report_routed_back_does_not_reopen_its_study(make_node, tmp_path: Path) -> None:
    """A PACS that auto-forwards routes the node's SR back to it: stored, but no second run and no second send."""
    from triagenode.inference.phantom import write_phantom_study

    study = write_phantom_study(tmp_path / "phantoms", seed=81, index=0, positive=True, slices=16, matrix=128)
    assert study.directory is not None
    node: NodeProcess = make_node(inference={"workers": 1, "device": "cpu"})
    files = sorted(study.directory.glob("*.dcm"))
    assert send(node.port, files) == [0] * len(files)
    study_uid = node.overview.list_studies()[0]["study_uid"]
    details = node.wait_for_state(study_uid, "reported", timeout=120)
    events = len(details["events"])
    [report] = (node.data_dir / "reports" / study_uid).glob("*.dcm")

    from pydicom import dcmread
    from pynetdicom.sop_class import Comprehensive3DSRStorage, ComprehensiveSRStorage

    syntaxes = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]
    contexts = [(Comprehensive3DSRStorage, syntaxes), (ComprehensiveSRStorage, syntaxes)]
    assert send(node.port, [dcmread(report)], contexts=contexts) == [0]
    # Success means the row is committed: the study's state and stability clock are final now.
    after = node.study(study_uid)
    assert after is not None and after["state"] == "reported", after
    assert len(after["events"]) == events, "no re-open, so no second run and no second report"
    assert after["last_instance_at"] == details["last_instance_at"], "the stability clock did not move"
    assert after["instances"] == details["instances"] + 1, "the report is stored with its study"


def test_the_spool_refuses_a_data_set_the_disk_cannot_take_and_frees_its_space_at_once(tmp_path: Path) -> None:
    """Without root for a small disk: the same guard, with the free space it sees given by the test."""
    from triagenode.daemon.spool import SpoolFile

    free = {"bytes": 10_000}
    spool = SpoolFile(tmp_path, min_free_bytes=1_000, free_bytes=lambda: free["bytes"])
    assert spool.write(b"x" * 4_000) == 4_000 and spool.refused is None
    free["bytes"] = 4_500  # the disk filled meanwhile
    assert spool.write(b"y" * 4_000) == 4_000, "the rest of the data set is taken off the wire"
    assert spool.refused is not None and "min_free_disk_mb" in spool.refused
    assert not Path(spool.name).exists(), "what was written is deleted at once"
    assert spool.write(b"z" * 10) == 10 and spool.written == 4_000
    spool.file.flush()
    spool.close()
