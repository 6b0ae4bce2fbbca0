"""The SQLite engine every process of the node shares the database through.

* WAL mode, so the CLI reads while the daemon writes.
* ``synchronous=FULL``: a commit is on disk before the receiver answers
  Success (in WAL mode NORMAL would lose the last commits on power loss).
* A busy timeout, and ``BEGIN IMMEDIATE`` for write transactions: writers
  queue for the lock at the start of a transaction instead of failing with
  "database is locked" when a read turns into a write halfway through.
  Read-only work uses :func:`reader` and a plain deferred ``BEGIN``.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from triagenode.storage.snapshot import BUSY_TIMEOUT_MS

_READ_ONLY = "triagenode_read_only"


def make_engine(database_path: Path) -> Engine:
    """An engine on ``database_path`` with the node's pragmas and locking."""
    engine = create_engine(
        f"sqlite:///{database_path}",
        # Autocommit at the driver level: SQLAlchemy's begin event below
        # decides how each transaction begins.
        connect_args={"isolation_level": None, "timeout": BUSY_TIMEOUT_MS / 1000, "check_same_thread": False},
        pool_size=16,
        max_overflow=16,
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: sqlite3.Connection, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        read_only = connection.get_execution_options().get(_READ_ONLY, False)
        connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

    return engine


def read_only(engine: Engine) -> Engine:
    """The same engine, beginning its transactions without the write lock."""
    return engine.execution_options(**{_READ_ONLY: True})


def writer(engine: Engine) -> sessionmaker[Session]:
    """Sessions whose transactions take the write lock when they begin."""
    return sessionmaker(engine, expire_on_commit=False)


def reader(engine: Engine) -> sessionmaker[Session]:
    """Sessions for reading only: they never block the receiver's writes."""
    return sessionmaker(read_only(engine), expire_on_commit=False)
