"""The schema version of a database: the newest this eventlog ships, a file's own (read
without migrating it), and a plan that reads it. Applying migrations is `_db.migrate`.
"""

from __future__ import annotations

from . import _db, _sql
from ._core import Plan, Stmt


def latest_schema_version() -> int:
    migrations = _db.load_migrations()
    return migrations[-1].version if migrations else 0


def schema_version_of(paths: _db.Paths) -> int:
    """The schema version of an existing file, read without migrating it (0: none)."""
    return _db.probe_schema_version(paths)


def schema_version_plan() -> Plan[int]:
    rows = yield Stmt(_sql.SCHEMA_VERSION)
    return int(rows[0][0])
