"""Reading: topic patterns (AMQP topic-exchange style), start positions, limits, paging across
lanes, flat memory over a large backlog, and no read transaction held between pages."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import tracemalloc
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from conftest import collect, raw
from hypothesis import given
from hypothesis import strategies as st

import eventlog
from eventlog import _core

TOPICS = ["orders", "orders.eu", "orders.eu.west", "orders.us", "ordersx.eu", "billing.orders",
          "audit.orders.eu", "a.b.c.d"]  # fmt: skip


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("orders", ["orders"]),
        ("orders.*", ["orders.eu", "orders.us"]),
        ("orders.#", ["orders", "orders.eu", "orders.eu.west", "orders.us"]),
        ("*.orders", ["billing.orders"]),
        ("#.orders", ["orders", "billing.orders"]),
        ("#.eu", ["orders.eu", "ordersx.eu", "audit.orders.eu"]),
        ("*.*.eu", ["audit.orders.eu"]),
        ("orders.*.west", ["orders.eu.west"]),
        ("orders.#.west", ["orders.eu.west"]),
        ("a.#.d", ["a.b.c.d"]),
        ("#", TOPICS),
        ("*", ["orders"]),
        ("#.#", TOPICS),
    ],
)
async def test_patterns_match_like_amqp_topic_exchange(
    log: Any, pattern: str, expected: list[str]
) -> None:
    for topic in TOPICS:
        await log.append(topic, topic)
    got = [e.topic for e in await collect(log.read(pattern))]
    assert sorted(got) == sorted(expected)


async def test_read_of_several_topics_merges_them_in_offset_order(log: Any) -> None:
    for i in range(30):
        await log.append(["a", "b", "c"][i % 3], i)
    events = await collect(log.read(["a", "c"]))
    assert [e.payload for e in events] == [i for i in range(30) if i % 3 != 1]
    assert [e.offset for e in events] == sorted(e.offset for e in events)


def amqp_match(pattern: list[str], topic: list[str]) -> bool:
    """Reference matcher: '*' is exactly one segment, '#' zero or more."""
    if not pattern:
        return not topic
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        return any(amqp_match(rest, topic[i:]) for i in range(len(topic) + 1))
    if not topic:
        return False
    return (head == "*" or head == topic[0]) and amqp_match(rest, topic[1:])


segments = st.sampled_from(["a", "b", "c"])


@given(
    pattern=st.lists(st.sampled_from(["a", "b", "*", "#"]), min_size=1, max_size=6),
    topic=st.lists(segments, min_size=1, max_size=6),
)
def test_pattern_matching_agrees_with_reference(pattern: list[str], topic: list[str]) -> None:
    compiled = _core.compile_patterns(".".join(pattern))
    assert _core.topic_matches(compiled, ".".join(topic)) == amqp_match(pattern, topic)


@given(key=st.text(max_size=50), partitions=st.integers(1, 1024), spread=st.integers(0, 10**6))
def test_partition_is_stable_and_in_range(key: str, partitions: int, spread: int) -> None:
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        return
    p = _core.partition_for(key, partitions, spread)
    assert 0 <= p < partitions
    assert p == _core.partition_for(key, partitions, spread + 1)  # the key alone decides


# -- start positions ---------------------------------------------------------------------------


async def test_start_earliest_latest_and_offset(log: Any) -> None:
    offsets = [await log.append("t", i) for i in range(10)]
    assert [e.offset for e in await collect(log.read("t"))] == offsets
    assert [e.offset for e in await collect(log.read("t", start="earliest"))] == offsets
    assert await collect(log.read("t", start="latest")) == []
    # an offset is the first one delivered
    assert [e.offset for e in await collect(log.read("t", start=offsets[4]))] == offsets[4:]
    assert [e.offset for e in await collect(log.read("t", start=0))] == offsets
    assert await collect(log.read("t", start=offsets[-1] + 1)) == []


async def test_start_at_time(log: Any, db_path: Path) -> None:
    offsets = [await log.append("t", i) for i in range(9)]
    # Give the events known times: three per second, 1,000 s apart.
    with raw(db_path) as conn:
        for i, offset in enumerate(offsets):
            conn.execute(
                "UPDATE eventlog_events SET created_at = ? WHERE id = ?",
                (1_000_000 * (1 + i // 3), offset),
            )

    async def from_time(moment: datetime) -> list[int]:
        return [e.payload for e in await collect(log.read("t", start=moment))]

    assert await from_time(datetime.fromtimestamp(500, UTC)) == list(range(9))
    assert await from_time(datetime.fromtimestamp(1000, UTC)) == list(range(9))
    assert await from_time(datetime.fromtimestamp(1500, UTC)) == [3, 4, 5, 6, 7, 8]
    assert await from_time(datetime.fromtimestamp(2000, UTC)) == [3, 4, 5, 6, 7, 8]
    assert await from_time(datetime.fromtimestamp(3000, UTC)) == [6, 7, 8]
    assert await from_time(datetime.fromtimestamp(3001, UTC)) == []
    # a naive datetime is UTC; an aware one counts in its own zone
    assert await from_time(datetime(1970, 1, 1, 0, 25)) == [3, 4, 5, 6, 7, 8]
    plus_two = timezone(timedelta(hours=2))
    assert await from_time(datetime(1970, 1, 1, 2, 25, tzinfo=plus_two)) == [3, 4, 5, 6, 7, 8]


async def test_start_at_time_per_partition(log: Any, db_path: Path) -> None:
    await log.create_topic("t", 3)
    offsets = await log.append_many([eventlog.Draft("t", i, key=f"k{i}") for i in range(30)])
    with raw(db_path) as conn:
        for i, offset in enumerate(offsets):
            conn.execute(
                "UPDATE eventlog_events SET created_at = ? WHERE id = ?", (i * 1000, offset)
            )
    got = [e.payload for e in await collect(log.read("t", start=datetime.fromtimestamp(17, UTC)))]
    assert got == list(range(17, 30))


async def test_latest_skips_existing_and_new_topics_start_from_their_first_event(
    open_log: Any,
) -> None:
    log = await open_log()
    writer = await open_log()
    await writer.append("orders.eu", "old")
    follower = log.read("orders.#", start="latest", follow=True, idle_timeout=10)
    pending = asyncio.ensure_future(follower.__anext__())
    try:
        # The reader starts at the head as of its first read, which this test cannot see;
        # once it has received a probe, it has started.
        for attempt in range(200):
            await writer.append("orders.eu", f"probe {attempt}")
            done, _ = await asyncio.wait({pending}, timeout=0.05)
            if done:
                break
        assert pending.result().payload.startswith("probe")
        # a topic that did not exist when the reader started: all of its events are new
        await writer.append("orders.us", "new topic")
        while (event := await asyncio.wait_for(follower.__anext__(), 10)).payload != "new topic":
            assert event.payload.startswith("probe")
        await writer.append("orders.eu", "new")
        assert (await asyncio.wait_for(follower.__anext__(), 10)).payload == "new"
    finally:
        await follower.aclose()


async def test_topic_created_while_following_a_pattern_keeps_offset_order(
    open_log: Any,
) -> None:
    log = await open_log()
    writer = await open_log()
    await writer.append_many([eventlog.Draft("orders.a", i) for i in range(2000)])
    follower = log.read("orders.#", follow=True, idle_timeout=10, page=100)
    try:
        first = await asyncio.wait_for(follower.__anext__(), 10)  # lanes known: orders.a
        # While the reader is busy with the backlog, a new matching topic gets an event,
        # then the known topic gets one more.
        b = await writer.append("orders.b", "new topic")
        a = await writer.append("orders.a", "after it")
        offsets = [first.offset]
        while len(offsets) < 2002:
            offsets.append((await asyncio.wait_for(follower.__anext__(), 10)).offset)
    finally:
        await follower.aclose()
    assert offsets == sorted(offsets), "delivered out of offset order"
    assert offsets[-2:] == [b, a]


# -- limits and pages --------------------------------------------------------------------------


async def test_limit(log: Any) -> None:
    offsets = await log.append_many([eventlog.Draft("t", i) for i in range(10)])
    assert [e.offset for e in await collect(log.read("t", limit=3))] == offsets[:3]
    assert await collect(log.read("t", limit=0)) == []
    assert len(await collect(log.read("t", limit=100))) == 10
    assert [e.offset for e in await collect(log.read("t", start=offsets[5], limit=2))] == offsets[
        5:7
    ]


@pytest.mark.parametrize("page", [1, 2, 3, 7, 500])
async def test_small_pages_over_many_lanes_keep_offset_order(log: Any, page: int) -> None:
    await log.create_topic("a", 3)
    await log.create_topic("b", 2)
    drafts = []
    for i in range(60):
        # uneven lanes: runs of one key, then keyless spreads
        key = f"k{i // 7}" if i % 5 else None
        drafts.append(eventlog.Draft("a" if i % 4 else "b", i, key=key))
    offsets = await log.append_many(drafts)
    events = await collect(log.read(["a", "b"], page=page))
    assert [e.offset for e in events] == offsets
    assert [e.payload for e in events] == list(range(60))


async def test_event_headers_are_not_shared_between_events(log: Any) -> None:
    await log.append("t", 1)
    await log.append("t", 2)
    first, second = await collect(log.read("t"))
    with contextlib.suppress(TypeError):  # read-only headers are fine too
        first.headers["x"] = "y"  # type: ignore[index]
    assert dict(second.headers) == {}
    (fresh,) = await collect(log.read("t", limit=1))
    assert dict(fresh.headers) == {}


async def test_events_are_frozen(log: Any) -> None:
    await log.append("t", 1)
    (event,) = await collect(log.read("t"))
    with pytest.raises(AttributeError):
        event.offset = 5  # type: ignore[misc]


# -- memory and the WAL ------------------------------------------------------------------------

BACKLOG = 100_000


async def test_memory_stays_flat_over_a_large_backlog(log: Any, db_path: Path) -> None:
    await log.append("big", {"i": 0})
    # The rest of the backlog goes in with raw sqlite3: faster, and reading is what is tested.
    with raw(db_path) as conn:
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "INSERT INTO eventlog_events (topic, partition, payload, created_at)"
            " VALUES ('big', 0, ?, 0)",
            ((f'{{"i":{i}}}',) for i in range(1, BACKLOG)),
        )
        conn.execute("COMMIT")
    # What holding the whole backlog would cost, measured on a sample and scaled.
    tracemalloc.start()
    try:
        sample = await collect(log.read("big", limit=5_000))
        whole = tracemalloc.get_traced_memory()[0] * (BACKLOG // 5_000)
        del sample
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        count = last = 0
        async for event in log.read("big"):
            count += 1
            last = event.payload["i"]
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert count == BACKLOG and last == BACKLOG - 1
    assert peak < whole / 20, f"peak {peak} bytes while reading; the whole backlog is ~{whole}"


async def test_paused_reader_does_not_pin_the_wal(log: Any, db_path: Path) -> None:
    await log.append_many([eventlog.Draft("t", i) for i in range(3000)])
    reader = log.read("t", page=100)
    try:
        for _ in range(1234):
            await reader.__anext__()
        # the reader is mid-backlog, between pages: a checkpoint can reset the WAL
        with raw(db_path) as conn:
            assert conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
        assert os.path.getsize(f"{db_path}-wal") == 0
        rest = [e.payload async for e in reader]
        assert rest[0] == 1234 and rest[-1] == 2999
    finally:
        await reader.aclose()


async def test_log_checkpoint_truncates_the_wal(log: Any, db_path: Path) -> None:
    await log.append_many([eventlog.Draft("t", i) for i in range(1000)])
    assert os.path.getsize(f"{db_path}-wal") > 0
    busy, _, _ = await log.checkpoint()
    assert busy == 0
    assert os.path.getsize(f"{db_path}-wal") == 0


def test_compiled_patterns_escape_names() -> None:
    compiled = _core.compile_patterns(["a-b.c_d"])
    assert _core.topic_matches(compiled, "a-b.c_d")
    assert not _core.topic_matches(compiled, "a-b.cxd")
    assert not re.search(r"\(\?[^:]", compiled.pattern)  # no inline flags smuggled in
