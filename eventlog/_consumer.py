"""Consumer: one member of a consumer group, on the event loop.

One task per owned lane fetches a batch after the committed position, hands its events to the
handler in order, and commits once per batch in the same transaction that marks the next
batch in flight (see _groups for why that marker makes poison events end). A pump task waits
for wake-ups and rebalances: it counts live members through their lock files, computes the
shared assignment, and takes or hands back lanes.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import os
import random
import signal
import sqlite3
import threading
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

from . import _core, _db, _groups
from ._core import Event, Lane
from ._deadletter import DeadLetter, DeadLetterFile, new_id
from ._groups import LaneState
from ._locks import QueuedLock
from ._members import Membership
from .errors import DeadLetterError, InvalidArgument

if TYPE_CHECKING:
    from ._async import AsyncLog, AsyncWaiter

log = logging.getLogger("eventlog")
T = TypeVar("T")

Handler = Callable[[Event], Awaitable[Any] | Any]
BatchHandler = Callable[[list[Event]], Awaitable[Any] | Any]
ErrorInfo = tuple[str, str, str]  # type, message, trimmed traceback

REBALANCE_S = 0.5  # how often members are counted; bounds failover to about a second
HARD_TIMEOUT_EXIT_CODE = 70
_TRACEBACK_CHARS = 4000


@dataclass(frozen=True)
class ConsumerConfig:
    batch_size: int = 100
    max_attempts: int = 5
    retry_backoff: float = 0.2
    max_backoff: float = 30.0
    timeout: float | None = None
    hard_timeout: float | None = None
    start: str | int | datetime = "earliest"

    def __post_init__(self) -> None:
        if not isinstance(self.batch_size, int) or not 1 <= self.batch_size <= 10_000:
            raise InvalidArgument(f"batch_size must be 1-10000, got {self.batch_size!r}")
        if not _core.is_whole(self.max_attempts, 1):
            raise InvalidArgument(f"max_attempts must be >= 1, got {self.max_attempts!r}")
        for name in ("retry_backoff", "max_backoff"):
            value = getattr(self, name)
            if not _seconds(value) or value < 0:
                raise InvalidArgument(f"{name} must be seconds >= 0, got {value!r}")
        for name in ("timeout", "hard_timeout"):
            value = getattr(self, name)
            if value is not None and (not _seconds(value) or value <= 0):
                raise InvalidArgument(f"{name} must be seconds > 0 or None, got {value!r}")
        _core.check_start(self.start)


def _seconds(value: object) -> bool:
    """A finite number (NaN compares false with everything, and would turn a limit off)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class ConsumerStats:
    handled: int = 0
    failed_attempts: int = 0
    dead_lettered: int = 0
    redelivered: int = 0
    lanes_taken: int = 0
    lanes_released: int = 0


@dataclass
class _InHand:
    event: Event
    attempts: int
    started: float
    state: LaneState | None
    batch: bool = False  # a batch handler's call: `event` is only its first event


@dataclass
class _LaneRun:
    state: LaneState
    task: asyncio.Task[None]
    revoked: asyncio.Event = field(default_factory=asyncio.Event)
    # Requeued events of this lane (dead-letter id -> offset), handled by its loop between
    # batches: never beside the event in hand, never in another process (one owner per lane).
    redeliveries: dict[str, int] = field(default_factory=dict)


class _HandlerGate:
    """Who may call a handler right now, process-wide: one gate for every consumer of the
    process, whatever its group, thread or event loop.

    Lanes call their handlers side by side (shared), except while an event's attempt is
    persisted and unresolved: that event's handler runs alone (exclusive). If the process dies
    then (a handler calling os._exit, a hard timeout, a kill), the death is charged to that
    event only. Without this, an event dying in one lane would charge the event in careful
    hands in another lane on every restart, and dead-letter it with the poison; a process
    running consumers of two groups is one process too, so the gate is not per consumer.
    Waiting exclusive callers go first, so careful work cannot starve.
    """

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._shared = 0
        self._exclusive = False
        self._waiting = 0
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    def _notify(self) -> None:  # with the mutex held
        waiters, self._waiters = self._waiters, []
        for loop, fut in waiters:
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits there
                loop.call_soon_threadsafe(_resolve, fut)

    def _wait_slot(self) -> asyncio.Future[None]:  # with the mutex held
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._waiters.append((loop, fut))
        return fut

    def poke(self) -> None:
        """Wake every waiter to look again: a consumer stopping (or a lane revoked) must not
        wait for another consumer's careful work to end before it can give up."""
        with self._mutex:
            self._notify()

    async def enter_shared(self, give_up: Callable[[], bool] | None = None) -> bool:
        """Take a shared slot; False (nothing taken) if `give_up()` while waiting."""
        while True:
            with self._mutex:
                if not self._exclusive and not self._waiting:
                    self._shared += 1
                    return True
                if give_up is not None and give_up():
                    return False
                fut = self._wait_slot()
            await fut

    def leave_shared(self) -> None:
        with self._mutex:
            self._shared -= 1
            if self._waiting:
                self._notify()  # only an exclusive caller waits for shared ones to leave

    @asynccontextmanager
    async def exclusive(self, give_up: Callable[[], bool] | None = None) -> AsyncIterator[None]:
        """Alone; raises _GaveUp (nothing taken) if `give_up()` while waiting."""
        with self._mutex:
            self._waiting += 1
        try:
            while True:
                with self._mutex:
                    if not self._exclusive and not self._shared:
                        self._exclusive = True
                        break
                    if give_up is not None and give_up():
                        raise _GaveUp
                    fut = self._wait_slot()
                await fut
        finally:
            with self._mutex:
                self._waiting -= 1
                self._notify()
        try:
            yield
        finally:
            with self._mutex:
                self._exclusive = False
                self._notify()


class _GaveUp(Exception):
    """A wait for the exclusive gate ended by a stop or a revocation."""


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


_GATE: tuple[int, _HandlerGate] | None = None
_GATE_MUTEX = threading.Lock()


def _process_gate() -> _HandlerGate:
    """The gate of this process (a child of fork() starts a fresh one: what the parent's
    threads had in hand is not the child's)."""
    global _GATE
    with _GATE_MUTEX:
        if _GATE is None or _GATE[0] != os.getpid():
            _GATE = (os.getpid(), _HandlerGate())
        return _GATE[1]


class StopConsumer(Exception):
    """Raised by a handler that could not make its attempt for a reason outside the event (it
    was stopped on purpose, its output went away): no attempt is counted, the event stays
    unacknowledged, and the consumer stops."""


_STOPPED: ErrorInfo = ("StopConsumer", "", "")  # what _call returns for it


def _cancelled_in_handler(exc: asyncio.CancelledError) -> ErrorInfo:
    """A CancelledError out of a handler: re-raised when the consumer's own task is being
    cancelled (it is stopping); otherwise the handler's own (a task it awaited was cancelled)
    and a failed attempt like any other error, or the lane would stop without a word."""
    task = asyncio.current_task()
    if task is None or task.cancelling():
        raise exc
    return _error_info(exc)


def _error_info(exc: BaseException) -> ErrorInfo:
    text = "".join(traceback.format_exception(exc))
    if len(text) > _TRACEBACK_CHARS:
        text = "...\n" + text[-_TRACEBACK_CHARS:]
    try:
        message = str(exc)
    except Exception as failed:  # a handler's own exception class: its __str__ may raise
        message = f"<str() of the error raised {type(failed).__qualname__}>"
    if len(message) > _TRACEBACK_CHARS:
        message = message[:_TRACEBACK_CHARS] + "..."
    return type(exc).__qualname__, _core.utf8_text(message), _core.utf8_text(text)


class Consumer:
    """A member of consumer group `group`, handling events of `topics` (names or patterns).

    At least once: a position moves past an event only after its handler returned or the
    event was written (fsynced) to the dead-letter file. Handlers for different partitions
    may run concurrently; within a partition, strictly in offset order.
    """

    def __init__(
        self,
        log: AsyncLog,
        group: str,
        topics: str | Sequence[str],
        handler: Handler | None = None,
        *,
        batch_handler: BatchHandler | None = None,
        config: ConsumerConfig | None = None,
    ) -> None:
        _core.check_name(group, "group", log.limits)
        self.patterns = _core.compile_patterns(topics)
        if (handler is None) == (batch_handler is None):
            raise InvalidArgument("give exactly one of handler or batch_handler")
        self.log = log
        self.group = group
        self.topics = [topics] if isinstance(topics, str) else list(topics)
        self.config = config or ConsumerConfig()
        self.stats = ConsumerStats()
        self._handler = handler
        self._batch_handler = batch_handler
        self._deadletters = DeadLetterFile(log.paths)
        self._stop = asyncio.Event()
        self._tick = asyncio.Event()
        self._lanes: dict[Lane, _LaneRun] = {}
        self._in_hand: dict[Lane | None, _InHand] = {}
        self._rng = random.Random()
        self._membership: Membership | None = None
        self._failure: BaseException | None = None
        self._gate = _process_gate()
        self._handler_is_async = inspect.iscoroutinefunction(handler or batch_handler)
        self._watched = self.config.hard_timeout is not None
        self._look: sqlite3.Connection | None = None
        self._waiter: AsyncWaiter | None = None
        self._start: str | int | datetime = self.config.start

    # -- public -------------------------------------------------------------------------------

    @property
    def member_id(self) -> str | None:
        return self._membership.member_id if self._membership else None

    @property
    def owned_lanes(self) -> list[Lane]:
        return sorted(self._lanes)

    def stop(self) -> None:
        """Ask the consumer to finish the event in hand, commit, release its lanes and return."""
        self._stop.set()
        self._wake_lanes()
        self._gate.poke()  # a lane waiting at the gate for another consumer gives up
        if self._waiter is not None:
            self._waiter.poke()

    async def run(self, *, handle_signals: bool = True) -> None:
        """Consume until stop() (or SIGINT/SIGTERM when handle_signals in the main thread)."""
        loop = asyncio.get_running_loop()
        if self.config.start == "latest":
            # "latest" means the head when the group's first member started, for every lane
            # and every member: a lane found later (a new topic matching a pattern) must not
            # skip what it got before a rebalance noticed it, nor before a member joined.
            head = await self.log.head()
            self._start = await self._run_write(_groups.latest_start_plan(self.group, head))
        installed: list[signal.Signals] = []
        if handle_signals and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self.stop)
                installed.append(sig)
        self._membership = Membership(self.log.paths, self.group)
        waiter = self._waiter = self.log.waiter()
        waiter.on_wake = self._wake_lanes
        # Idle looks (is there anything after my position? which topics match?) run on the
        # loop thread from a connection that only reads: an index probe takes microseconds
        # there, where a hop to the worker thread takes a hundred or more.
        self._look = _db.connect(self.log.paths, durability=self.log.durability,
                                 busy_timeout_ms=1000)  # fmt: skip
        watchdog = self._start_watchdog()
        try:
            await self._pump(waiter)
        finally:
            self._stop.set()
            self._wake_lanes()
            await self._drain_lanes()
            if watchdog is not None:
                watchdog.set()
            waiter.close()
            self._look.close()
            self._membership.close()
            for sig in installed:
                loop.remove_signal_handler(sig)
        if self._failure is not None:
            raise self._failure

    # -- pump and rebalance -------------------------------------------------------------------

    async def _pump(self, waiter: AsyncWaiter) -> None:
        # The waiter's fallback data_version look runs once per rebalance, not on its own
        # quicker clock: two wake-ups a second is most of what an idle member costs, and a
        # lost datagram still delays delivery by at most REBALANCE_S. stop() pokes the waiter.
        next_rebalance = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_rebalance:
                await self._rebalance()
                # From its end: a slow rebalance must still leave the loop to the lanes.
                next_rebalance = time.monotonic() + REBALANCE_S
            remaining = max(0.0, next_rebalance - time.monotonic())
            if await waiter.wait(None, remaining, poll_s=REBALANCE_S):
                self._wake_lanes()

    def _read_here(self, plan: _core.Plan[T]) -> T:
        assert self._look is not None
        return _db.drive(self._look, plan, "none")

    def _wake_lanes(self) -> None:
        tick, self._tick = self._tick, asyncio.Event()
        tick.set()

    async def _rebalance(self) -> None:
        assert self._membership is not None
        members = self._membership.live_members()
        lanes = self._read_here(_core.resolve_lanes_plan(self.patterns))
        mine = _groups.assign(lanes, members, self._membership.member_id)
        for lane in [lane for lane in self._lanes if lane not in mine]:
            await self._release(lane)
        for lane in sorted(mine - self._lanes.keys()):
            if self._stop.is_set():
                break
            if self._membership.try_take(lane):
                state = await self.log.run(
                    _groups.take_lane_plan(self.group, lane, self._start), "write"
                )
                run = _LaneRun(state, asyncio.create_task(self._lane_loop_guarded(state)))
                self._lanes[lane] = run
                self.stats.lanes_taken += 1
                log.info("%s: took %s[%d] at %d", self.group, lane[0], lane[1], state.position)
        self._membership.heartbeat(list(self._lanes), {"group": self.group})
        await self._queue_redeliveries()

    async def _release(self, lane: Lane) -> None:
        run = self._lanes.pop(lane)
        run.revoked.set()
        self._wake_lanes()
        self._gate.poke()
        await asyncio.gather(run.task, return_exceptions=True)
        assert self._membership is not None
        self._membership.release(lane)
        self.stats.lanes_released += 1
        log.info("%s: released %s[%d]", self.group, lane[0], lane[1])

    async def _drain_lanes(self) -> None:
        for lane in list(self._lanes):
            await self._release(lane)

    def _fail(self, exc: BaseException) -> None:
        if self._failure is None:
            self._failure = exc
        self.stop()

    # -- one lane -----------------------------------------------------------------------------

    async def _lane_loop_guarded(self, state: LaneState) -> None:
        try:
            await self._lane_loop(state)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("%s: lane %s[%d] failed", self.group, *state.lane)
            self._fail(exc)

    async def _lane_loop(self, state: LaneState) -> None:
        run_ = self._lanes.get(state.lane)
        revoked = run_.revoked if run_ else asyncio.Event()
        size = self.config.batch_size
        pending: int | None = None  # last handled offset, not yet committed
        try:
            while not (self._stop.is_set() or revoked.is_set()):
                if run_ is not None and run_.redeliveries:
                    if pending is not None:  # commit what was handled before going back
                        await self._commit_handled(state, pending)
                        pending = None
                    await self._redeliver(run_, revoked)
                    continue
                tick = self._tick
                if pending is None and not self._read_here(_groups.has_more_plan(state)):
                    await _wait_any(tick, self._stop, revoked)
                    continue
                # At `full` this write's fsync, after the transaction that fetched the batch,
                # puts the batch on disk before any of it is handled.
                batch = await self.log.run_write(
                    _groups.advance_plan(self.group, state, pending, size)
                )
                pending = None
                if batch.events:
                    pending = await self._handle_batch(state, batch, revoked)
        finally:
            if pending is not None or state.crashed_to is None:
                # Leaving gracefully: commit what was handled.
                await self._commit_handled(state, pending)

    async def _commit_handled(self, state: LaneState, pending: int | None) -> None:
        """Commit the lane past what was handled (`pending`, None: nothing new); the in-flight
        marker goes unless we are still inside a crashed range the next owner must treat
        with care."""
        keep = state.crashed_to is not None and (pending or 0) < state.crashed_to
        await self._run_write(
            _groups.commit_plan(self.group, state, pending or state.position, keep)
        )

    async def _handle_batch(
        self, state: LaneState, batch: _groups.Batch, revoked: asyncio.Event
    ) -> int | None:
        """Handle a batch in order; returns the last offset handled (None if none)."""
        done: int | None = None
        events = batch.events

        def give_up() -> bool:
            return self._stop.is_set() or revoked.is_set()

        singles_until = 0  # after a failed batch call, its events are retried one by one
        i = 0
        while i < len(events):
            if self._stop.is_set() or revoked.is_set():
                break
            event = events[i]
            prior = batch.attempts.get(event.offset, 0)
            if prior or state.suspect(event.offset):
                if not await self._handle_carefully(event, prior, state, revoked=revoked):
                    break
                done = event.offset
                i += 1
                continue
            if self._batch_handler is not None and event.offset > singles_until:
                run = [event]
                j = i + 1
                while (j < len(events) and not batch.attempts.get(events[j].offset)
                       and not state.suspect(events[j].offset)):  # fmt: skip
                    run.append(events[j])
                    j += 1
                if len(run) > 1:
                    if not await self._gate.enter_shared(give_up):
                        break
                    try:
                        batch_error = await self._call_batch(run, state)
                    finally:
                        self._gate.leave_shared()
                    if batch_error is _STOPPED:
                        break
                    if batch_error is None:
                        done = run[-1].offset
                        i = j
                        continue
                    # the batch failed: retry its events alone to find the bad one
                    singles_until = run[-1].offset
            if not await self._gate.enter_shared(give_up):
                break
            try:
                error = await self._call(event, 1, state)
            finally:
                self._gate.leave_shared()
            if error is None:
                self.stats.handled += 1
                done = event.offset
                i += 1
                continue
            if error is _STOPPED:
                break
            await self._run_write(_groups.record_failure_plan(self.group, event, 1, error, state))
            self.stats.failed_attempts += 1
            if not await self._handle_carefully(
                event, 1, state, first_error=error, revoked=revoked
            ):
                break
            done = event.offset
            i += 1
        return done

    async def _handle_carefully(
        self,
        event: Event,
        prior: int,
        state: LaneState | None,
        first_error: ErrorInfo | None = None,
        revoked: asyncio.Event | None = None,
        redelivery: str | None = None,
    ) -> bool:
        """One event, attempts written before each run, until it succeeds or is
        dead-lettered; False if stopped first (the event stays unacknowledged). A revoked
        lane stops too, between attempts: its attempts are persisted, so the next owner
        goes on counting, and a rebalance never waits for a whole retry schedule.
        `redelivery`: the dead letter a requeue sent it back for (no lane state then)."""
        cfg = self.config
        credit = state.credit(event.offset) if state is not None else 0
        attempts = prior
        error = first_error
        if prior and error is None:
            row = await self.log.run(_groups.event_attempt_plan(self.group, event.offset), "none")
            if row is not None and row[3] is not None:
                error = (str(row[3]), str(row[4] or ""), str(row[5] or ""))
        while True:
            counted = attempts + (credit if attempts else 0)
            if counted >= cfg.max_attempts:
                parked = await self._dead_letter(event, counted, error, state, revoked,
                                                 redelivery)  # fmt: skip
                if parked and credit and attempts and state is not None:
                    state.settle_crash()  # this event was charged the crashed run
                return parked
            if attempts and attempts >= 1 and error is not None:
                delay = _groups.backoff_delay(attempts, cfg.retry_backoff, cfg.max_backoff,
                                              self._rng)  # fmt: skip
                if await _sleep_unless(self._stop, delay, revoked):
                    return False
            # From the attempt's write to its outcome's, this handler runs alone (see
            # _HandlerGate): a death meanwhile is this event's. A stop (or a revocation) while
            # waiting for that turn gives up before the attempt is written.
            try:
                async with self._gate.exclusive(
                    lambda: self._stop.is_set() or (revoked is not None and revoked.is_set())
                ):
                    attempts += 1
                    await self._run_write(_groups.start_attempt_plan(self.group, event, attempts))
                    error = await self._call(event, attempts, state)
                    if error is _STOPPED:
                        # Its attempt was written before the run and stays counted, as a
                        # death here would; no failure is recorded, it is not dead-lettered.
                        return False
                    if error is None:
                        await self._run_write(
                            _groups.finish_event_plan(self.group, event, state, redelivery)
                        )
                        self.stats.handled += 1
                        if credit and attempts > 1 and state is not None:
                            state.settle_crash()  # it failed alone: it took the crashed run
                        return True
                    self.stats.failed_attempts += 1
                    await self._run_write(
                        _groups.record_failure_plan(self.group, event, attempts, error, state)
                    )
            except _GaveUp:
                return False  # the gate was never taken: no attempt written, none counted
            log.warning("%s: %s[%d]@%d attempt %d failed: %s: %s", self.group, event.topic,
                        event.partition, event.offset, attempts, error[0], error[1])  # fmt: skip

    async def _dead_letter(
        self,
        event: Event,
        attempts: int,
        error: ErrorInfo | None,
        state: LaneState | None,
        revoked: asyncio.Event | None = None,
        redelivery: str | None = None,
    ) -> bool:
        row = await self.log.run(_groups.event_attempt_plan(self.group, event.offset), "none")
        first_failed = row[1] if row else None
        last_failed = row[2] if row else None
        if error is None:
            error = ("ProcessDied", "the process died while this event was being handled", "")
        proposed = new_id()
        dead_letter_id = await self._run_write(
            _groups.choose_dead_letter_id_plan(self.group, event, proposed)
        )
        # once: a member that died between an earlier append and the commit after it left
        # this episode's line (same id) already; it is not written twice. Only an id chosen
        # before (or a failed write of ours) can have a line: a fresh one is appended without
        # reading the whole file first, which made each dead letter cost the file's size.
        once = dead_letter_id != proposed
        entry = DeadLetter(
            id=dead_letter_id, group=self.group, topic=event.topic, partition=event.partition,
            offset=event.offset, key=event.key, payload=event.payload,
            headers=dict(event.headers), event_time_ms=event.timestamp_ms, attempts=attempts,
            first_failed_at_ms=first_failed, last_failed_at_ms=last_failed,
            error_type=error[0], error_message=error[1], traceback=error[2],
            dead_lettered_at_ms=_core.now_ms(),
        )  # fmt: skip
        delay = self.config.retry_backoff or 0.1
        while True:
            try:
                entry = await asyncio.to_thread(self._deadletters.append, entry, once=once)
                break
            except DeadLetterError as exc:
                once = True  # the line may be in the file (written, then fsync failed)
                # Never move past an event that is not safely parked: keep trying.
                log.error("%s: %s (retrying in %.1fs)", self.group, exc, delay)
                if await _sleep_unless(self._stop, delay, revoked):
                    return False
                delay = min(delay * 2, self.config.max_backoff or 30.0)
        await self._run_write(_groups.finish_event_plan(self.group, event, state, redelivery))
        self.stats.dead_lettered += 1
        log.warning("%s: dead-lettered %s[%d]@%d after %d attempts (id %s)", self.group,
                    event.topic, event.partition, event.offset, attempts, entry.id)  # fmt: skip
        return True

    async def _run_write(self, plan: _core.Plan[Any]) -> Any:
        # A commit must finish even if the consumer is being cancelled.
        return await asyncio.shield(self.log.run_write(plan))

    # -- calling the handler ------------------------------------------------------------------

    async def _call(self, event: Event, attempts: int, state: LaneState | None) -> ErrorInfo | None:
        key = state.lane if state is not None else None
        if self._watched:  # only the hard-timeout watchdog reads what is in hand
            self._in_hand[key] = _InHand(event, attempts, time.monotonic(), state)
        try:
            if self._handler is not None:
                await self._invoke(self._handler, event)
            else:
                assert self._batch_handler is not None
                await self._invoke(self._batch_handler, [event])
        except asyncio.CancelledError as exc:
            return _cancelled_in_handler(exc)
        except StopConsumer:
            self.stop()
            return _STOPPED
        except Exception as exc:
            return _error_info(exc)
        finally:
            self._in_hand.pop(key, None)
        return None

    async def _call_batch(self, events: list[Event], state: LaneState) -> ErrorInfo | None:
        assert self._batch_handler is not None
        self._in_hand[state.lane] = _InHand(events[0], 1, time.monotonic(), state, batch=True)
        try:
            await self._invoke(self._batch_handler, events)
        except asyncio.CancelledError as exc:
            return _cancelled_in_handler(exc)
        except StopConsumer:
            self.stop()
            return _STOPPED
        except Exception as exc:
            return _error_info(exc)
        finally:
            self._in_hand.pop(state.lane, None)
        self.stats.handled += len(events)
        return None

    async def _invoke(self, fn: Callable[[Any], Any], arg: Any) -> None:
        timeout = self.config.timeout
        if self._handler_is_async:
            if timeout is None:
                await fn(arg)
            else:
                await asyncio.wait_for(fn(arg), timeout)
            return
        # A sync handler runs in a thread; a thread cannot be interrupted, so only
        # hard_timeout bounds it.
        result = await asyncio.to_thread(fn, arg)
        if inspect.isawaitable(result):
            await result if timeout is None else await asyncio.wait_for(result, timeout)

    # -- hard timeout -------------------------------------------------------------------------

    def _start_watchdog(self) -> threading.Event | None:
        limit = self.config.hard_timeout
        if limit is None:
            return None
        done = threading.Event()
        paths, group, durability = self.log.paths, self.group, self.log.durability

        def watch() -> None:
            while not done.wait(min(0.1, limit / 4)):
                now = time.monotonic()
                for held in list(self._in_hand.values()):
                    if now - held.started > limit:
                        _exit_after_hard_timeout(paths, group, durability, held, limit)

        threading.Thread(target=watch, name="eventlog-watchdog", daemon=True).start()
        return done

    # -- redeliveries -------------------------------------------------------------------------

    async def _queue_redeliveries(self) -> None:
        """Hand requeued events to the lanes this member owns (see _LaneRun.redeliveries);
        those of lanes owned elsewhere wait for their owner. Reads requests only: a lane
        reads its event when it comes to it."""
        queued = False
        for offset, dead_letter_id, lane in self._read_here(_groups.redeliveries_plan(self.group)):
            if lane is None:
                await self._drop_pruned_request(offset, dead_letter_id)
                continue
            run = self._lanes.get(lane)
            if run is not None and dead_letter_id not in run.redeliveries:
                run.redeliveries[dead_letter_id] = offset
                queued = True
        if queued:
            self._wake_lanes()

    async def _drop_pruned_request(self, offset: int, dead_letter_id: str) -> None:
        # Pruned after the requeue (which refuses pruned events) was asked for.
        log.warning("%s: requeued event %d (dead letter %s) was pruned; dropped",
                    self.group, offset, dead_letter_id)  # fmt: skip
        await self._run_write(_groups.done_redelivery_plan(self.group, offset, dead_letter_id))

    async def _redeliver(self, run: _LaneRun, revoked: asyncio.Event) -> None:
        """The lane's requeued events, oldest request first, each until it succeeds or is
        dead-lettered again; its request is dropped in the transaction that finishes it."""
        while run.redeliveries and not (self._stop.is_set() or revoked.is_set()):
            dead_letter_id, offset = next(iter(run.redeliveries.items()))
            event = await self.log.get(offset)
            if event is None:
                await self._drop_pruned_request(offset, dead_letter_id)
                del run.redeliveries[dead_letter_id]
                continue
            row = await self.log.run(_groups.event_attempt_plan(self.group, offset), "none")
            prior = int(row[0]) if row else 0
            if not await self._handle_carefully(
                event, prior, None, revoked=revoked, redelivery=dead_letter_id
            ):
                return
            del run.redeliveries[dead_letter_id]
            self.stats.redelivered += 1


def _exit_after_hard_timeout(
    paths: _db.Paths, group: str, durability: _db.Durability, held: _InHand, limit: float
) -> None:
    """Record the attempt from the watchdog thread, then end the process so its locks free.

    A batch handler's call names no culprit: nothing is recorded, and the in-flight marker
    (which covers every event of such a call) makes the next owner run them one at a time
    and charge the hang to the event that hangs alone (guarantee 4)."""
    event = held.event
    error = ("HardTimeout", f"the handler ran longer than hard_timeout={limit}s; "
             f"process {os.getpid()} exited", "")  # fmt: skip
    try:
        if not held.batch:
            conn = _db.connect(paths, durability=durability, busy_timeout_ms=10_000,
                               check_same_thread=False)  # fmt: skip
            lock = QueuedLock(paths.write_lock, timeout=10.0)
            plan = _groups.record_hard_timeout_plan(group, event, held.attempts, error, held.state)
            _db.drive(conn, plan, "write", lock)
    except Exception:
        log.exception("could not record the timed-out attempt")
    log.error("%s: %s[%d]@%d exceeded hard_timeout %.1fs; exiting", group, event.topic,
              event.partition, event.offset, limit)  # fmt: skip
    logging.shutdown()
    os._exit(HARD_TIMEOUT_EXIT_CODE)


async def _wait_any(tick: asyncio.Event, *others: asyncio.Event, timeout: float = 5.0) -> None:
    """Wait for the lane's tick (stop and revocation set it too), at most `timeout`: the
    pump ticks on every wake-up and every changed data_version, so the timeout is only a
    backstop. No task per wait."""
    if tick.is_set() or any(e.is_set() for e in others):
        return
    try:
        async with asyncio.timeout(timeout):
            await tick.wait()
    except TimeoutError:
        pass


async def _sleep_unless(
    stop: asyncio.Event, delay: float, revoked: asyncio.Event | None = None
) -> bool:
    """Sleep `delay` seconds; True if stop (or revoked, when given) was set meanwhile."""
    events = [stop] if revoked is None else [stop, revoked]
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
    return any(e.is_set() for e in events)
