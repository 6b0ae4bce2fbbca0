"""The running receiver's announcement, read by ``triagenode status``.

The daemon writes one row when it starts listening and refreshes it every
few seconds. On the node's own host the CLI calls the receiver running when
its process exists and holds the data directory's lock (the kernel drops the
lock with the process), so a heartbeat that waits on a busy database (up to
the 30 s busy timeout) or cannot be written on a full disk does not make a
running node look dead; the heartbeat's age is shown beside it. Elsewhere,
or when the lock cannot be read, a fresh heartbeat is the sign of life. A
crash leaves a stale row, never a lock to delete by hand.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import Engine, select

from triagenode.storage.engine import BUSY_TIMEOUT_MS, reader, writer
from triagenode.storage.filestore import lock_is_held
from triagenode.storage.models import ReceiverHeartbeat
from triagenode.storage.timeutil import utcnow

HEARTBEAT_INTERVAL_S = 5
STALE_AFTER_S = BUSY_TIMEOUT_MS / 1000 + 3 * HEARTBEAT_INTERVAL_S
"""A beat may wait out the database's busy timeout; only three beats missed beyond that mean trouble."""
_ROW = 1


@dataclass(frozen=True)
class ReceiverState:
    running: bool
    pid: int | None
    ae_title: str | None
    port: int | None
    started_at: datetime | None
    heartbeat_at: datetime | None

    def uptime_s(self, now: datetime) -> float | None:
        return (now - self.started_at).total_seconds() if self.running and self.started_at else None


class Heartbeat:
    def __init__(self, engine: Engine) -> None:
        self._write = writer(engine)
        self._read = reader(engine)
        database = engine.url.database
        self._data_dir = Path(database).parent if database else None

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

    def state(self, now: datetime | None = None) -> ReceiverState:
        now = now or utcnow()
        with self._read() as session:
            row = session.scalar(select(ReceiverHeartbeat).where(ReceiverHeartbeat.id == _ROW))
        if row is None:
            return ReceiverState(False, None, None, None, None, None)
        fresh = now - row.heartbeat_at < timedelta(seconds=STALE_AFTER_S)
        if row.hostname != socket.gethostname():
            alive = fresh
        else:
            held = lock_is_held(self._data_dir) if self._data_dir is not None else None
            alive = _process_exists(row.pid) and (held if held is not None else fresh)
        running = row.stopped_at is None and alive
        return ReceiverState(running, row.pid, row.ae_title, row.port, row.started_at, row.heartbeat_at)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process (the service user): it exists
        return True
    return True
