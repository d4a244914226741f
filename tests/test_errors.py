"""Typed errors with hints: foreign, truncated and too-new files, a busy database, a closed
log; and the mapping from sqlite3/OS errors to the typed ones."""

from __future__ import annotations

import errno
import hashlib
import inspect
import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from conftest import collect, dump, raw

import eventlog
from eventlog import errors


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    "content",
    [
        os.urandom(64 * 1024),
        b"SQLite format 3\x00" + os.urandom(8192),  # the magic, then garbage
        b"id,name\n1,orders\n" * 100,
    ],
    ids=["random bytes", "garbage after the magic", "text"],
)
async def test_foreign_file_gives_not_an_eventlog_database_and_stays_untouched(
    open_log: Any, db_path: Path, content: bytes
) -> None:
    db_path.write_bytes(content)
    before = digest(db_path)
    with pytest.raises(eventlog.NotAnEventlogDatabase) as info:
        await open_log()
    assert info.value.hint
    assert digest(db_path) == before
    assert not Path(f"{db_path}-wal").exists() or Path(f"{db_path}-wal").stat().st_size == 0


async def make_truncated(open_log: Any, db_path: Path, keep: float) -> None:
    log = await open_log()
    for i in range(10):
        await log.append_many([eventlog.Draft(f"t{i % 3}", {"i": i, "pad": "x" * 300})] * 200)
    await log.checkpoint()
    await log.close()
    os.truncate(db_path, int(db_path.stat().st_size * keep) // 4096 * 4096)


@pytest.mark.parametrize("keep", [0.3, 0.6, 0.95])
async def test_truncated_database_gives_corrupt_database(
    open_log: Any, db_path: Path, keep: float
) -> None:
    await make_truncated(open_log, db_path, keep)
    before = digest(db_path)
    with pytest.raises(eventlog.CorruptDatabase) as info:
        log = await open_log()
        # if opening worked, using it must fail with the typed error
        for topic in ("t0", "t1", "t2"):
            await collect(log.read(topic))
        await log.append("t0", "more")
        await log.topics()
    assert "doctor" in info.value.hint
    assert digest(db_path) == before


async def test_too_short_file_is_not_an_eventlog_database(open_log: Any, db_path: Path) -> None:
    await make_truncated(open_log, db_path, 1.0)
    with open(db_path, "r+b") as f:
        f.truncate(50)  # not even a whole header
    with pytest.raises(eventlog.NotAnEventlogDatabase):
        await open_log()


async def test_database_with_newer_schema_gives_schema_too_new(
    open_log: Any, db_path: Path
) -> None:
    log = await open_log()
    await log.append("t", 1)
    await log.close()
    with raw(db_path) as conn:
        conn.execute(
            "INSERT INTO eventlog_schema (version, name, applied_at)"
            " VALUES (9999, '9999_future', 0)"
        )
    before = dump(db_path)
    with pytest.raises(eventlog.SchemaTooNew) as info:
        await open_log()
    assert "upgrade eventlog" in info.value.hint
    assert "9999" in str(info.value)
    assert dump(db_path) == before


async def test_writer_held_too_long_gives_database_busy_and_changes_nothing(
    open_log: Any, db_path: Path
) -> None:
    log = await open_log(busy_timeout=0.2)
    head = await log.append("t", 1)
    with raw(db_path) as conn:
        conn.execute("BEGIN IMMEDIATE")
        try:
            before = dump(db_path)  # another connection can still read
            with pytest.raises(eventlog.DatabaseBusy) as info:
                await log.append("t", 2)
            assert info.value.hint
        finally:
            conn.execute("ROLLBACK")
    assert dump(db_path) == before
    assert await log.append("t", 3) == head + 1


async def test_closed_log_raises_log_closed(open_log: Any) -> None:
    log = await open_log()
    await log.append("t", 1)
    await log.close()
    await log.close()  # twice is fine
    with pytest.raises(eventlog.LogClosed):
        await log.append("t", 2)
    with pytest.raises(eventlog.LogClosed):
        await log.head()
    with pytest.raises(eventlog.LogClosed):
        await collect(log.read("t"))


def test_every_error_is_an_eventlog_error_with_a_hint() -> None:
    classes = [
        c for _, c in inspect.getmembers(errors, inspect.isclass)
        if issubclass(c, Exception) and c.__module__ == errors.__name__
    ]  # fmt: skip
    assert len(classes) > 10
    for cls in classes:
        assert issubclass(cls, eventlog.EventlogError)
        if cls is not eventlog.EventlogError:
            assert cls.hint, f"{cls.__name__} has no hint"
        assert getattr(eventlog, cls.__name__) is cls, f"{cls.__name__} is not exported"
    # usable with the standard exception families too
    assert issubclass(eventlog.InvalidPayload, ValueError)
    assert issubclass(eventlog.InvalidName, ValueError)
    assert issubclass(eventlog.NotFound, LookupError)
    assert issubclass(eventlog.StorageError, OSError)
    assert issubclass(eventlog.LogClosed, RuntimeError)


def test_hint_can_be_overridden_per_instance() -> None:
    exc = eventlog.TopicConflict("boom", hint="pick another name")
    assert exc.hint == "pick another name"
    assert eventlog.TopicConflict("boom").hint == eventlog.TopicConflict.hint


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (
            sqlite3.OperationalError("attempt to write a readonly database"),
            eventlog.ReadOnlyDatabase,
        ),
        (sqlite3.OperationalError("unable to open database file"), eventlog.ReadOnlyDatabase),
        (sqlite3.OperationalError("database or disk is full"), eventlog.DiskFull),
        (sqlite3.DatabaseError("file is not a database"), eventlog.NotAnEventlogDatabase),
        (sqlite3.DatabaseError("database disk image is malformed"), eventlog.CorruptDatabase),
        (sqlite3.OperationalError("database is locked"), eventlog.DatabaseBusy),
        (
            sqlite3.OperationalError("no such table: eventlog_events"),
            eventlog.NotAnEventlogDatabase,
        ),
        (sqlite3.OperationalError("something else"), eventlog.StorageError),
        (OSError(errno.ENOSPC, "No space left on device"), eventlog.DiskFull),
        (OSError(errno.EACCES, "Permission denied"), eventlog.ReadOnlyDatabase),
        (OSError(errno.EROFS, "Read-only file system"), eventlog.ReadOnlyDatabase),
        (OSError(errno.EIO, "I/O error"), eventlog.StorageError),
    ],
)
def test_translate_maps_low_level_errors_to_typed_ones(
    exc: BaseException, expected: type[eventlog.EventlogError]
) -> None:
    translated = errors.translate(exc)
    assert type(translated) is expected
    assert str(exc) in str(translated)


def test_translate_keeps_eventlog_errors() -> None:
    exc = eventlog.InvalidName("bad")
    assert errors.translate(exc) is exc
