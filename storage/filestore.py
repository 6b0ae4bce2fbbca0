"""Where received instances live on disk, and how they get there durably.

Layout under ``data_dir``::

    spool/                      incoming datasets while they stream in (same filesystem)
    studies/<study>/<series>/<sop>.dcm

A path is only ever built from UIDs that passed :func:`is_valid_uid` (digits
and dots, at most 64 characters), so nothing a peer sends can name a file
outside the store. An instance is durable when :meth:`FileStore.commit_file`
returns: the file's data is fsync'd, it is renamed into place, and the
directories that changed are fsync'd.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
from pathlib import Path

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def is_valid_uid(uid: str | None) -> bool:
    """A DICOM UID as PS3.5 9.1 allows it: components of digits, dots between, <= 64 characters."""
    return bool(uid) and len(uid) <= 64 and _UID.match(uid) is not None  # type: ignore[arg-type]


class InvalidUIDError(ValueError):
    """A UID that must not be used in a path."""


def fsync_directory(path: Path) -> None:
    """Make a rename or a new entry in ``path`` survive a power loss."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DataDirInUseError(RuntimeError):
    """Another node process already serves this data directory."""


class FileStore:
    """The instance files of one node, below ``data_dir``."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.spool_dir = data_dir / "spool"
        self.studies_dir = data_dir / "studies"

    def lock(self) -> int:
        """Hold ``data_dir`` for this process (an flock the kernel drops when it exits, however it exits).

        A second node on the same directory would empty the spool under the
        first one's transfers; this refuses it instead. Returns the descriptor
        to keep open.
        """
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.data_dir / "triagenode.lock", os.O_RDWR | os.O_CREAT, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise DataDirInUseError(
                f"another node (pid {holder}) is running with data_dir {self.data_dir}; "
                "stop it first, or give this one its own data_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd

    def prepare(self) -> int:
        """Create the directories and empty the spool; returns how many leftovers it removed.

        Everything in the spool at start belongs to a transfer that was never
        answered with Success (the node stopped mid-dataset), so it can go.
        """
        for directory in (self.data_dir, self.spool_dir, self.studies_dir):
            directory.mkdir(parents=True, exist_ok=True)
        removed = 0
        for leftover in self.spool_dir.iterdir():
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
            removed += 1
        return removed

    def relative_path(self, study_uid: str, series_uid: str, sop_instance_uid: str) -> Path:
        for uid in (study_uid, series_uid, sop_instance_uid):
            if not is_valid_uid(uid):
                raise InvalidUIDError(f"UID {uid!r} is not digits and dots of at most 64 characters")
        return Path("studies") / study_uid / series_uid / f"{sop_instance_uid}.dcm"

    def free_bytes(self) -> int:
        stats = os.statvfs(self.data_dir)
        return stats.f_bavail * stats.f_frsize

    def commit_file(self, source: Path, relative: Path) -> Path:
        """Move a fully written file into the store durably; returns its absolute path.

        ``source`` must be on the same filesystem (the spool is), so the rename is atomic.
        """
        target = self.data_dir / relative
        with open(source, "rb+") as handle:
            os.fsync(handle.fileno())
        created = self._make_parents(target.parent)
        os.replace(source, target)
        fsync_directory(target.parent)
        for directory in created:
            fsync_directory(directory.parent)
        return target

    def _make_parents(self, directory: Path) -> list[Path]:
        """mkdir -p, returning the directories it created (their parents need an fsync)."""
        created: list[Path] = []
        current = directory
        while not current.exists():
            created.append(current)
            current = current.parent
        for path in reversed(created):
            path.mkdir(exist_ok=True)
        return created

    def discard(self, relative: Path) -> None:
        (self.data_dir / relative).unlink(missing_ok=True)
