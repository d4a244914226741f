"""Maintenance paths, from a review: lag estimates across an offset gap, verbs that must not
turn a file that is not a log into one, backups of backups, stale dead letters beside a
replaced backup, a doctor that migrates what it checks, and a forced prune that says nothing
about the groups it skips."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from conftest import cli, dead_letter_entry, sql
from test_migrate import _version_one_file

import eventlog
from eventlog import _deadletter, _retention, _stats
from eventlog._db import Paths


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def rows(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def dead_letter(db: Path, group: str, topic: str, offset: int) -> str:
    entry = dead_letter_entry(group=group, topic=topic, offset=offset, payload={"n": offset})
    _deadletter.DeadLetterFile(Paths.for_db(db)).append(entry)
    return entry.id


# -- stats / groups / doctor: lag estimated across a gap of offsets -------------------------------


@pytest.mark.parametrize("gap", ["late topic", "forced prune"])
def test_estimated_lag_counts_the_lane_not_the_offsets_below_its_first_event(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gap: str
) -> None:
    """A group whose position sits below a lane's first event (a topic created after many
    other events, or a lane pruned past the group) has every event of the lane to go. The
    estimate beyond LAG_CAP must not spread the lane's events over the empty offsets below."""
    monkeypatch.setattr(_stats, "LAG_CAP", 50)
    db = tmp_path / "app.db"
    with eventlog.open_sync(db) as log:
        if gap == "late topic":
            log.append_many([eventlog.Draft("other", {"i": i}) for i in range(5000)])
            log.append_many([eventlog.Draft("b", {"i": i}) for i in range(500)])
            sql(db, "INSERT INTO eventlog_group_offsets VALUES ('g', 'b', 0, 0, NULL, NULL, 0)")
        else:
            log.append_many([eventlog.Draft("b", {"i": i}) for i in range(5500)])
            sql(db, "INSERT INTO eventlog_group_offsets VALUES ('g', 'b', 0, 10, NULL, NULL, 0)")
            _retention.prune(log, _retention.Retention(keep_last=500), force=True)
        assert sql(db, "SELECT count(*) FROM eventlog_events WHERE topic = 'b'") == [(500,)]
        (lag,) = _stats.stats(log).lags
        assert not lag.exact
        assert lag.lag == pytest.approx(500, rel=0.1), lag


# -- non-init verbs on files that are not logs ----------------------------------------------------


def _foreign_sqlite(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
    conn.execute("INSERT INTO users (name) VALUES ('ada')")
    conn.commit()
    conn.close()


def test_open_with_create_false_refuses_a_foreign_sqlite_file(tmp_path: Path) -> None:
    app = tmp_path / "app.db"
    _foreign_sqlite(app)
    before = digest(app)
    try:
        log = eventlog.open_sync(app, create=False)
    except eventlog.NotAnEventlogDatabase:
        pass
    else:
        log.close()
        pytest.fail("opened (and migrated) a foreign SQLite file with create=False")
    assert digest(app) == before


@pytest.mark.parametrize(
    "content", [b"notes, not a database\n", b"SQLite format 3\x00" + b"\xff" * 4000],
    ids=["text", "garbage after the magic"],
)  # fmt: skip
def test_a_file_that_is_not_sqlite_gets_no_sidecar_folder_from_any_open(
    tmp_path: Path, content: bytes
) -> None:
    """A wrong --db leaves no trace: the sidecar folder (locks, wake-ups) used to be made
    before SQLite found the file was not a database, by every verb and by open()."""
    path = tmp_path / "notes.txt"
    path.write_bytes(content)
    for verb in (["topics"], ["init"], ["append", "t", "{}"], ["doctor"], ["backup", "b.db"]):
        out = cli(path, *verb)
        assert out.returncode == 1 and "Traceback" not in out.stderr, (verb, out.stderr)
    with pytest.raises(eventlog.NotAnEventlogDatabase):
        eventlog.open_sync(path)

    async def open_async() -> None:
        await eventlog.open(path)

    with pytest.raises(eventlog.NotAnEventlogDatabase):
        asyncio.run(open_async())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    assert path.read_bytes() == content


def test_migrate_on_an_empty_file_does_not_turn_it_into_a_log(tmp_path: Path) -> None:
    """Every other verb refuses an empty file ('only init may make it a log'); `migrate`
    read its version through a connection that switched it to WAL first, then migrated it."""
    empty = tmp_path / "empty.db"
    empty.touch()
    out = cli(empty, "migrate")
    assert out.returncode == 1 and "init" in out.stderr, (out.stdout, out.stderr)
    assert empty.stat().st_size == 0


def test_backup_of_an_empty_file_leaves_it_empty(tmp_path: Path) -> None:
    empty = tmp_path / "empty.db"
    empty.touch()
    out = cli(empty, "backup", str(tmp_path / "copy.db"))
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert empty.stat().st_size == 0
    assert not (tmp_path / "copy.db").exists()


# -- backup ---------------------------------------------------------------------------------------


def test_a_backup_of_a_backup_copies_it_and_its_dead_letters(tmp_path: Path) -> None:
    """A backup has no sidecar folder until something opens it: backing it up again (to
    rotate, or to move it) must work, with its dead-letter file, and without a traceback."""
    src = tmp_path / "app.db"
    with eventlog.open_sync(src) as log:
        log.append_many([eventlog.Draft("orders", {"n": i}) for i in range(5)])
    dead_letter(src, "billing", "orders", 3)
    first = tmp_path / "first.db"
    assert cli(src, "backup", str(first)).returncode == 0
    assert not Paths.for_db(first).sidecar.exists()
    second = tmp_path / "second.db"
    out = cli(first, "--json", "backup", str(second))  # conftest.cli: never a traceback
    assert out.returncode == 0, out.stderr
    assert rows(out.stdout)[0]["deadletter"] == str(Paths.for_db(second).deadletter)
    with eventlog.open_sync(second) as log:
        assert log.head() == 5 and log.append("orders", {"n": 5}) == 6
        assert [e.offset for e in log.dead_letters().entries] == [3]


def test_a_backup_over_an_old_one_does_not_keep_the_old_ones_dead_letters(tmp_path: Path) -> None:
    """`backup DEST --force` replaces DEST; a dead-letter file left beside it by the backup it
    replaces belongs to another log (or another time): requeuing from it would redeliver
    events that are not the ones named."""
    one, two = tmp_path / "one.db", tmp_path / "two.db"
    for db in (one, two):
        with eventlog.open_sync(db) as log:
            log.append_many([eventlog.Draft("orders", {"db": db.name, "n": i}) for i in range(5)])
    dead_letter(one, "billing", "orders", 3)
    dest = tmp_path / "latest.db"
    assert cli(one, "backup", str(dest)).returncode == 0
    assert Paths.for_db(dest).deadletter.exists()
    out = cli(two, "--json", "backup", str(dest), "--force")
    assert out.returncode == 0, out.stderr
    assert rows(out.stdout)[0]["deadletter"] is None
    assert not Paths.for_db(dest).deadletter.exists(), "one.db's dead letters sit beside two.db"


# -- doctor ---------------------------------------------------------------------------------------


def test_doctor_reports_an_old_schema_instead_of_migrating_the_file_it_checks(
    tmp_path: Path,
) -> None:
    """doctor has a schema check ('run eventlog migrate'), but it opened the log first, which
    applied the migrations (0002 rebuilds the events table): the check could never fail, and
    `eventlog --db /backups/old.db doctor` rewrote the backup it was asked to look at."""
    db = tmp_path / "old.db"
    _version_one_file(db)
    out = cli(db, "--json", "doctor")
    checks = {r["check"]: r for r in rows(out.stdout)}
    assert sql(db, "SELECT max(version) FROM eventlog_schema") == [(1,)]
    assert checks["schema"]["status"] == "fail", checks


# -- prune --force: the groups it skips -----------------------------------------------------------


def test_forced_prune_names_the_groups_whose_unhandled_events_it_deleted(tmp_path: Path) -> None:
    """Without --force, prune keeps what a group has not handled and names the group. With
    --force those events go, and the group later jumps over them without a word (its next
    fetch reads after its position): prune is the only place that can say so, and it must."""
    db = tmp_path / "app.db"
    with eventlog.open_sync(db) as log:
        log.append_many([eventlog.Draft("orders", {"n": i}) for i in range(10)])
    sql(db, "INSERT INTO eventlog_group_offsets VALUES ('billing', 'orders', 0, 6, NULL, NULL, 0)")
    out = cli(db, "prune", "--keep-last", "2", "--force")
    assert out.returncode == 0
    assert "deleted 8 events" in out.stdout
    assert "billing" in out.stderr + out.stdout, (out.stdout, out.stderr)
    dry = cli(db, "--json", "prune", "--keep-last", "0", "--force", "--dry-run")
    assert len(rows(dry.stdout)) == 1 and "billing" in dry.stderr, (dry.stdout, dry.stderr)


def test_forced_prune_counts_a_requeued_dead_letter_as_one_unhandled_event(tmp_path: Path) -> None:
    """A group that handled all ten events but has event 3 requeued: forcing a prune of all
    of them takes one event it has not handled yet, not the eight from 3 on."""
    db = tmp_path / "app.db"
    with eventlog.open_sync(db) as log:
        log.append_many([eventlog.Draft("orders", {"n": i}) for i in range(10)])
    sql(db, "INSERT INTO eventlog_group_offsets VALUES ('billing', 'orders', 0, 10, NULL, NULL, 0)")
    dead_letter(db, "billing", "orders", 3)
    with eventlog.open_sync(db) as log:
        assert len(log.requeue_dead_letters(all=True)) == 1
        report = _retention.prune(log, _retention.Retention(None, 0, None), force=True)
    assert report.events == 10
    assert report.unhandled == 1
    # and a group behind as well: its events from its position on, the requeued one below it
    with eventlog.open_sync(db) as log:
        log.append_many([eventlog.Draft("orders", {"n": i}) for i in range(10)])  # 11..20
    sql(db, "UPDATE eventlog_group_offsets SET position = 15")
    sql(db, "INSERT INTO eventlog_redeliveries VALUES ('billing', 12, 'x', 0)")
    with eventlog.open_sync(db) as log:
        report = _retention.prune(log, _retention.Retention(None, 0, None), force=True)
    assert report.unhandled == 5 + 1


def test_forced_prune_counts_every_requeued_dead_letter_of_a_group_in_a_lane(
    tmp_path: Path,
) -> None:
    """A group that handled all ten events but has events 3 and 5 requeued: forcing a prune of
    all of them takes two events it has not handled yet (it said one: the holds name only
    each group's first requeued event per lane)."""
    db = tmp_path / "app.db"
    with eventlog.open_sync(db) as log:
        log.append_many([eventlog.Draft("orders", {"n": i}) for i in range(10)])
    sql(db, "INSERT INTO eventlog_group_offsets VALUES ('billing', 'orders', 0, 10, NULL, NULL, 0)")
    file = _deadletter.DeadLetterFile(Paths.for_db(db))
    for offset in (3, 5):
        file.append(dead_letter_entry(offset=offset, payload={"n": offset}))
    with eventlog.open_sync(db) as log:
        assert len(log.requeue_dead_letters(all=True)) == 2
        dry = _retention.prune(log, _retention.Retention(None, 0, None), force=True,
                               dry_run=True)  # fmt: skip
        report = _retention.prune(log, _retention.Retention(None, 0, None), force=True)
    assert dry.unhandled == 2
    assert report.events == 10 and report.unhandled == 2
