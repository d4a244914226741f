#!/usr/bin/env python3
"""eventlog benchmarks: every figure of DESIGN.md "Performance targets", measured side by
side with its reference in one run, and printed as one table.

    python scripts/bench.py                 # every figure, 3 repetitions each
    python scripts/bench.py --quick         # small sizes, about three minutes
    python scripts/bench.py --only read,contention.full --repeat 5 --json out.json
    python scripts/bench.py --list          # the figure names --only accepts

The reference for every figure is raw `sqlite3` on a minimal table (id AUTOINCREMENT,
topic, payload, created_at) with exactly the connection settings eventlog uses
(eventlog._sql.PRAGMAS: WAL, the same `synchronous`, busy_timeout, ...), measured in the
same repetition as eventlog's figure; which of the two runs first alternates between
repetitions. Both sides do the same unavoidable work: events start as Python dicts and are
`json.dumps`ed inside the timed part; reads `json.loads` every payload.

Each figure is the median of `--repeat` repetitions with the min-max spread; the ratio is
the median of the per-repetition ratios (eventlog / reference). Every run works in a fresh
temporary directory, removed at the end (`--keep` keeps it). The script only prints: a
missed target is reported, never asserted.

Peers (persist-queue, litequeue, huey's SqliteStorage, Redis Streams against a redis-server
started here) run with their own defaults, as /work/shared/reference/peers_bench.py drove
them; each peer row is compared with the eventlog row doing the same work at the same
durability. A peer that is not installed is skipped with a note.

Adding a figure: write `def fig_x(ctx: Ctx) -> list[Sample]` (one repetition; use
`ctx.fresh()` for files and `paired()` to time eventlog and its reference) and append a
`Figure` to FIGURES. Move its placeholder out of NOT_MEASURED_YET when it lands.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import json
import math
import multiprocessing
import os
import platform
import queue
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import eventlog
from eventlog import _sql

T = TypeVar("T")
Unit = Literal["ev/s", "ms", "%", "MB"]
Durability = Literal["full", "normal"]

TOPIC = "bench"
PAD = "x" * 150  # json.dumps({"id": 12345, "ts": time.time(), "pad": PAD}) is 200 bytes
BATCH = 1000  # events per append_many call / per raw transaction
BUSY_TIMEOUT_MS = 10_000  # eventlog's default busy_timeout=10.0 s
CALLERS = 1000  # concurrent coroutines in the group-commit figure

RAW_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY AUTOINCREMENT,"
    " topic TEXT NOT NULL, payload TEXT NOT NULL, created_at INTEGER NOT NULL)"
)
RAW_INSERT = "INSERT INTO events (topic, payload, created_at) VALUES (?, ?, ?)"
RAW_PAGE = "SELECT id, payload FROM events WHERE topic = ? AND id > ? ORDER BY id LIMIT ?"


# -- sizes ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    batch: int  # events per repetition of the batched-append figure
    single_full: int  # one-at-a-time appends at synchronous=FULL
    single_normal: int  # ... at synchronous=NORMAL
    per_caller: int  # appends by each of the CALLERS coroutines
    read: int  # events in the log that is read back
    procs: int  # contending producer processes
    contend_full: int  # appends per producer process at FULL
    contend_normal: int  # ... at NORMAL
    peer_put: int  # one-at-a-time puts into a peer
    peer_consume: int  # events consumed one at a time from a peer (slow: O(backlog) each)
    peer_batch: int  # events in the peers' batched modes
    latency_s: float  # seconds of producing at LAT_RATE in the delivery-latency figure
    idle_s: float  # the idle-CPU window
    big: int  # events in the big log (built once per run)
    big_tail: int  # events consumed from its end, and in the small log it is compared with
    group_backlog: int  # events on the 6-partition topic the 3-process group consumes


FULL_SIZES = Sizes(
    batch=200_000,
    single_full=5_000,
    single_normal=20_000,
    per_caller=20,
    read=1_000_000,
    procs=4,
    contend_full=1_000,
    contend_normal=5_000,
    peer_put=10_000,
    peer_consume=5_000,
    peer_batch=100_000,
    latency_s=20.0,
    idle_s=10.0,
    big=10_000_000,
    big_tail=100_000,
    group_backlog=300_000,
)
QUICK_SIZES = Sizes(
    batch=20_000,
    single_full=1_000,
    single_normal=4_000,
    per_caller=5,
    read=100_000,
    procs=4,
    contend_full=300,
    contend_normal=1_000,
    peer_put=1_000,
    peer_consume=500,
    peer_batch=10_000,
    latency_s=5.0,
    idle_s=5.0,
    big=1_000_000,
    big_tail=100_000,
    group_backlog=60_000,
)


# -- results ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A DESIGN.md target: eventlog/reference >= value ("ratio"), eventlog <= value in ms
    ("max_ms") or in `unit` ("max"), or eventlog <= reference + value ("max_over_ref")."""

    kind: Literal["ratio", "max_ms", "max", "max_over_ref"]
    value: float
    proxy: bool = False  # the DESIGN target is for a related figure not measurable yet
    unit: str = ""  # for "max" and "max_over_ref"

    def describe(self) -> str:
        if self.kind == "ratio":
            text = f">= {self.value:g}x"
        elif self.kind == "max_ms":
            text = f"<= {self.value:g} ms"
        elif self.kind == "max":
            text = f"<= {self.value:g} {self.unit}"
        else:
            text = f"<= ref + {self.value:g} {self.unit}"
        return text + ("*" if self.proxy else "")

    def met(self, ours: float | None, ratio: float | None, ref: float | None) -> bool | None:
        if self.kind == "ratio":
            return None if ratio is None else ratio >= self.value
        if self.kind == "max_over_ref":
            return None if ours is None or ref is None else ours <= ref + self.value
        return None if ours is None else ours <= self.value


@dataclass
class Sample:
    """One metric of one repetition: eventlog's value and its reference's."""

    key: str
    label: str
    unit: Unit
    ours: float | None
    ref: float | None
    target: Target | None = None
    note: str = ""


@dataclass
class PeerSample:
    """One peer metric of one repetition, and eventlog doing the same work beside it."""

    key: str
    label: str
    peer: float
    ours: float
    ours_label: str
    note: str = ""


class Skipped(Exception):
    """A figure that cannot run here (a peer not installed); reported, not an error."""


@dataclass
class Ctx:
    """What a figure's repetition gets: sizes, a folder of its own, shared setup data."""

    sizes: Sizes
    run_root: Path
    folder: Path
    durability: Durability
    rep: int
    shared: dict[str, Any]
    cleanup: ExitStack

    def fresh(self, name: str) -> Path:
        """A new empty folder for this repetition."""
        path = self.folder / name
        path.mkdir(parents=True, exist_ok=False)
        return path

    def once(self, key: str, make: Callable[[], T]) -> T:
        """Setup shared by every repetition (and figure) of this run, made on first use."""
        if key not in self.shared:
            self.shared[key] = make()
        return self.shared[key]  # type: ignore[no-any-return]


def paired(ctx: Ctx, ours: Callable[[], T], ref: Callable[[], T]) -> tuple[T, T]:
    """Measure eventlog and its reference; which goes first alternates between repetitions."""
    if ctx.rep % 2:
        r = ref()
        return ours(), r
    o = ours()
    return o, ref()


# -- helpers ----------------------------------------------------------------------------------


def make_payloads(n: int, start: int = 0) -> list[dict[str, Any]]:
    ts = time.time()
    return [{"id": start + i, "ts": ts, "pad": PAD} for i in range(n)]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def open_sync(path: Path | str, durability: Durability) -> eventlog.SyncLog:
    return eventlog.open_sync(str(path), durability=durability)


def raw_connect(path: Path, durability: str) -> sqlite3.Connection:
    """A plain sqlite3 connection with eventlog's own pragmas, and the minimal table."""
    conn = sqlite3.connect(path, isolation_level=None)
    for pragma in _sql.PRAGMAS:
        sql = pragma.format(busy_timeout_ms=BUSY_TIMEOUT_MS, synchronous=durability.upper())
        conn.execute(sql).fetchall()
    conn.execute(RAW_SCHEMA)
    return conn


def rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of a sorted list."""
    k = max(0, min(len(sorted_values) - 1, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[k]


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- measurements shared by figures and peers -------------------------------------------------


def ours_single(path: Path, durability: Durability, payloads: list[dict[str, Any]]) -> float:
    """SyncLog.append, one event per call."""
    with open_sync(path, durability) as log:
        log.append(TOPIC, {"warm": True})  # creates the topic before timing
        gc.collect()
        t0 = time.perf_counter()
        for p in payloads:
            log.append(TOPIC, p)
        return rate(len(payloads), time.perf_counter() - t0)


def raw_single(path: Path, durability: Durability, payloads: list[dict[str, Any]]) -> float:
    """One autocommit INSERT per event: the physical limit for one event per transaction."""
    conn = raw_connect(path, durability)
    try:
        gc.collect()
        t0 = time.perf_counter()
        for p in payloads:
            conn.execute(RAW_INSERT, (TOPIC, json.dumps(p), now_ms()))
        return rate(len(payloads), time.perf_counter() - t0)
    finally:
        conn.close()


def ours_batches(
    path: Path, durability: Durability, payloads: list[dict[str, Any]], per_call: int
) -> float:
    """SyncLog.append_many of `per_call` Drafts per call."""
    with open_sync(path, durability) as log:
        log.append(TOPIC, {"warm": True})
        gc.collect()
        t0 = time.perf_counter()
        for i in range(0, len(payloads), per_call):
            log.append_many([eventlog.Draft(TOPIC, p) for p in payloads[i : i + per_call]])
        return rate(len(payloads), time.perf_counter() - t0)


def raw_batches(
    path: Path, durability: Durability, payloads: list[dict[str, Any]], per_call: int
) -> float:
    """executemany of `per_call` rows in one BEGIN IMMEDIATE transaction."""
    conn = raw_connect(path, durability)
    try:
        gc.collect()
        t0 = time.perf_counter()
        for i in range(0, len(payloads), per_call):
            ts = now_ms()
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(
                RAW_INSERT, [(TOPIC, json.dumps(p), ts) for p in payloads[i : i + per_call]]
            )
            conn.execute("COMMIT")
        return rate(len(payloads), time.perf_counter() - t0)
    finally:
        conn.close()


def fill_ours(path: Path, n: int) -> None:
    """n events in an eventlog file (setup, not timed)."""
    with open_sync(path, "normal") as log:
        for start in range(0, n, BATCH):
            chunk = make_payloads(min(BATCH, n - start), start)
            log.append_many([eventlog.Draft(TOPIC, p) for p in chunk])
        log.checkpoint()


def fill_raw(path: Path, n: int) -> None:
    conn = raw_connect(path, "normal")
    try:
        for start in range(0, n, BATCH):
            chunk = make_payloads(min(BATCH, n - start), start)
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(RAW_INSERT, [(TOPIC, json.dumps(p), now_ms()) for p in chunk])
            conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    finally:
        conn.close()


def read_ours_sync(path: Path, page: int) -> tuple[float, int]:
    """Iterate log.read(topic) over the whole log; (events/s, events read)."""
    with open_sync(path, "normal") as log:
        gc.collect()
        got = 0
        t0 = time.perf_counter()
        for _event in log.read(TOPIC, page=page):
            got += 1
        return rate(got, time.perf_counter() - t0), got


def read_ours_async(path: Path, page: int) -> tuple[float, int]:
    async def main() -> tuple[float, int]:
        async with eventlog.open(path, durability="normal") as log:
            gc.collect()
            got = 0
            t0 = time.perf_counter()
            async for _event in log.read(TOPIC, page=page):
                got += 1
            return rate(got, time.perf_counter() - t0), got

    return asyncio.run(main())


def read_raw(path: Path, page: int) -> tuple[float, int]:
    """Keyset pages, each its own short read transaction, json.loads of every payload."""
    conn = raw_connect(path, "normal")
    try:
        gc.collect()
        got, position = 0, 0
        loads = json.loads
        t0 = time.perf_counter()
        while True:
            rows = conn.execute(RAW_PAGE, (TOPIC, position, page)).fetchall()
            if not rows:
                break
            for _offset, payload in rows:
                loads(payload)
            got += len(rows)
            position = rows[-1][0]
        return rate(got, time.perf_counter() - t0), got
    finally:
        conn.close()


# -- figures: appends -------------------------------------------------------------------------


def single_count(ctx: Ctx) -> int:
    return ctx.sizes.single_full if ctx.durability == "full" else ctx.sizes.single_normal


def fig_batch_append(ctx: Ctx) -> list[Sample]:
    d = ctx.durability
    payloads = make_payloads(ctx.sizes.batch)
    o, r = paired(
        ctx,
        lambda: ours_batches(ctx.fresh("ours") / "log.db", d, payloads, BATCH),
        lambda: raw_batches(ctx.fresh("raw") / "raw.db", d, payloads, BATCH),
    )
    label = f"batched append, 1,000/call [{d}]"
    return [Sample(f"batch_append.{d}", label, "ev/s", o, r, Target("ratio", 0.7))]


def fig_single_sync(ctx: Ctx) -> list[Sample]:
    d = ctx.durability
    payloads = make_payloads(single_count(ctx))
    o, r = paired(
        ctx,
        lambda: ours_single(ctx.fresh("ours") / "log.db", d, payloads),
        lambda: raw_single(ctx.fresh("raw") / "raw.db", d, payloads),
    )
    label = f"single append, sync API [{d}]"
    return [Sample(f"single_sync.{d}", label, "ev/s", o, r, Target("ratio", 0.7))]


def floor_single(path: Path, payloads: list[dict[str, Any]]) -> float:
    """The floor of a durable one-event append on eventlog's schema: its own INSERT committed
    at NORMAL, then one fdatasync of the WAL, and nothing else (no lock, note, wake-up or
    checks). No implementation of the same schema and guarantee can be faster."""
    with open_sync(path, "normal") as log:
        log.append(TOPIC, {"warm": True})  # the schema and the topic
    conn = sqlite3.connect(path, isolation_level=None)
    wal = -1
    try:
        for pragma in _sql.PRAGMAS:
            conn.execute(pragma.format(busy_timeout_ms=BUSY_TIMEOUT_MS, synchronous="NORMAL"))
        wal = os.open(f"{path}-wal", os.O_RDWR)
        insert = _sql.INSERT_EVENT[0]  # no key, no headers
        gc.collect()
        t0 = time.perf_counter()
        for p in payloads:
            conn.execute(insert, (TOPIC, 0, json.dumps(p), now_ms()))
            os.fdatasync(wal)
        return rate(len(payloads), time.perf_counter() - t0)
    finally:
        if wal >= 0:
            os.close(wal)
        conn.close()


def fig_single_floor(ctx: Ctx) -> list[Sample]:
    payloads = make_payloads(ctx.sizes.single_full)
    o, r = paired(
        ctx,
        lambda: floor_single(ctx.fresh("floor") / "log.db", payloads),
        lambda: raw_single(ctx.fresh("raw") / "raw.db", "full", payloads),
    )
    label = "floor: eventlog's INSERT + one fdatasync [full]"
    note = "no target: what any one-at-a-time append at full on this schema can reach"
    return [Sample("single_floor.full", label, "ev/s", o, r, None, note)]


def fig_single_async(ctx: Ctx) -> list[Sample]:
    d = ctx.durability
    payloads = make_payloads(single_count(ctx))

    async def ours(path: Path) -> float:
        async with eventlog.open(path, durability=d) as log:
            await log.append(TOPIC, {"warm": True})
            gc.collect()
            t0 = time.perf_counter()
            for p in payloads:
                await log.append(TOPIC, p)
            return rate(len(payloads), time.perf_counter() - t0)

    o, r = paired(
        ctx,
        lambda: asyncio.run(ours(ctx.fresh("ours") / "log.db")),
        lambda: raw_single(ctx.fresh("raw") / "raw.db", d, payloads),
    )
    label = f"single append, async, awaited [{d}]"
    return [Sample(f"single_async.{d}", label, "ev/s", o, r, Target("ratio", 0.5))]


def fig_group_commit(ctx: Ctx) -> list[Sample]:
    d = ctx.durability
    per_caller = ctx.sizes.per_caller
    payloads = make_payloads(CALLERS * per_caller)

    async def ours(path: Path) -> float:
        async with eventlog.open(path, durability=d) as log:
            await log.append(TOPIC, {"warm": True})

            async def caller(k: int) -> None:
                for p in payloads[k * per_caller : (k + 1) * per_caller]:
                    await log.append(TOPIC, p)

            gc.collect()
            t0 = time.perf_counter()
            await asyncio.gather(*(caller(k) for k in range(CALLERS)))
            return rate(len(payloads), time.perf_counter() - t0)

    o, r = paired(
        ctx,
        lambda: asyncio.run(ours(ctx.fresh("ours") / "log.db")),
        lambda: raw_single(ctx.fresh("raw") / "raw.db", d, payloads[: single_count(ctx)]),
    )
    # DESIGN sets the group-commit target at `full`; at `normal` the row is for information.
    target = Target("ratio", 10) if d == "full" else None
    label = f"single append, 1,000 concurrent [{d}]"
    return [Sample(f"group_commit.{d}", label, "ev/s", o, r, target)]


# -- figure: read back ------------------------------------------------------------------------


def read_files(ctx: Ctx, n: int) -> tuple[Path, Path]:
    """An eventlog file and a raw file holding the same n events, made once per run."""

    def make() -> tuple[Path, Path]:
        folder = ctx.run_root / f"read-{n}"
        folder.mkdir()
        say(f"  setup: writing {n:,} events to each read file")
        fill_ours(folder / "log.db", n)
        fill_raw(folder / "raw.db", n)
        return folder / "log.db", folder / "raw.db"

    return ctx.once(f"read-files-{n}", make)


def fig_read(ctx: Ctx) -> list[Sample]:
    n = ctx.sizes.read
    ours_path, raw_path = read_files(ctx, n)
    # No target of its own: DESIGN's consume target (>= 0.3x raw consume+commit, pages of
    # 100) is group_catchup's; a plain read beside a plain raw read is for information.
    proxy = None
    cases = [
        ("read.sync.page500", "read 1 topic, sync, page 500", read_ours_sync, 500),
        ("read.sync.page100", "read 1 topic, sync, page 100", read_ours_sync, 100),
        ("read.async.page500", "read 1 topic, async, page 500", read_ours_async, 500),
    ]
    samples = []
    for key, label, read_ours, page in cases:
        (o, got_o), (r, got_r) = paired(
            ctx,
            functools.partial(read_ours, ours_path, page),
            functools.partial(read_raw, raw_path, page),
        )
        note = "" if got_o == got_r == n else f"read {got_o:,} (raw {got_r:,}) of {n:,}"
        samples.append(Sample(key, f"{label} ({n // 1000:,}k events)", "ev/s", o, r, proxy, note))
    return samples


# -- figure: contending producer processes ----------------------------------------------------


@dataclass
class ContendResult:
    events_per_s: float
    latencies_ms: list[float]  # sorted, every append of every process
    errors: int


def _producer(kind: str, path: str, durability: Durability, n: int, barrier: Any, out: Any) -> None:
    """One producer process: n appends, one per transaction, each timed."""
    payloads = make_payloads(n)
    append: Callable[[dict[str, Any]], object]
    if kind == "ours":
        log = open_sync(path, durability)
        append = lambda p: log.append(TOPIC, p)  # noqa: E731
    else:
        conn = raw_connect(Path(path), durability)
        append = lambda p: conn.execute(RAW_INSERT, (TOPIC, json.dumps(p), now_ms()))  # noqa: E731
    append({"warm": True})
    latencies: list[int] = []
    errors = 0
    clock = time.perf_counter_ns
    barrier.wait(timeout=120)
    start = time.monotonic()
    for p in payloads:
        t0 = clock()
        try:
            append(p)
        except (eventlog.EventlogError, sqlite3.Error):
            errors += 1
        latencies.append(clock() - t0)
    end = time.monotonic()
    out.put((start, end, latencies, errors))


def contend(
    kind: str, folder: Path, durability: Durability, procs: int, per_proc: int
) -> ContendResult:
    path = folder / ("log.db" if kind == "ours" else "raw.db")
    if kind == "ours":
        open_sync(path, durability).close()
    else:
        raw_connect(path, durability).close()
    mp = multiprocessing.get_context("spawn")
    barrier = mp.Barrier(procs)
    out = mp.Queue()
    workers = [
        mp.Process(target=_producer, args=(kind, str(path), durability, per_proc, barrier, out))
        for _ in range(procs)
    ]
    for w in workers:
        w.start()
    results: list[tuple[float, float, list[int], int]] = []
    deadline = time.monotonic() + 600
    try:
        while len(results) < procs:
            try:
                results.append(out.get(timeout=1))
            except queue.Empty:
                failed = [w.exitcode for w in workers if w.exitcode not in (None, 0)]
                if failed or time.monotonic() > deadline:
                    raise RuntimeError(f"producer processes failed (exit codes {failed})") from None
    finally:
        for w in workers:
            if len(results) < procs and w.is_alive():
                w.terminate()
            w.join()
    start = min(r[0] for r in results)
    end = max(r[1] for r in results)
    latencies = sorted(ns / 1e6 for r in results for ns in r[2])
    return ContendResult(rate(procs * per_proc, end - start), latencies, sum(r[3] for r in results))


def fig_contention(ctx: Ctx) -> list[Sample]:
    d = ctx.durability
    procs = ctx.sizes.procs
    per_proc = ctx.sizes.contend_full if d == "full" else ctx.sizes.contend_normal
    o, r = paired(
        ctx,
        lambda: contend("ours", ctx.fresh("ours"), d, procs, per_proc),
        lambda: contend("raw", ctx.fresh("raw"), d, procs, per_proc),
    )
    head = f"{procs} producers [{d}]"
    note = f"errors: {o.errors} (raw {r.errors})" if o.errors or r.errors else ""
    samples = [
        Sample(
            f"contention.{d}.throughput",
            f"{head}: events/s",
            "ev/s",
            o.events_per_s,
            r.events_per_s,
            None,
            note,
        )
    ]
    for name, q, target in (
        ("p50", 0.50, None),
        ("p99", 0.99, None),
        ("p99.9", 0.999, Target("max_ms", 5)),
        ("max", 1.0, Target("max_ms", 50)),
    ):
        samples.append(
            Sample(
                f"contention.{d}.{name}",
                f"{head}: {name} per append",
                "ms",
                percentile(o.latencies_ms, q),
                percentile(r.latencies_ms, q),
                target,
            )
        )
    return samples


# -- child processes --------------------------------------------------------------------------

WORKERS_PY = Path(__file__).resolve().parent / "_bench_workers.py"
CLK_TCK = os.sysconf("SC_CLK_TCK")


class Child:
    """A worker process from _bench_workers.py; killed when `stack` closes unless it ended."""

    def __init__(
        self, stack: ExitStack, role: str, args: dict[str, Any], *, pipes: bool = False
    ) -> None:
        self.role = role
        self.out = args.get("out")
        self._partial = b""
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKERS_PY), role, json.dumps(args)],
            stdin=subprocess.PIPE if pipes else subprocess.DEVNULL,
            stdout=subprocess.PIPE if pipes else subprocess.DEVNULL,
        )
        stack.callback(self.kill)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def lines(self, timeout: float) -> list[bytes]:
        """Whole lines the child printed since the last call, waiting up to `timeout` for
        some (read unbuffered: a line never hides in a buffer select cannot see)."""
        import select

        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        wait = timeout
        while b"\n" not in self._partial and select.select([fd], [], [], wait)[0]:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            self._partial += chunk
            wait = 0
        *done, self._partial = self._partial.split(b"\n")
        return done

    def wait_ready(self, timeout: float = 60) -> None:
        """Until the child printed READY; raises if it exits or the deadline passes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(b"READY" in line for line in self.lines(0.2)):
                return
            if self.proc.poll() is not None:
                break
        self.kill()
        raise RuntimeError(f"{self.role} worker not ready (exit code {self.proc.poll()})")

    def cpu_s(self) -> float:
        """CPU time of the process, all its threads, in seconds: the scheduler's nanosecond
        runtimes (/proc/PID/task/*/schedstat) where there are, else utime+stime in clock
        ticks (10 ms: 0.2 % of a core over 5 s, too coarse for an idle process)."""
        try:
            total = 0
            for task in os.listdir(f"/proc/{self.proc.pid}/task"):
                with open(f"/proc/{self.proc.pid}/task/{task}/schedstat") as f:
                    total += int(f.read().split()[0])
            return total / 1e9
        except (OSError, ValueError, IndexError):
            pass
        with open(f"/proc/{self.proc.pid}/stat") as f:
            data = f.read()
        rest = data[data.rindex(")") + 2 :].split()
        return (int(rest[11]) + int(rest[12])) / CLK_TCK

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> dict[str, Any]:
        """Until it exits (killed past the deadline); its result file, if it has one."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError(f"{self.role} worker still running after {timeout:.0f} s") from None
        if code != 0:
            raise RuntimeError(f"{self.role} worker failed (exit code {code})")
        if self.out is None:
            return {}
        return json.loads(Path(self.out).read_text())  # type: ignore[no-any-return]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


def mb(kb: int | None) -> float | None:
    return None if kb is None else kb / 1024


def peak_growth_mb(res: dict[str, Any]) -> float | None:
    """Peak RSS while consuming minus RSS just before (the peak was reset then)."""
    if res.get("peak_rss_kb") is None or res.get("rss_before_kb") is None:
        return None
    return float(res["peak_rss_kb"] - res["rss_before_kb"]) / 1024


def consume_rate(res: dict[str, Any]) -> float:
    """Events/s from the start of consumer.run() to the last event handled."""
    return rate(res["count"], (res["last_ns"] - res["t0_ns"]) / 1e9)


def run_consumer(
    folder: Path, path: Path, name: str, n: int, deadline: float, **options: Any
) -> dict[str, Any]:
    """An eventlog group member in its own process, consuming n events then stopping."""
    with ExitStack() as stack:
        out = folder / f"{name}.json"
        child = Child(stack, "consume", {"path": str(path), "topic": options.pop("topic", TOPIC),
                                         "n": n, "out": str(out), "deadline_s": deadline,
                                         **options})  # fmt: skip
        res = child.wait(deadline + 30)
    if res["timed_out"] or res["count"] != n:
        raise RuntimeError(f"{name}: handled {res['count']:,} of {n:,} events"
                           + (" (timed out)" if res["timed_out"] else ""))  # fmt: skip
    return res


def run_raw_catchup(folder: Path, path: Path, name: str, n: int, deadline: float) -> dict[str, Any]:
    with ExitStack() as stack:
        out = folder / f"{name}.json"
        child = Child(stack, "raw_catchup", {"path": str(path), "topic": TOPIC, "group": name,
                                             "page": 100, "out": str(out)})  # fmt: skip
        res = child.wait(deadline)
    if res["count"] != n:
        raise RuntimeError(f"{name}: read {res['count']:,} of {n:,} events")
    return res


def catchup_deadline(n: int) -> float:
    return 60 + n / 5_000  # a generous floor of 5k events/s


# -- figure: group catch-up and memory while replaying ----------------------------------------


def fig_group_catchup(ctx: Ctx) -> list[Sample]:
    n = ctx.sizes.read
    small = n // 10
    ours_path, raw_path = read_files(ctx, n)
    small_path = read_files(ctx, small)[0]
    folder = ctx.fresh("catchup")
    rep = ctx.rep
    deadline = catchup_deadline(n)

    def ours(batch_size: int) -> Callable[[], dict[str, Any]]:
        return lambda: run_consumer(
            folder,
            ours_path,
            f"ours-b{batch_size}-{rep}",
            n,
            deadline,
            group=f"catchup-b{batch_size}-{rep}",
            batch_size=batch_size,
        )

    runs: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("b100", ours(100)),
        ("b500", ours(500)),
        ("raw", lambda: run_raw_catchup(folder, raw_path, f"raw-{rep}", n, deadline)),
        ("small", lambda: run_consumer(folder, small_path, f"ours-small-{rep}", small, deadline,
                                       group=f"catchup-small-{rep}", batch_size=100)),
    ]  # fmt: skip
    if rep % 2:
        runs.reverse()  # which side goes first alternates between repetitions
    got = {name: run() for name, run in runs}
    raw = consume_rate(got["raw"])
    tag = f"{n // 1000:,}k" if n < 1_000_000 else f"{n // 1_000_000:,}M"
    tag_small = f"{small // 1000:,}k"
    notes = [f"the peak RSS could not be reset in the {k} consumer: it covers the whole process"
             for k, r in got.items() if not r.get("peak_reset")]  # fmt: skip
    note = "; ".join(notes)
    return [
        Sample("group_catchup.b100", f"group catch-up, {tag} backlog, batch_size 100", "ev/s",
               consume_rate(got["b100"]), raw, Target("ratio", 0.3), note),
        Sample("group_catchup.b500", f"group catch-up, {tag} backlog, batch_size 500", "ev/s",
               consume_rate(got["b500"]), raw, Target("ratio", 0.3), note),
        Sample("replay_memory.growth",
               f"replay memory: peak RSS growth, {tag} vs {tag_small} backlog (ref)", "MB",
               peak_growth_mb(got["b100"]), peak_growth_mb(got["small"]),
               Target("max_over_ref", 16, unit="MB"), note),
        Sample("replay_memory.growth_b500",
               f"replay memory: peak RSS growth, {tag}, batch_size 500 vs raw (ref)", "MB",
               peak_growth_mb(got["b500"]), peak_growth_mb(got["raw"]), None, note),
        Sample("replay_memory.peak", f"replay memory: consumer process peak RSS, {tag}", "MB",
               mb(got["b100"]["peak_rss_kb"]), mb(got["raw"]["peak_rss_kb"]), None, note),
    ]  # fmt: skip


# -- figure: cross-process delivery latency ---------------------------------------------------

LAT_RATE = 500.0  # events/s offered by the producer


def delivery(folder: Path, kind: str, events: int) -> list[int]:
    """A producer process appending `events` at LAT_RATE/s while a waiting consumer process
    receives them; the consumer's per-event latencies in ns."""
    seconds = events / LAT_RATE
    with ExitStack() as stack:
        out = folder / f"{kind}-consumer.json"
        if kind == "ours":
            path = folder / "log.db"
            with open_sync(path, "normal") as log:
                log.create_topic(TOPIC)  # the member finds its lane at once
            consumer = Child(stack, "consume", {
                "path": str(path), "topic": TOPIC, "group": "latency", "n": events,
                "latency": True, "ready": True, "out": str(out), "deadline_s": seconds + 60,
            }, pipes=True)  # fmt: skip
        else:
            path = folder / "raw.db"
            raw_connect(path, "normal").close()
            consumer = Child(stack, "raw_poll", {
                "path": str(path), "topic": TOPIC, "group": "latency", "n": events,
                "out": str(out), "deadline_s": seconds + 60,
            }, pipes=True)  # fmt: skip
        consumer.wait_ready()
        time.sleep(0.3)
        producer = Child(stack, "produce", {"path": str(path), "topic": TOPIC, "kind": kind,
                                            "n": events, "rate": LAT_RATE})  # fmt: skip
        producer.wait(seconds + 60)
        try:
            consumer.proc.wait(10)
        except subprocess.TimeoutExpired:
            consumer.terminate()  # events missing: it reports what it received
        res = consumer.wait(30)
    return res["lat_ns"]  # type: ignore[no-any-return]


def fig_delivery_latency(ctx: Ctx) -> list[Sample]:
    events = int(ctx.sizes.latency_s * LAT_RATE)
    o, r = paired(
        ctx,
        lambda: sorted(ns / 1e6 for ns in delivery(ctx.fresh("ours"), "ours", events)),
        lambda: sorted(ns / 1e6 for ns in delivery(ctx.fresh("raw"), "raw", events)),
    )
    note = "" if len(o) == len(r) == events else (
        f"received {len(o):,} (raw {len(r):,}) of {events:,}")  # fmt: skip
    head = f"delivery across processes, {LAT_RATE:.0f} ev/s"
    return [
        Sample(f"delivery_latency.{name}", f"{head}: {name}", "ms",
               percentile(o, q) if o else None, percentile(r, q) if r else None, target, note)
        for name, q, target in (
            ("p50", 0.50, Target("max_ms", 0.5)),
            ("p99", 0.99, Target("max_ms", 1)),
            ("max", 1.0, None),
        )
    ]  # fmt: skip


# -- figure: idle CPU of waiting readers ------------------------------------------------------


def fig_idle_cpu(ctx: Ctx) -> list[Sample]:
    """Every waiting reader in its own process, all idle in the same window."""
    folder = ctx.fresh("idle")
    idle_s = ctx.sizes.idle_s
    path, raw_path = folder / "log.db", folder / "raw.db"
    with open_sync(path, "normal") as log:
        log.create_topic(TOPIC)
    raw_connect(raw_path, "normal").close()
    life = idle_s + 60
    with ExitStack() as stack:
        children = {
            "consumer": Child(stack, "consume", {
                "path": str(path), "topic": TOPIC, "group": "idle", "n": 0, "ready": True,
                "out": str(folder / "consumer.json"), "deadline_s": life,
            }, pipes=True),
            "follow_sync": Child(stack, "follow", {"path": str(path), "topic": TOPIC,
                                                   "api": "sync", "deadline_s": life},
                                 pipes=True),
            "follow_async": Child(stack, "follow", {"path": str(path), "topic": TOPIC,
                                                    "api": "async", "deadline_s": life},
                                  pipes=True),
            "raw": Child(stack, "raw_poll", {"path": str(raw_path), "topic": TOPIC,
                                             "group": "idle", "n": 0, "deadline_s": life,
                                             "out": str(folder / "raw.json")}, pipes=True),
        }  # fmt: skip
        for child in children.values():
            child.wait_ready()
        time.sleep(0.5)  # past start-up work
        before = {k: c.cpu_s() for k, c in children.items()}
        t0 = time.monotonic()
        time.sleep(idle_s)
        wall = time.monotonic() - t0
        pct = {k: 100 * (c.cpu_s() - before[k]) / wall for k, c in children.items()}
        for child in children.values():
            child.terminate()
        for k in ("consumer", "raw"):
            children[k].wait(30)
    raw = pct["raw"]
    target = Target("max", 0.2, unit="%")
    return [
        Sample("idle_cpu.consumer", "idle consumer group member, CPU (% of a core)", "%",
               pct["consumer"], raw, target),
        Sample("idle_cpu.follow_sync", "idle read(follow=True), sync API, CPU", "%",
               pct["follow_sync"], raw, target),
        Sample("idle_cpu.follow_async", "idle read(follow=True), async API, CPU", "%",
               pct["follow_async"], raw, target),
    ]  # fmt: skip


# -- figure: a big log ------------------------------------------------------------------------

BIG_BATCH = 10_000  # events per append_many call while building the big log


def build_big_log(ctx: Ctx, n: int) -> Path:
    def make() -> Path:
        folder = ctx.run_root / f"big-{n}"
        folder.mkdir()
        path = folder / "log.db"
        say(f"  setup: writing {n:,} events to the big log (append_many of {BIG_BATCH:,})")
        payloads = make_payloads(BIG_BATCH)
        t0 = time.perf_counter()
        with open_sync(path, "normal") as log:
            for start in range(0, n, BIG_BATCH):
                count = min(BIG_BATCH, n - start)
                log.append_many([eventlog.Draft(TOPIC, p) for p in payloads[:count]])
            log.checkpoint()
        seconds = time.perf_counter() - t0
        size = path.stat().st_size / 2**30
        say(f"  setup: big log built in {seconds:.0f} s ({rate(n, seconds):,.0f} ev/s, "
            f"{size:.1f} GiB)")  # fmt: skip
        return path

    return ctx.once(f"big-log-{n}", make)


def stats_in_process(path: Path) -> float:
    """Wall time of eventlog._stats.stats on an open log, in ms."""
    from eventlog import _stats

    with open_sync(path, "normal") as log:
        t0 = time.perf_counter()
        _stats.stats(log)
        return (time.perf_counter() - t0) * 1000


def stats_cli(path: Path) -> float:
    """Wall time of `python -m eventlog --db PATH stats --json` as a subprocess, in ms."""
    t0 = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "eventlog", "--db", str(path), "stats", "--json"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"eventlog stats failed ({done.returncode}): {done.stderr[-500:]}")
    json.loads(done.stdout.splitlines()[-1])
    return seconds * 1000


def fig_big_log(ctx: Ctx) -> list[Sample]:
    n, tail = ctx.sizes.big, ctx.sizes.big_tail
    big = build_big_log(ctx, n)
    small = read_files(ctx, tail)[0]  # a log holding just `tail` events
    folder = ctx.fresh("big")
    rep = ctx.rep
    with open_sync(big, "normal") as log:
        head = log.head()
    deadline = catchup_deadline(tail)
    name = f"{n // 1_000_000}M" + (" (quick)" if n < 10_000_000 else "")
    # catch-up of the last `tail` events, then appends (they leave the group a lag that
    # stats must estimate), then stats
    c_big, c_small = paired(
        ctx,
        lambda: consume_rate(run_consumer(folder, big, f"big-{rep}", tail, deadline,
                                          group=f"big-{rep}", start=head - tail + 1)),
        lambda: consume_rate(run_consumer(folder, small, f"small-{rep}", tail, deadline,
                                          group=f"big-{rep}")),
    )  # fmt: skip
    payloads = make_payloads(ctx.sizes.single_normal)
    a_big, a_empty = paired(
        ctx,
        lambda: ours_single(big, "normal", payloads),
        lambda: ours_single(ctx.fresh("empty") / "log.db", "normal", payloads),
    )
    s_big, s_small = paired(ctx, lambda: stats_in_process(big),
                            lambda: stats_in_process(small))  # fmt: skip
    cli_big, cli_small = paired(ctx, lambda: stats_cli(big), lambda: stats_cli(small))
    tail_k = f"{tail // 1000:,}k"
    return [
        Sample("big_log.append", f"{name} log: single sync append [normal], ref empty log",
               "ev/s", a_big, a_empty, Target("ratio", 0.8)),
        Sample("big_log.catchup", f"{name} log: catch-up of last {tail_k}, ref {tail_k} log",
               "ev/s", c_big, c_small, Target("ratio", 0.8)),
        Sample("big_log.stats", f"{name} log: stats (in process), ref {tail_k} log", "ms",
               s_big, s_small, Target("max_ms", 1000)),
        Sample("big_log.stats_cli", f"{name} log: `eventlog stats --json` wall, ref {tail_k}",
               "ms", cli_big, cli_small, Target("max_ms", 1000)),
    ]  # fmt: skip


# -- figure: several consumer processes of one group ------------------------------------------

GROUP_TOPIC = "six"
GROUP_PARTITIONS = 6
GROUP_PROCS = 3


def group_log(ctx: Ctx) -> Path:
    """A log with an empty 6-partition topic, made once; every group run adds its backlog."""

    def make() -> Path:
        folder = ctx.run_root / "group"
        folder.mkdir()
        with open_sync(folder / "log.db", "normal") as log:
            log.create_topic(GROUP_TOPIC, GROUP_PARTITIONS)
        return folder / "log.db"

    return ctx.once("group-log", make)


def group_done(conn: sqlite3.Connection, group: str, lasts: dict[int, int]) -> bool:
    rows = dict(conn.execute(
        "SELECT partition, position FROM eventlog_group_offsets WHERE group_name = ?"
        " AND topic = ?", (group, GROUP_TOPIC)).fetchall())  # fmt: skip
    return all(rows.get(p, 0) >= last for p, last in lasts.items())


def group_run(
    folder: Path, path: Path, group: str, procs: int, payloads: list[dict[str, Any]]
) -> tuple[float, list[int]]:
    """`procs` members of a new group (start "latest") settle on their share of the lanes;
    then one append_many commits the backlog at once, and they consume it until every lane
    is committed to its end. (events/s from the first delivery in any member to the last,
    events handled per member)."""
    n = len(payloads)
    deadline = catchup_deadline(n)
    share = GROUP_PARTITIONS // procs
    with ExitStack() as stack:
        children = [
            Child(stack, "consume", {"path": str(path), "topic": GROUP_TOPIC, "group": group,
                                     "n": 0, "start": "latest", "lanes": True,
                                     "out": str(folder / f"{group}-{k}.json"),
                                     "deadline_s": deadline + 60}, pipes=True)
            for k in range(procs)
        ]  # fmt: skip
        owned = [-1] * procs
        settle_by = time.monotonic() + 60
        while owned != [share] * procs:  # with exclusive lane locks: every lane taken once
            if time.monotonic() > settle_by:
                raise RuntimeError(f"{group}: members own {owned} lanes after 60 s")
            for k, child in enumerate(children):
                if child.proc.poll() is not None:
                    raise RuntimeError(f"{group}: a member exited (code {child.proc.poll()})")
                for line in child.lines(0.01):
                    if line.startswith(b"LANES "):
                        owned[k] = int(line.split()[1])
        with open_sync(path, "normal") as log:
            log.append_many([eventlog.Draft(GROUP_TOPIC, p) for p in payloads])
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
        stack.callback(conn.close)
        lasts = dict(conn.execute(
            "SELECT partition, max(id) FROM eventlog_events WHERE topic = ? GROUP BY partition",
            (GROUP_TOPIC,)).fetchall())  # fmt: skip
        end = time.monotonic() + deadline
        while not group_done(conn, group, lasts):
            if time.monotonic() > end:
                raise RuntimeError(f"{group}: not done after {deadline:.0f} s")
            if any(c.proc.poll() is not None for c in children):
                raise RuntimeError(f"{group}: a member ended early")
            for child in children:
                child.lines(0)  # keep its pipe from filling
            time.sleep(0.02)
        for child in children:
            child.terminate()
        results = [child.wait(30) for child in children]
    counts = [r["count"] for r in results]
    if sum(counts) < n:
        raise RuntimeError(f"{group}: handled {sum(counts):,} of {n:,}")
    first = min(r["first_ns"] for r in results if r["first_ns"] is not None)
    last = max(r["last_ns"] for r in results if r["last_ns"] is not None)
    cores = sum(r["cpu_s"] for r in results) / ((last - first) / 1e9)
    say(f"  {group}: events per member {counts}, ~{cores:.2f} cores busy (all members, "
        "CPU from start to SIGTERM over first-to-last delivery)")  # fmt: skip
    return rate(sum(counts), (last - first) / 1e9), counts


def fig_group_3proc(ctx: Ctx) -> list[Sample]:
    n = ctx.sizes.group_backlog
    path = group_log(ctx)
    folder = ctx.fresh("group")
    rep = ctx.rep
    payloads = make_payloads(n)
    (o, counts), (r, _) = paired(
        ctx,
        lambda: group_run(folder, path, f"three-{rep}", GROUP_PROCS, payloads),
        lambda: group_run(folder, path, f"one-{rep}", 1, payloads),
    )
    notes = []
    if sum(counts) != n:
        notes.append(f"{sum(counts) - n:,} events delivered twice")
    if max(counts) > 1.1 * min(counts):
        notes.append(f"uneven split: events per member {counts}")
    tag = f"{n // 1000:,}k"
    return [
        Sample("group_3proc", f"{GROUP_PROCS}-process group, {GROUP_PARTITIONS} partitions, "
               f"{tag} backlog, ref 1 process", "ev/s", o, r, None, "; ".join(notes)),
    ]  # fmt: skip


# -- peers ------------------------------------------------------------------------------------
#
# Each peer runs with its own defaults, as a user would pick it; eventlog does the same work
# at the same durability in the same repetition (paired, like the figures above), so a noisy
# machine cannot flatter either side. Consuming is compared with log.read until consumer
# groups have figures of their own.

SYNC_NAMES = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}
READ_PROXY = "eventlog side: log.read of a log of the same size (no commits; proxy)"


def synchronous_of(conn: Any) -> str:
    """The `synchronous` setting a peer's own connection runs with."""
    try:
        return SYNC_NAMES.get(conn.execute("PRAGMA synchronous").fetchone()[0], "?")
    except Exception:
        return "?"


def same_durability(sync: str) -> Durability:
    return "normal" if sync in ("NORMAL", "OFF") else "full"


def timed_each(items: list[Any], call: Callable[[Any], object]) -> float:
    gc.collect()
    t0 = time.perf_counter()
    for item in items:
        call(item)
    return rate(len(items), time.perf_counter() - t0)


def ours_read_of(folder: Path, n: int, page: int) -> float:
    """eventlog's side of a consume row: read back a log of n events."""
    fill_ours(folder / "log.db", n)
    return read_ours_sync(folder / "log.db", page)[0]


def fig_persist_queue(ctx: Ctx) -> list[PeerSample]:
    try:
        import persistqueue
    except ImportError:
        raise Skipped("persist-queue not installed") from None
    n_put, n_get = ctx.sizes.peer_put, ctx.sizes.peer_consume
    q = persistqueue.SQLiteAckQueue(str(ctx.fresh("pq")), multithreading=True, auto_commit=True)
    try:
        sync = synchronous_of(getattr(q, "_putter", None))
        d = same_durability(sync)
        payloads = make_payloads(n_put)
        put, ours_put = paired(
            ctx,
            lambda: timed_each(payloads, q.put),  # persist-queue pickles the dict
            lambda: ours_single(ctx.fresh("ours-put") / "log.db", d, payloads),
        )
        get_ack, ours_read = paired(
            ctx,
            lambda: timed_each(list(range(n_get)), lambda _: q.ack(q.get())),
            lambda: ours_read_of(ctx.fresh("ours-read"), n_get, 500),
        )
    finally:
        q.close()
    return [
        PeerSample("pq.put", f"persist-queue put (sync={sync})", put, ours_put,
                   f"single append, sync [{d}]"),
        PeerSample("pq.get_ack", f"persist-queue get+ack ({n_get:,} queued)", get_ack,
                   ours_read, "log.read, page 500", READ_PROXY),
    ]  # fmt: skip


def fig_litequeue(ctx: Ctx) -> list[PeerSample]:
    try:
        import litequeue
    except ImportError:
        raise Skipped("litequeue not installed") from None
    n_put, n_get, n_batch = ctx.sizes.peer_put, ctx.sizes.peer_consume, ctx.sizes.peer_batch
    folder = ctx.fresh("lq")
    q = litequeue.LiteQueue(str(folder / "q.db"))
    try:
        sync = synchronous_of(q.conn)
        d = same_durability(sync)
        payloads = make_payloads(n_put)
        put, ours_put = paired(
            ctx,
            lambda: timed_each(payloads, lambda p: q.put(json.dumps(p))),
            lambda: ours_single(ctx.fresh("ours-put") / "log.db", d, payloads),
        )

        def pop_done(_: int) -> None:
            message = q.pop()
            json.loads(message.data)
            q.done(message.message_id)

        consume, ours_read = paired(
            ctx,
            lambda: timed_each(list(range(n_get)), pop_done),
            lambda: ours_read_of(ctx.fresh("ours-read"), n_get, 500),
        )
    finally:
        q.close()

    def put_batches() -> float:
        q = litequeue.LiteQueue(str(folder / "batch.db"))
        try:
            gc.collect()
            t0 = time.perf_counter()
            for start in range(0, len(batch_payloads), BATCH):
                with q.transaction():  # litequeue has no batch call
                    for p in batch_payloads[start : start + BATCH]:
                        q.put(json.dumps(p))
            return rate(len(batch_payloads), time.perf_counter() - t0)
        finally:
            q.close()

    batch_payloads = make_payloads(n_batch)
    batch, ours_batch = paired(
        ctx,
        put_batches,
        lambda: ours_batches(ctx.fresh("ours-batch") / "log.db", d, batch_payloads, BATCH),
    )
    return [
        PeerSample("lq.put", f"litequeue put (sync={sync})", put, ours_put,
                   f"single append, sync [{d}]"),
        PeerSample("lq.pop_done", f"litequeue pop+done ({n_get:,} queued)", consume, ours_read,
                   "log.read, page 500", READ_PROXY),
        PeerSample("lq.put_batch", f"litequeue 1,000 puts per transaction (sync={sync})", batch,
                   ours_batch, f"append_many, 1,000/call [{d}]"),
    ]  # fmt: skip


def fig_huey(ctx: Ctx) -> list[PeerSample]:
    try:
        from huey.storage import SqliteStorage
    except ImportError:
        raise Skipped("huey not installed") from None
    n = ctx.sizes.peer_put
    storage = SqliteStorage(name="bench", filename=str(ctx.fresh("huey") / "huey.db"))
    try:
        sync = synchronous_of(storage.conn)
        d = same_durability(sync)
        payloads = make_payloads(n)
        enqueue, ours_put = paired(
            ctx,
            lambda: timed_each(payloads, lambda p: storage.enqueue(json.dumps(p).encode())),
            lambda: ours_single(ctx.fresh("ours-put") / "log.db", d, payloads),
        )
        dequeue, ours_read = paired(
            ctx,
            lambda: timed_each(list(range(n)), lambda _: json.loads(storage.dequeue())),
            lambda: ours_read_of(ctx.fresh("ours-read"), n, 500),
        )
    finally:
        storage.close()
    return [
        PeerSample("huey.enqueue", f"huey SqliteStorage enqueue (sync={sync})", enqueue,
                   ours_put, f"single append, sync [{d}]"),
        PeerSample("huey.dequeue", f"huey dequeue, delete on read ({n:,} queued)", dequeue,
                   ours_read, "log.read, page 500", READ_PROXY),
    ]  # fmt: skip


class RedisServer:
    """redis-server on 127.0.0.1, a free port, AOF fsynced every second, in a temp folder."""

    def __init__(self, folder: Path) -> None:
        import redis

        folder.mkdir(parents=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
             "--appendonly", "yes", "--appendfsync", "everysec", "--dir", str(folder),
             "--daemonize", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis(host="127.0.0.1", port=self.port).ping()
                return
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def stream_entries(reply: Any) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """XREADGROUP's reply (RESP2 list or RESP3 dict) as [(id, fields)]."""
    if not reply:
        return []
    streams = reply.values() if isinstance(reply, dict) else (e for _, e in reply)
    entries: list[tuple[bytes, dict[bytes, bytes]]] = []
    for stream in streams:
        if stream and isinstance(stream[0], list) and stream[0] and isinstance(stream[0][0], list):
            stream = stream[0]  # RESP3 nests one level deeper
        entries.extend(stream)
    return entries


def fig_redis(ctx: Ctx) -> list[PeerSample]:
    if shutil.which("redis-server") is None:
        raise Skipped("redis-server not installed")
    try:
        import redis
    except ImportError:
        raise Skipped("redis (the Python client) not installed") from None

    def start() -> RedisServer:
        server = RedisServer(ctx.run_root / "redis")
        ctx.cleanup.callback(server.stop)
        return server

    server = ctx.once("redis-server", start)
    r = redis.Redis(host="127.0.0.1", port=server.port)
    single, piped = f"single{ctx.rep}", f"piped{ctx.rep}"
    n_put, n_batch = ctx.sizes.peer_put, ctx.sizes.peer_batch
    # AOF fsynced every second survives a crash of the server process, not a power cut:
    # the durability of synchronous=NORMAL.
    d: Durability = "normal"

    def xadd_pipelined() -> float:
        gc.collect()
        t0 = time.perf_counter()
        for start_at in range(0, n_batch, 100):
            pipe = r.pipeline(transaction=False)
            for p in batch_payloads[start_at : start_at + 100]:
                pipe.xadd(piped, {"d": json.dumps(p)})
            pipe.execute()
        return rate(n_batch, time.perf_counter() - t0)

    def xreadgroup_xack() -> float:
        r.xgroup_create(piped, "g", id="0")
        gc.collect()
        got = 0
        t0 = time.perf_counter()
        while entries := stream_entries(r.xreadgroup("g", "c", {piped: ">"}, count=100)):
            for _id, fields in entries:
                json.loads(fields[b"d"])
            r.xack(piped, "g", *[e[0] for e in entries])
            got += len(entries)
        return rate(got, time.perf_counter() - t0)

    try:
        payloads = make_payloads(n_put)
        xadd, ours_put = paired(
            ctx,
            lambda: timed_each(payloads, lambda p: r.xadd(single, {"d": json.dumps(p)})),
            lambda: ours_single(ctx.fresh("ours-put") / "log.db", d, payloads),
        )
        batch_payloads = make_payloads(n_batch)
        pipelined, ours_batch = paired(
            ctx,
            xadd_pipelined,
            lambda: ours_batches(ctx.fresh("ours-batch") / "log.db", d, batch_payloads, 100),
        )
        consume, ours_read = paired(
            ctx, xreadgroup_xack, lambda: ours_read_of(ctx.fresh("ours-read"), n_batch, 100)
        )
    finally:
        r.delete(single, piped)
        r.close()
    return [
        PeerSample("redis.xadd", "Redis XADD, one round trip each", xadd, ours_put,
                   f"single append, sync [{d}]", "Redis AOF everysec ~ synchronous=NORMAL"),
        PeerSample("redis.xadd_pipelined", "Redis XADD pipelined, 100 per round trip",
                   pipelined, ours_batch, f"append_many, 100/call [{d}]"),
        PeerSample("redis.xreadgroup", f"Redis XREADGROUP 100 + XACK ({n_batch:,} queued)",
                   consume, ours_read, "log.read, page 100", READ_PROXY),
    ]  # fmt: skip


# -- the registry -----------------------------------------------------------------------------


BOTH: tuple[Durability, ...] = ("full", "normal")
ONCE: tuple[Durability, ...] = ("normal",)  # durability does not apply; run once
FULL_ONLY: tuple[Durability, ...] = ("full",)


@dataclass(frozen=True)
class Figure:
    name: str
    run: Callable[[Ctx], list[Sample] | list[PeerSample]]
    ours: str  # what eventlog does, for the legend
    reference: str  # what it is compared with
    durabilities: tuple[Durability, ...] = BOTH


SAME = "eventlog doing the same work at the same durability, in the same repetition"

FIGURES: list[Figure] = [
    Figure(
        "batch_append",
        fig_batch_append,
        "SyncLog.append_many of 1,000 Drafts per call",
        "executemany of 1,000 rows in one BEGIN IMMEDIATE transaction",
    ),
    Figure(
        "single_sync",
        fig_single_sync,
        "SyncLog.append, one event per call",
        "one autocommit INSERT per event",
    ),
    Figure(
        "single_floor",
        fig_single_floor,
        "its own INSERT at NORMAL + one fdatasync of the WAL per event, nothing else",
        "one autocommit INSERT per event at FULL",
        FULL_ONLY,
    ),
    Figure(
        "single_async",
        fig_single_async,
        "AsyncLog.append awaited one after another",
        "one autocommit INSERT per event",
    ),
    Figure(
        "group_commit",
        fig_group_commit,
        f"{CALLERS:,} coroutines each awaiting AsyncLog.append in a loop",
        "one autocommit INSERT per event (target set at full only)",
    ),
    Figure(
        "read",
        fig_read,
        "iterate log.read(topic) over the whole log (Event objects, payloads decoded)",
        "keyset pages of the same size, one SELECT each, json.loads of every payload",
        ONCE,
    ),
    Figure(
        "group_catchup",
        fig_group_catchup,
        "a consumer group member (own process, no-op async handler) catching up a backlog; "
        "memory: its peak RSS minus its RSS just before consuming",
        "keyset pages of 100, json.loads of each payload, an UPDATE of an offsets row per "
        "page (own process); memory: the same consumer on a 10x smaller backlog",
        ONCE,
    ),
    Figure(
        "delivery_latency",
        fig_delivery_latency,
        "a producer process doing SyncLog.append every 2 ms (payload stamped with "
        "monotonic_ns just before), a consumer group member in another process",
        "autocommit INSERTs, and a consumer polling SELECT with 1 ms sleeps",
        ONCE,
    ),
    Figure(
        "idle_consumer_cpu",
        fig_idle_cpu,
        "CPU time (all threads) over wall time of an idle group member, and of idle followers",
        "a raw consumer polling SELECT with 1 ms sleeps, idle in the same window",
        ONCE,
    ),
    Figure(
        "big_log",
        fig_big_log,
        "a log of 10M events (1M with --quick) built with append_many of 10,000",
        "the same work on an empty log (appends) or on a log holding only the events "
        "consumed (catch-up, stats)",
        ONCE,
    ),
    Figure(
        "group_3proc",
        fig_group_3proc,
        "3 member processes of a new group settle on 2 of 6 partitions each, then the "
        "backlog is committed in one append_many; events/s from the first delivery in any "
        "process to the last",
        "the same with 1 member process",
        ONCE,
    ),
    Figure(
        "contention",
        fig_contention,
        "4 processes, SyncLog.append one event per transaction, started together",
        "the same with autocommit INSERTs and busy_timeout only (no flock)",
    ),
    Figure("peers.persist_queue", fig_persist_queue, "persist-queue SQLiteAckQueue", SAME, ONCE),
    Figure("peers.litequeue", fig_litequeue, "litequeue", SAME, ONCE),
    Figure("peers.huey", fig_huey, "huey SqliteStorage", SAME, ONCE),
    Figure("peers.redis", fig_redis, "Redis Streams, local redis-server, AOF everysec", SAME, ONCE),
]


@dataclass(frozen=True)
class NotMeasured:
    name: str
    label: str
    target: str


# Figures not written yet: printed as "not measured yet" (none left).
NOT_MEASURED_YET: list[NotMeasured] = []


@dataclass(frozen=True)
class Instance:
    figure: Figure
    durability: Durability

    @property
    def name(self) -> str:
        if self.figure.durabilities == ONCE:
            return self.figure.name
        return f"{self.figure.name}.{self.durability}"


def instances() -> list[Instance]:
    return [Instance(f, d) for f in FIGURES for d in f.durabilities]


def selected(only: list[str] | None) -> list[Instance]:
    every = instances()
    if not only:
        return every
    tokens = [t.strip() for chunk in only for t in chunk.split(",") if t.strip()]
    chosen = [i for i in every if any(i.name == t or i.name.startswith(t + ".") for t in tokens)]
    unknown = [
        t for t in tokens if not any(i.name == t or i.name.startswith(t + ".") for i in every)
    ]
    if unknown:
        say(f"unknown figure(s): {', '.join(unknown)}; see --list")
    return chosen


# -- running ----------------------------------------------------------------------------------


@dataclass
class Collected:
    samples: dict[str, list[Sample]] = field(default_factory=dict)
    peers: dict[str, list[PeerSample]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def run_all(chosen: list[Instance], sizes: Sizes, repeat: int, root: Path) -> Collected:
    got = Collected()
    shared: dict[str, Any] = {}
    with ExitStack() as cleanup:
        for inst in chosen:
            t_fig = time.perf_counter()
            for rep in range(repeat):
                folder = root / inst.name / f"rep{rep + 1}"
                folder.mkdir(parents=True)
                ctx = Ctx(sizes, root, folder, inst.durability, rep, shared, cleanup)
                # Flush what earlier figures left dirty (the 10M-event log is gigabytes): the
                # kernel's background writeback would otherwise slow this figure's fsyncs.
                os.sync()
                t0 = time.perf_counter()
                try:
                    results = inst.figure.run(ctx)
                except Skipped as why:
                    got.notes.append(f"{inst.name}: skipped ({why})")
                    say(f"{inst.name}: skipped ({why})")
                    break
                except Exception as exc:
                    traceback.print_exc()
                    got.notes.append(f"{inst.name}: failed: {type(exc).__name__}: {exc}")
                    break
                shown = []
                for res in results:
                    if isinstance(res, Sample):
                        got.samples.setdefault(res.key, []).append(res)
                        shown.append(
                            f"{res.key}={short(res.ours, res.unit)}/{short(res.ref, res.unit)}"
                        )
                    else:
                        got.peers.setdefault(res.key, []).append(res)
                        shown.append(
                            f"{res.key}={short(res.peer, 'ev/s')}/{short(res.ours, 'ev/s')}"
                        )
                say(
                    f"{inst.name} rep {rep + 1}/{repeat} ({time.perf_counter() - t0:.1f} s): "
                    + "  ".join(shown)
                )
            got.seconds[inst.name] = time.perf_counter() - t_fig
    return got


# -- reporting --------------------------------------------------------------------------------


def median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def short(v: float | None, unit: str) -> str:
    """Compact number for spreads and progress lines."""
    if v is None:
        return "-"
    if unit == "ms":
        return f"{v:.3g}" if v < 1000 else f"{v:,.0f}"
    if unit in ("%", "MB"):
        return f"{v:.3g}"
    if v >= 10_000:
        return f"{v / 1000:.0f}k"
    if v >= 1_000:
        return f"{v / 1000:.1f}k"
    return f"{v:.0f}"


def full(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    if unit == "ms":
        return f"{v:.3f} ms" if v < 10 else f"{v:,.1f} ms"
    if unit == "%":
        return f"{v:.2f} %"
    if unit == "MB":
        return f"{v:,.1f} MB"
    return f"{v:,.0f}/s"


def spread(values: Sequence[float | None], unit: str) -> str:
    present = [v for v in values if v is not None]
    if len(present) < 2:
        return ""
    return f"[{short(min(present), unit)}-{short(max(present), unit)}]"


@dataclass
class Row:
    key: str
    label: str
    unit: Unit
    ours: list[float | None]
    ref: list[float | None]
    ours_median: float | None
    ref_median: float | None
    ratio: float | None
    target: str
    met: bool | None
    notes: list[str]


def summarise(samples: list[Sample]) -> Row:
    first = samples[0]
    ours = [s.ours for s in samples]
    ref = [s.ref for s in samples]
    ratios = [s.ours / s.ref for s in samples if s.ours is not None and s.ref]
    ratio = median(ratios)
    ours_median = median(ours)
    ref_median = median(ref)
    target = first.target
    return Row(
        key=first.key,
        label=first.label,
        unit=first.unit,
        ours=ours,
        ref=ref,
        ours_median=ours_median,
        ref_median=ref_median,
        ratio=ratio,
        target=target.describe() if target else "",
        met=target.met(ours_median, ratio, ref_median) if target else None,
        notes=sorted({s.note for s in samples if s.note}),
    )


@dataclass
class PeerRow:
    key: str
    label: str
    peer: list[float]
    ours: list[float]
    ours_label: str
    peer_median: float
    ours_median: float
    ratio: float
    ahead: bool
    notes: list[str]


def summarise_peer(samples: list[PeerSample]) -> PeerRow:
    first = samples[0]
    ratio = statistics.median(s.ours / s.peer for s in samples)
    return PeerRow(
        key=first.key,
        label=first.label,
        peer=[s.peer for s in samples],
        ours=[s.ours for s in samples],
        ours_label=first.ours_label,
        peer_median=statistics.median(s.peer for s in samples),
        ours_median=statistics.median(s.ours for s in samples),
        ratio=ratio,
        ahead=ratio > 1,
        notes=sorted({s.note for s in samples if s.note}),
    )


def yes_no(met: bool | None) -> str:
    return "" if met is None else ("yes" if met else "NO")


def table(rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for n, r in enumerate(rows):
        cells = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


def report(got: Collected, meta: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    out: list[str] = []
    out.append(
        f"eventlog bench: {meta['mode']} run, {meta['repeat']} repetition(s), "
        f"{meta['started']}, {meta['wall_s']:.0f} s, 1-min load average "
        f"{meta['load_1min'][0]:.1f} at start, {meta['load_1min'][1]:.1f} at end"
    )
    out.append("  " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()))
    out.append("")

    rows = [summarise(s) for s in got.samples.values()]
    cells = [
        ["figure", "eventlog", "[min-max]", "reference", "[min-max]", "ratio", "target", "met"]
    ]
    for r in rows:
        cells.append(
            [
                r.label,
                full(r.ours_median, r.unit),
                spread(r.ours, r.unit),
                full(r.ref_median, r.unit),
                spread(r.ref, r.unit),
                "-" if r.ratio is None else f"{r.ratio:.2f}x",
                r.target,
                yes_no(r.met),
            ]
        )
    for nm in NOT_MEASURED_YET:
        cells.append([nm.label, "not measured yet", "", "", "", "", nm.target, ""])
    out.extend(table(cells, right={1, 3, 5}))
    if any(r.target.endswith("*") for r in rows):
        out.append(
            "* proxy: DESIGN's target (>= 0.3x) is for group catch-up with commits; "
            "a plain read stands in until consumer groups exist."
        )
    for r in rows:
        for note in r.notes:
            out.append(f"! {r.label}: {note}")

    peer_rows = [summarise_peer(samples) for samples in got.peers.values()]
    if peer_rows:
        out.append("")
        cells = [["peer (its own defaults)", "peer", "[min-max]", "eventlog, same work",
                  "eventlog", "[min-max]", "eventlog/peer", "ahead"]]  # fmt: skip
        for p in peer_rows:
            cells.append([
                p.label, full(p.peer_median, "ev/s"), spread(p.peer, "ev/s"), p.ours_label,
                full(p.ours_median, "ev/s"), spread(p.ours, "ev/s"),
                "-" if p.ratio is None else f"{p.ratio:.2f}x", yes_no(p.ahead),
            ])  # fmt: skip
        out.extend(table(cells, right={1, 4, 6}))
        for note in sorted({note for p in peer_rows for note in p.notes}):
            out.append(f"  note: {note}")

    out.append("")
    out.append("What each figure measures (eventlog / reference):")
    seen = set()
    for name in got.seconds:
        fig = next(f for f in FIGURES if name == f.name or name.startswith(f.name + "."))
        if fig.name not in seen:
            seen.add(fig.name)
            out.append(f"  {fig.name}: {fig.ours} / {fig.reference}")
    out.append(
        "  Events are 200-byte JSON dicts; both sides json.dumps inside the timed part. "
        "Ratio = median of per-repetition eventlog/reference."
    )
    out.append("  sizes: " + ", ".join(f"{k}={v:,}" for k, v in meta["sizes"].items()))
    for note in got.notes:
        out.append(f"  {note}")

    data = {
        "meta": meta,
        "figures": [asdict(r) for r in rows],
        "peers": [asdict(p) for p in peer_rows],
        "not_measured_yet": [asdict(n) for n in NOT_MEASURED_YET],
        "notes": got.notes,
        "seconds_per_figure": got.seconds,
    }
    return "\n".join(out), data


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "eventlog": eventlog.__version__,
    }
    for package in ("aiosqlite", "persist-queue", "litequeue", "huey", "redis"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    try:
        text = subprocess.run(
            ["redis-server", "--version"], capture_output=True, text=True, check=False
        ).stdout
        found["redis-server"] = text.split("v=")[1].split()[0] if "v=" in text else "?"
    except OSError:
        found["redis-server"] = "not installed"
    repo = Path(eventlog.__file__).resolve().parent.parent  # the checkout actually measured
    found["eventlog from"] = str(repo)
    commit = subprocess.run(
        ["git", "-C", str(repo), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    found["commit"] = commit or "?"
    found["cpus"] = str(os.cpu_count())
    return found


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="small sizes (about three minutes on a quiet machine)"
    )
    parser.add_argument("--repeat", type=int, default=3, help="repetitions per figure (3)")
    parser.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help="figures to run, comma separated; a prefix such as 'peers' or "
        "'single_sync' selects all of its variants",
    )
    parser.add_argument("--json", metavar="PATH", help="also save the results as JSON")
    parser.add_argument("--list", action="store_true", help="list figure names and exit")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()

    if args.list:
        for inst in instances():
            print(inst.name)
        for nm in NOT_MEASURED_YET:
            print(f"{nm.name} (not measured yet)")
        return
    chosen = selected(args.only)
    if not chosen:
        say("nothing to run")
        sys.exit(2)
    sizes = QUICK_SIZES if args.quick else FULL_SIZES
    repeat = max(1, args.repeat)
    root = Path(tempfile.mkdtemp(prefix="eventlog-bench-"))
    say(f"working in {root}")
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    try:
        got = run_all(chosen, sizes, repeat, root)
    finally:
        if args.keep:
            say(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    meta = {
        "mode": "quick" if args.quick else "full",
        "repeat": repeat,
        "started": started,
        "wall_s": time.perf_counter() - t0,
        "sizes": asdict(sizes),
        "versions": versions(),
        "load_1min": [load_before, os.getloadavg()[0]],
        "only": args.only,
    }
    text, data = report(got, meta)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
        say(f"saved {args.json}")


if __name__ == "__main__":
    main()
