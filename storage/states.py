"""The states of a study, of a task (one model's work on a study) and of a delivery: plain enums, no SQLAlchemy.

Their own module so that what only names a state (the CLI's ``--state``
choices, scripts) does not pay for importing the database layer;
:mod:`triagenode.storage.models` stores them.
"""

from __future__ import annotations

import enum


class StudyState(enum.StrEnum):
    """Where a study is in its life on the node."""

    RECEIVING = "receiving"
    """Instances are arriving; the stability clock runs."""
    QUEUED = "queued"
    """Complete (no instance for ``stable_seconds``), waiting for a worker."""
    PROCESSING = "processing"
    """Held by a worker under a lease."""
    REPORTED = "reported"
    """Its results exist and their reports are on their way to every destination; or no model applies
    (the routing reasons say why), and nothing more will happen."""
    SENT = "sent"
    """Every destination has every report."""
    FAILED = "failed"
    """Gave up, with the reason in the event history; ``queue retry`` re-queues it."""
    CANCELLED = "cancelled"
    """An administrator stopped it; ``queue retry`` re-queues it."""
    PURGING = "purging"
    """Its files and rows are being removed (``[storage] keep_days``, ``queue purge``); while it is, nothing is
    recorded for it (a C-STORE is refused as transient), so a PACS re-sending it waits for the purge to end and
    then makes a new study. A purge cut short leaves it here, and the next one finishes it."""


FINAL_STUDY_STATES = frozenset({StudyState.REPORTED, StudyState.SENT, StudyState.FAILED, StudyState.CANCELLED})
"""The study states a purge may start from; a study in one of them is still in work while a task of it is queued or
processing, or a report of it is on its way (see :mod:`triagenode.storage.retention`)."""


class TaskState(enum.StrEnum):
    """Where one model's work on one study is. A study's own state summarises its tasks."""

    QUEUED = "queued"
    """Waiting for a worker that serves its model (and for the study to be complete)."""
    PROCESSING = "processing"
    """Held by a worker under a lease."""
    REPORTED = "reported"
    """The model's result exists; its report is waiting to reach every destination."""
    SENT = "sent"
    """Every destination of this model has its report."""
    FAILED = "failed"
    """Gave up (interrupted runs, or a report not delivered); ``queue retry`` tries again."""
    CANCELLED = "cancelled"
    """An administrator stopped it, or the study's route no longer leads to this model."""


class DeliveryState(enum.StrEnum):
    """Where one report is on its way to one destination."""

    PENDING = "pending"
    """Waiting for its next attempt (``next_attempt_at``)."""
    SENT = "sent"
    """The destination answered Success."""
    FAILED = "failed"
    """Gave up after ``max_attempts``; ``queue retry`` or ``queue resend`` sends again."""
