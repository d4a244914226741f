"""Guarantee 7: bad input raises its typed error and changes nothing: every eventlog_ table
(and the AUTOINCREMENT counter) is the same before and after, and the next good append gets
the next offset."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import date
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from conftest import collect, dump
from hypothesis import given, settings
from hypothesis import strategies as st

import eventlog
from eventlog import Draft, _core

LIMIT = 64  # a small payload limit (bytes of JSON) for the size tests
LIMITS = eventlog.Limits(max_payload_bytes=LIMIT, max_key_length=16, max_headers=3,
                         max_header_length=16)  # fmt: skip


def at_limit(extra: int = 0) -> str:
    """A string payload whose JSON (quotes included) is LIMIT + extra bytes, with 2-byte
    characters, so bytes and not characters are what counts."""
    body = "é" * ((LIMIT + extra - 2) // 2) + "x" * ((LIMIT + extra - 2) % 2)
    assert len(('"' + body + '"').encode()) == LIMIT + extra
    return body


class Opaque:
    pass


BAD_PAYLOADS = {
    "object": Opaque(),
    "set": {1, 2},
    "bytes": b"abc",
    "decimal": Decimal("1.5"),
    "date": date(2024, 1, 1),
    "nan": float("nan"),
    "infinity": float("inf"),
    "minus infinity": float("-inf"),
    "nested nan": {"a": [1, {"b": float("nan")}]},
    "int key": {1: "a"},
    "none key": {None: "a"},
    "bool key": {True: "a"},
    "float key": {1.5: "a"},
    "nested int key": {"a": [{"b": {2: "c"}}]},
    "lone surrogate": "\ud800",
    "surrogate in key": {"\udfff": 1},
    "too large": at_limit(1),
    "too large, nested": {"a": at_limit(1)},
    "function": len,
    "circular": (lambda d: (d.__setitem__("self", d), d)[1])({}),
}

BAD_TOPICS = ["../x", "a..b", "", "/abs", ".a", "a.", "a b", "a/b", "ü", "a*", "#", "a.*",
              "x" * 201, None, 5, b"t", ["t"], "a\n", "a\x00b"]  # fmt: skip

BAD_HEADERS = [{"a": 1}, {"a": None}, {1: "a"}, ["a"], "a=b", {"a": b"b"}, {"a": "\ud800"},
               {"\ud800": "a"}, {"a": "x" * 17}, {"x" * 17: "a"},
               {"a": "1", "b": "2", "c": "3", "d": "4"}]  # fmt: skip

BAD_KEYS = [5, b"k", ["k"], "\ud800", "k" * 17, 1.5]
BAD_PARTITIONS = [0, -1, 1025, "2", 2.0, True, None, [2]]
BAD_STARTS = ["first", "earliest ", "LATEST", -1, True, 1.5, None, date(2024, 1, 1), "1", [1]]
BAD_PATTERNS = ["orders.**", "a#", "#a", "", "../x", "a..b", [], [""], ["ok", "a..b"], 5, None]

Call = Callable[[Any], Any]

CASES: list[tuple[str, Call, type[Exception]]] = []
CASES += [(f"payload {name}", lambda log, v=v: log.append("t", v), eventlog.InvalidPayload)
          for name, v in BAD_PAYLOADS.items()]  # fmt: skip
CASES += [
    ("payload too large", lambda log: log.append("t", at_limit(1)), eventlog.PayloadTooLarge),
    ("payload in batch too large",
     lambda log: log.append_many([Draft("t", 1), Draft("t", at_limit(1))]),
     eventlog.PayloadTooLarge),
]  # fmt: skip
CASES += [(f"topic {t!r}", lambda log, t=t: log.append(t, 1), eventlog.InvalidName)
          for t in BAD_TOPICS]  # fmt: skip
CASES += [(f"create_topic {t!r}", lambda log, t=t: log.create_topic(t, 2), eventlog.InvalidName)
          for t in BAD_TOPICS]  # fmt: skip
CASES += [(f"headers {h!r}", lambda log, h=h: log.append("t", 1, headers=h),
           eventlog.InvalidArgument) for h in BAD_HEADERS]  # fmt: skip
CASES += [(f"key {k!r}", lambda log, k=k: log.append("t", 1, key=k), eventlog.InvalidArgument)
          for k in BAD_KEYS]  # fmt: skip
CASES += [(f"dedupe_key {k!r}", lambda log, k=k: log.append("t", 1, dedupe_key=k),
           eventlog.InvalidArgument) for k in BAD_KEYS]  # fmt: skip
CASES += [(f"partitions {p!r}", lambda log, p=p: log.create_topic("t", p), eventlog.InvalidArgument)
          for p in BAD_PARTITIONS]  # fmt: skip
CASES += [
    ("append_many item not a Draft", lambda log: log.append_many([Draft("t", 1), ("t", 2)]),
     eventlog.InvalidArgument),
    ("append_many with one bad draft",
     lambda log: log.append_many([Draft("t", 1), Draft("t", 2), Draft("t", float("nan"))]),
     eventlog.InvalidPayload),
    ("append_many with one bad topic",
     lambda log: log.append_many([Draft("t", 1), Draft("a..b", 2)]), eventlog.InvalidName),
    ("conflicting partitions", lambda log: log.create_topic("existing", 3), eventlog.TopicConflict),
    ("existing topic, exist_ok=False",
     lambda log: log.create_topic("existing", 2, exist_ok=False), eventlog.TopicConflict),
]  # fmt: skip


@pytest.mark.parametrize(
    ("call", "error"), [(c, e) for _, c, e in CASES], ids=[name for name, _, _ in CASES]
)
async def test_bad_input_raises_typed_error_and_changes_nothing(
    open_log: Callable[..., Any], db_path: Path, call: Call, error: type[Exception]
) -> None:
    log = await open_log(limits=LIMITS)
    await log.create_topic("existing", 2)
    head = await log.append("t", "before")
    before = dump(db_path)
    with pytest.raises(error) as info:
        await call(log)
    assert isinstance(info.value, eventlog.EventlogError)
    assert str(info.value) and info.value.hint
    assert dump(db_path) == before
    # The log still works, and the failed call used no offset.
    assert await log.append("t", "after") == head + 1


# -- any input: typed error or exact round trip ------------------------------------------------

anything = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text() | st.binary()
    | st.decimals(allow_nan=True) | st.dates() | st.sampled_from([Opaque(), len, {1, 2}]),
    lambda children: st.lists(children, max_size=4)
    | st.tuples(children)
    | st.dictionaries(st.text(max_size=5) | st.integers() | st.none() | st.booleans(),
                      children, max_size=4),
    max_leaves=20,
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(
    topic=st.text(max_size=20) | st.sampled_from(["t", "a.b", "x-y_z.9"]),
    payload=anything,
    key=st.none() | st.text(max_size=20) | st.integers(),
    headers=st.none() | st.dictionaries(st.text(max_size=5) | st.integers(),
                                        st.text(max_size=5) | st.none(), max_size=3),
)  # fmt: skip
def test_encoding_any_input_round_trips_or_raises_a_typed_error(
    topic: Any, payload: Any, key: Any, headers: Any
) -> None:
    try:
        encoded = _core.encode_event(topic, payload, key, headers, None, LIMITS)
    except eventlog.EventlogError:
        return
    assert json.loads(encoded.payload) == json.loads(json.dumps(payload))
    assert encoded.key == key and encoded.topic == topic


# -- reads ------------------------------------------------------------------------------------

READ_CASES: list[tuple[str, dict[str, Any], type[Exception]]] = []
READ_CASES += [(f"start {s!r}", {"start": s}, eventlog.InvalidArgument) for s in BAD_STARTS]
READ_CASES += [(f"topics {p!r}", {"topics": p}, eventlog.InvalidArgument) for p in BAD_PATTERNS]
READ_CASES += [(f"limit {v!r}", {"limit": v}, eventlog.InvalidArgument) for v in (-1, "3", 1.5)]
READ_CASES += [(f"page {v!r}", {"page": v}, eventlog.InvalidArgument) for v in (0, -1, "5", 2.5)]
READ_CASES += [
    (f"idle_timeout {v!r}", {"idle_timeout": v, "follow": True}, eventlog.InvalidArgument)
    for v in (-1, "1", float("nan"), True)
]


@pytest.mark.parametrize(
    ("options", "error"), [(o, e) for _, o, e in READ_CASES], ids=[n for n, _, _ in READ_CASES]
)
async def test_bad_read_arguments_raise_at_call(
    log: Any, db_path: Path, options: dict[str, Any], error: type[Exception]
) -> None:
    await log.append("t", 1)
    before = dump(db_path)
    options = dict(options)
    topics = options.pop("topics", "t")
    with pytest.raises(error):
        await collect(log.read(topics, **options))
    assert dump(db_path) == before


@pytest.mark.parametrize(
    "options",
    [{"timeout": -1}, {"timeout": "1"}, {"after": -1}, {"after": "5"}, {"after": 1.5},
     {"topics": "a..b"}, {"topics": 5}],
    ids=repr,
)  # fmt: skip
async def test_bad_wait_for_arguments_raise_at_once(
    log: Any, db_path: Path, options: dict[str, Any]
) -> None:
    await log.append("t", 1)
    before = dump(db_path)
    options = dict(options)
    topics = options.pop("topics", "t")
    with pytest.raises(eventlog.InvalidArgument):
        await asyncio.wait_for(log.wait_for(topics, **options), 5)
    assert dump(db_path) == before


async def test_payload_exactly_at_limit_is_accepted(open_log: Any, db_path: Path) -> None:
    log = await open_log(limits=LIMITS)
    offset = await log.append("t", at_limit(0))
    assert (await log.get(offset)).payload == at_limit(0)
    with pytest.raises(eventlog.PayloadTooLarge):
        await log.append("t", at_limit(1))


async def test_limits_for_keys_and_headers_accept_their_maximum(open_log: Any) -> None:
    log = await open_log(limits=LIMITS)
    offset = await log.append(
        "t", 1, key="k" * 16, dedupe_key="d" * 16,
        headers={"a": "x" * 16, "b" * 16: "1", "c": ""},
    )  # fmt: skip
    event = await log.get(offset)
    assert event.key == "k" * 16 and event.headers["a"] == "x" * 16


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"durability": "fast"}, eventlog.InvalidArgument),
        ({"durability": None}, eventlog.InvalidArgument),
        ({"default_partitions": 0}, eventlog.InvalidArgument),
        ({"default_partitions": 2000}, eventlog.InvalidArgument),
        ({"default_partitions": "2"}, eventlog.InvalidArgument),
        ({"busy_timeout": -1}, eventlog.InvalidArgument),
        ({"busy_timeout": "10"}, eventlog.InvalidArgument),
        ({"busy_timeout": None}, eventlog.InvalidArgument),
    ],
)
async def test_bad_open_options_raise_typed_errors_and_create_nothing(
    open_log: Any, db_path: Path, options: dict[str, Any], error: type[Exception]
) -> None:
    with pytest.raises(error):
        await open_log(**options)
    assert list(db_path.parent.iterdir()) == []


@pytest.mark.parametrize("path", [":memory:", "file:x.db?mode=memory"])
async def test_in_memory_database_is_refused(open_log: Any, path: str) -> None:
    with pytest.raises(eventlog.InvalidArgument):
        await open_log(path)


async def test_missing_folder_is_refused_without_creating_it(open_log: Any, tmp_path: Path) -> None:
    with pytest.raises(eventlog.InvalidArgument):
        await open_log(tmp_path / "missing" / "app.db")
    assert not (tmp_path / "missing").exists()


async def test_create_false_does_not_create_a_file(open_log: Any, db_path: Path) -> None:
    with pytest.raises(eventlog.NotAnEventlogDatabase):
        await open_log(create=False)
    assert not db_path.exists()
