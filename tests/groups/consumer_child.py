"""A consumer-group member in its own process, for the group tests.

    consumer_child.py DB JOURNAL [options]

Opens the log, runs one consumer (async API by default, `--api sync` for SyncLog.consume)
and prints "ready" once its first rebalance is done (it holds the lanes it is entitled to).
Every handler call appends fsynced JSON lines to JOURNAL, one `write` each:

    {"phase": "start", "group", "topic", "partition", "offset", "key", "payload", "pid",
     "time": wall clock, "mono": CLOCK_MONOTONIC (shared by all processes on the host)}
    {"phase": "end", ... same fields, "outcome": "ok" | "raise"}

plus {"phase": "lanes", "lanes": [[topic, partition], ...]} when the owned lanes change and
{"phase": "stalled", "done": offset} with --stall-after-batch.

What a handler does is chosen by the event's payload (a JSON object; anything else is "ok"):

    "do":    "ok" | "raise" | "exit" (os._exit(1)) | "hang" (never returns) |
             "sleep" (for "seconds") | "wait_file" (until "file" exists)
    "once":  a path: "do" applies only if the path does not exist yet (it is created,
             O_EXCL, just before); otherwise "after" (default "ok") applies.

`--sleep S` adds S seconds to every call (so that calls have a visible duration).
`--stall-after-batch`: after handling a batch, before its commit, journal "stalled" and
wait forever (for a test that SIGKILLs between handling and commit).
`--die-after-dead-letter`: os._exit(9) right after a dead-letter line was written (before
the position moves past the event).
Exit status: 0 after a graceful stop, 3 if the consumer raised.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from typing import Any

import eventlog
from eventlog import _consumer, _deadletter

JOURNAL_FD = -1


def journal(record: dict[str, Any]) -> None:
    record.setdefault("pid", os.getpid())
    record.setdefault("time", time.time())
    record.setdefault("mono", time.monotonic())
    data = (json.dumps(record, separators=(",", ":")) + "\n").encode()
    written = os.write(JOURNAL_FD, data)
    assert written == len(data)
    os.fsync(JOURNAL_FD)


def event_record(group: str, event: eventlog.Event, phase: str, **extra: Any) -> dict[str, Any]:
    return {
        "phase": phase,
        "group": group,
        "topic": event.topic,
        "partition": event.partition,
        "offset": event.offset,
        "key": event.key,
        "payload": event.payload,
        **extra,
    }


def choose(event: eventlog.Event) -> str:
    payload = event.payload
    if not isinstance(payload, dict):
        return "ok"
    do = str(payload.get("do", "ok"))
    once = payload.get("once")
    if once:
        try:
            os.close(os.open(once, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            do = str(payload.get("after", "ok"))
    return do


def act_sync(event: eventlog.Event, do: str) -> None:
    if do == "raise":
        raise RuntimeError(f"boom at offset {event.offset}")
    if do == "exit":
        os._exit(1)
    if do == "hang":
        while True:
            time.sleep(3600)
    if do == "sleep":
        time.sleep(float(event.payload["seconds"]))
    if do == "wait_file":
        deadline = time.monotonic() + 120
        while not os.path.exists(event.payload["file"]) and time.monotonic() < deadline:
            time.sleep(0.01)


async def act_async(event: eventlog.Event, do: str) -> None:
    if do == "raise":
        raise RuntimeError(f"boom at offset {event.offset}")
    if do == "exit":
        os._exit(1)
    if do == "hang":
        await asyncio.Event().wait()
    if do == "sleep":
        await asyncio.sleep(float(event.payload["seconds"]))
    if do == "wait_file":
        deadline = time.monotonic() + 120
        while not os.path.exists(event.payload["file"]) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)


def make_handlers(args: argparse.Namespace) -> dict[str, Any]:
    group, extra = args.group, args.sleep

    def sync_handler(event: eventlog.Event) -> None:
        journal(event_record(group, event, "start"))
        try:
            act_sync(event, choose(event))
            if extra:
                time.sleep(extra)
        except Exception:
            journal(event_record(group, event, "end", outcome="raise"))
            raise
        journal(event_record(group, event, "end", outcome="ok"))

    async def async_handler(event: eventlog.Event) -> None:
        journal(event_record(group, event, "start"))
        try:
            await act_async(event, choose(event))
            if extra:
                await asyncio.sleep(extra)
        except Exception:
            journal(event_record(group, event, "end", outcome="raise"))
            raise
        journal(event_record(group, event, "end", outcome="ok"))

    def sync_batch(events: list[eventlog.Event]) -> None:
        for event in events:
            journal(event_record(group, event, "start", batch=len(events)))
        try:
            for event in events:
                act_sync(event, choose(event))
            if extra:
                time.sleep(extra)
        except Exception:
            for event in events:
                journal(event_record(group, event, "end", outcome="raise", batch=len(events)))
            raise
        for event in events:
            journal(event_record(group, event, "end", outcome="ok", batch=len(events)))

    async def async_batch(events: list[eventlog.Event]) -> None:
        for event in events:
            journal(event_record(group, event, "start", batch=len(events)))
        try:
            for event in events:
                await act_async(event, choose(event))
            if extra:
                await asyncio.sleep(extra)
        except Exception:
            for event in events:
                journal(event_record(group, event, "end", outcome="raise", batch=len(events)))
            raise
        for event in events:
            journal(event_record(group, event, "end", outcome="ok", batch=len(events)))

    use_sync = args.api == "sync" or args.sync_handler
    if args.batch_handler:
        return {"batch_handler": sync_batch if use_sync else async_batch}
    return {"handler": sync_handler if use_sync else async_handler}


def install_hooks(args: argparse.Namespace) -> None:
    """Print "ready" after the first rebalance; journal lane changes; optionally stall."""
    rebalance = _consumer.Consumer._rebalance
    state = {"ready": False, "lanes": None}

    async def hooked_rebalance(self: _consumer.Consumer) -> None:
        await rebalance(self)
        lanes = [list(lane) for lane in self.owned_lanes]
        if lanes != state["lanes"]:
            state["lanes"] = lanes
            journal({"phase": "lanes", "group": self.group, "lanes": lanes})
        if not state["ready"]:
            state["ready"] = True
            sys.stdout.write("ready\n")
            sys.stdout.flush()

    _consumer.Consumer._rebalance = hooked_rebalance  # type: ignore[method-assign]

    if args.die_after_dead_letter:
        append = _deadletter.DeadLetterFile.append

        def append_then_die(self: Any, entry: Any, **kw: Any) -> Any:
            written = append(self, entry, **kw)
            journal({"phase": "dead-lettered", "offset": entry.offset})
            os._exit(9)
            return written

        _deadletter.DeadLetterFile.append = append_then_die  # type: ignore[method-assign]

    if args.stall_after_batch:
        handle_batch = _consumer.Consumer._handle_batch

        async def stalled(self: _consumer.Consumer, state: Any, batch: Any, revoked: Any) -> Any:
            done = await handle_batch(self, state, batch, revoked)
            journal({"phase": "stalled", "group": self.group, "done": done,
                     "lane": list(state.lane)})  # fmt: skip
            await asyncio.Event().wait()  # until SIGKILL

        _consumer.Consumer._handle_batch = stalled  # type: ignore[method-assign]


def consumer_options(args: argparse.Namespace) -> dict[str, Any]:
    start: Any = args.start
    if start not in ("earliest", "latest"):
        start = int(start)
    return {
        "start": start,
        "batch_size": args.batch_size,
        "max_attempts": args.max_attempts,
        "retry_backoff": args.retry_backoff,
        "max_backoff": args.max_backoff,
        "timeout": args.timeout,
        "hard_timeout": args.hard_timeout,
    }


async def run_async(args: argparse.Namespace) -> None:
    async with eventlog.open(args.db) as log:
        consumer = log.consumer(args.group, args.topics, **make_handlers(args),
                                **consumer_options(args))  # fmt: skip
        await consumer.run()


def run_sync(args: argparse.Namespace) -> None:
    with eventlog.open_sync(args.db) as log:
        log.consume(args.group, args.topics, **make_handlers(args), **consumer_options(args))


def main() -> int:
    global JOURNAL_FD
    parser = argparse.ArgumentParser()
    parser.add_argument("db")
    parser.add_argument("journal")
    parser.add_argument("--group", default="g")
    parser.add_argument("--topic", action="append", dest="topics", default=[])
    parser.add_argument("--api", choices=["async", "sync"], default="async")
    parser.add_argument("--sync-handler", action="store_true")
    parser.add_argument("--batch-handler", action="store_true")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--max-attempts", type=int, default=5)
    parser.add_argument("--retry-backoff", type=float, default=0.01)
    parser.add_argument("--max-backoff", type=float, default=0.05)
    parser.add_argument("--timeout", type=float, default=None)
    parser.add_argument("--hard-timeout", type=float, default=None)
    parser.add_argument("--start", default="earliest")
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--stall-after-batch", action="store_true")
    parser.add_argument("--die-after-dead-letter", action="store_true")
    args = parser.parse_args()
    if not args.topics:
        parser.error("give at least one --topic")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format=f"[child {os.getpid()}] %(levelname)s %(message)s")  # fmt: skip
    JOURNAL_FD = os.open(args.journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                         0o600)  # fmt: skip
    install_hooks(args)
    try:
        if args.api == "sync":
            run_sync(args)
        else:
            asyncio.run(run_async(args))
    except Exception:
        logging.exception("consumer failed")
        return 3
    sys.stdout.write("stopped\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
