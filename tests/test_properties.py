"""Bad input changes nothing (guarantee 7), and good input comes back exactly: property-based
tests over payloads, keys, headers, dedupe keys, topic and group names and patterns.

Everything valid must round-trip exactly, through both shells and as stored (plain sqlite3
reads the row back): unicode, deep nesting, big ints, empty strings, floats to the last bit.
Everything invalid must raise the typed error before any statement runs: the file, its WAL,
every table and the dead-letter file stay byte-for-byte the same.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import eventlog
from eventlog import _core

SETTINGS = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# -- strategies -------------------------------------------------------------------------------

# st.text() never draws lone surrogates: every string here is valid unicode.
texts = st.text(max_size=40) | st.sampled_from(["", "ünïcødé ✓", "日本語", "🎉\u200d🎉", "\x00nul"])
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**300), max_value=2**300)
    | st.floats(allow_nan=False, allow_infinity=False)
    | texts
)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(texts, children, max_size=5),
    max_leaves=25,
)
segment = st.from_regex(r"[A-Za-z0-9_-]{1,12}", fullmatch=True)
names = st.lists(segment, min_size=1, max_size=4).map(".".join)
keys = st.none() | texts
headers = st.none() | st.dictionaries(texts, texts, max_size=6)

NAME_RE = _core._NAME_RE


def bad_name_examples() -> list[Any]:
    return [
        "", ".", "..", "a..b", ".a", "a.", "a/b", "../etc/passwd", "/abs/path", "a b", "é",
        "a\x00b", "a\nb", "a*b", "#", "*", "orders.*", "a" * 201, "\\", "a~1", "C:\\x",
        "a%2fb", None, 1, b"orders", ["a"],
    ]  # fmt: skip


bad_names = st.sampled_from(bad_name_examples()) | st.text(max_size=30).filter(
    lambda s: NAME_RE.fullmatch(s) is None or len(s) > 200
)


def same(a: Any, b: Any) -> bool:
    """Equal and of the same types all the way down (True is not 1, 1.0 is not 1)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float):
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    return bool(a == b)


# -- fixtures: one log per module, checked with plain sqlite3 ---------------------------------


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("props") / "props.db"


@pytest.fixture(scope="module")
def slog(db: Path) -> Iterator[eventlog.SyncLog]:
    log = eventlog.open_sync(db, durability="normal")
    try:
        yield log
    finally:
        log.close()


@pytest.fixture(scope="module")
def alog(db: Path) -> Iterator[tuple[asyncio.Runner, eventlog.AsyncLog]]:
    runner = asyncio.Runner()
    log = runner.run(eventlog.open(db, durability="normal").__aenter__())
    try:
        yield runner, log
    finally:
        runner.run(log.close())
        runner.close()


def stored(db: Path, offset: int) -> tuple[Any, ...]:
    conn = sqlite3.connect(db)
    try:
        row = conn.execute(
            "SELECT topic, key, payload, headers, dedupe_key FROM eventlog_events WHERE id = ?",
            (offset,),
        ).fetchone()
    finally:
        conn.close()
    assert row is not None, f"offset {offset} is not in the file"
    return row


def snapshot(db: Path) -> tuple[Any, ...]:
    """Every table's rows, and the bytes of the database, its WAL and the dead-letter file."""
    conn = sqlite3.connect(db)
    try:
        tables = [r[0] for r in conn.execute(
            "SELECT name FROM sqlite_schema WHERE type = 'table' ORDER BY name")]  # fmt: skip
        rows = {t: sorted(map(repr, conn.execute(f'SELECT * FROM "{t}"'))) for t in tables}
    finally:
        conn.close()
    digests = []
    for suffix in ("", "-wal", ".deadletter.jsonl"):
        path = Path(str(db) + suffix)
        digests.append(hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None)
    return rows, digests


def check_round_trip(db: Path, event: eventlog.Event, topic: str, payload: Any, key: Any,
                     hdrs: Any) -> None:  # fmt: skip
    assert event.topic == topic
    assert same(event.payload, payload), (event.payload, payload)
    assert event.key == key
    assert dict(event.headers) == (hdrs or {})
    raw_topic, raw_key, raw_payload, raw_headers, _ = stored(db, event.offset)
    assert raw_topic == topic and raw_key == key
    assert same(json.loads(raw_payload), payload)
    assert (json.loads(raw_headers) if raw_headers else {}) == (hdrs or {})


# -- valid input round-trips exactly ----------------------------------------------------------


@SETTINGS
@given(topic=names, payload=json_values, key=keys, hdrs=headers)
def test_valid_events_round_trip_exactly_sync(
    slog: eventlog.SyncLog, db: Path, topic: str, payload: Any, key: Any, hdrs: Any
) -> None:
    offset = slog.append(topic, payload, key=key, headers=hdrs)
    event = slog.get(offset)
    assert event is not None and event.offset == offset
    check_round_trip(db, event, topic, payload, key, hdrs)


@settings(SETTINGS, max_examples=60)
@given(topic=names, payload=json_values, key=keys, hdrs=headers)
def test_valid_events_round_trip_exactly_async(
    alog: tuple[asyncio.Runner, eventlog.AsyncLog],
    db: Path, topic: str, payload: Any, key: Any, hdrs: Any,
) -> None:  # fmt: skip
    runner, log = alog
    offset = runner.run(log.append(topic, payload, key=key, headers=hdrs))
    event = runner.run(log.get(offset))
    assert event is not None
    check_round_trip(db, event, topic, payload, key, hdrs)


@settings(SETTINGS, max_examples=40)
@given(batch=st.lists(st.tuples(names, json_values, keys), min_size=1, max_size=8))
def test_append_many_round_trips_in_order(
    slog: eventlog.SyncLog, db: Path, batch: list[tuple[str, Any, Any]]
) -> None:
    offsets = slog.append_many([eventlog.Draft(t, p, key=k) for t, p, k in batch])
    assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets)
    for offset, (topic, payload, key) in zip(offsets, batch, strict=True):
        event = slog.get(offset)
        assert event is not None
        check_round_trip(db, event, topic, payload, key, None)


@settings(SETTINGS, max_examples=40)
@given(dedupe=texts, payload=json_values)
def test_dedupe_key_retry_returns_first_offset_and_stores_once(
    slog: eventlog.SyncLog, db: Path, dedupe: str, payload: Any
) -> None:
    topic = "props.dedupe." + hashlib.sha1(dedupe.encode("utf-8", "surrogatepass")).hexdigest()
    first = slog.append(topic, payload, dedupe_key=dedupe)
    again = slog.append(topic, {"other": True}, dedupe_key=dedupe)
    assert again == first
    assert stored(db, first)[4] == dedupe
    assert [e.offset for e in slog.read(topic)] == [first]


@pytest.mark.parametrize("depth", [1, 50, 200])
def test_deep_nesting_up_to_the_limit_round_trips(slog: eventlog.SyncLog, db: Path,
                                                   depth: int) -> None:  # fmt: skip
    payload: Any = "leaf"
    for i in range(depth):
        payload = [payload] if i % 2 else {"k": payload}
    offset = slog.append("props.deep", payload)
    event = slog.get(offset)
    assert event is not None and same(event.payload, payload)


def test_big_ints_and_edge_floats_round_trip(slog: eventlog.SyncLog) -> None:
    payload = [2**64, -(2**64) - 1, 10**300, -0.0, 5e-324, 1.7976931348623157e308, 0.1 + 0.2, ""]
    event = slog.get(slog.append("props.numbers", payload))
    assert event is not None and same(event.payload, payload)


@settings(SETTINGS, max_examples=80)
@given(group=names, pattern=st.lists(segment | st.sampled_from(["*", "#"]), min_size=1,
                                     max_size=4).map(".".join))  # fmt: skip
def test_valid_group_names_and_patterns_are_accepted(
    alog: tuple[asyncio.Runner, eventlog.AsyncLog], group: str, pattern: str
) -> None:
    _, log = alog
    consumer = log.consumer(group, pattern, lambda e: None)
    assert consumer.group == group
    literal = ".".join(s for s in pattern.split(".") if s not in ("*", "#"))
    if literal and "*" not in pattern:
        assert _core.topic_matches(_core.compile_patterns(pattern), literal)


# -- invalid input is rejected with the typed error, and changes nothing ----------------------

SENTINEL = object()


def invalid_payloads() -> st.SearchStrategy[Any]:
    leaf_bad = st.sampled_from([
        math.nan, math.inf, -math.inf, b"bytes", {1, 2}, SENTINEL, 1 + 2j, "\ud800",
        "ok\udfffok", bytearray(b"x"), range(3), object,
    ])  # fmt: skip
    bad_keys = st.sampled_from([1, 2.5, True, None, (1, 2), b"k"])

    def plant(leaf: Any) -> st.SearchStrategy[Any]:
        return st.recursive(
            st.just(leaf),
            lambda inner: (
                st.tuples(st.lists(json_values, max_size=3), inner).map(lambda t: [*t[0], t[1]])
                | st.tuples(texts, inner).map(lambda t: {t[0]: t[1]})
            ),
            max_leaves=4,
        )

    keyed = st.tuples(bad_keys, json_values, texts).map(lambda t: {t[2]: {t[0]: t[1]}})
    return (
        leaf_bad.flatmap(plant)
        | keyed
        | st.tuples(bad_keys, json_values).map(lambda t: {t[0]: t[1]})
    )


@SETTINGS
@given(payload=invalid_payloads(), topic=names)
def test_invalid_payloads_raise_invalid_payload_and_change_nothing(
    slog: eventlog.SyncLog, db: Path, payload: Any, topic: str
) -> None:
    before = snapshot(db)
    with pytest.raises(eventlog.InvalidPayload) as info:
        slog.append(topic, payload)
    assert info.value.hint
    with pytest.raises(eventlog.InvalidPayload):
        slog.append_many([eventlog.Draft("props.ok", 1), eventlog.Draft(topic, payload)])
    assert snapshot(db) == before


def test_payload_nested_past_the_limit_is_rejected(slog: eventlog.SyncLog, db: Path) -> None:
    before = snapshot(db)
    for depth in (201, 990, 5000):
        payload: Any = 0
        for _ in range(depth):
            payload = [payload]
        with pytest.raises(eventlog.InvalidPayload):
            slog.append("props.deep", payload)
    assert snapshot(db) == before


@SETTINGS
@given(name=bad_names)
def test_invalid_topic_names_raise_invalid_name_and_change_nothing(
    slog: eventlog.SyncLog, db: Path, name: Any
) -> None:
    before = snapshot(db)
    with pytest.raises(eventlog.InvalidName) as info:
        slog.append(name, {"x": 1})
    assert info.value.hint
    with pytest.raises(eventlog.InvalidName):
        slog.create_topic(name, 2)
    with pytest.raises(eventlog.InvalidName):
        slog.append_many([eventlog.Draft("props.ok", 1), eventlog.Draft(name, 1)])
    assert snapshot(db) == before


@SETTINGS
@given(name=bad_names)
def test_invalid_group_names_raise_invalid_name_and_change_nothing(
    alog: tuple[asyncio.Runner, eventlog.AsyncLog], slog: eventlog.SyncLog, db: Path, name: Any
) -> None:
    _, log = alog
    before = snapshot(db)
    sidecar = sorted(p.relative_to(db.parent) for p in db.parent.rglob("*"))
    with pytest.raises(eventlog.InvalidName):
        log.consumer(name, "props.ok", lambda e: None)
    if name is not None:  # group_positions(None) means every group
        with pytest.raises(eventlog.InvalidName):
            slog.group_positions(name)
    with pytest.raises(eventlog.InvalidName):
        slog.consume(name, "props.ok", lambda e: None)
    assert snapshot(db) == before
    assert sorted(p.relative_to(db.parent) for p in db.parent.rglob("*")) == sidecar


@SETTINGS
@given(pattern=st.text(max_size=20) | st.sampled_from(["a.**", "a*", "#a", "a..#", "", "."]))
def test_invalid_patterns_raise_invalid_name(slog: eventlog.SyncLog, pattern: str) -> None:
    segments = pattern.split(".")
    assume(not all(NAME_RE.fullmatch(s) or s in ("*", "#") for s in segments) or not pattern)
    with pytest.raises(eventlog.InvalidName):
        list(slog.read(pattern))


bad_text = (
    st.sampled_from(["\ud800", "a\udc00"]) | st.integers() | st.binary(max_size=5) | st.none()
)


@SETTINGS
@given(
    key=st.sampled_from(["\ud800", "x" * 1025]) | st.integers() | st.binary(max_size=4)
    | st.lists(texts, max_size=2),
)  # fmt: skip
def test_invalid_keys_raise_invalid_argument_and_change_nothing(
    slog: eventlog.SyncLog, db: Path, key: Any
) -> None:
    before = snapshot(db)
    with pytest.raises(eventlog.InvalidArgument):
        slog.append("props.keys", 1, key=key)
    with pytest.raises(eventlog.InvalidArgument):
        slog.append("props.keys", 1, dedupe_key=key)
    assert snapshot(db) == before


@SETTINGS
@given(
    hdrs=st.one_of(
        st.dictionaries(texts, bad_text.filter(lambda v: v is not None) | st.none(), min_size=1,
                        max_size=3),
        st.dictionaries(bad_text.filter(lambda v: not isinstance(v, str)), texts, min_size=1,
                        max_size=3),
        st.dictionaries(texts, st.just("x" * 4097), min_size=1, max_size=2),
        st.lists(st.tuples(texts, texts), max_size=3),
        st.just({f"h{i}": "v" for i in range(65)}),
        st.sampled_from(["k=v", 1, b"x"]),
    )
)  # fmt: skip
def test_invalid_headers_raise_invalid_argument_and_change_nothing(
    slog: eventlog.SyncLog, db: Path, hdrs: Any
) -> None:
    before = snapshot(db)
    with pytest.raises(eventlog.InvalidArgument):
        slog.append("props.headers", 1, headers=hdrs)
    assert snapshot(db) == before


def test_append_many_with_one_bad_draft_stores_none_of_them(
    slog: eventlog.SyncLog, db: Path
) -> None:
    before = snapshot(db)
    drafts = [eventlog.Draft("props.batch", i) for i in range(5)]
    drafts.insert(3, eventlog.Draft("props.batch", {"bad": math.nan}))
    with pytest.raises(eventlog.InvalidPayload):
        slog.append_many(drafts)
    with pytest.raises(eventlog.InvalidArgument):
        slog.append_many([*drafts[:2], "not a draft"])  # type: ignore[list-item]
    assert snapshot(db) == before
