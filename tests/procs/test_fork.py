"""A connection must not cross fork(): the parent keeps working; a child refuses the parent's
logs (LogForked), and new opens of a database its parent had open too (SQLite keeps one lock
table per process: a connection opened there would hold no lock, and lose what it commits);
the file stays intact whichever process exits first. A child of a parent with no log open
opens one as any process does."""

from __future__ import annotations

import asyncio
import json
import os
import select
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import events_by_offset, integrity

import eventlog
from eventlog import _locks


def run_in_child(body: Callable[[], Any], timeout: float = 60.0) -> Any:
    """fork(); run `body` in the child and return its JSON result to the parent.

    The child never returns into pytest: it reports through a pipe and leaves with _exit.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            os.close(r)
            try:
                data = {"ok": body()}
                code = 0
            except BaseException as exc:  # report everything, never unwind into pytest
                data = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
            os.write(w, json.dumps(data).encode())
        finally:
            os._exit(code)
    os.close(w)
    return ForkedChild(pid, r, timeout)


class ForkedChild:
    def __init__(self, pid: int, fd: int, timeout: float) -> None:
        self.pid, self.fd, self.deadline = pid, fd, time.monotonic() + timeout

    def result(self) -> Any:
        chunks = []
        try:
            while True:
                remaining = self.deadline - time.monotonic()
                ready, _, _ = select.select([self.fd], [], [], max(0.0, remaining))
                if not ready:
                    os.kill(self.pid, 9)
                    raise AssertionError("forked child did not answer in time")
                chunk = os.read(self.fd, 65536)
                if not chunk:
                    break
                chunks.append(chunk)
        finally:
            os.close(self.fd)
            self._reap()
        data = json.loads(b"".join(chunks) or b'{"error": "no output"}')
        assert "error" not in data, data.get("trace", data["error"])
        return data["ok"]

    def _reap(self) -> None:
        while time.monotonic() < self.deadline + 5:
            pid, _ = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return
            time.sleep(0.01)
        os.kill(self.pid, 9)
        os.waitpid(self.pid, 0)


def refusals(*attempts: Callable[[], Any]) -> list[str]:
    """The error type each attempt raised ("none" if it did not)."""
    seen = []
    for attempt in attempts:
        try:
            attempt()
            seen.append("none")
        except eventlog.EventlogError as exc:
            seen.append(type(exc).__name__)
    return seen


def test_a_forked_child_refuses_the_parents_log_and_new_opens_of_its_file(
    db_path: Path, tmp_path: Path
) -> None:
    with eventlog.open_sync(db_path) as log:
        parent = [log.append("t", {"who": "parent", "i": i}) for i in range(10)]

        def child() -> dict[str, Any]:
            async def async_open() -> None:
                async with eventlog.open(db_path):
                    pass

            # In a thread: this forked copy of pytest may be inside a running event loop.
            box: list[list[str]] = []
            thread = threading.Thread(
                target=lambda: box.append(refusals(lambda: asyncio.run(async_open())))
            )
            thread.start()
            thread.join(30)
            seen = refusals(
                lambda: log.append("t", {"who": "inherited"}),
                lambda: log.head(),
                lambda: eventlog.open_sync(db_path),
                lambda: eventlog.open_sync(db_path, durability="normal"),
            )
            # Another database file is nothing the parent had open.
            with eventlog.open_sync(tmp_path / "other.db") as other:
                other_offset = other.append("t", "from the child")
            log.close()  # closing the inherited log must not touch the parent's handles
            return {"seen": seen + box[0], "other": other_offset}

        forked = run_in_child(child)
        # The parent keeps appending and reading while the child works.
        for i in range(10, 200):
            parent.append(log.append("t", {"who": "parent", "i": i}))
        result = forked.result()
        parent += [log.append("t", {"who": "parent", "i": i}) for i in range(200, 210)]
        everything = [e.offset for e in log.read("t")]

    assert result == {"seen": ["LogForked"] * 5, "other": 1}
    stored = events_by_offset(db_path)
    assert sorted(stored) == everything == parent
    assert integrity(db_path) == ["ok"]


def test_a_child_never_commits_what_the_parent_closing_would_lose(db_path: Path) -> None:
    """The parent closes its log while its child lives: SQLite in the parent then takes itself
    for the last connection, checkpoints and deletes the WAL. A child that had opened its own
    connection (holding no real lock) was told an offset for an append that was lost, and the
    offset handed out again; now it cannot open one at all."""
    log = eventlog.open_sync(db_path)
    log.append("t", "parent")
    r, w = os.pipe()

    def child() -> list[str]:
        os.read(r, 1)  # the parent has closed its log
        return refusals(lambda: eventlog.open_sync(db_path).append("t", "child"))

    forked = run_in_child(child)
    log.close()
    os.write(w, b"x")
    os.close(r)
    os.close(w)
    assert forked.result() == ["LogForked"]
    with eventlog.open_sync(db_path) as again:
        assert again.append("t", "next") == 2
    assert [v[3] for v in events_by_offset(db_path).values()] == ["parent", "next"]


def test_a_child_of_a_parent_with_no_log_open_opens_one(db_path: Path) -> None:
    with eventlog.open_sync(db_path) as log:
        log.append("t", "before")

    def child() -> int:
        with eventlog.open_sync(db_path) as own:
            return own.append("t", "from the child")

    assert run_in_child(child).result() == 2
    with eventlog.open_sync(db_path) as log:
        assert [e.payload for e in log.read("t")] == ["before", "from the child"]


def test_a_child_refusing_never_touches_the_parents_handles(db_path: Path) -> None:
    with eventlog.open_sync(db_path) as log:
        log.append("t", 1)
        # The parent holds the write lock while the child starts. A child that unlocked or
        # closed the inherited descriptor would let it go for the parent too (a flock belongs
        # to the open file description).
        log._write_lock.acquire()
        try:

            def child() -> list[str]:
                seen = refusals(log.head)
                log.close()
                return seen

            assert run_in_child(child).result() == ["LogForked"]
            assert _locks.is_locked(log._write_lock.path)
        finally:
            log._write_lock.release()
        assert log.append("t", 2) == 2  # the parent's handles still work


async def test_async_log_refuses_use_in_forked_child(db_path: Path) -> None:
    async with eventlog.open(db_path) as log:
        first = await log.append("t", "before fork")

        def child() -> str:
            coro = log.append("t", "from child")
            try:
                coro.send(None)  # the check comes before any await
            except eventlog.LogForked as exc:
                return exc.hint
            finally:
                coro.close()
            raise AssertionError("an AsyncLog inherited through fork() appended")

        hint = run_in_child(child).result()
        assert "fork()" in hint
        after = await log.append("t", "after fork")
        assert [e.payload async for e in log.read("t")] == ["before fork", "after fork"]
        assert after == first + 1
    assert integrity(db_path) == ["ok"]


@pytest.mark.parametrize("order", ["parent-first", "child-first"])
def test_forked_child_exiting_normally_leaves_the_file_intact(
    db_path: Path, spawn, order: str
) -> None:
    # A real interpreter (not a forked pytest) so the child runs its normal shutdown,
    # finalising the connection objects it inherited.
    proc = spawn(db_path, "fork", json.dumps({"order": order}))
    proc.wait_ready(timeout=60)
    result = proc.json()
    assert proc.finish() == 0, proc.stderr
    assert result["status"] == 0
    assert result["child"] == ["LogForked", "LogForked"]
    assert integrity(db_path) == ["ok"]
    stored = events_by_offset(db_path)
    assert sorted(stored) == result["parent"]
    if result["parent_seen"] is not None:
        assert result["parent_seen"] == sorted(stored)
    for i, offset in enumerate(result["parent"]):
        assert stored[offset][3] == {"who": "parent", "i": i}
    with eventlog.open_sync(db_path) as log:
        assert log.append("forked", "again") > max(stored)


def test_children_forked_as_checkpoints_run_in_a_thread_work(db_path: Path, tmp_path: Path) -> None:
    # A fork while the parent's checkpoint thread is inside SQLite would hand the child
    # SQLite's locks held by a thread the child does not have; fork waits for it to step out.
    # Each fork here comes right as a checkpoint falls due, with its thread starting on it.
    batch = [eventlog.Draft("t", {"pad": "x" * 200}) for _ in range(16_000)]
    with eventlog.open_sync(db_path, durability="normal") as log:
        for round_ in range(8):
            log.append_many(batch)

            def child(round_: int = round_) -> list[Any]:
                with eventlog.open_sync(tmp_path / f"child{round_}.db") as own:
                    offset = own.append("t", {"child": round_})
                    own.checkpoint()
                seen = refusals(lambda: log.append("t", {"inherited": round_}))
                log.close()
                return [offset, *seen]

            assert run_in_child(child, timeout=60).result() == [1, "LogForked"]
        assert sum(1 for _ in log.read("t")) == 8 * 16_000
    assert integrity(db_path) == ["ok"]


def test_a_child_forked_while_another_thread_uses_the_log_refuses_it_at_once(
    db_path: Path,
) -> None:
    # A thread of the parent is inside a SyncLog call when another thread forks: the child's
    # copy of the log's mutex says held, by a thread the child does not have.
    with eventlog.open_sync(db_path) as log:
        log.append("t", "first")
        inside = threading.Event()
        leave = threading.Event()

        def busy_thread() -> None:
            with log._mutex:  # as a thread in the middle of an append holds it
                inside.set()
                leave.wait(30)

        thread = threading.Thread(target=busy_thread)
        thread.start()
        try:
            assert inside.wait(10)
            child = run_in_child(lambda: refusals(lambda: log.append("t", "child")), timeout=30)
            assert child.result() == ["LogForked"]
        finally:
            leave.set()
            thread.join(10)
        assert [e.payload for e in log.read("t")] == ["first"]
