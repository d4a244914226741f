"""Verbs on consumer groups: groups (list, show, delete), replay, and consume (a command
per event)."""

# No `from __future__ import annotations`: typer reads the annotations at runtime.

import json
import signal
import threading
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Annotated, Any

import typer

from .. import _core, _deadletter, _groups, _members, _pipe, _replay, _stats, _times
from .._core import MAX_INT64
from ..errors import EventlogError
from . import CONTEXT, DbOption, JsonOption, _format, _Group, _open, _parse, _settings, _usage, app
from ._format import _ago, _emit, _lane, _note, _summary, _table, _utc

groups_app = typer.Typer(cls=_Group, rich_markup_mode=None, context_settings=CONTEXT)
app.add_typer(groups_app, name="groups")


# -- groups -------------------------------------------------------------------------------------

StaleOption = Annotated[
    float, typer.Option("--stale-after", metavar="SECONDS",
                        help="Warn about a live member whose last heartbeat is older.")
]  # fmt: skip


def _member_json(m: _members.MemberView) -> dict[str, Any]:
    return {"member": m.member_id, "pid": m.pid, "host": m.host, "alive": m.alive,
            "partitions": [[t, p] for t, p in m.lanes],
            "heartbeat_age_s": None if m.heartbeat_age_s is None else
            round(m.heartbeat_age_s, 3), "stale": m.stale}  # fmt: skip


def _position_json(p: Any) -> dict[str, Any]:
    return {"topic": p.topic, "partition": p.partition, "position": p.position,
            "head": p.head, "lag": p.lag, "lag_exact": getattr(p, "exact", True),
            "in_flight": list(p.in_flight) if p.in_flight else None,
            "updated_at_ms": p.updated_at_ms}  # fmt: skip


def _lag_text(positions: Sequence[Any]) -> str:
    total = sum(p.lag for p in positions)
    return ("" if all(getattr(p, "exact", True) for p in positions) else "~") + str(total)


def _show_members(group: str, members: Sequence[_members.MemberView]) -> None:
    live = [m for m in members if m.alive]
    if not live:
        typer.echo("  members: none running")
    else:
        typer.echo("  members:")
        _table(["PID", "HOST", "PARTITIONS", "HEARTBEAT", ""],
               [[m.pid, m.host, " ".join(_lane(t, p) for t, p in m.lanes) or None,
                 _ago(m.heartbeat_age_s), "WARNING: stale heartbeat" if m.stale else ""]
                for m in live], indent="    ")  # fmt: skip
    for m in members:
        if m.stale:
            _note(
                f"warning: member pid {m.pid} of group {group} is alive but its last "
                f"heartbeat was {_ago(m.heartbeat_age_s)}; the process may be stuck"
            )
    gone = len(members) - len(live)
    if gone:
        typer.echo(
            f"  ({gone} stale member file{'s' if gone != 1 else ''} of exited "
            "processes; the next member removes them)"
        )


def _show_positions(positions: Sequence[Any]) -> None:
    if not positions:
        typer.echo("  positions: none yet")
        return
    typer.echo("  positions:")
    _table(["TOPIC", "PARTITION", "POSITION", "HEAD", "LAG", "IN FLIGHT", "UPDATED (UTC)"],
           [[p.topic, p.partition, p.position, p.head,
             ("" if getattr(p, "exact", True) else "~") + str(p.lag),
             f"{p.in_flight[0]}-{p.in_flight[1]}" if p.in_flight else None,
             _utc(p.updated_at_ms)] for p in positions], indent="    ")  # fmt: skip


@groups_app.callback(invoke_without_command=True)
def groups(
    ctx: typer.Context,
    stale_after: StaleOption = _members.STALE_HEARTBEAT_S,
    db: DbOption = None,
    json_: JsonOption = False,
) -> None:
    """List consumer groups: live members (pid, partitions, heartbeat) and lag per partition.

    A member whose lock is held but whose heartbeat is older than --stale-after seconds gets
    a warning: the process exists but may be stuck. Lag is counted up to 10,000 events per
    partition and estimated beyond (marked ~); 'groups show' counts it exactly.

    \b
    Examples:
      eventlog groups
      eventlog groups show billing
      eventlog --json groups | jq '{group, lag}'
    """
    s = _settings(ctx, db, json_)
    if ctx.invoked_subcommand is not None:
        return
    with _open(s) as log:
        names = log.group_names()
        lags = log.run(_stats.lags_plan(), "read")
        views = [(g, _members.member_views(log.paths, g, stale_after),
                  [x for x in lags if x.group == g]) for g in names]  # fmt: skip
    if s.json:
        for g, members, positions in views:
            _emit({"group": g, "lag": sum(p.lag for p in positions),
                   "lag_exact": all(p.exact for p in positions),
                   "members": [_member_json(m) for m in members if m.alive],
                   "stale_member_files": sum(1 for m in members if not m.alive),
                   "positions": [_position_json(p) for p in positions]})  # fmt: skip
        return
    if not names:
        _note("no consumer groups yet")
        return
    for i, (g, members, positions) in enumerate(views):
        if i:
            typer.echo("")
        live = sum(1 for m in members if m.alive)
        typer.echo(f"{g}: {live} live member{'s' if live != 1 else ''}, "
                   f"lag {_lag_text(positions)}")  # fmt: skip
        _show_members(g, members)
        _show_positions(positions)


@groups_app.command("show")
def groups_show(
    ctx: typer.Context,
    group: Annotated[str, typer.Argument(metavar="GROUP")],
    stale_after: StaleOption = _members.STALE_HEARTBEAT_S,
    db: DbOption = None,
    json_: JsonOption = False,
) -> None:
    """One group in detail: members, positions and lag, events being retried, requeued
    dead letters waiting, dead letters in the file.

    \b
    Examples:
      eventlog groups show billing
      eventlog --json groups show billing | jq '.retrying'
    """
    s = _settings(ctx, db, json_)
    with _open(s) as log:
        _groups.check_group_exists(log, group)
        members = _members.member_views(log.paths, group, stale_after)
        positions = log.group_positions(group)
        retrying, redeliveries = log.run(_groups.group_extras_plan(group), "read")
        dead = _deadletter.dead_letter_counts(log.paths).by_group.get(group, 0)
    retry_rows = [{"offset": r[0], "topic": r[1], "partition": r[2], "attempts": r[3],
                   "last_failed_at_ms": r[4], "error_type": r[5], "error_message": r[6]}
                  for r in retrying]  # fmt: skip
    if s.json:
        _emit({"group": group, "lag": sum(p.lag for p in positions), "lag_exact": True,
               "members": [_member_json(m) for m in members if m.alive],
               "stale_member_files": sum(1 for m in members if not m.alive),
               "positions": [_position_json(p) for p in positions],
               "retrying": retry_rows, "requeued_waiting": redeliveries,
               "dead_letters": dead})  # fmt: skip
        return
    live = sum(1 for m in members if m.alive)
    typer.echo(f"{group}: {live} live member{'s' if live != 1 else ''}, "
               f"lag {sum(p.lag for p in positions)}")  # fmt: skip
    _show_members(group, members)
    _show_positions(positions)
    if retry_rows:
        typer.echo("  being retried:")
        _table(["OFFSET", "PARTITION", "ATTEMPTS", "LAST FAILURE (UTC)", "ERROR"],
               [[r["offset"], _lane(r["topic"], r["partition"]), r["attempts"],
                 _utc(r["last_failed_at_ms"]), _summary(r["error_type"], r["error_message"])]
                for r in retry_rows], indent="    ")  # fmt: skip
    typer.echo(f"  requeued dead letters waiting: {redeliveries}")
    typer.echo(
        f"  dead letters in the file: {dead}"
        + (f" (see 'eventlog dlq list --group {group}')" if dead else "")
    )


@groups_app.command("delete")
def groups_delete(
    ctx: typer.Context,
    group: Annotated[str, typer.Argument(metavar="GROUP")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    db: DbOption = None,
    json_: JsonOption = False,
) -> None:
    """Forget a group: its positions, attempts and requeued dead letters waiting.

    Refuses while the group has live members. Asks for confirmation on a terminal unless
    --yes. Its next consumer starts from its `start` setting (earliest by default).

    \b
    Examples:
      eventlog groups delete old-reporting --yes
    """
    s = _settings(ctx, db, json_)
    with _open(s) as log:
        _groups.check_group_exists(log, group)
        if (
            not yes
            and _format._interactive()
            and not typer.confirm(f"Delete group {group} and all its positions?", default=False)
        ):
            raise EventlogError("aborted; nothing deleted", hint="answer y, or pass --yes")
        deleted = log.delete_group(group)
    if s.json:
        _emit({"group": group, "deleted_positions": deleted})
    else:
        typer.echo(f"deleted group {group} ({deleted} position{'s' if deleted != 1 else ''})")


# -- replay -------------------------------------------------------------------------------------


def _scope(values: Sequence[str]) -> list[tuple[str, list[int] | None]]:
    scope: list[tuple[str, list[int] | None]] = []
    for value in values:
        topic, sep, parts = value.partition(":")
        partitions = None
        if sep:
            try:
                partitions = sorted({int(p) for p in parts.split(",")})
            except ValueError:
                raise typer.BadParameter(f"{value!r}: use TOPIC or TOPIC:0,2",
                                         param_hint="--topic") from None  # fmt: skip
        scope.append((topic, partitions))
    return scope


@app.command()
def replay(
    ctx: typer.Context,
    group: Annotated[str, typer.Argument(metavar="GROUP")],
    to_earliest: Annotated[
        bool, typer.Option("--to-earliest", help="The first event still stored.")
    ] = False,
    to_latest: Annotated[bool, typer.Option("--to-latest", help="After the last event.")] = False,
    to_current: Annotated[
        bool, typer.Option("--to-current", help="Where it is (shows lag).")
    ] = False,
    to_offset: Annotated[
        int | None,
        typer.Option(
            "--to-offset", metavar="N", min=0, max=MAX_INT64, help="Deliver from offset N on."
        ),
    ] = None,
    shift_by: Annotated[
        int | None,
        typer.Option(
            "--shift-by",
            metavar="N",
            min=-MAX_INT64,
            max=MAX_INT64,
            help="Move by N events in each partition; negative rewinds.",
        ),
    ] = None,
    to_datetime: Annotated[
        str | None,
        typer.Option(
            "--to-datetime",
            metavar="TIME",
            help="The first event at or after TIME (ISO-8601, UTC unless offset given, or -1h).",
        ),
    ] = None,
    by_duration: Annotated[
        str | None,
        typer.Option(
            "--by-duration", metavar="DURATION", help="The first event of the last DURATION (2h)."
        ),
    ] = None,
    topic: Annotated[
        list[str] | None,
        typer.Option(
            "--topic",
            metavar="TOPIC[:P,P]",
            help="Only this topic (or these partitions of it); repeatable. Default: every "
            "partition the group has a position in.",
        ),
    ] = None,
    execute: Annotated[
        bool, typer.Option("--execute", help="Apply the plan (default: only print it).")
    ] = False,
    wait: Annotated[
        bool, typer.Option("--wait", help="Wait for the group's members to stop.")
    ] = False,
    wait_timeout: Annotated[
        float | None,
        typer.Option("--wait-timeout", metavar="SECONDS", help="Give up waiting after this long."),
    ] = None,
    db: DbOption = None,
    json_: JsonOption = False,
) -> None:
    """Move a group's positions (Kafka's offset reset): print the plan, or apply it.

    By default prints, per topic and partition, the position before and after and how many
    events will be redelivered (or skipped), and changes nothing. --execute applies it; that
    is refused while the group has live members (their pids are named) unless --wait. The
    change is made while holding every partition's lock, so it never races a consumer's
    commit. A position is the last offset the group is done with.

    \b
    Examples:
      eventlog replay billing --to-datetime 2024-05-01T08:00:00        # the plan
      eventlog replay billing --to-datetime 2024-05-01T08:00:00 --execute
      eventlog replay billing --by-duration 2h --topic orders --execute
      eventlog replay billing --shift-by -100 --topic orders:0,2 --execute
      eventlog replay billing --to-latest --execute --wait             # skip the backlog
    """
    s = _settings(ctx, db, json_)
    chosen = [name for name, given in [
        ("--to-earliest", to_earliest), ("--to-latest", to_latest),
        ("--to-current", to_current), ("--to-offset", to_offset is not None),
        ("--shift-by", shift_by is not None), ("--to-datetime", to_datetime is not None),
        ("--by-duration", by_duration is not None)] if given]  # fmt: skip
    if len(chosen) != 1:
        _usage(
            ctx,
            "give exactly one of --to-earliest, --to-latest, --to-current, --to-offset, "
            "--shift-by, --to-datetime, --by-duration"
            + (f" (got {', '.join(chosen)})" if chosen else ""),
        )
    spec: _replay.ResetSpec
    if to_earliest:
        spec = _replay.ResetSpec("earliest")
    elif to_latest:
        spec = _replay.ResetSpec("latest")
    elif to_current:
        spec = _replay.ResetSpec("current")
    elif to_offset is not None:
        spec = _replay.ResetSpec("offset", to_offset)
    elif shift_by is not None:
        spec = _replay.ResetSpec("shift", shift_by)
    elif to_datetime is not None:
        moment = _parse("--to-datetime", _times.parse_time, to_datetime)
        spec = _replay.ResetSpec("datetime", moment)
    else:
        assert by_duration is not None
        length = abs(_parse("--by-duration", _times.parse_duration, by_duration))
        spec = _replay.ResetSpec("datetime", _times.shifted(datetime.now(UTC), -length))
    scope = _scope(topic or [])
    waiting = {"said": False}

    def on_wait(pids: list[str]) -> None:
        if not waiting["said"]:
            _note(f"waiting for the members of {group} to stop"
                  + (f" (pids {', '.join(pids)})" if pids else ""))  # fmt: skip
            waiting["said"] = True

    with _open(s) as log:
        plan = _replay.replay(log, group, spec, scope, execute=execute, wait=wait,
                           wait_timeout=wait_timeout, on_wait=on_wait)  # fmt: skip
        live = [] if execute else _members.live_member_pids(log.paths, group)
    if s.json:
        for lane in plan.lanes:
            _emit({"group": group, "topic": lane.topic, "partition": lane.partition,
                   "before": lane.before, "after": lane.after if lane.after is not None
                   else lane.before, "redelivered": lane.redelivered, "skipped": lane.skipped,
                   "lag_after": lane.lag_after, "executed": plan.executed})  # fmt: skip
        return
    state = "applied" if plan.executed else "dry run, nothing changed"
    typer.echo(f"group {group}, {spec.describe()} ({state}):")
    _table(["TOPIC", "PARTITION", "BEFORE", "AFTER", "REDELIVER", "SKIP", "LAG AFTER"],
           [[ln.topic, ln.partition, ln.before, ln.after if ln.after is not None else ln.before,
             ln.redelivered, ln.skipped, ln.lag_after] for ln in plan.lanes],
           indent="  ")  # fmt: skip
    n = plan.redelivered
    events = f"{n} event{'s' if n != 1 else ''}"
    if plan.executed:
        typer.echo(f"{events} will be redelivered on the group's next run, {plan.skipped} "
                   "skipped.")  # fmt: skip
    else:
        typer.echo(f"{events} would be redelivered, {plan.skipped} skipped.")
    if not plan.executed:
        _note("nothing changed: run again with --execute to apply this plan")
        if live:
            _note(f"note: the group has live members (pids {', '.join(live)}); --execute "
                  "will refuse until they stop (or wait for them with --wait)")  # fmt: skip


# -- consume ------------------------------------------------------------------------------------


@app.command(context_settings={"ignore_unknown_options": True})
def consume(
    ctx: typer.Context,
    group: Annotated[str, typer.Argument(metavar="GROUP")],
    pattern: Annotated[str, typer.Argument(metavar="TOPIC_OR_PATTERN")],
    command: Annotated[
        list[str], typer.Argument(metavar="-- COMMAND [ARGS]...", show_default=False)
    ],
    from_: Annotated[
        str,
        typer.Option(
            "--from",
            metavar="earliest|latest|OFFSET|TIME",
            help="Where to start in partitions the group has no position in yet.",
        ),
    ] = "earliest",
    max_attempts: Annotated[int, typer.Option(min=1, help="Then dead-letter the event.")] = 5,
    timeout: Annotated[
        float | None,
        typer.Option(
            metavar="SECONDS", min=0.001, help="Kill the command after this long (a failure)."
        ),
    ] = None,
    retry_backoff: Annotated[
        float,
        typer.Option(
            metavar="SECONDS", min=0, help="First retry delay; doubles each time, with jitter."
        ),
    ] = 0.2,
    batch_size: Annotated[
        int, typer.Option(min=1, max=10_000, help="Events fetched and committed together.")
    ] = 100,
    db: DbOption = None,
    json_: JsonOption = False,
) -> None:
    """Run COMMAND once per event, the event as one JSON line on its stdin.

    Exit status 0 is success; anything else is a failure, retried with backoff, then
    dead-lettered after --max-attempts, as for any consumer of GROUP. Start several to share
    the partitions. The command also gets EVENTLOG_GROUP, EVENTLOG_TOPIC, EVENTLOG_PARTITION
    and EVENTLOG_OFFSET in its environment. Ctrl-C (or SIGTERM) finishes the event in hand,
    commits and exits 0; a second Ctrl-C stops the command.

    \b
    Examples:
      eventlog consume mailer 'orders.#' -- ./send-mail.sh
      eventlog consume audit orders -- sh -c 'jq -c .payload >> audit.jsonl'
      eventlog consume billing orders --max-attempts 3 --timeout 30 -- python bill.py
    """
    s = _settings(ctx, db, json_)
    start = _parse("--from", _times.parse_start, from_)
    _core.check_name(group, "group")
    _core.check_pattern(pattern)
    handler = _pipe.CommandHandler(command, group, timeout)
    stop = threading.Event()
    presses = 0

    def on_signal(signum: int, frame: Any) -> None:
        nonlocal presses
        presses += 1
        if presses == 1:
            _note("stopping after the event in hand (Ctrl-C again to stop the command)")
            stop.set()
        else:
            handler.interrupt()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with _open(s) as log:
            if not s.json:
                _note(f"consuming {pattern} as group {group}; Ctrl-C to stop")
            log.consume(group, pattern, handler, stop=stop, handle_signals=False, start=start,
                        max_attempts=max_attempts, retry_backoff=retry_backoff,
                        batch_size=batch_size)  # fmt: skip
    finally:
        stop.set()  # ends the library's stop relay thread
        for sig, old in previous.items():
            signal.signal(sig, old)
    summary = {"group": group, "succeeded": handler.succeeded, "failed": handler.failed}
    _note(json.dumps(summary) if s.json else
          f"stopped: {handler.succeeded} succeeded, {handler.failed} failed runs")  # fmt: skip
