"""What `eventlog stats` (and the web dashboard) show: per-topic counts and rates, each
group's lag per partition, dead-letter counts and file sizes.

Counters and index probes only, so it answers in milliseconds on any size of log: lag and
the last minute's rate are counted up to LAG_CAP events per partition and estimated beyond.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from . import _core, _db, _deadletter, _sql
from ._core import Lane, Plan, Stmt
from ._schema import schema_version_plan

if TYPE_CHECKING:
    from ._sync import SyncLog

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
class Stats:
    db: Path
    schema_version: int
    head: int
    topics: list[TopicStats]
    lags: list[LaneLag]
    dead_letters: _deadletter.DeadLetterCounts
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
    # Measured from the lane's first event after position, not from position: the offsets
    # between them hold none of its events (pruned, or taken by other topics before this
    # one began), and counting them would spread the lane's events thin.
    first = yield Stmt(_sql.LANE_OFFSET_FORWARD, (topic, partition, position, 0))
    base = int(first[0][0]) - 1
    density = (LAG_CAP + 1) / (past_cap - base)
    return max(LAG_CAP + 1, round(density * (head - base))), False


def stats_plan(now_ms: int) -> Plan[tuple[int, int, list[TopicStats], list[LaneLag]]]:
    """Counters and index probes only: answers in milliseconds on any size of log."""
    head = yield from _core.head_plan()
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
    result = Stats(log.paths.db, version, head, topics, lags,
                   _deadletter.dead_letter_counts(log.paths), file_sizes(log.paths))  # fmt: skip
    result.elapsed_s = time.monotonic() - started
    return result


def human_bytes(n: int) -> str:
    """1536 -> "1.5 KiB": sizes as `stats`, `backup` and `doctor` print them."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"
