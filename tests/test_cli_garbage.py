"""The CLI given garbage: malformed JSON lines, binary bytes on stdin, unknown groups, bad
durations and times, hostile names, a missing or non-database file. Every case ends with the
documented exit status (1: an `error:` line and a `hint:` line; 2: a usage error), never a
traceback, and changes nothing in the log (checked with plain sqlite3).

Each case runs the real `python -m eventlog` in a subprocess, with no terminal and no
EVENTLOG_DB from the environment.
"""

from __future__ import annotations

import hashlib
import sqlite3
import subprocess
from pathlib import Path

import pytest
from conftest import cli

import eventlog


def expect_error(out: subprocess.CompletedProcess[str]) -> None:
    assert out.returncode == 1, (out.returncode, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert lines and lines[0].startswith("error: "), out.stderr
    assert any(line.startswith("hint: ") for line in lines), out.stderr


def expect_usage(out: subprocess.CompletedProcess[str]) -> None:
    assert out.returncode == 2, (out.returncode, out.stderr)
    assert "Usage:" in out.stderr and "Error" in out.stderr, out.stderr


def state(db: Path) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]]]:
    conn = sqlite3.connect(db)
    try:
        return (
            conn.execute("SELECT id, topic, payload FROM eventlog_events ORDER BY id").fetchall(),
            conn.execute("SELECT * FROM eventlog_group_offsets ORDER BY 1, 2, 3").fetchall(),
        )
    finally:
        conn.close()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "app.db"
    with eventlog.open_sync(path) as log:
        log.append("orders", {"id": 1})
        log.append("orders", {"id": 2})
    return path


# -- stdin --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "lines",
    [
        b'{"a": 1}\n{bad json\n{"b": 2}\n',
        b'{"a": 1}\n{"a": 1} trailing\n',
        b"NaN\n",
        b'{"x": Infinity}\n',
        b'{"a": 1}\n{"a": \n',
        b"\n\n{\n",
        b'"unterminated\n',
        b"[1, 2,]\n",
    ],
    ids=["bad-line", "trailing", "nan", "infinity", "torn-last", "lone-brace", "string", "comma"],
)
def test_malformed_json_lines_exit_1_and_append_nothing(db: Path, lines: bytes) -> None:
    before = state(db)
    out = cli(db, "append", "orders", stdin=lines)
    expect_error(out)
    assert "line" in out.stderr
    assert state(db) == before


@pytest.mark.parametrize(
    "garbage",
    [
        bytes(range(256)) * 8,
        b"\xff\xfe\x00\x00" * 100,
        hashlib.sha512(b"seed").digest() * 50,
        b'{"a": "\xff"}\n',
        b"\x00\n\x00\n",
        b"\x1b[31mred\x1b[0m\n",
    ],
    ids=["all-bytes", "bom-like", "random", "bad-utf8-in-string", "nul", "escape-codes"],
)
def test_binary_garbage_on_stdin_exits_1_and_appends_nothing(db: Path, garbage: bytes) -> None:
    before = state(db)
    out = cli(db, "append", "orders", stdin=garbage)
    expect_error(out)
    assert state(db) == before


def test_empty_stdin_appends_nothing_and_succeeds(db: Path) -> None:
    before = state(db)
    out = cli(db, "append", "orders", stdin=b"")
    assert out.returncode == 0, out.stderr
    assert state(db) == before


def test_malformed_json_argument_is_a_usage_error(db: Path) -> None:
    before = state(db)
    for text in ("{bad", "NaN", "", "[1,", '{"a": Infinity}'):
        expect_usage(cli(db, "append", "orders", text))
    assert state(db) == before


# -- names and groups ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a..b", "a b", "é", "a/b"])
def test_hostile_topic_and_group_names_exit_1(db: Path, name: str) -> None:
    before = state(db)
    expect_error(cli(db, "append", name, '{"a": 1}'))
    expect_error(cli(db, "groups", "show", name))
    assert state(db) == before
    assert sorted(p.name for p in db.parent.iterdir()) == sorted(
        ["app.db", "app.db.d", *(["app.db-wal"] if Path(f"{db}-wal").exists() else []),
         *(["app.db-shm"] if Path(f"{db}-shm").exists() else [])]
    )  # fmt: skip


@pytest.mark.parametrize(
    "args",
    [
        ["groups", "show", "nosuch"],
        ["groups", "delete", "nosuch"],
        ["replay", "nosuch", "--by-duration", "2h"],
        ["dlq", "show", "0123456789ab"],
        ["dlq", "show", "not-an-id"],
        ["dlq", "requeue", "--id", "../../etc"],
        ["dlq", "purge", "--group", "../x"],
    ],
    ids=[
        "show",
        "delete",
        "replay",
        "dlq-show-missing",
        "dlq-show-bad",
        "dlq-requeue-bad",
        "dlq-purge-bad-group",
    ],
)
def test_unknown_groups_and_dead_letters_exit_1(db: Path, args: list[str]) -> None:
    before = state(db)
    expect_error(cli(db, *args))
    assert state(db) == before


def test_listing_dead_letters_of_an_unknown_group_finds_none(db: Path) -> None:
    out = cli(db, "dlq", "list", "--group", "nosuch")
    assert out.returncode == 0, out.stderr


# -- durations, times, numbers ------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["prune", "--older-than", "3x"],
        ["prune", "--older-than", ""],
        ["prune", "--older-than", "PT"],
        ["prune", "--older-than", "1e999d"],
        ["replay", "billing", "--by-duration", "nope"],
        ["replay", "billing", "--by-duration", "--"],
        ["dlq", "list", "--since", "yesterdayish"],
        ["tail", "orders", "--from", "nope"],
        ["groups", "--stale-after", "abc"],
        ["consume", "g", "orders", "--timeout", "-1", "--", "true"],
        ["nosuchverb"],
        ["append"],
    ],
    ids=["unit", "empty", "bare-PT", "overflow", "replay", "dashes", "since", "from",
         "stale-after", "timeout", "verb", "no-topic"],
)  # fmt: skip
def test_bad_durations_times_and_usage_exit_2(db: Path, args: list[str]) -> None:
    before = state(db)
    out = cli(db, *args)
    if args == ["prune", "--older-than", "1e999d"] and out.returncode == 1:
        expect_error(out)  # a value that parses but cannot be a time: an error, not a crash
    else:
        expect_usage(out)
    assert state(db) == before


# -- the database file itself -------------------------------------------------------------------


@pytest.mark.parametrize("verb", [["topics"], ["groups"], ["dlq", "list"], ["stats"]])
def test_read_only_verbs_on_a_missing_file_exit_1_and_create_nothing(
    tmp_path: Path, verb: list[str]
) -> None:
    missing = tmp_path / "missing.db"
    out = cli(missing, *verb)
    expect_error(out)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("content", [b"xx", b"SQLite format 3\x00" + b"\xff" * 200,
                                     bytes(range(256)) * 64])  # fmt: skip
def test_a_file_that_is_not_a_database_exits_1_and_stays_untouched(
    tmp_path: Path, content: bytes
) -> None:
    bad = tmp_path / "bad.db"
    bad.write_bytes(content)
    for verb in (["topics"], ["append", "orders", "{}"], ["stats"], ["tail", "orders"]):
        expect_error(cli(bad, *verb))
    assert bad.read_bytes() == content
