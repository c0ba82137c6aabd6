"""The folder where `univigu up` keeps its state, so that stopping and starting it loses nothing.

Layout::

    <data folder>/
      up.lock        held by the `univigu up` using the folder (and the processes it started)
      redis/         redis-server's directory: the append-only file (appendonlydir/) and redis.log
      results/       videos, result JSON and uploads (jobs/<id>/, uploads/)

The default is the user's data directory (``platformdirs``: ``~/.local/share/univigu`` on Linux,
``~/Library/Application Support/univigu`` on macOS); ``univigu up --data-dir`` or ``UNIVIGU_DATA_DIR``
moves it. One `univigu up` at a time may use a folder: the lock is an ``flock`` on ``up.lock``, which the
kernel releases when the last process holding it exits, so a crashed `up` never leaves a stale lock, and
processes it left running still hold it.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import platformdirs

LOCK_FILE = "up.lock"


class DataFolderError(RuntimeError):
    """The data folder cannot be used: in use by another `univigu up`, or not writable."""


def default_data_dir() -> Path:
    return platformdirs.user_data_path("univigu")


class DataFolder:
    def __init__(self, root: Path) -> None:
        self.root = root.expanduser().absolute()
        self.redis_dir = self.root / "redis"
        self.results_dir = self.root / "results"
        self._lock_fd: int | None = None

    @property
    def lock_fd(self) -> int:
        """The held lock's file descriptor: children that receive it keep the folder locked."""
        if self._lock_fd is None:
            raise RuntimeError("the data folder is not locked")
        return self._lock_fd

    @contextmanager
    def locked(self) -> Iterator[None]:
        self.lock()
        try:
            yield
        finally:
            self.unlock()

    def lock(self) -> None:
        """Take the folder for this process; DataFolderError if another `univigu up` holds it."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise DataFolderError(
                f"cannot use the data folder {self.root} ({exc.strerror}): choose another with "
                "`univigu up --data-dir DIR` (UNIVIGU_DATA_DIR)"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DataFolderError(
                f"the data folder {self.root} is in use by another `univigu up` (pid {holder}) or by "
                "processes it left running; stop it, or give this one its own folder with "
                "`univigu up --data-dir DIR` (UNIVIGU_DATA_DIR)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the last descriptor releases the flock
            self._lock_fd = None
