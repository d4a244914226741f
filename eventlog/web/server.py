"""Running `eventlog serve`: bind the socket, open the logs, run uvicorn's Server ourselves.

Plain `uvicorn.run` waits for open responses before it exits, and an event stream never ends
by itself: a server with one browser tab open would never stop. Here SIGINT and SIGTERM also
tell every stream to send `event: bye` and finish, so the process exits 0 within a second or
two (uvicorn's graceful timeout is a backstop). uvicorn raises the signal it caught again
once it is done; our own handler is in place by then, so that is a no-op, not a kill.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn

from .. import _db
from .._async import AsyncLog
from .._sync import SyncLog
from ..errors import EventlogError, InvalidArgument, NotAnEventlogDatabase
from .app import ServerState, build_app
from .auth import (
    ASGIApp,
    Message,
    Policy,
    Receive,
    Scope,
    Send,
    allowed_host_names,
    is_loopback,
    load_token,
    token_path,
)
from .stream import Hub

log = logging.getLogger("eventlog.web")
access = logging.getLogger("eventlog.web.access")


@dataclass
class ServeOptions:
    db: Path
    host: str = "127.0.0.1"
    port: int = 8765
    read_only: bool = False
    no_auth: bool = False
    rotate_token: bool = False
    allowed_hosts: list[str] = field(default_factory=list)
    keepalive: float = 15.0
    send_timeout: float = 30.0
    max_streams: int = 64
    metrics: bool = False


def check_options(opts: ServeOptions) -> None:
    if opts.no_auth and not is_loopback(opts.host):
        raise InvalidArgument(
            f"--no-auth on {opts.host} would let anyone who can reach it read and change the log",
            hint="bind 127.0.0.1 (the default) to use --no-auth, or drop --no-auth",
        )
    if not 0 <= opts.port <= 65535:
        raise InvalidArgument(f"--port must be 0-65535, got {opts.port}")
    for name, value in (("--keepalive", opts.keepalive), ("--send-timeout", opts.send_timeout)):
        if not 0.05 <= value <= 3600:
            raise InvalidArgument(f"{name} must be between 0.05 and 3600 seconds, got {value}")
    if opts.max_streams < 1:
        raise InvalidArgument(f"--max-streams must be 1 or more, got {opts.max_streams}")
    for name in opts.allowed_hosts:
        if not name or (any(c in name for c in "/:@ ") and not name.startswith("[")):
            raise InvalidArgument(f"--allowed-host takes a host name without port, got {name!r}")


def url_host(opts: ServeOptions) -> str:
    if opts.host in ("0.0.0.0", "::"):
        extra = [h for h in opts.allowed_hosts if not is_loopback(h)]
        return extra[0] if extra else "127.0.0.1"
    return f"[{opts.host}]" if ":" in opts.host else opts.host


def login_url(opts: ServeOptions, port: int, token: str | None) -> str:
    base = f"http://{url_host(opts)}:{port}"
    return f"{base}/login?token={token}" if token else f"{base}/"


def prepare_token(opts: ServeOptions) -> str | None:
    """The token (made or replaced as asked), or None under --no-auth."""
    if opts.no_auth:
        return None
    paths = _db.Paths.for_db(opts.db)
    if not paths.db.exists():
        raise NotAnEventlogDatabase(f"no database at {paths.db}",
                                    hint="create it with 'eventlog init'")  # fmt: skip
    paths.make_sidecar()
    return load_token(paths, rotate=opts.rotate_token)


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # A restart on the same port must not wait for the old connections' TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise EventlogError(f"cannot listen on {host}:{port}: the port is in use",
                                hint="choose another --port (0 picks a free one), or stop the "
                                "server using it") from None  # fmt: skip
        raise EventlogError(f"cannot listen on {host}:{port}: {exc.strerror or exc}",
                            hint="check --host and --port") from None  # fmt: skip
    return sock


class _Server(uvicorn.Server):
    """uvicorn's server, whose exit signal also ends the event streams."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_exit = on_exit
        self._loop: asyncio.AbstractEventLoop | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._on_exit)


class AccessLog:
    """One stderr line per request once it is answered (streams: when they end). The query
    string is left out: the login URL carries the token."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        status = [0]

        async def logged(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, logged)
        finally:
            client = scope.get("client") or ("-", 0)
            access.info("%s %s %s %d %.1fms", client[0], scope["method"], scope["path"],
                        status[0], (time.monotonic() - started) * 1000)  # fmt: skip


def setup_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("eventlog", "uvicorn"):
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def serve(opts: ServeOptions, announce: Callable[[dict[str, Any]], None]) -> None:
    """Serve until SIGINT or SIGTERM. `announce` gets the URL and settings once the socket
    listens and the database is open."""
    check_options(opts)
    token = prepare_token(opts)
    sock = bind(opts.host, opts.port)
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        asyncio.run(_main(opts, token, sock, announce))
    finally:
        sock.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


async def _main(
    opts: ServeOptions,
    token: str | None,
    sock: socket.socket,
    announce: Callable[[dict[str, Any]], None],
) -> None:
    port = int(sock.getsockname()[1])
    slog = SyncLog(opts.db, create=False)
    alog: AsyncLog | None = None
    hub: Hub | None = None
    try:
        alog = await AsyncLog(opts.db, create=False)._open()
        hub = Hub(alog, opts.max_streams)
        hub.start()
        policy = Policy(
            port=port,
            token=token,
            read_only=opts.read_only,
            allowed_hosts=allowed_host_names(opts.host, opts.allowed_hosts),
        )
        state = ServerState(slog, alog, hub, policy, keepalive=opts.keepalive,
                            send_timeout=opts.send_timeout, metrics=opts.metrics)  # fmt: skip
        config = uvicorn.Config(
            AccessLog(build_app(state)), lifespan="off", log_config=None, access_log=False,
            ws="none", http="h11", loop="asyncio", interface="asgi3", server_header=False,
            timeout_graceful_shutdown=1, timeout_keep_alive=5,
        )  # fmt: skip
        server = _Server(config, hub.begin_shutdown)
        server._loop = asyncio.get_running_loop()
        # Until uvicorn installs its handlers (and after it restores these, when it raises
        # the caught signal again), a signal just asks the server to stop.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, server.handle_exit)
        announce({
            "url": login_url(opts, port, token), "base_url": f"http://{url_host(opts)}:{port}",
            "host": opts.host, "port": port, "auth": token is not None,
            "token_file": str(token_path(_db.Paths.for_db(opts.db))) if token else None,
            "read_only": opts.read_only, "metrics": opts.metrics, "db": str(slog.paths.db),
        })  # fmt: skip
        await server.serve(sockets=[sock])
        log.info("stopped")
    finally:
        if hub is not None:
            await hub.close()
        if alog is not None:
            await alog.close()
        slog.close()
