"""Time as the database stores it: naive UTC, because SQLite has no time zone type."""

from __future__ import annotations

from datetime import UTC, datetime


def utcnow() -> datetime:
    """Now, in UTC, without tzinfo (the form every column holds)."""
    return datetime.now(UTC).replace(tzinfo=None)


def iso(value: datetime | None) -> str | None:
    """A stored time for people and scripts: ISO 8601 with a Z."""
    return None if value is None else value.isoformat(timespec="seconds") + "Z"
