"""Reading, listing, canceling and deleting jobs; downloading their results."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Response
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from service.contract.schemas import Job, JobPage, JobStatus, JobType
from service.gateway.dependencies import CallerDep, ServicesDep
from service.gateway.downloads import Download
from service.gateway.errors import HttpError
from service.gateway.job_actions import (
    cancel,
    delete,
    list_page,
    read_job,
    read_record,
    succeeded,
    video_file,
)
from service.gateway.routes._responses import READ_ERRORS, error_responses

router = APIRouter(tags=["jobs"])

JobId = Annotated[str, Path(pattern=r"^[0-9a-f]{32}$", description="The job id from the 202 answer.")]
MAX_PAGE = 100
VIDEO_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"video/mp4": {}}},
    206: {"description": "Partial content (Range requests)."},
    **error_responses(400, 416),
}


@router.get("/jobs", response_model=JobPage, responses=READ_ERRORS)
async def list_jobs(
    services: ServicesDep,
    caller: CallerDep,
    status: JobStatus | None = None,
    job_type: Annotated[JobType | None, Query(alias="type", description="Job type.")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 20,
    cursor: Annotated[
        float | None, Query(ge=0, allow_inf_nan=False, description="next_cursor of the previous page.")
    ] = None,
) -> JobPage:
    """Recent jobs, newest first, optionally only one status and/or type."""
    return await run_in_threadpool(list_page, services, caller, status, job_type, cursor, limit)


@router.get("/jobs/{job_id}", response_model=Job, responses=READ_ERRORS)
async def get_job(job_id: JobId, services: ServicesDep, caller: CallerDep) -> Job:
    return await run_in_threadpool(read_job, services, caller, job_id)


@router.post("/jobs/{job_id}/cancel", response_model=Job, responses=READ_ERRORS)
async def cancel_job(job_id: JobId, services: ServicesDep, caller: CallerDep) -> Job:
    """A queued job is canceled and never runs; a running one stops at its next denoising step
    (its status turns canceled then); a finished job answers 409."""
    return await run_in_threadpool(cancel, services, caller, job_id)


@router.delete("/jobs/{job_id}", status_code=204, response_class=Response, responses=READ_ERRORS)
async def delete_job(job_id: JobId, services: ServicesDep, caller: CallerDep) -> Response:
    """Cancel the job if it has not finished, then delete its record and every file it has; it answers
    404 everywhere afterwards."""
    await run_in_threadpool(delete, services, caller, job_id)
    return Response(status_code=204)


@router.get(
    "/jobs/{job_id}/video",
    response_class=FileResponse,
    responses={**VIDEO_RESPONSES, **READ_ERRORS},
)
def get_video(job_id: JobId, services: ServicesDep, caller: CallerDep) -> FileResponse:
    """The MP4 of a generate or joint job; supports Range requests (seeking)."""
    record, _ = read_record(services, caller, job_id)
    return Download(
        video_file(services, record),
        media_type="video/mp4",
        filename=f"{job_id}.mp4",
        content_disposition_type="inline",
    )


@router.get(
    "/jobs/{job_id}/result",
    response_class=FileResponse,
    responses={**READ_ERRORS, **error_responses(400, 416)},
)
def get_result(job_id: JobId, services: ServicesDep, caller: CallerDep) -> FileResponse:
    """The result JSON (caption, tokens, parameters used, output sizes)."""
    record, _ = read_record(services, caller, job_id)
    succeeded(record)
    path = services.files.result_json(job_id)
    if not path.is_file():
        raise HttpError(404, "result_expired", f"the result of job {job_id} was deleted", param="id")
    return Download(path, media_type="application/json")
