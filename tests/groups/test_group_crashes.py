"""Guarantees 3 and 4 across real processes: a member SIGKILLed between handling and commit
redelivers and skips nothing; an event that kills its process is dead-lettered after
max_attempts restarts while its batch neighbours are handled; a graceful stop (SIGTERM)
commits what it handled and delivers nothing twice."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

import eventlog

from .conftest import (
    attempt_rows,
    calls,
    deadletter_entries,
    lane_row,
    lock_is_free,
    log_events,
    position,
    read_journal,
    wait_until,
)


@pytest.mark.parametrize("api", ["async", "sync"])
def test_sigkill_between_handling_and_commit_redelivers_and_skips_nothing(
    db: Path, journal: Path, members, api: str
) -> None:
    with eventlog.open_sync(db) as log:
        offsets = [log.append("t", {"n": i}) for i in range(10)]

    first = members(db, journal, "--topic", "t", "--api", api, "--batch-size", "4",
                    "--stall-after-batch")  # fmt: skip
    first.wait_ready()
    stalled = wait_until(lambda: calls(read_journal(journal), "stalled"), what="first batch")
    assert stalled[0]["done"] == offsets[3]
    # Handled, not committed: the batch is still marked in flight.
    assert lane_row(db, "g", "t") == (0, offsets[0], offsets[3])
    first.kill()

    handled_before = {r["offset"] for r in calls(read_journal(journal), "end", pid=first.pid)}
    assert handled_before == set(offsets[:4])

    second = members(db, journal, "--topic", "t", "--api", api, "--batch-size", "4")
    second.wait_ready()
    wait_until(lambda: position(db, "g", "t") == offsets[-1], what="the rest handled")

    records = read_journal(journal)
    redelivered = [r["offset"] for r in calls(records, "start", pid=second.pid)]
    # Everything handled but not committed comes again, in order, then the rest.
    assert redelivered == offsets
    stored = {row[0] for row in log_events(db, "t")}
    ok = {r["offset"] for r in calls(records, "end", outcome="ok")}
    assert stored <= ok, f"skipped: {sorted(stored - ok)}"
    assert lane_row(db, "g", "t") == (offsets[-1], None, None)
    assert attempt_rows(db) == []
    assert deadletter_entries(db) == []


def test_event_that_kills_its_process_is_dead_lettered_after_max_attempts_restarts(
    db: Path, journal: Path, members
) -> None:
    max_attempts = 3
    with eventlog.open_sync(db) as log:
        # One batch: two innocent events, the poison one, two more innocent ones.
        drafts = [eventlog.Draft("t", {"n": i}) for i in range(2)]
        drafts.append(eventlog.Draft("t", {"n": 2, "do": "exit"}))
        drafts += [eventlog.Draft("t", {"n": i}) for i in range(3, 5)]
        offsets = log.append_many(drafts)
    poison = offsets[2]

    deaths = 0
    for _ in range(max_attempts + 3):  # bounded restarts
        member = members(db, journal, "--topic", "t", "--max-attempts", max_attempts)
        wait_until(lambda m=member: not m.alive() or position(db, "g", "t") == offsets[-1],
                   timeout=30, what="the member to die or finish")  # fmt: skip
        if position(db, "g", "t") == offsets[-1]:
            member.signal(signal.SIGTERM)
            assert member.wait_exit() == 0, member.stderr
            break
        assert member.wait_exit() == 1, member.stderr
        deaths += 1
    else:
        pytest.fail(f"not done after {deaths} deaths")

    records = read_journal(journal)
    assert deaths == max_attempts
    assert len(calls(records, "start", offset=poison)) == max_attempts
    entries = deadletter_entries(db)
    assert [(e["offset"], e["attempts"], e["group"]) for e in entries] == [
        (poison, max_attempts, "g")
    ]
    assert entries[0]["error_type"] == "ProcessDied"
    assert entries[0]["payload"] == {"n": 2, "do": "exit"}
    for neighbour in offsets[:2] + offsets[3:]:
        assert calls(records, "end", offset=neighbour, outcome="ok"), neighbour
    assert lane_row(db, "g", "t") == (offsets[-1], None, None)
    assert attempt_rows(db) == []


def restart_until_done(
    db: Path, journal: Path, members, last: int, bound: int, *options: object
) -> int:
    """Start members one after another until the group's position reaches `last`; returns
    how many died (each must exit 1, the handler's os._exit, or 70, a hard timeout)."""
    deaths = 0
    for _ in range(bound):
        member = members(db, journal, "--topic", "t", *options)
        wait_until(lambda m=member: not m.alive() or position(db, "g", "t") == last,
                   timeout=30, what="the member to die or finish")  # fmt: skip
        if position(db, "g", "t") == last:
            member.signal(signal.SIGTERM)
            assert member.wait_exit() == 0, member.stderr
            return deaths
        assert member.wait_exit() in (1, 70), member.stderr
        deaths += 1
    pytest.fail(f"not done after {deaths} deaths")


def test_two_events_that_kill_their_process_in_one_batch_each_get_max_attempts_calls(
    db: Path, journal: Path, members
) -> None:
    max_attempts = 3
    with eventlog.open_sync(db) as log:
        offsets = log.append_many([
            eventlog.Draft("t", {"n": i, **({"do": "exit"} if i in (1, 3) else {})})
            for i in range(5)
        ])  # fmt: skip
    deaths = restart_until_done(db, journal, members, offsets[-1], 2 * max_attempts + 3,
                                "--max-attempts", max_attempts)  # fmt: skip

    records = read_journal(journal)
    for poison in (offsets[1], offsets[3]):
        assert len(calls(records, "start", offset=poison)) == max_attempts, (
            f"offset {poison}: dead-lettered after"
            f" {len(calls(records, 'start', offset=poison))} calls, not {max_attempts}"
        )
    assert deaths == 2 * max_attempts
    entries = deadletter_entries(db)
    assert sorted((e["offset"], e["attempts"]) for e in entries) == [
        (offsets[1], max_attempts), (offsets[3], max_attempts)
    ]  # fmt: skip
    for innocent in (offsets[0], offsets[2], offsets[4]):
        assert calls(records, "end", offset=innocent, outcome="ok"), innocent


def test_a_hung_event_and_a_killing_event_in_one_batch_each_get_max_attempts_calls(
    db: Path, journal: Path, members
) -> None:
    max_attempts = 3
    kinds = [{}, {"do": "hang"}, {}, {"do": "exit"}, {}]
    with eventlog.open_sync(db) as log:
        offsets = log.append_many([eventlog.Draft("t", {"n": i, **kind})
                                   for i, kind in enumerate(kinds)])  # fmt: skip
    deaths = restart_until_done(db, journal, members, offsets[-1], 2 * max_attempts + 3,
                                "--max-attempts", max_attempts, "--hard-timeout", "0.5",
                                "--sync-handler")  # fmt: skip

    records = read_journal(journal)
    for poison in (offsets[1], offsets[3]):
        got = len(calls(records, "start", offset=poison))
        assert got == max_attempts, f"offset {poison}: {got} calls, not {max_attempts}"
    assert deaths == 2 * max_attempts
    entries = {e["offset"]: e for e in deadletter_entries(db)}
    assert sorted(entries) == [offsets[1], offsets[3]]
    assert entries[offsets[1]]["error_type"] == "HardTimeout"
    assert entries[offsets[3]]["error_type"] == "ProcessDied"
    assert {e["attempts"] for e in entries.values()} == {max_attempts}
    for innocent in (offsets[0], offsets[2], offsets[4]):
        assert calls(records, "end", offset=innocent, outcome="ok"), innocent


def test_batch_handler_past_hard_timeout_dead_letters_only_the_hung_event(
    db: Path, journal: Path, members
) -> None:
    with eventlog.open_sync(db) as log:
        offsets = log.append_many([eventlog.Draft("t", {"n": i, **({"do": "hang"} if i == 2
                                                                  else {})})
                                   for i in range(5)])  # fmt: skip
    restart_until_done(db, journal, members, offsets[-1], 6, "--batch-handler",
                       "--max-attempts", 1, "--hard-timeout", "0.5")  # fmt: skip

    entries = deadletter_entries(db)
    assert [(e["offset"], e["error_type"]) for e in entries] == [(offsets[2], "HardTimeout")]
    records = read_journal(journal)
    for innocent in offsets[:2] + offsets[3:]:
        assert calls(records, "end", offset=innocent, outcome="ok"), innocent
    assert attempt_rows(db) == []


def test_death_between_dead_letter_and_commit_does_not_dead_letter_twice(
    db: Path, journal: Path, members
) -> None:
    with eventlog.open_sync(db) as log:
        offsets = log.append_many(
            [eventlog.Draft("t", {"n": i, **({"do": "raise"} if i == 1 else {})}) for i in range(3)]
        )
    options = ["--topic", "t", "--max-attempts", "2"]
    first = members(db, journal, *options, "--die-after-dead-letter")
    assert first.wait_exit() == 9, first.stderr
    assert [e["offset"] for e in deadletter_entries(db)] == [offsets[1]]
    assert position(db, "g", "t") == offsets[0]  # died before moving past it

    second = members(db, journal, *options)
    second.wait_ready()
    wait_until(lambda: position(db, "g", "t") == offsets[-1], what="the rest handled")
    entries = deadletter_entries(db)
    assert [(e["offset"], e["attempts"]) for e in entries] == [(offsets[1], 2)]
    records = read_journal(journal)
    assert len(calls(records, "start", offset=offsets[1])) == 2
    assert calls(records, "end", offset=offsets[2], outcome="ok", pid=second.pid)
    assert attempt_rows(db) == []
    second.signal(signal.SIGTERM)
    assert second.wait_exit() == 0, second.stderr


@pytest.mark.parametrize("api", ["async", "sync"])
def test_sigterm_finishes_the_event_in_hand_commits_and_releases(
    db: Path, journal: Path, members, api: str
) -> None:
    with eventlog.open_sync(db) as log:
        offsets = log.append_many([
            eventlog.Draft("t", {"n": 0}),
            eventlog.Draft("t", {"n": 1, "do": "sleep", "seconds": 1.0}),
            *[eventlog.Draft("t", {"n": i}) for i in range(2, 6)],
        ])  # fmt: skip

    first = members(db, journal, "--topic", "t", "--api", api)
    first.wait_ready()
    wait_until(lambda: calls(read_journal(journal), "start", offset=offsets[1]),
               what="the slow event to start")  # fmt: skip
    first.signal(signal.SIGTERM)
    assert first.wait_exit() == 0, first.stderr
    first.wait_line("stopped")

    records = read_journal(journal)
    done_first = [r["offset"] for r in calls(records, "end", pid=first.pid)]
    assert offsets[1] in done_first, "the event in hand was not finished"
    assert [r["offset"] for r in calls(records, "start", pid=first.pid)] == done_first
    # Committed exactly what it handled; locks released, member file gone.
    assert position(db, "g", "t") == max(done_first)
    assert lane_row(db, "g", "t")[1:] == (None, None)
    group_dir = db.with_name(db.name + ".d") / "groups" / "g"
    assert lock_is_free(group_dir / "lanes" / "t~0.lock")
    assert [p for p in (group_dir / "members").iterdir() if p.suffix == ".lock"] == []

    second = members(db, journal, "--topic", "t", "--api", api)
    second.wait_ready()
    wait_until(lambda: position(db, "g", "t") == offsets[-1], what="the rest handled")
    second.signal(signal.SIGTERM)
    assert second.wait_exit() == 0, second.stderr

    records = read_journal(journal)
    again = [r["offset"] for r in calls(records, "start", pid=second.pid)]
    assert not set(again) & set(done_first), "delivered twice after a graceful stop"
    assert sorted(done_first + again) == offsets
