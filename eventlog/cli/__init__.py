"""The `eventlog` command line: parse, call the library, format. No SQL, no business rules.

Conventions: `--db PATH` (or $EVENTLOG_DB, default ./eventlog.db) and `--json` are accepted
before the verb and after it. Human tables go to stdout, `--json` prints one JSON object per
line (field names are a contract, listed in the README), and messages, warnings and progress
go to stderr. Exit status 0 on success, 1 on an error (`error:` and `hint:` lines, never a
traceback), 2 on a usage error. Times are shown and read as UTC unless they carry an offset.

This package holds the app, the global options, and the handling of errors and exit
statuses; each noun's verbs live in a module of their own (log, groups, deadletters, upkeep,
demo, serve), and the output helpers (tables, progress, JSON lines) in _format.
"""

# No `from __future__ import annotations`: typer reads the annotations at runtime.

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from typer.core import TyperGroup

from .. import _sync
from .._db import Durability
from ..errors import EventlogError, InvalidArgument

DEFAULT_DB = "eventlog.db"
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


# -- the shell: errors, exit statuses, settings, options ----------------------------------------


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
DryRun = Annotated[bool, typer.Option("--dry-run", help="Only show what would be done.")]


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


def _open(
    settings: Settings, *, create: bool = False, durability: Durability = "full"
) -> _sync.SyncLog:
    """Open the log; only `init` may create the file."""
    return _sync.SyncLog(settings.path, create=create, durability=durability)


def _parse(what: str, parse: Callable[[str], Any], text: str) -> Any:
    """Run a parser; its InvalidArgument becomes a usage error (exit status 2)."""
    try:
        return parse(text)
    except InvalidArgument as exc:
        raise typer.BadParameter(str(exc), param_hint=what) from None


def _version(value: bool) -> None:
    if value:
        from .. import __version__

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


# -- the verbs ----------------------------------------------------------------------------------
# Importing a module registers its verbs (it needs the shell above); this order is the order
# of 'eventlog --help'.

from . import log, groups, deadletters, upkeep, demo, serve  # noqa: E402, F401, I001


def main() -> None:
    """The console script `eventlog`."""
    app(prog_name="eventlog")
