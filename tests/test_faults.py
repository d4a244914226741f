"""The environment going wrong: a read-only file or folder, a full disk, a file replaced by
garbage or truncated, the sidecar folder deleted under running consumers, an unwritable
dead-letter file, lock files held by a foreign process, a payload at the size limit and one
byte over. Each gets a typed error with a hint, or recovers; nothing acknowledged is lost.

Outcomes are checked with plain sqlite3. Root ignores file modes, so as root the read-only
cases run in a child without CAP_DAC_OVERRIDE (`setpriv`); the full-disk case runs twice: on
SQLite's max_page_count (everywhere) and on a small tmpfs (where `mount` is allowed).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import eventlog
from eventlog import _core

ROOT = os.geteuid() == 0
SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
WORKER = SCRIPTS / "_chaos_worker.py"
TOPIC = "chaos.orders"  # the topic _chaos_worker.py consumers read


# -- helpers ----------------------------------------------------------------------------------


def rows(db: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True, timeout=10)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def events(db: Path) -> dict[int, Any]:
    return {o: json.loads(p) for o, p in rows(db, "SELECT id, payload FROM eventlog_events")}


def integrity(db: Path) -> str:
    return str(rows(db, "PRAGMA integrity_check")[0][0])


def digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def make_log(db: Path, n: int = 5, topic: str = "t") -> dict[int, Any]:
    with eventlog.open_sync(db) as log:
        acked = {log.append(topic, {"i": i}): {"i": i} for i in range(n)}
    return acked


def unprivileged() -> list[str]:
    """A command prefix under which file modes apply, even for root."""
    if not ROOT:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root and setpriv is missing: file modes cannot be enforced")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]


PROBE = textwrap.dedent(
    """
    import json, sys, eventlog
    out = {}
    def attempt(name, fn):
        try:
            out[name] = ["ok", fn()]
        except eventlog.EventlogError as exc:
            out[name] = [type(exc).__name__, str(exc), exc.hint]
    holder = {}
    attempt("open", lambda: holder.setdefault("log", eventlog.open_sync(sys.argv[1])) and None)
    log = holder.get("log")
    if log is not None:
        attempt("read", lambda: [e.payload for e in log.read("t")])
        attempt("append", lambda: log.append("t", {"i": 99}))
        log.close()
    print(json.dumps(out))
    """
)


def probe(db: Path, prefix: list[str]) -> dict[str, Any]:
    proc = subprocess.run([*prefix, sys.executable, "-c", PROBE, str(db)], capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)  # fmt: skip
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout))


# -- read-only --------------------------------------------------------------------------------


def test_read_only_database_file_reads_but_refuses_appends_with_a_hint(tmp_path: Path) -> None:
    db = tmp_path / "ro.db"
    acked = make_log(db)
    before = digest(db)
    db.chmod(0o400)
    try:
        out = probe(db, unprivileged())
    finally:
        db.chmod(0o600)
    assert out["open"][0] == "ok" and out["read"] == ["ok", list(acked.values())]
    kind, message, hint = out["append"]
    assert kind == "ReadOnlyDatabase", out
    assert "readonly" in message and "writable" in hint
    assert digest(db) == before
    assert events(db) == acked and integrity(db) == "ok"
    with eventlog.open_sync(db) as log:  # writable again: recovers
        log.append("t", {"i": 5})
    assert len(events(db)) == len(acked) + 1


def test_read_only_folder_refuses_to_open_with_a_hint_and_changes_nothing(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    db = folder / "app.db"
    acked = make_log(db)
    before = digest(db)
    folder.chmod(0o500)
    try:
        out = probe(db, unprivileged())
    finally:
        folder.chmod(0o700)
    assert out["open"][0] == "ReadOnlyDatabase", out
    assert "writable" in out["open"][2]
    assert digest(db) == before and events(db) == acked


def test_read_only_mount_refuses_to_open_with_a_hint(tmp_path: Path) -> None:
    data, view = tmp_path / "data", tmp_path / "view"
    data.mkdir()
    view.mkdir()
    acked = make_log(data / "app.db")
    if subprocess.run(["mount", "--bind", str(data), str(view)], capture_output=True).returncode:
        pytest.skip("cannot bind-mount here (needs root in a mount namespace that allows it)")
    try:
        remount = ["mount", "-o", "remount,ro,bind", str(view)]
        if subprocess.run(remount, capture_output=True).returncode:
            pytest.skip("cannot remount read-only here")
        with pytest.raises(eventlog.ReadOnlyDatabase) as info:
            eventlog.open_sync(view / "app.db")
        assert info.value.hint
    finally:
        subprocess.run(["umount", str(view)], check=True)
    assert events(data / "app.db") == acked


# -- full disk --------------------------------------------------------------------------------


def pin_size_plan() -> _core.Plan[int]:
    """Cap the database at its current size (max_page_count is per connection)."""
    pages = yield _core.Stmt("PRAGMA page_count")
    count = int(pages[0][0])
    yield _core.Stmt(f"PRAGMA max_page_count = {count}")
    return count


def unpin_size_plan() -> _core.Plan[None]:
    yield _core.Stmt("PRAGMA max_page_count = 1073741823")


def test_full_database_raises_disk_full_and_changes_nothing_sync(tmp_path: Path) -> None:
    db = tmp_path / "full.db"
    acked = make_log(db)
    with eventlog.open_sync(db) as log:
        log.run(pin_size_plan(), "none")
        with pytest.raises(eventlog.DiskFull) as info:
            log.append("t", {"big": "x" * 200_000})
        assert "free disk space" in info.value.hint
        with pytest.raises(eventlog.DiskFull):
            log.append_many([eventlog.Draft("t", {"big": "y" * 50_000}) for _ in range(4)])
        assert [e.payload for e in log.read("t")] == list(acked.values())
        log.run(unpin_size_plan(), "none")
        log.append("t", {"big": "x" * 200_000})  # space again: recovers
    got = events(db)
    assert {o: p for o, p in got.items() if o in acked} == acked and len(got) == len(acked) + 1
    assert integrity(db) == "ok"


async def test_full_database_raises_disk_full_and_changes_nothing_async(tmp_path: Path) -> None:
    db = tmp_path / "full.db"
    acked = make_log(db)
    async with eventlog.open(db, durability="full") as log:
        await log.run(pin_size_plan(), "none")
        results = await asyncio.gather(
            *(log.append("t", {"big": "x" * 100_000, "n": n}) for n in range(3)),
            return_exceptions=True,
        )
        assert all(isinstance(r, eventlog.DiskFull) for r in results), results
        assert [e.payload async for e in log.read("t")] == list(acked.values())
        await log.run(unpin_size_plan(), "none")
        await log.append("t", {"after": True})
    assert len(events(db)) == len(acked) + 1 and integrity(db) == "ok"


@contextlib.contextmanager
def small_filesystem(where: Path, size: str) -> Iterator[Path]:
    where.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                           str(where)], capture_output=True, text=True)  # fmt: skip
    if proc.returncode:
        pytest.skip(f"cannot mount a small tmpfs here: {proc.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_full_filesystem_raises_disk_full_keeps_acked_events_and_recovers(tmp_path: Path) -> None:
    with small_filesystem(tmp_path / "small", "3m") as fs:
        db = fs / "app.db"
        filler = fs / "filler"
        acked: dict[int, Any] = {}
        with eventlog.open_sync(db) as log:
            filler.write_bytes(b"\0" * (512 * 1024))
            error: eventlog.EventlogError | None = None
            for i in range(2000):  # bounded: 3 MiB cannot hold 2000 x 8 KiB
                try:
                    offset = log.append("t", {"i": i, "pad": "p" * 8000})
                except eventlog.EventlogError as exc:
                    error = exc
                    break
                acked[offset] = {"i": i, "pad": "p" * 8000}
            assert isinstance(error, eventlog.DiskFull), error
            assert error.hint and acked
            assert len(list(log.read("t"))) == len(acked)
            filler.unlink()  # space again
            offset = log.append("t", {"after": True})
            acked[offset] = {"after": True}
        assert events(db) == acked
        assert integrity(db) == "ok"


# -- a damaged or replaced file ---------------------------------------------------------------


def test_garbage_file_raises_not_an_eventlog_database_and_stays_untouched(tmp_path: Path) -> None:
    db = tmp_path / "garbage.db"
    db.write_bytes(b"this is not a database, just some text\n" * 300)
    before = digest(db)
    with pytest.raises(eventlog.NotAnEventlogDatabase) as info:
        eventlog.open_sync(db)
    assert "backup" in info.value.hint
    with pytest.raises(eventlog.NotAnEventlogDatabase):
        asyncio.run(eventlog.open(db).__aenter__())
    assert digest(db) == before


def test_binary_garbage_file_raises_not_an_eventlog_database(tmp_path: Path) -> None:
    db = tmp_path / "noise.db"
    db.write_bytes(bytes(range(256)) * 64)
    before = digest(db)
    with pytest.raises(eventlog.NotAnEventlogDatabase):
        eventlog.open_sync(db)
    assert digest(db) == before


@pytest.mark.parametrize("keep", [0.5, 0.1, 1000])
def test_truncated_file_gives_typed_errors_only(tmp_path: Path, keep: float) -> None:
    db = tmp_path / "cut.db"
    with eventlog.open_sync(db) as log:
        log.append_many([eventlog.Draft("t", {"i": i, "pad": "z" * 900}) for i in range(300)])
    size = db.stat().st_size
    with open(db, "r+b") as f:
        f.truncate(int(keep if keep > 1 else size * keep))
    typed: list[str] = []
    try:
        with eventlog.open_sync(db) as log:
            for step in (lambda: list(log.read("t")), lambda: log.append("t", 1),
                         lambda: log.topics()):  # fmt: skip
                try:
                    step()
                except eventlog.EventlogError as exc:
                    typed.append(type(exc).__name__)
                    assert exc.hint
    except eventlog.EventlogError as exc:
        typed.append(type(exc).__name__)
    assert typed, "a truncated file was read as if it were whole"
    assert set(typed) <= {"CorruptDatabase", "NotAnEventlogDatabase", "StorageError"}, typed


def test_database_replaced_while_a_reader_waits_raises_storage_error(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    make_log(db)
    other = tmp_path / "other.db"
    make_log(other, 2)
    result: list[Any] = []
    with eventlog.open_sync(db) as log:
        head = log.head()

        def wait() -> None:
            try:
                result.append(log.wait_for("t", after=head, timeout=30))
            except eventlog.EventlogError as exc:
                result.append(exc)

        waiter = threading.Thread(target=wait)
        waiter.start()
        time.sleep(1.0)  # let it start waiting: a waiter opened after the swap sees the new file
        os.replace(other, db)
        waiter.join(20)
        assert not waiter.is_alive(), "the waiter never noticed the file was replaced"
    assert isinstance(result[0], eventlog.StorageError), result
    assert "replaced" in str(result[0])


# -- the sidecar folder deleted under running consumers ---------------------------------------


def start_consumer(db: Path, journal: Path, group: str = "g1") -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, str(WORKER), "consumer", "--db", str(db), "--group", group, "--slot",
         "0", "--journal", str(journal)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def delivered(*journals: Path) -> set[int]:
    found: set[int] = set()
    for journal in journals:
        with contextlib.suppress(FileNotFoundError):
            for line in journal.read_text().splitlines():
                with contextlib.suppress(ValueError):
                    found.add(json.loads(line)["o"])
    return found


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def test_sidecar_deleted_while_consumers_run_loses_and_skips_nothing(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    j1, j2 = tmp_path / "c1.jsonl", tmp_path / "c2.jsonl"
    with eventlog.open_sync(db) as log:
        log.create_topic(TOPIC, 2)
        acked = [log.append(TOPIC, {"id": f"e{i}"}, key=f"k{i % 4}") for i in range(20)]
        first = start_consumer(db, j1)
        second: subprocess.Popen[bytes] | None = None
        try:
            wait_until(lambda: delivered(j1) >= set(acked), 30, "the first 20 deliveries")
            shutil.rmtree(db.with_name(db.name + ".d"))
            acked += [log.append(TOPIC, {"id": f"e{i}"}, key=f"k{i % 4}") for i in range(20, 40)]
            wait_until(lambda: delivered(j1) >= set(acked), 30,
                       "deliveries after the sidecar was deleted")  # fmt: skip
            second = start_consumer(db, j2)  # recreates the sidecar
            acked += [log.append(TOPIC, {"id": f"e{i}"}, key=f"k{i % 4}") for i in range(40, 60)]
            wait_until(lambda: delivered(j1, j2) >= set(acked), 30, "every delivery")
            assert first.poll() is None, first.stderr.read() if first.stderr else ""
        finally:
            for proc in (first, second):
                if proc is not None:
                    stop(proc)
                    if proc.stderr is not None:
                        proc.stderr.close()
    assert set(events(db)) == set(acked)
    heads = dict(rows(db, "SELECT partition, max(id) FROM eventlog_events GROUP BY 1"))
    positions = dict(rows(db, "SELECT partition, position FROM eventlog_group_offsets"
                              " WHERE group_name = 'g1'"))  # fmt: skip
    assert all(positions[p] >= h for p, h in heads.items()), (positions, heads)
    assert integrity(db) == "ok"


# -- the dead-letter file cannot be written ---------------------------------------------------


async def test_unwritable_dead_letter_file_never_moves_past_the_event(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    handled: list[int] = []
    async with eventlog.open(db) as log:
        ok1 = await log.append("t", {"poison": False})
        bad = await log.append("t", {"poison": True})
        ok2 = await log.append("t", {"poison": False})
        # a folder where the file should be: no user, root included, can append to it
        log.paths.deadletter.mkdir()

        def handler(event: eventlog.Event) -> None:
            if event.payload["poison"]:
                raise ValueError("poison")
            handled.append(event.offset)

        consumer = log.consumer("g", "t", handler, max_attempts=2, retry_backoff=0.01,
                                max_backoff=0.05)  # fmt: skip
        task = asyncio.create_task(consumer.run(handle_signals=False))
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:  # many dead-letter write attempts in this time
            pos = rows(db, "SELECT position FROM eventlog_group_offsets WHERE group_name='g'")
            assert not pos or pos[0][0] < bad, "the position moved past an event not parked"
            await asyncio.sleep(0.05)
        assert handled == [ok1] and not task.done()
        log.paths.deadletter.rmdir()  # writable again: it is parked, and the lane moves on
        for _ in range(200):
            if ok2 in handled:
                break
            await asyncio.sleep(0.05)
        consumer.stop()
        await asyncio.wait_for(task, 20)
    assert handled == [ok1, ok2]
    parked = [json.loads(line) for line in log.paths.deadletter.read_text().splitlines()]
    assert [p["offset"] for p in parked] == [bad]


# -- lock files held by a foreign process -----------------------------------------------------

HOLD = textwrap.dedent(
    """
    import fcntl, os, sys, time
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    print("ready", flush=True)
    time.sleep(120)
    """
)


@contextlib.contextmanager
def foreign_holder(path: Path) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE,
                            text=True, stdin=subprocess.DEVNULL)  # fmt: skip
    try:
        assert proc.stdout is not None
        ready = threading.Thread(target=proc.stdout.readline)
        ready.start()
        ready.join(20)
        assert not ready.is_alive(), "the lock holder never became ready"
        yield proc
    finally:
        proc.kill()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


def test_write_lock_held_by_a_foreign_process_delays_an_append_by_busy_timeout_only(
    tmp_path: Path,
) -> None:
    """The sidecar flock only shortens waits; a holder that never lets go (a stopped
    process) costs busy_timeout, then the append goes through on SQLite's own lock."""
    db = tmp_path / "app.db"
    acked = make_log(db)
    outcome: list[Any] = []
    with eventlog.open_sync(db, busy_timeout=1.0) as log:
        with foreign_holder(log.paths.write_lock):

            def append() -> None:
                try:
                    outcome.append(log.append("t", {"i": 99}))
                except eventlog.EventlogError as exc:
                    outcome.append(exc)

            worker = threading.Thread(target=append)
            worker.start()
            worker.join(6)  # busy_timeout is 1 s
            hung = worker.is_alive()
        worker.join(15)
        assert not hung, "append waited on a foreign lock holder far past busy_timeout"
        assert isinstance(outcome[0], int), outcome
        log.append("t", {"i": 100})
    assert len(events(db)) == len(acked) + 2


def test_lane_lock_held_by_a_foreign_process_is_skipped_until_it_dies(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    journal = tmp_path / "c.jsonl"
    with eventlog.open_sync(db) as log:
        log.create_topic(TOPIC, 2)
        acked = [log.append(TOPIC, {"id": f"e{i}"}, key=f"k{i}") for i in range(20)]
        lanes = {o: p for o, p in rows(db, "SELECT id, partition FROM eventlog_events")}
        lock = db.with_name(db.name + ".d") / "groups" / "g1" / "lanes" / f"{TOPIC}~0.lock"
        lock.parent.mkdir(parents=True, mode=0o700)
        consumer = start_consumer(db, journal)
        try:
            with foreign_holder(lock):
                free = {o for o in acked if lanes[o] == 1}
                wait_until(lambda: delivered(journal) >= free, 30, "the free lane's events")
                time.sleep(1.5)  # several rebalances: the held lane must stay untouched
                assert not delivered(journal) & {o for o in acked if lanes[o] == 0}
            wait_until(lambda: delivered(journal) >= set(acked), 30, "the freed lane's events")
        finally:
            stop(consumer)
            if consumer.stderr is not None:
                consumer.stderr.close()


# -- payload size at the limit ----------------------------------------------------------------


@pytest.mark.parametrize("unit", ["x", "é", "🎉"])
def test_payload_at_the_limit_round_trips_and_one_byte_over_is_refused(
    tmp_path: Path, unit: str
) -> None:
    db = tmp_path / "big.db"
    limit = eventlog.Limits().max_payload_bytes
    width = len(unit.encode())
    body = unit * ((limit - 2) // width)
    body += "x" * (limit - 2 - len(body.encode()))  # the JSON text: quotes + body = limit bytes
    assert len(json.dumps(body, ensure_ascii=False).encode()) == limit
    with eventlog.open_sync(db) as log:
        offset = log.append("t", body)
        event = log.get(offset)
        assert event is not None and event.payload == body
        before = (digest(db), digest(Path(str(db) + "-wal")))
        with pytest.raises(eventlog.PayloadTooLarge) as info:
            log.append("t", body + "x")
        assert f"{limit + 1} bytes" in str(info.value) and info.value.hint
        with pytest.raises(eventlog.PayloadTooLarge):
            log.append_many([eventlog.Draft("t", "small"), eventlog.Draft("t", body + "x")])
        assert (digest(db), digest(Path(str(db) + "-wal"))) == before
    assert list(events(db).values()) == [body]


def test_lock_files_never_touch_the_database_files(tmp_path: Path) -> None:
    """No flock on the database or its -wal/-shm (closing any descriptor of a file drops
    every POSIX lock on it): eventlog's own locks live in the sidecar."""
    db = tmp_path / "app.db"
    make_log(db)
    with eventlog.open_sync(db) as log:
        log.append("t", 1)
        for suffix in ("", "-wal", "-shm"):
            path = Path(str(db) + suffix)
            if path.exists():
                fd = os.open(path, os.O_RDONLY)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # nobody holds one
                    fcntl.flock(fd, fcntl.LOCK_UN)
                finally:
                    os.close(fd)
