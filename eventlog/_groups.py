"""Consumer-group logic with no I/O of its own: lane assignment, the attempt rule, and the
plans that move a group's positions.

The attempt rule (guarantee 4). A batch is handled without a write per event; instead the
lane row names the batch in flight (inflight_from..inflight_to) in the same transaction that
commits the previous one. Whoever takes a lane and finds that marker knows its last owner died
mid-batch, and handles that range one event at a time, writing each event's attempt count
before its handler runs. An event whose attempt was written and who is still inside the
crashed range also carries the batch run that crashed: that run is counted once, when the
event fails again alone, so its innocent neighbours are never charged for it. Once such an
event is done (handled or dead-lettered), the crash is accounted for: the rest of the range
is handled as an ordinary batch again (still marked in flight, so a new crash is noticed), and
a second poison event in it, which never ran in the crashed batch, is not charged that run
too.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from . import _sql
from ._core import (
    Event,
    Lane,
    Plan,
    Row,
    Stmt,
    check_name,
    now_ms,
    row_to_event,
    start_position_plan,
)
from .errors import NotFound

if TYPE_CHECKING:
    from ._sync import SyncLog


def assign(lanes: Sequence[Lane], members: Sequence[str], me: str) -> set[Lane]:
    """Every member computes the same split: sorted lanes dealt round robin to sorted members."""
    ordered = sorted(set(members))
    if me not in ordered:
        return set()
    n, mine = len(ordered), ordered.index(me)
    return {lane for i, lane in enumerate(sorted(lanes)) if i % n == mine}


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Exponential backoff with full jitter over its upper half: never zero, never in step."""
    ceiling = min(cap, base * (2 ** max(attempt - 1, 0)))
    return float(ceiling / 2 + rng.random() * ceiling / 2)


@dataclass
class LaneState:
    """What a lane's owner knows between batches."""

    lane: Lane
    position: int
    crashed_from: int | None = None  # the in-flight range found when the lane was taken
    crashed_to: int | None = None

    def credit(self, offset: int) -> int:
        """1 if the event was in the batch its last owner died in (see the module doc)."""
        if self.crashed_from is None or self.crashed_to is None:
            return 0
        return 1 if self.crashed_from <= offset <= self.crashed_to else 0

    def suspect(self, offset: int) -> bool:
        return self.credit(offset) == 1

    def settle_crash(self) -> None:
        """An event of the crashed range failed alone and is done: it was charged the
        crashed run, which nobody else may be charged again (see the module doc)."""
        self.crashed_from = self.crashed_to = None


@dataclass
class Batch:
    """A fetched batch. Rows are decoded on first use, outside the transaction that fetched
    them, so the write lock is not held while JSON is parsed."""

    rows: list[Row]
    attempts: dict[int, int] = field(default_factory=dict)  # offset -> attempts written
    _events: list[Event] | None = None

    @property
    def events(self) -> list[Event]:
        if self._events is None:
            self._events = [row_to_event(r) for r in self.rows]
        return self._events


def latest_start_plan(group: str, head: int) -> Plan[int]:
    """Where `latest` starts the group's lanes that have no position: the head + 1 when its
    first member started at latest, the same for every member (noted then, kept until the
    group is deleted). A member that joins later must not skip what a topic created
    meanwhile received; one member's own head would."""
    yield Stmt(_sql.NOTE_GROUP_START, (group, head + 1, now_ms()))
    rows = yield Stmt(_sql.GROUP_START, (group,))
    return int(rows[0][0])


def take_lane_plan(group: str, lane: Lane, start: str | int | datetime) -> Plan[LaneState]:
    """Read (or create at `start`) the group's position in a lane, and any crashed batch."""
    topic, partition = lane
    rows = yield Stmt(_sql.GROUP_LANE, (group, topic, partition))
    if not rows:
        position = yield from start_position_plan(lane, start)
        yield Stmt(_sql.START_GROUP_LANE, (group, topic, partition, position, now_ms()))
        rows = yield Stmt(_sql.GROUP_LANE, (group, topic, partition))
    position, crashed_from, crashed_to = rows[0]
    return LaneState(lane, int(position), crashed_from, crashed_to)


def _fetch(group: str, state: LaneState, limit: int) -> Plan[Batch]:
    topic, partition = state.lane
    rows: list[Row] = yield Stmt(_sql.READ_LANE_AFTER, (topic, partition, state.position, limit))
    batch = Batch(rows)
    if rows:
        tried = yield Stmt(
            _sql.LANE_ATTEMPTS, (group, topic, partition, state.position, rows[-1][0])
        )
        batch.attempts = {int(o): int(a) for o, a in tried}
    return batch


def has_more_plan(state: LaneState) -> Plan[bool]:
    """Whether the lane holds an event after the position: one index probe, no lock."""
    rows = yield Stmt(_sql.LANE_HAS_AFTER, (*state.lane, state.position))
    return bool(rows)


def advance_plan(group: str, state: LaneState, commit_to: int | None, limit: int) -> Plan[Batch]:
    """Commit the batch handled (if any), fetch the next, and mark it in flight: one
    transaction, so a crash leaves either the old marker or the new one."""
    topic, partition = state.lane
    if commit_to is not None:
        state.position = max(state.position, commit_to)
    batch = yield from _fetch(group, state, limit)
    first = int(batch.rows[0][0]) if batch.rows else None
    last = int(batch.rows[-1][0]) if batch.rows else None
    if state.crashed_to is not None and first is not None:
        # still inside a crashed range: keep naming it, so a second crash keeps its credit
        first = min(first, state.crashed_from or first)
        last = max(last or 0, state.crashed_to)
    yield Stmt(
        _sql.COMMIT_GROUP_LANE,
        (state.position, first, last, now_ms(), group, topic, partition),
    )
    return batch


def commit_plan(group: str, state: LaneState, commit_to: int, keep_marker: bool) -> Plan[None]:
    """Commit a position; clears the in-flight marker unless the batch is still in hand."""
    topic, partition = state.lane
    state.position = max(state.position, commit_to)
    rows = yield Stmt(_sql.GROUP_LANE, (group, topic, partition))
    first, last = (rows[0][1], rows[0][2]) if keep_marker and rows else (None, None)
    if first is not None and last is not None and first <= state.position:
        first = state.position + 1 if state.position < last else None
        last = last if first is not None else None
    yield Stmt(_sql.COMMIT_GROUP_LANE,
               (state.position, first, last, now_ms(), group, topic, partition))  # fmt: skip


def start_attempt_plan(group: str, event: Event, attempts: int) -> Plan[None]:
    """Persist that attempt number `attempts` is about to run (before the handler)."""
    yield Stmt(_sql.START_ATTEMPT, (group, event.offset, event.topic, event.partition, attempts))


def _failed_attempt_plan(
    group: str, event: Event, attempts: int, error: tuple[str, str, str], ts: int
) -> Plan[None]:
    yield from start_attempt_plan(group, event, attempts)
    yield Stmt(_sql.RECORD_FAILURE, (ts, ts, *error, group, event.offset))


def record_failure_plan(
    group: str,
    event: Event,
    attempts: int,
    error: tuple[str, str, str],
    state: LaneState | None,
) -> Plan[None]:
    """Record a failed attempt. The first failure of a batch-handled event also commits the
    events before it and takes it out of the in-flight range: its attempts are now counted
    one by one."""
    ts = now_ms()
    yield from _failed_attempt_plan(group, event, attempts, error, ts)
    if state is not None and not state.suspect(event.offset):
        yield from _commit_before(group, state, event)


def record_hard_timeout_plan(
    group: str,
    event: Event,
    attempts: int,
    error: tuple[str, str, str],
    state: LaneState | None,
) -> Plan[None]:
    """Record the attempt of a handler past its hard timeout; the process exits next.

    The crash is this event's alone: unless it is inside a crashed range (whose marker must
    stay), commit the events before it and clear the in-flight marker, since none of the
    events after it ran (the next owner must not charge them the crash)."""
    ts = now_ms()
    yield from _failed_attempt_plan(group, event, attempts, error, ts)
    if state is not None and not state.suspect(event.offset):
        topic, partition = state.lane
        yield Stmt(_sql.COMMIT_GROUP_LANE,
                   (event.offset - 1, None, None, ts, group, topic, partition))  # fmt: skip


def _commit_before(group: str, state: LaneState, event: Event) -> Plan[None]:
    topic, partition = state.lane
    state.position = max(state.position, event.offset - 1)
    rows = yield Stmt(_sql.GROUP_LANE, (group, topic, partition))
    last = rows[0][2] if rows else None
    first = event.offset + 1 if last is not None and last > event.offset else None
    yield Stmt(_sql.COMMIT_GROUP_LANE,
               (state.position, first, last if first is not None else None, now_ms(), group,
                topic, partition))  # fmt: skip


def event_attempt_plan(group: str, offset: int) -> Plan[Row | None]:
    rows = yield Stmt(_sql.EVENT_ATTEMPT, (group, offset))
    return rows[0] if rows else None


def choose_dead_letter_id_plan(group: str, event: Event, new_id: str) -> Plan[str]:
    """The id this failure episode's dead-letter line has (or gets): committed before the
    line is written, so a retry after a crash writes no second line."""
    rows = yield Stmt(_sql.CHOOSE_DEAD_LETTER_ID,
                      (group, event.offset, event.topic, event.partition, new_id))  # fmt: skip
    return str(rows[0][0])


def finish_event_plan(
    group: str, event: Event, state: LaneState | None, redelivery: str | None = None
) -> Plan[None]:
    """The event succeeded or was dead-lettered: forget its attempts; commit past it, or (a
    redelivery of dead letter `redelivery`) drop its request, in the same transaction: a
    death in between would run it again, or dead-letter it twice."""
    yield Stmt(_sql.CLEAR_ATTEMPTS, (group, event.offset))
    if state is not None:
        yield from commit_plan(group, state, event.offset, keep_marker=True)
    if redelivery is not None:
        yield Stmt(_sql.DONE_REDELIVERY, (group, event.offset, redelivery))


def redeliveries_plan(group: str) -> Plan[list[tuple[int, str, Lane | None]]]:
    """The group's pending requests: (offset, dead-letter id, the event's lane; None if the
    event was pruned)."""
    rows = yield Stmt(_sql.PENDING_REDELIVERIES, (group,))
    return [
        (int(offset), str(dead_letter_id), None if topic is None else (str(topic), int(partition)))
        for offset, dead_letter_id, topic, partition in rows
    ]


def done_redelivery_plan(group: str, offset: int, dead_letter_id: str) -> Plan[None]:
    yield Stmt(_sql.CLEAR_ATTEMPTS, (group, offset))
    yield Stmt(_sql.DONE_REDELIVERY, (group, offset, dead_letter_id))


def request_redelivery_plan(entries: Sequence[tuple[str, int, str]]) -> Plan[int]:
    """Queue (group, offset, dead-letter id) for redelivery to that group only, attempts reset."""
    pruned = []
    for _group, offset, dead_letter_id in entries:
        if not (yield Stmt(_sql.EVENT_EXISTS, (offset,))):
            pruned.append(f"{dead_letter_id} (offset {offset})")
    if pruned:
        raise NotFound(
            f"the events of dead letters {', '.join(pruned)} were pruned from the log: a "
            "requeue has nothing to deliver, and nothing was requeued",
            hint="their payloads are in the dead-letter file ('eventlog dlq show ID'): append "
            "them again, then purge those entries; or requeue the others by id",
        )
    ts = now_ms()
    added = 0
    for group, offset, dead_letter_id in entries:
        yield Stmt(_sql.CLEAR_ATTEMPTS, (group, offset))
        rows = yield Stmt(_sql.REQUEST_REDELIVERY + " RETURNING event_offset",
                          (group, offset, dead_letter_id, ts))  # fmt: skip
        added += len(rows)
    return added


# -- inspection -------------------------------------------------------------------------------


@dataclass(frozen=True)
class LanePosition:
    group: str
    topic: str
    partition: int
    position: int  # the last offset the group is done with
    head: int  # the last offset in the lane (0 if empty)
    lag: int  # events in the lane after position
    in_flight: tuple[int, int] | None
    updated_at_ms: int


def positions_plan(group: str | None = None) -> Plan[list[LanePosition]]:
    """Every group's (or one group's) position per lane, with head and lag."""
    if group is None:
        rows = yield Stmt(_sql.LIST_GROUP_LANES)
    else:
        rows = yield Stmt(_sql.GROUP_LANES, (group,))
    found = []
    for name, topic, partition, position, inflight_from, inflight_to, updated_at in rows:
        head_rows = yield Stmt(_sql.LAST_OFFSET_IN_LANE, (topic, partition))
        head = int(head_rows[0][0] or 0)
        lag = 0
        if head > position:
            lag_rows = yield Stmt(_sql.COUNT_LANE_AFTER, (topic, partition, position))
            lag = int(lag_rows[0][0])
        in_flight = (int(inflight_from), int(inflight_to)) if inflight_from is not None else None
        found.append(LanePosition(name, topic, int(partition), int(position), head, lag,
                                  in_flight, int(updated_at)))  # fmt: skip
    return found


def attempts_plan(group: str) -> Plan[list[Row]]:
    """Events of the group being retried: offset, topic, partition, attempts, last error."""
    return (yield Stmt(_sql.GROUP_ATTEMPTS, (group,)))


def group_extras_plan(group: str) -> Plan[tuple[list[Row], int]]:
    """Events the group is retrying (offset, topic, partition, attempts, last failure, error
    type and message) and how many requeued dead letters wait for it."""
    retrying = yield from attempts_plan(group)
    rows = yield Stmt(_sql.PENDING_REDELIVERY_COUNT, (group,))
    return retrying, int(rows[0][0])


def check_group_exists(log: SyncLog, group: str) -> None:
    """NotFound unless the log knows the group (by a position or a member folder)."""
    check_name(group, "group", log.limits)
    if group not in log.group_names():
        raise NotFound(f"no consumer group named {group!r}",
                       hint="list the groups with 'eventlog groups'")  # fmt: skip


def group_names_plan() -> Plan[list[Row]]:
    """The name of every group with a row anywhere in the file."""
    return (yield Stmt(_sql.GROUP_NAMES))


def delete_group_plan(group: str) -> Plan[int]:
    rows = yield Stmt(_sql.GROUP_LANES, (group,))
    yield Stmt(_sql.DELETE_GROUP_OFFSETS, (group,))
    yield Stmt(_sql.DELETE_GROUP_ATTEMPTS, (group,))
    yield Stmt(_sql.DELETE_GROUP_REDELIVERIES, (group,))
    yield Stmt(_sql.DELETE_GROUP_START, (group,))
    return len(rows)
