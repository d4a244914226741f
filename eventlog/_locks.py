"""flock on dedicated lock files in the sidecar folder, and the writers' queue in front of one.

Never on the database, -wal or -shm files: closing any descriptor of a file drops every POSIX
lock the process holds on it, SQLite's included. flock belongs to the open file description,
so closing another descriptor of the same lock file elsewhere in the process changes nothing,
and the kernel drops it the instant its holder dies. The queue's byte locks are OFD locks
(Linux), which belong to the open file description in the same way.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import mmap
import os
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

log = logging.getLogger("eventlog")


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
        try:
            got.wait(timeout)
        except BaseException:
            # Interrupted (Ctrl-C): the helper must not keep the lock for the process's life.
            with mutex:
                abandoned = True
                taken = got.is_set()
            if taken:
                fcntl.flock(waiter, fcntl.LOCK_UN)
                os.close(waiter)
            raise
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
            # Closing our copies releases nothing, and lets the lock go if the parent dies.
            for fd in {self._fd, self._held_fd} - {None}:
                os.close(fd)  # type: ignore[arg-type]
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


# The queue file, shared by every writer: [0, 8) the next ticket, [8, 16) the ticket after the
# last one served, [16, 24) the WAL pages committed since the last checkpoint, [24, 48) the
# durable note: the database file (device, inode) and the newest offset a finished fsync
# covers. The OFD lock on byte 0 guards the next ticket, the one on byte 1 the durable note;
# ticket n's holder keeps an OFD lock on byte GATE0 + n from taking the ticket until it lets
# the lock go.
_NEXT, _SERVED, _PAGES, _GATE0 = 0, 8, 16, 64
_NOTE_GUARD, _NOTE_DEV, _NOTE_INO, _NOTE_OFFSET, _WAL_FAILED = 1, 24, 32, 40, 48
_FLOCK = struct.Struct("hhqqi4x")  # struct flock: type, whence, start, len, pid (0 for OFD)
_CONFLICT = (errno.EAGAIN, errno.EACCES)
QUEUE_PATIENCE = 0.05  # a queued writer stops keeping its turn after this (its turn-ahead stalled)
SPIN_FOR = 0.0005  # a queued writer looks without sleeping this long,
NEXT_IN_LINE_SPIN = 0.005  # and this long when next in line (an fsync or two at `full`),
NAP_MIN, NAP_MAX = 0.00005, 0.0005  # then sleeps between looks
GUARD_BACKOFF, GUARD_BACKOFF_MAX = 1.0, 60.0  # unordered after a stuck ticket guard, doubling


class QueuedLock(FileLock):
    """A FileLock whose contended acquires are served first come, first served.

    A released flock wakes its waiters, but on a busy machine the one woken is queued on a
    CPU behind the releaser, which takes the lock straight back on its next write: a waiter
    could lose for several scheduler ticks in a row. Here a writer that finds the lock taken,
    or others queued, takes a ticket and waits for the ticket ahead of its own to be done,
    yielding the CPU meanwhile, so the holder runs on and the releaser queues behind.
    The flock still does the excluding; the queue only orders. A queued process that dies
    leaves at once (the kernel drops its locks), and one that is stopped costs those behind it
    QUEUE_PATIENCE once, never exclusion. Without OFD locks (Linux only) it is a FileLock.
    """

    def __init__(self, path: Path, *, timeout: float | None = None) -> None:
        super().__init__(path, timeout=timeout)
        self._ticket: int | None = None
        self._own_pages = 0  # the page tally, where there is no queue file to share it in
        self._queue: int | None = None
        self._shared: mmap.mmap | None = None
        self._note_reader: int | None = None  # a second description: see durable_through
        self._unordered_until = 0.0  # monotonic time: a stuck guard keeps us out till then
        self._unordered_for = GUARD_BACKOFF
        if hasattr(fcntl, "F_OFD_SETLK"):
            try:
                self._open_queue(path.with_suffix(".queue"))
            except OSError as exc:
                log.warning("%s: writers will not queue (%s)", path, exc)
            except BaseException:
                super().close()
                raise

    def _open_queue(self, path: Path) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            # Real blocks, not a hole: a store into a mapped hole on a full disk is SIGBUS.
            # fallocate never changes bytes already there (another writer's tickets).
            os.posix_fallocate(fd, 0, _GATE0)
            _ofd_taken(fd, 0)  # some file systems refuse OFD locks: then no queue
            self._shared = mmap.mmap(fd, _GATE0)
        except BaseException:
            os.close(fd)
            raise
        self._queue = fd

    def acquire(self, *, blocking: bool = True, timeout: float | None = None) -> bool:
        if self._queue is None:
            return super().acquire(blocking=blocking, timeout=timeout)
        if self._nobody_queued() and super().acquire(blocking=False):
            return True
        if not blocking:
            return False
        timeout = self.timeout if timeout is None else timeout
        now = time.monotonic()
        deadline = None if timeout is None else now + timeout
        ticket = None
        try:
            if now >= self._unordered_until:
                ticket = self._take_ticket()
            if ticket is not None:
                self._wait_for_turn_ahead(ticket, deadline)
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            got = super().acquire(timeout=left)
        except BaseException:
            self._leave_queue(ticket, served=False)
            raise
        if not got:
            self._leave_queue(ticket, served=False)
            return False
        self._ticket = ticket
        return True

    def release(self) -> None:
        super().release()
        ticket, self._ticket = self._ticket, None
        self._leave_queue(ticket, served=True)

    def close(self) -> None:
        super().close()  # in the parent this releases (release() above: the gate too)
        if self._queue is not None:
            # In a child of fork() the gate, like the flock, is the parent's: closing our copy
            # of the descriptor releases neither.
            assert self._shared is not None
            self._shared.close()
            os.close(self._queue)
            if self._note_reader is not None:
                os.close(self._note_reader)
            self._ticket = self._queue = self._shared = self._note_reader = None

    def note_durable(self, file_id: tuple[int, int], offset: int) -> None:
        """Note for every reader that the events of database `file_id` up to `offset` are on
        disk. Skipped when another writer is noting at that instant: a later note covers it,
        and without one a reader fsyncs for itself."""
        fd, shared = self._queue, self._shared
        if fd is None or shared is None or not _ofd_lock(fd, _NOTE_GUARD, fcntl.F_WRLCK):
            return
        try:
            _name_the_file(shared, file_id)
            if offset > _read(shared, _NOTE_OFFSET):
                struct.pack_into("q", shared, _NOTE_OFFSET, offset)
        finally:
            _ofd_lock(fd, _NOTE_GUARD, fcntl.F_UNLCK)

    @contextlib.contextmanager
    def _note_guarded(self) -> Iterator[tuple[mmap.mmap | None, bool]]:
        """The shared page (None without a queue), and whether the note's guard is held. A
        note is held for microseconds and a dead holder's lock goes with it, but one stopped
        in it must not hang the others: after QUEUE_PATIENCE the page comes unguarded."""
        fd, shared = self._queue, self._shared
        if fd is None or shared is None:
            yield None, False
            return
        if not _wait_for(lambda: _ofd_lock(fd, _NOTE_GUARD, fcntl.F_WRLCK), QUEUE_PATIENCE):
            log.warning("%s: the writers' note stayed guarded; going on without", self.path)
            yield shared, False
            return
        try:
            yield shared, True
        finally:
            _ofd_lock(fd, _NOTE_GUARD, fcntl.F_UNLCK)

    def drop_note_beyond(self, file_id: tuple[int, int], head: int) -> None:
        """Forget the note if it claims more of database `file_id` than the `head` offset it
        holds: then it was written for an earlier file that had the same inode number (the
        database deleted and created again, the queue file kept), and says nothing of this one.
        A failed fsync stays marked: the head was read before the guard was taken, and a stale
        mark costs one checkpoint, a lost one an acknowledged event."""
        with self._note_guarded() as (shared, _guarded):
            if shared is None or not _names(shared, file_id):
                return
            if _read(shared, _NOTE_OFFSET) > head:
                # Unguarded too: a note that claims less is always safe.
                struct.pack_into("q", shared, _NOTE_OFFSET, 0)

    def mark_wal_failed(self, file_id: tuple[int, int]) -> None:
        """Tell every process that an fsync of database `file_id`'s WAL failed: until a
        checkpoint has emptied the WAL into the database file, nothing committed since is
        known to be on disk (a later fsync that succeeds says nothing of the failed pages).
        The mark counts failures, so that a checkpoint clears only those it saw."""
        with self._note_guarded() as (shared, _guarded):
            if shared is not None:  # unguarded too: a mark must not be lost
                _name_the_file(shared, file_id)
                struct.pack_into("q", shared, _WAL_FAILED, _read(shared, _WAL_FAILED) + 1)

    def wal_failures(self, file_id: tuple[int, int]) -> int:
        """How many failed fsyncs of database `file_id`'s WAL are marked and not yet cleared by
        a checkpoint (0: none). Unguarded: the count is one word, and the name of its file
        changes only with the file."""
        shared = self._shared
        if shared is None or not _names(shared, file_id):
            return 0
        return _read(shared, _WAL_FAILED)

    def clear_wal_failed(self, file_id: tuple[int, int], seen: int) -> None:
        """Clear the failures a checkpoint started after: `seen` is the count read before it
        began (a failure marked meanwhile stays)."""
        with self._note_guarded() as (shared, guarded):
            if not guarded or shared is None or not _names(shared, file_id):
                return  # unguarded, a mark made meanwhile could be lost: the next one clears
            if _read(shared, _WAL_FAILED) == seen:
                struct.pack_into("q", shared, _WAL_FAILED, 0)

    def durable_through(self, file_id: tuple[int, int]) -> int:
        """The newest offset of database `file_id` that writers have noted on disk; 0 when
        unknown (no note for that file, or a writer noting at that instant)."""
        shared = self._shared
        if shared is None:
            return 0
        if self._note_reader is None:
            # Not the writers' description: a read lock taken on it would turn a write lock
            # that another thread of this process holds on it into a read lock.
            assert self._queue is not None
            try:
                self._note_reader = os.open(
                    f"/proc/self/fd/{self._queue}", os.O_RDONLY | os.O_CLOEXEC
                )
            except OSError:
                return 0
        if not _ofd_lock(self._note_reader, _NOTE_GUARD, fcntl.F_RDLCK):
            return 0
        try:
            if not _names(shared, file_id):
                return 0
            return _read(shared, _NOTE_OFFSET)
        finally:
            _ofd_lock(self._note_reader, _NOTE_GUARD, fcntl.F_UNLCK)

    def tally_pages(self, pages: int, limit: int) -> bool:
        """Add a commit's WAL pages to the tally all writers keep; True, with the tally started
        over, when it reaches `limit`. The WAL holds every writer's commits: counted apart,
        four writers each saw a quarter of it, and SQLite's backstop checkpoint (inside a
        commit, under the lock) ran before any of theirs."""
        shared = self._shared
        # Unguarded: two writers adding at the same instant lose one commit's pages, which
        # only puts the checkpoint off by as much.
        total = pages + (self._own_pages if shared is None else _read(shared, _PAGES))
        due = total >= limit
        if due:
            total = 0
        if shared is None:
            self._own_pages = total
        else:
            struct.pack_into("q", shared, _PAGES, total)
        return due

    def _nobody_queued(self) -> bool:
        shared = self._shared
        assert shared is not None
        # Read without the guard: a stale answer costs one barge or one needless ticket.
        return _read(shared, _NEXT) == _read(shared, _SERVED)

    def _take_ticket(self) -> int | None:
        """The next ticket, its gate locked; None (go unordered) if the guard stays taken."""
        fd, shared = self._queue, self._shared
        assert fd is not None and shared is not None
        if not _wait_for(lambda: _ofd_lock(fd, 0, fcntl.F_WRLCK), QUEUE_PATIENCE):
            # Held for three system calls, so its holder is stopped: do without the queue
            # for a while, longer each time, rather than wait this long on every write.
            self._unordered_until = time.monotonic() + self._unordered_for
            self._unordered_for = min(2 * self._unordered_for, GUARD_BACKOFF_MAX)
            return None
        self._unordered_for = GUARD_BACKOFF
        try:
            ticket = _read(shared, _NEXT)
            if not _ofd_lock(fd, _GATE0 + ticket, fcntl.F_WRLCK):
                return None  # a fresh byte is never held; if it is, stay out of the queue
            try:
                struct.pack_into("q", shared, _NEXT, ticket + 1)
            except BaseException:
                _ofd_lock(fd, _GATE0 + ticket, fcntl.F_UNLCK)
                raise
        finally:
            _ofd_lock(fd, 0, fcntl.F_UNLCK)
        return ticket

    def _wait_for_turn_ahead(self, ticket: int, deadline: float | None) -> None:
        fd, shared = self._queue, self._shared
        assert fd is not None and shared is not None
        if ticket == 0:
            return
        patience = QUEUE_PATIENCE
        if deadline is not None:
            patience = min(patience, deadline - time.monotonic())

        def next_in_line() -> bool:
            return ticket - _read(shared, _SERVED) <= 1

        _wait_for(lambda: not _ofd_taken(fd, _GATE0 + ticket - 1), patience, next_in_line)

    def _leave_queue(self, ticket: int | None, *, served: bool) -> None:
        if ticket is None or self._queue is None:
            return
        if served:
            shared = self._shared
            assert shared is not None
            # max: one that had stopped keeping its turn may be let go of after later ones
            struct.pack_into("q", shared, _SERVED, max(ticket + 1, _read(shared, _SERVED)))
        _ofd_lock(self._queue, _GATE0 + ticket, fcntl.F_UNLCK)


def _wait_for(
    done: Callable[[], bool], patience: float, eager: Callable[[], bool] = lambda: False
) -> bool:
    """Look until done() or patience runs out. The first looks only yield the CPU (to the
    holder, if it shares ours) and look again at once, rather than sleep past the moment;
    so do those while eager() (next in line), up to NEXT_IN_LINE_SPIN; then naps."""
    started = time.monotonic()
    nap = NAP_MIN
    while not done():
        waited = time.monotonic() - started
        if waited > patience:
            return False
        if waited < SPIN_FOR or (waited < NEXT_IN_LINE_SPIN and eager()):
            os.sched_yield()
        else:
            time.sleep(nap)
            nap = min(2 * nap, NAP_MAX)
    return True


def _read(shared: mmap.mmap, at: int) -> int:
    return int(struct.unpack_from("q", shared, at)[0])


def _names(shared: mmap.mmap, file_id: tuple[int, int]) -> bool:
    """Whether the note and the failed-fsync flag in the page are about database `file_id`."""
    return (_read(shared, _NOTE_DEV), _read(shared, _NOTE_INO)) == file_id


def _name_the_file(shared: mmap.mmap, file_id: tuple[int, int]) -> None:
    """Make the page's note about `file_id` (the guard held). For another file (the old one
    was replaced) the offset and the flag are cleared first, so a writer killed half way
    leaves a note that claims nothing."""
    if not _names(shared, file_id):
        struct.pack_into("qq", shared, _NOTE_OFFSET, 0, 0)
        struct.pack_into("qq", shared, _NOTE_DEV, *file_id)


def _ofd_lock(fd: int, byte: int, kind: int) -> bool:
    """Lock (or unlock) one byte with an open-file-description lock; False if taken."""
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(kind, os.SEEK_SET, byte, 1, 0))
    except OSError as exc:
        if exc.errno in _CONFLICT:
            return False
        raise
    return True


def _ofd_taken(fd: int, byte: int) -> bool:
    """True while another open file description holds a lock on the byte."""
    reply = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, byte, 1, 0))
    return bool(_FLOCK.unpack(reply)[0] != fcntl.F_UNLCK)


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
