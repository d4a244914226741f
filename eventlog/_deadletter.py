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
from typing import Any

from ._core import check_name
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
        try:
            with open(self.path, "rb") as f:
                content = f.read()
        except FileNotFoundError:
            return None
        needle = f'"id":"{dead_letter_id}"'.encode()
        for raw in content.splitlines():
            if needle not in raw:
                continue
            try:
                entry = DeadLetter.from_dict(json.loads(raw))
            except (ValueError, TypeError):
                continue
            if entry.id == dead_letter_id:
                return entry
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
                listing.entries.append(DeadLetter.from_dict(json.loads(raw)))
            except (ValueError, TypeError):
                if number == len(lines) and not ends_clean:
                    listing.torn_tail = True
                else:
                    listing.bad_lines.append(number)
        return listing

    def rewrite(self, change: Callable[[DeadLetter], DeadLetter | None]) -> list[DeadLetter]:
        """Apply `change` to every entry under the lock (None drops it); returns the entries
        that changed or were dropped. Lines that are not entries are kept verbatim."""
        changed: list[DeadLetter] = []
        lock = self._locked()
        try:
            with lock:
                try:
                    with open(self.path, "rb") as f:
                        content = f.read()
                except FileNotFoundError:
                    return []
                out: list[bytes] = []
                for raw in content.splitlines():
                    try:
                        entry = DeadLetter.from_dict(json.loads(raw))
                    except (ValueError, TypeError):
                        if raw.strip():
                            out.append(raw)
                        continue
                    new = change(entry)
                    if new is not entry:
                        changed.append(entry)
                    if new is not None:
                        out.append(json.dumps(new.to_dict(), ensure_ascii=False,
                                              separators=(",", ":")).encode("utf-8"))  # fmt: skip
                if not changed:
                    return []
                tmp = self.path.with_name(self.path.name + f".tmp-{os.getpid()}")
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
                try:
                    data = b"".join(line + b"\n" for line in out)
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view) :]
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(tmp, self.path)
                fsync_folder(self.path.parent)
        except OSError as exc:
            raise DeadLetterError(
                f"cannot rewrite the dead-letter file {self.path}: {exc}"
            ) from exc
        finally:
            lock.close()
        return changed


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


def fsync_folder(folder: os.PathLike[str]) -> None:
    """Make a rename or a new file in the folder durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    listing = file.read()
    chosen = select(listing.entries, ids=ids, group=group, include_requeued=include_requeued)
    if ids is not None:
        missing = {check_id(i) for i in ids} - {e.id for e in select(listing.entries, ids=ids)}
        if missing:
            raise NotFound(f"no dead letter with id {', '.join(sorted(missing))}")
    return chosen


def mark_requeued(file: DeadLetterFile, ids: set[str], at_ms: int) -> list[DeadLetter]:
    def change(entry: DeadLetter) -> DeadLetter:
        if entry.id in ids and entry.requeued_at_ms is None:
            return replace(entry, requeued_at_ms=at_ms)
        return entry

    return file.rewrite(change)


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
