"""Durations and times as people type them: `7d`, `1h30m`, `PT10M`, `-10m`, ISO-8601 times
(UTC unless they carry an offset), and where a reader starts. Used by the command line and
the web server; a value that does not parse raises InvalidArgument naming the forms it takes.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from ._core import parse_whole
from .errors import InvalidArgument

_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_COMPACT_RE = re.compile(r"(?:(\d+(?:\.\d+)?)(ms|s|m|h|d|w))+")
_COMPACT_PART_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_ISO_DURATION_RE = re.compile(
    r"P(?:(\d+(?:\.\d+)?)W)?(?:(\d+(?:\.\d+)?)D)?"
    r"(?:T(?:(\d+(?:\.\d+)?)H)?(?:(\d+(?:\.\d+)?)M)?(?:(\d+(?:\.\d+)?)S)?)?",
    re.IGNORECASE,
)


def parse_duration(text: str) -> timedelta:
    """`90s`, `10m`, `2h`, `7d`, `1w`, `1h30m`, `500ms`, or ISO-8601 `PT10M`, `P1DT2H`.

    A leading `-` makes it negative (`-10m`); callers that want a length use abs().
    """
    s = text.strip()
    sign = 1
    if s[:1] in "+-" and s:
        sign = -1 if s[0] == "-" else 1
        s = s[1:]
    seconds: float | None = None
    if _COMPACT_RE.fullmatch(s):
        seconds = sum(float(n) * _UNITS[u] for n, u in _COMPACT_PART_RE.findall(s))
    else:
        m = _ISO_DURATION_RE.fullmatch(s)
        if m and len(s) > 1 and s.upper() != "PT":
            w, d, h, mi, sec = (float(g) if g else 0.0 for g in m.groups())
            seconds = w * 604800 + d * 86400 + h * 3600 + mi * 60 + sec
    if seconds is None:
        raise InvalidArgument(
            f"invalid duration {text!r}: use a number and a unit (ms, s, m, h, d, w) such as "
            "10m, 2h, 7d or 1h30m, or ISO-8601 such as PT10M",
            hint="for example --older-than 7d",
        )
    try:
        return timedelta(seconds=sign * seconds)
    except OverflowError:
        raise InvalidArgument(
            f"duration {text!r} is too long: at most 999,999,999 days", hint="for example 7d"
        ) from None


# The first and last moments a datetime holds: a relative time past them stops there.
EARLIEST = datetime.min.replace(tzinfo=UTC)
LATEST = datetime.max.replace(tzinfo=UTC)


def shifted(moment: datetime, by: timedelta) -> datetime:
    """`moment + by`, stopping at the first or last moment a datetime holds (`-999999d` means
    long ago: no event is older)."""
    try:
        return moment + by
    except OverflowError:
        return LATEST if by > timedelta(0) else EARLIEST


def parse_time(text: str, now: datetime | None = None) -> datetime:
    """An ISO-8601 time (naive means UTC), `now`, or a duration relative to now (`-10m`)."""
    now = now or datetime.now(UTC)
    s = text.strip()
    if s.lower() == "now":
        return now
    if s[:1] in "+-":
        return shifted(now, parse_duration(s))
    try:
        moment = datetime.fromisoformat(s)
    except ValueError:
        raise InvalidArgument(
            f"invalid time {text!r}: use ISO-8601 (2024-05-01T12:00:00, UTC unless it carries "
            "an offset such as +02:00) or a relative time such as -10m",
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def parse_start(text: str) -> str | int | datetime:
    """A reader's start: earliest, latest, an offset (the first delivered) or a time."""
    s = text.strip()
    if s in ("earliest", "latest"):
        return s
    offset = parse_whole(s)
    if offset is not None and offset >= 0:
        return offset
    return parse_time(s)
