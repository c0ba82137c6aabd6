"""One reader of job records for all of a gateway's event streams (``GET /jobs/{id}/events``).

Every ``events_poll_seconds`` the watcher reads every job that at least one stream follows, with their
queue positions and the queue's timing, in one pipelined round trip, and wakes the streams of the jobs
whose record or position changed. A stream costs no Redis read of its own after its first: a hundred
streams of one job cost what one does, and idle jobs wake nobody. Only changed records are parsed.

It uses the asyncio Redis client, not the thread pool: the streams spend their life waiting, and their
reads would otherwise take the pool's threads from every synchronous route. Reading on a timer rather
than having workers push costs one round trip per interval whether or not anything moved, and in return
nothing is lost when a stream or the gateway restarts.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis as AsyncRedis

from service.contract.connection import REDIS_UNREACHABLE
from service.contract.errors import JobNotFound
from service.contract.queue import JobQueue
from service.contract.store import JobStore
from service.contract.timing import JobSnapshot

log = logging.getLogger(__name__)

RECORD_READS = 2  # JobStore.record_reads: the record, its queue position
TIMING_READS = 4  # JobStore.timing_reads


@dataclass
class _Watched:
    """A followed job: how many streams follow it, and what the last read found."""

    snapshot: JobSnapshot | None
    """The latest state; None once the record is gone (deleted or expired)."""
    streams: int = 0
    version: int = 0
    replies: tuple[Any, ...] = ()
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)


class Following:
    """One stream's view of a followed job."""

    def __init__(self, watched: _Watched) -> None:
        self._watched = watched
        self._seen = watched.version

    async def next(self) -> JobSnapshot | None:
        """The job's state once it changed from the last one this stream saw; None once it is gone."""
        watched = self._watched
        async with watched.changed:
            await watched.changed.wait_for(lambda: watched.version != self._seen)
        self._seen = watched.version
        return watched.snapshot


class JobWatcher:
    """Follows jobs for event streams; :meth:`run` is its loop (a task of the gateway's lifespan)."""

    def __init__(
        self,
        redis: AsyncRedis,
        store: JobStore,
        queue: JobQueue,
        *,
        interval: float,
        worker_ttl_seconds: float,
    ) -> None:
        self.redis = redis
        self.store = store
        self.queue = queue
        self.interval = interval
        self.worker_ttl_seconds = worker_ttl_seconds
        self._watched: dict[str, _Watched] = {}

    async def read(self, job_id: str) -> JobSnapshot:
        """One job's snapshot now (a stream's first); JobNotFound if there is none."""
        async with self.redis.pipeline(transaction=False) as pipe:
            self.store.record_reads(pipe, job_id, self.queue.key)
            self.store.timing_reads(pipe, worker_ttl_seconds=self.worker_ttl_seconds)
            raw, position, *timing = await pipe.execute()
        return JobSnapshot(
            *self.store.parse_record_reads(job_id, raw, position), self.store.parse_timing(timing)
        )

    @asynccontextmanager
    async def follow(self, first: JobSnapshot) -> AsyncIterator[Following]:
        """Follow ``first``'s job (read by :meth:`read`) while the context lasts."""
        job_id = first.record.id
        watched = self._watched.setdefault(job_id, _Watched(first))
        watched.streams += 1
        try:
            yield Following(watched)
        finally:
            watched.streams -= 1
            if watched.streams == 0:
                del self._watched[job_id]

    async def run(self) -> None:
        reachable = True
        while True:
            await asyncio.sleep(self.interval)
            if not self._watched:
                continue
            try:
                await self._poll()
            except REDIS_UNREACHABLE as exc:
                if reachable:
                    log.warning("event streams cannot read Redis; they wait for it: %s", exc)
                reachable = False
                continue
            except Exception:  # the loop's last line: a bug is logged, and the streams are not stranded
                log.exception("the job watcher's read failed; it tries again")
                continue
            if not reachable:
                log.info("event streams read Redis again")
            reachable = True

    async def _poll(self) -> None:
        """Read every followed job in one round trip; wake the streams of those that changed."""
        ids = list(self._watched)
        async with self.redis.pipeline(transaction=False) as pipe:
            self.store.timing_reads(pipe, worker_ttl_seconds=self.worker_ttl_seconds)
            for job_id in ids:
                self.store.record_reads(pipe, job_id, self.queue.key)
            replies = await pipe.execute()
        timing = self.store.parse_timing(replies[:TIMING_READS])
        for index, job_id in enumerate(ids):
            watched = self._watched.get(job_id)
            start = TIMING_READS + index * RECORD_READS
            mine = tuple(replies[start : start + RECORD_READS])
            if watched is None or mine == watched.replies:
                continue
            watched.replies = mine
            try:
                watched.snapshot = JobSnapshot(*self.store.parse_record_reads(job_id, *mine), timing)
            except JobNotFound:
                watched.snapshot = None
            async with watched.changed:
                watched.version += 1
                watched.changed.notify_all()
