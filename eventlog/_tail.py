"""Where `eventlog tail` starts: the topics a pattern matches, and the offset from which the
last n events of them follow, found by index probes per partition (never a scan).
"""

from __future__ import annotations

from collections.abc import Sequence

from . import _core, _sql
from ._core import Plan, Stmt

NEVER = 1 << 62  # larger than any offset or millisecond timestamp


def matching_topics_plan(patterns: str | Sequence[str]) -> Plan[list[str]]:
    compiled = _core.compile_patterns(patterns)
    lanes = yield from _core.resolve_lanes_plan(compiled)
    return sorted({topic for topic, _ in lanes})


def last_events_start_plan(patterns: str | Sequence[str], n: int) -> Plan[int]:
    """The offset to read from so that the last `n` events of the topics follow (0 = all)."""
    compiled = _core.compile_patterns(patterns)
    lanes = yield from _core.resolve_lanes_plan(compiled)
    if n <= 0:
        return (yield from _core.head_plan()) + 1
    newest: list[int] = []
    for topic, partition in lanes:
        rows = yield Stmt(_sql.LANE_NEWEST_IDS, (topic, partition, NEVER, n))
        newest.extend(int(r[0]) for r in rows)
    if len(newest) < n:
        return 0
    newest.sort(reverse=True)
    return newest[n - 1]
