"""Health checks (`eventlog doctor`): integrity, schema version, offsets, WAL size, the
dead-letter file, stale members and heartbeats, and group lag. Any "fail" means something is
wrong; each check carries a hint saying what to do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from . import _core, _deadletter, _members, _sql
from ._core import Plan, Stmt
from ._schema import latest_schema_version, schema_version_plan
from ._stats import file_sizes, human_bytes, stats_plan

if TYPE_CHECKING:
    from ._sync import SyncLog

Status = Literal["ok", "warn", "fail"]
WAL_WARN_BYTES = 64 << 20  # journal_size_limit: a WAL past it was not reset by checkpoints
LAG_WARN = 10_000


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    hint: str = ""


def _integrity_plan(quick: bool) -> Plan[list[str]]:
    rows = yield Stmt(_sql.QUICK_CHECK if quick else _sql.INTEGRITY_CHECK)
    return [str(r[0]) for r in rows]


def _offsets_plan() -> Plan[tuple[int, int | None, list[tuple[str, int]]]]:
    """The head, the largest stored offset, and each topic's counted_through."""
    head = yield from _core.head_plan()
    top = (yield Stmt(_sql.MAX_EVENT_ID))[0][0]
    topics = [(str(r[0]), int(r[4])) for r in (yield Stmt(_sql.LIST_TOPICS))]
    return head, top, topics


def doctor(
    log: SyncLog,
    *,
    quick: bool = False,
    lag_warn: int = LAG_WARN,
    stale_after_s: float = _members.STALE_HEARTBEAT_S,
) -> list[Check]:
    """Health checks; any "fail" means something is wrong (see each check's hint)."""
    checks: list[Check] = []
    problems = log.run(_integrity_plan(quick), "read")
    what = "quick check" if quick else "integrity check"
    if problems == ["ok"]:
        checks.append(Check("integrity", "ok", f"{what} passed"))
    else:
        checks.append(Check("integrity", "fail", f"{what}: " + "; ".join(problems[:5]),
                            "restore from a backup ('eventlog backup' makes one)"))  # fmt: skip

    version = log.run(schema_version_plan(), "read")
    latest = latest_schema_version()
    if version == latest:
        checks.append(Check("schema", "ok", f"version {version}"))
    else:
        checks.append(Check("schema", "fail", f"version {version}, this eventlog has {latest}",
                            "run 'eventlog migrate'"))  # fmt: skip

    head, top, topics = log.run(_offsets_plan(), "read")
    behind = [name for name, counted in topics if counted > head]
    if (top is not None and int(top) > head) or behind:
        checks.append(Check("offsets", "fail",
                            f"the offset counter ({head}) is behind stored events",
                            "offsets could be reused; restore from a backup"))  # fmt: skip
    else:
        checks.append(Check("offsets", "ok", f"head offset {head}"))

    wal = file_sizes(log.paths)["wal"]
    if wal > WAL_WARN_BYTES:
        checks.append(
            Check(
                "wal",
                "warn",
                f"WAL is {human_bytes(wal)}",
                "run 'eventlog checkpoint'; look for a reader that never finishes",
            )
        )
    else:
        checks.append(Check("wal", "ok", f"WAL is {human_bytes(wal)}"))

    listing = _deadletter.DeadLetterFile(log.paths).read()
    if listing.bad_lines:
        lines = ", ".join(map(str, listing.bad_lines[:10]))
        checks.append(
            Check(
                "dead letters",
                "fail",
                f"{log.paths.deadletter} has unreadable lines: {lines}",
                "inspect those lines; requeue and purge keep them as they are",
            )
        )
    elif listing.torn_tail:
        checks.append(Check("dead letters", "warn",
                            f"{log.paths.deadletter} ends in a torn line (a crash mid-write)",
                            "harmless: the next dead letter starts on a new line"))  # fmt: skip
    else:
        pending = sum(1 for e in listing.entries if not e.requeued)
        status: Status = "warn" if pending else "ok"
        checks.append(
            Check(
                "dead letters",
                status,
                f"{pending} waiting, {len(listing.entries) - pending} requeued",
                "inspect them with 'eventlog dlq list'" if pending else "",
            )
        )

    for group in log.group_names():
        for m in _members.member_views(log.paths, group, stale_after_s):
            who = f"member {m.member_id} of group {group!r}"
            if not m.alive:
                checks.append(
                    Check(
                        "members",
                        "warn",
                        f"{who} left a stale member file",
                        "harmless: the group's next member removes it",
                    )
                )
            elif m.stale:
                age = "never" if m.heartbeat_age_s is None else f"{m.heartbeat_age_s:.0f}s ago"
                checks.append(Check("members", "warn",
                                    f"{who} (pid {m.pid}) is alive, last heartbeat {age}",
                                    "the process may be stuck; inspect it, or kill it so its "
                                    "partitions move"))  # fmt: skip
    if not any(c.name == "members" for c in checks):
        checks.append(Check("members", "ok", "no stale member files or heartbeats"))

    _, _, _, lags = log.run(stats_plan(_core.now_ms()), "read")
    per_group: dict[str, int] = {}
    for lag in lags:
        per_group[lag.group] = per_group.get(lag.group, 0) + lag.lag
    behind_groups = {g: n for g, n in per_group.items() if n >= lag_warn}
    for group, n in sorted(behind_groups.items()):
        checks.append(
            Check(
                "lag",
                "warn",
                f"group {group!r} is {n} events behind",
                "start more consumers, or check 'eventlog groups show " + group + "'",
            )
        )
    if not behind_groups:
        n = len(per_group)
        checks.append(Check("lag", "ok", f"{n} group{'s' if n != 1 else ''}, none "
                            f"{lag_warn}+ behind"))  # fmt: skip
    return checks
