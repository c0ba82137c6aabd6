"""Submitting, reading and canceling jobs: the gateway's use cases over the job store and the queue.

Every route that reads, lists, cancels or downloads a job goes through :func:`job_for_caller` (or
``list_page``'s owner filter): with API keys on, a caller sees only the jobs its key created, and
another key's job answers 404 exactly like an unknown id.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import Any

from fastapi import Response

from service.dependencies import Caller, Services
from service.errors import ApiError
from service.jobs import Idempotency, JobNotFound, Submission
from service.schemas import Job, JobPage, JobRecord, JobStatus, JobType


def new_job_id() -> str:
    return uuid.uuid4().hex


def _fingerprint(job_type: JobType, params: dict[str, Any], extra: str) -> str:
    canonical = json.dumps({"type": job_type.value, "params": params, "extra": extra}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def submit(
    services: Services,
    job_type: JobType,
    params: dict[str, Any],
    *,
    job_id: str,
    caller: Caller,
    idempotency_key: str | None,
    fingerprint_extra: str = "",
) -> Submission:
    """Record and enqueue a job in one transaction; a known Idempotency-Key returns its job instead."""
    check_against_served_model(services, params)
    idempotency = (
        Idempotency(caller.scope, idempotency_key, _fingerprint(job_type, params, fingerprint_extra))
        if idempotency_key
        else None
    )
    return services.store.create(
        job_id,
        job_type,
        params,
        idempotency=idempotency,
        idempotency_ttl_seconds=services.settings.idempotency_ttl_seconds,
        enqueue=lambda pipeline: services.queue.enqueue(job_id, pipeline),
        admit=services.queue.admit,
        queue_key=services.queue.key,
        owner=caller.owner,
    )


def check_against_served_model(services: Services, params: dict[str, Any]) -> None:
    """Refuse a caption length the served model cannot produce, before the job reaches the queue."""
    tokens = params.get("max_tokens")
    if tokens is None:
        return
    model = services.store.served_model()
    if model is not None and tokens > model.max_caption_tokens:
        raise ApiError(
            422,
            "invalid_parameter",
            f"max_tokens must be at most {model.max_caption_tokens} for the served model"
            f" ({model.preset or 'custom'}), got {tokens}",
            param="max_tokens",
        )


def job_view(services: Services, record: JobRecord) -> Job:
    position = services.queue.position(record.id) if record.status == JobStatus.queued else None
    return Job.from_record(record, queue_position=position)


def job_for_caller(services: Services, caller: Caller, job_id: str) -> tuple[JobRecord, int | None]:
    """The job ``caller`` asked for and its queue position, in one Redis round trip (the hot path of
    polling clients). Raises JobNotFound for an unknown id and for another API key's job alike."""
    record, position = services.store.get_with_position(job_id, services.queue.key)
    if caller.owner is not None and record.owner != caller.owner:
        raise JobNotFound(job_id)
    return record, position


def read_job(services: Services, caller: Caller, job_id: str) -> Job:
    record, position = job_for_caller(services, caller, job_id)
    return Job.from_record(record, queue_position=position)


def list_page(
    services: Services,
    caller: Caller,
    status: JobStatus | None,
    job_type: JobType | None,
    before: float | None,
    limit: int,
) -> JobPage:
    records, next_cursor = services.store.page(
        status=status, job_type=job_type, before=before, limit=limit, owner=caller.owner
    )
    return JobPage(
        jobs=[job_view(services, record) for record in records],
        next_cursor=None if next_cursor is None else repr(next_cursor),
    )


def accepted(services: Services, submission: Submission, response: Response) -> Job:
    """The 202 body and headers of a submission (``Idempotent-Replayed`` on a replay)."""
    response.headers["Location"] = f"/jobs/{submission.record.id}"
    if submission.created:
        return Job.from_record(submission.record, queue_position=submission.queue_position)
    response.headers["Idempotent-Replayed"] = "true"
    return job_view(services, submission.record)


def cancel(services: Services, caller: Caller, job_id: str) -> Job:
    """Queued: canceled now and never run. Running: stops at its next denoising step. Finished: 409."""
    job_for_caller(services, caller, job_id)
    before = services.store.cancel(job_id)
    record = services.store.get(job_id)
    if before == JobStatus.queued:
        services.queue.remove(job_id)
        services.files.remove_upload(job_id)
        services.metrics.jobs_finished.labels(record.type.value, JobStatus.canceled.value).inc()
    elif before.terminal:
        raise ApiError(
            409, "job_finished", f"job {job_id} already {before.value}; nothing to cancel", param="id"
        )
    return job_view(services, record)
