"""Opening the node's database: the daemon creates and upgrades it, the CLI only opens it."""

from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy import Engine

from triagenode.storage.engine import make_engine
from triagenode.storage.filestore import DIRECTORY_MODE, FILE_MODE
from triagenode.storage.migrations import upgrade
from triagenode.storage.snapshot import DatabaseUnavailableError, check_schema

__all__ = ["DatabaseUnavailableError", "open_for_cli", "open_for_daemon"]


def open_for_daemon(path: Path) -> Engine:
    """Create the database if needed and apply every pending migration; its files are made 0640."""
    path.parent.mkdir(mode=DIRECTORY_MODE, parents=True, exist_ok=True)
    engine = make_engine(path)
    upgrade(engine)
    for name in (path.name, f"{path.name}-wal", f"{path.name}-shm"):
        if (path.parent / name).exists() and (path.parent / name).stat().st_uid == os.getuid():
            os.chmod(path.parent / name, FILE_MODE)
    return engine


def open_for_cli(path: Path) -> Engine:
    """Open an existing, up-to-date database; never create one (see :func:`~triagenode.storage.snapshot.check_schema`).

    Raises :class:`~triagenode.storage.snapshot.DatabaseUnavailableError` with what to do.
    """
    check_schema(path)
    return make_engine(path)
