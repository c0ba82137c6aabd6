"""Keeping `univigu up`'s processes running: a child that exits is restarted with bounded backoff and its
exit cause logged; a crash loop ends `up` with one message naming the cause.

Policy (:class:`RestartPolicy`): the n-th restart in a row waits ``first_delay * 2**(n-1)`` seconds, at
most ``max_delay``. A child that was ready for ``healthy_seconds`` before it exited starts a new series;
one that exits sooner (or never became ready: a model that fails to load, a port taken) extends the
series, and the exit that would need restart ``max_restarts + 1`` ends `up`. A child that exits with
:data:`EXIT_CONFIGURATION` said that its settings keep it from starting, so it is not restarted at all.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, Protocol

from service.cli.parent_death import terminate_with_parent
from service.cli.redis_server import RedisServer
from worker.cli import EXIT_CONFIGURATION

log = logging.getLogger(__name__)

STOP_TIMEOUT_SECONDS = 20.0
OUTPUT_TAIL_LINES = 20


@dataclass(frozen=True)
class RestartPolicy:
    max_restarts: int = 5
    healthy_seconds: float = 60.0
    first_delay_seconds: float = 0.5
    max_delay_seconds: float = 8.0

    def delay(self, restart: int) -> float:
        """Seconds before the ``restart``-th restart in a row (1-based)."""
        return min(self.max_delay_seconds, self.first_delay_seconds * 2 ** (restart - 1))


class CrashLoop(RuntimeError):
    """A child cannot be kept running; the message names it and its last exit cause."""


class StartFailed(RuntimeError):
    """A child could not be started; treated like an exit right after the start."""


class Child(Protocol):
    name: str
    waiting_for: str  # what it does until it is ready, for "waiting for ..." lines

    @property
    def pid(self) -> int | None: ...

    def start(self) -> None: ...

    def returncode(self) -> int | None: ...

    def is_ready(self) -> bool: ...

    def last_words(self) -> str: ...

    def stop(self) -> None: ...


def exit_cause(returncode: int, last_words: str) -> str:
    """What ended a process, as "the worker ..." continues: ``was killed by SIGKILL``, ``exited with code
    1: <its last line of output>``."""
    if returncode < 0:
        return f"was killed by {signal.Signals(-returncode).name}"
    cause = f"exited with code {returncode}"
    return f"{cause}: {last_words}" if last_words else cause


class _Tail:
    """Copies a child's output to ours line by line and keeps its last lines (its exit cause is often
    the last one: a traceback's exception, a one-line error)."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.lines: collections.deque[str] = collections.deque(maxlen=OUTPUT_TAIL_LINES)
        self._thread = threading.Thread(target=self._copy, args=(stream,), daemon=True)
        self._thread.start()

    def _copy(self, stream: IO[bytes]) -> None:
        with stream:
            for line in stream:
                self.lines.append(line.decode(errors="replace").rstrip())
                # Keep draining when our own output is gone (a closed pipe): a full pipe would block the child.
                with contextlib.suppress(OSError):
                    sys.stderr.buffer.write(line)
                    sys.stderr.flush()

    def last_line(self) -> str:
        # The output ends shortly after the process; a grandchild (ffmpeg) holding the pipe may keep it open.
        self._thread.join(1.0)
        return next((line for line in reversed(self.lines) if line.strip()), "")


class ProcessChild:
    """A process in its own session (Ctrl-C reaches only `up`, which stops the children in order).
    ``command`` and ``ready`` take the start's number (1, 2, ...), so each start may get its own name and
    be recognised by it."""

    def __init__(
        self,
        name: str,
        command: Callable[[int], Sequence[str]],
        *,
        ready: Callable[[int], bool],
        waiting_for: str,
        env: dict[str, str],
        inherit_fds: tuple[int, ...] = (),
    ) -> None:
        self.name = name
        self.waiting_for = waiting_for
        self._command = command
        self._ready = ready
        self._env = env
        self._inherit_fds = inherit_fds
        self._starts = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._tail: _Tail | None = None

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def start(self) -> None:
        self._starts += 1
        self._process = subprocess.Popen(
            self._command(self._starts),
            env=self._env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            pass_fds=self._inherit_fds,
            preexec_fn=terminate_with_parent(),
        )
        assert self._process.stdout is not None
        self._tail = _Tail(self._process.stdout)

    def returncode(self) -> int | None:
        return None if self._process is None else self._process.poll()

    def is_ready(self) -> bool:
        return self._ready(self._starts)

    def last_words(self) -> str:
        return "" if self._tail is None else self._tail.last_line()

    def stop(self) -> None:
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            log.warning("the %s did not stop in %.0f s; killing it", self.name, STOP_TIMEOUT_SECONDS)
            process.kill()
            process.wait()


class RedisChild:
    """A :class:`RedisServer` that `up` started: restarted on the same port and the same data."""

    waiting_for = "redis-server to load its data"

    def __init__(self, server: RedisServer, name: str = "redis-server") -> None:
        self.server = server
        self.name = name

    @property
    def pid(self) -> int | None:
        return None if self.server.process is None else self.server.process.pid

    def start(self) -> None:
        try:
            self.server.start()  # returns once it answers PING
        except RuntimeError as exc:
            self.server.kill()  # if it runs without answering, the next start must not meet it on the port
            raise StartFailed(str(exc)) from exc

    def returncode(self) -> int | None:
        return None if self.server.process is None else self.server.process.poll()

    def is_ready(self) -> bool:
        return self.server.process is not None

    def last_words(self) -> str:
        try:
            lines = (self.server.directory / "redis.log").read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return next((line for line in reversed(lines) if line.strip()), "")

    def stop(self) -> None:
        self.server.stop()


@dataclass
class _Watch:
    child: Child
    started_at: float = 0.0
    ready_at: float | None = None
    exited_at: float | None = None
    restart_at: float | None = None
    restarts: int = 0  # restarts in the current series


class Supervisor:
    """Starts the children in order, keeps them running (:meth:`poll`), stops them in reverse order."""

    def __init__(self, children: Sequence[Child], policy: RestartPolicy | None = None) -> None:
        self.policy = policy or RestartPolicy()
        self._watches = [_Watch(child) for child in children]

    def start_all(self) -> None:
        for watch in self._watches:
            self._start(watch, time.monotonic())

    def not_ready(self) -> list[Child]:
        return [watch.child for watch in self._watches if watch.ready_at is None]

    def poll(self) -> None:
        """Notice exits (log the cause; schedule a restart or raise CrashLoop), start what is due, and
        notice children that became ready."""
        for watch in self._watches:
            now = time.monotonic()
            if watch.restart_at is not None:
                if now >= watch.restart_at:
                    self._start(watch, now)
                continue
            returncode = watch.child.returncode()
            if returncode == EXIT_CONFIGURATION:
                reason = watch.child.last_words() or f"exit code {returncode}"
                raise CrashLoop(f"the {watch.child.name} cannot start with these settings: {reason}")
            if returncode is not None:
                cause = f"(pid {watch.child.pid}) {exit_cause(returncode, watch.child.last_words())}"
                self._exited(watch, cause, now)
            elif watch.ready_at is None and watch.child.is_ready():
                self._ready(watch, now)

    def stop_all(self) -> None:
        for watch in reversed(self._watches):
            watch.child.stop()

    def _start(self, watch: _Watch, now: float) -> None:
        watch.restart_at, watch.ready_at, watch.started_at = None, None, now
        try:
            watch.child.start()
        except StartFailed as exc:
            self._exited(watch, f"did not start: {exc}", now)
            return
        log.info("started the %s (pid %s)", watch.child.name, watch.child.pid)

    def _ready(self, watch: _Watch, now: float) -> None:
        watch.ready_at = now
        if watch.exited_at is None:
            log.info("the %s is ready, %.1f s after it started", watch.child.name, now - watch.started_at)
        else:
            log.info("the %s is ready again, %.1f s after it exited", watch.child.name, now - watch.exited_at)

    def _exited(self, watch: _Watch, cause: str, now: float) -> None:
        name = watch.child.name
        healthy = watch.ready_at is not None and now - watch.ready_at >= self.policy.healthy_seconds
        watch.restarts = 1 if healthy else watch.restarts + 1
        watch.exited_at = now
        if watch.restarts > self.policy.max_restarts:
            raise CrashLoop(
                f"the {name} exited {watch.restarts} times in a row without staying ready for "
                f"{self.policy.healthy_seconds:.0f} s; last: {cause}"
            )
        delay = self.policy.delay(watch.restarts)
        log.warning(
            "the %s %s; restarting it in %.1f s (restart %d of at most %d in a row)",
            name,
            cause,
            delay,
            watch.restarts,
            self.policy.max_restarts,
        )
        watch.restart_at = now + delay
