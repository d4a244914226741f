"""The transactional outbox: `append_in_transaction` writes the event in the application's
own transaction, so it commits with the application's rows or not at all."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import collect, dump, events_by_offset, integrity, raw, sql

import eventlog

PROMPT_S = 2.0


@contextlib.contextmanager
def app_connection(db_path: Path) -> Iterator[sqlite3.Connection]:
    """The application's connection: its own table, explicit transactions."""
    with raw(db_path) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS orders (id INTEGER PRIMARY KEY, item TEXT)")
        yield conn


def place_order(conn: sqlite3.Connection, item: str, *, commit: bool) -> int:
    conn.execute("BEGIN IMMEDIATE")
    try:
        cur = conn.execute("INSERT INTO orders (item) VALUES (?)", (item,))
        offset = eventlog.append_in_transaction(
            conn, "orders", {"order": cur.lastrowid, "item": item}, key=item
        )
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT" if commit else "ROLLBACK")
    return offset


async def test_rolled_back_event_is_never_seen_and_committed_one_is(
    log: Any, db_path: Path, spawn
) -> None:
    follower = spawn(db_path, "follow", json.dumps({"topics": "orders", "count": 1}))
    follower.wait_ready()
    with app_connection(db_path) as conn:
        before = dump(db_path)
        place_order(conn, "rolled back", commit=False)
        assert dump(db_path) == before
        offset = place_order(conn, "committed", commit=True)
        committed_at = time.monotonic()
        assert conn.execute("SELECT item FROM orders").fetchall() == [("committed",)]
    # Nobody called notify(): the follower in the other process finds it on its slow poll.
    (seen,) = [json.loads(line) for line in follower.rest(timeout=30)]
    assert follower.finish() == 0, follower.stderr
    assert seen["payload"]["item"] == "committed"
    assert seen["offset"] == offset
    assert seen["t"] - committed_at < PROMPT_S
    events = await collect(log.read("orders"))
    assert [e.payload["item"] for e in events] == ["committed"]
    assert integrity(db_path) == ["ok"]


async def test_outbox_offsets_interleave_with_log_appends(log: Any, db_path: Path) -> None:
    first = await log.append("orders", "from the log")
    with app_connection(db_path) as conn:
        middle = place_order(conn, "outbox", commit=True)
    last = await log.append("orders", "from the log again")
    assert first < middle < last
    events = await collect(log.read("orders"))
    assert [e.offset for e in events] == [first, middle, last]
    info = {t.name: t for t in await log.topics()}
    assert info["orders"].events == 3


async def test_notify_wakes_followers_at_once(open_log: Any, db_path: Path) -> None:
    log = await open_log()
    notifier = await open_log()  # the sync log's thread is busy following
    await log.create_topic("orders", 1)
    follower = log.read("orders", follow=True, idle_timeout=30)
    pending = asyncio.ensure_future(follower.__anext__())
    try:
        with app_connection(db_path) as conn:
            offset = place_order(conn, "book", commit=True)
        notifier.notify()
        started = time.monotonic()
        event = await asyncio.wait_for(pending, 10)
        assert event.offset == offset
        assert time.monotonic() - started < PROMPT_S
    finally:
        await follower.aclose()


async def test_append_in_transaction_needs_an_open_transaction(log: Any, db_path: Path) -> None:
    with app_connection(db_path) as conn:
        before = dump(db_path)
        with pytest.raises(eventlog.InvalidArgument) as info:
            eventlog.append_in_transaction(conn, "orders", {"item": "x"})
        assert "BEGIN" in info.value.hint
    assert dump(db_path) == before


@pytest.mark.parametrize(
    "bad",
    [
        {"topic": "a..b", "payload": 1},
        {"topic": "orders", "payload": float("nan")},
        {"topic": "orders", "payload": {1: "x"}},
        {"topic": "orders", "payload": 1, "headers": {"a": 1}},
        {"topic": "orders", "payload": "x" * 100, "limits": eventlog.Limits(max_payload_bytes=50)},
    ],
)
async def test_bad_input_in_transaction_raises_and_leaves_the_transaction_to_the_app(
    log: Any, db_path: Path, bad: dict[str, Any]
) -> None:
    await log.append("orders", "existing")
    before = dump(db_path)
    with app_connection(db_path) as conn:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO orders (item) VALUES ('kept')")
        bad = dict(bad)
        topic, payload = bad.pop("topic"), bad.pop("payload")
        with pytest.raises(eventlog.InvalidArgument):
            eventlog.append_in_transaction(conn, topic, payload, **bad)
        assert conn.in_transaction  # still the app's to commit or roll back
        conn.execute("COMMIT")
        assert conn.execute("SELECT item FROM orders").fetchall() == [("kept",)]
    assert dump(db_path) == before


async def test_outbox_event_commits_with_the_application_rows(log: Any, db_path: Path) -> None:
    with app_connection(db_path) as conn:
        offsets = [place_order(conn, f"item-{i}", commit=i % 2 == 0) for i in range(10)]
        orders = conn.execute("SELECT id, item FROM orders ORDER BY id").fetchall()
    stored = events_by_offset(db_path)
    assert [stored[o][3]["item"] for o in sorted(stored)] == [item for _, item in orders]
    assert [item for _, item in orders] == [f"item-{i}" for i in range(0, 10, 2)]
    assert {stored[o][3]["order"] for o in stored} == {order_id for order_id, _ in orders}
    assert len(offsets) == 10


async def test_keyless_outbox_events_spread_across_partitions(log: Any, db_path: Path) -> None:
    # Each call is its own transaction, as an application's requests are: the round robin
    # must carry over from one call to the next, or every keyless event lands in partition 0.
    await log.create_topic("audit", 4)
    with app_connection(db_path) as conn:
        for i in range(40):
            conn.execute("BEGIN IMMEDIATE")
            eventlog.append_in_transaction(conn, "audit", {"i": i})
            conn.execute("COMMIT")
    counts = dict(sql(db_path, "SELECT partition, count(*) FROM eventlog_events GROUP BY 1"))
    assert sorted(counts) == [0, 1, 2, 3], f"keyless outbox events by partition: {counts}"
    assert min(counts.values()) >= 10
