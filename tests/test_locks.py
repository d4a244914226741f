"""The writers' lock: the flock excludes, the queue in front of it orders, and nothing a queued
process does (dying, stopping, giving up) holds the others up for long."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from eventlog import _locks
from eventlog._locks import QueuedLock

pytestmark = pytest.mark.skipif(not hasattr(fcntl, "F_OFD_SETLK"), reason="no OFD locks: no queue")

# A child process that takes a ticket (so queues behind whoever holds the lock), says so, and
# then either waits or stops itself, holding its place.
QUEUED_CHILD = """
import os, signal, sys, time
from pathlib import Path
from eventlog._locks import QueuedLock
lock = QueuedLock(Path(sys.argv[1]))
assert lock._take_ticket() is not None
print("queued", flush=True)
if sys.argv[2] == "stop":
    os.kill(os.getpid(), signal.SIGSTOP)
time.sleep(600)
"""


@pytest.fixture
def lock_path(tmp_path: Path) -> Path:
    return tmp_path / "write.lock"


@contextmanager
def locks(path: Path, count: int, timeout: float = 30.0) -> Iterator[list[QueuedLock]]:
    """Separate locks on one file, as separate processes have (each its own descriptions)."""
    made = [QueuedLock(path, timeout=timeout) for _ in range(count)]
    try:
        yield made
    finally:
        for lock in made:
            lock.close()


@contextmanager
def queued_child(path: Path, then: str) -> Iterator[subprocess.Popen[str]]:
    command = [sys.executable, "-c", QUEUED_CHILD, str(path), then]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "queued"
        yield child
    finally:
        child.kill()
        child.wait(10)
        child.stdout.close()  # type: ignore[union-attr]


def acquire_in_thread(lock: QueuedLock, got: list[str], name: str) -> threading.Thread:
    """Take the lock on a thread, note it in `got`, hold it a moment and let it go."""

    def run() -> None:
        if lock.acquire():
            got.append(name)
            time.sleep(0.05)
            lock.release()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def wait_for_ticket(lock: QueuedLock, tickets: int) -> None:
    deadline = time.monotonic() + 10
    while _locks._read(lock._shared, _locks._NEXT) < tickets:  # type: ignore[arg-type]
        assert time.monotonic() < deadline, "the waiter never took a ticket"
        time.sleep(0.001)


def test_a_releasing_writer_queues_behind_the_one_already_waiting(
    lock_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A bare flock lets the releaser take the lock straight back, before the waiter it woke
    # gets a CPU: here the releaser's next acquire must wait its turn.
    monkeypatch.setattr(_locks, "QUEUE_PATIENCE", 600.0)
    with locks(lock_path, 2) as (first, second):
        got: list[str] = []
        assert first.acquire()
        waiter = acquire_in_thread(second, got, "second")
        wait_for_ticket(first, 1)
        first.release()
        assert first.acquire()
        got.append("first again")
        waiter.join(10)
        assert got == ["second", "first again"]
        first.release()


def test_a_writer_that_finds_others_queued_does_not_jump_the_queue(lock_path: Path) -> None:
    # The flock is free, but a writer holds a ticket (its turn come, about to take the flock):
    # a newcomer must not slip in ahead of it, even one that only tries.
    with locks(lock_path, 2) as (queued, newcomer):
        ticket = queued._take_ticket()
        assert ticket is not None
        assert not newcomer.acquire(blocking=False), "took the lock past a queued writer"
        queued._leave_queue(ticket, served=True)
        assert newcomer.acquire(blocking=False), "the queue did not empty"
        newcomer.release()


def test_one_flock_still_excludes_with_many_queued(lock_path: Path) -> None:
    inside = 0
    most = 0
    entered = 0
    guard = threading.Lock()

    def write(lock: QueuedLock) -> None:
        nonlocal inside, most, entered
        for _ in range(200):
            if not lock.acquire():
                return
            with guard:
                inside += 1
                entered += 1
                most = max(most, inside)
            time.sleep(0)
            with guard:
                inside -= 1
            lock.release()

    with locks(lock_path, 4) as all_locks:
        threads = [threading.Thread(target=write, args=(lock,)) for lock in all_locks]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
            assert not thread.is_alive(), "a writer never got the lock"
    assert entered == 4 * 200
    assert most == 1


def test_a_writer_killed_in_the_queue_holds_nobody_up(
    lock_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Patience far beyond the test: only the kernel dropping the dead one's place lets the
    # writer behind it through.
    monkeypatch.setattr(_locks, "QUEUE_PATIENCE", 600.0)
    with locks(lock_path, 2) as (holder, behind):
        assert holder.acquire()
        with queued_child(lock_path, "wait") as child:
            got: list[str] = []
            waiter = acquire_in_thread(behind, got, "behind")
            wait_for_ticket(holder, 2)
            os.kill(child.pid, signal.SIGKILL)
            child.wait(10)
            holder.release()
            waiter.join(10)
            assert got == ["behind"]


def test_a_writer_stopped_in_the_queue_costs_the_one_behind_it_its_patience_only(
    lock_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_locks, "QUEUE_PATIENCE", 0.2)
    with locks(lock_path, 2, timeout=60.0) as (behind, later), queued_child(lock_path, "stop"):
        started = time.monotonic()
        assert behind.acquire(), "waited out the whole timeout behind a stopped process"
        waited = time.monotonic() - started
        behind.release()
        assert later.acquire(blocking=False) or later.acquire()
        later.release()
    assert waited < 30, f"waited {waited:.1f}s"


def test_a_writer_that_gives_up_leaves_the_queue(
    lock_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_locks, "QUEUE_PATIENCE", 600.0)
    with locks(lock_path, 3) as (holder, impatient, patient):
        assert holder.acquire()
        assert not impatient.acquire(timeout=0.2)
        got: list[str] = []
        waiter = acquire_in_thread(patient, got, "patient")
        wait_for_ticket(holder, 2)
        holder.release()
        waiter.join(10)
        assert got == ["patient"], "the one that gave up still held its place"


def test_every_writer_adds_to_one_page_tally(lock_path: Path) -> None:
    # The WAL holds every writer's commits, so the checkpoint comes due on all of them together.
    with locks(lock_path, 2) as (one, other):
        assert not one.tally_pages(600, 1000)
        assert other.tally_pages(600, 1000), "each writer counted only its own pages"
        assert not one.tally_pages(600, 1000), "the tally did not start over"


def test_a_stuck_ticket_guard_only_costs_the_order(
    lock_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A process stopped inside the three calls that take a ticket keeps the guard: writers
    # then do without the queue, and still get the lock as soon as it is free.
    monkeypatch.setattr(_locks, "QUEUE_PATIENCE", 0.2)
    with locks(lock_path, 3, timeout=60.0) as (stopped, holder, writer):
        assert _locks._ofd_lock(stopped._queue, 0, fcntl.F_WRLCK)  # type: ignore[arg-type]
        for _ in range(2):
            assert holder.acquire()
            got: list[str] = []
            waiter = acquire_in_thread(writer, got, "writer")
            time.sleep(0.3)
            holder.release()
            waiter.join(30)
            assert got == ["writer"]


def test_a_forked_child_closing_its_copy_leaves_the_parent_holding(lock_path: Path) -> None:
    with locks(lock_path, 3) as (parent, queued, other):
        assert parent.acquire()
        ticket = queued._take_ticket()
        pid = os.fork()
        if pid == 0:  # the child: close the inherited locks, as a forked SyncLog does
            parent.close()
            queued.close()
            os._exit(0)
        assert os.waitpid(pid, 0)[1] == 0
        assert not other.acquire(blocking=False), "the child's close freed the parent's lock"
        parent.release()
        assert not other.acquire(blocking=False), "the child's close took the queued one's place"
        queued._leave_queue(ticket, served=True)
        assert other.acquire(blocking=False)
        other.release()
