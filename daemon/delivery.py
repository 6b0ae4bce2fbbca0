"""Sending reports to the destinations: a C-STORE SCU with exponential backoff and jitter.

A scheduler job takes the deliveries that are due from the database, sends
each report, and records success or the failure with the next attempt's
time (initial_backoff_s doubling per attempt, +-20% jitter, capped at
max_backoff_s). After max_attempts the study is ``failed`` with the last
error; ``triagenode queue retry`` sends again. The schedule lives in the
database, so a restart keeps every pending delivery.
"""

from __future__ import annotations

import logging
import random
from datetime import datetime, timedelta
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import Comprehensive3DSRStorage, ComprehensiveSRStorage

from config.settings import DeliverySettings, Destination, Settings
from storage.reports import DueDelivery, ReportBook
from storage.timeutil import utcnow

log = logging.getLogger("triagenode.delivery")

REPORT_CONTEXTS = (Comprehensive3DSRStorage, ComprehensiveSRStorage)
REPORT_TRANSFER_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
TIMEOUT_S = 30


class DeliveryError(RuntimeError):
    """The destination did not take the report; the text is stored as the delivery's last error."""


def backoff(attempt: int, settings: DeliverySettings, rng: random.Random) -> float:
    """Seconds before attempt ``attempt + 1`` after ``attempt`` failures."""
    base = min(settings.max_backoff_s, settings.initial_backoff_s * 2 ** max(attempt - 1, 0))
    return min(settings.max_backoff_s, base * rng.uniform(0.8, 1.2))


def send_report(path: Path, destination: Destination, calling_ae: str) -> None:
    """C-STORE one report; raises :class:`DeliveryError` unless the destination answers Success."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = TIMEOUT_S
    for sop_class in REPORT_CONTEXTS:
        ae.add_requested_context(sop_class, list(REPORT_TRANSFER_SYNTAXES))
    association = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if association.is_rejected:
        raise DeliveryError(f"association rejected by {destination.ae_title}@{destination.host}:{destination.port}")
    if not association.is_established:
        raise DeliveryError(f"no association with {destination.ae_title}@{destination.host}:{destination.port}")
    try:
        status = association.send_c_store(dcmread(path))
    except ValueError as exc:  # no accepted context for the SR class
        raise DeliveryError(f"{destination.ae_title} accepts no presentation context for the report ({exc})") from exc
    finally:
        if association.is_established:
            association.release()
    if not status or "Status" not in status:
        raise DeliveryError("no C-STORE response (timeout or aborted association)")
    if status.Status not in (0x0000, 0xB000, 0xB006, 0xB007):
        raise DeliveryError(f"C-STORE status 0x{status.Status:04X}")


class ReportDelivery:
    """The scheduler's delivery job."""

    def __init__(self, settings: Settings, book: ReportBook) -> None:
        self._settings = settings
        self._book = book
        self._destinations = {d.name: d for d in settings.destinations}
        self._rng = random.Random()

    def run_due(self, now: datetime | None = None) -> int:
        """Attempt every due delivery once; returns how many were attempted."""
        due = self._book.due(now or utcnow())
        for delivery in due:
            self._attempt(delivery)
        return len(due)

    def _attempt(self, delivery: DueDelivery) -> None:
        destination = self._destinations.get(delivery.destination)
        path = self._settings.node.data_dir / delivery.sr_path
        try:
            if destination is None:
                raise DeliveryError(f"destination {delivery.destination!r} is no longer configured")
            send_report(path, destination, self._settings.node.ae_title)
        except (DeliveryError, OSError) as exc:
            attempt = delivery.attempts + 1
            wait = backoff(attempt, self._settings.delivery, self._rng)
            last = self._book.failed_attempt(
                delivery.id, str(exc), utcnow() + timedelta(seconds=wait), self._settings.delivery.max_attempts
            )
            log.warning(
                "delivery.failed study_uid=%s destination=%s attempt=%d error=%r %s",
                delivery.study_uid,
                delivery.destination,
                attempt,
                str(exc),
                "gave_up=true" if last else f"retry_in_s={wait:.0f}",
            )
            return
        self._book.succeeded(delivery.id)
        log.info("delivery.sent study_uid=%s destination=%s attempt=%d", delivery.study_uid, delivery.destination,
                 delivery.attempts + 1)  # fmt: skip
