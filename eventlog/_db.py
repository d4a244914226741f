"""The storage shell both APIs share: files beside the database, connections, the plan
driver, and the migration runner."""

from __future__ import annotations

import logging
import os
import sqlite3
import sys
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal, TypeVar

from . import _core, _sql
from ._core import EncodedEvent, Mode, Plan, Row, Stmt, TopicCache
from ._locks import FileLock, QueuedLock
from .errors import (
    EventlogError,
    InvalidArgument,
    LogForked,
    NotAnEventlogDatabase,
    SchemaTooNew,
    StorageError,
    UnsupportedFilesystem,
    translate,
)

log = logging.getLogger("eventlog")
T = TypeVar("T")
Durability = Literal["full", "normal"]

_NETWORK_FS = {
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "ncpfs", "afs", "9p", "ceph", "glusterfs",
    "fuse.sshfs", "fuse.glusterfs", "fuse.cephfs", "lustre", "gpfs", "davfs", "fuse.s3fs",
}  # fmt: skip


@dataclass(frozen=True)
class Paths:
    """Every file eventlog keeps for one database, all beside it."""

    db: Path

    @classmethod
    def for_db(cls, path: str | os.PathLike[str]) -> Paths:
        if isinstance(path, str) and (path == ":memory:" or path.startswith("file:")):
            raise InvalidArgument(
                f"eventlog needs a database file on disk (other processes share it), not {path!r}"
            )
        return cls(Path(path).absolute())

    @property
    def sidecar(self) -> Path:
        return self.db.with_name(self.db.name + ".d")

    @property
    def wake_folder(self) -> Path:
        return self.sidecar / "wake"

    @property
    def write_lock(self) -> Path:
        return self.sidecar / "write.lock"

    @property
    def deadletter(self) -> Path:
        return self.db.with_name(self.db.name + ".deadletter.jsonl")

    @property
    def deadletter_lock(self) -> Path:
        return self.sidecar / "deadletter.lock"

    def group_folder(self, group: str) -> Path:
        return self.sidecar / "groups" / group

    def make_sidecar(self) -> None:
        # Owner-only: a stricter umask only narrows this further.
        for folder in (self.sidecar, self.wake_folder):
            folder.mkdir(mode=0o700, parents=False, exist_ok=True)


def filesystem_type(path: Path) -> str | None:
    """The type of the mount holding `path`, from /proc/self/mounts (None off Linux)."""
    try:
        with open("/proc/self/mounts", encoding="utf-8") as mounts:
            lines = mounts.read().splitlines()
    except OSError:
        return None
    target = os.path.realpath(path)
    best, best_type = "", None
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        mount = parts[1].replace("\\040", " ")
        inside = target == mount or target.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):
            best, best_type = mount, parts[2]
    return best_type


def check_filesystem(paths: Paths, allow_network_fs: bool) -> None:
    fstype = filesystem_type(paths.db.parent)
    if fstype is None:
        return
    if fstype in _NETWORK_FS or fstype.startswith("nfs"):
        message = (
            f"{paths.db.parent} is on a network file system ({fstype}): SQLite's WAL and "
            "flock do not work reliably there, so events could be lost or delivered twice"
        )
        if not allow_network_fs:
            raise UnsupportedFilesystem(message)
        log.warning("%s (allowed by allow_network_fs=True)", message)


def prepare_files(paths: Paths, *, create: bool) -> None:
    """Create the database file owner-only before SQLite does (its -wal/-shm copy the mode)."""
    try:
        folder_ok = paths.db.parent.is_dir()
        exists = paths.db.exists()
        is_folder = exists and paths.db.is_dir()
    except OSError as exc:  # a name too long, a loop of links, a folder we may not look in
        raise InvalidArgument(f"cannot use {paths.db}: {exc.strerror or exc}",
                              hint="check the database path (--db)") from exc  # fmt: skip
    if not folder_ok:
        raise InvalidArgument(f"folder {paths.db.parent} does not exist")
    if is_folder:
        raise InvalidArgument(f"{paths.db} is a directory, not a database file",
                              hint="give the path of the database file itself")  # fmt: skip
    if not exists:
        if not create:
            raise NotAnEventlogDatabase(
                f"no database at {paths.db}", hint="create it with 'eventlog init'"
            )
        try:
            fd = os.open(paths.db, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            os.close(fd)
        except FileExistsError:
            pass  # another process created it at the same moment
        except OSError as exc:
            raise translate(exc) from exc
    elif not create and paths.db.is_file() and paths.db.stat().st_size == 0:
        # SQLite takes an empty file for an empty database: only `init` may make it a log.
        raise NotAnEventlogDatabase(
            f"{paths.db} is an empty file, not an eventlog database",
            hint="make it a log with 'eventlog init'",
        )
    elif paths.db.is_file() and probe_schema_version(paths) == 0 and not create:
        # The probe fails on a file that is not SQLite, before the sidecar folder is made: a
        # wrong --db leaves no trace. Nor may an application's SQLite file become a log but
        # by `init` (or an open with create=True, as the outbox does): that switches it to WAL
        # and adds our tables.
        raise NotAnEventlogDatabase(
            f"{paths.db} is an SQLite database without eventlog's tables",
            hint="check the path; to make it a log as well, run 'eventlog init' on it",
        )
    try:
        paths.make_sidecar()
    except OSError as exc:
        raise translate(exc) from exc


def probe_schema_version(paths: Paths, busy_timeout_ms: int = 10_000) -> int:
    """The schema version of an existing file (0: no eventlog schema), read through a plain
    connection that changes nothing: no journal mode switch, no tables."""
    refuse_if_forked(paths)
    try:
        conn = sqlite3.connect(f"{paths.db.as_uri()}?mode=rw", uri=True, isolation_level=None,
                               timeout=busy_timeout_ms / 1000)  # fmt: skip
    except sqlite3.Error as exc:
        raise translate(exc) from exc
    try:
        return schema_version(conn)
    except sqlite3.Error as exc:
        raise translate(exc) from exc
    finally:
        conn.close()


def check_open_options(durability: object, busy_timeout: object) -> int:
    """Validate the options every open takes, before any file is touched; returns the busy
    timeout in milliseconds."""
    if durability not in ("full", "normal"):
        raise InvalidArgument(f"durability must be 'full' or 'normal', got {durability!r}")
    if (
        not isinstance(busy_timeout, int | float)
        or isinstance(busy_timeout, bool)
        or not 0 <= busy_timeout < 86_400
    ):
        raise InvalidArgument(f"busy_timeout must be seconds >= 0, got {busy_timeout!r}")
    return int(busy_timeout * 1000)


def connect(
    paths: Paths,
    *,
    durability: Durability,
    busy_timeout_ms: int,
    read_only: bool = False,
    check_same_thread: bool = True,
    create: bool = True,
) -> LogConnection:
    """A connection in autocommit mode: every transaction is explicit and short. With
    create=False a missing file is an error, never a new empty database."""
    if durability not in ("full", "normal"):
        raise InvalidArgument(f"durability must be 'full' or 'normal', got {durability!r}")
    refuse_if_forked(paths)
    try:
        if read_only or not create:
            conn = sqlite3.connect(
                f"{paths.db.as_uri()}?mode={'ro' if read_only else 'rw'}", uri=True,
                isolation_level=None, check_same_thread=check_same_thread,
                cached_statements=256, factory=LogConnection,
            )  # fmt: skip
        else:
            conn = sqlite3.connect(
                paths.db, isolation_level=None, check_same_thread=check_same_thread,
                cached_statements=256, factory=LogConnection,
            )  # fmt: skip
    except sqlite3.Error as exc:
        raise translate(exc) from exc
    conn.note_open(paths.db)
    # At `full` SQLite itself runs at NORMAL and the WAL is fsynced after the write lock is let
    # go (see LogConnection): with SQLite's FULL the fsync sat inside the lock, and writers
    # in other processes waited for it in turn.
    synchronous = "NORMAL" if durability == "full" and not read_only else durability.upper()
    try:
        for pragma in _sql.PRAGMAS:
            if read_only and "journal" in pragma:
                continue
            sql = pragma.format(busy_timeout_ms=busy_timeout_ms, synchronous=synchronous)
            if "journal_mode" in sql:
                _retry_busy(conn, sql, busy_timeout_ms)
            else:
                conn.execute(sql).fetchall()
        if durability == "full":
            conn.file_id = database_file_id(paths.db)
            conn.execute(_sql.OPEN_WAL).fetchall()  # a fresh file has no WAL before a read
            conn.open_wal(paths.db, keep_up=not read_only)
    except sqlite3.Error as exc:
        conn.close()
        raise translate(exc) from exc
    return conn


class LogConnection(sqlite3.Connection):
    """Every connection the log opens. At `full` it holds `wal`, a descriptor of its WAL to
    fsync: the log commits at synchronous=NORMAL under the write lock, lets the lock go, then
    fsyncs the WAL before the caller hears of the commit (sync_commits). The fsyncs of writers
    in several processes then overlap instead of queueing behind the lock.

    Committed is then visible before it is durable, for the length of an fsync. Readers at
    `full` close that gap: they hand out events only up to what a finished fsync covers
    (ensure_durable), fsyncing themselves when no writer's note says so.
    """

    wal: WalFile | None = None
    file_id: tuple[int, int] | None = None  # at `full`: names the database for the writers

    def open_wal(self, db: Path, *, keep_up: bool) -> None:
        try:
            self.wal = WalFile(db)
        except OSError as exc:
            if keep_up:  # without our own descriptor, SQLite fsyncs inside the commit
                log.warning("cannot open the WAL of %s to fsync it (%s); using synchronous=FULL",
                            db, exc)  # fmt: skip
                self.execute("PRAGMA synchronous = FULL").fetchall()

    _opened: tuple[tuple[int, int], int] | None = None  # (database file id, pid)

    def note_open(self, db: Path) -> None:
        try:
            file_id = database_file_id(db)
        except OSError:
            return  # gone already: the next statement says so
        self._opened = (file_id, os.getpid())
        with _OPEN_LOCK:
            _OPEN_FILES[file_id] = _OPEN_FILES.get(file_id, 0) + 1

    def close(self) -> None:
        wal, self.wal = self.wal, None
        if wal is not None:
            wal.close()
        opened, self._opened = self._opened, None
        if opened is not None and opened[1] == os.getpid():
            with _OPEN_LOCK:
                left = _OPEN_FILES.get(opened[0], 0) - 1
                if left > 0:
                    _OPEN_FILES[opened[0]] = left
                else:
                    _OPEN_FILES.pop(opened[0], None)
        super().close()


# The databases this process has connections open to, by file id (device, inode), and those
# a parent had open when it forked this process. SQLite keeps one lock table per process, by
# file, and a child of fork() inherits the parent's entries with its connections (which it
# must not close). A connection the child opened on such a file would believe its locks taken
# while it holds none: another process could checkpoint and delete the WAL under it, and what
# it then commits would be lost. So the child refuses such files (refuse_if_forked).
_OPEN_FILES: dict[tuple[int, int], int] = {}
_OPEN_LOCK = threading.Lock()
_FORKED_WITH: set[tuple[int, int]] = set()


def refuse_if_forked(paths: Paths) -> None:
    if not _FORKED_WITH:
        return
    try:
        file_id = database_file_id(paths.db)
    except OSError:
        return  # no such file: nothing inherited names it
    if file_id in _FORKED_WITH:
        raise LogForked(
            f"this process is a child of fork(), and its parent had {paths.db} open: SQLite "
            "keeps its locks per process, and a connection opened here would hold none, so "
            "what it commits could be lost",
            hint="open the log only after fork(), in processes whose parent has it closed: "
            "multiprocessing's 'spawn' or 'forkserver' start method, gunicorn without "
            "--preload (or open it in post_fork), or close the parent's log before forking",
        )


def _forked_with_open_files() -> None:
    global _OPEN_LOCK
    _OPEN_LOCK = threading.Lock()  # a parent's thread may have held it: that thread is not here
    _FORKED_WITH.update(_OPEN_FILES)
    _OPEN_FILES.clear()


class WalFile:
    """A read-only descriptor of a database's -wal file, only ever fsynced.

    SQLite takes no locks on the -wal file, so this descriptor can open and close freely. The
    file keeps its inode while the connection that opened it first is open (SQLite deletes it
    only at the last connection's close, and truncates it in place), so the descriptor is
    opened once, after that connection has read.
    """

    def __init__(self, db: Path) -> None:
        self.file_id = database_file_id(db)  # names this database in the writers' page
        self.fd: int | None = os.open(f"{db}-wal", os.O_RDONLY | os.O_CLOEXEC)
        self.synced_through = 0  # the newest offset this connection knows to be on disk
        self._pid = os.getpid()

    def sync(self) -> None:
        if self.fd is None:
            raise EventlogError("the log is closed")
        try:
            os.fdatasync(self.fd)
        except OSError as exc:
            raise translate(exc) from exc

    def close(self) -> None:
        fd, self.fd = getattr(self, "fd", None), None  # getattr: __init__ may have failed
        if fd is not None and os.getpid() == self._pid:
            os.close(fd)

    # A connection dropped without close() (a cancelled open) closes SQLite's own descriptors
    # when collected, and this one with it.
    __del__ = close


def database_file_id(db: Path) -> tuple[int, int]:
    stat = os.stat(db)
    return (stat.st_dev, stat.st_ino)


def forget_stale_note(conn: sqlite3.Connection, writers: FileLock | None, db: Path) -> None:
    """At open, at either durability and before anything here reads: drop a writers' note
    that claims offsets this database does not hold. The note names the database file by
    inode, and a file deleted and created again can get the same number; the first open of
    the new file, at an empty head, forgets what was noted for the old one."""
    if isinstance(writers, QueuedLock):
        head = drive(conn, _core.head_plan(), "none")
        writers.drop_note_beyond(database_file_id(db), head)


def sync_commits(conn: sqlite3.Connection, writers: FileLock | None) -> None:
    """Make the connection's commits durable, at `full`; call it after the write lock is let
    go and before the caller hears of the commit.

    A failed fsync is told to every process (see check_wal_sound): the kernel reports a
    failed write-back once per descriptor, so a later fsync may succeed while the failed
    pages never reached the disk, and every commit after them in the WAL depends on them.
    """
    wal = conn.wal if isinstance(conn, LogConnection) else None
    if wal is None:
        return
    try:
        wal.sync()
    except StorageError:  # the fsync itself failed (not: the log was closed meanwhile)
        if isinstance(writers, QueuedLock):
            writers.mark_wal_failed(wal.file_id)
        raise
    check_wal_sound(conn, writers)


def check_wal_sound(conn: sqlite3.Connection, writers: FileLock | None) -> None:
    """Raise StorageError, at `full`, once an fsync of the WAL has failed in any process and
    no checkpoint has emptied the WAL into the database file since: nothing is written or
    fsynced as durable meanwhile (a cheap look at the writers' page). Also where SQLite
    fsyncs itself (no descriptor of our own): its commits would follow the failed pages."""
    file_id = conn.file_id if isinstance(conn, LogConnection) else None
    if file_id is not None and isinstance(writers, QueuedLock) and writers.wal_failures(file_id):
        raise StorageError(
            "an fsync of the log's WAL failed (in this process or another): what was committed "
            "since is not known to be on disk",
            hint="check the disk, then run 'eventlog checkpoint': once it has moved the WAL "
            "into the database file, appends and reads go on",
        )


def checkpoint_truncate(
    conn: sqlite3.Connection, writers: FileLock | None, db: Path
) -> tuple[int, int, int]:
    """Checkpoint the whole WAL into the database file, fsync it and empty the WAL; returns
    (busy, WAL pages, checkpointed). Done (busy 0), it also ends a failed fsync's hold (see
    check_wal_sound): every commit is then in the database file, on disk."""
    file_id = database_file_id(db)
    seen = writers.wal_failures(file_id) if isinstance(writers, QueuedLock) else 0
    try:
        busy, pages, done = drive(conn, one_statement(_sql.CHECKPOINT_TRUNCATE), "none")[0]
    except EventlogError as exc:
        mark_io_error(exc, writers, db)
        raise
    if busy == 0 and seen and isinstance(writers, QueuedLock):
        writers.clear_wal_failed(file_id, seen)
    return int(busy), int(pages), int(done)


def mark_io_error(exc: BaseException, writers: FileLock | None, db: Path) -> None:
    """Mark an I/O error that SQLite reports (its checkpoints fsync the WAL and the database
    file through descriptors of its own) as a failed fsync of ours (see sync_commits): once
    its descriptor has reported the error, a later fsync through another would not."""
    cause = exc if isinstance(exc, sqlite3.Error) else exc.__cause__
    code = getattr(cause, "sqlite_errorcode", 0) if isinstance(cause, sqlite3.Error) else 0
    if code & 0xFF == sqlite3.SQLITE_IOERR and isinstance(writers, QueuedLock):
        log.error("SQLite reported an I/O error on %s: %s", db, cause)
        writers.mark_wal_failed(database_file_id(db))


def one_statement(sql: str) -> Plan[list[Row]]:
    return (yield Stmt(sql))


def note_durable(conn: sqlite3.Connection, writers: FileLock | None, offset: int) -> None:
    """After sync_commits: tell every reader that events up to `offset` are on disk (all
    earlier commits are in the WAL before this one, so one fsync covers them too)."""
    wal = conn.wal if isinstance(conn, LogConnection) else None
    if wal is not None:
        wal.synced_through = max(wal.synced_through, offset)
        if isinstance(writers, QueuedLock):
            writers.note_durable(wal.file_id, offset)


def needs_sync(conn: sqlite3.Connection, writers: FileLock | None, newest: int) -> bool:
    """True when a reader at `full` must run sync_for_readers before it hands out events up
    to `newest`: no finished fsync is known to cover them yet. Cheap (no system call while
    they are covered); safe on any thread."""
    wal = conn.wal if isinstance(conn, LogConnection) else None
    if wal is None or newest <= wal.synced_through:
        return False
    if isinstance(writers, QueuedLock):
        wal.synced_through = max(wal.synced_through, writers.durable_through(wal.file_id))
    return newest > wal.synced_through


def sync_for_readers(conn: sqlite3.Connection, writers: FileLock | None, newest: int) -> None:
    """fsync the WAL, so that events up to `newest` (read already, so in the WAL or in a
    checkpoint, which fsynced them) are on disk, and say so to the others. What is noted is
    at most the head committed before the fsync began: a `newest` past it (a client's resume
    point) is no event, and noting it would vouch for commits that come later."""
    head = drive(conn, _core.head_plan(), "none")
    sync_commits(conn, writers)
    note_durable(conn, writers, min(newest, head))


def ensure_durable(conn: sqlite3.Connection, writers: FileLock | None, newest: int) -> None:
    if needs_sync(conn, writers, newest):
        sync_for_readers(conn, writers, newest)


def _retry_busy(conn: sqlite3.Connection, sql: str, busy_timeout_ms: int) -> None:
    """Run a statement that SQLite fails with SQLITE_BUSY without calling the busy handler.

    Switching a fresh file to WAL takes an exclusive lock, and SQLite does not wait for it
    (two connections upgrading from a shared lock would deadlock): a process opening a
    brand-new file at the same moment as another gets "database is locked" at once. Once the
    other has switched the file, the pragma is a no-op, so retrying within busy_timeout ends.
    """
    deadline = time.monotonic() + busy_timeout_ms / 1000
    delay = 0.001
    while True:
        try:
            conn.execute(sql).fetchall()
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


# An appending log checkpoints (see Checkpointer) once its commits have written about this
# many WAL pages (SQLite's own default): a commit rewrites two or so (the table's leaf and the
# lane index's), and a batch adds about one per 16 events.
CHECKPOINT_PAGES = 1000


def wal_pages(events: int) -> int:
    """About how many WAL pages a commit of `events` appends writes."""
    return 2 + events // 16


# Connections inherited through fork() are parked here, never closed: closing them in the
# child would run SQLite's close path on the parent's handles.
ABANDONED: list[object] = []


class Checkpointer:
    """An appending log's passive checkpoints, in two steps so that no append waits for the
    bulk of one.

    At `normal` a checkpoint first fsyncs the WAL frames it copies: run inline, the append
    that made it due paid for the flush of every append before it (about 10 µs each). The
    bulk runs on a thread of its own, on its own connection. The appender then finishes it
    on its own connection (note_commit returns True): only the frames committed meanwhile,
    about a millisecond, after which nothing is left behind and the next commit starts the
    WAL over. Left to the thread alone, a steady appender always commits meanwhile, and the
    WAL restarts only at SQLite's backstop, inside a commit, under the write lock.
    """

    def __init__(self, paths: Paths, durability: Durability, busy_timeout_ms: int) -> None:
        self._paths = paths
        self._durability = durability
        self._busy_ms = busy_timeout_ms
        self._due = threading.Event()  # the thread has a bulk checkpoint to run
        self._bulk_done = threading.Event()  # it ran one: the appender finishes it
        self._closing = False
        self._writers: QueuedLock | None = None
        self._thread: threading.Thread | None = None
        self._conn: sqlite3.Connection | None = None  # the thread's, opened there
        self._in_sqlite = threading.Lock()  # held by the thread while it is inside SQLite
        self._pid = os.getpid()
        _LIVE_CHECKPOINTERS.add(self)

    @property
    def running(self) -> bool:
        return self._thread is not None

    def note_commit(self, events: int, writers: QueuedLock) -> bool:
        """Count a commit's WAL pages on the tally all writers share, starting a bulk checkpoint
        when they reach CHECKPOINT_PAGES; True when the caller should now run
        CHECKPOINT_PASSIVE itself."""
        self._writers = writers  # for the thread, to mark an I/O error for every process
        finish = self._bulk_done.is_set()
        if finish:
            self._bulk_done.clear()
        if writers.tally_pages(wal_pages(events), CHECKPOINT_PAGES):
            if self._thread is None and not self._start():
                return True  # no thread to be had: the caller checkpoints, all of it
            self._due.set()
        return finish

    def _start(self) -> bool:
        thread = threading.Thread(target=self._run, name="eventlog-checkpoint", daemon=True)
        try:
            thread.start()
        except RuntimeError as exc:  # "can't start new thread": out of threads or memory
            log.warning("no checkpoint thread (%s); checkpointing inline", exc)
            return False
        self._thread = thread
        return True

    def _run(self) -> None:
        while True:
            self._due.wait()
            self._due.clear()
            with self._in_sqlite:
                if self._closing:
                    return
                try:
                    if self._conn is None:
                        # mode=rw: a file removed meanwhile must not come back empty
                        self._conn = connect(
                            self._paths, durability=self._durability,
                            busy_timeout_ms=self._busy_ms, check_same_thread=False,
                            create=False,
                        )  # fmt: skip
                    self._conn.execute(_sql.CHECKPOINT_PASSIVE).fetchall()
                except (sqlite3.Error, EventlogError) as exc:
                    log.warning("background checkpoint failed: %s", exc)
                    mark_io_error(exc, self._writers, self._paths.db)
                    continue
            self._bulk_done.set()

    def close(self) -> None:
        """Stop the thread (after the checkpoint it may be running) and close its connection."""
        _LIVE_CHECKPOINTERS.discard(self)
        if os.getpid() != self._pid:
            ABANDONED.append(self)  # a child has no such thread, and must not close the conn
            return
        self._closing = True
        self._due.set()
        thread = self._thread
        if thread is not None:
            if sys.is_finalizing():
                return  # the thread can no longer run: joining it would wait for ever
            thread.join(self._busy_ms / 1000 + 10)
            if thread.is_alive():
                log.warning("the checkpoint thread is still busy; leaving it its connection")
                return
        if self._conn is not None:
            self._conn.close()
            self._conn = None


# fork() while a checkpoint thread is inside SQLite would copy SQLite's locks held, with no
# thread left in the child to release them: a fork waits for those threads to step out.
_LIVE_CHECKPOINTERS: weakref.WeakSet[Checkpointer] = weakref.WeakSet()
_HELD_FOR_FORK: list[Checkpointer] = []


def _before_fork() -> None:
    _HELD_FOR_FORK[:] = list(_LIVE_CHECKPOINTERS)
    for checkpointer in _HELD_FOR_FORK:
        checkpointer._in_sqlite.acquire()


def _after_fork() -> None:
    for checkpointer in _HELD_FOR_FORK:
        checkpointer._in_sqlite.release()
    _HELD_FOR_FORK.clear()


def _after_fork_in_child() -> None:
    _after_fork()
    _forked_with_open_files()


os.register_at_fork(
    before=_before_fork, after_in_parent=_after_fork, after_in_child=_after_fork_in_child
)


class WouldBlock(Exception):
    """The write lock is taken; the plan did not start. Run it again where waiting is fine."""


def drive(
    conn: sqlite3.Connection,
    plan: Plan[T],
    mode: Mode,
    write_lock: FileLock | None = None,
    *,
    wait: bool = True,
) -> T:
    """Run a plan's statements, in one transaction unless mode is "none".

    Writes first take the sidecar write lock: SQLite's busy handler sleeps in coarse steps,
    while a blocked flock wakes the instant the lock is free. Any failure rolls back. With
    wait=False (a connection whose busy_timeout is 0), a taken lock raises WouldBlock and
    leaves the plan unstarted, to be driven again elsewhere. A write returns once durable,
    and so does all it read, even when it changed nothing: a dedupe hit returns the offset of
    another writer's commit, which that writer may not have fsynced yet.
    """
    if mode == "write":
        check_wal_sound(conn, write_lock)
    result = _drive(conn, plan, mode, write_lock, wait)
    if mode == "write":
        sync_commits(conn, write_lock)
    return result


def _drive(
    conn: sqlite3.Connection, plan: Plan[T], mode: Mode, write_lock: FileLock | None, wait: bool
) -> T:
    locked = False
    started = False
    try:
        if mode == "write":
            locked = _take_write_lock(write_lock, wait)
            _start_write(conn, _sql.BEGIN_WRITE, (), wait)
        elif mode == "read":
            conn.execute(_sql.BEGIN_READ)
        reply: list[Row] | None = None
        started = True
        try:
            while True:
                stmt = plan.send(reply)  # type: ignore[arg-type]  # None starts the plan
                if stmt.many:
                    conn.executemany(stmt.sql, stmt.params)
                    reply = []
                else:
                    reply = conn.execute(stmt.sql, stmt.params).fetchall()  # type: ignore[arg-type]
        except StopIteration as done:
            if mode != "none":
                conn.execute(_sql.COMMIT)
            return done.value  # type: ignore[no-any-return]
    except BaseException as exc:
        # mode "none" runs inside the caller's own transaction: theirs to roll back
        if mode != "none" and conn.in_transaction:
            try:
                conn.execute(_sql.ROLLBACK)
            except sqlite3.Error:
                log.exception("rollback failed")
        if isinstance(exc, sqlite3.Error | OSError) and not isinstance(exc, EventlogError):
            raise translate(exc) from exc
        raise
    finally:
        if started:
            plan.close()
        if locked and write_lock is not None:
            write_lock.release()


def _take_write_lock(write_lock: FileLock | None, wait: bool) -> bool:
    if write_lock is None:
        return False
    locked = write_lock.acquire(blocking=wait)
    if not locked and not wait:
        raise WouldBlock
    if not locked:
        # The flock only shortens waits; SQLite's own lock still serialises writers, so a
        # stuck holder costs busy_timeout, not a hang.
        log.warning("%s stayed locked; writing without it", write_lock.path)
    return locked


def _start_write(
    conn: sqlite3.Connection, sql: str, params: Sequence[Any], wait: bool
) -> sqlite3.Cursor:
    try:
        return conn.execute(sql, params)
    except sqlite3.OperationalError as exc:
        if not wait and "locked" in str(exc):
            raise WouldBlock from exc
        raise


def append(
    conn: sqlite3.Connection,
    events: Sequence[EncodedEvent],
    cache: TopicCache,
    default_partitions: int,
    write_lock: FileLock | None = None,
    *,
    wait: bool = True,
) -> list[int]:
    """Append events in one transaction; returns their offsets once committed.

    A lone event on a known topic is a single autocommit INSERT: a third of the statements of
    BEGIN/INSERT/COMMIT, as atomic and as durable. WouldBlock (wait=False) means nothing was
    written.
    """
    lone = _core.lone_insert(events[0], cache) if len(events) == 1 else None
    if lone is None:
        plan = _core.append_plan(events, cache, default_partitions)
        try:
            offsets = drive(conn, plan, "write", write_lock, wait=wait)
        except WouldBlock:
            raise  # nothing ran
        except BaseException:
            cache.forget()  # a rolled-back topic creation must be forgotten
            raise
        note_durable(conn, write_lock, max(offsets))
        return offsets
    check_wal_sound(conn, write_lock)
    locked = _take_write_lock(write_lock, wait)
    try:
        offset = int(_start_write(conn, *lone, wait).lastrowid)  # type: ignore[arg-type]
    except (sqlite3.Error, OSError) as exc:
        raise translate(exc) from exc
    finally:
        if locked and write_lock is not None:
            write_lock.release()
    sync_commits(conn, write_lock)
    note_durable(conn, write_lock, offset)
    topic = events[0].topic
    if _core.fold_due(topic, offset, cache):
        # Its own transaction, after the event committed: a failure here must not look like
        # a failed append (the caller would append again). A later append folds instead.
        try:
            drive(conn, _core.fold_count_plan(topic, cache, offset), "write", write_lock, wait=wait)
        except (WouldBlock, EventlogError) as exc:
            log.debug("counter fold of %r put off: %r", topic, exc)
    return [offset]


# -- migrations -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def load_migrations() -> list[Migration]:
    """The numbered .sql files shipped in eventlog.migrations, in order."""
    found = []
    for entry in resources.files("eventlog.migrations").iterdir():
        name = entry.name
        if name.endswith(".sql") and name[:4].isdigit():
            found.append(Migration(int(name[:4]), name[:-4], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    return found


def split_statements(script: str) -> list[str]:
    """Split a script into complete statements (executescript would commit on its own)."""
    statements, current = [], ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            if current.strip():
                statements.append(current.strip())
            current = ""
    if current.strip() and not all(
        part.strip().startswith("--") or not part.strip() for part in current.splitlines()
    ):
        raise EventlogError(f"incomplete statement in migration: {current[:80]!r}")
    return statements


def schema_version(conn: sqlite3.Connection) -> int:
    if not conn.execute(_sql.SCHEMA_TABLE_EXISTS).fetchone()[0]:
        return 0
    return int(conn.execute(_sql.SCHEMA_VERSION).fetchone()[0])


def migrate(conn: sqlite3.Connection, write_lock: FileLock | None = None) -> int:
    """Apply pending migrations, each in its own write transaction; returns the version.

    The version is read again after taking the write lock, so when two processes open a fresh
    file at once the second finds the work done.
    """
    migrations = load_migrations()
    latest = migrations[-1].version if migrations else 0
    try:
        current = schema_version(conn)
    except sqlite3.Error as exc:
        raise translate(exc) from exc
    if current > latest:
        raise SchemaTooNew(
            f"the database has schema version {current}; this eventlog knows up to {latest}"
        )
    for migration in migrations:
        if migration.version <= current:
            continue

        def apply(m: Migration = migration) -> Plan[bool]:
            yield Stmt(_sql.CREATE_SCHEMA_TABLE)
            rows = yield Stmt(_sql.SCHEMA_VERSION)
            if int(rows[0][0]) >= m.version:
                return False
            log.info("applying migration %s", m.name)
            app_triggers = yield Stmt(_sql.APP_TRIGGERS_ON_OUR_TABLES)
            for statement in split_statements(m.sql):
                yield Stmt(statement)
            for name, sql in app_triggers:
                if not (yield Stmt(_sql.TRIGGER_EXISTS, (name,)))[0][0]:
                    yield Stmt(sql)  # fails, and rolls the migration back, if it no longer fits
            yield Stmt(_sql.RECORD_MIGRATION, (m.version, m.name, time.time_ns() // 1_000_000))
            return True

        conn.execute(_sql.LEGACY_RENAME_ON)
        try:
            applied = drive(conn, apply(), "write", write_lock)
        finally:
            conn.execute(_sql.LEGACY_RENAME_OFF)
        if applied:
            log.info("applied migration %s", migration.name)
        current = migration.version
    return current
