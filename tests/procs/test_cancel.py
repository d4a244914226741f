"""Cancelling an awaiting task never leaves a transaction or the write lock behind: another
connection and another process can write right after, and every returned offset is there."""

from __future__ import annotations

import asyncio
import json
import random
import sqlite3
from pathlib import Path

import pytest
from conftest import events_by_offset, integrity, raw

import eventlog
from eventlog._locks import is_locked

ROUNDS = 300


async def cancel_at_random(rng: random.Random, coro) -> object:
    """Start `coro` as a task and cancel it after a random number of loop turns (sometimes
    after a short real wait, to land inside the commit). Returns its result or None."""
    task = asyncio.ensure_future(coro)
    for _ in range(rng.randint(0, 6)):
        await asyncio.sleep(0)
    if rng.random() < 0.3:
        await asyncio.sleep(rng.uniform(0, 0.002))
    task.cancel()
    try:
        return await task
    except asyncio.CancelledError:
        return None


@pytest.mark.parametrize("durability", ["full", "normal"])
async def test_cancelled_appends_leave_no_transaction_open(
    db_path: Path, spawn, durability: str
) -> None:
    rng = random.Random(1234)
    returned: dict[int, object] = {}
    async with eventlog.open(db_path, durability=durability) as log:
        other = spawn(db_path, "serve", json.dumps({"busy_timeout": 5}))
        other.wait_ready()
        with raw(db_path, timeout=0.5) as conn:
            for i in range(ROUNDS):
                kind = rng.choice(["append", "append", "many", "topic"])
                if kind == "append":
                    result = await cancel_at_random(rng, log.append("t", {"i": i}))
                    if result is not None:
                        returned[result] = {"i": i}
                elif kind == "many":
                    drafts = [eventlog.Draft("t", {"i": i, "j": j}) for j in range(5)]
                    result = await cancel_at_random(rng, log.append_many(drafts))
                    if result is not None:
                        returned.update({o: {"i": i, "j": j} for j, o in enumerate(result)})
                else:
                    await cancel_at_random(rng, log.create_topic(f"topic-{i}", 2))

                # Work the cancelled call had started finishes on the connection's thread;
                # a read on the same connection runs after it (the thread runs calls in order).
                await log.head()
                assert not is_locked(log.paths.write_lock), "the write lock was left held"
                # A raw connection gets the write lock at once: no transaction was left open.
                try:
                    conn.execute("BEGIN IMMEDIATE")
                except sqlite3.OperationalError as exc:
                    raise AssertionError(f"round {i} ({kind}) left the database locked") from exc
                conn.execute("ROLLBACK")
                if i % 25 == 0:
                    # And another process can append through eventlog (flock, then SQLite).
                    reply = other.request({"op": "append", "topic": "t", "payload": {"o": i}})
                    assert "offset" in reply, reply
                    returned[reply["offset"]] = {"o": i}
            # After all of it, appends still work and still count upwards.
            last = await log.append("t", "last")
            assert last > max(returned)
            returned[last] = "last"
        other.send({"op": "exit"})
        assert other.finish() == 0, other.stderr

    stored = events_by_offset(db_path)
    for offset, payload in returned.items():
        assert stored[offset][3] == payload, f"offset {offset} was returned but is not stored"
    assert integrity(db_path) == ["ok"]


async def test_cancelled_followers_hold_no_read_transaction(db_path: Path) -> None:
    rng = random.Random(99)
    async with eventlog.open(db_path) as log:
        await log.append_many([eventlog.Draft("t", i) for i in range(2000)])

        async def consume(n: int) -> int:
            seen = 0
            async for _ in log.read("t", follow=True, page=50):
                seen += 1
                if seen == n:
                    await asyncio.sleep(10)  # parked: only cancellation ends this
            return seen

        for _ in range(50):
            await cancel_at_random(rng, consume(rng.randint(1, 2500)))
            await log.head()
            with raw(db_path, timeout=2) as conn:
                conn.execute("BEGIN IMMEDIATE")
                conn.execute("ROLLBACK")
                busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
                assert busy == 0, "a cancelled reader kept a snapshot open"
        # Cancelled async generators are finalised by the loop; give it the turns it needs.
        await asyncio.sleep(0)


async def test_cancelled_open_leaves_nothing_open_or_locked(tmp_path: Path) -> None:
    rng = random.Random(7)
    for i in range(40):
        db = tmp_path / f"c{i % 4}.db"  # fresh files and already-migrated ones
        opener = eventlog.open(db)
        log = await cancel_at_random(rng, opener.__aenter__())
        if log is not None:
            await log.close()
        with raw(db, timeout=2) as conn:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("ROLLBACK")
    # the leak check (conftest) then finds no descriptor on these files and no thread left
