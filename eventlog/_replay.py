"""Moving a consumer group's positions (Kafka's offset reset): the plan per partition, and
applying it behind the lane fence, so no consumer commits over a reset or reads a position
mid-change.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from . import _core, _db, _members, _sql
from ._core import Lane, Plan, Stmt
from ._locks import FileLock
from .errors import GroupBusy, InvalidArgument, NotFound

if TYPE_CHECKING:
    from ._sync import SyncLog

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
    head = yield from _core.head_plan()
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
            # What it moves over starts afresh: attempts counted before would leave a replayed
            # event fewer tries, and keep a skipped one listed as retrying.
            assert after is not None
            low = after if before is None else min(before, after)
            yield Stmt(_sql.CLEAR_LANE_ATTEMPTS_AFTER, (group, topic, partition, low))
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
    if spec.kind == "shift" and not (
        isinstance(spec.value, int) and abs(spec.value) <= _core.MAX_INT64
    ):
        raise InvalidArgument("shift needs a whole number of events, at most 2**63-1 either way")
    if spec.kind == "offset":
        _core.check_offset(spec.value, "the offset to reset to")
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
            pids = _members.live_member_pids(log.paths, group)
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
