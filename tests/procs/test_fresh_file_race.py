"""Processes that open one brand-new file at the same moment all succeed, and each migration
is applied and recorded exactly once."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import integrity, raw

from eventlog import _db

ROUNDS = 4
OPENERS = 4


def test_processes_opening_a_fresh_file_at_once_all_succeed_and_migrate_once(
    tmp_path: Path, spawn
) -> None:
    expected = [(m.version, m.name) for m in _db.load_migrations()]
    for round_ in range(ROUNDS):
        db = tmp_path / f"fresh{round_}.db"
        children = [
            spawn(db, "open", json.dumps({"api": "async" if i % 2 else "sync"}))
            for i in range(OPENERS)
        ]
        for child in children:
            child.wait_ready()
        # Every child is past its imports and blocked on stdin: release them together.
        for child in children:
            child.send("go")
        results = [child.json(timeout=60) for child in children]
        for child in children:
            assert child.finish() == 0, child.stderr
        assert all(r.get("ok") for r in results), results
        offsets = sorted(r["offset"] for r in results)
        assert len(set(offsets)) == OPENERS

        with raw(db) as conn:
            recorded = conn.execute(
                "SELECT version, name FROM eventlog_schema ORDER BY version"
            ).fetchall()
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert conn.execute("SELECT count(*) FROM eventlog_events").fetchone()[0] == OPENERS
        assert recorded == expected
        assert integrity(db) == ["ok"]
