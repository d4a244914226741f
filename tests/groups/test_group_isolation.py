"""Groups side by side and members joining: two groups in one process (a death in one is
never charged to the other), and a member joining a `latest` group after a matching topic
appeared. Outcomes are checked from journals the handlers write (fsynced) and the dead-letter
file read as bytes, never from eventlog's own view."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import eventlog

from .conftest import deadletter_entries, position, read_journal, wait_until

# One worker process running two consumers of two groups (a common shape: one service
# process handling "billing" and "audit"). Group A's handler dies (os._exit) on a poison
# event; group B's handler is slow and innocent. The process is restarted after each death.
TWO_GROUPS_CHILD = r"""
import asyncio, json, os, sys, threading, time
import eventlog

db, journal_path = sys.argv[1], sys.argv[2]
fd = os.open(journal_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
b_in_hand = threading.Event()

def journal(rec):
    rec["pid"] = os.getpid()
    rec["mono"] = time.monotonic()
    os.write(fd, (json.dumps(rec) + "\n").encode())
    os.fsync(fd)

async def handle_a(event):
    journal({"group": "A", "phase": "start", "offset": event.offset})
    if event.payload.get("do") == "exit":
        # The poison dies a moment into its call; group B's slow event is in hand meanwhile
        # (waited for, at most a few seconds, so the test does not hang on timing).
        await asyncio.to_thread(b_in_hand.wait, 5)
        journal({"group": "A", "phase": "exit", "offset": event.offset})
        os._exit(1)
    journal({"group": "A", "phase": "end", "offset": event.offset})

async def handle_b(event):
    journal({"group": "B", "phase": "start", "offset": event.offset})
    b_in_hand.set()
    await asyncio.sleep(1.5)
    b_in_hand.clear()
    journal({"group": "B", "phase": "end", "offset": event.offset})

async def main():
    async with eventlog.open(db) as log:
        a = log.consumer("A", "ta", handle_a, max_attempts=3, retry_backoff=0.01)
        b = log.consumer("B", "tb", handle_b, max_attempts=3, retry_backoff=0.01)
        await asyncio.gather(a.run(), b.run())

asyncio.run(main())
"""


@pytest.mark.timeout(120)
def test_a_poison_of_one_group_never_dead_letters_an_innocent_event_of_another_group_in_its_process(
    tmp_path: Path,
) -> None:
    db = tmp_path / "e.db"
    journal = tmp_path / "j.jsonl"
    with eventlog.open_sync(db) as log:
        poison = log.append("ta", {"do": "exit"})
        innocent = log.append_many([eventlog.Draft("tb", {"n": i}) for i in range(2)])

    def settled() -> bool:
        return (any(e["group"] == "A" for e in deadletter_entries(db))
                and position(db, "B", "tb") == innocent[-1])  # fmt: skip

    for run in range(8):
        proc = subprocess.Popen(
            [sys.executable, "-c", TWO_GROUPS_CHILD, os.fspath(db), os.fspath(journal)],
            stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            wait_until(lambda p=proc: p.poll() is not None or settled(), timeout=60,
                       what=f"run {run} to die or everything to settle")  # fmt: skip
        finally:
            if proc.poll() is None:
                proc.kill()
            _, err = proc.communicate(timeout=30)
        if settled():
            break
        assert proc.returncode == 1, f"run {run}: exit {proc.returncode}\n{err}"
    # The poison of group A ended as promised (guarantee 4)...
    parked_a = [e["offset"] for e in deadletter_entries(db) if e["group"] == "A"]
    assert parked_a == [poison]
    # ...but group B's events never failed: each call that ended, ended well, and none of
    # them ever caused a death (B's handler only sleeps). Dead-lettering one of them is
    # charging it with a death that was group A's.
    records = read_journal(journal)
    assert not [r for r in records if r["group"] == "B" and r["phase"] == "raise"]
    parked_b = [(e["offset"], e["error_type"], e["attempts"])
                for e in deadletter_entries(db) if e["group"] == "B"]  # fmt: skip
    assert parked_b == [], (
        f"innocent events {innocent} of group B were dead-lettered: {parked_b}; group A's "
        f"poison {poison} killed the process while they were in careful hands"
    )


@pytest.mark.timeout(120)
def test_a_topic_matching_the_pattern_of_a_running_latest_group_loses_nothing_when_a_member_joins(
    db: Path, journal: Path, members
) -> None:
    """start="latest": a topic created later that matches the pattern is consumed from its
    start (test_group_delivery pins that for one member). With two members, the lanes the
    newcomer is dealt start at the head when *it* started, so what the topic got while the
    group ran (before the newcomer) is never delivered to the group."""
    with eventlog.open_sync(db) as log:
        log.create_topic("orders.eu", partitions=1)
        log.append("orders.eu", {"before": True})  # history that "latest" skips
    first = members(db, journal, "--topic", "orders.*", "--start", "latest")
    first.wait_ready()
    # The running member is slow to look (a long pause on its loop, made certain here with
    # SIGSTOP): the new topic gets events before any member has a position in it.
    first.signal(signal.SIGSTOP)
    try:
        with eventlog.open_sync(db) as log:
            log.create_topic("orders.us", partitions=2)
            new = log.append_many(
                [eventlog.Draft("orders.us", {"n": i}, key=f"k{i}") for i in range(8)]
            )
        second = members(db, journal, "--topic", "orders.*", "--start", "latest")
        second.wait_ready()
    finally:
        first.signal(signal.SIGCONT)

    def delivered() -> set[int]:
        return {r["offset"] for r in read_journal(journal) if r["phase"] == "end"}

    try:
        wait_until(lambda: set(new) <= delivered(), timeout=20,
                   what="the new topic's events delivered")  # fmt: skip
    except AssertionError:
        missing = sorted(set(new) - delivered())
        heads = {p: position(db, "g", "orders.us", p) for p in (0, 1)}
        raise AssertionError(
            f"events {missing} of orders.us, appended while the group ran, were never "
            f"delivered; the group's positions in orders.us are {heads}"
        ) from None
