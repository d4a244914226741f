"""The demo: real processes appending and consuming, a kill -9, a poison event and a replay.

`run_demo` starts producer and consumer processes (`eventlog._demo_worker`) on one log in a
folder, narrates what happens in short timestamped lines and ends with a table of checks.
Every consumer journals each delivery (one fsynced line per handler call), so deliveries and
duplicates are counted from the journals, not from the library under test. Every wait has a
deadline, and every child is killed on the way out, so the demo cannot hang.

Run it with `python -m eventlog._demo [--dir D] [--quick]` or `eventlog demo`.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

import eventlog

from . import _core, _groups, _sql
from ._demo_worker import POISON_AMOUNT, TOPIC
from ._sync import SyncLog

T = TypeVar("T")

DB_NAME = "demo.db"
POLL_S = 0.05


@dataclass(frozen=True)
class Scenario:
    producers: int = 3
    per_producer: int = 1000  # events each producer appends
    append_batch: int = 20  # events per append_many call
    append_pause: float = 0.04  # seconds between a producer's calls
    partitions: int = 6
    billing_members: int = 3
    billing_work_ms: float = 3.0  # what one billing handler call takes
    batch_size: int = 20  # consumer batch: bounds what a killed member redelivers per lane
    max_attempts: int = 3
    kill_after: float = 0.35  # kill a billing member once it handled this share of events
    budget_s: float = 55.0  # the whole demo, every wait included
    wait_s: float = 20.0  # any single wait
    failover_max_s: float = 5.0

    @property
    def total(self) -> int:
        return self.producers * self.per_producer


NORMAL = Scenario()
QUICK = Scenario(
    per_producer=200,
    append_batch=10,
    append_pause=0.04,
    billing_work_ms=4.0,
    budget_s=28.0,
    wait_s=15.0,
)


class DemoFailure(Exception):
    """A step of the demo did not happen in time, or a child process failed."""


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log_file: IO[bytes]
    journal: Path | None = None
    consumer: bool = False
    stopping: bool = False  # we killed it or asked it to stop: its exit is not a failure

    @property
    def pid(self) -> int:
        return self.proc.pid


@dataclass
class Check:
    what: str
    got: str
    want: str
    ok: bool


@dataclass
class Deliveries:
    """What a group's journals say: every handler call, in the order each process made them."""

    lines: list[dict[str, Any]] = field(default_factory=list)
    # A SIGKILL can cut a write short; that event was not finished, so it is redelivered.
    torn: int = 0

    @property
    def offsets(self) -> set[int]:
        return {int(d["o"]) for d in self.lines}

    @property
    def ok_counts(self) -> Counter[int]:
        return Counter(int(d["o"]) for d in self.lines if d["r"] == "ok")

    @property
    def duplicates(self) -> int:
        return sum(c - 1 for c in self.ok_counts.values())

    def duplicate_partitions(self) -> set[int]:
        counts = self.ok_counts
        return {int(d["p"]) for d in self.lines if counts[int(d["o"])] > 1}

    def in_order(self) -> bool:
        """Per partition and per process, offsets never go back (retries repeat one)."""
        last: dict[tuple[int, int], int] = {}
        for d in self.lines:
            key = (int(d["pid"]), int(d["p"]))
            if int(d["o"]) < last.get(key, 0):
                return False
            last[key] = int(d["o"])
        return True


def read_journals(paths: Iterable[Path]) -> Deliveries:
    found = Deliveries()
    for path in paths:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            continue
        for raw in data.split(b"\n"):
            if not raw.strip():
                continue
            try:
                found.lines.append(json.loads(raw))
            except ValueError:
                found.torn += 1
    return found


def flags(**options: object) -> list[str]:
    """--name value pairs for a worker's command line."""
    return [x for k, v in options.items() for x in (f"--{k.replace('_', '-')}", str(v))]


def lanes_text(partitions: Sequence[int]) -> str:
    return ", ".join(f"{TOPIC}[{p}]" for p in sorted(partitions)) or "nothing"


class Demo:
    def __init__(self, folder: Path, scenario: Scenario, out: IO[str]) -> None:
        self.folder = folder
        self.s = scenario
        self.out = out
        self.db = folder / DB_NAME
        self.t0 = time.monotonic()
        self.deadline = self.t0 + scenario.budget_s
        self.children: list[Child] = []
        self.checks: list[Check] = []
        self.log: SyncLog | None = None

    # -- plumbing -----------------------------------------------------------------------------

    def say(self, message: str) -> None:
        self.out.write(f"[{time.monotonic() - self.t0:5.2f}s] {message}\n")
        self.out.flush()

    def check(self, what: str, got: object, want: str, ok: bool) -> None:
        self.checks.append(Check(what, str(got), want, bool(ok)))

    def wait_until(self, what: str, probe: Callable[[], T | None], limit: float | None = None) -> T:
        """Poll `probe` until it returns something truthy; DemoFailure past the deadline."""
        limit = self.s.wait_s if limit is None else limit
        start = time.monotonic()
        end = min(start + limit, self.deadline)
        while True:
            self.check_children()
            result = probe()
            if result:
                return result
            if time.monotonic() >= end:
                budget = " (the demo's time budget ran out)" if end == self.deadline else ""
                raise DemoFailure(
                    f"gave up after {time.monotonic() - start:.1f}s waiting for {what}{budget}"
                )
            time.sleep(POLL_S)

    def check_children(self) -> None:
        """A consumer that exits on its own (not killed or stopped by us) fails the demo."""
        for child in self.children:
            if child.consumer and not child.stopping and child.proc.poll() is not None:
                raise DemoFailure(
                    f"{child.name} (pid {child.pid}) exited with code "
                    f"{child.proc.returncode}; see {child.log_file.name}"
                )

    def spawn(
        self, name: str, args: list[str], *, journal: Path | None = None, capture: bool = False
    ) -> Child:
        log_file = open(self.folder / f"{name}.log", "wb")  # noqa: SIM115 - closed in stop_all
        env = dict(os.environ)
        # The children import this very eventlog, installed or not.
        root = str(Path(eventlog.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        proc = subprocess.Popen(
            [sys.executable, "-m", "eventlog._demo_worker", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if capture else log_file,
            stderr=log_file,
            env=env,
        )
        child = Child(name, proc, log_file, journal, consumer=args[0] == "consumer")
        self.children.append(child)
        return child

    def spawn_consumer(self, group: str, name: str) -> Child:
        journal = self.folder / f"journal-{name}.jsonl"
        work = self.s.billing_work_ms if group == "billing" else 0.0
        args = flags(
            db=self.db,
            group=group,
            journal=journal,
            work_ms=work,
            batch_size=self.s.batch_size,
            max_attempts=self.s.max_attempts,
        )
        return self.spawn(
            name,
            ["consumer", *args],
            journal=journal,
        )

    def wait_exit(self, child: Child, limit: float) -> int | None:
        try:
            return child.proc.wait(timeout=max(0.1, min(limit, self.deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            return None

    def stop_all(self) -> None:
        """Kill every child still running (the way out of any failure) and close files."""
        for child in self.children:
            if child.proc.poll() is None:
                child.proc.kill()
        for child in self.children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.proc.wait(timeout=5)
            if child.proc.stdout is not None:
                child.proc.stdout.close()
            child.log_file.close()

    # -- looking at the group -----------------------------------------------------------------

    def owners(self, group: str) -> tuple[int, dict[str, tuple[int, list[int]]]]:
        """(live members, {member id: (pid, partitions)}) from the members' heartbeats."""
        assert self.log is not None
        live = [m for m in self.log.group_members(group) if m.alive]
        found: dict[str, tuple[int, list[int]]] = {}
        for member in live:
            note = member.heartbeat or {}
            if "pid" in note:
                found[member.member_id] = (
                    int(note["pid"]),
                    sorted(int(p) for t, p in note.get("lanes", []) if t == TOPIC),
                )
        return len(live), found

    def settled(self, group: str, members: int) -> dict[int, list[int]] | None:
        """{pid: partitions} once `members` live members each hold exactly their share (the
        deterministic split every member computes), else None: a rebalance is under way."""
        count, found = self.owners(group)
        if count != members or len(found) != members:
            return None
        lanes = [(TOPIC, p) for p in range(self.s.partitions)]
        for member_id, (_, owned) in found.items():
            share = _groups.assign(lanes, list(found), member_id)
            if owned != sorted(p for _, p in share):
                return None
        return {pid: owned for pid, owned in found.values()}

    def owners_text(self, found: dict[int, list[int]]) -> str:
        return "; ".join(
            f"pid {pid} has {lanes_text(lanes)}" for pid, lanes in sorted(found.items())
        )

    def lag(self, group: str) -> int | None:
        """Events of the topic after the group's positions (None until it has every lane)."""
        assert self.log is not None
        lanes = [p for p in self.log.group_positions(group) if p.topic == TOPIC]
        if len(lanes) != self.s.partitions:
            return None
        return sum(p.lag for p in lanes)

    def handled(self, group: str) -> int:
        """Distinct events the group's handlers finished, from the journals."""
        return len(read_journals(self.journals(group)).ok_counts)

    def drained(self, group: str) -> bool:
        return self.lag(group) == 0

    def journals(self, prefix: str) -> list[Path]:
        return sorted(self.folder.glob(f"journal-{prefix}*.jsonl"))

    # -- the story ----------------------------------------------------------------------------

    def run(self) -> None:
        s = self.s
        self.say(f"eventlog {eventlog.__version__} demo in {self.folder}")
        self.log = eventlog.open_sync(str(self.db))
        self.log.create_topic(TOPIC, s.partitions)
        self.say(f"created topic {TOPIC!r} with {s.partitions} partitions in {self.db.name}")

        # 1. Two consumer groups, before any event exists.
        billing = [
            self.spawn_consumer("billing", f"billing-{i + 1}") for i in range(s.billing_members)
        ]
        audit = self.spawn_consumer("audit", "audit-1")
        self.say(
            f"started group 'billing' ({s.billing_members} processes: pids "
            f"{', '.join(str(c.pid) for c in billing)}) and group 'audit' (1 process: "
            f"pid {audit.pid})"
        )
        found = self.wait_until(
            "billing to share the partitions", lambda: self.settled("billing", s.billing_members)
        )
        self.wait_until("audit to take the partitions", lambda: self.settled("audit", 1))
        self.say(f"billing split the partitions by flock: {self.owners_text(found)}")

        # 2. Producers, one of them with a poison event.
        poison_producer = 2 if s.producers >= 2 else 1

        def poison_at(producer: int) -> int:
            return s.per_producer // 2 if producer == poison_producer else -1

        producers = [
            self.spawn(
                f"producer-{i}",
                [
                    "producer",
                    *flags(
                        db=self.db,
                        id=i,
                        count=s.per_producer,
                        batch=s.append_batch,
                        pause=s.append_pause,
                        poison_at=poison_at(i),
                    ),
                ],
                capture=True,
            )
            for i in range(1, s.producers + 1)
        ]
        self.say(
            f"started {s.producers} producers (pids {', '.join(str(p.pid) for p in producers)})"
            f": {s.total:,} orders keyed by customer; order p{poison_producer}-"
            f"{s.per_producer // 2:04d} is poison (amount {POISON_AMOUNT!r})"
        )

        # 3. Kill -9 one billing member midway and watch its partitions move.
        victim = billing[1 % len(billing)]
        threshold = int(s.total * s.kill_after)
        handled = self.wait_until(
            f"billing to handle {threshold} events",
            lambda: (n := self.handled("billing")) >= threshold and n,
        )
        now = self.settled("billing", s.billing_members) or {}
        victim_lanes = now.get(victim.pid, [])
        victim.stopping = True
        victim.proc.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        victim.proc.wait(timeout=5)
        self.say(
            f"SIGKILL billing consumer pid {victim.pid} (owned {lanes_text(victim_lanes)}) "
            f"with {handled:,} of {s.total:,} events handled by billing"
        )
        survivors = s.billing_members - 1
        after = self.wait_until(
            "the killed member's partitions to move",
            lambda: self.settled("billing", survivors) if survivors else None,
        )
        failover = time.monotonic() - killed_at
        handover = ", ".join(
            f"{TOPIC}[{p}] -> pid {pid}"
            for pid, lanes in sorted(after.items())
            for p in lanes
            if p in victim_lanes
        )
        self.say(f"failover in {failover:.2f}s: {handover}")
        self.say(f"billing now: {self.owners_text(after)}")

        # 4. Producers finish; both groups drain.
        appended = 0
        poison_offset = None
        bad_producers = []
        for p in producers:
            code = self.wait_exit(p, s.wait_s)
            out = p.proc.stdout.read() if p.proc.stdout and code is not None else b""
            if code != 0:
                bad_producers.append(f"{p.name} exit {code}")
                continue
            result = json.loads(out.decode().strip().splitlines()[-1])
            appended += int(result["appended"])
            if result["poison_offset"] is not None:
                poison_offset = int(result["poison_offset"])
        in_log = [e.offset for e in self.log.read(TOPIC)]
        all_offsets = set(in_log)
        self.say(
            f"producers done: {appended:,} events appended, the log holds {len(in_log):,} "
            f"(poison at offset {poison_offset})"
        )
        self.check(
            "appended",
            f"{len(in_log):,}",
            f"{s.total:,} ({s.producers} producers)",
            not bad_producers and appended == s.total == len(in_log),
        )
        if bad_producers:
            raise DemoFailure("producers failed: " + ", ".join(bad_producers))

        lags: dict[str, int | None] = {}
        for group in ("audit", "billing"):
            self.wait_until(f"group {group} to drain", functools.partial(self.drained, group))
            lags[group] = self.lag(group)
            self.say(f"group {group!r} caught up: lag 0 on all {s.partitions} partitions")

        got_billing = read_journals(self.journals("billing-"))
        if got_billing.duplicates:
            self.say(
                f"billing handled {got_billing.duplicates} events twice, all in "
                f"{lanes_text(sorted(got_billing.duplicate_partitions()))}: pid {victim.pid} "
                f"had handled them but died before committing (at least once)"
            )
        else:
            self.say(f"billing handled no event twice: pid {victim.pid} died between batches")

        listing = self.log.dead_letters()
        self.say(f"{self.log.paths.deadletter.name} holds {len(listing.entries)} dead letters:")
        for entry in listing.entries:
            self.say(
                f"  id {entry.id}: group {entry.group!r}, {entry.topic}"
                f"[{entry.partition}]@{entry.offset} after {entry.attempts} attempts: "
                f"{entry.error_type}: {entry.error_message}"
            )
        dead = {g: [e for e in listing.entries if e.group == g] for g in ("billing", "audit")}

        # 5. Stop the consumers gracefully.
        running = [c for c in [*billing, audit] if c is not victim]
        for child in running:
            child.stopping = True
            child.proc.send_signal(signal.SIGTERM)
        codes = [self.wait_exit(c, 10.0) for c in running]
        clean = sum(1 for code in codes if code == 0)
        self.say(
            f"SIGTERM to {len(running)} consumers: {clean} exited 0"
            + ("" if clean == len(running) else f" (codes {codes})")
        )

        # 6. Replay audit from earliest with one fresh process.
        moved, again = self.reset_to_earliest("audit")
        self.say(
            f"replay (eventlog replay audit --to-earliest --execute): moved group 'audit' "
            f"back on {moved} partitions, {again:,} events to deliver again"
        )
        replay = self.spawn_consumer("audit", "audit-replay")
        started = time.monotonic()
        self.wait_until("the audit replay to drain", lambda: self.lag("audit") == 0)
        replay.stopping = True
        replay.proc.send_signal(signal.SIGTERM)
        code = self.wait_exit(replay, 10.0)
        clean += code == 0
        replayed = read_journals(self.journals("audit-replay"))
        self.say(
            f"audit replay (pid {replay.pid}) re-delivered {len(replayed.offsets):,} events "
            f"in {time.monotonic() - started:.2f}s, exit {code}"
        )
        dead_again = [
            e for e in self.log.dead_letters(group="audit").entries if e not in dead["audit"]
        ]

        # 7. The table's checks, from the journals.
        got_billing = read_journals(self.journals("billing-"))
        got_audit = read_journals(self.journals("audit-1"))
        for group, got in (("billing", got_billing), ("audit", got_audit)):
            missing = len(all_offsets - got.offsets)
            self.check(
                f"delivered, {group}",
                f"{len(got.offsets & all_offsets):,}",
                f"{len(all_offsets):,} (all)",
                missing == 0,
            )
        bound = s.batch_size * len(victim_lanes)
        self.check(
            "duplicates, billing",
            got_billing.duplicates,
            f"<= {bound}, only in {lanes_text(victim_lanes)}",
            got_billing.duplicates <= bound
            and got_billing.duplicate_partitions() <= set(victim_lanes),
        )
        self.check("duplicates, audit", got_audit.duplicates, "0", got_audit.duplicates == 0)
        for group in ("billing", "audit"):
            entries = dead[group]
            self.check(
                f"dead-lettered, {group}",
                len(entries),
                f"1 (the poison, offset {poison_offset})",
                len(entries) == 1 and entries[0].offset == poison_offset,
            )
        for group in ("billing", "audit"):
            self.check(f"lag, {group}", lags[group], "0", lags[group] == 0)
        self.check(
            "failover after kill -9",
            f"{failover:.2f}s",
            f"<= {s.failover_max_s:.0f}s, {len(victim_lanes)} partitions moved",
            failover <= s.failover_max_s and bool(victim_lanes),
        )
        self.check(
            "order per partition, audit",
            "kept" if got_audit.in_order() else "broken",
            "kept",
            got_audit.in_order() and replayed.in_order(),
        )
        self.check(
            "consumers exited 0 on SIGTERM",
            f"{clean}/{len(running) + 1}",
            f"{len(running) + 1}/{len(running) + 1}",
            clean == len(running) + 1,
        )
        self.check(
            "audit replay, re-delivered",
            f"{len(replayed.offsets & all_offsets):,}",
            f"{len(all_offsets):,} (all)",
            replayed.offsets >= all_offsets,
        )
        self.check(
            "audit replay, dead-lettered again",
            len(dead_again),
            "1 (the poison)",
            len(dead_again) == 1 and dead_again[0].offset == poison_offset,
        )

    def reset_to_earliest(self, group: str) -> tuple[int, int]:
        """Move every partition of the group back to the start, as `eventlog replay` does;
        refuses while the group has live members. Returns (partitions, events to redeliver)."""
        assert self.log is not None
        try:
            from . import _replay
        except ImportError:  # an eventlog without the operator tools: the same, by hand
            return self._reset_by_hand(group)
        plan = _replay.replay(self.log, group, _replay.ResetSpec("earliest"), execute=True)
        return sum(1 for lane in plan.lanes if lane.changes), plan.redelivered

    def _reset_by_hand(self, group: str) -> tuple[int, int]:
        assert self.log is not None
        live = [m for m in self.log.group_members(group) if m.alive]
        if live:
            raise DemoFailure(f"group {group!r} still has {len(live)} live members")
        lanes = self.log.run(_core.resolve_lanes_plan(_core.compile_patterns(TOPIC)), "read")

        def plan() -> _core.Plan[int]:
            ts = _core.now_ms()
            for topic, partition in lanes:
                yield _core.Stmt(_sql.SET_GROUP_LANE, (group, topic, partition, 0, ts))
            return len(lanes)

        moved = self.log.run(plan(), "write")
        self.log.notify()
        return moved, self.lag(group) or 0  # the group had drained: its lag is the replay

    # -- the end ------------------------------------------------------------------------------

    def table(self) -> bool:
        rows = [("check", "got", "expected", "")] + [
            (c.what, c.got, c.want, "ok" if c.ok else "FAILED") for c in self.checks
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        self.out.write("\n")
        for i, row in enumerate(rows):
            cells = [row[0].ljust(widths[0]), row[1].rjust(widths[1]), row[2].ljust(widths[2])]
            self.out.write(("  " + "  ".join(cells) + "  " + row[3]).rstrip() + "\n")
            if i == 0:
                self.out.write("  " + "  ".join("-" * w for w in widths) + "  ------\n")
        passed = bool(self.checks) and all(c.ok for c in self.checks)
        self.out.write(
            f"\n{'all checks hold' if passed else 'SOME CHECKS FAILED'} "
            f"({time.monotonic() - self.t0:.1f}s)\n"
        )
        self.out.flush()
        return passed


def run_demo(directory: Path | None, *, quick: bool = False, out: IO[str] | None = None) -> int:
    """Run the demo in `directory` (a fresh temporary folder if None); 0 only if every check
    in its table holds, 1 otherwise, 2 if the folder already holds a demo."""
    out = out if out is not None else sys.stdout
    scenario = QUICK if quick else NORMAL
    temporary = directory is None
    if directory is None:
        folder = Path(tempfile.mkdtemp(prefix="eventlog-demo-"))
    else:
        folder = Path(directory).absolute()
        folder.mkdir(parents=True, exist_ok=True)
        if (folder / DB_NAME).exists() or any(folder.glob("journal-*.jsonl")):
            out.write(f"error: {folder} already holds a demo run; give an empty folder\n")
            return 2
    demo = Demo(folder, scenario, out)
    passed = False
    try:
        try:
            demo.run()
        except DemoFailure as exc:
            demo.say(f"FAILED: {exc}")
            demo.check("every step finished", "no", "yes", False)
        except Exception as exc:  # the demo reports it, then exits 1
            demo.say(f"FAILED: {type(exc).__name__}: {exc}")
            demo.check("every step finished", "no", "yes", False)
        finally:
            demo.stop_all()
            if demo.log is not None:
                demo.log.close()
        passed = demo.table()
    except KeyboardInterrupt:
        demo.stop_all()
        out.write("interrupted\n")
        return 130
    if temporary and passed:
        shutil.rmtree(folder, ignore_errors=True)
    else:
        out.write(
            f"the log, journals and process logs are in {folder}; look around with\n"
            f"  eventlog --db {folder / DB_NAME} groups   (or: dlq list, stats, tail orders)\n"
        )
    return 0 if passed else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m eventlog._demo", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="run in this folder and keep it (default: a temporary folder)",
    )
    parser.add_argument("--quick", action="store_true", help="a smaller, faster scenario")
    args = parser.parse_args(argv)
    return run_demo(args.dir, quick=args.quick)


if __name__ == "__main__":
    sys.exit(main())
