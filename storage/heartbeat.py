"""The running receiver's announcement, which ``triagenode status`` reads.

The daemon writes one row when it starts listening and refreshes it every
``HEARTBEAT_INTERVAL_S``; whether that row (with the data directory's lock)
means "running" is decided in :func:`triagenode.storage.snapshot.receiver_state`,
which the CLI reads without the ORM.
"""

from __future__ import annotations

import os
import socket
from datetime import datetime

from sqlalchemy import Engine

from triagenode.storage.engine import writer
from triagenode.storage.models import ReceiverHeartbeat
from triagenode.storage.timeutil import utcnow

_ROW = 1
"""The one heartbeat row of a node; ``storage/snapshot.py`` reads it by this id."""


class Heartbeat:
    """The receiver's side of its heartbeat row: announce at start, beat while running, mark the stop."""

    def __init__(self, engine: Engine) -> None:
        self._write = writer(engine)

    def announce(self, ae_title: str, port: int, now: datetime | None = None) -> None:
        now = now or utcnow()
        with self._write.begin() as session:
            session.merge(
                ReceiverHeartbeat(
                    id=_ROW,
                    pid=os.getpid(),
                    hostname=socket.gethostname(),
                    ae_title=ae_title,
                    port=port,
                    started_at=now,
                    heartbeat_at=now,
                    stopped_at=None,
                )
            )

    def beat(self, now: datetime | None = None) -> None:
        with self._write.begin() as session:
            row = session.get(ReceiverHeartbeat, _ROW)
            if row is not None and row.pid == os.getpid():
                row.heartbeat_at = now or utcnow()

    def stopped(self, now: datetime | None = None) -> None:
        with self._write.begin() as session:
            row = session.get(ReceiverHeartbeat, _ROW)
            if row is not None and row.pid == os.getpid():
                row.stopped_at = now or utcnow()
