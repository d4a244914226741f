"""Safety of `eventlog serve` on one host: the owner-only token reused across restarts, the
login URL swapped for an HttpOnly SameSite=Strict cookie, Bearer tokens for scripts, the
Host allowlist (DNS rebinding), same-origin JSON-only writes (also under --no-auth), security
headers without CORS, pages without inline script that render data as text only, and the
refusals: --no-auth off loopback, a missing database, a missing web extra."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import raw

import eventlog
from eventlog import _db

from .conftest import Server, httpx, start_server

STATIC = Path(__file__).resolve().parents[2] / "eventlog" / "web" / "static"


def run_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "eventlog", *args], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)  # fmt: skip


def events_in(db: Path, topic: str | None = None) -> int:
    with raw(db) as conn:
        if topic is None:
            return int(conn.execute("SELECT count(*) FROM eventlog_events").fetchone()[0])
        return int(conn.execute("SELECT count(*) FROM eventlog_events WHERE topic = ?",
                                (topic,)).fetchone()[0])  # fmt: skip


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    db = tmp_path_factory.mktemp("security") / "app.db"
    with eventlog.open_sync(db):
        pass
    server = start_server(db)
    yield server
    assert server.stop() == 0


def login(server: Server) -> Any:
    """A client holding the session cookie that the login URL sets (no token otherwise)."""
    client = server.client(auth=False, follow_redirects=False)
    response = client.get("/login", params={"token": server.token})
    assert response.status_code == 303, response.text
    return client


# -- the token ----------------------------------------------------------------------------------


def test_token_is_owner_only_reused_across_restarts_and_rotated(
    web_db: Path, servers: list[Server]
) -> None:
    first = start_server(web_db)
    servers.append(first)
    path = _db.Paths.for_db(web_db).sidecar / "serve.token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().strip() == first.token
    assert first.stop() == 0
    again = start_server(web_db)
    servers.append(again)
    assert again.token == first.token
    assert again.client().get("/api/v1/info").status_code == 200
    assert again.stop() == 0
    rotated = start_server(web_db, "--rotate-token")
    servers.append(rotated)
    assert rotated.token != first.token and path.read_text().strip() == rotated.token
    stale = rotated.client(auth=False, headers={"Authorization": f"Bearer {first.token}"})
    response = stale.get("/api/v1/info")
    assert response.status_code == 401 and "not valid" in response.json()["error"]["message"]


def test_print_url_prints_the_login_url_and_exits(web_db: Path) -> None:
    run = run_cli("--db", str(web_db), "serve", "--print-url", "--port", "9")
    assert run.returncode == 0, run.stderr
    token = (_db.Paths.for_db(web_db).sidecar / "serve.token").read_text().strip()
    assert run.stdout.strip() == f"http://127.0.0.1:9/login?token={token}"


def test_no_auth_is_refused_off_loopback(web_db: Path) -> None:
    run = run_cli("--db", str(web_db), "serve", "--no-auth", "--host", "0.0.0.0")
    assert run.returncode == 1
    assert run.stderr.startswith("error: --no-auth on 0.0.0.0") and "hint:" in run.stderr


def test_serve_needs_an_existing_database(tmp_path: Path) -> None:
    db = tmp_path / "missing.db"
    run = run_cli("--db", str(db), "serve", "--port", "0")
    assert run.returncode == 1 and "no database at" in run.stderr and "hint:" in run.stderr
    assert not db.exists()


def test_without_the_web_extra_serve_says_how_to_install_it(web_db: Path) -> None:
    script = textwrap.dedent(f"""
        import sys
        sys.modules["starlette"] = None  # as if the extra were not installed
        sys.argv = ["eventlog", "--db", {str(web_db)!r}, "serve"]
        from eventlog.cli import main
        main()
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=30)  # fmt: skip
    assert run.returncode == 1
    assert "error: eventlog serve needs the web extra" in run.stderr
    assert "pip install 'eventlog[web]'" in run.stderr and "Traceback" not in run.stderr


# -- signing in ---------------------------------------------------------------------------------


def test_login_url_swaps_the_token_for_an_httponly_strict_cookie(shared: Server) -> None:
    server = shared
    client = server.client(auth=False, follow_redirects=False)
    response = client.get("/login", params={"token": server.token})
    assert response.status_code == 303 and response.headers["location"] == "/"
    cookie = response.headers["set-cookie"]
    name, _, rest = cookie.partition("=")
    assert name == f"eventlog_session_{server.port}"
    value = rest.split(";", 1)[0]
    assert value and server.token not in cookie
    attributes = {a.strip().split("=")[0].lower() for a in cookie.split(";")[1:]}
    assert {"httponly", "path", "samesite"} <= attributes and "SameSite=Strict" in cookie
    assert client.get("/api/v1/info").status_code == 200  # the cookie alone signs in
    assert client.get("/").status_code == 200
    # ?token= on any page works too, and leaves the address bar without it
    other = server.client(auth=False, follow_redirects=False)
    moved = other.get("/groups/billing", params={"token": server.token, "x": "1"})
    assert moved.status_code == 303 and moved.headers["location"] == "/groups/billing?x=1"
    nxt = other.get("/login", params={"token": server.token, "next": "/dead-letters"})
    assert nxt.headers["location"] == "/dead-letters"
    for evil in ("//evil.example/x", "https://evil.example/", "/\\evil.example"):
        away = other.get("/login", params={"token": server.token, "next": evil})
        assert away.headers["location"] == "/", evil
    assert server.token not in server.stderr()  # the access log leaves query strings out


def test_without_a_session_api_gets_401_json_and_pages_the_login_page(shared: Server) -> None:
    server = shared
    anonymous = server.client(auth=False, follow_redirects=False)
    response = anonymous.get("/api/v1/info")
    assert response.status_code == 401 and response.json()["error"]["type"] == "Unauthorized"
    assert response.headers["www-authenticate"].startswith("Bearer")
    page = anonymous.get("/groups")
    assert page.status_code == 401 and page.headers["content-type"].startswith("text/html")
    assert 'action="/login"' in page.text and "--print-url" in page.text
    bad = anonymous.get("/login", params={"token": "x" * 43})
    assert bad.status_code == 401 and "set-cookie" not in bad.headers
    assert anonymous.get("/api/v1/healthz").status_code == 200
    assert anonymous.get("/static/app.css").status_code == 200
    assert anonymous.get("/login").status_code == 200
    wrong = server.client(auth=False, headers={"Authorization": "Bearer nope"})
    assert wrong.get("/api/v1/stream").status_code == 401


# -- Host, Origin, content type -------------------------------------------------------------------


def test_host_allowlist_refuses_rebound_names(web_db: Path, servers: list[Server]) -> None:
    server = start_server(web_db, "--allowed-host", "box.lan")
    servers.append(server)
    client = server.client()
    port = server.port
    for host, status in [(f"evil.example:{port}", 403), ("evil.example", 403),
                         (f"localhost:{port}", 200), (f"127.0.0.1:{port}", 200),
                         (f"box.lan:{port}", 200), (f"[::1]:{port}", 200)]:  # fmt: skip
        response = client.get("/api/v1/info", headers={"Host": host})
        assert response.status_code == status, host
        if status == 403:
            assert response.json()["error"]["type"] == "HostNotAllowed"
    assert client.get("/api/v1/healthz", headers={"Host": "evil.example"}).status_code == 403


WRITE_CASES = [
    # (auth, extra headers, body kind, expected status)
    ("cookie", {"Origin": "SELF"}, "json", 201),
    ("cookie", {"Sec-Fetch-Site": "same-origin", "Origin": "SELF"}, "json", 201),
    ("cookie", {}, "json", 403),
    ("cookie", {"Origin": "http://evil.example"}, "json", 403),
    ("cookie", {"Origin": "null"}, "json", 403),
    ("cookie", {"Sec-Fetch-Site": "cross-site"}, "json", 403),
    ("cookie", {"Sec-Fetch-Site": "same-site", "Origin": "http://127.0.0.1:1"}, "json", 403),
    ("cookie", {"Origin": "SELF"}, "form", 415),
    ("cookie", {"Origin": "SELF"}, "text", 415),
    ("bearer", {}, "json", 201),
    ("bearer", {"Origin": "http://evil.example"}, "json", 403),
    ("bearer", {"Sec-Fetch-Site": "cross-site"}, "json", 403),
    ("bearer", {}, "text", 415),
]


@pytest.mark.parametrize(("auth", "headers", "body", "status"), WRITE_CASES)
def test_writes_need_a_same_origin_json_request(
    shared: Server, auth: str, headers: dict[str, str], body: str, status: int
) -> None:
    server = shared
    client = login(server) if auth == "cookie" else server.client()
    original = headers
    headers = {k: server.origin if v == "SELF" else v for k, v in headers.items()}
    kwargs: dict[str, Any] = {
        "json": {"json": {"payload": 1}},
        "form": {"data": {"payload": "1"}},
        "text": {"content": b'{"payload": 1}', "headers": {"Content-Type": "text/plain"}},
    }[body]
    kwargs["headers"] = {**kwargs.get("headers", {}), **headers}
    topic = f"w{WRITE_CASES.index((auth, original, body, status))}"
    response = client.post(f"/api/v1/topics/{topic}/events", **kwargs)
    assert response.status_code == status, response.text
    assert events_in(server.db, topic) == (1 if status == 201 else 0)


def test_no_auth_still_requires_same_origin_writes(web_db: Path, servers: list[Server]) -> None:
    server = start_server(web_db, "--no-auth")
    servers.append(server)
    assert server.info["auth"] is False and "token=" not in server.info["url"]
    client = server.client()
    assert client.get("/api/v1/info").status_code == 200
    assert client.post("/api/v1/topics/n/events", json={"payload": 1}).status_code == 403
    cross = {"Origin": server.origin, "Sec-Fetch-Site": "cross-site"}
    assert (
        client.post("/api/v1/topics/n/events", json={"payload": 1}, headers=cross).status_code
        == 403
    )
    ok = client.post("/api/v1/topics/n/events", json={"payload": 1},
                     headers={"Origin": server.origin})  # fmt: skip
    assert ok.status_code == 201 and events_in(web_db) == 1


def test_security_headers_and_never_any_cors(shared: Server) -> None:
    server = shared
    client = server.client()
    for path in ("/", "/api/v1/info", "/static/js/lib.js", "/api/v1/nope"):
        response = client.get(path, headers={"Origin": "http://evil.example"})
        csp = response.headers["content-security-policy"]
        assert (
            "script-src 'self'" in csp and "unsafe-inline" not in csp and "unsafe-eval" not in csp
        )
        assert "frame-ancestors 'none'" in csp
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["referrer-policy"] == "no-referrer"
        assert not any(k.lower().startswith("access-control-") for k in response.headers), path
    assert client.get("/api/v1/info").headers["cache-control"] == "no-store"
    preflight = client.options("/api/v1/topics/x/events", headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type"})  # fmt: skip
    assert preflight.status_code >= 400
    assert "access-control-allow-origin" not in preflight.headers


def test_names_and_paths_from_the_url_are_validated(server: Server) -> None:
    client = server.writer()
    for topic in ("..%2F..%2Fetc", "a%00b", "x%20y", ".."):
        assert client.get(f"/api/v1/topics/{topic}/events").status_code in (400, 404), topic
        response = client.post(f"/api/v1/topics/{topic}/events", json={"payload": 1})
        assert response.status_code in (400, 404), topic
    assert client.get("/api/v1/groups/a%00b").status_code == 400
    assert client.get("/static/../auth.py").status_code == 404
    assert client.get("/static/%2e%2e/auth.py").status_code == 404
    assert events_in(server.db) == 0


# -- the pages ------------------------------------------------------------------------------------


def test_pages_have_no_inline_script_and_render_data_as_text_only() -> None:
    pages = sorted(STATIC.glob("*.html"))
    assert {p.name for p in pages} >= {
        "overview.html",
        "topic.html",
        "groups.html",
        "group.html",
        "dead-letters.html",
        "login.html",
    }
    for page in pages:
        html = page.read_text()
        for tag in re.findall(r"<script\b[^>]*>", html):
            assert 'type="module"' in tag and 'src="/static/js/' in tag, (page.name, tag)
        assert re.findall(r"<script\b[^>]*>\s*[^<\s]", html) == [], page.name
        assert not re.search(r"\son[a-z]+\s*=", html), page.name
        assert "style=" not in html, page.name
    for script in sorted((STATIC / "js").glob("*.js")):
        code = script.read_text()
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(",
                     "new Function", "setAttribute(\"on"):  # fmt: skip
            assert sink not in code, (script.name, sink)


def test_every_page_is_served(shared: Server) -> None:
    server = shared
    client = server.client(follow_redirects=False)
    for path in ("/", "/topics/orders", "/topics/orders.%23", "/groups", "/groups/g",
                 "/dead-letters", "/login"):  # fmt: skip
        response = client.get(path)
        assert response.status_code == 200, path
        assert response.headers["content-type"].startswith("text/html")
    for asset in STATIC.rglob("*"):
        if asset.is_file():
            rel = asset.relative_to(STATIC).as_posix()
            assert client.get(f"/static/{rel}").status_code == 200, rel


def test_token_file_is_not_world_readable_even_when_umask_is_lax(web_db: Path) -> None:
    old = os.umask(0)
    try:
        run = run_cli("--db", str(web_db), "serve", "--print-url", "--rotate-token")
    finally:
        os.umask(old)
    assert run.returncode == 0
    path = _db.Paths.for_db(web_db).sidecar / "serve.token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_httpx_is_the_real_client(shared: Server) -> None:
    server = shared
    # the servers under test are real processes reached over TCP, not an ASGI transport
    assert isinstance(server.client(), httpx.Client)
    assert server.proc.pid != os.getpid()


def test_every_static_file_ships_in_the_wheel() -> None:
    import fnmatch
    import tomllib

    root = STATIC.parents[2]
    config = tomllib.loads((root / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["eventlog.web"]
    assert "eventlog.web" in config["tool"]["setuptools"]["packages"]
    for path in STATIC.rglob("*"):
        if path.is_file():
            rel = path.relative_to(STATIC.parent).as_posix()
            assert any(fnmatch.fnmatch(rel, p) for p in patterns), f"{rel} is not package data"
