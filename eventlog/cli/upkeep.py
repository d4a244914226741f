"""Upkeep verbs: stats, prune (retention), checkpoint, backup, doctor."""

# No `from __future__ import annotations`: typer reads the annotations at runtime.

from pathlib import Path
from typing import Annotated, Any

import typer

from .. import _backup, _core, _db, _doctor, _retention, _schema, _stats, _times
from .._core import MAX_INT64
from ..errors import EventlogError, NotAnEventlogDatabase
from . import DbOption, DryRun, JsonOption, _open, _parse, _settings, _usage, app
from ._format import _emit, _note, _Progress, _table, _utc, _while_running

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
        typer.Option(
            metavar="N", min=0, max=MAX_INT64, help="Keep only the newest N events of each topic."
        ),
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
        _note_forced(report)
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
    _note_forced(report)


def _note_forced(report: "_retention.PruneReport") -> None:
    if not report.unhandled:
        return
    groups = sorted({h.group for ln in report.lanes for h in ln.overridden})
    verb = "would go" if report.dry_run else "went"
    _note(f"warning: --force: {report.unhandled} of the events that {verb} had not been "
          f"handled yet by group{'s' if len(groups) != 1 else ''} {', '.join(groups)}; "
          "they will never be delivered to them")  # fmt: skip


# -- checkpoint, backup, doctor -----------------------------------------------------------------


@app.command()
def checkpoint(ctx: typer.Context, db: DbOption = None, json_: JsonOption = False) -> None:
    """Copy the WAL into the database and truncate it.

    Also how a log goes on after a failed fsync of its WAL (a failing disk): once the whole
    WAL is in the database file, fsynced, appends and reads at full go on.

    \b
    Examples:
      eventlog checkpoint
    """
    s = _settings(ctx, db, json_)
    # Opened at normal: after a failed fsync, a log at full refuses every write until a
    # checkpoint, and opening one may have a migration to write. The checkpoint itself
    # fsyncs the database file either way.
    with _open(s, durability="normal") as log:
        before = _stats.file_sizes(log.paths)["wal"]
        busy, pages, done = _while_running(s, "checkpointing", log.checkpoint)
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
        # Opening a log migrates it: a file behind this eventlog is reported, not rewritten.
        paths = _db.Paths.for_db(s.path)
        version = _schema.schema_version_of(paths) if paths.db.is_file() else 0
        latest = _schema.latest_schema_version()
        if 0 < version < latest:
            checks = [_doctor.Check("schema", "fail", f"version {version}, this eventlog has "
                                    f"{latest}; nothing else was checked",
                                    "back it up, then run 'eventlog migrate'")]  # fmt: skip
        else:
            with _open(s) as log:  # the integrity check reads every page: minutes on a big file
                checks = _while_running(
                    s, "checking", lambda: _doctor.doctor(log, quick=quick, lag_warn=lag_warn)
                )
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
