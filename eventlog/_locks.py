"""flock on dedicated lock files in the sidecar folder.

Never on the database, -wal or -shm files: closing any descriptor of a file drops every POSIX
lock the process holds on it, SQLite's included. flock belongs to the open file description,
so closing another descriptor of the same lock file elsewhere in the process changes nothing,
and the kernel drops it the instant its holder dies.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class FileLock:
    """An exclusive flock on one file, opened once and kept open until close()."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.held = False
        self._pid = os.getpid()

    def fileno(self) -> int:
        if self._fd is None:
            raise ValueError(f"lock {self.path} is closed")
        return self._fd

    def acquire(self, *, blocking: bool = True) -> bool:
        try:
            fcntl.flock(self.fileno(), fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            return False
        self.held = True
        return True

    def release(self) -> None:
        if self.held and self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        self.held = False

    def write_note(self, text: str) -> None:
        """Replace the file's content (a heartbeat others read without locking).

        Padded with spaces to the previous length instead of truncated, so a reader never
        sees a shortened file with the old note's tail: JSON ignores the trailing spaces.
        """
        data = text.encode("utf-8")
        fd = self.fileno()
        size = os.fstat(fd).st_size
        os.pwrite(fd, data.ljust(size), 0)

    def close(self) -> None:
        if self._fd is None:
            return
        if os.getpid() != self._pid:
            # A child of fork() shares the description: unlocking would free the parent's lock.
            self._fd = None
            return
        self.release()
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def is_locked(path: Path) -> bool:
    """True while some live process holds the file's flock (including this process)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        # Closing our own probe descriptor releases only the probe's lock: flock is per
        # open file description, so the owner's lock is untouched.
        os.close(fd)
    return False


def try_remove_stale(path: Path) -> bool:
    """Delete a lock file nobody holds, holding it while deleting so no one can be its owner.

    Only for files whose name is never reused (member files): a lane lock is never deleted.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False
    try:
        path.unlink(missing_ok=True)
    finally:
        os.close(fd)
    return True
