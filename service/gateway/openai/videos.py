"""``/v1/videos``: OpenAI's video resource over our generate and joint jobs (same queue, same records).

A video is a native job: its id is ``video_`` + the job id, and every read goes through the same use
cases as ``/jobs`` (``service.gateway.job_actions``), so ``GET /v1/videos/{id}`` and ``GET /jobs/{id}`` always
report the same status, progress, timestamps and outputs. Caption jobs are not videos: they are absent
from the list and answer 404 here.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from model.limits import Rule
from model.media import VideoLimits, first_frame_jpeg
from service.contract.errors import JobNotFound
from service.contract.schemas import (
    Job,
    JobRecord,
    JobResult,
    JobStatus,
    JobType,
    ServedModel,
    params_and_webhook,
)
from service.gateway.dependencies import Caller, IdempotencyKey, Services, ServicesDep
from service.gateway.downloads import Download
from service.gateway.errors import HttpError, quote_input
from service.gateway.job_actions import (
    accepted,
    delete,
    job_view,
    list_records,
    new_job_id,
    read_job,
    read_record,
    submit,
    video_file,
)
from service.gateway.openai.common import (
    OpenAICaller,
    inline_schema,
    job_id_of,
    parse_json_object,
    read_body,
    resolve_model,
    video_id_for,
)
from service.gateway.openai.errors import error_responses
from service.gateway.openai.schemas import Video, VideoCreateRequest, VideoDeleted, VideoError, VideoList

router = APIRouter(tags=["openai"])

VIDEO_TYPES = (JobType.generate, JobType.joint)
STATUS = {
    JobStatus.queued: "queued",
    JobStatus.running: "in_progress",
    JobStatus.succeeded: "completed",
    JobStatus.failed: "failed",
    JobStatus.canceled: "failed",
}
MAX_PAGE = 100
MAX_CREATE_BODY = 1024 * 1024
THUMBNAIL_MAX_SIDE = 4096  # the first frame at its own size
_SIZE = re.compile(r"^\s*(\d+)\s*[xX×]\s*(\d+)\s*$")
ERRORS = error_responses(400, 401, 404, 409, 413, 415, 503)


# --- the video object ----------------------------------------------------------------------------------


def seconds_text(seconds: float) -> str:
    """A duration as OpenAI's string ``seconds``: ``"4"``, ``"2.125"``."""
    return f"{seconds:.4f}".rstrip("0").rstrip(".")


def _unix(value: Any) -> int | None:
    return None if value is None else int(value.timestamp())


def to_video(job: Job, model: ServedModel | None) -> Video:
    """The OpenAI video object of a native job. Sizes and length come from the output once there is one,
    else from the request, else from the served model's defaults (what the job will use)."""
    defaults = model.defaults if model else {}
    result = job.result or JobResult()

    def pick(name: str) -> Any:
        value = getattr(result, name)
        return value if value is not None else job.params.get(name, defaults.get(name))

    width, height, frames, fps = pick("width"), pick("height"), pick("num_frames"), pick("fps")
    error = job.error
    return Video(
        id=video_id_for(job.id),
        model=model.id if model else "unknown",
        status=STATUS[job.status],  # type: ignore[arg-type]
        progress=job.progress,
        created_at=int(job.created_at.timestamp()),
        completed_at=_unix(job.finished_at),
        expires_at=_unix(job.expires_at),
        size=f"{width}x{height}" if width and height else "",
        seconds=seconds_text(frames / fps) if frames and fps else "",
        prompt=job.params.get("prompt"),
        error=VideoError(code=error.code, message=error.message, param=error.param) if error else None,
        job_id=job.id,
        job_status=job.status,
        queue_position=job.queue_position,
        eta_seconds=job.eta_seconds,
        num_frames=frames,
        fps=fps,
        joint=job.type == JobType.joint,
        caption=result.caption,
        webhook=job.webhook,
    )


# --- POST /v1/videos ------------------------------------------------------------------------------------


def frames_for(seconds: str | float, fps: int, frames_rule: Rule) -> tuple[int, str]:
    """``seconds`` at ``fps`` as a frame count of the form 4k+1 (the nearest), and a note saying so;
    ``frames_rule``: the served model's ``num_frames`` rule."""
    try:
        value = float(seconds)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise HttpError(
            422,
            "invalid_parameter",
            f"seconds must be a positive number, got {quote_input(seconds)}",
            param="seconds",
        )
    exact = value * fps
    frames = max(1, 4 * math.floor((exact - 1) / 4 + 0.5) + 1)
    lowest, highest = int(frames_rule.minimum), int(frames_rule.maximum)
    if not lowest <= frames <= highest:
        raise HttpError(
            422,
            "invalid_parameter",
            f"seconds must be between {seconds_text(lowest / fps)} and {seconds_text(highest / fps)}"
            f" for the served model ({lowest} to {highest} frames at {fps} fps), got {quote_input(seconds)}",
            param="seconds",
        )
    shown = seconds_text(value)
    if frames == exact:
        note = f"seconds={shown} is {frames} frames at the model's {fps} fps (a valid 4k+1 count)"
    else:
        note = (
            f"seconds={shown} is {seconds_text(exact)} frames at the model's {fps} fps; frame counts are"
            f" 4k+1, so it was rounded to {frames} frames ({seconds_text(frames / fps)} s)"
        )
    return frames, note


def parse_size(size: str) -> tuple[int, int]:
    """``"WIDTHxHEIGHT"`` -> (width, height); the ranges are the native request model's to check."""
    match = _SIZE.match(size)
    if not match:
        raise HttpError(
            422,
            "invalid_parameter",
            f'size must be "WIDTHxHEIGHT" in pixels (e.g. "832x480"), got {quote_input(size)}',
            param="size",
        )
    return int(match.group(1)), int(match.group(2))


_RENAMED = {"width": "size", "height": "size", "num_frames": "seconds"}


def _native_params(
    services: Services, job_type: JobType, fields: dict[str, Any]
) -> tuple[dict[str, Any], str | None]:
    """The job's parameters and webhook, validated by the native route's own request model (the same
    ranges, the same messages), with errors on width/height/num_frames reported against OpenAI's
    size/seconds."""
    model = services.models.joint if job_type == JobType.joint else services.models.generate
    try:
        return params_and_webhook(model.model_validate(fields))
    except ValidationError as exc:
        errors = []
        for error in exc.errors(include_url=False):
            name = str(error["loc"][0]) if error["loc"] else ""
            if name in _RENAMED:
                message = error["msg"].replace("Input should", "should").removeprefix("Value error, ")
                error = {**error, "loc": (_RENAMED[name],), "msg": f"{name} {message}"}
            errors.append(error)
        raise RequestValidationError(errors) from exc


async def _create_fields(request: Request) -> dict[str, Any]:
    """The create request's fields from JSON or form data (multipart or urlencoded)."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type in ("multipart/form-data", "application/x-www-form-urlencoded"):
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > MAX_CREATE_BODY:
            raise HttpError(413, "payload_too_large", f"the request body exceeds {MAX_CREATE_BODY} bytes")
        fields: dict[str, Any] = {}
        async with request.form(max_files=1, max_fields=64) as form:
            for name, value in form.multi_items():
                if isinstance(value, UploadFile):
                    if name != "input_reference":
                        raise HttpError(
                            422, "invalid_parameter", f"{name}: a file is not expected here", param=name
                        )
                    fields[name] = "<file>"
                elif value != "":  # an empty form field is an omitted option (as on /caption)
                    fields[name] = value
        return fields
    if media_type == "application/json" or media_type.endswith("+json"):
        return parse_json_object(await read_body(request, MAX_CREATE_BODY))
    raise HttpError(
        415, "unsupported_media_type", "send the video request as JSON or as multipart/form-data fields"
    )


def _validated(model: type[BaseModel], fields: dict[str, Any]) -> Any:
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from exc


def _create(
    services: Services, caller: Caller, key: str | None, body: VideoCreateRequest, response: Response
) -> Video:
    model = resolve_model(services, body.model)
    fields: dict[str, Any] = {
        "prompt": body.prompt,
        "negative_prompt": body.negative_prompt,
        "seed": body.seed,
        "steps": body.steps,
        "guidance_scale": body.guidance_scale,
        "webhook": body.webhook,
    }
    if body.size is not None:
        fields["width"], fields["height"] = parse_size(body.size)
    note = None
    if body.seconds is not None:
        frames_rule = services.served.limits(model, "generate").rules["num_frames"]
        fields["num_frames"], note = frames_for(body.seconds, int(model.defaults["fps"]), frames_rule)
    job_type = JobType.joint if body.joint else JobType.generate
    params, webhook = _native_params(services, job_type, fields)
    submission = submit(
        services, job_type, params, job_id=new_job_id(), caller=caller, idempotency_key=key, webhook=webhook
    )
    job = accepted(services, submission, response)
    response.headers["Location"] = f"/v1/videos/{video_id_for(job.id)}"
    video = to_video(job, model)
    if body.seconds is not None:
        requested = body.seconds if isinstance(body.seconds, str) else seconds_text(body.seconds)
        video = video.model_copy(update={"seconds_requested": requested, "seconds_note": note})
    return video


@router.post(
    "/videos",
    response_model=Video,
    responses=ERRORS,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                media: {"schema": inline_schema(VideoCreateRequest)}
                for media in ("application/json", "multipart/form-data")
            },
        }
    },
)
async def create_video(
    request: Request,
    response: Response,
    services: ServicesDep,
    caller: OpenAICaller,
    idempotency_key: IdempotencyKey,
) -> Video:
    """Start a video (a generate job, or a joint job with `joint: true`); poll GET /v1/videos/{id}."""
    body: VideoCreateRequest = _validated(VideoCreateRequest, await _create_fields(request))
    if body.input_reference is not None:
        raise HttpError(
            422,
            "unsupported_parameter",
            "input_reference is not supported: the served model generates video from text only",
            param="input_reference",
        )
    return await run_in_threadpool(_create, services, caller, idempotency_key, body, response)


# --- reading, listing, deleting ------------------------------------------------------------------------


def _video_job(services: Services, caller: Caller, video: str) -> Job:
    job = read_job(services, caller, job_id_of(video))
    _not_caption(job.type, job.id)
    return job


def _not_caption(job_type: JobType, job_id: str) -> None:
    if job_type == JobType.caption:
        raise HttpError(
            404, "no_video", f"job {job_id} is a caption job, not a video; see GET /jobs/{job_id}", param="id"
        )


def _retrieve(services: Services, caller: Caller, video: str) -> Video:
    job = _video_job(services, caller, video)
    return to_video(job, services.store.served_model())


@router.get("/videos/{video_id}", response_model=Video, responses=ERRORS)
async def retrieve_video(video_id: str, services: ServicesDep, caller: OpenAICaller) -> Video:
    """The video object; the same job as GET /jobs/{job_id}."""
    return await run_in_threadpool(_retrieve, services, caller, video_id)


def _cursor(services: Services, caller: Caller, after: str) -> float:
    """The creation time of the video ``after`` (the previous page's last_id)."""
    try:
        job_id = job_id_of(after)
        read_record(services, caller, job_id)
    except JobNotFound:
        job_id = ""
    score = services.store.created_score(job_id) if job_id else None
    if score is None:
        raise HttpError(404, "job_not_found", f"no video {after!r} (unknown or expired)", param="after")
    return score


def _list(services: Services, caller: Caller, after: str | None, limit: int, order: str) -> VideoList:
    cursor = None if after is None else _cursor(services, caller, after)
    oldest_first = order == "asc"
    records, _ = list_records(
        services,
        caller,
        job_types=VIDEO_TYPES,
        before=None if oldest_first else cursor,
        after=cursor if oldest_first else None,
        oldest_first=oldest_first,
        limit=limit + 1,
    )
    model = services.store.served_model()
    data = [to_video(job_view(services, record), model) for record in records[:limit]]
    return VideoList(
        data=data,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
        has_more=len(records) > limit,
    )


@router.get("/videos", response_model=VideoList, responses=ERRORS)
async def list_videos(
    services: ServicesDep,
    caller: OpenAICaller,
    after: Annotated[str | None, Query(description="The last_id of the previous page.")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 20,
    order: Annotated[Literal["asc", "desc"], Query(description="By creation time.")] = "desc",
) -> VideoList:
    """Videos (generate and joint jobs), newest first unless order=asc."""
    return await run_in_threadpool(_list, services, caller, after, limit, order)


def _delete(services: Services, caller: Caller, video: str) -> VideoDeleted:
    job_id = job_id_of(video)
    record, _ = read_record(services, caller, job_id)
    _not_caption(record.type, job_id)
    delete(services, caller, job_id)
    return VideoDeleted(id=video_id_for(job_id))


@router.delete("/videos/{video_id}", response_model=VideoDeleted, responses=ERRORS)
async def delete_video(video_id: str, services: ServicesDep, caller: OpenAICaller) -> VideoDeleted:
    """Cancel the job if it has not finished, then delete its record and files (404 afterwards)."""
    return await run_in_threadpool(_delete, services, caller, video_id)


def _thumbnail(services: Services, record: JobRecord) -> FileResponse:
    video = video_file(services, record)
    path = services.files.thumbnail(record.id)
    if not path.is_file():
        limits = VideoLimits(max_bytes=max(services.settings.max_upload_bytes, video.stat().st_size))
        jpeg = first_frame_jpeg(video, max_side=THUMBNAIL_MAX_SIDE, limits=limits)
        services.files.write_thumbnail(record.id, jpeg)
    return Download(path, media_type="image/jpeg", filename=f"{video_id_for(record.id)}.jpg")


@router.get(
    "/videos/{video_id}/content",
    response_class=FileResponse,
    responses={
        200: {"content": {"video/mp4": {}, "image/jpeg": {}}},
        206: {"description": "Partial content (Range requests)."},
        **ERRORS,
    },
)
def download_video(
    video_id: str,
    services: ServicesDep,
    caller: OpenAICaller,
    variant: Annotated[
        Literal["video", "thumbnail", "spritesheet"],
        Query(description="video: the MP4; thumbnail: a JPEG of the first frame."),
    ] = "video",
) -> FileResponse:
    """The MP4 of a completed video (Range requests supported), or its first frame as a JPEG."""
    job_id = job_id_of(video_id)
    record, _ = read_record(services, caller, job_id)
    _not_caption(record.type, job_id)
    if variant == "spritesheet":
        raise HttpError(
            422,
            "unsupported_parameter",
            "variant=spritesheet is not supported; use video or thumbnail",
            param="variant",
        )
    if variant == "thumbnail":
        return _thumbnail(services, record)
    return Download(
        video_file(services, record),
        media_type="video/mp4",
        filename=f"{video_id_for(job_id)}.mp4",
        content_disposition_type="inline",
    )
