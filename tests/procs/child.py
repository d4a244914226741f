"""A tiny eventlog client for process tests: open the log, act as argv says, print "ready",
then one JSON line per result (flushed, so the parent sees each as it happens).

    child.py DB MODE [JSON options]

Modes:
  append   append `count` events {"p": producer, "seq": i} to `topic`, one per call; prints
           {"offset", "seq"} after each append returned. `gate`: wait for a "go" line first.
  serve    one JSON command per stdin line: {"op": "append", "topic", "payload", "key"?} ->
           {"offset", "partition", "t": monotonic before the call}; {"op": "exit"}.
  follow   read `topics` with follow=True from `start`; prints {"offset", "topic", "payload",
           "t": monotonic on receipt} per event, stops after `count` events.
  open     print "ready", wait for "go", then open (racing other children) and append one
           event; prints {"ok": true, "offset"} or {"error": type, "message"}.
  fork     open, append, fork; the child tries the inherited SyncLog and a new open (both
           refused) and exits through normal interpreter shutdown, after the parent closed
           its log when `order` is "parent-first", before the parent appends more otherwise.
           Prints "ready" then {"parent", "child" (the errors), "parent_seen", "status"}.

`api` picks "sync" (default) or "async"; `durability` is passed through.
Errors are printed as {"error": type name, "message": text} and exit with status 1.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import Any

import eventlog


def out(obj: Any) -> None:
    sys.stdout.write((obj if isinstance(obj, str) else json.dumps(obj)) + "\n")
    sys.stdout.flush()


def wait_go() -> None:
    line = sys.stdin.readline()
    if line.strip() != "go":
        raise SystemExit(f"expected 'go', got {line!r}")


def options_for(opts: dict[str, Any]) -> dict[str, Any]:
    return {k: opts[k] for k in ("durability", "default_partitions", "busy_timeout") if k in opts}


# -- append -----------------------------------------------------------------------------------


def append_sync(db: str, opts: dict[str, Any]) -> None:
    with eventlog.open_sync(db, **options_for(opts)) as log:
        out("ready")
        if opts.get("gate"):
            wait_go()
        for seq in range(opts["count"]):
            offset = log.append(opts["topic"], {"p": opts.get("producer", 0), "seq": seq})
            out({"offset": offset, "seq": seq})


async def append_async(db: str, opts: dict[str, Any]) -> None:
    async with eventlog.open(db, **options_for(opts)) as log:
        out("ready")
        if opts.get("gate"):
            wait_go()
        for seq in range(opts["count"]):
            offset = await log.append(opts["topic"], {"p": opts.get("producer", 0), "seq": seq})
            out({"offset": offset, "seq": seq})


# -- serve ------------------------------------------------------------------------------------


def serve(db: str, opts: dict[str, Any]) -> None:
    with eventlog.open_sync(db, **options_for(opts)) as log:
        out("ready")
        for line in sys.stdin:
            cmd = json.loads(line)
            if cmd["op"] == "exit":
                return
            try:
                if cmd["op"] == "append":
                    t = time.monotonic()
                    offset = log.append(cmd["topic"], cmd["payload"], key=cmd.get("key"))
                    event = log.get(offset)
                    assert event is not None
                    out({"offset": offset, "partition": event.partition, "t": t})
                elif cmd["op"] == "notify":
                    log.notify()
                    out({"ok": True})
                else:
                    out({"error": "UnknownCommand", "message": cmd["op"]})
            except eventlog.EventlogError as exc:
                out({"error": type(exc).__name__, "message": str(exc)})


# -- follow -----------------------------------------------------------------------------------


def follow_sync(db: str, opts: dict[str, Any]) -> None:
    with eventlog.open_sync(db, **options_for(opts)) as log:
        it = log.read(
            opts["topics"], start=opts.get("start", "earliest"), follow=True,
            idle_timeout=opts.get("idle_timeout", 60),
        )  # fmt: skip
        out("ready")
        follow_print(it, opts["count"])


def follow_print(it: Any, count: int) -> None:
    seen = 0
    try:
        for event in it:
            out({"offset": event.offset, "topic": event.topic, "payload": event.payload,
                 "t": time.monotonic()})  # fmt: skip
            seen += 1
            if seen >= count:
                return
    finally:
        it.close()


async def follow_async(db: str, opts: dict[str, Any]) -> None:
    async with eventlog.open(db, **options_for(opts)) as log:
        it = log.read(
            opts["topics"], start=opts.get("start", "earliest"), follow=True,
            idle_timeout=opts.get("idle_timeout", 60),
        )  # fmt: skip
        out("ready")
        seen = 0
        try:
            async for event in it:
                out({"offset": event.offset, "topic": event.topic, "payload": event.payload,
                     "t": time.monotonic()})  # fmt: skip
                seen += 1
                if seen >= opts["count"]:
                    return
        finally:
            await it.aclose()  # type: ignore[attr-defined]


# -- open race --------------------------------------------------------------------------------


def open_race(db: str, opts: dict[str, Any]) -> None:
    out("ready")
    wait_go()
    try:
        if opts.get("api") == "async":

            async def go() -> int:
                async with eventlog.open(db, **options_for(opts)) as log:
                    return await log.append("race", {"pid": os.getpid()})

            offset = asyncio.run(go())
        else:
            with eventlog.open_sync(db, **options_for(opts)) as log:
                offset = log.append("race", {"pid": os.getpid()})
    except eventlog.EventlogError as exc:
        out({"error": type(exc).__name__, "message": str(exc)})
        return
    out({"ok": True, "offset": offset})


# -- fork -------------------------------------------------------------------------------------


def fork(db: str, opts: dict[str, Any]) -> None:
    log = eventlog.open_sync(db)
    parent = [log.append("forked", {"who": "parent", "i": i}) for i in range(20)]
    results_r, results_w = os.pipe()
    release_r, release_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(results_r)
        os.close(release_w)
        refused = []
        for attempt in (lambda: log.append("forked", {"who": "child"}),
                        lambda: eventlog.open_sync(db)):  # fmt: skip
            try:
                attempt()
                refused.append("none")
            except eventlog.EventlogError as exc:
                refused.append(type(exc).__name__)
        with os.fdopen(results_w, "w") as pipe:
            json.dump({"child": refused}, pipe)
        os.read(release_r, 1)  # returns when the parent closes its end
        # Leave through normal interpreter shutdown: finalisers run here, including those
        # of the connection objects inherited from the parent.
        sys.exit(0)
    os.close(results_w)
    os.close(release_r)
    with os.fdopen(results_r) as pipe:
        child = json.load(pipe)
    parent_seen = None
    if opts["order"] == "parent-first":
        log.close()
        os.close(release_w)
        _, status = os.waitpid(pid, 0)
    else:
        os.close(release_w)
        _, status = os.waitpid(pid, 0)
        parent += [log.append("forked", {"who": "parent", "i": i}) for i in range(20, 40)]
        parent_seen = [e.offset for e in log.read("forked")]
        log.close()
    out("ready")
    out({"parent": parent, "child": child["child"], "status": status,
         "parent_seen": parent_seen})  # fmt: skip


def main() -> None:
    db, mode = sys.argv[1], sys.argv[2]
    opts = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    try:
        if mode == "append":
            if opts.get("api") == "async":
                asyncio.run(append_async(db, opts))
            else:
                append_sync(db, opts)
        elif mode == "serve":
            serve(db, opts)
        elif mode == "follow":
            if opts.get("api") == "async":
                asyncio.run(follow_async(db, opts))
            else:
                follow_sync(db, opts)
        elif mode == "open":
            open_race(db, opts)
        elif mode == "fork":
            fork(db, opts)
        else:
            raise SystemExit(f"unknown mode {mode!r}")
    except eventlog.EventlogError as exc:
        out({"error": type(exc).__name__, "message": str(exc)})
        sys.exit(1)


if __name__ == "__main__":
    main()
