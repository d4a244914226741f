"""Every error eventlog raises on purpose: one base class, a subclass per cause, a hint each."""

from __future__ import annotations

import errno
import sqlite3


class EventlogError(Exception):
    """Base of every error eventlog raises on purpose."""

    hint: str = ""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        if hint is not None:
            self.hint = hint


class InvalidArgument(EventlogError, ValueError):
    hint = "fix the value named in the message; nothing was written"


class InvalidName(InvalidArgument):
    hint = (
        "names are segments of letters, digits, '_' and '-' joined by single dots, "
        "for example orders.eu-west"
    )


class InvalidPayload(InvalidArgument):
    hint = "payloads must be plain JSON values: no NaN or Infinity, no objects JSON cannot encode"


class PayloadTooLarge(InvalidPayload):
    hint = "store large blobs elsewhere and append a reference, or raise Limits.max_payload_bytes"


class TopicConflict(InvalidArgument):
    hint = "a topic's partition count is fixed when it is created; create a new topic instead"


class NotFound(EventlogError, LookupError):
    hint = "check the name or id; list what exists with the matching 'eventlog' command"


class SchemaTooNew(EventlogError):
    hint = "upgrade eventlog to open this file"


class NotAnEventlogDatabase(EventlogError):
    hint = "point --db at an eventlog database, or restore this file from a backup"


class CorruptDatabase(NotAnEventlogDatabase):
    hint = "run 'eventlog doctor', then restore from a backup ('eventlog backup' makes one)"


class StorageError(EventlogError, OSError):
    hint = "check the file system the database lives on"


class ReadOnlyDatabase(StorageError):
    hint = "make the database file, its -wal/-shm files and its folder writable by this user"


class DiskFull(StorageError):
    hint = "free disk space (or prune old events with 'eventlog prune'), then retry"


class DatabaseBusy(StorageError):
    hint = "another process held the write lock too long; retry, or raise busy_timeout"


class UnsupportedFilesystem(StorageError):
    hint = (
        "put the database on a local file system: network file systems break SQLite's WAL and flock"
    )


class LogClosed(EventlogError, RuntimeError):
    hint = "open the log again; a closed log cannot be used"


class LogForked(EventlogError, RuntimeError):
    hint = (
        "open logs after fork(), in processes whose parent has none of them open: "
        "multiprocessing's 'spawn' or 'forkserver' start method, gunicorn without --preload"
    )


class GroupBusy(EventlogError):
    hint = "stop the group's consumers first (or pass --wait)"


class DeadLetterError(EventlogError):
    hint = "check the dead-letter file and its folder"


def translate(exc: BaseException) -> EventlogError:
    """Map an sqlite3 or OS error to the typed error a user can act on."""
    if isinstance(exc, EventlogError):
        return exc
    text = str(exc)
    low = text.lower()
    if isinstance(exc, sqlite3.Error):
        if "readonly" in low or "read-only" in low or "unable to open" in low:
            return ReadOnlyDatabase(f"cannot write the database: {text}")
        if "disk is full" in low or "database or disk is full" in low:
            return DiskFull(f"the database is full: {text}")
        if "not a database" in low:
            return NotAnEventlogDatabase(f"the file is not an SQLite database: {text}")
        if "malformed" in low or "corrupt" in low:
            return CorruptDatabase(f"the database file is damaged: {text}")
        if "locked" in low or "busy" in low:
            return DatabaseBusy(f"the database stayed locked: {text}")
        if "no such table" in low or "no such column" in low:
            return NotAnEventlogDatabase(f"the database lacks eventlog's tables: {text}")
        return StorageError(f"SQLite failed: {text}")
    if isinstance(exc, OSError):
        if exc.errno == errno.ENOSPC:
            return DiskFull(f"no space left: {text}")
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return ReadOnlyDatabase(f"permission denied: {text}")
        return StorageError(text)
    return EventlogError(text)
