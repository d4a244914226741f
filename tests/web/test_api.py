"""The JSON API of `eventlog serve` against a real server process: every endpoint's answer,
keyset pagination, typed errors, the group reset plan and its refusal while members live,
dead letters (filters, cursor, torn tail, requeue, purge), metrics and read-only mode.
Outcomes are checked with plain sqlite3 and the dead-letter file where it matters."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import dead_letter_entry, raw

import eventlog
from eventlog import Draft, _core, _db, _deadletter, _members, _replay

from .conftest import Server, start_server


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    db = tmp_path_factory.mktemp("api") / "app.db"
    with eventlog.open_sync(db):
        pass
    server = start_server(db, "--metrics")
    yield server
    assert server.stop() == 0


def append(db: Path, topic: str, payloads: list[Any], **kw: Any) -> list[int]:
    with eventlog.open_sync(db) as log:
        return log.append_many([Draft(topic, p, **kw) for p in payloads])


def set_position(db: Path, group: str, topic: str, first_to_deliver: int) -> None:
    with eventlog.open_sync(db) as log:
        _replay.replay(log, group, _replay.ResetSpec("offset", first_to_deliver), [(topic, None)],
                    execute=True)  # fmt: skip


def dead_letter(db: Path, group: str, topic: str, offset: int, error: str = "ValueError",
                at_ms: int | None = None) -> _deadletter.DeadLetter:  # fmt: skip
    entry = dead_letter_entry(
        group=group,
        topic=topic,
        offset=offset,
        payload={"n": offset},
        event_time_ms=1,
        first_failed_at_ms=1,
        last_failed_at_ms=2,
        error_type=error,
        error_message=f"boom {offset}",
        traceback="Traceback: line 1\n",
        dead_lettered_at_ms=at_ms if at_ms is not None else _core.now_ms(),
    )
    return _deadletter.DeadLetterFile(_db.Paths.for_db(db)).append(entry)


def error_of(response: Any, status: int) -> dict[str, str]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"type", "message", "hint"}
    return dict(error)


# -- info, health -----------------------------------------------------------------------------


def test_healthz_needs_no_auth_and_info_describes_the_server(shared: Server) -> None:
    for path in ("/healthz", "/api/v1/healthz"):
        assert shared.client(auth=False).get(path).json()["status"] == "ok"
    info = shared.client().get("/api/v1/info").json()
    assert info["db"] == str(shared.db)
    assert info["auth"] is True and info["read_only"] is False and info["metrics"] is True
    assert {"head", "open_streams", "max_streams", "dead_letters", "files"} <= set(info)


def test_unknown_endpoints_are_typed_json_404s(shared: Server) -> None:
    assert error_of(shared.client().get("/api/v1/nope"), 404)["type"] == "NotFound"


# -- topics and events ------------------------------------------------------------------------


def test_topics_from_counters_with_keyset_pagination(shared: Server) -> None:
    for name in ("tp.a", "tp.b", "tp.c"):
        append(shared.db, name, [{"x": i} for i in range(3)])
    client = shared.client()
    names, cursor = [], None
    while True:
        page = client.get("/api/v1/topics", params={"limit": 2, "cursor": cursor}).json()
        names += [t["name"] for t in page["topics"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert names == sorted(names) and {"tp.a", "tp.b", "tp.c"} <= set(names)
    one = next(t for t in client.get("/api/v1/topics").json()["topics"] if t["name"] == "tp.a")
    assert one["events"] == 3 and one["partitions"] == 1 and one["rate_per_s"] > 0


def test_browse_newest_first_then_oldest_first_covers_every_event_once(shared: Server) -> None:
    with eventlog.open_sync(shared.db) as log:
        log.create_topic("br", 3)
    offsets = append(shared.db, "br", [{"i": i} for i in range(57)])
    client = shared.client()
    for order, expected in (("newest", offsets[::-1]), ("oldest", offsets)):
        seen, cursor = [], None
        while True:
            page = client.get(
                "/api/v1/topics/br/events", params={"order": order, "limit": 10, "cursor": cursor}
            ).json()
            seen += [e["offset"] for e in page["events"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert seen == expected, order


def test_browse_filters_by_key_time_and_bounded_text_search(shared: Server) -> None:
    with eventlog.open_sync(shared.db) as log:
        log.create_topic("bf", 4)
        early = log.append_many(
            [Draft("bf", {"note": "plain"}, key=f"k{i % 3}") for i in range(30)]
        )
        time.sleep(0.05)
        middle = _core.now_ms()
        time.sleep(0.05)
        late = log.append_many([Draft("bf", {"note": "Needle here" if i == 7 else "hay"},
                                      key=f"k{i % 3}") for i in range(30)])  # fmt: skip
    client = shared.client()
    url = "/api/v1/topics/bf/events"
    keyed = client.get(url, params={"key": "k1", "limit": 500}).json()["events"]
    assert {e["key"] for e in keyed} == {"k1"} and len(keyed) == 20
    since = client.get(url, params={"since": str(middle), "limit": 500})
    assert since.status_code == 400  # a number is not a time
    iso = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(middle / 1000)) + f".{middle % 1000:03d}"
    recent = client.get(url, params={"since": iso, "limit": 500}).json()["events"]
    assert sorted(e["offset"] for e in recent) == late
    older = client.get(url, params={"until": iso, "limit": 500}).json()["events"]
    assert sorted(e["offset"] for e in older) == early
    found = client.get(url, params={"q": "needle"}).json()
    assert [e["offset"] for e in found["events"]] == [late[7]]
    assert found["scanned"] == 60 and found["next_cursor"] is None
    # a bounded scan says how far it got and where to go on
    part = client.get(url, params={"q": "needle", "scan_limit": 10}).json()
    assert part["events"] == [] and part["scan_limited"] is True and part["scanned"] == 10
    assert part["next_cursor"] == part["scanned_to"] == late[-10]
    rest = client.get(url, params={"q": "needle", "cursor": part["next_cursor"]}).json()
    assert [e["offset"] for e in rest["events"]] == [late[7]]


def test_browse_a_pattern_merges_topics(shared: Server) -> None:
    a = append(shared.db, "pat.a", [1, 2])
    b = append(shared.db, "pat.b", [3])
    events = shared.client().get("/api/v1/topics/pat.%2A/events").json()["events"]
    assert [e["offset"] for e in events] == sorted(a + b, reverse=True)


def test_get_one_event_and_404(shared: Server) -> None:
    (offset,) = append(shared.db, "one", [{"hello": "wörld"}], key="k", headers={"h": "v"})
    client = shared.client()
    event = client.get(f"/api/v1/events/{offset}").json()
    assert event == {"offset": offset, "topic": "one", "partition": 0, "key": "k",
                     "payload": {"hello": "wörld"}, "headers": {"h": "v"},
                     "timestamp_ms": event["timestamp_ms"]}  # fmt: skip
    assert error_of(client.get("/api/v1/events/99999999"), 404)["type"] == "NotFound"
    assert error_of(client.get("/api/v1/events/abc"), 400)["type"] == "InvalidArgument"


def test_append_one_or_a_batch_with_dedupe(shared: Server) -> None:
    client = shared.writer()
    one = client.post("/api/v1/topics/ap/events",
                      json={"payload": {"a": 1}, "key": "k", "headers": {"h": "1"},
                            "dedupe_key": "order-1"})  # fmt: skip
    assert one.status_code == 201
    (offset,) = one.json()["offsets"]
    again = client.post(
        "/api/v1/topics/ap/events", json={"payload": {"a": 2}, "dedupe_key": "order-1"}
    )
    assert again.json()["offsets"] == [offset]
    batch = client.post("/api/v1/topics/ap/events",
                        json={"events": [{"payload": i} for i in range(5)]})  # fmt: skip
    assert batch.status_code == 201
    offsets = batch.json()["offsets"]
    assert offsets == list(range(offsets[0], offsets[0] + 5))
    with raw(shared.db) as conn:
        rows = conn.execute("SELECT payload, key, headers FROM eventlog_events WHERE topic = 'ap'"
                            " ORDER BY id").fetchall()  # fmt: skip
    assert rows[0] == ('{"a":1}', "k", '{"h":"1"}') and len(rows) == 6


@pytest.mark.parametrize(
    ("body", "kind"),
    [
        ({"payload": 1, "extra": 2}, "InvalidArgument"),
        ({"key": "k"}, "InvalidArgument"),
        ({"events": []}, "InvalidArgument"),
        ({"events": [{"payload": 1}, {"payload": 2, "headers": {"h": 1}}]}, "InvalidArgument"),
        ({"payload": "x", "key": 5}, "InvalidArgument"),
    ],
)
def test_bad_appends_are_typed_400s_and_write_nothing(
    shared: Server, body: dict[str, Any], kind: str
) -> None:
    with raw(shared.db) as conn:
        before = conn.execute("SELECT count(*) FROM eventlog_events").fetchone()
    response = shared.writer().post("/api/v1/topics/bad/events", json=body)
    assert error_of(response, 400)["type"] == kind
    with raw(shared.db) as conn:
        assert conn.execute("SELECT count(*) FROM eventlog_events").fetchone() == before


def test_non_json_bodies_nan_and_bad_topic_names(shared: Server) -> None:
    client = shared.writer()
    headers = {"Content-Type": "application/json"}
    assert error_of(client.post("/api/v1/topics/t/events", content=b"{nope", headers=headers),
                    400)["type"] == "InvalidJSON"  # fmt: skip
    assert error_of(client.post("/api/v1/topics/t/events", content=b'{"payload": NaN}',
                                headers=headers), 400)["type"] == "InvalidJSON"  # fmt: skip
    assert error_of(client.post("/api/v1/topics/a..b/events", json={"payload": 1}),
                    400)["type"] == "InvalidName"  # fmt: skip


# -- groups -----------------------------------------------------------------------------------


def test_groups_list_and_detail_with_live_members_and_lag(shared: Server) -> None:
    offsets = append(shared.db, "gl", [{"i": i} for i in range(20)])
    set_position(shared.db, "gl-group", "gl", offsets[12])  # done through offsets[11]
    member = _members.Membership(_db.Paths.for_db(shared.db), "gl-group")
    try:
        member.heartbeat([("gl", 0)])
        client = shared.client()
        listed = client.get("/api/v1/groups").json()["groups"]
        g = next(x for x in listed if x["group"] == "gl-group")
        assert g["live_members"] == 1 and g["lag"] == 8 and g["lag_ms"] >= 0
        detail = client.get("/api/v1/groups/gl-group").json()
        assert detail["members"][0]["pid"] > 0
        assert detail["members"][0]["partitions"] == [["gl", 0]]
        assert detail["members"][0]["heartbeat_age_s"] < 30
        (lane,) = detail["partitions"]
        assert lane["position"] == offsets[11] and lane["head"] == offsets[-1]
        assert lane["lag"] == 8 and lane["lag_exact"] is True
    finally:
        member.close()
    assert error_of(shared.client().get("/api/v1/groups/nobody"), 404)["type"] == "NotFound"


def test_groups_are_keyset_paginated(shared: Server) -> None:
    offsets = append(shared.db, "gp", [1])
    for name in ("gp-1", "gp-2", "gp-3"):
        set_position(shared.db, name, "gp", offsets[0])
    client = shared.client()
    names, cursor = [], None
    while True:
        page = client.get("/api/v1/groups", params={"limit": 1, "cursor": cursor}).json()
        names += [g["group"] for g in page["groups"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert names == sorted(set(names)) and {"gp-1", "gp-2", "gp-3"} <= set(names)


def position(db: Path, group: str, topic: str) -> int:
    with raw(db) as conn:
        return int(conn.execute("SELECT position FROM eventlog_group_offsets WHERE group_name = ?"
                                " AND topic = ?", (group, topic)).fetchone()[0])  # fmt: skip


def test_reset_plans_by_default_executes_on_request_and_refuses_live_members(
    shared: Server,
) -> None:
    offsets = append(shared.db, "rs", [{"i": i} for i in range(10)])
    set_position(shared.db, "rs-group", "rs", offsets[-1] + 1)  # done with everything
    client = shared.writer()
    url = "/api/v1/groups/rs-group/reset"
    plan = client.post(url, json={"spec": "earliest"}).json()
    assert plan["executed"] is False and plan["redelivered"] == 10
    assert plan["partitions"][0]["after"] == offsets[0] - 1
    assert position(shared.db, "rs-group", "rs") == offsets[-1]
    member = _members.Membership(_db.Paths.for_db(shared.db), "rs-group")
    try:
        member.heartbeat([])
        plan = client.post(url, json={"spec": "shift", "value": -3}).json()
        assert plan["live_members"] and plan["redelivered"] == 3
        busy = client.post(url, json={"spec": "earliest", "execute": True})
        assert error_of(busy, 409)["type"] == "GroupBusy"
    finally:
        member.close()
    assert position(shared.db, "rs-group", "rs") == offsets[-1]
    done = client.post(url, json={"spec": "offset", "value": offsets[4], "execute": True}).json()
    assert done["executed"] is True and done["redelivered"] == 6
    assert position(shared.db, "rs-group", "rs") == offsets[3]
    when = client.post(url, json={"spec": "duration", "value": "1h", "topics": ["rs:0"]})
    assert when.status_code == 200, when.text
    for bad in (
        {"spec": "sideways"},
        {"spec": "offset", "value": "x"},
        {"spec": "earliest", "topics": ["rs:z"]},
        {"spec": "earliest", "nope": 1},
    ):
        assert error_of(client.post(url, json=bad), 400)["type"] == "InvalidArgument"
    assert error_of(client.post("/api/v1/groups/nobody/reset", json={"spec": "earliest"}),
                    404)["type"] == "NotFound"  # fmt: skip


# -- dead letters -----------------------------------------------------------------------------


def test_dead_letters_filters_cursor_detail_and_torn_tail(shared: Server) -> None:
    offsets = append(shared.db, "dl", [{"i": i} for i in range(7)])
    base = _core.now_ms() - 100_000
    made = [dead_letter(shared.db, "dl-a" if i % 2 else "dl-b", "dl", o,
                        "KeyError" if i == 3 else "ValueError", base + i)
            for i, o in enumerate(offsets)]  # fmt: skip
    client = shared.client()
    seen, cursor = [], None
    while True:
        page = client.get(
            "/api/v1/dead-letters", params={"topic": "dl", "limit": 3, "cursor": cursor}
        ).json()
        seen += [d["id"] for d in page["dead_letters"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [e.id for e in reversed(made)]  # newest first
    only_a = client.get("/api/v1/dead-letters", params={"group": "dl-a"}).json()["dead_letters"]
    assert {d["group"] for d in only_a} == {"dl-a"} and len(only_a) == 3
    keyed = client.get("/api/v1/dead-letters", params={"error_type": "KeyError"}).json()
    assert [d["id"] for d in keyed["dead_letters"]] == [made[3].id]
    detail = client.get(f"/api/v1/dead-letters/{made[0].id}").json()
    assert detail["traceback"].startswith("Traceback") and detail["payload"] == {"n": offsets[0]}
    assert error_of(client.get("/api/v1/dead-letters/0123456789ab"), 404)["type"] == "NotFound"
    assert error_of(client.get("/api/v1/dead-letters/zz"), 400)["type"] == "InvalidArgument"
    with open(_db.Paths.for_db(shared.db).deadletter, "ab") as f:
        f.write(b'{"id": "torn')
    assert client.get("/api/v1/dead-letters").json()["torn_tail"] is True
    dead_letter(shared.db, "dl-c", "dl", offsets[0])  # the next line starts afresh
    assert client.get("/api/v1/dead-letters").json()["torn_tail"] is False


def test_requeue_and_purge_need_a_selection_and_confirmation(shared: Server) -> None:
    offsets = append(shared.db, "rq", [1, 2, 3])
    made = [dead_letter(shared.db, "rq-group", "rq", o) for o in offsets]
    client = shared.writer()
    dry = client.post("/api/v1/dead-letters/requeue", json={"group": "rq-group", "dry_run": True})
    assert dry.json()["count"] == 3
    unconfirmed = client.post("/api/v1/dead-letters/requeue", json={"group": "rq-group"})
    assert "confirm" in error_of(unconfirmed, 400)["message"]
    assert error_of(client.post("/api/v1/dead-letters/purge", json={}), 400)
    one = client.post("/api/v1/dead-letters/requeue", json={"ids": [made[0].id]}).json()
    assert one["count"] == 1
    with raw(shared.db) as conn:
        rows = conn.execute(
            "SELECT group_name, event_offset, dead_letter_id FROM "
            "eventlog_redeliveries WHERE group_name = 'rq-group'"
        ).fetchall()
    assert rows == [("rq-group", offsets[0], made[0].id)]
    listed = by_id(client, "rq-group")
    assert listed[made[0].id]["requeued"] is True and listed[made[1].id]["requeued"] is False
    # the requeued event fails again: a newer entry, and the old one is marked re-failed
    dead_letter(shared.db, "rq-group", "rq", offsets[0])
    listed = by_id(client, "rq-group")
    assert listed[made[0].id]["refailed"] is True
    pending = client.get("/api/v1/dead-letters", params={"group": "rq-group", "pending": "true"})
    assert len(pending.json()["dead_letters"]) == 3
    purged = client.post("/api/v1/dead-letters/purge",
                         json={"group": "rq-group", "confirm": "rq-group"}).json()  # fmt: skip
    assert purged["count"] == 4
    text = _db.Paths.for_db(shared.db).deadletter.read_text()
    assert "rq-group" not in text


def by_id(client: Any, group: str) -> dict[str, dict[str, Any]]:
    page = client.get("/api/v1/dead-letters", params={"group": group}).json()
    return {d["id"]: d for d in page["dead_letters"]}


# -- metrics ----------------------------------------------------------------------------------


def test_metrics_in_prometheus_text(shared: Server) -> None:
    offsets = append(shared.db, "mt", [1, 2, 3, 4])
    set_position(shared.db, "mt-group", "mt", offsets[2])
    dead_letter(shared.db, "mt-group", "mt", offsets[0])
    response = shared.client().get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    lines = response.text.splitlines()
    head = shared.client().get("/api/v1/info").json()["head"]
    assert f"eventlog_head_offset {head}" in lines
    assert 'eventlog_topic_events{topic="mt"} 4' in lines
    assert 'eventlog_group_lag_events{group="mt-group",topic="mt",partition="0"} 2' in lines
    assert any(ln.startswith('eventlog_group_lag_seconds{group="mt-group"') for ln in lines)
    assert any(ln.startswith('eventlog_dead_letters{state="pending"}') for ln in lines)
    assert any(ln.startswith("eventlog_open_streams ") for ln in lines)
    for line in lines:
        assert line.startswith("#") or " " in line
    assert shared.client(auth=False).get("/metrics").status_code == 401


def test_metrics_are_off_unless_asked(server: Server) -> None:
    assert error_of(server.client().get("/metrics"), 404)["type"] == "NotFound"


# -- read-only ----------------------------------------------------------------------------------


def test_read_only_makes_every_write_a_405(web_db: Path, servers: list[Server]) -> None:
    offsets = append(web_db, "ro", [1])
    set_position(web_db, "ro-group", "ro", offsets[0])
    made = dead_letter(web_db, "ro-group", "ro", offsets[0])
    server = start_server(web_db, "--read-only")
    servers.append(server)
    client = server.writer()
    assert client.get("/api/v1/info").json()["read_only"] is True
    writes = [
        ("/api/v1/topics/ro/events", {"payload": 1}),
        ("/api/v1/groups/ro-group/reset", {"spec": "earliest", "execute": True}),
        ("/api/v1/dead-letters/requeue", {"ids": [made.id]}),
        ("/api/v1/dead-letters/purge", {"ids": [made.id]}),
    ]
    with raw(web_db) as conn:
        before = conn.execute("SELECT count(*) FROM eventlog_events").fetchone()
    for url, body in writes:
        assert error_of(client.post(url, json=body), 405)["type"] == "ReadOnly"
    assert client.get("/api/v1/topics/ro/events").status_code == 200
    with raw(web_db) as conn:
        assert conn.execute("SELECT count(*) FROM eventlog_events").fetchone() == before
        assert conn.execute("SELECT count(*) FROM eventlog_redeliveries").fetchone() == (0,)
    assert json.loads(_db.Paths.for_db(web_db).deadletter.read_text())["id"] == made.id
