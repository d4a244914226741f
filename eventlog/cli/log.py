"""Verbs on the log itself: init, migrate, append, tail, and topics (list, create)."""

# No `from __future__ import annotations`: typer reads the annotations at runtime.

import contextlib
import json
import os
import select
import sys
from collections.abc import Iterator, Sequence
from typing import Annotated, Any

import typer

from .. import _core, _db, _schema, _sync, _tail, _times
from .._core import MAX_INT64
from ..errors import EventlogError, InvalidPayload, NotAnEventlogDatabase, NotFound
from . import (
    CONTEXT,
    DbOption,
    JsonOption,
    Settings,
    _format,
    _Group,
    _open,
    _parse,
    _settings,
    app,
)
from ._format import _emit, _lane, _note, _table, _utc, _while_running

APPEND_BATCH = 1000  # stdin lines per transaction at most

topics_app = typer.Typer(cls=_Group, rich_markup_mode=None, context_settings=CONTEXT)
app.add_typer(topics_app, name="topics")


# -- init, migrate ------------------------------------------------------------------------------


@app.command()
def init(ctx: typer.Context, db: DbOption = None, json_: JsonOption = False) -> None:
    """Create the database file (if needed) and bring its schema up to date.

    \b
    Examples:
      eventlog --db /var/lib/app/events.db init
      EVENTLOG_DB=/var/lib/app/events.db eventlog init
    """
    s = _settings(ctx, db, json_)
    try:
        existed = s.path.exists()
    except OSError:
        existed = False  # the open below says what is wrong with the path
    with _open(s, create=True) as log:
        version = log.run(_schema.schema_version_plan(), "read")
        path = log.paths.db
    if s.json:
        _emit({"db": str(path), "created": not existed, "schema_version": version})
    elif existed:
        typer.echo(f"{path} already exists (schema version {version})")
    else:
        typer.echo(f"created {path} (schema version {version})")


@app.command()
def migrate(ctx: typer.Context, db: DbOption = None, json_: JsonOption = False) -> None:
    """Apply pending schema migrations to an existing database.

    Opening a database with eventlog migrates it too; this verb does it explicitly and says
    what changed. A database newer than this eventlog is refused.

    \b
    Examples:
      eventlog --db app.db migrate
    """
    s = _settings(ctx, db, json_)
    paths = _db.Paths.for_db(s.path)
    if not paths.db.exists():
        raise NotAnEventlogDatabase(f"no database at {paths.db}",
                                    hint="create it with 'eventlog init'")  # fmt: skip
    before = _schema.schema_version_of(paths)
    # Opening applies what is pending; a migration that rebuilds a table takes a while on a
    # big log, so a bar shows it is at work.
    with _while_running(s, "migrating", lambda: _open(s)) as log:
        after = log.run(_schema.schema_version_plan(), "read")
    if s.json:
        _emit({"db": str(paths.db), "from_version": before, "schema_version": after})
    elif before == after:
        typer.echo(f"{paths.db} is up to date (schema version {after})")
    else:
        typer.echo(f"migrated {paths.db} from schema version {before} to {after}")


# -- append -------------------------------------------------------------------------------------


def _strict_json(text: str) -> Any:
    def reject(constant: str) -> Any:
        raise ValueError(f"{constant} is not valid JSON")

    try:
        return json.loads(text, parse_constant=reject)
    except RecursionError:
        raise ValueError("nested too deep to be read") from None


def _headers(values: Sequence[str]) -> dict[str, str] | None:
    headers: dict[str, str] = {}
    for value in values:
        name, sep, text = value.partition("=")
        if not sep or not name:
            raise typer.BadParameter(f"{value!r} is not NAME=VALUE", param_hint="--header")
        headers[name] = text
    return headers or None


def _stdin_batches(limit: int) -> Iterator[list[tuple[int, bytes]]]:
    """Numbered stdin lines in batches of at most `limit`; a batch also ends when no more
    input is waiting, so a slow producer's lines are appended as they come."""
    stream = sys.stdin.buffer if hasattr(sys.stdin, "buffer") else sys.stdin
    try:
        fd = stream.fileno()
    except (OSError, ValueError, AttributeError):
        fd = -1
    number = 0
    batch: list[tuple[int, bytes]] = []
    if fd < 0:
        for raw in stream:
            number += 1
            batch.append((number, raw if isinstance(raw, bytes) else raw.encode()))
            if len(batch) >= limit:
                yield batch
                batch = []
        if batch:
            yield batch
        return
    # The unfinished line is kept as a list of pieces: re-splitting one growing buffer on
    # every read would make a long line quadratic.
    pieces: list[bytes] = []
    while True:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        *ends, rest = chunk.split(b"\n")
        if ends:
            ends[0] = b"".join([*pieces, ends[0]])
            pieces = []
        if rest:
            pieces.append(rest)
        for raw in ends:
            number += 1
            batch.append((number, raw))
            if len(batch) >= limit:
                yield batch
                batch = []
        if batch and not select.select([fd], [], [], 0)[0]:
            yield batch
            batch = []
    if pieces:
        number += 1
        batch.append((number, b"".join(pieces)))
    if batch:
        yield batch


@app.command()
def append(
    ctx: typer.Context,
    topic: Annotated[str, typer.Argument(metavar="TOPIC", help="The topic to append to.")],
    payload: Annotated[
        str | None,
        typer.Argument(
            metavar="JSON",
            show_default=False,
            help="The event as JSON; without it, JSON lines are read from stdin.",
        ),
    ] = None,
    key: Annotated[str | None, typer.Option(help="Partition key: same key, same order.")] = None,
    header: Annotated[
        list[str] | None,
        typer.Option("--header", "-H", metavar="NAME=VALUE", help="A header (repeatable)."),
    ] = None,
    dedupe_key: Annotated[
        str | None,
        typer.Option(help="A retry with the same key returns the first offset and stores nothing."),
    ] = None,
    db: DbOption = None,
    json_: JsonOption = False,
) -> None:
    """Append an event (or JSON lines from stdin) to TOPIC; prints each offset.

    From stdin, lines are appended in batches of up to 1,000, each batch in one transaction;
    blank lines are skipped. A line that is not JSON stops the command with its line number,
    and nothing of its batch is appended (earlier batches are, and their offsets printed).

    \b
    Examples:
      eventlog append orders '{"id": 7, "total": 12.5}' --key customer-42
      eventlog append orders '{"id": 7}' --header source=backfill --dedupe-key order-7
      jq -c '.[]' orders.json | eventlog append orders
      cat events.jsonl | eventlog --json append orders
    """
    s = _settings(ctx, db, json_)
    headers = _headers(header or [])
    _core.check_name(topic, "topic")
    if payload is None and dedupe_key is not None:
        raise typer.BadParameter("needs a JSON argument (a dedupe key names one event)",
                                 param_hint="--dedupe-key")  # fmt: skip
    value: Any = None
    if payload is not None:
        try:
            value = _strict_json(payload)
        except ValueError as exc:
            raise typer.BadParameter(f"not valid JSON: {exc}", param_hint="JSON") from None
    with _open(s) as log:
        if payload is not None:
            offset = log.append(topic, value, key=key, headers=headers, dedupe_key=dedupe_key)
            _print_offsets(s, topic, [offset])
            return
        if _format._interactive():
            _note("reading JSON lines from stdin (end with Ctrl-D)")
        appended = 0
        for batch in _stdin_batches(APPEND_BATCH):
            drafts = []
            for number, raw in batch:
                if not raw.strip():
                    continue
                try:
                    draft = _sync.Draft(topic, _strict_json(raw.decode("utf-8")), key=key,
                                        headers=headers)  # fmt: skip
                    draft.encode(log.limits)
                except (ValueError, EventlogError) as exc:
                    first = batch[0][0]
                    lines = f"line {first}" if first == number else f"lines {first}-{number}"
                    kept = (f"the {appended} events before line {first} were appended"
                            if appended else "nothing was appended")  # fmt: skip
                    raise InvalidPayload(
                        f"line {number} of stdin is not a valid event: {exc}",
                        hint=f"{lines} not appended; {kept}. Fix the line, then send it and "
                        "the lines after it again",
                    ) from None
                drafts.append(draft)
            try:
                offsets = log.append_many(drafts)
            except EventlogError:
                first = batch[0][0]
                kept = (f"the {appended} events before line {first} were appended (their "
                        "offsets are printed)" if appended else "nothing was appended")  # fmt: skip
                _note(f"lines from {first} on were not appended; {kept}")
                raise
            appended += len(offsets)
            _print_offsets(s, topic, offsets)


def _print_offsets(s: Settings, topic: str, offsets: Sequence[int]) -> None:
    for offset in offsets:
        if s.json:
            _emit({"topic": topic, "offset": offset})
        else:
            typer.echo(str(offset))


# -- tail ---------------------------------------------------------------------------------------


def _event_json(event: _core.Event) -> dict[str, Any]:
    return event.to_dict()


def _event_line(event: _core.Event) -> str:
    parts = [str(event.offset), _utc(event.timestamp_ms), _lane(event.topic, event.partition)]
    if event.key is not None:
        parts.append(f"key={event.key}")
    if event.headers:
        parts.append("headers=" + json.dumps(dict(event.headers), ensure_ascii=False,
                                             separators=(",", ":")))  # fmt: skip
    parts.append(json.dumps(event.payload, ensure_ascii=False, separators=(",", ":")))
    return "  ".join(parts)


@app.command()
def tail(
    ctx: typer.Context,
    pattern: Annotated[
        str,
        typer.Argument(
            metavar="TOPIC_OR_PATTERN",
            help="A topic, or a pattern: orders.* (one segment), orders.# (any).",
        ),
    ],
    from_: Annotated[
        str | None,
        typer.Option(
            "--from",
            metavar="earliest|latest|OFFSET|TIME",
            show_default=False,
            help="Where to start: TIME is ISO-8601 (UTC unless it has an offset) or "
            "relative like -10m. Default: the last --limit events.",
        ),
    ] = None,
    limit: Annotated[
        int | None,
        typer.Option(
            "--limit",
            "-n",
            min=0,
            max=MAX_INT64,
            show_default=False,
            help="At most this many events (default 10 without --from).",
        ),
    ] = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new events until Ctrl-C.")
    ] = False,
    db: DbOption = None,
    json_: JsonOption = False,
) -> None:
    """Print events of the matching topics in offset order (like tail; -f follows).

    Without --from it prints the last 10 (or --limit) events. With --json each event is one
    line: offset, topic, partition, key, payload, headers, timestamp_ms. A closed pipe
    (| head) ends quietly.

    \b
    Examples:
      eventlog tail orders                       # the last 10 events
      eventlog tail 'orders.#' -f                # and keep following
      eventlog tail orders --from -10m           # everything of the last ten minutes
      eventlog tail orders --from 2024-05-01T08:00:00 --limit 100
      eventlog --json tail orders --from earliest | jq -c 'select(.payload.total > 100)'
    """
    s = _settings(ctx, db, json_)
    start: Any = None
    if from_ is not None:
        start = _parse("--from", _times.parse_start, from_)
    _core.check_pattern(pattern)
    with _open(s) as log:
        if not log.run(_tail.matching_topics_plan(pattern), "read"):
            if not follow:
                raise NotFound(f"no topic matches {pattern!r}",
                               hint="list topics with 'eventlog topics'")  # fmt: skip
            _note(f"no topic matches {pattern!r} yet; waiting for one")
        read_limit = limit
        if start is None:
            n = 10 if limit is None else limit
            start = log.run(_tail.last_events_start_plan(pattern, n), "read")
            read_limit = None if follow else n
        events = log.read(pattern, start=start, follow=follow, limit=read_limit)
        with contextlib.closing(events):  # type: ignore[type-var]
            try:
                for event in events:
                    typer.echo(json.dumps(_event_json(event), ensure_ascii=False,
                                          separators=(",", ":"))
                               if s.json else _event_line(event))  # fmt: skip
            except KeyboardInterrupt:
                if not follow:
                    raise
                # Ctrl-C is how a follow ends: not an error.


# -- topics -------------------------------------------------------------------------------------


@topics_app.callback(invoke_without_command=True)
def topics(ctx: typer.Context, db: DbOption = None, json_: JsonOption = False) -> None:
    """List topics: partitions, events, first and last offset, last append (UTC).

    \b
    Examples:
      eventlog topics
      eventlog --json topics | jq -r 'select(.events > 0) | .name'
      eventlog topics create orders --partitions 8
    """
    s = _settings(ctx, db, json_)
    if ctx.invoked_subcommand is not None:
        return
    with _open(s) as log:
        infos = log.topics()
    if s.json:
        for t in infos:
            _emit(
                {
                    "name": t.name,
                    "partitions": t.partitions,
                    "events": t.events,
                    "first_offset": t.first_offset,
                    "last_offset": t.last_offset,
                    "created_at_ms": t.created_at_ms,
                    "last_append_ms": t.last_append_ms,
                }
            )
        return
    if not infos:
        _note("no topics yet (they are created by the first append, or 'eventlog topics create')")
        return
    _table(["TOPIC", "PARTITIONS", "EVENTS", "FIRST", "LAST", "LAST APPEND (UTC)"],
           [[t.name, t.partitions, t.events, t.first_offset, t.last_offset or None,
             _utc(t.last_append_ms)] for t in infos])  # fmt: skip


@topics_app.command("create")
def topics_create(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(metavar="NAME")],
    partitions: Annotated[
        int,
        typer.Option("--partitions", "-p", min=1, max=1024, help="Fixed once the topic exists."),
    ] = 1,
    if_not_exists: Annotated[
        bool, typer.Option("--if-not-exists", help="Succeed if it already exists like this.")
    ] = False,
    db: DbOption = None,
    json_: JsonOption = False,
) -> None:
    """Create a topic with a fixed number of partitions.

    Events with the same key always land in the same partition; a group handles each
    partition in one process at a time, so partitions are the unit of parallelism.

    \b
    Examples:
      eventlog topics create orders --partitions 8
      eventlog topics create audit --if-not-exists
    """
    s = _settings(ctx, db, json_)
    with _open(s) as log:
        created = log.create_topic(name, partitions, exist_ok=if_not_exists)
    if s.json:
        _emit({"name": name, "partitions": partitions, "created": created})
    else:
        typer.echo(f"created topic {name} with {partitions} partition"
                   f"{'s' if partitions != 1 else ''}" if created else
                   f"topic {name} already exists with {partitions} partitions")  # fmt: skip
