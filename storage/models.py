"""The queue's tables as SQLAlchemy 2 typed models.

Patient-identifying attributes stay in the DICOM files: these tables hold
UIDs, what the CLI shows (modality, study date, description, counts) and the
queue's own state. The schema itself is created and upgraded by
:mod:`storage.migrations`; a test checks that the two agree.

Times are naive UTC ``datetime`` values (SQLite has no time zone type).
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import Dialect, ForeignKey, Index, String, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

from triagenode.storage.states import DeliveryState, StudyState, TaskState


class _StateColumn(TypeDecorator[enum.StrEnum]):
    """A state enum stored as its plain value (VARCHAR(16)), read back as the enum.

    The schema stays what the migrations create (no CHECK constraint to
    migrate when a state is added); the code gets the enum, which still
    compares equal to its string.
    """

    impl = String(16)
    cache_ok = True

    def __init__(self, states: type[enum.StrEnum]) -> None:
        super().__init__()
        self.states = states  # the name of __init__'s argument: SQLAlchemy's cache key reads it

    def process_bind_param(self, value: Any, dialect: Dialect) -> str | None:
        return None if value is None else str(self.states(value))

    def process_result_value(self, value: Any, dialect: Dialect) -> enum.StrEnum | None:
        return None if value is None else self.states(value)


class Base(DeclarativeBase):
    pass


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(64), unique=True)
    state: Mapped[StudyState] = mapped_column(_StateColumn(StudyState))
    modality: Mapped[str | None] = mapped_column(String(64))
    """Modalities of the study's series, e.g. ``CT`` or ``CT\\SR``."""
    study_date: Mapped[str | None] = mapped_column(String(8))
    description: Mapped[str | None] = mapped_column(String(64))
    series_count: Mapped[int] = mapped_column(default=0)
    instance_count: Mapped[int] = mapped_column(default=0)
    byte_count: Mapped[int] = mapped_column(default=0)
    received_at: Mapped[datetime]
    """When the first instance arrived."""
    last_instance_at: Mapped[datetime]
    """When the latest instance arrived: the stability clock starts here."""
    updated_at: Mapped[datetime]
    """Last change of anything in the row; ``queue ls`` sorts on it."""
    urgent: Mapped[bool] = mapped_column(default=False)
    """STAT: Requested Procedure Priority said so, or ``queue prioritize``; its tasks go first."""
    routing: Mapped[str | None]
    """JSON list of ``{model, matched, reason}``: what routing decided when the study became complete."""

    series: Mapped[list[Series]] = relationship(back_populates="study", order_by="Series.id")
    events: Mapped[list[StudyEvent]] = relationship(back_populates="study", order_by="StudyEvent.id")
    tasks: Mapped[list[Task]] = relationship(back_populates="study", order_by="Task.id")

    __table_args__ = (
        Index("ix_studies_state_updated", "state", "updated_at"),
        Index("ix_studies_updated", "updated_at"),
        Index("ix_studies_state_last_instance", "state", "last_instance_at"),
    )


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    series_uid: Mapped[str] = mapped_column(String(64))
    modality: Mapped[str | None] = mapped_column(String(16))
    series_number: Mapped[int | None]
    description: Mapped[str | None] = mapped_column(String(64))
    instance_count: Mapped[int] = mapped_column(default=0)
    body_part: Mapped[str | None] = mapped_column(String(16))
    """(0018,0015) Body Part Examined of the series' first instance, for routing."""

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series", order_by="Instance.id")

    __table_args__ = (UniqueConstraint("study_id", "series_uid"),)


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str]
    """Relative to ``data_dir``, so that the data directory can move."""
    size: Mapped[int]
    received_at: Mapped[datetime]
    calling_ae: Mapped[str] = mapped_column(String(16))

    series: Mapped[Series] = relationship(back_populates="instances")


class StudyEvent(Base):
    """One line of a study's history: every state change, with its reason."""

    __tablename__ = "study_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    at: Mapped[datetime]
    from_state: Mapped[str | None] = mapped_column(String(16))
    to_state: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str]
    model: Mapped[str | None] = mapped_column(String(64))
    """The model whose task changed; None for the study's own state."""

    study: Mapped[Study] = relationship(back_populates="events")


class Task(Base):
    """One model's work on one study: its own state, lease, attempts, result and deliveries."""

    __tablename__ = "tasks"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"))
    model: Mapped[str] = mapped_column(String(64))
    """The ``[[models]]`` entry's name ("default" for the route ``[inference] model`` makes)."""
    state: Mapped[TaskState] = mapped_column(_StateColumn(TaskState))
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    lease_expires_at: Mapped[datetime | None]
    processing_attempts: Mapped[int] = mapped_column(default=0)
    """Interrupted runs since the task was last queued afresh; bounds crash loops."""
    queued_at: Mapped[datetime]
    """When the task last became queued: among equals, the longest waiting goes first."""
    updated_at: Mapped[datetime]

    study: Mapped[Study] = relationship(back_populates="tasks")

    __table_args__ = (
        UniqueConstraint("study_id", "model"),
        Index("ix_tasks_state_queued", "state", "queued_at"),
    )


class ModelPause(Base):
    """A model an administrator paused: it takes no new tasks until resumed (survives restarts)."""

    __tablename__ = "model_pauses"

    model: Mapped[str] = mapped_column(String(64), primary_key=True)
    paused_at: Mapped[datetime]
    reason: Mapped[str]


class ResultRecord(Base):
    """What a task's model found in its study (or why it could not read it), and where its report is.

    (``inference.outcomes.StudyResult`` is what the pipeline returns; this is its row.)
    """

    __tablename__ = "task_results"

    id: Mapped[int] = mapped_column(primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"), unique=True)
    applicable: Mapped[bool]
    reason: Mapped[str | None]
    finding: Mapped[bool | None]
    probability: Mapped[float | None]
    threshold: Mapped[float | None]
    model: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(64))
    series_uid: Mapped[str | None] = mapped_column(String(64))
    key_instance_uid: Mapped[str | None] = mapped_column(String(64))
    slices: Mapped[int | None]
    timings_ms: Mapped[str]
    """JSON object: stage -> milliseconds."""
    sr_path: Mapped[str | None]
    """Relative to data_dir."""
    sr_sop_instance_uid: Mapped[str | None] = mapped_column(String(64))
    sr_sop_class_uid: Mapped[str | None] = mapped_column(String(64))
    """The primary report's SOP Class UID; None for results recorded before schema 4 (a Comprehensive (3D) SR)."""
    created_at: Mapped[datetime]
    details: Mapped[str | None]
    """JSON ``{"lesions": [...], "skipped": [...], "segments": [...]}`` of a detection or segmentation model; None
    when it has none of them (a classifier)."""
    extra_objects: Mapped[str | None]
    """JSON list of ``{path, sop_instance_uid, sop_class_uid}``: the task's report objects besides ``sr_path``
    (a Mammography CAD SR next to a TID 1500 SR, a SEG), sent after it on the same association; None when none."""


class Delivery(Base):
    """One task's report on its way to one destination; the retry schedule lives here, so a restart keeps it."""

    __tablename__ = "task_deliveries"

    id: Mapped[int] = mapped_column(primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    state: Mapped[DeliveryState] = mapped_column(_StateColumn(DeliveryState))
    attempts: Mapped[int] = mapped_column(default=0)
    next_attempt_at: Mapped[datetime]
    last_error: Mapped[str | None]
    sent_at: Mapped[datetime | None]

    __table_args__ = (
        UniqueConstraint("task_id", "destination"),
        Index("ix_task_deliveries_state_next", "state", "next_attempt_at"),
    )


class ReceiverHeartbeat(Base):
    """The running receiver announces itself here, so ``status`` needs no pid file.

    One row per node (id 1). A row whose process is gone or whose heartbeat is
    stale means the receiver is down, so a crash leaves nothing to clean up.
    """

    __tablename__ = "receiver_heartbeat"

    id: Mapped[int] = mapped_column(primary_key=True)
    pid: Mapped[int]
    hostname: Mapped[str] = mapped_column(String(255))
    ae_title: Mapped[str] = mapped_column(String(16))
    port: Mapped[int]
    started_at: Mapped[datetime]
    heartbeat_at: Mapped[datetime]
    stopped_at: Mapped[datetime | None]


class SchemaVersion(Base):
    """Migrations applied to this database (see :mod:`storage.migrations`)."""

    __tablename__ = "schema_version"

    version: Mapped[int] = mapped_column(primary_key=True)
    description: Mapped[str]
    applied_at: Mapped[datetime]
