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

Only the service user (and its group, for backups) may read what the node
keeps: directories are made 0750 and every file is made 0640 explicitly,
whatever the umask (``serve`` also sets the umask to 027, for what SQLite
creates). A ``data_dir`` that others can write is refused at start: anyone
could replace an instance or the queue under the node.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
import stat
import time
from pathlib import Path

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")

FILE_MODE = 0o640
"""Every file the node keeps: the service user reads and writes, its group reads, others nothing."""
DIRECTORY_MODE = 0o750
SERVICE_UMASK = 0o027
"""The umask ``serve`` runs with, so that what libraries create (SQLite's files) follows the same rule."""

log = logging.getLogger("triagenode.storage")


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


class UnsafeDataDirError(RuntimeError):
    """``data_dir`` can be written by users other than the service user and its group."""


class FileStore:
    """The instance files of one node, below ``data_dir``."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.spool_dir = data_dir / "spool"
        self.studies_dir = data_dir / "studies"

    def secure(self) -> None:
        """Create ``data_dir`` (0750), refuse one that others can write, tighten one the service user owns
        (group write and any access for others taken away).

        Called before anything is written there. A directory the service user
        does not own (root's, with the service's group) is left as it is when
        others cannot write it.
        """
        self.data_dir.mkdir(mode=DIRECTORY_MODE, parents=True, exist_ok=True)
        info = self.data_dir.stat()
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o002:
            raise UnsafeDataDirError(
                f"data_dir {self.data_dir} is writable by every user (mode {mode:04o}): anyone could replace "
                f"instances or the queue; `chmod 750 {self.data_dir}` and `chown` it to the service user"
            )
        tightened = mode & ~0o027  # only ever take bits away: 0700 stays, a setgid bit stays
        if info.st_uid == os.getuid() and tightened != mode:
            os.chmod(self.data_dir, tightened)
            log.info("data_dir.secured path=%s mode_was=%04o mode=%04o", self.data_dir, mode, tightened)

    def lock(self) -> int:
        """Hold ``data_dir`` for this process (an flock the kernel drops when it exits, however it exits).

        A second node on the same directory would empty the spool under the
        first one's transfers; this refuses it instead. Returns the descriptor
        to keep open.
        """
        self.data_dir.mkdir(mode=DIRECTORY_MODE, parents=True, exist_ok=True)
        fd = os.open(self.data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, FILE_MODE)
        os.fchmod(fd, FILE_MODE)
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
            directory.mkdir(mode=DIRECTORY_MODE, parents=True, exist_ok=True)
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
            os.fchmod(handle.fileno(), FILE_MODE)  # the spool's files are 0600, a library's follow the umask
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
        """mkdir -p, returning the directories it created (their parents need an fsync).

        A purge removes a study's folders once they are empty ([storage] keep_days,
        ``queue purge``); one that does so between the walk up and a mkdir here makes
        that mkdir fail, and the walk starts again.
        """
        created: list[Path] = []
        for attempt in range(3):
            missing: list[Path] = []
            current = directory
            while not current.exists():
                missing.append(current)
                current = current.parent
            try:
                for path in reversed(missing):
                    path.mkdir(mode=DIRECTORY_MODE, exist_ok=True)
                    created.append(path)
            except FileNotFoundError:
                if attempt == 2:
                    raise
                continue
            return created
        return created
