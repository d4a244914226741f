"""GET /api/v1/stream against a real `eventlog serve`: exact resumption by offset, start
precedence, pattern filtering and checkpoints, gaps after pruning, keep-alive, shutdown with
open streams, abandoned and stalled clients, and the stream limit."""

from __future__ import annotations

import functools
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import eventlog
from eventlog import Draft, _retention

from .conftest import SSE, Server, start_server, wait_until


def append_many(db: Path, topic: str, n: int, **kw: object) -> list[int]:
    with eventlog.open_sync(db) as log:
        return log.append_many([Draft(topic, {"i": i}, key=f"k{i % 5}", **kw) for i in range(n)])


def open_streams(server: Server) -> int:
    return int(server.client().get("/api/v1/info").json()["open_streams"])


def test_stream_from_after_n_yields_exactly_the_events_after_n_in_order(server: Server) -> None:
    with eventlog.open_sync(server.db) as log:
        log.create_topic("orders", 3)
    offsets = append_many(server.db, "orders", 1234)  # more than a page, three partitions
    append_many(server.db, "noise", 50)
    n = offsets[36]
    head = offsets[-1]
    with SSE(server, {"topic": "orders", "after": n}) as stream:
        assert stream.status == 200
        assert stream.response.headers["content-type"].startswith("text/event-stream")
        first = stream.next()
        assert first.retry is not None and first.data is None
        assert stream.next().id == str(n)  # the resume point, before any event
        frames = stream.events(until=head)
    got = [f.offset for f in frames]
    assert got == [o for o in offsets if o > n]
    assert [f.json["offset"] for f in frames] == got
    assert {f.json["topic"] for f in frames} == {"orders"}


def test_last_event_id_beats_after_which_beats_from(server: Server) -> None:
    offsets = append_many(server.db, "t", 60)
    with SSE(server, {"topic": "t", "after": 10, "from": "latest"},
             headers={"Last-Event-ID": str(offsets[49])}) as stream:  # fmt: skip
        assert stream.events(until=offsets[50])[0].offset == offsets[50]
    with SSE(server, {"topic": "t", "after": 10, "from": "latest"}) as stream:
        assert stream.events(until=11)[0].offset == 11
    # an id that is not an offset is ignored, not an error
    with SSE(server, {"topic": "t", "after": 10}, headers={"Last-Event-ID": "x1"}) as stream:
        assert stream.events(until=11)[0].offset == 11
    with SSE(server, {"topic": "t", "from": "earliest"}) as stream:
        assert stream.events(until=1)[0].offset == 1


@pytest.mark.parametrize("bad", ["abc", "-1", "1.5", ""])
def test_an_invalid_after_is_a_400_with_a_typed_error(server: Server, bad: str) -> None:
    response = server.client().get("/api/v1/stream", params={"topic": "t", "after": bad})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "InvalidArgument" and "after" in error["message"] and error["hint"]


def test_bad_topic_pattern_and_start_are_400(server: Server) -> None:
    client = server.client()
    assert client.get("/api/v1/stream", params={"topic": "a..b"}).status_code == 400
    assert client.get("/api/v1/stream", params={"topic": "a", "from": "soon"}).status_code == 400


def test_default_start_is_latest_and_new_events_arrive_live(server: Server) -> None:
    append_many(server.db, "live", 5)
    with SSE(server, {"topic": "live"}) as stream:
        stream.next()  # retry
        assert stream.next().id == "5"
        started = time.monotonic()
        offsets = append_many(server.db, "live", 3)
        assert [f.offset for f in stream.events(until=offsets[-1])] == offsets
        assert time.monotonic() - started < 5


def test_pattern_stream_filters_and_checkpoints_what_it_skipped(server: Server) -> None:
    append_many(server.db, "orders.eu", 2)
    with SSE(server, {"topic": "orders.*"}) as stream:
        stream.next()
        start = stream.next().offset
        eu = append_many(server.db, "orders.eu", 3)
        other = append_many(server.db, "payments", 40)
        us = append_many(server.db, "orders.us", 2)  # a topic born after the stream opened
        got = stream.events(until=us[-1])
        assert [f.offset for f in got] == eu + us
        more = append_many(server.db, "payments", 30)
        # an id-only frame: the stream has seen everything through the head
        deadline = time.monotonic() + 5
        checkpoint = None
        while checkpoint is None and time.monotonic() < deadline:
            frame = stream.next()
            if frame.id is not None and frame.data is None and frame.event is None:
                checkpoint = frame.offset
        assert checkpoint == more[-1], (checkpoint, more[-1])
    assert start < eu[0] and other[0] > eu[-1]
    # resuming from the checkpoint rescans nothing and misses nothing
    with SSE(server, {"topic": "orders.*"}, headers={"Last-Event-ID": str(checkpoint)}) as s:
        assert s.next().retry is not None
        assert s.next().id == str(checkpoint)
        nxt = append_many(server.db, "orders.eu", 1)
        assert [f.offset for f in s.events(until=nxt[0])] == nxt


def test_checkpoints_come_at_most_once_per_keepalive_period(server: Server) -> None:
    with SSE(server, {"topic": "quiet.#"}) as stream:
        stream.next()
        stream.next()
        started = time.monotonic()
        checkpoints = 0
        while time.monotonic() - started < 2.0:
            append_many(server.db, "loud", 5)  # the log moves on before every frame
            frame = stream.next()
            if frame.id is not None and frame.data is None:
                checkpoints += 1
        # keep-alive period 0.5 s: at most one per period (plus one already due)
        assert 1 <= checkpoints <= 5, checkpoints


def test_gap_when_the_resume_point_was_pruned(server: Server) -> None:
    offsets = append_many(server.db, "g", 100)
    with eventlog.open_sync(server.db) as log:
        report = _retention.prune(log, _retention.Retention(keep_last=10), force=True)
    assert report.events == 90
    with SSE(server, {"topic": "g", "after": offsets[19]}) as stream:
        assert stream.next().retry is not None
        gap = stream.next()
        assert gap.event == "gap" and gap.id is None
        assert gap.json == {"after": offsets[19], "first_available": offsets[90]}
        assert [f.offset for f in stream.events(until=offsets[-1])] == offsets[90:]
    # no gap when nothing after the resume point is gone
    with SSE(server, {"topic": "g", "after": offsets[95]}) as stream:
        stream.next()
        assert stream.next().event is None
        assert [f.offset for f in stream.events(until=offsets[-1])] == offsets[96:]


def test_keepalive_comment_after_silence(server: Server) -> None:
    with SSE(server, {"topic": "silent"}) as stream:
        stream.next()
        stream.next()
        started = time.monotonic()
        frame = stream.next()
        waited = time.monotonic() - started
    assert frame.comments == ["keepalive"] and frame.id is None
    assert 0.3 < waited < 3, waited


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_shutdown_ends_open_streams_with_bye_and_exits_0_within_2s(
    web_db: Path, servers: list[Server], sig: int
) -> None:
    server = start_server(web_db, "--keepalive", "30")
    servers.append(server)
    streams = [SSE(server, {"topic": f"t{i}"}) for i in range(3)]
    try:
        for s in streams:
            s.next()
            s.next()
        wait_until(lambda: open_streams(server) == 3, what="three streams open")
        started = time.monotonic()
        server.proc.send_signal(sig)
        code = server.proc.wait(10)
        elapsed = time.monotonic() - started
        byes = [s.next() for s in streams]
    finally:
        for s in streams:
            s.close()
    assert code == 0, server.stderr()
    assert elapsed < 2.0, elapsed
    assert all(b.event == "bye" for b in byes), byes
    assert "Traceback" not in server.stderr()
    server.stop()


CLIENT = textwrap.dedent("""
    import socket, sys
    port, token = int(sys.argv[1]), sys.argv[2]
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(("GET /api/v1/stream?topic=k HTTP/1.1\\r\\nHost: 127.0.0.1:%d\\r\\n"
               "Authorization: Bearer %s\\r\\n\\r\\n" % (port, token)).encode())
    data = b""
    while b"retry:" not in data:
        data += s.recv(4096)
    print("ready", flush=True)
    sys.stdin.read()
""")


def raw_stream(server: Server, *, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(5)
    sock.connect(("127.0.0.1", server.port))
    sock.sendall(f"GET /api/v1/stream?topic=k HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
                 f"Authorization: Bearer {server.token}\r\n\r\n".encode())  # fmt: skip
    data = b""
    while b"retry:" not in data:
        chunk = sock.recv(4096)
        assert chunk, data
        data += chunk
    return sock


def test_connect_kill_cycles_leave_no_open_stream_behind(server: Server) -> None:
    import struct

    for i in range(90):
        sock = raw_stream(server)
        if i % 2:  # reset, as a killed process with unread data does
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    for _ in range(10):  # and real processes, killed
        proc = subprocess.Popen([sys.executable, "-c", CLIENT, str(server.port), str(server.token)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # fmt: skip
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline() == b"ready\n"
        proc.kill()
        proc.wait(10)
        proc.stdout.close()
        proc.stdin.close()
    wait_until(lambda: open_streams(server) == 0, what="every stream closed")
    info = server.client().get("/api/v1/info").json()
    assert info["streams_served"] >= 100
    with SSE(server, {"topic": "k"}) as stream:  # and it still serves
        stream.next()
        stream.next()
        offsets = append_many(server.db, "k", 1)
        assert stream.events(until=offsets[0])[0].offset == offsets[0]


def test_a_stalled_client_is_dropped_and_never_pins_the_wal(
    web_db: Path, servers: list[Server]
) -> None:
    import threading

    server = start_server(web_db, "--send-timeout", "1", "--keepalive", "0.5")
    servers.append(server)
    stalled = raw_stream(server, rcvbuf=4096)  # and never read again
    got: list[int] = []
    try:
        with SSE(server, {"topic": "k", "after": 0}) as healthy:
            big = {"blob": "x" * 60_000}
            reader = threading.Thread(
                target=lambda: got.extend(f.offset for f in healthy.events(until=120)),
                daemon=True)  # fmt: skip
            reader.start()
            with eventlog.open_sync(server.db) as log:
                offsets = log.append_many([Draft("k", big) for _ in range(120)])
                # the stalled stream's send is stuck, yet no read transaction is open
                wait_until(lambda: "read nothing" in server.stderr(), 15,
                           "the stalled stream dropped")  # fmt: skip
                busy, _, _ = log.checkpoint()
                assert busy == 0
            reader.join(20)
            assert got == offsets
        wait_until(lambda: open_streams(server) == 0, what="the stalled stream closed")
    finally:
        stalled.close()


def test_max_streams_answers_503_with_retry_after(web_db: Path, servers: list[Server]) -> None:
    server = start_server(web_db, "--max-streams", "2")
    servers.append(server)
    with SSE(server, {"topic": "a"}) as one, SSE(server, {"topic": "b"}) as two:
        one.next()
        two.next()
        response = server.client().get("/api/v1/stream", params={"topic": "c"})
        assert response.status_code == 503
        assert response.headers["retry-after"].isdigit()
        assert response.json()["error"]["type"] == "TooManyStreams"
    wait_until(lambda: open_streams(server) == 0)
    with SSE(server, {"topic": "c"}) as three:
        assert three.status == 200


def test_pages_and_streams_show_only_events_a_finished_fsync_covers(
    web_db: Path, servers: list[Server]
) -> None:
    """Guarantee 1 in the browser: a writer at `normal` leaves its commits neither fsynced nor
    noted; the server (at `full`) fsyncs before its browse page or its stream shows them, and
    tells the other processes so in the writers' note."""
    server = start_server(web_db)
    servers.append(server)
    stat = os.stat(web_db)
    with eventlog.open_sync(web_db, durability="normal") as writer:
        lock = writer._write_lock
        on_disk = functools.partial(lock.durable_through, (stat.st_dev, stat.st_ino))
        offsets = writer.append_many([Draft("t", {"i": i}) for i in range(3)])
        assert on_disk() == 0
        page = server.client().get("/api/v1/topics/t/events").json()
        assert sorted(e["offset"] for e in page["events"]) == offsets
        assert on_disk() >= offsets[-1]
        with SSE(server, {"topic": "t", "after": offsets[-1]}) as stream:
            stream.next()
            newer = writer.append("t", {"i": 3})
            assert stream.events(until=newer)[-1].offset == newer
            assert on_disk() >= newer
