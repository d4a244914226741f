"""Child processes for scripts/bench.py: consumers, producers and followers.

Run as `python scripts/_bench_workers.py ROLE JSON`: ROLE names a function below, JSON its
arguments. A worker that must be ready before the parent goes on prints "READY" on stdout.
Results go to the JSON file named by the "out" argument (written at exit, SIGTERM included).
Every worker has a deadline of its own ("deadline_s"), so nothing outlives a parent that
died.

Clocks: delivery latency is `time.monotonic_ns()` on receipt minus the `ns` the producer put
in the payload just before its append call. CLOCK_MONOTONIC is one clock for every process
of a Linux host, so the two are comparable (and unlike the wall clock, never stepped).
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import resource
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import eventlog
from eventlog import _sql

PAD = "x" * 150
BUSY_TIMEOUT_MS = 10_000
RAW_PAGE = "SELECT id, payload FROM events WHERE topic = ? AND id > ? ORDER BY id LIMIT ?"
RAW_INSERT = "INSERT INTO events (topic, payload, created_at) VALUES (?, ?, ?)"
RAW_OFFSETS = (
    "CREATE TABLE IF NOT EXISTS offsets (grp TEXT NOT NULL, topic TEXT NOT NULL,"
    " pos INTEGER NOT NULL, PRIMARY KEY (grp, topic))"
)
RAW_START_OFFSET = "INSERT OR REPLACE INTO offsets (grp, topic, pos) VALUES (?, ?, 0)"
RAW_UPDATE_OFFSET = "UPDATE offsets SET pos = ? WHERE grp = ? AND topic = ?"


# -- helpers ----------------------------------------------------------------------------------


def status_kb(field: str) -> int | None:
    """A field of /proc/self/status in kB (VmRSS: resident now; VmHWM: its peak)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so the peak covers only what follows."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_before() -> dict[str, Any]:
    gc.collect()
    reset = reset_peak_rss()
    return {"rss_before_kb": status_kb("VmRSS"), "peak_reset": reset}


def cpu_s() -> float:
    """CPU seconds of this process so far, every thread."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def ready() -> None:
    sys.stdout.write("READY\n")
    sys.stdout.flush()


def finish(out: str, result: dict[str, Any]) -> None:
    result["peak_rss_kb"] = status_kb("VmHWM")
    result["rss_after_kb"] = status_kb("VmRSS")
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, out)


def raw_connect(path: str) -> sqlite3.Connection:
    """sqlite3 with eventlog's own pragmas at synchronous=NORMAL (as bench.raw_connect)."""
    conn = sqlite3.connect(path, isolation_level=None)
    for pragma in _sql.PRAGMAS:
        conn.execute(pragma.format(busy_timeout_ms=BUSY_TIMEOUT_MS, synchronous="NORMAL"))
    return conn


def on_sigterm(flag: Callable[[], None]) -> None:
    signal.signal(signal.SIGTERM, lambda *_: flag())


# -- eventlog consumer group member ------------------------------------------------------------


def w_consume(a: dict[str, Any]) -> None:
    """One member of group a["group"] on a["topic"], no-op async handler.

    Ends when `n` events were handled (n > 0; with `latency`, n stamped events), on SIGTERM,
    or at the deadline. `ready` prints READY once the member owns a lane; `lanes` prints
    "LANES k" whenever the number of lanes it owns changes."""

    async def main() -> dict[str, Any]:
        deadline = time.monotonic() + a["deadline_s"]
        n = int(a.get("n") or 0)
        want_latency = bool(a.get("latency"))
        count = 0
        first: int | None = None
        last: int | None = None
        lats: list[int] = []
        async with eventlog.open(a["path"], durability="normal") as log:
            consumer: eventlog.Consumer

            async def handler(event: eventlog.Event) -> None:
                nonlocal count, first, last
                now = time.monotonic_ns()
                if first is None:
                    first = now
                last = now
                count += 1
                if want_latency:
                    stamp = event.payload.get("ns") if isinstance(event.payload, dict) else None
                    if stamp is not None:
                        lats.append(now - stamp)
                        if n and len(lats) >= n:
                            consumer.stop()
                elif n and count >= n:
                    consumer.stop()

            consumer = log.consumer(
                a["group"], a["topic"], handler, batch_size=int(a.get("batch_size", 100)),
                start=a.get("start", "earliest"),
            )  # fmt: skip
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGTERM, consumer.stop)
            timed_out = False

            def expire() -> None:
                nonlocal timed_out
                timed_out = True
                consumer.stop()

            loop.call_at(loop.time() + max(0.0, deadline - time.monotonic()), expire)
            mem = memory_before()
            cpu0 = cpu_s()
            t0 = time.monotonic_ns()
            runner = asyncio.create_task(consumer.run(handle_signals=False))
            if a.get("ready"):
                while not consumer.owned_lanes and not runner.done():
                    await asyncio.sleep(0.005)
                ready()
            if a.get("lanes"):
                owned = -1
                while not runner.done():
                    if len(consumer.owned_lanes) != owned:
                        owned = len(consumer.owned_lanes)
                        sys.stdout.write(f"LANES {owned}\n")
                        sys.stdout.flush()
                    await asyncio.wait([runner], timeout=0.01)
            await runner
            t_end = time.monotonic_ns()
            cpu = cpu_s() - cpu0
        return {"cpu_s": cpu, "count": count, "t0_ns": t0, "first_ns": first, "last_ns": last,
                "end_ns": t_end, "lat_ns": lats, "timed_out": timed_out,
                "handled": consumer.stats.handled, "lanes_taken": consumer.stats.lanes_taken,
                **mem}  # fmt: skip

    finish(a["out"], asyncio.run(main()))


# -- raw sqlite3 references --------------------------------------------------------------------


def w_raw_catchup(a: dict[str, Any]) -> None:
    """The reference consumer: keyset pages of `page`, json.loads of every payload, then an
    UPDATE of the group's offsets row (its own transaction) per page; until a page is empty."""
    conn = raw_connect(a["path"])
    conn.execute(RAW_OFFSETS)
    topic, group, page = a["topic"], a["group"], int(a.get("page", 100))
    conn.execute(RAW_START_OFFSET, (group, topic))
    loads = json.loads
    mem = memory_before()
    t0 = time.monotonic_ns()
    position, count = 0, 0
    while True:
        rows = conn.execute(RAW_PAGE, (topic, position, page)).fetchall()
        if not rows:
            break
        for _id, payload in rows:
            loads(payload)
        count += len(rows)
        position = rows[-1][0]
        conn.execute(RAW_UPDATE_OFFSET, (position, group, topic))
    t1 = time.monotonic_ns()
    conn.close()
    finish(a["out"], {"count": count, "t0_ns": t0, "last_ns": t1, "end_ns": t1, **mem})


def w_raw_poll(a: dict[str, Any]) -> None:
    """The reference waiting consumer: SELECT a page, and sleep 1 ms whenever it is empty;
    an offsets UPDATE per non-empty page. Ends after n stamped events, SIGTERM or deadline."""
    conn = raw_connect(a["path"])
    conn.execute(RAW_OFFSETS)
    topic, group = a["topic"], a["group"]
    conn.execute(RAW_START_OFFSET, (group, topic))
    n = int(a.get("n") or 0)
    deadline = time.monotonic() + a["deadline_s"]
    stop = threading.Event()
    on_sigterm(stop.set)
    lats: list[int] = []
    position = 0
    loads = json.loads
    ready()
    while not stop.is_set() and time.monotonic() < deadline and not (n and len(lats) >= n):
        rows = conn.execute(RAW_PAGE, (topic, position, 100)).fetchall()
        if not rows:
            time.sleep(0.001)
            continue
        now = time.monotonic_ns()
        for _id, payload in rows:
            stamp = loads(payload).get("ns")
            if stamp is not None:
                lats.append(now - stamp)
        position = rows[-1][0]
        conn.execute(RAW_UPDATE_OFFSET, (position, group, topic))
    conn.close()
    finish(a["out"], {"count": len(lats), "lat_ns": lats})


# -- producers and followers -------------------------------------------------------------------


def w_produce(a: dict[str, Any]) -> None:
    """n events at `rate` per second, each stamped with monotonic_ns() just before its
    append: SyncLog.append (kind "ours") or an autocommit INSERT (kind "raw")."""
    n, rate, topic = int(a["n"]), float(a["rate"]), a["topic"]
    append: Callable[[dict[str, Any]], object]
    if a["kind"] == "ours":
        log = eventlog.open_sync(a["path"], durability="normal")
        append = lambda p: log.append(topic, p)  # noqa: E731
    else:
        conn = raw_connect(a["path"])
        append = lambda p: conn.execute(  # noqa: E731
            RAW_INSERT, (topic, json.dumps(p), time.time_ns() // 1_000_000)
        )
    clock = time.perf_counter
    start = clock() + 0.02
    late = 0
    for i in range(n):
        wait = start + i / rate - clock()
        if wait > 0:
            time.sleep(wait)
        elif wait < -0.002:
            late += 1
        append({"id": i, "ns": time.monotonic_ns(), "pad": PAD})
    if a["kind"] == "ours":
        log.close()
    else:
        conn.close()
    if a.get("out"):
        finish(a["out"], {"late": late, "seconds": clock() - start})


def w_follow(a: dict[str, Any]) -> None:
    """A `read(topic, follow=True)` follower (sync or async API) waiting until SIGTERM."""
    deadline = a["deadline_s"]
    if a["api"] == "sync":
        # the plain loop (no stop event: SIGTERM's default action ends the process)
        with eventlog.open_sync(a["path"], durability="normal") as log:
            events = log.read(a["topic"], follow=True, idle_timeout=deadline)
            ready()
            for _event in events:
                pass
        return

    async def main() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        async with eventlog.open(a["path"], durability="normal") as log:
            events = log.read(a["topic"], follow=True, stop=stop, idle_timeout=deadline)
            ready()
            async for _event in events:
                pass

    asyncio.run(main())


WORKERS: dict[str, Callable[[dict[str, Any]], None]] = {
    "consume": w_consume,
    "raw_catchup": w_raw_catchup,
    "raw_poll": w_raw_poll,
    "produce": w_produce,
    "follow": w_follow,
}


def main() -> None:
    role, args = sys.argv[1], json.loads(sys.argv[2])
    WORKERS[role](args)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
