"""The dead-letter file: one JSON object per line, beside the database, for people to read.

Appends are one write() of the whole line to an O_APPEND descriptor under an exclusive flock
on a lock file, then fsync, so a line is never interleaved and survives power loss before a
group's position moves past its event. Rewrites (requeue marks, purge) go through a temporary
file and an atomic rename under the same lock. A torn last line (a crash mid-write) is
reported and skipped, never fatal; unreadable lines are kept as they are on rewrite.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ._core import MAX_INT64, check_name, utf8_text
from ._db import Paths
from ._locks import FileLock
from .errors import DeadLetterError, InvalidArgument, NotFound, translate

# A dead-letter write waits this long for another process's write or rewrite, then fails
# (the consumer keeps the event and retries): a stuck holder must not hang a consumer.
LOCK_TIMEOUT_S = 10.0

_ID_RE = re.compile(r"[0-9a-f]{12}")


def new_id() -> str:
    return secrets.token_hex(6)


def check_id(value: object) -> str:
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        raise InvalidArgument(f"invalid dead-letter id {value!r}: ids are 12 hex digits")
    return value


@dataclass(frozen=True)
class DeadLetter:
    """One dead-lettered event, as stored in the file (see README for the field list)."""

    id: str
    group: str
    topic: str
    partition: int
    offset: int
    key: str | None
    payload: Any
    headers: dict[str, str]
    event_time_ms: int
    attempts: int
    first_failed_at_ms: int | None
    last_failed_at_ms: int | None
    error_type: str
    error_message: str
    traceback: str
    dead_lettered_at_ms: int
    requeued_at_ms: int | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeadLetter:
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    @property
    def requeued(self) -> bool:
        return self.requeued_at_ms is not None

    @property
    def dead_lettered_at(self) -> datetime:
        return datetime.fromtimestamp(self.dead_lettered_at_ms / 1000, UTC)


_TEXTS = ("id", "group", "topic", "error_type", "error_message", "traceback")
_COUNTS = ("partition", "offset", "attempts")
_TIMES = ("event_time_ms", "dead_lettered_at_ms")
_OPTIONAL_TIMES = ("first_failed_at_ms", "last_failed_at_ms", "requeued_at_ms")
MAX_TIME_MS = 253_402_300_799_999  # 9999-12-31 23:59:59.999 UTC, the last time datetime holds
# A JSON escape of a lone surrogate (a hand-edited line, or another tool's json.dumps): the
# text it stands for cannot be written out as UTF-8 again.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def parse_entry(raw: bytes) -> DeadLetter:
    """One line of the file as an entry; ValueError or TypeError if it is not one: not JSON,
    nested too deep, not an object, a field missing or of the wrong type, a time past what a
    datetime holds. Text that UTF-8 cannot hold comes back escaped (utf8_text)."""
    try:
        data = json.loads(raw)
        if _SURROGATE_ESCAPE.search(raw):
            data = _utf8_everywhere(data)
    except RecursionError as exc:
        raise ValueError("nested too deep") from exc
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    if not all(isinstance(data.get(name), str) for name in _TEXTS):
        raise ValueError("a text field is missing or not text")
    if data.get("key") is not None and not isinstance(data["key"], str):
        raise ValueError("key is not text")
    headers = data.get("headers")
    if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
        raise ValueError("headers are not an object of texts")
    for name in _COUNTS + _TIMES + _OPTIONAL_TIMES:
        value = data.get(name)
        if value is None and name in _OPTIONAL_TIMES:
            continue
        ceiling = MAX_INT64 if name in _COUNTS else MAX_TIME_MS
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= ceiling:
            raise ValueError(f"{name} is not a whole number in range")
    return DeadLetter.from_dict(data)


def _line_with(raw: bytes, entry: DeadLetter) -> bytes:
    """The line of `entry`, a changed version of the entry on line `raw`: the fields of the
    line that a DeadLetter does not know (another version's, a person's note) are kept."""
    data = json.loads(raw)
    if _SURROGATE_ESCAPE.search(raw):
        data = _utf8_everywhere(data)
    data.update(entry.to_dict())
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _utf8_everywhere(value: Any) -> Any:
    if isinstance(value, str):
        return utf8_text(value)
    if isinstance(value, list):
        return [_utf8_everywhere(v) for v in value]
    if isinstance(value, dict):
        return {utf8_text(k): _utf8_everywhere(v) for k, v in value.items()}
    return value


@dataclass
class Listing:
    """What reading the file found: the entries, and the lines it could not read."""

    entries: list[DeadLetter] = field(default_factory=list)
    bad_lines: list[int] = field(default_factory=list)  # 1-based line numbers
    torn_tail: bool = False


class DeadLetterFile:
    def __init__(self, paths: Paths) -> None:
        self.path = paths.deadletter
        self.lock_path = paths.deadletter_lock

    def _locked(self) -> FileLock:
        try:
            return FileLock(self.lock_path, timeout=LOCK_TIMEOUT_S)
        except OSError as exc:
            raise DeadLetterError(f"cannot open {self.lock_path}: {exc}") from exc

    def append(self, entry: DeadLetter, *, once: bool = False) -> DeadLetter:
        """Append one line and fsync it; raises DeadLetterError if it cannot be made durable.

        With `once`, an entry already in the file with the same id stands for this one (its
        writer died before it could commit past the event): nothing is written, and that
        entry is returned."""
        line = json.dumps(entry.to_dict(), ensure_ascii=False, separators=(",", ":")) + "\n"
        data = line.encode("utf-8")
        lock = self._locked()
        try:
            with lock:
                if once:
                    earlier = self._entry_with_id(entry.id)
                    if earlier is not None:
                        # its writer may have died (or failed to fsync, or to fsync the
                        # new file's folder) after the write: durable before it stands for
                        # this one
                        fsync_file(self.path)
                        fsync_folder(self.path.parent)
                        return earlier
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                             0o600)  # fmt: skip
                try:
                    size = os.fstat(fd).st_size
                    if size and _last_byte(self.path, size) != b"\n":
                        data = b"\n" + data  # end a torn line so ours stands alone
                    if os.write(fd, data) != len(data):
                        raise OSError("short write to the dead-letter file")
                    os.fsync(fd)
                finally:
                    os.close(fd)
                if size == 0:
                    fsync_folder(self.path.parent)
        except OSError as exc:
            raise DeadLetterError(
                f"cannot write the dead-letter file {self.path}: {exc}",
                hint="make the file and its folder writable; the event stays unacknowledged",
            ) from exc
        finally:
            lock.close()
        return entry

    def _entry_with_id(self, dead_letter_id: str) -> DeadLetter | None:
        """The entry with this id, if the file has it (call under the lock)."""
        needle = f'"id":"{dead_letter_id}"'.encode()
        try:
            with open(self.path, "rb") as f:
                for raw in f:  # a line at a time: the file may be large
                    if needle not in raw:
                        continue
                    try:
                        entry = parse_entry(raw)
                    except (ValueError, TypeError):
                        continue
                    if entry.id == dead_letter_id:
                        return entry
        except FileNotFoundError:
            return None
        return None

    def read(self) -> Listing:
        listing = Listing()
        try:
            with open(self.path, "rb") as f:
                content = f.read()
        except FileNotFoundError:
            return listing
        except OSError as exc:
            raise translate(exc) from exc
        lines = content.split(b"\n")
        ends_clean = content.endswith(b"\n")
        if ends_clean:
            lines.pop()
        for number, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            try:
                listing.entries.append(parse_entry(raw))
            except (ValueError, TypeError):
                if number == len(lines) and not ends_clean:
                    listing.torn_tail = True
                else:
                    listing.bad_lines.append(number)
        return listing

    def rewrite(self, change: Callable[[DeadLetter], DeadLetter | None]) -> list[DeadLetter]:
        """Apply `change` to every entry under the lock (None drops it); returns the entries
        that changed or were dropped. Lines that are not entries, and entries left unchanged,
        are kept verbatim."""
        with self.prepare_rewrite(change) as rewrite:
            rewrite.commit()
        return rewrite.changed

    def prepare_rewrite(self, change: Callable[[DeadLetter], DeadLetter | None]) -> Rewrite:
        """The rewrite `change` makes, written to a temporary file and fsynced under the lock,
        not yet in place: a change to the database that goes with it is made between this
        and Rewrite.commit(), so that whatever can fail in the file fails before it."""
        lock = self._locked()
        try:
            lock.__enter__()
            self._remove_stale_copies()
            try:
                with open(self.path, "rb") as f:
                    content = f.read()
            except FileNotFoundError:
                return Rewrite(self.path, lock, None, [])
            out: list[bytes] = []
            changed: list[DeadLetter] = []
            for raw in content.splitlines():
                try:
                    entry = parse_entry(raw)
                except (ValueError, TypeError):
                    if raw.strip():
                        out.append(raw)
                    continue
                new = change(entry)
                if new is entry:
                    out.append(raw)  # untouched: kept as it is, fields we do not know too
                    continue
                changed.append(entry)
                if new is not None:
                    out.append(_line_with(raw, new))
            if not changed:
                return Rewrite(self.path, lock, None, [])
            tmp = self.path.with_name(self.path.name + f".tmp-{os.getpid()}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                data = b"".join(line + b"\n" for line in out)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            finally:
                os.close(fd)
            return Rewrite(self.path, lock, tmp, changed)
        except OSError as exc:
            lock.close()
            raise DeadLetterError(
                f"cannot rewrite the dead-letter file {self.path}: {exc}"
            ) from exc
        except BaseException:
            lock.close()
            raise

    def _remove_stale_copies(self) -> None:
        """Remove the temporary copies of rewrites whose process died before renaming or
        removing them (kill -9 mid-requeue): each is a whole copy of the file, payloads and
        all. Under the lock, so no live rewrite's copy is among them."""
        prefix = self.path.name + ".tmp-"
        try:
            for stale in self.path.parent.iterdir():
                if stale.name.startswith(prefix) and stale.name[len(prefix) :].isdigit():
                    stale.unlink(missing_ok=True)
        except OSError:
            pass  # tidying only: the rewrite does not depend on it


class Rewrite:
    """A rewrite of the dead-letter file waiting, under the file's lock, in a fsynced temporary
    file: commit() renames it into place, leaving the `with` block without commit drops it.
    Either lets the lock go."""

    def __init__(self, path: Path, lock: FileLock, tmp: Path | None,
                 changed: list[DeadLetter]) -> None:  # fmt: skip
        self.path, self.changed = path, changed
        self._lock: FileLock | None = lock
        self._tmp = tmp

    def commit(self) -> None:
        try:
            if self._tmp is not None:
                os.replace(self._tmp, self.path)
                self._tmp = None
                fsync_folder(self.path.parent)
        except OSError as exc:
            raise DeadLetterError(
                f"cannot rewrite the dead-letter file {self.path}: {exc}"
            ) from exc
        finally:
            self.drop()

    def drop(self) -> None:
        """Leave the file as it was: remove the temporary file, let the lock go."""
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def __enter__(self) -> Rewrite:
        return self

    def __exit__(self, *exc: object) -> None:
        self.drop()


def select(
    entries: Iterable[DeadLetter],
    *,
    ids: Iterable[str] | None = None,
    group: str | None = None,
    topic: str | None = None,
    since_ms: int | None = None,
    include_requeued: bool = True,
) -> list[DeadLetter]:
    wanted = {check_id(i) for i in ids} if ids is not None else None
    # a filter that could never match is a mistake worth saying, like everywhere else
    if group is not None:
        check_name(group, "group")
    if topic is not None:
        check_name(topic, "topic")
    return [
        e
        for e in entries
        if (wanted is None or e.id in wanted)
        and (group is None or e.group == group)
        and (topic is None or e.topic == topic)
        and (since_ms is None or e.dead_lettered_at_ms >= since_ms)
        and (include_requeued or not e.requeued)
    ]


def _last_byte(path: os.PathLike[str], size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(size - 1)
        return f.read(1)


def fsync_file(path: os.PathLike[str], flags: int = 0) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_folder(folder: os.PathLike[str]) -> None:
    """Make a rename or a new file in the folder durable."""
    fsync_file(folder, os.O_DIRECTORY)


def choose(
    file: DeadLetterFile,
    ids: Iterable[str] | None,
    group: str | None,
    everything: bool,
    *,
    include_requeued: bool,
) -> list[DeadLetter]:
    """The entries a requeue or purge acts on: by id, by group, or all (one must be said)."""
    if ids is None and group is None and not everything:
        raise InvalidArgument("say which dead letters: ids, a group, or all")
    if ids is not None:
        if isinstance(ids, str):
            ids = [ids]  # one id, not its characters
        elif not isinstance(ids, Iterable):
            raise InvalidArgument(f"ids must be dead-letter ids, got {ids!r}")
        ids = [check_id(i) for i in ids]
    listing = file.read()
    chosen = select(listing.entries, ids=ids, group=group, include_requeued=include_requeued)
    if ids is not None:
        missing = {check_id(i) for i in ids} - {e.id for e in select(listing.entries, ids=ids)}
        if missing:
            raise NotFound(f"no dead letter with id {', '.join(sorted(missing))}")
    return chosen


def prepare_requeue_marks(file: DeadLetterFile, ids: set[str], at_ms: int) -> Rewrite:
    """Mark the entries with these ids requeued, those not marked yet (Rewrite.changed); the
    redeliveries are requested between this and commit(): a crash in between redelivers and
    leaves the entries pending (a second requeue asks for nothing new), and a file that
    cannot be rewritten fails before the database changes."""

    def change(entry: DeadLetter) -> DeadLetter:
        if entry.id in ids and entry.requeued_at_ms is None:
            return replace(entry, requeued_at_ms=at_ms)
        return entry

    return file.prepare_rewrite(change)


def drop(file: DeadLetterFile, ids: set[str]) -> list[DeadLetter]:
    return file.rewrite(lambda entry: None if entry.id in ids else entry)


# -- counts -----------------------------------------------------------------------------------


@dataclass
class DeadLetterCounts:
    total: int = 0
    pending: int = 0
    requeued: int = 0
    unreadable_lines: int = 0
    torn_tail: bool = False
    by_group: dict[str, int] = field(default_factory=dict)  # pending per group


def dead_letter_counts(paths: Paths) -> DeadLetterCounts:
    listing = DeadLetterFile(paths).read()
    counts = DeadLetterCounts(unreadable_lines=len(listing.bad_lines), torn_tail=listing.torn_tail)
    for entry in listing.entries:
        counts.total += 1
        if entry.requeued:
            counts.requeued += 1
        else:
            counts.pending += 1
            counts.by_group[entry.group] = counts.by_group.get(entry.group, 0) + 1
    return counts


def filtered(
    paths: Paths,
    *,
    group: str | None = None,
    topic: str | None = None,
    since_ms: int | None = None,
    include_requeued: bool = True,
) -> Listing:
    """The file's entries that pass the filters, with the lines it could not read."""
    listing = DeadLetterFile(paths).read()
    listing.entries = select(
        listing.entries, group=group, topic=topic, since_ms=since_ms,
        include_requeued=include_requeued,
    )  # fmt: skip
    return listing
