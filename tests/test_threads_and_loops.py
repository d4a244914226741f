"""Threads, signals, event loops and cancellation around one log: a child forked while a thread
appends is refused at once, Ctrl-C in a contended append lets the lock go, close() from
another thread ends waits, a cancelled requeue lets the dead-letter lock go, an AsyncLog
closes on a later loop and never keeps the interpreter alive, and a follow iterator can go
on in another thread."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import eventlog
from eventlog._db import Paths
from eventlog._locks import FileLock, is_locked


def stored_events(db: Path) -> dict[int, Any]:
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        return {
            o: json.loads(p) for o, p in conn.execute("SELECT id, payload FROM eventlog_events")
        }
    finally:
        conn.close()


def run_script(script: str, *args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )  # fmt: skip


# -- a fork while another thread is inside SQLite -------------------------------------------------


@pytest.mark.timeout(60)
def test_a_child_forked_while_another_thread_appends_is_refused_without_hanging(
    tmp_path: Path,
) -> None:
    """A thread inside a SyncLog call holds SQLite's own mutexes when another thread forks;
    a child that opened its own connection could block on them for ever. It gets LogForked
    at once instead (the parent had the file open)."""
    db = tmp_path / "app.db"
    log = eventlog.open_sync(db, durability="normal")
    stop = threading.Event()

    def busy() -> None:
        while not stop.is_set():
            log.append("t", "busy")

    thread = threading.Thread(target=busy, daemon=True)
    thread.start()
    hung = forks = 0
    deadline = time.monotonic() + 15
    try:
        while time.monotonic() < deadline and not hung and forks < 200:
            forks += 1
            pid = os.fork()
            if pid == 0:  # pragma: no cover - child
                signal.signal(signal.SIGALRM, signal.SIG_DFL)
                signal.alarm(3)
                code = 1
                try:
                    log.append("t", "child")
                except eventlog.LogForked:
                    code = 0
                finally:
                    os._exit(code)
            _, status = os.waitpid(pid, 0)
            if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGALRM:
                hung += 1
            else:
                assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, "not refused"
    finally:
        stop.set()
        thread.join(10)
        log.close()
    assert hung == 0, f"a child forked while another thread appended hung (fork {forks})"


# -- Ctrl-C during a contended append -------------------------------------------------------------


@pytest.mark.timeout(40)
def test_ctrl_c_during_a_contended_append_lets_the_write_lock_go(tmp_path: Path) -> None:
    """A contended append waits for the flock in a helper thread; interrupted (Ctrl-C in a
    REPL, a notebook, a CLI that catches it and goes on), the helper must not take the lock
    when it frees and keep it for the life of the process (every other writer would then
    wait busy_timeout on each write)."""
    db = tmp_path / "app.db"
    eventlog.open_sync(db).close()
    paths = Paths.for_db(db)
    child = """
        import sys, time, eventlog
        log = eventlog.open_sync(sys.argv[1])
        print("ready", flush=True)
        try:
            log.append("t", "x")
            print("appended", flush=True)
        except KeyboardInterrupt:
            print("interrupted", flush=True)
        time.sleep(30)  # the process lives on (a REPL, a notebook, a CLI that caught ^C)
    """
    blocker = FileLock(paths.write_lock)
    assert blocker.acquire()
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(child), str(db)],
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.5)  # the append is now waiting for the write lock
        proc.send_signal(signal.SIGINT)
        assert proc.stdout.readline().strip() == "interrupted"
        blocker.release()
        blocker.close()
        time.sleep(0.5)
        assert not is_locked(paths.write_lock), (
            "the interrupted process still holds write.lock, though its append was abandoned"
        )
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


# -- close() from another thread ------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_close_from_another_thread_ends_blocked_waits(tmp_path: Path) -> None:
    """close() wakes the log's own waiters: a thread in wait_for(timeout=None) or
    read(follow=True) ends with LogClosed, where it used to wait for another process's
    commit."""
    db = tmp_path / "app.db"
    log = eventlog.open_sync(db)
    log.append("t", 1)
    outcome: dict[str, str] = {}

    def waiting() -> None:
        try:
            outcome["wait_for"] = repr(log.wait_for("t", timeout=None))
        except eventlog.LogClosed:
            outcome["wait_for"] = "LogClosed"
        except BaseException as exc:
            outcome["wait_for"] = repr(exc)

    def following() -> None:
        try:
            outcome["follow"] = repr([e.offset for e in log.read("t", follow=True)])
        except eventlog.LogClosed:
            outcome["follow"] = "LogClosed"
        except BaseException as exc:
            outcome["follow"] = repr(exc)

    threads = [threading.Thread(target=waiting, daemon=True),
               threading.Thread(target=following, daemon=True)]  # fmt: skip
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    log.close()
    for thread in threads:
        thread.join(3)
    stuck = [t for t in threads if t.is_alive()]
    seen = dict(outcome)
    if stuck:  # unstick them for the rest of the session: a commit from another log
        with eventlog.open_sync(db) as other:
            other.append("t", "wake")
        for thread in threads:
            thread.join(5)
    assert not stuck, f"{len(stuck)} thread(s) still waiting 3 s after close(); got {seen}"
    assert outcome == {"wait_for": "LogClosed", "follow": "LogClosed"}


# -- a cancelled requeue_dead_letters -------------------------------------------------------------


def make_dead_letter(db: Path) -> None:
    with eventlog.open_sync(db) as log:
        log.append("t", "poison")
        stop = threading.Event()

        def handler(event: eventlog.Event) -> None:
            raise ValueError("boom")

        thread = threading.Thread(target=lambda: log.consume(
            "g", "t", handler, max_attempts=1, stop=stop, handle_signals=False))  # fmt: skip
        thread.start()
        deadline = time.monotonic() + 10
        while not log.dead_letters().entries:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        stop.set()
        thread.join(10)


@pytest.mark.timeout(40)
async def test_a_cancelled_requeue_lets_the_dead_letter_lock_go(tmp_path: Path) -> None:
    """A requeue cancelled while its thread waits for the dead-letter file's lock: what the
    thread prepares (the lock, a temporary file) is dropped when it is done. Kept, every
    later dead-lettering, requeue or purge, in any process, would wait 10 s and fail."""
    db = tmp_path / "app.db"
    make_dead_letter(db)
    paths = Paths.for_db(db)
    other = FileLock(paths.deadletter_lock)  # another process's requeue, say, holds it
    assert other.acquire()
    async with eventlog.open(db) as log:
        task = asyncio.ensure_future(log.requeue_dead_letters(all=True))
        await asyncio.sleep(0.5)  # the requeue waits for the lock in its thread
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        other.release()
        other.close()
        await asyncio.sleep(1)
        leftovers = sorted(p.name for p in tmp_path.iterdir() if ".tmp-" in p.name)
        held = is_locked(paths.deadletter_lock)
    # Let the leaked descriptors go, so that the session's leak check blames this test only.
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{name}") == os.fspath(paths.deadletter_lock):
                os.close(int(name))
    assert not held, f"the cancelled requeue still holds the dead-letter lock (left {leftovers})"
    assert leftovers == []


# -- close() on a later event loop ----------------------------------------------------------------


@pytest.mark.timeout(40)
def test_an_async_log_closes_on_a_later_event_loop(tmp_path: Path) -> None:
    """Appends on one loop leave tasks of that loop behind (a checkpoint's rest); close() on
    a later loop does not wait for them (they can no longer run), and closes."""
    script = """
        import asyncio, os, sys, eventlog
        log = asyncio.run(eventlog.open(sys.argv[1]).__aenter__())
        async def appends():
            for i in range(600):
                await log.append("t", i)
        asyncio.run(appends())
        try:
            asyncio.run(log.close())
            print("closed", flush=True)
        except BaseException as exc:
            print(repr(exc), flush=True)
        os._exit(0)  # the half-closed log's worker thread would keep the process alive
    """
    proc = run_script(script, str(tmp_path / "app.db"))
    assert proc.stdout.strip() == "closed", proc.stdout + proc.stderr


# -- an AsyncLog never closed ---------------------------------------------------------------------


@pytest.mark.timeout(40)
def test_a_process_that_never_closed_its_async_log_still_exits(tmp_path: Path) -> None:
    """An AsyncLog still referenced at exit: the interpreter exits (aiosqlite's worker thread
    is made a daemon), as it does with a SyncLog
    (test_a_process_that_never_closed_its_log_still_exits)."""
    script = """
        import asyncio, sys, eventlog
        LOG = None
        async def main():
            global LOG
            LOG = await eventlog.open(sys.argv[1])
            await LOG.append("t", 1)
        asyncio.run(main())
        print("done", flush=True)
    """
    try:
        proc = run_script(script, str(tmp_path / "app.db"), timeout=15)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"the process hung at exit (stdout {exc.stdout!r})") from None
    assert proc.returncode == 0, proc.stderr


# -- a follow iterator handed to another thread ---------------------------------------------------


@pytest.mark.timeout(30)
def test_a_follow_iterator_goes_on_in_another_thread(tmp_path: Path) -> None:
    """SyncLog is for threads: a read(follow=True) iterator started in one thread goes on in
    another (its waiter's connection is not tied to the first)."""
    db = tmp_path / "app.db"
    log = eventlog.open_sync(db)
    log.append("t", 1)
    events = log.read("t", follow=True, idle_timeout=0.3)
    assert next(events).payload == 1
    outcome: list[object] = []

    def rest() -> None:
        try:
            outcome.append([e.payload for e in events])
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=rest)
    thread.start()
    thread.join(10)
    log.close()
    assert outcome == [[]]  # it went on, and ended at idle_timeout with nothing more
