"""The command line as real processes: the console script, pipes into `head`, follow and
Ctrl-C, `consume` running a command per event, `replay` against a live consumer, requeued
dead letters reaching one group only, and a backup taken while producers write.

Every wait has a deadline; conditions nothing signals (a position moving, a file filling)
are polled.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import eventlog
from eventlog._db import Paths

CLI = [sys.executable, "-m", "eventlog"]


def run(
    db: Path, *args: Any, timeout: float = 60, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([*CLI, "--db", str(db), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, **kwargs)  # fmt: skip
    assert "Traceback" not in done.stderr, done.stderr
    return done


def rows(done: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def query(db: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(db, isolation_level=None, timeout=10)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def dump(db: Path) -> dict[str, list[tuple[Any, ...]]]:
    conn = sqlite3.connect(db, timeout=10)
    try:
        names = [r[0] for r in conn.execute(
            "SELECT name FROM sqlite_schema WHERE type = 'table' ORDER BY name")]  # fmt: skip
        return {n: sorted(conn.execute(f'SELECT * FROM "{n}"').fetchall(), key=repr)
                for n in names}  # fmt: skip
    finally:
        conn.close()


def positions(db: Path, group: str) -> dict[tuple[str, int], int]:
    found = query(db, "SELECT topic, partition, position FROM eventlog_group_offsets"
                  " WHERE group_name = ?", (group,))  # fmt: skip
    return {(t, p): pos for t, p, pos in found}


def poll(predicate: Callable[[], bool], timeout: float = 30, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


class Proc:
    """A running `eventlog ...` with its output lines arriving through queues."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env)  # fmt: skip
        self.out: queue.Queue[str | None] = queue.Queue()
        self.err_lines: list[str] = []
        self._err_seen = threading.Condition()
        self._threads = [threading.Thread(target=self._pump_out, daemon=True),
                         threading.Thread(target=self._pump_err, daemon=True)]  # fmt: skip
        for t in self._threads:
            t.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _pump_out(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.out.put(line.rstrip("\n"))
        self.out.put(None)

    def _pump_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._err_seen:
                self.err_lines.append(line)
                self._err_seen.notify_all()

    @property
    def err(self) -> str:
        return "".join(self.err_lines)

    def line(self, timeout: float = 30) -> str:
        try:
            line = self.out.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no output for {timeout}s; stderr:\n{self.err}") from None
        assert line is not None, f"ended (exit {self.proc.wait(10)}); stderr:\n{self.err}"
        return line

    def wait_err(self, text: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        with self._err_seen:
            while text not in self.err:
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and text not in self.err):
                    raise AssertionError(f"{text!r} not on stderr:\n{self.err}")
                self._err_seen.wait(min(left, 0.2))

    def interrupt(self, timeout: float = 30) -> int:
        """Ctrl-C, then wait for the exit; returns the exit status."""
        self.proc.send_signal(signal.SIGINT)
        return self.wait(timeout)

    def wait(self, timeout: float = 30) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"did not exit; stderr:\n{self.err}") from None
        self._join()
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        self.proc.wait(30)
        self._join()

    def _join(self) -> None:
        for t in self._threads:
            t.join(10)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def start() -> Iterator[Callable[..., Proc]]:
    """Starts `eventlog --db DB ARGS...`; kills and reaps whatever is left at teardown."""
    started: list[Proc] = []

    def launch(db: Path, *args: Any, env: dict[str, str] | None = None) -> Proc:
        proc = Proc([*CLI, "--db", str(db), *map(str, args)],
                    env={**os.environ, **(env or {})})  # fmt: skip
        started.append(proc)
        return proc

    yield launch
    for proc in started:
        proc.kill()


# A command for `consume`: records "offset n" of each event in $OUT, fails on payload n ==
# $FAIL_N while the file $FAIL_FLAG exists.
RECORDER = textwrap.dedent("""
    import json, os, sys
    event = json.loads(sys.stdin.read())
    assert os.environ["EVENTLOG_OFFSET"] == str(event["offset"])
    n = event["payload"].get("n")
    if os.path.exists(os.environ.get("FAIL_FLAG", "/nonexistent")) and n == int(
            os.environ.get("FAIL_N", "-1")):
        print(f"cannot handle n={n}", file=sys.stderr)
        sys.exit(3)
    with open(os.environ["OUT"], "a") as f:
        f.write(f"{event['offset']} {n}\\n")
""")


@pytest.fixture
def recorder(tmp_path: Path) -> Path:
    path = tmp_path / "recorder.py"
    path.write_text(RECORDER)
    return path


def recorded(path: Path) -> list[int]:
    if not path.exists():
        return []
    return [int(line.split()[0]) for line in path.read_text().splitlines()]


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "app.db"
    with eventlog.open_sync(path) as log:
        log.append_many([eventlog.Draft("orders", {"n": i}) for i in range(1, 11)])
    return path


# -- the console script -----------------------------------------------------------------------


def test_the_console_script_and_python_m(db: Path) -> None:
    script = Path(sys.executable).parent / "eventlog"
    if script.exists():
        done = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and "replay" in done.stdout, done.stderr
    done = subprocess.run([*CLI, "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("eventlog "), done.stderr
    missing = run(db.with_name("missing.db"), "topics")
    assert missing.returncode == 1
    assert missing.stderr.startswith("error: no database at") and "hint:" in missing.stderr
    usage = run(db, "replay")
    assert usage.returncode == 2


# -- pipes, follow, Ctrl-C --------------------------------------------------------------------


def test_tail_into_head_ends_quietly(db: Path) -> None:
    with eventlog.open_sync(db) as log:
        log.append_many([eventlog.Draft("orders", {"n": i, "pad": "x" * 100})
                         for i in range(3000)])  # fmt: skip
    done = subprocess.run(
        ["bash", "-c", 'set -o pipefail; "$@" | head -n 2', "sh", *CLI, "--db", str(db),
         "--json", "tail", "orders", "--from", "earliest"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and done.stderr == ""
    assert [json.loads(line)["offset"] for line in done.stdout.splitlines()] == [1, 2]


def test_tail_follow_prints_new_events_until_ctrl_c(db: Path, start: Callable[..., Proc]) -> None:
    tail = start(db, "--json", "tail", "orders", "-f", "-n", "1")
    assert json.loads(tail.line())["offset"] == 10
    with eventlog.open_sync(db) as log:
        log.append("orders", {"n": 11})
    event = json.loads(tail.line())
    assert (event["offset"], event["payload"]) == (11, {"n": 11})
    assert tail.interrupt() == 0
    assert "Traceback" not in tail.err


# -- consume --------------------------------------------------------------------------------------


def test_consume_runs_the_command_per_event_and_dead_letters_failures(
    db: Path, tmp_path: Path, recorder: Path, start: Callable[..., Proc]
) -> None:
    out, flag = tmp_path / "out.txt", tmp_path / "fail"
    flag.touch()
    consumer = start(db, "consume", "billing", "orders", "--max-attempts", "2",
                     "--retry-backoff", "0.01", "--", sys.executable, recorder,
                     env={"OUT": str(out), "FAIL_FLAG": str(flag), "FAIL_N": "3"})  # fmt: skip
    poll(lambda: positions(db, "billing").get(("orders", 0)) == 10, what="billing to finish")
    assert consumer.interrupt() == 0
    assert "stopped: 9 succeeded, 2 failed" in consumer.err
    assert "cannot handle n=3" in consumer.err  # the command's stderr comes through
    assert recorded(out) == [1, 2, 4, 5, 6, 7, 8, 9, 10]
    (dead,) = rows(run(db, "--json", "dlq", "list"))
    assert (dead["group"], dead["offset"], dead["attempts"]) == ("billing", 3, 2)
    assert dead["error_type"] == "CommandFailed" and "exited with 3" in dead["error_message"]
    assert "cannot handle n=3" in dead["error_message"]


def test_consume_bad_input(db: Path) -> None:
    done = run(db, "consume", "billing", "orders", "--", "no-such-command-anywhere")
    assert done.returncode == 1 and "command not found" in done.stderr
    assert run(db, "consume", "billing", "orders").returncode == 2
    assert run(db, "consume", "bad..group", "orders", "--", "true").returncode == 1
    assert run(db, "consume", "billing", "orders", "--from", "soon", "--", "true").returncode == 2


# -- replay against live consumers ----------------------------------------------------------------


def test_replay_refuses_a_live_consumer_then_redelivers_exactly_the_plan(
    db: Path, tmp_path: Path, recorder: Path, start: Callable[..., Proc]
) -> None:
    first_out = tmp_path / "first.txt"
    consumer = start(db, "consume", "billing", "orders", "--", sys.executable, recorder,
                     env={"OUT": str(first_out)})  # fmt: skip
    poll(lambda: positions(db, "billing").get(("orders", 0)) == 10, what="billing to finish")

    refused = run(db, "replay", "billing", "--shift-by", "-4", "--execute")
    assert refused.returncode == 1
    assert f"pids {consumer.pid}" in refused.stderr and "hint:" in refused.stderr

    before = dump(db)
    (plan,) = rows(run(db, "--json", "replay", "billing", "--shift-by", "-4"))
    assert (plan["before"], plan["after"], plan["redelivered"]) == (10, 6, 4)
    assert dump(db) == before  # the plan changes nothing

    # --wait: applies once the consumer stopped, never while it runs
    waiting = start(db, "--json", "replay", "billing", "--shift-by", "-4", "--execute", "--wait")
    waiting.wait_err("waiting for the members of billing")
    assert positions(db, "billing")[("orders", 0)] == 10
    assert consumer.interrupt() == 0
    assert waiting.wait() == 0, waiting.err
    applied = json.loads(waiting.line())
    assert (applied["before"], applied["after"], applied["executed"]) == (10, 6, True)
    assert positions(db, "billing")[("orders", 0)] == 6

    again_out = tmp_path / "again.txt"
    again = start(db, "--json", "consume", "billing", "orders", "--", sys.executable, recorder,
                  env={"OUT": str(again_out)})  # fmt: skip
    poll(lambda: positions(db, "billing").get(("orders", 0)) == 10, what="the replay")
    assert again.interrupt() == 0
    summary = json.loads(again.err.strip().splitlines()[-1])
    assert summary == {"group": "billing", "succeeded": 4, "failed": 0}
    assert recorded(again_out) == [7, 8, 9, 10]  # exactly the planned range
    assert recorded(first_out) == list(range(1, 11))


# -- requeue reaches one group only ------------------------------------------------------------


def test_requeued_dead_letter_goes_to_its_group_only(
    db: Path, tmp_path: Path, recorder: Path, start: Callable[..., Proc]
) -> None:
    flag = tmp_path / "fail"
    flag.touch()
    outs = {g: tmp_path / f"{g}.txt" for g in ("billing", "audit")}

    def consumers() -> list[Proc]:
        return [start(db, "consume", g, "orders", "--max-attempts", "1", "--", sys.executable,
                      recorder, env={"OUT": str(outs[g]), "FAIL_FLAG": str(flag),
                                     "FAIL_N": "4" if g == "billing" else "-1"})
                for g in ("billing", "audit")]  # fmt: skip

    running = consumers()
    for g in ("billing", "audit"):
        poll(lambda g=g: positions(db, g).get(("orders", 0)) == 10, what=f"{g} to finish")
    assert all(p.interrupt() == 0 for p in running)
    assert recorded(outs["billing"]) == [1, 2, 3, 5, 6, 7, 8, 9, 10]
    assert recorded(outs["audit"]) == list(range(1, 11))
    (dead,) = rows(run(db, "--json", "dlq", "list"))
    assert (dead["group"], dead["offset"]) == ("billing", 4)

    flag.unlink()  # the bug is fixed
    (requeued,) = rows(run(db, "--json", "dlq", "requeue", "--group", "billing"))
    assert requeued["id"] == dead["id"]
    assert query(db, "SELECT group_name, event_offset FROM eventlog_redeliveries") == [
        ("billing", 4)]  # fmt: skip
    with eventlog.open_sync(db) as log:
        marker = log.append("orders", {"n": 11})
    for path in outs.values():
        path.unlink()

    running = consumers()
    poll(lambda: sorted(recorded(outs["billing"])) == [4, marker], what="billing's redelivery")
    poll(lambda: recorded(outs["audit"]) == [marker], what="audit's marker")
    poll(lambda: not query(db, "SELECT * FROM eventlog_redeliveries"), what="redelivery done")
    assert all(p.interrupt() == 0 for p in running)
    assert recorded(outs["audit"]) == [marker]  # the requeued event went to billing only
    assert rows(run(db, "--json", "dlq", "list"))[0]["requeued"] is True


# -- backup while writing --------------------------------------------------------------------------

PRODUCER = textwrap.dedent("""
    import sys, eventlog
    with eventlog.open_sync(sys.argv[1], durability="normal") as log:
        batches = 0
        while True:
            log.append_many([eventlog.Draft("clicks", {"pad": "y" * 200, "i": i})
                             for i in range(200)])
            batches += 1
            if batches == 5:
                print("ready", flush=True)
""")


def test_backup_during_concurrent_appends_opens_and_passes_doctor(db: Path, tmp_path: Path) -> None:
    with eventlog.open_sync(db) as log:
        log.append_many([eventlog.Draft("clicks", {"pad": "x" * 200, "i": i})
                         for i in range(40_000)])  # fmt: skip
    producer = Proc([sys.executable, "-c", PRODUCER, str(db)])
    try:
        assert producer.line() == "ready"
        dest = tmp_path / "copy.db"
        (result,) = rows(run(db, "--json", "backup", dest))
        assert result["pages"] > 1024  # several steps of the backup API, writes in between
        head_then = query(db, "SELECT max(id) FROM eventlog_events")[0][0]
    finally:
        producer.kill()
    assert "Traceback" not in producer.err
    doctor = run(dest, "--json", "doctor")
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert all(r["status"] != "fail" for r in rows(doctor))
    (stats,) = rows(run(dest, "--json", "stats"))
    stored = query(dest, "SELECT count(*), max(id) FROM eventlog_events")[0]
    assert stats["events"] == stored[0] >= 40_000
    assert stored[1] == stats["head"] <= head_then  # one snapshot: no event beyond its head
    assert stored[0] == stored[1]  # gap-free: a whole number of committed batches
    assert Paths.for_db(dest).sidecar.is_dir()
