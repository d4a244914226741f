"""Guarantee 2 across processes: concurrent producers get unique, growing offsets, and each
producer's events keep its own order."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import events_by_offset, integrity

import eventlog

PRODUCERS = 4
PER_PRODUCER = 2000


def test_concurrent_producers_get_unique_increasing_offsets_in_their_own_order(
    db_path: Path, spawn
) -> None:
    # Two producers on each API; all of them open the brand-new file at the same moment.
    # One async producer uses durability "normal", where the async shell commits on the
    # loop thread: both of its write paths contend.
    options = [
        {
            "topic": "orders",
            "count": PER_PRODUCER,
            "producer": p,
            "gate": True,
            "api": "async" if p % 2 else "sync",
            "durability": "normal" if p % 4 == 3 else "full",
        }
        for p in range(PRODUCERS)
    ]
    children = [spawn(db_path, "append", json.dumps(o)) for o in options]
    for child in children:
        child.wait_ready()
    for child in children:
        child.send("go")
    reported: dict[int, list[tuple[int, int]]] = {}
    for p, child in enumerate(children):
        lines = child.rest(timeout=120)
        assert child.finish() == 0, child.stderr
        reported[p] = [(d["offset"], d["seq"]) for d in map(json.loads, lines)]

    stored = events_by_offset(db_path)
    assert len(stored) == PRODUCERS * PER_PRODUCER
    all_reported = [o for rows in reported.values() for o, _ in rows]
    assert len(set(all_reported)) == len(all_reported), "an offset was handed out twice"
    assert set(all_reported) == set(stored)

    for p, rows in reported.items():
        assert [seq for _, seq in rows] == list(range(PER_PRODUCER))
        offsets = [o for o, _ in rows]
        assert offsets == sorted(offsets), f"producer {p} got a smaller offset later"
        for offset, seq in rows:
            assert stored[offset][3] == {"p": p, "seq": seq}

    # In offset order, each producer's sequence numbers run 0, 1, 2, ... with nothing missing.
    next_seq = dict.fromkeys(range(PRODUCERS), 0)
    for offset in sorted(stored):
        payload = stored[offset][3]
        assert payload["seq"] == next_seq[payload["p"]]
        next_seq[payload["p"]] += 1

    with eventlog.open_sync(db_path) as log:
        (info,) = log.topics()
    assert (info.events, info.last_offset) == (PRODUCERS * PER_PRODUCER, max(stored))
    assert integrity(db_path) == ["ok"]
