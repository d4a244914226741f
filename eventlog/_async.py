"""AsyncLog: the log on aiosqlite, with group commit and signalled follow.

Every transaction is one hop to aiosqlite's worker thread: the whole plan runs there through
the same `_db.drive` the sync shell uses. A hop costs as much as ~10 raw inserts, so hopping
per statement (aiosqlite's public API) would cost several hops per append. aiosqlite has no
public call for running our function on its thread, so this uses `Connection._execute`, which
every aiosqlite release since 0.17 has; `open` checks for it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import time
import warnings
from collections import deque
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Generator,
    Iterable,
    Mapping,
    Sequence,
)
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

import aiosqlite

from . import _core, _db, _deadletter, _groups, _sql
from ._core import DEFAULT_LIMITS, EncodedEvent, Event, Limits, Mode, Plan, TopicCache, TopicInfo
from ._locks import QueuedLock
from ._sync import (
    FALLBACK_POLL_S,
    DatabaseWatch,
    Draft,
    WaitResult,
    encode_drafts,
    newest_of,
    redeliveries,
)
from ._wake import WakeListener, WakeSender
from .errors import EventlogError, LogClosed, LogForked

if TYPE_CHECKING:
    from ._consumer import Consumer

log = logging.getLogger("eventlog")
T = TypeVar("T")

# Group commit: how many queued events one transaction takes at most.
MAX_GROUP_COMMIT = 5000
# Batches up to this size may commit on the loop thread (durability normal, lock free).
FAST_BATCH_MAX = 64
INLINE_PER_STEP = 32


def _drop_prepared(done: asyncio.Future[_deadletter.Rewrite]) -> None:
    if not done.cancelled() and done.exception() is None:
        done.result().drop()


def _nothing(conn: sqlite3.Connection) -> None:
    """A job for the worker whose only effect is that every job queued before it has run."""


class AsyncLog:
    """The event log, asyncio API. Open with `async with eventlog.open(path) as log`.

    Appends from many coroutines are committed together (group commit); each caller gets its
    offset only after the transaction holding its event committed.
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
        self.paths = _db.Paths.for_db(path)
        self.durability = durability
        self.limits = limits
        self.default_partitions = _core.check_partitions(default_partitions, limits)
        self._busy_ms = _db.check_open_options(durability, busy_timeout)
        self._create = create
        self._allow_network_fs = allow_network_fs
        self._cache = TopicCache()
        self._pending: deque[tuple[Sequence[EncodedEvent], asyncio.Future[list[int]]]] = deque()
        self._writer: asyncio.Task[None] | None = None
        self._alone = 0  # appends in flight on the worker without the writer task
        self._wakers: set[asyncio.Task[None]] = set()  # see _wake_after_worker
        self._aconn: aiosqlite.Connection | None = None
        self._write_lock: QueuedLock | None = None
        self._wake: WakeSender | None = None
        self._pid = os.getpid()
        self._closed = False
        self._fast_conn: sqlite3.Connection | None = None
        self._fast_lock: QueuedLock | None = None
        self._checkpointer = _db.Checkpointer(self.paths, durability, self._busy_ms)
        self._flush_scheduled = False
        self._step_used = False
        self._step_inline = 0
        self._inline_task: asyncio.Task[Any] | None = None
        self._finishing: asyncio.Task[Any] | None = None  # a checkpoint's rest, on the worker

    # -- lifecycle ----------------------------------------------------------------------------

    async def _open(self) -> AsyncLog:
        paths = self.paths
        _db.check_filesystem(paths, self._allow_network_fs)
        _db.prepare_files(paths, create=self._create)
        self._write_lock = QueuedLock(paths.write_lock, timeout=self._busy_ms / 1000)
        self._wake = WakeSender(paths.wake_folder)

        def connector() -> sqlite3.Connection:
            conn = _db.connect(paths, durability=self.durability, busy_timeout_ms=self._busy_ms)
            try:
                _db.migrate(conn, self._write_lock)
                _db.forget_stale_note(conn, self._write_lock, paths.db)
            except BaseException:
                conn.close()
                raise
            return conn

        aconn = aiosqlite.Connection(connector, iter_chunk_size=256)
        if not hasattr(aconn, "_execute"):
            raise EventlogError(
                "this aiosqlite lacks Connection._execute",
                hint="install an aiosqlite release between 0.17 and 0.22",
            )
        # A log never closed must not keep the interpreter from exiting (aiosqlite's thread
        # is not a daemon): ended there, it is a process dying mid-call, which SQLite's
        # journal covers and which no append that returned can be part of.
        aconn._thread.daemon = True
        try:
            await aconn  # on failure aiosqlite stops its own thread
        except BaseException:
            # ...and reports that stop to this loop from its thread: wait for it, or a caller
            # that closes the loop right after (asyncio.run) makes that thread raise
            aconn._thread.join(10)
            self._write_lock.close()
            self._wake.close()
            raise
        self._aconn = aconn
        if self.durability == "normal":
            # A commit at synchronous=NORMAL does not fsync: when the lock is free it takes
            # less time on the loop thread than one hop to the worker thread. Checkpoints
            # (which do fsync) are left to the worker thread. The lock file is opened again
            # so that the two threads' flocks exclude each other. Opened after the worker's
            # connection has put the file in WAL mode and migrated it.
            try:
                self._fast_lock = QueuedLock(paths.write_lock)
                self._fast_conn = _db.connect(paths, durability="normal", busy_timeout_ms=0)
                # Only a backstop: a task that appends without ever yielding starves the
                # worker's checkpoints, and under steady load none lands in a quiet moment,
                # so the WAL never restarts. Past 4096 pages (16 MiB) this connection
                # checkpoints inline, and its next commit starts the WAL over.
                self._fast_conn.execute(_sql.AUTOCHECKPOINT_BACKSTOP)
            except BaseException:
                await self.close()
                raise
        return self

    async def close(self) -> None:
        """Finish queued appends, then close. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if os.getpid() != self._pid:
            return  # nothing of the parent's may be touched in a child
        # Tasks of an earlier event loop (the log used under one asyncio.run, closed under
        # another) can no longer run: there is nothing to wait for.
        loop = asyncio.get_running_loop()
        if self._writer is not None and self._writer.get_loop() is loop:
            await asyncio.shield(self._writer)
        if self._finishing is not None and self._finishing.get_loop() is loop:
            await asyncio.gather(self._finishing, return_exceptions=True)
        if self._checkpointer.running:  # its thread may be inside a checkpoint: a few ms
            await asyncio.to_thread(self._checkpointer.close)
        self._close_fast()
        try:
            if self._aconn is not None:
                await self._aconn.close()  # after every job queued on the worker has run
        finally:
            if self._wake is not None:
                self._wake.notify()  # for appends in flight as close() began: they committed
        if self._write_lock is not None:
            self._write_lock.close()
        if self._wake is not None:
            self._wake.close()

    def _close_fast(self) -> None:
        if self._fast_conn is not None:
            self._fast_conn.close()
            self._fast_conn = None
        if self._fast_lock is not None:
            self._fast_lock.close()
            self._fast_lock = None

    async def __aenter__(self) -> AsyncLog:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True) and getattr(self, "_aconn", None) is not None:
            warnings.warn(f"eventlog {self.paths.db} was not closed", ResourceWarning,
                          stacklevel=2)  # fmt: skip

    def _check(self) -> aiosqlite.Connection:
        if self._closed or self._aconn is None:
            raise LogClosed(f"the log {self.paths.db} is closed")
        if os.getpid() != self._pid:
            raise LogForked(
                "this AsyncLog was opened before fork(); its connection belongs to the parent"
            )
        return self._aconn

    async def run(self, plan: Plan[T], mode: Mode) -> T:
        """Drive a plan in one hop to the connection's thread."""
        return await self._in_worker(_db.drive, plan, mode, self._write_lock)

    async def _in_worker(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(connection, *args) on the connection's thread: one hop there and back."""
        aconn = self._check()
        return await aconn._execute(fn, aconn._conn, *args)  # type: ignore[no-untyped-call,no-any-return]

    async def run_write(self, plan: Plan[T]) -> T:
        """Drive a write plan: on the loop thread when durability is normal and the lock is
        free at once (a commit that does not fsync is shorter than a hop), else on the
        worker thread."""
        if self._fast_conn is not None:
            try:
                return _db.drive(self._fast_conn, plan, "write", self._fast_lock, wait=False)
            except _db.WouldBlock:
                pass
        return await self.run(plan, "write")

    # -- writing ------------------------------------------------------------------------------

    async def append(
        self,
        topic: str,
        payload: Any,
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
        dedupe_key: str | None = None,
    ) -> int:
        """Append one event; returns its offset once the commit holding it is durable.

        Cancelling the call may still let the event commit (it may already be in a shared
        transaction); use `dedupe_key` to make a retry safe.
        """
        encoded = _core.encode_event(topic, payload, key, headers, dedupe_key, self.limits)
        return (await self._append([encoded]))[0]

    async def append_many(self, drafts: Iterable[Draft]) -> list[int]:
        """Append all drafts in one transaction: all of them commit, or none."""
        encoded = encode_drafts(drafts, self.limits)
        return await self._append(encoded) if encoded else []

    def _append_now(self, encoded: Sequence[EncodedEvent]) -> list[int] | None:
        """Commit on the loop thread if the write lock is free at once (durability normal
        only); None means it was taken and the append must wait its turn on the worker."""
        if self._fast_conn is None:
            return None
        try:
            offsets = _db.append(
                self._fast_conn,
                encoded,
                self._cache,
                self.default_partitions,
                self._fast_lock,
                wait=False,
            )
        except _db.WouldBlock:
            return None
        assert self._wake is not None
        self._wake.notify()
        self._committed(len(encoded))
        return offsets

    def _committed(self, events: int) -> None:
        """Count an append's commit for the checkpointer; when its thread has run the bulk of
        a checkpoint, finish it on the worker (after the wake-ups, outside the write lock)."""
        assert self._write_lock is not None
        if self._checkpointer.note_commit(events, self._write_lock) and (
            self._finishing is None or self._finishing.done()
        ):
            self._finishing = asyncio.create_task(self._checkpoint_passive())

    async def _checkpoint_passive(self) -> None:
        if self._closed:
            return  # started only as close() awaited it: closing checkpoints anyway
        try:
            await self.run(_db.one_statement(_sql.CHECKPOINT_PASSIVE), "none")
        except EventlogError as exc:
            log.warning("background checkpoint failed: %s", exc)
            _db.mark_io_error(exc, self._write_lock, self.paths.db)

    def _append(self, encoded: Sequence[EncodedEvent]) -> Awaitable[list[int]]:
        self._check()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[int]] = loop.create_future()
        if self._fast_conn is None:
            if not self._alone and not self._pending and self._writer_idle():
                return self._append_alone(encoded)
        elif self._can_commit_inline(encoded, loop):
            offsets = self._append_now(encoded)
            if offsets is not None:
                future.set_result(offsets)
                return future
        self._pending.append((encoded, future))
        if not self._flush_scheduled and self._writer_idle():
            if self._fast_conn is None:
                # Nothing commits on the loop thread: start the writer now. Its first step
                # runs after every coroutine ready now has queued its append: they share it.
                self._writer = asyncio.create_task(self._write_pending())
            else:
                # Flush after every coroutine ready now has queued its append: they share it.
                self._flush_scheduled = True
                loop.call_soon(self._flush)
        return future

    def _writer_idle(self) -> bool:
        return self._writer is None or self._writer.done()

    async def _append_alone(self, encoded: Sequence[EncodedEvent]) -> list[int]:
        """At durability full, an append that finds nothing queued and no writer at work hops
        to the worker itself: two loop passes fewer than handing it to the writer task.
        Appends made meanwhile queue for the writer, whose hop follows this one."""
        self._alone += 1
        try:
            return await self._append_in_worker(encoded)
        finally:
            self._alone -= 1

    async def _append_in_worker(self, encoded: Sequence[EncodedEvent]) -> list[int]:
        try:
            offsets = await self._in_worker(
                _db.append, encoded, self._cache, self.default_partitions, self._write_lock
            )
        except asyncio.CancelledError:
            self._wake_after_worker(len(encoded))  # the job may still commit there
            raise
        self._committed_in_worker(len(encoded))
        return offsets

    def _committed_in_worker(self, events: int) -> None:
        if not self._closed:  # close() wakes the readers itself, after the worker's last job
            assert self._wake is not None
            self._wake.notify()
            self._committed(events)

    def _wake_after_worker(self, events: int) -> None:
        """Wake the readers once the worker has run what is queued there now (the worker runs
        its jobs in order): an append whose caller was cancelled may still commit."""

        async def after_queued_jobs() -> None:
            try:
                await self._in_worker(_nothing)
            except EventlogError:
                return  # closed meanwhile
            self._committed_in_worker(events)

        task = asyncio.create_task(after_queued_jobs())
        self._wakers.add(task)
        task.add_done_callback(self._wakers.discard)

    def _can_commit_inline(
        self, encoded: Sequence[EncodedEvent], loop: asyncio.AbstractEventLoop
    ) -> bool:
        """Whether this append may commit right now, in the caller's own step.

        Only when nothing is queued, and only for the first appending task of this loop
        step (or the task that did so before: a caller awaiting appends one after another).
        Other tasks appending in the same step queue instead and share one transaction.
        Awaiting a finished future does not yield, so after INLINE_PER_STEP commits in one
        step the caller queues once, and the other tasks of the loop get their turn.
        """
        if (
            self._fast_conn is None
            or self._pending
            or len(encoded) > FAST_BATCH_MAX
            or not self._writer_idle()
        ):
            return False
        task = asyncio.current_task()
        if self._step_used and (
            task is not self._inline_task or self._step_inline >= INLINE_PER_STEP
        ):
            return False
        if not self._step_used:
            self._step_used = True
            loop.call_soon(self._end_step)
        self._inline_task = task
        self._step_inline += 1
        return True

    def _end_step(self) -> None:
        self._step_used = False
        self._step_inline = 0

    def _take_batch(self) -> list[tuple[Sequence[EncodedEvent], asyncio.Future[list[int]]]]:
        batch: list[tuple[Sequence[EncodedEvent], asyncio.Future[list[int]]]] = []
        size = 0
        while self._pending and (not batch or size + len(self._pending[0][0]) <= MAX_GROUP_COMMIT):
            entry = self._pending.popleft()
            if entry[1].done():
                continue  # its caller was cancelled before the transaction began
            batch.append(entry)
            size += len(entry[0])
        return batch

    @staticmethod
    def _settle(
        batch: list[tuple[Sequence[EncodedEvent], asyncio.Future[list[int]]]],
        offsets: list[int] | None,
        error: BaseException | None = None,
    ) -> None:
        i = 0
        for encoded, future in batch:
            if not future.done():
                if error is not None:
                    future.set_exception(error)
                else:
                    assert offsets is not None
                    future.set_result(offsets[i : i + len(encoded)])
            i += len(encoded)

    def _flush(self) -> None:
        """Commit small queued appends on the loop thread when possible, else start the
        worker-thread writer."""
        self._flush_scheduled = False
        if not self._writer_idle():
            return
        if self._fast_conn is not None and sum(len(e) for e, _ in self._pending) <= FAST_BATCH_MAX:
            batch = self._take_batch()
            try:
                offsets = self._append_now([e for encoded, _ in batch for e in encoded])
            except Exception as exc:
                self._settle(batch, None, exc)
                return
            if offsets is not None:
                self._settle(batch, offsets)
                return
            self._pending.extendleft(reversed(batch))  # the lock was taken: queue for the worker
        if self._pending:
            self._writer = asyncio.create_task(self._write_pending())

    async def _write_pending(self) -> None:
        while self._pending:
            batch = self._take_batch()
            if not batch:
                continue
            flat = [e for encoded, _ in batch for e in encoded]
            try:
                # big batches go to the worker: the loop stays free while they are written
                offsets = self._append_now(flat) if len(flat) <= FAST_BATCH_MAX else None
                if offsets is None:
                    offsets = await self._append_in_worker(flat)
            except BaseException as exc:
                self._settle(batch, None, exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                continue
            self._settle(batch, offsets)

    async def create_topic(self, name: str, partitions: int = 1, *, exist_ok: bool = True) -> bool:
        """Create a topic with a fixed partition count; False if it already existed."""
        _core.check_name(name, "topic", self.limits)
        _core.check_partitions(partitions, self.limits)
        plan = _core.create_topic_plan(name, partitions, self._cache, exist_ok=exist_ok)
        try:
            return await self.run(plan, "write")
        except BaseException:
            self._cache.forget()  # the plan noted the topic before the commit failed
            raise

    def notify(self) -> None:
        """Wake every waiting reader now (after an outbox append committed elsewhere)."""
        self._check()
        assert self._wake is not None
        self._wake.notify()

    # -- reading ------------------------------------------------------------------------------

    async def head(self) -> int:
        """The largest offset ever handed out (0 for a fresh log); at `full`, once on disk."""
        head = await self.run(_core.head_plan(), "none")
        if head > 0:
            await self._ensure_durable(head)
        return head

    async def topics(self) -> list[TopicInfo]:
        """Every topic with its event count and offsets; at `full`, once those are on disk."""
        return await self.run_read(_core.topics_plan(), _core.newest_topic_offset)

    async def get(self, offset: int) -> Event | None:
        event = await self.run(_core.read_event_plan(offset), "none")
        if event is not None:
            await self._ensure_durable(event.offset)
        return event

    async def run_read(self, plan: Plan[T], newest: Callable[[T], int]) -> T:
        """Drive a read plan whose result hands out events or offsets, and return it once
        the newest of them, `newest(result)`, is on disk (at `full`; 0: none)."""
        result = await self.run(plan, "read")
        offset = newest(result)
        if offset > 0:
            await self._ensure_durable(offset)
        return result

    async def _read_page(self, cursor: _core.ReadCursor, page: int) -> list[Event]:
        return await self.run_read(_core.read_page_plan(cursor, page, True), newest_of)

    async def _ensure_durable(self, newest: int) -> None:
        """At `full`, hand out no event a power cut could still take back (see LogConnection):
        a look at the writers' note, and an fsync on the worker only when it does not cover
        `newest`."""
        aconn = self._check()
        if _db.needs_sync(aconn._conn, self._write_lock, newest):
            await self._in_worker(_db.sync_for_readers, self._write_lock, newest)

    def read(
        self,
        topics: str | Sequence[str],
        *,
        start: str | int | datetime = "earliest",
        follow: bool = False,
        limit: int | None = None,
        page: int = 500,
        stop: asyncio.Event | None = None,
        idle_timeout: float | None = None,
    ) -> AsyncIterator[Event]:
        """Events of the topics (names or patterns) after `start`, in offset order.

        Reads in pages, never holding a read transaction between them. With `follow`, waits
        for new commits from any process without polling hard; ends when `stop` is set or
        after `idle_timeout` seconds without a new event.
        """
        start = _core.check_start(start)
        _core.compile_patterns(topics)
        _core.check_read_options(limit, page)
        _core.check_seconds(idle_timeout, "idle_timeout")
        return self._read(topics, start, follow, limit, page, stop, idle_timeout)

    async def _read(
        self,
        topics: str | Sequence[str],
        start: str | int | datetime,
        follow: bool,
        limit: int | None,
        page: int,
        stop: asyncio.Event | None,
        idle_timeout: float | None,
    ) -> AsyncIterator[Event]:
        waiter = self.waiter() if follow else None
        try:
            cursor = await self.run(_core.open_cursor_plan(topics, start), "read")
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
                events = await self._read_page(cursor, page)
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
                if not await waiter.wait(stop, remaining):
                    return
        finally:
            if waiter is not None:
                waiter.close()

    async def wait_for(
        self,
        topics: str | Sequence[str],
        *,
        match: Callable[[Event], bool] | None = None,
        after: int | None = None,
        timeout: float | None = None,
        cancel: asyncio.Event | None = None,
    ) -> WaitResult:
        """The first event after `after` (default: the head now) that `match` accepts.

        Returns WaitResult("received", event), ("timed_out", None) or ("cancelled", None)
        when `cancel` is set. Note the head before starting the work that appends the event:
        it cannot be missed, even if it commits before this call starts waiting.
        """
        _core.compile_patterns(topics)
        _core.check_wait_for(after, timeout)
        if after is None:
            after = await self.head()
        deadline = None if timeout is None else time.monotonic() + timeout
        waiter = self.waiter()
        try:
            cursor = await self.run(_core.open_cursor_plan(topics, after + 1), "read")
            while True:
                events = await self._read_page(cursor, 500)
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
                if not await waiter.wait(cancel, remaining):
                    if cancel is not None and cancel.is_set():
                        return WaitResult("cancelled", None)
                    return WaitResult("timed_out", None)
        finally:
            waiter.close()

    def waiter(self) -> AsyncWaiter:
        """A wake-up subscription; make it before the first read it should cover."""
        self._check()
        return AsyncWaiter(self.paths, self.durability, self._busy_ms)

    # -- consumer groups ----------------------------------------------------------------------

    def consumer(
        self,
        group: str,
        topics: str | Sequence[str],
        handler: Callable[[Event], Any] | None = None,
        *,
        batch_handler: Callable[[list[Event]], Any] | None = None,
        start: str | int | datetime = "earliest",
        batch_size: int = 100,
        max_attempts: int = 5,
        retry_backoff: float = 0.2,
        max_backoff: float = 30.0,
        timeout: float | None = None,
        hard_timeout: float | None = None,
    ) -> Consumer:
        """A member of consumer group `group`; `await consumer.run()` to start it.

        `start` applies only to partitions the group has no position in yet. A failing event
        is retried with exponential backoff (blocking its partition) up to `max_attempts`,
        then written to the dead-letter file. `timeout` bounds one async handler call;
        `hard_timeout` makes the process record the attempt and exit (code 70).
        """
        from ._consumer import Consumer, ConsumerConfig

        self._check()
        config = ConsumerConfig(
            batch_size=batch_size, max_attempts=max_attempts, retry_backoff=retry_backoff,
            max_backoff=max_backoff, timeout=timeout, hard_timeout=hard_timeout, start=start,
        )  # fmt: skip
        return Consumer(self, group, topics, handler, batch_handler=batch_handler, config=config)

    # -- dead letters and groups --------------------------------------------------------------

    async def dead_letters(
        self,
        *,
        group: str | None = None,
        topic: str | None = None,
        since: datetime | None = None,
        include_requeued: bool = True,
    ) -> _deadletter.Listing:
        """The dead-letter file's entries (filtered), with the lines it could not read."""
        return await asyncio.to_thread(
            _deadletter.filtered, self.paths, group=group, topic=topic,
            include_requeued=include_requeued,
            since_ms=_core.datetime_ms(since) if since is not None else None,
        )  # fmt: skip

    async def requeue_dead_letters(
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
        chosen = await asyncio.to_thread(
            _deadletter.choose, file, ids, group, all, include_requeued=False
        )
        if dry_run or not chosen:
            return chosen
        preparing = asyncio.ensure_future(
            asyncio.to_thread(
                _deadletter.prepare_requeue_marks, file, {e.id for e in chosen}, _core.now_ms()
            )
        )
        try:
            marks = await asyncio.shield(preparing)
        except asyncio.CancelledError:
            # The thread goes on: what it prepares (the file's lock, a temporary file) is
            # dropped when it is done, or no one could rewrite the file again.
            preparing.add_done_callback(_drop_prepared)
            raise
        # Shielded: a caller cancelled now leaves the requests and the marks to be made
        # together (or neither), as an append whose caller was cancelled may still commit.
        finishing = asyncio.ensure_future(self._requeue_prepared(marks))
        self._wakers.add(finishing)
        finishing.add_done_callback(self._wakers.discard)
        await asyncio.shield(finishing)
        return marks.changed

    async def _requeue_prepared(self, marks: _deadletter.Rewrite) -> None:
        with marks:
            if marks.changed:  # under the file's lock: what another requeue did not take
                await self.run(
                    _groups.request_redelivery_plan(redeliveries(marks.changed)), "write"
                )
            await asyncio.to_thread(marks.commit)
        self.notify()

    async def purge_dead_letters(
        self,
        ids: Iterable[str] | None = None,
        *,
        group: str | None = None,
        all: bool = False,
        dry_run: bool = False,
    ) -> list[_deadletter.DeadLetter]:
        """Remove dead letters from the file for good."""
        file = _deadletter.DeadLetterFile(self.paths)
        chosen = await asyncio.to_thread(
            _deadletter.choose, file, ids, group, all, include_requeued=True
        )
        if not dry_run and chosen:
            await asyncio.to_thread(_deadletter.drop, file, {e.id for e in chosen})
        return chosen

    async def group_positions(self, group: str | None = None) -> list[_groups.LanePosition]:
        if group is not None:
            _core.check_name(group, "group", self.limits)
        return await self.run(_groups.positions_plan(group), "read")

    # -- upkeep -------------------------------------------------------------------------------

    async def checkpoint(self) -> tuple[int, int, int]:
        """Checkpoint the WAL and truncate it; returns (busy, wal pages, checkpointed)."""
        return await self._in_worker(_db.checkpoint_truncate, self._write_lock, self.paths.db)


class AsyncWaiter:
    """Waits on the event loop for another process's commit: a datagram on our socket, or a
    changed data_version on the slow fallback poll. Holds no read transaction while waiting.
    """

    def __init__(self, paths: _db.Paths, durability: _db.Durability, busy_ms: int) -> None:
        self.listener = WakeListener(paths.wake_folder)
        try:
            # Used on the loop thread: PRAGMA data_version reads the WAL index and never waits.
            conn = _db.connect(paths, durability=durability, busy_timeout_ms=busy_ms)
            self.watch = DatabaseWatch(paths, conn)
        except BaseException:
            self.listener.close()
            raise
        self._signal = asyncio.Event()
        # Called straight from the datagram's callback: whoever the wait would wake runs one
        # pass of the loop sooner (a consumer's lanes, without going through its pump).
        self.on_wake: Callable[[], None] | None = None
        self._loop = asyncio.get_running_loop()
        self._fd = self.listener.fileno()
        if self._fd >= 0:
            self._loop.add_reader(self._fd, self._on_datagram)

    def _on_datagram(self) -> None:
        # Drain now: a socket left readable calls this again on every pass of the loop.
        self.listener.drain()
        self._signal.set()
        if self.on_wake is not None:
            self.on_wake()

    def _stop_set(self, stopped: asyncio.Future[Any]) -> None:
        if not stopped.cancelled():  # cancelled: that wait() ended on its own
            self._signal.set()

    def poke(self) -> None:
        """Wake the waiter from inside this process (for example, a stop request)."""
        self._signal.set()

    async def wait(
        self, stop: asyncio.Event | None, timeout: float | None, poll_s: float = FALLBACK_POLL_S
    ) -> bool:
        """True when something new may be there; False on stop or timeout. Without a
        datagram, data_version is looked at every `poll_s`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        stopped = asyncio.ensure_future(stop.wait()) if stop is not None else None
        if stopped is not None:
            stopped.add_done_callback(self._stop_set)
        try:
            while True:
                if stop is not None and stop.is_set():
                    return False
                if self._signal.is_set():
                    self._signal.clear()
                    self.listener.drain()
                    return not (stop is not None and stop.is_set())
                if self.watch.changed():
                    self.listener.drain()
                    return True
                step = poll_s if self._fd >= 0 else 0.005
                if deadline is not None:
                    step = min(step, deadline - time.monotonic())
                    if step <= 0:
                        return False
                # One future per step and no task: an idle waiter wakes here a few times a
                # second, and that is most of what idling costs.
                try:
                    async with asyncio.timeout(step):
                        await self._signal.wait()
                except TimeoutError:
                    pass
        finally:
            if stopped is not None:
                stopped.cancel()

    def close(self) -> None:
        if self._fd >= 0:
            self._loop.remove_reader(self._fd)
            self._fd = -1
        self.listener.close()
        self.watch.close()


class _Opener:
    """What `eventlog.open()` returns: awaitable and an async context manager."""

    def __init__(self, log: AsyncLog) -> None:
        self._log = log

    def __await__(self) -> Generator[Any, None, AsyncLog]:
        return self._log._open().__await__()

    async def __aenter__(self) -> AsyncLog:
        return await self._log._open()

    async def __aexit__(self, *exc: object) -> None:
        await self._log.close()


def open(
    path: str | os.PathLike[str],
    *,
    durability: _db.Durability = "full",
    busy_timeout: float = 10.0,
    limits: Limits = DEFAULT_LIMITS,
    default_partitions: int = 1,
    create: bool = True,
    allow_network_fs: bool = False,
) -> _Opener:
    """Open (creating and migrating if needed) the log at `path`.

    `durability="full"` (default) survives power loss; "normal" survives any process crash
    but may lose the last commits to an OS crash or power cut, and is much faster for
    one-at-a-time appends.
    """
    return _Opener(
        AsyncLog(path, durability=durability, busy_timeout=busy_timeout, limits=limits,
                 default_partitions=default_partitions, create=create,
                 allow_network_fs=allow_network_fs)
    )  # fmt: skip
