"""Every file of pydicom's test data and of pydicom-data, sent to the node: it stores or refuses each one
deliberately, never dies, never leaks a spool file, and serves a normal study afterwards."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from pydicom import dcmread
from pydicom.data import get_testdata_files
from pynetdicom import AE
from pynetdicom.dsutils import split_dataset

from triagenode.daemon.statuses import StoreStatus

from dicom_factory import write_study
from nodes import NODE_AE, NodeProcess, send


def _dataset_bytes(path: Path) -> bytes:
    _, offset = split_dataset(path)
    return path.read_bytes()[offset:]


def test_the_pydicom_corpus_is_stored_or_refused_and_the_node_keeps_serving(node: NodeProcess, tmp_path: Path) -> None:
    files = [Path(p) for p in get_testdata_files() if Path(p).is_file()]
    assert len(files) > 150, "pydicom-data is part of the test extras"
    tally: Counter[str] = Counter()
    first_success: dict[str, Path] = {}
    for path in files:
        try:
            meta = dcmread(path, stop_before_pixels=True).file_meta
            sop_class, sop_instance = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
            syntax = meta.TransferSyntaxUID
        except Exception:
            tally["not sendable (no file meta)"] += 1
            continue
        ae = AE(ae_title="CORPUS")
        ae.add_requested_context(sop_class, [syntax])
        assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AE)
        if not assoc.is_established:
            tally["association refused (no acceptable presentation context)"] += 1
            continue
        try:
            if not assoc.accepted_contexts:
                tally["context rejected"] += 1
                continue
            status = assoc.send_c_store(path)
        except (ValueError, AttributeError, OSError) as exc:
            tally[f"not sent by pynetdicom ({type(exc).__name__})"] += 1
            continue
        finally:
            if assoc.is_established:
                assoc.release()
        assert status and "Status" in status, f"no answer for {path.name}: the node must answer every C-STORE"
        code = int(status.Status)
        assert code in {int(s) for s in StoreStatus}, f"{path.name}: status 0x{code:04X} is not in the node's table"
        tally[f"0x{code:04X} {StoreStatus(code).name}"] += 1
        if code == 0 and str(sop_instance) not in first_success:
            first_success[str(sop_instance)] = path
    print("\ncorpus tally:", dict(sorted(tally.items())))

    stored = {p.stem: p for p in (node.data_dir / "studies").rglob("*.dcm")}
    for uid, source in first_success.items():
        assert uid in stored, f"{source.name} got Success but is not stored"
        assert _dataset_bytes(stored[uid]) == _dataset_bytes(source), f"{source.name} was not stored intact"
    assert not any((node.data_dir / "spool").iterdir()), "no temporary file may be left"
    assert tally["0x0000 SUCCESS"] > 100 and sum(v for k, v in tally.items() if k.startswith("0xC")) >= 2
    log = node.log()
    assert "0xC211" not in log
    refused = sum(v for k, v in tally.items() if k.startswith("0x") and not k.startswith("0x0000"))
    explained = [line for line in log.splitlines() if "store.refused" in line and "reason=" in line]
    assert len(explained) == refused, "every refusal has a log line that says why"

    study = write_study(tmp_path / "after", slices=3)
    assert send(node.port, study.files) == [0, 0, 0], "the node still serves a normal study"
    assert node.process is not None and node.process.poll() is None
