"""Fixtures for `eventlog serve`: a real server subprocess on a free 127.0.0.1 port (an
in-process ASGI transport hangs on event streams), an httpx client for it, and a small
Server-Sent Events reader with a deadline on every read.

The web extra (starlette, uvicorn) and httpx are test dependencies: missing, these tests are
skipped on a developer's machine and fail under CI=true.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import eventlog

CI = os.environ.get("CI") == "true"


def need(module: str) -> Any:
    try:
        return __import__(module)
    except ImportError:
        if CI:
            raise
        pytest.skip(f"{module} is not installed: pip install -e '.[test]'", allow_module_level=True)


need("starlette")
need("uvicorn")
httpx = need("httpx")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    """A running `eventlog serve` process."""

    db: Path
    proc: subprocess.Popen[bytes]
    info: dict[str, Any]
    stderr_path: Path
    args: tuple[str, ...] = ()
    clients: list[Any] = field(default_factory=list)

    @property
    def port(self) -> int:
        return int(self.info["port"])

    @property
    def base(self) -> str:
        return str(self.info["base_url"])

    @property
    def origin(self) -> str:
        return self.base

    @property
    def token(self) -> str | None:
        url = str(self.info["url"])
        return url.split("token=", 1)[1] if "token=" in url else None

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def client(self, *, auth: bool = True, **kwargs: Any) -> Any:
        headers = {**(self.auth() if auth else {}), **kwargs.pop("headers", {})}
        client = httpx.Client(base_url=self.base, headers=headers, timeout=10, **kwargs)
        self.clients.append(client)
        return client

    def writer(self) -> Any:
        """A client for writes: JSON, the token, and a same-origin Origin header."""
        return self.client(headers={"Origin": self.origin})

    def stderr(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        for client in self.clients:
            client.close()
        self.clients.clear()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError(
                f"server did not stop within {timeout}s:\n{self.stderr()}"
            ) from None
        finally:
            if self.proc.stdout is not None:
                self.proc.stdout.close()


def start_server(
    db: Path, *args: str, port: int = 0, env: dict[str, str] | None = None,
    timeout: float = 20.0,
) -> Server:  # fmt: skip
    """Start `eventlog --db DB --json serve --port PORT ARGS` and wait until it answers."""
    stderr_path = db.with_name(f"{db.name}.serve-{time.monotonic_ns()}.log")
    with open(stderr_path, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "eventlog", "--db", str(db), "--json", "serve",
             "--port", str(port), *args],
            stdout=subprocess.PIPE, stderr=err, env={**os.environ, **(env or {})},
        )  # fmt: skip
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    line = b""
    while not line.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0 or proc.poll() is not None:
            proc.kill()
            proc.wait(5)
            proc.stdout.close()
            raise AssertionError(f"server did not start: {stderr_path.read_text()}")
        ready, _, _ = select.select([proc.stdout], [], [], remaining)
        if ready:
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                continue
            line += chunk
    info = json.loads(line.decode().splitlines()[0])
    server = Server(db, proc, info, stderr_path, args)
    with httpx.Client(base_url=server.base, timeout=2) as probe:
        while True:
            try:
                if probe.get("/api/v1/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                server.stop(signal.SIGKILL)
                raise AssertionError(f"server never answered: {server.stderr()}")
            time.sleep(0.05)
    return server


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    """Servers a test started (append to the list); any still running is stopped."""
    started: list[Server] = []
    yield started
    for server in started:
        if server.proc.poll() is None:
            server.stop(signal.SIGKILL)


@pytest.fixture
def web_db(tmp_path: Path) -> Path:
    db = tmp_path / "app.db"
    with eventlog.open_sync(db):
        pass
    return db


@pytest.fixture
def server(web_db: Path, servers: list[Server]) -> Server:
    """A fresh server on a fresh log, keep-alive every half second."""
    s = start_server(web_db, "--keepalive", "0.5")
    servers.append(s)
    return s


# -- Server-Sent Events ------------------------------------------------------------------------


@dataclass
class Frame:
    id: str | None = None
    event: str | None = None
    data: str | None = None
    retry: int | None = None
    comments: list[str] = field(default_factory=list)

    @property
    def json(self) -> Any:
        assert self.data is not None
        return json.loads(self.data)

    @property
    def offset(self) -> int:
        assert self.id is not None
        return int(self.id)


class SSE:
    """An open stream; `next()` parses the next frame, waiting at most `timeout` seconds."""

    def __init__(
        self, server: Server, params: Any = None, headers: dict[str, str] | None = None,
        timeout: float = 10.0,
    ) -> None:  # fmt: skip
        self.client = httpx.Client(base_url=server.base, headers=server.auth(),
                                   timeout=httpx.Timeout(10, read=timeout))  # fmt: skip
        self._cm = self.client.stream("GET", "/api/v1/stream", params=params, headers=headers)
        self.response = self._cm.__enter__()
        self._lines = self.response.iter_lines()

    @property
    def status(self) -> int:
        return int(self.response.status_code)

    def next(self) -> Frame:
        frame = Frame()
        seen = False
        for line in self._lines:
            if line == "":
                if seen:
                    return frame
                continue
            seen = True
            if line.startswith(":"):
                frame.comments.append(line[1:].strip())
                continue
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "id":
                frame.id = value
            elif name == "event":
                frame.event = value
            elif name == "data":
                frame.data = value if frame.data is None else frame.data + "\n" + value
            elif name == "retry":
                frame.retry = int(value)
        raise EOFError("the stream ended")

    def events(self, until: int, deadline_s: float = 20.0) -> list[Frame]:
        """Event frames (with data) until one with offset >= until arrives."""
        end = time.monotonic() + deadline_s
        found: list[Frame] = []
        while time.monotonic() < end:
            frame = self.next()
            if frame.data is not None and frame.event is None:
                found.append(frame)
                if frame.offset >= until:
                    return found
        raise AssertionError(f"no event {until} within {deadline_s}s; got {len(found)}")

    def close(self) -> None:
        self._cm.__exit__(None, None, None)
        self.client.close()

    def __enter__(self) -> SSE:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_until(predicate: Any, timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(0.02)
