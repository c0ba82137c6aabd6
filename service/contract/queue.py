"""The rq side of a job: enqueue by dotted path with the JSON serializer, positions, removal.

The gateway never imports the worker (and so never torch): it enqueues ``worker.tasks.run_job`` by name
with only the job id; the worker reads the parameters from the job record.

Order: rq takes jobs from the head of the list, oldest first. A worker that starts a caption job also
claims batch partners among the first queued jobs (``worker.runner``, :meth:`JobStore.claim_queued`), so a
caption job may leave the queue before older jobs of other kinds or settings, together with the older
caption job it joins; no other job is overtaken.
"""

from __future__ import annotations

from typing import cast

from redis import Redis
from redis.client import Pipeline
from rq import Callback, Queue
from rq.job import Job as RqJob
from rq.serializers import JSONSerializer

from service.contract.errors import QueueFull

JOB_FUNCTION = "worker.tasks.run_job"
# rq calls it when it gives up on a job, e.g. one whose worker died after taking it off the queue.
FAILURE_CALLBACK = "worker.tasks.on_failure"


class JobQueue:
    def __init__(
        self, redis: Redis, *, name: str, max_length: int, job_timeout_seconds: int, ttl_seconds: int
    ):
        self.rq = Queue(
            name, connection=redis, serializer=JSONSerializer, default_timeout=job_timeout_seconds
        )
        self.max_length = max_length
        self.job_timeout_seconds = job_timeout_seconds
        self.ttl_seconds = ttl_seconds

    @property
    def name(self) -> str:
        return self.rq.name

    @property
    def key(self) -> str:
        """The Redis list holding the queued job ids (rq pops from its head)."""
        return self.rq.key

    def depth(self) -> int:
        return self.rq.count

    def admit(self, depth: int) -> None:
        """Raise :class:`QueueFull` when a queue of ``depth`` jobs accepts no more (``JobStore.create``
        reads the depth inside its transaction)."""
        if depth >= self.max_length:
            raise QueueFull(f"the queue holds {self.max_length} jobs, its limit; retry later")

    def enqueue(self, job_id: str, pipeline: Pipeline) -> None:
        """Add ``run_job(job_id)`` to the queue within the caller's transaction."""
        self.rq.enqueue_call(
            JOB_FUNCTION,
            args=(job_id,),
            job_id=job_id,
            timeout=self.job_timeout_seconds,
            result_ttl=self.ttl_seconds,
            failure_ttl=self.ttl_seconds,
            description=f"univigu job {job_id}",
            on_failure=Callback(FAILURE_CALLBACK),
            pipeline=pipeline,
        )

    def peek(self, count: int) -> list[str]:
        """The ids of the first ``count`` queued jobs, next first."""
        ids = cast(list[bytes], self.rq.connection.lrange(self.key, 0, count - 1))
        return [job_id.decode() for job_id in ids]

    @staticmethod
    def entry_key(job_id: str) -> str:
        """rq's own record of a queued job, which a worker that claims the job deletes."""
        return RqJob.key_for(job_id)

    def position(self, job_id: str) -> int | None:
        return self.rq.get_job_position(job_id)

    def remove(self, job_id: str) -> None:
        """Drop a canceled queued job from rq (a worker that already popped it skips it anyway)."""
        self.rq.remove(job_id)
        self.rq.connection.delete(RqJob.key_for(job_id))
