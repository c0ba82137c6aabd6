"""The gateway's use cases over the job store, the queue and the result files: submitting, reading,
listing, canceling and deleting jobs, and finding their video. The native routes and the
OpenAI-compatible layer (``service.gateway.openai``) both call these, so both report a job the same way.

Every read on behalf of a caller goes through :func:`check_visible` (one job: :func:`read_record`,
:func:`read_job` and the event stream call it) or :func:`list_records` (pages), the places that decide
which jobs a caller may see: with API keys on, a caller sees only the jobs its key created, and another
key's job answers 404 exactly like an unknown id.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Collection
from pathlib import Path
from typing import Any

import httpx
from fastapi import Response

from model.media import VideoLimits, probe_video
from service.contract.errors import JobNotFound
from service.contract.result_files import UPLOAD_NAME
from service.contract.schemas import Job, JobPage, JobRecord, JobStatus, JobType, ServedModel
from service.contract.store import Idempotency, Submission
from service.contract.timing import JobSnapshot
from service.gateway.dependencies import Caller, Services
from service.gateway.errors import HttpError, quote_input
from service.gateway.webhooks.addresses import WebhookRefused, resolve


def new_job_id() -> str:
    return uuid.uuid4().hex


def _fingerprint(job_type: JobType, params: dict[str, Any], extra: str, webhook: str | None) -> str:
    request = {
        "type": job_type.value,
        "params": params,
        "extra": extra,
        **({"webhook": webhook} if webhook else {}),
    }
    return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()


def check_webhook(services: Services, url: str) -> None:
    """422 unless this gateway can sign events and may call ``url`` (see ``webhooks.addresses``).
    Resolves the host: blocks on DNS."""
    settings = services.settings
    if settings.webhook_secret is None:
        raise HttpError(
            422,
            "unsupported_parameter",
            "webhooks are off on this server: it has no UNIVIGU_WEBHOOK_SECRET to sign events with",
            param="webhook",
        )
    try:
        resolve(httpx.URL(url), allow_private=settings.webhook_allow_private)
    except WebhookRefused as exc:
        raise HttpError(422, "invalid_parameter", str(exc), param="webhook") from exc


def submit(
    services: Services,
    job_type: JobType,
    params: dict[str, Any],
    *,
    job_id: str,
    caller: Caller,
    idempotency_key: str | None,
    fingerprint_extra: str = "",
    webhook: str | None = None,
) -> Submission:
    """Record and enqueue a job in one transaction; a known Idempotency-Key returns its job instead.
    ``params`` must fit the served model (422 otherwise, prompts counted in its tokens); ``webhook``: the
    URL that gets the job's end (checked here)."""
    services.served.check(job_type, params)
    if webhook is not None:
        check_webhook(services, webhook)
    idempotency = (
        Idempotency(caller.scope, idempotency_key, _fingerprint(job_type, params, fingerprint_extra, webhook))
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
        webhook=webhook,
    )


def submit_caption(
    services: Services,
    params: dict[str, Any],
    *,
    job_id: str,
    caller: Caller,
    idempotency_key: str | None,
    sha256: str,
    filename: str | None = None,
    webhook: str | None = None,
) -> Submission:
    """Probe the video already stored at ``files.upload(job_id)`` and submit its caption job. Errors name
    the video by the client's ``filename``, never by the internal file it is stored in.

    The upload is removed when anything fails and when an Idempotency-Key replays an earlier job (whose
    own upload is the one that counts); ``sha256`` (of the video) is part of that key's fingerprint."""
    try:
        probe_video(
            services.files.upload(job_id),
            VideoLimits(max_bytes=services.settings.max_upload_bytes),
            name=UPLOAD_NAME if filename is None else quote_input(filename),
        )
        submission = submit(
            services,
            JobType.caption,
            params,
            job_id=job_id,
            caller=caller,
            idempotency_key=idempotency_key,
            fingerprint_extra=sha256,
            webhook=webhook,
        )
    except Exception:  # not a handler: the upload is removed and the error propagates to the mapping
        services.files.remove_job(job_id)
        raise
    if not submission.created:
        services.files.remove_job(job_id)
    return submission


def require_served_model(services: Services) -> ServedModel:
    """What the workers serve, with the limits this gateway enforces (``GET /model``, ``GET /v1/models``);
    503 before any worker has started."""
    model = services.store.served_model()
    if model is None:
        raise HttpError(
            503,
            "no_workers",
            "no worker has started yet, so no model is served; start one with `univigu worker`",
            headers={"Retry-After": str(services.settings.retry_after_seconds)},
        )
    return services.served.shown(model)


def _shown(services: Services, record: JobRecord, position: int | None) -> Job:
    """The job as the API shows it: an unfinished one with its ETA (from the shared queue timing)."""
    if record.status.terminal:
        return Job.from_record(record)
    return JobSnapshot(record, position, services.timing.get()).job(time.time())


def job_view(services: Services, record: JobRecord) -> Job:
    """The job as the API shows it, its queue position read while queued."""
    position = services.queue.position(record.id) if record.status == JobStatus.queued else None
    return _shown(services, record, position)


def check_visible(caller: Caller, record: JobRecord) -> None:
    """JobNotFound unless ``caller`` may see the job: with API keys on, only the key that created it."""
    if caller.owner is not None and record.owner != caller.owner:
        raise JobNotFound(record.id)


def read_record(services: Services, caller: Caller, job_id: str) -> tuple[JobRecord, int | None]:
    """The job ``job_id`` as ``caller`` may see it, with its queue position while queued, in one Redis
    round trip (the hot path of polling clients). JobNotFound for an unknown or expired id and for
    another API key's job alike.

    Every route that reads, downloads, cancels or deletes a job on a caller's behalf, native or
    OpenAI-compatible, reads it here first."""
    record, position = services.store.get_with_position(job_id, services.queue.key)
    check_visible(caller, record)
    return record, position


def read_job(services: Services, caller: Caller, job_id: str) -> Job:
    """The job with its queue position and ETA, as ``caller`` may see it (``GET /jobs/{id}``)."""
    return _shown(services, *read_record(services, caller, job_id))


def list_records(
    services: Services,
    caller: Caller,
    *,
    status: JobStatus | None = None,
    job_types: Collection[JobType] | None = None,
    before: float | None = None,
    after: float | None = None,
    oldest_first: bool = False,
    limit: int,
) -> tuple[list[JobRecord], float | None]:
    """A page of the jobs ``caller`` may see (see ``JobStore.page`` for the cursor)."""
    return services.store.page(
        status=status,
        job_type=job_types,
        before=before,
        after=after,
        oldest_first=oldest_first,
        limit=limit,
        owner=caller.owner,
    )


def list_page(
    services: Services,
    caller: Caller,
    status: JobStatus | None,
    job_type: JobType | None,
    before: float | None,
    limit: int,
) -> JobPage:
    records, next_cursor = list_records(
        services,
        caller,
        status=status,
        job_types=None if job_type is None else (job_type,),
        before=before,
        limit=limit,
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


def _cancel(services: Services, record: JobRecord) -> tuple[JobStatus, JobRecord]:
    """Cancel (queued) or flag (running) a job; returns its status before and its record right after.
    A queued job also leaves the queue and loses its upload."""
    before, after = services.store.cancel(record.id)
    if before == JobStatus.queued:
        services.queue.remove(record.id)
        services.files.remove_upload(record.id)
        services.metrics.jobs_finished.labels(record.type.value, JobStatus.canceled.value).inc()
    return before, after


def cancel(services: Services, caller: Caller, job_id: str) -> Job:
    """Queued: canceled now and never run. Running: stops at its next denoising step; the answer says
    ``running`` (the record as the cancel left it), and polling shows ``canceled`` once the worker has
    stopped. Finished: 409."""
    record, _ = read_record(services, caller, job_id)
    before, after = _cancel(services, record)
    if before.terminal:
        raise HttpError(
            409, "job_finished", f"job {job_id} already {before.value}; nothing to cancel", param="id"
        )
    return job_view(services, after)


def delete(services: Services, caller: Caller, job_id: str) -> JobRecord:
    """Cancel the job if it has not finished, then delete its record and every file it has.

    A queued job leaves the queue; a running one stops at its next denoising step (its worker reads the
    missing record as a cancel request and drops its outcome). Afterwards the job answers 404 everywhere.
    A file its worker was writing at that very moment gets an expiry from that worker, and the periodic
    clean-up (``ResultFiles.clean_expired``) removes it then. Returns the record as it was read before the
    delete."""
    record, _ = read_record(services, caller, job_id)
    if not record.status.terminal:
        _cancel(services, record)
    services.store.delete(job_id)
    services.files.remove_job(job_id)
    return record


def video_file(services: Services, record: JobRecord) -> Path:
    """The MP4 of a succeeded generate or joint job (read through ``read_record``); 404 or 409 otherwise."""
    if record.type == JobType.caption:
        raise HttpError(404, "no_video", "caption jobs have no video; see /result", param="id")
    succeeded(record)
    path = services.files.video(record.id)
    if not path.is_file():
        raise HttpError(404, "result_expired", f"the video of job {record.id} was deleted", param="id")
    return path


def succeeded(record: JobRecord) -> None:
    """409 unless the job succeeded (its outputs exist only then)."""
    if record.status != JobStatus.succeeded:
        raise HttpError(409, "job_not_succeeded", f"job {record.id} is {record.status.value}", param="id")
