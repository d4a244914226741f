#!/usr/bin/env python3
"""The crash suite: producers and two consumer groups on one database, killed and restarted
at random, then drained and checked against their own fsynced journals.

    python scripts/chaos.py                      # 60 s, prints a table, exit 1 on a violation
    python scripts/chaos.py --duration 20 --json # the short CI form, one JSON object
    python scripts/chaos.py --dir /tmp/ch --seed 7   # keep the files, replay the same kills

What runs (see scripts/_chaos_worker.py for each process):
- P producers append events with a unique id (also their dedupe_key), a key and a per-key
  sequence number, and journal (id, offset) only after `append` returned. Half of them use
  the sync API (`append`, `append_many`), half the async one (concurrent appends, group
  commit).
- For each of two groups, C consumers journal every delivery (group, offset, id, pid) before
  their handler does anything else. Some events are poison: their handler raises, or calls
  os._exit (the process dies every time it touches one); max_attempts is small.
- A killer sends SIGKILL (sometimes SIGTERM) to a random worker at random moments; a
  supervisor restarts every worker that ended, whatever the cause.
- A monitor samples eventlog_group_offsets with plain sqlite3 (read-only, one short
  statement, no transaction held) several times a second and counts positions that went
  backwards, and the WAL size.

At the end the killer stops, producers are asked to stop (SIGTERM), consumers run until every
group's position reaches the head of every lane, then get SIGTERM. The checks, per group:
every acknowledged append is in the log at its acknowledged offset (zero lost), no event is
stored twice, every non-poison event was delivered, the dead-lettered events are exactly the
poison ones, first deliveries of each key come in sequence order, no position ever went
backwards, and the file passes PRAGMA integrity_check. Duplicate deliveries are allowed (at
least once) and reported with their rate.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _chaos_worker as worker  # noqa: E402

import eventlog  # noqa: E402

GROUPS = ("billing", "shipping")


@dataclass
class Slot:
    """One worker seat: restarted in place whenever its process ends."""

    name: str
    role: str
    argv: list[str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    started: int = 0
    restart: bool = True
    pids: list[int] = field(default_factory=list)


@dataclass
class Tally:
    sigkill: int = 0
    sigterm: int = 0
    sigterm_slow: int = 0  # SIGTERMed workers that had to be SIGKILLed after a deadline
    poison_exits: int = 0
    commit_crashes: int = 0
    clean_exits: int = 0
    unexpected_exits: list[str] = field(default_factory=list)
    killed_pids: set[int] = field(default_factory=set)
    termed_pids: set[int] = field(default_factory=set)
    backwards: int = 0
    backwards_max: int = 0
    backwards_seen: list[str] = field(default_factory=list)
    samples: int = 0
    wal_max: int = 0


class Chaos:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.dir = workdir
        self.db = workdir / "chaos.db"
        self.rng = random.Random(args.seed)
        self.tally = Tally()
        self.lock = threading.Lock()
        self.slots: list[Slot] = []
        self.stop_killing = threading.Event()
        self.stop_all = threading.Event()
        self.say = (
            (lambda *a: print(*a, file=sys.stderr, flush=True))
            if not args.quiet
            else (lambda *a: None)
        )

    # -- workers ------------------------------------------------------------------------------

    def setup(self) -> None:
        with eventlog.open_sync(self.db) as log:
            log.create_topic(worker.TOPIC, self.args.partitions)
        a = self.args
        py = [sys.executable, str(HERE / "_chaos_worker.py")]
        common = ["--db", str(self.db), "--durability", a.durability]
        for i in range(a.producers):
            self.slots.append(Slot(
                f"producer-{i}", "producer",
                [*py, "producer", "--slot", str(i), "--journal",
                      str(self.dir / f"producer-{i}.jsonl"),
                      "--mode", "sync" if i % 2 == 0 else "async", "--rate", str(a.rate),
                      "--raise-rate", str(a.raise_rate), "--exit-rate", str(a.exit_rate),
                      "--crash-after-commit", str(a.crash_after_commit),
                      *common],
                self.dir / f"producer-{i}.log",
            ))  # fmt: skip
        for group in GROUPS[: a.groups]:
            for i in range(a.consumers):
                self.slots.append(Slot(
                    f"{group}-{i}", "consumer",
                    [*py, "consumer", "--group", group, "--slot", str(i), "--journal",
                     str(self.dir / f"consumer-{group}-{i}.jsonl"),
                     "--max-attempts", str(a.max_attempts), *common,
                     *(["--batch"] if i % 2 == 1 else [])],
                    self.dir / f"{group}-{i}.log",
                ))  # fmt: skip

    def start(self, slot: Slot) -> None:
        with open(slot.log_path, "ab") as err:
            slot.proc = subprocess.Popen(
                slot.argv, stdout=err, stderr=err, stdin=subprocess.DEVNULL
            )
        slot.started += 1
        slot.pids.append(slot.proc.pid)

    def supervise(self) -> None:
        """Reap every worker that ended, classify why, and start it again."""
        while not self.stop_all.is_set():
            for slot in self.slots:
                with self.lock:
                    proc = slot.proc
                    if proc is None or proc.poll() is None:
                        continue
                    code = proc.returncode
                    if code == -signal.SIGKILL and proc.pid in self.tally.killed_pids:
                        pass
                    elif code == -signal.SIGTERM and proc.pid in self.tally.termed_pids:
                        pass  # SIGTERMed before it installed its handler (still starting)
                    elif code == worker.POISON_EXIT and slot.role == "consumer":
                        self.tally.poison_exits += 1
                    elif code == worker.CRASH_AFTER_COMMIT and slot.role == "producer":
                        self.tally.commit_crashes += 1
                    elif code == 0:
                        self.tally.clean_exits += 1
                    else:
                        tail = _tail(slot.log_path)
                        self.tally.unexpected_exits.append(
                            f"{slot.name} pid {proc.pid} exit {code}: {tail}"
                        )
                    slot.proc = None
                    if slot.restart and not self.stop_all.is_set():
                        self.start(slot)
            time.sleep(0.02)

    def kill_loop(self) -> None:
        lo, hi = self.args.kill_interval
        while not self.stop_killing.wait(self.rng.uniform(lo, hi)):
            with self.lock:
                live = [s for s in self.slots if s.proc is not None and s.proc.poll() is None]
                if not live:
                    continue
                slot = self.rng.choice(live)
                proc = slot.proc
                assert proc is not None
                if self.rng.random() < self.args.sigterm_share:
                    self.tally.sigterm += 1
                    self.tally.termed_pids.add(proc.pid)
                    proc.send_signal(signal.SIGTERM)
                    threading.Thread(target=self._bound_sigterm, args=(proc,), daemon=True).start()
                else:
                    self.tally.sigkill += 1
                    self.tally.killed_pids.add(proc.pid)
                    proc.kill()

    def _bound_sigterm(self, proc: subprocess.Popen[bytes]) -> None:
        try:
            proc.wait(self.args.sigterm_grace)
        except subprocess.TimeoutExpired:
            with self.lock:
                self.tally.sigterm_slow += 1
                self.tally.killed_pids.add(proc.pid)
                proc.kill()

    # -- monitor ------------------------------------------------------------------------------

    def monitor(self) -> None:
        """Sample committed positions; a position must never decrease."""
        seen: dict[tuple[str, str, int], int] = {}
        uri = f"{self.db.as_uri()}?mode=ro"
        wal = Path(str(self.db) + "-wal")
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=5)
        try:
            while not self.stop_all.wait(self.args.sample_interval):
                try:
                    rows = conn.execute(
                        "SELECT group_name, topic, partition, position FROM eventlog_group_offsets"
                    ).fetchall()  # autocommit: the read transaction ends with the statement
                except sqlite3.Error:
                    continue
                self.tally.samples += 1
                for group, topic, partition, position in rows:
                    lane = (group, topic, partition)
                    before = seen.get(lane)
                    if before is not None and position < before:
                        self.tally.backwards += 1
                        self.tally.backwards_max = max(self.tally.backwards_max, before - position)
                        self.tally.backwards_seen.append(f"{lane}: {before} -> {position}")
                    seen[lane] = max(position, before or 0)
                with contextlib.suppress(FileNotFoundError):
                    self.tally.wal_max = max(self.tally.wal_max, wal.stat().st_size)
        finally:
            conn.close()

    # -- phases -------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        a = self.args
        self.setup()
        for slot in self.slots:
            self.start(slot)
        threads = [threading.Thread(target=f, daemon=True)
                   for f in (self.supervise, self.monitor)]  # fmt: skip
        killer = threading.Thread(target=self.kill_loop, daemon=True)
        for t in threads:
            t.start()
        t0 = time.monotonic()
        self.say(f"chaos: {len(self.slots)} workers for {a.duration:g}s in {self.dir}")
        killer.start()
        time.sleep(a.duration)
        self.stop_killing.set()
        killer.join()
        chaos_s = time.monotonic() - t0

        # Producers stop for good (they finish the window in hand and journal it).
        producers = [s for s in self.slots if s.role == "producer"]
        with self.lock:
            for s in producers:
                s.restart = False
                if s.proc is not None and s.proc.poll() is None:
                    self.tally.termed_pids.add(s.proc.pid)
                    s.proc.send_signal(signal.SIGTERM)
        for s in producers:
            _wait_exit(s, 20)
        self.say(f"chaos: producers stopped after {time.monotonic() - t0:.1f}s; draining")

        drained, drain_s = self.drain(a.drain_timeout)
        consumers = [s for s in self.slots if s.role == "consumer"]
        with self.lock:
            for s in consumers:
                s.restart = False
                if s.proc is not None and s.proc.poll() is None:
                    self.tally.termed_pids.add(s.proc.pid)
                    s.proc.send_signal(signal.SIGTERM)
        stuck = [s.name for s in consumers if not _wait_exit(s, 20)]
        time.sleep(0.1)  # let the supervisor classify the last exits
        self.stop_all.set()
        for t in threads:
            t.join(10)
        for s in self.slots:  # reap what the supervisor no longer saw
            if s.proc is not None and s.proc.poll() is None:
                s.proc.kill()
                s.proc.wait(10)
        return self.check(chaos_s, drained, drain_s, stuck)

    def drain(self, timeout: float) -> tuple[bool, float]:
        """Wait until every group's position reached the last event of every lane."""
        t0 = time.monotonic()
        deadline = t0 + timeout
        conn = sqlite3.connect(f"{self.db.as_uri()}?mode=ro", uri=True, isolation_level=None)
        try:
            while time.monotonic() < deadline:
                heads = {
                    (t, p): h
                    for t, p, h in conn.execute(
                        "SELECT topic, partition, max(id) FROM eventlog_events GROUP BY 1, 2"
                    )
                }
                positions = {
                    (g, t, p): pos
                    for g, t, p, pos in conn.execute(
                        "SELECT group_name, topic, partition, position FROM eventlog_group_offsets"
                    )
                }
                done = all(
                    positions.get((g, t, p), -1) >= h
                    for g in GROUPS[: self.args.groups]
                    for (t, p), h in heads.items()
                )
                if done:
                    return True, time.monotonic() - t0
                time.sleep(0.1)
        finally:
            conn.close()
        return False, time.monotonic() - t0

    # -- checks -------------------------------------------------------------------------------

    def check(
        self, chaos_s: float, drained: bool, drain_s: float, stuck: list[str]
    ) -> dict[str, Any]:
        a = self.args
        groups = list(GROUPS[: a.groups])
        conn = sqlite3.connect(f"{self.db.as_uri()}?mode=ro", uri=True, isolation_level=None)
        try:
            integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
            log_rows = conn.execute(
                "SELECT id, partition, key, payload, dedupe_key FROM eventlog_events"
            ).fetchall()
            positions = conn.execute(
                "SELECT group_name, topic, partition, position FROM eventlog_group_offsets"
            ).fetchall()
            leftover_attempts = conn.execute("SELECT count(*) FROM eventlog_attempts").fetchone()[0]
        finally:
            conn.close()
        wal = Path(str(self.db) + "-wal")
        wal_final = wal.stat().st_size if wal.exists() else 0

        # The log, as stored
        by_id: dict[str, list[int]] = defaultdict(list)
        events: dict[int, dict[str, Any]] = {}
        corrupt_in_log = 0
        for offset, partition, key, payload, dedupe_key in log_rows:
            p = json.loads(payload)
            body = {k: v for k, v in p.items() if k != "sum"}
            if (
                p.get("sum") != worker.body_checksum(body)
                or dedupe_key != p["id"]
                or key != p["key"]
            ):
                corrupt_in_log += 1
            by_id[p["id"]].append(offset)
            events[offset] = {"id": p["id"], "key": key, "seq": p["seq"], "poison": p["poison"],
                              "partition": partition}  # fmt: skip
        stored_twice = sum(1 for offsets in by_id.values() if len(offsets) > 1)
        poison = {o for o, e in events.items() if e["poison"]}
        innocent = set(events) - poison

        # Acknowledged appends (producer journals)
        acked: dict[str, int] = {}
        retried = 0
        for i in range(a.producers):
            for r in worker.read_journal(self.dir / f"producer-{i}.jsonl"):
                acked[r["id"]] = r["o"]
                retried += r.get("r", 0)
        lost = sorted(i for i, o in acked.items() if o not in by_id.get(i, []))
        unjournaled = len(by_id) - sum(1 for i in acked if i in by_id)

        # Deliveries (consumer journals) and dead letters
        deliveries: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for path in sorted(self.dir.glob("consumer-*.jsonl")):
            for r in worker.read_journal(path):
                deliveries[r["g"]].append(r)
        dead = [json.loads(line) for line in _lines(Path(str(self.db) + ".deadletter.jsonl"))]

        per_group: dict[str, dict[str, Any]] = {}
        for g in groups:
            recs = sorted(deliveries.get(g, []), key=lambda r: r["t"])
            first: dict[int, dict[str, Any]] = {}
            count: Counter[int] = Counter()
            damaged = 0
            for r in recs:
                count[r["o"]] += 1
                first.setdefault(r["o"], r)
                if not r["ok"] or r["o"] not in events or events[r["o"]]["id"] != r["id"]:
                    damaged += 1
            # per-key order among first deliveries, in the order they happened
            order_violations = 0
            highest: dict[str, int] = {}
            for r in sorted(first.values(), key=lambda r: r["t"]):
                k = r["k"]
                if k in highest and r["s"] < highest[k]:
                    order_violations += 1
                highest[k] = max(highest.get(k, -1), r["s"])
            delivered = set(first) & set(events)
            missing = sorted(innocent - delivered)
            dups = sum(c - 1 for o, c in count.items() if o in innocent)
            dl = [d for d in dead if d.get("group") == g]
            dl_offsets = Counter(d["offset"] for d in dl)
            dl_set = set(dl_offsets)
            extra = sorted(dl_set - poison)
            # An innocent event is charged for a crash while it was in hand, like a poison one;
            # only the killer's SIGKILLs landing on it max_attempts times over can do that.
            excused = [
                o for o in extra
                if {r["pid"] for r in recs if r["o"] == o} <= self.tally.killed_pids
                and all(d["error_type"] == "ProcessDied" for d in dl if d["offset"] == o)
            ]  # fmt: skip
            pos = {(t, p): v for gg, t, p, v in positions if gg == g}
            heads: dict[tuple[str, int], int] = {}
            for o, e in events.items():
                lane = (worker.TOPIC, e["partition"])
                heads[lane] = max(heads.get(lane, 0), o)
            at_head = all(pos.get(lane, -1) >= h for lane, h in heads.items())
            per_group[g] = {
                "delivered": len(delivered & innocent),
                "innocent_events": len(innocent),
                "not_delivered": len(missing),
                "not_delivered_sample": missing[:10],
                "poison_events": len(poison),
                "dead_lettered": len(dl_set),
                "dead_letter_lines": len(dl),
                "dead_letter_duplicates": len(dl) - len(dl_set),
                "poison_not_dead_lettered": sorted(poison - dl_set)[:10],
                "innocent_dead_lettered": [o for o in extra if o not in excused],
                "innocent_dead_lettered_by_kills": excused,
                "deliveries": len(recs),
                "duplicate_deliveries": dups,
                "duplicate_rate": dups / max(1, len(delivered & innocent)),
                "order_violations": order_violations,
                "damaged_deliveries": damaged,
                "positions_at_head": at_head,
            }

        summary = {
            "duration_s": round(chaos_s, 1),
            "drain_s": round(drain_s, 1),
            "drained": drained,
            "producers": a.producers,
            "consumers_per_group": a.consumers,
            "partitions": a.partitions,
            "max_attempts": a.max_attempts,
            "seed": a.seed,
            "acknowledged": len(acked),
            "acknowledged_present": len(acked) - len(lost),
            "lost": len(lost),
            "lost_sample": lost[:10],
            "events_in_log": len(events),
            "acked_but_unjournaled": unjournaled,
            "appends_retried_after_crash": retried,
            "producer_crashes_after_commit": self.tally.commit_crashes,
            "stored_twice": stored_twice,
            "corrupt_in_log": corrupt_in_log,
            "kills_sigkill": self.tally.sigkill,
            "kills_sigterm": self.tally.sigterm,
            "sigterm_needed_sigkill": self.tally.sigterm_slow,
            "poison_exits": self.tally.poison_exits,
            "restarts": sum(s.started - 1 for s in self.slots),
            "unexpected_exits": self.tally.unexpected_exits,
            "consumers_not_stopping": stuck,
            "position_samples": self.tally.samples,
            "positions_backwards": self.tally.backwards,
            "positions_backwards_max": self.tally.backwards_max,
            "positions_backwards_sample": self.tally.backwards_seen[:10],
            "leftover_attempt_rows": leftover_attempts,
            "wal_bytes_final": wal_final,
            "wal_bytes_max": self.tally.wal_max,
            "integrity_check": integrity,
            "groups": per_group,
        }
        summary["violations"] = violations(summary)
        return summary


def violations(s: dict[str, Any]) -> list[str]:
    out = []

    def need(ok: bool, what: str) -> None:
        if not ok:
            out.append(what)

    need(s["lost"] == 0, f"{s['lost']} acknowledged appends missing from the log")
    need(s["stored_twice"] == 0, f"{s['stored_twice']} events stored twice despite dedupe_key")
    need(
        s["corrupt_in_log"] == 0, f"{s['corrupt_in_log']} stored events do not match what was sent"
    )
    need(s["drained"], "the groups did not reach the head before the drain deadline")
    need(
        s["positions_backwards"] == 0, f"positions went backwards {s['positions_backwards']} times"
    )
    need(s["integrity_check"] == "ok", f"integrity_check: {s['integrity_check']}")
    need(not s["unexpected_exits"], f"{len(s['unexpected_exits'])} workers exited unexpectedly")
    need(
        not s["consumers_not_stopping"], f"consumers ignored SIGTERM: {s['consumers_not_stopping']}"
    )
    need(s["sigterm_needed_sigkill"] == 0,
         f"{s['sigterm_needed_sigkill']} workers did not stop on SIGTERM in time")  # fmt: skip
    need(s["acknowledged"] > 0, "no append was acknowledged")
    for g, r in s["groups"].items():
        need(r["not_delivered"] == 0, f"{g}: {r['not_delivered']} events never delivered")
        need(not r["poison_not_dead_lettered"], f"{g}: poison events not dead-lettered")
        need(not r["innocent_dead_lettered"],
             f"{g}: innocent events dead-lettered: {r['innocent_dead_lettered']}")  # fmt: skip
        need(r["order_violations"] == 0, f"{g}: {r['order_violations']} per-key order violations")
        need(r["damaged_deliveries"] == 0, f"{g}: {r['damaged_deliveries']} damaged deliveries")
        need(r["positions_at_head"], f"{g}: final positions short of the head")
    return out


def table(s: dict[str, Any]) -> str:
    """The human report: the log's figures, then one column per group."""
    groups = list(s["groups"])
    kills = (
        f"{s['kills_sigkill']} SIGKILL, {s['kills_sigterm']} SIGTERM, "
        f"{s['poison_exits']} poison exits, {s['producer_crashes_after_commit']} after-commit"
    )
    log_rows: list[tuple[str, Any, str]] = [
        ("acknowledged appends", s["acknowledged"], ""),
        ("  present in the log", s["acknowledged_present"], "must be all"),
        ("  lost", s["lost"], "must be 0"),
        ("  retried after a producer died", s["appends_retried_after_crash"], "same dedupe_key"),
        ("events in the log", s["events_in_log"], ""),
        ("  acked but unjournaled", s["acked_but_unjournaled"], "allowed"),
        ("  stored twice", s["stored_twice"], "must be 0"),
        ("  not as sent", s["corrupt_in_log"], "must be 0"),
        ("kills survived", kills, ""),
        ("restarts", s["restarts"], ""),
        ("unexpected exits", len(s["unexpected_exits"]), "must be 0"),
        ("positions going backwards", f"{s['positions_backwards']} (max "
         f"{s['positions_backwards_max']}, {s['position_samples']} samples)", "must be 0"),
        ("WAL size final / max", f"{_mib(s['wal_bytes_final'])} / {_mib(s['wal_bytes_max'])}", ""),
        ("integrity_check", s["integrity_check"], "must be ok"),
    ]  # fmt: skip
    group_rows: list[tuple[str, str, Any, str]] = [
        ("non-poison events", "innocent_events", str, ""),
        ("  delivered at least once", "delivered", str, "must be all"),
        ("poison events", "poison_events", str, ""),
        ("  dead-lettered (distinct)", "dead_lettered", str, "must be exactly the poison"),
        ("  dead-letter duplicate lines", "dead_letter_duplicates", str, "allowed"),
        ("  innocent dead-lettered", "innocent_dead_lettered", len, "must be 0"),
        ("  innocent, SIGKILLed max_attempts x", "innocent_dead_lettered_by_kills", len,
         "allowed (attempt rule)"),
        ("per-key order violations", "order_violations", str, "must be 0"),
        ("duplicate deliveries", "duplicate_deliveries", str, "allowed (at least once)"),
        ("  duplicate rate", "duplicate_rate", lambda v: f"{v:.2%}", ""),
        ("damaged deliveries", "damaged_deliveries", str, "must be 0"),
        ("positions at head after drain", "positions_at_head", str, "must be True"),
    ]  # fmt: skip
    width = max(len(r[0]) for r in [*log_rows, *group_rows])
    value_w = max(len(str(r[1])) for r in log_rows)
    lines = [
        f"chaos: {s['duration_s']}s of kills, drained in {s['drain_s']}s; "
        f"{s['producers']} producers, {s['consumers_per_group']} consumers per group, "
        f"{s['partitions']} partitions, max_attempts {s['max_attempts']}, seed {s['seed']}",
        "",
        f"{'the log'.ljust(width)}  {'value'.ljust(value_w)}  rule",
        f"{'-' * width}  {'-' * value_w}  {'-' * 10}",
    ]
    for label, value, rule in log_rows:
        lines.append(f"{label.ljust(width)}  {str(value).ljust(value_w)}  {rule}".rstrip())
    cells = [[str(fmt(s["groups"][g][key])) for g in groups] for _, key, fmt, _ in group_rows]
    col_w = [max(len(g), *(len(c[i]) for c in cells)) for i, g in enumerate(groups)]
    lines += [
        "",
        "  ".join([f"{'per group'.ljust(width)}", *(g.ljust(w) for g, w in zip(groups, col_w,
                   strict=True)), "rule"]),
        "  ".join(["-" * width, *("-" * w for w in col_w), "-" * 10]),
    ]  # fmt: skip
    for (label, _, _, rule), row in zip(group_rows, cells, strict=True):
        values = [v.ljust(w) for v, w in zip(row, col_w, strict=True)]
        lines.append("  ".join([label.ljust(width), *values, rule]).rstrip())
    lines.append("")
    if s["violations"]:
        lines.append("FAILED:")
        lines += [f"  - {v}" for v in s["violations"]]
        for e in s["unexpected_exits"][:5]:
            lines.append(f"    {e}")
        for g, r in s["groups"].items():
            if r["not_delivered_sample"]:
                lines.append(f"    {g} not delivered: {r['not_delivered_sample']}")
        if s["lost_sample"]:
            lines.append(f"    lost: {s['lost_sample']}")
        if s["positions_backwards_sample"]:
            lines.append(f"    backwards: {s['positions_backwards_sample']}")
        lines.append(f"    reproduce: python scripts/chaos.py --seed {s['seed']} "
                     f"--duration {s['duration_s']:g}")  # fmt: skip
    else:
        lines.append("OK: nothing acknowledged was lost, nothing was skipped, poison ended.")
    return "\n".join(lines)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _tail(path: Path, n: int = 600) -> str:
    try:
        data = path.read_bytes()[-n:]
    except OSError:
        return ""
    return data.decode("utf-8", "replace").strip().replace("\n", " | ")


def _lines(path: Path) -> list[bytes]:
    try:
        content = path.read_bytes()
    except FileNotFoundError:
        return []
    out = []
    for raw in content.split(b"\n"):
        if raw.strip():
            try:
                json.loads(raw)
                out.append(raw)
            except ValueError:
                pass
    return out


def _wait_exit(slot: Slot, timeout: float) -> bool:
    proc = slot.proc
    if proc is None:
        return True
    try:
        proc.wait(timeout)
        return True
    except subprocess.TimeoutExpired:
        return False


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="eventlog crash suite: kill producers and consumers at random, then "
        "check nothing acknowledged was lost, nothing skipped, poison ended.",
    )
    p.add_argument("--duration", type=float, default=60.0, help="seconds of kills (default 60)")
    p.add_argument("--producers", type=int, default=2)
    p.add_argument("--consumers", type=int, default=2, help="consumer processes per group")
    p.add_argument("--groups", type=int, default=2, choices=[1, 2])
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--rate", type=float, default=150.0, help="events/s per producer")
    p.add_argument("--raise-rate", type=float, default=0.004, help="share of events that raise")
    p.add_argument("--exit-rate", type=float, default=0.001,
                   help="share of events whose handler calls os._exit")  # fmt: skip
    p.add_argument("--crash-after-commit", type=float, default=0.01,
                   help="chance per window of 8 that a producer dies after its commit and "
                   "before its journal line (then retries with the same dedupe keys)")  # fmt: skip
    p.add_argument("--max-attempts", type=int, default=3)
    p.add_argument("--kill-interval", type=float, nargs=2, default=(0.3, 1.2),
                   metavar=("MIN", "MAX"), help="seconds between kills, uniform")  # fmt: skip
    p.add_argument("--sigterm-share", type=float, default=0.15)
    p.add_argument("--sigterm-grace", type=float, default=15.0)
    p.add_argument("--sample-interval", type=float, default=0.2)
    p.add_argument("--drain-timeout", type=float, default=60.0)
    p.add_argument("--durability", choices=["full", "normal"], default="full")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dir", type=Path, help="work here and keep the files (default: a temp dir)")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    args = p.parse_args(argv)
    if args.seed is None:
        args.seed = random.randrange(1_000_000)
    if args.duration <= 0 or args.producers < 1 or args.consumers < 1 or args.partitions < 1:
        p.error("duration, producers, consumers and partitions must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
        if any(args.dir.iterdir()):
            print(f"error: {args.dir} is not empty", file=sys.stderr)
            return 2
        summary = Chaos(args, args.dir).run()
    else:
        with tempfile.TemporaryDirectory(prefix="eventlog-chaos-") as tmp:
            summary = Chaos(args, Path(tmp)).run()
    if args.json:
        print(json.dumps(summary, indent=None))
    else:
        print(table(summary))
    return 1 if summary["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
