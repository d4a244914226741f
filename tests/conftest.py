"""Shared fixtures and helpers.

Guarantee tests are written once, as async tests on `log`: for "async" it is an AsyncLog,
for "sync" a SyncLog driven from one dedicated worker thread behind the same coroutine
interface. Outcomes are checked with plain sqlite3 (`raw`, `dump`, `integrity`), never only
through eventlog. Child processes go through `spawn`, which kills and reaps whatever a test
leaves running.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import json
import os
import queue
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

import eventlog
from eventlog import _deadletter

TESTS = Path(__file__).parent
CHILD = TESTS / "procs" / "child.py"

# A shell starts a background job with SIGINT ignored, and children inherit an ignored signal
# through exec: a suite run with `&` would start every child deaf to the Ctrl-C a test sends.
# A handled signal is reset to its default in the child instead.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# -- the sqlite3 oracle -----------------------------------------------------------------------


@contextlib.contextmanager
def raw(db_path: str | os.PathLike[str], *, timeout: float = 5.0) -> Iterator[sqlite3.Connection]:
    """A plain sqlite3 connection (autocommit), closed on exit."""
    conn = sqlite3.connect(db_path, isolation_level=None, timeout=timeout)
    try:
        yield conn
    finally:
        conn.close()


def sql(db_path: str | os.PathLike[str], query: str, params: tuple[Any, ...] = ()) -> list[Any]:
    """The rows of one statement, through a plain connection."""
    with raw(db_path) as conn:
        return conn.execute(query, params).fetchall()


def dead_letter_entry(**fields: Any) -> _deadletter.DeadLetter:
    """A dead-letter entry as a consumer writes one; `fields` override the defaults."""
    base: dict[str, Any] = {
        "id": _deadletter.new_id(), "group": "billing", "topic": "orders", "partition": 0,
        "offset": 1, "key": None, "payload": {"n": 1}, "headers": {},
        "event_time_ms": 1_700_000_000_000, "attempts": 3, "first_failed_at_ms": None,
        "last_failed_at_ms": None, "error_type": "ValueError", "error_message": "bad",
        "traceback": "Traceback ...", "dead_lettered_at_ms": int(time.time() * 1000),
    }  # fmt: skip
    base.update(fields)
    return _deadletter.DeadLetter(**base)


def dump(db_path: str | os.PathLike[str]) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every eventlog_ table, in a stable order."""
    with raw(db_path) as conn:
        names = [
            r[0]
            for r in conn.execute(
                "SELECT name FROM sqlite_schema WHERE type = 'table'"
                " AND name LIKE 'eventlog!_%' ESCAPE '!'"
                " ORDER BY name"
            )
        ]
        return {n: sorted(conn.execute(f'SELECT * FROM "{n}"').fetchall(), key=repr) for n in names}


def integrity(db_path: str | os.PathLike[str]) -> list[str]:
    with raw(db_path) as conn:
        return [r[0] for r in conn.execute("PRAGMA integrity_check")]


def events_by_offset(db_path: str | os.PathLike[str]) -> dict[int, tuple[Any, ...]]:
    """offset -> (topic, partition, key, payload as JSON value, headers text, dedupe_key)."""
    with raw(db_path) as conn:
        rows = conn.execute(
            "SELECT id, topic, partition, key, payload, headers, dedupe_key FROM eventlog_events"
        ).fetchall()
    return {r[0]: (r[1], r[2], r[3], json.loads(r[4]), r[5], r[6]) for r in rows}


async def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    """Poll a condition with a deadline (for conditions nothing signals, like a file appearing)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        await asyncio.sleep(0.005)


# -- the `log` fixture ------------------------------------------------------------------------


class SyncProxy:
    """A SyncLog whose every call runs on one dedicated worker thread, awaited from the test.

    Mirrors AsyncLog: coroutine methods, `read` returning an async iterator (validated at call
    time, like AsyncLog.read), asyncio.Event for `stop`/`cancel` bridged to threading.Event.
    """

    flavor = "sync"

    def __init__(self, executor: ThreadPoolExecutor, sync: eventlog.SyncLog) -> None:
        self._executor = executor
        self.sync = sync
        self.paths = sync.paths
        self._iterators: set[_ThreadIterator] = set()

    @classmethod
    async def open(cls, path: str | os.PathLike[str], **options: Any) -> SyncProxy:
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="synclog")
        try:
            sync = await asyncio.get_running_loop().run_in_executor(
                executor, functools.partial(eventlog.open_sync, path, **options)
            )
        except BaseException:
            executor.shutdown(wait=True)
            raise
        return cls(executor, sync)

    async def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self._executor._shutdown:  # type: ignore[attr-defined]
            return fn(*args, **kwargs)  # closed: the SyncLog raises LogClosed at once
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, functools.partial(fn, *args, **kwargs)
        )

    async def append(self, *args: Any, **kwargs: Any) -> int:
        return await self.call(self.sync.append, *args, **kwargs)

    async def append_many(self, drafts: Any) -> list[int]:
        return await self.call(self.sync.append_many, drafts)

    async def create_topic(self, *args: Any, **kwargs: Any) -> bool:
        return await self.call(self.sync.create_topic, *args, **kwargs)

    async def head(self) -> int:
        return await self.call(self.sync.head)

    async def topics(self) -> list[eventlog.TopicInfo]:
        return await self.call(self.sync.topics)

    async def get(self, offset: int) -> eventlog.Event | None:
        return await self.call(self.sync.get, offset)

    async def checkpoint(self) -> tuple[int, int, int]:
        return await self.call(self.sync.checkpoint)

    def notify(self) -> None:
        self.sync.notify()

    def read(
        self, topics: Any, *, stop: asyncio.Event | None = None, **kwargs: Any
    ) -> _ThreadIterator:
        thread_stop = threading.Event() if stop is not None else None
        iterator = self.sync.read(topics, stop=thread_stop, **kwargs)
        it = _ThreadIterator(self, iterator, stop, thread_stop, chunked=not kwargs.get("follow"))
        self._iterators.add(it)
        return it

    async def wait_for(
        self, topics: Any, *, cancel: asyncio.Event | None = None, **kwargs: Any
    ) -> eventlog.WaitResult:
        thread_cancel = threading.Event() if cancel is not None else None
        bridge = _bridge(cancel, thread_cancel)
        try:
            return await self.call(self.sync.wait_for, topics, cancel=thread_cancel, **kwargs)
        finally:
            if bridge is not None:
                bridge.cancel()

    async def close(self) -> None:
        if self._executor._shutdown:  # type: ignore[attr-defined]
            return  # closed already: like AsyncLog.close, safe twice
        for it in list(self._iterators):
            await it.aclose()
        try:
            await self.call(self.sync.close)
        finally:
            self._executor.shutdown(wait=True)


def _bridge(
    source: asyncio.Event | None, target: threading.Event | None
) -> asyncio.Task[None] | None:
    if source is None or target is None:
        return None

    async def forward() -> None:
        await source.wait()
        target.set()

    return asyncio.ensure_future(forward())


class _ThreadIterator:
    """Pulls a SyncLog iterator on the proxy's thread: in chunks when it cannot block (not
    following), one event per hop when following (a chunk would wait for more events)."""

    CHUNK = 512

    def __init__(
        self,
        proxy: SyncProxy,
        iterator: Iterator[eventlog.Event],
        stop: asyncio.Event | None,
        thread_stop: threading.Event | None,
        *,
        chunked: bool,
    ) -> None:
        self._proxy = proxy
        self._iterator = iterator
        self._n = self.CHUNK if chunked else 1
        self._buffer: deque[eventlog.Event] = deque()
        self._exhausted = False
        self._closed = False
        self._bridge = _bridge(stop, thread_stop)

    def __aiter__(self) -> _ThreadIterator:
        return self

    def _pull(self) -> tuple[list[eventlog.Event], bool]:
        items: list[eventlog.Event] = []
        while len(items) < self._n:
            try:
                items.append(next(self._iterator))
            except StopIteration:
                return items, True
        return items, False

    async def __anext__(self) -> eventlog.Event:
        if not self._buffer:
            if self._exhausted or self._closed:
                raise StopAsyncIteration
            items, self._exhausted = await self._proxy.call(self._pull)
            self._buffer.extend(items)
            if not self._buffer:
                await self.aclose()
                raise StopAsyncIteration
        return self._buffer.popleft()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bridge is not None:
            self._bridge.cancel()
        self._proxy._iterators.discard(self)
        # The waiter's connection belongs to the worker thread: close the generator there.
        await self._proxy.call(self._iterator.close)  # type: ignore[attr-defined]


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "app.db"


@pytest.fixture(params=["async", "sync"])
def flavor(request: pytest.FixtureRequest) -> str:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
async def open_log(flavor: str, db_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """Opens logs of the test's flavor (`await open_log(path=None, **options)`); closes them
    all at teardown."""
    opened: list[Any] = []

    async def opener(path: str | os.PathLike[str] | None = None, **options: Any) -> Any:
        target = db_path if path is None else path
        if flavor == "async":
            log: Any = await eventlog.open(target, **options)
        else:
            log = await SyncProxy.open(target, **options)
        opened.append(log)
        return log

    yield opener
    for log in reversed(opened):
        await log.close()


@pytest.fixture
def durability() -> str:
    """The `log` fixture's durability; a test overrides it with
    @pytest.mark.parametrize("durability", [...]) (the async shell commits on the loop
    thread at "normal" and on its worker thread at "full": two paths to cover)."""
    return "full"


@pytest.fixture
async def log(open_log: Callable[..., Any], durability: str) -> Any:
    return await open_log(durability=durability)


async def collect(iterator: Any, n: int | None = None, timeout: float = 10.0) -> list[Any]:
    """Take n events (or all, when n is None) from an async iterator, with a deadline; closes
    the iterator."""
    out: list[Any] = []

    async def take() -> None:
        async for item in iterator:
            out.append(item)
            if n is not None and len(out) >= n:
                return

    try:
        await asyncio.wait_for(take(), timeout)
    finally:
        await iterator.aclose()
    return out


# -- leaks ------------------------------------------------------------------------------------


def _fds_under(folder: Path) -> set[tuple[int, str]]:
    found = set()
    prefix = os.fspath(folder.resolve())
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if target.startswith(prefix):
            found.add((int(name), target))
    return found


@pytest.fixture(autouse=True)
def no_leaked_handles(tmp_path: Path) -> Iterator[None]:
    """A descriptor left open on a file under tmp_path, or a thread left running, fails the
    test."""
    threads_before = set(threading.enumerate())
    fds_before = _fds_under(tmp_path)
    yield
    deadline = time.monotonic() + 10
    for thread in set(threading.enumerate()) - threads_before:
        thread.join(max(0.0, deadline - time.monotonic()))
    if _fds_under(tmp_path) - fds_before:
        gc.collect()  # only then: a full collection costs tens of milliseconds per test
    leaked_threads = [t.name for t in set(threading.enumerate()) - threads_before]
    leaked_fds = _fds_under(tmp_path) - fds_before
    assert not leaked_fds, f"descriptors left open: {leaked_fds}"
    assert not leaked_threads, f"threads left running: {leaked_threads}"


# -- child processes --------------------------------------------------------------------------


class Child:
    """A running `tests/procs/child.py`: lines from its stdout arrive through a queue, so a
    chatty child never blocks on a full pipe and every read has a deadline."""

    def __init__(self, *args: Any, env: dict[str, str] | None = None) -> None:
        self.args = [os.fspath(a) if isinstance(a, Path) else str(a) for a in args]
        self.proc = subprocess.Popen(
            [sys.executable, os.fspath(CHILD), *self.args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
            env=env,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._stderr: list[str] = []
        self._readers = [
            threading.Thread(target=self._pump_stdout, daemon=True),
            threading.Thread(target=self._pump_stderr, daemon=True),
        ]
        for reader in self._readers:
            reader.start()
        self._eof = False

    def _pump_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def _pump_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._stderr.append(line)

    @property
    def stderr(self) -> str:
        return "".join(self._stderr)

    def line(self, timeout: float = 20.0) -> str:
        if self._eof:
            raise AssertionError(f"child {self.args} already ended; stderr:\n{self.stderr}")
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(
                f"child {self.args} printed nothing for {timeout}s; stderr:\n{self.stderr}"
            ) from None
        if line is None:
            self._eof = True
            self.proc.wait(timeout=10)
            raise AssertionError(
                f"child {self.args} ended (exit {self.proc.returncode}); stderr:\n{self.stderr}"
            )
        return line

    def json(self, timeout: float = 20.0) -> Any:
        line = self.line(timeout)
        try:
            return json.loads(line)
        except ValueError:
            raise AssertionError(f"child printed {line!r}; stderr:\n{self.stderr}") from None

    def wait_ready(self, timeout: float = 30.0) -> None:
        line = self.line(timeout)
        assert line == "ready", f"expected 'ready', got {line!r}; stderr:\n{self.stderr}"

    def send(self, obj: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((obj if isinstance(obj, str) else json.dumps(obj)) + "\n")
        self.proc.stdin.flush()

    def request(self, obj: Any, timeout: float = 20.0) -> Any:
        self.send(obj)
        return self.json(timeout)

    def rest(self, timeout: float = 60.0) -> list[str]:
        """Every line until the child closes stdout (it is about to exit)."""
        lines = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(
                    f"child {self.args} still running after {timeout}s; stderr:\n{self.stderr}"
                ) from None
            if line is None:
                self._eof = True
                return lines
            lines.append(line)

    def finish(self, timeout: float = 60.0) -> int:
        """Close stdin, wait for the exit, reap; returns the exit code."""
        with contextlib.suppress(OSError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"child {self.args} did not exit; stderr:\n{self.stderr}"
            ) from None
        self._join()
        return code

    def kill(self) -> None:
        """SIGKILL and reap."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self._join()

    def _join(self) -> None:
        for reader in self._readers:
            reader.join(timeout=10)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


@pytest.fixture
def spawn() -> Iterator[Callable[..., Child]]:
    """Starts `tests/procs/child.py ARGS...`; kills and reaps every child at teardown."""
    children: list[Child] = []

    def start(*args: Any, env: dict[str, str] | None = None) -> Child:
        child = Child(*args, env=env)
        children.append(child)
        return child

    yield start
    for child in children:
        child.kill()


def cli(db: Path, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[str]:
    """`python -m eventlog --db DB ARGS` with no terminal and no EVENTLOG_DB; never a traceback."""
    env = {k: v for k, v in os.environ.items() if k != "EVENTLOG_DB"}
    proc = subprocess.run(
        [sys.executable, "-m", "eventlog", "--db", str(db), *args], input=stdin,
        capture_output=True, timeout=60, env=env, cwd=db.parent,
    )  # fmt: skip
    out = subprocess.CompletedProcess(
        proc.args, proc.returncode, proc.stdout.decode("utf-8", "replace"),
        proc.stderr.decode("utf-8", "replace"),
    )  # fmt: skip
    assert "Traceback" not in out.stderr and "Traceback" not in out.stdout, out.stderr
    return out
