"""Operator tools behind the command line: durations and times, stats, retention (prune),
consumer-group position resets (replay), online backup, health checks (doctor), and the
handler that pipes events to a command.

Like the rest of the library, reads and writes are plans (generators yielding `Stmt`s) that a
shell drives with `log.run(plan, mode)`; the functions taking a `SyncLog` only add what is
not SQL: file locks, files, progress callbacks.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from . import _core, _db, _deadletter, _groups, _members, _sql
from ._core import Event, Lane, Plan, Stmt
from ._locks import FileLock
from .errors import GroupBusy, InvalidArgument, NotFound, translate

if TYPE_CHECKING:
    from ._sync import SyncLog

_NEVER = 1 << 62  # larger than any offset or millisecond timestamp

# -- durations and times ----------------------------------------------------------------------

_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_COMPACT_RE = re.compile(r"(?:(\d+(?:\.\d+)?)(ms|s|m|h|d|w))+")
_COMPACT_PART_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_ISO_DURATION_RE = re.compile(
    r"P(?:(\d+(?:\.\d+)?)W)?(?:(\d+(?:\.\d+)?)D)?"
    r"(?:T(?:(\d+(?:\.\d+)?)H)?(?:(\d+(?:\.\d+)?)M)?(?:(\d+(?:\.\d+)?)S)?)?",
    re.IGNORECASE,
)


def parse_duration(text: str) -> timedelta:
    """`90s`, `10m`, `2h`, `7d`, `1w`, `1h30m`, `500ms`, or ISO-8601 `PT10M`, `P1DT2H`.

    A leading `-` makes it negative (`-10m`); callers that want a length use abs().
    """
    s = text.strip()
    sign = 1
    if s[:1] in "+-" and s:
        sign = -1 if s[0] == "-" else 1
        s = s[1:]
    seconds: float | None = None
    if _COMPACT_RE.fullmatch(s):
        seconds = sum(float(n) * _UNITS[u] for n, u in _COMPACT_PART_RE.findall(s))
    else:
        m = _ISO_DURATION_RE.fullmatch(s)
        if m and len(s) > 1 and s.upper() != "PT":
            w, d, h, mi, sec = (float(g) if g else 0.0 for g in m.groups())
            seconds = w * 604800 + d * 86400 + h * 3600 + mi * 60 + sec
    if seconds is None:
        raise InvalidArgument(
            f"invalid duration {text!r}: use a number and a unit (ms, s, m, h, d, w) such as "
            "10m, 2h, 7d or 1h30m, or ISO-8601 such as PT10M",
            hint="for example --older-than 7d",
        )
    return timedelta(seconds=sign * seconds)


def parse_time(text: str, now: datetime | None = None) -> datetime:
    """An ISO-8601 time (naive means UTC), `now`, or a duration relative to now (`-10m`)."""
    now = now or datetime.now(UTC)
    s = text.strip()
    if s.lower() == "now":
        return now
    if s[:1] in "+-":
        return now + parse_duration(s)
    try:
        moment = datetime.fromisoformat(s)
    except ValueError:
        raise InvalidArgument(
            f"invalid time {text!r}: use ISO-8601 (2024-05-01T12:00:00, UTC unless it carries "
            "an offset such as +02:00) or a relative time such as -10m",
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def parse_start(text: str) -> str | int | datetime:
    """A reader's start: earliest, latest, an offset (the first delivered) or a time."""
    s = text.strip()
    if s in ("earliest", "latest"):
        return s
    if s.isdigit():
        return int(s)
    return parse_time(s)


# -- reading helpers --------------------------------------------------------------------------


def matching_topics_plan(patterns: str | Sequence[str]) -> Plan[list[str]]:
    compiled = _core.compile_patterns(patterns)
    lanes = yield from _core.resolve_lanes_plan(compiled)
    return sorted({topic for topic, _ in lanes})


def last_events_start_plan(patterns: str | Sequence[str], n: int) -> Plan[int]:
    """The offset to read from so that the last `n` events of the topics follow (0 = all)."""
    compiled = _core.compile_patterns(patterns)
    lanes = yield from _core.resolve_lanes_plan(compiled)
    if n <= 0:
        rows = yield Stmt(_sql.HEAD_OFFSET)
        return int(rows[0][0]) + 1
    newest: list[int] = []
    for topic, partition in lanes:
        rows = yield Stmt(_sql.LANE_NEWEST_IDS, (topic, partition, _NEVER, n))
        newest.extend(int(r[0]) for r in rows)
    if len(newest) < n:
        return 0
    newest.sort(reverse=True)
    return newest[n - 1]


# -- stats ------------------------------------------------------------------------------------

RATE_WINDOW_S = 60
LAG_CAP = 10_000  # events counted per lane (for lag and rates); above it they are estimated


@dataclass(frozen=True)
class TopicStats:
    name: str
    partitions: int
    events: int  # the topic's counter plus its short uncounted tail
    first_offset: int | None
    last_offset: int | None
    created_at_ms: int
    last_append_ms: int | None
    recent: int  # events appended in the last RATE_WINDOW_S seconds
    recent_exact: bool  # False: estimated, as lag is (see lane_count_after_plan)

    @property
    def rate_per_s(self) -> float:
        return self.recent / RATE_WINDOW_S


@dataclass(frozen=True)
class LaneLag:
    group: str
    topic: str
    partition: int
    position: int
    head: int  # last offset in the lane (0 when empty)
    lag: int
    exact: bool  # False: estimated from the density of the lane's first LAG_CAP events
    in_flight: tuple[int, int] | None
    updated_at_ms: int


@dataclass
class DeadLetterCounts:
    total: int = 0
    pending: int = 0
    requeued: int = 0
    unreadable_lines: int = 0
    torn_tail: bool = False
    by_group: dict[str, int] = field(default_factory=dict)  # pending per group


@dataclass
class Stats:
    db: Path
    schema_version: int
    head: int
    topics: list[TopicStats]
    lags: list[LaneLag]
    dead_letters: DeadLetterCounts
    files: dict[str, int]
    elapsed_s: float = 0.0

    @property
    def events(self) -> int:
        return sum(t.events for t in self.topics)


def lane_count_after_plan(lane: Lane, position: int, head: int | None) -> Plan[tuple[int, bool]]:
    """Events in the lane after `position` (its last offset is `head`), and whether that is
    exact: counted up to LAG_CAP, beyond that estimated from how densely the first LAG_CAP
    events after `position` sit among the offsets. Never a count over millions of rows."""
    topic, partition = lane
    if head is None or head <= position:
        return 0, True
    rows = yield Stmt(_sql.LANE_OFFSET_FORWARD, (topic, partition, position, LAG_CAP))
    if not rows:
        rows = yield Stmt(_sql.COUNT_LANE_AFTER_CAPPED, (topic, partition, position, LAG_CAP))
        return int(rows[0][0]), True
    past_cap = int(rows[0][0])  # the (LAG_CAP + 1)-th event after position
    density = (LAG_CAP + 1) / (past_cap - position)
    return max(LAG_CAP + 1, round(density * (head - position))), False


def stats_plan(now_ms: int) -> Plan[tuple[int, int, list[TopicStats], list[LaneLag]]]:
    """Counters and index probes only: answers in milliseconds on any size of log."""
    rows = yield Stmt(_sql.HEAD_OFFSET)
    head = int(rows[0][0])
    version = yield from schema_version_plan()
    since = now_ms - RATE_WINDOW_S * 1000
    topics: list[TopicStats] = []
    for info in (yield from _core.topics_plan()):
        recent, recent_exact = 0, True
        if info.last_append_ms is not None and info.last_append_ms >= since:
            for p in range(info.partitions):
                lane = (info.name, p)
                last = (yield Stmt(_sql.LAST_OFFSET_IN_LANE, lane))[0][0]
                position = yield from _core.offset_before_time_plan(lane, since)
                n, exact = yield from lane_count_after_plan(lane, position, last)
                recent += n
                recent_exact = recent_exact and exact
        topics.append(TopicStats(
            info.name, info.partitions, info.events, info.first_offset, info.last_offset,
            info.created_at_ms, info.last_append_ms, recent, recent_exact,
        ))  # fmt: skip
    lags = yield from lags_plan()
    return head, version, topics, lags


def lags_plan(group: str | None = None) -> Plan[list[LaneLag]]:
    """Every group's (or one group's) position and lag per lane, lag counted up to LAG_CAP
    and estimated beyond: fast on any log (LanePosition from the library counts exactly)."""
    if group is None:
        rows = yield Stmt(_sql.LIST_GROUP_LANES)
    else:
        rows = yield Stmt(_sql.GROUP_LANES, (group,))
    lags: list[LaneLag] = []
    lane_heads: dict[Lane, int | None] = {}
    for name, topic, partition, position, inflight_from, inflight_to, updated_at in rows:
        lane = (str(topic), int(partition))
        if lane not in lane_heads:
            last = (yield Stmt(_sql.LAST_OFFSET_IN_LANE, lane))[0][0]
            lane_heads[lane] = int(last) if last is not None else None
        lane_head = lane_heads[lane]
        lag, exact = yield from lane_count_after_plan(lane, int(position), lane_head)
        in_flight = (int(inflight_from), int(inflight_to)) if inflight_from is not None else None
        lags.append(LaneLag(str(name), lane[0], lane[1], int(position), int(lane_head or 0),
                            lag, exact, in_flight, int(updated_at)))  # fmt: skip
    return lags


def dead_letter_counts(paths: _db.Paths) -> DeadLetterCounts:
    listing = _deadletter.DeadLetterFile(paths).read()
    counts = DeadLetterCounts(unreadable_lines=len(listing.bad_lines), torn_tail=listing.torn_tail)
    for entry in listing.entries:
        counts.total += 1
        if entry.requeued:
            counts.requeued += 1
        else:
            counts.pending += 1
            counts.by_group[entry.group] = counts.by_group.get(entry.group, 0) + 1
    return counts


def file_sizes(paths: _db.Paths) -> dict[str, int]:
    """Sizes in bytes of the database, its WAL and shared-memory files and the dead letters."""
    files = {
        "db": paths.db,
        "wal": paths.db.with_name(paths.db.name + "-wal"),
        "shm": paths.db.with_name(paths.db.name + "-shm"),
        "deadletter": paths.deadletter,
    }
    sizes = {}
    for name, path in files.items():
        try:
            sizes[name] = path.stat().st_size
        except FileNotFoundError:
            sizes[name] = 0
    return sizes


def stats(log: SyncLog) -> Stats:
    started = time.monotonic()
    head, version, topics, lags = log.run(stats_plan(_core.now_ms()), "read")
    result = Stats(log.paths.db, version, head, topics, lags, dead_letter_counts(log.paths),
                   file_sizes(log.paths))  # fmt: skip
    result.elapsed_s = time.monotonic() - started
    return result


# -- groups -----------------------------------------------------------------------------------

STALE_HEARTBEAT_S = 10.0  # members heartbeat every half second; this long means stuck


@dataclass(frozen=True)
class MemberView:
    member_id: str
    alive: bool  # holds its member lock: the process exists
    pid: int | None
    host: str | None
    lanes: list[Lane]
    heartbeat_age_s: float | None
    stale: bool  # alive, but no heartbeat for longer than the threshold


def member_views(
    log: SyncLog, group: str, stale_after_s: float = STALE_HEARTBEAT_S
) -> list[MemberView]:
    views = []
    for m in log.group_members(group):
        note = m.heartbeat or {}
        age = m.heartbeat_age_s
        lanes = [(str(t), int(p)) for t, p in note.get("lanes", [])]
        pid = note.get("pid")
        stale = m.alive and (age is None or age > stale_after_s)
        views.append(MemberView(m.member_id, m.alive, int(pid) if pid is not None else None,
                                note.get("host"), lanes, age, stale))  # fmt: skip
    return views


def check_group_exists(log: SyncLog, group: str) -> None:
    _core.check_name(group, "group", log.limits)
    if group not in log.group_names():
        raise NotFound(f"no consumer group named {group!r}",
                       hint="list the groups with 'eventlog groups'")  # fmt: skip


def group_extras_plan(group: str) -> Plan[tuple[list[_core.Row], int]]:
    """Events the group is retrying (offset, topic, partition, attempts, last failure, error
    type and message) and how many requeued dead letters wait for it."""
    retrying = yield from _groups.attempts_plan(group)
    rows = yield Stmt(_sql.PENDING_REDELIVERY_COUNT, (group,))
    return retrying, int(rows[0][0])


# -- replay: moving a group's positions -------------------------------------------------------

ResetKind = Literal["earliest", "latest", "current", "offset", "shift", "datetime"]


@dataclass(frozen=True)
class ResetSpec:
    """What Kafka's consumer-group tool calls a reset spec. `offset` names the first event
    to deliver again; `shift` counts events within each partition (negative rewinds)."""

    kind: ResetKind
    value: int | datetime | None = None

    def describe(self) -> str:
        if self.kind in ("earliest", "latest", "current"):
            return f"to {self.kind}"
        if self.kind == "offset":
            return f"to offset {self.value}"
        if self.kind == "shift":
            return f"shift by {self.value}"
        assert isinstance(self.value, datetime)
        return f"to {self.value.isoformat(timespec='seconds')}"


# A scope entry: a topic and its partitions (None: all of them).
Scope = Sequence[tuple[str, Sequence[int] | None]]


@dataclass(frozen=True)
class LaneReset:
    topic: str
    partition: int
    before: int | None  # None: the group has no position in this lane yet
    after: int | None  # None: unchanged
    redelivered: int  # events after `after` up to `before`: handled again
    skipped: int  # events after `before` up to `after`: never handled
    lag_after: int

    @property
    def changes(self) -> bool:
        return self.after is not None and self.after != self.before


@dataclass
class ReplayPlan:
    group: str
    spec: ResetSpec
    lanes: list[LaneReset]
    executed: bool = False

    @property
    def redelivered(self) -> int:
        return sum(lane.redelivered for lane in self.lanes)

    @property
    def skipped(self) -> int:
        return sum(lane.skipped for lane in self.lanes)


def scope_lanes_plan(group: str, scope: Scope | None) -> Plan[list[Lane]]:
    """The lanes a reset acts on: the given topics' partitions, or every lane the group has
    a position in."""
    if not scope:
        rows = yield Stmt(_sql.GROUP_LANES, (group,))
        lanes = [(str(r[1]), int(r[2])) for r in rows]
        if not lanes:
            raise NotFound(
                f"group {group!r} has no positions",
                hint="name the topics to set positions in with --topic, or list groups with "
                "'eventlog groups'",
            )
        return lanes
    lanes = []
    for topic, partitions in scope:
        _core.check_name(topic, "topic")
        rows = yield Stmt(_sql.TOPIC_PARTITIONS, (topic,))
        if not rows:
            raise NotFound(f"no topic named {topic!r}", hint="list topics with 'eventlog topics'")
        count = int(rows[0][0])
        chosen = range(count) if partitions is None else partitions
        for p in chosen:
            if not 0 <= p < count:
                raise InvalidArgument(
                    f"topic {topic!r} has partitions 0-{count - 1}; there is no partition {p}"
                )
            lanes.append((topic, p))
    return sorted(dict.fromkeys(lanes))


def _target_plan(lane: Lane, before: int | None, spec: ResetSpec, head: int) -> Plan[int | None]:
    topic, partition = lane
    first = (yield Stmt(_sql.FIRST_OFFSET_IN_LANE, lane))[0][0]
    last = (yield Stmt(_sql.LAST_OFFSET_IN_LANE, lane))[0][0]
    if first is None or last is None:
        # An empty lane (never written, or pruned) delivers the same from any position up
        # to the head, since later events get larger offsets: leave a position alone.
        if before is not None:
            return before
        return 0 if spec.kind == "earliest" else head
    earliest, latest = int(first) - 1, int(last)
    kind = spec.kind
    if kind == "earliest":
        return earliest
    if kind == "latest":
        return latest
    if kind == "current":
        return before
    if kind == "offset":
        assert isinstance(spec.value, int)
        return min(max(spec.value - 1, earliest), latest)
    if kind == "datetime":
        assert isinstance(spec.value, datetime)
        found = yield from _core.offset_before_time_plan(lane, _core.datetime_ms(spec.value))
        return min(max(found, earliest), latest)
    assert kind == "shift" and isinstance(spec.value, int)
    if before is None:
        return None  # nothing to shift from
    n = spec.value
    if n == 0:
        return before
    if n < 0:
        rows = yield Stmt(_sql.LANE_OFFSET_BACK, (topic, partition, before, -n))
        return max(int(rows[0][0]), earliest) if rows else earliest
    rows = yield Stmt(_sql.LANE_OFFSET_FORWARD, (topic, partition, before, n - 1))
    return int(rows[0][0]) if rows else max(latest, before)


def reset_plan(
    group: str, spec: ResetSpec, lanes: Sequence[Lane], *, execute: bool
) -> Plan[list[LaneReset]]:
    """Before and after per lane, with what moves; with `execute`, sets the positions (run
    it in a write transaction while holding every lane's lock, see `replay`)."""
    current = {(str(r[1]), int(r[2])): int(r[3]) for r in (yield Stmt(_sql.GROUP_LANES, (group,)))}
    head = int((yield Stmt(_sql.HEAD_OFFSET))[0][0])
    resets = []
    now = _core.now_ms()
    for lane in lanes:
        topic, partition = lane
        before = current.get(lane)
        after = yield from _target_plan(lane, before, spec, head)
        redelivered = skipped = 0
        if before is not None and after is not None and after < before:
            rows = yield Stmt(_sql.COUNT_LANE_RANGE, (topic, partition, after, before))
            redelivered = int(rows[0][0])
        elif before is not None and after is not None and after > before:
            rows = yield Stmt(_sql.COUNT_LANE_RANGE, (topic, partition, before, after))
            skipped = int(rows[0][0])
        effective = after if after is not None else before
        lag_after = 0
        if effective is not None:
            rows = yield Stmt(_sql.COUNT_LANE_AFTER, (topic, partition, effective))
            lag_after = int(rows[0][0])
        reset = LaneReset(topic, partition, before, after, redelivered, skipped, lag_after)
        resets.append(reset)
        if execute and reset.changes:
            yield Stmt(_sql.SET_GROUP_LANE, (group, topic, partition, after, now))
    return resets


class LaneFence:
    """Every lane lock of a group's lanes, taken without blocking: while held, no consumer
    owns any of them, so none can commit over a reset or read a position mid-change."""

    def __init__(self, paths: _db.Paths, group: str) -> None:
        self.paths = paths
        self.group = group
        self.locks: list[FileLock] = []

    def _lanes_dir(self) -> Path:
        members_dir, lanes_dir = _members.group_folders(self.paths, self.group)
        for folder in (self.paths.sidecar / "groups", members_dir.parent, lanes_dir):
            folder.mkdir(mode=0o700, exist_ok=True)
        return lanes_dir

    def try_acquire(self, lanes: Sequence[Lane]) -> Lane | None:
        """Take every lane's lock; on the first one held elsewhere, release all and return it."""
        lanes_dir = self._lanes_dir()
        for lane in lanes:
            lock = FileLock(lanes_dir / _members.lane_file_name(lane))
            self.locks.append(lock)
            if not lock.acquire(blocking=False):
                self.release()
                return lane
        return None

    def release(self) -> None:
        for lock in self.locks:
            lock.close()
        self.locks.clear()


def live_member_pids(log: SyncLog, group: str) -> list[str]:
    return [str(v.pid if v.pid is not None else v.member_id)
            for v in member_views(log, group) if v.alive]  # fmt: skip


def replay(
    log: SyncLog,
    group: str,
    spec: ResetSpec,
    scope: Scope | None = None,
    *,
    execute: bool = False,
    wait: bool = False,
    wait_timeout: float | None = None,
    on_wait: Callable[[list[str]], None] | None = None,
) -> ReplayPlan:
    """Plan (and with `execute`, apply) a reset of the group's positions.

    Without `execute` nothing changes. With it, refuses while the group has live members
    (GroupBusy naming their pids), or waits for them to stop with `wait`. The positions are
    written in one transaction while this process holds the lock of every lane concerned,
    so a consumer can neither commit over the reset nor start from a half-written one.
    """
    _core.check_name(group, "group", log.limits)
    if spec.kind == "shift" and not isinstance(spec.value, int):
        raise InvalidArgument("shift needs a whole number of events")
    if not execute:

        def preview() -> Plan[list[LaneReset]]:
            lanes = yield from scope_lanes_plan(group, scope)
            return (yield from reset_plan(group, spec, lanes, execute=False))

        return ReplayPlan(group, spec, log.run(preview(), "read"))
    lanes = log.run(scope_lanes_plan(group, scope), "read")
    deadline = None if wait_timeout is None else time.monotonic() + wait_timeout
    fence = LaneFence(log.paths, group)
    try:
        while True:
            pids = live_member_pids(log, group)
            held: Lane | None = None
            if not pids:
                held = fence.try_acquire(lanes)
                if held is None:
                    break
            if not wait or (deadline is not None and time.monotonic() >= deadline):
                if pids:
                    raise GroupBusy(f"group {group!r} has live members (pids {', '.join(pids)})",
                                    hint="stop them first, or pass --wait to wait until they "
                                    "stop")  # fmt: skip
                assert held is not None
                raise GroupBusy(f"partition {held[0]}[{held[1]}] of group {group!r} is held "
                                "by a running process")  # fmt: skip
            if on_wait is not None:
                on_wait(pids)
            time.sleep(0.2)
        resets = log.run(reset_plan(group, spec, lanes, execute=True), "write")
    finally:
        fence.release()
    log.notify()
    return ReplayPlan(group, spec, resets, executed=True)


# -- prune: retention -------------------------------------------------------------------------

PRUNE_CHUNK = 5000  # events per delete transaction: producers never wait long


@dataclass(frozen=True)
class Retention:
    """What may go: events appended before `before_ms`, and/or all but the newest
    `keep_last` of each topic. Both given: only events that both rules let go."""

    before_ms: int | None = None
    keep_last: int | None = None
    topics: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.before_ms is None and self.keep_last is None:
            raise InvalidArgument("say what to prune: an age (older than), a count to keep, "
                                  "or both")  # fmt: skip
        if self.keep_last is not None and self.keep_last < 0:
            raise InvalidArgument(f"keep_last must be >= 0, got {self.keep_last}")


@dataclass(frozen=True)
class Hold:
    group: str
    position: int  # the group still needs the events after this offset
    redelivery: bool = False  # a requeued dead letter waiting for the group


@dataclass
class LanePrune:
    topic: str
    partition: int
    upto: int  # events up to this offset go
    wanted_upto: int  # what retention alone would delete up to
    events: int  # to delete (dry run) or deleted
    held_back: int  # events retention would delete that groups still need
    holds: list[Hold] = field(default_factory=list)


@dataclass
class PruneReport:
    lanes: list[LanePrune]
    dry_run: bool
    forced: bool

    @property
    def events(self) -> int:
        return sum(lane.events for lane in self.lanes)

    @property
    def held_back(self) -> int:
        return sum(lane.held_back for lane in self.lanes)


def _keep_last_bound_plan(topic: str, partitions: int, keep: int) -> Plan[int | None]:
    """The offset of the (keep+1)-th newest event of the topic (None: it has no more than
    `keep`), by merging its lanes newest first, a page at a time."""
    if partitions == 1:
        rows = yield Stmt(_sql.LANE_OFFSET_BACK, (topic, 0, _NEVER, keep))
        return int(rows[0][0]) if rows else None
    page = min(max(keep + 1, 16), 10_000)
    buffers: dict[int, deque[int]] = {}
    exhausted: set[int] = set()
    heap: list[tuple[int, int]] = []

    def refill(p: int, before: int) -> Plan[None]:
        rows = yield Stmt(_sql.LANE_NEWEST_IDS, (topic, p, before, page))
        buffers[p] = deque(int(r[0]) for r in rows)
        if len(rows) < page:
            exhausted.add(p)

    for p in range(partitions):
        yield from refill(p, _NEVER)
        if buffers[p]:
            heapq.heappush(heap, (-buffers[p][0], p))
    taken = 0
    while heap:
        neg, p = heapq.heappop(heap)
        buffers[p].popleft()
        if taken == keep:
            return -neg
        taken += 1
        if not buffers[p] and p not in exhausted:
            yield from refill(p, -neg)
        if buffers[p]:
            heapq.heappush(heap, (-buffers[p][0], p))
    return None


def _holds_plan(topic: str) -> Plan[tuple[dict[str, dict[int, int]], list[tuple[str, int, int]]]]:
    rows = yield Stmt(_sql.GROUP_POSITIONS_IN_TOPIC, (topic,))
    positions: dict[str, dict[int, int]] = {}
    for group, partition, position in rows:
        positions.setdefault(str(group), {})[int(partition)] = int(position)
    redeliveries = [(str(g), int(p), int(o)) for g, p, o in
                    (yield Stmt(_sql.REDELIVERIES_IN_TOPIC, (topic,)))]  # fmt: skip
    return positions, redeliveries


def _lane_holds(
    partition: int,
    bound: int,
    positions: dict[str, dict[int, int]],
    redeliveries: list[tuple[str, int, int]],
) -> list[Hold]:
    # A group that has a position anywhere in the topic but none in this lane has read
    # nothing of it yet: it needs all of it.
    holds = [Hold(g, lanes.get(partition, 0)) for g, lanes in sorted(positions.items())
             if lanes.get(partition, 0) < bound]  # fmt: skip
    holds += [Hold(g, offset - 1, redelivery=True) for g, p, offset in redeliveries
              if p == partition and offset - 1 < bound]  # fmt: skip
    return holds


def _count_upto_plan(lane: Lane, upto: int) -> Plan[int]:
    rows = yield Stmt(_sql.COUNT_LANE_RANGE, (lane[0], lane[1], 0, upto))
    return int(rows[0][0])


def prune_survey_plan(retention: Retention, force: bool) -> Plan[list[LanePrune]]:
    """Per lane, what retention would delete and what the groups let go of."""
    infos = yield from _core.topics_plan()
    wanted = set(retention.topics) if retention.topics else None
    if wanted:
        missing = wanted - {t.name for t in infos}
        if missing:
            raise NotFound(f"no topic named {', '.join(sorted(missing))}",
                           hint="list topics with 'eventlog topics'")  # fmt: skip
    lanes: list[LanePrune] = []
    for info in infos:
        topic, partitions = info.name, info.partitions
        if wanted is not None and topic not in wanted:
            continue
        keep_bound = _NEVER
        if retention.keep_last is not None:
            if info.events <= retention.keep_last:
                continue  # by its counter; a walk would only confirm it
            found = yield from _keep_last_bound_plan(topic, partitions, retention.keep_last)
            if found is None:
                continue  # no more events than it keeps
            keep_bound = found
        positions, redeliveries = yield from _holds_plan(topic)
        for p in range(int(partitions)):
            lane = (str(topic), p)
            bound = keep_bound
            if retention.before_ms is not None:
                # the position just before the lane's first event at or after the cutoff
                older = yield from _core.offset_before_time_plan(lane, retention.before_ms)
                bound = min(bound, older)
            wanted_count = yield from _count_upto_plan(lane, bound)
            if wanted_count == 0:
                continue
            holds = [] if force else _lane_holds(p, bound, positions, redeliveries)
            upto = min([bound] + [h.position for h in holds])
            count = wanted_count if upto == bound else (yield from _count_upto_plan(lane, upto))
            lanes.append(LanePrune(lane[0], p, upto, bound, count, wanted_count - count,
                                   holds if count < wanted_count else []))  # fmt: skip
    return lanes


def prune_chunk_plan(lane: LanePrune, force: bool) -> Plan[int]:
    """Delete the next chunk of a lane's prunable events; returns how many went. Re-reads the
    groups' positions in the same transaction, so a group that moved back is respected."""
    upto = lane.upto
    if not force:
        positions, redeliveries = yield from _holds_plan(lane.topic)
        holds = _lane_holds(lane.partition, upto, positions, redeliveries)
        upto = min([upto] + [h.position for h in holds])
    rows = yield Stmt(_sql.TOPIC_COUNTS, (lane.topic,))
    counted_through = int(rows[0][1]) if rows else 0
    deleted = yield Stmt(_sql.PRUNE_LANE_CHUNK, (lane.topic, lane.partition, upto, PRUNE_CHUNK))
    # the topic's counter covers offsets up to counted_through; the tail above is counted
    # when it is folded in, and what is gone by then is simply not there to count
    counted = sum(1 for (offset,) in deleted if offset <= counted_through)
    if counted:
        yield Stmt(_sql.COUNT_PRUNED, (counted, lane.topic))
    return len(deleted)


def prune(
    log: SyncLog,
    retention: Retention,
    *,
    force: bool = False,
    dry_run: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> PruneReport:
    """Delete old events in chunks (one short transaction each). Unless `force`, never an
    event some group has not yet handled (or a requeued dead letter waits for)."""
    lanes = log.run(prune_survey_plan(retention, force), "read")
    report = PruneReport(lanes, dry_run, force)
    if dry_run:
        return report
    total = report.events
    done = 0
    for lane in lanes:
        deleted = 0
        while True:
            n = log.run(prune_chunk_plan(lane, force), "write")
            deleted += n
            done += n
            if progress is not None:
                progress(done, total)
            if n < PRUNE_CHUNK:
                break
        lane.events = deleted
    return report


# -- backup -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class BackupResult:
    source: Path
    dest: Path
    bytes: int
    pages: int
    deadletter: Path | None  # where the dead-letter file was copied, if there was one
    elapsed_s: float


def backup(
    paths: _db.Paths,
    dest: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    pages_per_step: int = 1024,
    progress: Callable[[int, int], None] | None = None,
) -> BackupResult:
    """A consistent copy of the database while producers and consumers keep writing.

    SQLite's online backup API copies `pages_per_step` pages at a time from one read
    transaction held for the whole copy: a snapshot, so concurrent commits neither restart
    the copy nor appear half in it (they land in the WAL meanwhile). The copy is written to a
    temporary file and renamed into place. The dead-letter file is copied beside it, under its
    lock.
    """
    target = _db.Paths.for_db(dest)
    if target.db == paths.db:
        raise InvalidArgument("the backup cannot overwrite the database itself")
    if not target.db.parent.is_dir():
        raise InvalidArgument(f"folder {target.db.parent} does not exist")
    if target.db.exists() and not overwrite:
        raise InvalidArgument(
            f"{target.db} already exists",
            hint="choose a new file name, or pass --force to replace it",
        )
    started = time.monotonic()
    tmp = target.db.with_name(f".{target.db.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    os.close(fd)
    source = _db.connect(paths, durability="full", busy_timeout_ms=10_000)
    pages = 0
    try:
        copy = sqlite3.connect(tmp, isolation_level=None)
        try:

            def step(status: int, remaining: int, total: int) -> None:
                nonlocal pages
                pages = total
                if progress is not None:
                    progress(total - remaining, total)

            source.execute(_sql.BEGIN_READ)
            source.execute(_sql.BACKUP_SNAPSHOT).fetchall()
            source.backup(copy, pages=pages_per_step, progress=step, sleep=0)
            source.execute(_sql.COMMIT)
        finally:
            copy.close()
        for suffix in ("-wal", "-shm"):
            target.db.with_name(target.db.name + suffix).unlink(missing_ok=True)
        os.replace(tmp, target.db)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        source.close()
    copied = None
    lock = FileLock(paths.deadletter_lock)
    try:
        with lock:
            if paths.deadletter.exists():
                shutil.copyfile(paths.deadletter, target.deadletter)
                os.chmod(target.deadletter, 0o600)
                copied = target.deadletter
    finally:
        lock.close()
    _fsync_folder(target.db.parent)
    return BackupResult(paths.db, target.db, target.db.stat().st_size, pages, copied,
                        time.monotonic() - started)  # fmt: skip


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- schema -----------------------------------------------------------------------------------


def latest_schema_version() -> int:
    migrations = _db.load_migrations()
    return migrations[-1].version if migrations else 0


def schema_version_of(paths: _db.Paths) -> int:
    """The schema version of an existing file, read without migrating it (0: none)."""
    conn = _db.connect(paths, durability="full", busy_timeout_ms=10_000)
    try:
        try:
            return _db.schema_version(conn)
        except sqlite3.Error as exc:
            raise translate(exc) from exc
    finally:
        conn.close()


def schema_version_plan() -> Plan[int]:
    rows = yield Stmt(_sql.SCHEMA_VERSION)
    return int(rows[0][0])


# -- doctor -----------------------------------------------------------------------------------

Status = Literal["ok", "warn", "fail"]
WAL_WARN_BYTES = 64 << 20  # journal_size_limit: a WAL past it was not reset by checkpoints
LAG_WARN = 10_000


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    hint: str = ""


def _integrity_plan(quick: bool) -> Plan[list[str]]:
    rows = yield Stmt(_sql.QUICK_CHECK if quick else _sql.INTEGRITY_CHECK)
    return [str(r[0]) for r in rows]


def _offsets_plan() -> Plan[tuple[int, int | None, list[tuple[str, int]]]]:
    """The head, the largest stored offset, and each topic's counted_through."""
    head = int((yield Stmt(_sql.HEAD_OFFSET))[0][0])
    top = (yield Stmt(_sql.MAX_EVENT_ID))[0][0]
    topics = [(str(r[0]), int(r[4])) for r in (yield Stmt(_sql.LIST_TOPICS))]
    return head, top, topics


def doctor(
    log: SyncLog,
    *,
    quick: bool = False,
    lag_warn: int = LAG_WARN,
    stale_after_s: float = STALE_HEARTBEAT_S,
) -> list[Check]:
    """Health checks; any "fail" means something is wrong (see each check's hint)."""
    checks: list[Check] = []
    problems = log.run(_integrity_plan(quick), "read")
    what = "quick check" if quick else "integrity check"
    if problems == ["ok"]:
        checks.append(Check("integrity", "ok", f"{what} passed"))
    else:
        checks.append(Check("integrity", "fail", f"{what}: " + "; ".join(problems[:5]),
                            "restore from a backup ('eventlog backup' makes one)"))  # fmt: skip

    version = log.run(schema_version_plan(), "read")
    latest = latest_schema_version()
    if version == latest:
        checks.append(Check("schema", "ok", f"version {version}"))
    else:
        checks.append(Check("schema", "fail", f"version {version}, this eventlog has {latest}",
                            "run 'eventlog migrate'"))  # fmt: skip

    head, top, topics = log.run(_offsets_plan(), "read")
    behind = [name for name, counted in topics if counted > head]
    if (top is not None and int(top) > head) or behind:
        checks.append(Check("offsets", "fail",
                            f"the offset counter ({head}) is behind stored events",
                            "offsets could be reused; restore from a backup"))  # fmt: skip
    else:
        checks.append(Check("offsets", "ok", f"head offset {head}"))

    wal = file_sizes(log.paths)["wal"]
    if wal > WAL_WARN_BYTES:
        checks.append(
            Check(
                "wal",
                "warn",
                f"WAL is {human_bytes(wal)}",
                "run 'eventlog checkpoint'; look for a reader that never finishes",
            )
        )
    else:
        checks.append(Check("wal", "ok", f"WAL is {human_bytes(wal)}"))

    listing = _deadletter.DeadLetterFile(log.paths).read()
    if listing.bad_lines:
        lines = ", ".join(map(str, listing.bad_lines[:10]))
        checks.append(
            Check(
                "dead letters",
                "fail",
                f"{log.paths.deadletter} has unreadable lines: {lines}",
                "inspect those lines; requeue and purge keep them as they are",
            )
        )
    elif listing.torn_tail:
        checks.append(Check("dead letters", "warn",
                            f"{log.paths.deadletter} ends in a torn line (a crash mid-write)",
                            "harmless: the next dead letter starts on a new line"))  # fmt: skip
    else:
        pending = sum(1 for e in listing.entries if not e.requeued)
        status: Status = "warn" if pending else "ok"
        checks.append(
            Check(
                "dead letters",
                status,
                f"{pending} waiting, {len(listing.entries) - pending} requeued",
                "inspect them with 'eventlog dlq list'" if pending else "",
            )
        )

    for group in log.group_names():
        for m in member_views(log, group, stale_after_s):
            who = f"member {m.member_id} of group {group!r}"
            if not m.alive:
                checks.append(
                    Check(
                        "members",
                        "warn",
                        f"{who} left a stale member file",
                        "harmless: the group's next member removes it",
                    )
                )
            elif m.stale:
                age = "never" if m.heartbeat_age_s is None else f"{m.heartbeat_age_s:.0f}s ago"
                checks.append(Check("members", "warn",
                                    f"{who} (pid {m.pid}) is alive, last heartbeat {age}",
                                    "the process may be stuck; inspect it, or kill it so its "
                                    "partitions move"))  # fmt: skip
    if not any(c.name == "members" for c in checks):
        checks.append(Check("members", "ok", "no stale member files or heartbeats"))

    _, _, _, lags = log.run(stats_plan(_core.now_ms()), "read")
    per_group: dict[str, int] = {}
    for lag in lags:
        per_group[lag.group] = per_group.get(lag.group, 0) + lag.lag
    behind_groups = {g: n for g, n in per_group.items() if n >= lag_warn}
    for group, n in sorted(behind_groups.items()):
        checks.append(
            Check(
                "lag",
                "warn",
                f"group {group!r} is {n} events behind",
                "start more consumers, or check 'eventlog groups show " + group + "'",
            )
        )
    if not behind_groups:
        n = len(per_group)
        checks.append(Check("lag", "ok", f"{n} group{'s' if n != 1 else ''}, none "
                            f"{lag_warn}+ behind"))  # fmt: skip
    return checks


# -- consume: one command per event -----------------------------------------------------------


class CommandFailed(Exception):
    """The command given to `eventlog consume` exited with a non-zero status."""


class CommandHandler:
    """Runs a command per event, the event as one JSON line on its stdin; exit status 0 is
    success. The command runs in its own session, so a Ctrl-C meant for the consumer does
    not kill the event in hand; `interrupt()` stops it on purpose."""

    STDERR_TAIL = 2000

    def __init__(self, argv: Sequence[str], group: str, timeout: float | None = None) -> None:
        if not argv:
            raise InvalidArgument("give a command to run after --")
        if shutil.which(argv[0]) is None:
            raise NotFound(f"command not found: {argv[0]}",
                           hint="give the command's path, or check PATH")  # fmt: skip
        self.argv = list(argv)
        self.group = group
        self.timeout = timeout
        self.succeeded = 0
        self.failed = 0
        self._running: set[subprocess.Popen[bytes]] = set()
        self._lock = threading.Lock()

    def __call__(self, event: Event) -> None:
        data = (json.dumps(event.to_dict(), ensure_ascii=False) + "\n").encode("utf-8")
        env = {
            **os.environ,
            "EVENTLOG_GROUP": self.group,
            "EVENTLOG_TOPIC": event.topic,
            "EVENTLOG_PARTITION": str(event.partition),
            "EVENTLOG_OFFSET": str(event.offset),
        }
        proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=env, start_new_session=True)  # fmt: skip
        with self._lock:
            self._running.add(proc)
        tail = bytearray()

        def feed() -> None:
            assert proc.stdin is not None
            try:
                proc.stdin.write(data)
                proc.stdin.close()
            except (BrokenPipeError, OSError):
                pass  # the command does not read its input: its business

        def tee() -> None:
            assert proc.stderr is not None
            stream = proc.stderr
            for chunk in iter(lambda: stream.read1(65536), b""):  # type: ignore[attr-defined]
                try:
                    sys.stderr.buffer.write(chunk)
                    sys.stderr.buffer.flush()
                except (AttributeError, ValueError, OSError):
                    pass
                tail.extend(chunk)
                del tail[: -self.STDERR_TAIL]

        threads = [threading.Thread(target=feed, daemon=True),
                   threading.Thread(target=tee, daemon=True)]  # fmt: skip
        for t in threads:
            t.start()
        try:
            try:
                status = proc.wait(self.timeout)
            except subprocess.TimeoutExpired:
                self._kill(proc, signal.SIGKILL)
                proc.wait()
                for t in threads:
                    t.join(5)
                self._count(ok=False)
                raise CommandFailed(
                    f"{self.argv[0]} ran longer than {self.timeout}s and was killed"
                ) from None
            for t in threads:
                t.join(5)
        finally:
            with self._lock:
                self._running.discard(proc)
            if proc.stderr is not None:
                proc.stderr.close()
        if status != 0:
            self._count(ok=False)
            said = tail.decode("utf-8", "replace").strip()
            how = f"was killed by signal {-status}" if status < 0 else f"exited with {status}"
            raise CommandFailed(f"{self.argv[0]} {how}" + (f": {said}" if said else ""))
        self._count(ok=True)

    def _count(self, *, ok: bool) -> None:
        with self._lock:
            if ok:
                self.succeeded += 1
            else:
                self.failed += 1

    @staticmethod
    def _kill(proc: subprocess.Popen[bytes], sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)

    def interrupt(self) -> None:
        """Ask the running commands to stop (SIGTERM to their process groups)."""
        with self._lock:
            running = list(self._running)
        for proc in running:
            self._kill(proc, signal.SIGTERM)


# -- formatting -------------------------------------------------------------------------------


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"
