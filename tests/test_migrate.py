"""The migration runner: numbered files applied once each, in order, each in one transaction;
a failing one changes nothing; an app's own tables are left alone; newer files are refused
(see test_errors) and concurrent first opens are safe (see procs/test_fresh_file_race)."""

from __future__ import annotations

import asyncio
import re
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from conftest import dump, integrity, raw

import eventlog
from eventlog import _db, _sql

MIGRATIONS = _db.load_migrations()


def recorded(db_path: Path) -> list[tuple[int, str, int]]:
    with raw(db_path) as conn:
        return conn.execute(
            "SELECT version, name, applied_at FROM eventlog_schema ORDER BY version"
        ).fetchall()


def test_migration_files_are_numbered_from_one_without_gaps() -> None:
    assert MIGRATIONS, "no migrations found in the package"
    assert [m.version for m in MIGRATIONS] == list(range(1, len(MIGRATIONS) + 1))
    for m in MIGRATIONS:
        assert re.fullmatch(r"\d{4}_[a-z0-9_]+", m.name), m.name
        statements = _db.split_statements(m.sql)
        assert statements
        for statement in statements:
            assert sqlite3.complete_statement(statement)
            # transactions are the runner's: a file must not commit on its own
            assert not re.match(r"\s*(BEGIN|COMMIT|END|ROLLBACK)\b", statement, re.I), statement


async def test_fresh_file_gets_every_migration_recorded_once(open_log: Any, db_path: Path) -> None:
    await open_log()
    rows = recorded(db_path)
    assert [(v, n) for v, n, _ in rows] == [(m.version, m.name) for m in MIGRATIONS]
    with raw(db_path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_schema WHERE type='table'")}
        (events_sql,) = conn.execute(
            "SELECT sql FROM sqlite_schema WHERE name = 'eventlog_events'"
        ).fetchone()
        triggers = {
            r[0] for r in conn.execute("SELECT name FROM sqlite_schema WHERE type='trigger'")
        }
    assert {
        "eventlog_schema",
        "eventlog_topics",
        "eventlog_events",
        "eventlog_offset_floor",
    } <= tables
    # offsets never reused (guarantee 2): the floor, not AUTOINCREMENT's per-insert row write
    assert "AUTOINCREMENT" not in events_sql.upper()
    assert "eventlog_events_keep_floor" in triggers


def _version_one_file(db_path: Path) -> None:
    """A file as eventlog wrote it before migration 0002: AUTOINCREMENT offsets."""
    with raw(db_path) as conn:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("BEGIN")
        conn.execute(_sql.CREATE_SCHEMA_TABLE)
        for statement in _db.split_statements(MIGRATIONS[0].sql):
            conn.execute(statement)
        conn.execute(_sql.RECORD_MIGRATION, (1, MIGRATIONS[0].name, 0))
        conn.execute(
            "INSERT INTO eventlog_topics (name, partitions, created_at) VALUES ('t', 1, 0)"
        )
        conn.executemany(
            "INSERT INTO eventlog_events (topic, partition, key, payload, headers, created_at)"
            " VALUES ('t', 0, ?, ?, ?, ?)",
            [(f"k{i}", f'{{"i": {i}}}', '{"h": "v"}' if i % 2 else None, 1000 + i)
             for i in range(1, 11)],
        )  # fmt: skip
        conn.execute("DELETE FROM eventlog_events WHERE id > 7")  # pruned from the top
        conn.execute("COMMIT")


@pytest.mark.parametrize("open_first", ["sync", "async"])
async def test_version_one_file_upgrades_keeping_events_and_the_offset_high_water_mark(
    db_path: Path, open_first: str
) -> None:
    _version_one_file(db_path)
    with raw(db_path) as conn:
        before = conn.execute("SELECT * FROM eventlog_events ORDER BY id").fetchall()
    assert [r[0] for r in before] == list(range(1, 8))
    if open_first == "sync":
        with eventlog.open_sync(db_path) as log:
            assert log.head() == 10  # offsets 8-10 were handed out, then deleted
            assert log.append("t", "next") == 11
    else:
        async with eventlog.open(db_path) as alog:
            assert await alog.head() == 10
            assert await alog.append("t", "next") == 11
    assert [v for v, _, _ in recorded(db_path)] == [m.version for m in MIGRATIONS]
    with raw(db_path) as conn:
        after = conn.execute("SELECT * FROM eventlog_events WHERE id < 11 ORDER BY id").fetchall()
    assert after == before
    assert integrity(db_path) == ["ok"]


async def test_reopening_applies_nothing_again(open_log: Any, db_path: Path) -> None:
    log = await open_log()
    await log.append("t", 1)
    await log.close()
    first = recorded(db_path)
    before = dump(db_path)
    log = await open_log()
    await log.close()
    assert recorded(db_path) == first
    assert dump(db_path) == before


async def test_pending_migration_is_applied_on_open_and_keeps_data(
    open_log: Any, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = await open_log()
    offset = await log.append("t", "kept")
    await log.close()
    nxt = MIGRATIONS[-1].version + 1
    extra = _db.Migration(nxt, f"{nxt:04d}_extra",
                          "-- a comment\nCREATE TABLE eventlog_extra (a INTEGER);\n"
                          "CREATE INDEX eventlog_extra_a ON eventlog_extra (a);\n")  # fmt: skip
    monkeypatch.setattr(_db, "load_migrations", lambda: [*MIGRATIONS, extra])
    log = await open_log()
    assert (await log.get(offset)).payload == "kept"
    assert [v for v, _, _ in recorded(db_path)] == [m.version for m in MIGRATIONS] + [nxt]
    with raw(db_path) as conn:
        conn.execute("INSERT INTO eventlog_extra VALUES (1)")


async def test_failing_migration_changes_nothing_and_is_not_recorded(
    open_log: Any, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = await open_log()
    await log.append("t", "kept")
    await log.close()
    before = dump(db_path)
    nxt = MIGRATIONS[-1].version + 1
    broken = _db.Migration(nxt, f"{nxt:04d}_broken",
                           "CREATE TABLE eventlog_half (a);\n"
                           "ALTER TABLE eventlog_events ADD COLUMN extra TEXT;\n"
                           "INSERT INTO no_such_table VALUES (1);\n")  # fmt: skip
    monkeypatch.setattr(_db, "load_migrations", lambda: [*MIGRATIONS, broken])
    with pytest.raises(eventlog.EventlogError):
        await open_log()
    assert dump(db_path) == before
    with raw(db_path) as conn:
        assert conn.execute(
            "SELECT count(*) FROM sqlite_schema WHERE name = 'eventlog_half'"
        ).fetchone() == (0,)
        columns = [r[1] for r in conn.execute("PRAGMA table_info(eventlog_events)")]
    assert "extra" not in columns
    # the current code still opens the file
    monkeypatch.setattr(_db, "load_migrations", lambda: MIGRATIONS)
    log = await open_log()
    await log.append("t", "still works")


async def test_application_tables_in_the_same_file_are_left_alone(
    open_log: Any, db_path: Path
) -> None:
    with raw(db_path) as conn:
        conn.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, total REAL)")
        conn.execute("INSERT INTO orders (total) VALUES (9.5)")
    log = await open_log()
    await log.append("t", 1)
    with raw(db_path) as conn:
        assert conn.execute("SELECT * FROM orders").fetchall() == [(1, 9.5)]
    assert integrity(db_path) == ["ok"]


async def test_open_waits_while_another_connection_writes_a_fresh_file(
    open_log: Any, db_path: Path
) -> None:
    # Switching a fresh file to WAL needs an exclusive lock; while another connection holds
    # the reserved lock SQLite returns "locked" without calling the busy handler (it would
    # deadlock). Without waiting of its own, this open failed with DatabaseBusy at once: what
    # two processes opening a brand-new file at the same moment ran into now and then.
    with raw(db_path) as conn:
        # a reserved lock on a file still in rollback mode: the other process is mid-write
        conn.execute("BEGIN IMMEDIATE")
        opening = asyncio.ensure_future(open_log())
        done, _ = await asyncio.wait({opening}, timeout=0.3)
        if done:
            opening.result()  # raises what went wrong
            raise AssertionError("opened while another connection held the write lock")
        conn.execute("COMMIT")
    log = await asyncio.wait_for(opening, 10)
    await log.append("t", 1)
    with raw(db_path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_split_statements_refuses_an_incomplete_statement() -> None:
    assert _db.split_statements("CREATE TABLE a (x);\n-- trailing comment\n") == [
        "CREATE TABLE a (x);"
    ]
    with pytest.raises(eventlog.EventlogError):
        _db.split_statements("CREATE TABLE a (x);\nCREATE TABLE b (y")


def test_upgrade_keeps_an_applications_view_and_trigger_on_the_events_table(
    db_path: Path,
) -> None:
    # Migration 0002 rebuilds eventlog_events: the drop takes the application's trigger with
    # it (the runner puts it back), and a plain rename would refuse the application's view.
    _version_one_file(db_path)
    with raw(db_path) as conn:
        conn.execute(
            "CREATE VIEW app_recent AS SELECT id, payload FROM eventlog_events WHERE id > 5"
        )
        conn.execute("CREATE TABLE app_audit (event_id INTEGER)")
        conn.execute(
            "CREATE TRIGGER app_audit_events AFTER INSERT ON eventlog_events"
            " BEGIN INSERT INTO app_audit VALUES (NEW.id); END"
        )
    with eventlog.open_sync(db_path) as log:
        offset = log.append("t", "after the upgrade")
        # the runner's connection is back to SQLite's normal rename rules
        assert log.run(_db.one_statement("PRAGMA legacy_alter_table"), "none") == [(0,)]
    assert [v for v, _, _ in recorded(db_path)] == [m.version for m in MIGRATIONS]
    with raw(db_path) as conn:
        assert [r[0] for r in conn.execute("SELECT id FROM app_recent")] == [6, 7, offset]
        assert conn.execute("SELECT event_id FROM app_audit").fetchall() == [(offset,)]
    assert integrity(db_path) == ["ok"]
