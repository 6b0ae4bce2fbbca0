"""Log lines an administrator reads in journald: ``event key=value ...``, no patient identifiers.

Under systemd (``JOURNAL_STREAM`` set) each line starts with the syslog
priority prefix (``<6>``) so ``journalctl -p warning`` filters by level, and
carries no timestamp (journald adds its own). Elsewhere lines get a time.
Studies are named by Study Instance UID only; nothing logs patient name, ID,
birth date or accession number. pynetdicom is kept at WARNING, because its
INFO and DEBUG output can echo identifiers; highdicom too, because it
writes seven INFO lines per report.

Whatever a peer sends (AE titles, UIDs, descriptions) can reach a message,
so every message is escaped before it is written: a control character, a
line break or a NUL byte becomes a visible escape (``\n``, ``\x00``), one
event stays one line, a peer cannot forge a line, and ``grep`` never takes
the log for a binary file. Tracebacks, which the node itself writes, keep
their lines.
"""

from __future__ import annotations

import logging
import os
import re
import sys

_PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}


_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def escape_unprintable(text: str) -> str:
    """``text`` with every control character written as an escape, so that it stays on one line."""
    return _UNPRINTABLE.sub(lambda match: match.group().encode("unicode_escape").decode("ascii"), text)


class _EscapingFormatter(logging.Formatter):
    """Formats the message with its control characters escaped; the traceback, if any, as it is."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # logging names it so
        record.message = escape_unprintable(record.message)
        return super().formatMessage(record)


class _JournalFormatter(_EscapingFormatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        priority = _PRIORITY.get(record.levelno, 6)
        return "\n".join(f"<{priority}>{part}" for part in line.splitlines())


def configure_logging(level: str = "INFO") -> None:
    """Send the node's log lines to stderr, shaped for journald when under systemd."""
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(_JournalFormatter("%(name)s %(message)s"))
    else:
        handler.setFormatter(_EscapingFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    logging.getLogger("highdicom").setLevel(logging.WARNING)
