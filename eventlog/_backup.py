"""Online backup (`eventlog backup`): a consistent copy of the database, and of the dead-letter
file beside it, while producers and consumers keep writing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import _db, _deadletter, _sql
from ._locks import FileLock
from .errors import InvalidArgument, NotAnEventlogDatabase, translate


@dataclass(frozen=True)
class BackupResult:
    source: Path
    dest: Path
    bytes: int
    pages: int
    deadletter: Path | None  # where the dead-letter file was copied, if there was one
    elapsed_s: float


def backup(
    paths: _db.Paths,
    dest: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    pages_per_step: int = 1024,
    progress: Callable[[int, int], None] | None = None,
) -> BackupResult:
    """A consistent copy of the database while producers and consumers keep writing.

    SQLite's online backup API copies `pages_per_step` pages at a time from one read
    transaction held for the whole copy: a snapshot, so concurrent commits neither restart
    the copy nor appear half in it (they land in the WAL meanwhile). The copy is written to a
    temporary file and renamed into place. The dead-letter file is copied beside it, under its
    lock. Every event in the copy is on disk in the source too (its WAL is fsynced once the
    snapshot is taken).
    """
    target = _db.Paths.for_db(dest)
    if _own_files(target) & _own_files(paths):
        raise InvalidArgument(
            f"{target.db} is the log's own database or one of the files beside it",
            hint="write the backup to a new file name, such as one in another folder",
        )
    if not target.db.parent.is_dir():
        raise InvalidArgument(f"folder {target.db.parent} does not exist")
    for existing in (target.db, target.deadletter):
        if existing.exists() and not overwrite:
            raise InvalidArgument(
                f"{existing} already exists",
                hint="choose a new file name, or pass --force to replace it",
            )
    if not paths.db.is_file() or paths.db.stat().st_size == 0 or \
            _db.probe_schema_version(paths) == 0:  # fmt: skip
        # connect() below would switch it to WAL: a file that is not a log stays as it is
        raise NotAnEventlogDatabase(f"{paths.db} is not an eventlog database",
                                    hint="check --db or $EVENTLOG_DB")  # fmt: skip
    started = time.monotonic()
    tmp = target.db.with_name(f".{target.db.name}.tmp-{os.getpid()}")
    source = _db.connect(paths, durability="full", busy_timeout_ms=10_000)
    pages = 0
    try:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        os.close(fd)
        copy = sqlite3.connect(tmp, isolation_level=None)
        try:

            def step(status: int, remaining: int, total: int) -> None:
                nonlocal pages
                pages = total
                if progress is not None:
                    progress(total - remaining, total)

            source.execute(_sql.BEGIN_READ)
            source.execute(_sql.BACKUP_SNAPSHOT).fetchall()
            # The snapshot may end in commits whose writers have not fsynced yet (or never
            # will, at `normal`): the copy must not hold events the source can still lose.
            _db.sync_commits(source, None)
            source.backup(copy, pages=pages_per_step, progress=step, sleep=0)
            source.execute(_sql.COMMIT)
        finally:
            copy.close()
        for suffix in ("-wal", "-shm"):
            target.db.with_name(target.db.name + suffix).unlink(missing_ok=True)
        os.replace(tmp, target.db)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError | sqlite3.Error):
            raise translate(exc) from exc  # a full or read-only destination
        raise
    finally:
        source.close()
    copied = None
    # A database nothing has opened here (a backup itself) has no sidecar folder, so no
    # process can be writing its dead letters: there is no lock to take.
    lock = FileLock(paths.deadletter_lock) if paths.sidecar.is_dir() else None
    try:
        with lock if lock is not None else contextlib.nullcontext():
            if paths.deadletter.exists():
                try:
                    shutil.copyfile(paths.deadletter, target.deadletter)
                    os.chmod(target.deadletter, 0o600)
                except OSError as exc:
                    raise translate(exc) from exc
                copied = target.deadletter
            else:
                # what a replaced backup left beside DEST belongs to another log
                target.deadletter.unlink(missing_ok=True)
    finally:
        if lock is not None:
            lock.close()
    _deadletter.fsync_folder(target.db.parent)
    return BackupResult(paths.db, target.db, target.db.stat().st_size, pages, copied,
                        time.monotonic() - started)  # fmt: skip


def _own_files(paths: _db.Paths) -> set[Path]:
    """What a log keeps beside its database, resolved (a symlink or `..` names the same)."""
    db = paths.db
    names = (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm"),
             paths.deadletter, paths.sidecar)  # fmt: skip
    return {name.resolve() for name in names}
