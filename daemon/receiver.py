"""The node's Storage SCP and Verification SCP (pynetdicom), one small handler per event.

The C-STORE handler reads like the rule it keeps: check the disk, read the
header, store durably, record in the queue, and only then answer Success.
Every failure on the way gets a status from :mod:`daemon.statuses`; no
exception reaches pynetdicom (which would answer 0xC211 on its own).

Datasets stream to ``data_dir/spool`` as they arrive (pynetdicom's chunked
receive), so a 500 MB tomosynthesis never sits whole in memory, and the
rename into ``studies/`` stays on one filesystem.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import struct
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import Dataset
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy.exc import SQLAlchemyError

from config.settings import NodeSettings
from daemon.contexts import (
    ACCEPTED_TRANSFER_SYNTAXES,
    STORAGE_SOP_CLASSES,
    VERIFICATION_SOP_CLASS,
    VERIFICATION_TRANSFER_SYNTAXES,
)
from daemon.incoming import RefusedDatasetError, read_incoming
from daemon.statuses import StoreStatus, status_dataset
from storage.filestore import FileStore
from storage.queue import ReceivedInstance, Registration, StudyQueue

log = logging.getLogger("triagenode.receiver")

MAX_PDU_SIZE = 4 * 1024 * 1024
"""Largest PDU the node accepts: big enough that a CT slice comes in one PDU, small enough to bound memory."""


@dataclass
class _AssociationTally:
    """What one association did, for its closing log line."""

    peer_ip: str
    started: float = field(default_factory=time.monotonic)
    stored: int = 0
    duplicates: int = 0
    refused: int = 0
    bytes: int = 0
    outcome: str = "closed"


class StorageReceiver:
    """Accepts C-ECHO and C-STORE from allowed peers and puts every instance durably in the queue."""

    def __init__(self, node: NodeSettings, queue: StudyQueue, store: FileStore) -> None:
        self._node = node
        self._queue = queue
        self._store = store
        self._min_free_bytes = node.min_free_disk_mb * 1024 * 1024
        self._tallies: dict[int, _AssociationTally] = {}
        self._lock = threading.Lock()
        self._server: ThreadedAssociationServer | None = None
        self.ae = self._build_ae()

    @property
    def port(self) -> int:
        """The port actually bound (the configured one, or the kernel's pick for port 0 in tests)."""
        assert self._server is not None, "the receiver is not started"
        return int(self._server.server_address[1])

    def _build_ae(self) -> AE:
        ae = AE(ae_title=self._node.ae_title)
        ae.maximum_associations = self._node.max_associations
        ae.maximum_pdu_size = MAX_PDU_SIZE
        ae.network_timeout = self._node.network_timeout_s
        ae.require_called_aet = True
        ae.require_calling_aet = list(self._node.allowed_calling_aets)
        ae.add_supported_context(VERIFICATION_SOP_CLASS, list(VERIFICATION_TRANSFER_SYNTAXES))
        for sop_class in STORAGE_SOP_CLASSES:
            ae.add_supported_context(sop_class, list(ACCEPTED_TRANSFER_SYNTAXES))
        return ae

    def start(self) -> None:
        """Listen on the configured address; returns once the port accepts connections."""
        # pynetdicom streams each dataset into tempfile's directory; point it at
        # the spool, on the store's filesystem, so the final rename is atomic.
        _config.STORE_RECV_CHUNKED_DATASET = True
        tempfile.tempdir = str(self._store.spool_dir)
        handlers = [
            (evt.EVT_CONN_OPEN, self._on_connection_open),
            (evt.EVT_CONN_CLOSE, self._on_connection_close),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
        ]
        self._server = self.ae.start_server((self._node.host, self._node.port), block=False, evt_handlers=handlers)
        log.info(
            "receiver.listening ae_title=%s host=%s port=%d max_associations=%d allowed_calling_aets=%s",
            self._node.ae_title,
            self._node.host,
            self.port,
            self._node.max_associations,
            ",".join(self._node.allowed_calling_aets) or "any",
        )

    def stop(self, grace_s: float) -> int:
        """Stop accepting, let open associations finish for up to ``grace_s``, abort the rest.

        Returns how many associations had to be aborted.
        """
        if self._server is None:
            return 0
        server, self._server = self._server, None
        server.shutdown()
        deadline = time.monotonic() + grace_s
        while server.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        remaining = server.active_associations
        for association in remaining:
            association.abort()
        if remaining:
            log.warning("receiver.stopped aborted_associations=%d grace_s=%g", len(remaining), grace_s)
        else:
            log.info("receiver.stopped")
        return len(remaining)

    # Handlers: each runs in the association's own thread.

    def _on_connection_open(self, event: evt.Event) -> None:
        with self._lock:
            self._tallies[id(event.assoc)] = _AssociationTally(peer_ip=str(event.address[0]))
        _limit_pdu_length(event.assoc, str(event.address[0]))

    def _on_connection_close(self, event: evt.Event) -> None:
        with self._lock:
            tally = self._tallies.pop(id(event.assoc), None)
        partial = _discard_partial_dataset(event.assoc)
        if tally is None or tally.outcome == "rejected":
            return
        if partial is not None or event.assoc.is_aborted:
            tally.outcome = "aborted"
        log.log(
            logging.WARNING if partial is not None else logging.INFO,
            "association.%s peer_ae=%s peer_ip=%s instances=%d duplicates=%d refused=%d bytes=%d duration_s=%.2f"
            + (f" partial_dataset_discarded_bytes={partial}" if partial is not None else ""),
            tally.outcome,
            _peer_ae(event.assoc),
            tally.peer_ip,
            tally.stored,
            tally.duplicates,
            tally.refused,
            tally.bytes,
            time.monotonic() - tally.started,
        )

    def _on_rejected(self, event: evt.Event) -> None:
        tally = self._tally(event.assoc)
        if tally is not None:
            tally.outcome = "rejected"
        requestor = event.assoc.requestor
        log.warning(
            "association.refused peer_ae=%s peer_ip=%s called_ae=%s reason=%r",
            _peer_ae(event.assoc),
            requestor.address,
            requestor.primitive.called_ae_title if requestor.primitive else "?",
            self._rejection_reason(event.assoc),
        )

    def _on_aborted(self, event: evt.Event) -> None:
        tally = self._tally(event.assoc)
        if tally is not None:
            tally.outcome = "aborted"

    def _on_echo(self, event: evt.Event) -> int:
        return int(StoreStatus.SUCCESS)

    def _on_store(self, event: evt.Event) -> Dataset:
        tally = self._tally(event.assoc)
        request = event.request
        sop_instance = str(request.AffectedSOPInstanceUID or "")
        try:
            status, detail, size = self._store_instance(event)
        except Exception as exc:  # noqa: BLE001 - the peer must get a deliberate status, never 0xC211
            # The message of a foreign exception may quote attribute values, so
            # log its type and where it came from, not its text.
            where = traceback.extract_tb(exc.__traceback__)[-1]
            log.error(
                "store.error peer_ae=%s sop_instance_uid=%s error=%s at=%s:%d",
                _peer_ae(event.assoc),
                sop_instance,
                type(exc).__name__,
                Path(where.filename).name,
                where.lineno,
            )
            status, detail, size = StoreStatus.PROCESSING_FAILURE, "internal error; see the node's log", 0
        if tally is not None:
            if status == StoreStatus.SUCCESS:
                tally.bytes += size
                if detail == "duplicate":
                    tally.duplicates += 1
                else:
                    tally.stored += 1
            else:
                tally.refused += 1
        if status != StoreStatus.SUCCESS and status != StoreStatus.PROCESSING_FAILURE:
            log.warning(
                "store.refused peer_ae=%s peer_ip=%s sop_instance_uid=%s status=0x%04X reason=%r",
                _peer_ae(event.assoc),
                tally.peer_ip if tally else "?",
                sop_instance if len(sop_instance) <= 64 else sop_instance[:64] + "...",
                int(status),
                detail,
            )
        return status_dataset(status, detail)

    # The work behind the C-STORE handler.

    def _store_instance(self, event: evt.Event) -> tuple[StoreStatus, str, int]:
        """Store one instance; returns (status, detail for the log and Error Comment, bytes)."""
        if self._store.free_bytes() < self._min_free_bytes:
            return (
                StoreStatus.OUT_OF_RESOURCES_DISK,
                f"free disk below min_free_disk_mb={self._node.min_free_disk_mb}; free space on the node",
                0,
            )
        spool = Path(event.dataset_path)
        request = event.request
        try:
            header = read_incoming(
                spool,
                str(event.context.transfer_syntax),
                str(request.AffectedSOPClassUID or ""),
                str(request.AffectedSOPInstanceUID or ""),
            )
        except RefusedDatasetError as refused:
            return refused.status, refused.detail, 0
        size = spool.stat().st_size
        if self._queue.stored_path(header.sop_instance_uid) is not None:
            return StoreStatus.SUCCESS, "duplicate", size
        relative = self._store.relative_path(header.study_uid, header.series_uid, header.sop_instance_uid)
        try:
            self._store.commit_file(spool, relative)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                return StoreStatus.OUT_OF_RESOURCES_DISK, "disk full while writing; free space on the node", 0
            log.error("store.write_failed path=%s errno=%s", relative, errno.errorcode.get(exc.errno or 0, exc.errno))
            return StoreStatus.OUT_OF_RESOURCES_WRITE, "cannot write the instance; see the node's log", 0
        received = ReceivedInstance(
            study_uid=header.study_uid,
            series_uid=header.series_uid,
            sop_instance_uid=header.sop_instance_uid,
            sop_class_uid=header.sop_class_uid,
            transfer_syntax_uid=str(event.context.transfer_syntax),
            path=str(relative),
            size=size,
            calling_ae=_peer_ae(event.assoc),
            modality=header.modality,
            study_date=header.study_date,
            study_description=header.study_description,
            series_number=header.series_number,
            series_description=header.series_description,
        )
        try:
            registration = self._queue.record_instance(received)
        except SQLAlchemyError as exc:
            self._store.discard(relative)
            log.error("store.queue_failed study_uid=%s error=%s", header.study_uid, type(exc).__name__)
            return StoreStatus.OUT_OF_RESOURCES_QUEUE, "the queue database is unavailable; see the node's log", 0
        if registration is Registration.DUPLICATE:
            # Another association stored the same instance a moment ago; keep
            # its file unless ours landed somewhere else.
            if self._queue.stored_path(header.sop_instance_uid) != str(relative):
                self._store.discard(relative)
            return StoreStatus.SUCCESS, "duplicate", size
        return StoreStatus.SUCCESS, registration.value, size

    def _tally(self, association: Association) -> _AssociationTally | None:
        with self._lock:
            return self._tallies.get(id(association))

    def _rejection_reason(self, association: Association) -> str:
        requestor = association.requestor
        called = (requestor.primitive.called_ae_title if requestor.primitive else "").strip()
        if called != self._node.ae_title.strip():
            return f"called AE title {called!r} is not this node's ({self._node.ae_title})"
        allowed = self._node.allowed_calling_aets
        if allowed and requestor.ae_title.strip() not in {aet.strip() for aet in allowed}:
            return "calling AE title not in allowed_calling_aets"
        return f"more than max_associations={self._node.max_associations} at once, or no acceptable context"


def _discard_partial_dataset(association: Association) -> int | None:
    """Delete the spool file of a dataset still arriving when the association ended; its size, or None.

    pynetdicom leaves that file behind when a peer aborts or disconnects
    mid-dataset. Nothing of it was acknowledged, so it goes now, not at the
    next restart. (pynetdicom resets its DIMSE message once a dataset is
    complete, so a file still attached to it is a partial one.)
    """
    message = getattr(getattr(association, "dimse", None), "message", None)
    partial = getattr(message, "_data_set_file", None)
    if partial is None:
        return None
    path = Path(partial.name)
    try:
        partial.close()
        size = path.stat().st_size
        path.unlink()
    except OSError:
        return 0
    return size


_P_DATA_TF = 0x04


def _limit_pdu_length(association: Association, peer_ip: str) -> None:
    """Abort an association whose peer sends a P-DATA-TF longer than the maximum the node announced.

    pynetdicom reads a PDU whole, whatever length its header claims, before
    looking at it; this check reads the 6-byte header first (PS3.8 9.3.1), so
    a broken or hostile peer cannot make the node buffer more than
    ``MAX_PDU_SIZE``. The peer gets an A-ABORT (source: service provider,
    reason: invalid PDU parameter value), then the connection closes.
    """
    transport = association.dul.socket
    if transport is None:
        return
    receive = transport.recv

    def recv(nr_bytes: int) -> bytearray:
        data = receive(nr_bytes)
        if nr_bytes == 6 and len(data) == 6:
            pdu_type, _, length = struct.unpack(">BBL", data)
            if pdu_type == _P_DATA_TF and length > MAX_PDU_SIZE:
                log.warning(
                    "association.pdu_too_long peer_ae=%s peer_ip=%s pdu_length=%d max_pdu_length=%d: aborting",
                    _peer_ae(association), peer_ip, length, MAX_PDU_SIZE,
                )  # fmt: skip
                with contextlib.suppress(OSError):
                    transport.socket.sendall(_A_ABORT_INVALID_PDU_PARAMETER)  # type: ignore[union-attr]
                raise ConnectionAbortedError(f"P-DATA-TF of {length} bytes exceeds {MAX_PDU_SIZE}")
        return data

    transport.recv = recv  # type: ignore[method-assign]


_A_ABORT_INVALID_PDU_PARAMETER = struct.pack(">BBLBBBB", 0x07, 0, 4, 0, 0, 2, 6)
"""A-ABORT PDU, source 2 (service provider), reason 6 (invalid PDU parameter value); PS3.8 9.3.8."""


def _peer_ae(association: Association) -> str:
    return (association.requestor.ae_title or "").strip() or "?"
