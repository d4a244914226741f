"""Group membership on flock: a member file per live member, a lock file per lane.

Members count live members by trying the member locks; a lane is handled only while its
owner holds the lane's lock. The kernel frees both the instant a process dies, so failover
needs no lease timeouts. Lane lock files are never deleted (deleting one while it is held
would let a second process "own" a fresh file of the same name); a member file is deleted
only by whoever holds its lock, and its name is never reused.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._core import Lane, check_name
from ._db import Paths
from ._locks import FileLock, is_locked, try_remove_stale


def lane_file_name(lane: Lane) -> str:
    # '~' never appears in a topic name, so the name maps back to exactly one lane
    return f"{lane[0]}~{lane[1]}.lock"


@dataclass(frozen=True)
class MemberInfo:
    member_id: str
    alive: bool
    heartbeat: dict[str, Any] | None
    path: Path

    @property
    def heartbeat_age_s(self) -> float | None:
        if not self.heartbeat or "time" not in self.heartbeat:
            return None
        return max(0.0, time.time() - float(self.heartbeat["time"]))


def group_folders(paths: Paths, group: str) -> tuple[Path, Path]:
    check_name(group, "group")
    base = paths.group_folder(group)
    return base / "members", base / "lanes"


def list_members(paths: Paths, group: str, *, remove_stale: bool = False) -> list[MemberInfo]:
    """Every member file of the group, live or not (read-only unless remove_stale)."""
    members_dir, _ = group_folders(paths, group)
    try:
        names = sorted(os.listdir(members_dir))
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        if not name.endswith(".lock"):
            continue
        path = members_dir / name
        alive = is_locked(path)
        if not alive and remove_stale:
            try_remove_stale(path)
            continue
        found.append(MemberInfo(name[:-5], alive, _read_note(path), path))
    return found


def list_groups(paths: Paths) -> list[str]:
    try:
        return sorted(os.listdir(paths.sidecar / "groups"))
    except FileNotFoundError:
        return []


def _read_note(path: Path) -> dict[str, Any] | None:
    try:
        text = path.read_text(encoding="utf-8")
        note = json.loads(text) if text else None
    except (OSError, ValueError):
        return None  # a heartbeat being rewritten right now
    return note if isinstance(note, dict) else None


class Membership:
    """This process's seat in a group: its member lock and the lane locks it holds."""

    def __init__(self, paths: Paths, group: str) -> None:
        self.group = group
        self.members_dir, self.lanes_dir = group_folders(paths, group)
        for folder in (paths.sidecar / "groups", self.members_dir.parent, self.members_dir,
                       self.lanes_dir):  # fmt: skip
            folder.mkdir(mode=0o700, exist_ok=True)
        self.member_id = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        # Lock first, then rename into place: a file others can see is always already held,
        # so nobody mistakes a member being born for a dead one and deletes it.
        lock = FileLock(self.members_dir / f".{self.member_id}.tmp")
        lock.acquire(blocking=False)
        final = self.members_dir / f"{self.member_id}.lock"
        os.rename(lock.path, final)
        lock.path = final
        self._member_lock = lock
        self._lane_locks: dict[Lane, FileLock] = {}

    def live_members(self) -> list[str]:
        alive = [self.member_id]
        for info in list_members_of(self.members_dir, skip=self.member_id):
            alive.append(info)
        return sorted(alive)

    def try_take(self, lane: Lane) -> bool:
        lock = self._lane_locks.get(lane)
        if lock is None:
            lock = FileLock(self.lanes_dir / lane_file_name(lane))
            self._lane_locks[lane] = lock  # kept open: the file is locked and unlocked in place
        return lock.held or lock.acquire(blocking=False)

    def release(self, lane: Lane) -> None:
        lock = self._lane_locks.get(lane)
        if lock is not None:
            lock.release()

    def heartbeat(self, lanes: list[Lane], extra: dict[str, Any] | None = None) -> None:
        note = {
            "member": self.member_id,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "time": time.time(),
            "lanes": [[t, p] for t, p in sorted(lanes)],
            **(extra or {}),
        }
        self._member_lock.write_note(json.dumps(note, separators=(",", ":")))

    def close(self) -> None:
        for lock in self._lane_locks.values():
            lock.close()
        self._lane_locks.clear()
        if os.getpid() == self._member_lock._pid:
            # Still holding it: nobody else can believe they own this (never reused) name.
            self._member_lock.path.unlink(missing_ok=True)
        self._member_lock.close()


def list_members_of(members_dir: Path, *, skip: str) -> list[str]:
    """Ids of live members in the folder; stale files are removed as they are found."""
    alive: list[str] = []
    try:
        names = os.listdir(members_dir)
    except FileNotFoundError:
        return alive
    for name in names:
        if not name.endswith(".lock") or name[:-5] == skip:
            continue
        path = members_dir / name
        if is_locked(path):
            alive.append(name[:-5])
        else:
            try_remove_stale(path)
    return alive


# -- what operators see -----------------------------------------------------------------------

STALE_HEARTBEAT_S = 10.0  # members heartbeat every half second; this long means stuck


@dataclass(frozen=True)
class MemberView:
    member_id: str
    alive: bool  # holds its member lock: the process exists
    pid: int | None
    host: str | None
    lanes: list[Lane]
    heartbeat_age_s: float | None
    stale: bool  # alive, but no heartbeat for longer than the threshold


def member_views(
    paths: Paths, group: str, stale_after_s: float = STALE_HEARTBEAT_S
) -> list[MemberView]:
    """The group's members as its heartbeats describe them (read-only)."""
    views = []
    for m in list_members(paths, group):
        note = m.heartbeat or {}
        age = m.heartbeat_age_s
        lanes = [(str(t), int(p)) for t, p in note.get("lanes", [])]
        pid = note.get("pid")
        stale = m.alive and (age is None or age > stale_after_s)
        views.append(MemberView(m.member_id, m.alive, int(pid) if pid is not None else None,
                                note.get("host"), lanes, age, stale))  # fmt: skip
    return views


def live_member_pids(paths: Paths, group: str) -> list[str]:
    """The pids of the group's live members (a member id where the pid is not known yet)."""
    return [str(v.pid if v.pid is not None else v.member_id)
            for v in member_views(paths, group) if v.alive]  # fmt: skip
