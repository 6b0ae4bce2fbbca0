"""The node at a glance, read with the standard library's ``sqlite3``: what ``triagenode status`` shows.

A monitoring probe runs ``status`` every minute or so and waits for it; the
ORM's import alone (~0.3 s on a small server) would be most of that wait. So
this module reads the few numbers ``status`` needs with plain SQL on a
read-only connection, and the ORM stays the only writer. Whether the
receiver runs is decided here too (:func:`receiver_state`), for every
caller, from the heartbeat row the daemon writes
(:class:`triagenode.storage.heartbeat.Heartbeat`) and the data directory's
lock.

The tables and columns named below are the migrations' (``storage/migrations.py``);
``tests/test_queue.py`` checks this module against the ORM on a database the
queue filled, so a migration that renames one fails there.
"""

from __future__ import annotations

import os
import socket
import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from triagenode.storage.filestore import lock_is_held
from triagenode.storage.states import DeliveryState, StudyState
from triagenode.storage.timeutil import iso

SCHEMA_VERSION = 4
"""The schema version this code reads and writes; ``storage/migrations.py`` ends at it (checked at import there)."""
BUSY_TIMEOUT_MS = 30_000
"""How long a connection waits for another's write lock: the daemon's write bursts are short."""
HEARTBEAT_INTERVAL_S = 5
STALE_AFTER_S = BUSY_TIMEOUT_MS / 1000 + 3 * HEARTBEAT_INTERVAL_S
"""A beat may wait out the database's busy timeout; only three beats missed beyond that mean trouble."""


class DatabaseUnavailableError(RuntimeError):
    """The CLI cannot use the database; the text tells the administrator what to do."""


@dataclass(frozen=True)
class ReceiverState:
    """Whether the receiver runs, and how it announced itself."""

    running: bool
    pid: int | None
    ae_title: str | None
    port: int | None
    started_at: datetime | None
    heartbeat_at: datetime | None

    def uptime_s(self, now: datetime) -> float | None:
        return (now - self.started_at).total_seconds() if self.running and self.started_at else None


@dataclass(frozen=True)
class DestinationCounts:
    """Deliveries to one destination, by state."""

    destination: str
    pending: int = 0
    failed: int = 0
    sent: int = 0


@dataclass(frozen=True)
class WaitingStudy:
    """The ``queued`` study that has waited longest for a worker."""

    study_uid: str
    queued_at: datetime
    waiting_s: float

    def as_dict(self) -> dict[str, object]:
        return {"study_uid": self.study_uid, "queued_at": iso(self.queued_at), "waiting_s": round(self.waiting_s, 1)}


@dataclass(frozen=True)
class NodeSnapshot:
    """What ``status`` prints: the receiver, studies per state, the longest wait, deliveries per destination."""

    receiver: ReceiverState
    counts: dict[str, int]
    """Studies per state, every state present (0 when none), in the states' order."""
    oldest_waiting: WaitingStudy | None
    destinations: dict[str, DestinationCounts]
    tasks: dict[str, dict[str, int]]
    """Per model (the task's name): tasks per state, only the states it has."""
    paused: dict[str, datetime]
    """Paused models, with when each was paused."""


def check_schema(path: Path) -> None:
    """Raise :class:`DatabaseUnavailableError` unless ``path`` is a database at :data:`SCHEMA_VERSION`.

    Never creates one: a file made by whoever ran the CLI (often root) could
    not be written by the service user afterwards.
    """
    with _read_only(path):
        pass


def read_snapshot(database: Path, now: datetime) -> NodeSnapshot:
    """The node's state as ``status`` shows it, read in one transaction; ``now`` is naive UTC."""
    with _read_only(database) as connection:
        receiver = _receiver(connection, database.parent, now)
        by_state = dict(connection.execute("SELECT state, COUNT(*) FROM studies GROUP BY state").fetchall())
        oldest = connection.execute(
            "SELECT study_uid, updated_at FROM studies WHERE state = ? ORDER BY updated_at LIMIT 1",
            (StudyState.QUEUED.value,),
        ).fetchone()
        deliveries = connection.execute(
            "SELECT destination, state, COUNT(*) FROM task_deliveries GROUP BY destination, state"
        ).fetchall()
        tasks = connection.execute("SELECT model, state, COUNT(*) FROM tasks GROUP BY model, state").fetchall()
        paused = connection.execute("SELECT model, paused_at FROM model_pauses").fetchall()
    per_model: dict[str, dict[str, int]] = {}
    for model, state, count in tasks:
        per_model.setdefault(model, {})[state] = count
    per_destination: dict[str, dict[str, int]] = {}
    for name, state, count in deliveries:
        per_destination.setdefault(name, {})[state] = count
    waiting = None
    if oldest is not None:
        queued_at = _time(oldest[1])
        waiting = WaitingStudy(oldest[0], queued_at, (now - queued_at).total_seconds())
    return NodeSnapshot(
        receiver=receiver,
        counts={state.value: by_state.get(state.value, 0) for state in StudyState},
        oldest_waiting=waiting,
        destinations={
            name: DestinationCounts(
                name,
                counts.get(DeliveryState.PENDING.value, 0),
                counts.get(DeliveryState.FAILED.value, 0),
                counts.get(DeliveryState.SENT.value, 0),
            )
            for name, counts in per_destination.items()
        },
        tasks=per_model,
        paused={model: _time(at) for model, at in paused},
    )


def read_receiver_state(database: Path, now: datetime) -> ReceiverState:
    """Whether the receiver that uses ``database`` runs (see :func:`receiver_state`)."""
    with _read_only(database) as connection:
        return _receiver(connection, database.parent, now)


def receiver_state(
    row: tuple[int, str, str, int, str, str, str | None] | None, data_dir: Path | None, now: datetime
) -> ReceiverState:
    """The receiver's state from its heartbeat row (pid, hostname, AE title, port, started, beat, stopped).

    On the node's own host the receiver runs when its process exists and holds
    the data directory's lock (the kernel drops the lock with the process), so a
    heartbeat that waits on a busy database or cannot be written on a full disk
    does not make a running node look dead. Elsewhere, or when the lock cannot
    be read, a fresh heartbeat is the sign of life. A crash leaves a stale row,
    never a lock to delete by hand.
    """
    if row is None:
        return ReceiverState(False, None, None, None, None, None)
    pid, hostname, ae_title, port, started, beat, stopped = row
    heartbeat_at = _time(beat)
    fresh = now - heartbeat_at < timedelta(seconds=STALE_AFTER_S)
    if hostname != socket.gethostname():
        alive = fresh
    else:
        held = lock_is_held(data_dir) if data_dir is not None else None
        alive = _process_exists(pid) and (held if held is not None else fresh)
    return ReceiverState(stopped is None and alive, pid, ae_title, port, _time(started), heartbeat_at)


@contextmanager
def _read_only(path: Path) -> Iterator[sqlite3.Connection]:
    """A read-only connection inside one read transaction, on a database at :data:`SCHEMA_VERSION`."""
    if not path.is_file():
        raise DatabaseUnavailableError(
            f"no database at {path}: the node has not run with this data_dir yet; "
            "start it (`triagenode serve` or `systemctl start triagenode`) or check --config"
        )
    try:
        connection = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_MS / 1000)
    except sqlite3.Error as exc:
        raise DatabaseUnavailableError(f"cannot open the database {path}: {exc}; check its permissions") from exc
    with closing(connection):
        try:
            connection.execute("BEGIN")  # one snapshot of the WAL for every query below
            version = _schema_version(connection)
            if version != SCHEMA_VERSION:
                raise DatabaseUnavailableError(
                    f"the database {path} is at schema version {version}, this CLI expects {SCHEMA_VERSION}; "
                    "restart the node so that it upgrades the database, or use the CLI of the same version"
                )
            yield connection
        except sqlite3.DatabaseError as exc:
            raise DatabaseUnavailableError(
                f"cannot read the database {path}: {exc}; check its permissions, or restore it from a backup"
            ) from exc


def _schema_version(connection: sqlite3.Connection) -> int:
    """The schema version of the database (0 for an empty file)."""
    exists = connection.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'")
    if exists.fetchone() is None:
        return 0
    return int(connection.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()[0])


def _receiver(connection: sqlite3.Connection, data_dir: Path, now: datetime) -> ReceiverState:
    row = connection.execute(
        "SELECT pid, hostname, ae_title, port, started_at, heartbeat_at, stopped_at"
        " FROM receiver_heartbeat WHERE id = 1"
    ).fetchone()
    return receiver_state(row, data_dir, now)


def _time(value: str) -> datetime:
    """A DATETIME column as SQLAlchemy writes it on SQLite (``YYYY-MM-DD HH:MM:SS.ffffff``, naive UTC)."""
    return datetime.fromisoformat(value)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process (the service user): it exists
        return True
    return True
