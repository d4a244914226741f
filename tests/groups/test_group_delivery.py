"""Delivery to consumer groups: every group gets every event with its own positions, start
positions for a new group, pattern subscriptions picking up new topics, positions that never
move backwards, and wake-ups that are not lost between a read and the wait after it."""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

import eventlog
from eventlog import _async, _consumer, _core, _db, _groups, _sql, _sync
from eventlog._groups import LaneState

from .conftest import (
    append_elsewhere,
    caught_up,
    lane_heads,
    lane_row,
    log_events,
    position,
    raw,
    running,
    until,
)


def collector() -> tuple[list[eventlog.Event], object]:
    got: list[eventlog.Event] = []

    async def handle(event: eventlog.Event) -> None:
        got.append(event)

    return got, handle


async def test_two_groups_each_receive_every_event_with_independent_positions(db: Path) -> None:
    async with eventlog.open(db) as log:
        await log.create_topic("orders", partitions=3)
        offsets = await log.append_many(
            [eventlog.Draft("orders", {"n": i}, key=f"k{i % 7}") for i in range(60)]
        )
        got_a, handle_a = collector()
        got_b, handle_b = collector()
        a = log.consumer("a", "orders", handle_a, batch_size=8)
        b = log.consumer("b", "orders", handle_b, batch_size=8)
        async with running(a), running(b):
            await until(lambda: caught_up(db, "a", "orders") and caught_up(db, "b", "orders"))
        assert sorted(e.offset for e in got_a) == offsets
        assert sorted(e.offset for e in got_b) == offsets
        heads = lane_heads(db, "orders")

        # Only group a runs now: b's positions stay where they were.
        more = await log.append_many([eventlog.Draft("orders", {"n": i}, key=f"k{i % 7}")
                                      for i in range(60, 75)])  # fmt: skip
        got_a.clear()
        async with running(log.consumer("a", "orders", handle_a)):
            await until(lambda: caught_up(db, "a", "orders"))
        assert sorted(e.offset for e in got_a) == more
        for partition, head in heads.items():
            assert position(db, "b", "orders", partition) == head
        assert {position(db, "a", "orders", p) for p in range(3)} != set(heads.values())

        # b resumes exactly where it stopped.
        got_b.clear()
        async with running(log.consumer("b", "orders", handle_b)):
            await until(lambda: caught_up(db, "b", "orders"))
        assert sorted(e.offset for e in got_b) == more


async def test_a_new_group_starts_earliest_latest_at_an_offset_or_a_time(db: Path) -> None:
    async with eventlog.open(db) as log:
        before = [await log.append("t", {"n": i}) for i in range(3)]

        async def run_new_group(
            group: str, start: object, extra: int = 0
        ) -> tuple[list[int], list[int]]:
            """Delivered offsets, and those of `extra` events appended once it runs."""
            got, handle = collector()
            consumer = log.consumer(group, "t", handle, start=start)
            async with running(consumer):
                await until(lambda: consumer.owned_lanes and lane_row(db, group, "t"),
                            what="the lane taken")  # fmt: skip
                added = [await log.append("t", {"late": i}) for i in range(extra)]
                await until(lambda: caught_up(db, group, "t"))
            return [e.offset for e in got], added

        assert (await run_new_group("g-earliest", "earliest"))[0] == before
        delivered, added = await run_new_group("g-latest", "latest", extra=2)
        assert delivered == added, "latest: only events appended after the start"
        everything = [row[0] for row in log_events(db, "t")]
        assert (await run_new_group("g-offset", before[1]))[0] == everything[1:]

        # A time: the first event created at or after it.
        last_ms = log_events_created(db)[-1]
        await until(lambda: _core.now_ms() > last_ms, what="the clock to move")
        moment = datetime.now(UTC)
        await until(lambda: _core.now_ms() > _core.datetime_ms(moment), what="the clock")
        later = [await log.append("t", {"after": i}) for i in range(2)]
        assert (await run_new_group("g-time", moment))[0] == later


async def test_latest_is_kept_for_the_group_and_forgotten_with_it(db: Path) -> None:
    """`latest` is the head when the group's first member started, noted for the group: a
    topic created while no member had found it yet is consumed from its start by whichever
    member takes it later. Deleting the group forgets that start: started again at latest,
    it begins at the head of then, not at its old start."""
    async with eventlog.open(db) as log:
        await log.append("orders.eu", {"before": True})

        async def consume_latest() -> list[int]:
            got, handle = collector()
            consumer = log.consumer("g", "orders.*", handle, start="latest")
            async with running(consumer):
                await until(lambda: lane_row(db, "g", "orders.eu"), what="the lane taken")
            return [e.offset for e in got]

        assert await consume_latest() == []
        created_later = [await log.append("orders.us", {"n": i}) for i in range(3)]
        got, handle = collector()
        consumer = log.consumer("g", "orders.*", handle, start="latest")
        async with running(consumer):
            await until(lambda: caught_up(db, "g", "orders.us"), what="orders.us consumed")
        assert [e.offset for e in got] == created_later
        await asyncio.to_thread(_delete_group, db, "g")
        await log.append("orders.mx", {"before the new start": True})
        assert await consume_latest() == []
        assert lane_row(db, "g", "orders.mx") is not None
        assert position(db, "g", "orders.mx") == await log.head()


async def test_a_group_known_only_by_its_rows_is_listed_and_can_be_deleted(db: Path) -> None:
    """A group's state lives in the file; its sidecar folder only in the directory beside it.
    Restored from a backup (no sidecar), a group that noted its start but has no lane yet
    must still be listed, and deletable, or its old start silently governs a new group of
    the same name."""
    async with eventlog.open(db) as log:
        consumer = log.consumer("g", "orders.*", collector()[1], start="latest")
        async with running(consumer):
            await until(lambda: group_starts(db), what="the start noted")
        await log.append("orders.eu", {"after the start": True})
    shutil.rmtree(_db.Paths.for_db(db).sidecar / "groups")  # as a restored backup has none
    with eventlog.open_sync(db) as log:
        assert log.group_names() == ["g"]
        log.delete_group("g")
        assert log.group_names() == []
    assert group_starts(db) == []


def group_starts(db: Path) -> list[str]:
    with raw(db) as conn:
        return [r[0] for r in conn.execute("SELECT group_name FROM eventlog_group_starts")]


def _delete_group(db: Path, group: str) -> None:
    with eventlog.open_sync(db) as log:
        log.delete_group(group)


def log_events_created(db: Path) -> list[int]:
    with raw(db) as conn:
        return [r[0] for r in conn.execute("SELECT created_at FROM eventlog_events ORDER BY id")]


@pytest.mark.parametrize("start", ["earliest", "latest"])
async def test_topics_created_later_that_match_a_pattern_are_consumed_from_their_start(
    db: Path, start: str
) -> None:
    async with eventlog.open(db) as log:
        await log.append("orders.eu", {"n": 0})
        got, handle = collector()
        consumer = log.consumer("g", "orders.*", handle, start=start)
        async with running(consumer):
            await until(lambda: consumer.owned_lanes == [("orders.eu", 0)])
            # Appended by another process, right after the topic is made: none may be missed.
            new = append_elsewhere(db, [{"topic": "orders.us", "payload": {"n": i}}
                                        for i in range(3)])  # fmt: skip
            ignored = append_elsewhere(db, [{"topic": "orders.us.west", "payload": 1},
                                            {"topic": "other", "payload": 2}])  # fmt: skip
            await until(lambda: caught_up(db, "g", "orders.us"), timeout=20,
                        what="the new topic consumed")  # fmt: skip
            assert consumer.owned_lanes == [("orders.eu", 0), ("orders.us", 0)]
        delivered = [e.offset for e in got]
        assert [o for o in delivered if o in new] == new
        assert not set(delivered) & set(ignored)
        assert lane_row(db, "g", "orders.us.west") is None


def test_positions_never_move_backwards(db: Path) -> None:
    lane = ("t", 0)
    with eventlog.open_sync(db) as log:
        offsets = [log.append("t", {"n": i}) for i in range(10)]
        state = log.run(_groups.take_lane_plan("g", lane, "earliest"), "write")
        log.run(_groups.commit_plan("g", state, offsets[7], False), "write")
        assert position(db, "g", "t") == offsets[7]

        # A stale owner's view (an older position) commits an older offset: nothing moves.
        stale = LaneState(lane, offsets[1])
        log.run(_groups.commit_plan("g", stale, offsets[3], False), "write")
        assert position(db, "g", "t") == offsets[7]
        log.run(_groups.commit_plan("g", LaneState(lane, 0), offsets[2], True), "write")
        assert position(db, "g", "t") == offsets[7]
        batch = log.run(_groups.advance_plan("g", LaneState(lane, offsets[0]), offsets[4], 3),
                        "write")  # fmt: skip
        assert [e.offset for e in batch.events] == offsets[5:8]
        assert position(db, "g", "t") == offsets[7]
        event = log.get(offsets[5])
        assert event is not None
        log.run(_groups.record_failure_plan("g", event, 1, ("E", "m", ""),
                                            LaneState(lane, 0)), "write")  # fmt: skip
        assert position(db, "g", "t") == offsets[7]
        log.run(_groups.finish_event_plan("g", event, LaneState(lane, 0)), "write")
        assert position(db, "g", "t") == offsets[7]

    # The statement itself, through plain sqlite3.
    with raw(db) as conn:
        conn.execute(_sql.COMMIT_GROUP_LANE, (offsets[2], None, None, 0, "g", "t", 0))
        assert position(db, "g", "t") == offsets[7]
        conn.execute(_sql.COMMIT_GROUP_LANE, (offsets[9], None, None, 0, "g", "t", 0))
        assert position(db, "g", "t") == offsets[9]


async def test_append_between_the_first_read_and_the_wait_wakes_the_consumer_at_once(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every slow path made 30 s long: only the wake-up signal can deliver in time.
    monkeypatch.setattr(_sync, "FALLBACK_POLL_S", 30.0)
    monkeypatch.setattr(_async, "FALLBACK_POLL_S", 30.0)
    monkeypatch.setattr(_consumer, "REBALANCE_S", 30.0)
    wait_any = _consumer._wait_any

    async def slow_wait_any(*events: asyncio.Event, timeout: float = 1.0) -> None:
        await wait_any(*events, timeout=30.0)

    monkeypatch.setattr(_consumer, "_wait_any", slow_wait_any)

    # The consumer's waiter is asleep when the append commits: its last look at
    # data_version found nothing new.
    asleep = threading.Event()
    changed = _sync.DatabaseWatch.changed

    def watch_changed(self: _sync.DatabaseWatch) -> bool:
        result = changed(self)
        if result:
            asleep.clear()
        else:
            asleep.set()
        return result

    monkeypatch.setattr(_sync.DatabaseWatch, "changed", watch_changed)

    # The lane's first look finds nothing; another process appends right after that look,
    # before the lane can wait (the look runs on the loop thread, so nothing else runs
    # in between).
    appended: list[float] = []
    has_more_plan = _groups.has_more_plan

    def look_then_append(state: LaneState):  # type: ignore[no-untyped-def]
        more = yield from has_more_plan(state)
        if not more and not appended:
            appended.extend(append_elsewhere(db, [{"topic": "t", "payload": "late"}]))
            appended.append(time.monotonic())
        return more

    monkeypatch.setattr(_groups, "has_more_plan", look_then_append)
    async with eventlog.open(db) as log:
        await log.create_topic("t")
        # The group's position exists already, so taking the lane writes nothing (a write of
        # the consumer's own would wake its waiter once and blur the test).
        await log.run(_groups.take_lane_plan("g", ("t", 0), "earliest"), "write")
        listener = log.paths.wake_folder / f"{99999999}-{'0' * 8}.sock"
        assert len(bytes(listener)) <= 100, "tmp path too long for wake-up sockets"
        got, handle = collector()
        consumer = log.consumer("g", "t", handle)
        async with running(consumer):
            await until(lambda: got, timeout=20, what="the late event")
            waited = time.monotonic() - appended[1]
        assert [e.offset for e in got] == appended[:1]
        assert waited < 10, f"delivered after {waited:.1f}s: the wake-up was lost"
