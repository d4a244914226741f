"""Stopping around the process-wide handler gate: a consumer stopped while another group's
careful handler holds the gate, StopConsumer from a batch handler, and `eventlog consume`
whose output reader went away while its command ignores SIGPIPE. Outcomes are read with
plain sqlite3 where they concern the log."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

import eventlog
from eventlog._consumer import StopConsumer

HANG = 20.0  # seconds: only a hang detector, never a timing assertion


def _attempt_rows(db: Path) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT * FROM eventlog_attempts").fetchall()
    finally:
        conn.close()


def _position(db: Path, group: str, topic: str) -> int | None:
    conn = sqlite3.connect(db)
    try:
        row = conn.execute(
            "SELECT position FROM eventlog_group_offsets WHERE group_name = ? AND topic = ?",
            (group, topic),
        ).fetchone()
        return None if row is None else int(row[0])
    finally:
        conn.close()


# -- StopConsumer from a batch handler ---------------------------------------------------------


@pytest.mark.timeout(60)
def test_stop_consumer_from_a_batch_handler_stops_the_consumer_without_calling_it_again(
    tmp_path: Path,
) -> None:
    """StopConsumer: "no attempt is counted, the event stays unacknowledged, and the consumer
    stops". From a batch handler's batch call it is taken for an ordinary failure: the events
    are handed again one at a time, and a handler that said stop once is called again and the
    consumer goes on (here it handles and commits the whole batch)."""
    db = tmp_path / "e.db"
    with eventlog.open_sync(db) as log:
        log.append_many([eventlog.Draft("t", {"n": i}) for i in range(5)])
    calls: list[list[int]] = []

    async def batch_handler(events: list[eventlog.Event]) -> None:
        calls.append([e.offset for e in events])
        if len(calls) == 1:
            raise StopConsumer("the output went away")

    async def main() -> None:
        async with eventlog.open(db) as log:
            consumer = log.consumer("g", "t", batch_handler=batch_handler, retry_backoff=0)
            task = asyncio.create_task(consumer.run(handle_signals=False))
            done, _ = await asyncio.wait({task}, timeout=HANG)
            if not done:
                consumer.stop()
                await task
                return
            task.result()

    asyncio.run(main())
    assert calls == [[1, 2, 3, 4, 5]], f"the handler was called again after StopConsumer: {calls}"
    assert _position(db, "g", "t") in (None, 0)
    assert _attempt_rows(db) == []


# -- the process-wide handler gate -------------------------------------------------------------


@pytest.mark.timeout(60)
def test_stopping_one_consumer_does_not_wait_for_another_groups_careful_handler(
    tmp_path: Path,
) -> None:
    """One gate per process: while group A's event is in careful hands (exclusive), group
    B's lane waits at the gate. stop() of B must still end B: B has no event in hand. With the
    shared gate B's run() waits for A's handler, which may take as long as it likes (here until
    the test lets it go); before the change each consumer had its own gate."""
    db = tmp_path / "e.db"
    with eventlog.open_sync(db) as log:
        log.append("ta", {"poison": True})

    async def main() -> bool:
        a_careful = asyncio.Event()
        release_a = asyncio.Event()
        b_calls: list[int] = []
        a_calls = 0

        async def handle_a(event: eventlog.Event) -> None:
            nonlocal a_calls
            a_calls += 1
            if a_calls == 1:
                raise RuntimeError("fails once")
            a_careful.set()  # the second attempt runs alone (exclusive)
            await release_a.wait()

        async def handle_b(event: eventlog.Event) -> None:
            b_calls.append(event.offset)

        async with eventlog.open(db) as log:
            a = log.consumer("A", "ta", handle_a, retry_backoff=0)
            b = log.consumer("B", "tb", handle_b, retry_backoff=0)
            a_task = asyncio.create_task(a.run(handle_signals=False))
            b_task = asyncio.create_task(b.run(handle_signals=False))
            try:
                await asyncio.wait_for(a_careful.wait(), HANG)
                await log.append("tb", {"n": 1})
                # B fetches it and waits at the gate for A's careful attempt to end
                for _ in range(int(HANG / 0.05)):
                    if a._gate._waiters:
                        break
                    await asyncio.sleep(0.05)
                assert a._gate._waiters, "B's lane never waited at the gate"
                assert b_calls == []
                b.stop()
                done, _ = await asyncio.wait({b_task}, timeout=HANG)
                stopped = bool(done)
            finally:
                release_a.set()
                a.stop()
                b.stop()
                await asyncio.gather(a_task, b_task)
            return stopped

    assert asyncio.run(main()), (
        "consumer B's stop() did not end it while group A's event was in careful hands"
    )


# -- eventlog consume: the reader of stdout gone -----------------------------------------------


@pytest.mark.timeout(90)
def test_consume_stops_when_its_stdout_reader_is_gone_even_if_the_command_ignores_sigpipe(
    tmp_path: Path,
) -> None:
    """`eventlog consume g t -- CMD | head -1`: once head has gone, every command fails. A
    command killed by SIGPIPE stops the consumer (StopConsumer), but a command that ignores
    SIGPIPE (Python does) fails with EPIPE and a plain exit status: each event is then
    charged and, after --max-attempts, dead-lettered, one after another, for a reason that
    is no event's."""
    db = tmp_path / "e.db"
    with eventlog.open_sync(db) as log:
        log.append_many([eventlog.Draft("t", {"n": i}) for i in range(3)])
    script = "import sys; sys.stdout.write(sys.stdin.read()); sys.stdout.flush()"
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader (head) is gone
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "eventlog", "--db", str(db), "consume", "g", "t",
         "--max-attempts", "2", "--retry-backoff", "0", "--", sys.executable, "-c", script],
        stdin=subprocess.DEVNULL, stdout=write_end, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    os.close(write_end)
    deadletter = Path(str(db) + ".deadletter.jsonl")
    try:
        deadline = time.monotonic() + HANG
        while time.monotonic() < deadline and proc.poll() is None:
            if deadletter.exists() and deadletter.read_bytes().count(b"\n") >= 3:
                break
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.communicate(timeout=30)
    parked = deadletter.read_bytes().count(b"\n") if deadletter.exists() else 0
    assert parked == 0, f"{parked} events were dead-lettered because eventlog's stdout was gone"
