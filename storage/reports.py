"""Results and their deliveries: what a worker found, and the report's way to every destination.

A worker ends its lease with :meth:`ReportBook.record_result`: the result,
one pending delivery per destination and the move to ``reported`` are one
transaction, so a crash leaves either nothing (the lease expires, the study
is processed again) or everything. Deliveries carry their own retry
schedule in the database, so a restart keeps every pending one.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, func, select

from storage.engine import reader, writer
from storage.models import Delivery, Study, StudyEvent, StudyResult, StudyState
from storage.queue import Claim, transition
from storage.timeutil import iso, utcnow

log = logging.getLogger("triagenode.reports")

PENDING, SENT, FAILED = "pending", "sent", "failed"


@dataclass(frozen=True)
class DueDelivery:
    id: int
    study_uid: str
    destination: str
    sr_path: str
    attempts: int


class ReportBook:
    def __init__(self, engine: Engine) -> None:
        self._write = writer(engine)
        self._read = reader(engine)

    def record_result(
        self,
        claim: Claim,
        result: dict[str, Any],
        destinations: list[str],
        sr_path: str | None = None,
        sr_sop_instance_uid: str | None = None,
        now: datetime | None = None,
    ) -> bool:
        """Store the result, schedule its deliveries and end the lease (``reported``); False if the lease was lost.

        ``result`` is a pipeline result's dict, or ``{"applicable": False, "reason": ..., "model": ...,
        "model_version": ...}`` for a study the model cannot read.
        """
        now = now or utcnow()
        with self._write.begin() as session:
            study = session.scalar(select(Study).where(Study.study_uid == claim.study_uid))
            if study is None or study.state != StudyState.PROCESSING or study.lease_owner != claim.worker_id:
                return False
            applicable = result.get("applicable", True)
            row = session.scalar(select(StudyResult).where(StudyResult.study_id == study.id))
            if row is None:
                row = StudyResult(study_id=study.id)
                session.add(row)
            row.applicable = applicable
            row.reason = result.get("reason")
            row.finding = result.get("finding")
            row.probability = result.get("probability")
            row.threshold = result.get("threshold")
            row.model = result["model"]
            row.model_version = result["model_version"]
            row.series_uid = result.get("series_uid")
            row.key_instance_uid = result.get("key_instance_uid")
            row.slices = result.get("slices")
            row.timings_ms = json.dumps(result.get("timings_ms", {}))
            row.sr_path = sr_path
            row.sr_sop_instance_uid = sr_sop_instance_uid
            row.created_at = now
            if sr_path is not None:
                existing = {
                    d.destination: d for d in session.scalars(select(Delivery).where(Delivery.study_id == study.id))
                }
                for name in destinations:
                    delivery = existing.get(name) or Delivery(study_id=study.id, destination=name)
                    delivery.state, delivery.attempts, delivery.next_attempt_at = PENDING, 0, now
                    delivery.last_error = delivery.sent_at = None
                    session.add(delivery)
            if applicable:
                verdict = "present" if result["finding"] else "absent"
                model = f"{result['model']} {result['model_version']}"
                reason = f"finding {verdict}, probability {result['probability']:.3f} ({model})"
            else:
                reason = f"not applicable: {result['reason']}"
            transition(session, study, StudyState.REPORTED, reason, now)
            return True

    def due(self, now: datetime | None = None, limit: int = 20) -> list[DueDelivery]:
        now = now or utcnow()
        with self._read() as session:
            rows = session.execute(
                select(Delivery.id, Study.study_uid, Delivery.destination, StudyResult.sr_path, Delivery.attempts)
                .join(Study, Study.id == Delivery.study_id)
                .join(StudyResult, StudyResult.study_id == Delivery.study_id)
                .where(Delivery.state == PENDING, Delivery.next_attempt_at <= now, Study.state == StudyState.REPORTED)
                .order_by(Delivery.next_attempt_at)
                .limit(limit)
            ).all()
        return [DueDelivery(*row) for row in rows]

    def succeeded(self, delivery_id: int, now: datetime | None = None) -> None:
        now = now or utcnow()
        with self._write.begin() as session:
            delivery = session.get_one(Delivery, delivery_id)
            delivery.state, delivery.sent_at, delivery.last_error = SENT, now, None
            delivery.attempts += 1
            study = session.get_one(Study, delivery.study_id)
            session.add(
                StudyEvent(study=study, at=now, from_state=study.state, to_state=study.state,
                           reason=f"report delivered to {delivery.destination}")
            )  # fmt: skip
            session.flush()
            open_count = session.scalar(
                select(func.count()).where(Delivery.study_id == study.id, Delivery.state != SENT)
            )
            if open_count == 0 and study.state == StudyState.REPORTED:
                transition(session, study, StudyState.SENT, "every destination has the report", now)

    def failed_attempt(
        self, delivery_id: int, error: str, next_attempt_at: datetime, max_attempts: int, now: datetime | None = None
    ) -> bool:
        """Record a failed attempt; True when it was the last one (the study is then ``failed``)."""
        now = now or utcnow()
        with self._write.begin() as session:
            delivery = session.get_one(Delivery, delivery_id)
            delivery.attempts += 1
            delivery.last_error = error[:500]
            if delivery.attempts < max_attempts:
                delivery.next_attempt_at = next_attempt_at
                return False
            delivery.state = FAILED
            study = session.get_one(Study, delivery.study_id)
            if study.state == StudyState.REPORTED:
                transition(
                    session,
                    study,
                    StudyState.FAILED,
                    f"report not delivered to {delivery.destination} after {delivery.attempts} attempts "
                    f"(last: {error}); `triagenode queue retry` sends again",
                    now,
                )
            return True

    def details(self, study_id: int) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        """The ``result`` and ``deliveries`` that ``queue show`` prints."""
        with self._read() as session:
            row = session.scalar(select(StudyResult).where(StudyResult.study_id == study_id))
            deliveries = session.scalars(
                select(Delivery).where(Delivery.study_id == study_id).order_by(Delivery.id)
            ).all()
            result = None
            if row is not None:
                result = {
                    "applicable": row.applicable,
                    "reason": row.reason,
                    "finding": row.finding,
                    "probability": row.probability,
                    "threshold": row.threshold,
                    "model": row.model,
                    "model_version": row.model_version,
                    "series_uid": row.series_uid,
                    "key_instance_uid": row.key_instance_uid,
                    "slices": row.slices,
                    "timings_ms": json.loads(row.timings_ms),
                    "sr_sop_instance_uid": row.sr_sop_instance_uid,
                }
            return result, [
                {
                    "destination": d.destination,
                    "state": d.state,
                    "attempts": d.attempts,
                    "next_attempt_at": iso(d.next_attempt_at) if d.state == PENDING else None,
                    "last_error": d.last_error,
                    "sent_at": iso(d.sent_at),
                }
                for d in deliveries
            ]
