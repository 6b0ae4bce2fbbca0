"""What peers do to the node's port besides sending studies: port checks, odd AE titles, forged log lines, stops."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import struct
import subprocess
import threading
import time

from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from dicom_factory import ct_slice
from nodes import NODE_AE, TRIAGENODE, NodeProcess, send, store_scu, wait_until


def echo(port: int, calling_ae: str = "ECHOSCU") -> int:
    """One C-ECHO on a new association: its status, or -1 when the association was refused."""
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE)
    if not assoc.is_established:
        return -1
    status = assoc.send_c_echo()
    assoc.release()
    return int(status.Status) if status and "Status" in status else -1


def test_port_checks_neither_fill_max_associations_nor_outlive_the_request_timeout(make_node) -> None:
    node: NodeProcess = make_node(max_associations=2)
    for _ in range(10):  # a monitoring system's health checks: open, close
        socket.create_connection(("127.0.0.1", node.port)).close()
    assert echo(node.port) == 0, "a real sender right after ten port checks is not locked out"

    silent = [socket.create_connection(("127.0.0.1", node.port)) for _ in range(5)]
    assert echo(node.port) == 0, "connections that never asked for an association do not count"
    for sock in silent:
        sock.settimeout(15)
        assert sock.recv(1) == b"", "the node closes a connection that sends no A-ASSOCIATE-RQ (ARTIM)"
        sock.close()

    held = [store_scu("HOLD").associate("127.0.0.1", node.port, ae_title=NODE_AE) for _ in range(2)]
    assert all(assoc.is_established for assoc in held)
    third = store_scu("THIRD").associate("127.0.0.1", node.port, ae_title=NODE_AE)
    assert third.is_rejected, "max_associations still limits real associations, with an A-ASSOCIATE-RJ"
    assert third.acceptor.primitive.result == 0x02, "rejected-transient: the peer may retry"
    for assoc in held:
        assoc.release()
    wait_until(lambda: "associations open, max_associations=2" in node.log(), 5, "the refusal says why")


def _item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def _associate_rq(called: bytes, calling: bytes) -> bytes:
    """An A-ASSOCIATE-RQ for Verification (PS3.8 9.3.2) with the AE title fields exactly as given."""
    context = struct.pack(">BBBB", 1, 0, 0, 0) + _item(0x30, Verification.encode()) + _item(0x40, b"1.2.840.10008.1.2")
    body = (
        struct.pack(">HH", 1, 0)
        + called
        + calling
        + bytes(32)
        + _item(0x10, b"1.2.840.10008.3.1.1.1")
        + _item(0x20, context)
        + _item(0x50, _item(0x51, struct.pack(">L", 16384)))
    )
    return struct.pack(">BBL", 0x01, 0, len(body)) + body


def _answer_to(port: int, request: bytes) -> int:
    """The PDU type the node answers an A-ASSOCIATE-RQ with (2: accept, 3: reject), 0 if it just closed."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        header = sock.recv(6)
        if len(header) < 6:
            return 0
        pdu_type = header[0]
        if pdu_type == 0x02:  # release politely
            sock.recv(struct.unpack(">L", header[2:6])[0], socket.MSG_WAITALL)
            sock.sendall(struct.pack(">BBLL", 0x05, 0, 4, 0))
            sock.recv(10)
        return pdu_type


def test_ae_titles_padded_with_nul_bytes_are_accepted_and_invalid_ones_refused_with_a_log_line(node) -> None:
    nul_padded = _associate_rq(b"TRIAGENODE".ljust(16, b"\0"), b"PYNETDICOM2".ljust(16, b"\0"))
    assert _answer_to(node.port, nul_padded) == 0x02, "pynetdicom2's NUL padding is read as DCMTK reads it"

    control = _associate_rq(b"TRIAGENODE".ljust(16), b"EVIL\x01\nforged".ljust(16))
    assert _answer_to(node.port, control) == 0x03, "an invalid AE title gets an A-ASSOCIATE-RJ"
    wait_until(lambda: "calling AE title is not a valid AE title" in node.log(), 5, "the refusal is logged")
    log = node.log()
    assert "Traceback" not in log, "no library traceback for a refused peer"
    assert "\x00" not in log and "\x01" not in log and "\nforged" not in log, "peer bytes reach the log escaped"
    assert echo(node.port) == 0


def test_a_peer_cannot_forge_a_log_line(node: NodeProcess) -> None:
    from pynetdicom import _config

    forged = ct_slice(generate_uid(), generate_uid(), 0)
    forged.SOPInstanceUID = "1.2.3\n2026-11-28 10:00:00,000 ERROR triagenode.fake forged"
    forged.file_meta.MediaStorageSOPInstanceUID = forged.SOPInstanceUID
    _config.ENFORCE_UID_CONFORMANCE = False
    try:
        assert send(node.port, [forged]) == [0xC002]
    finally:
        _config.ENFORCE_UID_CONFORMANCE = True
    log = node.log()
    assert "store.refused" in log
    mentions = [line for line in log.splitlines() if "triagenode.fake" in line]
    assert mentions and all("\\n2026-11-28 10:00:00,000 ERROR" in line for line in mentions), mentions
    assert not any(line.startswith("2026-11-28 10:00:00,000") for line in log.splitlines()), "a forged line"


def test_a_uid_longer_than_64_characters_is_refused(node: NodeProcess) -> None:
    study_uid = "1.2.826.0.1.3680043.8.498." + "1" * 40
    long_uid = ct_slice(study_uid + "1", generate_uid(), 0)
    assert len(long_uid.StudyInstanceUID) > 64
    assert send(node.port, [long_uid]) == [0xC002]
    assert node.overview.list_studies() == [], "a UID cut to 64 characters would merge two studies"


def test_a_busy_database_neither_aborts_the_association_nor_makes_status_say_the_node_is_down(make_node) -> None:
    """network_timeout_s below the database's 30 s busy timeout: the node's own waiting is not the peer's silence."""
    node: NodeProcess = make_node(network_timeout_s=5)
    study_uid, series_uid = generate_uid(), generate_uid()
    assoc = store_scu("MODALITY").associate("127.0.0.1", node.port, ae_title=NODE_AE)
    assert assoc.is_established
    lock = sqlite3.connect(node.data_dir / "triagenode.db", isolation_level=None, timeout=30, check_same_thread=False)
    lock.execute("BEGIN EXCLUSIVE")
    release = threading.Timer(20, lambda: (lock.execute("ROLLBACK"), lock.close()))
    release.start()
    statuses: list[int] = []
    sender = threading.Thread(
        target=lambda: statuses.append(int(assoc.send_c_store(ct_slice(study_uid, series_uid, 0)).Status))
    )
    sender.start()
    time.sleep(17)  # the heartbeat is 17 s old by now
    status = node.cli("status", check=False)
    assert status.returncode == 0 and "NOT running" not in status.stdout, status.stdout
    sender.join(30)
    release.join()
    assert statuses == [0]
    follow_up = assoc.send_c_store(ct_slice(study_uid, series_uid, 1))
    assert follow_up and follow_up.Status == 0, "the association outlived the handler's wait on the database"
    assoc.release()


def test_sigterm_to_the_process_group_stops_a_node_with_idle_connections_within_seconds(make_node) -> None:
    """systemd signals the whole control group; a port check and an idle association must not hold the stop."""
    node: NodeProcess = make_node(
        start=False, inference={"workers": 1, "device": "cpu", "decode_processes": 2}, shutdown_grace_s=30
    )
    log = open(node.log_path, "ab")
    node.process = subprocess.Popen(
        [TRIAGENODE, "serve", "--config", str(node.config_path)],
        stdout=log, stderr=log, env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True,
    )
    log.close()
    wait_until(lambda: "worker.ready" in node.log(), 90, "the worker loaded its model")
    study_uid, series_uid = generate_uid(), generate_uid()
    assert send(node.port, [ct_slice(study_uid, series_uid, i) for i in range(3)]) == [0, 0, 0]
    port_check = socket.create_connection(("127.0.0.1", node.port))  # opened, never speaks
    idle = store_scu("IDLE").associate("127.0.0.1", node.port, ae_title=NODE_AE)
    assert idle.is_established
    time.sleep(1.5)

    os.killpg(node.process.pid, signal.SIGTERM)
    assert node.process.wait(10) == 0, "the node exits cleanly within 10 s"
    port_check.close()
    text = node.log()
    after_stop = text[text.index("node.stopping") :]
    assert "worker.started" not in after_stop, "no worker is restarted once stopping has begun"
    assert "worker.died" not in after_stop, "a worker ended by the group's SIGTERM is a normal stop"
    assert "taken by" not in after_stop, "no study is claimed once stopping has begun"
    assert "decoder_died" not in text, "the group's signal does not reach the decoders (their worker ends them)"
    details = node.study(study_uid)
    assert details is not None and details["instances"] == 3, "nothing lost"
