"""Retention: a study's files and rows go ``[storage] keep_days`` after it reached a final state.

Final means nothing more will happen to the study by itself: its state is
``reported``, ``sent``, ``failed`` or ``cancelled`` (:data:`FINAL_STUDY_STATES`),
no task of it is queued or processing, and no report of it is on its way (a
pending delivery, first try or retry, of a task whose report stands). Since
when it has been final is the latest of its own history: last instance, last
event, last task change (:func:`final_since`). A study still in work is never
removed; ``queue purge`` refuses it with what to do instead.

A purge is three steps, each one safe to repeat, so that a crash anywhere
leaves something the next purge finishes:

1. :meth:`Retention.mark`: one write transaction makes the study ``purging``,
   only if it is still final (and, for the sweep, final for longer than
   keep_days: a PACS may have re-opened it since :meth:`Retention.due` looked).
   From then on :meth:`StudyQueue.record_instance` refuses every instance of
   it, new or re-sent (:class:`StudyBeingPurgedError`, which the receiver
   answers with a transient refusal), and nothing else may change it
   (:func:`find_study`), so its rows, read into a :class:`PurgePlan` in the
   same transaction, name every file the purge removes.
2. :meth:`Retention.remove_files`: unlinks exactly those files (instances,
   every report object; one already gone is fine), then removes the
   directories left empty with ``rmdir`` (never a recursive delete: a file the
   rows do not name stays, and keeps its directory), then fsyncs the
   directories, so that the files are gone on disk before their rows.
3. :meth:`Retention.forget`: one write transaction deletes the study's row;
   the foreign keys cascade to its series, instances, events, tasks, results
   and deliveries. A re-sent instance now makes a new study.

A crash after step 1 or 2 leaves the study ``purging``: :meth:`Retention.unfinished`
lists it, and :meth:`Retention.purge_due` (the daemon's sweep, whatever
keep_days says) or ``queue purge`` does steps 2 and 3 again.

Why an acknowledged instance cannot be lost: an instance recorded before
step 1 re-opened its study (``receiving``: step 1 refuses it) or, for a
cancelled study, moved its clock (the sweep waits keep_days again); one
arriving during steps 1 to 3 is refused before anything is recorded, so no
Success is answered for it; one arriving after step 3 belongs to a new study,
whose files no purge of the old one touches: files are only removed while the
study's row is ``purging``, and purges take a lock on the data directory
(:meth:`Retention.exclusive`) so that the CLI's and the daemon's never work on
one study at once (a slower one could otherwise still be removing files from
its plan after the other had finished and a new study had taken the paths).

Patient identifiers are read from one stored instance for the audit trail
(:class:`PurgedStudy`) and never logged.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import ColumnElement, DateTime, Engine, delete, func, select
from sqlalchemy.orm import Session

from triagenode.storage.engine import reader, writer
from triagenode.storage.filestore import fsync_directory
from triagenode.storage.models import Delivery, Instance, ResultRecord, Series, Study, StudyEvent, Task
from triagenode.storage.queue import TransitionError, UnknownStudyError, set_study_state
from triagenode.storage.reports import DELIVERABLE, extra_objects_of
from triagenode.storage.states import FINAL_STUDY_STATES, DeliveryState, StudyState, TaskState
from triagenode.storage.timeutil import iso, utcnow

log = logging.getLogger("triagenode.retention")

SWEEP_INTERVAL_S = 300.0
"""How often the daemon should call :meth:`Retention.purge_due`. keep_days counts in days; five minutes
late is nothing, and a sweep with nothing due is two indexed reads."""

SWEEP_BUDGET_S = 20.0
"""How long one sweep keeps starting purges: a node's stop waits for the sweep in progress, and a backlog (keep_days
set on a full node) goes over several runs instead of one that lasts hours."""

LOCK_TIMEOUT_S = 60.0
SWEEP_LOCK_TIMEOUT_S = 1.0
"""How long the daemon's sweep waits for a purge of the CLI before it leaves the rest to its next run."""
"""How long a purge waits for another one (the CLI's or the daemon's) to finish its study."""

ADMINISTRATOR_REASON = "purged by an administrator (`triagenode queue purge`)"

_FINAL = [state.value for state in FINAL_STUDY_STATES]
_WORKING_TASKS = [TaskState.QUEUED.value, TaskState.PROCESSING.value]
_STANDING_TASKS = [state.value for state in DELIVERABLE]
"""Task states whose pending deliveries go out (``storage.reports``): such a delivery is work still to do.
A cancelled or re-queued task's leftover pending delivery never goes, so it holds nothing back."""
_PATIENT_TAGS = ["PatientID", "PatientName", "AccessionNumber"]


def patient_in(paths: Iterable[Path]) -> tuple[str, str, str]:
    """(Patient ID, Patient's Name, Accession Number) from the first of ``paths`` that reads as DICOM; empty
    strings when none does. For the audit trail only: never log them."""
    from pydicom import dcmread  # only a purge or an audited command pays for pydicom

    for path in paths:
        try:
            header = dcmread(path, stop_before_pixels=True, specific_tags=_PATIENT_TAGS)
        except Exception:  # noqa: BLE001, S112 - gone, unreadable, not DICOM enough: the next may read; audit only
            continue
        patient_id, patient_name, accession = (str(header.get(tag) or "") for tag in _PATIENT_TAGS)
        return patient_id, patient_name, accession
    return "", "", ""


class StudyInWorkError(TransitionError):
    """A purge asked for a study that is not final; the text says what is still going on and what to do."""


class PurgeBusyError(RuntimeError):
    """Another purge held the data directory's lock for longer than :data:`LOCK_TIMEOUT_S`."""


@dataclass(frozen=True)
class PurgePlan:
    """What a purge removes, read from the rows of a study already ``purging`` (so they no longer change)."""

    study_id: int
    study_uid: str
    final_since: datetime
    reason: str
    """Why it is purged: keep_days, or an administrator; for a purge resumed, the reason it was started with."""
    instance_paths: tuple[str, ...]
    """Relative to data_dir, as the instance rows hold them."""
    report_paths: tuple[str, ...]
    """Every report object of every task (the primary SR and the others), relative to data_dir."""
    sop_classes: Mapping[str, int]
    """SOP Class UID -> how many instances of the study have it."""
    resumed: bool
    """The study was ``purging`` already: an earlier purge was cut short, this one finishes it."""


@dataclass(frozen=True)
class PurgedStudy:
    """A study that is gone, with what an audit message about it needs (patient identifiers: not for the log)."""

    study_uid: str
    patient_id: str
    patient_name: str
    accession_number: str
    """The three read from one stored instance (or report) before the files went; empty when none could be read
    (a purge resumed after its files had gone)."""
    sop_classes: Mapping[str, int]
    """SOP Class UID -> number of instances, from the rows."""
    instances: int
    bytes_freed: int
    """The sizes of the files this purge removed (a resumed purge counts only what was left)."""
    reports_removed: int
    """Report objects the study's results named (primary SRs and the objects sent with them)."""
    final_since: datetime
    """Naive UTC: since when nothing had happened to the study."""
    reason: str
    resumed: bool


def final_since(with_instances: bool = True) -> ColumnElement[datetime]:
    """Since when a study has been as it is: the latest of its last instance, event and task change.

    A SQL expression on :class:`Study` (correlated subqueries). The event that
    made it ``purging`` does not count, so a purge resumed later reports the
    same time. ``updated_at`` is left out: every change that sets it also
    writes an event or an instance, at the same time. ``with_instances`` adds
    the instances' own times, which only the node's own reports coming back
    from a PACS can move (they are stored without touching the study); that
    reads every instance row, so :meth:`Retention.due` leaves it to
    :meth:`Retention.mark`, which looks at one study.
    """
    at = Study.last_instance_at
    event = (
        select(func.max(StudyEvent.at))
        .where(StudyEvent.study_id == Study.id, StudyEvent.to_state != StudyState.PURGING.value)
        .correlate(Study)
        .scalar_subquery()
    )
    task = select(func.max(Task.updated_at)).where(Task.study_id == Study.id).correlate(Study).scalar_subquery()
    times = [at, func.coalesce(event, at), func.coalesce(task, at)]
    if with_instances:
        instance = (
            select(func.max(Instance.received_at))
            .join(Series, Series.id == Instance.series_id)
            .where(Series.study_id == Study.id)
            .correlate(Study)
            .scalar_subquery()
        )
        times.append(func.coalesce(instance, at))
    # SQLite's max() of several values: the latest of the times, which it stores as sortable text.
    return func.max(*times, type_=DateTime())


def _working_task() -> ColumnElement[bool]:
    return select(Task.id).where(Task.study_id == Study.id, Task.state.in_(_WORKING_TASKS)).exists()


def _report_on_its_way() -> ColumnElement[bool]:
    return (
        select(Delivery.id)
        .join(Task, Task.id == Delivery.task_id)
        .where(Task.study_id == Study.id, Delivery.state == DeliveryState.PENDING.value,
               Task.state.in_(_STANDING_TASKS))
        .exists()
    )


class Retention:
    """Removes studies that have been final for ``keep_days`` (0: never), and single studies on request.

    ``data_dir`` is the node's (``[node] data_dir``): the rows' paths are relative to it.
    """

    def __init__(self, engine: Engine, data_dir: Path, keep_days: float = 0.0) -> None:
        self.data_dir = data_dir
        self.keep_days = keep_days
        self._sessions = writer(engine)
        self._reads = reader(engine)

    def cutoff(self, now: datetime) -> datetime | None:
        """Studies final since before this time are due; None when keep_days is 0 (keep everything)."""
        return now - timedelta(days=self.keep_days) if self.keep_days > 0 else None

    def due(self, now: datetime | None = None, limit: int | None = None) -> list[str]:
        """The studies final for longer than keep_days, longest first (Study Instance UIDs); none when it is 0.

        Read without the write lock; :meth:`mark` checks again, in its own
        transaction, since a study may re-open meanwhile.
        """
        cutoff = self.cutoff(now or utcnow())
        if cutoff is None:
            return []
        since = final_since(with_instances=False)
        query = (
            select(Study.study_uid)
            .where(
                Study.state.in_(_FINAL),
                Study.updated_at <= cutoff,  # implied by the next line; lets the (state, updated_at) index narrow
                since <= cutoff,
                ~_working_task(),
                ~_report_on_its_way(),
            )
            .order_by(since, Study.id)
        )
        if limit is not None:
            query = query.limit(limit)
        with self._reads() as session:
            return list(session.scalars(query).all())

    def unfinished(self) -> list[str]:
        """Studies left ``purging`` by a purge that was cut short (a crash, a file it could not remove)."""
        with self._reads() as session:
            return list(
                session.scalars(
                    select(Study.study_uid).where(Study.state == StudyState.PURGING.value).order_by(Study.id)
                ).all()
            )

    def purge(self, study_uid: str, *, now: datetime | None = None) -> PurgedStudy:
        """Remove one study now, whatever keep_days says (``queue purge``); finishes one left ``purging``.

        Raises :class:`UnknownStudyError`, :class:`StudyInWorkError` (with the
        reason and what to do), :class:`PurgeBusyError`, or ``OSError`` when a
        file cannot be removed (the study then stays ``purging``: rows and the
        files not yet removed are kept, and the next purge goes on from there).
        """
        purged = self._purge(study_uid, now or utcnow(), None, ADMINISTRATOR_REASON)
        assert purged is not None  # without a cutoff, a study is purged or refused
        return purged

    def purge_due(
        self, now: datetime | None = None, *, limit: int | None = None, budget_s: float | None = SWEEP_BUDGET_S
    ) -> list[PurgedStudy]:
        """The scheduler's sweep: finish the studies left ``purging``, then purge the due ones, longest final first.

        Starts no purge after ``budget_s`` (None: no bound) or beyond ``limit``
        due studies; the rest waits for the next run. Logs ``retention.purged``
        per study. A study that fails (a file that cannot be removed, a
        database error) is logged as ``retention.failed`` and left for the next
        run; the others go on. Runs the unfinished ones even with keep_days 0
        (a ``queue purge`` cut short), so call it whatever keep_days says.
        """
        now = now or utcnow()
        deadline = time.monotonic() + budget_s if budget_s is not None else None
        cutoff = self.cutoff(now)
        reason = f"final for more than {self.keep_days:g} day{'' if self.keep_days == 1 else 's'} ([storage] keep_days)"
        work: list[tuple[str, datetime | None]] = [(uid, None) for uid in self.unfinished()]
        work += [(uid, cutoff) for uid in self.due(now, limit)]
        purged: list[PurgedStudy] = []
        for index, (study_uid, older_than) in enumerate(work):
            if deadline is not None and time.monotonic() > deadline:
                log.info("retention.paused purged=%d left=%d reason='sweep budget of %g s spent; the next run goes on'",
                         len(purged), len(work) - index, budget_s)
                break
            try:
                # A CLI purge holding the lock: this run stops, the next goes on (a stop must not wait a minute).
                done = self._purge(study_uid, now, older_than, reason, lock_timeout_s=SWEEP_LOCK_TIMEOUT_S)
            except UnknownStudyError:
                continue  # another purge (the CLI's) finished it meanwhile
            except PurgeBusyError:
                log.info("retention.paused purged=%d left=%d reason='a purge of the CLI holds data_dir'",
                         len(purged), len(work) - index)
                break
            except Exception as exc:  # noqa: BLE001 - one study's trouble must not keep the others on the disk
                log.error("retention.failed study_uid=%s error=%s detail=%r: left for the next run", study_uid,
                          type(exc).__name__, str(getattr(exc, "orig", exc))[:300])
                continue
            if done is not None:
                purged.append(done)
        return purged

    def _purge(
        self, study_uid: str, now: datetime, older_than: datetime | None, reason: str,
        lock_timeout_s: float = LOCK_TIMEOUT_S,
    ) -> PurgedStudy | None:
        with self.exclusive(lock_timeout_s):
            plan = self.mark(study_uid, now=now, older_than=older_than, reason=reason)
            if plan is None:
                return None
            patient_id, patient_name, accession = self.read_patient(plan)
            freed = self.remove_files(plan)
            self.forget(plan)
        purged = PurgedStudy(
            study_uid=plan.study_uid,
            patient_id=patient_id,
            patient_name=patient_name,
            accession_number=accession,
            sop_classes=dict(plan.sop_classes),
            instances=len(plan.instance_paths),
            bytes_freed=freed,
            reports_removed=len(plan.report_paths),
            final_since=plan.final_since,
            reason=plan.reason,
            resumed=plan.resumed,
        )
        log.info("retention.purged study_uid=%s instances=%d reports=%d bytes=%d final_since=%s resumed=%s "
                 "reason=%r", purged.study_uid, purged.instances, purged.reports_removed, purged.bytes_freed,
                 iso(purged.final_since), "yes" if purged.resumed else "no", purged.reason)
        return purged

    @contextmanager
    def exclusive(self, timeout_s: float = LOCK_TIMEOUT_S) -> Iterator[None]:
        """Hold the data directory's purge lock: one purge at a time, across the daemon and the CLI.

        An flock on the directory itself (no file to create, whoever runs the
        CLI), which the kernel drops however the process ends. Raises
        :class:`PurgeBusyError` after ``timeout_s``.
        """
        fd = os.open(self.data_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise PurgeBusyError(
                            f"another purge has held {self.data_dir} for more than {timeout_s:g} s; "
                            "try again when it has finished"
                        ) from None
                    time.sleep(0.05)
            yield
        finally:
            os.close(fd)  # closing drops the lock

    def mark(
        self, study_uid: str, *, now: datetime, older_than: datetime | None = None, reason: str = ADMINISTRATOR_REASON
    ) -> PurgePlan | None:
        """Step 1: make the study ``purging`` if it is final (one write transaction) and read what goes.

        With ``older_than`` (the sweep's cutoff) a study no longer due, or no
        longer final, is left alone: None. Without it a study in work is
        :class:`StudyInWorkError`. A study already ``purging`` is taken as it
        is (its purge was cut short). :meth:`purge` runs the three steps under
        :meth:`exclusive`; a caller of the steps themselves must hold it too.
        """
        with self._sessions.begin() as session:
            study = session.scalar(select(Study).where(Study.study_uid == study_uid))
            if study is None:
                raise UnknownStudyError(f"no study {study_uid} on this node; `triagenode queue ls` lists them")
            resumed = study.state == StudyState.PURGING
            if resumed:
                reason = session.scalar(
                    select(StudyEvent.reason)
                    .where(StudyEvent.study_id == study.id, StudyEvent.to_state == StudyState.PURGING.value)
                    .order_by(StudyEvent.id.desc())
                    .limit(1)
                ) or reason
            else:
                busy = _in_work(session, study)
                if busy is not None:
                    if older_than is not None:
                        return None
                    raise StudyInWorkError(busy)
                if older_than is not None and (
                    study.updated_at > older_than or _final_since_of(session, study) > older_than
                ):
                    return None
                set_study_state(session, study, StudyState.PURGING, reason, now)
            return _plan(session, study, reason, resumed)

    def read_patient(self, plan: PurgePlan) -> tuple[str, str, str]:
        """(Patient ID, Patient's Name, Accession Number) from the first stored file that reads; empty strings
        when none does. For the audit trail only: never log them."""
        paths = (self._path(relative) for relative in (*plan.instance_paths, *plan.report_paths))
        return patient_in(path for path in paths if path is not None)

    def remove_files(self, plan: PurgePlan) -> int:
        """Step 2: unlink the files the plan names, rmdir the directories left empty, fsync; the bytes freed.

        A file already gone is skipped; one that cannot be removed raises
        ``OSError`` and leaves the study ``purging`` for the next purge. Does
        nothing unless the study is still ``purging`` (a stale plan).
        """
        with self._reads() as session:
            state = session.scalar(select(Study.state).where(Study.id == plan.study_id))
        if state != StudyState.PURGING:
            return 0
        freed = 0
        directories: set[Path] = set()
        changed: set[Path] = set()
        for relative in (*plan.instance_paths, *plan.report_paths):
            path = self._path(relative)
            if path is None:
                log.warning("retention.path_skipped study_uid=%s path=%r reason='not a path inside data_dir'",
                            plan.study_uid, relative)
                continue
            directories.update(self._directories_of(path))
            try:
                size = os.lstat(path).st_size
                path.unlink()
            except FileNotFoundError:
                continue
            freed += size
            changed.add(path.parent)
        for directory in sorted(directories, key=lambda d: len(d.parts), reverse=True):
            try:
                directory.rmdir()
            except FileNotFoundError:
                continue
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                _note_left_behind(plan.study_uid, directory, self.data_dir)
                continue
            changed.add(directory.parent)
        for directory in changed:
            if directory.is_dir():
                fsync_directory(directory)  # the removals are on disk before the rows go (step 3)
        return freed

    def forget(self, plan: PurgePlan) -> None:
        """Step 3: delete the study's row, which cascades to everything of it (one write transaction).

        Only while it is ``purging``: a second run of this step deletes nothing.
        """
        with self._sessions.begin() as session:
            session.execute(
                delete(Study).where(Study.id == plan.study_id, Study.state == StudyState.PURGING.value),
                execution_options={"synchronize_session": False},
            )

    def _path(self, relative: str) -> Path | None:
        """The file a row names, or None for a name that would lead out of data_dir (no row the node wrote)."""
        parts = Path(relative).parts
        if not parts or Path(relative).is_absolute() or ".." in parts or len(parts) < 2:
            return None
        return self.data_dir / relative

    def _directories_of(self, path: Path) -> list[Path]:
        """The directories between a file and the top directory it lies in (``studies/``, ``reports/``),
        which stays: ``studies/<study>/<series>`` and ``studies/<study>``; ``reports/<study>``."""
        top = self.data_dir / path.relative_to(self.data_dir).parts[0]
        return [parent for parent in path.parents if parent != top and top in parent.parents]


def _in_work(session: Session, study: Study) -> str | None:
    """Why the study is not final, as a line for the administrator; None when it is final."""
    uid = study.study_uid
    cancel = f"cancel it first with `triagenode queue cancel {uid}`"
    if study.state not in FINAL_STUDY_STATES:
        return f"study {uid} is {study.state}, still in work; {cancel}"
    working = session.scalars(
        select(Task).where(Task.study_id == study.id, Task.state.in_(_WORKING_TASKS)).order_by(Task.id)
    ).all()
    if working:
        tasks = ", ".join(f"{task.model} {task.state}" for task in working)
        return f"study {uid} is {study.state} but has {tasks}, still in work; {cancel}"
    destinations = session.scalars(
        select(Delivery.destination)
        .join(Task, Task.id == Delivery.task_id)
        .where(Task.study_id == study.id, Delivery.state == DeliveryState.PENDING.value,
               Task.state.in_(_STANDING_TASKS))
        .distinct()
    ).all()
    if destinations:
        return (
            f"study {uid} has a report still on its way to {', '.join(sorted(destinations))}; wait until it is "
            f"sent (or its delivery gives up), or {cancel}"
        )
    return None


def _final_since_of(session: Session, study: Study) -> datetime:
    value: Any = session.scalar(select(final_since()).where(Study.id == study.id))
    return value if isinstance(value, datetime) else study.updated_at


def _plan(session: Session, study: Study, reason: str, resumed: bool) -> PurgePlan:
    """The files and counts of a ``purging`` study, from its rows."""
    instances = session.execute(
        select(Instance.path, Instance.sop_class_uid)
        .join(Series, Series.id == Instance.series_id)
        .where(Series.study_id == study.id)
        .order_by(Instance.id)
    ).all()
    results = session.scalars(
        select(ResultRecord).join(Task, Task.id == ResultRecord.task_id).where(Task.study_id == study.id)
    ).all()
    reports: dict[str, None] = {}
    for result in results:
        if result.sr_path:
            reports[result.sr_path] = None
        for extra in extra_objects_of(result):
            reports[extra.path] = None
    return PurgePlan(
        study_id=study.id,
        study_uid=study.study_uid,
        final_since=_final_since_of(session, study),
        reason=reason,
        instance_paths=tuple(path for path, _ in instances),
        report_paths=tuple(reports),
        sop_classes=dict(Counter(sop_class for _, sop_class in instances)),
        resumed=resumed,
    )


def _note_left_behind(study_uid: str, directory: Path, data_dir: Path) -> None:
    """Files no row names kept a directory (a report replaced by a rebuilt one, say): they stay, and say so."""
    try:
        files = sum(1 for entry in directory.iterdir() if not entry.is_dir())
    except OSError:
        return
    if files:
        log.warning("retention.left_behind study_uid=%s directory=%s files=%d reason='no row of the study names "
                    "them'", study_uid, directory.relative_to(data_dir), files)
