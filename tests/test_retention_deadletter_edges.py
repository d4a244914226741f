"""Retention and the dead-letter file, from a review: a requeue of many entries that one
pruned event refuses changes nothing (it used to requeue the first slices and then say
"nothing was requeued"), a requeue and a dead-lettering whose cost does not grow with the
whole file once per slice or once per event, and rewrites that leave the lines they do not
change as they were."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from conftest import cli, dead_letter_entry, dump, sql
from test_cli import ok

import eventlog
from eventlog import _deadletter
from eventlog._db import Paths


def entry(offset: int, **fields: Any) -> _deadletter.DeadLetter:
    return dead_letter_entry(offset=offset, payload={"n": offset}, **fields)


def write_entries(db: Path, entries: list[_deadletter.DeadLetter]) -> Path:
    path = Paths.for_db(db).deadletter
    lines = (json.dumps(e.to_dict(), separators=(",", ":")) + "\n" for e in entries)
    path.write_text("".join(lines))
    return path


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "app.db"
    eventlog.open_sync(path).close()
    return path


# -- a requeue of many entries is all or nothing ----------------------------------------------


def test_a_large_requeue_with_one_pruned_event_changes_nothing(db: Path) -> None:
    """`dlq requeue --all` over more entries than one slice of the old CLI loop (200), the
    pruned one last: the error says nothing was requeued, and nothing was."""
    with eventlog.open_sync(db) as log:
        log.append_many([eventlog.Draft("orders", {"n": i}) for i in range(1, 261)])
    sql(
        db, "INSERT INTO eventlog_group_offsets VALUES ('billing', 'orders', 0, 260, NULL, NULL, 0)"
    )
    path = write_entries(db, [entry(o) for o in range(2, 202)] + [entry(1)])
    pruned = cli(db, "prune", "--keep-last", "259")
    assert pruned.returncode == 0 and sql(db, "SELECT min(id) FROM eventlog_events") == [(2,)]
    before_db, before_file = dump(db), path.read_bytes()

    out = cli(db, "dlq", "requeue", "--all")
    assert out.returncode == 1 and "nothing was requeued" in out.stderr, out.stderr
    requested = sql(db, "SELECT count(*) FROM eventlog_redeliveries")[0][0]
    assert requested == 0, f"{requested} redeliveries asked for by a requeue that said none was"
    assert dump(db) == before_db
    assert path.read_bytes() == before_file


def test_a_requeue_of_many_entries_reads_each_line_a_few_times_not_once_per_slice(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CLI requeued in slices of 200, each reading and rewriting the whole file: a file
    of N entries cost N * N / 100 line parses (10,000 entries: 35 s; 100,000: about an hour)."""
    n = 1000
    with eventlog.open_sync(db) as log:
        log.append_many([eventlog.Draft("orders", {"n": i}) for i in range(1, n + 1)])
    write_entries(db, [entry(o) for o in range(1, n + 1)])
    parsed = 0
    real = _deadletter.parse_entry

    def counting(raw: bytes) -> _deadletter.DeadLetter:
        nonlocal parsed
        parsed += 1
        return real(raw)

    monkeypatch.setattr(_deadletter, "parse_entry", counting)
    ok(Path(db), "dlq", "requeue", "--all")
    monkeypatch.undo()
    assert sql(db, "SELECT count(*) FROM eventlog_redeliveries") == [(n,)]
    assert parsed <= 3 * n, f"{parsed} line parses to requeue {n} entries"


# -- a dead-lettering does not read the whole file ---------------------------------------------


def test_a_fresh_dead_letter_is_appended_without_reading_the_file(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every dead-lettering looked the new id up in the whole file, under its lock, though a
    fresh id cannot be there: with 100,000 entries of 2 kB, 0.8 s and 450 MB per dead letter,
    while every other consumer's dead-lettering waits for the lock. Only a write that may have
    happened before (an id chosen by an earlier, dead member, or our own failed write) looks
    (tests/groups/test_group_crashes.py::test_death_between_dead_letter_and_commit_does_not_
    dead_letter_twice checks that one)."""
    write_entries(db, [entry(o, group="other") for o in range(1, 50)])
    lookups: list[str] = []
    real = _deadletter.DeadLetterFile._entry_with_id

    def counting(self: _deadletter.DeadLetterFile, dead_letter_id: str) -> Any:
        lookups.append(dead_letter_id)
        return real(self, dead_letter_id)

    monkeypatch.setattr(_deadletter.DeadLetterFile, "_entry_with_id", counting)
    with eventlog.open_sync(db) as log:
        log.append_many([eventlog.Draft("t", {"n": i}) for i in range(3)])
        stop = threading.Event()
        handled: list[int] = []

        def handle(event: eventlog.Event) -> None:
            handled.append(event.offset)
            if event.payload["n"] < 2:
                raise ValueError("poison")
            stop.set()

        timer = threading.Timer(30, stop.set)
        timer.start()
        try:
            log.consume("g", "t", handle, stop=stop, handle_signals=False, max_attempts=1,
                        retry_backoff=0.01, max_backoff=0.02)  # fmt: skip
        finally:
            timer.cancel()
        mine = log.dead_letters(group="g").entries
    assert sorted(e.payload["n"] for e in mine) == [0, 1]
    assert lookups == [], f"the whole file was searched for the fresh ids {lookups}"


# -- rewrites leave the lines they do not change as they were ---------------------------------


@pytest.mark.parametrize("verb", ["purge", "requeue"])
def test_a_rewrite_keeps_other_entries_lines_and_fields_it_does_not_know(
    db: Path, verb: str
) -> None:
    """A purge or requeue of one entry rewrote every other line from what it understood of
    it: fields another version (or a person) added were dropped from entries nobody touched.
    The entry it changes keeps them too."""
    with eventlog.open_sync(db) as log:
        log.append_many([eventlog.Draft("orders", {"n": i}) for i in range(1, 3)])
    kept, target = entry(1), entry(2)
    kept_line = json.dumps({**kept.to_dict(), "note": "customer 42: call first"}) + "\n"
    target_line = json.dumps({**target.to_dict(), "ticket": "OPS-7"}) + "\n"
    path = Paths.for_db(db).deadletter
    path.write_text(kept_line + target_line)
    with eventlog.open_sync(db) as log:
        if verb == "purge":
            assert [e.id for e in log.purge_dead_letters([target.id])] == [target.id]
        else:
            assert [e.id for e in log.requeue_dead_letters([target.id])] == [target.id]
    lines = path.read_text().splitlines(keepends=True)
    assert lines[0] == kept_line
    if verb == "requeue":
        changed = json.loads(lines[1])
        assert changed["ticket"] == "OPS-7" and changed["requeued_at_ms"] is not None
    else:
        assert len(lines) == 1


# -- a requeue killed between its database change and its rename -----------------------------

KILLED_MID_REQUEUE = """
import os, signal, sys
import eventlog
from eventlog import _deadletter

def die(self):
    os.kill(os.getpid(), signal.SIGKILL)  # after the redeliveries, before the rename

_deadletter.Rewrite.commit = die
with eventlog.open_sync(sys.argv[1]) as log:
    log.requeue_dead_letters(all=True)
"""


def test_a_requeue_killed_before_its_rename_leaves_no_copy_behind_once_requeued_again(
    db: Path,
) -> None:
    """kill -9 between the redelivery requests and the rename left the temporary copy of the
    whole file (payloads and all) beside it for good, one more per such death. The entries
    stay pending (as the README says); the next rewrite removes the dead one's copy."""
    with eventlog.open_sync(db) as log:
        log.append_many([eventlog.Draft("orders", {"n": i}) for i in range(1, 4)])
    path = write_entries(db, [entry(o) for o in range(1, 4)])
    before = path.read_bytes()
    child = subprocess.run([sys.executable, "-c", KILLED_MID_REQUEUE, str(db)],
                           capture_output=True, text=True, timeout=60)  # fmt: skip
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert path.read_bytes() == before  # still pending
    assert sql(db, "SELECT count(*) FROM eventlog_redeliveries") == [(3,)]
    copies = lambda: sorted(p.name for p in db.parent.iterdir() if ".tmp-" in p.name)  # noqa: E731
    assert copies(), "the child did not get as far as its temporary copy"

    out = cli(db, "--json", "dlq", "requeue", "--all")
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.splitlines()) == 3
    assert copies() == [], f"a dead process's copy of the dead-letter file is left: {copies()}"


def test_a_dead_letter_left_by_an_earlier_write_is_fsynced_before_it_stands_for_this_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A member killed between its line's write and its fsync leaves the line in the page
    cache only. The member that takes the lane finds it (the episode's id was committed) and
    commits past the event: that line must be on disk first, or a power cut loses the event
    from both the group and the dead-letter file (guarantee 3)."""
    db = tmp_path / "app.db"
    eventlog.open_sync(db).close()
    paths = Paths.for_db(db)
    earlier = dead_letter_entry()
    paths.deadletter.write_text(json.dumps(earlier.to_dict(), separators=(",", ":")) + "\n")
    synced: list[int] = []
    real = os.fsync

    def recording(fd: int) -> None:
        synced.append(os.fstat(fd).st_ino)
        real(fd)

    monkeypatch.setattr(os, "fsync", recording)
    again = dead_letter_entry(id=earlier.id, error_message="the retry's")
    got = _deadletter.DeadLetterFile(paths).append(again, once=True)
    monkeypatch.undo()
    assert got == earlier
    assert len(paths.deadletter.read_text().splitlines()) == 1
    assert paths.deadletter.stat().st_ino in synced, "the line found was never fsynced"
