"""The reading side at its edges: pattern reads over many topics, idle timeouts, stop, cancel
and timeouts under a full stream, and descriptors past select()'s limit.

- A read over a pattern whose topics were filled one after the other read every later topic's
  page again for each page it delivered (quadratic in the number of topics).
- `idle_timeout` started over at every wake-up, so a commit to any other topic (or any commit
  that brought the reader nothing) kept an idle follower alive for ever.
- `stop`, `cancel` and `timeout` were looked at only when a page came back empty: a backlog or
  a busy stream kept a follower or a `wait_for` going to its end.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import collect

import eventlog
from eventlog import _core, _sql


@pytest.fixture
def rows_read(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the event rows every read page fetches from SQLite (both shells drive
    `_core.read_page_plan`, looked up at each call)."""
    fetched = [0]
    original = _core.read_page_plan
    select_events = f"SELECT {_sql.EVENT_COLUMNS} FROM"

    def counting(cursor: Any, page: int, refresh: bool) -> Any:
        inner = original(cursor, page, refresh)
        reply = None
        try:
            while True:
                stmt = inner.send(reply)
                reply = yield stmt
                if stmt.sql.startswith(select_events):
                    fetched[0] += len(reply)
        except StopIteration as done:
            return done.value

    monkeypatch.setattr(_core, "read_page_plan", counting)
    return fetched


async def test_pattern_read_over_topics_filled_one_after_another_reads_each_row_about_once(
    log: Any, rows_read: list[int]
) -> None:
    topics, per_topic, page = 40, 100, 50
    for t in range(topics):  # tenant.t00's events, then tenant.t01's, ...
        await log.append_many([eventlog.Draft(f"tenant.t{t:02d}", t * 1000 + i)
                               for i in range(per_topic)])  # fmt: skip
    events = await collect(log.read("tenant.*", page=page), timeout=120)
    assert [e.payload for e in events] == [t * 1000 + i for t in range(topics)
                                           for i in range(per_topic)]  # fmt: skip
    # Was 40,000+ rows for 4,000 events: every page read a full page of every topic still
    # ahead, to keep the first 50 of them.
    assert rows_read[0] <= 2 * topics * per_topic, rows_read[0]


async def test_pattern_read_still_merges_interleaved_lanes_in_offset_order(
    log: Any, rows_read: list[int]
) -> None:
    await log.create_topic("m", partitions=7)
    drafts = [eventlog.Draft("m" if i % 3 else "n.x", i, key=f"k{i % 11}") for i in range(2000)]
    await log.append_many(drafts)
    await log.append_many([eventlog.Draft("n.y", i) for i in range(50)])
    events = await collect(log.read(["m", "n.*"], page=13), timeout=120)
    offsets = [e.offset for e in events]
    assert offsets == sorted(offsets) and len(offsets) == len(set(offsets)) == 2050


async def test_idle_timeout_is_not_reset_by_commits_to_other_topics(
    log: Any, db_path: Path
) -> None:
    await log.append("quiet", 1)
    follower_done = threading.Event()
    written = [0]
    max_writes = 600  # 30 s of traffic at 50 ms: far past the follower's 0.3 s idle timeout

    def busy_elsewhere() -> None:
        with eventlog.open_sync(db_path, durability="normal") as other:
            while not follower_done.is_set() and written[0] < max_writes:
                other.append("busy", written[0])
                written[0] += 1
                time.sleep(0.05)

    writer = threading.Thread(target=busy_elsewhere)
    writer.start()
    try:
        events = await collect(log.read("quiet", follow=True, idle_timeout=0.3), timeout=60)
    finally:
        follower_done.set()
        await asyncio.to_thread(writer.join)
    assert [e.payload for e in events] == [1]
    # Before the fix the follower ended only when the other topic's traffic did.
    assert written[0] < max_writes, "idle follower kept alive by another topic's commits"


async def test_follow_stop_set_during_a_backlog_ends_the_reader(log: Any) -> None:
    await log.append_many([eventlog.Draft("t", i) for i in range(3000)])
    stop = asyncio.Event()
    follower = log.read("t", follow=True, stop=stop, page=100)
    try:
        first = await asyncio.wait_for(follower.__anext__(), 10)
        assert first.payload == 0
        stop.set()
        after_stop = 0
        with pytest.raises(StopAsyncIteration):
            while True:
                await asyncio.wait_for(follower.__anext__(), 10)
                after_stop += 1
    finally:
        await follower.aclose()
    # Was 2999: the whole backlog, stop being looked at only once the reader was idle.
    assert after_stop <= 300, after_stop


async def test_wait_for_cancel_is_honoured_while_non_matching_events_keep_coming(
    log: Any,
) -> None:
    await log.append_many([eventlog.Draft("jobs", {"job": i}) for i in range(3000)])
    cancel = asyncio.Event()
    calls = [0]
    loop = asyncio.get_running_loop()

    def match(event: Any) -> bool:
        calls[0] += 1
        if calls[0] == 1:  # the caller gives up as soon as the first event was looked at
            loop.call_soon_threadsafe(cancel.set)
        return False

    result = await asyncio.wait_for(
        log.wait_for("jobs", after=0, match=match, cancel=cancel, timeout=60), 60
    )
    assert result.status == "cancelled"
    # Was 3000: every event of the backlog was matched before the cancel was looked at.
    assert calls[0] <= 1000, calls[0]


async def test_wait_for_timeout_is_honoured_while_non_matching_events_keep_coming(
    log: Any,
) -> None:
    await log.append_many([eventlog.Draft("jobs", {"job": i}) for i in range(3000)])
    calls = [0]

    def match(event: Any) -> bool:
        calls[0] += 1
        return False

    result = await asyncio.wait_for(log.wait_for("jobs", after=0, match=match, timeout=0), 60)
    assert result.status == "timed_out" and result.event is None
    # Was 3000: a timeout of 0 ran over the whole backlog (a timeout of 1 s over a backlog
    # of millions ran for as long as reading them takes).
    assert calls[0] <= 500, calls[0]


def test_sync_follow_and_wait_for_work_with_descriptors_past_fd_setsize(db_path: Path) -> None:
    """A process with more than 1024 files or sockets open (a busy server) gets descriptors
    past select()'s FD_SETSIZE for the waiter's socket: the sync waiter raised ValueError
    ("filedescriptor out of range in select()") from every follow and wait_for."""
    import os
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1300:
        pytest.skip(f"the hard limit of open files ({hard}) is too low")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1300), hard))
    held: list[int] = []
    try:
        while not held or held[-1] < 1100:
            held.append(os.open(os.devnull, os.O_RDONLY))
        with eventlog.open_sync(db_path) as log:
            log.append("t", 1)
            assert [e.payload for e in log.read("t", follow=True, idle_timeout=0.2)] == [1]
            assert log.wait_for("t", timeout=0.2).status == "timed_out"
            head = log.head()
            log.append("t", 2)
            assert log.wait_for("t", after=head, timeout=30).event.payload == 2
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
