"""Appending: offsets (guarantee 2), group commit, dedupe keys, partitioning, durability
settings, and exact JSON round trips. Every test runs on both shells (the `log` fixture)."""

from __future__ import annotations

import asyncio
import fcntl
import json
import math
import os
import stat
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import pytest
from conftest import dump, events_by_offset, integrity, raw, wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import eventlog
from eventlog import _core, _db
from eventlog._locks import QueuedLock

both_durabilities = pytest.mark.parametrize("durability", ["full", "normal"])


@both_durabilities
async def test_appends_return_strictly_increasing_offsets(log: Any, db_path: Path) -> None:
    offsets = [await log.append("t", {"i": i}) for i in range(20)]
    assert offsets == sorted(offsets) and len(set(offsets)) == 20
    assert await log.head() == offsets[-1]
    stored = events_by_offset(db_path)
    assert {o: stored[o][3] for o in offsets} == {o: {"i": i} for i, o in enumerate(offsets)}


async def test_offsets_grow_across_topics(log: Any) -> None:
    a = await log.append("a", 1)
    b = await log.append("b", 2)
    c = await log.append("a", 3)
    assert a < b < c


@both_durabilities
async def test_offsets_not_reused_after_topic_emptied(log: Any, db_path: Path) -> None:
    await log.append_many([eventlog.Draft("a", i) for i in range(5)])
    last_b = await log.append("b", "keep")
    with raw(db_path) as conn:
        conn.execute("DELETE FROM eventlog_events WHERE topic = 'a'")
    again = await log.append("a", "again")
    assert again > last_b
    assert await log.head() == again


@both_durabilities
async def test_offsets_not_reused_after_table_emptied(
    open_log: Any, db_path: Path, durability: str
) -> None:
    log = await open_log(durability=durability)
    offsets = await log.append_many([eventlog.Draft("a", i) for i in range(5)])
    await log.close()
    with raw(db_path) as conn:
        conn.execute("DELETE FROM eventlog_events")
        conn.execute("VACUUM")
    log = await open_log(durability=durability)  # a fresh process knows only the file
    assert await log.head() == offsets[-1]
    again = await log.append("a", "again")
    assert again > offsets[-1]
    # the same with the open log, the table emptied under it
    with raw(db_path) as conn:
        conn.execute("DELETE FROM eventlog_events")
    assert await log.append("b", "once more") > again


@both_durabilities
async def test_concurrent_appends_get_distinct_offsets_and_their_own_payloads(
    log: Any, db_path: Path
) -> None:
    # Group commit: 1,000 callers at once; each must get its own event's offset.
    payloads = [{"caller": i, "text": f"payload {i}"} for i in range(1000)]
    offsets = await asyncio.gather(
        *(log.append("t", p, key=str(i)) for i, p in enumerate(payloads))
    )
    assert len(set(offsets)) == 1000
    stored = events_by_offset(db_path)
    assert len(stored) == 1000
    for i, offset in enumerate(offsets):
        assert stored[offset][3] == payloads[i]
        assert stored[offset][2] == str(i)


@both_durabilities
async def test_concurrent_append_many_batches_stay_contiguous_and_ordered(
    log: Any, db_path: Path
) -> None:
    batches = [[eventlog.Draft("t", {"b": b, "j": j}) for j in range(7)] for b in range(50)]
    results = await asyncio.gather(*(log.append_many(batch) for batch in batches))
    stored = events_by_offset(db_path)
    for b, offsets in enumerate(results):
        assert offsets == list(range(offsets[0], offsets[0] + 7)), "a batch was interleaved"
        assert [stored[o][3] for o in offsets] == [{"b": b, "j": j} for j in range(7)]


async def test_append_many_of_nothing_writes_nothing(log: Any, db_path: Path) -> None:
    before = dump(db_path)
    assert await log.append_many([]) == []
    assert dump(db_path) == before


@both_durabilities
async def test_topic_counters_follow_appends(log: Any) -> None:
    await log.append_many([eventlog.Draft("a", i) for i in range(3)])
    last = await log.append("a", 3)
    await log.append("b", 0)
    info = {t.name: t for t in await log.topics()}
    assert info["a"].events == 4
    assert info["a"].last_offset == last
    assert info["a"].first_offset == 1
    assert info["b"].events == 1


async def test_event_fields_round_trip(log: Any) -> None:
    before_ms = eventlog_now_ms()
    offset = await log.append(
        "orders.eu", {"id": 7}, key="customer-1", headers={"trace": "abc", "ü": "ö"}
    )
    after_ms = eventlog_now_ms()
    event = await log.get(offset)
    assert event.offset == offset
    assert event.topic == "orders.eu"
    assert event.key == "customer-1"
    assert event.payload == {"id": 7}
    assert dict(event.headers) == {"trace": "abc", "ü": "ö"}
    assert before_ms <= event.timestamp_ms <= after_ms
    assert event.to_dict()["headers"] == {"trace": "abc", "ü": "ö"}
    assert await log.get(offset + 1000) is None


# Every combination of key and headers: each has its own INSERT (absent ones are NULL
# literals), alone and mixed in one batch, on one partition and on several.
SHAPES = [(None, None), (None, {"h": "1"}), ("k", None), ("k", {"h": "2", "ü": "ö"})]


@pytest.mark.parametrize("partitions", [1, 3])
async def test_every_key_and_headers_shape_round_trips(log: Any, partitions: int) -> None:
    await log.create_topic("shapes", partitions=partitions)
    lone = [
        await log.append("shapes", {"lone": i}, key=key, headers=headers)
        for i, (key, headers) in enumerate(SHAPES)
    ]
    alike = [
        await log.append_many(
            [eventlog.Draft("shapes", {"alike": i}, key=key, headers=headers)] * 3
        )
        for i, (key, headers) in enumerate(SHAPES)
    ]
    mixed = await log.append_many(
        [
            eventlog.Draft("shapes", {"mixed": i}, key=k, headers=h)
            for i, (k, h) in enumerate(SHAPES)
        ]
    )
    expected = {o: (SHAPES[i], {"lone": i}) for i, o in enumerate(lone)}
    expected |= {o: (SHAPES[i], {"alike": i}) for i, batch in enumerate(alike) for o in batch}
    expected |= {o: (SHAPES[i], {"mixed": i}) for i, o in enumerate(mixed)}
    for offset, ((key, headers), payload) in expected.items():
        event = await log.get(offset)
        assert (event.key, dict(event.headers), event.payload) == (key, headers or {}, payload)
        assert event.partition < partitions


def eventlog_now_ms() -> int:
    import time

    return time.time_ns() // 1_000_000


# -- dedupe keys -------------------------------------------------------------------------------


@both_durabilities
async def test_retried_append_with_same_dedupe_key_returns_first_offset(
    log: Any, db_path: Path
) -> None:
    first = await log.append("payments", {"amount": 5}, dedupe_key="pay-1")
    await log.append("payments", {"amount": 6})
    retry = await log.append("payments", {"amount": 5}, dedupe_key="pay-1")
    assert retry == first
    with raw(db_path) as conn:
        rows = conn.execute("SELECT id FROM eventlog_events WHERE dedupe_key = 'pay-1'").fetchall()
    assert rows == [(first,)]
    info = {t.name: t for t in await log.topics()}
    assert info["payments"].events == 2


@both_durabilities
async def test_dedupe_key_within_one_batch_stores_one_row(log: Any, db_path: Path) -> None:
    offsets = await log.append_many([
        eventlog.Draft("p", "a", dedupe_key="k1"),
        eventlog.Draft("p", "b"),
        eventlog.Draft("p", "a again", dedupe_key="k1"),
        eventlog.Draft("p", "c", dedupe_key="k2"),
    ])  # fmt: skip
    assert offsets[0] == offsets[2]
    assert len(set(offsets)) == 3
    stored = events_by_offset(db_path)
    assert len(stored) == 3
    assert stored[offsets[0]][3] == "a"


@both_durabilities
async def test_concurrent_appends_with_one_dedupe_key_share_one_offset(
    log: Any, db_path: Path
) -> None:
    offsets = await asyncio.gather(*(log.append("p", i, dedupe_key="same") for i in range(50)))
    assert len(set(offsets)) == 1
    assert len(events_by_offset(db_path)) == 1


async def test_dedupe_keys_are_per_topic(log: Any) -> None:
    a = await log.append("a", 1, dedupe_key="k")
    b = await log.append("b", 1, dedupe_key="k")
    assert a != b


async def test_dedupe_key_survives_reopen(open_log: Any, db_path: Path) -> None:
    log = await open_log()
    first = await log.append("p", 1, dedupe_key="k")
    await log.close()
    log = await open_log()
    assert await log.append("p", 1, dedupe_key="k") == first


# -- partitions --------------------------------------------------------------------------------


def partitions_of(db_path: Path, topic: str) -> dict[str | None, set[int]]:
    with raw(db_path) as conn:
        rows = conn.execute(
            "SELECT key, partition FROM eventlog_events WHERE topic = ?", (topic,)
        ).fetchall()
    out: dict[str | None, set[int]] = {}
    for key, partition in rows:
        out.setdefault(key, set()).add(partition)
    return out


async def test_same_key_always_lands_in_same_partition(open_log: Any, db_path: Path) -> None:
    log = await open_log()
    assert await log.create_topic("orders", 8) is True
    keys = [f"customer-{i}" for i in range(40)]
    for _ in range(3):
        await log.append_many([eventlog.Draft("orders", k, key=k) for k in keys])
    # another log instance (no shared cache) agrees
    other = await open_log()
    for k in keys:
        await other.append("orders", k, key=k)
    by_key = partitions_of(db_path, "orders")
    assert all(len(parts) == 1 for parts in by_key.values()), by_key
    assert len({p for parts in by_key.values() for p in parts}) > 1, "keys were not spread"


async def test_partition_of_a_key_is_crc32_modulo_partitions(log: Any, db_path: Path) -> None:
    # Pinned: changing the hash would move keys between partitions across an upgrade and
    # break per-key order for events already in the log.
    await log.create_topic("orders", 7)
    for key in ["a", "customer-42", "ü-ñ", "x" * 300]:
        offset = await log.append("orders", 0, key=key)
        event = await log.get(offset)
        assert event.partition == zlib.crc32(key.encode()) % 7


async def test_same_key_same_partition_across_processes(log: Any, db_path: Path, spawn) -> None:
    await log.create_topic("orders", 16)
    keys = [f"k{i}" for i in range(30)]
    mine = {k: (await log.get(await log.append("orders", 0, key=k))).partition for k in keys}
    env = dict(os.environ, PYTHONHASHSEED="12345")
    child = spawn(db_path, "serve", env=env)
    child.wait_ready()
    theirs = {
        k: child.request({"op": "append", "topic": "orders", "payload": 1, "key": k})["partition"]
        for k in keys
    }
    child.send({"op": "exit"})
    assert child.finish() == 0
    assert mine == theirs


@both_durabilities
async def test_keyless_events_spread_across_partitions(log: Any, db_path: Path) -> None:
    await log.create_topic("clicks", 4)
    await log.append_many([eventlog.Draft("clicks", i) for i in range(40)])
    for i in range(40):
        await log.append("clicks", i)
    with raw(db_path) as conn:
        counts = dict(conn.execute(
            "SELECT partition, count(*) FROM eventlog_events GROUP BY partition"
        ).fetchall())  # fmt: skip
    assert sorted(counts) == [0, 1, 2, 3]
    assert min(counts.values()) >= 10


@both_durabilities
async def test_create_topic_with_conflicting_partition_count_raises(
    log: Any, db_path: Path
) -> None:
    assert await log.create_topic("orders", 4) is True
    assert await log.create_topic("orders", 4) is False
    before = dump(db_path)
    with pytest.raises(eventlog.TopicConflict):
        await log.create_topic("orders", 8)
    with pytest.raises(eventlog.TopicConflict):
        await log.create_topic("orders", 4, exist_ok=False)
    assert dump(db_path) == before


async def test_topic_created_elsewhere_keeps_its_partition_count(
    open_log: Any, db_path: Path
) -> None:
    log = await open_log(default_partitions=2)
    other = await open_log()
    await other.create_topic("wide", 5)
    for i in range(20):
        await log.append("wide", i, key=f"k{i}")
    await log.append("narrow", 0)
    with raw(db_path) as conn:
        parts = dict(conn.execute("SELECT name, partitions FROM eventlog_topics").fetchall())
        used = {p for (p,) in conn.execute(
            "SELECT DISTINCT partition FROM eventlog_events WHERE topic = 'wide'"
        )}  # fmt: skip
    assert parts == {"wide": 5, "narrow": 2}
    assert used <= set(range(5)) and len(used) > 2
    with pytest.raises(eventlog.TopicConflict):
        await log.create_topic("wide", 2)


# -- durability and files ----------------------------------------------------------------------


async def test_database_and_sidecar_are_owner_only(open_log: Any, db_path: Path) -> None:
    old = os.umask(0)  # a permissive umask must not widen anything
    try:
        log = await open_log()
        await log.append("t", 1)
    finally:
        os.umask(old)
    writer = await open_log()  # the sync log's one thread will be busy following
    follower = log.read("t", start="latest", follow=True, idle_timeout=5)
    pending = asyncio.ensure_future(follower.__anext__())
    wake = log.paths.wake_folder
    try:
        await wait_until(lambda: any(wake.glob("*.sock")), what="the follower's wake socket")
        files = {
            db_path: 0o600,
            Path(f"{db_path}-wal"): 0o600,
            Path(f"{db_path}-shm"): 0o600,
            log.paths.sidecar: 0o700,
            wake: 0o700,
            log.paths.write_lock: 0o600,
        }
        files.update({sock: 0o600 for sock in wake.glob("*.sock")})
        for path, mode in files.items():
            assert stat.S_IMODE(path.stat().st_mode) == mode, f"{path} is {path.stat().st_mode:o}"
    finally:
        await writer.append("t", "release the follower")
        await asyncio.wait_for(pending, 10)
        await follower.aclose()


@both_durabilities
async def test_appends_wait_for_another_writer_then_all_commit(log: Any, db_path: Path) -> None:
    await log.append("t", "first")
    with raw(db_path) as conn:
        conn.execute("BEGIN IMMEDIATE")  # another connection holds SQLite's write lock
        try:
            tasks = [asyncio.ensure_future(log.append("t", i)) for i in range(20)]
            done, _ = await asyncio.wait(tasks, timeout=0.2)
            assert not done, "an append committed while another writer held the lock"
        finally:
            conn.execute("COMMIT")
    offsets = await asyncio.wait_for(asyncio.gather(*tasks), 20)
    stored = events_by_offset(db_path)
    assert [stored[o][3] for o in offsets] == list(range(20))
    assert len(set(offsets)) == 20


@pytest.mark.parametrize("durability", ["normal"])
async def test_sustained_appends_keep_the_wal_bounded(log: Any, db_path: Path) -> None:
    # One coroutine appending without pause: a checkpoint that waits for the event loop, or
    # for a quiet moment, never comes, and the WAL grew by a page or two per append (104 MiB
    # here). Held, it stays at SQLite's backstop, 16 MiB; the room above that is for
    # checkpoints a loaded machine delays.
    for i in range(12_000):
        await log.append("t", {"i": i, "pad": "x" * 200})
    wal = os.path.getsize(f"{db_path}-wal")
    assert wal < 40 * 2**20, f"the WAL grew to {wal / 2**20:.0f} MiB for ~4 MiB of events"


@pytest.mark.parametrize("flavor", ["sync"])
@pytest.mark.parametrize("durability", ["normal", "full"])
async def test_appenders_checkpoint_on_their_own_schedule(log: Any, db_path: Path) -> None:
    # SQLite's own checkpoint (inside the commit, holding the write lock, before the wake-ups
    # go out) is only a backstop at 4,096 pages, 16 MiB: the WAL staying far below that shows
    # the appender's own checkpoint, every CHECKPOINT_PAGES or so, runs. (The async shell at
    # `normal` commits on the loop thread and checkpoints on its worker, which a coroutine
    # appending without pause outruns: there the backstop is what holds, see above.)
    for i in range(3000):
        await log.append("t", {"i": i, "pad": "x" * 200})
    wal = os.path.getsize(f"{db_path}-wal")
    # Below the backstop's 16 MiB with room for a checkpoint thread slowed by a busy machine
    # (8.4 MiB seen with three test suites running beside this one).
    assert wal < 12 * 2**20, f"the WAL grew to {wal / 2**20:.1f} MiB"


@pytest.mark.skipif(not hasattr(fcntl, "F_OFD_SETLK"), reason="the tally is shared in write.queue")
def test_writers_in_step_checkpoint_on_the_pages_of_all_of_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Four writers (as four processes would be: each log has its own connection and locks)
    # take turns. The WAL holds all their commits: each counting only its own, none would
    # start a checkpoint before the WAL held 4 * CHECKPOINT_PAGES, into SQLite's backstop
    # inside a commit. What is checked is when a checkpoint is due, commit by commit, not the
    # WAL's size: that also depends on how soon a loaded machine runs the checkpoint thread.
    due_at: list[int] = []
    commits = 0
    tally = QueuedLock.tally_pages

    def counted(lock: QueuedLock, pages: int, limit: int) -> bool:
        nonlocal commits
        commits += 1
        due = tally(lock, pages, limit)
        if due:
            due_at.append(commits)
        return due

    monkeypatch.setattr(QueuedLock, "tally_pages", counted)
    db = tmp_path / "app.db"
    logs = [eventlog.open_sync(db, durability="normal") for _ in range(4)]
    try:
        for i in range(1500):
            for log in logs:
                log.append("t", {"i": i, "pad": "x" * 200})
    finally:
        for log in logs:
            log.close()
    every = _db.CHECKPOINT_PAGES // _db.wal_pages(1)  # commits of one event per checkpoint
    assert commits == 6000
    assert due_at, "no checkpoint was ever due"
    gaps = [b - a for a, b in zip([0, *due_at], due_at, strict=False)]
    # Counted apart, the first is due only at commit 4 * every - 3 (each writer's own every-th).
    assert max(gaps) <= every, f"checkpoints due at commits {due_at}"
    assert len(due_at) >= 6000 // every - 1


def test_the_checkpoint_bulk_runs_on_its_own_thread_and_the_appender_finishes_it(
    tmp_path: Path,
) -> None:
    # The append that makes a checkpoint due returns at once; once the thread has run the
    # bulk, the next commit is told to finish it (the frames committed meanwhile), once.
    with eventlog.open_sync(tmp_path / "app.db", durability="normal") as log:
        log.append_many([eventlog.Draft("t", {"i": i, "pad": "x" * 200}) for i in range(3000)])
        checkpointer = _db.Checkpointer(log.paths, "normal", 5000)
        writers = QueuedLock(log.paths.write_lock)
        writers.tally_pages(0, 1)  # the tally starts over
        try:
            assert not checkpointer.note_commit(1, writers)
            assert not checkpointer.running, "a thread before any checkpoint was due"
            assert not checkpointer.note_commit((_db.CHECKPOINT_PAGES - 2) * 16, writers)
            assert checkpointer.running
            deadline = time.monotonic() + 10
            while not checkpointer.note_commit(0, writers):
                assert time.monotonic() < deadline, "the checkpoint thread never finished"
                time.sleep(0.01)
            assert not checkpointer.note_commit(0, writers), "asked to finish the same one twice"
        finally:
            checkpointer.close()
            writers.close()
        with raw(log.paths.db) as conn:
            busy, frames, done = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        assert busy == 0 and frames == done


@pytest.mark.parametrize("durability", ["normal", "full"])
async def test_closing_a_log_stops_its_checkpoint_thread(log: Any) -> None:
    def checkpoint_threads() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == "eventlog-checkpoint"]

    before = checkpoint_threads()
    await log.append_many([eventlog.Draft("t", {"i": i, "pad": "x" * 200}) for i in range(20_000)])
    for i in range(10):
        await log.append("t", i)  # the batch made a checkpoint due: its thread is running
    assert len(checkpoint_threads()) == len(before) + 1
    await log.close()
    assert checkpoint_threads() == before


def test_without_a_thread_to_be_had_the_appender_checkpoints_inline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(thread: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", refuse)
    db = tmp_path / "app.db"
    with eventlog.open_sync(db, durability="normal") as log:
        for i in range(3000):
            log.append("t", {"i": i, "pad": "x" * 200})  # none fails: each one committed
        wal = os.path.getsize(f"{db}-wal")
    assert wal < 8 * 2**20, f"the WAL grew to {wal / 2**20:.1f} MiB"
    assert len(events_by_offset(db)) == 3000


def test_the_checkpoint_thread_never_creates_a_removed_database(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "app.db"
    with eventlog.open_sync(db, durability="normal") as log:
        log.append("t", 1)
        paths = log.paths
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    checkpointer = _db.Checkpointer(paths, "normal", 100)
    writers = QueuedLock(paths.write_lock)
    try:
        checkpointer.note_commit(_db.CHECKPOINT_PAGES * 16, writers)
        deadline = time.monotonic() + 10
        while "background checkpoint failed" not in caplog.text:
            assert time.monotonic() < deadline, "the checkpoint thread never tried"
            time.sleep(0.01)
    finally:
        checkpointer.close()
        writers.close()
    assert not db.exists()


def test_a_process_that_never_closed_its_log_still_exits(tmp_path: Path) -> None:
    # Closed by the garbage collector at interpreter exit, while the checkpoint thread lives:
    # on Pythons where daemon threads cannot run any more by then, waiting for it would hang
    # the process (3.11 here exits either way; the guard is for the others).
    script = (
        "import sys, eventlog\n"
        "LOG = eventlog.open_sync(sys.argv[1], durability='normal')\n"
        "LOG.append_many([eventlog.Draft('t', {'i': i, 'pad': 'x' * 200}) for i in range(20000)])\n"
        "for i in range(10):\n"
        "    LOG.append('t', i)\n"
    )
    command = [sys.executable, "-c", script, str(tmp_path / "app.db")]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert len(events_by_offset(tmp_path / "app.db")) == 20010


@pytest.mark.parametrize("durability", ["normal"])
async def test_batch_appenders_checkpoint_on_their_own_schedule(log: Any, db_path: Path) -> None:
    # A batch counts by the pages it writes, not as one commit: 25 MiB of events in 100
    # commits still checkpoint every few MiB, never waiting for the 16 MiB backstop. (The async
    # shell writes batches this big on its worker connection, whose SQLite checkpoint holds
    # the same bound; the sync shell's own schedule is what this catches.)
    for b in range(100):
        await log.append_many(
            [eventlog.Draft("t", {"b": b, "i": i, "pad": "x" * 200}) for i in range(1000)]
        )
    wal = os.path.getsize(f"{db_path}-wal")
    assert wal < 12 * 2**20, f"the WAL grew to {wal / 2**20:.1f} MiB"


@pytest.mark.parametrize("durability", ["normal"])
async def test_one_at_a_time_appends_fold_the_topic_count(log: Any, db_path: Path) -> None:
    # A lone append is one autocommit INSERT; the counter fold it makes due runs after it.
    for i in range(4200):
        await log.append("t", i)
    with raw(db_path) as conn:
        events, counted = conn.execute(
            "SELECT events, counted_through FROM eventlog_topics WHERE name = 't'"
        ).fetchone()
    assert counted >= 4096 and events == counted  # offsets 1..counted are all topic t
    assert [t.events for t in await log.topics()] == [4200]


async def test_appends_leave_the_file_intact(log: Any, db_path: Path) -> None:
    for i in range(10):
        await log.append_many([eventlog.Draft(f"t{i % 3}", {"i": i, "j": j}) for j in range(30)])
    assert integrity(db_path) == ["ok"]


# -- exact JSON round trips ------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=30,
)


def deep(value: Any, depth: int) -> Any:
    for i in range(depth):
        value = [value] if i % 2 else {"d": value}
    return value


def same(a: Any, b: Any) -> bool:
    """Equal in value and type (1 is not 1.0 is not True; -0.0 is not 0.0)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return math.copysign(1, a) == math.copysign(1, b) and a == b
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    return bool(a == b)


@both_durabilities
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(value=json_values | st.builds(deep, json_values, st.integers(0, 60)))
async def test_any_json_value_round_trips_exactly(log: Any, db_path: Path, value: Any) -> None:
    offset = await log.append("json", value)
    event = await log.get(offset)
    assert same(event.payload, value), (event.payload, value)
    read = [e async for e in log.read("json", start=offset, limit=1)]
    assert same(read[0].payload, value)
    with raw(db_path) as conn:
        (text,) = conn.execute(
            "SELECT payload FROM eventlog_events WHERE id = ?", (offset,)
        ).fetchone()
    assert same(json.loads(text), value)


@settings(max_examples=300, deadline=None)
@given(value=json_values | st.builds(deep, json_values, st.integers(0, 60)))
def test_the_kept_encoder_writes_what_json_dumps_writes(value: Any) -> None:
    # eventlog keeps one C encoder instead of json.dumps building one per call.
    expected = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    assert _core._encode(value) == expected


@pytest.mark.parametrize("value", [math.nan, -math.inf, {"a": {1, 2}}, [object()], b"bytes"])
def test_the_kept_encoder_refuses_what_json_dumps_refuses(value: Any) -> None:
    with pytest.raises((TypeError, ValueError)) as ours:
        _core._encode(value)
    with pytest.raises(type(ours.value)) as theirs:
        json.dumps(value, allow_nan=False)
    assert str(ours.value) == str(theirs.value)
