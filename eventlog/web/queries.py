"""Plans the web server drives with `log.run(plan, mode)`: composed from the library's plans
and `eventlog._sql` constants, never SQL text of their own; plus the pure shaping of dead
letters into pages. No Starlette here, so the logic is testable on its own.
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from .. import _core, _sql
from .._core import Event, Lane, Plan, ReadCursor, Row, Stmt, parse_whole
from .._deadletter import DeadLetter
from .._tail import NEVER
from ..errors import InvalidArgument

# -- the stream ---------------------------------------------------------------------------


@dataclass
class StreamStart:
    cursor: ReadCursor
    floor: int  # the resume point: every matching event after it is still to be sent
    gap_first: int | None  # set when the resume point was pruned: the first offset left
    gap_after: int | None = None  # the client's resume point, when the stream starts elsewhere


def newest_of_start(start: StreamStart) -> int:
    """What a stream's opening hands out (for run_read): its first `id:`, the resume point."""
    return start.floor


def stream_open_plan(
    patterns: Sequence[str], start: str | int | datetime, resume: int | None
) -> Plan[StreamStart]:
    """A cursor for a new stream. `resume` (an offset the client already has, from
    Last-Event-ID or ?after=) wins over `start`.

    The resume point counts as pruned when the event at it is gone and every matching
    partition's first stored event is past the next offset: then the events in between
    may have been deleted, and the client is told so (offsets are shared by all topics, so
    a partition starting late is not proof on its own).

    A resume point past the head is an offset this log never handed out (the tab saw
    another log: this one was restored from a backup or made anew). Waiting for the offsets
    to get there would skip every event until then without a word: the stream starts after
    the head instead, with a gap naming the client's resume point.
    """
    if resume is not None:
        head = yield from _core.head_plan()
        if resume > head:
            cursor = yield from _core.open_cursor_plan(list(patterns), head + 1)
            return StreamStart(cursor, head, head + 1, resume)
        cursor = yield from _core.open_cursor_plan(list(patterns), resume + 1)
        gap = None
        if resume > 0:
            firsts = []
            for lane in cursor.positions:
                rows = yield Stmt(_sql.FIRST_OFFSET_IN_LANE, lane)
                if rows[0][0] is not None:
                    firsts.append(int(rows[0][0]))
            if firsts and min(firsts) > resume + 1:
                rows = yield Stmt(_sql.READ_EVENT, (resume,))
                if not rows:
                    gap = min(firsts)
        return StreamStart(cursor, resume, gap)
    cursor = yield from _core.open_cursor_plan(list(patterns), start)
    if cursor.positions:
        floor = min(cursor.positions.values())
    elif start == "latest":
        floor = yield from _core.head_plan()
    elif isinstance(start, int):
        floor = max(start - 1, 0)
    else:
        floor = 0  # earliest, or a time: whatever comes later is after it
    return StreamStart(cursor, floor, None)


def newest_of_stream_page(page: tuple[list[Event], int | None]) -> int:
    """What a stream page hands out (for run_read): its events, and the `id:` it may send."""
    events, through = page
    return max(events[-1].offset if events else 0, through or 0)


def stream_page_plan(
    cursor: ReadCursor, floor: int, page: int
) -> Plan[tuple[list[Event], int | None]]:
    """The next events of a stream, and the offset the stream has now seen everything
    through (the head of this snapshot) when no partition filled its page, else None.

    Partitions that appeared since the last page (a new topic matching a pattern) start at
    the stream's resume point, so a resumed stream never replays what came before it.
    """
    for lane in (yield from _core.resolve_lanes_plan(cursor.patterns)):
        cursor.positions.setdefault(lane, floor)
    per_lane = max(10, page // max(1, len(cursor.positions)))
    events = yield from _core.read_page_plan(cursor, per_lane, False)
    counts: dict[Lane, int] = {}
    for e in events:
        counts[(e.topic, e.partition)] = counts.get((e.topic, e.partition), 0) + 1
    if any(n >= per_lane for n in counts.values()):
        return events, None
    head = yield from _core.head_plan()
    return events, head


# -- browsing -----------------------------------------------------------------------------

PREVIEW_MAX_CHARS = 64 * 1024  # larger payloads are left out of lists (fetch the event)


@dataclass(frozen=True)
class BrowseQuery:
    patterns: tuple[str, ...]
    newest_first: bool = True
    cursor: int | None = None  # newest first: offsets below it; oldest first: above it
    since_ms: int | None = None
    until_ms: int | None = None
    key: str | None = None
    text: str | None = None
    limit: int = 50
    scan_limit: int = 10_000


@dataclass
class BrowsePage:
    events: list[dict[str, Any]] = field(default_factory=list)
    scanned: int = 0  # events looked at (the text and key filters run over these)
    scanned_to: int | None = None  # the last offset looked at
    next_cursor: int | None = None  # where the next page starts; None: nothing more
    scan_limited: bool = False  # stopped by scan_limit before finding `limit` events


def _row_json(row: Row) -> dict[str, Any]:
    offset, topic, partition, key, payload, headers, created_at = row
    item: dict[str, Any] = {
        "offset": offset, "topic": topic, "partition": partition, "key": key,
        "headers": json.loads(headers) if headers else {}, "timestamp_ms": created_at,
    }  # fmt: skip
    if len(payload) > PREVIEW_MAX_CHARS:
        item["payload"] = None
        item["payload_omitted"] = True
        item["payload_chars"] = len(payload)
    else:
        item["payload"] = json.loads(payload)
    return item


def _matches(row: Row, key: str | None, needle: str | None) -> bool:
    if key is not None and row[3] != key:
        return False
    if needle is None:
        return True
    return any(part is not None and needle in part.casefold() for part in (row[4], row[3], row[5]))


def newest_of_browse(page: BrowsePage) -> int:
    """What a browse page hands out (for run_read): its events, and how far it looked."""
    return max([int(e["offset"]) for e in page.events] + [page.scanned_to or 0])


def browse_plan(q: BrowseQuery) -> Plan[BrowsePage]:
    """A page of the matching topics' events, newest or oldest first, merged across
    partitions by offset, filtered by time (bisection per partition), key (only the key's
    partition is read) and text (a case-insensitive substring of payload, key or headers).

    At most `scan_limit` events are looked at: a text search over a large log answers in
    bounded time and says where it stopped, so the next call can go on from there.
    """
    compiled = _core.compile_patterns(list(q.patterns))
    lanes: list[Lane] = []
    for name, partitions in (yield Stmt(_sql.ALL_TOPIC_PARTITIONS)):
        if not _core.topic_matches(compiled, name):
            continue
        n = int(partitions)
        chosen = range(n) if q.key is None else [_core.partition_for(q.key, n, 0)]
        lanes.extend((str(name), p) for p in chosen)
    bounds: dict[Lane, list[int]] = {}  # lane -> [after, through]
    for lane in lanes:
        after, through = 0, NEVER
        if q.since_ms is not None:
            after = yield from _core.offset_before_time_plan(lane, q.since_ms)
        if q.until_ms is not None:
            through = yield from _core.offset_before_time_plan(lane, q.until_ms)
        if q.cursor is not None:
            if q.newest_first:
                through = min(through, q.cursor - 1)
            else:
                after = max(after, q.cursor)
        if after < through:
            bounds[lane] = [after, through]
    page = min(max(q.limit + 1, 20), 500, max(10, 2000 // max(1, len(bounds))))
    buffers: dict[Lane, list[Row]] = {}
    heap: list[tuple[int, Lane]] = []

    def refill(lane: Lane) -> Plan[None]:
        after, through = bounds[lane]
        sql = _sql.READ_LANE_RANGE_DESC if q.newest_first else _sql.READ_LANE_RANGE
        rows = yield Stmt(sql, (lane[0], lane[1], after, through, page))
        if len(rows) < page:
            bounds[lane] = [0, 0]  # exhausted
        elif q.newest_first:
            bounds[lane][1] = int(rows[-1][0]) - 1
        else:
            bounds[lane][0] = int(rows[-1][0])
        buffers[lane] = list(reversed(rows))  # pop() from the end takes the next one
        if rows:
            first = int(rows[0][0])
            heapq.heappush(heap, (-first if q.newest_first else first, lane))

    for lane in list(bounds):
        yield from refill(lane)
    result = BrowsePage()
    needle = q.text.casefold() if q.text else None
    while heap and len(result.events) < q.limit and result.scanned < q.scan_limit:
        _, lane = heapq.heappop(heap)
        row = buffers[lane].pop()
        result.scanned += 1
        result.scanned_to = int(row[0])
        if _matches(row, q.key, needle):
            result.events.append(_row_json(row))
        if buffers[lane]:
            nxt = int(buffers[lane][-1][0])
            heapq.heappush(heap, (-nxt if q.newest_first else nxt, lane))
        elif bounds[lane][0] < bounds[lane][1]:
            yield from refill(lane)
    if heap:
        result.next_cursor = result.scanned_to
        result.scan_limited = len(result.events) < q.limit
    return result


# -- groups -------------------------------------------------------------------------------


def lag_times_plan(lanes: Sequence[tuple[str, int, int, int]], now_ms: int) -> Plan[list[int]]:
    """For each (topic, partition, position, lag): how long the oldest event the group has
    not handled has been waiting, in ms (0 when it is caught up). One index seek each."""
    found = []
    for topic, partition, position, lag in lanes:
        if lag <= 0:
            found.append(0)
            continue
        rows = yield Stmt(_sql.LANE_EVENT_FROM, (topic, partition, position + 1))
        found.append(max(0, now_ms - int(rows[0][1])) if rows else 0)
    return found


# -- dead letters -------------------------------------------------------------------------


def dead_letter_row(e: DeadLetter, refailed: bool) -> dict[str, Any]:
    """A list row: everything but the payload, headers and traceback."""
    return {
        "id": e.id, "group": e.group, "topic": e.topic, "partition": e.partition,
        "offset": e.offset, "key": e.key, "attempts": e.attempts, "error_type": e.error_type,
        "error_message": e.error_message, "event_time_ms": e.event_time_ms,
        "dead_lettered_at_ms": e.dead_lettered_at_ms, "requeued": e.requeued,
        "requeued_at_ms": e.requeued_at_ms, "refailed": refailed,
    }  # fmt: skip


def refailed_ids(entries: Sequence[DeadLetter]) -> set[str]:
    """Requeued entries whose event failed again in the same group (a newer entry)."""
    newest: dict[tuple[str, int], int] = {}
    for e in entries:
        k = (e.group, e.offset)
        newest[k] = max(newest.get(k, 0), e.dead_lettered_at_ms)
    return {e.id for e in entries if e.requeued and newest[(e.group, e.offset)] >
            e.dead_lettered_at_ms}  # fmt: skip


def dead_letter_cursor(e: DeadLetter) -> str:
    return f"{e.dead_lettered_at_ms}-{e.id}"


def parse_dead_letter_cursor(text: str) -> tuple[int, str]:
    ms, sep, ident = text.partition("-")
    at_ms = parse_whole(ms)
    if not sep or at_ms is None or at_ms < 0 or len(ident) != 12:
        raise InvalidArgument(f"invalid cursor {text!r}: pass back a next_cursor unchanged")
    return at_ms, ident


def page_dead_letters(
    entries: Sequence[DeadLetter],
    *,
    error_type: str | None,
    text: str | None,
    cursor: str | None,
    limit: int,
) -> tuple[list[dict[str, Any]], str | None, int]:
    """Newest first, keyset-paginated on (dead-lettered time, id); returns the rows, the
    next cursor (None at the end) and how many entries match the filters."""
    refailed = refailed_ids(entries)
    needle = text.casefold() if text else None
    chosen = [
        e for e in entries
        if (error_type is None or e.error_type == error_type)
        and (needle is None or needle in f"{e.error_type}: {e.error_message}".casefold()
             or needle in json.dumps(e.payload, ensure_ascii=False).casefold())
    ]  # fmt: skip
    chosen.sort(key=lambda e: (e.dead_lettered_at_ms, e.id), reverse=True)
    total = len(chosen)
    if cursor is not None:
        bound = parse_dead_letter_cursor(cursor)
        chosen = [e for e in chosen if (e.dead_lettered_at_ms, e.id) < bound]
    rows = [dead_letter_row(e, e.id in refailed) for e in chosen[:limit]]
    nxt = dead_letter_cursor(chosen[limit - 1]) if len(chosen) > limit else None
    return rows, nxt, total
