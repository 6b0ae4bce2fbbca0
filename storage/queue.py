"""The study queue: instance registration, routing to models, tasks and their leases.

A complete study gets one task per model that takes it (:class:`Task`); a
task has its own state, lease and attempts, and the study's state
summarises its tasks (:func:`summarise_study`). Every task change goes
through :func:`move_task`, which checks that the change is allowed and
writes the event that ``queue show`` lists, so the history and the state
can never disagree; its log line is written once the transaction has
committed, so the log never shows a change the database never had. Each public method of
:class:`StudyQueue` is one write transaction (``BEGIN IMMEDIATE``), which is
what makes a lease exclusive: two workers asking at once are served one after
the other, and the second sees the study already taken.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum
from typing import Any

from sqlalchemy import Engine, Select, case, event, select, update
from sqlalchemy.orm import Session

from triagenode.config.values import IMPLICIT_MODEL
from triagenode.storage.engine import reader, writer
from triagenode.storage.models import (
    Delivery,
    DeliveryState,
    Instance,
    ModelPause,
    Series,
    Study,
    StudyEvent,
    StudyState,
    Task,
    TaskState,
)
from triagenode.storage.routes import RouteDecision, Router, SeriesSummary, StudySummary
from triagenode.storage.timeutil import utcnow

log = logging.getLogger("triagenode.queue")

S = StudyState
T = TaskState
TASK_TRANSITIONS: dict[TaskState, frozenset[TaskState]] = {
    T.QUEUED: frozenset({T.PROCESSING, T.CANCELLED}),
    T.PROCESSING: frozenset({T.REPORTED, T.QUEUED, T.FAILED, T.CANCELLED}),
    T.REPORTED: frozenset({T.SENT, T.FAILED, T.QUEUED, T.CANCELLED}),
    T.SENT: frozenset({T.REPORTED, T.FAILED, T.QUEUED}),
    T.FAILED: frozenset({T.QUEUED, T.REPORTED, T.CANCELLED}),
    T.CANCELLED: frozenset({T.QUEUED}),
}
"""Which task state may follow which. ``queued`` after a later state: the study was complete again
(a late instance re-opened it) or an administrator retried it."""

MAX_PROCESSING_ATTEMPTS = 3
"""Interrupted runs (a worker crash, a hang past study_timeout_s, a dead decoder, the node crashing mid-study)
after which a task is ``failed`` instead of queued again: what stops a study that kills its worker from
crash-looping. Runs that ended with a result or a deliberate failure do not count."""

RETRYABLE = frozenset({T.FAILED, T.CANCELLED})
CANCELLABLE = frozenset(state for state, targets in TASK_TRANSITIONS.items() if T.CANCELLED in targets)

_SUMMARY_ORDER = (T.PROCESSING, T.FAILED, T.QUEUED, T.REPORTED, T.SENT, T.CANCELLED)
"""A study's state is the first of these that any of its tasks is in: processing while any is, failed when
one failed (so ``queue ls --state failed`` shows it even while a paused model's task waits), queued while
any waits, reported until every report is sent, sent, cancelled when all are."""


# The statements of record_instance, on the tables of storage.models.
_SQL_INSTANCE_EXISTS = (
    "SELECT studies.state, studies.study_uid FROM instances JOIN series ON series.id = instances.series_id"
    " JOIN studies ON studies.id = series.study_id WHERE instances.sop_instance_uid = ?"
)
_SQL_INSTANCE_PATH = (
    "SELECT instances.path FROM instances JOIN series ON series.id = instances.series_id"
    " JOIN studies ON studies.id = series.study_id WHERE instances.sop_instance_uid = ? AND studies.state != ?"
)
_SQL_FIND_STUDY = "SELECT id, state, modality FROM studies WHERE study_uid = ?"
_SQL_NEW_STUDY = (
    "INSERT INTO studies (study_uid, state, study_date, description, received_at, last_instance_at, updated_at,"
    " series_count, instance_count, byte_count, urgent)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, 0, 0, 0, ?) RETURNING id"
)
_SQL_NEW_EVENT = "INSERT INTO study_events (study_id, at, from_state, to_state, reason) VALUES (?, ?, ?, ?, ?)"
_SQL_FIND_SERIES = "SELECT id FROM series WHERE study_id = ? AND series_uid = ?"
_SQL_NEW_SERIES = (
    "INSERT INTO series (study_id, series_uid, modality, series_number, description, body_part, instance_count)"
    " VALUES (?, ?, ?, ?, ?, ?, 0) RETURNING id"
)
_SQL_STUDY_NEW_SERIES = "UPDATE studies SET series_count = series_count + 1, modality = ? WHERE id = ?"
_SQL_NEW_INSTANCE = (
    "INSERT INTO instances (series_id, sop_instance_uid, sop_class_uid, transfer_syntax_uid, path, size,"
    " received_at, calling_ae) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_SQL_SERIES_COUNT = "UPDATE series SET instance_count = instance_count + 1 WHERE id = ?"
_SQL_STUDY_COUNT = (
    "UPDATE studies SET instance_count = instance_count + 1, byte_count = byte_count + ?,"
    " last_instance_at = ?, updated_at = ? WHERE id = ?"
)
_SQL_STUDY_URGENT = "UPDATE studies SET urgent = 1 WHERE id = ?"
_SQL_DROP_PENDING_DELIVERIES = (
    "DELETE FROM task_deliveries WHERE state = 'pending' AND task_id IN (SELECT id FROM tasks WHERE study_id = ?)"
)
_SQL_STUDY_COUNT_QUIETLY = (
    "UPDATE studies SET instance_count = instance_count + 1, byte_count = byte_count + ? WHERE id = ?"
)


def _db_time(value: datetime) -> str:
    """A time as SQLAlchemy's SQLite DateTime stores it, for the plain-SQL statements."""
    return value.strftime("%Y-%m-%d %H:%M:%S.%f")


class TransitionError(RuntimeError):
    """A state change the queue does not allow; the text says why, for the CLI."""


class UnknownStudyError(LookupError):
    """No study with that Study Instance UID on this node."""


class StudyBeingPurgedError(TransitionError):
    """The study is ``purging``: its files and rows are going (``[storage] keep_days`` or ``queue purge``).

    :meth:`StudyQueue.record_instance` raises it for a new instance of such a
    study and for a re-sent one of its instances: recording either would let a
    C-STORE be answered Success for a file the purge is about to remove. The
    receiver answers it with a transient refusal (Out of Resources), so the
    sender tries again; once the purge has finished, the instance makes a new
    study. Every other change to the study (retry, cancel, resend, prioritize)
    is refused with it too; the text says so, for the log or the CLI.
    """

    def __init__(self, study_uid: str) -> None:
        self.study_uid = study_uid
        super().__init__(
            f"study {study_uid} is being purged (its files and rows are going); `triagenode queue purge "
            f"{study_uid}` finishes a purge that was cut short"
        )


_STATE_CHANGES = "triagenode_state_changes"
"""Key in ``Session.info`` of the state changes a transaction made, logged once it commits."""


def set_study_state(session: Session, study: Study, to_state: StudyState, reason: str, now: datetime) -> None:
    """Change a study's own state and write the event, in the caller's transaction (no-op when unchanged).

    A study's state is set directly only for what no task says (receiving, a study no model
    takes, cancelling a study that has no task yet); otherwise it follows its tasks
    (:func:`summarise_study`). The log line waits for the commit (see :func:`_log_committed_changes`).
    """
    from_state = StudyState(study.state)
    if from_state == to_state:
        return
    study.state = to_state
    study.updated_at = now
    session.add(StudyEvent(study=study, at=now, from_state=from_state, to_state=to_state, reason=reason))
    session.info.setdefault(_STATE_CHANGES, []).append((study.study_uid, None, str(from_state), str(to_state), reason))


def move_task(session: Session, task: Task, to_state: TaskState, reason: str, now: datetime) -> None:
    """Change a task's state (checked against :data:`TASK_TRANSITIONS`), write its event and update its study.

    Raises :class:`TransitionError` for a change the queue does not allow.
    """
    from_state = TaskState(task.state)
    if to_state not in TASK_TRANSITIONS[from_state]:
        raise TransitionError(
            f"study {task.study.study_uid}: model {task.model} is {from_state}; it cannot become {to_state}"
        )
    task.state = to_state
    task.updated_at = now
    if to_state is not T.PROCESSING:
        task.lease_owner = None
        task.lease_expires_at = None
    if to_state is T.QUEUED:
        task.queued_at = now
    record_task_event(session, task, from_state, to_state, reason, now)
    summarise_study(session, task.study, now, reason if task.model == IMPLICIT_MODEL else f"{task.model}: {reason}")


def told_by_study(study: Study, task: Task) -> bool:
    """Whether the study's own event tells this task's change: a one-model node's only task moves the
    study with it, so its history reads as before tasks existed (one line per change, not two)."""
    return task.model == IMPLICIT_MODEL and len(study.tasks) == 1 and study.state != S.RECEIVING


def record_task_event(
    session: Session, task: Task, from_state: TaskState | None, to_state: TaskState, reason: str, now: datetime
) -> None:
    """The task's line in its study's history and, for a change of state, once committed, in the log.

    The one writer of task history: where the study's own line tells a change (:func:`told_by_study`)
    it writes nothing, and a note that changes no state (a delivery) is written as the study's.
    """
    study = task.study
    change = from_state != to_state
    told = told_by_study(study, task)
    if change and told:
        return
    session.add(StudyEvent(study=study, at=now, from_state=from_state, to_state=to_state, reason=reason,
                           model=None if told else task.model))
    if change:
        session.info.setdefault(_STATE_CHANGES, []).append(
            (study.study_uid, task.model, str(from_state) if from_state else "-", str(to_state), reason)
        )


def summarise_study(session: Session, study: Study, now: datetime, reason: str) -> None:
    """Bring a study's state in line with its tasks (see :data:`_SUMMARY_ORDER`); a receiving study waits."""
    if study.state in (S.RECEIVING, S.PURGING) or not study.tasks:
        return
    states = {TaskState(task.state) for task in study.tasks}
    target = next(StudyState(state.value) for state in _SUMMARY_ORDER if state in states)
    set_study_state(session, study, target, reason, now)


def log_state_change(study_uid: str, model: str | None, from_state: str, to_state: str, reason: str) -> None:
    if model is None:
        log.info("study.state study_uid=%s from=%s to=%s reason=%r", study_uid, from_state, to_state, reason)
    else:
        log.info("task.state study_uid=%s model=%s from=%s to=%s reason=%r", study_uid, model, from_state,
                 to_state, reason)


@event.listens_for(Session, "after_commit")
def _log_committed_changes(session: Session) -> None:
    for change in session.info.pop(_STATE_CHANGES, []):
        log_state_change(*change)


@event.listens_for(Session, "after_rollback")
def _forget_rolled_back_changes(session: Session) -> None:
    session.info.pop(_STATE_CHANGES, None)


@dataclass(frozen=True)
class ReceivedInstance:
    """What the receiver knows of one stored instance; no patient identifiers."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    path: str
    size: int
    calling_ae: str
    modality: str | None = None
    study_date: str | None = None
    study_description: str | None = None
    series_number: int | None = None
    series_description: str | None = None
    body_part: str | None = None
    """(0018,0015) Body Part Examined, for routing."""
    urgent: bool = False
    """(0040,1003) Requested Procedure Priority is STAT: the study's tasks go first."""
    reopens: bool = True
    """False for the node's own report coming back from a PACS: stored, but the study's state and
    stability clock stay as they are (re-opening would run the model again and send one more report)."""


class Registration(Enum):
    """What :meth:`StudyQueue.record_instance` did with an instance."""

    NEW_STUDY = "new study"
    ADDED = "added"
    ADDED_TO_CANCELLED = "added to a cancelled study, which stays cancelled"
    REOPENED = "re-opened study"
    KEPT_AS_OWN_REPORT = "the node's own report, stored without re-opening its study"
    DUPLICATE = "duplicate"


@dataclass(frozen=True)
class Claim:
    """One model's task on a study, taken by a worker under a lease."""

    study_uid: str
    worker_id: str
    lease_expires_at: datetime
    attempt: int
    model: str = IMPLICIT_MODEL


def _one_study_changes(session: Session) -> list[tuple[str, str | None, str, str, str]]:
    return list(session.info.pop(_STATE_CHANGES, []))


class StudyQueue:
    """The write side of the queue, shared by the receiver, the scheduler, workers and the CLI."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._sessions = writer(engine)
        self._reads = reader(engine)

    def _any(self, query: Select[Any]) -> bool:
        """Whether a polling job has work, asked without the write lock.

        The scheduler and idle workers poll every second or so; taking
        ``BEGIN IMMEDIATE`` for an empty answer would make every C-STORE wait
        behind them. The write transaction then re-selects, so a race only
        costs an empty pass.
        """
        with self._reads() as session:
            return session.execute(query.limit(1)).first() is not None

    def stored_path(self, sop_instance_uid: str) -> str | None:
        """The stored path of an instance already on the node, or None.

        An instance of a study being purged is not stored: its file is about to go, so a
        re-send of it must not be answered "already stored" (:meth:`record_instance` then
        refuses it with :class:`StudyBeingPurgedError`). One indexed read on the driver's
        connection, outside any transaction (the driver is in autocommit mode): it runs
        for every C-STORE.
        """
        connection = self._engine.raw_connection()
        try:
            row = connection.execute(  # type: ignore[attr-defined]
                _SQL_INSTANCE_PATH, (sop_instance_uid, S.PURGING.value)
            ).fetchone()
        finally:
            connection.close()
        return None if row is None else str(row[0])

    def record_instance(self, received: ReceivedInstance, now: datetime | None = None) -> Registration:
        """Register a stored instance; commits (fsync'd) before it returns.

        This runs once per received instance while the sender waits, so it is
        plain SQL on the driver's cursor inside SQLAlchemy's transaction:
        building the equivalent Core statements costs four times as much CPU
        as SQLite takes to run them. Only the rare re-open goes through the ORM.

        Raises :class:`StudyBeingPurgedError`, recording nothing, for an
        instance of a study being purged (a new one, or a re-sent one of its
        own): the receiver must not answer Success for it.
        """
        now = now or utcnow()
        stamp = _db_time(now)
        changes: list[tuple[str, str | None, str, str, str]] = []
        with self._engine.begin() as connection:
            cursor = connection.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
            existing = cursor.execute(_SQL_INSTANCE_EXISTS, (received.sop_instance_uid,)).fetchone()
            if existing is not None:
                if existing[0] == S.PURGING:  # its file is going: a Success now would promise a file soon gone
                    raise StudyBeingPurgedError(existing[1])
                return Registration.DUPLICATE
            outcome = Registration.ADDED
            quietly = False
            row = cursor.execute(_SQL_FIND_STUDY, (received.study_uid,)).fetchone()
            if row is not None and row[1] == S.PURGING:
                raise StudyBeingPurgedError(received.study_uid)
            if row is None:
                reason = f"first instance received from {received.calling_ae}"
                new_study = (
                    received.study_uid,
                    S.RECEIVING.value,
                    received.study_date,
                    received.study_description,
                    stamp,
                    stamp,
                    stamp,
                    received.urgent,
                )
                study_id = cursor.execute(_SQL_NEW_STUDY, new_study).fetchone()[0]
                study_modality = None
                cursor.execute(_SQL_NEW_EVENT, (study_id, stamp, None, S.RECEIVING.value, reason))
                changes.append((received.study_uid, None, "-", S.RECEIVING.value, reason))
                outcome = Registration.NEW_STUDY
            else:
                study_id, state, study_modality = row
                if not received.reopens and state != S.RECEIVING:
                    quietly = True
                    outcome = Registration.KEPT_AS_OWN_REPORT
                elif state == S.CANCELLED:
                    outcome = Registration.ADDED_TO_CANCELLED
                elif state != S.RECEIVING:
                    changes += self._reopen(connection, study_id, state, received.calling_ae, now)
                    # The report not yet delivered lacks this instance: it must not go out
                    # later (say, after the new run fails). The new run schedules its own.
                    cursor.execute(_SQL_DROP_PENDING_DELIVERIES, (study_id,))
                    outcome = Registration.REOPENED
                if received.urgent and not quietly:
                    cursor.execute(_SQL_STUDY_URGENT, (study_id,))
            found = cursor.execute(_SQL_FIND_SERIES, (study_id, received.series_uid)).fetchone()
            if found is None:
                series_id = cursor.execute(
                    _SQL_NEW_SERIES,
                    (
                        study_id,
                        received.series_uid,
                        received.modality,
                        received.series_number,
                        received.series_description,
                        received.body_part,
                    ),
                ).fetchone()[0]
                cursor.execute(_SQL_STUDY_NEW_SERIES, (_merge_modality(study_modality, received.modality), study_id))
            else:
                series_id = found[0]
            cursor.execute(
                _SQL_NEW_INSTANCE,
                (
                    series_id,
                    received.sop_instance_uid,
                    received.sop_class_uid,
                    received.transfer_syntax_uid,
                    received.path,
                    received.size,
                    stamp,
                    received.calling_ae,
                ),
            )
            cursor.execute(_SQL_SERIES_COUNT, (series_id,))
            if quietly:
                cursor.execute(_SQL_STUDY_COUNT_QUIETLY, (received.size, study_id))
            else:
                cursor.execute(_SQL_STUDY_COUNT, (received.size, stamp, stamp, study_id))
            cursor.close()
        for change in changes:
            log_state_change(*change)
        return outcome

    @staticmethod
    def _reopen(
        connection: Any, study_id: int, state: str, calling_ae: str, now: datetime
    ) -> list[tuple[str, str | None, str, str, str]]:
        """A late instance: the study receives again, and a task being processed loses its lease (it runs again)."""
        with Session(bind=connection) as session:
            study = session.get_one(Study, study_id)
            reason = f"new instance from {calling_ae} after the study was {state}; re-opened"
            set_study_state(session, study, S.RECEIVING, reason, now)
            for task in study.tasks:
                if task.state == T.PROCESSING:
                    move_task(session, task, T.QUEUED, reason, now)
            session.flush()
            return _one_study_changes(session)

    def complete_stable_studies(
        self, stable_seconds: float, now: datetime | None = None, router: Router | None = None
    ) -> list[str]:
        """Route every ``receiving`` study with no instance for ``stable_seconds`` to its models.

        ``router`` decides which models take the study (one task each, queued);
        without one, the study gets one task of the node's only model. A study
        no model takes is ``reported`` with the reasons. Every decision is kept
        (``queue show``). A last instance time in the future means the clock was
        stepped back since it arrived: such a study gets a full stability window
        from now instead of waiting until the clock catches up.
        """
        now = now or utcnow()
        cutoff = now - timedelta(seconds=stable_seconds)
        stepped_back = select(Study).where(Study.state == S.RECEIVING, Study.last_instance_at > now)
        if self._any(stepped_back):
            with self._sessions.begin() as session:
                session.execute(
                    update(Study)
                    .where(Study.state == S.RECEIVING, Study.last_instance_at > now)
                    .values(last_instance_at=now)
                )
        stable = select(Study).where(Study.state == S.RECEIVING, Study.last_instance_at <= cutoff)
        if not self._any(stable):
            return []
        with self._sessions.begin() as session:
            studies = session.scalars(stable).all()
            routed = []
            for study in studies:
                complete = (
                    f"complete: no new instance for {stable_seconds:g} s ({study.instance_count} "
                    f"instance{'' if study.instance_count == 1 else 's'} in {study.series_count} series)"
                )
                decisions = (
                    list(router(_summary(session, study)))
                    if router is not None
                    else [RouteDecision(IMPLICIT_MODEL, True, "the node's one model ([inference] model)")]
                )
                try:
                    with session.begin_nested():  # one study that cannot be routed holds up no other
                        self._route(session, study, decisions, complete, now)
                    routed.append(study.study_uid)
                except TransitionError as exc:
                    log.error("study.not_routed study_uid=%s error=%r", study.study_uid, str(exc))
            return routed

    @staticmethod
    def _route(session: Session, study: Study, decisions: list[RouteDecision], complete: str, now: datetime) -> None:
        study.routing = json.dumps([decision.as_dict() for decision in decisions])
        tasks = {task.model: task for task in study.tasks}
        matched = [decision for decision in decisions if decision.matched]
        for decision in decisions:
            task = tasks.get(decision.model)
            if decision.matched and task is None:
                task = Task(study=study, model=decision.model, state=T.QUEUED, processing_attempts=0,
                            queued_at=now, updated_at=now)
                session.add(task)
                session.flush()
                if [d.model for d in decisions] != [IMPLICIT_MODEL]:  # else the study's "complete" line tells it
                    record_task_event(session, task, None, T.QUEUED, decision.reason, now)
            elif decision.matched and task is not None:
                task.processing_attempts = 0  # new work: the runs of the previous round do not count
                if task.state != T.QUEUED:
                    move_task(session, task, T.QUEUED, f"{complete}; {decision.reason}", now)
            elif task is not None and T.CANCELLED in TASK_TRANSITIONS[TaskState(task.state)]:
                move_task(session, task, T.CANCELLED, f"no longer routed to this model: {decision.reason}", now)
            # A task whose report was sent before the study changed keeps it: the PACS has it already.
        session.flush()
        if matched:
            models = [d.model for d in matched]
            for_whom = "" if models == [IMPLICIT_MODEL] else f"; for {', '.join(models)}"
            set_study_state(session, study, S.QUEUED, complete + for_whom, now)
        else:
            why = "; ".join(f"{d.model}: {d.reason}" for d in decisions) or "no model is configured"
            set_study_state(session, study, S.REPORTED, f"{complete}; no model applies ({why})", now)

    def restart_stability_clocks(self, now: datetime | None = None) -> int:
        """Give every ``receiving`` study a full stability window from now.

        Called when the node starts: while it was down a PACS could not send
        the rest of a study, so the time before the restart must not count.
        """
        now = now or utcnow()
        with self._sessions.begin() as session:
            result = session.execute(
                update(Study)
                .where(Study.state == S.RECEIVING, Study.last_instance_at < now)
                .values(last_instance_at=now)
            )
            return result.rowcount

    def claim(
        self,
        worker_id: str,
        lease_seconds: float,
        now: datetime | None = None,
        *,
        models: Collection[str] | None = None,
        priorities: Mapping[str, int] | None = None,
    ) -> Claim | None:
        """Take the next queued task under a lease, or None when none waits.

        ``models``: the models this worker serves (None: any). The order: urgent
        studies first, then the model's priority (``priorities``, higher first),
        then the longest waiting. Paused models' tasks wait. ``Claim.attempt`` is
        this run's number among the runs that can count against
        :data:`MAX_PROCESSING_ATTEMPTS`: one more than those interrupted so far.
        """
        now = now or utcnow()
        waiting = (
            select(Task)
            .join(Study, Study.id == Task.study_id)
            .where(
                Task.state == T.QUEUED,
                Study.state.not_in([S.RECEIVING.value, S.CANCELLED.value, S.PURGING.value]),
                Task.model.not_in(select(ModelPause.model)),
            )
        )
        if models is not None:
            waiting = waiting.where(Task.model.in_(list(models)))
        order: list[Any] = [Study.urgent.desc()]
        if priorities:
            order.append(case(dict(priorities), value=Task.model, else_=0).desc())
        waiting = waiting.order_by(*order, Task.queued_at, Task.id)
        if not self._any(waiting):
            return None
        with self._sessions.begin() as session:
            task = session.scalar(waiting.limit(1))
            if task is None:
                return None
            attempt = task.processing_attempts + 1
            move_task(session, task, T.PROCESSING, f"taken by {worker_id} (attempt {attempt})", now)
            task.lease_owner = worker_id
            task.lease_expires_at = now + timedelta(seconds=lease_seconds)
            return Claim(task.study.study_uid, worker_id, task.lease_expires_at, attempt, task.model)

    @staticmethod
    def held(session: Session, claim: Claim) -> Task | None:
        """The claim's task when its worker still holds it, else None."""
        return session.scalar(
            select(Task)
            .join(Study, Study.id == Task.study_id)
            .where(
                Study.study_uid == claim.study_uid,
                Task.model == claim.model,
                Task.state == T.PROCESSING,
                Task.lease_owner == claim.worker_id,
            )
        )

    def renew(self, claim: Claim, lease_seconds: float, now: datetime | None = None) -> Claim | None:
        """Extend a lease; None when the worker no longer holds it (expired, cancelled, re-opened)."""
        now = now or utcnow()
        expires = now + timedelta(seconds=lease_seconds)
        with self._sessions.begin() as session:
            task = self.held(session, claim)
            if task is None:
                return None
            task.lease_expires_at, task.updated_at = expires, now
            return Claim(claim.study_uid, claim.worker_id, expires, claim.attempt, claim.model)

    def finish(self, claim: Claim, to_state: StudyState | TaskState, reason: str, now: datetime | None = None) -> bool:
        """End a lease with the task's next state (a study state of the same name is taken as it); False when
        the lease was lost meanwhile."""
        now = now or utcnow()
        with self._sessions.begin() as session:
            task = self.held(session, claim)
            if task is None:
                return False
            move_task(session, task, TaskState(str(to_state)), reason, now)
            return True

    def interrupted(
        self, claim: Claim, what: str, max_attempts: int = MAX_PROCESSING_ATTEMPTS, now: datetime | None = None
    ) -> TaskState | None:
        """End a lease whose run was cut short (``what`` happened): queued again, or failed after ``max_attempts``.

        Returns the task's new state; None when the lease was lost meanwhile.
        """
        now = now or utcnow()
        with self._sessions.begin() as session:
            task = self.held(session, claim)
            if task is None:
                return None
            return self._count_interruption(session, task, what, max_attempts, now)

    @staticmethod
    def _count_interruption(session: Session, task: Task, what: str, max_attempts: int, now: datetime) -> TaskState:
        task.processing_attempts += 1
        attempt = task.processing_attempts
        if attempt >= max_attempts:
            move_task(
                session,
                task,
                T.FAILED,
                f"{what} on attempt {attempt} of {max_attempts}; giving up, see the node's log; "
                "`triagenode queue retry` tries again",
                now,
            )
            return T.FAILED
        move_task(session, task, T.QUEUED, f"{what} on attempt {attempt} of {max_attempts}; back in the queue", now)
        return T.QUEUED

    def recover_expired_leases(
        self,
        max_attempts: int = MAX_PROCESSING_ATTEMPTS,
        now: datetime | None = None,
        *,
        all_leases: bool = False,
        owner: str | None = None,
        alive: Collection[str] = (),
        why: str | None = None,
    ) -> list[str]:
        """Return tasks whose worker vanished to ``queued``; fail those that used every attempt.

        ``all_leases`` recovers every lease whatever its expiry: when the node
        starts, no worker of the previous run can still be alive. ``owner``
        recovers the leases of one worker the supervisor saw die. ``alive``
        names workers the supervisor knows to be running: their leases are not
        taken on expiry, which a step of the wall clock (or a lease renewal
        stuck behind a locked database) can fake; a hung one is the
        supervisor's to kill (``study_timeout_s``, on the monotonic clock).
        ``why`` replaces the reason the event gives (the supervisor knows it
        killed a hung worker). Returns the tasks' Study Instance UIDs.
        """
        now = now or utcnow()
        query = select(Task).where(Task.state == T.PROCESSING)
        if owner is not None:  # the supervisor saw this worker die: its leases end now
            query = query.where(Task.lease_owner == owner)
        elif not all_leases:
            query = query.where(Task.lease_expires_at < now)
            if alive:
                query = query.where(Task.lease_owner.not_in(list(alive)))
        if not self._any(query):
            return []
        with self._sessions.begin() as session:
            tasks = session.scalars(query).all()
            for task in tasks:
                holder = task.lease_owner
                cause = why or (
                    "the node restarted" if all_leases else "its worker died" if owner else "its lease expired"
                )
                self._count_interruption(session, task, f"{holder} stopped holding it ({cause})", max_attempts, now)
            return [task.study.study_uid for task in tasks]

    def release_for_stop(self, now: datetime | None = None) -> list[str]:
        """Give the tasks still being processed back to the queue when the node stops, without counting.

        A stop (``systemctl stop``, a restart for an upgrade) interrupts no run
        through any fault of the study; counting it would fail a long study
        after three routine restarts. Only leases a crash leaves behind are
        counted, when the node next starts.
        """
        now = now or utcnow()
        processing = select(Task).where(Task.state == T.PROCESSING)
        if not self._any(processing):
            return []
        with self._sessions.begin() as session:
            tasks = session.scalars(processing).all()
            for task in tasks:
                move_task(session, task, T.QUEUED, "the node stopped while it was processed; back in the queue", now)
            return [task.study.study_uid for task in tasks]

    def retry(
        self,
        study_uid: str,
        reason: str = "retried by an administrator",
        now: datetime | None = None,
        model: str | None = None,
    ) -> str:
        """Try a study's failed or cancelled tasks (one model's, with ``model``) again; returns what will happen.

        A task whose report exists but could not be delivered gets its failed
        deliveries scheduled again (back to ``reported``); any other is queued
        to be processed again. A study cancelled before it had tasks is routed
        again as soon as the scheduler looks.
        """
        now = now or utcnow()
        with self._sessions.begin() as session:
            study = find_study(session, study_uid)
            tasks = self._tasks(study, model)
            retryable = [task for task in tasks if task.state in RETRYABLE]
            if study.state == S.CANCELLED and model is None and not retryable:
                # Cancelled before it was routed (or while a late instance re-opened it): route it afresh.
                set_study_state(session, study, S.RECEIVING, f"{reason}: to be routed again", now)
                study.last_instance_at = datetime(1970, 1, 1)  # complete at the scheduler's next look
                return "queued again"
            if not retryable:
                raise TransitionError(
                    f"study {study_uid} {_states(study, tasks)}; only {' or '.join(sorted(RETRYABLE))} "
                    "studies can be retried"
                )
            outcomes = []
            for task in retryable:
                failed = session.scalars(
                    select(Delivery).where(Delivery.task_id == task.id, Delivery.state == DeliveryState.FAILED)
                ).all()
                if task.state == T.FAILED and failed:
                    for delivery in failed:
                        delivery.state, delivery.attempts, delivery.next_attempt_at = DeliveryState.PENDING, 0, now
                    move_task(session, task, T.REPORTED, f"{reason}: sending the report again", now)
                    outcomes.append((task.model, "report scheduled for delivery again"))
                else:
                    task.processing_attempts = 0
                    move_task(session, task, T.QUEUED, reason, now)
                    outcomes.append((task.model, "queued again"))
            if len(study.tasks) == 1 and study.tasks[0].model == IMPLICIT_MODEL:
                return outcomes[0][1]
            return "; ".join(f"{name}: {what}" for name, what in outcomes)

    def cancel(
        self,
        study_uid: str,
        reason: str = "cancelled by an administrator",
        now: datetime | None = None,
        model: str | None = None,
    ) -> None:
        """Cancel a study's tasks (one model's, with ``model``); a study still receiving is cancelled itself."""
        now = now or utcnow()
        with self._sessions.begin() as session:
            study = find_study(session, study_uid)
            tasks = self._tasks(study, model)
            cancellable = [task for task in tasks if task.state in CANCELLABLE]
            if study.state == S.RECEIVING and model is None:
                # Still (or again) receiving: the study stops, and so do the tasks of its previous round.
                for task in cancellable:
                    move_task(session, task, T.CANCELLED, reason, now)
                set_study_state(session, study, S.CANCELLED, reason, now)
                return
            if not cancellable:
                raise TransitionError(f"study {study_uid} {_states(study, tasks)}; it cannot be cancelled")
            for task in cancellable:
                move_task(session, task, T.CANCELLED, reason, now)

    def prioritize(self, study_uid: str, reason: str = "marked urgent by an administrator",
                   now: datetime | None = None) -> bool:
        """Mark a study urgent: its queued tasks go before every other's. False when it already was."""
        now = now or utcnow()
        with self._sessions.begin() as session:
            study = find_study(session, study_uid)
            if study.urgent:
                return False
            study.urgent = True
            session.add(StudyEvent(study=study, at=now, from_state=study.state, to_state=study.state, reason=reason))
            return True

    def cancel_unconfigured(self, models: Collection[str], now: datetime | None = None) -> dict[str, int]:
        """Cancel the queued tasks of models no longer configured (renamed, removed, or the one model of
        before ``[[models]]``): no worker would ever take them. Returns how many per model."""
        now = now or utcnow()
        orphans = select(Task).where(Task.state == T.QUEUED, Task.model.not_in(list(models)))
        if not self._any(orphans):
            return {}
        cancelled: dict[str, int] = {}
        with self._sessions.begin() as session:
            for task in session.scalars(orphans).all():
                move_task(session, task, T.CANCELLED, f"model {task.model} is no longer configured; "
                          "`triagenode queue retry --model` does nothing until it is", now)
                cancelled[task.model] = cancelled.get(task.model, 0) + 1
        return cancelled

    def pause(self, model: str, reason: str = "paused by an administrator", now: datetime | None = None) -> bool:
        """Stop workers from taking ``model``'s tasks (they wait, queued); False when it was paused already."""
        now = now or utcnow()
        with self._sessions.begin() as session:
            if session.get(ModelPause, model) is not None:
                return False
            session.add(ModelPause(model=model, paused_at=now, reason=reason))
            log.info("model.paused model=%s reason=%r", model, reason)
            return True

    def resume(self, model: str) -> bool:
        """Let workers take ``model``'s tasks again; False when it was not paused."""
        with self._sessions.begin() as session:
            pause = session.get(ModelPause, model)
            if pause is None:
                return False
            session.delete(pause)
            log.info("model.resumed model=%s", model)
            return True

    @staticmethod
    def _tasks(study: Study, model: str | None) -> list[Task]:
        if model is None:
            return list(study.tasks)
        tasks = [task for task in study.tasks if task.model == model]
        if not tasks:
            known = ", ".join(task.model for task in study.tasks) or "none"
            raise TransitionError(f"study {study.study_uid} has no task for model {model!r} (its tasks: {known})")
        return tasks



def find_study(session: Session, study_uid: str) -> Study:
    """The study with this Study Instance UID, to change; :class:`UnknownStudyError` with what to do.

    A study being purged is :class:`StudyBeingPurgedError`: nothing may change
    it (a retry would queue a task whose files are going).
    """
    study = session.scalar(select(Study).where(Study.study_uid == study_uid))
    if study is None:
        raise UnknownStudyError(f"no study {study_uid} on this node; `triagenode queue ls` lists them")
    if study.state == S.PURGING:
        raise StudyBeingPurgedError(study_uid)
    return study


def _states(study: Study, tasks: list[Task]) -> str:
    """``is failed``, or ``has lung sent, mr queued`` where a study's tasks say more than its state."""
    if len(tasks) == 1 and tasks[0].model == IMPLICIT_MODEL or not tasks:
        return f"is {study.state}"
    return "has " + ", ".join(f"{task.model} {task.state}" for task in tasks)


def _summary(session: Session, study: Study) -> StudySummary:
    """What routing sees of a complete study, from the queue's own tables."""
    sop_classes: dict[int, list[str]] = {}
    for series_id, sop_class in session.execute(
        select(Instance.series_id, Instance.sop_class_uid)
        .join(Series, Series.id == Instance.series_id)
        .where(Series.study_id == study.id)
        .distinct()
    ):
        sop_classes.setdefault(series_id, []).append(sop_class)
    calling = session.scalars(
        select(Instance.calling_ae).join(Series, Series.id == Instance.series_id).where(Series.study_id == study.id)
        .distinct()
    ).all()
    return StudySummary(
        study_uid=study.study_uid,
        description=study.description,
        calling_aets=tuple(sorted(calling)),
        series=tuple(
            SeriesSummary(s.series_uid, s.modality, s.description, s.body_part,
                          tuple(sorted(sop_classes.get(s.id, ()))), s.instance_count)
            for s in study.series
        ),
    )


def _merge_modality(current: str | None, new: str | None) -> str | None:
    """``CT`` + ``SR`` -> ``CT\\SR``: the study's modalities, first seen first."""
    if not new:
        return current
    parts = current.split("\\") if current else []
    if new not in parts:
        parts.append(new)
    return "\\".join(parts)[:64]
