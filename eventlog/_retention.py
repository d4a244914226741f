"""Retention (`eventlog prune`): which old events may go, per partition, and deleting them in
short chunks. Unless forced, never an event some group has not handled yet, nor one a
requeued dead letter waits for.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import _core, _sql
from ._core import Lane, Plan, Stmt
from ._tail import NEVER
from .errors import InvalidArgument, NotFound

if TYPE_CHECKING:
    from ._sync import SyncLog

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
    # with force: the groups (and requeued dead letters) whose unhandled events go anyway,
    # and how many of those events there are: their consumers will never see them
    overridden: list[Hold] = field(default_factory=list)
    unhandled: int = 0


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

    @property
    def unhandled(self) -> int:
        return sum(lane.unhandled for lane in self.lanes)


def _keep_last_bound_plan(topic: str, partitions: int, keep: int) -> Plan[int | None]:
    """The offset of the (keep+1)-th newest event of the topic (None: it has no more than
    `keep`), by merging its lanes newest first, a page at a time."""
    if partitions == 1:
        rows = yield Stmt(_sql.LANE_OFFSET_BACK, (topic, 0, NEVER, keep))
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
        yield from refill(p, NEVER)
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


def _unhandled_plan(lane: Lane, bound: int, wanted: int, holds: list[Hold]) -> Plan[int]:
    """How many of the `wanted` events up to `bound` some group has not handled: a group's
    from its position on; a requeued dead letter's, that one event (the events after it were
    handled)."""
    floor = min([bound] + [h.position for h in holds if not h.redelivery])
    below = wanted if floor == bound else (yield from _count_upto_plan(lane, floor))
    if not any(h.redelivery and h.position < floor for h in holds):
        return wanted - below
    # every requeued event up to the floor, not the holds': those name each group's first
    rows = yield Stmt(_sql.REDELIVERED_IN_LANE_UPTO, (lane[0], lane[1], floor))
    return wanted - below + int(rows[0][0])


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
        keep_bound = NEVER
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
            holds = _lane_holds(p, bound, positions, redeliveries)
            upto = min([bound] + [h.position for h in holds])
            count = wanted_count if upto == bound else (yield from _count_upto_plan(lane, upto))
            if force:
                # deleted all the same, and said: nothing else tells those groups
                unhandled = yield from _unhandled_plan(lane, bound, wanted_count, holds)
                lanes.append(LanePrune(lane[0], p, bound, bound, wanted_count, 0, [],
                                       holds if count < wanted_count else [],
                                       unhandled))  # fmt: skip
                continue
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
