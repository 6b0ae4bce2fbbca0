"""The spool file an incoming dataset streams into, and the guard that keeps it from filling the disk.

pynetdicom (with ``STORE_RECV_CHUNKED_DATASET``) writes each C-STORE data
set, fragment by fragment, into a temporary file as the P-DATA PDUs arrive,
and calls the C-STORE handler only once the last fragment is in. Checking
free space in the handler is therefore too late for an instance larger than
the disk: the write fails inside pynetdicom's receive thread, the peer gets
an A-ABORT instead of a status, and the partial file stays behind.

:class:`SpoolFile` stands in for the ``NamedTemporaryFile`` pynetdicom
opens. Before each fragment it checks that writing it keeps at least
``min_free_bytes`` free (each fragment's length is known from its PDU), and
it turns a failing write (ENOSPC, EDQUOT, EFBIG, EIO) into a refusal
instead of an exception. A refused spool file deletes what it had written
at once and swallows the rest of the data set, so the association stays
intact and the handler answers the peer with 0xA700 and the reason.
"""

from __future__ import annotations

import errno
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from triagenode.daemon.pynetdicom_internals import data_set_file_of, stream_data_sets_into

log = logging.getLogger("triagenode.receiver")

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class SpoolFile:
    """One incoming data set on its way to disk, under a unique name in the spool.

    It offers what pynetdicom uses of a ``NamedTemporaryFile``: ``name``,
    ``write``, ``file.flush`` and ``close``. Writes are unbuffered, so a full
    disk shows at the write of the fragment that does not fit, not at a later
    flush.
    """

    def __init__(self, directory: Path, min_free_bytes: int, free_bytes: Callable[[], int]) -> None:
        fd, name = tempfile.mkstemp(suffix=".dcm", dir=directory)
        self.name = name
        self._handle = os.fdopen(fd, "wb", buffering=0)
        self._min_free_bytes = min_free_bytes
        self._free_bytes = free_bytes
        self.written = 0
        self.refused: str | None = None
        """Why the data set is not being kept (the Error Comment of the 0xA700 answer), or None."""

    @property
    def file(self) -> SpoolFile:
        """pynetdicom calls ``file.flush()`` after each fragment; writes are unbuffered, so this is the file."""
        return self

    def flush(self) -> None:
        """Nothing to flush: every write went to the kernel already."""

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Write one fragment, or refuse the data set when the disk cannot take it."""
        length = len(data)
        if self.refused is not None:
            return length
        if self._free_bytes() - length < self._min_free_bytes:
            self._refuse(
                f"free disk would fall below min_free_disk_mb after {self.written} bytes; free space on the node"
            )
            return length
        try:
            self._handle.write(data)
        except OSError as exc:
            if exc.errno in _DISK_FULL:
                self._refuse("disk full while receiving; free space on the node")
            else:
                log.error("spool.write_failed errno=%s", errno.errorcode.get(exc.errno or 0, exc.errno))
                self._refuse("cannot write the instance; see the node's log")
            return length
        self.written += length
        return length

    def close(self) -> None:
        if not self._handle.closed:
            self._handle.close()

    def _refuse(self, reason: str) -> None:
        """Stop keeping this data set: free its space now, swallow what is still to come."""
        self.refused = reason
        self.close()
        try:
            os.unlink(self.name)
        except FileNotFoundError:
            pass
        log.warning("spool.refused bytes_received=%d reason=%r", self.written, reason)


def install_spool(directory: Path, min_free_bytes: int, free_bytes: Callable[[], int]) -> None:
    """Make pynetdicom stream every incoming C-STORE data set into a guarded :class:`SpoolFile`."""
    stream_data_sets_into(lambda: SpoolFile(directory, min_free_bytes, free_bytes))


def refusal_of(request: Any) -> str | None:
    """Why the spool refused a C-STORE request's data set, or None when it was kept whole."""
    spool = data_set_file_of(request)
    return spool.refused if isinstance(spool, SpoolFile) else None
