"""The `eventlog` command line: parse, call the library, format. No SQL, no business rules.

Conventions: `--db PATH` (or $EVENTLOG_DB, default ./eventlog.db) and `--json` are accepted
before the verb and after it. Human tables go to stdout, `--json` prints one JSON object per
line (field names are a contract, listed in the README), and messages, warnings and progress
go to stderr. Exit status 0 on success, 1 on an error (`error:` and `hint:` lines, never a
traceback), 2 on a usage error. Times are shown and read as UTC unless they carry an offset.
"""

# No `from __future__ import annotations`: typer reads the annotations at runtime.

import contextlib
import json
import os
import re
import select
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Annotated, Any, NoReturn

import typer
from typer.core import TyperGroup

from . import (
    _backup,
    _core,
    _db,
    _deadletter,
    _doctor,
    _groups,
    _members,
    _pipe,
    _replay,
    _retention,
    _schema,
    _stats,
    _sync,
    _tail,
    _times,
)
from .errors import EventlogError, InvalidArgument, InvalidPayload, NotAnEventlogDatabase, NotFound

DEFAULT_DB = "eventlog.db"
APPEND_BATCH = 1000  # stdin lines per transaction at most
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


# -- the shell: errors, settings, output --------------------------------------------------------


class _Group(TyperGroup):
    """Turns expected failures into one `error:` line (and a `hint:`), exit status 1."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except EventlogError as exc:
            _fail(exc)
        except BrokenPipeError:
            _silence_stdout()
            raise typer.Exit(0) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None


def _usage(ctx: Any, message: str) -> NoReturn:
    """A usage error: the usage line and the message on stderr, exit status 2."""
    typer.echo(ctx.get_usage(), err=True)
    typer.echo(f"Try '{ctx.command_path} --help' for help.\n", err=True)
    typer.echo(f"Error: {message}", err=True)
    raise typer.Exit(2)


def _fail(exc: EventlogError) -> NoReturn:
    typer.echo(f"error: {exc}", err=True)
    if exc.hint:
        typer.echo(f"hint: {exc.hint}", err=True)
    raise typer.Exit(1)


def _silence_stdout() -> None:
    # The reader went away (`| head`): point stdout at /dev/null so the final flush at exit
    # does not raise again.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


app = typer.Typer(
    cls=_Group,
    name="eventlog",
    help="A durable, replayable event log in one SQLite file, with consumer groups.",
    epilog="Times are UTC unless they carry an offset. Run 'eventlog VERB --help' for examples.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings=CONTEXT,
)
topics_app = typer.Typer(cls=_Group, rich_markup_mode=None, context_settings=CONTEXT)
groups_app = typer.Typer(cls=_Group, rich_markup_mode=None, context_settings=CONTEXT)
dlq_app = typer.Typer(cls=_Group, rich_markup_mode=None, context_settings=CONTEXT,
                      no_args_is_help=True)  # fmt: skip
app.add_typer(topics_app, name="topics")
app.add_typer(groups_app, name="groups")
app.add_typer(dlq_app, name="dlq")


@dataclass
class Settings:
    db: Path | None = None
    json: bool = False

    @property
    def path(self) -> Path:
        return self.db if self.db is not None else Path(DEFAULT_DB)


DbOption = Annotated[
    Path | None,
    typer.Option("--db", metavar="PATH", show_default=False,
                 help="The database file (same as the global --db)."),
]  # fmt: skip
JsonOption = Annotated[
    bool, typer.Option("--json", help="One JSON object per line on stdout (same as the global).")
]


def _settings(ctx: Any, db: Path | None = None, json_: bool = False) -> Settings:
    root = ctx.find_root()
    if not isinstance(root.obj, Settings):
        root.obj = Settings()
    settings: Settings = root.obj
    if db is not None:
        settings.db = db
    if json_:
        settings.json = True
    return settings


def _open(settings: Settings, *, create: bool = False) -> _sync.SyncLog:
    """Open the log; only `init` may create the file."""
    return _sync.SyncLog(settings.path, create=create)


def _emit(obj: dict[str, Any]) -> None:
    typer.echo(json.dumps(obj, ensure_ascii=False, separators=(",", ":")))


def _note(message: str) -> None:
    typer.echo(message, err=True)


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, indent: str = "") -> None:
    """Aligned columns; numbers right-aligned."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, value in enumerate(row):
            widths[i] = max(widths[i], len(value))
    numeric = [bool(rows) and all(_is_number(row[i]) for row in rows)
               for i in range(len(headers))]  # fmt: skip

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if numeric[i] else v.ljust(w)
                 for i, (v, w) in enumerate(zip(values, widths, strict=True))]  # fmt: skip
        return (indent + "  ".join(parts)).rstrip()

    typer.echo(line(headers))
    for row in cells:
        typer.echo(line(row))


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def _is_number(value: Any) -> bool:
    if isinstance(value, str):
        return bool(_NUMBER_TEXT.fullmatch(value))
    return value is None or (isinstance(value, int | float) and not isinstance(value, bool))


_NUMBER_TEXT = re.compile(r"~?-?[\d.,]+")


def _utc(ms: int | None) -> str:
    if ms is None:
        return "-"
    moment = datetime.fromtimestamp(ms / 1000, UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    if seconds < 60:
        return f"{seconds:.1f}s ago"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m ago"
    if seconds < 86400:
        return f"{seconds / 3600:.1f}h ago"
    return f"{seconds / 86400:.1f}d ago"


def _lane(topic: str, partition: int) -> str:
    return f"{topic}[{partition}]"


def _interactive() -> bool:
    try:
        return sys.stdin.isatty()
    except (AttributeError, ValueError):
        return False


class _Progress:
    """A progress bar on stderr for work that takes over a second: only when stdout and
    stderr are terminals and not with --json."""

    DELAY_S = 1.0

    def __init__(self, settings: Settings, description: str) -> None:
        self.description = description
        self.enabled = not settings.json and _isatty(sys.stdout) and _isatty(sys.stderr)
        self.started = time.monotonic()
        self._bar: Any = None
        self._task: Any = None

    def update(self, done: int, total: int | None) -> None:
        if not self.enabled:
            return
        if self._bar is None:
            if time.monotonic() - self.started < self.DELAY_S:
                return
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(),
                                 TextColumn("{task.completed}/{task.total}"),
                                 TimeRemainingColumn(), console=Console(stderr=True),
                                 transient=True)  # fmt: skip
            self._bar.start()
            self._task = self._bar.add_task(self.description, total=total)
        self._bar.update(self._task, completed=done, total=total)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def __enter__(self) -> "_Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _isatty(stream: IO[Any]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _parse(what: str, parse: Callable[[str], Any], text: str) -> Any:
    """Run a parser; its InvalidArgument becomes a usage error (exit status 2)."""
    try:
        return parse(text)
    except InvalidArgument as exc:
        raise typer.BadParameter(str(exc), param_hint=what) from None


def _version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"eventlog {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    db: Annotated[
        Path | None,
        typer.Option(
            "--db",
            envvar="EVENTLOG_DB",
            metavar="PATH",
            show_default=False,
            help="The database file [default: ./eventlog.db].",
        ),
    ] = None,
    json_: Annotated[bool, typer.Option("--json", help="Machine output: JSON lines.")] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """A durable, replayable event log in one SQLite file, with consumer groups.

    \b
    Examples:
      eventlog --db app.db init
      eventlog --db app.db append orders '{"id": 7}' --key customer-42
      eventlog --db app.db tail orders -f
      eventlog --db app.db groups
      eventlog --db app.db replay billing --to-datetime -1h --execute
    """
    ctx.obj = Settings(db, json_)


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
    existed = s.path.exists()
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
    with _open(s) as log:
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

    return json.loads(text, parse_constant=reject)


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
    pending = b""
    while True:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for raw in lines:
            number += 1
            batch.append((number, raw))
            if len(batch) >= limit:
                yield batch
                batch = []
        if batch and not select.select([fd], [], [], 0)[0]:
            yield batch
            batch = []
    if pending:
        number += 1
        batch.append((number, pending))
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
        if _interactive():
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
            offsets = log.append_many(drafts)
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
            and _interactive()
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
        typer.Option("--to-offset", metavar="N", min=0, help="Deliver from offset N on."),
    ] = None,
    shift_by: Annotated[
        int | None,
        typer.Option(
            "--shift-by", metavar="N", help="Move by N events in each partition; negative rewinds."
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
        spec = _replay.ResetSpec("datetime", datetime.now(UTC) - length)
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


# -- dead letters -------------------------------------------------------------------------------


def _summary(error_type: str | None, message: str | None, width: int = 60) -> str:
    text = f"{error_type or '?'}: {(message or '').splitlines()[0] if message else ''}".strip()
    return text if len(text) <= width else text[: width - 1] + "…"


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
DryRun = Annotated[bool, typer.Option("--dry-run", help="Only show what would be done.")]


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
        chosen = log.requeue_dead_letters(ids, group=group, all=all_, dry_run=True)
        if not dry_run and chosen:
            done: list[Any] = []
            with _Progress(s, "requeueing") as progress:
                for i in range(0, len(chosen), 200):
                    part = [e.id for e in chosen[i : i + 200]]
                    done += log.requeue_dead_letters(part)
                    progress.update(len(done), len(chosen))
            chosen = done
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
                and _interactive()
                and not typer.confirm(
                    f"Purge {n} dead letter{'s' if n != 1 else ''} for good?", default=False
                )
            ):
                raise EventlogError("aborted; nothing purged", hint="answer y, or pass --yes")
            chosen = log.purge_dead_letters([e.id for e in chosen])
    _dead_action_rows(s, chosen, ("purge", "purged"), dry_run)


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


# -- stats --------------------------------------------------------------------------------------


@app.command()
def stats(ctx: typer.Context, db: DbOption = None, json_: JsonOption = False) -> None:
    """Totals, per-topic rates, lag per group, dead letters and file sizes (WAL included).

    Answers from counters and index probes, in well under a second on any size of log:
    lag and the last minute's rate are counted exactly up to 10,000 events per partition
    and estimated beyond (marked with ~).

    \b
    Examples:
      eventlog stats
      eventlog --json stats | jq '.files.wal'
    """
    s = _settings(ctx, db, json_)
    with _open(s) as log:
        st = _stats.stats(log)
    lag_by_group: dict[str, dict[str, Any]] = {}
    for lag in st.lags:
        g = lag_by_group.setdefault(lag.group, {"group": lag.group, "lag": 0, "exact": True,
                                                "partitions": 0})  # fmt: skip
        g["lag"] += lag.lag
        g["exact"] = g["exact"] and lag.exact
        g["partitions"] += 1
    dl = st.dead_letters
    if s.json:
        _emit({
            "db": str(st.db), "schema_version": st.schema_version, "head": st.head,
            "events": st.events, "topics": [
                {"name": t.name, "partitions": t.partitions, "events": t.events,
                 "first_offset": t.first_offset, "last_offset": t.last_offset,
                 "last_append_ms": t.last_append_ms, "rate_per_s": round(t.rate_per_s, 3),
                 "rate_exact": t.recent_exact} for t in st.topics],
            "groups": list(lag_by_group.values()),
            "lags": [{"group": x.group, "topic": x.topic, "partition": x.partition,
                      "position": x.position, "head": x.head, "lag": x.lag,
                      "exact": x.exact} for x in st.lags],
            "dead_letters": {"total": dl.total, "pending": dl.pending, "requeued": dl.requeued,
                             "unreadable_lines": dl.unreadable_lines, "torn_tail": dl.torn_tail},
            "files": st.files, "elapsed_ms": round(st.elapsed_s * 1000, 1),
        })  # fmt: skip
        return
    f = st.files
    typer.echo(f"database      {st.db} (schema version {st.schema_version})")
    size = _stats.human_bytes
    typer.echo(f"files         db {size(f['db'])}, WAL {size(f['wal'])}, shm {size(f['shm'])}, "
               f"dead letters {size(f['deadletter'])}")  # fmt: skip
    typer.echo(f"events        {st.events:,} in {len(st.topics)} topics; head offset {st.head:,}")
    typer.echo(
        f"dead letters  {dl.pending} waiting, {dl.requeued} requeued"
        + (f", {dl.unreadable_lines} unreadable lines" if dl.unreadable_lines else "")
    )
    if st.topics:
        typer.echo("")
        _table(["TOPIC", "PARTITIONS", "EVENTS", "FIRST", "LAST", "EVENTS/S (1m)",
                "LAST APPEND (UTC)"],
               [[t.name, t.partitions, t.events, t.first_offset, t.last_offset or None,
                 ("" if t.recent_exact else "~") + f"{t.rate_per_s:.1f}",
                 _utc(t.last_append_ms)] for t in st.topics])  # fmt: skip
    if lag_by_group:
        typer.echo("")
        _table(["GROUP", "PARTITIONS", "LAG", "DEAD LETTERS"],
               [[g["group"], g["partitions"], ("" if g["exact"] else "~") + str(g["lag"]),
                 dl.by_group.get(g["group"], 0)] for g in lag_by_group.values()])  # fmt: skip


# -- prune --------------------------------------------------------------------------------------


@app.command()
def prune(
    ctx: typer.Context,
    older_than: Annotated[
        str | None,
        typer.Option(metavar="DURATION", help="Delete events older than this (7d, 12h, 30m)."),
    ] = None,
    keep_last: Annotated[
        int | None,
        typer.Option(metavar="N", min=0, help="Keep only the newest N events of each topic."),
    ] = None,
    topic: Annotated[
        list[str] | None, typer.Option(help="Only this topic (repeatable; default all).")
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Delete even events some group has not handled yet.")
    ] = False,
    dry_run: DryRun = False,
    db: DbOption = None,
    json_: JsonOption = False,
) -> None:
    """Delete old events (retention), in short transactions producers barely notice.

    With both options, an event goes only if it is older than DURATION and not among the
    newest N. Never deletes what a group has not handled yet (or a requeued dead letter
    waits for), and says which groups hold events back, unless --force. Offsets are never
    reused after a prune.

    \b
    Examples:
      eventlog prune --older-than 7d --dry-run
      eventlog prune --older-than 30d --keep-last 1000
      eventlog prune --keep-last 100000 --topic clicks --force
    """
    s = _settings(ctx, db, json_)
    if older_than is None and keep_last is None:
        _usage(ctx, "say what to delete: --older-than DURATION, --keep-last N, or both")
    before_ms = None
    if older_than is not None:
        length = abs(_parse("--older-than", _times.parse_duration, older_than))
        before_ms = _core.now_ms() - int(length.total_seconds() * 1000)
    retention = _retention.Retention(before_ms, keep_last, tuple(topic) if topic else None)
    with _open(s) as log, _Progress(s, "pruning") as progress:
        report = _retention.prune(log, retention, force=force, dry_run=dry_run,
                            progress=progress.update)  # fmt: skip
    if s.json:
        for lane in report.lanes:
            _emit({"topic": lane.topic, "partition": lane.partition, "upto": lane.upto,
                   "deleted": lane.events, "held_back": lane.held_back,
                   "held_by": [{"group": h.group, "position": h.position,
                                "requeued": h.redelivery} for h in lane.holds],
                   "dry_run": dry_run})  # fmt: skip
        return
    if report.lanes:
        _table(["TOPIC", "PARTITION", "UP TO", "WOULD DELETE" if dry_run else "DELETED",
                "HELD BACK", "HELD BY"],
               [[ln.topic, ln.partition, ln.upto, ln.events, ln.held_back,
                 ", ".join(h.group + (" (requeued)" if h.redelivery else "") for h in ln.holds)
                 or None] for ln in report.lanes])  # fmt: skip
    verb = "would delete" if dry_run else "deleted"
    typer.echo(f"{verb} {report.events} event{'s' if report.events != 1 else ''}")
    if report.held_back:
        holders = sorted({h.group for ln in report.lanes for h in ln.holds})
        _note(f"{report.held_back} older events kept because group"
              f"{'s' if len(holders) != 1 else ''} {', '.join(holders)} "
              "ha" + ("ve" if len(holders) != 1 else "s") + " not handled them yet; "
              "see 'eventlog groups', or pass --force")  # fmt: skip


# -- upkeep: checkpoint, backup, doctor ---------------------------------------------------------


@app.command()
def checkpoint(ctx: typer.Context, db: DbOption = None, json_: JsonOption = False) -> None:
    """Copy the WAL into the database and truncate it.

    \b
    Examples:
      eventlog checkpoint
    """
    s = _settings(ctx, db, json_)
    with _open(s) as log:
        before = _stats.file_sizes(log.paths)["wal"]
        busy, pages, done = log.checkpoint()
        after = _stats.file_sizes(log.paths)["wal"]
    if s.json:
        _emit({"busy": bool(busy), "wal_pages": pages, "checkpointed": done,
               "wal_bytes_before": before, "wal_bytes_after": after})  # fmt: skip
        return
    typer.echo(f"checkpointed {max(done, 0)} of {max(pages, 0)} WAL pages; WAL "
               f"{_stats.human_bytes(before)} -> {_stats.human_bytes(after)}")  # fmt: skip
    if busy:
        _note("warning: a reader or writer was busy, so the WAL could not be truncated; "
              "run it again in a moment")  # fmt: skip


@app.command()
def backup(
    ctx: typer.Context,
    dest: Annotated[Path, typer.Argument(metavar="DEST", help="The new database file.")],
    force: Annotated[bool, typer.Option("--force", help="Replace DEST if it exists.")] = False,
    db: DbOption = None,
    json_: JsonOption = False,
) -> None:
    """Copy the database consistently while producers and consumers keep writing.

    Uses SQLite's online backup API from one snapshot; the dead-letter file is copied
    beside DEST (DEST.deadletter.jsonl). Open the copy with --db DEST.

    \b
    Examples:
      eventlog backup /backups/app-$(date +%F).db
      eventlog --db /backups/app-2024-05-01.db doctor
    """
    s = _settings(ctx, db, json_)
    paths = _db.Paths.for_db(s.path)
    if not paths.db.exists():
        raise NotAnEventlogDatabase(f"no database at {paths.db}",
                                    hint="check --db or $EVENTLOG_DB")  # fmt: skip
    with _Progress(s, "backing up") as progress:
        result = _backup.backup(paths, dest, overwrite=force, progress=progress.update)
    if s.json:
        _emit({"source": str(result.source), "dest": str(result.dest), "bytes": result.bytes,
               "pages": result.pages, "deadletter": str(result.deadletter)
               if result.deadletter else None,
               "elapsed_s": round(result.elapsed_s, 3)})  # fmt: skip
        return
    typer.echo(f"backed up {result.source} to {result.dest} ({_stats.human_bytes(result.bytes)}"
               f", {result.elapsed_s:.1f}s)")  # fmt: skip
    if result.deadletter:
        typer.echo(f"dead letters copied to {result.deadletter}")


@app.command()
def doctor(
    ctx: typer.Context,
    quick: Annotated[
        bool, typer.Option("--quick", help="quick_check instead of integrity_check.")
    ] = False,
    lag_warn: Annotated[
        int, typer.Option(metavar="N", min=1, help="Warn about a group this many behind.")
    ] = 10_000,
    strict: Annotated[bool, typer.Option("--strict", help="Warnings fail too.")] = False,
    db: DbOption = None,
    json_: JsonOption = False,
) -> None:
    """Check the database and its files; exit status 1 when something is wrong.

    Checks: integrity, schema version, offsets, WAL size, the dead-letter file (torn or
    unreadable lines), stale member files and heartbeats, and group lag.

    \b
    Examples:
      eventlog doctor
      eventlog --db /backups/app-2024-05-01.db doctor --quick
    """
    s = _settings(ctx, db, json_)
    try:
        with _open(s) as log:
            checks = _doctor.doctor(log, quick=quick, lag_warn=lag_warn)
    except EventlogError as exc:
        checks = [_doctor.Check("database", "fail", str(exc), exc.hint)]
    for c in checks:
        if s.json:
            _emit({"check": c.name, "status": c.status, "detail": c.detail, "hint": c.hint})
        else:
            typer.echo(
                f"{c.status.upper():4}  {c.name:12}  {c.detail}"
                + (f"\n{'':18}hint: {c.hint}" if c.hint and c.status != "ok" else "")
            )
    bad = [c for c in checks if c.status == "fail" or (strict and c.status == "warn")]
    if bad:
        if not s.json:
            _note(f"{len(bad)} problem{'s' if len(bad) != 1 else ''} found")
        raise typer.Exit(1)


# -- demo ---------------------------------------------------------------------------------------


@app.command()
def demo(
    directory: Annotated[
        Path | None,
        typer.Option(
            "--dir", metavar="PATH", help="Where to put the demo's files (default: a temp folder)."
        ),
    ] = None,
    quick: Annotated[bool, typer.Option("--quick", help="A shorter run.")] = False,
) -> None:
    """Watch it work: real processes, a kill -9, a poison event, a replay.

    \b
    Examples:
      eventlog demo
      eventlog demo --quick --dir /tmp/eventlog-demo
    """
    try:
        from ._demo import run_demo
    except ImportError as exc:
        raise EventlogError(f"the demo is not available in this install: {exc}",
                            hint="reinstall eventlog") from exc  # fmt: skip
    raise typer.Exit(run_demo(directory, quick=quick))


# -- serve --------------------------------------------------------------------------------------


@app.command()
def serve(
    ctx: typer.Context,
    host: Annotated[
        str, typer.Option(metavar="ADDRESS", help="The address to listen on.")
    ] = "127.0.0.1",
    port: Annotated[
        int, typer.Option(metavar="PORT", min=0, max=65535, help="0 picks a free port.")
    ] = 8765,
    read_only: Annotated[
        bool, typer.Option("--read-only", help="Refuse every change (405): look, never touch.")
    ] = False,
    no_auth: Annotated[
        bool, typer.Option("--no-auth", help="No token (only on a loopback address).")
    ] = False,
    rotate_token: Annotated[
        bool, typer.Option("--rotate-token", help="Make a new token (signs every browser out).")
    ] = False,
    print_url: Annotated[
        bool, typer.Option("--print-url", help="Print the login URL and exit (no server).")
    ] = False,
    allowed_host: Annotated[
        list[str] | None,
        typer.Option(
            "--allowed-host",
            metavar="NAME",
            help="Also answer to this Host name (repeatable); others get 403.",
        ),
    ] = None,
    keepalive: Annotated[
        float,
        typer.Option(metavar="SECONDS", help="A keep-alive comment after this much silence."),
    ] = 15.0,
    send_timeout: Annotated[
        float,
        typer.Option(metavar="SECONDS", help="Close a stream whose client stops reading."),
    ] = 30.0,
    max_streams: Annotated[
        int, typer.Option(metavar="N", min=1, help="Open event streams at most; beyond, 503.")
    ] = 64,
    metrics: Annotated[
        bool, typer.Option("--metrics", help="Serve Prometheus text at /metrics.")
    ] = False,
    db: DbOption = None,
    json_: JsonOption = False,
) -> None:
    """Serve live event streams and the dashboard over HTTP (needs eventlog[web]).

    Prints the login URL (one JSON line with --json) and logs to stderr. The token lives
    owner-only in the database's sidecar folder and is reused across restarts; the login
    URL swaps it for a cookie, scripts send 'Authorization: Bearer TOKEN'. Ctrl-C or
    SIGTERM ends every open stream (event: bye) and exits 0. GET /api/v1/stream?topic=P
    streams events as Server-Sent Events, resumable with Last-Event-ID.

    \b
    Examples:
      eventlog --db app.db serve
      eventlog --db app.db serve --read-only --metrics
      eventlog --db app.db serve --print-url
      eventlog --db app.db serve --host 0.0.0.0 --allowed-host box.lan
      curl -N -H "Authorization: Bearer $TOKEN" 'http://127.0.0.1:8765/api/v1/stream?topic=orders'
    """
    s = _settings(ctx, db, json_)
    from .web import MISSING_EXTRA_HINT

    try:
        from .web import server as web
    except ImportError as exc:
        raise EventlogError(f"eventlog serve needs the web extra ({exc.name} is missing)",
                            hint=MISSING_EXTRA_HINT) from None  # fmt: skip
    opts = web.ServeOptions(
        s.path, host=host, port=port, read_only=read_only, no_auth=no_auth,
        rotate_token=rotate_token, allowed_hosts=allowed_host or [], keepalive=keepalive,
        send_timeout=send_timeout, max_streams=max_streams, metrics=metrics,
    )  # fmt: skip
    web.check_options(opts)
    if print_url:
        url = web.login_url(opts, port, web.prepare_token(opts))
        if s.json:
            _emit({"url": url})
        else:
            typer.echo(url)
        return

    def announce(info: dict[str, Any]) -> None:
        if s.json:
            _emit(info)
        else:
            typer.echo(info["url"])
            _note(f"eventlog serve: {info['db']} on {info['base_url']}"
                  + (" (read-only)" if info["read_only"] else "")
                  + ("" if info["auth"] else " (no auth)") + "; Ctrl-C to stop")  # fmt: skip
        sys.stdout.flush()

    web.setup_logging()
    web.serve(opts, announce)


def main() -> None:
    """The console script `eventlog`."""
    app(prog_name="eventlog")
