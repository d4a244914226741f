"""Guarantee 1: an append that returned is durable, even when its process is SIGKILLed the
next instant (with durability "full" and "normal"; an OS crash is out of reach here)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from conftest import events_by_offset, integrity

import eventlog

ROUNDS = 3


@pytest.mark.parametrize("api", ["sync", "async"])
@pytest.mark.parametrize("durability", ["full", "normal"])
def test_every_reported_append_survives_sigkill(
    db_path: Path, spawn, durability: str, api: str
) -> None:
    rng = random.Random(f"{durability}-{api}")
    reported: dict[int, dict[str, int]] = {}
    for producer in range(ROUNDS):
        child = spawn(db_path, "append", json.dumps({
            "topic": "t", "count": 10**9, "producer": producer, "durability": durability,
            "api": api,
        }))  # fmt: skip
        child.wait_ready()
        # Kill at a random point mid-stream, right after some append returned.
        for _ in range(rng.randint(20, 400)):
            line = child.json()
            reported[line["offset"]] = {"p": producer, "seq": line["seq"]}
        child.kill()
        assert child.proc.returncode == -9

    assert integrity(db_path) == ["ok"]
    stored = events_by_offset(db_path)
    missing = {o for o in reported if o not in stored}
    assert not missing, f"reported offsets lost after SIGKILL: {sorted(missing)[:10]}"
    for offset, payload in reported.items():
        assert stored[offset][3] == payload

    # The log is usable afterwards and keeps counting upwards.
    with eventlog.open_sync(db_path, durability=durability) as log:
        assert log.append("t", "after") > max(stored)
