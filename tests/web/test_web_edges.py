"""`eventlog serve` at the edges: a resume point past the head, odd numbers in queries, paths
and Last-Event-ID, JSON nested too deep, and the login redirect's targets. Each is a typed
4xx (or ignored, for Last-Event-ID) and vouches for nothing it did not read.

All against a real `eventlog serve` process on 127.0.0.1 (conftest.start_server)."""

from __future__ import annotations

import functools
import http.client
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import pytest

import eventlog
from eventlog import Draft

from .conftest import SSE, Server, httpx, start_server


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    db = tmp_path_factory.mktemp("review") / "app.db"
    with eventlog.open_sync(db) as log:
        log.append_many([Draft("orders", {"i": i}) for i in range(5)])
    server = start_server(db)
    yield server
    server.stop()


def fresh_get(server: Server, path: str, **kwargs: Any) -> Any:
    """One request on its own connection (a 500 makes uvicorn drop the connection)."""
    with (
        httpx.Client(base_url=server.base, headers=server.auth(),
                     timeout=httpx.Timeout(5, read=3)) as client,
        client.stream("GET", path, **kwargs) as response,
    ):  # fmt: skip
        body = response.read() if response.status_code != 200 else b""
        return response.status_code, response.headers.get("content-type", ""), body


def assert_typed_4xx(status: int, content_type: str, body: bytes, what: str) -> None:
    assert 400 <= status < 500, f"{what}: got {status} {body[:120]!r}"
    assert content_type.startswith("application/json"), what
    assert set(json.loads(body)["error"]) == {"type", "message", "hint"}, what


# -- a stream's resume point past the head is no event on disk ------------------------------------


@pytest.mark.parametrize("how", ["after", "last-event-id"])
def test_a_resume_point_past_the_head_is_not_noted_as_on_disk(
    web_db: Path, servers: list[Server], how: str
) -> None:
    """A stream opened with after=N (or Last-Event-ID: N, as a tab sends after the log was
    restored or recreated) with N past the head: the server's fsync notes in the writers'
    shared note (every process of this database reads it) no more than the head. Noting N
    would make every `full` reader take events appended later at durability="normal" as
    fsynced, and hand them out without the fsync guarantee 1 requires."""
    server = start_server(web_db)
    servers.append(server)
    stat = os.stat(web_db)
    with eventlog.open_sync(web_db, durability="normal") as writer:
        on_disk = functools.partial(writer._write_lock.durable_through,
                                    (stat.st_dev, stat.st_ino))  # fmt: skip
        writer.append("t", {"i": 0})
        bogus = "999999999999999999"
        params = {"after": bogus} if how == "after" else None
        headers = {"Last-Event-ID": bogus} if how == "last-event-id" else None
        with (
            httpx.Client(base_url=server.base, headers=server.auth(),
                         timeout=httpx.Timeout(5, read=3)) as client,
            client.stream("GET", "/api/v1/stream", params=params, headers=headers) as response,
        ):  # fmt: skip
            assert response.status_code == 200
            next(response.iter_lines())  # the stream is open: its start was read
        head = writer.head()
        assert on_disk() <= head, f"the note claims offsets up to {on_disk()} on disk; head {head}"
        later = writer.append("t", {"i": 1})  # at normal: neither fsynced nor noted
        assert on_disk() < later, "an event no fsync covered is noted as on disk"


# -- odd numbers in query strings, paths and Last-Event-ID ----------------------------------------

UNICODE_DIGIT = "\u00b2"  # '²': str.isdigit() says yes, int() says no

ODD_NUMBERS = [
    f"/api/v1/topics/orders/events?limit={UNICODE_DIGIT}",
    f"/api/v1/topics/orders/events?scan_limit={UNICODE_DIGIT}",
    f"/api/v1/topics/orders/events?cursor={UNICODE_DIGIT}",
    "/api/v1/topics/orders/events?limit=--5",
    f"/api/v1/topics?limit={UNICODE_DIGIT}",
    f"/api/v1/groups?limit={UNICODE_DIGIT}",
    f"/api/v1/dead-letters?limit={UNICODE_DIGIT}",
    f"/api/v1/dead-letters?cursor={UNICODE_DIGIT}-0123456789ab",
    f"/api/v1/events/{UNICODE_DIGIT}",
    f"/api/v1/stream?after={UNICODE_DIGIT}",
    "/api/v1/stream?from=99999999999999999999999",  # past 2**63: struct.error, a 500
]


@pytest.mark.parametrize("path", ODD_NUMBERS)
def test_odd_numbers_are_typed_400s_not_500s(shared: Server, path: str) -> None:
    status, content_type, body = fresh_get(shared, path)
    assert_typed_4xx(status, content_type, body, path)


@pytest.mark.parametrize("value", [b"\xb2", b"\xb9\xb9"])
def test_an_invalid_last_event_id_is_ignored_not_a_500(shared: Server, value: bytes) -> None:
    """The README: a *valid* Last-Event-ID wins; one that is not valid is ignored (as '-1'
    and 'abc' are). Latin-1 superscript digits pass isdigit() and crash int()."""
    status, _, body = fresh_get(shared, "/api/v1/stream", headers={"Last-Event-ID": value})
    assert status == 200, (status, body[:100])


# -- JSON bodies nested too deep ------------------------------------------------------------------

NESTED = b"[" * 100_000 + b"]" * 100_000


@pytest.mark.parametrize(("path", "body"), [
    ("/api/v1/topics/nest/events", NESTED),
    ("/api/v1/topics/nest/events", b'{"payload": ' + NESTED + b"}"),
    ("/api/v1/dead-letters/requeue", b'{"ids": ' + NESTED + b"}"),
    ("/api/v1/groups/g/reset", b'{"spec": "earliest", "topics": ' + NESTED + b"}"),
])  # fmt: skip
def test_deeply_nested_json_is_a_typed_400(shared: Server, path: str, body: bytes) -> None:
    with httpx.Client(base_url=shared.base, headers=shared.auth(), timeout=10) as client:
        response = client.post(path, content=body, headers={"Content-Type": "application/json"})
    assert_typed_4xx(response.status_code, response.headers.get("content-type", ""),
                     response.content, path)  # fmt: skip


# -- the login redirect ---------------------------------------------------------------------------


def raw_get(server: Server, target: str) -> tuple[int | None, str | None]:
    """GET a raw request target; (None, None) when the server closes without an answer."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        conn.request("GET", target)
        response = conn.getresponse()
        response.read()
        return response.status, response.getheader("location")
    except (http.client.RemoteDisconnected, ConnectionError):
        return None, None
    finally:
        conn.close()


@pytest.mark.parametrize("target", [
    "/login?token={token}&next=/%09/evil.example/",  # a browser drops the tab: //evil.example/
    "//evil.example/?token={token}",  # ?token= on any page path: Location is the path itself
])  # fmt: skip
def test_the_login_redirect_never_leaves_this_server(shared: Server, target: str) -> None:
    status, location = raw_get(shared, target.format(token=shared.token))
    assert status == 303 and location is not None
    # the WHATWG URL parser (browsers) and urllib both drop tabs and newlines first
    resolved = urlsplit(urljoin(shared.base + "/login", location))
    assert resolved.netloc == urlsplit(shared.base).netloc, (location, resolved.geturl())


@pytest.mark.parametrize("target", [
    "/login?token={token}&next=/%E2%82%AC",  # not latin-1: UnicodeEncodeError, a 500
    "/topics/%E2%82%AC?token={token}",
    "/login?token={token}&next=/%0d%0aSet-Cookie:%20x=1",  # h11 refuses it: no answer at all
])  # fmt: skip
def test_the_login_redirect_answers_odd_targets_without_a_500(shared: Server, target: str) -> None:
    status, location = raw_get(shared, target.format(token=shared.token))
    assert status is not None, "the server closed the connection without an answer"
    assert status < 500, status
    if location is not None:
        assert "\r" not in location and "\n" not in location


def test_login_on_a_pattern_page_keeps_the_pattern(shared: Server) -> None:
    """/topics/orders.%23 is the page of the pattern orders.# (README: patterns too); signing
    in there redirects to /topics/orders.# whose '#' a browser takes as the fragment, so it
    lands on the page of 'orders.' instead."""
    status, location = raw_get(shared, f"/topics/orders.%23?token={shared.token}")
    assert status == 303 and location is not None
    assert urlsplit(location).path in ("/topics/orders.%23", "/topics/orders.%23".lower())


def test_a_failed_stream_open_does_not_stop_the_server_fsyncing_before_it_streams_events(
    web_db: Path, servers: list[Server]
) -> None:
    """from=N past 2**63 is refused, and whatever a stream's opening fsynced for, the server
    notes no more than the head it saw: later streams still fsync before they hand out
    events no fsync covers (guarantee 1, which
    test_pages_and_streams_show_only_events_a_finished_fsync_covers checks on a fresh server).
    A bad opening used to raise the server's own `synced_through` to N before it failed."""
    server = start_server(web_db)
    servers.append(server)
    stat = os.stat(web_db)
    status, _, _ = fresh_get(server, "/api/v1/stream?from=99999999999999999999999")
    with eventlog.open_sync(web_db, durability="normal") as writer:
        on_disk = functools.partial(writer._write_lock.durable_through,
                                    (stat.st_dev, stat.st_ino))  # fmt: skip
        offsets = writer.append_many([Draft("t", {"i": i}) for i in range(3)])
        assert on_disk() < offsets[-1]  # at normal: not fsynced, not noted
        with SSE(server, {"topic": "t", "after": 0}) as stream:
            assert stream.events(until=offsets[-1])[-1].offset == offsets[-1]  # streamed...
        assert on_disk() >= offsets[-1], (  # ...so an fsync must have covered them
            f"the server streamed events up to {offsets[-1]} that no fsync covers (the bad "
            f"stream request before got {status})"
        )


# -- a resume point from another log (restored or made anew) ---------------------------------------


@pytest.mark.parametrize("how", ["after", "last-event-id"])
def test_a_resume_point_past_the_head_streams_what_comes_next_after_a_gap(
    server: Server, how: str
) -> None:
    """A tab that followed a log later restored from an older backup (or made anew) comes
    back with a Last-Event-ID past this log's head. The stream used to start there and stay
    silent, keep-alives and all, until the offsets caught up: every event until then was
    skipped without a word. It goes on after the head instead, and says so with a gap."""
    with eventlog.open_sync(server.db) as log:
        head = log.append_many([Draft("t", {"i": i}) for i in range(3)])[-1]
    bogus = head + 1000
    params: dict[str, Any] = {"topic": "t"}
    headers = None
    if how == "after":
        params["after"] = bogus
    else:
        headers = {"Last-Event-ID": str(bogus)}
    with SSE(server, params, headers=headers) as stream:
        assert stream.next().retry is not None
        gap = stream.next()
        assert gap.event == "gap" and gap.id is None, gap
        assert gap.json == {"after": bogus, "first_available": head + 1}
        resume = stream.next()
        assert resume.id is not None and resume.data is None
        assert resume.offset == head, "the resume point named is past the head"
        with eventlog.open_sync(server.db) as log:
            later = log.append_many([Draft("t", {"i": i}) for i in range(3)])
        assert [f.offset for f in stream.events(until=later[-1])] == later


# -- the database file replaced or removed while serving ------------------------------------------


def replace_database(db: Path) -> None:
    """What a restore does: the old file's WAL and shared memory set aside, another log moved
    over the path (the server keeps the old files open)."""
    other = db.with_name("restored.db")
    with eventlog.open_sync(other) as log:
        log.append_many([Draft("restored", {"i": i}) for i in range(2)])
    for suffix in ("-wal", "-shm"):
        db.with_name(db.name + suffix).unlink(missing_ok=True)
    os.replace(other, db)


@pytest.mark.parametrize("how", ["replaced", "removed"])
def test_a_replaced_database_file_is_a_503_and_no_append_is_lost(
    web_db: Path, servers: list[Server], how: str
) -> None:
    """The server's connections still hold the old file once the path names another one (or
    none): reads showed the old log as if live, and an append answered 201 with an offset
    while it went to a file nobody will ever open again."""
    server = start_server(web_db)
    servers.append(server)
    client = server.writer()
    assert client.post("/api/v1/topics/t/events", json={"payload": 1}).status_code == 201
    if how == "replaced":
        replace_database(web_db)
    else:
        for suffix in ("", "-wal", "-shm"):
            web_db.with_name(web_db.name + suffix).unlink(missing_ok=True)
    answer = client.post("/api/v1/topics/t/events", json={"payload": 2})
    assert answer.status_code == 503, f"{answer.status_code} {answer.text}"
    assert answer.json()["error"]["type"] == "StorageError"
    for path in ("/api/v1/info", "/api/v1/topics", "/api/v1/topics/t/events", "/healthz"):
        response = client.get(path)
        assert response.status_code == 503, (path, response.status_code, response.text[:200])
        assert response.json()["error"]["type"] == "StorageError", path
    status, content_type, body = fresh_get(server, "/api/v1/stream")
    assert status == 503 and content_type.startswith("application/json"), (status, body[:200])
    if how == "replaced":
        with eventlog.open_sync(web_db) as log:
            assert {e.topic for e in log.read("#")} == {"restored"}


def test_an_open_stream_ends_when_the_database_file_is_replaced(
    web_db: Path, servers: list[Server]
) -> None:
    """A stream left open on the old file kept sending keep-alives (and whatever was still
    appended to the old file) for ever; it ends, and the browser's reconnect gets the 503."""
    server = start_server(web_db, "--keepalive", "0.5")
    servers.append(server)
    with SSE(server, {"topic": "#"}) as stream:
        stream.next()
        stream.next()  # the resume point: the stream is open
        replace_database(web_db)
        with pytest.raises(EOFError):
            for _ in range(60):  # keep-alives every 0.5 s; ended, it stops after one wake-up
                stream.next()
    assert "replaced or removed" in server.stderr()
    assert server.stderr().count("wake-ups failed") <= 1, "the same failure logged over and over"


def test_an_append_that_was_in_flight_when_the_file_was_replaced_is_a_503(
    web_db: Path, servers: list[Server]
) -> None:
    """The file check ran when the request came in, before its body was read: a client
    still sending it when a restore moved another log over the path got 201 and an offset
    for an event written to a file nobody will open again."""
    server = start_server(web_db)
    servers.append(server)
    client, probe = server.writer(), server.client()
    assert client.post("/api/v1/topics/t/events", json={"payload": 1}).status_code == 201

    def body() -> Iterator[bytes]:
        yield b'{"payload": '
        # the server has the request (a later one on another connection was answered),
        # and is waiting for the rest of its body
        assert probe.get("/api/v1/info").status_code == 200
        replace_database(web_db)
        yield b"2}"

    answer = client.post("/api/v1/topics/t/events", content=body(),
                         headers={"content-type": "application/json"})  # fmt: skip
    assert answer.status_code == 503, f"{answer.status_code} {answer.text}"
    assert answer.json()["error"]["type"] == "StorageError"
