"""Opening the node's database: the daemon creates and upgrades it, the CLI only opens it."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Engine

from triagenode.storage.engine import make_engine
from triagenode.storage.migrations import LATEST_VERSION, current_version, upgrade


class DatabaseUnavailableError(RuntimeError):
    """The CLI cannot use the database; the text tells the administrator what to do."""


def open_for_daemon(path: Path) -> Engine:
    """Create the database if needed and apply every pending migration."""
    path.parent.mkdir(parents=True, exist_ok=True)
    engine = make_engine(path)
    upgrade(engine)
    return engine


def open_for_cli(path: Path) -> Engine:
    """Open an existing, up-to-date database; never create one.

    Creating it here would leave a file owned by whoever ran the CLI (often
    root) that the service user could then not write.
    """
    if not path.is_file():
        raise DatabaseUnavailableError(
            f"no database at {path}: the node has not run with this data_dir yet; "
            "start it (`triagenode serve` or `systemctl start triagenode`) or check --config"
        )
    engine = make_engine(path)
    with engine.connect() as connection:
        version = current_version(connection)
    if version != LATEST_VERSION:
        engine.dispose()
        raise DatabaseUnavailableError(
            f"the database {path} is at schema version {version}, this CLI expects {LATEST_VERSION}; "
            "restart the node so that it upgrades the database, or use the CLI of the same version"
        )
    return engine
