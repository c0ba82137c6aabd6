"""Domain errors of the service side, flat and free of HTTP: the gateway maps them to answers in one
place (``service.gateway.errors``); the worker records a failed job's ``code``.

The model package has its own (``model.errors``); the two sides share nothing but the codes.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base class of every error the job system raises on purpose; ``code`` is stable."""

    code = "service_error"


class JobNotFound(ServiceError, LookupError):
    code = "job_not_found"

    def __init__(self, job_id: str) -> None:
        super().__init__(f"no job {job_id!r} (unknown or expired)")
        self.job_id = job_id


class IdempotencyConflict(ServiceError, ValueError):
    """The Idempotency-Key was used before with a different request."""

    code = "idempotency_key_reused"


class QueueFull(ServiceError, RuntimeError):
    """The queue holds its limit of jobs; nothing was recorded."""

    code = "queue_full"


class RateLimited(ServiceError):
    """The client sent more requests than its rate limit allows; retry after ``retry_after_seconds``."""

    code = "rate_limited"

    def __init__(self, retry_after_seconds: int) -> None:
        super().__init__(f"too many requests; retry in {retry_after_seconds} s")
        self.retry_after_seconds = retry_after_seconds


class StorageError(ServiceError):
    """Writing a job's result files failed (disk full, read-only volume)."""

    code = "storage_error"
