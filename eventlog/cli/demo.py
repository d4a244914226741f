"""`eventlog demo`: real processes, a kill -9, a poison event, a replay."""

# No `from __future__ import annotations`: typer reads the annotations at runtime.

from pathlib import Path
from typing import Annotated

import typer

from ..errors import EventlogError
from . import app


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
        from .._demo import run_demo
    except ImportError as exc:
        raise EventlogError(f"the demo is not available in this install: {exc}",
                            hint="reinstall eventlog") from exc  # fmt: skip
    raise typer.Exit(run_demo(directory, quick=quick))
