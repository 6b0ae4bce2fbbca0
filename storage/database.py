"""Opening the node's database: the daemon creates and upgrades it, the CLI only opens it."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Engine

from triagenode.storage.engine import make_engine
from triagenode.storage.migrations import upgrade
from triagenode.storage.snapshot import DatabaseUnavailableError, check_schema

__all__ = ["DatabaseUnavailableError", "open_for_cli", "open_for_daemon"]


def open_for_daemon(path: Path) -> Engine:
    """Create the database if needed and apply every pending migration."""
    path.parent.mkdir(parents=True, exist_ok=True)
    engine = make_engine(path)
    upgrade(engine)
    return engine


def open_for_cli(path: Path) -> Engine:
    """Open an existing, up-to-date database; never create one (see :func:`~triagenode.storage.snapshot.check_schema`).

    Raises :class:`~triagenode.storage.snapshot.DatabaseUnavailableError` with what to do.
    """
    check_schema(path)
    return make_engine(path)
