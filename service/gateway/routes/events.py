"""``GET /jobs/{id}/events``: a job's status, progress, queue position and ETA as Server-Sent Events.

The stream opens with a ``retry:`` hint, then sends the job (a ``job`` event whose data is the job as
``GET /jobs/{id}`` shows it) and again whenever its status, progress or queue position changes; the last
event is the terminal state, and the stream closes after it. Each event's id names its state
(:func:`event_id`), so a client that reconnects with ``Last-Event-ID`` gets only states it has not seen,
and ``204 No Content`` (which tells a browser's EventSource to stop) once the job ended in the state it
named. A job deleted or expired mid-stream ends it with an ``error`` event holding the error envelope.
A ``ping`` event (empty data, no id; browsers' EventSource ignores it) every :data:`PING_SECONDS` keeps
proxies from closing a quiet stream and lets clients tell a buffering proxy (nothing arrives) from a
quiet job.

Reading Redis is :class:`service.gateway.watcher.JobWatcher`'s: one round trip per interval for all
streams of a gateway.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Request, Response
from sse_starlette import EventSourceResponse, ServerSentEvent

from service.contract.errors import JobNotFound
from service.contract.schemas import ErrorEnvelope, ErrorInfo, Job
from service.contract.timing import JobSnapshot
from service.gateway.dependencies import CallerDep
from service.gateway.job_actions import check_visible
from service.gateway.routes._responses import READ_ERRORS
from service.gateway.routes.jobs import JobId
from service.gateway.watcher import JobWatcher

router = APIRouter(tags=["jobs"])

PING_SECONDS = 3
RETRY_MILLISECONDS = 2000
EVENT = "job"


def event_id(job: Job) -> str:
    """The id of the event that shows ``job``: ``<status>.<progress>``, plus ``.<queue position>`` while
    queued (``queued.0.3``, ``running.45``, ``succeeded.100``). Equal ids mean the same state."""
    position = "" if job.queue_position is None else f".{job.queue_position}"
    return f"{job.status.value}.{job.progress}{position}"


def _ping() -> ServerSentEvent:
    return ServerSentEvent("", event="ping")


async def _stream(
    watcher: JobWatcher, first: JobSnapshot, seen: str | None
) -> AsyncIterator[ServerSentEvent]:
    """``first``, then each new state until a terminal one; ``seen`` is the id of the state the client has."""
    yield ServerSentEvent(retry=RETRY_MILLISECONDS)
    job = first.job(time.time())
    async with watcher.follow(first) as following:
        while True:
            if event_id(job) != seen:
                seen = event_id(job)
                yield ServerSentEvent(job.model_dump_json(), event=EVENT, id=seen)
            if job.status.terminal:
                return
            snapshot = await following.next()
            if snapshot is None:
                gone = JobNotFound(job.id)
                error = ErrorEnvelope(error=ErrorInfo(code=gone.code, message=str(gone), param="id"))
                yield ServerSentEvent(error.model_dump_json(), event="error")
                return
            job = snapshot.job(time.time())


@router.get(
    "/jobs/{job_id}/events",
    response_class=EventSourceResponse,
    responses={
        200: {
            "content": {"text/event-stream": {}},
            "description": "`job` events (data: the job) until the terminal one; see docs/api.md.",
        },
        204: {"description": "Last-Event-ID named the state the job ended in: nothing more will come."},
        **READ_ERRORS,
    },
)
async def job_events(
    job_id: JobId,
    request: Request,
    caller: CallerDep,
    last_event_id: Annotated[
        str | None, Header(alias="Last-Event-ID", description="Resume after this event's state.")
    ] = None,
) -> Response:
    """Follow a job live: its status, progress, queue position and `eta_seconds`, as Server-Sent Events."""
    watcher: JobWatcher = request.app.state.job_watcher
    first = await watcher.read(job_id)
    check_visible(caller, first.record)
    job = first.job(time.time())
    if job.status.terminal and event_id(job) == last_event_id:
        return Response(status_code=204)
    return EventSourceResponse(
        _stream(watcher, first, last_event_id), ping=PING_SECONDS, ping_message_factory=_ping
    )
