"""Consume-to-command (`eventlog consume GROUP TOPIC -- COMMAND`): the handler that pipes each
event, as one JSON line, to a command's stdin; exit status 0 is success.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence

from ._consumer import StopConsumer
from ._core import Event
from .errors import InvalidArgument, NotFound


class CommandFailed(Exception):
    """The command given to `eventlog consume` exited with a non-zero status."""


class CommandHandler:
    """Runs a command per event, the event as one JSON line on its stdin; exit status 0 is
    success. The command runs in its own session, so a Ctrl-C meant for the consumer does
    not kill the event in hand; `interrupt()` stops it on purpose."""

    STDERR_TAIL = 2000

    def __init__(self, argv: Sequence[str], group: str, timeout: float | None = None) -> None:
        if not argv:
            raise InvalidArgument("give a command to run after --")
        if shutil.which(argv[0]) is None:
            raise NotFound(f"command not found: {argv[0]}",
                           hint="give the command's path, or check PATH")  # fmt: skip
        self.argv = list(argv)
        self.group = group
        self.timeout = timeout
        self.succeeded = 0
        self.failed = 0
        self._running: set[subprocess.Popen[bytes]] = set()
        self._lock = threading.Lock()
        self._interrupted = False

    def __call__(self, event: Event) -> None:
        data = (json.dumps(event.to_dict(), ensure_ascii=False) + "\n").encode("utf-8")
        env = {
            **os.environ,
            "EVENTLOG_GROUP": self.group,
            "EVENTLOG_TOPIC": event.topic,
            "EVENTLOG_PARTITION": str(event.partition),
            "EVENTLOG_OFFSET": str(event.offset),
        }
        proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=env, start_new_session=True)  # fmt: skip
        with self._lock:
            self._running.add(proc)
        tail = bytearray()

        def feed() -> None:
            assert proc.stdin is not None
            try:
                proc.stdin.write(data)
                proc.stdin.close()
            except (BrokenPipeError, OSError):
                pass  # the command does not read its input: its business

        def tee() -> None:
            assert proc.stderr is not None
            stream = proc.stderr
            try:
                for chunk in iter(lambda: stream.read1(65536), b""):  # type: ignore[attr-defined]
                    try:
                        sys.stderr.buffer.write(chunk)
                        sys.stderr.buffer.flush()
                    except (AttributeError, ValueError, OSError):
                        pass
                    tail.extend(chunk)
                    del tail[: -self.STDERR_TAIL]
            finally:
                # Closed here, by the one reading it: a background process the command left
                # behind may hold the pipe open long after the command exited.
                stream.close()

        threads = [threading.Thread(target=feed, daemon=True),
                   threading.Thread(target=tee, daemon=True)]  # fmt: skip
        for t in threads:
            t.start()
        try:
            try:
                status = proc.wait(self.timeout)
            except subprocess.TimeoutExpired:
                self._kill(proc, signal.SIGKILL)
                proc.wait()
                self._join(threads)
                self._count(ok=False)
                raise CommandFailed(
                    f"{self.argv[0]} ran longer than {self.timeout}s and was killed"
                ) from None
            self._join(threads)
        finally:
            with self._lock:
                self._running.discard(proc)
        if status != 0 and self._interrupted:
            raise StopConsumer(f"{self.argv[0]} was stopped by a second Ctrl-C")
        if status != 0 and _stdout_gone():
            # killed by SIGPIPE, or failed on EPIPE where SIGPIPE is ignored (Python does)
            raise StopConsumer("the reader of eventlog's output went away")
        if status != 0:
            self._count(ok=False)
            said = tail.decode("utf-8", "replace").strip()
            how = f"was killed by signal {-status}" if status < 0 else f"exited with {status}"
            raise CommandFailed(f"{self.argv[0]} {how}" + (f": {said}" if said else ""))
        self._count(ok=True)

    JOIN_S = 1.0  # for the rest of its stderr once the command exited

    def _join(self, threads: Sequence[threading.Thread]) -> None:
        # Bounded: a background process the command started may keep its pipes open.
        for t in threads:
            t.join(self.JOIN_S)

    def _count(self, *, ok: bool) -> None:
        with self._lock:
            if ok:
                self.succeeded += 1
            else:
                self.failed += 1

    @staticmethod
    def _kill(proc: subprocess.Popen[bytes], sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)

    def interrupt(self) -> None:
        """Ask the running commands to stop (SIGTERM to their process groups)."""
        with self._lock:
            self._interrupted = True
            running = list(self._running)
        for proc in running:
            self._kill(proc, signal.SIGTERM)


def _stdout_gone() -> bool:
    """Whether eventlog's stdout is a pipe whose reader has gone (`| head` ended)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & select.POLLERR for _, ev in poller.poll(0))
    except (OSError, ValueError, AttributeError):
        return False
