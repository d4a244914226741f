#!/usr/bin/env python3
"""One process of the crash suite (scripts/chaos.py starts, kills and restarts these).

    _chaos_worker.py producer --db D --slot N --journal J [--mode sync|async] ...
    _chaos_worker.py consumer --db D --group G --slot N --journal J [--max-attempts 3] ...

Producer: appends events numbered n = 0, 1, 2 ... in windows of WINDOW events. Event n of
slot s has the unique id "p{s}-{n}" (also its dedupe_key), the key "p{s}-k{n % WINDOW}" (so
one window never holds a key twice) and that key's sequence number n // WINDOW. Whether it
is poison is a pure function of (s, n). Only after an append *returned* is its (id, offset)
written to the journal and fsynced. On restart the producer reads its journal and resumes at
the window of the first event it never journaled, appending it again with the same
dedupe_key: an append that committed before the kill gets its first offset back, nothing is
stored twice. An event in the log without a journal line is fine; a journaled event missing
from the log would be a loss.

Consumer: a member of a consumer group. Its handler journals every delivery (group, offset,
id, key, seq, pid, time) and fsyncs *before* anything else; then a poison event raises, or
(kind "exit") ends the whole process with os._exit(POISON_EXIT).

Journals are JSON lines, one os.write per line or window, appended across restarts; a
reader skips a torn last line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import eventlog

TOPIC = "chaos.orders"
WINDOW = 8
POISON_EXIT = 3
CRASH_AFTER_COMMIT = 4  # a producer dying in the worst spot: committed, not yet journaled


class Poison(Exception):
    """What a poison event's handler raises."""


def poison_kind(slot: int, n: int, raise_rate: float, exit_rate: float) -> str | None:
    h = zlib.crc32(f"poison:{slot}:{n}".encode()) / 2**32
    if h < raise_rate:
        return "raise"
    if h < raise_rate + exit_rate:
        return "exit"
    return None


def body_checksum(body: dict[str, Any]) -> int:
    return zlib.crc32(json.dumps(body, sort_keys=True, ensure_ascii=False).encode("utf-8"))


def make_event(slot: int, n: int, raise_rate: float, exit_rate: float) -> dict[str, Any]:
    body = {
        "id": f"p{slot}-{n}",
        "key": f"p{slot}-k{n % WINDOW}",
        "seq": n // WINDOW,
        "poison": poison_kind(slot, n, raise_rate, exit_rate),
        # something besides ASCII and flat values, so a mangled payload shows
        "text": "ünïcødé ✓ " + "x" * (n % 37),
        "nested": {"n": n, "big": 2**70 + n, "list": [n, None, True, {"deep": [n % 5]}]},
    }
    return {**body, "sum": body_checksum(body)}


class Journal:
    """Append-only JSON lines, fsynced after every write."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def write(self, records: list[dict[str, Any]]) -> None:
        data = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records)
        os.write(self.fd, data.encode("utf-8"))
        os.fsync(self.fd)


def read_journal(path: str | Path) -> list[dict[str, Any]]:
    records = []
    try:
        with open(path, "rb") as f:
            content = f.read()
    except FileNotFoundError:
        return records
    for raw in content.split(b"\n"):
        if not raw.strip():
            continue
        # a line torn by a kill mid-write is skipped (one write per line makes it rare)
        with contextlib.suppress(ValueError):
            records.append(json.loads(raw))
    return records


# -- producer ---------------------------------------------------------------------------------


def resume_point(journal_path: str) -> int:
    done = {int(r["n"]) for r in read_journal(journal_path)}
    n = 0
    while n in done:
        n += 1
    return n - n % WINDOW


def run_producer(args: argparse.Namespace) -> int:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    restarted = os.path.exists(args.journal)
    journal = Journal(args.journal)
    n = resume_point(args.journal)
    # after a restart, the window in hand when the last process died is appended again
    retried_until = n + WINDOW if restarted else 0
    rng = random.Random()
    interval = WINDOW / args.rate if args.rate > 0 else 0.0

    def window(start: int) -> list[dict[str, Any]]:
        return [make_event(args.slot, m, args.raise_rate, args.exit_rate)
                for m in range(start, start + WINDOW)]  # fmt: skip

    def journal_window(events: list[dict[str, Any]], offsets: list[int]) -> None:
        if rng.random() < args.crash_after_commit:
            os._exit(CRASH_AFTER_COMMIT)
        retry = 1 if n < retried_until else 0
        journal.write([{"n": int(e["id"].split("-")[1]), "id": e["id"], "o": o, "r": retry}
                       for e, o in zip(events, offsets, strict=True)])  # fmt: skip

    next_at = time.monotonic()
    if args.mode == "async":

        async def main() -> None:
            nonlocal n, next_at
            async with eventlog.open(args.db, durability=args.durability) as log:
                while not stop.is_set():
                    events = window(n)
                    # concurrent callers: one group commit takes several of them
                    offsets = await asyncio.gather(*(
                        log.append(TOPIC, e, key=e["key"], dedupe_key=e["id"],
                                   headers={"producer": str(args.slot)})
                        for e in events
                    ))  # fmt: skip
                    journal_window(events, list(offsets))
                    n += WINDOW
                    next_at += interval
                    delay = next_at - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    else:
                        next_at = time.monotonic()

        asyncio.run(main())
        return 0

    with eventlog.open_sync(args.db, durability=args.durability) as log:
        while not stop.is_set():
            events = window(n)
            if (n // WINDOW) % 2:
                offsets = log.append_many([
                    eventlog.Draft(TOPIC, e, key=e["key"], dedupe_key=e["id"],
                                   headers={"producer": str(args.slot)})
                    for e in events
                ])  # fmt: skip
            else:
                offsets = [log.append(TOPIC, e, key=e["key"], dedupe_key=e["id"])
                           for e in events]  # fmt: skip
            journal_window(events, offsets)
            n += WINDOW
            next_at += interval
            delay = next_at - time.monotonic()
            if delay > 0:
                stop.wait(delay)
            else:
                next_at = time.monotonic()
    return 0


# -- consumer ---------------------------------------------------------------------------------


def run_consumer(args: argparse.Namespace) -> int:
    journal = Journal(args.journal)
    pid = os.getpid()
    lock = threading.Lock()

    def record(event: eventlog.Event) -> dict[str, Any]:
        p = event.payload
        body = {k: v for k, v in p.items() if k != "sum"} if isinstance(p, dict) else {}
        intact = isinstance(p, dict) and p.get("sum") == body_checksum(body)
        return {
            "g": args.group, "o": event.offset, "id": body.get("id"), "k": event.key,
            "s": body.get("seq"), "pt": event.partition, "pid": pid,
            "t": time.monotonic_ns(), "ok": intact,
        }  # fmt: skip

    def act(event: eventlog.Event) -> None:
        kind = event.payload.get("poison") if isinstance(event.payload, dict) else None
        if kind == "exit":
            os._exit(POISON_EXIT)
        if kind == "raise":
            raise Poison(f"poison event {event.payload.get('id')}")

    def handler(event: eventlog.Event) -> None:
        with lock:
            journal.write([record(event)])
        act(event)

    def batch_handler(events: list[eventlog.Event]) -> None:
        for event in events:
            with lock:
                journal.write([record(event)])
            act(event)

    with eventlog.open_sync(args.db, durability=args.durability) as log:
        options: dict[str, Any] = {
            "max_attempts": args.max_attempts,
            "retry_backoff": 0.02,
            "max_backoff": 0.2,
            "batch_size": args.batch_size,
        }
        if args.batch:
            log.consume(args.group, TOPIC, batch_handler=batch_handler, **options)
        else:
            log.consume(args.group, TOPIC, handler, **options)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="role", required=True)
    prod = sub.add_parser("producer")
    prod.add_argument("--mode", choices=["sync", "async"], default="sync")
    prod.add_argument("--rate", type=float, default=150.0, help="events per second (0: no limit)")
    prod.add_argument("--raise-rate", type=float, default=0.004)
    prod.add_argument("--exit-rate", type=float, default=0.001)
    prod.add_argument("--crash-after-commit", type=float, default=0.0,
                      help="chance per window of dying between commit and journal")  # fmt: skip
    cons = sub.add_parser("consumer")
    cons.add_argument("--group", required=True)
    cons.add_argument("--max-attempts", type=int, default=3)
    cons.add_argument("--batch-size", type=int, default=50)
    cons.add_argument("--batch", action="store_true", help="use a batch handler")
    for p in (prod, cons):
        p.add_argument("--db", required=True)
        p.add_argument("--slot", type=int, required=True)
        p.add_argument("--journal", required=True)
        p.add_argument("--durability", choices=["full", "normal"], default="full")
    args = parser.parse_args(argv)
    return run_producer(args) if args.role == "producer" else run_consumer(args)


if __name__ == "__main__":
    sys.exit(main())
