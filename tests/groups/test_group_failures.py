"""Guarantees 3 and 4 in one process: retries, dead letters, batch handlers, an unwritable
dead-letter file, requeue (to one group only) and purge, a torn dead-letter line, and the
sync shell's consumer."""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import eventlog
from eventlog import DeadLetterError

from .conftest import (
    attempt_rows,
    caught_up,
    deadletter_entries,
    deadletter_lines,
    deadletter_path,
    lane_row,
    position,
    raw,
    running,
    until,
    wait_until,
)

FAST = {"retry_backoff": 0.01, "max_backoff": 0.02}


async def test_always_raising_event_is_dead_lettered_after_max_attempts_then_the_lane_moves_on(
    db: Path,
) -> None:
    async with eventlog.open(db) as log:
        offsets = await log.append_many([
            eventlog.Draft("t", {"n": 0}, key="k"),
            eventlog.Draft("t", {"n": 1, "bad": True}, key="k", headers={"h": "v"}),
            eventlog.Draft("t", {"n": 2}, key="k"),
            eventlog.Draft("t", {"n": 3}, key="k"),
        ])  # fmt: skip
        bad = offsets[1]
        order: list[int] = []

        async def handle(event: eventlog.Event) -> None:
            order.append(event.offset)
            if event.payload.get("bad"):
                raise ValueError(f"cannot take offset {event.offset}")

        consumer = log.consumer("g", "t", handle, max_attempts=4, **FAST)
        async with running(consumer):
            await until(lambda: position(db, "g", "t") == offsets[-1])
        listing = await log.dead_letters(group="g")

    # Exactly max_attempts calls; the lane waited for them (order kept), then moved on.
    assert order == [offsets[0], bad, bad, bad, bad, offsets[2], offsets[3]]
    (entry,) = deadletter_entries(db)
    assert entry["offset"] == bad and entry["group"] == "g" and entry["topic"] == "t"
    assert entry["attempts"] == 4
    assert entry["error_type"] == "ValueError"
    assert entry["error_message"] == f"cannot take offset {bad}"
    assert "Traceback" in entry["traceback"] and "in handle" in entry["traceback"]
    assert f"ValueError: cannot take offset {bad}" in entry["traceback"]
    assert entry["payload"] == {"n": 1, "bad": True} and entry["key"] == "k"
    assert entry["headers"] == {"h": "v"}
    assert entry["first_failed_at_ms"] <= entry["last_failed_at_ms"] <= entry["dead_lettered_at_ms"]
    assert entry["requeued_at_ms"] is None
    assert [e.id for e in listing.entries] == [entry["id"]]
    assert lane_row(db, "g", "t") == (offsets[-1], None, None)
    assert attempt_rows(db) == []


async def test_failing_batch_is_retried_one_event_at_a_time_and_only_the_poison_is_dead_lettered(
    db: Path,
) -> None:
    async with eventlog.open(db) as log:
        offsets = await log.append_many(
            [eventlog.Draft("t", {"n": i, "bad": i == 2}) for i in range(6)]
        )
        poison = offsets[2]
        batches: list[tuple[list[int], bool]] = []

        async def handle_batch(events: list[eventlog.Event]) -> None:
            failed = any(e.payload["bad"] for e in events)
            batches.append(([e.offset for e in events], not failed))
            if failed:
                raise RuntimeError("a poison event in this batch")

        consumer = log.consumer("g", "t", batch_handler=handle_batch, max_attempts=3, **FAST)
        async with running(consumer):
            await until(lambda: position(db, "g", "t") == offsets[-1])
        # The next batch is a batch again.
        more = await log.append_many([eventlog.Draft("t", {"n": i, "bad": False})
                                      for i in range(6, 9)])  # fmt: skip
        async with running(log.consumer("g", "t", batch_handler=handle_batch, max_attempts=3)):
            await until(lambda: position(db, "g", "t") == more[-1])

    assert batches[0] == (offsets, False)
    retried = batches[1:-1]
    assert all(len(b) == 1 for b, _ in retried), batches
    assert [b[0] for b, ok in retried if not ok] == [poison] * 3
    succeeded = {o for b, ok in batches if ok for o in b}
    assert succeeded == (set(offsets) - {poison}) | set(more)
    assert batches[-1] == (more, True)
    entries = deadletter_entries(db)
    assert [(e["offset"], e["attempts"], e["error_type"]) for e in entries] == [
        (poison, 3, "RuntimeError")
    ]
    assert attempt_rows(db) == []


@pytest.mark.parametrize("how", ["directory in its place", "read-only file"])
async def test_unwritable_dead_letter_file_holds_the_position_until_it_can_be_written(
    db: Path, how: str
) -> None:
    path = deadletter_path(db)
    if how == "read-only file":
        if os.geteuid() == 0:
            pytest.skip("root ignores file modes; the directory variant covers this")
        path.write_bytes(b"")
        path.chmod(0o400)
    else:
        path.mkdir()
    async with eventlog.open(db) as log:
        offsets = await log.append_many([eventlog.Draft("t", {"n": i, "bad": i == 1})
                                         for i in range(3)])  # fmt: skip
        bad = offsets[1]
        calls: Counter[int] = Counter()

        async def handle(event: eventlog.Event) -> None:
            calls[event.offset] += 1
            if event.payload["bad"]:
                raise ValueError("bad")

        consumer = log.consumer("g", "t", handle, max_attempts=2, retry_backoff=0.01,
                                max_backoff=0.05)  # fmt: skip
        refused = 0
        append = consumer._deadletters.append

        def counting_append(entry: Any, **options: Any) -> Any:
            nonlocal refused
            try:
                return append(entry, **options)
            except DeadLetterError:
                refused += 1
                raise

        consumer._deadletters.append = counting_append  # type: ignore[method-assign]
        async with running(consumer):
            await until(lambda: refused >= 5, what="dead-letter writes refused")
            # Stuck before the event: not acknowledged, not skipped, no more handler calls.
            assert position(db, "g", "t") == offsets[0]
            assert calls[bad] == 2 and offsets[2] not in calls
            assert [r[1:3] for r in attempt_rows(db, "g")] == [(bad, 2)]
            if how == "read-only file":
                path.chmod(0o600)
            else:
                path.rmdir()
            await until(lambda: position(db, "g", "t") == offsets[-1])
    assert calls[bad] == 2 and calls[offsets[2]] == 1
    assert [e["offset"] for e in deadletter_entries(db)] == [bad]
    assert attempt_rows(db) == []


def heartbeat_time(log: eventlog.AsyncLog, consumer: eventlog.Consumer) -> float:
    path = log.paths.group_folder(consumer.group) / "members" / f"{consumer.member_id}.lock"
    try:
        return float(json.loads(path.read_text() or "{}").get("time", 0))
    except ValueError:
        return 0.0  # being rewritten


async def test_requeue_goes_to_one_group_purge_removes_and_a_torn_line_is_survived(
    db: Path,
) -> None:
    async with eventlog.open(db) as log:
        bad = await log.append("t", {"bad": True})
        await log.append("t", {"n": 1})
        failing = {"g1": True, "g2": True}
        seen: dict[str, list[int]] = {"g1": [], "g2": []}

        def handler_for(group: str) -> Any:
            async def handle(event: eventlog.Event) -> None:
                seen[group].append(event.offset)
                if event.payload.get("bad") and failing[group]:
                    raise ValueError(f"{group} refuses {event.offset}")

            return handle

        c1 = log.consumer("g1", "t", handler_for("g1"), max_attempts=2, **FAST)
        c2 = log.consumer("g2", "t", handler_for("g2"), max_attempts=2, **FAST)
        async with running(c1), running(c2):
            await until(lambda: caught_up(db, "g1", "t") and caught_up(db, "g2", "t"))
            listing = await log.dead_letters()
            assert sorted((e.group, e.offset) for e in listing.entries) == [
                ("g1", bad), ("g2", bad)
            ]  # fmt: skip

            # A torn last line (a crash mid-write elsewhere): reported, not fatal.
            fragment = b'{"id":"0123456789ab","group":"g1","topic":"t","off'
            with open(deadletter_path(db), "ab") as f:
                f.write(fragment)
            listing = await log.dead_letters()
            assert listing.torn_tail and listing.bad_lines == [] and len(listing.entries) == 2
            with eventlog.open_sync(db) as sync_log:
                sync_listing = await asyncio.to_thread(sync_log.dead_letters)
            assert sync_listing.torn_tail and len(sync_listing.entries) == 2

            # The next dead letter starts on a line of its own.
            bad2 = await log.append("t", {"bad": True, "n": 2})
            await until(lambda: caught_up(db, "g1", "t") and caught_up(db, "g2", "t"))
            lines = deadletter_lines(db)
            assert lines[2] == fragment
            assert sorted(json.loads(x)["group"] for x in lines[3:]) == ["g1", "g2"]
            assert all(json.loads(x)["offset"] == bad2 for x in lines[3:])
            listing = await log.dead_letters()
            assert not listing.torn_tail and listing.bad_lines == [3]
            assert len(listing.entries) == 4

            # Requeue g1's first dead letter: g1 gets the event again, g2 does not.
            failing["g1"] = False
            before_g1, before_g2 = seen["g1"].count(bad), seen["g2"].count(bad)
            (first,) = [e for e in listing.entries if e.group == "g1" and e.offset == bad]
            requeued = await log.requeue_dead_letters([first.id])
            assert [e.id for e in requeued] == [first.id]
            await until(lambda: seen["g1"].count(bad) == before_g1 + 1, what="the redelivery")
            with raw(db) as conn:
                await until(lambda: conn.execute(
                    "SELECT count(*) FROM eventlog_redeliveries").fetchone()[0] == 0)  # fmt: skip
            mark = heartbeat_time(log, c2)
            await until(lambda: heartbeat_time(log, c2) > mark + 1.0, what="g2 to rebalance")
            assert seen["g2"].count(bad) == before_g2
            assert seen["g1"].count(bad) == before_g1 + 1
            assert attempt_rows(db) == []

        listing = await log.dead_letters()
        marked = {e.id: e.requeued_at_ms for e in listing.entries}
        assert marked.pop(first.id) is not None
        assert set(marked.values()) == {None}
        assert deadletter_lines(db)[2] == fragment, "an unreadable line was not kept as it was"
        # Requeued entries are not requeued twice.
        assert await log.requeue_dead_letters(group="g1", dry_run=True) == [
            e for e in listing.entries if e.group == "g1" and e.id != first.id
        ]

        # Purge: by group (sync shell), then everything; the unreadable line stays.
        with eventlog.open_sync(db) as sync_log:
            purged = await asyncio.to_thread(sync_log.purge_dead_letters, group="g2")
        assert sorted(e.offset for e in purged) == [bad, bad2]
        assert {e["group"] for e in deadletter_entries(db)} == {"g1"}
        await log.purge_dead_letters(all=True)
        assert deadletter_entries(db) == []
        assert deadletter_lines(db) == [fragment]
        assert (await log.dead_letters()).entries == []


def test_sync_consume_acknowledges_and_dead_letters_like_the_async_consumer(db: Path) -> None:
    with eventlog.open_sync(db) as log:
        offsets = log.append_many([eventlog.Draft("t", {"n": i, "bad": i == 2}, key=f"k{i % 2}")
                                   for i in range(5)])  # fmt: skip
        order: list[tuple[int, str]] = []

        def handle(event: eventlog.Event) -> None:
            order.append((event.offset, threading.current_thread().name))
            if event.payload["bad"]:
                raise KeyError("missing")

        stop = threading.Event()
        failure: list[BaseException] = []

        def consume() -> None:
            try:
                log.consume("g", "t", handle, stop=stop, handle_signals=False, max_attempts=3,
                            **FAST)  # fmt: skip
            except BaseException as exc:
                failure.append(exc)

        thread = threading.Thread(target=consume)
        thread.start()
        try:
            wait_until(lambda: position(db, "g", "t") == offsets[-1] or failure)
        finally:
            stop.set()
            thread.join(30)
        assert not thread.is_alive() and not failure
        assert [o for o, _ in order] == offsets[:2] + [offsets[2]] * 3 + offsets[3:]
        assert all(name != threading.main_thread().name for _, name in order)
        (entry,) = deadletter_entries(db)
        assert (entry["offset"], entry["attempts"], entry["error_type"]) == (offsets[2], 3,
                                                                            "KeyError")  # fmt: skip
        assert lane_row(db, "g", "t") == (offsets[-1], None, None)
        assert attempt_rows(db) == []
        assert log.dead_letter(entry["id"]).offset == offsets[2]
