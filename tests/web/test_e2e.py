"""End-to-end: Playwright for Python driving Debian's headless `chromium` (found on PATH)
against a real `eventlog serve`. Under CI=true a missing chromium or playwright fails these
tests (.ci/run installs chromium with apt); elsewhere they are skipped.

Each page is also saved as a screenshot for review (not asserted): into
$EVENTLOG_SCREENSHOTS when set, else a temporary folder.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import raw

import eventlog
from eventlog import Draft, _db, _deadletter, _members, _replay

from .conftest import CI, Server, need, start_server, wait_until

need("playwright")
from playwright.sync_api import Browser, Page, sync_playwright  # noqa: E402

CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
TIMEOUT_MS = 15_000


@pytest.fixture(autouse=True)
def no_leaked_handles(no_leaked_handles_but_browser_threads: None) -> None:
    """Overrides the suite's leak check: Playwright's event loop keeps a thread pool of its
    own (threads named asyncio_N) for the browser's whole life, shared by the tests."""


@pytest.fixture
def no_leaked_handles_but_browser_threads(tmp_path: Path) -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 10
    for thread in set(threading.enumerate()) - before:
        if not thread.name.startswith("asyncio_"):
            thread.join(max(0.0, deadline - time.monotonic()))
    leaked = [t.name for t in set(threading.enumerate()) - before
              if not t.name.startswith("asyncio_")]  # fmt: skip
    assert not leaked, f"threads left running: {leaked}"
    prefix = os.fspath(tmp_path.resolve())
    open_fds = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}").startswith(prefix):
                open_fds.append(name)
        except OSError:
            continue
    assert not open_fds, f"descriptors left open under {prefix}"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    path = shutil.which("chromium")
    if path is None:
        message = "chromium is not on PATH (apt-get install chromium; .ci/run installs it)"
        if CI:
            pytest.fail(message)
        pytest.skip(message)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = os.environ.get("EVENTLOG_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        return Path(folder)
    return tmp_path_factory.mktemp("screenshots")


def signed_in(browser: Browser, server: Server) -> Page:
    """A new browser context that opened the printed login URL (so holds the cookie)."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.errors = errors  # type: ignore[attr-defined]
    page.goto(server.info["url"])
    return page


def no_page_errors(page: Page) -> None:
    assert page.errors == [], page.errors  # type: ignore[attr-defined]


def append(db: Path, topic: str, payloads: list[Any], **kw: Any) -> list[int]:
    with eventlog.open_sync(db) as log:
        return log.append_many([Draft(topic, p, **kw) for p in payloads])


def post_json(page: Page, url: str, body: Any) -> int:
    """A same-origin fetch from the page itself; returns the status."""
    return int(page.evaluate(
        """([url, body]) => fetch(url, {method: "POST", body: JSON.stringify(body),
            headers: {"Content-Type": "application/json"}}).then((r) => r.status)""",
        [url, body]))  # fmt: skip


def group_position(db: Path, group: str) -> int | None:
    with raw(db) as conn:
        row = conn.execute("SELECT max(position) FROM eventlog_group_offsets WHERE group_name = ?",
                           (group,)).fetchone()  # fmt: skip
    return None if row[0] is None else int(row[0])


def open_streams(server: Server) -> int:
    return int(server.client().get("/api/v1/info").json()["open_streams"])


def set_visibility(page: Page, state: str) -> None:
    """What the browser does when the tab is hidden or shown again."""
    page.evaluate(
        """(state) => {
            Object.defineProperty(document, "visibilityState", {configurable: true,
                                                                 get: () => state});
            document.dispatchEvent(new Event("visibilitychange"));
        }""",
        state,
    )


def shown_offsets(page: Page) -> list[int]:
    return [int(x) for x in page.eval_on_selector_all(
        "#rows tr[data-offset]", "rows => rows.map(r => r.dataset.offset)")]  # fmt: skip


def consume(
    db: Path, group: str, topic: str, handler: Any, until: Any, timeout: float = 15
) -> None:
    """Run a member of `group` in a thread until `until()` holds (with a deadline)."""
    with eventlog.open_sync(db) as log:
        stop = threading.Event()
        thread = threading.Thread(
            target=log.consume,
            args=(group, topic, handler),
            kwargs={
                "stop": stop,
                "handle_signals": False,
                "max_attempts": 1,
                "retry_backoff": 0.01,
            },
        )
        thread.start()
        try:
            wait_until(until, timeout, f"the {group} consumer")
        finally:
            stop.set()
            thread.join(15)


# -- signing in, the overview -----------------------------------------------------------------


def showcase(db: Path) -> None:
    """A log that looks like work: topics, a lagging group with dead letters, a live one."""
    with eventlog.open_sync(db) as log:
        log.create_topic("orders", 3)
        log.append_many([Draft("orders", {"id": i, "total": round(i * 1.7, 2)}, key=f"c{i % 9}")
                         for i in range(240)])  # fmt: skip
        log.append_many([Draft("payments.eu", {"order": i, "ok": i % 7 != 0}) for i in range(60)])
        log.append_many([Draft("payments.us", {"order": i}) for i in range(25)])

    def billing(event: eventlog.Event) -> None:
        if event.payload["id"] % 80 == 3:
            raise ValueError(f"card declined for order {event.payload['id']}")

    def dead() -> bool:
        return _deadletter.dead_letter_counts(_db.Paths.for_db(db)).pending == 3

    consume(db, "billing", "orders", billing, dead)
    with eventlog.open_sync(db) as log:
        _replay.replay(log, "billing", _replay.ResetSpec("shift", -30), None, execute=True)
        _replay.replay(
            log, "audit", _replay.ResetSpec("latest"), [("payments.eu", None)], execute=True
        )


def test_login_sets_an_httponly_cookie_and_the_overview_shows_the_log(
    browser: Browser, web_db: Path, servers: list[Server], shots: Path
) -> None:
    showcase(web_db)
    member = _members.Membership(_db.Paths.for_db(web_db), "audit")
    member.heartbeat([("payments.eu", 0)])
    server = start_server(web_db)
    servers.append(server)
    try:
        overview(browser, server, web_db, shots)
    finally:
        member.close()


def overview(browser: Browser, server: Server, web_db: Path, shots: Path) -> None:
    page = signed_in(browser, server)
    assert page.url == server.base + "/"  # the token left the address bar
    cookies = page.context.cookies()
    assert len(cookies) == 1 and cookies[0]["httpOnly"] and cookies[0]["sameSite"] == "Strict"
    assert page.evaluate("document.cookie") == ""  # scripts cannot read it
    stop = threading.Event()

    def traffic() -> None:  # appends at a changing rate, for the sparkline
        with eventlog.open_sync(web_db) as log:
            i = 0
            while not stop.is_set():
                log.append_many([Draft("orders", {"id": 1000 + i}, key="live")
                                 for _ in range(1 + (i % 6) * 3)])  # fmt: skip
                i += 1
                stop.wait(0.1)

    appender = threading.Thread(target=traffic)
    appender.start()
    try:
        page.goto(server.base + "/?every=0.5")
        page.wait_for_selector("#topics tr[data-topic='orders']")
        page.wait_for_selector("#groups tr[data-group='billing']")
        wait_until(lambda: page.eval_on_selector_all(".spark-line", "x => x.length") > 0 and
                   page.evaluate("document.querySelector('.spark-line').getAttribute('points')"
                                 ".split(' ').length") >= 6, 15, "the sparkline")  # fmt: skip
    finally:
        stop.set()
        appender.join(10)
    assert page.inner_text("#connection") == "connected"
    pending = _deadletter.dead_letter_counts(_db.Paths.for_db(web_db)).pending
    assert pending and page.inner_text("#dl-badge") == str(pending)
    assert "billing" in page.inner_text("#groups")
    assert page.inner_text("#groups tr[data-group='audit'] td:nth-child(2)") == "1"
    bottom = page.evaluate("document.querySelector('main').getBoundingClientRect().bottom")
    clip = {"x": 0, "y": 0, "width": 1280, "height": min(800, bottom + 8)}
    page.screenshot(path=str(shots / "overview.png"), clip=clip)  # type: ignore[arg-type]
    no_page_errors(page)
    # another browser without the cookie gets the helpful 401 page, not the data
    anonymous = browser.new_page()
    response = anonymous.goto(server.base + "/groups")
    assert response is not None and response.status == 401
    assert "print-url" in anonymous.inner_text("main")
    anonymous.screenshot(path=str(shots / "login.png"))
    anonymous.fill("#token", str(server.token))
    anonymous.click("button[type=submit]")
    anonymous.wait_for_url(server.base + "/groups")
    anonymous.wait_for_selector("#groups tr[data-group='billing']")
    anonymous.screenshot(path=str(shots / "groups.png"))
    anonymous.close()
    page.context.close()


# -- the live tail ----------------------------------------------------------------------------


def start_live(page: Page) -> None:
    page.click("#live-toggle")
    page.wait_for_selector("#live-state[data-state='live']")


def test_live_tail_shows_100_appends_with_p95_append_to_dom_under_250ms(
    browser: Browser, server: Server, shots: Path
) -> None:
    append(server.db, "tail", [{"n": -1}])
    page = signed_in(browser, server)
    page.goto(server.base + "/topics/tail")
    page.wait_for_selector("#rows tr[data-offset='1']")
    start_live(page)
    page.evaluate("""() => {
        window.latencies = [];
        new MutationObserver((changes) => {
            const now = Date.now();
            for (const change of changes) for (const node of change.addedNodes) {
                const ts = node.dataset && node.dataset.ts;
                if (ts) window.latencies.push(now - Number(ts));
            }
        }).observe(document.querySelector("#rows"), { childList: true });
    }""")
    with eventlog.open_sync(server.db) as log:
        for i in range(100):
            log.append("tail", {"n": i, "note": "<b>not html</b>"}, key=f"k{i % 4}")
            time.sleep(0.01)
    wait_until(lambda: page.evaluate("window.latencies.length") >= 100, 20, "100 rows")
    latencies = sorted(page.evaluate("window.latencies"))
    p95 = latencies[94]
    assert p95 < 250, f"p95 append-to-DOM {p95} ms; all: {latencies}"
    print(f"append-to-DOM over 100 appends: p50 {latencies[49]} ms, p95 {p95} ms")
    assert shown_offsets(page) == list(range(101, 0, -1))
    # untrusted payloads are text: the markup shows, nothing is parsed as HTML
    assert "<b>not html</b>" in page.inner_text("#rows tr[data-offset='101']")
    assert page.eval_on_selector_all("#rows b", "x => x.length") == 0
    page.click("#rows tr[data-offset='101']")
    page.wait_for_selector("#drawer pre.json")
    assert '"note": "<b>not html</b>"' in page.inner_text("#drawer pre.json")
    page.screenshot(path=str(shots / "topic.png"))
    page.click("#drawer button.close")
    page.click("#live-pause")
    assert page.inner_text("#live-state") == "paused"
    append(server.db, "tail", [{"n": 200}])
    wait_until(lambda: "1 new while paused" in page.inner_text("#live-note"), 10, "buffering")
    assert len(shown_offsets(page)) == 101
    page.click("#live-pause")
    page.wait_for_selector("#rows tr[data-offset='102']")
    # a hidden tab gives its connection back, and picks up where it left off when shown
    set_visibility(page, "hidden")
    wait_until(lambda: open_streams(server) == 0, 10, "the hidden tab's stream released")
    append(server.db, "tail", [{"n": 300}, {"n": 301}])
    set_visibility(page, "visible")
    page.wait_for_selector("#rows tr[data-offset='104']")
    assert shown_offsets(page) == list(range(104, 0, -1))
    page.click("#live-stop")
    assert page.inner_text("#live-state") == "closed"
    wait_until(lambda: open_streams(server) == 0)
    no_page_errors(page)
    page.context.close()


def test_a_refused_stream_reopens_with_backoff_from_the_last_offset(
    browser: Browser, web_db: Path, servers: list[Server]
) -> None:
    first = append(web_db, "q", [{"n": 0}])
    server = start_server(web_db, "--max-streams", "1")
    servers.append(server)
    holder = signed_in(browser, server)
    holder.goto(server.base + "/topics/q")
    holder.wait_for_selector("#rows tr[data-offset]")
    start_live(holder)
    refused = signed_in(browser, server)
    refused.goto(server.base + "/topics/q")
    refused.wait_for_selector("#rows tr[data-offset]")
    refused.click("#live-toggle")
    refused.wait_for_selector("#live-state[data-state='reconnecting']")  # 503: all taken
    more = append(web_db, "q", [{"n": i} for i in range(1, 4)])
    wait_until(lambda: len(shown_offsets(holder)) == 4, 10, "the holder's rows")
    assert shown_offsets(refused) == first
    holder.context.close()  # gives the one stream back
    refused.wait_for_selector("#live-state[data-state='live']")
    wait_until(lambda: len(shown_offsets(refused)) == 4, 15, "the reopened stream's rows")
    assert shown_offsets(refused) == list(reversed(first + more))
    no_page_errors(refused)
    refused.context.close()


def test_tail_page_across_a_server_restart_shows_exactly_first_to_head(
    browser: Browser, web_db: Path, servers: list[Server]
) -> None:
    append(web_db, "r", [{"n": i} for i in range(5)])
    append(web_db, "other", [{"n": 0}])  # offsets are shared: the topic's are not contiguous
    first = start_server(web_db)
    servers.append(first)
    page = signed_in(browser, first)
    page.goto(first.base + "/topics/r")
    page.wait_for_selector("#rows tr[data-offset='5']")
    start_live(page)
    before = append(web_db, "r", [{"n": i} for i in range(5, 10)])
    wait_until(lambda: len(shown_offsets(page)) == 10, 10, "ten rows")
    assert first.stop(signal.SIGTERM) == 0
    page.wait_for_selector("#live-state[data-state='reconnecting']")
    down = append(web_db, "r", [{"n": i} for i in range(10, 17)])  # while nobody serves
    again = start_server(web_db, port=first.port)
    servers.append(again)
    after = append(web_db, "r", [{"n": i} for i in range(17, 20)])
    wait_until(lambda: len(shown_offsets(page)) >= 20, 30, "every event after the restart")
    page.wait_for_selector("#live-state[data-state='live']")
    shown = shown_offsets(page)
    expected = [1, 2, 3, 4, 5, *before, *down, *after]
    assert sorted(shown) == expected and len(shown) == len(set(shown)), shown
    assert shown == sorted(shown, reverse=True)
    no_page_errors(page)
    page.context.close()


# -- writes from another origin ---------------------------------------------------------------

ATTACK = """<!doctype html><html><body><script>
const target = "%(target)s";
const results = {};
async function attempt(name, fn) {
  try { const r = await fn(); results[name] = r.type === "opaque" ? "opaque" : r.status; }
  catch (e) { results[name] = "blocked: " + e.name; }
}
function form(path, fields) {
  const f = document.createElement("form");
  f.method = "POST"; f.action = target + path; f.target = "sink";
  for (const [k, v] of Object.entries(fields)) {
    const i = document.createElement("input"); i.name = k; i.value = v; f.appendChild(i);
  }
  document.body.appendChild(f); f.submit();
}
const writes = {
  append: ["/api/v1/topics/safe/events", {payload: {stolen: true}}],
  requeue: ["/api/v1/dead-letters/requeue", {all: true, confirm: "all"}],
  purge: ["/api/v1/dead-letters/purge", {all: true, confirm: "all"}],
  reset: ["/api/v1/groups/g/reset", {spec: "earliest", execute: true}],
};
(async () => {
  for (const [name, [path, body]] of Object.entries(writes)) {
    const text = JSON.stringify(body);
    await attempt(name + "-cors-json", () => fetch(target + path, {method: "POST",
      credentials: "include", headers: {"Content-Type": "application/json"}, body: text}));
    await attempt(name + "-no-cors", () => fetch(target + path, {method: "POST", mode: "no-cors",
      credentials: "include", headers: {"Content-Type": "text/plain"}, body: text}));
    form(path, {json: JSON.stringify(body)});
  }
  await attempt("read-info", () => fetch(target + "/api/v1/info", {credentials: "include"}));
  await new Promise((ok) => setTimeout(ok, 500));
  window.results = results;
  document.title = "done";
})();
</script><iframe name="sink"></iframe></body></html>"""


def test_a_second_origin_page_cannot_append_requeue_purge_or_reset(
    browser: Browser, web_db: Path, servers: list[Server]
) -> None:
    offsets = append(web_db, "safe", [{"n": i} for i in range(3)])

    def fail(event: eventlog.Event) -> None:
        raise RuntimeError("no")

    consume(web_db, "g", "safe", fail,
            lambda: _deadletter.dead_letter_counts(_db.Paths.for_db(web_db)).pending == 3
            and group_position(web_db, "g") == offsets[-1])  # fmt: skip
    server = start_server(web_db)
    servers.append(server)
    paths = _db.Paths.for_db(web_db)
    dead_before = paths.deadletter.read_bytes()
    with raw(web_db) as conn:
        positions_before = conn.execute("SELECT * FROM eventlog_group_offsets").fetchall()
    page = signed_in(browser, server)  # the victim is signed in: the cookie would be sent
    body = (ATTACK % {"target": server.base}).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    evil = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=evil.serve_forever, daemon=True)
    thread.start()
    try:
        attacker = page.context.new_page()
        attacker.goto(f"http://127.0.0.1:{evil.server_address[1]}/")
        attacker.wait_for_function("document.title === 'done'")
        results = attacker.evaluate("window.results")
    finally:
        evil.shutdown()
        evil.server_close()
    for name, outcome in results.items():
        assert outcome in ("opaque",) or str(outcome).startswith("blocked"), (name, outcome)
    time.sleep(0.3)  # the form posts are navigations of the iframe; let them land
    with raw(web_db) as conn:
        assert [r[0] for r in conn.execute("SELECT id FROM eventlog_events")] == offsets
        assert conn.execute("SELECT * FROM eventlog_group_offsets").fetchall() == positions_before
        assert conn.execute("SELECT count(*) FROM eventlog_redeliveries").fetchone() == (0,)
    assert paths.deadletter.read_bytes() == dead_before
    log = server.stderr()
    # the requests did reach the server (a same-site page sends the cookie) and were refused
    assert (
        "POST /api/v1/topics/safe/events 403" in log or "POST /api/v1/topics/safe/events 415" in log
    )
    assert " 201 " not in log and "POST /api/v1/dead-letters/purge 200" not in log
    # the same page, same-origin, may write
    assert post_json(page, "/api/v1/topics/safe/events", {"payload": 1}) == 201
    page.context.close()


# -- dead letters, groups ---------------------------------------------------------------------


def test_requeue_button_sends_dead_letters_back_to_their_group(
    browser: Browser, web_db: Path, servers: list[Server], shots: Path
) -> None:
    offsets = append(web_db, "orders", [{"n": i} for i in range(10)])
    poison = {offsets[2], offsets[6]}
    paths = _db.Paths.for_db(web_db)

    def picky(event: eventlog.Event) -> None:
        if event.offset in poison:
            raise ValueError(f"cannot handle {event.offset}")

    consume(web_db, "billing", "orders", picky,
            lambda: _deadletter.dead_letter_counts(paths).pending == 2
            and group_position(web_db, "billing") == offsets[-1])  # fmt: skip
    server = start_server(web_db)
    servers.append(server)
    page = signed_in(browser, server)
    page.goto(server.base + "/dead-letters?group=billing")  # as the group page links it
    page.wait_for_selector("#list tr[data-id]")
    assert len(page.query_selector_all("#list tr[data-id]")) == 2
    assert page.input_value("#f-group") == "billing"
    page.click("#list tr[data-id] >> nth=0")  # the detail, with its traceback
    page.wait_for_selector("#drawer pre.traceback")
    assert "ValueError: cannot handle" in page.inner_text("#drawer pre.traceback")
    page.screenshot(path=str(shots / "dead-letters.png"))
    page.click("#drawer button.close")
    for box in page.query_selector_all("#list tr[data-id] input[type=checkbox]"):
        box.check()
    page.click("#requeue-selected")
    wait_until(lambda: page.eval_on_selector_all(
        "#list tr[data-id] .pill", "x => x.map(p => p.textContent)") == ["requeued"] * 2,
        10, "both rows marked requeued")  # fmt: skip
    handled: list[int] = []
    consume(web_db, "billing", "orders", lambda e: handled.append(e.offset),
            lambda: set(handled) >= poison)  # fmt: skip
    assert sorted(handled) == sorted(poison)  # back to billing, and only those
    no_page_errors(page)
    page.context.close()


def test_reset_dialog_shows_the_plan_and_refuses_a_live_group(
    browser: Browser, web_db: Path, servers: list[Server], shots: Path
) -> None:
    offsets = append(web_db, "r", [{"n": i} for i in range(12)])
    with eventlog.open_sync(web_db) as log:
        _replay.replay(log, "rg", _replay.ResetSpec("latest"), [("r", None)], execute=True)
    member = _members.Membership(_db.Paths.for_db(web_db), "rg")
    server = start_server(web_db)
    servers.append(server)
    page = signed_in(browser, server)
    try:
        member.heartbeat([("r", 0)])
        page.goto(server.base + "/groups/rg")
        page.wait_for_selector("#members td.mono")
        page.click("#reset-open")
        page.select_option("#r-spec", "shift")
        page.fill("#r-value", "-4")
        page.click("#r-plan")
        page.wait_for_selector("#reset-live")
        assert "4 events would be redelivered" in page.inner_text("#reset-plan")
        assert page.is_disabled("#r-execute")
        page.screenshot(path=str(shots / "group.png"))
        forced = {"spec": "earliest", "execute": True}
        assert post_json(page, "/api/v1/groups/rg/reset", forced) == 409
    finally:
        member.close()
    page.click("#r-plan")
    page.wait_for_selector("#reset-live", state="detached")
    page.wait_for_selector("#r-execute:not([disabled])")
    page.click("#r-execute")
    page.wait_for_selector("#reset-plan >> text=applied")
    with raw(web_db) as conn:
        (position,) = conn.execute("SELECT position FROM eventlog_group_offsets WHERE "
                                   "group_name = 'rg'").fetchone()  # fmt: skip
    assert position == offsets[-5]
    no_page_errors(page)
    page.context.close()


def test_read_only_mode_offers_no_writes(
    browser: Browser, web_db: Path, servers: list[Server]
) -> None:
    append(web_db, "ro", [{"n": 1}])
    with eventlog.open_sync(web_db) as log:
        _replay.replay(log, "rog", _replay.ResetSpec("latest"), [("ro", None)], execute=True)
    server = start_server(web_db, "--read-only")
    servers.append(server)
    page = signed_in(browser, server)
    page.wait_for_selector("#ro-pill:not([hidden])")
    page.goto(server.base + "/topics/ro")
    page.wait_for_selector("#rows tr[data-offset='1']")
    assert not page.is_visible("#append-section")
    page.goto(server.base + "/dead-letters")
    page.wait_for_selector("#list table")
    for button in ("#requeue-selected", "#purge-selected", "#requeue-all", "#purge-all"):
        assert not page.is_visible(button), button
    page.goto(server.base + "/groups/rog")
    page.wait_for_selector("#partitions table")
    assert not page.is_visible("#reset-open")
    assert post_json(page, "/api/v1/topics/ro/events", {"payload": 2}) == 405
    no_page_errors(page)
    page.context.close()


def test_screenshots_were_written(shots: Path) -> None:
    names = {p.name for p in shots.glob("*.png")}
    expected = {"overview.png", "topic.png", "groups.png", "group.png", "dead-letters.png",
                "login.png"}  # fmt: skip
    if not expected <= names:
        pytest.skip(f"run with the other e2e tests to get every screenshot; have {sorted(names)}")
    print(json.dumps({"screenshots": str(shots)}))
