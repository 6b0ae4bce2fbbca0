"""Results and their deliveries: what a model found in a study, and its report's way to every destination.

A worker ends its task's lease with :meth:`ReportBook.record_result`: the
result, one pending delivery per destination and the task's move to
``reported`` are one transaction, so a crash leaves either nothing (the
lease expires, the task is processed again) or everything. Deliveries carry
their own retry schedule in the database, so a restart keeps every pending one.

Destinations are independent: a delivery is due whenever it is pending and
its task still stands by its report (``reported``, ``sent`` or ``failed``;
not re-queued, not cancelled) in a study that is not receiving again,
whatever another destination did. A task's state summarises its deliveries
(:func:`summarise`): ``sent`` when every one is sent, ``failed`` when one
gave up and none is pending any more, ``reported`` while any is pending;
the study's state summarises its tasks.

A task's report may be several DICOM objects (a TID 1500 SR and a
Mammography CAD SR; a SEG and its SR): the primary (``sr_path``, the one a
later report names as its predecessor) and :class:`ReportObject` extras. They
travel together: one delivery per destination sends them all, primary first,
on one association, and is sent only once every object is stored.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, func, select, update
from sqlalchemy.orm import Session

from triagenode.config.values import IMPLICIT_MODEL
from triagenode.storage.engine import reader, writer
from triagenode.storage.models import (
    Delivery,
    DeliveryState,
    ResultRecord,
    Study,
    StudyState,
    Task,
    TaskState,
)
from triagenode.storage.queue import (
    TASK_TRANSITIONS,
    Claim,
    StudyQueue,
    TransitionError,
    find_study,
    move_task,
    record_task_event,
)
from triagenode.storage.timeutil import iso, utcnow

log = logging.getLogger("triagenode.reports")

PENDING, SENT, FAILED = DeliveryState.PENDING, DeliveryState.SENT, DeliveryState.FAILED

DELIVERABLE = frozenset({TaskState.REPORTED, TaskState.SENT, TaskState.FAILED})
"""Task states whose report stands: their pending deliveries are due. A re-queued task will get a new
report, a cancelled one none; nothing goes out while its study receives again."""
_NOT_DELIVERING = [StudyState.RECEIVING.value, StudyState.CANCELLED.value]


REPORT_CLASS_NAMES = {
    "1.2.840.10008.5.1.4.1.1.88.34": "Comprehensive 3D SR",
    "1.2.840.10008.5.1.4.1.1.88.33": "Comprehensive SR",
    "1.2.840.10008.5.1.4.1.1.88.50": "Mammography CAD SR",
    "1.2.840.10008.5.1.4.1.1.66.4": "Segmentation",
}
"""SOP Class UID -> the name the CLI and delivery errors use (without importing pydicom, which ``queue show``
must not pay for); another class is shown as its UID."""


def class_name(sop_class_uid: str | None) -> str:
    """A report object's SOP class in words, for messages (its UID when this node has no name for it)."""
    if sop_class_uid is None:
        return "report"
    return REPORT_CLASS_NAMES.get(sop_class_uid, sop_class_uid)


@dataclass(frozen=True)
class ReportObject:
    """A report object of a task besides its primary SR: stored under ``data_dir``, sent with the primary."""

    path: str
    """Relative to data_dir, like ``sr_path``, so that the data directory can move."""
    sop_instance_uid: str
    sop_class_uid: str

    def to_dict(self) -> dict[str, str]:
        return {"path": self.path, "sop_instance_uid": self.sop_instance_uid, "sop_class_uid": self.sop_class_uid}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ReportObject:
        return cls(str(data["path"]), str(data["sop_instance_uid"]), str(data["sop_class_uid"]))


def extra_objects_of(row: ResultRecord) -> list[ReportObject]:
    """The result's report objects besides the primary SR (none for a result recorded before schema 4)."""
    return [ReportObject.from_dict(item) for item in json.loads(row.extra_objects)] if row.extra_objects else []


class NoReportError(LookupError):
    """The study has no report to send (not processed yet, or the model could not read it)."""


def summarise(session: Session, task: Task, now: datetime, reason: str | None = None) -> None:
    """Bring a task's state in line with its deliveries, in the caller's transaction.

    ``reported`` while any delivery is pending, ``failed`` when one gave up
    and none is pending, ``sent`` when all are sent. Only a task whose report
    stands is touched; a change the state machine does not allow is left
    out, and the deliveries still say what happens.
    """
    if task.state not in DELIVERABLE:
        return
    counts = dict(
        session.execute(
            select(Delivery.state, func.count()).where(Delivery.task_id == task.id).group_by(Delivery.state)
        ).all()
    )
    if not counts:
        return
    if counts.get(PENDING):
        target, why = TaskState.REPORTED, reason or "the report is on its way"
    elif counts.get(FAILED):
        failed = session.scalars(
            select(Delivery.destination).where(Delivery.task_id == task.id, Delivery.state == FAILED)
        ).all()
        target = TaskState.FAILED
        why = reason or (
            f"report not delivered to {', '.join(failed)}; "
            "`triagenode queue retry` or `triagenode queue resend` sends again"
        )
    else:
        target, why = TaskState.SENT, reason or "every destination has the report"
    if target != task.state and target in TASK_TRANSITIONS[TaskState(task.state)]:
        move_task(session, task, target, why, now)


@dataclass(frozen=True)
class DueDelivery:
    id: int
    study_uid: str
    destination: str
    sr_path: str
    attempts: int
    model: str = IMPLICIT_MODEL
    extra_paths: tuple[str, ...] = ()
    """The task's other report objects (relative to data_dir), sent after ``sr_path`` on the same association."""


@dataclass(frozen=True)
class Outcome:
    """What a worker records for a study: the model's finding, or why the model could not read the study.

    The boundary between the inference runtime and the queue: the worker
    builds it from the pipeline's result, so storage never reads a dict by
    keys it hopes are there.
    """

    model: str
    model_version: str
    finding: bool | None = None
    """None when the model could not read the study (then ``reason`` says why)."""
    probability: float | None = None
    threshold: float | None = None
    series_uid: str | None = None
    key_instance_uid: str | None = None
    slices: int | None = None
    timings_ms: Mapping[str, float] = field(default_factory=dict)
    reason: str | None = None
    """Why the study is not applicable to the model; None for a finding."""
    lesions: tuple[Mapping[str, Any], ...] = ()
    """A detection model's marks (``inference.outcomes.Lesion.to_dict``): image, type, box, certainty."""
    skipped: tuple[str, ...] = ()
    """Images the model did not read, each with its reason."""
    segments: tuple[Mapping[str, Any], ...] = ()
    """A segmentation model's classes (``inference.outcomes.Segment.to_dict``): label, volume_ml, voxels, certainty."""

    @property
    def applicable(self) -> bool:
        return self.reason is None

    @classmethod
    def not_applicable(cls, model: str, model_version: str, reason: str) -> Outcome:
        return cls(model=model, model_version=model_version, reason=reason)

    def event_reason(self) -> str:
        """The sentence the move to ``reported`` is recorded with."""
        if not self.applicable:
            return f"not applicable: {self.reason}"
        verdict = "present" if self.finding else "absent"
        marked = ""
        if self.lesions:
            marked = f", {len(self.lesions)} lesion{'s' if len(self.lesions) != 1 else ''} marked"
        return f"finding {verdict}, probability {self.probability:.3f}{marked} ({self.model} {self.model_version})"

    def details_json(self) -> str | None:
        """``task_results.details``: the lesions, skipped images and segments as JSON; None when there are none."""
        if not self.lesions and not self.skipped and not self.segments:
            return None
        details: dict[str, Any] = {"lesions": [dict(lesion) for lesion in self.lesions], "skipped": list(self.skipped)}
        if self.segments:
            details["segments"] = [dict(segment) for segment in self.segments]
        return json.dumps(details)


class ReportBook:
    def __init__(self, engine: Engine) -> None:
        self._write = writer(engine)
        self._read = reader(engine)

    def record_result(
        self,
        claim: Claim,
        outcome: Outcome,
        destinations: list[str],
        sr_path: str | None = None,
        sr_sop_instance_uid: str | None = None,
        now: datetime | None = None,
        extra_objects: Sequence[ReportObject] = (),
        sr_sop_class_uid: str | None = None,
    ) -> bool:
        """Store the outcome, schedule its deliveries and end the lease (``reported``); False if the lease was lost.

        ``extra_objects`` are the report's other objects, already stored under
        data_dir: each destination's one delivery sends them after the primary
        SR. ``sr_sop_class_uid`` is the primary's class, shown by ``queue
        show`` (``resend`` reads the file itself).
        """
        if extra_objects and sr_path is None:
            raise ValueError("report objects besides the SR need the SR itself (sr_path) to go with")
        now = now or utcnow()
        with self._write.begin() as session:
            task = StudyQueue.held(session, claim)
            if task is None:
                return False
            row = session.scalar(select(ResultRecord).where(ResultRecord.task_id == task.id))
            if row is None:
                row = ResultRecord(task_id=task.id)
                session.add(row)
            row.applicable = outcome.applicable
            row.reason = outcome.reason
            row.finding = outcome.finding
            row.probability = outcome.probability
            row.threshold = outcome.threshold
            row.model = outcome.model
            row.model_version = outcome.model_version
            row.series_uid = outcome.series_uid
            row.key_instance_uid = outcome.key_instance_uid
            row.slices = outcome.slices
            row.timings_ms = json.dumps(dict(outcome.timings_ms))
            row.sr_path = sr_path
            row.sr_sop_instance_uid = sr_sop_instance_uid
            row.sr_sop_class_uid = sr_sop_class_uid
            row.details = outcome.details_json()
            row.extra_objects = json.dumps([o.to_dict() for o in extra_objects]) if extra_objects else None
            row.created_at = now
            if sr_path is not None:
                _schedule(session, task, destinations, now)
            move_task(session, task, TaskState.REPORTED, outcome.event_reason(), now)
            return True

    def due(
        self,
        now: datetime | None = None,
        limit: int = 20,
        destination: str | None = None,
        exclude: Collection[str] = (),
    ) -> list[DueDelivery]:
        """Pending deliveries whose time has come, oldest first.

        ``destination`` keeps one destination's (each is sent by its own
        thread); ``exclude`` leaves out the named ones. Another destination's
        failure or the study's ``failed`` state holds nothing back.
        """
        now = now or utcnow()
        query = (
            select(Delivery.id, Study.study_uid, Delivery.destination, ResultRecord.sr_path, Delivery.attempts,
                   Task.model, ResultRecord.extra_objects)
            .join(Task, Task.id == Delivery.task_id)
            .join(Study, Study.id == Task.study_id)
            .join(ResultRecord, ResultRecord.task_id == Delivery.task_id)
            .where(
                Delivery.state == PENDING,
                Delivery.next_attempt_at <= now,
                Task.state.in_([state.value for state in DELIVERABLE]),
                Study.state.not_in(_NOT_DELIVERING),
                ResultRecord.sr_path.is_not(None),
            )
            .order_by(Delivery.next_attempt_at, Delivery.id)
            .limit(limit)
        )
        if destination is not None:
            query = query.where(Delivery.destination == destination)
        if exclude:
            query = query.where(Delivery.destination.not_in(list(exclude)))
        with self._read() as session:
            rows = session.execute(query).all()
        return [
            DueDelivery(*fields, extra_paths=tuple(item["path"] for item in json.loads(extras or "[]")))
            for *fields, extras in rows
        ]

    def catch_up_clock(self, longest_wait_s: float, now: datetime | None = None) -> int:
        """Make due now the pending deliveries scheduled further ahead than any backoff could schedule them.

        Such a time was written before the wall clock stepped back; waiting
        for it would hold the report for the size of the step (an hour, for
        an hour). Returns how many were moved.
        """
        now = now or utcnow()
        beyond = now + timedelta(seconds=longest_wait_s)
        stale = (Delivery.state == PENDING, Delivery.next_attempt_at > beyond)
        with self._read() as session:
            if session.scalar(select(Delivery.id).where(*stale).limit(1)) is None:
                return 0
        with self._write.begin() as session:
            return session.execute(update(Delivery).where(*stale).values(next_attempt_at=now)).rowcount

    def due_destinations(self, now: datetime | None = None) -> set[str]:
        """The destinations that have at least one due delivery (one cheap read per scheduler tick)."""
        now = now or utcnow()
        with self._read() as session:
            return set(
                session.scalars(
                    select(Delivery.destination)
                    .join(Task, Task.id == Delivery.task_id)
                    .join(Study, Study.id == Task.study_id)
                    .where(
                        Delivery.state == PENDING,
                        Delivery.next_attempt_at <= now,
                        Task.state.in_([state.value for state in DELIVERABLE]),
                        Study.state.not_in(_NOT_DELIVERING),
                    )
                    .distinct()
                ).all()
            )

    def succeeded(self, delivery_id: int, now: datetime | None = None) -> bool:
        """Record a delivered report; False when the delivery was no longer pending (reset meanwhile)."""
        now = now or utcnow()
        with self._write.begin() as session:
            delivery = session.get_one(Delivery, delivery_id)
            if delivery.state != PENDING:
                return False
            delivery.state, delivery.sent_at, delivery.last_error = SENT, now, None
            delivery.attempts += 1
            task = session.get_one(Task, delivery.task_id)
            _note(session, task, f"report delivered to {delivery.destination}", now)
            summarise(session, task, now)
            return True

    def failed_attempt(
        self, delivery_id: int, error: str, next_attempt_at: datetime, max_attempts: int, now: datetime | None = None
    ) -> bool:
        """Record a failed attempt; True when it was the last one (that delivery is then ``failed``).

        The study becomes ``failed`` only once no other delivery is pending:
        another destination's retries go on regardless.
        """
        now = now or utcnow()
        with self._write.begin() as session:
            delivery = session.get_one(Delivery, delivery_id)
            if delivery.state != PENDING:
                return False
            delivery.attempts += 1
            delivery.last_error = error[:500]
            if delivery.attempts < max_attempts:
                delivery.next_attempt_at = next_attempt_at
                return False
            delivery.state = FAILED
            task = session.get_one(Task, delivery.task_id)
            _note(session, task, f"gave up delivering the report to {delivery.destination} after "
                                 f"{delivery.attempts} attempts (last: {error[:200]})", now)
            summarise(session, task, now)
            return True

    def report_of(self, study_uid: str, model: str | None = None) -> tuple[str, str, str | None]:
        """(task state, stored SR path relative to data_dir, its SOP Instance UID) of a study's report.

        ``model`` names the task; without it the study must have exactly one task.
        Raises :class:`UnknownStudyError`, :class:`NoReportError` or
        :class:`TransitionError` with a line for the administrator.
        """
        with self._read() as session:
            task = _one_task(session, study_uid, model)
            row = session.scalar(select(ResultRecord).where(ResultRecord.task_id == task.id))
            _require_report(study_uid, row)
            assert row is not None and row.sr_path is not None
            return task.state, row.sr_path, row.sr_sop_instance_uid

    def tasks_with_reports(self, study_uid: str) -> list[str]:
        """The models whose tasks on the study have a report, in task order."""
        with self._read() as session:
            study = find_study(session, study_uid)
            return [
                task.model
                for task in study.tasks
                if session.scalar(
                    select(ResultRecord.id).where(ResultRecord.task_id == task.id, ResultRecord.sr_path.is_not(None))
                )
                is not None
            ]

    def replace_report(self, study_uid: str, sr_path: str, sr_sop_instance_uid: str, reason: str,
                       now: datetime | None = None, model: str | None = None,
                       sr_sop_class_uid: str | None = None) -> None:
        """Point a task's result at a rebuilt primary report (another SR class); the old file stays.

        The task's other report objects stay as they are: they go with the new primary.
        """
        now = now or utcnow()
        with self._write.begin() as session:
            task = _one_task(session, study_uid, model)
            row = session.scalar(select(ResultRecord).where(ResultRecord.task_id == task.id))
            if row is None:
                raise NoReportError(f"study {study_uid} has no report to send (it has not been processed yet)")
            row.sr_path, row.sr_sop_instance_uid = sr_path, sr_sop_instance_uid
            row.sr_sop_class_uid = sr_sop_class_uid
            _note(session, task, reason, now)

    def resend(self, study_uid: str, destinations: Sequence[str], now: datetime | None = None,
               model: str | None = None) -> list[str]:
        """Schedule a task's report for ``destinations`` again, now; returns their names.

        For a ``reported``, ``sent`` or ``failed`` task with a report: a PACS
        added later, or one that lost the report. Each named delivery starts
        afresh (pending, no attempts), whatever its state was, and sends every
        report object of the task again.
        """
        now = now or utcnow()
        with self._write.begin() as session:
            task = _one_task(session, study_uid, model)
            if task.state not in DELIVERABLE or task.study.state in _NOT_DELIVERING:
                state = task.study.state if task.study.state in _NOT_DELIVERING else task.state
                raise TransitionError(
                    f"study {study_uid} is {state}; only reported, sent or failed studies have a report to "
                    "re-send" + ("; `triagenode queue retry` processes it again" if state == "cancelled" else "")
                )
            row = session.scalar(select(ResultRecord).where(ResultRecord.task_id == task.id))
            _require_report(study_uid, row)
            _schedule(session, task, destinations, now)
            reason = f"report to be sent again to {', '.join(destinations)} (requested by an administrator)"
            _note(session, task, reason, now)
            summarise(session, task, now, "report to be sent again (requested by an administrator)")
            return list(destinations)

    def details(self, study_id: int) -> list[dict[str, Any]]:
        """The tasks that ``queue show`` prints: each with its state, attempts, result and deliveries."""
        with self._read() as session:
            tasks = session.scalars(select(Task).where(Task.study_id == study_id).order_by(Task.id)).all()
            return [_task_details(session, task) for task in tasks]

    def previous_report(self, study_uid: str, model: str = IMPLICIT_MODEL) -> PreviousReport | None:
        """A task's last report (the one a new report replaces), or None when it has none.

        A study re-opened by a late instance is processed again; its new report
        names this one in its Predecessor Documents Sequence, so a PACS knows which
        document it supersedes. None for an unknown study or task, one not processed
        yet, or one whose last outcome had no SR (the model could not read it).
        """
        with self._read() as session:
            row = session.execute(
                select(ResultRecord.sr_path, ResultRecord.sr_sop_instance_uid, ResultRecord.model,
                       ResultRecord.model_version, ResultRecord.created_at, ResultRecord.extra_objects)
                .join(Task, Task.id == ResultRecord.task_id)
                .join(Study, Study.id == Task.study_id)
                .where(Study.study_uid == study_uid, Task.model == model)
            ).one_or_none()
        if row is None or row.sr_path is None or row.sr_sop_instance_uid is None:
            return None
        extra = tuple(ReportObject.from_dict(item).path for item in json.loads(row.extra_objects or "[]"))
        return PreviousReport(study_uid, row.sr_path, row.sr_sop_instance_uid, row.model, row.model_version,
                              row.created_at, extra)


def _one_task(session: Session, study_uid: str, model: str | None) -> Task:
    """The study's task for ``model``; without a model, its only task (else a line that says to name one)."""
    study = find_study(session, study_uid)
    if model is not None:
        for task in study.tasks:
            if task.model == model:
                return task
        known = ", ".join(task.model for task in study.tasks) or "none"
        raise NoReportError(f"study {study_uid} has no task for model {model!r} (its tasks: {known})")
    if not study.tasks:
        raise NoReportError(f"study {study_uid} has no report to send (it has not been processed yet)")
    if len(study.tasks) > 1:
        names = ", ".join(task.model for task in study.tasks)
        raise TransitionError(f"study {study_uid} has a task for each of {names}; name one with --model")
    return study.tasks[0]


def _require_report(study_uid: str, row: ResultRecord | None) -> None:
    if row is None or row.sr_path is None:
        why = (
            "it has not been processed yet"
            if row is None
            else "the model could not read it and [inference] report_not_applicable is off"
        )
        raise NoReportError(f"study {study_uid} has no report to send ({why})")


def _schedule(session: Session, task: Task, destinations: Sequence[str], now: datetime) -> None:
    """Make a pending delivery, due now, of the task's report to each of ``destinations``."""
    existing = {d.destination: d for d in session.scalars(select(Delivery).where(Delivery.task_id == task.id))}
    for name in destinations:
        delivery = existing.get(name) or Delivery(task_id=task.id, destination=name)
        delivery.state, delivery.attempts, delivery.next_attempt_at = PENDING, 0, now
        delivery.last_error = delivery.sent_at = None
        session.add(delivery)
    session.flush()


def _note(session: Session, task: Task, reason: str, now: datetime) -> None:
    """An event in the task's history that changes no state (a delivery, a rebuilt report)."""
    record_task_event(session, task, task.state, task.state, reason, now)
    session.flush()


def _task_details(session: Session, task: Task) -> dict[str, Any]:
    row = session.scalar(select(ResultRecord).where(ResultRecord.task_id == task.id))
    deliveries = session.scalars(select(Delivery).where(Delivery.task_id == task.id).order_by(Delivery.id)).all()
    result = None
    objects: list[dict[str, Any]] = []
    if row is not None:
        details = json.loads(row.details) if row.details else {}
        if row.sr_path is not None:
            objects.append({"sop_instance_uid": row.sr_sop_instance_uid, "sop_class_uid": row.sr_sop_class_uid,
                            "primary": True, "model": task.model})
        objects += [
            {"sop_instance_uid": o.sop_instance_uid, "sop_class_uid": o.sop_class_uid, "primary": False,
             "model": task.model}
            for o in extra_objects_of(row)
        ]
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
            "lesions": details.get("lesions", []),
            "skipped": details.get("skipped", []),
            "segments": details.get("segments", []),
        }
    return {
        "model": task.model,
        "state": task.state,
        "attempts": task.processing_attempts,
        "result": result,
        "sr_sop_instance_uid": row.sr_sop_instance_uid if row is not None else None,
        "report_objects": objects,
        "deliveries": [
            {
                "destination": d.destination,
                "state": d.state,
                "attempts": d.attempts,
                "next_attempt_at": iso(d.next_attempt_at) if d.state == PENDING else None,
                "last_error": d.last_error,
                "sent_at": iso(d.sent_at),
                "model": task.model,
            }
            for d in deliveries
        ],
    }


@dataclass(frozen=True)
class PreviousReport:
    """A study's stored report, as :meth:`ReportBook.previous_report` finds it."""

    study_uid: str
    sr_path: str
    """Relative to data_dir."""
    sr_sop_instance_uid: str
    model: str
    model_version: str
    created_at: datetime
    extra_paths: tuple[str, ...] = ()
    """The report's other documents (relative to data_dir): each new document replaces the one of its class."""
