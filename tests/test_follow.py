"""Following: a reader waiting for other processes' commits sees every event exactly once, in
order, promptly; waiting holds no read transaction (guarantee 8); wait_for cannot miss an
event that committed before it started waiting."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import collect, raw, wait_until

import eventlog

# Generous on purpose: machines are noisy. Wake-ups take about a millisecond here.
PROMPT_S = 2.0


class Following:
    """A follower with its next event in flight (`pending`); `stop()` ends it promptly on
    both shells (a sync follower blocks its thread until its stop event is set)."""

    def __init__(self, log: Any, topics: Any, **options: Any) -> None:
        self.stop_event = asyncio.Event()
        self.iterator = log.read(topics, follow=True, stop=self.stop_event, **options)
        self.pending: asyncio.Future[Any] = asyncio.ensure_future(self.iterator.__anext__())

    async def next(self, timeout: float = 10) -> Any:
        try:
            return await asyncio.wait_for(self.pending, timeout)
        finally:
            self.pending = asyncio.ensure_future(self.iterator.__anext__())

    async def stop(self) -> None:
        self.stop_event.set()
        with contextlib.suppress(
            StopAsyncIteration, asyncio.CancelledError, eventlog.EventlogError
        ):
            await asyncio.wait_for(self.pending, 10)
        await self.iterator.aclose()


async def start_following(log: Any, topics: Any, **options: Any) -> Following:
    """Start a follower and wait until it has subscribed to wake-ups (its socket exists)."""
    wake = log.paths.wake_folder
    before = set(wake.glob("*.sock"))
    following = Following(log, topics, **options)
    await wait_until(lambda: set(wake.glob("*.sock")) - before or following.pending.done(),
                     what="the follower's wake socket")  # fmt: skip
    return following


async def test_follower_sees_other_process_appends_once_in_order_and_promptly(
    log: Any, db_path: Path, spawn
) -> None:
    # The follower starts on an empty file, before the topic exists.
    following = await start_following(log, "orders.#", start="latest", idle_timeout=30)
    producer = spawn(db_path, "serve")
    producer.wait_ready()
    try:
        seen_at = []
        received = []
        for i in range(25):  # one at a time: each arrives while the follower is idle
            producer.send({"op": "append", "topic": f"orders.{'eu' if i % 2 else 'us'}",
                           "payload": {"i": i}})  # fmt: skip
            received.append(await following.next())
            seen_at.append(time.monotonic())
        replies = [producer.json() for _ in range(25)]
        for reply, event, t in zip(replies, received, seen_at, strict=True):
            assert event.offset == reply["offset"]
            assert t - reply["t"] < PROMPT_S, f"woke {t - reply['t']:.3f}s after the append"
        assert [e.payload for e in received] == [{"i": i} for i in range(25)]

        # A burst: every event once, in order...
        for i in range(25, 325):
            producer.send({"op": "append", "topic": "orders.eu", "payload": {"i": i}})
        burst = [await following.next() for _ in range(300)]
        offsets = [producer.json()["offset"] for _ in range(300)]
        assert [e.offset for e in burst] == offsets
        assert [e.payload for e in burst] == [{"i": i} for i in range(25, 325)]
        # ...and nothing more.
        producer.send({"op": "exit"})
        assert producer.finish() == 0
        done, _ = await asyncio.wait({following.pending}, timeout=0.3)
        assert not done, f"delivered an extra event: {following.pending.result()}"
    finally:
        await following.stop()


async def test_follower_in_another_process_sees_every_event_once(
    log: Any, db_path: Path, spawn
) -> None:
    await log.append("t", "before")
    followers = [
        spawn(db_path, "follow", json.dumps({"topics": "t", "count": 201, "api": api}))
        for api in ("sync", "async")
    ]
    for child in followers:
        child.wait_ready()
    offsets = [await log.append("t", i) for i in range(100)]
    offsets += await log.append_many([eventlog.Draft("t", i) for i in range(100, 200)])
    for child in followers:
        seen = [json.loads(line) for line in child.rest(timeout=30)]
        assert child.finish() == 0, child.stderr
        assert [s["payload"] for s in seen] == ["before", *range(200)]
        assert [s["offset"] for s in seen][1:] == offsets


async def test_same_process_appends_wake_the_follower(open_log: Any) -> None:
    log = await open_log()
    writer = await open_log()  # the sync log's thread is busy following
    following = await start_following(log, "t", idle_timeout=30)
    try:
        for i in range(20):
            sent = time.monotonic()
            await writer.append("t", i)
            assert (await following.next()).payload == i
            assert time.monotonic() - sent < PROMPT_S
    finally:
        await following.stop()


async def test_follower_in_a_deep_folder_falls_back_to_polling_promptly(
    open_log: Any, tmp_path: Path
) -> None:
    # A Unix socket path holds ~100 bytes: here the wake folder is too deep for one, so
    # waiters only poll. Slower, never lost.
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    log = await open_log(deep / "app.db")
    writer = await open_log(deep / "app.db")
    following = Following(log, "t", idle_timeout=30)
    try:
        for i in range(5):
            sent = time.monotonic()
            await writer.append("t", i)
            assert (await following.next()).payload == i
            assert time.monotonic() - sent < PROMPT_S
        assert not list(log.paths.wake_folder.glob("*.sock"))
    finally:
        await following.stop()


async def test_idle_follower_does_not_block_checkpoints(open_log: Any, db_path: Path) -> None:
    log = await open_log()
    writer = await open_log()
    await writer.append_many([eventlog.Draft("t", i) for i in range(500)])
    following = await start_following(log, "t", idle_timeout=30)
    try:
        for i in range(500):
            assert (await following.next()).payload == i
        # Now it waits for more. A checkpoint from another connection resets the WAL.
        with raw(db_path, timeout=5) as conn:
            busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        assert busy == 0
        assert os.path.getsize(f"{db_path}-wal") == 0
        # ...and the follower still gets what comes next
        await writer.append("t", "next")
        assert (await following.next()).payload == "next"
    finally:
        await following.stop()


async def test_follow_ends_after_idle_timeout(log: Any) -> None:
    await log.append("t", 1)
    started = time.monotonic()
    events = await collect(log.read("t", follow=True, idle_timeout=0.3), timeout=10)
    assert [e.payload for e in events] == [1]
    assert 0.25 <= time.monotonic() - started < 5


async def test_follow_ends_when_stop_is_set(log: Any) -> None:
    await log.append("t", 1)
    stop = asyncio.Event()
    follower = log.read("t", follow=True, stop=stop)
    try:
        assert (await asyncio.wait_for(follower.__anext__(), 10)).payload == 1
        pending = asyncio.ensure_future(follower.__anext__())
        stop.set()
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(pending, 5)
    finally:
        await follower.aclose()


async def test_follower_notices_replaced_database_file(
    log: Any, db_path: Path, tmp_path: Path
) -> None:
    await log.append("t", 1)
    following = await start_following(log, "t", start="latest", idle_timeout=30)
    try:
        other = tmp_path / "other.db"
        with raw(other) as conn:
            conn.execute("CREATE TABLE x (a)")
        os.replace(other, db_path)
        with pytest.raises(eventlog.StorageError, match="replaced"):
            await following.next()
    finally:
        await following.stop()


# -- wait_for ----------------------------------------------------------------------------------


async def test_wait_for_sees_event_committed_before_waiting(log: Any) -> None:
    head = await log.head()
    offset = await log.append("jobs.done", {"job": 7})  # "published before I subscribed"
    result = await log.wait_for("jobs.#", after=head, timeout=5)
    assert result.received and result.status == "received"
    assert result.event.offset == offset


async def test_wait_for_matches_and_times_out(log: Any) -> None:
    head = await log.head()
    await log.append_many([eventlog.Draft("jobs", {"job": i}) for i in range(5)])
    result = await log.wait_for(
        "jobs", after=head, match=lambda e: e.payload["job"] == 3, timeout=5
    )
    assert result.event.payload == {"job": 3}
    started = time.monotonic()
    result = await log.wait_for("jobs", timeout=0.2)  # after defaults to the head now
    assert result.status == "timed_out" and result.event is None and not result.received
    assert time.monotonic() - started < 5


async def test_wait_for_from_other_process(log: Any, db_path: Path, spawn) -> None:
    producer = spawn(db_path, "serve")
    producer.wait_ready()
    head = await log.head()
    waiting = asyncio.ensure_future(log.wait_for("jobs", after=head, timeout=20))
    reply = producer.request({"op": "append", "topic": "jobs", "payload": "done"})
    result = await asyncio.wait_for(waiting, 20)
    assert result.event.offset == reply["offset"]
    producer.send({"op": "exit"})
    assert producer.finish() == 0


async def test_wait_for_can_be_cancelled(log: Any) -> None:
    cancel = asyncio.Event()
    waiting = asyncio.ensure_future(log.wait_for("jobs", timeout=30, cancel=cancel))
    await wait_until(lambda: any(log.paths.wake_folder.glob("*.sock")), what="the waiter")
    cancel.set()
    result = await asyncio.wait_for(waiting, 5)
    assert result.status == "cancelled" and result.event is None


# -- an append at durability full runs on the worker thread, which goes on without its caller --


@contextlib.contextmanager
def write_lock_held(log: Any) -> Any:
    """Hold the log's write lock as another writer would: the worker's append waits for it."""
    from eventlog._locks import FileLock

    lock = FileLock(log.paths.write_lock)
    assert lock.acquire()
    try:
        yield lock
    finally:
        lock.close()


def listening(log: Any) -> Any:
    from eventlog._wake import WakeListener

    listener = WakeListener(log.paths.wake_folder)
    assert listener.sock is not None, "wake folder too deep for a socket"
    return listener


def events_in(db_path: Path) -> int:
    with raw(db_path) as conn:
        return int(conn.execute("SELECT count(*) FROM eventlog_events").fetchone()[0])


@contextlib.asynccontextmanager
async def an_append_waiting_on_the_worker(db_path: Path) -> Any:
    """A log at full holding one event, a wake listener, and the append of a second event
    queued on the worker behind a write lock held elsewhere (the test releases it)."""
    log = await eventlog.open(db_path, durability="full")
    listener = listening(log)
    try:
        await log.append("t", 0)
        with write_lock_held(log) as lock:
            append = asyncio.create_task(log.append("t", 1))
            await asyncio.sleep(0.2)  # queued on the worker, waiting for the lock
            yield log, listener, lock, append
    finally:
        listener.close()
        await log.close()


async def test_an_append_whose_caller_gave_up_wakes_the_readers_when_it_commits(
    db_path: Path,
) -> None:
    async with an_append_waiting_on_the_worker(db_path) as (_, listener, lock, append):
        append.cancel()
        await asyncio.gather(append, return_exceptions=True)
        listener.drain()
        lock.release()
        await wait_until(lambda: events_in(db_path) == 2, what="the abandoned append")
        loop = asyncio.get_running_loop()
        readable, _, _ = await loop.run_in_executor(None, select.select, [listener], [], [], 10)
        assert readable, "no wake-up after the commit: followers wait for their slow poll"


async def test_an_append_in_flight_as_close_begins_wakes_the_readers_after_its_commit(
    db_path: Path,
) -> None:
    async with an_append_waiting_on_the_worker(db_path) as (log, listener, lock, append):
        closing = asyncio.create_task(log.close())
        await asyncio.sleep(0.2)
        listener.drain()
        lock.release()
        await asyncio.wait_for(closing, 10)
        assert await append == 2
        assert events_in(db_path) == 2
        assert listener.drain(), "no wake-up after the last commit"


async def test_a_topic_whose_creation_rolled_back_is_forgotten_by_appends_already_queued(
    db_path: Path,
) -> None:
    # The first append to a topic creates it in the same transaction; here that transaction
    # fails after the creation, while a second append is queued behind it on the worker.
    log = await eventlog.open(db_path, durability="full")
    try:
        await log.append("other", 0)
        with raw(db_path) as conn:
            conn.execute(
                "CREATE TRIGGER refuse_boom BEFORE INSERT ON eventlog_events"
                " WHEN NEW.payload = '\"boom\"' BEGIN SELECT RAISE(ABORT, 'boom'); END"
            )
        failed, second = await asyncio.gather(
            log.append("t", "boom"), log.append("t", "fine"), return_exceptions=True
        )
        assert isinstance(failed, eventlog.EventlogError), failed
        assert isinstance(second, int), second
        with raw(db_path) as conn:
            topics = [r[0] for r in conn.execute("SELECT name FROM eventlog_topics")]
        assert sorted(topics) == ["other", "t"], "an event was stored in a topic that is not"
        assert [e.payload for e in await collect(log.read("t"))] == ["fine"]
    finally:
        await log.close()
