"""The demo's child processes: `python -m eventlog._demo_worker producer|consumer ...`.

A producer appends keyed order events in small paced batches and prints one JSON line with
what it appended. A consumer is one member of a consumer group; its handler records every
delivery as one fsynced JSON line in its own journal file, so the demo can count deliveries
and duplicates without trusting the library it is checking.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
import time
import zlib
from typing import Any

import eventlog

TOPIC = "orders"
# An order whose amount was typed with a decimal comma: no retry will ever parse it.
POISON_AMOUNT = "12,50"


def order(producer: int, i: int, poison: bool) -> eventlog.Draft:
    customer = f"customer-{zlib.crc32(f'{producer}:{i}'.encode()) % 40:02d}"
    amount: Any = POISON_AMOUNT if poison else round(5 + (i * 37 % 9000) / 100, 2)
    return eventlog.Draft(
        TOPIC,
        {"order": f"p{producer}-{i:04d}", "customer": customer, "amount": amount},
        key=customer,
    )


def produce(args: argparse.Namespace) -> int:
    poison_offset = None
    appended = 0
    with eventlog.open_sync(args.db) as log:
        i = 0
        while i < args.count:
            n = min(args.batch, args.count - i)
            drafts = [order(args.id, i + j, i + j == args.poison_at) for j in range(n)]
            offsets = log.append_many(drafts)
            if args.poison_at in range(i, i + n):
                poison_offset = offsets[args.poison_at - i]
            appended += n
            i += n
            if args.pause:
                time.sleep(args.pause)
    print(json.dumps({"producer": args.id, "appended": appended, "poison_offset": poison_offset}))
    return 0


class Journal:
    """One fsynced JSON line per handler call, written with a single O_APPEND write."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        self.pid = os.getpid()
        self._lock = threading.Lock()  # handlers of different partitions run in threads

    def record(self, event: eventlog.Event, result: str) -> None:
        line = json.dumps(
            {"o": event.offset, "p": event.partition, "k": event.key, "r": result, "pid": self.pid},
            separators=(",", ":"),
        )
        with self._lock:
            os.write(self.fd, line.encode() + b"\n")
            os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


async def consume(args: argparse.Namespace) -> int:
    journal = Journal(args.journal)

    def handle(event: eventlog.Event) -> None:
        # Runs in a worker thread (a sync handler); one call at a time per partition.
        try:
            float(event.payload["amount"])
        except ValueError:
            journal.record(event, "raise")
            raise
        if args.work_ms:
            time.sleep(args.work_ms / 1000)  # the "work": billing an order takes a moment
        journal.record(event, "ok")

    try:
        async with eventlog.open(args.db) as log:
            consumer = log.consumer(
                args.group,
                TOPIC,
                handle,
                batch_size=args.batch_size,
                max_attempts=args.max_attempts,
                retry_backoff=0.05,
                max_backoff=0.2,
            )
            await consumer.run()  # until SIGTERM: finishes the event in hand and commits
            s = consumer.stats
            print(
                f"pid {os.getpid()} {args.group}: handled {s.handled}, failed attempts "
                f"{s.failed_attempts}, dead-lettered {s.dead_lettered}",
                flush=True,
            )
    finally:
        journal.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eventlog._demo_worker")
    roles = parser.add_subparsers(dest="role", required=True)
    p = roles.add_parser("producer")
    p.add_argument("--db", required=True)
    p.add_argument("--id", type=int, required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--batch", type=int, default=10)
    p.add_argument("--pause", type=float, default=0.02)
    p.add_argument("--poison-at", type=int, default=-1)
    c = roles.add_parser("consumer")
    c.add_argument("--db", required=True)
    c.add_argument("--group", required=True)
    c.add_argument("--journal", required=True)
    c.add_argument("--work-ms", type=float, default=0.0)
    c.add_argument("--batch-size", type=int, default=20)
    c.add_argument("--max-attempts", type=int, default=3)
    args = parser.parse_args(argv)
    if args.role == "producer":
        return produce(args)
    return asyncio.run(consume(args))


if __name__ == "__main__":
    sys.exit(main())
