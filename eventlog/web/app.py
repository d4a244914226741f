"""The Starlette app: the JSON API under /api/v1, /metrics, the pages and their static files.

Every handler calls the library (SyncLog methods, the operator modules such as `_stats` and
`_replay`, and plans through `log.run`) on a worker thread; typed library errors become
`{"error": {"type", "message", "hint"}}` with a fitting status. Lists are keyset-paginated: a
response's `next_cursor` (null at the end) goes back as `?cursor=`.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from .. import (
    __version__,
    _core,
    _deadletter,
    _members,
    _replay,
    _schema,
    _stats,
    _sync,
    _times,
)
from .._async import AsyncLog
from .._core import parse_whole
from .._groups import check_group_exists, group_extras_plan
from .._sync import SyncLog
from ..errors import (
    DatabaseBusy,
    EventlogError,
    GroupBusy,
    InvalidArgument,
    NotFound,
    PayloadTooLarge,
    StorageError,
)
from . import queries
from .auth import Guard, Policy
from .stream import Hub, StreamEndpoint, stream_stats

log = logging.getLogger("eventlog.web")
T = TypeVar("T")

MAX_BODY_BYTES = 16 << 20
MAX_BATCH = 1000


@dataclass
class ServerState:
    """What the handlers share: the logs, the stream hub and the options."""

    log: SyncLog
    alog: AsyncLog
    hub: Hub
    policy: Policy
    keepalive: float = 15.0
    send_timeout: float = 30.0
    metrics: bool = False
    started_ms: int = field(default_factory=_core.now_ms)

    @property
    def read_only(self) -> bool:
        return self.policy.read_only


def static_dir() -> Path:
    return Path(str(resources.files("eventlog.web") / "static"))


# -- errors -----------------------------------------------------------------------------------


class HTTPError(Exception):
    def __init__(self, status: int, kind: str, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.status, self.kind, self.hint = status, kind, hint


def error_response(status: int, kind: str, message: str, hint: str = "") -> JSONResponse:
    return JSONResponse({"error": {"type": kind, "message": message, "hint": hint}}, status)


def status_of(exc: EventlogError) -> int:
    if isinstance(exc, PayloadTooLarge):
        return 413
    if isinstance(exc, InvalidArgument):
        return 400
    if isinstance(exc, NotFound):
        return 404
    if isinstance(exc, GroupBusy):
        return 409
    if isinstance(exc, DatabaseBusy | StorageError):
        return 503
    return 500


Handler = Callable[[Request], Awaitable[Response]]


def api(handler: Handler) -> Handler:
    """Typed errors as JSON; anything unexpected is logged and answered with a 500. Once the
    database file was replaced or removed, every call is a 503 StorageError."""

    @functools.wraps(handler)
    async def wrapped(request: Request) -> Response:
        try:
            hub = state_of(request).hub
            hub.check_file()  # a replaced file: 503, never stale data
            response = await handler(request)
            if request.method not in ("GET", "HEAD"):
                # and after a write: a file replaced while the body was still arriving
                # took it in the old file, which nobody will read
                hub.check_file()
            return response
        except HTTPError as exc:
            return error_response(exc.status, exc.kind, str(exc), exc.hint)
        except EventlogError as exc:
            return error_response(status_of(exc), type(exc).__name__, str(exc), exc.hint)
        except Exception:
            log.exception("%s %s failed", request.method, request.url.path)
            return error_response(500, "InternalError", "the server failed; see its log",
                                  "this is a bug worth reporting")  # fmt: skip

    return wrapped


def state_of(request: Request) -> ServerState:
    state: ServerState = request.app.state.eventlog
    return state


async def call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    return await run_in_threadpool(fn, *args, **kwargs)


async def json_body(request: Request) -> dict[str, Any]:
    declared = request.headers.get("content-length")
    if declared is not None and (parse_whole(declared) or 0) > MAX_BODY_BYTES:
        raise HTTPError(413, "PayloadTooLarge", f"the body is {declared} bytes; the limit is "
                        f"{MAX_BODY_BYTES}", "send fewer events per request")  # fmt: skip
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise HTTPError(413, "PayloadTooLarge", f"the body is over {MAX_BODY_BYTES} bytes",
                            "send fewer events per request")  # fmt: skip
        chunks.append(chunk)
    try:
        value = json.loads(b"".join(chunks), parse_constant=_no_constant)
    except RecursionError:
        raise HTTPError(400, "InvalidJSON", "the body is nested too deep to be read",
                        "send flatter JSON") from None  # fmt: skip
    except ValueError as exc:
        raise HTTPError(400, "InvalidJSON", f"the body is not valid JSON: {exc}",
                        "send one JSON object") from None  # fmt: skip
    if not isinstance(value, dict):
        raise HTTPError(400, "InvalidJSON", "the body must be a JSON object",
                        'for example {"payload": {"id": 7}}')  # fmt: skip
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _unknown_fields(body: dict[str, Any], allowed: set[str]) -> None:
    extra = sorted(set(body) - allowed)
    if extra:
        raise InvalidArgument(f"unknown field{'s' if len(extra) > 1 else ''}: {', '.join(extra)}",
                              hint=f"fields: {', '.join(sorted(allowed))}")  # fmt: skip


def _int_param(request: Request, name: str, default: int | None = None, *, low: int = 0,
               high: int | None = None) -> int | None:  # fmt: skip
    text = request.query_params.get(name)
    if text is None or text == "":
        return default
    value = parse_whole(text)
    if value is None:
        raise InvalidArgument(f"{name} must be a whole number, got {text!r}")
    if value < low or (high is not None and value > high):
        limit = f" and {high}" if high is not None else " or more"
        raise InvalidArgument(
            f"{name} must be between {low}{limit}, got {value}"
            if high is not None
            else f"{name} must be {low}{limit}, got {value}"
        )
    return value


def _bool_param(request: Request, name: str) -> bool:
    text = request.query_params.get(name, "").lower()
    if text in ("", "0", "false", "no"):
        return False
    if text in ("1", "true", "yes"):
        return True
    raise InvalidArgument(f"{name} must be true or false, got {text!r}")


def _time_param(request: Request, name: str) -> int | None:
    text = request.query_params.get(name)
    if not text:
        return None
    return _core.datetime_ms(_times.parse_time(text))


def _limit(request: Request, default: int, high: int) -> int:
    value = _int_param(request, "limit", default, low=1, high=high)
    assert value is not None
    return value


# -- info, health, metrics --------------------------------------------------------------------


@api
async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok", "version": __version__})


def _info(state: ServerState) -> dict[str, Any]:
    slog = state.log
    head = slog.head()
    version = slog.run(_schema.schema_version_plan(), "read")
    dl = _deadletter.dead_letter_counts(slog.paths)
    return {
        "version": __version__, "db": str(slog.paths.db), "schema_version": version,
        "head": head, "now_ms": _core.now_ms(), "started_at_ms": state.started_ms,
        "read_only": state.read_only, "auth": state.policy.token is not None,
        "metrics": state.metrics, "keepalive_s": state.keepalive,
        **stream_stats(state.hub),
        "dead_letters": {"total": dl.total, "pending": dl.pending, "requeued": dl.requeued,
                         "unreadable_lines": dl.unreadable_lines, "torn_tail": dl.torn_tail},
        "files": _stats.file_sizes(slog.paths),
    }  # fmt: skip


@api
async def info(request: Request) -> Response:
    return JSONResponse(await call(_info, state_of(request)))


def _metric_label(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _metrics(state: ServerState) -> str:
    slog = state.log
    now = _core.now_ms()
    head, _, topics, lags = slog.run(_stats.stats_plan(now), "read")
    lag_ms = slog.run(queries.lag_times_plan(
        [(x.topic, x.partition, x.position, x.lag) for x in lags], now), "read")  # fmt: skip
    dl = _deadletter.dead_letter_counts(slog.paths)
    out: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            out.append(f"{name}{labels} {value:g}" if isinstance(value, float)
                       else f"{name}{labels} {value}")  # fmt: skip

    def labels(**kv: object) -> str:
        return "{" + ",".join(f'{k}="{_metric_label(v)}"' for k, v in kv.items()) + "}"

    metric("eventlog_head_offset", "gauge", "The largest offset handed out.", [("", head)])
    metric("eventlog_topic_events", "gauge", "Events stored per topic.",
           [(labels(topic=t.name), t.events) for t in topics])  # fmt: skip
    metric("eventlog_topic_last_offset", "gauge", "The last offset of each topic.",
           [(labels(topic=t.name), t.last_offset or 0) for t in topics])  # fmt: skip
    metric("eventlog_group_lag_events", "gauge",
           "Events a group has not handled yet, per partition (estimated past 10,000).",
           [(labels(group=x.group, topic=x.topic, partition=x.partition), x.lag)
            for x in lags])  # fmt: skip
    metric("eventlog_group_lag_seconds", "gauge",
           "How long the oldest event a group has not handled has waited, per partition.",
           [(labels(group=x.group, topic=x.topic, partition=x.partition), ms / 1000)
            for x, ms in zip(lags, lag_ms, strict=True)])  # fmt: skip
    metric("eventlog_group_position", "gauge", "The last offset a group is done with.",
           [(labels(group=x.group, topic=x.topic, partition=x.partition), x.position)
            for x in lags])  # fmt: skip
    metric(
        "eventlog_dead_letters",
        "gauge",
        "Dead letters in the file, by state.",
        [(labels(state="pending"), dl.pending), (labels(state="requeued"), dl.requeued)],
    )
    metric("eventlog_dead_letters_pending", "gauge", "Dead letters waiting, per group.",
           [(labels(group=g), n) for g, n in sorted(dl.by_group.items())])  # fmt: skip
    metric(
        "eventlog_open_streams", "gauge", "Event streams open now.", [("", state.hub.open_streams)]
    )
    metric(
        "eventlog_streams_served_total",
        "counter",
        "Event streams opened since start.",
        [("", state.hub.streams_served)],
    )
    return "\n".join(out) + "\n"


@api
async def metrics(request: Request) -> Response:
    state = state_of(request)
    if not state.metrics:
        raise HTTPError(404, "NotFound", "metrics are off", "start eventlog serve with --metrics")
    text = await call(_metrics, state)
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")


# -- topics and events ------------------------------------------------------------------------


def _topics(state: ServerState) -> tuple[int, list[_stats.TopicStats]]:
    head, _, topics, _ = state.log.run(_stats.stats_plan(_core.now_ms()), "read")
    return head, topics


@api
async def topics(request: Request) -> Response:
    limit = _limit(request, 100, 1000)
    after = request.query_params.get("cursor")
    head, found = await call(_topics, state_of(request))
    chosen = [t for t in found if after is None or t.name > after]
    page = chosen[:limit]
    return JSONResponse({
        "head": head, "now_ms": _core.now_ms(),
        "topics": [{"name": t.name, "partitions": t.partitions, "events": t.events,
                    "first_offset": t.first_offset, "last_offset": t.last_offset,
                    "created_at_ms": t.created_at_ms, "last_append_ms": t.last_append_ms,
                    "rate_per_s": round(t.rate_per_s, 3), "rate_exact": t.recent_exact}
                   for t in page],
        "next_cursor": page[-1].name if len(chosen) > limit else None,
    })  # fmt: skip


@api
async def browse(request: Request) -> Response:
    pattern = _core.check_pattern(request.path_params["topic"])
    order = request.query_params.get("order", "newest")
    if order not in ("newest", "oldest"):
        raise InvalidArgument(f"order must be newest or oldest, got {order!r}")
    cursor = _int_param(request, "cursor")
    for name in ("before", "after"):
        if request.query_params.get(name):
            raise InvalidArgument(f"use cursor (and order) instead of {name}",
                                  hint="order=newest: events below cursor; order=oldest: "
                                  "events above it")  # fmt: skip
    key = request.query_params.get("key") or None
    text = request.query_params.get("q") or None
    if text is not None and len(text) > 200:
        raise InvalidArgument("q is limited to 200 characters")
    scan_limit = _int_param(request, "scan_limit", 10_000, low=1, high=100_000)
    query = queries.BrowseQuery(
        (pattern,),
        order == "newest",
        cursor,
        _time_param(request, "since"),
        _time_param(request, "until"),
        key,
        text,
        _limit(request, 50, 500),
        scan_limit if scan_limit is not None else 10_000,
    )
    page = await call(state_of(request).log.run_read, queries.browse_plan(query),
                      queries.newest_of_browse)  # fmt: skip
    return JSONResponse({
        "events": page.events, "next_cursor": page.next_cursor, "scanned": page.scanned,
        "scanned_to": page.scanned_to, "scan_limited": page.scan_limited,
        "order": order,
    })  # fmt: skip


@api
async def get_event(request: Request) -> Response:
    text = request.path_params["offset"]
    offset = parse_whole(text)
    if offset is None or offset < 0:
        raise InvalidArgument(f"invalid offset {text!r}")
    event = await call(state_of(request).log.get, offset)
    if event is None:
        raise NotFound(f"no event at offset {text}",
                       hint="it was never appended, or was pruned")  # fmt: skip
    return JSONResponse(event.to_dict())


DRAFT_FIELDS = {"payload", "key", "headers", "dedupe_key"}


def _draft(topic: str, item: object, where: str) -> _sync.Draft:
    if not isinstance(item, dict):
        raise InvalidArgument(f"{where} must be an object with a payload")
    _unknown_fields(item, DRAFT_FIELDS)
    if "payload" not in item:
        raise InvalidArgument(f"{where} has no payload", hint='send {"payload": ...}')
    return _sync.Draft(topic, item["payload"], key=item.get("key"),
                       headers=item.get("headers"), dedupe_key=item.get("dedupe_key"))  # fmt: skip


@api
async def append(request: Request) -> Response:
    topic = _core.check_name(request.path_params["topic"])
    body = await json_body(request)
    slog = state_of(request).log
    if "events" in body:
        _unknown_fields(body, {"events"})
        items = body["events"]
        if not isinstance(items, list) or not 1 <= len(items) <= MAX_BATCH:
            raise InvalidArgument(f"events must be a list of 1 to {MAX_BATCH} events")
        drafts = [_draft(topic, item, f"events[{i}]") for i, item in enumerate(items)]
        for d in drafts:
            d.encode(slog.limits)  # every typed error before anything is written
        offsets = await call(slog.append_many, drafts)
    else:
        draft = _draft(topic, body, "the body")
        offset = await call(slog.append, topic, draft.payload, key=draft.key,
                            headers=draft.headers, dedupe_key=draft.dedupe_key)  # fmt: skip
        offsets = [offset]
    return JSONResponse({"topic": topic, "offsets": offsets}, 201)


# -- groups -----------------------------------------------------------------------------------


def _member_json(m: _members.MemberView) -> dict[str, Any]:
    return {"member": m.member_id, "pid": m.pid, "host": m.host, "alive": m.alive,
            "partitions": [[t, p] for t, p in m.lanes],
            "heartbeat_age_s": None if m.heartbeat_age_s is None else
            round(m.heartbeat_age_s, 3), "stale": m.stale}  # fmt: skip


def _lane_json(x: _stats.LaneLag, lag_ms: int) -> dict[str, Any]:
    return {"topic": x.topic, "partition": x.partition, "position": x.position,
            "head": x.head, "lag": x.lag, "lag_exact": x.exact, "lag_ms": lag_ms,
            "in_flight": list(x.in_flight) if x.in_flight else None,
            "updated_at_ms": x.updated_at_ms}  # fmt: skip


def _groups(state: ServerState, after: str | None, limit: int) -> dict[str, Any]:
    slog = state.log
    names = [g for g in slog.group_names() if after is None or g > after]
    page = names[:limit]
    now = _core.now_ms()
    lags = [x for x in slog.run(_stats.lags_plan(), "read") if x.group in set(page)]
    lag_ms = slog.run(queries.lag_times_plan(
        [(x.topic, x.partition, x.position, x.lag) for x in lags], now), "read")  # fmt: skip
    dead = _deadletter.dead_letter_counts(slog.paths).by_group
    groups = []
    for g in page:
        members = _members.member_views(slog.paths, g)
        mine = [(x, ms) for x, ms in zip(lags, lag_ms, strict=True) if x.group == g]
        groups.append({
            "group": g, "lag": sum(x.lag for x, _ in mine),
            "lag_exact": all(x.exact for x, _ in mine),
            "lag_ms": max((ms for _, ms in mine), default=0),
            "live_members": sum(1 for m in members if m.alive),
            "stale_members": sum(1 for m in members if m.alive and m.stale),
            "partitions": len(mine), "dead_letters": dead.get(g, 0),
        })  # fmt: skip
    return {"groups": groups, "now_ms": now,
            "next_cursor": page[-1] if len(names) > limit else None}  # fmt: skip


@api
async def groups(request: Request) -> Response:
    after = request.query_params.get("cursor") or None
    return JSONResponse(await call(_groups, state_of(request), after, _limit(request, 100, 1000)))


def _group(state: ServerState, group: str) -> dict[str, Any]:
    slog = state.log
    check_group_exists(slog, group)
    now = _core.now_ms()
    members = _members.member_views(slog.paths, group)
    lags = slog.run(_stats.lags_plan(group), "read")
    lag_ms = slog.run(queries.lag_times_plan(
        [(x.topic, x.partition, x.position, x.lag) for x in lags], now), "read")  # fmt: skip
    retrying, waiting = slog.run(group_extras_plan(group), "read")
    dead = _deadletter.dead_letter_counts(slog.paths).by_group.get(group, 0)
    return {
        "group": group, "now_ms": now,
        "lag": sum(x.lag for x in lags), "lag_exact": all(x.exact for x in lags),
        "lag_ms": max(lag_ms, default=0),
        "live_members": sum(1 for m in members if m.alive),
        "members": [_member_json(m) for m in members if m.alive],
        "stale_member_files": sum(1 for m in members if not m.alive),
        "partitions": [_lane_json(x, ms) for x, ms in zip(lags, lag_ms, strict=True)],
        "retrying": [{"offset": r[0], "topic": r[1], "partition": r[2], "attempts": r[3],
                      "last_failed_at_ms": r[4], "error_type": r[5], "error_message": r[6]}
                     for r in retrying],
        "requeued_waiting": waiting, "dead_letters": dead,
    }  # fmt: skip


@api
async def group(request: Request) -> Response:
    name = _core.check_name(request.path_params["group"], "group")
    return JSONResponse(await call(_group, state_of(request), name))


RESET_KINDS = ("earliest", "latest", "current", "offset", "shift", "datetime", "duration")


def reset_spec(body: dict[str, Any]) -> _replay.ResetSpec:
    kind = body.get("spec")
    value = body.get("value")
    if kind not in RESET_KINDS:
        raise InvalidArgument(f"spec must be one of {', '.join(RESET_KINDS)}, got {kind!r}")
    if kind in ("earliest", "latest", "current"):
        return _replay.ResetSpec(kind)
    if kind in ("offset", "shift"):
        if (
            not isinstance(value, int)
            or isinstance(value, bool)
            or (kind == "offset" and value < 0)
        ):
            raise InvalidArgument(f"{kind} needs a whole number value"
                                  + (" >= 0" if kind == "offset" else ""))  # fmt: skip
        return _replay.ResetSpec(kind, value)
    if not isinstance(value, str):
        raise InvalidArgument(
            f"{kind} needs a text value, such as "
            + ("2024-05-01T08:00:00 or -1h" if kind == "datetime" else "2h")
        )
    if kind == "datetime":
        return _replay.ResetSpec("datetime", _times.parse_time(value))
    length = abs(_times.parse_duration(value))
    return _replay.ResetSpec("datetime", _times.shifted(datetime.now(UTC), -length))


def reset_scope(value: object) -> list[tuple[str, list[int] | None]] | None:
    """`["orders", "payments:0,2"]` as the CLI's --topic, or null for every partition."""
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidArgument('topics must be a list like ["orders", "payments:0,2"]')
    scope: list[tuple[str, list[int] | None]] = []
    for item in value:
        topic, sep, parts = item.partition(":")
        partitions = None
        if sep:
            try:
                partitions = sorted({int(p) for p in parts.split(",")})
            except ValueError:
                raise InvalidArgument(f"{item!r}: use TOPIC or TOPIC:0,2") from None
        scope.append((topic, partitions))
    return scope or None


def _reset(state: ServerState, group: str, body: dict[str, Any]) -> dict[str, Any]:
    _unknown_fields(body, {"spec", "value", "topics", "execute"})
    spec = reset_spec(body)
    scope = reset_scope(body.get("topics"))
    execute = body.get("execute", False)
    if not isinstance(execute, bool):
        raise InvalidArgument("execute must be true or false")
    slog = state.log
    check_group_exists(slog, group)
    plan = _replay.replay(slog, group, spec, scope, execute=execute)
    live = [] if execute else _members.live_member_pids(slog.paths, group)
    return {
        "group": group, "spec": spec.describe(), "executed": plan.executed,
        "live_members": live, "redelivered": plan.redelivered, "skipped": plan.skipped,
        "partitions": [{"topic": ln.topic, "partition": ln.partition, "before": ln.before,
                        "after": ln.after if ln.after is not None else ln.before,
                        "redelivered": ln.redelivered, "skipped": ln.skipped,
                        "lag_after": ln.lag_after} for ln in plan.lanes],
    }  # fmt: skip


@api
async def reset(request: Request) -> Response:
    name = _core.check_name(request.path_params["group"], "group")
    body = await json_body(request)
    return JSONResponse(await call(_reset, state_of(request), name, body))


# -- dead letters -----------------------------------------------------------------------------


def _dead_letters(state: ServerState, params: dict[str, Any]) -> dict[str, Any]:
    everything = state.log.dead_letters()
    since = params["since"]
    chosen = _deadletter.select(everything.entries, group=params["group"],
                                topic=params["topic"], since_ms=since,
                                include_requeued=not params["pending"])  # fmt: skip
    refailed = queries.refailed_ids(everything.entries)
    rows, nxt, total = queries.page_dead_letters(
        chosen, error_type=params["error_type"], text=params["q"], cursor=params["cursor"],
        limit=params["limit"])  # fmt: skip
    for row in rows:
        row["refailed"] = row["id"] in refailed
    return {"dead_letters": rows, "next_cursor": nxt, "total": total,
            "torn_tail": everything.torn_tail, "unreadable_lines": everything.bad_lines,
            "groups": sorted({e.group for e in everything.entries}),
            "error_types": sorted({e.error_type for e in everything.entries})}  # fmt: skip


@api
async def dead_letters(request: Request) -> Response:
    qp = request.query_params
    params = {
        "group": qp.get("group") or None, "topic": qp.get("topic") or None,
        "since": _time_param(request, "since"),
        "pending": _bool_param(request, "pending"), "error_type": qp.get("error_type") or None,
        "q": qp.get("q") or None, "cursor": qp.get("cursor") or None,
        "limit": _limit(request, 100, 1000),
    }  # fmt: skip
    return JSONResponse(await call(_dead_letters, state_of(request), params))


@api
async def dead_letter(request: Request) -> Response:
    entry = await call(state_of(request).log.dead_letter, request.path_params["id"])
    everything = await call(state_of(request).log.dead_letters)
    return JSONResponse(
        {
            **entry.to_dict(),
            "requeued": entry.requeued,
            "refailed": entry.id in queries.refailed_ids(everything.entries),
        }
    )


def _selection(body: dict[str, Any]) -> tuple[list[str] | None, str | None, bool, bool]:
    _unknown_fields(body, {"ids", "group", "all", "dry_run", "confirm"})
    ids, group_name, everything = body.get("ids"), body.get("group"), body.get("all", False)
    dry_run = body.get("dry_run", False)
    if not isinstance(everything, bool) or not isinstance(dry_run, bool):
        raise InvalidArgument("all and dry_run must be true or false")
    if ids is not None and (not isinstance(ids, list) or not all(isinstance(i, str) for i in ids)):
        raise InvalidArgument("ids must be a list of dead-letter ids")
    if sum([ids is not None, group_name is not None, everything]) != 1:
        raise InvalidArgument("choose the dead letters with exactly one of ids, group or all")
    if ids is not None and not ids:
        raise InvalidArgument("ids is empty: choose at least one dead letter")
    if group_name is not None:
        _core.check_name(group_name, "group")
    if not dry_run and (group_name is not None or everything):
        expected = group_name if group_name is not None else "all"
        if body.get("confirm") != expected:
            what = "every dead letter" if everything else "a whole group"
            raise InvalidArgument(
                f"acting on {what} needs confirm: {json.dumps(expected)}",
                hint="type the group name (or all) to confirm",
            )
    return ids, group_name, everything, dry_run


def _dead_action_json(entries: list[Any], dry_run: bool) -> dict[str, Any]:
    return {"dry_run": dry_run, "count": len(entries),
            "dead_letters": [{"id": e.id, "group": e.group, "topic": e.topic,
                              "partition": e.partition, "offset": e.offset}
                             for e in entries]}  # fmt: skip


@api
async def requeue(request: Request) -> Response:
    ids, group_name, everything, dry_run = _selection(await json_body(request))
    chosen = await call(state_of(request).log.requeue_dead_letters, ids, group=group_name,
                        all=everything, dry_run=dry_run)  # fmt: skip
    return JSONResponse(_dead_action_json(chosen, dry_run))


@api
async def purge(request: Request) -> Response:
    ids, group_name, everything, dry_run = _selection(await json_body(request))
    chosen = await call(state_of(request).log.purge_dead_letters, ids, group=group_name,
                        all=everything, dry_run=dry_run)  # fmt: skip
    return JSONResponse(_dead_action_json(chosen, dry_run))


@api
async def not_found(request: Request) -> Response:
    raise HTTPError(404, "NotFound", f"no such endpoint: {request.method} {request.url.path}",
                    "see the README's web API section")  # fmt: skip


# -- pages ------------------------------------------------------------------------------------

PAGES = {
    "overview": "overview.html", "topic": "topic.html", "groups": "groups.html",
    "group": "group.html", "dead-letters": "dead-letters.html", "login": "login.html",
}  # fmt: skip


def page(name: str) -> Handler:
    async def serve_page(request: Request) -> Response:
        return FileResponse(static_dir() / PAGES[name], media_type="text/html; charset=utf-8",
                            headers={"cache-control": "no-cache"})  # fmt: skip

    return serve_page


def login_page_bytes() -> bytes:
    return (static_dir() / "login.html").read_bytes()


# -- the app ----------------------------------------------------------------------------------


def build_app(state: ServerState) -> Guard:
    stream = StreamEndpoint(state.hub, keepalive=state.keepalive,
                            send_timeout=state.send_timeout)  # fmt: skip
    v1 = "/api/v1"
    routes = [
        Route(f"{v1}/healthz", healthz),
        Route("/healthz", healthz),
        Route(f"{v1}/info", info),
        Route(f"{v1}/stream", stream, methods=["GET"]),
        Route(f"{v1}/topics", topics),
        Route(f"{v1}/topics/{{topic}}/events", browse, methods=["GET"]),
        Route(f"{v1}/topics/{{topic}}/events", append, methods=["POST"]),
        Route(f"{v1}/events/{{offset}}", get_event),
        Route(f"{v1}/groups", groups),
        Route(f"{v1}/groups/{{group}}", group),
        Route(f"{v1}/groups/{{group}}/reset", reset, methods=["POST"]),
        Route(f"{v1}/dead-letters", dead_letters),
        Route(f"{v1}/dead-letters/requeue", requeue, methods=["POST"]),
        Route(f"{v1}/dead-letters/purge", purge, methods=["POST"]),
        Route(f"{v1}/dead-letters/{{id}}", dead_letter),
        Route(v1 + "/{rest:path}", not_found, methods=["GET", "POST", "PUT", "PATCH", "DELETE"]),
        Route("/metrics", metrics),
        Route("/", page("overview")),
        Route("/topics/{pattern}", page("topic")),
        Route("/groups", page("groups")),
        Route("/groups/{group}", page("group")),
        Route("/dead-letters", page("dead-letters")),
        Route("/login", page("login")),
        Mount("/static", StaticFiles(directory=static_dir()), name="static"),
    ]
    app = Starlette(routes=routes)
    app.state.eventlog = state
    return Guard(app, state.policy, login_page_bytes)
