"""The command line driven as a user of Kafka, Redis or RabbitMQ tools would: an application's
SQLite file given as --db, stopping `consume` (a second Ctrl-C, a closed pipe, a command that
leaves a process behind), backups to places that cannot hold them, huge or failing stdin, and
paths that cannot be a database."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import cli

import eventlog

CLI = [sys.executable, "-m", "eventlog"]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "EVENTLOG_DB"}


def _poll(predicate: Any, timeout: float = 30, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def _tables(db: Path) -> list[str]:
    conn = sqlite3.connect(db)
    try:
        return sorted(
            r[0] for r in conn.execute("SELECT name FROM sqlite_schema WHERE type = 'table'")
        )
    finally:
        conn.close()


def _dead_letters(db: Path) -> list[dict[str, Any]]:
    path = Path(f"{db}.deadletter.jsonl")
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _position(db: Path, group: str, topic: str = "orders") -> int | None:
    conn = sqlite3.connect(db, timeout=10)
    try:
        rows = conn.execute("SELECT position FROM eventlog_group_offsets WHERE group_name = ?"
                            " AND topic = ?", (group, topic)).fetchall()  # fmt: skip
    finally:
        conn.close()
    return int(rows[0][0]) if rows else None


@pytest.fixture
def orders(tmp_path: Path) -> Path:
    path = tmp_path / "app.db"
    with eventlog.open_sync(path) as log:
        log.append_many([eventlog.Draft("orders", {"n": i}) for i in range(1, 11)])
    return path


# -- a foreign SQLite database --------------------------------------------------------------------


@pytest.mark.parametrize(
    "verb",
    [["stats"], ["topics"], ["tail", "orders"], ["groups"], ["dlq", "list"], ["doctor"],
     ["append", "orders", "{}"], ["backup", "copy.db"], ["migrate"],
     ["prune", "--keep-last", "0", "--dry-run"]],
    ids=lambda v: " ".join(v),
)  # fmt: skip
def test_verbs_other_than_init_leave_an_applications_sqlite_database_untouched(
    tmp_path: Path, verb: list[str]
) -> None:
    """`--db` pointed by mistake at an application's own SQLite database: only `init` may make
    it a log (README: 'Only init creates a database'). A read-only verb like `stats` must not
    add eventlog's tables, nor switch the file to WAL."""
    app = tmp_path / "django.sqlite3"
    conn = sqlite3.connect(app)
    conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
    conn.execute("INSERT INTO users (name) VALUES ('ada')")
    conn.commit()
    conn.close()
    before = app.read_bytes()
    done = cli(app, *verb)
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert _tables(app) == ["users"]
    assert app.read_bytes() == before
    assert not (tmp_path / "copy.db").exists()


# -- consume: stopping is not a failure -----------------------------------------------------------


def test_a_second_ctrl_c_does_not_dead_letter_the_event_in_hand(
    tmp_path: Path, orders: Path
) -> None:
    """README: 'Ctrl-C finishes the event in hand ...; a second Ctrl-C stops the command'. The
    operator stopping the consumer is not the event failing: it must not use up an attempt,
    let alone dead-letter the event (here on its only attempt)."""
    mark = tmp_path / "started"
    proc = subprocess.Popen(
        [*CLI, "--db", str(orders), "consume", "billing", "orders", "--max-attempts", "1", "--",
         "sh", "-c", f"touch {mark}; exec sleep 60"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
    )  # fmt: skip
    try:
        _poll(mark.exists, what="the command to start")
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert _dead_letters(orders) == [], err
    assert (_position(orders, "billing") or 0) == 0  # event 1 not handled: delivered again


def test_consume_whose_stdout_reader_went_away_dead_letters_nothing(orders: Path) -> None:
    """`eventlog consume g orders -- cat | head -n 1`: the commands share eventlog's stdout.
    Once the reader is gone each command dies of SIGPIPE; that is not the events' fault, and
    a closed pipe ends quietly: no event may be dead-lettered (nor skipped)."""
    proc = subprocess.Popen(
        [*CLI, "--db", str(orders), "consume", "mailer", "orders", "--max-attempts", "2",
         "--retry-backoff", "0.01", "--", "cat"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=_env(),
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        first = json.loads(proc.stdout.readline())
        assert first["offset"] == 1
        proc.stdout.close()  # like `head -n 1` exiting
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and proc.poll() is None and not _dead_letters(orders):
            time.sleep(0.05)
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        proc.wait(30)
    finally:
        proc.kill()
        proc.wait()
    assert _dead_letters(orders) == []
    assert (_position(orders, "mailer") or 0) <= 1  # nothing past what `cat` really delivered


def test_a_background_process_left_by_the_command_does_not_hold_up_consume(
    orders: Path, tmp_path: Path
) -> None:
    """The command exits at once but leaves a background process that inherited its stderr
    (`sh -c 'worker &'`). consume waits for that process to end before the next event, for
    as long as it lives, and --timeout does not bound it."""
    with eventlog.open_sync(orders) as log:
        log.create_topic("jobs")
        log.append_many([eventlog.Draft("jobs", {"n": i}) for i in range(3)])
    pids = tmp_path / "pids"
    proc = subprocess.Popen(
        [*CLI, "--db", str(orders), "consume", "starter", "jobs", "--timeout", "2", "--",
         "sh", "-c", f"sleep 30 & echo $! >> {pids}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(),
    )  # fmt: skip
    try:
        # a deadline, not a timing: each event used to take the 30 s the sleep lives
        _poll(lambda: _position(orders, "starter", "jobs") == 13, timeout=60,
              what="three events, each a command that exits at once")  # fmt: skip
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(40)
        finally:
            proc.kill()
            proc.wait()
            for pid in pids.read_text().split() if pids.exists() else []:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)


# -- backup: a destination that cannot be written -------------------------------------------------


def _limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))


def test_backup_to_a_full_disk_is_an_error_not_a_traceback(tmp_path: Path) -> None:
    """The destination's disk fills up mid-copy (simulated with RLIMIT_FSIZE, which Python
    turns into EFBIG): exit 1 with error/hint lines, no traceback, no copy left behind."""
    db = tmp_path / "app.db"
    with eventlog.open_sync(db) as log:
        log.append_many([eventlog.Draft("orders", {"pad": "x" * 500, "i": i})
                         for i in range(2000)])  # fmt: skip
        log.checkpoint()
    assert db.stat().st_size > 512 * 1024
    dest = tmp_path / "backups"
    dest.mkdir()
    done = subprocess.run(
        [*CLI, "--db", str(db), "backup", str(dest / "copy.db")], capture_output=True,
        text=True, timeout=60, env=_env(), preexec_fn=_limit_file_size,
    )  # fmt: skip
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 1
    assert done.stderr.startswith("error: ") and "hint: " in done.stderr
    assert list(dest.iterdir()) == []


def test_backup_into_a_folder_that_cannot_hold_files_is_an_error_not_a_traceback(
    orders: Path,
) -> None:
    done = cli(orders, "backup", "/proc/eventlog-review-backup.db")
    assert done.returncode == 1
    assert done.stderr.startswith("error: ")


# -- append from stdin --------------------------------------------------------------------------


def test_a_huge_line_on_stdin_is_refused_in_linear_time(orders: Path) -> None:
    """A 96 MiB one-line JSON dump piped in by mistake: the answer (too big / not an event)
    must come after reading it once, not after quadratic re-splitting (minutes). No timing
    is asserted: the deadline only catches the minutes (a linear read takes seconds)."""
    line = b"a" * (96 * 1024 * 1024) + b"\n"
    done = subprocess.run([*CLI, "--db", str(orders), "append", "orders"], input=line,
                          capture_output=True, timeout=120, env=_env())  # fmt: skip
    assert done.returncode == 1 and b"line 1" in done.stderr


def test_append_that_fails_on_storage_midway_says_what_was_appended(tmp_path: Path) -> None:
    """Guarantee 7's 'or say clearly what was appended': a bad line already gets 'the N events
    before line L were appended'; a write that fails midway (disk full) must say it as well,
    or a user re-sends everything and duplicates the first batches."""
    db = tmp_path / "app.db"
    with eventlog.open_sync(db) as log:
        log.create_topic("orders")
    script = (
        "import json, sys, time\n"
        "for i in range(3000):\n"
        "    print(json.dumps({'pad': 'x' * 500, 'i': i}), flush=True)\n"
        "    if i % 1000 == 999: time.sleep(0.5)\n"
    )
    producer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        done = subprocess.run(
            [*CLI, "--db", str(db), "append", "orders"], stdin=producer.stdout,
            capture_output=True, text=True, timeout=60, env=_env(),
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (600 * 1024,) * 2),
        )  # fmt: skip
    finally:
        assert producer.stdout is not None
        producer.stdout.close()
        producer.kill()
        producer.wait()
    assert "Traceback" not in done.stderr
    assert done.returncode == 1
    printed = len(done.stdout.split())
    conn = sqlite3.connect(db)
    stored = conn.execute("SELECT count(*) FROM eventlog_events").fetchone()[0]
    conn.close()
    assert 0 < printed == stored < 3000
    assert f"{stored} events" in done.stderr, done.stderr


# -- --db that is not a file --------------------------------------------------------------------


def test_a_directory_as_db_says_it_is_a_directory(tmp_path: Path) -> None:
    folder = tmp_path / "events.db"
    folder.mkdir()
    for verb in (["topics"], ["init"], ["append", "orders", "{}"]):
        done = cli(folder, *verb)
        assert done.returncode == 1
        assert "directory" in done.stderr, done.stderr  # not 'make it writable'


def test_a_db_path_too_long_for_the_file_system_is_an_error_not_a_traceback(
    tmp_path: Path,
) -> None:
    long = tmp_path / ("a" * 300 + ".db")
    for verb in (["init"], ["topics"], ["stats"]):
        done = cli(long, *verb)  # cli() fails on a traceback
        assert done.returncode == 1 and done.stderr.startswith("error: ")
