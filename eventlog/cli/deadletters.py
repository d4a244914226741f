"""Verbs on dead letters: dlq list, show, requeue and purge."""

# No `from __future__ import annotations`: typer reads the annotations at runtime.

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

from .. import _times
from ..errors import EventlogError
from . import (
    CONTEXT,
    DbOption,
    DryRun,
    JsonOption,
    Settings,
    _format,
    _Group,
    _open,
    _parse,
    _settings,
    _usage,
    app,
)
from ._format import _cell, _emit, _lane, _note, _summary, _table, _utc, _while_running

dlq_app = typer.Typer(cls=_Group, rich_markup_mode=None, context_settings=CONTEXT,
                      no_args_is_help=True)  # fmt: skip
app.add_typer(dlq_app, name="dlq")


def _dead_row_json(e: Any) -> dict[str, Any]:
    return {"id": e.id, "group": e.group, "topic": e.topic, "partition": e.partition,
            "offset": e.offset, "key": e.key, "attempts": e.attempts,
            "error_type": e.error_type, "error_message": e.error_message,
            "dead_lettered_at_ms": e.dead_lettered_at_ms, "requeued": e.requeued,
            "requeued_at_ms": e.requeued_at_ms}  # fmt: skip


def _report_unreadable(listing: Any, path: Path) -> None:
    if listing.bad_lines:
        _note(f"warning: {path} has unreadable lines {', '.join(map(str, listing.bad_lines))}"
              " (kept as they are; see 'eventlog doctor')")  # fmt: skip
    if listing.torn_tail:
        _note(f"warning: {path} ends in a torn line (a crash mid-write); it is skipped")


@dlq_app.callback()
def dlq(ctx: typer.Context, db: DbOption = None, json_: JsonOption = False) -> None:
    """Dead letters: events a group gave up on after its retries (list, show, requeue,
    purge).

    \b
    Examples:
      eventlog dlq list --group billing
      eventlog dlq show 3f2a9c01b7de
      eventlog dlq requeue --group billing
      eventlog dlq purge --all --yes
    """
    _settings(ctx, db, json_)


@dlq_app.command("list")
def dlq_list(
    ctx: typer.Context,
    group: Annotated[str | None, typer.Option(help="Only this group's.")] = None,
    topic: Annotated[str | None, typer.Option(help="Only this topic's.")] = None,
    since: Annotated[
        str | None,
        typer.Option(metavar="TIME", help="Dead-lettered at or after TIME (ISO-8601 UTC, or -1h)."),
    ] = None,
    pending: Annotated[
        bool, typer.Option("--pending", help="Leave out those already requeued.")
    ] = False,
    db: DbOption = None,
    json_: JsonOption = False,
) -> None:
    """List dead letters: id, group, topic, offset, attempts, error, time, requeued.

    \b
    Examples:
      eventlog dlq list
      eventlog dlq list --group billing --since -1d --pending
      eventlog --json dlq list | jq -r 'select(.error_type == "KeyError") | .id'
    """
    s = _settings(ctx, db, json_)
    moment = _parse("--since", _times.parse_time, since) if since is not None else None
    with _open(s) as log:
        listing = log.dead_letters(group=group, topic=topic, since=moment,
                                   include_requeued=not pending)  # fmt: skip
        path = log.paths.deadletter
    _report_unreadable(listing, path)
    if s.json:
        for e in listing.entries:
            _emit(_dead_row_json(e))
        return
    if not listing.entries:
        _note("no dead letters" + (" match" if group or topic or since or pending else ""))
        return
    _table(["ID", "GROUP", "TOPIC", "OFFSET", "ATTEMPTS", "ERROR", "DEAD-LETTERED (UTC)",
            "REQUEUED"],
           [[e.id, e.group, _lane(e.topic, e.partition), e.offset, e.attempts,
             _summary(e.error_type, e.error_message), _utc(e.dead_lettered_at_ms),
             "yes" if e.requeued else "no"] for e in listing.entries])  # fmt: skip


@dlq_app.command("show")
def dlq_show(
    ctx: typer.Context,
    dead_letter_id: Annotated[str, typer.Argument(metavar="ID")],
    db: DbOption = None,
    json_: JsonOption = False,
) -> None:
    """Everything about one dead letter: the event, the error and its traceback.

    \b
    Examples:
      eventlog dlq show 3f2a9c01b7de
      eventlog --json dlq show 3f2a9c01b7de | jq .payload
    """
    s = _settings(ctx, db, json_)
    with _open(s) as log:
        e = log.dead_letter(dead_letter_id)
    if s.json:
        _emit({**e.to_dict(), "requeued": e.requeued})
        return
    fields = [
        ("id", e.id), ("group", e.group), ("topic", e.topic), ("partition", e.partition),
        ("offset", e.offset), ("key", e.key), ("event time", _utc(e.event_time_ms)),
        ("attempts", e.attempts), ("first failure", _utc(e.first_failed_at_ms)),
        ("last failure", _utc(e.last_failed_at_ms)),
        ("dead-lettered", _utc(e.dead_lettered_at_ms)),
        ("requeued", _utc(e.requeued_at_ms) if e.requeued else "no"),
        ("error", f"{e.error_type}: {e.error_message}"),
    ]  # fmt: skip
    if e.headers:
        fields.append(("headers", json.dumps(e.headers, ensure_ascii=False)))
    width = max(len(name) for name, _ in fields)
    for name, value in fields:
        typer.echo(f"{name.ljust(width)}  {_cell(value)}")
    typer.echo("payload:")
    for line in json.dumps(e.payload, ensure_ascii=False, indent=2).splitlines():
        typer.echo(f"  {line}")
    typer.echo("traceback:")
    for line in (e.traceback or "(none recorded)").rstrip().splitlines():
        typer.echo(f"  {line}")


SelectorIds = Annotated[
    list[str] | None, typer.Option("--id", metavar="ID", help="This dead letter (repeatable).")
]
SelectorGroup = Annotated[str | None, typer.Option(help="Every dead letter of this group.")]
SelectorAll = Annotated[bool, typer.Option("--all", help="Every dead letter.")]


def _selectors(ctx: Any, ids: list[str] | None, group: str | None, all_: bool) -> None:
    given = sum([bool(ids), group is not None, all_])
    if given != 1:
        _usage(ctx, "choose the dead letters with --id (repeatable), --group or --all")


def _dead_action_rows(
    s: Settings, entries: Sequence[Any], verb: tuple[str, str], dry_run: bool
) -> None:
    if s.json:
        for e in entries:
            _emit({"id": e.id, "group": e.group, "topic": e.topic, "partition": e.partition,
                   "offset": e.offset, "dry_run": dry_run})  # fmt: skip
        return
    if entries:
        _table(["ID", "GROUP", "TOPIC", "OFFSET", "ERROR"],
               [[e.id, e.group, _lane(e.topic, e.partition), e.offset,
                 _summary(e.error_type, e.error_message)] for e in entries])  # fmt: skip
    n = len(entries)
    what = f"{n} dead letter{'s' if n != 1 else ''}"
    typer.echo(f"would {verb[0]} {what} (dry run)" if dry_run else f"{verb[1]} {what}")


@dlq_app.command("requeue")
def dlq_requeue(
    ctx: typer.Context,
    ids: SelectorIds = None,
    group: SelectorGroup = None,
    all_: SelectorAll = False,
    dry_run: DryRun = False,
    db: DbOption = None,
    json_: JsonOption = False,
) -> None:
    """Send dead letters back to their own group (only), with attempts reset.

    The group's running (or next) consumer handles them again; entries stay in the file
    marked requeued, and a renewed failure adds a new entry. Already requeued entries are
    left alone.

    \b
    Examples:
      eventlog dlq requeue --id 3f2a9c01b7de --id 0b1c2d3e4f50
      eventlog dlq requeue --group billing --dry-run
      eventlog dlq requeue --all
    """
    s = _settings(ctx, db, json_)
    _selectors(ctx, ids, group, all_)
    with _open(s) as log:
        # One call, not one per slice of the entries: a requeue is all or nothing (a pruned
        # event refuses it whole, as its error says), and the file is read and rewritten
        # once, not once per slice (which made a large file's requeue quadratic).
        chosen = _while_running(
            s, "requeueing",
            lambda: log.requeue_dead_letters(ids, group=group, all=all_, dry_run=dry_run),
        )  # fmt: skip
    _dead_action_rows(s, chosen, ("requeue", "requeued"), dry_run)
    if chosen and not dry_run and not s.json:
        groups = sorted({e.group for e in chosen})
        _note(
            f"group{'s' if len(groups) != 1 else ''} {', '.join(groups)} will handle them on "
            "the next consumer run (a running consumer picks them up within a second)"
        )


@dlq_app.command("purge")
def dlq_purge(
    ctx: typer.Context,
    ids: SelectorIds = None,
    group: SelectorGroup = None,
    all_: SelectorAll = False,
    dry_run: DryRun = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    db: DbOption = None,
    json_: JsonOption = False,
) -> None:
    """Remove dead letters from the file for good.

    Asks for confirmation on a terminal unless --yes.

    \b
    Examples:
      eventlog dlq purge --id 3f2a9c01b7de
      eventlog dlq purge --group billing --dry-run
      eventlog dlq purge --all --yes
    """
    s = _settings(ctx, db, json_)
    _selectors(ctx, ids, group, all_)
    with _open(s) as log:
        chosen = log.purge_dead_letters(ids, group=group, all=all_, dry_run=True)
        if not dry_run and chosen:
            n = len(chosen)
            if (
                not yes
                and _format._interactive()
                and not typer.confirm(
                    f"Purge {n} dead letter{'s' if n != 1 else ''} for good?", default=False
                )
            ):
                raise EventlogError("aborted; nothing purged", hint="answer y, or pass --yes")
            chosen = log.purge_dead_letters([e.id for e in chosen])
    _dead_action_rows(s, chosen, ("purge", "purged"), dry_run)
