"""A connection must not cross fork(): the parent keeps working, a child reopens (SyncLog) or
refuses (AsyncLog), and the file stays intact whichever process exits first."""

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


def test_sync_log_keeps_working_in_parent_and_reopens_in_forked_child(db_path: Path) -> None:
    with eventlog.open_sync(db_path) as log:
        parent = [log.append("t", {"who": "parent", "i": i}) for i in range(10)]

        def child() -> dict[str, Any]:
            # The inherited log reopens its own connection on first use...
            inherited = [log.append("t", {"who": "inherited", "i": i}) for i in range(100)]
            seen = [e.offset for e in log.read("t")]
            # ...and the child can open the log itself, with either API.
            with eventlog.open_sync(db_path) as own:
                mine = [own.append("t", {"who": "own", "i": i}) for i in range(100)]

            async def async_appends() -> list[int]:
                async with eventlog.open(db_path) as alog:
                    return [await alog.append("t", {"who": "async", "i": i}) for i in range(50)]

            # In a thread: this forked copy of pytest may be inside a running event loop.
            box: list[list[int]] = []
            thread = threading.Thread(target=lambda: box.append(asyncio.run(async_appends())))
            thread.start()
            thread.join(30)
            log.close()  # closing the inherited log must not touch the parent's handles
            return {"inherited": inherited, "seen": seen, "own": mine, "async": box[0]}

        forked = run_in_child(child)
        # The parent keeps appending and reading while the child works.
        for i in range(10, 200):
            parent.append(log.append("t", {"who": "parent", "i": i}))
            if i % 50 == 0:
                seen = [e.offset for e in log.read("t")]
                assert seen == sorted(seen) and set(parent) <= set(seen)
        result = forked.result()
        parent += [log.append("t", {"who": "parent", "i": i}) for i in range(200, 210)]
        everything = [e.offset for e in log.read("t")]

    assert set(parent[:10]) <= set(result["seen"])
    stored = events_by_offset(db_path)
    expected = {o: ("parent", i) for i, o in enumerate(parent)}
    for who in ("inherited", "own", "async"):
        expected.update({o: (who, i) for i, o in enumerate(result[who])})
    assert len(expected) == len(parent) + 250, "an offset was handed out twice"
    assert sorted(expected) == sorted(stored) == everything
    for offset, (who, i) in expected.items():
        assert stored[offset][3] == {"who": who, "i": i}
    assert integrity(db_path) == ["ok"]


def test_forked_child_does_not_share_the_parents_handles(db_path: Path) -> None:
    with eventlog.open_sync(db_path) as log:
        log.append("t", 1)
        parent_conn = log._conn
        # The parent holds the write lock while the child starts. A child still using the
        # inherited descriptor would share the parent's flock (it belongs to the open file
        # description) and "get" it too: two writers at once.
        log._write_lock.acquire()
        try:

            def child() -> dict[str, Any]:
                head = log.head()  # first use in the child: reopens
                return {
                    "head": head,
                    "new_connection": log._conn is not parent_conn,
                    "lock_free_for_child": log._write_lock.acquire(blocking=False),
                }

            result = run_in_child(child).result()
        finally:
            log._write_lock.release()
        assert result == {"head": 1, "new_connection": True, "lock_free_for_child": False}
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
        assert "child" in hint
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
    assert integrity(db_path) == ["ok"]
    stored = events_by_offset(db_path)
    assert sorted(stored) == sorted(result["parent"] + result["child"])
    assert result["seen"] == sorted(result["parent"][:20] + result["child"])
    if result["parent_seen"] is not None:
        assert result["parent_seen"] == sorted(stored)
    for i, offset in enumerate(result["parent"]):
        assert stored[offset][3] == {"who": "parent", "i": i}
    for i, offset in enumerate(result["child"]):
        assert stored[offset][3] == {"who": "child", "i": i}
    with eventlog.open_sync(db_path) as log:
        assert log.append("forked", "again") > max(stored)


def test_children_forked_as_checkpoints_run_in_a_thread_work(db_path: Path) -> None:
    # A fork while the parent's checkpoint thread is inside SQLite would hand the child
    # SQLite's locks held by a thread the child does not have; fork waits for it to step out.
    # Each fork here comes right as a checkpoint falls due, with its thread starting on it.
    batch = [eventlog.Draft("t", {"pad": "x" * 200}) for _ in range(16_000)]
    with eventlog.open_sync(db_path, durability="normal") as log:
        for round_ in range(8):
            log.append_many(batch)

            def child(round_: int = round_) -> int:
                with eventlog.open_sync(db_path, durability="normal") as own:
                    own.append("t", {"child": round_})
                    own.checkpoint()
                offset = log.append("t", {"inherited": round_})
                log.close()
                return offset

            assert run_in_child(child, timeout=60).result() > 0
        assert sum(1 for _ in log.read("t")) == 8 * (16_000 + 2)
    assert integrity(db_path) == ["ok"]


def test_a_child_forked_while_another_thread_uses_the_log_can_use_it(db_path: Path) -> None:
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
            child = run_in_child(lambda: log.append("t", "from the child"), timeout=30)
            offset = child.result()
        finally:
            leave.set()
            thread.join(10)
        assert offset > 0
        assert [e.payload for e in log.read("t")] == ["first", "from the child"]
