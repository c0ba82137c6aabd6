"""The gateway's background duties: fail jobs of lost workers, delete expired result files.

Runs in a thread (blocking Redis and file work stays off the event loop). Several gateways may run it
at once: each transition is atomic in the job store.

After Redis was unreachable, no job is reaped until one heartbeat TTL after Redis answers again:
heartbeats expired during the outage (or were never written), and the workers need that long to
refresh them. The grace counts from Redis's first answer, not from the last failed attempt, which may
be long before Redis is back. Without it, a Redis restart would fail every running job as
``worker_lost`` although its worker is alive.
"""

from __future__ import annotations

import logging
import threading
import time

from service.contract.connection import REDIS_UNREACHABLE
from service.contract.metrics import GatewayMetrics
from service.contract.result_files import ResultFiles
from service.contract.schemas import ErrorInfo, JobStatus
from service.contract.settings import Settings
from service.contract.store import JobStore

log = logging.getLogger(__name__)

WORKER_LOST = "worker_lost"


def reap_lost_jobs(store: JobStore, files: ResultFiles, metrics: GatewayMetrics) -> list[str]:
    """Fail running jobs whose heartbeat expired with code worker_lost; returns their ids."""
    reaped = []
    for job_id in store.lost_jobs():
        error = ErrorInfo(code=WORKER_LOST, message="the worker running this job stopped sending heartbeats")
        if store.finish(job_id, JobStatus.failed, error=error):
            files.record_expiry(job_id, store.result_ttl_seconds)  # what the lost worker left, if anything
            record = store.find(job_id)
            if record is not None:
                metrics.jobs_finished.labels(record.type.value, JobStatus.failed.value).inc()
            log.warning("job %s failed: worker lost", job_id)
            reaped.append(job_id)
    return reaped


class Maintenance:
    def __init__(
        self, settings: Settings, store: JobStore, files: ResultFiles, metrics: GatewayMetrics
    ) -> None:
        self.settings = settings
        self.store = store
        self.files = files
        self.metrics = metrics
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="univigu-maintenance", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        next_cleanup = 0.0
        reap_from = 0.0
        recovering = False  # Redis was unreachable and has not answered since
        while not self._stop.wait(self.settings.reaper_interval_seconds):
            try:
                if recovering:  # the grace starts when Redis answers again, not at the last failure
                    self.store.redis.ping()
                    reap_from = time.monotonic() + self.settings.heartbeat_ttl_seconds
                    recovering = False
                if time.monotonic() >= reap_from:
                    reap_lost_jobs(self.store, self.files, self.metrics)
                if time.monotonic() >= next_cleanup:
                    self.files.clean_expired(self.store)
                    next_cleanup = time.monotonic() + self.settings.cleanup_interval_seconds
            except REDIS_UNREACHABLE as exc:
                log.warning("maintenance skipped, Redis unreachable: %s", exc)
                recovering = True
