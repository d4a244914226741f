"""Waiting without cost: `wait_for` returns received / timed_out / cancelled and cannot miss
an event appended after the head was noted (both shells, through the shared `log` fixture);
idle consumers and waiters hold no read transaction, so a checkpoint can reset the WAL
(guarantee 8)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import eventlog

from .conftest import (
    append_elsewhere,
    position,
    raw,
    read_journal,
    until,
    wait_until,
)


def wal_size(db: Path) -> int:
    try:
        return os.path.getsize(f"{db}-wal")
    except FileNotFoundError:
        return 0


def checkpoint_truncate(db: Path) -> tuple[int, int, int]:
    with raw(db, timeout=10) as conn:
        busy, frames, done = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    return int(busy), int(frames), int(done)


def sockets(log: Any) -> int:
    return sum(1 for n in os.listdir(log.paths.wake_folder) if n.endswith(".sock"))


async def test_wait_for_receives_an_event_appended_after_the_head_was_noted(
    log: Any, db_path: Path
) -> None:
    await log.append("jobs", {"n": 0})
    head = await log.head()
    # The work elsewhere finishes before this process starts waiting: still received.
    (offset,) = append_elsewhere(db_path, [{"topic": "jobs", "payload": {"done": 1}}])
    result = await log.wait_for("jobs", after=head, timeout=10)
    assert result.status == "received" and result.received
    assert result.event.offset == offset and result.event.payload == {"done": 1}


async def test_wait_for_skips_unmatched_events_and_waits_for_a_match(
    log: Any, db_path: Path
) -> None:
    head = await log.head()
    before = sockets(log)
    waiting = asyncio.ensure_future(log.wait_for(
        "jobs.*", after=head, timeout=30, match=lambda e: e.payload.get("id") == 7
    ))  # fmt: skip
    await until(lambda: sockets(log) > before or waiting.done(), what="the waiter")
    assert not waiting.done()
    append_elsewhere(db_path, [{"topic": "jobs.a", "payload": {"id": 1}},
                               {"topic": "other", "payload": {"id": 7}}])  # fmt: skip
    (offset,) = append_elsewhere(db_path, [{"topic": "jobs.b", "payload": {"id": 7}}])
    result = await asyncio.wait_for(waiting, 30)
    assert result.status == "received" and result.event.offset == offset


async def test_wait_for_times_out(log: Any, db_path: Path) -> None:
    append_elsewhere(db_path, [{"topic": "other", "payload": 1}])
    started = time.monotonic()
    result = await log.wait_for("jobs", timeout=0.3)
    elapsed = time.monotonic() - started
    assert result.status == "timed_out" and result.event is None and not result.received
    assert 0.25 <= elapsed < 10


async def test_wait_for_is_cancelled_and_holds_no_read_transaction_meanwhile(
    log: Any, db_path: Path
) -> None:
    await log.append("jobs", {"n": 0})
    cancel = asyncio.Event()
    cancel.set()
    assert (await log.wait_for("jobs", cancel=cancel, timeout=30)).status == "cancelled"

    cancel = asyncio.Event()
    before = sockets(log)
    waiting = asyncio.ensure_future(log.wait_for("jobs", cancel=cancel, timeout=60))
    await until(lambda: sockets(log) > before or waiting.done(), what="the waiter")
    # While it waits, a checkpoint from another connection resets the WAL.
    assert wal_size(db_path) > 0
    busy, _, _ = await asyncio.to_thread(checkpoint_truncate, db_path)
    assert busy == 0 and wal_size(db_path) == 0
    assert not waiting.done()
    cancel.set()
    result = await asyncio.wait_for(waiting, 10)
    assert result.status == "cancelled" and result.event is None


def test_idle_consumer_holds_no_read_transaction_so_checkpoints_reset_the_wal(
    db: Path, journal: Path, members
) -> None:
    with eventlog.open_sync(db) as log:
        offsets = [log.append("t", {"n": i}) for i in range(50)]
    member = members(db, journal, "--topic", "t")
    member.wait_ready()
    members_dir = db.with_name(db.name + ".d") / "groups" / "g" / "members"

    def heartbeat() -> float:
        for name in os.listdir(members_dir):
            if f"-{member.pid}-" in name and name.endswith(".lock"):
                try:
                    return float(json.loads((members_dir / name).read_text() or "{}")["time"])
                except (ValueError, KeyError, FileNotFoundError):
                    return 0.0
        return 0.0

    for round_ in range(2):
        last = offsets[-1]
        wait_until(lambda: position(db, "g", "t") == last, what="caught up")  # noqa: B023
        # Idle for a while: several rounds of waiting and rebalancing.
        mark = time.time()
        wait_until(lambda: heartbeat() > mark + 1.5, what="the member to idle")  # noqa: B023
        assert wal_size(db) > 0
        busy, _, _ = checkpoint_truncate(db)
        assert busy == 0, "a read transaction was held open while idle"
        assert wal_size(db) == 0
        if round_ == 0:
            with eventlog.open_sync(db) as log:
                offsets = [log.append("t", {"n": i}) for i in range(10)]

    assert len([r for r in read_journal(journal) if r["phase"] == "end"]) == 60
    member.signal(signal.SIGTERM)
    assert member.wait_exit() == 0, member.stderr
