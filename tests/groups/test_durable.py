"""Guarantee 1 at `full`: the WAL is fsynced after the write lock is let go and before an append
returns, and a reader at `full` hands out only events that a finished fsync covers (its own,
or one a writer noted), so no one acts on an event a power cut could still take back."""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import eventlog
from eventlog import _db, _locks

from .conftest import append_elsewhere, raw, running, until


@dataclass(frozen=True)
class Fsync:
    target: str  # the file the descriptor names
    events: int  # events committed (visible to another connection) when it started
    write_locked: bool  # whether anyone held the write lock meanwhile


class Fsyncs:
    """os.fdatasync, recording what each call saw before running it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, db: Path) -> None:
        self.calls: list[Fsync] = []
        real = os.fdatasync
        lock = _db.Paths.for_db(db).write_lock

        def fdatasync(fd: int) -> None:
            with raw(db) as conn:
                (events,) = conn.execute("SELECT count(*) FROM eventlog_events").fetchone()
            self.calls.append(Fsync(os.readlink(f"/proc/self/fd/{fd}"), events,
                                    _locks.is_locked(lock)))  # fmt: skip
            real(fd)

        monkeypatch.setattr(os, "fdatasync", fdatasync)

    def of_wal(self) -> list[Fsync]:
        return [c for c in self.calls if c.target.endswith(".db-wal")]


@pytest.fixture
def fsyncs(monkeypatch: pytest.MonkeyPatch, db_path: Path) -> Fsyncs:
    return Fsyncs(monkeypatch, db_path)


async def collect(events: Any) -> list[eventlog.Event]:
    return [event async for event in events]


async def test_an_append_at_full_returns_after_an_fsync_of_its_commit_outside_the_lock(
    log: Any, fsyncs: Fsyncs
) -> None:
    await log.create_topic("t")
    for n in range(1, 4):
        fsyncs.calls.clear()
        await log.append("t", {"n": n})
        # The fsync started once the event was committed, with the write lock let go.
        assert fsyncs.of_wal() == [Fsync(fsyncs.of_wal()[0].target, n, False)]
    fsyncs.calls.clear()
    await log.append_many([eventlog.Draft("t", {"n": n}) for n in range(10)])
    assert [(c.events, c.write_locked) for c in fsyncs.of_wal()] == [(13, False)]


@pytest.mark.parametrize("durability", ["normal"])
async def test_an_append_at_normal_does_not_fsync(log: Any, fsyncs: Fsyncs) -> None:
    await log.create_topic("t")
    for n in range(3):
        await log.append("t", {"n": n})
    assert fsyncs.of_wal() == []


def sqlite_synchronous(log: Any) -> int:
    conn = log.sync._conn if hasattr(log, "sync") else log._aconn._conn
    return int(conn.execute("PRAGMA synchronous").fetchone()[0])


async def test_without_a_descriptor_of_its_own_the_wal_is_fsynced_by_sqlite_in_the_commit(
    open_log: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def refuse(self: _db.WalFile, db: Path) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(_db.WalFile, "__init__", refuse)
    with caplog.at_level(logging.WARNING, logger="eventlog"):
        log = await open_log()
    call = log.call if hasattr(log, "sync") else log._aconn._execute
    assert await call(sqlite_synchronous, log) == 2  # FULL
    assert "synchronous=FULL" in caplog.text


async def test_a_reader_at_full_fsyncs_before_it_hands_out_events_no_writer_noted(
    open_log: Any, db_path: Path, fsyncs: Fsyncs
) -> None:
    # A `normal` writer neither fsyncs nor notes: its events may still be lost to a power cut.
    writer = await open_log(durability="normal")
    offsets = [await writer.append("t", {"n": n}) for n in range(5)]
    reader = await open_log()
    fsyncs.calls.clear()
    got = await collect(reader.read("t"))
    assert [e.offset for e in got] == offsets
    assert len(fsyncs.of_wal()) == 1
    # What it made sure of once, it does not fsync again.
    assert [e.offset for e in await collect(reader.read("t"))] == offsets
    assert await reader.get(offsets[-1]) is not None
    assert len(fsyncs.of_wal()) == 1

    offsets.append(await writer.append("t", {"n": 5}))
    fsyncs.calls.clear()
    event = await reader.get(offsets[-1])
    assert event is not None and event.offset == offsets[-1]
    assert len(fsyncs.of_wal()) == 1


async def test_a_reader_at_full_takes_the_word_of_a_writer_in_another_process(
    open_log: Any, db_path: Path, fsyncs: Fsyncs
) -> None:
    reader = await open_log()
    offsets = append_elsewhere(db_path, [{"topic": "t", "payload": {"n": n}} for n in range(5)])
    fsyncs.calls.clear()
    assert [e.offset for e in await collect(reader.read("t"))] == offsets
    assert fsyncs.of_wal() == []


async def test_a_consumer_at_full_handles_only_events_on_disk(
    db_path: Path, fsyncs: Fsyncs
) -> None:
    async with eventlog.open(db_path, durability="normal") as writer:
        offsets = [await writer.append("t", {"n": n}) for n in range(3)]
    fsyncs.calls.clear()
    seen: list[int] = []

    async def handle(event: eventlog.Event) -> None:
        seen.append(len(fsyncs.of_wal()))

    async with eventlog.open(db_path) as log, running(log.consumer("g", "t", handle)):
        await until(lambda: len(seen) == len(offsets))
    assert seen[0] >= 1


async def test_the_writers_note_names_its_database_file(open_log: Any, db_path: Path) -> None:
    """A database file replaced under the same name (a restored backup) starts without a note:
    the old file's offsets say nothing about the new one."""
    log = await open_log()
    offset = await log.append("t", {"n": 0})
    lock = log.sync._write_lock if hasattr(log, "sync") else log._write_lock
    stat = os.stat(db_path)
    assert lock.durable_through((stat.st_dev, stat.st_ino)) == offset
    assert lock.durable_through((stat.st_dev, stat.st_ino + 1)) == 0


def test_the_note_only_grows_and_a_busy_note_claims_nothing(tmp_path: Path) -> None:
    path = tmp_path / "write.lock"
    one, two = _locks.QueuedLock(path), _locks.QueuedLock(path)
    a, b = (1, 10), (1, 11)
    try:
        one.note_durable(a, 5)
        two.note_durable(a, 3)  # a writer whose fsync finished later, for an earlier commit
        assert one.durable_through(a) == two.durable_through(a) == 5
        two.note_durable(b, 2)  # another file under the same name
        assert one.durable_through(b) == 2 and one.durable_through(a) == 0

        # While another writer is noting, a reader does not read half a note, and a second
        # writer does not wait: it skips its note (a later one covers it).
        assert _locks._ofd_lock(one._queue, _locks._NOTE_GUARD, _locks.fcntl.F_WRLCK)
        assert two.durable_through(b) == 0
        two.note_durable(b, 9)
        _locks._ofd_lock(one._queue, _locks._NOTE_GUARD, _locks.fcntl.F_UNLCK)
        assert two.durable_through(b) == 2
    finally:
        one.close()
        two.close()


def test_a_read_only_connection_still_syncs_for_its_readers(db_path: Path) -> None:
    with eventlog.open_sync(db_path, durability="normal") as writer:
        writer.append("t", {"n": 0})
        conn = _db.connect(_db.Paths.for_db(db_path), durability="full", busy_timeout_ms=1000,
                           read_only=True)  # fmt: skip
        try:
            assert isinstance(conn, _db.LogConnection) and conn.wal is not None
            assert _db.needs_sync(conn, None, 1)
            _db.sync_for_readers(conn, None, 1)
            assert not _db.needs_sync(conn, None, 1)
            with pytest.raises(sqlite3.OperationalError):
                conn.execute("DELETE FROM eventlog_events")
        finally:
            conn.close()


ELSEWHERE = """
import sys, eventlog
try:
    with eventlog.open_sync(sys.argv[1]) as log:
        print(log.append("t", {"elsewhere": True}))
except eventlog.StorageError as exc:
    print(type(exc).__name__, exc)
"""


async def test_a_failed_fsync_holds_every_process_until_a_checkpoint_moves_the_wal(
    log: Any, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel reports a failed write-back once per descriptor: a later fsync can succeed
    while the failed pages never reached the disk, and every later commit in the WAL depends
    on them. So after one failed fsync no process writes or hands out anything as durable
    until a checkpoint has put the whole WAL into the database file, fsynced."""
    await log.create_topic("t")
    real = os.fdatasync

    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", failing)
    with pytest.raises(eventlog.StorageError, match="Input/output error"):
        await log.append("t", {"n": 1}, dedupe_key="order-1")
    monkeypatch.setattr(os, "fdatasync", real)
    with raw(db_path) as conn:
        (stored,) = conn.execute("SELECT id FROM eventlog_events").fetchone()

    held = "fsync of the log's WAL failed"
    with pytest.raises(eventlog.StorageError, match=held):
        await log.append("t", {"n": 2})
    with eventlog.open_sync(db_path) as reader, pytest.raises(eventlog.StorageError, match=held):
        list(reader.read("t"))
    elsewhere = subprocess.run([sys.executable, "-c", ELSEWHERE, os.fspath(db_path)],
                               capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    assert elsewhere.stdout.startswith("StorageError") and held in elsewhere.stdout
    with raw(db_path) as conn:  # nothing was written meanwhile
        assert conn.execute("SELECT count(*) FROM eventlog_events").fetchone() == (1,)

    busy, _, _ = await log.checkpoint()
    assert busy == 0 and os.path.getsize(f"{db_path}-wal") == 0
    fsyncs = Fsyncs(monkeypatch, db_path)
    # The event whose fsync failed is in the database file now: a retry with its dedupe key
    # gets its offset back, and appends and reads go on.
    assert await log.append("t", {"n": 1}, dedupe_key="order-1") == stored
    assert len(fsyncs.of_wal()) == 1
    assert [e.offset for e in await collect(log.read("t"))] == [stored]
    assert await log.append("t", {"n": 2}) > stored


async def test_a_topic_found_created_is_on_disk_before_create_topic_says_so(
    log: Any, db_path: Path, fsyncs: Fsyncs
) -> None:
    with eventlog.open_sync(db_path, durability="normal") as other:
        other.create_topic("t", partitions=4)  # committed; a power cut could still take it
    fsyncs.calls.clear()
    assert await log.create_topic("t", partitions=4) is False
    assert len(fsyncs.of_wal()) == 1


@pytest.mark.parametrize("ask", ["head", "topics"])
async def test_head_and_topics_at_full_name_only_offsets_on_disk(
    open_log: Any, fsyncs: Fsyncs, ask: str
) -> None:
    """wait_for and consumers starting at `latest` take the head as the point after which
    they look: an offset a power cut could still take back would be given out again."""
    writer = await open_log(durability="normal")
    offsets = [await writer.append("t", {"n": n}) for n in range(3)]
    reader = await open_log()

    async def newest() -> int:
        if ask == "head":
            return int(await reader.head())
        (topic,) = await reader.topics()
        return int(topic.last_offset)

    fsyncs.calls.clear()
    assert await newest() == offsets[-1]
    assert [c.events for c in fsyncs.of_wal()] == [3]
    assert await newest() == offsets[-1]
    assert len(fsyncs.of_wal()) == 1  # what it made sure of once, it does not fsync again


def test_a_backup_holds_only_events_on_disk_in_its_source(
    db_path: Path, tmp_path: Path, fsyncs: Fsyncs
) -> None:
    from eventlog import _backup

    writer = eventlog.open_sync(db_path, durability="normal")
    try:
        writer.append_many([eventlog.Draft("t", {"n": n}) for n in range(5)])
        fsyncs.calls.clear()
        _backup.backup(_db.Paths.for_db(db_path), tmp_path / "copy.db")
        assert [c.events for c in fsyncs.of_wal()] == [5]
    finally:
        writer.close()
    with eventlog.open_sync(tmp_path / "copy.db") as copy:
        assert copy.head() == 5


@pytest.mark.parametrize("durability", ["normal", "full"])
async def test_a_note_left_for_an_earlier_file_with_the_same_inode_is_forgotten_at_open(
    open_log: Any, db_path: Path, durability: str
) -> None:
    """The note names its database by inode number, and a database deleted and created again
    (its queue file kept) can get the same number: the first open of the new file, at either
    durability, forgets a note that claims more than the file holds, and keeps a true one."""
    with eventlog.open_sync(db_path, durability="normal") as log:
        log.append_many([eventlog.Draft("t", {"n": n}) for n in range(3)])
    file_id = _db.database_file_id(db_path)
    writers = _locks.QueuedLock(_db.Paths.for_db(db_path).write_lock)
    try:
        writers.note_durable(file_id, 50)  # as the earlier file's writers left it
        await open_log(durability=durability)
        assert writers.durable_through(file_id) == 0
        writers.note_durable(file_id, 3)
        await open_log(durability=durability)
        assert writers.durable_through(file_id) == 3
    finally:
        writers.close()


def test_failed_fsyncs_are_counted_and_a_checkpoint_clears_only_those_it_saw(
    tmp_path: Path,
) -> None:
    """A failure marked while a checkpoint runs is not cleared by it; an open that forgets a
    stale note leaves a failure marked (the head it compared was read before the guard)."""
    writers = _locks.QueuedLock(tmp_path / "write.lock")
    try:
        writers.mark_wal_failed((1, 2))
        seen = writers.wal_failures((1, 2))
        writers.mark_wal_failed((1, 2))  # during the checkpoint
        writers.clear_wal_failed((1, 2), seen)
        assert writers.wal_failures((1, 2)) == 2
        writers.drop_note_beyond((1, 2), 0)
        assert writers.wal_failures((1, 2)) == 2 and writers.wal_failures((1, 3)) == 0
        writers.clear_wal_failed((1, 2), 2)
        assert writers.wal_failures((1, 2)) == 0
    finally:
        writers.close()


async def test_a_log_whose_wal_sqlite_fsyncs_itself_is_held_too(
    open_log: Any, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a descriptor of its own (SQLite's FULL fsyncs in the commit), a log still
    refuses once another process's fsync failed: its commits would follow the failed pages."""
    log = await open_log()
    await log.append("t", {"n": 0})
    writers = _locks.QueuedLock(_db.Paths.for_db(db_path).write_lock)
    try:
        writers.mark_wal_failed(_db.database_file_id(db_path))

        def refuse(self: _db.WalFile, db: Path) -> None:
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(_db.WalFile, "__init__", refuse)
        fallback = await open_log()
        with pytest.raises(eventlog.StorageError, match="fsync of the log's WAL failed"):
            await fallback.append("t", {"n": 1})
        assert (await log.checkpoint())[0] == 0
        assert await fallback.append("t", {"n": 1}) == 2
    finally:
        writers.close()


def test_an_io_error_sqlite_reports_in_a_checkpoint_holds_the_log_too(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite's checkpoints fsync through descriptors of its own; once one of them reported a
    failed write-back, ours would not: an I/O error from a checkpoint is marked like ours."""
    with eventlog.open_sync(db_path) as log:
        log.append("t", {"n": 0})
        error = sqlite3.OperationalError("disk I/O error")
        error.sqlite_errorcode = sqlite3.SQLITE_IOERR_FSYNC  # type: ignore[attr-defined]
        try:
            raise eventlog.StorageError("SQLite failed: disk I/O error") from error
        except eventlog.StorageError as exc:
            _db.mark_io_error(exc, log._write_lock, db_path)
        with pytest.raises(eventlog.StorageError, match="fsync of the log's WAL failed"):
            log.append("t", {"n": 1})
        _db.mark_io_error(eventlog.StorageError("busy"), log._write_lock, db_path)  # no I/O error
        assert log.checkpoint()[0] == 0
        assert log.append("t", {"n": 1}) == 2


def test_a_writer_stopped_holding_the_notes_guard_holds_no_one_up(tmp_path: Path) -> None:
    """The guard is held for microseconds, but a holder stopped in it (SIGSTOP) must not hang
    the others: a failed fsync is still marked, a checkpoint leaves the mark (it could lose
    one made meanwhile), and neither waits longer than QUEUE_PATIENCE."""
    path = tmp_path / "write.lock"
    stopped, other = _locks.QueuedLock(path), _locks.QueuedLock(path)
    try:
        assert _locks._ofd_lock(stopped._queue, _locks._NOTE_GUARD, _locks.fcntl.F_WRLCK)
        started = time.monotonic()
        other.mark_wal_failed((1, 2))
        other.clear_wal_failed((1, 2), 1)
        other.drop_note_beyond((1, 2), 0)
        assert time.monotonic() - started < 10 * _locks.QUEUE_PATIENCE + 1
        assert other.wal_failures((1, 2)) == 1
        _locks._ofd_lock(stopped._queue, _locks._NOTE_GUARD, _locks.fcntl.F_UNLCK)
        other.clear_wal_failed((1, 2), 1)
        assert other.wal_failures((1, 2)) == 0
    finally:
        stopped.close()
        other.close()
