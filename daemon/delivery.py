"""Sending reports to the destinations: a C-STORE SCU per destination, with exponential backoff and jitter.

Destinations are independent. Each configured destination has its own
:class:`DestinationSender`, a thread that sends that destination's reports one
at a time, so a destination that is down or hangs (30 s per attempt) holds up
only its own queue, never another's, and one destination never has two
sends at once. The scheduler's job (:meth:`ReportDelivery.run_due`, every
second) asks the database which destinations have due deliveries and hands
each idle sender its own.

A failed attempt is recorded with the next attempt's time (initial_backoff_s
doubling per attempt, +-20% jitter, capped at max_backoff_s). After
max_attempts that delivery gives up; the study is ``failed`` only once no
other delivery is pending (see :func:`storage.reports.summarise`).
``triagenode queue retry`` and ``triagenode queue resend`` send again. The
schedule lives in the database, so a restart keeps every pending delivery.

A report of several objects (a TID 1500 SR and a Mammography CAD SR; a SEG
and its SR) is one delivery per destination: every object, primary first, on
one association (:func:`send_reports`), sent only when each one was stored.

A destination with ``tls = true`` gets its reports over DICOM TLS
(:func:`daemon.tls.client_context`): its certificate is verified, host name
included, and the node shows its own certificate where the destination asks
for one. Every attempt is audited (Begin Transferring and DICOM Instances
Transferred, with the outcome).

This module runs in the receiver's process: it must not import torch (nor
:mod:`inference.report`, which does); :func:`report_in_class` imports it
only where it is called, in the CLI.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import Comprehensive3DSRStorage, ComprehensiveSRStorage
from pynetdicom.status import STATUS_SUCCESS, STATUS_WARNING, code_to_category
from sqlalchemy.exc import SQLAlchemyError

from triagenode.config.settings import DeliverySettings, Destination, Settings, TlsSettings
from triagenode.daemon.audit import AuditedStudy, AuditTrail
from triagenode.daemon.tls import client_context
from triagenode.storage.filestore import FileStore
from triagenode.storage.reports import DueDelivery, ReportBook, class_name
from triagenode.storage.timeutil import utcnow

log = logging.getLogger("triagenode.delivery")

REPORT_CONTEXTS = (Comprehensive3DSRStorage, ComprehensiveSRStorage)
"""Proposed on every association; an object of another class (a Mammography CAD SR, a SEG) adds its own."""
OTHER_REPORT_CLASSES = (UID("1.2.840.10008.5.1.4.1.1.88.50"), UID("1.2.840.10008.5.1.4.1.1.66.4"))
"""Report classes a model may make besides the Comprehensive SRs (a detector's Mammography CAD SR, with
``mammo_sr``; a segmenter's DICOM SEG); each is proposed on an association that sends one (the conformance
statement lists them)."""
REPORT_TRANSFER_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
TIMEOUT_S = 30
BATCH = 20
"""Deliveries handed to a sender at once; it asks again when it is done with them."""

SR_CLASS_UIDS = {"comprehensive3d": str(Comprehensive3DSRStorage), "comprehensive": str(ComprehensiveSRStorage)}
"""``[inference] sr_sop_class`` -> SOP Class UID."""


class DeliveryError(RuntimeError):
    """The destination did not take the report; the text is stored as the delivery's last error."""


def backoff(attempt: int, settings: DeliverySettings, rng: random.Random) -> float:
    """Seconds before attempt ``attempt + 1`` after ``attempt`` failures."""
    base = min(settings.max_backoff_s, settings.initial_backoff_s * 2 ** max(attempt - 1, 0))
    return min(settings.max_backoff_s, base * rng.uniform(0.8, 1.2))


def peer(destination: Destination) -> str:
    """``AE@host:port``, the way ``triagenode echo`` takes a peer."""
    return f"{destination.ae_title}@{destination.host}:{destination.port}"


def send_reports(
    paths: Sequence[Path], destination: Destination, calling_ae: str, tls: TlsSettings | None = None
) -> None:
    """C-STORE a report's objects in order on one association; raises :class:`DeliveryError` unless each is stored.

    A destination that holds only some of a report's objects (the TID 1500
    SR without its Mammography CAD SR) does not have the report, so one
    refused object fails the attempt, with a reason naming it, and the retry
    sends them all again: the same UIDs, which a PACS takes as a re-send.
    Every file is read before the association opens, so an unreadable one
    costs the destination nothing. Status Success or Warning (coerced,
    elements discarded) counts as stored.
    """
    send_datasets(read_reports(paths), destination, calling_ae, tls)


def read_reports(paths: Sequence[Path]) -> list[Dataset]:
    """A report's stored objects, each read whole before anything is sent."""
    several = len(paths) > 1
    return [_read_report(path, several) for path in paths]


def send_datasets(
    datasets: Sequence[Dataset], destination: Destination, calling_ae: str, tls: TlsSettings | None = None
) -> None:
    """C-STORE read report objects on one association (over TLS for a TLS destination); see :func:`send_reports`."""
    several = len(datasets) > 1
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = TIMEOUT_S
    for sop_class in _proposed_classes(datasets):
        ae.add_requested_context(sop_class, list(REPORT_TRANSFER_SYNTAXES))
    tls_args = None
    if destination.tls:
        try:
            tls_args = (client_context(destination, tls or TlsSettings()), destination.host)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise DeliveryError(f"TLS files for {destination.name} cannot be loaded: {exc}") from exc
    association = ae.associate(destination.host, destination.port, ae_title=destination.ae_title, tls_args=tls_args)
    if association.is_rejected:
        raise DeliveryError(f"association rejected by {peer(destination)}")
    if not association.is_established:
        over = (
            " over TLS (is its certificate signed by ca_certificates and issued for its host name? "
            "the log line before this one names the TLS error)" if destination.tls else ""
        )
        raise DeliveryError(f"no association with {peer(destination)}{over}")
    try:
        for number, ds in enumerate(datasets, 1):
            label = f"{_describe(ds)}, object {number} of {len(datasets)}" if several else ""
            which = f" for {label}" if several else ""
            try:
                status = association.send_c_store(ds)
            except ValueError as exc:  # no accepted context for the object's class
                raise DeliveryError(_no_context(destination, ds, label, exc)) from exc
            if not status or "Status" not in status:
                raise DeliveryError(f"no C-STORE response{which} (timeout or aborted association)")
            category = code_to_category(int(status.Status))
            if category not in (STATUS_SUCCESS, STATUS_WARNING):  # a warning (coerced, elements discarded) is stored
                raise DeliveryError(f"C-STORE status 0x{status.Status:04X} ({category}){which}")
    finally:
        if association.is_established:
            association.release()


def _read_report(path: Path, several: bool) -> Dataset:
    """A stored report object; one pydicom cannot read is a :class:`DeliveryError` that names it (OSError as is)."""
    try:
        return dcmread(path)
    except (InvalidDicomError, ValueError, AttributeError, KeyError) as exc:
        name = f" {path.name}" if several else ""
        raise DeliveryError(
            f"the stored report{name} cannot be read ({type(exc).__name__}); see `triagenode queue show`"
        ) from exc


def _proposed_classes(datasets: Sequence[Dataset]) -> list[str]:
    """The SR classes always proposed, then each other class among the objects, once."""
    classes = [str(uid) for uid in REPORT_CONTEXTS]
    for ds in datasets:
        uid = str(ds.get("SOPClassUID", ""))
        if uid and uid not in classes:
            classes.append(uid)
    return classes


def _describe(ds: Dataset) -> str:
    """``Mammography CAD SR 1.2.3``: an object as a delivery error names it."""
    return f"{class_name(str(ds.get('SOPClassUID', '')) or None)} {ds.get('SOPInstanceUID', '(no SOP Instance UID)')}"


def _no_context(destination: Destination, ds: Dataset, label: str, exc: ValueError) -> str:
    """Why the destination cannot take an object, and what the administrator can do about it."""
    if str(ds.get("SOPClassUID", "")) in SR_CLASS_UIDS.values():
        whose = f"'s {label}" if label else ""
        return (
            f"{destination.ae_title} accepts no presentation context for the report{whose} ({exc}); "
            "if it refuses 3D SR, set [inference] sr_sop_class = \"comprehensive\" and `triagenode queue resend`"
        )
    sop_class = str(ds.get("SOPClassUID", ""))
    return (
        f"{destination.ae_title} accepts no presentation context for {_describe(ds)} ({exc}); "
        f"ask its administrator to accept {class_name(sop_class)} Storage ({sop_class}): "
        "the report's objects go together"
    )


SR_CLASS_NAMES = {str(Comprehensive3DSRStorage): "Comprehensive 3D SR", str(ComprehensiveSRStorage): "Comprehensive SR"}


def report_in_class(stored: Dataset, sr_class: str) -> Dataset | None:
    """The stored report rebuilt in ``sr_class`` (``[inference] sr_sop_class``), or None when it already is.

    Changing the SR class (for an archive that refuses 3D SR) must help the
    reports already made. A report of another class (a Mammography CAD SR
    made with ``mammo_sr = "mammography-cad"``) is not a Comprehensive (3D)
    SR that the setting chooses between: None, it is sent as it is. The conversion is
    :func:`inference.report.convert_report`, imported here, at the call,
    because :mod:`inference.report` brings torch in, which the receiver's
    process must not load (only the CLI calls this). Raises ValueError when
    the report cannot be held by that class.
    """
    wanted = SR_CLASS_UIDS[sr_class]
    if str(stored.SOPClassUID) == wanted or str(stored.SOPClassUID) not in SR_CLASS_UIDS.values():
        return None  # sr_sop_class chooses between the Comprehensive classes only: a Mammography CAD SR stays one
    from triagenode.inference.report import convert_report

    converted: Dataset = convert_report(stored, sr_class)  # type: ignore[arg-type]
    return converted


def rebuild_report(settings: Settings, book: ReportBook, study_uid: str, model: str | None = None) -> str | None:
    """Rebuild a study's stored report (``model``'s) in the configured SR class before it is sent again.

    Returns a sentence saying what was done, or None when the stored report
    already is of that class (or of neither Comprehensive class). Only the
    primary report is rebuilt; the task's other objects go as they are. The
    new file goes next to the old one (which stays, as sent) and the study's
    result points at it.
    """
    _, sr_path, old_uid = book.report_of(study_uid, model)
    data_dir = settings.node.data_dir
    stored = dcmread(data_dir / sr_path)
    converted = report_in_class(stored, settings.inference.sr_sop_class)
    if converted is None:
        return None
    new_uid = str(converted.SOPInstanceUID)
    store = FileStore(data_dir)
    relative = Path("reports") / study_uid / f"{new_uid}.dcm"
    spooled = store.spool_dir / f"{new_uid}.sr"
    converted.save_as(spooled, enforce_file_format=True)
    store.commit_file(spooled, relative)
    old_class = SR_CLASS_NAMES.get(str(stored.SOPClassUID), str(stored.SOPClassUID))
    new_class = SR_CLASS_NAMES[SR_CLASS_UIDS[settings.inference.sr_sop_class]]
    sentence = (
        f"report rebuilt as {new_class} {new_uid} from the stored {old_class} {old_uid} ([inference] sr_sop_class)"
    )
    book.replace_report(study_uid, str(relative), new_uid, sentence, model=model,
                        sr_sop_class_uid=SR_CLASS_UIDS[settings.inference.sr_sop_class])
    return sentence


class DestinationSender:
    """Sends one destination's reports, one at a time, in its own thread.

    A destination that hangs blocks this thread and nothing else; while it
    is busy the scheduler hands it nothing more, so its backlog waits in the
    database, where a restart finds it.
    """

    def __init__(
        self, destination: Destination, settings: Settings, book: ReportBook, rng: random.Random,
        audit: AuditTrail | None = None,
    ) -> None:
        self.destination = destination
        self._settings, self._book, self._rng, self._audit = settings, book, rng, audit
        self._lock = threading.Lock()
        self._work: list[DueDelivery] = []
        self._busy = False
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"delivery-{destination.name}", daemon=True)
        self._database_failing = False

    @property
    def idle(self) -> bool:
        with self._lock:
            return not self._busy

    def start(self) -> None:
        self._thread.start()

    def offer(self, deliveries: Sequence[DueDelivery]) -> bool:
        """Hand over due deliveries; False (nothing taken) while the sender is still busy."""
        with self._lock:
            if self._busy or self._stopping.is_set():
                return False
            self._work = list(deliveries)
            self._busy = True
        self._wake.set()
        return True

    def stop(self, timeout: float) -> bool:
        """Ask the thread to stop after its current send; True when it has."""
        self._stopping.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._stopping.is_set():
                return
            with self._lock:
                work, self._work = self._work, []
            try:
                for delivery in work:
                    if self._stopping.is_set():
                        return
                    self._attempt(delivery)
                if self._database_failing:
                    log.info("delivery.recovered destination=%s", self.destination.name)
                    self._database_failing = False
            except SQLAlchemyError as exc:  # locked or full: the deliveries stay pending and come back
                if not self._database_failing:
                    log.error("delivery.database_failing destination=%s error=%s detail=%r: retried every second",
                              self.destination.name, type(exc).__name__, str(getattr(exc, "orig", exc)))
                    self._database_failing = True
            finally:
                with self._lock:
                    self._busy = False

    def _attempt(self, delivery: DueDelivery) -> None:
        data_dir = self._settings.node.data_dir
        paths = [data_dir / delivery.sr_path] + [data_dir / path for path in delivery.extra_paths]
        study: AuditedStudy | None = None
        try:
            datasets = read_reports(paths)
            study = self._audit_begin(delivery.study_uid, datasets)
            send_datasets(datasets, self.destination, self._settings.node.ae_title, self._settings.tls)
        except (DeliveryError, OSError) as exc:
            self._audit_end(study, success=False)
            record_failure(self._book, self._settings.delivery, self._rng, delivery, str(exc))
            return
        except (InvalidDicomError, ValueError, AttributeError, KeyError) as exc:  # a stored report pydicom cannot read
            self._audit_end(study, success=False)
            why = f"the stored report cannot be read ({type(exc).__name__}); see `triagenode queue show`"
            record_failure(self._book, self._settings.delivery, self._rng, delivery, why)
            return
        self._audit_end(study, success=True)
        self._book.succeeded(delivery.id)
        log.info("delivery.sent study_uid=%s model=%s destination=%s attempt=%d objects=%d", delivery.study_uid,
                 delivery.model, delivery.destination, delivery.attempts + 1, len(paths))


    def _audit_begin(self, study_uid: str, datasets: Sequence[Dataset]) -> AuditedStudy | None:
        """Begin Transferring DICOM Instances to this destination; the study as the audit trail names it."""
        if self._audit is None:
            return None
        study = audited_study(study_uid, datasets)
        self._audit.transfer_began(received=False, peer_ae=self.destination.ae_title,
                                   peer_address=self.destination.host, study=study)
        return study

    def _audit_end(self, study: AuditedStudy | None, success: bool) -> None:
        if self._audit is not None and study is not None:
            self._audit.instances_transferred(received=False, peer_ae=self.destination.ae_title,
                                              peer_address=self.destination.host, study=study, success=success)


def audited_study(study_uid: str, datasets: Sequence[Dataset]) -> AuditedStudy:
    """A report's objects as the audit trail names them: the study, its patient, the classes sent."""
    classes: dict[str, int] = {}
    for ds in datasets:
        uid = str(ds.get("SOPClassUID", ""))
        classes[uid] = classes.get(uid, 0) + 1
    first = datasets[0] if datasets else Dataset()
    return AuditedStudy(
        study_uid=study_uid, patient_id=str(first.get("PatientID", "") or ""),
        patient_name=str(first.get("PatientName", "") or ""), sop_classes=classes,
        accession_number=str(first.get("AccessionNumber", "") or ""),
    )


def record_failure(
    book: ReportBook, settings: DeliverySettings, rng: random.Random, delivery: DueDelivery, error: str,
    max_attempts: int | None = None,
) -> None:
    """Record a failed attempt with its backoff and log it."""
    attempt = delivery.attempts + 1
    wait = backoff(attempt, settings, rng)
    limit = settings.max_attempts if max_attempts is None else max_attempts
    last = book.failed_attempt(delivery.id, error, utcnow() + timedelta(seconds=wait), limit)
    log.warning(
        "delivery.failed study_uid=%s model=%s destination=%s attempt=%d error=%r %s",
        delivery.study_uid,
        delivery.model,
        delivery.destination,
        attempt,
        error,
        "gave_up=true" if last else f"retry_in_s={wait:.0f}",
    )


class ReportDelivery:
    """The scheduler's delivery job: hands due deliveries to each destination's sender.

    ``run_due`` is called every second by one scheduler thread and returns at
    once; the sends happen in the senders' threads.
    """

    def __init__(self, settings: Settings, book: ReportBook, audit: AuditTrail | None = None) -> None:
        self._settings = settings
        self._book = book
        self._rng = random.Random()  # noqa: S311 - jitter spreads retries; nothing secret
        self.senders = {
            d.name: DestinationSender(d, settings, book, self._rng, audit) for d in settings.destinations
        }
        self._started = False
        self._start_lock = threading.Lock()

    def start(self) -> None:
        """Start the senders' threads (``run_due`` does it on its first call)."""
        with self._start_lock:
            if not self._started:
                for sender in self.senders.values():
                    sender.start()
                self._started = True

    def run_due(self, now: datetime | None = None) -> int:
        """Hand every idle destination its due deliveries; returns how many were handed over."""
        self.start()
        now = now or utcnow()
        # A jittered backoff never schedules further ahead than max_backoff_s * 1.2.
        self._book.catch_up_clock(self._settings.delivery.max_backoff_s * 1.2 + 1, now)
        waiting = self._book.due_destinations(now)
        if not waiting:
            return 0
        handed = 0
        if waiting - self.senders.keys():
            handed += self._give_up_unconfigured(now)
        for name, sender in self.senders.items():
            if name not in waiting or not sender.idle:
                continue
            due = self._book.due(now, BATCH, destination=name)
            if due and sender.offer(due):
                handed += len(due)
        return handed

    def idle(self) -> bool:
        """Whether no sender has work in hand (tests and shutdown use it)."""
        return all(sender.idle for sender in self.senders.values())

    def stop(self, timeout: float = 5.0) -> None:
        """Let each sender finish its current send (up to ``timeout`` in all); a hung one is left behind."""
        for sender in self.senders.values():
            sender.stop(0)
        deadline = time.monotonic() + timeout
        for sender in self.senders.values():
            sender.stop(max(0.0, deadline - time.monotonic()))

    def _give_up_unconfigured(self, now: datetime) -> int:
        """Deliveries to a destination removed from the config fail at once, with a line saying so."""
        due = self._book.due(now, BATCH, exclude=list(self.senders))
        for delivery in due:
            record_failure(
                self._book, self._settings.delivery, self._rng, delivery,
                f"destination {delivery.destination!r} is no longer configured; "
                "`triagenode queue resend` sends the report to the configured ones",
                max_attempts=0,
            )
        return len(due)
