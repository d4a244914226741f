"""flock on dedicated lock files in the sidecar folder.

Never on the database, -wal or -shm files: closing any descriptor of a file drops every POSIX
lock the process holds on it, SQLite's included. flock belongs to the open file description,
so closing another descriptor of the same lock file elsewhere in the process changes nothing,
and the kernel drops it the instant its holder dies.
"""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path


class FileLock:
    """An exclusive flock on one file, opened once and kept open until close().

    `timeout` bounds a blocking acquire (None: wait for ever). flock itself cannot time out,
    so a contended timed acquire waits in a helper thread on a second descriptor, which is
    abandoned (and unlocks as soon as it gets the lock) when the time is up. A stopped or
    hung holder thus delays us, and never hangs us.
    """

    def __init__(self, path: Path, *, timeout: float | None = None) -> None:
        self.path = path
        self.timeout = timeout
        self._fd: int | None = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._held_fd: int | None = None  # the descriptor holding the lock, when held
        self._pid = os.getpid()

    @property
    def held(self) -> bool:
        return self._held_fd is not None

    def fileno(self) -> int:
        if self._fd is None:
            raise ValueError(f"lock {self.path} is closed")
        return self._fd

    def acquire(self, *, blocking: bool = True, timeout: float | None = None) -> bool:
        """Take the lock; False if not blocking and taken, or taken past the timeout
        (the argument, else the lock's own)."""
        fd = self.fileno()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not blocking:
                return False
            timeout = self.timeout if timeout is None else timeout
            if timeout is None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            else:
                return self._acquire_within(timeout)
        self._held_fd = fd
        return True

    def _acquire_within(self, timeout: float) -> bool:
        # A second open file description of the same inode (even if the folder was removed
        # meanwhile): its flock competes with ours, and with everyone else's.
        try:
            waiter = os.open(f"/proc/self/fd/{self.fileno()}", os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            waiter = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        got = threading.Event()
        mutex = threading.Lock()
        abandoned = False

        def wait() -> None:
            try:
                fcntl.flock(waiter, fcntl.LOCK_EX)
            except OSError:
                os.close(waiter)
                return
            with mutex:
                if abandoned:
                    fcntl.flock(waiter, fcntl.LOCK_UN)
                    os.close(waiter)
                    return
                got.set()

        threading.Thread(target=wait, name="eventlog-flock", daemon=True).start()
        got.wait(timeout)
        with mutex:
            if not got.is_set():
                abandoned = True
                return False
        self._held_fd = waiter
        return True

    def release(self) -> None:
        held, self._held_fd = self._held_fd, None
        if held is not None:
            fcntl.flock(held, fcntl.LOCK_UN)
            if held != self._fd:
                os.close(held)

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
            self._fd = self._held_fd = None
            return
        self.release()
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> FileLock:
        if not self.acquire():
            raise TimeoutError(f"{self.path} stayed locked by another process for {self.timeout}s")
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
