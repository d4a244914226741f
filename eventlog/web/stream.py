"""GET /api/v1/stream: the log as Server-Sent Events, resumable exactly across restarts.

Frames:
- an event: `id:` its offset, `data:` the event as one line of JSON (the default `message`
  type, so `EventSource.onmessage` gets it);
- `retry:` once, first; then an id-only frame naming the resume point (so that a reconnect
  before the first event still resumes exactly, even from `from=latest`);
- `: keepalive` after `keepalive` seconds of silence;
- an id-only checkpoint (at most once per keep-alive period) when the log moved on without a
  matching event: the browser's Last-Event-ID follows it, so a reconnect never rescans
  what was filtered out;
- `event: gap` (no id) when the resume point was pruned, naming the first offset left, or
  lies past the head (the log was restored or made anew): the stream goes on after the head;
- `event: bye` when the server shuts down.

Each connection has its own cursor and reads its own pages through the server's one
AsyncLog, in short read transactions closed before anything is sent, and each send is
bounded by `send_timeout`: a slow or stalled client only ever holds up itself, never a read
transaction (the WAL) or another stream. Wake-ups come from one AsyncWaiter per server (the
library's cross-process signal), fanned out to the streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl

from .. import _core, _db, _times
from .._async import AsyncLog, AsyncWaiter
from .._core import Event, parse_whole
from ..errors import EventlogError, InvalidArgument, StorageError
from . import queries
from .auth import Receive, Scope, Send, send_json_error

log = logging.getLogger("eventlog.web")

PAGE_EVENTS = 500  # events read per page, and at most per write
WRITE_MAX_BYTES = 256 * 1024  # bytes per write (one larger event goes alone)
RETRY_MS = 1000
BYE_TIMEOUT_S = 0.5


class Hub:
    """The server's streams in one place: the wake-up fan-out, the open-stream count, and
    the shutdown that ends them all."""

    def __init__(self, alog: AsyncLog, max_streams: int) -> None:
        self.alog = alog
        self.max_streams = max_streams
        self.open_streams = 0
        self.streams_served = 0
        self.closing = False
        self._subscribers: set[asyncio.Event] = set()
        self._waiter: AsyncWaiter | None = None
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        # The file this server opened: replaced or removed, its connections go on with the
        # old one, which nobody else reads (an append there would be lost).
        self.db = alog.paths.db
        self.file_id = _db.database_file_id(self.db)
        self._relay_failing = False

    def check_file(self) -> None:
        """StorageError once the database file was replaced or removed since the server
        opened it: nothing may be read from or written to the old one any more."""
        try:
            current: tuple[int, int] | None = _db.database_file_id(self.db)
        except FileNotFoundError:
            current = None
        if current != self.file_id:
            raise StorageError(
                f"the database file {self.db} was replaced or removed while eventlog serve "
                "had it open",
                hint="restart eventlog serve to open the file that is there now",
            )

    def start(self) -> None:
        # Subscribed before any stream reads: a commit after a stream's read always wakes it.
        self._waiter = self.alog.waiter()
        self._task = asyncio.create_task(self._relay())

    async def _relay(self) -> None:
        assert self._waiter is not None
        while not self._stop.is_set():
            try:
                changed = await self._waiter.wait(self._stop, None)
                self._relay_failing = False
            except Exception as exc:
                # (the database file replaced, say) the streams must go on: wake them every
                # second instead (said once, not every second)
                if not self._relay_failing:
                    log.error("wake-ups failed, polling every second: %s", exc)
                    self._relay_failing = True
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), 1.0)
                changed = True
            if changed:
                self.wake_all()

    def wake_all(self) -> None:
        for event in self._subscribers:
            event.set()

    def subscribe(self) -> asyncio.Event:
        event = asyncio.Event()
        self._subscribers.add(event)
        return event

    def unsubscribe(self, event: asyncio.Event) -> None:
        self._subscribers.discard(event)

    def begin_shutdown(self) -> None:
        """Every open stream sends `event: bye` and ends; new ones are refused."""
        self.closing = True
        self.wake_all()

    async def close(self) -> None:
        self.begin_shutdown()
        self._stop.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._waiter is not None:
            self._waiter.close()
            self._waiter = None


@dataclass(frozen=True)
class StreamRequest:
    patterns: tuple[str, ...]
    start: str | int | datetime
    resume: int | None  # Last-Event-ID or ?after=: the last offset the client has


def parse_request(query_string: bytes, last_event_id: str | None) -> StreamRequest:
    """`topic` (repeatable; default every topic), then the start: a valid Last-Event-ID
    header wins over `after`, which wins over `from` (default latest). A bad `after` or
    `from` is an error even when Last-Event-ID wins, so a broken URL shows at once."""
    pairs = parse_qsl(query_string.decode("latin-1"), keep_blank_values=True)
    patterns = tuple(v for k, v in pairs if k == "topic") or ("#",)
    for pattern in patterns:
        _core.check_pattern(pattern)
    after_values = [v for k, v in pairs if k == "after"]
    from_values = [v for k, v in pairs if k == "from"]
    resume: int | None = None
    if after_values:
        resume = parse_whole(after_values[-1])
        if resume is None or resume < 0:
            raise InvalidArgument(f"invalid after {after_values[-1]!r}: use an offset (0 or more)",
                                  hint="after=N starts with the event after offset N")  # fmt: skip
    start: str | int | datetime = "latest"
    if from_values:
        start = _times.parse_start(from_values[-1])
    if last_event_id is not None:  # one that is not an offset is ignored
        offset = parse_whole(last_event_id)
        if offset is not None and offset >= 0:
            resume = offset
    return StreamRequest(patterns, start, resume)


def event_frame(event: Event) -> bytes:
    data = json.dumps(event.to_dict(), ensure_ascii=False, separators=(",", ":"))
    return f"id: {event.offset}\ndata: {data}\n\n".encode()


def batches(events: Sequence[Event]) -> list[bytes]:
    """Frames joined into writes of at most PAGE_EVENTS events and WRITE_MAX_BYTES bytes."""
    writes: list[bytes] = []
    current: list[bytes] = []
    size = 0
    for event in events:
        frame = event_frame(event)
        if current and (len(current) >= PAGE_EVENTS or size + len(frame) > WRITE_MAX_BYTES):
            writes.append(b"".join(current))
            current, size = [], 0
        current.append(frame)
        size += len(frame)
    if current:
        writes.append(b"".join(current))
    return writes


class _Gone(Exception):
    """The client went away, or stopped reading for longer than send_timeout."""


class StreamEndpoint:
    """The ASGI app behind GET /api/v1/stream (auth and Host checks ran before it)."""

    def __init__(self, hub: Hub, *, keepalive: float, send_timeout: float) -> None:
        self.hub = hub
        self.keepalive = keepalive
        self.send_timeout = send_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        hub = self.hub
        last_event_id = None
        for name, value in scope.get("headers", []):
            if name.lower() == b"last-event-id":
                last_event_id = value.decode("latin-1")
        try:
            request = parse_request(scope.get("query_string", b""), last_event_id)
        except EventlogError as exc:
            await send_json_error(send, 400, type(exc).__name__, str(exc), exc.hint)
            return
        if hub.closing:
            await send_json_error(send, 503, "ShuttingDown", "the server is shutting down",
                                  "reconnect in a moment", [(b"retry-after", b"2")])  # fmt: skip
            return
        if hub.open_streams >= hub.max_streams:
            await send_json_error(
                send, 503, "TooManyStreams",
                f"this server has {hub.open_streams} streams open, its limit (--max-streams)",
                "close other tabs, or restart eventlog serve with a higher --max-streams",
                [(b"retry-after", b"5")],
            )  # fmt: skip
            return
        hub.open_streams += 1
        hub.streams_served += 1
        wake = hub.subscribe()
        gone = asyncio.Event()

        async def watch_disconnect() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    gone.set()
                    wake.set()
                    return

        watcher = asyncio.create_task(watch_disconnect())
        try:
            await self._serve(request, send, wake, gone)
        except _Gone:
            pass
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            hub.unsubscribe(wake)
            hub.open_streams -= 1

    async def _send(self, send: Send, body: bytes, gone: asyncio.Event) -> None:
        if gone.is_set():
            raise _Gone
        try:
            await asyncio.wait_for(
                send({"type": "http.response.body", "body": body, "more_body": True}),
                self.send_timeout,
            )
        except TimeoutError:
            log.warning("stream closed: the client read nothing for %ss (--send-timeout)",
                        self.send_timeout)  # fmt: skip
            raise _Gone from None
        except OSError:
            raise _Gone from None

    async def _serve(
        self, request: StreamRequest, send: Send, wake: asyncio.Event, gone: asyncio.Event
    ) -> None:
        alog = self.hub.alog
        try:
            self.hub.check_file()
            opened = await alog.run_read(
                queries.stream_open_plan(request.patterns, request.start, request.resume),
                queries.newest_of_start,
            )
        except EventlogError as exc:
            await send_json_error(send, 400 if isinstance(exc, InvalidArgument) else 503,
                                  type(exc).__name__, str(exc), exc.hint)  # fmt: skip
            return
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-store"), (b"x-accel-buffering", b"no")]})  # fmt: skip
        cursor, last_id = opened.cursor, opened.floor
        head: list[bytes] = [f"retry: {RETRY_MS}\n\n".encode()]
        if opened.gap_first is not None:
            after = opened.gap_after if opened.gap_after is not None else opened.floor
            gap = {"after": after, "first_available": opened.gap_first}
            head.append(f"event: gap\ndata: {json.dumps(gap)}\n\n".encode())
        head.append(f"id: {last_id}\n\n".encode())
        await self._send(send, b"".join(head), gone)
        now = time.monotonic()
        last_write = last_checkpoint = now
        pending_checkpoint: int | None = None
        while True:
            if self.hub.closing:
                # briefly: a client that stopped reading must not hold up the shutdown
                bye = b'event: bye\ndata: {"reason":"shutdown"}\n\n'
                with contextlib.suppress(TimeoutError, OSError):
                    for message in ({"body": bye, "more_body": True}, {"body": b""}):
                        await asyncio.wait_for(
                            send({"type": "http.response.body", **message}), BYE_TIMEOUT_S
                        )
                return
            if gone.is_set():
                return
            wake.clear()  # before the read: a commit after it sets it again
            try:
                self.hub.check_file()
                events, through = await alog.run_read(
                    queries.stream_page_plan(cursor, opened.floor, PAGE_EVENTS),
                    queries.newest_of_stream_page,
                )
            except EventlogError as exc:
                # end the response cleanly: the browser reconnects from its last id
                log.warning("stream ended: %s", exc)
                with contextlib.suppress(TimeoutError, OSError):
                    await asyncio.wait_for(
                        send({"type": "http.response.body", "body": b""}), BYE_TIMEOUT_S
                    )
                return
            if events:
                for body in batches(events):
                    await self._send(send, body, gone)
                last_id = events[-1].offset
                last_write = time.monotonic()
            if through is not None and through > last_id:
                pending_checkpoint = through
            elif pending_checkpoint is not None and pending_checkpoint <= last_id:
                pending_checkpoint = None
            if through is None:
                continue  # a partition filled its page: read on at once
            # idle: wait for a commit, the next checkpoint, or the keep-alive
            while True:
                now = time.monotonic()
                if pending_checkpoint is not None and now >= last_checkpoint + self.keepalive:
                    await self._send(send, f"id: {pending_checkpoint}\n\n".encode(), gone)
                    last_id, pending_checkpoint = pending_checkpoint, None
                    last_write = last_checkpoint = now
                elif now >= last_write + self.keepalive:
                    await self._send(send, b": keepalive\n\n", gone)
                    last_write = now
                due = last_write + self.keepalive
                if pending_checkpoint is not None:
                    due = min(due, last_checkpoint + self.keepalive)
                if wake.is_set():
                    break
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(wake.wait(), max(0.0, due - time.monotonic()))
                if wake.is_set():
                    break


def stream_stats(hub: Hub) -> dict[str, Any]:
    return {"open_streams": hub.open_streams, "max_streams": hub.max_streams,
            "streams_served": hub.streams_served}  # fmt: skip
