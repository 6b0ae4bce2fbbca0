"""What the admin CLI shows of the queue, as plain data in the JSON shapes scripts rely on.

``queue ls --json``: a list of :func:`study_summary` objects (with
``tasks``: model, state, outcome); ``queue show --json``: one of them where
``series`` holds the series (the count moves to ``series_count``), plus
``calling_aets``, ``tasks`` (each with its attempts, result, SR UID,
``report_objects`` and deliveries; a result has ``lesions`` and ``skipped``,
empty for a classifier), ``routing`` (``{model, matched, reason}``),
``result``, ``deliveries`` and ``report_objects`` (a one-model node's keys,
the same shapes as a task's) and ``events``; ``status --json``:
``receiver``, ``counts`` and ``destinations``. ``outcome`` tells present, absent and not applicable apart at a glance (a
not-applicable study without a report stays ``reported``, next to ``sent``
ones, and must not look stuck). Reads only, through deferred transactions, so
the CLI never holds up the receiver.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, distinct, func, select
from sqlalchemy.orm import Session

from triagenode.storage.engine import reader
from triagenode.storage.models import Instance, ResultRecord, Series, Study, StudyEvent, StudyState, Task, TaskState
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


def study_summary(study: Study, tasks: list[dict[str, Any]]) -> dict[str, Any]:
    """One study as ``queue ls --json`` lists it; ``tasks`` as :func:`_task_briefs` makes them.

    The keys of a one-model node stay what they were: ``lease_owner``,
    ``lease_expires_at`` and ``processing_attempts`` are its task's (with several
    models: the task being processed, and the most attempts), ``outcome`` the
    first result's ("not applicable" when no model takes the study).
    """
    processing = [task for task in tasks if task["state"] == TaskState.PROCESSING]
    outcomes = [task["outcome"] for task in tasks if task["outcome"] is not None]
    if not tasks and study.state == StudyState.REPORTED:
        outcomes = ["not applicable"]
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
        "lease_owner": processing[0]["lease_owner"] if processing else None,
        "lease_expires_at": processing[0]["lease_expires_at"] if processing else None,
        "processing_attempts": max((task["attempts"] for task in tasks), default=0),
        "urgent": study.urgent,
        "outcome": outcomes[0] if outcomes else None,
        "tasks": [{key: task[key] for key in ("model", "state", "outcome")} for task in tasks],
    }


def _task_briefs(session: Session, study_ids: list[int]) -> dict[int, list[dict[str, Any]]]:
    """Each study's tasks (model, state, attempts, lease, outcome), in task order."""
    briefs: dict[int, list[dict[str, Any]]] = {study_id: [] for study_id in study_ids}
    rows = session.execute(
        select(Task, ResultRecord.applicable, ResultRecord.finding)
        .outerjoin(ResultRecord, ResultRecord.task_id == Task.id)
        .where(Task.study_id.in_(study_ids))
        .order_by(Task.id)
    )
    for task, applicable, finding in rows:
        briefs[task.study_id].append(
            {
                "model": task.model,
                "state": task.state,
                "attempts": task.processing_attempts,
                "lease_owner": task.lease_owner,
                "lease_expires_at": iso(task.lease_expires_at),
                "outcome": outcome_of(applicable, finding),
            }
        )
    return briefs


class QueueOverview:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._sessions = reader(engine)

    def list_studies(
        self, state: StudyState | None = None, limit: int = 50, model: str | None = None
    ) -> list[dict[str, Any]]:
        """The most recently changed studies first (an index serves the sort and the filter).

        ``model`` keeps the studies that have a task for that model.
        """
        query = select(Study).order_by(Study.updated_at.desc(), Study.id.desc()).limit(limit)
        if state is not None:
            query = query.where(Study.state == state)
        if model is not None:
            query = query.where(Study.id.in_(select(Task.study_id).where(Task.model == model)))
        with self._sessions() as session:
            studies = session.scalars(query).all()
            tasks = _task_briefs(session, [study.id for study in studies])
            return [study_summary(study, tasks[study.id]) for study in studies]

    def study_details(self, study_uid: str) -> dict[str, Any]:
        """One study as ``queue show --json`` prints it: the summary, series, tasks, routing and history."""
        with self._sessions() as session:
            study = session.scalar(select(Study).where(Study.study_uid == study_uid))
            if study is None:
                raise UnknownStudyError(f"no study {study_uid} on this node; `triagenode queue ls` lists them")
            details = study_summary(study, _task_briefs(session, [study.id])[study.id])
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
                    "body_part": series.body_part,
                    "instances": series.instance_count,
                    "calling_aets": sorted((calling.get(series.id) or "").split(",")) if calling.get(series.id) else [],
                }
                for series in study.series
            ]
            details["calling_aets"] = sorted({aet for s in details["series"] for aet in s["calling_aets"]})
            details["tasks"] = ReportBook(self._engine).details(study.id)
            # Today's keys for a one-model node: the first task's result, every task's deliveries and objects.
            details["result"] = next((task["result"] for task in details["tasks"] if task["result"]), None)
            details["deliveries"] = [d for task in details["tasks"] for d in task["deliveries"]]
            details["report_objects"] = [o for task in details["tasks"] for o in task["report_objects"]]
            details["routing"] = json.loads(study.routing) if study.routing else []
            details["events"] = [
                {"at": iso(event.at), "model": event.model, "from": event.from_state, "to": event.to_state,
                 "reason": event.reason}
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
