"""Log lines an administrator reads in journald: ``event key=value ...``, no patient identifiers.

Under systemd (``JOURNAL_STREAM`` set) each line starts with the syslog
priority prefix (``<6>``) so ``journalctl -p warning`` filters by level, and
carries no timestamp (journald adds its own). Elsewhere lines get a time.
Studies are named by Study Instance UID only; nothing logs patient name, ID,
birth date or accession number. pynetdicom is kept at WARNING, because its
INFO and DEBUG output can echo identifiers.
"""

from __future__ import annotations

import logging
import os
import sys

_PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}


class _JournalFormatter(logging.Formatter):
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
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
