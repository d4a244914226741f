"""Fixtures and helpers for the consumer-group tests.

Outcomes are checked with plain sqlite3 (`raw`, `position`, `lane_row`, `attempt_rows`), the
journal files written by `consumer_child.py` and the dead-letter file read as bytes, never
only through eventlog. Every wait polls a condition with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import queue
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import zlib
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import eventlog

HERE = Path(__file__).parent
CHILD = HERE / "consumer_child.py"
CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


# -- the sqlite3 oracle -----------------------------------------------------------------------


@contextlib.contextmanager
def raw(db: os.PathLike[str] | str, timeout: float = 10.0) -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(db, isolation_level=None, timeout=timeout)
    try:
        yield conn
    finally:
        conn.close()


def lane_row(db: Path, group: str, topic: str, partition: int = 0) -> tuple[Any, ...] | None:
    """(position, inflight_from, inflight_to) of a group's lane, or None."""
    with raw(db) as conn:
        return conn.execute(
            "SELECT position, inflight_from, inflight_to FROM eventlog_group_offsets"
            " WHERE group_name = ? AND topic = ? AND partition = ?",
            (group, topic, partition),
        ).fetchone()


def position(db: Path, group: str, topic: str, partition: int = 0) -> int | None:
    row = lane_row(db, group, topic, partition)
    return None if row is None else int(row[0])


def attempt_rows(db: Path, group: str | None = None) -> list[tuple[Any, ...]]:
    """(group, offset, attempts, error_type, error_message) rows of eventlog_attempts."""
    with raw(db) as conn:
        rows = conn.execute(
            "SELECT group_name, event_offset, attempts, error_type, error_message"
            " FROM eventlog_attempts ORDER BY group_name, event_offset"
        ).fetchall()
    return [r for r in rows if group is None or r[0] == group]


def log_events(db: Path, topic: str | None = None) -> list[tuple[Any, ...]]:
    """(offset, topic, partition, key, payload) of every stored event, in offset order."""
    with raw(db) as conn:
        rows = conn.execute(
            "SELECT id, topic, partition, key, payload FROM eventlog_events ORDER BY id"
        ).fetchall()
    return [(o, t, p, k, json.loads(v)) for o, t, p, k, v in rows if topic in (None, t)]


def lane_heads(db: Path, topic: str) -> dict[int, int]:
    with raw(db) as conn:
        rows = conn.execute(
            "SELECT partition, max(id) FROM eventlog_events WHERE topic = ? GROUP BY partition",
            (topic,),
        ).fetchall()
    return {int(p): int(o) for p, o in rows}


def caught_up(db: Path, group: str, topic: str) -> bool:
    """Every lane of the topic that has events is committed up to its last event."""
    heads = lane_heads(db, topic)
    return bool(heads) and all(position(db, group, topic, p) == o for p, o in heads.items())


def deadletter_path(db: Path) -> Path:
    return db.with_name(db.name + ".deadletter.jsonl")


def deadletter_lines(db: Path) -> list[bytes]:
    """The dead-letter file's lines as bytes (the last one without its newline, if torn)."""
    try:
        content = deadletter_path(db).read_bytes()
    except FileNotFoundError:
        return []
    lines = content.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return lines


def deadletter_entries(db: Path) -> list[dict[str, Any]]:
    out = []
    for line in deadletter_lines(db):
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out


def lock_is_free(path: Path) -> bool:
    """True if this process can take the flock right now (it is let go at once)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    finally:
        os.close(fd)


# -- waiting ----------------------------------------------------------------------------------


def wait_until(predicate: Callable[[], Any], timeout: float = 20.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(0.01)


async def until(predicate: Callable[[], Any], timeout: float = 20.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def running(consumer: eventlog.Consumer, timeout: float = 30.0) -> AsyncIterator[Any]:
    """Run an in-process consumer as a task; stop it and await its end (re-raising its
    failure) on the way out."""
    task = asyncio.create_task(consumer.run(handle_signals=False))
    try:
        await until(lambda: consumer.member_id is not None or task.done(), timeout, "consumer")
        yield task
    finally:
        consumer.stop()
        await asyncio.wait_for(task, timeout)


# -- other processes --------------------------------------------------------------------------

_APPEND_SCRIPT = """
import json, sys
import eventlog
with eventlog.open_sync(sys.argv[1]) as log:
    for item in json.loads(sys.argv[2]):
        print(log.append(item["topic"], item["payload"], key=item.get("key")), flush=True)
"""


def append_elsewhere(db: Path, items: list[dict[str, Any]], timeout: float = 60.0) -> list[int]:
    """Append [{"topic", "payload", "key"?}, ...] from another process; returns offsets."""
    done = subprocess.run(
        [sys.executable, "-c", _APPEND_SCRIPT, os.fspath(db), json.dumps(items)],
        capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return [int(x) for x in done.stdout.split()]


def read_journal(path: Path) -> list[dict[str, Any]]:
    try:
        content = path.read_bytes()
    except FileNotFoundError:
        return []
    records = []
    for line in content.split(b"\n"):
        if line.strip():
            with contextlib.suppress(ValueError):  # a line being written right now
                records.append(json.loads(line))
    return records


def calls(
    records: list[dict[str, Any]], phase: str = "start", **match: Any
) -> list[dict[str, Any]]:
    """The journal records of one phase whose fields equal `match`."""
    return [
        r for r in records
        if r.get("phase") == phase and all(r.get(k) == v for k, v in match.items())
    ]  # fmt: skip


def keys_by_partition(partitions: int, per_partition: int) -> dict[int, list[str]]:
    """Keys whose events land in each partition (crc32 % partitions, as eventlog does)."""
    found: dict[int, list[str]] = defaultdict(list)
    i = 0
    while any(len(found[p]) < per_partition for p in range(partitions)):
        key = f"k{i}"
        p = zlib.crc32(key.encode()) % partitions
        if len(found[p]) < per_partition:
            found[p].append(key)
        i += 1
    return found


def intervals(records: list[dict[str, Any]], ended: dict[int, float]) -> dict[int, list[tuple]]:
    """partition -> [(start, end, pid, offset)] of every handler call. A call its process
    did not finish (SIGKILLed, or os._exit in the handler) ends at max(start, ended[pid]),
    the time the kill was sent (or -inf): the process died after both, and nobody else
    could take the partition before it died."""
    open_calls: dict[tuple[int, int], dict[str, Any]] = {}
    found: dict[int, list[tuple]] = defaultdict(list)
    for r in records:
        if r["phase"] == "start":
            assert (r["pid"], r["partition"]) not in open_calls, f"two calls at once: {r}"
            open_calls[(r["pid"], r["partition"])] = r
        elif r["phase"] == "end":
            s = open_calls.pop((r["pid"], r["partition"]))
            assert s["offset"] == r["offset"]
            found[r["partition"]].append((s["mono"], r["mono"], r["pid"], r["offset"]))
    for (pid, partition), s in open_calls.items():
        assert pid in ended, f"call never ended in a live process: {s}"
        found[partition].append((s["mono"], max(s["mono"], ended[pid]), pid, s["offset"]))
    return found


def assert_one_owner_at_a_time(records: list[dict[str, Any]], ended: dict[int, float]) -> None:
    """No two processes ran handlers on one partition at overlapping times."""
    for partition, spans in intervals(records, ended).items():
        spans.sort()
        for i, (start, end, pid, offset) in enumerate(spans):
            for other in spans[i + 1 :]:
                if other[0] >= end:
                    break
                assert other[2] == pid, (
                    f"partition {partition}: pid {pid} handled {offset} during"
                    f" [{start}, {end}] while pid {other[2]} started {other[3]} at {other[0]}"
                )


def assert_key_order_of_first_deliveries(
    records: list[dict[str, Any]], db: Path, topic: str
) -> None:
    first_start: dict[int, float] = {}
    for r in calls(records, "start"):
        first_start.setdefault(r["offset"], r["mono"])
    by_key: dict[str, list[int]] = defaultdict(list)
    for offset, _, _, key, _ in log_events(db, topic):
        by_key[key].append(offset)
    for key, offsets in by_key.items():
        times = [first_start[o] for o in offsets]
        assert times == sorted(times), f"key {key}: first deliveries out of order"


class Member:
    """A running consumer_child.py. Its stdout lines arrive through a queue (a reader thread),
    so every read has a deadline; stderr goes to a file for failure messages."""

    def __init__(self, db: Path, journal: Path, *options: Any, stderr_path: Path) -> None:
        self.args = [os.fspath(db), os.fspath(journal), *map(str, options)]
        self.stderr_path = stderr_path
        with open(stderr_path, "ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, os.fspath(CHILD), *self.args],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
            )  # fmt: skip
        self.pid = self.proc.pid
        self.lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._pump, daemon=True, name=f"member-{self.pid}")
        self._reader.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.decode().rstrip("\n"))
        self.lines.put(None)

    @property
    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_line(self, expected: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(
                    f"member {self.pid} printed no {expected!r} in {timeout}s;"
                    f" stderr:\n{self.stderr}"
                ) from None
            if line is None:
                self.lines.put(None)
                self.proc.wait(timeout=10)
                raise AssertionError(
                    f"member {self.pid} ended (exit {self.proc.returncode}) before"
                    f" {expected!r}; stderr:\n{self.stderr}"
                )
            if line == expected:
                return

    def wait_ready(self, timeout: float = 30.0) -> None:
        self.wait_line("ready", timeout)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_exit(self, timeout: float = 30.0) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"member {self.pid} still running after {timeout}s; stderr:\n{self.stderr}"
            ) from None
        self._join()
        return code

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL and reap."""
        self.signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self._join()

    def _join(self) -> None:
        self._reader.join(timeout=10)
        if self.proc.stdout is not None:
            with contextlib.suppress(OSError):
                self.proc.stdout.close()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    # A short name: wake-up sockets live under <db>.d/wake and sockaddr_un is small.
    return tmp_path / "e.db"


@pytest.fixture
def journal(tmp_path: Path) -> Path:
    return tmp_path / "journal.jsonl"


@pytest.fixture
def members(tmp_path: Path) -> Iterator[Callable[..., Member]]:
    """Starts consumer_child.py members; SIGKILLs and reaps every one at teardown."""
    started: list[Member] = []

    def start(db: Path, journal: Path, *options: Any) -> Member:
        n = len(started)
        member = Member(db, journal, *options, stderr_path=tmp_path / f"member{n}.err")
        started.append(member)
        return member

    yield start
    for member in started:
        member.kill()
