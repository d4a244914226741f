"""Pure logic shared by both shells: validation, strict JSON, partitioning, topic patterns,
start positions, rows to events, and the operation plans.

A plan is a generator that yields `Stmt`s and receives each statement's rows; a shell drives
it inside one transaction. Nothing here imports sqlite3, aiosqlite or asyncio.
"""

from __future__ import annotations

import functools
import json
import re
import time
import zlib
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Literal, NamedTuple, TypeAlias, TypeVar

from . import _sql
from .errors import InvalidArgument, InvalidName, InvalidPayload, PayloadTooLarge, TopicConflict

T = TypeVar("T")
Row: TypeAlias = tuple[Any, ...]
Lane: TypeAlias = tuple[str, int]  # (topic, partition)


@dataclass(frozen=True, slots=True)
class Stmt:
    sql: str
    params: Sequence[Any] | Iterable[Sequence[Any]] = ()
    many: bool = False


Plan: TypeAlias = Generator[Stmt, list[Row], T]
Mode: TypeAlias = Literal["write", "read", "none"]


def idle_left(idle_timeout: float | None, last_event_at: float) -> float | None:
    """How long a follower may still wait for its next event (None: no limit; <= 0: its
    idle_timeout has passed). Counted from the last event it delivered: a wake-up for another
    topic's commit (or any commit that brought it nothing) must not start it over."""
    if idle_timeout is None:
        return None
    return idle_timeout - (time.monotonic() - last_event_at)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


# -- limits and validation --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Limits:
    """Input limits; every append is checked against them before any statement runs."""

    max_payload_bytes: int = 1 << 20
    max_key_length: int = 1024
    max_headers: int = 64
    max_header_length: int = 4096
    max_name_length: int = 200
    max_partitions: int = 1024
    # Reading a payload back needs a stack frame per level on top of the reader's own, under
    # Python's recursion limit (1000): much deeper and a stored event could never be read.
    max_depth: int = 200


DEFAULT_LIMITS = Limits()

_SEGMENT = r"[A-Za-z0-9_-]+"
_NAME_RE = re.compile(rf"{_SEGMENT}(?:\.{_SEGMENT})*")
_PATTERN_SEGMENT_RE = re.compile(rf"{_SEGMENT}|\*|#")


@functools.lru_cache(maxsize=4096)
def _good_name(name: str, max_length: int) -> bool:
    # Names repeat on every append: the regex runs once per name.
    return 0 < len(name) <= max_length and _NAME_RE.fullmatch(name) is not None


def check_name(name: object, what: str = "topic", limits: Limits = DEFAULT_LIMITS) -> str:
    """A topic or group name: segments of [A-Za-z0-9_-] joined by single dots."""
    if not isinstance(name, str):
        raise InvalidName(f"{what} name must be a string, got {type(name).__name__}")
    if not _good_name(name, limits.max_name_length):
        raise InvalidName(
            f"invalid {what} name {name!r}: use 1-{limits.max_name_length} letters, digits, "
            "'_' or '-', in segments joined by single dots"
        )
    return name


def is_pattern(text: str) -> bool:
    return "*" in text or "#" in text


def check_pattern(pattern: object) -> str:
    """A topic name or an AMQP-style pattern: `*` is one segment, `#` any number (even none)."""
    if not isinstance(pattern, str):
        raise InvalidName(f"topic pattern must be a string, got {type(pattern).__name__}")
    if not is_pattern(pattern):
        return check_name(pattern)
    segments = pattern.split(".")
    if not all(_PATTERN_SEGMENT_RE.fullmatch(s) for s in segments):
        raise InvalidName(
            f"invalid topic pattern {pattern!r}: each dot-separated segment is a name, "
            "'*' (one segment) or '#' (any number of segments)"
        )
    return pattern


def compile_patterns(patterns: str | Sequence[str]) -> re.Pattern[str]:
    """One regex matching any of the given topic names or patterns; use `topic_matches`."""
    if isinstance(patterns, str):
        patterns = [patterns]
    elif not isinstance(patterns, list | tuple):
        raise InvalidName(
            f"topics must be a name, a pattern, or a list of them, got {type(patterns).__name__}"
        )
    if not patterns:
        raise InvalidArgument("subscribe to at least one topic or pattern")
    alternatives = []
    for pattern in patterns:
        check_pattern(pattern)
        # Matched against "." + topic, so that every segment carries its own leading dot
        # and '#' can match no segment at all.
        parts = []
        for segment in pattern.split("."):
            if segment == "#":
                parts.append(rf"(?:\.{_SEGMENT})*")
            elif segment == "*":
                parts.append(rf"\.{_SEGMENT}")
            else:
                parts.append(r"\." + re.escape(segment))
        alternatives.append("".join(parts))
    return re.compile("|".join(f"(?:{a})" for a in alternatives))


def topic_matches(compiled: re.Pattern[str], topic: str) -> bool:
    return compiled.fullmatch("." + topic) is not None


def utf8_text(text: str) -> str:
    """`text` with what UTF-8 cannot hold (lone surrogates: a file name that is not UTF-8,
    decoded the way os does it) escaped as `\\udcff`: an error's text is stored in SQLite
    and in the dead-letter file, and a poison event must end even when its error says odd
    things."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


MAX_INT64 = 2**63 - 1  # SQLite's integers: an offset, count or page past it is refused


def is_whole(value: object, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and minimum <= value <= MAX_INT64


_WHOLE_RE = re.compile(r"-?[0-9]{1,19}")


def parse_whole(text: str) -> int | None:
    """`text` as an integer SQLite can hold (ASCII digits, an optional minus), or None.
    str.isdigit() takes '²', which int() refuses."""
    text = text.strip()
    if not _WHOLE_RE.fullmatch(text):
        return None
    value = int(text)
    return value if -MAX_INT64 - 1 <= value <= MAX_INT64 else None


def check_offset(offset: object, what: str = "offset") -> int:
    if not is_whole(offset, 0):
        raise InvalidArgument(f"{what} must be an integer from 0 to 2**63-1, got {offset!r}")
    return offset  # type: ignore[return-value]


def check_read_options(limit: object, page: object) -> None:
    """`limit`: None or a count >= 0; `page`: rows per lane and query, >= 1 (SQLite would
    read LIMIT -1 as no limit and load a whole backlog at once)."""
    if limit is not None and not is_whole(limit, 0):
        raise InvalidArgument(f"limit must be None or an integer >= 0, got {limit!r}")
    if not is_whole(page, 1):
        raise InvalidArgument(f"page must be an integer >= 1, got {page!r}")


def check_seconds(value: object, what: str) -> None:
    """None (no limit) or a number of seconds >= 0."""
    if value is not None and (
        not isinstance(value, int | float) or isinstance(value, bool) or not value >= 0
    ):
        raise InvalidArgument(f"{what} must be None or seconds >= 0, got {value!r}")


def check_wait_for(after: object, timeout: object) -> None:
    if after is not None and not is_whole(after, 0):
        raise InvalidArgument(f"after must be None or an offset >= 0, got {after!r}")
    check_seconds(timeout, "timeout")


def check_partitions(partitions: object, limits: Limits = DEFAULT_LIMITS) -> int:
    if (
        not isinstance(partitions, int)
        or isinstance(partitions, bool)
        or not 1 <= partitions <= limits.max_partitions
    ):
        raise InvalidArgument(
            f"partitions must be an integer from 1 to {limits.max_partitions}, got {partitions!r}"
        )
    return partitions


# Built once: json.dumps with options builds a new encoder on every call, and even a kept
# JSONEncoder builds a new C encoder in each encode(); this is that C encoder, kept. No
# circular check (it keeps a dict of every container's id): a payload that holds itself
# recurses until RecursionError instead, which is refused all the same.
_encoder = json.JSONEncoder(
    allow_nan=False, ensure_ascii=False, separators=(",", ":"), check_circular=False
)


def _refuse(value: Any) -> Any:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


_encode: Callable[[Any], str] = _encoder.encode
_make_c_encoder: Any = getattr(json.encoder, "c_make_encoder", None)  # None without _json
if _make_c_encoder is not None:
    _chunks = _make_c_encoder(
        None, _refuse, json.encoder.encode_basestring, None, ":", ",", False, False, False
    )

    def _encode_kept(value: Any) -> str:
        return "".join(_chunks(value, 0))

    _encode = _encode_kept


def encode_json(
    value: Any, what: str = "payload", max_depth: int = DEFAULT_LIMITS.max_depth
) -> str:
    """Strict JSON: no NaN/Infinity, no silent conversion of unknown types, no nesting deeper
    than `max_depth` containers (json.loads could not read it back in a deep call stack)."""
    try:
        text = _encode(value)
    except (TypeError, ValueError) as exc:
        raise InvalidPayload(f"{what} is not plain JSON: {exc}") from exc
    except RecursionError as exc:
        raise InvalidPayload(
            f"{what} is not plain JSON: it contains itself, or is nested far too deep"
        ) from exc
    cls = value.__class__
    if (
        cls is dict
        and _STR.issuperset(map(type, value))
        and _SCALARS.issuperset(map(type, value.values()))
    ):
        return text  # the common event: one flat object of scalars, checked without a walk
    if cls not in _SCALARS:
        _check_object_keys(value, what)
        # Each level writes a bracket, so few brackets prove shallow without a walk.
        if text.count("[") + text.count("{") > max_depth:
            depth = _nesting(value)
            if depth > max_depth:
                raise InvalidPayload(
                    f"{what} is nested {depth} levels deep; the limit is {max_depth}",
                    hint="flatten the payload, or raise Limits.max_depth",
                )
    return text


def _nesting(value: Any) -> int:
    """How many containers deep the value goes (a scalar is 0, [] is 1)."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        for child in item.values() if isinstance(item, dict) else item:
            if isinstance(child, _CONTAINERS):
                stack.append((child, depth + 1))
    return deepest


_SCALARS = frozenset({str, int, float, bool, type(None)})
_STR = frozenset({str})
_CONTAINERS = (dict, list, tuple)


def _check_object_keys(value: Any, what: str) -> None:
    """json.dumps turns int, float, bool and None keys into strings: {1: "a", "1": "b"}
    would come back as {"1": "b"}. Only str keys round-trip, so only they are accepted.
    Iterative: dumps already bounded the depth; this must not hit the recursion limit.
    The type sets are checked in C (issuperset over map(type, ...)): no Python step per key."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if not _STR.issuperset(map(type, item)):
                for key in item:
                    if not isinstance(key, str):
                        raise InvalidPayload(
                            f"{what} is not plain JSON: object key {key!r} is not a string "
                            "(JSON would turn it into one)"
                        )
            children: Iterable[Any] = item.values()
        elif isinstance(item, _CONTAINERS):
            children = item
        else:
            continue  # a subclass of a scalar type (an IntEnum, say) at the top
        if not _SCALARS.issuperset(map(type, children)):
            for child in children:
                if isinstance(child, _CONTAINERS):
                    stack.append(child)


class EncodedEvent(NamedTuple):
    """An event checked and encoded, ready for INSERT_EVENT (partition still to choose).
    A NamedTuple: made once per append, and a frozen dataclass costs a setattr per field."""

    topic: str
    key: str | None
    payload: str
    headers: str | None
    dedupe_key: str | None


_new_tuple = tuple.__new__


def _check_text(value: object, what: str, max_length: int) -> str:
    if not isinstance(value, str):
        raise InvalidArgument(f"{what} must be a string, got {type(value).__name__}")
    if len(value) > max_length:
        raise InvalidArgument(f"{what} is {len(value)} characters long; the limit is {max_length}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidArgument(f"{what} is not valid unicode text: {exc}") from exc
    return value


def encode_event(
    topic: str,
    payload: Any,
    key: str | None = None,
    headers: Mapping[str, str] | None = None,
    dedupe_key: str | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> EncodedEvent:
    """Validate and encode one event; raises a typed error and touches nothing on bad input."""
    check_name(topic, "topic", limits)
    text = encode_json(payload, "payload", limits.max_depth)
    if text.isascii():
        size = len(text)
    else:
        try:
            size = len(text.encode("utf-8"))
        except UnicodeEncodeError as exc:
            raise InvalidPayload(f"payload holds text that is not valid unicode: {exc}") from exc
    if size > limits.max_payload_bytes:
        raise PayloadTooLarge(
            f"payload is {size} bytes as JSON; the limit is {limits.max_payload_bytes} bytes"
        )
    if key is not None:
        _check_text(key, "key", limits.max_key_length)
    headers_text = None
    if headers is not None:
        if not isinstance(headers, Mapping):
            raise InvalidArgument(
                f"headers must be a mapping of str to str, got {type(headers).__name__}"
            )
        if len(headers) > limits.max_headers:
            raise InvalidArgument(
                f"{len(headers)} headers given; the limit is {limits.max_headers}"
            )
        for name, value in headers.items():
            _check_text(name, "header name", limits.max_header_length)
            _check_text(value, f"header {name!r}", limits.max_header_length)
        if headers:
            headers_text = encode_json(dict(headers), "headers")
    if dedupe_key is not None:
        _check_text(dedupe_key, "dedupe_key", limits.max_key_length)
    # tuple.__new__ skips the NamedTuple's Python-level __new__: half the cost, per event.
    return _new_tuple(EncodedEvent, (topic, key, text, headers_text, dedupe_key))


def partition_for(key: str | None, partitions: int, spread: int) -> int:
    """Stable across processes and versions: crc32 of the key; keyless events go round robin."""
    if partitions == 1:
        return 0
    if key is None:
        return spread % partitions
    return zlib.crc32(key.encode("utf-8")) % partitions


# -- events -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Event:
    """One committed event. `offset` is unique in the log and grows with every append."""

    offset: int
    topic: str
    partition: int
    key: str | None
    payload: Any
    headers: Mapping[str, str]
    timestamp_ms: int

    @property
    def time(self) -> datetime:
        return datetime.fromtimestamp(self.timestamp_ms / 1000, UTC)

    def to_dict(self) -> dict[str, Any]:
        return {
            "offset": self.offset,
            "topic": self.topic,
            "partition": self.partition,
            "key": self.key,
            "payload": self.payload,
            "headers": dict(self.headers),
            "timestamp_ms": self.timestamp_ms,
        }


# Shared by every event without headers, so it must be read-only: a caller mutating one
# event's headers would otherwise change the headers of all later ones.
_EMPTY_HEADERS: Mapping[str, str] = MappingProxyType({})
_loads = json.loads


def row_to_event(row: Row) -> Event:
    offset, topic, partition, key, payload, headers, created_at = row
    return Event(
        offset,
        topic,
        partition,
        key,
        _loads(payload),
        _loads(headers) if headers else _EMPTY_HEADERS,
        created_at,
    )


# -- start positions --------------------------------------------------------------------------

StartSpec: TypeAlias = "Literal['earliest', 'latest'] | int | datetime"


def check_start(start: object) -> str | int | datetime:
    """earliest, latest, an offset (the first one delivered) or a time (aware or UTC)."""
    if start in ("earliest", "latest"):
        return str(start)
    if isinstance(start, bool):
        raise InvalidArgument(f"invalid start {start!r}")
    if isinstance(start, int):
        return check_offset(start, "start offset")
    if isinstance(start, datetime):
        return start
    raise InvalidArgument(
        f"invalid start {start!r}: use 'earliest', 'latest', an offset or a datetime"
    )


def datetime_ms(moment: datetime) -> int:
    if not isinstance(moment, datetime):
        raise InvalidArgument(f"expected a datetime, got {moment!r}")
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def start_position_plan(lane: Lane, start: str | int | datetime) -> Plan[int]:
    """The position (last offset treated as done) a reader or new group starts a lane at."""
    if start == "earliest":
        return 0
    if start == "latest":
        rows = yield Stmt(_sql.HEAD_OFFSET)
        return int(rows[0][0])
    if isinstance(start, int):
        return max(start - 1, 0)
    assert isinstance(start, datetime)
    return (yield from offset_before_time_plan(lane, datetime_ms(start)))


def offset_before_time_plan(lane: Lane, at_ms: int) -> Plan[int]:
    """The position just before the lane's first event at or after `at_ms`.

    Bisects the lane's offsets on its index: created_at grows with the offset (up to clock
    steps), so no time index is kept and each probe is one index seek.
    """
    topic, partition = lane
    rows = yield Stmt(_sql.LAST_EVENT_IN_LANE, (topic, partition))
    if not rows or rows[0][1] < at_ms:
        head = yield Stmt(_sql.HEAD_OFFSET)
        return int(head[0][0])
    hi = int(rows[0][0])
    rows = yield Stmt(_sql.FIRST_OFFSET_IN_LANE, (topic, partition))
    lo = int(rows[0][0])
    # smallest x in [lo, hi] whose next lane event is at or after the time
    while lo < hi:
        mid = (lo + hi) // 2
        probe = yield Stmt(_sql.LANE_EVENT_FROM, (topic, partition, mid))
        if probe[0][1] >= at_ms:
            hi = mid
        else:
            lo = mid + 1
    first = yield Stmt(_sql.LANE_EVENT_FROM, (topic, partition, lo))
    return int(first[0][0]) - 1


# -- topics and appends -----------------------------------------------------------------------


@dataclass
class TopicCache:
    """Partition counts (fixed once a topic exists) and the keyless round-robin counters."""

    partitions: dict[str, int] = field(default_factory=dict)
    spread: dict[str, int] = field(default_factory=dict)
    counted: dict[str, int] = field(default_factory=dict)  # counted_through, as last seen

    def forget(self) -> None:
        """Forget the topics, in place, after a transaction that may have created one rolled
        back: a job already queued on a worker thread holds this same cache."""
        self.partitions.clear()
        self.counted.clear()

    def next_spread(self, topic: str) -> int:
        n = self.spread.get(topic, 0)
        self.spread[topic] = n + 1
        return n


def create_topic_plan(
    topic: str, partitions: int, cache: TopicCache, *, exist_ok: bool = True
) -> Plan[bool]:
    """Create a topic; returns False when it already existed with that partition count."""
    rows = yield Stmt(_sql.CREATE_TOPIC_RETURNING, (topic, partitions, now_ms()))
    created = bool(rows)
    rows = yield Stmt(_sql.TOPIC_COUNTS, (topic,))
    cache.counted[topic] = int(rows[0][1])
    if not created:
        existing = int(rows[0][0])
        if existing != partitions:
            raise TopicConflict(
                f"topic {topic!r} exists with {existing} partitions, not {partitions}"
            )
        if not exist_ok:
            raise TopicConflict(f"topic {topic!r} already exists", hint="pick another name")
    cache.partitions[topic] = partitions
    return created


# An appender folds a topic's uncounted tail into its event count once the tail may span
# this many offsets: appends write no counter row, and a count never scans more than a tail.
FOLD_EVERY = 4096


def append_plan(
    events: Sequence[EncodedEvent], cache: TopicCache, default_partitions: int = 1
) -> Plan[list[int]]:
    """Insert the events in order, in the caller's transaction; returns their offsets."""
    ts = now_ms()
    topics = dict.fromkeys([e[0] for e in events])  # EncodedEvent fields by index: per-event
    for topic in topics:  # work here is most of what append_many adds to the insert
        if topic not in cache.partitions:
            yield Stmt(_sql.CREATE_TOPIC, (topic, default_partitions, ts))
            rows = yield Stmt(_sql.TOPIC_COUNTS, (topic,))
            cache.partitions[topic] = int(rows[0][0])
            cache.counted[topic] = int(rows[0][1])
    counts, spread = cache.partitions, cache.next_spread
    if all(counts[topic] == 1 for topic in topics):
        chosen: Sequence[int] = [0] * len(events)
    else:
        chosen = [
            0 if (n := counts[e.topic]) == 1 else partition_for(e.key, n, spread(e.topic))
            for e in events
        ]
    if any([e[4] is not None for e in events]):
        offsets = []
        for e, partition in zip(events, chosen, strict=True):
            params = (e.topic, partition, e.key, e.payload, e.headers, ts, e.dedupe_key)
            rows = yield Stmt(_sql.INSERT_EVENT_DEDUPED, params)
            if not rows:
                rows = yield Stmt(_sql.OFFSET_OF_DEDUPE_KEY, (e.topic, e.dedupe_key))
            offsets.append(int(rows[0][0]))
    else:
        # One statement for the whole batch, with the offsets chosen here: the transaction
        # holds the write lock, so nobody takes them meanwhile (and the per-row subquery of
        # INSERT_EVENT is spared).
        rows = yield Stmt(_sql.HEAD_OFFSET)
        first = int(rows[0][0]) + 1
        ids = range(first, first + len(events))
        keyed = any([e[1] is not None for e in events])
        with_headers = any([e[3] is not None for e in events])
        if keyed or with_headers:
            batch = [
                insert_params(offset, e, partition, ts, keyed, with_headers)
                for offset, e, partition in zip(ids, events, chosen, strict=True)
            ]
        else:
            batch = [
                (offset, topic, partition, payload, ts)
                for offset, (topic, _, payload, _, _), partition in zip(
                    ids, events, chosen, strict=True
                )
            ]
        yield Stmt(_sql.INSERT_EVENTS_AT[keyed * 2 + with_headers], batch, many=True)
        offsets = list(ids)
    for topic in topics:
        if fold_due(topic, offsets[-1], cache):
            yield from fold_count_plan(topic, cache, offsets[-1])
    return offsets


def insert_params(
    offset: Any, event: EncodedEvent, partition: int, ts: int, keyed: bool, with_headers: bool
) -> tuple[Any, ...]:
    """The parameters of INSERT_EVENT[s] / INSERT_EVENTS_AT[s], s = 2 * keyed + with_headers:
    the columns left out are NULL in the statement itself."""
    topic, key, payload, headers, _ = event
    if keyed:
        if with_headers:
            return (offset, topic, partition, key, payload, headers, ts)
        return (offset, topic, partition, key, payload, ts)
    if with_headers:
        return (offset, topic, partition, payload, headers, ts)
    return (offset, topic, partition, payload, ts)


def lone_insert(event: EncodedEvent, cache: TopicCache) -> tuple[str, Sequence[Any]] | None:
    """The one INSERT_EVENT and its parameters that append `event` as a transaction of its
    own (autocommit: no BEGIN and COMMIT round trips), when nothing must share that
    transaction: its topic is known to exist and it has no dedupe key to look up. None
    otherwise."""
    partitions = cache.partitions.get(event.topic)
    if partitions is None or event.dedupe_key is not None:
        return None
    partition = (
        0
        if partitions == 1
        else partition_for(event.key, partitions, cache.next_spread(event.topic))
    )
    keyed, with_headers = event.key is not None, event.headers is not None
    params = insert_params(None, event, partition, now_ms(), keyed, with_headers)
    return _sql.INSERT_EVENT[keyed * 2 + with_headers], params[1:]


def fold_due(topic: str, newest: int, cache: TopicCache) -> bool:
    return newest - cache.counted.get(topic, 0) >= FOLD_EVERY


def fold_count_plan(topic: str, cache: TopicCache, through: int) -> Plan[None]:
    """Count the topic's events in (counted_through, through] into its event count."""
    rows = yield Stmt(_sql.TOPIC_COUNTS, (topic,))
    partitions, counted = int(rows[0][0]), int(rows[0][1])
    if through > counted:
        tail = yield from count_range_plan(topic, partitions, counted, through)
        yield Stmt(_sql.FOLD_TOPIC_COUNT, (tail, through, topic))
        counted = through
    cache.counted[topic] = counted


def count_range_plan(topic: str, partitions: int, after: int, through: int) -> Plan[int]:
    """Events of the topic with offsets in (after, through], one index range per lane."""
    total = 0
    for p in range(partitions):
        rows = yield Stmt(_sql.COUNT_LANE_RANGE, (topic, p, after, through))
        total += int(rows[0][0])
    return total


# -- reading ----------------------------------------------------------------------------------


@dataclass
class ReadCursor:
    """Per-lane positions of a reader over a fixed set of topics and patterns.

    Lanes found after the cursor was made (a new topic matching a pattern) start at 0: all
    of their events are newer than the reader.
    """

    patterns: re.Pattern[str]
    positions: dict[Lane, int] = field(default_factory=dict)
    resolved: bool = False


def resolve_lanes_plan(compiled: re.Pattern[str]) -> Plan[list[Lane]]:
    rows = yield Stmt(_sql.ALL_TOPIC_PARTITIONS)
    return [(name, p) for name, n in rows if topic_matches(compiled, name) for p in range(int(n))]


def open_cursor_plan(
    patterns: str | Sequence[str], start: str | int | datetime
) -> Plan[ReadCursor]:
    cursor = ReadCursor(compile_patterns(patterns))
    lanes = yield from resolve_lanes_plan(cursor.patterns)
    for lane in lanes:
        cursor.positions[lane] = yield from start_position_plan(lane, start)
    cursor.resolved = True
    return cursor


def read_page_plan(cursor: ReadCursor, page: int, refresh_lanes: bool) -> Plan[list[Event]]:
    """The next events after the cursor, in offset order, at most `page` per lane.

    Run in one read transaction, so the merge across lanes is exact for that snapshot. A lane
    that returned a full page may hold more below the other lanes' rows, so the merged list
    stops at the smallest last offset among full lanes.
    """
    if refresh_lanes:
        for lane in (yield from resolve_lanes_plan(cursor.patterns)):
            cursor.positions.setdefault(lane, 0)
    merged: list[Row] = []
    cutoff: int | None = None
    lanes = list(cursor.positions.items())
    if len(lanes) > 1:
        # Lanes are read in the order of their next offset, each only up to the cutoff, and
        # a lane whose next event lies past it is not read at all: lanes whose backlogs follow
        # one another (topics filled one after the other) would otherwise each be read a full
        # page per page delivered, and a replay over many of them would read the log over
        # and over (quadratic in the number of lanes).
        nexts = []
        for lane, position in lanes:
            rows = yield Stmt(_sql.LANE_NEXT_OFFSET, (*lane, position))
            if rows:
                nexts.append((int(rows[0][0]), lane, position))
        nexts.sort(key=lambda n: n[0])
        lanes = [(lane, position) for _, lane, position in nexts]
        firsts = [first for first, _, _ in nexts]
    else:
        firsts = [0] * len(lanes)
    for first, ((topic, partition), position) in zip(firsts, lanes, strict=True):
        if cutoff is not None and first > cutoff:
            break
        if cutoff is None:
            rows = yield Stmt(_sql.READ_LANE_AFTER, (topic, partition, position, page))
        else:
            rows = yield Stmt(_sql.READ_LANE_BETWEEN, (topic, partition, position, cutoff, page))
        if rows:
            merged.extend(rows)
            if len(rows) == page:
                last = rows[-1][0]
                cutoff = last if cutoff is None else min(cutoff, last)
    if len(cursor.positions) > 1:
        merged.sort(key=lambda r: r[0])
    if cutoff is not None:
        merged = [r for r in merged if r[0] <= cutoff]
    events = [row_to_event(r) for r in merged]
    for e in events:
        cursor.positions[(e.topic, e.partition)] = e.offset
    return events


def head_plan() -> Plan[int]:
    rows = yield Stmt(_sql.HEAD_OFFSET)
    return int(rows[0][0])


@dataclass(frozen=True, slots=True)
class TopicInfo:
    name: str
    partitions: int
    events: int
    first_offset: int | None
    last_offset: int | None
    created_at_ms: int
    last_append_ms: int | None


def newest_topic_offset(topics: list[TopicInfo]) -> int:
    """The newest offset a topics_plan result names (for run_read); 0 for none."""
    return max((t.last_offset or 0 for t in topics), default=0)


def topics_plan() -> Plan[list[TopicInfo]]:
    """Every topic with its event count (counter plus a short tail) and its first and last
    offsets (one index probe per partition): never a scan of the log."""
    rows = yield Stmt(_sql.LIST_TOPICS)
    topics = []
    for name, partitions, created_at, events, counted in rows:
        firsts, lasts = [], []
        for p in range(int(partitions)):
            first = yield Stmt(_sql.FIRST_OFFSET_IN_LANE, (name, p))
            if first[0][0] is not None:
                firsts.append(int(first[0][0]))
            last = yield Stmt(_sql.LAST_EVENT_IN_LANE, (name, p))
            if last:
                lasts.append((int(last[0][0]), int(last[0][1])))
        tail = 0
        if lasts:
            tail = yield from count_range_plan(name, int(partitions), int(counted),
                                               max(o for o, _ in lasts))  # fmt: skip
        newest = max(lasts) if lasts else None
        topics.append(
            TopicInfo(
                name,
                int(partitions),
                int(events) + tail,
                min(firsts) if firsts else None,
                newest[0] if newest else None,
                int(created_at),
                newest[1] if newest else None,
            )
        )
    return topics


def read_event_plan(offset: int) -> Plan[Event | None]:
    check_offset(offset)
    rows = yield Stmt(_sql.READ_EVENT, (offset,))
    return row_to_event(rows[0]) if rows else None
