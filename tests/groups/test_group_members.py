"""Guarantee 5 (one owner per lane) with real processes: three members share six
partitions with no overlapping handler calls on any partition, a SIGKILLed member's
partitions move to the others, a member whose handler hangs past hard_timeout exits 70 with
the attempt counted, and descriptors of lock files opened and closed elsewhere in the owner's
process never free its locks."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import eventlog
from eventlog import _locks, _members

from .conftest import (
    assert_key_order_of_first_deliveries,
    assert_one_owner_at_a_time,
    attempt_rows,
    calls,
    caught_up,
    deadletter_entries,
    keys_by_partition,
    log_events,
    position,
    read_journal,
    running,
    until,
    wait_until,
)

PARTITIONS = 6


def latest_lanes(records: list[dict[str, Any]]) -> dict[int, list[list[Any]]]:
    lanes: dict[int, list[list[Any]]] = {}
    for r in records:
        if r["phase"] == "lanes":
            lanes[r["pid"]] = r["lanes"]
    return lanes


def test_three_members_six_partitions_one_owner_at_a_time_and_failover(
    db: Path, journal: Path, members
) -> None:
    keys = keys_by_partition(PARTITIONS, 4)
    with eventlog.open_sync(db) as log:
        log.create_topic("t", partitions=PARTITIONS)
    procs = [members(db, journal, "--topic", "t", "--sleep", "0.01", "--batch-size", "10")
             for _ in range(3)]  # fmt: skip
    for p in procs:
        p.wait_ready()

    def balanced() -> bool:
        lanes = latest_lanes(read_journal(journal))
        return (set(lanes) == {p.pid for p in procs}
                and all(len(v) == 2 for v in lanes.values()))  # fmt: skip

    wait_until(balanced, timeout=30, what="two partitions per member")

    def wave(n: int, tag: str) -> None:
        with eventlog.open_sync(db) as log:
            drafts = [eventlog.Draft("t", {"wave": tag, "i": i}, key=keys[i % PARTITIONS][i % 4])
                      for i in range(n)]  # fmt: skip
            log.append_many(drafts)

    wave(240, "before")
    victim = procs[1]
    victim_lanes = {p for _, p in latest_lanes(read_journal(journal))[victim.pid]}
    wait_until(lambda: len(calls(read_journal(journal), "end", pid=victim.pid)) >= 10,
               what="the victim to be busy")  # fmt: skip
    killed_at = time.monotonic()
    victim.kill()
    wave(60, "after")  # so that every partition of the victim has work after its death

    wait_until(lambda: caught_up(db, "g", "t"), timeout=60, what="everything handled")
    records = read_journal(journal)

    # One owner at a time: no two processes ran handlers on one partition at once.
    assert_one_owner_at_a_time(records, {victim.pid: killed_at})

    # The victim's partitions moved to the survivors, within a generous bound.
    for partition in victim_lanes:
        later = [r["mono"] for r in calls(records, "start", partition=partition)
                 if r["pid"] != victim.pid and r["mono"] > killed_at]  # fmt: skip
        assert later, f"partition {partition} was not taken over"
        assert min(later) - killed_at < 10, f"partition {partition} took too long to move"

    # At least once, and per-key order among first deliveries.
    stored = log_events(db, "t")
    ok = {r["offset"] for r in calls(records, "end", outcome="ok")}
    assert {row[0] for row in stored} <= ok
    assert_key_order_of_first_deliveries(records, db, "t")
    assert deadletter_entries(db) == []

    for p in procs:
        if p is not victim:
            p.signal(signal.SIGTERM)
            assert p.wait_exit() == 0, p.stderr


@pytest.mark.parametrize("handler", ["async", "sync"])
def test_handler_past_hard_timeout_exits_70_counts_the_attempt_and_others_take_over(
    db: Path, journal: Path, members, handler: str
) -> None:
    options = ["--topic", "t", "--hard-timeout", "1.0", "--max-attempts", "2"]
    if handler == "sync":
        options.append("--sync-handler")
    with eventlog.open_sync(db) as log:
        log.create_topic("t", partitions=1)
    first, second = members(db, journal, *options), members(db, journal, *options)
    first.wait_ready()
    second.wait_ready()
    with eventlog.open_sync(db) as log:
        hang, after = log.append("t", {"do": "hang"}), log.append("t", {"n": 1})

    wait_until(lambda: not first.alive() or not second.alive(), timeout=30,
               what="a member to exit")  # fmt: skip
    dead, other = (first, second) if not first.alive() else (second, first)
    assert dead.wait_exit() == 70, dead.stderr
    # The attempt was recorded before the exit (the row lives until the event is done).
    rows = attempt_rows(db, "g")
    assert [(r[1], r[3]) for r in rows] == [(hang, "HardTimeout")]
    assert "hard_timeout" in rows[0][4]

    # The other member takes the partition over, hangs in turn and exits.
    assert other.wait_exit(timeout=30) == 70, other.stderr
    records = read_journal(journal)
    assert [r["pid"] for r in calls(records, "start", offset=hang)] == [dead.pid, other.pid]
    rows = attempt_rows(db, "g")
    assert [r[:4] for r in rows] == [("g", hang, 2, "HardTimeout")]
    assert f"process {other.pid} exited" in rows[0][4]
    assert position(db, "g", "t") == hang - 1

    # max_attempts reached: the next member dead-letters it without calling the handler.
    third = members(db, journal, *options)
    third.wait_ready()
    wait_until(lambda: position(db, "g", "t") == after, what="the next event handled")
    entries = deadletter_entries(db)
    assert [(e["offset"], e["attempts"], e["error_type"]) for e in entries] == [
        (hang, 2, "HardTimeout")
    ]
    records = read_journal(journal)
    assert len(calls(records, "start", offset=hang)) == 2
    assert calls(records, "end", offset=after, outcome="ok", pid=third.pid)
    assert attempt_rows(db) == []


_PROBE = """
import fcntl, json, os, sys
import eventlog
db, group, lane_file, member_file = sys.argv[1:]
with eventlog.open_sync(db) as log:
    listed = [(m.member_id, m.alive) for m in log.group_members(group)]
taken = {}
for name, path in (("lane", lane_file), ("member", member_file)):
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        taken[name] = True
    except BlockingIOError:
        taken[name] = False
    finally:
        os.close(fd)
print(json.dumps({"members": listed, "taken": taken}))
"""


async def test_closing_other_descriptors_of_lock_files_never_frees_a_lane(
    db: Path, journal: Path, members
) -> None:
    async with eventlog.open(db) as log:
        await log.create_topic("t", partitions=2)
        mine: list[eventlog.Event] = []

        async def handle(event: eventlog.Event) -> None:
            mine.append(event)

        a = log.consumer("g", "t", handle)
        async with running(a):
            await until(lambda: len(a.owned_lanes) == 2, what="A to own both lanes")
            b = members(db, journal, "--topic", "t")
            await asyncio.to_thread(b.wait_ready)

            def settled() -> bool:
                theirs = latest_lanes(read_journal(journal)).get(b.pid)
                return len(a.owned_lanes) == 1 and theirs is not None and len(theirs) == 1

            await until(settled, timeout=30, what="one lane each")
            (lane,) = a.owned_lanes
            released = a.stats.lanes_released
            group_dir = log.paths.group_folder("g")
            lane_file = group_dir / "lanes" / _members.lane_file_name(lane)
            member_file = group_dir / "members" / f"{a.member_id}.lock"

            # Elsewhere in A's process: open and close both lock files, every which way.
            for path in (lane_file, member_file):
                for _ in range(3):
                    os.close(os.open(path, os.O_RDONLY))
                    os.close(os.open(path, os.O_RDWR))
                    with open(path, "rb"):
                        pass
                    assert _locks.is_locked(path)
            with eventlog.open_sync(db) as other_log:
                assert {m.member_id for m in other_log.group_members("g") if m.alive} >= {
                    a.member_id
                }
            # Another process lists the members and tries both locks.
            done = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-c", _PROBE, os.fspath(db), "g", os.fspath(lane_file),
                 os.fspath(member_file)],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
            probe = json.loads(done.stdout)
            assert probe["taken"] == {"lane": False, "member": False}
            assert dict(map(tuple, probe["members"]))[a.member_id] is True

            # B keeps rebalancing meanwhile; let it run a few rounds, then add work.
            def heartbeat_time() -> float:
                note = json.loads((group_dir / "members").joinpath(
                    next(p for p in os.listdir(group_dir / "members")
                         if p.startswith(f"{os.uname().nodename}-{b.pid}-"))
                ).read_text() or "{}")  # fmt: skip
                return float(note.get("time", 0))

            mark = time.time()
            await until(lambda: heartbeat_time() > mark + 1.0, what="B to rebalance")
            offsets = [await log.append("t", {"i": i}, key=f"k{i}") for i in range(20)]
            await until(lambda: caught_up(db, "g", "t"), what="both lanes handled")

            assert a.owned_lanes == [lane]
            assert a.stats.lanes_released == released
        records = read_journal(journal)
        theirs = {r["offset"] for r in calls(records, "start", pid=b.pid)}
        ours = {e.offset for e in mine}
        assert ours | theirs == set(offsets)
        lane_events = {o for o, t, p, _, _ in log_events(db) if (t, p) == lane}
        assert lane_events <= ours and not lane_events & theirs
        assert all(lane not in map(tuple, r["lanes"]) for r in records
                   if r["phase"] == "lanes" and r["pid"] == b.pid)  # fmt: skip


def test_a_partition_stuck_retrying_is_still_handed_over_when_a_member_joins(
    db: Path, journal: Path, members
) -> None:
    keys = keys_by_partition(2, 1)
    retrying = ["--topic", "t", "--max-attempts", "1000", "--retry-backoff", "2",
                "--max-backoff", "2"]  # fmt: skip
    with eventlog.open_sync(db) as log:
        log.create_topic("t", partitions=2)
        # Each partition is blocked by an event that fails every time (retried for minutes).
        bad = [log.append("t", {"do": "raise"}, key=keys[p][0]) for p in range(2)]
    first = members(db, journal, *retrying)
    first.wait_ready()
    wait_until(lambda: all(len(calls(read_journal(journal), "start", offset=o)) >= 2
                           for o in bad), what="both partitions retrying")  # fmt: skip

    second = members(db, journal, *retrying)
    second.wait_ready()
    joined = time.monotonic()
    # Whichever partition is the newcomer's share, the first member must let it go: the
    # event in hand is not finished (it fails), its retries can wait for the next owner.
    wait_until(lambda: len(latest_lanes(read_journal(journal)).get(second.pid, [])) == 1,
               timeout=20, what="the newcomer to get its partition")  # fmt: skip
    assert time.monotonic() - joined < 20
    wait_until(lambda: len(latest_lanes(read_journal(journal)).get(first.pid, [])) == 1,
               what="the first member to keep one partition")  # fmt: skip
    (lane,) = latest_lanes(read_journal(journal))[second.pid]
    offset = bad[lane[1]]
    # The attempts made so far were kept: the new owner goes on counting from them.
    wait_until(lambda: calls(read_journal(journal), "start", offset=offset, pid=second.pid),
               what="the new owner to try the event")  # fmt: skip
    counted = [r[2] for r in attempt_rows(db, "g") if r[1] == offset]
    tried = len(calls(read_journal(journal), "start", offset=offset))
    assert counted and counted[0] >= tried - 1
    for m in (first, second):
        m.signal(signal.SIGTERM)
        assert m.wait_exit() == 0, m.stderr
