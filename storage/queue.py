"""The study queue: the state machine, instance registration and work leases.

Every state change goes through :func:`transition`, which checks that the
change is allowed and writes the event that ``queue show`` lists, so the
history and the state can never disagree; its log line is written once the
transaction has committed, so the log never shows a change the database
never had. Each public method of
:class:`StudyQueue` is one write transaction (``BEGIN IMMEDIATE``), which is
what makes a lease exclusive: two workers asking at once are served one after
the other, and the second sees the study already taken.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum
from typing import Any

from sqlalchemy import Engine, Select, event, select, update
from sqlalchemy.orm import Session

from triagenode.storage.engine import reader, writer
from triagenode.storage.models import Delivery, DeliveryState, Study, StudyEvent, StudyState
from triagenode.storage.timeutil import utcnow

log = logging.getLogger("triagenode.queue")

S = StudyState
ALLOWED_TRANSITIONS: dict[StudyState, frozenset[StudyState]] = {
    S.RECEIVING: frozenset({S.QUEUED, S.CANCELLED}),
    S.QUEUED: frozenset({S.PROCESSING, S.RECEIVING, S.CANCELLED}),
    S.PROCESSING: frozenset({S.REPORTED, S.QUEUED, S.FAILED, S.RECEIVING, S.CANCELLED}),
    S.REPORTED: frozenset({S.SENT, S.FAILED, S.RECEIVING, S.CANCELLED}),
    S.SENT: frozenset({S.RECEIVING, S.REPORTED, S.FAILED}),
    S.FAILED: frozenset({S.QUEUED, S.REPORTED, S.RECEIVING, S.CANCELLED}),
    S.CANCELLED: frozenset({S.QUEUED}),
}
"""Which state may follow which. ``receiving`` after a later state is a re-open by a late instance."""

MAX_PROCESSING_ATTEMPTS = 3
"""Interrupted runs (a worker crash, a hang past study_timeout_s, a dead decoder, the node crashing mid-study)
after which a study is ``failed`` instead of queued again: what stops a study that kills its worker from
crash-looping. Runs that ended with a result or a deliberate failure do not count."""

RETRYABLE = frozenset({S.FAILED, S.CANCELLED})
CANCELLABLE = frozenset(state for state, targets in ALLOWED_TRANSITIONS.items() if S.CANCELLED in targets)


# The statements of record_instance, on the tables of storage.models.
_SQL_INSTANCE_EXISTS = "SELECT 1 FROM instances WHERE sop_instance_uid = ?"
_SQL_INSTANCE_PATH = "SELECT path FROM instances WHERE sop_instance_uid = ?"
_SQL_FIND_STUDY = "SELECT id, state, modality FROM studies WHERE study_uid = ?"
_SQL_NEW_STUDY = (
    "INSERT INTO studies (study_uid, state, study_date, description, received_at, last_instance_at, updated_at,"
    " series_count, instance_count, byte_count, processing_attempts)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, 0, 0, 0, 0) RETURNING id"
)
_SQL_NEW_EVENT = "INSERT INTO study_events (study_id, at, from_state, to_state, reason) VALUES (?, ?, ?, ?, ?)"
_SQL_FIND_SERIES = "SELECT id FROM series WHERE study_id = ? AND series_uid = ?"
_SQL_NEW_SERIES = (
    "INSERT INTO series (study_id, series_uid, modality, series_number, description, instance_count)"
    " VALUES (?, ?, ?, ?, ?, 0) RETURNING id"
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
_SQL_DROP_PENDING_DELIVERIES = "DELETE FROM deliveries WHERE study_id = ? AND state = 'pending'"
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


_STATE_CHANGES = "triagenode_state_changes"
"""Key in ``Session.info`` of the state changes a transaction made, logged once it commits."""


def transition(session: Session, study: Study, to_state: StudyState, reason: str, now: datetime) -> None:
    """Change a study's state and write the event, in the caller's transaction.

    The log line waits for the commit (see :func:`_log_committed_changes`).
    """
    from_state = StudyState(study.state)
    if to_state not in ALLOWED_TRANSITIONS[from_state]:
        raise TransitionError(f"study {study.study_uid} is {from_state}; it cannot become {to_state}")
    study.state = to_state
    study.updated_at = now
    if to_state is not S.PROCESSING:
        study.lease_owner = None
        study.lease_expires_at = None
    session.add(StudyEvent(study=study, at=now, from_state=from_state, to_state=to_state, reason=reason))
    session.info.setdefault(_STATE_CHANGES, []).append((study.study_uid, str(from_state), str(to_state), reason))


def log_state_change(study_uid: str, from_state: str, to_state: str, reason: str) -> None:
    log.info("study.state study_uid=%s from=%s to=%s reason=%r", study_uid, from_state, to_state, reason)


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
    reopens: bool = True
    """False for the node's own report coming back from a PACS: stored, but the study's state and
    stability clock stay as they are (re-opening would run the model again and send one more report)."""


class Registration(Enum):
    """What :meth:`StudyQueue.record_instance` did with an instance."""

    NEW_STUDY = "new study"
    ADDED = "added"
    REOPENED = "re-opened study"
    KEPT_AS_OWN_REPORT = "the node's own report, stored without re-opening its study"
    DUPLICATE = "duplicate"


@dataclass(frozen=True)
class Claim:
    """A study taken by a worker under a lease."""

    study_uid: str
    worker_id: str
    lease_expires_at: datetime
    attempt: int


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

        One indexed read on the driver's connection, outside any transaction
        (the driver is in autocommit mode): it runs for every C-STORE.
        """
        connection = self._engine.raw_connection()
        try:
            row = connection.execute(_SQL_INSTANCE_PATH, (sop_instance_uid,)).fetchone()  # type: ignore[attr-defined]
        finally:
            connection.close()
        return None if row is None else str(row[0])

    def record_instance(self, received: ReceivedInstance, now: datetime | None = None) -> Registration:
        """Register a stored instance; commits (fsync'd) before it returns.

        This runs once per received instance while the sender waits, so it is
        plain SQL on the driver's cursor inside SQLAlchemy's transaction:
        building the equivalent Core statements costs four times as much CPU
        as SQLite takes to run them. Only the rare re-open goes through the
        ORM and :func:`transition`.
        """
        now = now or utcnow()
        stamp = _db_time(now)
        changes: list[tuple[str, str, str, str]] = []
        with self._engine.begin() as connection:
            cursor = connection.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
            if cursor.execute(_SQL_INSTANCE_EXISTS, (received.sop_instance_uid,)).fetchone():
                return Registration.DUPLICATE
            outcome = Registration.ADDED
            quietly = False
            row = cursor.execute(_SQL_FIND_STUDY, (received.study_uid,)).fetchone()
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
                )
                study_id = cursor.execute(_SQL_NEW_STUDY, new_study).fetchone()[0]
                study_modality = None
                cursor.execute(_SQL_NEW_EVENT, (study_id, stamp, None, S.RECEIVING.value, reason))
                changes.append((received.study_uid, "-", S.RECEIVING.value, reason))
                outcome = Registration.NEW_STUDY
            else:
                study_id, state, study_modality = row
                if not received.reopens and state != S.RECEIVING:
                    quietly = True
                    outcome = Registration.KEPT_AS_OWN_REPORT
                elif state not in (S.RECEIVING, S.CANCELLED):
                    with Session(bind=connection) as session:
                        study = session.get_one(Study, study_id)
                        transition(
                            session,
                            study,
                            S.RECEIVING,
                            f"new instance from {received.calling_ae} after the study was {state}; re-opened",
                            now,
                        )
                        # New work: the interrupted runs of the previous round do not count against it.
                        study.processing_attempts = 0
                        session.flush()
                        changes += session.info.pop(_STATE_CHANGES, [])
                    # The report not yet delivered lacks this instance: it must not go out
                    # later (say, after the new run fails). The new run schedules its own.
                    cursor.execute(_SQL_DROP_PENDING_DELIVERIES, (study_id,))
                    outcome = Registration.REOPENED
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

    def complete_stable_studies(self, stable_seconds: float, now: datetime | None = None) -> list[str]:
        """Queue every ``receiving`` study with no instance for ``stable_seconds``.

        A last instance time in the future means the clock was stepped back
        since it arrived: such a study gets a full stability window from now
        instead of waiting until the clock catches up (an hour, for a step of
        an hour).
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
            for study in studies:
                transition(
                    session,
                    study,
                    S.QUEUED,
                    f"complete: no new instance for {stable_seconds:g} s ({study.instance_count} "
                    f"instance{'' if study.instance_count == 1 else 's'} in {study.series_count} series)",
                    now,
                )
            return [study.study_uid for study in studies]

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

    def claim(self, worker_id: str, lease_seconds: float, now: datetime | None = None) -> Claim | None:
        """Take the oldest ``queued`` study under a lease, or None when none waits.

        ``Claim.attempt`` is this run's number among the runs that can count
        against :data:`MAX_PROCESSING_ATTEMPTS`: one more than the runs that
        were interrupted so far.
        """
        now = now or utcnow()
        waiting = select(Study).where(Study.state == S.QUEUED).order_by(Study.updated_at, Study.id)
        if not self._any(waiting):
            return None
        with self._sessions.begin() as session:
            study = session.scalar(waiting.limit(1))
            if study is None:
                return None
            attempt = study.processing_attempts + 1
            transition(session, study, S.PROCESSING, f"taken by {worker_id} (attempt {attempt})", now)
            study.lease_owner = worker_id
            study.lease_expires_at = now + timedelta(seconds=lease_seconds)
            return Claim(study.study_uid, worker_id, study.lease_expires_at, attempt)

    def renew(self, claim: Claim, lease_seconds: float, now: datetime | None = None) -> Claim | None:
        """Extend a lease; None when the worker no longer holds it (expired, cancelled, re-opened)."""
        now = now or utcnow()
        expires = now + timedelta(seconds=lease_seconds)
        with self._sessions.begin() as session:
            result = session.execute(
                update(Study)
                .where(
                    Study.study_uid == claim.study_uid,
                    Study.state == S.PROCESSING,
                    Study.lease_owner == claim.worker_id,
                )
                .values(lease_expires_at=expires, updated_at=now)
            )
            return Claim(claim.study_uid, claim.worker_id, expires, claim.attempt) if result.rowcount else None

    def finish(self, claim: Claim, to_state: StudyState, reason: str, now: datetime | None = None) -> bool:
        """End a lease with the study's next state; False when the lease was lost meanwhile."""
        now = now or utcnow()
        with self._sessions.begin() as session:
            study = session.scalar(select(Study).where(Study.study_uid == claim.study_uid))
            if study is None or study.state != S.PROCESSING or study.lease_owner != claim.worker_id:
                return False
            transition(session, study, to_state, reason, now)
            return True

    def interrupted(
        self, claim: Claim, what: str, max_attempts: int = MAX_PROCESSING_ATTEMPTS, now: datetime | None = None
    ) -> StudyState | None:
        """End a lease whose run was cut short (``what`` happened): queued again, or failed after ``max_attempts``.

        Returns the study's new state; None when the lease was lost meanwhile.
        """
        now = now or utcnow()
        with self._sessions.begin() as session:
            study = session.scalar(select(Study).where(Study.study_uid == claim.study_uid))
            if study is None or study.state != S.PROCESSING or study.lease_owner != claim.worker_id:
                return None
            return self._count_interruption(session, study, what, max_attempts, now)

    @staticmethod
    def _count_interruption(session: Session, study: Study, what: str, max_attempts: int, now: datetime) -> StudyState:
        study.processing_attempts += 1
        attempt = study.processing_attempts
        if attempt >= max_attempts:
            transition(
                session,
                study,
                S.FAILED,
                f"{what} on attempt {attempt} of {max_attempts}; giving up, see the node's log; "
                "`triagenode queue retry` tries again",
                now,
            )
            return S.FAILED
        transition(session, study, S.QUEUED, f"{what} on attempt {attempt} of {max_attempts}; back in the queue", now)
        return S.QUEUED

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
        """Return studies whose worker vanished to ``queued``; fail those that used every attempt.

        ``all_leases`` recovers every lease whatever its expiry: when the node
        starts, no worker of the previous run can still be alive. ``owner``
        recovers the leases of one worker the supervisor saw die. ``alive``
        names workers the supervisor knows to be running: their leases are not
        taken on expiry, which a step of the wall clock (or a lease renewal
        stuck behind a locked database) can fake; a hung one is the
        supervisor's to kill (``study_timeout_s``, on the monotonic clock).
        ``why`` replaces the reason the event gives (the supervisor knows it
        killed a hung worker).
        """
        now = now or utcnow()
        query = select(Study).where(Study.state == S.PROCESSING)
        if owner is not None:  # the supervisor saw this worker die: its leases end now
            query = query.where(Study.lease_owner == owner)
        elif not all_leases:
            query = query.where(Study.lease_expires_at < now)
            if alive:
                query = query.where(Study.lease_owner.not_in(list(alive)))
        if not self._any(query):
            return []
        with self._sessions.begin() as session:
            studies = session.scalars(query).all()
            for study in studies:
                holder = study.lease_owner
                cause = why or (
                    "the node restarted" if all_leases else "its worker died" if owner else "its lease expired"
                )
                self._count_interruption(session, study, f"{holder} stopped holding it ({cause})", max_attempts, now)
            return [study.study_uid for study in studies]

    def release_for_stop(self, now: datetime | None = None) -> list[str]:
        """Give the studies still being processed back to the queue when the node stops, without counting.

        A stop (``systemctl stop``, a restart for an upgrade) interrupts no run
        through any fault of the study; counting it would fail a long study
        after three routine restarts. Only leases a crash leaves behind are
        counted, when the node next starts.
        """
        now = now or utcnow()
        processing = select(Study).where(Study.state == S.PROCESSING)
        if not self._any(processing):
            return []
        with self._sessions.begin() as session:
            studies = session.scalars(processing).all()
            for study in studies:
                transition(session, study, S.QUEUED, "the node stopped while it was processed; back in the queue",
                           now)
            return [study.study_uid for study in studies]

    def retry(self, study_uid: str, reason: str = "retried by an administrator", now: datetime | None = None) -> str:
        """Try a failed or cancelled study again; returns what will happen.

        A study whose report exists but could not be delivered gets its failed
        deliveries scheduled again (back to ``reported``); any other is queued
        to be processed again.
        """
        now = now or utcnow()
        with self._sessions.begin() as session:
            study = self._get(session, study_uid)
            if study.state not in RETRYABLE:
                raise TransitionError(
                    f"study {study_uid} is {study.state}; only {' or '.join(sorted(RETRYABLE))} studies can be retried"
                )
            failed = session.scalars(
                select(Delivery).where(Delivery.study_id == study.id, Delivery.state == DeliveryState.FAILED)
            ).all()
            if study.state == S.FAILED and failed:
                for delivery in failed:
                    delivery.state, delivery.attempts, delivery.next_attempt_at = DeliveryState.PENDING, 0, now
                transition(session, study, S.REPORTED, f"{reason}: sending the report again", now)
                return "report scheduled for delivery again"
            study.processing_attempts = 0
            transition(session, study, S.QUEUED, reason, now)
            return "queued again"

    def cancel(
        self, study_uid: str, reason: str = "cancelled by an administrator", now: datetime | None = None
    ) -> None:
        now = now or utcnow()
        with self._sessions.begin() as session:
            study = self._get(session, study_uid)
            if study.state not in CANCELLABLE:
                raise TransitionError(f"study {study_uid} is {study.state}; it cannot be cancelled")
            transition(session, study, S.CANCELLED, reason, now)

    @staticmethod
    def _get(session: Session, study_uid: str) -> Study:
        study = session.scalar(select(Study).where(Study.study_uid == study_uid))
        if study is None:
            raise UnknownStudyError(f"no study {study_uid} on this node; `triagenode queue ls` lists them")
        return study


def _merge_modality(current: str | None, new: str | None) -> str | None:
    """``CT`` + ``SR`` -> ``CT\\SR``: the study's modalities, first seen first."""
    if not new:
        return current
    parts = current.split("\\") if current else []
    if new not in parts:
        parts.append(new)
    return "\\".join(parts)[:64]
