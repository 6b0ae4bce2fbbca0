"""Broken peers on the wire: the node drops what they sent half-way, keeps serving, and queues nothing partial.

The PDUs are written by hand on a plain socket (PS3.8 9.3), because a
well-behaved library will not send them: an association that aborts or
disconnects mid-dataset, garbage instead of an A-ASSOCIATE-RQ, and a
P-DATA-TF longer than the maximum the node negotiated.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom.dsutils import encode
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.presentation import build_context

from triagenode.daemon.receiver import MAX_PDU_SIZE

from dicom_factory import ct_slice, write_study
from nodes import NODE_AE, NodeProcess, send, wait_until

CONTEXT_ID = 1


def _associate_rq(calling_ae: str = "RAWPEER") -> bytes:
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = calling_ae
    primitive.called_ae_title = NODE_AE
    context = build_context("1.2.840.10008.5.1.4.1.1.2", [ExplicitVRLittleEndian])
    context.context_id = CONTEXT_ID
    primitive.presentation_context_definition_list = [context]
    maximum = MaximumLengthNotification()
    maximum.maximum_length_received = 16384
    primitive.user_information = [maximum]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return pdu.encode()


def _read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    header = _read_exactly(sock, 6)
    pdu_type, _, length = struct.unpack(">BBL", header)
    return pdu_type, _read_exactly(sock, length)


def _read_exactly(sock: socket.socket, count: int) -> bytes:
    data = bytearray()
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise ConnectionError("the node closed the connection")
        data += chunk
    return bytes(data)


def _p_data(payload: bytes, *, command: bool, last: bool) -> bytes:
    """One P-DATA-TF PDU holding one PDV (PS3.8 9.3.5, E.2)."""
    control = (0x01 if command else 0x00) | (0x02 if last else 0x00)
    pdv = struct.pack(">LBB", len(payload) + 2, CONTEXT_ID, control) + payload
    return struct.pack(">BBL", 0x04, 0x00, len(pdv)) + pdv


def _c_store_command(instance: Dataset) -> bytes:
    command = Dataset()
    command.AffectedSOPClassUID = instance.SOPClassUID
    command.CommandField = 0x0001
    command.MessageID = 1
    command.Priority = 0
    command.CommandDataSetType = 0x0000
    command.AffectedSOPInstanceUID = instance.SOPInstanceUID
    command.CommandGroupLength = 0
    command.CommandGroupLength = len(encode(command, True, True)) - 12
    return encode(command, True, True)


@contextmanager
def _raw_association(port: int) -> Iterator[socket.socket]:
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(_associate_rq())
        pdu_type, _ = _read_pdu(sock)
        assert pdu_type == 0x02, f"the node answered PDU type {pdu_type:#x}, not A-ASSOCIATE-AC"
        yield sock


def _instance(tmp_path: Path) -> tuple[Dataset, bytes]:
    study = write_study(tmp_path / "study", slices=1)
    instance = ct_slice(str(study.study_uid), "1.2.826.0.1.3680043.8.498.77", 7, rows=256, columns=256)
    return instance, encode(instance, False, True)


def _assert_serving_and_clean(node: NodeProcess, tmp_path: Path, partial: Dataset | None) -> None:
    wait_until(lambda: not any((node.data_dir / "spool").iterdir()), 10, "the spool is emptied")
    if partial is not None:
        assert node.study(str(partial.StudyInstanceUID)) is None, "nothing of the broken transfer may be queued"
        assert not list((node.data_dir / "studies").rglob(f"{partial.SOPInstanceUID}.dcm"))
    after = write_study(tmp_path / "after", slices=2)
    assert send(node.port, after.files) == [0, 0], "the node still serves a normal study"
    assert node.process is not None and node.process.poll() is None


@pytest.mark.parametrize("ending", ["a-abort", "tcp-close"])
def test_an_association_that_ends_mid_dataset_leaves_nothing_behind(
    node: NodeProcess, tmp_path: Path, ending: str
) -> None:
    instance, dataset = _instance(tmp_path)
    with _raw_association(node.port) as sock:
        sock.sendall(_p_data(_c_store_command(instance), command=True, last=True))
        sock.sendall(_p_data(dataset[: len(dataset) // 2], command=False, last=False))
        wait_until(lambda: any((node.data_dir / "spool").iterdir()), 10, "the node spools the first half")
        if ending == "a-abort":
            sock.sendall(struct.pack(">BBLBBBB", 0x07, 0, 4, 0, 0, 0, 0))
    wait_until(lambda: "association.aborted" in node.log(), 10, "the node logs the aborted association")
    _assert_serving_and_clean(node, tmp_path, instance)


def test_garbage_bytes_on_the_port_are_dropped(node: NodeProcess, tmp_path: Path) -> None:
    for garbage in (b"GET / HTTP/1.1\r\nHost: node\r\n\r\n", bytes(range(256)) * 8, b"\x01\x00\xff\xff\xff\xffxyz"):
        with socket.create_connection(("127.0.0.1", node.port), timeout=20) as sock:
            sock.sendall(garbage)
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(20)
            try:
                answer = sock.recv(64)
            except ConnectionResetError:
                answer = b""
        assert not answer or answer[0] in (0x03, 0x07), f"answered {answer[:1]!r}: only a reject or an abort will do"
    _assert_serving_and_clean(node, tmp_path, None)


def test_a_p_data_longer_than_the_negotiated_maximum_is_refused(node: NodeProcess, tmp_path: Path) -> None:
    instance, _ = _instance(tmp_path)
    big = instance.copy()
    big.Rows, big.Columns = MAX_PDU_SIZE // 4096 + 16, 2048  # 16-bit pixels: a bit more than the maximum
    big.PixelData = b"\x00\x01" * (big.Rows * big.Columns)
    dataset = encode(big, False, True)
    assert len(dataset) > MAX_PDU_SIZE
    with _raw_association(node.port) as sock:
        sock.sendall(_p_data(_c_store_command(big), command=True, last=True))
        try:
            sock.sendall(_p_data(dataset, command=False, last=True))
            pdu_type, _ = _read_pdu(sock)
        except (ConnectionError, OSError):
            pdu_type = 0x07
    assert pdu_type == 0x07, f"the node answered PDU type {pdu_type:#x}: an oversized PDU must end the association"
    wait_until(lambda: "pdu_too_long" in node.log(), 10, "the node says why it aborted")
    _assert_serving_and_clean(node, tmp_path, big)
