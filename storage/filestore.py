"""Where received instances live on disk, and how they get there durably.

Layout under ``data_dir``::

    spool/                      incoming datasets while they stream in (same filesystem)
    studies/<study>/<series>/<sop>.dcm

A path is only ever built from UIDs that passed :func:`is_valid_uid` (digits
and dots, at most 64 characters), so nothing a peer sends can name a file
outside the store. An instance is durable when :meth:`FileStore.place`
returns after :meth:`FileStore.make_durable`: the file's data is fsync'd, it
is renamed into place, and the directories that changed are fsync'd. Nothing
here deletes a file at its final path: a file another handler answered
Success for is never removed by a failure path.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import time
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


LOCK_FILE = "triagenode.lock"
"""In ``data_dir``: flock'd by the running node, holding its pid."""


def lock_is_held(data_dir: Path) -> bool | None:
    """Whether a process holds ``data_dir``'s lock (a node runs on it); None when that cannot be told.

    The kernel drops the lock when its process ends however it ends, so
    unlike a heartbeat this answer does not go stale while the node waits on
    a busy database or a full disk.
    """
    try:
        fd = os.open(data_dir / LOCK_FILE, os.O_RDONLY)
    except FileNotFoundError:
        return False
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return None
    finally:
        os.close(fd)  # closing drops a lock this check took
    return False


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
        fd = os.open(self.data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o640)
        try:
            # `triagenode status` takes a shared lock for an instant to see whether a
            # node runs: a few tries over half a second tell that from a real holder.
            for _ in range(10):
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    time.sleep(0.05)
            else:
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
        self.make_durable(source)
        self.make_room(relative)
        return self.place(source, relative)

    @staticmethod
    def make_durable(source: Path) -> None:
        """fsync a file's data while it still has its own (unique) name.

        The receiver does this before it records the instance, and renames
        only after the row has committed: until then the file belongs to the
        one handler that wrote it, and no other handler can see, replace or
        lose it.
        """
        with open(source, "rb+") as handle:
            os.fsync(handle.fileno())

    def make_room(self, relative: Path) -> None:
        """Create (durably) the directories a file at ``relative`` needs.

        The receiver calls this before it records an instance, so that what
        can fail about the store's layout fails while nothing is recorded;
        the rename after the row is then all that is left.
        """
        created = self._make_parents((self.data_dir / relative).parent)
        for directory in created:
            fsync_directory(directory.parent)

    def place(self, source: Path, relative: Path) -> Path:
        """Rename a durable file to its place (made by :meth:`make_room`) and make the rename durable."""
        target = self.data_dir / relative
        os.replace(source, target)
        fsync_directory(target.parent)
        return target

    def holds(self, relative: Path | str) -> bool:
        """Whether the store really has a file at ``relative`` (a row alone does not make a stored instance)."""
        return (self.data_dir / relative).is_file()

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

