"""Cross-process wake-ups: one Unix datagram socket per waiting reader, a datagram per commit.

A waiter binds its socket *before* it first reads, so a commit after that read always leaves
a datagram behind and the wait returns at once. Signals are only a shortcut: waiters also
poll `PRAGMA data_version` slowly, so a lost datagram delays delivery and never loses it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import secrets
import socket
import time
from pathlib import Path

log = logging.getLogger("eventlog")

# sockaddr_un holds 108 bytes; deep temp folders can exceed it, so those waiters only poll.
_MAX_SOCKET_PATH = 100


class WakeListener:
    """A bound datagram socket in the wake folder; readable when someone committed."""

    def __init__(self, folder: Path) -> None:
        self.path: Path | None = folder / f"{os.getpid()}-{secrets.token_hex(4)}.sock"
        self.sock: socket.socket | None = None
        if len(os.fsencode(self.path)) > _MAX_SOCKET_PATH:
            log.warning("wake folder path too long for a Unix socket; polling only: %s", folder)
            self.path = None
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        # Bound under a name senders ignore, made owner-only, then renamed into view: no one
        # ever sees the socket with the umask's wider mode.
        hidden = self.path.with_suffix(".new")
        try:
            sock.bind(os.fspath(hidden))
            os.chmod(hidden, 0o600)
            os.rename(hidden, self.path)
        except OSError:
            sock.close()
            hidden.unlink(missing_ok=True)
            raise
        sock.setblocking(False)
        self.sock = sock

    def fileno(self) -> int:
        return self.sock.fileno() if self.sock is not None else -1

    def drain(self) -> bool:
        """Consume queued datagrams; True if there was any."""
        if self.sock is None:
            return False
        got = False
        while True:
            try:
                self.sock.recv(64)
                got = True
            except (BlockingIOError, InterruptedError):
                return got
            except OSError:
                return got

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None


class WakeSender:
    """Sends one datagram to every waiter after a commit; cheap when nobody waits."""

    # The folder's mtime is read after every commit, with fstat on an open descriptor (no
    # path walk); it is opened again this often, in case the folder was replaced.
    REOPEN_S = 1.0

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setblocking(False)
        self._listing_mtime = -1
        self._targets: list[str] = []
        self._folder_fd = -1
        self._opened_at = -math.inf

    def _folder_mtime(self) -> int | None:
        now = time.monotonic()
        if now - self._opened_at > self.REOPEN_S:
            self._close_folder()
            self._opened_at = now
            try:
                self._folder_fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError:
                return None
        if self._folder_fd < 0:
            return None
        return os.fstat(self._folder_fd).st_mtime_ns

    def _close_folder(self) -> None:
        if self._folder_fd >= 0:
            os.close(self._folder_fd)
            self._folder_fd = -1

    def _refresh(self) -> None:
        mtime = self._folder_mtime()
        if mtime is None:
            self._targets = []
            return
        if mtime != self._listing_mtime:
            self._listing_mtime = mtime
            try:
                names = os.listdir(self.folder)
            except FileNotFoundError:
                names = []
            self._targets = [os.fspath(self.folder / n) for n in names if n.endswith(".sock")]

    def notify(self) -> None:
        self._refresh()
        for target in self._targets:
            try:
                self._sock.sendto(b"!", target)
            except (BlockingIOError, InterruptedError):
                pass  # the waiter's queue is full: it has a wake-up pending already
            except ConnectionRefusedError:
                # Nobody bound there: its waiter died without cleaning up. Names are never
                # reused, so removing it cannot hurt a live waiter.
                with contextlib.suppress(OSError):
                    os.unlink(target)
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.EPERM, errno.EACCES):
                    log.debug("wake-up to %s failed: %s", target, exc)

    def close(self) -> None:
        self._sock.close()
        self._close_folder()
