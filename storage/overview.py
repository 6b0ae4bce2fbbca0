"""What the admin CLI shows of the queue, as plain data in the JSON shapes scripts rely on.

``queue ls --json``: a list of :func:`study_summary` objects; ``queue show
--json``: one of them where ``series`` holds the series (the count moves to
``series_count``), plus ``calling_aets``, ``result``, ``deliveries`` and
``events``; ``status --json``: ``receiver``, ``counts`` and ``destinations``.
``outcome`` tells present, absent and not applicable apart at a glance (a
not-applicable study without a report stays ``reported``, next to ``sent``
ones, and must not look stuck). Reads only, through deferred transactions, so
the CLI never holds up the receiver.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, distinct, func, select

from triagenode.storage.engine import reader
from triagenode.storage.models import Instance, ResultRecord, Series, Study, StudyEvent, StudyState
from triagenode.storage.queue import UnknownStudyError
from triagenode.storage.reports import ReportBook
from triagenode.storage.timeutil import iso

OUTCOMES = ("present", "absent", "not applicable")
"""Values of ``outcome``; ``None`` when the study has no result yet."""


def outcome_of(applicable: bool | None, finding: bool | None) -> str | None:
    """What the model said, in one word: present, absent, not applicable, or None (no result yet)."""
    if applicable is None:
        return None
    if not applicable:
        return "not applicable"
    return "present" if finding else "absent"


def study_summary(study: Study, outcome: str | None = None) -> dict[str, Any]:
    return {
        "study_uid": study.study_uid,
        "state": study.state,
        "modality": study.modality,
        "study_date": study.study_date,
        "description": study.description,
        "series": study.series_count,
        "instances": study.instance_count,
        "bytes": study.byte_count,
        "received_at": iso(study.received_at),
        "last_instance_at": iso(study.last_instance_at),
        "updated_at": iso(study.updated_at),
        "lease_owner": study.lease_owner,
        "lease_expires_at": iso(study.lease_expires_at),
        "processing_attempts": study.processing_attempts,
        "outcome": outcome,
    }


class QueueOverview:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._sessions = reader(engine)

    def list_studies(self, state: StudyState | None = None, limit: int = 50) -> list[dict[str, Any]]:
        """The most recently changed studies first (an index serves the sort and the filter)."""
        query = (
            select(Study, ResultRecord.applicable, ResultRecord.finding)
            .outerjoin(ResultRecord, ResultRecord.study_id == Study.id)
            .order_by(Study.updated_at.desc(), Study.id.desc())
            .limit(limit)
        )
        if state is not None:
            query = query.where(Study.state == state)
        with self._sessions() as session:
            return [
                study_summary(study, outcome_of(applicable, finding))
                for study, applicable, finding in session.execute(query)
            ]

    def study_details(self, study_uid: str) -> dict[str, Any]:
        with self._sessions() as session:
            study = session.scalar(select(Study).where(Study.study_uid == study_uid))
            if study is None:
                raise UnknownStudyError(f"no study {study_uid} on this node; `triagenode queue ls` lists them")
            found = session.execute(
                select(ResultRecord.applicable, ResultRecord.finding).where(ResultRecord.study_id == study.id)
            ).first()
            details = study_summary(study, outcome_of(*found) if found else None)
            calling = dict(
                session.execute(
                    select(Instance.series_id, func.group_concat(distinct(Instance.calling_ae)))
                    .join(Series)
                    .where(Series.study_id == study.id)
                    .group_by(Instance.series_id)
                ).all()
            )
            details["series_count"] = details["series"]
            details["series"] = [
                {
                    "series_uid": series.series_uid,
                    "modality": series.modality,
                    "series_number": series.series_number,
                    "description": series.description,
                    "instances": series.instance_count,
                    "calling_aets": sorted((calling.get(series.id) or "").split(",")) if calling.get(series.id) else [],
                }
                for series in study.series
            ]
            details["calling_aets"] = sorted({aet for s in details["series"] for aet in s["calling_aets"]})
            details["result"], details["deliveries"] = ReportBook(self._engine).details(study.id)
            details["events"] = [
                {"at": iso(event.at), "from": event.from_state, "to": event.to_state, "reason": event.reason}
                for event in session.scalars(
                    select(StudyEvent).where(StudyEvent.study_id == study.id).order_by(StudyEvent.id)
                )
            ]
            return details

    def instance_files(self, study_uid: str, data_dir: Path) -> list[Path]:
        """The stored files of a study, for the worker that processes it."""
        with self._sessions() as session:
            paths = session.scalars(
                select(Instance.path).join(Series).join(Study).where(Study.study_uid == study_uid).order_by(Instance.id)
            ).all()
        return [data_dir / path for path in paths]
