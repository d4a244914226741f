"""The command line through typer's test runner: every verb's success, its --json shape, and
its bad inputs with their exit status (1 for an error, 2 for a usage error), never a
traceback. Outcomes are checked with plain sqlite3 where the database is concerned.

Real processes (live consumers, Ctrl-C, broken pipes, the console script) are in
tests/test_cli_procs.py.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import sql
from typer.testing import CliRunner

import eventlog
from eventlog import _db, _deadletter, _members, _stats, _sync, _times
from eventlog._db import Paths, load_migrations
from eventlog._locks import QueuedLock
from eventlog.cli import app

runner = CliRunner()
LATEST_SCHEMA = load_migrations()[-1].version


# -- helpers ----------------------------------------------------------------------------------


class Run:
    def __init__(self, result: Any) -> None:
        self.code: int = result.exit_code
        self.out: str = result.stdout
        self.err: str = result.stderr

    def rows(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.out.splitlines() if line.strip()]

    def __repr__(self) -> str:
        return f"exit {self.code}\n--- stdout\n{self.out}\n--- stderr\n{self.err}"


def cli(db: Path | None, *args: Any, input: str | None = None) -> Run:
    argv = (["--db", str(db)] if db is not None else []) + [str(a) for a in args]
    result = runner.invoke(app, argv, input=input, env={"EVENTLOG_DB": None},
                           catch_exceptions=False)  # fmt: skip
    run = Run(result)
    assert "Traceback" not in run.err, run
    return run


def ok(db: Path | None, *args: Any, input: str | None = None) -> Run:
    run = cli(db, *args, input=input)
    assert run.code == 0, run
    return run


def fails(code: int, db: Path | None, *args: Any, input: str | None = None) -> Run:
    run = cli(db, *args, input=input)
    assert run.code == code, run
    if code == 1 and args[0] != "doctor":  # doctor reports on stdout, then exits 1
        assert any(line.startswith("error: ") for line in run.err.splitlines()), run
    return run


def dump(db: Path) -> dict[str, list[tuple[Any, ...]]]:
    conn = sqlite3.connect(db)
    try:
        names = [r[0] for r in conn.execute(
            "SELECT name FROM sqlite_schema WHERE type = 'table' ORDER BY name")]  # fmt: skip
        return {n: sorted(conn.execute(f'SELECT * FROM "{n}"').fetchall(), key=repr)
                for n in names}  # fmt: skip
    finally:
        conn.close()


def position(db: Path, group: str, topic: str, partition: int = 0) -> int:
    rows = sql(db, "SELECT position FROM eventlog_group_offsets WHERE group_name = ? AND"
               " topic = ? AND partition = ?", (group, topic, partition))  # fmt: skip
    return int(rows[0][0])


def consume(db: Path, group: str, topics: str, count: int, **options: Any) -> list[int]:
    """Run a consumer in this process until it handled `count` events; their offsets."""
    seen: list[int] = []
    stop = threading.Event()

    def handle(event: eventlog.Event) -> None:
        seen.append(event.offset)
        if len(seen) >= count:
            stop.set()

    timer = threading.Timer(15, stop.set)
    timer.start()
    try:
        with eventlog.open_sync(db) as log:
            log.consume(group, topics, handle, stop=stop, handle_signals=False, **options)
    finally:
        timer.cancel()
        timer.join()
    assert len(seen) >= count, f"only {seen} handled"
    return seen


def add_dead_letter(db: Path, group: str, topic: str, offset: int, **fields: Any) -> str:
    entry = _deadletter.DeadLetter(**{
        "id": _deadletter.new_id(), "group": group, "topic": topic, "partition": 0,
        "offset": offset, "key": None, "payload": {"n": offset}, "headers": {},
        "event_time_ms": 1_700_000_000_000, "attempts": 3, "first_failed_at_ms": None,
        "last_failed_at_ms": None, "error_type": "ValueError",
        "error_message": f"bad event {offset}", "traceback": "Traceback (most recent call "
        "last):\n  File 'x.py', line 1\nValueError: bad", "dead_lettered_at_ms": int(
            time.time() * 1000), **fields})  # fmt: skip
    _deadletter.DeadLetterFile(Paths.for_db(db)).append(entry)
    return entry.id


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "app.db"
    ok(path, "init")
    return path


@pytest.fixture
def filled(db: Path) -> Path:
    """Topic `orders` (one partition) with offsets 1..10, payloads {"n": i}."""
    with eventlog.open_sync(db) as log:
        log.append_many([eventlog.Draft("orders", {"n": i}) for i in range(1, 11)])
    return db


@pytest.fixture
def live_member(db: Path) -> Iterator[Callable[[str], _members.Membership]]:
    """A live member of a group, held by this process (its flock is what makes it live)."""
    held: list[_members.Membership] = []

    def join(group: str) -> _members.Membership:
        member = _members.Membership(Paths.for_db(db), group)
        member.heartbeat([])
        held.append(member)
        return member

    yield join
    for member in held:
        member.close()


# -- conventions --------------------------------------------------------------------------------


def all_commands() -> list[list[str]]:
    import typer.main

    root = typer.main.get_command(app)
    found = []

    def walk(command: Any, path: list[str]) -> None:
        subs = getattr(command, "commands", {})
        if path:
            found.append(path)
        for name, sub in subs.items():
            walk(sub, [*path, name])

    walk(root, [])
    return found


COMMANDS = all_commands()


def test_the_verbs_the_issue_asks_for_exist() -> None:
    names = {" ".join(c) for c in COMMANDS}
    assert names >= {
        "init", "migrate", "append", "tail", "topics", "topics create", "groups",
        "groups show", "groups delete", "replay", "dlq list", "dlq show", "dlq requeue",
        "dlq purge", "consume", "stats", "prune", "checkpoint", "backup", "doctor", "demo",
    }  # fmt: skip


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_has_help_with_an_example(command: list[str]) -> None:
    run = ok(None, *command, "--help")
    assert "Usage:" in run.out
    assert "Example" in run.out, run.out
    examples = run.out.split("Example", 1)[1].split("Options:", 1)[0]
    assert "eventlog " in examples and command[-1] in examples, examples


def test_no_arguments_shows_help_and_a_bad_verb_is_a_usage_error() -> None:
    run = cli(None)
    assert run.code in (0, 2)
    assert "Commands" in run.out + run.err
    fails(2, None, "no-such-verb")


def test_db_from_the_environment_and_after_the_verb(tmp_path: Path) -> None:
    path = tmp_path / "env.db"
    result = runner.invoke(app, ["init", "--json"], env={"EVENTLOG_DB": str(path)})
    assert result.exit_code == 0, result.stdout + result.stderr
    assert json.loads(result.stdout)["db"] == str(path)
    other = tmp_path / "other.db"
    assert ok(None, "init", "--db", other, "--json").rows()[0]["db"] == str(other)


READ_ONLY = [
    ["topics"], ["tail", "orders"], ["groups"], ["groups", "show", "g"], ["stats"],
    ["dlq", "list"], ["dlq", "show", "0123456789ab"], ["doctor"], ["checkpoint"],
    ["replay", "g", "--to-earliest"], ["prune", "--keep-last", "1", "--dry-run"], ["migrate"],
    ["append", "orders", "{}"], ["topics", "create", "orders"], ["backup", "copy.db"],
]  # fmt: skip


@pytest.mark.parametrize("args", READ_ONLY, ids=" ".join)
def test_verbs_other_than_init_never_create_the_database(tmp_path: Path, args: list[str]) -> None:
    path = tmp_path / "missing.db"
    run = fails(1, path, *args)
    assert "no database at" in run.out + run.err, run
    assert "hint:" in run.out + run.err
    assert not path.exists()


# -- init, migrate ----------------------------------------------------------------------------


def test_init_creates_and_reports_the_schema(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    first = ok(path, "--json", "init").rows()
    assert first == [{"db": str(path), "created": True, "schema_version": LATEST_SCHEMA}]
    assert sql(path, "SELECT count(*) FROM eventlog_events") == [(0,)]
    again = ok(path, "init")
    assert "already exists" in again.out


def test_init_in_a_missing_folder_is_an_error(tmp_path: Path) -> None:
    run = fails(1, tmp_path / "nope" / "app.db", "init")
    assert "does not exist" in run.err


def test_migrate_reports_versions(db: Path) -> None:
    assert ok(db, "--json", "migrate").rows() == [
        {"db": str(db), "from_version": LATEST_SCHEMA, "schema_version": LATEST_SCHEMA}
    ]
    assert "up to date" in ok(db, "migrate").out


def test_migrate_refuses_a_foreign_file(tmp_path: Path) -> None:
    path = tmp_path / "junk.db"
    path.write_bytes(b"this is not a database" * 200)
    before = path.read_bytes()
    fails(1, path, "migrate")
    assert path.read_bytes() == before


# -- append -------------------------------------------------------------------------------------


def test_append_one_event_with_key_headers_and_dedupe_key(db: Path) -> None:
    run = ok(db, "append", "orders", '{"id": 7}', "--key", "c-42", "--header", "source=cli",
             "-H", "trace=abc", "--dedupe-key", "order-7")  # fmt: skip
    assert run.out == "1\n"
    row = sql(db, "SELECT topic, key, payload, headers, dedupe_key FROM eventlog_events")
    assert row[0][:3] == ("orders", "c-42", '{"id":7}')
    assert json.loads(row[0][3]) == {"source": "cli", "trace": "abc"}
    assert row[0][4] == "order-7"
    again = ok(db, "--json", "append", "orders", '{"id": 7}', "--dedupe-key", "order-7")
    assert again.rows() == [{"topic": "orders", "offset": 1}]
    assert sql(db, "SELECT count(*) FROM eventlog_events") == [(1,)]


def test_append_json_lines_from_stdin(db: Path) -> None:
    run = ok(db, "--json", "append", "orders", input='{"a": 1}\n\n[1, 2]\n"text"\n')
    assert run.rows() == [{"topic": "orders", "offset": n} for n in (1, 2, 3)]
    payloads = [r[0] for r in sql(db, "SELECT payload FROM eventlog_events ORDER BY id")]
    assert payloads == ['{"a":1}', "[1,2]", '"text"']


def test_append_stops_at_a_bad_line_and_appends_nothing_of_its_batch(db: Path) -> None:
    run = fails(1, db, "append", "orders", input='{"a": 1}\n{"a": 2}\n{"a": \n{"a": 4}\n')
    assert "line 3" in run.err
    assert "nothing was appended" in run.err
    assert run.out == ""
    assert sql(db, "SELECT count(*) FROM eventlog_events") == [(0,)]


def test_append_rejects_nan_on_stdin(db: Path) -> None:
    run = fails(1, db, "append", "orders", input='{"a": 1}\n{"a": NaN}\n')
    assert "line 2" in run.err and "NaN" in run.err
    assert sql(db, "SELECT count(*) FROM eventlog_events") == [(0,)]


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["append", "orders", "{not json"], 2),
        (["append", "orders", "{}", "--header", "novalue"], 2),
        (["append", "orders", "--dedupe-key", "x"], 2),
        (["append", "bad..name", "{}"], 1),
        (["append", "orders", '{"a": NaN}'], 2),
        (["append"], 2),
    ],
)
def test_append_bad_input_changes_nothing(db: Path, args: list[str], code: int) -> None:
    before = dump(db)
    fails(code, db, *args, input="")
    assert dump(db) == before


# -- tail ---------------------------------------------------------------------------------------

EVENT_FIELDS = {"offset", "topic", "partition", "key", "payload", "headers", "timestamp_ms"}


def test_tail_prints_the_last_ten_by_default(filled: Path) -> None:
    run = ok(filled, "tail", "orders")
    lines = run.out.splitlines()
    assert len(lines) == 10
    assert lines[0].startswith("1  ") and lines[0].endswith('{"n":1}')
    assert "orders[0]" in lines[0]
    assert [r["offset"] for r in ok(filled, "tail", "orders", "-n", "3", "--json").rows()] == [
        8, 9, 10]  # fmt: skip


def test_tail_json_lines_have_the_event_fields(filled: Path) -> None:
    rows = ok(filled, "--json", "tail", "orders", "--from", "earliest").rows()
    assert [r["offset"] for r in rows] == list(range(1, 11))
    assert all(set(r) == EVENT_FIELDS for r in rows)
    assert rows[0]["payload"] == {"n": 1}


def test_tail_from_offset_time_and_limit(filled: Path) -> None:
    base = 1_700_000_000_000
    sql(filled, "UPDATE eventlog_events SET created_at = ? + id * 1000", (base,))
    rows = ok(filled, "--json", "tail", "orders", "--from", "4", "--limit", "2").rows()
    assert [r["offset"] for r in rows] == [4, 5]
    at = datetime.fromtimestamp((base + 7000) / 1000, UTC).replace(tzinfo=None).isoformat()
    rows = ok(filled, "--json", "tail", "orders", "--from", at).rows()
    assert [r["offset"] for r in rows] == [7, 8, 9, 10]  # naive means UTC
    assert ok(filled, "tail", "orders", "--from", "latest").out == ""
    assert ok(filled, "tail", "orders", "--from", "-10m").out == ""  # all are from 2023


def test_tail_a_pattern_merges_topics_in_offset_order(db: Path) -> None:
    with eventlog.open_sync(db) as log:
        log.create_topic("orders.eu", 2)
        for i in range(6):
            log.append("orders.eu" if i % 2 else "orders.us", {"i": i}, key=str(i))
    rows = ok(db, "--json", "tail", "orders.*", "--from", "earliest").rows()
    assert [r["offset"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert {r["topic"] for r in rows} == {"orders.eu", "orders.us"}


def test_tail_bad_input(filled: Path) -> None:
    fails(2, filled, "tail", "orders", "--from", "yesterday-ish")
    fails(2, filled, "tail", "orders", "--limit", "-1")
    run = fails(1, filled, "tail", "nothing.here")
    assert "no topic matches" in run.err
    fails(1, filled, "tail", "a..b")


# -- topics -------------------------------------------------------------------------------------


def test_topics_table_and_json(filled: Path) -> None:
    run = ok(filled, "topics")
    header, row = run.out.splitlines()
    assert header.split()[:5] == ["TOPIC", "PARTITIONS", "EVENTS", "FIRST", "LAST"]
    assert row.split()[:5] == ["orders", "1", "10", "1", "10"]
    (info,) = ok(filled, "--json", "topics").rows()
    assert set(info) == {"name", "partitions", "events", "first_offset", "last_offset",
                         "created_at_ms", "last_append_ms"}  # fmt: skip
    assert (info["name"], info["events"], info["first_offset"], info["last_offset"]) == (
        "orders", 10, 1, 10)  # fmt: skip


def test_topics_create(db: Path) -> None:
    assert ok(db, "--json", "topics", "create", "pay", "--partitions", "4").rows() == [
        {"name": "pay", "partitions": 4, "created": True}
    ]
    assert sql(db, "SELECT partitions FROM eventlog_topics WHERE name = 'pay'") == [(4,)]
    run = fails(1, db, "topics", "create", "pay", "--partitions", "4")
    assert "already exists" in run.err
    ok(db, "topics", "create", "pay", "--partitions", "4", "--if-not-exists")
    fails(1, db, "topics", "create", "pay", "--partitions", "2", "--if-not-exists")
    fails(2, db, "topics", "create", "zero", "--partitions", "0")
    fails(1, db, "topics", "create", "bad name")


# -- groups -------------------------------------------------------------------------------------

POSITION_FIELDS = {"topic", "partition", "position", "head", "lag", "lag_exact", "in_flight",
                   "updated_at_ms"}  # fmt: skip
MEMBER_FIELDS = {"member", "pid", "host", "alive", "partitions", "heartbeat_age_s", "stale"}


def test_groups_show_positions_lag_and_members(filled: Path, live_member: Any) -> None:
    consume(filled, "billing", "orders", 10)
    with eventlog.open_sync(filled) as log:
        log.append_many([eventlog.Draft("orders", {"n": i}) for i in range(3)])
    live_member("billing")
    (group,) = ok(filled, "--json", "groups").rows()
    assert set(group) == {"group", "lag", "lag_exact", "members", "stale_member_files",
                          "positions"}  # fmt: skip
    assert group["group"] == "billing" and group["lag"] == 3
    assert set(group["positions"][0]) == POSITION_FIELDS
    assert group["positions"][0]["position"] == 10 and group["positions"][0]["head"] == 13
    (member,) = group["members"]
    assert set(member) == MEMBER_FIELDS
    assert member["pid"] == os.getpid() and not member["stale"]
    run = ok(filled, "groups")
    assert "billing: 1 live member, lag 3" in run.out
    assert str(os.getpid()) in run.out


def test_groups_warn_about_a_stale_heartbeat(db: Path, live_member: Any) -> None:
    member = live_member("slow")
    note = {"member": member.member_id, "pid": os.getpid(), "time": time.time() - 120,
            "lanes": [["orders", 0]]}  # fmt: skip
    member._member_lock.write_note(json.dumps(note))
    run = ok(db, "groups")
    assert "WARNING: stale heartbeat" in run.out
    assert "orders[0]" in run.out
    assert "warning:" in run.err and "may be stuck" in run.err
    assert ok(db, "--json", "groups").rows()[0]["members"][0]["stale"] is True
    assert not ok(db, "--json", "groups", "--stale-after", "600").rows()[0]["members"][0]["stale"]


def test_groups_show_and_delete(filled: Path, live_member: Any) -> None:
    consume(filled, "billing", "orders", 10)
    add_dead_letter(filled, "billing", "orders", 3)
    shown = ok(filled, "--json", "groups", "show", "billing").rows()[0]
    assert shown["dead_letters"] == 1 and shown["retrying"] == []
    assert shown["requeued_waiting"] == 0 and shown["lag"] == 0
    assert "dead letters in the file: 1" in ok(filled, "groups", "show", "billing").out
    fails(1, filled, "groups", "show", "nobody")
    member = live_member("billing")
    run = fails(1, filled, "groups", "delete", "billing", "--yes")
    assert str(os.getpid()) in run.err and "live members" in run.err
    member.close()
    assert ok(filled, "--json", "groups", "delete", "billing", "--yes").rows() == [
        {"group": "billing", "deleted_positions": 1}
    ]
    assert sql(filled, "SELECT count(*) FROM eventlog_group_offsets") == [(0,)]
    fails(1, filled, "groups", "delete", "nobody", "--yes")


# -- replay -------------------------------------------------------------------------------------

RESET_FIELDS = {"group", "topic", "partition", "before", "after", "redelivered", "skipped",
                "lag_after", "executed"}  # fmt: skip


@pytest.fixture
def consumed(filled: Path) -> Path:
    """`orders` 1..10, created a second apart from 2023-11-14T22:13:21Z; group billing done
    with all of them."""
    sql(filled, "UPDATE eventlog_events SET created_at = ? + id * 1000", (1_700_000_000_000,))
    consume(filled, "billing", "orders", 10)
    assert position(filled, "billing", "orders") == 10
    return filled


@pytest.mark.parametrize(
    ("spec", "after", "redelivered"),
    [
        (["--to-earliest"], 0, 10),
        (["--to-latest"], 10, 0),
        (["--to-current"], 10, 0),
        (["--to-offset", "4"], 3, 7),
        (["--to-offset", "999"], 10, 0),
        (["--shift-by", "-3"], 7, 3),
        (["--shift-by", "-99"], 0, 10),
        (["--to-datetime", "2023-11-14T22:13:26"], 5, 5),  # naive = UTC: offset 6 is 22:13:26
        (["--to-datetime", "2023-11-14T23:13:26+01:00"], 5, 5),
    ],
)
def test_replay_plans_without_changing_anything(
    consumed: Path, spec: list[str], after: int, redelivered: int
) -> None:
    before = dump(consumed)
    (row,) = ok(consumed, "--json", "replay", "billing", *spec).rows()
    assert set(row) == RESET_FIELDS
    assert (row["before"], row["after"], row["redelivered"], row["executed"]) == (
        10, after, redelivered, False)  # fmt: skip
    assert row["lag_after"] == 10 - after
    human = ok(consumed, "replay", "billing", *spec)
    assert "dry run, nothing changed" in human.out and "--execute" in human.err
    assert dump(consumed) == before


def test_replay_execute_then_the_next_run_redelivers_exactly_the_plan(consumed: Path) -> None:
    (row,) = ok(consumed, "--json", "replay", "billing", "--shift-by", "-3", "--execute").rows()
    assert (row["after"], row["redelivered"], row["executed"]) == (7, 3, True)
    assert position(consumed, "billing", "orders") == 7
    assert consume(consumed, "billing", "orders", 3) == [8, 9, 10]
    assert position(consumed, "billing", "orders") == 10  # nothing more to deliver


def test_replay_by_duration_and_forward_skips(consumed: Path) -> None:
    now = int(time.time() * 1000)
    sql(consumed, "UPDATE eventlog_events SET created_at = ? WHERE id <= 6", (now - 7_200_000,))
    sql(consumed, "UPDATE eventlog_events SET created_at = ? WHERE id > 6", (now,))
    (row,) = ok(consumed, "--json", "replay", "billing", "--by-duration", "1h").rows()
    assert (row["after"], row["redelivered"]) == (6, 4)
    ok(consumed, "replay", "billing", "--to-offset", "3", "--execute")
    (row,) = ok(consumed, "--json", "replay", "billing", "--shift-by", "2").rows()
    assert (row["before"], row["after"], row["skipped"], row["redelivered"]) == (2, 4, 2, 0)


def test_replay_scoped_to_partitions(db: Path) -> None:
    with eventlog.open_sync(db) as log:
        log.create_topic("pay", 3)
        log.append_many([eventlog.Draft("pay", {"i": i}) for i in range(9)])
    consume(db, "billing", "pay", 9)
    rows = ok(db, "--json", "replay", "billing", "--to-earliest", "--topic", "pay:0,2",
              "--execute").rows()  # fmt: skip
    assert [(r["partition"], r["redelivered"]) for r in rows] == [(0, 3), (2, 3)]
    # keyless events go round robin: partition 2 holds 3, 6, 9
    assert [position(db, "billing", "pay", p) for p in range(3)] == [0, 8, 2]
    # a topic the group never read gets positions too (Kafka's tool allows it)
    ok(db, "topics", "create", "refunds")
    (row,) = ok(db, "--json", "replay", "billing", "--to-latest", "--topic", "refunds").rows()
    assert row["before"] is None and row["after"] == 9
    ok(db, "replay", "billing", "--to-latest", "--topic", "refunds", "--execute")
    # an empty partition delivers the same from any position: it is left alone
    (row,) = ok(db, "--json", "replay", "billing", "--to-earliest", "--topic", "refunds").rows()
    assert (row["before"], row["after"], row["redelivered"]) == (9, 9, 0)


def test_replay_refuses_while_the_group_has_live_members(consumed: Path, live_member: Any) -> None:
    member = live_member("billing")
    before = dump(consumed)
    run = fails(1, consumed, "replay", "billing", "--to-earliest", "--execute")
    assert f"pids {os.getpid()}" in run.err
    assert "--wait" in run.err
    run = fails(1, consumed, "replay", "billing", "--to-earliest", "--execute", "--wait",
                "--wait-timeout", "0.3")  # fmt: skip
    assert dump(consumed) == before
    # the plan alone is always allowed, with a note
    assert f"live members (pids {os.getpid()})" in ok(consumed, "replay", "billing",
                                                      "--to-earliest").err  # fmt: skip
    member.close()
    ok(consumed, "replay", "billing", "--to-earliest", "--execute")
    assert position(consumed, "billing", "orders") == 0


def test_replay_refuses_while_a_partition_lock_is_held(consumed: Path) -> None:
    member = _members.Membership(Paths.for_db(consumed), "other")
    try:
        # a process that holds billing's lane lock (a consumer mid-batch) blocks the reset
        from eventlog._locks import FileLock

        lanes = Paths.for_db(consumed).group_folder("billing") / "lanes"
        lock = FileLock(lanes / _members.lane_file_name(("orders", 0)))
        assert lock.acquire(blocking=False)
        try:
            run = fails(1, consumed, "replay", "billing", "--to-earliest", "--execute")
            assert "held by a running process" in run.err
        finally:
            lock.close()
    finally:
        member.close()


@pytest.mark.parametrize(
    ("args", "code"),
    [
        ([], 2),
        (["--to-earliest", "--to-latest"], 2),
        (["--to-datetime", "not-a-time"], 2),
        (["--by-duration", "10 parsecs"], 2),
        (["--to-earliest", "--topic", "orders:x"], 2),
        (["--to-earliest", "--topic", "orders:5"], 1),
        (["--to-earliest", "--topic", "nope"], 1),
    ],
)
def test_replay_bad_input(consumed: Path, args: list[str], code: int) -> None:
    before = dump(consumed)
    fails(code, consumed, "replay", "billing", *args, "--execute")
    assert dump(consumed) == before


def test_replay_of_an_unknown_group(consumed: Path) -> None:
    run = fails(1, consumed, "replay", "nobody", "--to-earliest")
    assert "has no positions" in run.err


# -- dead letters -------------------------------------------------------------------------------

DEAD_ROW_FIELDS = {"id", "group", "topic", "partition", "offset", "key", "attempts",
                   "error_type", "error_message", "dead_lettered_at_ms", "requeued",
                   "requeued_at_ms"}  # fmt: skip


def test_dlq_list_and_show(filled: Path) -> None:
    first = add_dead_letter(filled, "billing", "orders", 3)
    add_dead_letter(filled, "audit", "orders", 4, dead_lettered_at_ms=1_600_000_000_000)
    rows = ok(filled, "--json", "dlq", "list").rows()
    assert [r["offset"] for r in rows] == [3, 4]
    assert all(set(r) == DEAD_ROW_FIELDS for r in rows)
    assert [r["id"] for r in ok(filled, "--json", "dlq", "list", "--group", "billing").rows()] == [
        first]  # fmt: skip
    assert len(ok(filled, "--json", "dlq", "list", "--since", "-1d").rows()) == 1
    assert ok(filled, "--json", "dlq", "list", "--topic", "other").rows() == []
    table = ok(filled, "dlq", "list").out
    assert "ValueError: bad event 3" in table and first in table
    shown = ok(filled, "dlq", "show", first).out
    assert "Traceback (most recent call last)" in shown and '"n": 3' in shown
    (full,) = ok(filled, "--json", "dlq", "show", first).rows()
    assert full["traceback"].startswith("Traceback") and full["payload"] == {"n": 3}
    fails(1, filled, "dlq", "show", "000000000000")
    fails(1, filled, "dlq", "show", "not-an-id")
    fails(2, filled, "dlq", "list", "--since", "whenever")


def test_dlq_list_reports_a_torn_line(filled: Path) -> None:
    add_dead_letter(filled, "billing", "orders", 3)
    with open(Paths.for_db(filled).deadletter, "ab") as f:
        f.write(b'{"id": "abc", "gro')
    run = ok(filled, "dlq", "list")
    assert "torn line" in run.err
    assert "bad event 3" in run.out


def test_dlq_requeue(filled: Path) -> None:
    first = add_dead_letter(filled, "billing", "orders", 3)
    add_dead_letter(filled, "audit", "orders", 4)
    path = Paths.for_db(filled).deadletter
    before_file, before_db = path.read_bytes(), dump(filled)
    rows = ok(filled, "--json", "dlq", "requeue", "--all", "--dry-run").rows()
    assert {(r["offset"], r["dry_run"]) for r in rows} == {(3, True), (4, True)}
    assert path.read_bytes() == before_file and dump(filled) == before_db
    rows = ok(filled, "--json", "dlq", "requeue", "--id", first).rows()
    assert rows == [{"id": first, "group": "billing", "topic": "orders", "partition": 0,
                     "offset": 3, "dry_run": False}]  # fmt: skip
    assert sql(filled, "SELECT group_name, event_offset FROM eventlog_redeliveries") == [
        ("billing", 3)]  # fmt: skip
    listed = {r["id"]: r for r in ok(filled, "--json", "dlq", "list").rows()}
    assert listed[first]["requeued"] and listed[first]["requeued_at_ms"]
    assert ok(filled, "--json", "dlq", "list", "--pending").rows()[0]["group"] == "audit"
    # already requeued: left alone
    assert ok(filled, "--json", "dlq", "requeue", "--group", "billing").rows() == []
    fails(2, filled, "dlq", "requeue")
    fails(2, filled, "dlq", "requeue", "--all", "--group", "billing")
    fails(1, filled, "dlq", "requeue", "--id", "ffffffffffff")


def test_dlq_requeue_delivers_to_that_group_only(filled: Path) -> None:
    consume(filled, "billing", "orders", 10)
    consume(filled, "audit", "orders", 10)
    dead = add_dead_letter(filled, "billing", "orders", 3)
    ok(filled, "dlq", "requeue", "--id", dead)
    assert consume(filled, "billing", "orders", 1) == [3]
    with eventlog.open_sync(filled) as log:
        log.append("orders", {"n": 11})
    assert consume(filled, "audit", "orders", 1) == [11]
    assert sql(filled, "SELECT count(*) FROM eventlog_redeliveries") == [(0,)]


def test_dlq_purge(filled: Path) -> None:
    first = add_dead_letter(filled, "billing", "orders", 3)
    second = add_dead_letter(filled, "audit", "orders", 4)
    path = Paths.for_db(filled).deadletter
    before = path.read_bytes()
    assert len(ok(filled, "--json", "dlq", "purge", "--all", "--dry-run").rows()) == 2
    assert path.read_bytes() == before
    rows = ok(filled, "--json", "dlq", "purge", "--id", first, "--yes").rows()
    assert [r["id"] for r in rows] == [first]
    assert [r["id"] for r in ok(filled, "--json", "dlq", "list").rows()] == [second]
    assert "purged 1 dead letter" in ok(filled, "dlq", "purge", "--group", "audit").out
    assert ok(filled, "--json", "dlq", "list").rows() == []
    fails(2, filled, "dlq", "purge")
    fails(1, filled, "dlq", "purge", "--id", first)


def test_purge_and_group_delete_ask_first_on_a_terminal(filled: Path, monkeypatch: Any) -> None:
    from eventlog.cli import _format

    monkeypatch.setattr(_format, "_interactive", lambda: True)
    add_dead_letter(filled, "billing", "orders", 3)
    consume(filled, "billing", "orders", 10)
    before_file, before_db = Paths.for_db(filled).deadletter.read_bytes(), dump(filled)
    run = fails(1, filled, "dlq", "purge", "--all", input="n\n")
    assert "Purge 1 dead letter for good?" in run.out and "nothing purged" in run.err
    run = fails(1, filled, "groups", "delete", "billing", input="\n")  # the default is no
    assert "nothing deleted" in run.err
    assert Paths.for_db(filled).deadletter.read_bytes() == before_file
    assert dump(filled) == before_db
    ok(filled, "dlq", "purge", "--all", input="y\n")
    ok(filled, "groups", "delete", "billing", input="y\n")
    assert ok(filled, "--json", "dlq", "list").rows() == []
    assert sql(filled, "SELECT count(*) FROM eventlog_group_offsets") == [(0,)]


# -- stats --------------------------------------------------------------------------------------


def test_stats(filled: Path) -> None:
    consume(filled, "billing", "orders", 4, batch_size=1)
    add_dead_letter(filled, "billing", "orders", 3)
    (st,) = ok(filled, "--json", "stats").rows()
    assert set(st) == {"db", "schema_version", "head", "events", "topics", "groups", "lags",
                       "dead_letters", "files", "elapsed_ms"}  # fmt: skip
    assert (st["head"], st["events"], st["schema_version"]) == (10, 10, LATEST_SCHEMA)
    assert set(st["files"]) == {"db", "wal", "shm", "deadletter"}
    assert st["files"]["db"] > 0 and st["files"]["deadletter"] > 0
    assert st["dead_letters"]["pending"] == 1
    (topic,) = st["topics"]
    assert set(topic) == {"name", "partitions", "events", "first_offset", "last_offset",
                          "last_append_ms", "rate_per_s", "rate_exact"}  # fmt: skip
    assert topic["rate_per_s"] == pytest.approx(10 / 60, abs=0.01)
    (group,) = st["groups"]
    assert group["group"] == "billing" and group["exact"]
    assert group["lag"] == 10 - position(filled, "billing", "orders")
    human = ok(filled, "stats").out
    assert "WAL" in human and "billing" in human


def test_stats_estimates_lag_beyond_the_count_cap(db: Path, monkeypatch: Any) -> None:
    monkeypatch.setattr(_stats, "LAG_CAP", 50)
    with eventlog.open_sync(db) as log:
        log.append_many([eventlog.Draft("clicks", {"i": i}) for i in range(400)])
    sql(db, "INSERT INTO eventlog_group_offsets VALUES ('late', 'clicks', 0, 100, NULL, NULL, 0)")
    (lag,) = ok(db, "--json", "stats").rows()[0]["lags"]
    assert lag["lag"] == 300 and not lag["exact"]
    assert "~300" in ok(db, "stats").out
    (group,) = ok(db, "--json", "groups").rows()
    assert (group["lag"], group["lag_exact"]) == (300, False)
    assert "lag ~300" in ok(db, "groups").out
    (shown,) = ok(db, "--json", "groups", "show", "late").rows()
    assert (shown["lag"], shown["lag_exact"]) == (300, True)


# -- prune --------------------------------------------------------------------------------------

PRUNE_FIELDS = {"topic", "partition", "upto", "deleted", "held_back", "held_by", "dry_run"}


def count(db: Path) -> int:
    return int(sql(db, "SELECT count(*) FROM eventlog_events")[0][0])


def test_prune_keeps_what_a_group_has_not_handled(filled: Path) -> None:
    consume(filled, "billing", "orders", 10)
    ok(filled, "replay", "billing", "--to-offset", "7", "--execute")
    assert position(filled, "billing", "orders") == 6
    before = dump(filled)
    (row,) = ok(filled, "--json", "prune", "--keep-last", "2", "--dry-run").rows()
    assert set(row) == PRUNE_FIELDS
    assert (row["upto"], row["deleted"], row["held_back"]) == (6, 6, 2)
    assert row["held_by"] == [{"group": "billing", "position": 6, "requeued": False}]
    assert dump(filled) == before
    run = ok(filled, "prune", "--keep-last", "2")
    assert "deleted 6 events" in run.out and "billing" in run.err
    assert count(filled) == 4
    assert ok(filled, "--json", "topics").rows()[0]["events"] == 4
    ok(filled, "prune", "--keep-last", "2", "--force")
    assert [r[0] for r in sql(filled, "SELECT id FROM eventlog_events")] == [9, 10]
    assert ok(filled, "--json", "topics").rows()[0]["events"] == 2


def test_prune_older_than(filled: Path) -> None:
    now = int(time.time() * 1000)
    sql(filled, "UPDATE eventlog_events SET created_at = ? WHERE id <= 5", (now - 3 * 86_400_000,))
    (row,) = ok(filled, "--json", "prune", "--older-than", "2d").rows()
    assert row["deleted"] == 5
    assert [r[0] for r in sql(filled, "SELECT min(id), count(*) FROM eventlog_events")] == [6]
    assert ok(filled, "--json", "prune", "--older-than", "2d").rows() == []
    # both rules: only what both let go
    ok(filled, "prune", "--older-than", "0s", "--keep-last", "3")
    assert count(filled) == 3


def test_prune_keeps_the_topic_counter_right_past_a_fold(db: Path) -> None:
    with eventlog.open_sync(db) as log:
        log.create_topic("clicks", 2)
        log.append_many([eventlog.Draft("clicks", {"i": i}) for i in range(5000)])
        log.append_many([eventlog.Draft("clicks", {"i": i}) for i in range(50)])
    ok(db, "prune", "--keep-last", "100")
    assert count(db) == 100
    assert ok(db, "--json", "topics").rows()[0]["events"] == 100
    assert ok(db, "--json", "stats").rows()[0]["events"] == 100
    ids = [r[0] for r in sql(db, "SELECT id FROM eventlog_events ORDER BY id")]
    assert ids == list(range(4951, 5051))


def test_prune_keeps_a_requeued_dead_letter(filled: Path) -> None:
    consume(filled, "billing", "orders", 10)
    dead = add_dead_letter(filled, "billing", "orders", 3)
    ok(filled, "dlq", "requeue", "--id", dead)
    (row,) = ok(filled, "--json", "prune", "--keep-last", "0").rows()
    assert row["upto"] == 2 and {"group": "billing", "position": 2, "requeued": True} in row[
        "held_by"]  # fmt: skip


@pytest.mark.parametrize(
    ("args", "code"),
    [([], 2), (["--older-than", "fortnight"], 2), (["--keep-last", "-1"], 2),
     (["--keep-last", "1", "--topic", "nope"], 1)],
)  # fmt: skip
def test_prune_bad_input(filled: Path, args: list[str], code: int) -> None:
    before = dump(filled)
    fails(code, filled, "prune", *args)
    assert dump(filled) == before


# -- checkpoint, backup, doctor -----------------------------------------------------------------


def test_checkpoint(filled: Path) -> None:
    (row,) = ok(filled, "--json", "checkpoint").rows()
    assert set(row) == {"busy", "wal_pages", "checkpointed", "wal_bytes_before",
                        "wal_bytes_after"}  # fmt: skip
    assert row["busy"] is False and row["wal_bytes_after"] == 0
    assert "WAL pages" in ok(filled, "checkpoint").out


def test_checkpoint_ends_a_failed_fsyncs_hold_even_with_a_migration_to_apply(
    filled: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a failed fsync of the WAL a log at full refuses every write, a migration's too;
    `checkpoint` is the way on, so it opens the log where it can still migrate."""
    file_id = _db.database_file_id(filled)
    writers = QueuedLock(_db.Paths.for_db(filled).write_lock)
    try:
        writers.mark_wal_failed(file_id)
        upgrade = _db.Migration(LATEST_SCHEMA + 1, f"{LATEST_SCHEMA + 1:04d}_later",
                                "CREATE TABLE eventlog_later (x INTEGER);")  # fmt: skip
        monkeypatch.setattr(_db, "load_migrations", lambda: [*load_migrations(), upgrade])
        with pytest.raises(eventlog.StorageError, match="fsync of the log's WAL failed"):
            eventlog.open_sync(filled)
        assert writers.wal_failures(file_id) == 1
        (row,) = ok(filled, "--json", "checkpoint").rows()
        assert row["busy"] is False and writers.wal_failures(file_id) == 0
    finally:
        writers.close()
    with eventlog.open_sync(filled) as log:
        log.append("orders", {"after": "the checkpoint"})


def test_backup(filled: Path, tmp_path: Path) -> None:
    add_dead_letter(filled, "billing", "orders", 3)
    dest = tmp_path / "copy.db"
    (row,) = ok(filled, "--json", "backup", dest).rows()
    assert set(row) == {"source", "dest", "bytes", "pages", "deadletter", "elapsed_s"}
    assert row["dest"] == str(dest) and row["deadletter"] == str(dest) + ".deadletter.jsonl"
    assert dump(dest) == dump(filled)
    assert sql(dest, "PRAGMA integrity_check") == [("ok",)]
    assert oct(dest.stat().st_mode & 0o777) == "0o600"
    assert ok(dest, "--json", "dlq", "list").rows()[0]["offset"] == 3
    run = fails(1, filled, "backup", dest)
    assert "already exists" in run.err
    ok(filled, "backup", dest, "--force")
    fails(1, filled, "backup", filled)
    fails(1, filled, "backup", tmp_path / "no" / "such" / "dir.db")


def test_doctor_on_a_healthy_log(filled: Path) -> None:
    rows = ok(filled, "--json", "doctor").rows()
    assert all(set(r) == {"check", "status", "detail", "hint"} for r in rows)
    names = {r["check"] for r in rows}
    assert names >= {"integrity", "schema", "offsets", "wal", "dead letters", "members", "lag"}
    assert all(r["status"] == "ok" for r in rows), rows
    assert "OK" in ok(filled, "doctor", "--quick").out


def test_doctor_fails_on_unreadable_dead_letter_lines(filled: Path) -> None:
    add_dead_letter(filled, "billing", "orders", 3)
    path = Paths.for_db(filled).deadletter
    path.write_bytes(b"garbage in the middle\n" + path.read_bytes())
    run = fails(1, filled, "doctor")
    assert "FAIL" in run.out and "unreadable lines: 1" in run.out


def test_doctor_warns_on_a_torn_line_and_stale_member_files(filled: Path) -> None:
    path = Paths.for_db(filled).deadletter
    path.write_bytes(b'{"id": "tor')
    member = _members.Membership(Paths.for_db(filled), "billing")
    member_file = member._member_lock.path
    member._member_lock.close()  # as if the process died: its file stays, unlocked
    try:
        rows = {(r["check"], r["status"]) for r in ok(filled, "--json", "doctor").rows()}
        assert ("dead letters", "warn") in rows and ("members", "warn") in rows
        fails(1, filled, "doctor", "--strict")
    finally:
        member_file.unlink(missing_ok=True)


def test_doctor_warns_about_lag(filled: Path) -> None:
    sql(filled, "INSERT INTO eventlog_group_offsets VALUES ('late', 'orders', 0, 0, NULL, NULL, 0)")
    rows = ok(filled, "--json", "doctor", "--lag-warn", "5").rows()
    assert {"check": "lag", "status": "warn"}.items() <= next(
        r for r in rows if r["check"] == "lag").items()  # fmt: skip


def test_doctor_fails_on_a_foreign_file(tmp_path: Path) -> None:
    path = tmp_path / "junk.db"
    path.write_bytes(b"\x00garbage" * 1000)
    run = fails(1, path, "doctor")
    assert "FAIL" in run.out and "database" in run.out


# -- demo ---------------------------------------------------------------------------------------


def test_demo_calls_run_demo(monkeypatch: Any, tmp_path: Path) -> None:
    import eventlog._demo as demo

    calls: list[tuple[Any, bool]] = []

    def fake(directory: Path | None, *, quick: bool = False, **_: Any) -> int:
        calls.append((directory, quick))
        return 3

    monkeypatch.setattr(demo, "run_demo", fake)
    assert cli(None, "demo", "--quick", "--dir", tmp_path).code == 3
    assert calls == [(tmp_path, True)]
    fails(2, None, "demo", "--dir")
    fails(2, None, "demo", "--slowly")
    assert len(calls) == 1


# -- parsing ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("10m", 600), ("2h", 7200), ("7d", 604_800), ("1h30m", 5400), ("500ms", 0.5),
     ("-10m", -600), ("PT10M", 600), ("P1DT2H", 93_600), ("1w", 604_800)],
)  # fmt: skip
def test_parse_duration(text: str, seconds: float) -> None:
    assert _times.parse_duration(text).total_seconds() == seconds


@pytest.mark.parametrize("text", ["", "10", "m", "10 m", "ten minutes", "P", "PT", "1x"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(eventlog.InvalidArgument):
        _times.parse_duration(text)


def test_parse_time() -> None:
    now = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    assert _times.parse_time("-10m", now) == now - timedelta(minutes=10)
    assert _times.parse_time("2024-05-01T08:00:00", now) == datetime(2024, 5, 1, 8, tzinfo=UTC)
    assert _times.parse_time("2024-05-01T10:00:00+02:00", now).astimezone(UTC).hour == 8
    assert _times.parse_time("now", now) == now
    with pytest.raises(eventlog.InvalidArgument):
        _times.parse_time("yesterday", now)


# -- progress -----------------------------------------------------------------------------------


@pytest.mark.parametrize("json_out", [False, True])
def test_a_long_blocking_step_shows_progress_on_a_terminal_only(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], json_out: bool
) -> None:
    from eventlog.cli import Settings, _format

    monkeypatch.setattr(_format, "_isatty", lambda stream: True)
    monkeypatch.setattr(_format._Progress, "DELAY_S", 0.1)
    got = _format._while_running(Settings(json=json_out), "migrating", lambda: time.sleep(0.6) or 7)
    assert got == 7
    err = capsys.readouterr().err
    assert ("migrating" in err) is not json_out


@pytest.mark.parametrize("verb", ["doctor", "checkpoint"])
def test_doctor_and_checkpoint_show_progress_on_a_terminal(
    db: Path, monkeypatch: pytest.MonkeyPatch, verb: str
) -> None:
    """An integrity check or a checkpoint of a big file is one long statement: a bar that
    says it is still going, as for a migration."""
    from eventlog import _doctor
    from eventlog.cli import _format

    monkeypatch.setattr(_format, "_isatty", lambda stream: True)
    monkeypatch.setattr(_format._Progress, "DELAY_S", 0.05)
    slow = {"doctor": (_doctor, "doctor"), "checkpoint": (_sync.SyncLog, "checkpoint")}[verb]
    real = getattr(*slow)

    def slowly(*args: Any, **kwargs: Any) -> Any:
        time.sleep(0.6)
        return real(*args, **kwargs)

    monkeypatch.setattr(*slow, slowly)
    run = ok(db, verb)
    assert {"doctor": "checking", "checkpoint": "checkpointing"}[verb] in run.err, run


def test_a_failing_blocking_step_raises_its_own_error() -> None:
    from eventlog.cli import Settings, _format

    def broken() -> None:
        raise eventlog.SchemaTooNew("from the step")

    with pytest.raises(eventlog.SchemaTooNew, match="from the step"):
        _format._while_running(Settings(), "migrating", broken)


def test_migrate_upgrades_a_version_one_file(tmp_path: Path) -> None:
    from test_migrate import _version_one_file

    path = tmp_path / "old.db"
    _version_one_file(path)
    assert ok(path, "--json", "migrate").rows() == [
        {"db": str(path), "from_version": 1, "schema_version": LATEST_SCHEMA}
    ]
    (st,) = ok(path, "--json", "stats").rows()
    assert st["head"] == 10 and st["events"] == 7
