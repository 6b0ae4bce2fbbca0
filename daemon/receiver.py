"""The node's Storage SCP and Verification SCP (pynetdicom), one small handler per event.

The C-STORE handler reads like the rule it keeps: check the disk, read the
header, store durably, record in the queue, and only then answer Success.
Every failure on the way gets a status from :mod:`daemon.statuses`; no
exception reaches pynetdicom (which would answer 0xC211 on its own).

Datasets stream to ``data_dir/spool`` as they arrive (pynetdicom's chunked
receive, guarded by :mod:`daemon.spool` against filling the disk), so a
500 MB tomosynthesis never sits whole in memory, and the rename into
``studies/`` stays on one filesystem. The spool file keeps its unique name
until the instance's row has committed; only then is it renamed into place,
so a handler that fails never touches a file another handler answered
Success for.

An association only counts against ``max_associations`` once its peer has
sent an A-ASSOCIATE-RQ: a port check (a TCP connection opened and closed
without a PDU) ends at once, and a connection that says nothing is closed
after ``REQUEST_TIMEOUT_S`` (the ARTIM timer), so monitoring never locks
real senders out. Each calling AE title also has its own limit
(:mod:`daemon.peer_rules`), and a ``[[peers]]`` AE title from an address not
listed for it is refused.

With ``[tls]`` the same AE listens on a second port for DICOM over TLS
(:mod:`daemon.tls`); the handlers are the same, and the association's log
line says whether it came over TLS and whose certificate it showed. Every
refusal and every study transferred goes to the audit trail
(:mod:`daemon.audit`), which, unlike the log, names the patient.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import ssl
import struct
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from pydicom import Dataset
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy.exc import SQLAlchemyError

from triagenode.config.settings import Settings
from triagenode.daemon import pynetdicom_internals as internals
from triagenode.daemon import tls as node_tls
from triagenode.daemon.audit import AuditedStudy, AuditTrail, SecurityAlertKind
from triagenode.daemon.contexts import (
    ACCEPTED_TRANSFER_SYNTAXES,
    STORAGE_SOP_CLASSES,
    VERIFICATION_SOP_CLASS,
    VERIFICATION_TRANSFER_SYNTAXES,
)
from triagenode.daemon.incoming import IncomingHeader, RefusedDatasetError, read_incoming
from triagenode.daemon.peer_rules import PeerRules
from triagenode.daemon.spool import install_spool, refusal_of
from triagenode.daemon.statuses import StoreStatus, status_dataset
from triagenode.storage.filestore import FileStore
from triagenode.storage.queue import ReceivedInstance, Registration, StudyBeingPurgedError, StudyQueue

log = logging.getLogger("triagenode.receiver")

MAX_PDU_SIZE = 4 * 1024 * 1024
"""Largest PDU the node accepts: big enough that a CT slice comes in one PDU, small enough to bound memory."""

REQUEST_TIMEOUT_S = 5
"""How long a new connection may stay silent before its A-ASSOCIATE-RQ (the ARTIM timer, PS3.8 9.1.5)."""

ACSE_TIMEOUT_S = 30
"""How long an established association waits for an A-RELEASE response and the like."""

STREAMING_GAP_S = 1.0
"""An association whose last C-STORE was answered this recently is streaming a study: a stop lets it go on
within shutdown_grace_s. One silent for longer is idle and ended at once."""

UNREQUESTED_CONNECTIONS = 64
"""Connections beyond ``max_associations`` that may wait for their request at once (port checks, slow
peers); pynetdicom's own limit, set to ``max_associations`` plus this, only bounds threads."""


@dataclass
class _StudyTally:
    """One study's instances on one association, for its audit message (patient data: never logged)."""

    patient_id: str = ""
    patient_name: str = ""
    accession_number: str = ""
    sop_classes: dict[str, int] = field(default_factory=dict)


@dataclass
class _AssociationTally:
    """What one association did, for its closing log line and its audit messages."""

    peer_ip: str
    tls: bool = False
    """It came in on the TLS port."""
    certificate: str | None = None
    """The common name of the certificate the peer showed (mutual TLS)."""
    peer_ae: str = "?"
    started: float = field(default_factory=time.monotonic)
    requested: bool = False
    """The peer sent its A-ASSOCIATE-RQ and was not refused: it counts against ``max_associations``."""
    storing: bool = False
    """A C-STORE handler of this association is running (a stop waits for it)."""
    last_store_at: float = 0.0
    """When its last C-STORE was answered (monotonic): a peer streaming a study is still in transfer."""
    stored: int = 0
    duplicates: int = 0
    refused: int = 0
    bytes: int = 0
    outcome: str = "closed"
    studies: dict[str, _StudyTally] = field(default_factory=dict)


_BEING_PURGED = (
    StoreStatus.OUT_OF_RESOURCES_QUEUE,
    "the study is being purged from the node; send it again in a minute",
    0,
    None,
)
"""The answer for an instance of a study whose files are being removed ([storage] keep_days, `queue purge`)."""


_FINISHED_STUDY = (Registration.ADDED_TO_CANCELLED, Registration.KEPT_AS_OWN_REPORT)
"""Registrations that leave the study in a final state, where a purge may take it at any moment."""


class _Withheld(Exception):
    """Stands in for an exception's message in the log: it may quote attribute values (patient data)."""

    def __str__(self) -> str:
        return f"{self.args[0]} (message withheld: it may quote the data set)"


class StorageReceiver:
    """Accepts C-ECHO and C-STORE from allowed peers and puts every instance durably in the queue."""

    def __init__(
        self, settings: Settings, queue: StudyQueue, store: FileStore, audit: AuditTrail | None = None
    ) -> None:
        self._settings = settings
        self._node = node = settings.node
        self._queue = queue
        self._store = store
        self._audit = audit
        self._peers = PeerRules(settings)
        self._min_free_bytes = node.min_free_disk_mb * 1024 * 1024
        self._tallies: dict[int, _AssociationTally] = {}
        self._lock = threading.Lock()
        self._server: ThreadedAssociationServer | None = None
        self._tls_server: ThreadedAssociationServer | None = None
        self.ae = self._build_ae()

    @property
    def port(self) -> int:
        """The plain-TCP port bound, or the TLS port on a node that accepts TLS only."""
        server = self._server or self._tls_server
        assert server is not None, "the receiver is not started"
        return int(server.server_address[1])

    @property
    def tls_port(self) -> int | None:
        """The DICOM TLS port bound, or None without ``[tls]``."""
        return int(self._tls_server.server_address[1]) if self._tls_server is not None else None

    def _build_ae(self) -> AE:
        ae = AE(ae_title=self._node.ae_title)
        # The node counts requested associations itself (_on_requested); pynetdicom
        # counts every connection, silent ones included, so its limit only bounds threads.
        ae.maximum_associations = self._node.max_associations + UNREQUESTED_CONNECTIONS
        ae.maximum_pdu_size = MAX_PDU_SIZE
        ae.network_timeout = self._node.network_timeout_s
        ae.acse_timeout = ACSE_TIMEOUT_S
        ae.require_called_aet = True
        ae.require_calling_aet = self._peers.allowed_calling_aets()
        ae.add_supported_context(VERIFICATION_SOP_CLASS, list(VERIFICATION_TRANSFER_SYNTAXES))
        for sop_class in STORAGE_SOP_CLASSES:
            ae.add_supported_context(sop_class, list(ACCEPTED_TRANSFER_SYNTAXES))
        return ae

    def start(self) -> None:
        """Listen on the configured address; returns once the port accepts connections."""
        # pynetdicom streams each dataset into a spool file, on the store's
        # filesystem so that the final rename is atomic.
        install_spool(self._store.spool_dir, self._min_free_bytes, self._store.free_bytes)
        handlers = [
            (evt.EVT_CONN_OPEN, self._on_connection_open),
            (evt.EVT_CONN_CLOSE, self._on_connection_close),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
        ]
        tls = self._settings.tls
        if self._node.port:
            address = (self._node.host, self._node.port)
            self._server = self.ae.start_server(address, block=False, evt_handlers=handlers)
        if tls.enabled:
            context = node_tls.server_context(tls)
            self._tls_server = node_tls.start_tls_server(
                self.ae, (self._node.host, tls.port), handlers, context, self._on_handshake_failure
            )
        log.info(
            "receiver.listening ae_title=%s host=%s port=%s tls_port=%s mutual_tls=%s max_associations=%d "
            "max_associations_per_peer=%d allowed_calling_aets=%s peers=%s",
            self._node.ae_title,
            self._node.host,
            self._server.server_address[1] if self._server else "none",
            self.tls_port or "none",
            ("yes" if tls.require_client_certificate else "no") if tls.enabled else "-",
            self._node.max_associations,
            self._node.max_associations_per_peer,
            ",".join(self._node.allowed_calling_aets) or "any",
            ",".join(peer.ae_title for peer in self._settings.peers) or "none",
        )

    def stop(self, grace_s: float) -> int:
        """Stop accepting, end idle associations at once, give a C-STORE in progress up to ``grace_s``.

        An association with no DIMSE message in progress (a modality keeping
        its association open between studies, a port check that never sent a
        request) is ended at once: nothing of it is unanswered. Only one in
        transfer (data arriving, its handler storing, or a peer streaming a
        study: its last C-STORE answered within ``STREAMING_GAP_S``) gets the
        grace period; what is left after it is aborted. Returns how many
        associations had to be aborted mid-transfer.
        """
        servers = [server for server in (self._server, self._tls_server) if server is not None]
        if not servers:
            return 0
        self._server = self._tls_server = None
        for server in servers:
            server.shutdown()
        deadline = time.monotonic() + grace_s
        ended: set[int] = set()
        while True:
            busy = []
            for association in [one for server in servers for one in server.active_associations]:
                if self._in_transfer(association):
                    busy.append(association)
                elif id(association) not in ended:
                    _end_idle(association)
                    ended.add(id(association))
            if not busy or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        ended_idle = len(ended)
        for association in busy:
            association.abort()
        if busy:
            log.warning("receiver.stopped aborted_transfers=%d grace_s=%g ended_idle=%d", len(busy), grace_s,
                        ended_idle)
        else:
            log.info("receiver.stopped ended_idle=%d", ended_idle)
        return len(busy)

    def _in_transfer(self, association: Association) -> bool:
        """Whether a DIMSE message is arriving on ``association``, its C-STORE handler runs, or it streams."""
        tally = self._tally(association)
        if tally is not None and (tally.storing or time.monotonic() - tally.last_store_at < STREAMING_GAP_S):
            return True
        return internals.message_in_progress(association)

    # Handlers: each runs in the association's own thread.

    def _on_connection_open(self, event: evt.Event) -> None:
        transport = internals.transport_of(event.assoc)
        sock = transport.socket if transport is not None else None
        tally = _AssociationTally(
            peer_ip=str(event.address[0]), tls=isinstance(sock, ssl.SSLSocket), certificate=node_tls.peer_subject(sock)
        )
        with self._lock:
            self._tallies[id(event.assoc)] = tally
        # Until its A-ASSOCIATE-RQ arrives, a connection gets the short ARTIM timeout.
        event.assoc.acse_timeout = REQUEST_TIMEOUT_S
        _guard_incoming_pdus(event.assoc, str(event.address[0]), self._alert)

    def _on_requested(self, event: evt.Event) -> None:
        """Check the peer against ``[[peers]]``, then count it against its own limit and ``max_associations``.

        Fails closed: pynetdicom logs an exception from this handler and accepts the association
        anyway, which would let a peer past its address binding and every limit.
        """
        try:
            self._admit(event.assoc)
        except Exception as exc:  # noqa: BLE001 - whatever it is, the peer must not get in unchecked
            log.error("association.check_failed peer_ae=%s error=%s: refused; a bug in the node, please report it",
                      _peer_ae(event.assoc), type(exc).__name__, exc_info=True)
            tally = self._tally(event.assoc)
            if tally is not None:
                tally.outcome = "rejected"
            # Rejected transient, service user, no reason given: the peer may retry.
            internals.reject(event.assoc, 0x02, 0x01, 0x01)

    def _admit(self, association: Association) -> None:
        """Refuse (A-ASSOCIATE-RJ) a peer from the wrong address or over its share; return to let it in."""
        association.acse_timeout = ACSE_TIMEOUT_S
        peer_ae = _peer_ae(association)
        tally = self._tally(association)
        verdict = self._peers.check(
            peer_ae, tally.peer_ip if tally else "", tally.tls if tally else False, tally.certificate if tally else None
        )
        if not verdict.allowed:
            self._refuse(association, tally, verdict.reason, SecurityAlertKind.ADDRESS_MISMATCH)
            # Rejected permanent, service user, calling AE title not recognised (PS3.8 9.3.4).
            internals.reject(association, 0x01, 0x01, 0x03)
            return
        limit = self._peers.limit(peer_ae)
        with self._lock:
            open_now = [other for other in self._tallies.values() if other.requested]
            own = sum(1 for other in open_now if other.peer_ae == peer_ae)
            over_peer, over = own >= limit, len(open_now) >= self._node.max_associations
            if tally is not None and not over and not over_peer:
                tally.requested, tally.peer_ae = True, peer_ae
        if over_peer:
            reason = f"{own} associations of {peer_ae} open, its limit is {limit}; the peer may retry"
        elif over:
            reason = f"{len(open_now)} associations open, max_associations={self._node.max_associations}; " \
                     "the peer may retry"
        else:
            return
        self._refuse(association, tally, reason, SecurityAlertKind.ASSOCIATION_REFUSED)
        # Transient, presentation related, local limit exceeded (PS3.8 9.3.4): the peer retries later.
        internals.reject(association, 0x02, 0x03, 0x02)

    def _refuse(
        self, association: Association, tally: _AssociationTally | None, reason: str, kind: SecurityAlertKind
    ) -> None:
        """Log and audit a refusal, before the A-ASSOCIATE-RJ leaves: the reason is on record when the peer sees it."""
        if tally is not None:
            tally.outcome = "rejected"
        peer_ip = tally.peer_ip if tally else str(association.requestor.address or "?")
        log.warning(
            "association.refused peer_ae=%s peer_ip=%s called_ae=%s tls=%s reason=%r",
            _peer_ae(association),
            peer_ip,
            _called_ae(association),
            "yes" if tally is not None and tally.tls else "no",
            reason,
        )
        if self._audit is not None:
            self._audit.security_alert(kind=kind, peer_address=peer_ip, peer_ae=_peer_ae(association), detail=reason)

    def _alert(self, kind: SecurityAlertKind, peer_ip: str, peer_ae: str | None, detail: str) -> None:
        """A Security Alert in the audit trail (when there is one)."""
        if self._audit is not None:
            self._audit.security_alert(kind=kind, peer_address=peer_ip, peer_ae=peer_ae, detail=detail)

    def _on_handshake_failure(self, peer_ip: str, reason: str) -> None:
        """A TLS handshake failed: no certificate, one from another CA, an expired one, an old TLS version."""
        log.warning("tls.refused peer_ip=%s reason=%r", peer_ip, reason)
        if self._audit is not None:
            self._audit.security_alert(
                kind=SecurityAlertKind.NODE_AUTHENTICATION, peer_address=peer_ip, peer_ae=None,
                detail=f"TLS handshake failed: {reason}",
            )

    def _on_connection_close(self, event: evt.Event) -> None:
        with self._lock:
            tally = self._tallies.pop(id(event.assoc), None)
        partial = _discard_partial_dataset(event.assoc)
        if not internals.has_request(event.assoc):
            # Closed before any A-ASSOCIATE-RQ: wake the association's thread, which otherwise
            # waits out its request timeout. A port check (closed at once) is not logged; a
            # connection that stayed silent until the ARTIM timer ended it is.
            internals.wake_for_no_request(event.assoc)
            if tally is not None and time.monotonic() - tally.started >= REQUEST_TIMEOUT_S - 0.5:
                log.info("connection.dropped peer_ip=%s tls=%s reason=%r", tally.peer_ip,
                         "yes" if tally.tls else "no", f"no A-ASSOCIATE-RQ within {REQUEST_TIMEOUT_S} s (ARTIM)")
            return
        if tally is None or tally.outcome == "rejected":
            return
        if tally.outcome != "timed_out" and (partial is not None or event.assoc.is_aborted):
            tally.outcome = "aborted"
        log.log(
            logging.WARNING if partial is not None or tally.outcome == "timed_out" else logging.INFO,
            "association.%s peer_ae=%s peer_ip=%s instances=%d duplicates=%d refused=%d bytes=%d duration_s=%.2f"
            + (" tls=yes" + (f" peer_certificate={tally.certificate!r}" if tally.certificate else "")
               if tally.tls else "")
            + (f" idle_s={self._node.network_timeout_s} (network_timeout_s)" if tally.outcome == "timed_out" else "")
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
        self._audit_transfers(tally, _peer_ae(event.assoc), complete=partial is None and tally.outcome == "closed")

    def _audit_transfers(self, tally: _AssociationTally, peer_ae: str, complete: bool) -> None:
        """One DICOM Instances Transferred message per study the association brought (PS3.15 A.5.3.x)."""
        if self._audit is None:
            return
        for study_uid, study in tally.studies.items():
            self._audit.instances_transferred(
                received=True, peer_ae=peer_ae, peer_address=tally.peer_ip, study=_audited(study_uid, study),
                success=complete,
            )

    def _on_rejected(self, event: evt.Event) -> None:
        """pynetdicom's own refusals: a called AE title not the node's, a calling one not allowed, no context."""
        reason = self._rejection_reason(event.assoc)
        unknown = reason.startswith("calling AE title")
        kind = SecurityAlertKind.UNKNOWN_PEER if unknown else SecurityAlertKind.ASSOCIATION_REFUSED
        self._refuse(event.assoc, self._tally(event.assoc), reason, kind)

    def _on_aborted(self, event: evt.Event) -> None:
        tally = self._tally(event.assoc)
        if tally is not None:
            # The idle timer is still expired while pynetdicom aborts for network_timeout_s; by the
            # time the connection closes, the peer's last bytes may have restarted it.
            tally.outcome = "timed_out" if event.assoc.dul.idle_timer_expired() else "aborted"

    def _on_echo(self, event: evt.Event) -> int:
        return int(StoreStatus.SUCCESS)

    def _on_store(self, event: evt.Event) -> Dataset:
        tally = self._tally(event.assoc)
        request = event.request
        sop_instance = str(request.AffectedSOPInstanceUID or "")
        if tally is not None:
            tally.storing = True
        try:
            status, detail, size, header = self._store_instance(event)
        except Exception as exc:  # whatever it is, the peer gets a deliberate status, never 0xC211
            # The message of a foreign exception may quote attribute values, so
            # log its type and the traceback's frames (code only), not its text.
            where = traceback.extract_tb(exc.__traceback__)[-1]
            log.error(
                "store.error peer_ae=%s sop_instance_uid=%s error=%s at=%s:%d: a bug in the node; please report it",
                _peer_ae(event.assoc),
                sop_instance,
                type(exc).__name__,
                Path(where.filename).name,
                where.lineno,
                exc_info=(type(exc), _Withheld(type(exc).__name__), exc.__traceback__),
            )
            status, detail, size, header = StoreStatus.PROCESSING_FAILURE, "internal error; see the node's log", 0, None
        finally:
            # The time this handler waited (on the disk, on the database) is the
            # node's, not the peer's: it must not count as the peer's silence
            # against network_timeout_s, or the node would abort its own association.
            internals.restart_idle_timer(event.assoc)
        if tally is not None:
            tally.storing = False
            tally.last_store_at = time.monotonic()
            if status == StoreStatus.SUCCESS:
                tally.bytes += size
                if header is not None:
                    self._note_study(tally, header)
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

    def _note_study(self, tally: _AssociationTally, header: IncomingHeader) -> None:
        """Count an instance stored for its study; the first of a study on an association begins its transfer."""
        study = tally.studies.get(header.study_uid)
        if study is None:
            study = tally.studies[header.study_uid] = _StudyTally(
                header.patient_id, header.patient_name, header.accession_number
            )
        study.sop_classes[header.sop_class_uid] = study.sop_classes.get(header.sop_class_uid, 0) + 1
        if self._audit is not None and sum(study.sop_classes.values()) == 1:
            self._audit.transfer_began(
                received=True, peer_ae=tally.peer_ae, peer_address=tally.peer_ip,
                study=_audited(header.study_uid, study),
            )

    # The work behind the C-STORE handler.

    def _store_instance(self, event: evt.Event) -> tuple[StoreStatus, str, int, IncomingHeader | None]:
        """Store one instance; returns (status, detail for the log and Error Comment, bytes, its header).

        The spool file is this handler's alone until its row commits: it is
        made durable under its unique spool name, recorded, and only then
        renamed into place. A failure before the rename leaves the store as
        it was (pynetdicom deletes the spool file after the handler).
        """
        refused = refusal_of(event.request)
        if refused is not None:
            return StoreStatus.OUT_OF_RESOURCES_DISK, refused, 0, None
        if self._store.free_bytes() < self._min_free_bytes:
            return (
                StoreStatus.OUT_OF_RESOURCES_DISK,
                f"free disk below min_free_disk_mb={self._node.min_free_disk_mb}; free space on the node",
                0,
                None,
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
        except RefusedDatasetError as refused_dataset:
            return refused_dataset.status, refused_dataset.detail, 0, None
        size = spool.stat().st_size
        stored = self._queue.stored_path(header.sop_instance_uid)
        if stored is not None and self._store.holds(stored):
            return StoreStatus.SUCCESS, "duplicate", size, header
        relative = self._store.relative_path(header.study_uid, header.series_uid, header.sop_instance_uid)
        try:
            self._store.make_durable(spool)
            self._store.make_room(relative)
        except OSError as exc:
            return self._write_failure(exc, relative)
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
            body_part=header.body_part,
            urgent=header.urgent,
            reopens=not self._is_own_report(header.study_uid, header.sop_instance_uid),
        )
        try:
            registration = self._queue.record_instance(received)
        except StudyBeingPurgedError:
            # Its files are being removed ([storage] keep_days, `queue purge`): recording this instance
            # would answer Success for a file about to go. Once the purge is done it makes a new study.
            return _BEING_PURGED
        except SQLAlchemyError as exc:
            log.error("store.queue_failed study_uid=%s error=%s", header.study_uid, type(exc).__name__)
            return StoreStatus.OUT_OF_RESOURCES_QUEUE, "the queue database is unavailable; see the node's log", 0, None
        if registration is Registration.DUPLICATE:
            # Another association recorded the same instance meanwhile. Its file is
            # the stored one; ours only fills in when that file is not there (yet,
            # or no more: a crash between a row and its rename).
            stored = self._queue.stored_path(header.sop_instance_uid)
            if stored is not None and self._store.holds(stored):
                return StoreStatus.SUCCESS, "duplicate", size, header
            if stored is not None and Path(stored) != relative:
                relative = Path(stored)
                try:
                    self._store.make_room(relative)
                except OSError as exc:
                    return self._write_failure(exc, relative)
        try:
            self._place(spool, relative)
        except OSError as exc:
            # The row stays, pointing at no file: a re-send is not taken for a
            # duplicate (see above) and fills it in.
            return self._write_failure(exc, relative)
        if registration in _FINISHED_STUDY and self._queue.stored_path(header.sop_instance_uid) is None:
            # Its study stayed finished (cancelled; or this is the node's own report), so a purge
            # may have begun, or removed its rows, between the record and the rename: its file
            # goes, or has no row and nothing would ever process it. Not stored, then: the
            # sender's retry makes a new study (and its rename replaces this file; removing it
            # here could remove that retry's file instead). A study receiving cannot be purged.
            log.warning("store.purged_meanwhile study_uid=%s sop_instance_uid=%s: refused, the sender retries",
                        header.study_uid, header.sop_instance_uid)
            return _BEING_PURGED
        return StoreStatus.SUCCESS, registration.value, size, header

    def _place(self, spool: Path, relative: Path) -> None:
        """Rename the recorded instance into place; once more if a purge of the study's last files removed
        the (then empty) folder between :meth:`FileStore.make_room` and now."""
        try:
            self._store.place(spool, relative)
        except FileNotFoundError:
            if not spool.exists():
                raise
            self._store.make_room(relative)
            self._store.place(spool, relative)

    def _write_failure(self, exc: OSError, relative: Path) -> tuple[StoreStatus, str, int, None]:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return StoreStatus.OUT_OF_RESOURCES_DISK, "disk full while writing; free space on the node", 0, None
        log.error("store.write_failed path=%s errno=%s", relative, errno.errorcode.get(exc.errno or 0, exc.errno))
        return StoreStatus.OUT_OF_RESOURCES_WRITE, "cannot write the instance; see the node's log", 0, None

    def _is_own_report(self, study_uid: str, sop_instance_uid: str) -> bool:
        """Whether an instance is a report this node made (a PACS routed it back to the node).

        The node keeps every report it made under ``reports/<study>/<sop>.dcm``;
        such an instance is stored, but does not re-open its study, which would
        run the model again and send one more report.
        """
        return (self._store.data_dir / "reports" / study_uid / f"{sop_instance_uid}.dcm").is_file()

    def _tally(self, association: Association) -> _AssociationTally | None:
        with self._lock:
            return self._tallies.get(id(association))

    def _rejection_reason(self, association: Association) -> str:
        requestor = association.requestor
        called = _called_ae(association)
        if called != self._node.ae_title.strip():
            return f"called AE title {called!r} is not this node's ({self._node.ae_title})"
        allowed = self._peers.allowed_calling_aets()
        if allowed and requestor.ae_title.strip() not in {aet.strip() for aet in allowed}:
            return "calling AE title not in allowed_calling_aets nor [[peers]]"
        return f"more than max_associations={self._node.max_associations} at once, or no acceptable context"


def _audited(study_uid: str, study: _StudyTally) -> AuditedStudy:
    return AuditedStudy(
        study_uid=study_uid, patient_id=study.patient_id, patient_name=study.patient_name,
        sop_classes=dict(study.sop_classes), accession_number=study.accession_number,
    )


def _discard_partial_dataset(association: Association) -> int | None:
    """Delete the spool file of a dataset still arriving when the association ended; its size, or None.

    pynetdicom leaves that file behind when a peer aborts or disconnects
    mid-dataset. Nothing of it was acknowledged, so it goes now, not at the
    next restart. (pynetdicom resets its DIMSE message once a dataset is
    complete, so a file still attached to it is a partial one.)
    """
    partial = internals.partial_data_set_file(association)
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


_AE_FIELDS = ((4, "called"), (20, "calling"))
"""Offsets of the Called and Calling AE Title fields in an A-ASSOCIATE-RQ after its 6-byte header (PS3.8 9.3.2)."""


class _RefusedConnection(ConnectionAbortedError):
    """The node ended a connection on purpose, and has logged why: pynetdicom need not add a traceback."""


_refusing = threading.local()


class _QuietForRefusals(logging.Filter):
    """Drop pynetdicom's "connection closed" error and traceback for a connection the node refused itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(_refusing, "active", False)


logging.getLogger("pynetdicom.dul").addFilter(_QuietForRefusals())


def _refuse_connection(association: Association, pdu: bytes, why: str) -> NoReturn:
    with contextlib.suppress(OSError):
        internals.send_raw_pdu(association, pdu)
    _refusing.active = True
    raise _RefusedConnection(why)


SecurityAlert = Callable[[SecurityAlertKind, str, "str | None", str], None]
"""Audits a refusal: the kind, the peer's IP address and AE title, what happened."""


def _guard_incoming_pdus(association: Association, peer_ip: str, alert: SecurityAlert) -> None:
    """Check each PDU's header, and an A-ASSOCIATE-RQ's AE titles, before pynetdicom reads the PDU.

    * A P-DATA-TF longer than the maximum the node announced gets an
      A-ABORT (source: service provider, reason: invalid PDU parameter
      value) before it is read: pynetdicom reads a PDU whole, whatever length
      its header claims, so a broken or hostile peer could otherwise make the
      node buffer any amount.
    * AE titles padded with NUL bytes (pynetdicom2 sends them; DCMTK,
      PixelMed, Odil, dcmjs-dimse and CTN accept them) are read as those
      peers read them: up to the first NUL, padded with spaces.
    * Any other AE title that is not one (control characters, a backslash,
      non-ASCII, all spaces) gets an A-ASSOCIATE-RJ with a refusal log line,
      instead of a library exception that drops the connection.

    Each refusal is audited (``alert``) as well as logged.
    """

    def check_header(pdu_type: int, length: int) -> None:
        if pdu_type == internals.P_DATA_TF and length > MAX_PDU_SIZE:
            log.warning(
                "association.pdu_too_long peer_ae=%s peer_ip=%s pdu_length=%d max_pdu_length=%d: aborting",
                _peer_ae(association), peer_ip, length, MAX_PDU_SIZE,
            )
            alert(SecurityAlertKind.ASSOCIATION_REFUSED, peer_ip, _peer_ae(association),
                  f"aborted: a P-DATA-TF of {length} bytes, above the {MAX_PDU_SIZE} the node announced")
            _refuse_connection(
                association, _A_ABORT_INVALID_PDU_PARAMETER, f"P-DATA-TF of {length} bytes exceeds {MAX_PDU_SIZE}"
            )

    internals.watch_pdus(
        association, check_header, lambda body: _normalised_request(body, association, peer_ip, alert)
    )


def _normalised_request(body: bytearray, association: Association, peer_ip: str, alert: SecurityAlert) -> bytearray:
    """The A-ASSOCIATE-RQ body with NUL-padded AE titles space-padded; refuses one with an invalid AE title."""
    for offset, role in _AE_FIELDS:
        raw = bytes(body[offset : offset + 16])
        if len(raw) < 16:
            return body  # too short to be a request: pynetdicom refuses it as an invalid PDU
        title = raw.split(b"\x00", 1)[0].ljust(16, b" ")
        body[offset : offset + 16] = title
        text = title.decode("latin-1").strip()
        if not text or not title.isascii() or "\\" in text or any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
            calling = bytes(body[20:36]).decode("latin-1").strip() or "?"
            reason = f"the {role} AE title is not a valid AE title (PS3.5 6.2)"
            log.warning(
                "association.refused peer_ae=%s peer_ip=%s called_ae=%s reason=%r",
                calling,
                peer_ip,
                bytes(body[4:20]).decode("latin-1").strip() or "?",
                reason,
            )
            alert(SecurityAlertKind.UNKNOWN_PEER, peer_ip, calling.encode("ascii", "backslashreplace").decode(), reason)
            # Rejected permanent, source: service user, reason: calling (3) or called (7) AE title not recognised.
            _refuse_connection(
                association,
                struct.pack(">BBLBBBB", 0x03, 0, 4, 0, 0x01, 0x01, 0x03 if role == "calling" else 0x07),
                f"invalid {role} AE title",
            )
    return body


_A_ABORT_INVALID_PDU_PARAMETER = struct.pack(">BBLBBBB", 0x07, 0, 4, 0, 0, 2, 6)
"""A-ABORT PDU, source 2 (service provider), reason 6 (invalid PDU parameter value); PS3.8 9.3.8."""


def _end_idle(association: Association) -> None:
    """End an association with no DIMSE message in progress, without waiting for it."""
    if association.is_established:
        association.abort(block=False)
    elif not internals.has_request(association):
        # Still waiting for its request (a port check): close the connection and
        # wake the association's thread, which ends on its own.
        internals.close_before_request(association)


def _called_ae(association: Association) -> str:
    primitive = association.requestor.primitive
    return (primitive.called_ae_title if primitive else "").strip() or "?"


def _peer_ae(association: Association) -> str:
    """The calling AE title; from the A-ASSOCIATE-RQ itself while it is being decided (EVT_REQUESTED),
    when pynetdicom has not yet copied it to the requestor."""
    title = association.requestor.ae_title
    primitive = association.requestor.primitive
    if not title and primitive is not None:
        title = primitive.calling_ae_title
    return (title or "").strip() or "?"
