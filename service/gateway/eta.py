"""The queue's timing as the gateway's request handlers share it.

Every unfinished job's ``eta_seconds`` needs the queue's timing (``service.contract.timing``), and
polling clients ask for jobs many times a second; one read per :data:`MAX_AGE_SECONDS` serves them all,
so a poll costs the one round trip it cost before ETAs (the record and its queue position).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from service.contract.store import JobStore
from service.contract.timing import QueueTiming

MAX_AGE_SECONDS = 1.0


class TimingCache:
    """The last :class:`QueueTiming` read, read again once older than ``max_age_seconds``. Thread-safe:
    the handlers run in the thread pool."""

    def __init__(
        self,
        store: JobStore,
        *,
        worker_ttl_seconds: float,
        max_age_seconds: float = MAX_AGE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.worker_ttl_seconds = worker_ttl_seconds
        self.max_age_seconds = max_age_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._timing: QueueTiming | None = None
        self._read_at = 0.0

    def get(self) -> QueueTiming:
        with self._lock:
            if self._timing is None or self._clock() - self._read_at > self.max_age_seconds:
                self._timing = self.store.queue_timing(worker_ttl_seconds=self.worker_ttl_seconds)
                self._read_at = self._clock()
            return self._timing
