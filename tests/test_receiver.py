"""The node as a DICOM receiver, driven by real peers: pynetdicom SCUs and DCMTK's tools."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import MRImageStorage, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from dicom_factory import PATIENT_IDENTIFIERS, ct_slice, write_study
from nodes import NODE_AE, TRIAGENODE, NodeProcess, send, wait_until

needs_dcmtk = pytest.mark.skipif(shutil.which("storescu") is None, reason="DCMTK (Debian package dcmtk) not installed")
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def assert_no_patient_identifiers(node: NodeProcess) -> None:
    log = node.log()
    for identifier in PATIENT_IDENTIFIERS:
        assert identifier not in log, f"patient identifier {identifier!r} in the node's log"


def stored_files(node: NodeProcess) -> list[Path]:
    return sorted((node.data_dir / "studies").rglob("*.dcm"))


def spool_is_empty(node: NodeProcess) -> bool:
    return not any((node.data_dir / "spool").iterdir())


def test_echo_answers_pynetdicom_dcmtk_and_the_cli(node: NodeProcess) -> None:
    ae = AE(ae_title="ECHOSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AE)
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()

    result = subprocess.run(
        [TRIAGENODE, "echo", f"{NODE_AE}@127.0.0.1:{node.port}"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    assert "Success in" in result.stdout and " ms" in result.stdout

    if shutil.which("echoscu"):
        dcmtk = subprocess.run(
            ["echoscu", "-aec", NODE_AE, "127.0.0.1", str(node.port)], env=DCMTK_ENV, capture_output=True, timeout=30
        )
        assert dcmtk.returncode == 0, dcmtk.stderr


def test_echo_to_a_closed_port_fails_with_exit_1() -> None:
    from nodes import free_port

    result = subprocess.run(
        [TRIAGENODE, "echo", f"PACS@127.0.0.1:{free_port()}", "--timeout", "3"], capture_output=True, text=True
    )
    assert result.returncode == 1
    assert "C-ECHO to PACS@127.0.0.1" in result.stderr and "failed" in result.stderr


def test_three_series_over_several_associations_become_one_queued_study(node: NodeProcess, tmp_path: Path) -> None:
    study = write_study(tmp_path / "study", series=3, slices=4)
    for index, files in enumerate(study.series.values()):
        assert send(node.port, files, calling_ae=f"MODALITY{index}") == [0] * 4

    receiving = node.study(study.study_uid)
    assert receiving is not None and receiving["state"] == "receiving"
    queued = node.wait_for_state(study.study_uid, "queued", timeout=node.stable_seconds + 15)
    assert queued["instances"] == 12
    assert queued["series_count"] == 3
    assert {s["series_uid"] for s in queued["series"]} == set(study.series)
    assert all(s["instances"] == 4 for s in queued["series"])
    assert queued["calling_aets"] == ["MODALITY0", "MODALITY1", "MODALITY2"]
    assert queued["modality"] == "CT" and queued["study_date"] == "20261127"
    study_events = [(e["from"], e["to"]) for e in queued["events"] if e["model"] is None]
    assert study_events == [(None, "receiving"), ("receiving", "queued")]
    assert [(t["model"], t["state"]) for t in queued["tasks"]] == [("default", "queued")]
    assert len(stored_files(node)) == 12
    assert spool_is_empty(node)
    assert "association.closed peer_ae=MODALITY1 peer_ip=127.0.0.1 instances=4" in node.log()
    assert_no_patient_identifiers(node)


def test_a_resent_study_is_success_and_stored_once(node: NodeProcess, tmp_path: Path) -> None:
    study = write_study(tmp_path / "study", slices=5)
    assert send(node.port, study.files) == [0] * 5
    node.wait_for_state(study.study_uid, "queued", timeout=node.stable_seconds + 15)
    assert send(node.port, study.files) == [0] * 5  # the PACS re-sends after a timeout

    details = node.study(study.study_uid)
    assert details is not None
    assert details["instances"] == 5
    assert details["state"] == "queued", "a re-send of known instances must not re-open the study"
    assert len(stored_files(node)) == 5
    wait_until(lambda: "duplicates=5" in node.log(), 10, "association line with duplicates=5")


def test_a_late_instance_reopens_a_queued_study(node: NodeProcess, tmp_path: Path) -> None:
    study = write_study(tmp_path / "study", slices=3)
    assert send(node.port, study.files) == [0, 0, 0]
    node.wait_for_state(study.study_uid, "queued", timeout=node.stable_seconds + 15)

    series_uid = next(iter(study.series))
    late = ct_slice(study.study_uid, series_uid, 3)
    assert send(node.port, [late]) == [0]
    reopened = node.study(study.study_uid)
    assert reopened is not None and reopened["state"] == "receiving"
    assert reopened["instances"] == 4
    assert "re-opened" in reopened["events"][-1]["reason"]

    again = node.wait_for_state(study.study_uid, "queued", timeout=node.stable_seconds + 15)
    assert [e["to"] for e in again["events"] if e["model"] is None] == ["receiving", "queued", "receiving", "queued"]


def test_calling_and_called_ae_titles_are_checked(make_node, tmp_path: Path) -> None:
    node = make_node(allowed_calling_aets=["PACS", "CT1"])
    study = write_study(tmp_path / "study", slices=1)

    ae = AE(ae_title="EVIL")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AE)
    assert assoc.is_rejected

    wrong_called = AE(ae_title="PACS")
    wrong_called.add_requested_context(CTImageStorage)
    assoc = wrong_called.associate("127.0.0.1", node.port, ae_title="SOMEONEELSE")
    assert assoc.is_rejected

    assert send(node.port, study.files, calling_ae="PACS") == [0]
    log = wait_until(lambda: "peer_ae=EVIL" in node.log() and node.log(), 10, "refusal logged")
    assert "association.refused peer_ae=EVIL peer_ip=127.0.0.1" in log
    assert "calling AE title not in allowed_calling_aets" in log
    assert "called AE title 'SOMEONEELSE' is not this node's" in log
    assert node.study(study.study_uid) is not None


def _file_with_mismatched_meta(path: Path) -> Path:
    """A file whose meta names another SOP Instance than its dataset: pynetdicom sends the meta's."""
    ds = ct_slice(generate_uid(), generate_uid(), 0)
    ds.save_as(path, enforce_file_format=True)
    uid = ds.SOPInstanceUID.encode()
    other = uid[:-1] + (b"1" if uid[-1:] != b"1" else b"2")
    data = path.read_bytes()
    path.write_bytes(data.replace(uid, other, 1))  # the first occurrence is in the file meta
    return path


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # the test builds bad UIDs on purpose
def test_malformed_datasets_get_failure_statuses_and_the_association_keeps_working(
    node: NodeProcess, tmp_path: Path
) -> None:
    bad_uid = ct_slice(generate_uid(), generate_uid(), 0)
    bad_uid.StudyInstanceUID = "1.2.840.abc"
    traversal = ct_slice(generate_uid(), generate_uid(), 0)
    traversal.SeriesInstanceUID = "../../../../tmp/evil"
    no_series = ct_slice(generate_uid(), generate_uid(), 0)
    del no_series.SeriesInstanceUID
    good = ct_slice(generate_uid(), generate_uid(), 0)
    truncated = Path(get_testdata_file("MR_truncated.dcm"))
    mismatched = _file_with_mismatched_meta(tmp_path / "mismatch.dcm")

    contexts = [
        (CTImageStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]),
        (MRImageStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]),
    ]
    statuses = send(node.port, [bad_uid, traversal, no_series, truncated, mismatched, good], contexts=contexts)
    assert statuses == [0xC002, 0xC002, 0xC001, 0xC000, 0xA900, 0x0000]

    assert [p.stem for p in stored_files(node)] == [good.SOPInstanceUID]
    assert not (tmp_path.parent / "evil").exists() and not Path("/tmp/evil").exists()
    assert spool_is_empty(node)
    assert node.study(good.StudyInstanceUID) is not None
    assert node.snapshot().counts["receiving"] == 1, "nothing refused may reach the queue"
    log = node.log()
    assert "status=0xC000 reason='dataset truncated" in log
    assert "status=0xA900" in log
    assert "0xC211" not in log
    assert_no_patient_identifiers(node)


def test_below_the_free_disk_floor_stores_are_refused_with_A700(make_node, tmp_path: Path) -> None:
    node = make_node(min_free_disk_mb=1_000_000_000)  # a petabyte: always below
    study = write_study(tmp_path / "study", slices=2)
    assert send(node.port, study.files) == [0xA700, 0xA700]
    assert stored_files(node) == []
    assert node.study(study.study_uid) is None
    assert "min_free_disk_mb" in node.log()


def test_eight_concurrent_associations_lose_nothing(node: NodeProcess, tmp_path: Path) -> None:
    studies = [write_study(tmp_path / f"study{i}", slices=12) for i in range(8)]
    results: dict[int, list[int]] = {}

    def sender(index: int) -> None:
        results[index] = send(node.port, studies[index].files, calling_ae=f"SCU{index}")

    threads = [threading.Thread(target=sender, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert results == {i: [0] * 12 for i in range(8)}
    for study in studies:
        details = node.study(study.study_uid)
        assert details is not None and details["instances"] == 12
    assert len(stored_files(node)) == 96


def _dataset_bytes(path: Path) -> bytes:
    """The bytes after the file meta: what travelled in the C-STORE."""
    ds = dcmread(path, stop_before_pixels=True)
    start = 132 + 12 + int(ds.file_meta.FileMetaInformationGroupLength)
    return path.read_bytes()[start:]


@needs_dcmtk
def test_dcmtk_storescu_study_is_stored_byte_for_byte(node: NodeProcess, tmp_path: Path) -> None:
    study = write_study(tmp_path / "study", series=2, slices=5)
    result = subprocess.run(
        ["storescu", "-aec", NODE_AE, "-aet", "DCMTKSCU", "127.0.0.1", str(node.port), *map(str, study.files)],
        env=DCMTK_ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    details = node.wait_for_state(study.study_uid, "queued", timeout=node.stable_seconds + 15)
    assert details["instances"] == 10 and details["calling_aets"] == ["DCMTKSCU"]
    stored = {p.stem: p for p in stored_files(node)}
    for sent in study.files:
        uid = dcmread(sent, stop_before_pixels=True).SOPInstanceUID
        assert _dataset_bytes(stored[uid]) == _dataset_bytes(sent)


def test_a_store_that_cannot_be_written_is_refused_and_nothing_is_queued(node: NodeProcess, tmp_path: Path) -> None:
    studies_dir = node.data_dir / "studies"
    shutil.rmtree(studies_dir)
    studies_dir.write_text("not a directory: the write into the store fails")
    failing = ct_slice(generate_uid(), generate_uid(), 0)
    assert send(node.port, [failing]) == [0xA701]
    assert node.study(failing.StudyInstanceUID) is None
    assert spool_is_empty(node)

    studies_dir.unlink()
    studies_dir.mkdir()
    assert send(node.port, [failing]) == [0x0000], "the re-send succeeds once the administrator fixed the disk"
    assert node.study(failing.StudyInstanceUID) is not None
    assert "store.write_failed" in node.log()


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_a_large_instance_streams_to_disk_without_sitting_in_memory(node: NodeProcess) -> None:
    big = ct_slice(generate_uid(), generate_uid(), 0, rows=8192, columns=8192)  # 128 MiB of pixel data
    assert send(node.port, [big]) == [0]
    stored = stored_files(node)
    assert len(stored) == 1 and stored[0].stat().st_size > 128 * 1024 * 1024
    assert node.process is not None
    peak = _peak_rss_mb(node.process.pid)
    assert peak < 128, f"the receiver's peak RSS was {peak:.0f} MB for a 128 MiB instance"


DCMTK_SYNTAXES = [
    # (storescu option, pydicom test file, transfer syntax it carries)
    ("-xi", "CT_small.dcm", "1.2.840.10008.1.2"),
    ("-xe", "CT_small.dcm", "1.2.840.10008.1.2.1"),
    ("-xd", "CT_small.dcm", "1.2.840.10008.1.2.1.99"),
    ("-xy", "SC_rgb_jpeg_dcmtk.dcm", "1.2.840.10008.1.2.4.50"),
    ("-xv", "MR_small_jp2klossless.dcm", "1.2.840.10008.1.2.4.90"),
    ("-xw", "JPEG2000.dcm", "1.2.840.10008.1.2.4.91"),
    ("-xs", "JPEG-LL.dcm", "1.2.840.10008.1.2.4.70"),
    ("-xt", "MR_small_jpeg_ls_lossless.dcm", "1.2.840.10008.1.2.4.80"),
    ("-xr", "MR_small_RLE.dcm", "1.2.840.10008.1.2.5"),
]


@needs_dcmtk
@pytest.mark.parametrize(("option", "name", "syntax"), [s for s in DCMTK_SYNTAXES if s[2]])
def test_dcmtk_storescu_with_each_transfer_syntax_is_stored_as_sent(
    node: NodeProcess, option: str, name: str, syntax: str
) -> None:
    source = Path(get_testdata_file(name))
    result = subprocess.run(
        ["storescu", option, "-R", "-aec", NODE_AE, "127.0.0.1", str(node.port), str(source)],
        env=DCMTK_ENV, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    sent, uid = dcmread(source), dcmread(source, stop_before_pixels=True).SOPInstanceUID
    [stored_path] = [p for p in stored_files(node) if p.stem == uid]
    stored = dcmread(stored_path)
    assert stored.file_meta.TransferSyntaxUID == syntax

    # storescu re-writes the data set it reads (group lengths, padding), so compare element by element;
    # the pixel data, compressed or not, must be the very bytes sent.
    def values(ds: Dataset) -> dict[int, object]:
        return {int(e.tag): e.value for e in ds if e.tag.element != 0 and e.tag not in (0x7FE00010, 0xFFFCFFFC)}

    assert values(stored) == values(sent)
    if sent.file_meta.TransferSyntaxUID == syntax:
        assert stored.PixelData == sent.PixelData


def test_descriptions_in_utf8_and_iso_2022_show_as_sent(node: NodeProcess) -> None:
    """``queue ls --json`` shows what the modality meant, decoded with the data set's own character set."""
    sent = {}
    for charset, description in [("ISO_IR 192", "Thorax – Lunge ü 胸部"), (["", "ISO 2022 IR 149"], "흉부 CT")]:
        ds = ct_slice(generate_uid(), generate_uid(), 0)
        ds.SpecificCharacterSet = charset
        ds.StudyDescription = description
        assert send(node.port, [ds]) == [0]
        sent[ds.StudyInstanceUID] = description
    shown = {study["study_uid"]: study["description"] for study in node.cli_json("queue", "ls")}
    assert shown == sent
