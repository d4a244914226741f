"""SyncLog: the log on the standard sqlite3 module, for threads and plain scripts."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import select
import sqlite3
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any, TypeVar

from . import _core, _db, _deadletter, _groups, _members, _sql
from ._core import (
    DEFAULT_LIMITS,
    EncodedEvent,
    Event,
    Limits,
    Mode,
    Plan,
    TopicCache,
    TopicInfo,
    encode_event,
)
from ._locks import QueuedLock
from ._wake import WakeListener, WakeSender
from .errors import (
    EventlogError,
    GroupBusy,
    InvalidArgument,
    LogClosed,
    LogForked,
    NotFound,
    StorageError,
)

log = logging.getLogger("eventlog")

# A thread inside a SyncLog call when another thread forks leaves the child a copy of the
# log's mutex that says held, by a thread the child does not have: the child's first call
# would wait for ever. The child starts with one thread, so each mutex is replaced there.
_LIVE_LOGS: weakref.WeakSet[SyncLog] = weakref.WeakSet()


def _new_mutexes_in_child() -> None:
    for sync_log in list(_LIVE_LOGS):
        sync_log._mutex = threading.RLock()


os.register_at_fork(after_in_child=_new_mutexes_in_child)
T = TypeVar("T")

FALLBACK_POLL_S = 0.25  # how often a waiter checks data_version when no datagram came


class Draft:
    """One event to append with `append_many`."""

    __slots__ = ("dedupe_key", "headers", "key", "payload", "topic")

    def __init__(
        self,
        topic: str,
        payload: Any,
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
        dedupe_key: str | None = None,
    ) -> None:
        self.topic = topic
        self.payload = payload
        self.key = key
        self.headers = headers
        self.dedupe_key = dedupe_key

    def encode(self, limits: Limits) -> EncodedEvent:
        return _core.encode_event(
            self.topic, self.payload, self.key, self.headers, self.dedupe_key, limits
        )


def redeliveries(entries: Iterable[_deadletter.DeadLetter]) -> list[tuple[str, int, str]]:
    return [(e.group, e.offset, e.id) for e in entries]


def newest_of(events: Sequence[Event]) -> int:
    """The offset of the last of events in offset order; 0 for none (for run_read)."""
    return events[-1].offset if events else 0


def encode_drafts(drafts: Iterable[Draft], limits: Limits) -> list[EncodedEvent]:
    if not isinstance(drafts, Iterable) or isinstance(drafts, Draft):
        raise InvalidArgument(f"append_many takes Draft objects, got {type(drafts).__name__}")
    encoded = []
    for i, draft in enumerate(drafts):
        if not isinstance(draft, Draft):
            raise InvalidArgument(
                f"append_many takes Draft objects; item {i} is {type(draft).__name__}"
            )
        encoded.append(encode_event(draft.topic, draft.payload, draft.key, draft.headers,
                                    draft.dedupe_key, limits))  # fmt: skip
    return encoded


class DatabaseWatch:
    """Tells whether anyone committed since the last look, from a connection that never
    writes (data_version ignores the connection's own commits), and whether the database
    file was replaced under us."""

    def __init__(self, paths: _db.Paths, conn: sqlite3.Connection) -> None:
        self.paths = paths
        self.conn = conn
        self.version = self._version()
        self.identity = self._identity()

    def _version(self) -> int:
        return int(self.conn.execute(_sql.DATA_VERSION).fetchone()[0])

    def _identity(self) -> tuple[int, int]:
        st = os.stat(self.paths.db)
        return st.st_dev, st.st_ino

    def changed(self) -> bool:
        version = self._version()
        if version != self.version:
            self.version = version
            return True
        try:
            identity = self._identity()
        except FileNotFoundError:
            identity = (-1, -1)
        if identity != self.identity:
            raise StorageError(
                f"the database file {self.paths.db} was replaced or removed while open",
                hint="open the log again",
            )
        return False

    def close(self) -> None:
        self.conn.close()


class SyncLog:
    """The event log, blocking API. Open with `eventlog.open_sync(path)`.

    Safe to share between threads (calls are serialised). In a child of fork() it raises
    LogForked and leaves the parent's handles untouched (see _db.refuse_if_forked).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        durability: _db.Durability = "full",
        busy_timeout: float = 10.0,
        limits: Limits = DEFAULT_LIMITS,
        default_partitions: int = 1,
        create: bool = True,
        allow_network_fs: bool = False,
    ) -> None:
        # Closed until fully open: a failed open has nothing to close or warn about.
        self._closed = True
        self.paths = _db.Paths.for_db(path)
        self.durability = durability
        self.limits = limits
        self.default_partitions = _core.check_partitions(default_partitions, limits)
        self._busy_ms = _db.check_open_options(durability, busy_timeout)
        self._cache = TopicCache()
        self._mutex = threading.RLock()
        _LIVE_LOGS.add(self)
        _db.check_filesystem(self.paths, allow_network_fs)
        _db.prepare_files(self.paths, create=create)
        self._open_handles()
        try:
            _db.migrate(self._conn, self._write_lock)
            _db.forget_stale_note(self._conn, self._write_lock, self.paths.db)
        except BaseException:
            self._close_handles()
            raise
        self._closed = False

    def _open_handles(self) -> None:
        self._pid = os.getpid()
        self._forgotten = False  # in a child of fork(): the parent's handles were let go
        self._conn = _db.connect(
            self.paths, durability=self.durability, busy_timeout_ms=self._busy_ms,
            check_same_thread=False,
        )  # fmt: skip
        self._conn.execute(_sql.AUTOCHECKPOINT_BACKSTOP)
        self._checkpointer = _db.Checkpointer(self.paths, self.durability, self._busy_ms)
        self._write_lock = QueuedLock(self.paths.write_lock, timeout=self._busy_ms / 1000)
        self._wake = WakeSender(self.paths.wake_folder)

    def _close_handles(self) -> None:
        self._checkpointer.close()
        self._write_lock.close()
        self._wake.close()
        self._conn.close()

    def _forget_parents_handles(self) -> None:
        """In a child of fork(): let go of the parent's handles without touching them (once)."""
        if self._forgotten:
            return
        self._forgotten = True
        _db.ABANDONED.append(self._conn)
        self._checkpointer.close()  # in a child this only forgets it
        self._write_lock.close()  # in a child this only forgets the descriptor

    def _check(self) -> None:
        if self._closed:
            raise LogClosed(f"the log {self.paths.db} is closed")
        if os.getpid() != self._pid:
            self._forget_parents_handles()
            # Reopening here would share SQLite's lock table with the parent's connection
            # (see _db.refuse_if_forked).
            raise LogForked(
                f"this SyncLog of {self.paths.db} was opened before fork(); its connection "
                "belongs to the parent"
            )

    def run(self, plan: Plan[T], mode: Mode) -> T:
        """Drive a plan on this log's connection (used by the CLI and consumer tools)."""
        with self._mutex:
            self._check()
            result = _db.drive(self._conn, plan, mode, self._write_lock)
            if mode == "write":
                self._committed()
            return result

    def _committed(self, events: int = 1) -> None:
        if self._checkpointer.note_commit(events, self._write_lock):
            try:
                _db.drive(self._conn, _db.one_statement(_sql.CHECKPOINT_PASSIVE), "none")
            except EventlogError as exc:
                log.warning("checkpoint failed: %s", exc)
                _db.mark_io_error(exc, self._write_lock, self.paths.db)

    # -- writing ------------------------------------------------------------------------------

    def append(
        self,
        topic: str,
        payload: Any,
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
        dedupe_key: str | None = None,
    ) -> int:
        """Append one event; returns its offset once the commit is durable (see durability).

        With `dedupe_key`, a retry of an append that already committed returns the first
        offset and stores nothing new.
        """
        encoded = _core.encode_event(topic, payload, key, headers, dedupe_key, self.limits)
        return self._append([encoded])[0]

    def append_many(self, drafts: Iterable[Draft]) -> list[int]:
        """Append all drafts in one transaction: all of them commit, or none."""
        encoded = encode_drafts(drafts, self.limits)
        return self._append(encoded) if encoded else []

    def _append(self, encoded: Sequence[EncodedEvent]) -> list[int]:
        with self._mutex:
            self._check()
            offsets = _db.append(
                self._conn, encoded, self._cache, self.default_partitions, self._write_lock
            )
            self._wake.notify()
            self._committed(len(encoded))
            return offsets

    def create_topic(self, name: str, partitions: int = 1, *, exist_ok: bool = True) -> bool:
        """Create a topic with a fixed partition count; False if it already existed."""
        _core.check_name(name, "topic", self.limits)
        _core.check_partitions(partitions, self.limits)
        plan = _core.create_topic_plan(name, partitions, self._cache, exist_ok=exist_ok)
        try:
            return self.run(plan, "write")
        except BaseException:
            self._cache.forget()  # the plan noted the topic before the commit failed
            raise

    def notify(self) -> None:
        """Wake every waiting reader now (after an outbox append committed elsewhere)."""
        self._wake.notify()

    # -- reading ------------------------------------------------------------------------------

    def head(self) -> int:
        """The largest offset ever handed out (0 for a fresh log); at `full`, once on disk."""
        head = self.run(_core.head_plan(), "none")
        if head > 0:
            self._ensure_durable(head)
        return head

    def topics(self) -> list[TopicInfo]:
        """Every topic with its event count and offsets; at `full`, once those are on disk."""
        return self.run_read(_core.topics_plan(), _core.newest_topic_offset)

    def get(self, offset: int) -> Event | None:
        event = self.run(_core.read_event_plan(offset), "none")
        if event is not None:
            self._ensure_durable(event.offset)
        return event

    def run_read(self, plan: Plan[T], newest: Callable[[T], int]) -> T:
        """Drive a read plan whose result hands out events or offsets, and return it once
        the newest of them, `newest(result)`, is on disk (at `full`; 0: none)."""
        result = self.run(plan, "read")
        offset = newest(result)
        if offset > 0:
            self._ensure_durable(offset)
        return result

    def _read_page(self, cursor: _core.ReadCursor, page: int) -> list[Event]:
        return self.run_read(_core.read_page_plan(cursor, page, True), newest_of)

    def _ensure_durable(self, newest: int) -> None:
        """At `full`, hand out nothing a power cut could still take back (see LogConnection)."""
        with self._mutex:
            self._check()
            _db.ensure_durable(self._conn, self._write_lock, newest)

    def read(
        self,
        topics: str | Sequence[str],
        *,
        start: str | int | datetime = "earliest",
        follow: bool = False,
        limit: int | None = None,
        page: int = 500,
        stop: threading.Event | None = None,
        idle_timeout: float | None = None,
    ) -> Iterator[Event]:
        """Events of the topics (names or patterns) after `start`, in offset order.

        Reads in pages, never holding a read transaction between them. With `follow`, waits
        for new commits from any process; ends when `stop` is set or after `idle_timeout`
        seconds without a new event.
        """
        start = _core.check_start(start)
        _core.compile_patterns(topics)
        _core.check_read_options(limit, page)
        _core.check_seconds(idle_timeout, "idle_timeout")
        return self._read(topics, start, follow, limit, page, stop, idle_timeout)

    def _read(
        self,
        topics: str | Sequence[str],
        start: str | int | datetime,
        follow: bool,
        limit: int | None,
        page: int,
        stop: threading.Event | None,
        idle_timeout: float | None,
    ) -> Iterator[Event]:
        waiter = self._waiter() if follow else None
        try:
            cursor = self.run(_core.open_cursor_plan(topics, start), "read")
            delivered = 0
            last_event_at = time.monotonic()
            while limit is None or delivered < limit:
                # Checked before every page, not only when idle: a reader told to stop while
                # a backlog (or a busy stream) keeps its pages full would go on to its end.
                if stop is not None and stop.is_set():
                    return
                # Lanes are looked up again with every page, in its transaction: a topic
                # created since (matching a pattern) then merges in offset order. Looked up
                # only after an idle wait, its events came after later ones of busy lanes.
                events = self._read_page(cursor, page)
                for event in events:
                    yield event
                    delivered += 1
                    if limit is not None and delivered >= limit:
                        return
                if events:
                    last_event_at = time.monotonic()
                    continue
                remaining = _core.idle_left(idle_timeout, last_event_at)
                if waiter is None or (remaining is not None and remaining <= 0):
                    return
                if not waiter.wait(stop, remaining):
                    return
        finally:
            if waiter is not None:
                waiter.close()

    def wait_for(
        self,
        topics: str | Sequence[str],
        *,
        match: Any = None,
        after: int | None = None,
        timeout: float | None = None,
        cancel: threading.Event | None = None,
    ) -> WaitResult:
        """The first event after `after` (default: the head now) that `match` accepts.

        Note the head before starting the work that appends the event: the event cannot be
        missed, even if it commits before this call starts waiting.
        """
        _core.compile_patterns(topics)
        _core.check_wait_for(after, timeout)
        if after is None:
            after = self.head()
        deadline = None if timeout is None else time.monotonic() + timeout
        waiter = self._waiter()
        try:
            cursor = self.run(_core.open_cursor_plan(topics, after + 1), "read")
            while True:
                events = self._read_page(cursor, 500)
                for event in events:
                    if match is None or match(event):
                        return WaitResult("received", event)
                # Checked after every page, not only when idle: a backlog or a busy stream of
                # events that do not match must not hold the caller past its timeout or cancel.
                if cancel is not None and cancel.is_set():
                    return WaitResult("cancelled", None)
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return WaitResult("timed_out", None)
                if events:
                    continue
                if not waiter.wait(cancel, remaining):
                    if cancel is not None and cancel.is_set():
                        return WaitResult("cancelled", None)
                    return WaitResult("timed_out", None)
        finally:
            waiter.close()

    def _waiter(self) -> _SyncWaiter:
        return _SyncWaiter(self.paths, self.durability, self._busy_ms)

    # -- consumer groups ----------------------------------------------------------------------

    def consume(
        self,
        group: str,
        topics: str | Sequence[str],
        handler: Any = None,
        *,
        batch_handler: Any = None,
        stop: threading.Event | None = None,
        handle_signals: bool = True,
        **options: Any,
    ) -> None:
        """Run a member of consumer group `group` until `stop` is set, SIGINT or SIGTERM.

        Blocks. Same semantics and options as `AsyncLog.consumer`; a sync handler runs in a
        worker thread, one call at a time per partition.
        """
        import asyncio

        from ._async import AsyncLog

        self._check()

        async def main() -> None:
            alog = AsyncLog(self.paths.db, durability=self.durability,
                            busy_timeout=self._busy_ms / 1000, limits=self.limits,
                            default_partitions=self.default_partitions)  # fmt: skip
            await alog._open()
            try:
                consumer = alog.consumer(group, topics, handler, batch_handler=batch_handler,
                                         **options)  # fmt: skip
                if stop is not None:
                    loop = asyncio.get_running_loop()

                    def relay() -> None:
                        stop.wait()
                        # consume() may have ended first (a failure): its loop is closed
                        with contextlib.suppress(RuntimeError):
                            loop.call_soon_threadsafe(consumer.stop)

                    threading.Thread(target=relay, daemon=True).start()
                await consumer.run(handle_signals=handle_signals)
            finally:
                await alog.close()

        asyncio.run(main())

    # -- dead letters and groups --------------------------------------------------------------

    def dead_letters(
        self,
        *,
        group: str | None = None,
        topic: str | None = None,
        since: datetime | None = None,
        include_requeued: bool = True,
    ) -> _deadletter.Listing:
        """The dead-letter file's entries (filtered), with the lines it could not read."""
        return _deadletter.filtered(
            self.paths, group=group, topic=topic, include_requeued=include_requeued,
            since_ms=_core.datetime_ms(since) if since is not None else None,
        )  # fmt: skip

    def dead_letter(self, dead_letter_id: str) -> _deadletter.DeadLetter:
        _deadletter.check_id(dead_letter_id)
        for entry in _deadletter.DeadLetterFile(self.paths).read().entries:
            if entry.id == dead_letter_id:
                return entry
        raise NotFound(f"no dead letter with id {dead_letter_id}")

    def requeue_dead_letters(
        self,
        ids: Iterable[str] | None = None,
        *,
        group: str | None = None,
        all: bool = False,
        dry_run: bool = False,
    ) -> list[_deadletter.DeadLetter]:
        """Send dead letters back to their own group only, attempts reset. Entries stay in the
        file, marked requeued; a renewed failure adds a new entry."""
        file = _deadletter.DeadLetterFile(self.paths)
        chosen = _deadletter.choose(file, ids, group, all, include_requeued=False)
        if dry_run or not chosen:
            return chosen
        with _deadletter.prepare_requeue_marks(
            file, {e.id for e in chosen}, _core.now_ms()
        ) as marks:
            if marks.changed:  # under the file's lock: what another requeue did not take
                self.run(_groups.request_redelivery_plan(redeliveries(marks.changed)), "write")
            marks.commit()
        self._wake.notify()
        return marks.changed

    def purge_dead_letters(
        self,
        ids: Iterable[str] | None = None,
        *,
        group: str | None = None,
        all: bool = False,
        dry_run: bool = False,
    ) -> list[_deadletter.DeadLetter]:
        """Remove dead letters from the file for good."""
        file = _deadletter.DeadLetterFile(self.paths)
        chosen = _deadletter.choose(file, ids, group, all, include_requeued=True)
        if not dry_run and chosen:
            _deadletter.drop(file, {e.id for e in chosen})
        return chosen

    def group_positions(self, group: str | None = None) -> list[_groups.LanePosition]:
        if group is not None:
            _core.check_name(group, "group", self.limits)
        return self.run(_groups.positions_plan(group), "read")

    def group_members(self, group: str) -> list[_members.MemberInfo]:
        """The group's member files: live ones with their last heartbeat, and stale ones."""
        return _members.list_members(self.paths, group)

    def group_names(self) -> list[str]:
        known = {row[0] for row in self.run(_groups.group_names_plan(), "read")}
        return sorted(known | set(_members.list_groups(self.paths)))

    def delete_group(self, group: str) -> int:
        """Forget a group's positions, attempts and redeliveries; refuses while it has live
        members. Returns how many positions were deleted."""
        live = [m for m in self.group_members(group) if m.alive]
        if live:
            pids = ", ".join(str((m.heartbeat or {}).get("pid", "?")) for m in live)
            raise GroupBusy(f"group {group!r} has live members (pids {pids})")
        return self.run(_groups.delete_group_plan(group), "write")

    # -- upkeep -------------------------------------------------------------------------------

    def checkpoint(self) -> tuple[int, int, int]:
        """Checkpoint the WAL and truncate it; returns (busy, wal pages, checkpointed)."""
        with self._mutex:
            self._check()
            return _db.checkpoint_truncate(self._conn, self._write_lock, self.paths.db)

    def close(self) -> None:
        with self._mutex:
            if self._closed:
                return
            self._closed = True
            if os.getpid() != self._pid:
                self._forget_parents_handles()
                return
            # Wake this log's own waiters (wait_for, follow) in other threads: they find it
            # closed at their next look, where they would wait for another process's commit.
            self._wake.notify()
            self._close_handles()

    def __enter__(self) -> SyncLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            # Close first: under -W error the warning raises, and the handles must not leak.
            with contextlib.suppress(Exception):
                self.close()
            warnings.warn(f"eventlog {self.paths.db} was not closed", ResourceWarning,
                          stacklevel=2)  # fmt: skip


class WaitResult:
    """What `wait_for` saw: status is "received" (with the event), "timed_out" or
    "cancelled"."""

    __slots__ = ("event", "status")

    def __init__(self, status: str, event: Event | None) -> None:
        self.status = status
        self.event = event

    @property
    def received(self) -> bool:
        return self.status == "received"

    def __repr__(self) -> str:
        return f"WaitResult({self.status!r}, {self.event!r})"


class _SyncWaiter:
    """Blocks until another process commits: a datagram, or data_version on the slow poll."""

    def __init__(self, paths: _db.Paths, durability: _db.Durability, busy_ms: int) -> None:
        self.listener = WakeListener(paths.wake_folder)
        try:
            # Not tied to this thread: a follow iterator may go on in another one.
            conn = _db.connect(paths, durability=durability, busy_timeout_ms=busy_ms,
                               check_same_thread=False)  # fmt: skip
            self.watch = DatabaseWatch(paths, conn)
        except BaseException:
            self.listener.close()
            raise

    def wait(self, stop: threading.Event | None, timeout: float | None) -> bool:
        """True when something new may be there; False on stop or timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        fd = self.listener.fileno()
        while True:
            if stop is not None and stop.is_set():
                return False
            if self.watch.changed():
                self.listener.drain()
                return True
            step = FALLBACK_POLL_S if stop is None else min(FALLBACK_POLL_S, 0.05)
            if deadline is not None:
                step = min(step, deadline - time.monotonic())
                if step <= 0:
                    return False
            if fd >= 0:
                # poll, not select: select refuses a descriptor past FD_SETSIZE (1024), which
                # any process with many files or sockets open hands out.
                poller = select.poll()
                poller.register(fd, select.POLLIN)
                if poller.poll(math.ceil(step * 1000)):
                    self.listener.drain()
                    return True
            else:
                time.sleep(min(step, 0.005))

    def close(self) -> None:
        self.listener.close()
        self.watch.close()


def append_in_transaction(
    conn: sqlite3.Connection,
    topic: str,
    payload: Any,
    *,
    key: str | None = None,
    headers: Mapping[str, str] | None = None,
    dedupe_key: str | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> int:
    """Append through the application's own sqlite3 connection, inside its open transaction
    (the transactional outbox): the event commits with the application's rows, or not at all.

    The file must have been opened once with eventlog (which creates the tables). Waiting
    readers notice the commit on their next poll; call `log.notify()` to wake them at once.
    """
    if not conn.in_transaction:
        raise InvalidArgument(
            "append_in_transaction needs an open transaction on the connection",
            hint="run conn.execute('BEGIN IMMEDIATE') first, and commit after",
        )
    encoded = _core.encode_event(topic, payload, key, headers, dedupe_key, limits)
    # A fresh cache per call (the transaction may roll back, and partition counts are per
    # file), but one round robin for the process: per call, it would start at 0 every time.
    cache = TopicCache(spread=_OUTBOX_SPREAD)
    return _db.drive(conn, _core.append_plan([encoded], cache), "none")[0]


# Keyless outbox events' round-robin counters, by topic. Shared by threads unguarded: two
# calls at the same instant may pick the same partition, which only evens out later.
_OUTBOX_SPREAD: dict[str, int] = {}
