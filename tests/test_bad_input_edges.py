"""Guarantee 7 at the edges: odd text in handler errors and in the dead-letter file, integers
past SQLite's 64 bits, times past what a datetime holds, wrong types in the API, a backup
aimed at the log's own files, an empty file given as --db. Each gets a typed error (or is
read as what it means) and changes nothing."""

from __future__ import annotations

import json
import math
import os
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
from conftest import cli, dead_letter_entry, dump

import eventlog
from eventlog import _deadletter
from eventlog._db import Paths

# -- helpers --------------------------------------------------------------------------------------


def no_traceback(out: subprocess.CompletedProcess[str], codes: tuple[int, ...] = (1, 2)) -> None:
    last = " | ".join(out.stderr.strip().splitlines()[-2:])
    assert "Traceback" not in out.stderr, f"traceback: {last}"
    assert out.returncode in codes, (out.returncode, last)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "app.db"
    with eventlog.open_sync(path) as log:
        log.append_many([eventlog.Draft("orders", {"n": i}) for i in range(1, 6)])
    return path


@pytest.fixture
def consumed(db: Path) -> Path:
    """Group billing has a position in orders[0] (it handled offsets 1..3)."""
    with eventlog.open_sync(db) as log:
        stop = threading.Event()

        def handle(event: eventlog.Event) -> None:
            if event.offset >= 3:
                stop.set()

        log.consume("billing", "orders", handle, stop=stop, handle_signals=False)
    return db


def with_dead_letter(db: Path, extra_line: bytes = b"") -> Path:
    path = Paths.for_db(db).deadletter
    _deadletter.DeadLetterFile(Paths.for_db(db)).append(dead_letter_entry())
    with open(path, "ab") as f:
        f.write(extra_line)
    return path


# -- a handler error whose text UTF-8 cannot hold -------------------------------------------------


@pytest.mark.timeout(120)
def test_handler_error_with_a_lone_surrogate_is_dead_lettered_not_a_crash(db: Path) -> None:
    # A realistic message: a file name that is not UTF-8, decoded the way os does it.
    bad_name = os.fsdecode(b"/data/in/\xff.csv")
    runs: list[str] = []
    for _ in range(4):  # more runs than max_attempts: a crashing event must still end
        stop = threading.Event()
        timer = threading.Timer(5, stop.set)
        timer.start()

        def handle(event: eventlog.Event, stop: threading.Event = stop) -> None:
            if event.offset == 1:
                raise ValueError(f"cannot import {bad_name}")
            if event.offset == 5:
                stop.set()

        try:
            with eventlog.open_sync(db) as log:
                log.consume("billing", "orders", handle, stop=stop, handle_signals=False,
                            max_attempts=2, retry_backoff=0.01)  # fmt: skip
            runs.append("ok")
        except eventlog.EventlogError as exc:
            runs.append(f"typed {type(exc).__name__}")
        except Exception as exc:  # a raw UnicodeEncodeError, every run, was the bug
            runs.append(f"raw {type(exc).__name__}")
        finally:
            stop.set()
            timer.cancel()
        if runs[-1] == "ok":
            break
    assert runs[-1] == "ok" and not any(r.startswith("raw") for r in runs), runs
    with eventlog.open_sync(db) as log:
        (entry,) = log.dead_letters().entries
        assert entry.offset == 1 and "\\udcff" in entry.error_message


# -- dead-letter lines that are JSON but not entries ----------------------------------------------

NON_OBJECT_LINES = {
    "array": b"[1, 2]\n",
    "number": b"5\n",
    "null": b"null\n",
    "deeply-nested": b"[" * 100_000 + b"]" * 100_000 + b"\n",
}


@pytest.mark.parametrize("line", NON_OBJECT_LINES.values(), ids=NON_OBJECT_LINES.keys())
def test_api_dead_letter_listing_survives_a_non_object_line(db: Path, line: bytes) -> None:
    path = with_dead_letter(db, line)
    before = path.read_bytes()
    with eventlog.open_sync(db) as log:
        try:
            listing = log.dead_letters()
        except eventlog.EventlogError:
            pass  # a typed error would be acceptable too
        else:
            assert len(listing.entries) == 1 and listing.bad_lines == [2]
    assert path.read_bytes() == before


@pytest.mark.parametrize("line", NON_OBJECT_LINES.values(), ids=NON_OBJECT_LINES.keys())
def test_api_purge_and_requeue_survive_a_non_object_line(db: Path, line: bytes) -> None:
    with_dead_letter(db, line)
    with eventlog.open_sync(db) as log:
        # The unreadable line is skipped: the one entry is what both would act on.
        assert len(log.requeue_dead_letters(all=True, dry_run=True)) == 1
        assert len(log.purge_dead_letters(all=True, dry_run=True)) == 1


@pytest.mark.parametrize(
    "verb", [["dlq", "list"], ["--json", "dlq", "list"], ["stats"], ["doctor"],
             ["dlq", "requeue", "--all", "--dry-run"], ["dlq", "purge", "--all", "--dry-run"]],
    ids=" ".join,
)  # fmt: skip
def test_cli_verbs_survive_a_dead_letter_line_that_is_json_null(db: Path, verb: list[str]) -> None:
    path = with_dead_letter(db, b"null\n")
    before = path.read_bytes()
    no_traceback(cli(db, *verb), codes=(0, 1))
    assert path.read_bytes() == before


@pytest.mark.parametrize(
    ("fields", "verb"),
    [({"dead_lettered_at_ms": 10**30}, ["dlq", "list"]),
     ({"error_message": 12345}, ["dlq", "list"])],
    ids=["time-out-of-range", "message-not-a-string"],
)  # fmt: skip
def test_cli_dlq_list_survives_an_entry_with_wrong_field_types(
    db: Path, fields: dict[str, Any], verb: list[str]
) -> None:
    bad = dead_letter_entry(**fields).to_dict()
    path = with_dead_letter(db, json.dumps(bad).encode() + b"\n")
    before = path.read_bytes()
    no_traceback(cli(db, *verb), codes=(0, 1))
    assert path.read_bytes() == before


def test_cli_dlq_list_survives_an_escaped_lone_surrogate_in_an_entry(db: Path) -> None:
    # json.dumps' default (ensure_ascii) writes it as an escape: a hand-edited or tool-written
    # file can hold it, and json.loads reads it back as a lone surrogate.
    line = json.dumps(dead_letter_entry(error_message="bad \ud800").to_dict()).encode() + b"\n"
    path = with_dead_letter(db, line)
    before = path.read_bytes()
    for verb in (["dlq", "list"], ["--json", "dlq", "list"]):
        no_traceback(cli(db, *verb), codes=(0, 1))
    assert path.read_bytes() == before


# -- a requeue that cannot rewrite the dead-letter file changes nothing ---------------------------


def test_requeue_that_cannot_mark_the_file_leaves_the_database_unchanged(db: Path) -> None:
    path = with_dead_letter(db)
    lock = Paths.for_db(db).deadletter_lock
    lock.unlink(missing_ok=True)
    lock.mkdir()  # the dead-letter lock cannot be opened: the file cannot be rewritten
    before_db, before_file = dump(db), path.read_bytes()
    with eventlog.open_sync(db) as log, pytest.raises(eventlog.EventlogError):
        log.requeue_dead_letters(all=True)
    assert path.read_bytes() == before_file
    assert dump(db) == before_db  # no redelivery was asked for


def test_an_entry_whose_text_utf8_cannot_hold_is_read_and_requeued_escaped(db: Path) -> None:
    # json.dumps' default writes a lone surrogate as an escape: a hand-edited or tool-written
    # line can hold one, and json.loads reads it back as text that UTF-8 cannot encode.
    line = json.dumps(dead_letter_entry(error_message="bad \udcff").to_dict()).encode() + b"\n"
    path = Paths.for_db(db).deadletter
    path.write_bytes(line)
    with eventlog.open_sync(db) as log:
        (listed,) = log.dead_letters().entries
        assert listed.error_message == "bad \\udcff"
        (requeued,) = log.requeue_dead_letters(all=True)
        assert requeued.id == listed.id
        (marked,) = log.dead_letters().entries
        assert marked.requeued and marked.error_message == "bad \\udcff"


# -- offsets, pages and starts past SQLite's 64-bit integers --------------------------------------

HUGE = 2**64


@pytest.mark.parametrize(
    "call",
    [
        lambda log: log.get(2**63),
        lambda log: list(log.read("orders", start=HUGE)),
        lambda log: list(log.read("orders", page=2**63)),
        lambda log: log.wait_for("orders", after=HUGE, timeout=0.1),
    ],
    ids=["get-2**63", "read-start-2**64", "read-page-2**63", "wait_for-after-2**64"],
)
def test_api_huge_integers_raise_typed_errors(db: Path, call: Any) -> None:
    before = dump(db)
    with eventlog.open_sync(db) as log, pytest.raises(eventlog.InvalidArgument):
        call(log)  # an OverflowError was the bug
    assert dump(db) == before


async def test_async_get_huge_offset_raises_a_typed_error(db: Path) -> None:
    async with eventlog.open(db) as log:
        with pytest.raises(eventlog.InvalidArgument):
            await log.get(2**63)


def test_api_consumer_start_beyond_64_bits_is_a_typed_error(db: Path) -> None:
    before = dump(db)
    with eventlog.open_sync(db) as log:
        stop = threading.Event()
        threading.Timer(5, stop.set).start()
        try:
            with pytest.raises(eventlog.InvalidArgument):
                log.consume("g", "orders", lambda e: None, stop=stop, handle_signals=False,
                            start=HUGE)  # fmt: skip
        finally:
            stop.set()
    assert dump(db) == before


@pytest.mark.parametrize(
    "args",
    [
        ["tail", "orders", "--from", "99999999999999999999999"],
        ["tail", "orders", "-n", "9223372036854775808"],
        ["consume", "g", "orders", "--from", "99999999999999999999999", "--", "true"],
    ],
    ids=["tail-from", "tail-n", "consume-from"],
)
def test_cli_huge_integers_exit_without_traceback(db: Path, args: list[str]) -> None:
    before = dump(db)
    no_traceback(cli(db, *args))
    assert dump(db) == before


def test_cli_replay_shift_beyond_64_bits_exits_without_traceback(consumed: Path) -> None:
    before = dump(consumed)
    no_traceback(cli(consumed, "replay", "billing", "--shift-by", "-99999999999999999999999"))
    assert dump(consumed) == before


# -- JSON nested too deep for json.loads on the command line --------------------------------------

DEEP = "[" * 30_000 + "]" * 30_000


def test_cli_append_deeply_nested_json_argument(db: Path) -> None:
    before = dump(db)
    no_traceback(cli(db, "append", "orders", DEEP))
    assert dump(db) == before


def test_cli_append_deeply_nested_json_line_on_stdin(db: Path) -> None:
    before = dump(db)
    no_traceback(cli(db, "append", "orders", stdin=b'{"ok": 1}\n' + DEEP.encode() + b"\n"))
    assert dump(db) == before


# -- times past what a datetime holds; digits int() refuses ---------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["tail", "orders", "--from", "+99999999d"],
        ["tail", "orders", "--from", "-999999999d"],
        ["dlq", "list", "--since", "-999999999d"],
        ["replay", "billing", "--to-datetime", "+999999999d"],
        ["replay", "billing", "--by-duration", "99999999999w"],
        ["prune", "--older-than", "99999999999w"],
        ["tail", "orders", "--from", "\u00b2"],  # '²'.isdigit() is True, int('²') fails
        ["consume", "g", "orders", "--from", "\u00b2", "--", "true"],
    ],
    ids=["tail-future", "tail-past", "dlq-since", "replay-to-datetime", "replay-by-duration",
         "prune-older-than", "tail-superscript", "consume-superscript"],
)  # fmt: skip
def test_cli_out_of_range_times_exit_without_traceback(consumed: Path, args: list[str]) -> None:
    before = dump(consumed)
    no_traceback(cli(consumed, *args), codes=(0, 1, 2))
    assert dump(consumed) == before


def test_a_relative_time_past_what_a_datetime_holds_stops_there() -> None:
    from eventlog import _times

    assert _times.parse_time("-999999999d") == _times.EARLIEST
    assert _times.parse_time("+999999999d") == _times.LATEST
    with pytest.raises(eventlog.InvalidArgument, match="too long"):
        _times.parse_duration("99999999999w")


# -- wrong types and NaN in the Python API --------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda log: log.dead_letters(since="2024-01-01"),
        lambda log: log.purge_dead_letters(5),
        lambda log: log.append_many(5),
        lambda log: log.consume("g", "orders", print, retry_backoff="0.5"),
        lambda log: log.consume("g", "orders", print, max_backoff=None),
        lambda log: log.consume("g", "orders", print, timeout="5"),
    ],
    ids=["dead_letters-since-str", "purge-ids-int", "append_many-int", "retry_backoff-str",
         "max_backoff-None", "timeout-str"],
)  # fmt: skip
def test_api_wrong_types_raise_typed_errors(db: Path, call: Any) -> None:
    with eventlog.open_sync(db) as log, pytest.raises(eventlog.InvalidArgument):
        call(log)


@pytest.mark.parametrize("option", ["timeout", "hard_timeout", "retry_backoff", "max_backoff"])
async def test_api_consumer_refuses_nan_durations(db: Path, option: str) -> None:
    async with eventlog.open(db) as log:
        with pytest.raises(eventlog.InvalidArgument):
            log.consumer("g", "orders", print, **{option: math.nan})


# -- backup: the log's own files as destination; nothing left on failure --------------------------


def test_backup_refuses_to_overwrite_the_logs_own_dead_letter_file(db: Path) -> None:
    path = with_dead_letter(db)
    before = path.read_bytes()
    out = cli(db, "backup", str(path), "--force")
    assert path.read_bytes() == before, "the dead-letter file was replaced by a database image"
    no_traceback(out)


def test_backup_of_a_file_that_is_not_a_database_leaves_nothing_behind(tmp_path: Path) -> None:
    bad = tmp_path / "bad.db"
    bad.write_text("hello\n")
    dest_dir = tmp_path / "backups"
    dest_dir.mkdir()
    out = cli(bad, "backup", str(dest_dir / "copy.db"))
    no_traceback(out, codes=(1,))
    assert list(dest_dir.iterdir()) == []  # no .copy.db.tmp-<pid> left there


# -- an empty file is not a database to verbs that must not create one ----------------------------


def test_read_only_verb_on_an_empty_file_does_not_turn_it_into_a_database(tmp_path: Path) -> None:
    empty = tmp_path / "empty.db"
    empty.touch()
    out = cli(empty, "topics")
    assert empty.stat().st_size == 0, (out.returncode, out.stderr)
