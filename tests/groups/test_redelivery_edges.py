"""Requeued dead letters against the rest: retention, a running group, a second requeue, a
death mid-redelivery, a handler's own CancelledError, and an offset reset. A requeue that
returns is delivered once more by the owner of the event's partition; one that cannot be
delivered is refused and changes nothing."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import eventlog

from .conftest import (
    assert_one_owner_at_a_time,
    attempt_rows,
    calls,
    caught_up,
    deadletter_entries,
    keys_by_partition,
    position,
    raw,
    read_journal,
    running,
    until,
    wait_until,
)

CLI = [sys.executable, "-m", "eventlog"]
FAST = {"retry_backoff": 0.01, "max_backoff": 0.02}


def cli(db: Path, *args: Any, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([*CLI, "--db", str(db), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip
    assert "Traceback" not in done.stderr, done.stderr
    return done


def redeliveries(db: Path) -> list[tuple[Any, ...]]:
    with raw(db) as conn:
        return conn.execute(
            "SELECT group_name, event_offset, dead_letter_id FROM eventlog_redeliveries"
        ).fetchall()


def dead_letter_and_requeue(db: Path, *, max_attempts: int) -> dict[str, Any]:
    """Group g dead-letters every event of t (its handler always fails); the one entry, L1,
    is requeued. Returns L1."""

    def handle(event: eventlog.Event) -> None:
        raise RuntimeError("broken")

    with eventlog.open_sync(db) as log:
        stop = threading.Event()
        th = threading.Thread(target=log.consume, args=("g", "t", handle),
                              kwargs={"stop": stop, "handle_signals": False,
                                      "max_attempts": max_attempts, **FAST})  # fmt: skip
        th.start()
        try:
            wait_until(lambda: caught_up(db, "g", "t"), what="L1")
        finally:
            stop.set()
            th.join(30)
    (l1,) = deadletter_entries(db)
    assert cli(db, "dlq", "requeue", "--id", l1["id"]).returncode == 0
    return l1  # type: ignore[no-any-return]


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "e.db"  # short: wake-up socket paths are small


@pytest.fixture
def journal(tmp_path: Path) -> Path:
    return tmp_path / "journal.jsonl"


# -- requeue of a dead letter whose event was pruned -------------------------------------------


async def test_a_requeue_of_a_pruned_event_is_refused_and_the_entry_stays_pending(db: Path) -> None:
    """An event pruned by retention after it was dead-lettered (the group was past it, so
    nothing held it back) cannot be delivered again: the requeue says so, exits 1, and the
    entry stays pending (it used to be marked requeued, and the consumer dropped it)."""
    async with eventlog.open(db) as log:
        bad = await log.append("t", {"n": 0, "bad": True}, key="k")
        for i in range(1, 4):
            await log.append("t", {"n": i}, key="k")
        handled: list[int] = []
        failing = True

        async def handle(event: eventlog.Event) -> None:
            handled.append(event.offset)
            if event.payload.get("bad") and failing:
                raise ValueError("bug")

        async with running(log.consumer("g", "t", handle, max_attempts=1, **FAST)):
            await until(lambda: caught_up(db, "g", "t"), what="g to finish")
        (entry,) = deadletter_entries(db)
        assert entry["offset"] == bad

        pruned = cli(db, "prune", "--keep-last", "1", "--topic", "t")
        assert pruned.returncode == 0, pruned.stderr
        with raw(db) as conn:
            assert conn.execute("SELECT count(*) FROM eventlog_events WHERE id = ?",
                                (bad,)).fetchone()[0] == 0  # fmt: skip

        requeued = cli(db, "--json", "dlq", "requeue", "--group", "g")
        failing = False  # the bug is fixed
        handled.clear()
        async with running(log.consumer("g", "t", handle, max_attempts=1, **FAST)):
            await until(lambda: not redeliveries(db), what="the redelivery to be consumed")
            await asyncio.sleep(0.5)

        pending = [e for e in (await log.dead_letters(include_requeued=False)).entries]
        delivered = bad in handled
        kept_pending = [e.id for e in pending] == [entry["id"]]
        assert requeued.returncode == 1 and "pruned" in requeued.stderr, requeued.stderr
        assert not delivered and kept_pending, (
            f"requeue exit {requeued.returncode} ({requeued.stdout.strip()!r}); the event was"
            f" not delivered (handled {handled}) and the dead letter is no longer pending:"
            " the requeued event is lost"
        )


# -- a handler that raises CancelledError (a cancelled inner task) -----------------------------


async def test_a_cancelled_error_out_of_a_handler_is_a_failed_attempt(db: Path) -> None:
    """A handler whose awaited work is cancelled (an inner task some library cancelled)
    raises asyncio.CancelledError while the consumer is not stopping: a failed attempt like
    any other, dead-lettered after max_attempts, and the partition goes on. It used to end
    the lane's task silently, with its lock still held."""
    async with eventlog.open(db) as log:
        poison = await log.append("t", {"cancel": True}, key="a")
        later = [await log.append("t", {"n": i}, key="b") for i in range(3)]
        handled: list[int] = []

        async def handle(event: eventlog.Event) -> None:
            handled.append(event.offset)
            if event.payload.get("cancel"):
                inner = asyncio.ensure_future(asyncio.sleep(10))
                asyncio.get_running_loop().call_soon(inner.cancel)
                await inner  # raises CancelledError into the handler

        consumer = log.consumer("g", "t", handle, max_attempts=2, **FAST)
        task = asyncio.create_task(consumer.run(handle_signals=False))
        try:
            deadline = time.monotonic() + 6
            while time.monotonic() < deadline and not task.done():
                if position(db, "g", "t") == later[-1]:
                    break
                await asyncio.sleep(0.05)
            state = (
                f"consumer done={task.done()}, owns {consumer.owned_lanes},"
                f" handled {handled}, position {position(db, 'g', 't')},"
                f" attempts {attempt_rows(db)}, dead letters {deadletter_entries(db)}"
            )
            assert position(db, "g", "t") == later[-1], f"partition stalled: {state}"
            assert [e["offset"] for e in deadletter_entries(db)] == [poison], state
        finally:
            consumer.stop()
            with_failure = await asyncio.wait_for(asyncio.gather(task, return_exceptions=True),
                                                  30)  # fmt: skip
            del with_failure


# -- a requeued event is handled by its partition's owner --------------------------------------


def latest_lanes(records: list[dict[str, Any]], pid: int) -> list[list[Any]] | None:
    found = [r["lanes"] for r in records if r.get("phase") == "lanes" and r["pid"] == pid]
    return found[-1] if found else None


def test_a_requeued_event_is_handled_by_its_partitions_owner_never_beside_it(
    db: Path, journal: Path, members, tmp_path: Path
) -> None:
    """Two members share a 2-partition topic; while one is inside the handler of event Y
    of key k, a dead letter X of the same key is requeued. X is handled by the owner of its
    partition, between that lane's batches (guarantee 5: one process per partition at a
    time), where it used to run in whichever member held a group-wide lock, beside Y."""
    keys = keys_by_partition(2, 1)
    with eventlog.open_sync(db) as log:
        log.create_topic("t", partitions=2)
        xs = {p: log.append("t", {"bad": True, "p": p}, key=keys[p][0]) for p in (0, 1)}

        def handle(event: eventlog.Event) -> None:
            if event.payload.get("bad"):
                raise ValueError("bug")

        stop = threading.Event()
        th = threading.Thread(target=log.consume, args=("g", "t", handle),
                              kwargs={"stop": stop, "handle_signals": False, "max_attempts": 1,
                                      **FAST})  # fmt: skip
        th.start()
        try:
            wait_until(lambda: caught_up(db, "g", "t"), what="phase 1")
        finally:
            stop.set()
            th.join(30)
    dead = {e["partition"]: e for e in deadletter_entries(db)}
    assert sorted(dead) == [0, 1]

    a = members(db, journal, "--topic", "t")
    a.wait_ready()  # alone: both lanes
    b = members(db, journal, "--topic", "t")
    b.wait_ready()
    wait_until(lambda: latest_lanes(read_journal(journal), b.pid)
               and len(latest_lanes(read_journal(journal), a.pid) or []) == 1,
               what="the lanes to split")  # fmt: skip
    ((_, pb),) = latest_lanes(read_journal(journal), b.pid)

    release = tmp_path / "release"
    with eventlog.open_sync(db) as log:
        y = log.append("t", {"do": "wait_file", "file": str(release)}, key=keys[pb][0])
    wait_until(lambda: calls(read_journal(journal), "start", offset=y, pid=b.pid),
               what="B to start Y")  # fmt: skip
    requeued = cli(db, "dlq", "requeue", "--id", dead[pb]["id"])
    assert requeued.returncode == 0, requeued.stderr
    deadline = time.monotonic() + 3  # a correct implementation waits for Y: don't hang
    while time.monotonic() < deadline and not calls(read_journal(journal), "start",
                                                    offset=xs[pb]):  # fmt: skip
        time.sleep(0.05)
    release.touch()
    wait_until(lambda: calls(read_journal(journal), "end", offset=y), what="Y to end")
    wait_until(lambda: not redeliveries(db), what="the redelivery to be done")

    records = [r for r in read_journal(journal) if r.get("offset") in (xs[pb], y)]
    x_calls = [(r["pid"], r["mono"]) for r in calls(records, "start", offset=xs[pb])]
    assert_one_owner_at_a_time(records, {})
    assert x_calls and all(pid == b.pid for pid, _ in x_calls), x_calls


# -- a second requeue while the first one's redelivery finishes --------------------------------

PAUSING_CHILD = r"""
import asyncio, json, os, signal, sys
import eventlog
from eventlog import _deadletter

db, journal, flag = sys.argv[1:4]
original = _deadletter.DeadLetterFile.append

def append_then_pause(self, entry, **kw):
    written = original(self, entry, **kw)
    with open(journal, "a") as f:
        f.write(json.dumps({"phase": "dead-lettered", "id": written.id}) + "\n")
    os.kill(os.getpid(), signal.SIGSTOP)  # descheduled right after the line went out
    return written

_deadletter.DeadLetterFile.append = append_then_pause

async def handle(event):
    with open(journal, "a") as f:
        f.write(json.dumps({"phase": "start", "offset": event.offset}) + "\n")
    if os.path.exists(flag):
        raise RuntimeError("still broken")

async def main():
    async with eventlog.open(db) as log:
        print("ready", flush=True)
        await log.consumer("g", "t", handle, max_attempts=1, retry_backoff=0.01,
                           max_backoff=0.02).run()

asyncio.run(main())
"""


def test_a_requeue_made_while_the_same_events_redelivery_finishes_is_delivered(
    db: Path, tmp_path: Path
) -> None:
    """Dead letter L1 of event X is requeued; the redelivery fails again and writes L2;
    before that redelivery's request is dropped, L2 is requeued (the consumer is stopped
    with SIGSTOP right after its dead-letter line to hold the moment). The second request
    takes the first one's place, the finishing redelivery drops only its own, and X is
    delivered once more (the second request used to be swallowed, with L2 marked
    requeued)."""
    with eventlog.open_sync(db) as log:
        x = log.append("t", {"x": True})
    flag = tmp_path / "broken"
    flag.touch()
    journal = tmp_path / "j.jsonl"

    l1 = dead_letter_and_requeue(db, max_attempts=1)

    child = subprocess.Popen(
        [sys.executable, "-c", PAUSING_CHILD, str(db), str(journal), str(flag)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        l2_id = wait_until(lambda: [r["id"] for r in read_journal(journal)
                                    if r.get("phase") == "dead-lettered"],
                           what="the redelivery to fail again")[0]  # fmt: skip
        wait_until(lambda: Path(f"/proc/{child.pid}/stat").read_text().split()[2] == "T",
                   what="the child to stop")  # fmt: skip
        assert l2_id != l1["id"]
        flag.unlink()  # the bug is fixed now
        requeued = cli(db, "--json", "dlq", "requeue", "--group", "g")
        assert requeued.returncode == 0, requeued.stderr
        assert [json.loads(line)["id"] for line in requeued.stdout.splitlines()] == [l2_id]
        child.send_signal(signal.SIGCONT)
        wait_until(lambda: not redeliveries(db), what="redeliveries to drain")
        time.sleep(1.5)  # a pending redelivery is picked up within a rebalance (0.5 s)
        starts = [r for r in read_journal(journal) if r.get("phase") == "start"]
        pending = [e["id"] for e in deadletter_entries(db) if e.get("requeued_at_ms") is None]
        assert len(starts) == 2 or l2_id in pending, (
            f"L2 {l2_id} was requeued (the CLI said so) but X@{x} was never delivered for it"
            f" (child handled X {len(starts)} time(s): L1's redelivery only);"
            f" redeliveries={redeliveries(db)}, pending dead letters={pending}: lost"
        )
    finally:
        child.send_signal(signal.SIGCONT)
        child.kill()
        child.communicate(timeout=30)


# -- SIGKILL between a redelivery's dead-letter line and its commit ----------------------------

KILLED_CHILD = r"""
import asyncio, json, os, signal, sys
import eventlog
from eventlog import _groups

db, journal, die = sys.argv[1], sys.argv[2], sys.argv[3] == "die"
original = _groups.finish_event_plan

def killed_first(group, event, state, redelivery=None):
    if die and redelivery is not None:  # the dead-letter line is written; nothing committed
        os.kill(os.getpid(), signal.SIGKILL)
    return original(group, event, state, redelivery)

_groups.finish_event_plan = killed_first

async def handle(event):
    with open(journal, "a") as f:
        f.write(json.dumps({"phase": "start", "offset": event.offset, "pid": os.getpid()}) + "\n")
        f.flush()
        os.fsync(f.fileno())
    raise RuntimeError("still broken")

async def main():
    async with eventlog.open(db) as log:
        await log.consumer("g", "t", handle, max_attempts=2, retry_backoff=0.01,
                           max_backoff=0.02).run()

asyncio.run(main())
"""


def test_a_death_after_a_redelivery_is_dead_lettered_neither_retries_nor_writes_it_again(
    db: Path, tmp_path: Path
) -> None:
    """A requeued event still fails and its redelivery writes a new dead-letter line; the
    process is killed before the transaction that forgets its attempts and drops the
    redelivery request (one transaction: they used to be two, and a death between them left
    the request with no attempts, so the next member ran the handler max_attempts more times
    and wrote a second line). The next member finds the attempts spent and the line's id
    kept: no handler call, no second line."""
    with eventlog.open_sync(db) as log:
        log.append("t", {"x": True})

    l1 = dead_letter_and_requeue(db, max_attempts=2)
    journal = tmp_path / "j.jsonl"

    first = subprocess.run([sys.executable, "-c", KILLED_CHILD, str(db), str(journal), "die"],
                           capture_output=True, timeout=30)  # fmt: skip
    assert first.returncode == -signal.SIGKILL, first.stderr
    assert len(deadletter_entries(db)) == 2  # L1 (requeued) and L2

    second = subprocess.Popen([sys.executable, "-c", KILLED_CHILD, str(db), str(journal), "ok"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_until(lambda: not redeliveries(db), what="the redelivery row to go")
        time.sleep(0.5)
    finally:
        second.kill()
        second.wait(30)
    entries = deadletter_entries(db)
    renewed = [e["id"] for e in entries if e["id"] != l1["id"]]
    starts = [r for r in read_journal(journal) if r.get("phase") == "start"]
    assert len(renewed) == 1, (
        f"one requeue, one renewed failure, but {len(renewed)} new dead-letter lines {renewed}"
        f" and {len(starts)} handler calls (max_attempts=2)"
    )
    assert len(starts) == 2


# -- an offset reset and the attempts of the events it moves over ------------------------------


async def test_an_offset_reset_forgets_the_attempts_of_the_events_it_moves_over(
    db: Path,
) -> None:
    """A group stopped while event X waits in retry backoff (2 of max_attempts=3 calls) is
    reset past X, then back before it: X starts a new episode with max_attempts calls (the
    stale count used to stay, listed as retrying, and cut the replay's tries short)."""
    async with eventlog.open(db) as log:
        x = await log.append("t", {"x": True})
        calls_: list[int] = []
        stop_after: list[Any] = []

        async def failing(event: eventlog.Event) -> None:
            calls_.append(event.offset)
            if len(calls_) == 2 and stop_after:
                stop_after[0].stop()  # as a SIGTERM would: the next thing is the backoff
            raise ValueError("broken")

        consumer = log.consumer("g", "t", failing, max_attempts=3, **FAST)
        stop_after.append(consumer)
        async with running(consumer):
            await until(lambda: len(calls_) == 2, what="two failed calls")
        # (stopping here is what a SIGTERM during the backoff does)
        stale = attempt_rows(db, "g")
        assert [(r[1], r[2]) for r in stale] == [(x, 2)], stale

    skipped = cli(db, "replay", "g", "--to-latest", "--execute")
    assert skipped.returncode == 0, skipped.stderr
    shown = json.loads(cli(db, "--json", "groups", "show", "g").stdout)
    still_retrying = shown.get("retrying")

    back = cli(db, "--json", "replay", "g", "--to-earliest", "--execute")
    assert back.returncode == 0, back.stderr
    assert json.loads(back.stdout.splitlines()[0])["redelivered"] == 1

    async with eventlog.open(db) as log:
        calls_ = []
        async with running(log.consumer("g", "t", failing, max_attempts=3, **FAST)):
            await until(lambda: caught_up(db, "g", "t"), what="the replay")
    (entry,) = deadletter_entries(db)
    assert len(calls_) == 3, (
        f"after the replay X was called {len(calls_)} time(s) and dead-lettered with"
        f" attempts={entry['attempts']} (max_attempts=3); after --to-latest `groups show`"
        f" still listed it as retrying: {still_retrying}"
    )
