"""Output of the command line: aligned tables, UTC times and ages, JSON lines, notes and a
progress bar on stderr."""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from datetime import UTC, datetime
from typing import IO, TYPE_CHECKING, Any, TypeVar

import typer

if TYPE_CHECKING:
    from . import Settings

T = TypeVar("T")


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


def _summary(error_type: str | None, message: str | None, width: int = 60) -> str:
    text = f"{error_type or '?'}: {(message or '').splitlines()[0] if message else ''}".strip()
    return text if len(text) <= width else text[: width - 1] + "…"


def _interactive() -> bool:
    """Whether stdin is a terminal, someone to ask. Called as `_format._interactive()`, so a
    test can pretend it is."""
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
            from rich.progress import (
                BarColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            # Without a total the bar pulses and the time so far is all there is to show.
            counts = (TextColumn("{task.completed}/{task.total}"), TimeRemainingColumn())
            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                *(counts if total is not None else (TimeElapsedColumn(),)),
                console=Console(stderr=True, force_terminal=True),
                transient=True,
            )  # fmt: skip (enabled only on terminals)
            self._bar.start()
            self._task = self._bar.add_task(self.description, total=total)
        self._bar.update(self._task, completed=done, total=total)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _while_running(settings: Settings, description: str, work: Callable[[], T]) -> T:
    """Run one blocking step (a migration is one transaction: nothing to count) in a
    helper thread, with a bar that shows it is still going after a second."""
    with ThreadPoolExecutor(1, thread_name_prefix="eventlog-cli") as pool:
        future = pool.submit(work)
        with _Progress(settings, description) as progress:
            while True:
                try:
                    return future.result(timeout=0.2)
                except FutureTimeout:
                    progress.update(0, None)


def _isatty(stream: IO[Any]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
