"""Safety on one host: the token, the session cookie, and the checks every request passes.

- Host allowlist (DNS rebinding): a page on evil.example whose name resolves to 127.0.0.1
  still sends `Host: evil.example`; only the names the server was started for are served.
- Authentication: a Jupyter-style token kept owner-only in the sidecar folder (reused across
  restarts, so open pages reconnect; `--rotate-token` replaces it). `?token=` on a page URL
  is swapped for an HttpOnly SameSite=Strict cookie and removed from the address bar;
  scripts send `Authorization: Bearer TOKEN`. The cookie holds an HMAC of the token, not
  the token, and its name carries the port (cookies ignore ports).
- Writes (any method but GET and HEAD): 405 under `--read-only`; JSON bodies only; and a
  same-origin `Sec-Fetch-Site` or `Origin`, also under `--no-auth`, since a cross-site form
  can reach a loopback server. A request with neither header comes from a program, not a
  browser: it may write only with a Bearer token (a browser cannot add that header across
  origins without a CORS preflight, which this server never grants).
- Every response: a CSP without inline script, nosniff, no framing, no referrer (the login
  URL carries the token), and no CORS headers ever.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

from .._db import Paths
from ..errors import StorageError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

TOKEN_FILE = "serve.token"
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1", "[::1]")

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; form-action 'self'; base-uri 'none'; "
    "frame-ancestors 'none'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
]
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    return host.startswith("127.") and all(p.isdigit() for p in host.split("."))


def token_path(paths: Paths) -> Path:
    return paths.sidecar / TOKEN_FILE


def load_token(paths: Paths, *, rotate: bool = False) -> str:
    """The server's token: read from the sidecar folder, or made (owner-only) when missing,
    unreadable or `rotate` is asked."""
    path = token_path(paths)
    if not rotate:
        try:
            text = path.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            text = ""
        if len(text) >= 32 and all(c.isalnum() or c in "-_" for c in text):
            return text
    token = secrets.token_urlsafe(32)
    tmp = path.with_name(f".{TOKEN_FILE}.tmp-{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, (token + "\n").encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StorageError(f"cannot write the token file {path}: {exc}",
                           hint="make the database's sidecar folder writable") from exc  # fmt: skip
    return token


@dataclass
class Policy:
    """What the checks need to know about the running server."""

    port: int
    token: str | None  # None: --no-auth
    read_only: bool = False
    allowed_hosts: set[str] = field(default_factory=set)  # names, without ports

    @property
    def cookie_name(self) -> str:
        return f"eventlog_session_{self.port}"

    @property
    def cookie_value(self) -> str:
        assert self.token is not None
        return hmac.new(self.token.encode(), b"eventlog-session-v1", hashlib.sha256).hexdigest()

    def host_allowed(self, host_header: str) -> bool:
        name = host_header.strip().lower()
        if name.startswith("["):
            name = name[: name.find("]") + 1] if "]" in name else name
        elif name.count(":") == 1:
            name = name.split(":", 1)[0]
        return bool(name) and name in self.allowed_hosts

    def token_ok(self, candidate: str | None) -> bool:
        return (
            self.token is not None
            and candidate is not None
            and hmac.compare_digest(candidate.encode(), self.token.encode())
        )

    def cookie_ok(self, cookie_header: str | None) -> bool:
        if self.token is None or not cookie_header:
            return False
        for part in cookie_header.split(";"):
            name, _, value = part.strip().partition("=")
            if name == self.cookie_name and hmac.compare_digest(
                value.encode(), self.cookie_value.encode()
            ):
                return True
        return False

    def session_cookie(self) -> str:
        return (f"{self.cookie_name}={self.cookie_value}; Path=/; HttpOnly; SameSite=Strict; "
                "Max-Age=2592000")  # fmt: skip


def allowed_host_names(bind_host: str, extra: list[str]) -> set[str]:
    names = {h.lower() for h in extra}
    names.add(bind_host.lower() if ":" not in bind_host else f"[{bind_host.lower()}]")
    if is_loopback(bind_host) or bind_host in ("0.0.0.0", "::"):
        names.update({"127.0.0.1", "localhost", "[::1]"})
    names.discard("0.0.0.0")
    names.discard("[::]")
    return names


def _headers(scope: Scope) -> dict[str, str]:
    found: dict[str, str] = {}
    for raw_name, raw_value in scope.get("headers", []):
        name = raw_name.decode("latin-1").lower()
        value = raw_value.decode("latin-1")
        if name in found:
            value = found[name] + ("; " if name == "cookie" else ", ") + value
        found[name] = value
    return found


async def send_json_error(
    send: Send,
    status: int,
    kind: str,
    message: str,
    hint: str = "",
    extra_headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    body = json.dumps({"error": {"type": kind, "message": message, "hint": hint}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"cache-control", b"no-store"), *(extra_headers or [])]  # fmt: skip
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


PUBLIC_PREFIXES = ("/static/",)
PUBLIC_PATHS = frozenset({"/healthz", "/api/v1/healthz", "/login", "/favicon.ico"})


class Guard:
    """ASGI middleware: every request passes the Host, auth and write checks here, and every
    response gets the security headers. `login_page` renders the 401 page for browsers."""

    def __init__(self, app: ASGIApp, policy: Policy, login_page: Callable[[], bytes]) -> None:
        self.app = app
        self.policy = policy
        self.login_page = login_page

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        headers = _headers(scope)
        is_api = path.startswith("/api/") or path in ("/metrics", "/healthz")
        secured = _with_security_headers(send, no_store=is_api)
        policy = self.policy
        if not policy.host_allowed(headers.get("host", "")):
            await send_json_error(
                secured, 403, "HostNotAllowed",
                f"this server does not answer to the host name {headers.get('host', '')!r}",
                "use the URL eventlog serve printed, or start it with --allowed-host NAME",
            )  # fmt: skip
            return
        method: str = scope["method"]
        query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
        if policy.token is not None and not is_api and method == "GET" and "token" in query:
            await self._login(scope, secured, query)
            return
        bearer = _bearer(headers.get("authorization"))
        authed = policy.token is None or policy.token_ok(bearer) or policy.cookie_ok(
            headers.get("cookie"))  # fmt: skip
        public = path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)
        if not authed and not public:
            if bearer is not None:
                message = "the token is not valid (it changes with --rotate-token)"
            else:
                message = "sign in first: this server needs its token"
            if is_api:
                hint = (
                    "open the login URL that eventlog serve printed, or send "
                    "'Authorization: Bearer TOKEN' (eventlog serve --print-url shows it)"
                )
                challenge = [(b"www-authenticate", b'Bearer realm="eventlog"')]
                await send_json_error(secured, 401, "Unauthorized", message, hint, challenge)
            else:
                await _send_html(secured, 401, self.login_page())
            return
        if method in WRITE_METHODS or (is_api and method not in ("GET", "HEAD")):
            problem = self._write_problem(headers, bearer is not None and authed)
            if problem is not None:
                await send_json_error(secured, *problem)
                return
        await self.app(scope, receive, secured)

    def _write_problem(
        self, headers: dict[str, str], by_bearer: bool
    ) -> tuple[int, str, str, str] | None:
        if self.policy.read_only:
            return (405, "ReadOnly", "this server was started with --read-only",
                    "restart eventlog serve without --read-only to change anything")  # fmt: skip
        site = headers.get("sec-fetch-site")
        origin = headers.get("origin")
        expected = f"http://{headers.get('host', '')}"
        if site is not None and site != "same-origin":
            return (403, "CrossOrigin", f"a {site} request may not change anything here",
                    "use the dashboard itself, or a script with a Bearer token")  # fmt: skip
        if origin is not None and origin != expected:
            return (403, "CrossOrigin", f"requests from {origin} may not change anything here",
                    f"writes must come from {expected}")  # fmt: skip
        if site is None and origin is None and not by_bearer:
            return (403, "CrossOrigin", "a write needs a same-origin Origin header",
                    f"scripts send 'Authorization: Bearer TOKEN', or 'Origin: {expected}' "
                    "under --no-auth")  # fmt: skip
        content_type = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if content_type != "application/json":
            return (415, "UnsupportedMediaType", "writes accept JSON bodies only",
                    "send Content-Type: application/json")  # fmt: skip
        return None

    async def _login(self, scope: Scope, send: Send, query: dict[str, str]) -> None:
        """`?token=` on a page: set the cookie and drop the token from the address bar."""
        if not self.policy.token_ok(query.get("token")):
            await _send_html(send, 401, self.login_page())
            return
        if scope["path"] == "/login":
            location = _path_on_this_server(query.get("next", "/"))
        else:
            pairs = parse_qsl(scope.get("query_string", b"").decode("latin-1"),
                              keep_blank_values=True)  # fmt: skip
            rest = urlencode([(k, v) for k, v in pairs if k != "token"])  # repeats kept
            location = _quoted_path(scope["path"]) + (f"?{rest}" if rest else "")
        await send({"type": "http.response.start", "status": 303, "headers": [
            (b"location", location.encode("ascii")),
            (b"set-cookie", self.policy.session_cookie().encode()),
            (b"cache-control", b"no-store"), (b"content-length", b"0")]})  # fmt: skip
        await send({"type": "http.response.body", "body": b""})


def _path_on_this_server(target: str) -> str:
    """The login page's `next`, as a redirect that stays on this server (never an open
    redirect): a path, with its query, and nothing else; "/" for anything else. A browser drops
    tabs and line breaks from a URL, so they are dropped before the look for //host."""
    target = target.translate({9: None, 10: None, 13: None})
    parts = urlsplit(target)
    if (not target.startswith("/") or target.startswith("//") or "\\" in target
            or parts.scheme or parts.netloc):  # fmt: skip
        return "/"
    query = quote(parts.query, safe="=&;:@!$'()*+,/?-._~%")
    return _quoted_path(parts.path) + (f"?{query}" if query else "")


def _quoted_path(path: str) -> str:
    """A decoded path as it goes in a Location header: percent-encoded (a '#' stays part of the
    path, a line break cannot end the header), with one leading slash (never //host)."""
    return "/" + quote(path, safe="/:@!$&'()*+,;=-._~").lstrip("/")


def _bearer(value: str | None) -> str | None:
    if not value:
        return None
    scheme, _, credentials = value.partition(" ")
    return credentials.strip() if scheme.lower() == "bearer" and credentials.strip() else None


def _with_security_headers(send: Send, *, no_store: bool) -> Send:
    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = [(k, v) for k, v in message.get("headers", [])
                       if not k.lower().startswith(b"access-control-")]  # fmt: skip
            headers += SECURITY_HEADERS
            if no_store and not any(k.lower() == b"cache-control" for k, _ in headers):
                headers.append((b"cache-control", b"no-store"))
            message = {**message, "headers": headers}
        await send(message)

    return wrapped


async def _send_html(send: Send, status: int, body: bytes) -> None:
    headers = [
        (b"content-type", b"text/html; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
