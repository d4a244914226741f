"""eventlog: a durable, replayable event log in one SQLite file, with consumer groups."""

from __future__ import annotations

import os
from typing import Literal

from ._async import AsyncLog, AsyncWaiter, open
from ._consumer import Consumer, ConsumerStats
from ._core import Event, Limits, TopicInfo
from ._deadletter import DeadLetter
from ._groups import LanePosition
from ._members import MemberInfo
from ._sync import Draft, SyncLog, WaitResult, append_in_transaction
from .errors import (
    CorruptDatabase,
    DatabaseBusy,
    DeadLetterError,
    DiskFull,
    EventlogError,
    GroupBusy,
    InvalidArgument,
    InvalidName,
    InvalidPayload,
    LogClosed,
    LogForked,
    NotAnEventlogDatabase,
    NotFound,
    PayloadTooLarge,
    ReadOnlyDatabase,
    SchemaTooNew,
    StorageError,
    TopicConflict,
    UnsupportedFilesystem,
)

__version__ = "0.1.0"


def open_sync(
    path: str | os.PathLike[str],
    *,
    durability: Literal["full", "normal"] = "full",
    busy_timeout: float = 10.0,
    limits: Limits | None = None,
    default_partitions: int = 1,
    create: bool = True,
    allow_network_fs: bool = False,
) -> SyncLog:
    """Open (creating and migrating if needed) the log at `path`, blocking API.

    Same options and semantics as `eventlog.open`; use it as a context manager.
    """
    return SyncLog(path, durability=durability, busy_timeout=busy_timeout,
                   limits=limits or Limits(), default_partitions=default_partitions,
                   create=create, allow_network_fs=allow_network_fs)  # fmt: skip


__all__ = [
    "AsyncLog",
    "AsyncWaiter",
    "Consumer",
    "ConsumerStats",
    "CorruptDatabase",
    "DatabaseBusy",
    "DeadLetter",
    "DeadLetterError",
    "DiskFull",
    "Draft",
    "Event",
    "EventlogError",
    "GroupBusy",
    "InvalidArgument",
    "InvalidName",
    "InvalidPayload",
    "LanePosition",
    "Limits",
    "LogClosed",
    "LogForked",
    "MemberInfo",
    "NotAnEventlogDatabase",
    "NotFound",
    "PayloadTooLarge",
    "ReadOnlyDatabase",
    "SchemaTooNew",
    "StorageError",
    "SyncLog",
    "TopicConflict",
    "TopicInfo",
    "UnsupportedFilesystem",
    "WaitResult",
    "__version__",
    "append_in_transaction",
    "open",
    "open_sync",
]
