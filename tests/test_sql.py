"""Every statement in eventlog._sql prepares against a freshly migrated file, so the queries
and the migrations cannot drift apart; the lane reads ride their index, never a scan."""

from __future__ import annotations

import re
import sqlite3
from collections import defaultdict
from pathlib import Path

import pytest
from conftest import raw

import eventlog
from eventlog import _sql

# What a statement can start with; any other string constant is a fragment (a column list)
# that must appear inside some statement.
KEYWORDS = {"SELECT", "INSERT", "UPDATE", "DELETE", "REPLACE", "WITH", "PRAGMA", "BEGIN",
            "COMMIT", "END", "ROLLBACK", "SAVEPOINT", "RELEASE", "CREATE", "DROP", "ALTER",
            "VACUUM", "ANALYZE", "REINDEX", "ATTACH", "DETACH"}  # fmt: skip


def sql_constants() -> dict[str, str]:
    """Name -> SQL text for every public str constant (tuples of them get name[i])."""
    found: dict[str, str] = {}
    for name, value in vars(_sql).items():
        if name.startswith("_") or not name.isupper():
            continue
        if isinstance(value, str):
            found[name] = value
        elif isinstance(value, tuple) and all(isinstance(v, str) for v in value):
            found.update({f"{name}[{i}]": v for i, v in enumerate(value)})
    return found


def fill_template(sql: str) -> str:
    """Constants with {placeholders} (the connection PRAGMAs) get plausible values."""
    if "{" not in sql:
        return sql
    values = defaultdict(lambda: "1", synchronous="FULL", busy_timeout_ms="1000")
    return sql.format_map(values)


CONSTANTS = sql_constants()
STATEMENTS = {n: fill_template(s) for n, s in CONSTANTS.items()
              if s.split(None, 1)[0].upper() in KEYWORDS}  # fmt: skip
FRAGMENTS = {n: s for n, s in CONSTANTS.items() if n not in STATEMENTS}


@pytest.fixture(scope="module")
def migrated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sql") / "app.db"
    with eventlog.open_sync(path):
        pass
    return path


def bind(conn: sqlite3.Connection, sql: str) -> tuple[object, ...] | dict[str, object]:
    """Dummy parameters: as many as the statement takes, found by asking SQLite."""
    try:
        conn.execute("EXPLAIN " + sql).fetchall()
        return ()
    except sqlite3.ProgrammingError as exc:
        uses = re.search(r"uses (\d+)", str(exc))
        if uses:
            return (None,) * int(uses.group(1))
        return dict.fromkeys(re.findall(r"[:@$](\w+)", sql))


def test_found_the_statements() -> None:
    assert len(STATEMENTS) > 30
    for name in (
        "INSERT_EVENT[0]",
        "INSERT_EVENTS_AT[3]",
        "READ_LANE_AFTER",
        "HEAD_OFFSET",
        "BEGIN_WRITE",
    ):
        assert name in STATEMENTS


@pytest.mark.parametrize("name", sorted(STATEMENTS))
def test_statement_prepares_on_a_migrated_file(migrated: Path, name: str) -> None:
    sql = STATEMENTS[name]
    with raw(migrated) as conn:
        params = bind(conn, sql)
        # one statement per constant: sqlite3 refuses to execute two at once
        conn.execute("EXPLAIN " + sql, params).fetchall()


@pytest.mark.parametrize("name", sorted(FRAGMENTS))
def test_fragment_is_part_of_a_statement(name: str) -> None:
    fragment = FRAGMENTS[name]
    assert any(fragment in sql for sql in STATEMENTS.values()), f"{name} is used nowhere"


@pytest.mark.parametrize(
    "name",
    sorted(n for n, s in STATEMENTS.items()
           if re.search(r"\b(FROM|JOIN|UPDATE|INTO) eventlog_events\b", s, re.I)),
)  # fmt: skip
def test_event_queries_never_scan_the_table(migrated: Path, name: str) -> None:
    sql = STATEMENTS[name]
    with raw(migrated) as conn:
        params = bind(conn, sql)
        plan = [row[-1] for row in conn.execute("EXPLAIN QUERY PLAN " + sql, params)]
    names = {"eventlog_events"} | {
        alias for alias in re.findall(r"\beventlog_events\s+(?:AS\s+)?(\w+)", sql, re.I)
        if alias.upper() not in {"WHERE", "ON", "JOIN", "LEFT", "INNER", "CROSS", "ORDER",
                                 "GROUP", "LIMIT", "SET", "VALUES", "INDEXED", "NOT", "USING"}
    }  # fmt: skip
    # SCAN, even "USING COVERING INDEX", walks the whole table or index; SEARCH seeks.
    scans = [step for step in plan if step.split(" ")[:2] in (["SCAN", n] for n in names)]
    assert not scans, f"{name} scans the events table: {plan}"


def test_lane_reads_ride_the_lane_index(migrated: Path) -> None:
    with raw(migrated) as conn:
        sql = STATEMENTS["READ_LANE_AFTER"]
        plan = " ".join(r[-1] for r in conn.execute("EXPLAIN QUERY PLAN " + sql, bind(conn, sql)))
    assert "eventlog_events_lane" in plan, plan
