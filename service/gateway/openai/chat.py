"""``/v1/chat/completions``: captioning one video, the way video-language servers and evaluation
harnesses send it.

The user message carries the video as a content part ``{"type": "video_url", "video_url": {"url":
"data:video/mp4;base64,..."}}``, or as its frames: ``image_url`` parts with PNG or JPEG ``data:`` URLs,
in order (what lmms-eval's OpenAI-compatible models send). Text in that message conditions the caption
(the native caption job's ``prompt``). Frames become an MP4 at the model's size (:func:`_frames_clip`),
so from there both forms are one caption job, submitted through the same use cases as ``POST /caption``.
The route waits for it: the caption is the assistant's message. After ``chat_timeout_seconds`` it
answers 504 naming the job, which keeps running (its caption can still be read from ``GET /jobs/{id}``);
nothing is canceled behind the caller's back.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from model.media import images_to_mp4
from service.contract.schemas import JobRecord, JobStatus, ServedModel
from service.contract.settings import Settings
from service.gateway.dependencies import Caller, IdempotencyKey, Services, ServicesDep
from service.gateway.errors import HttpError, failed_job_error, quote_input
from service.gateway.job_actions import new_job_id, read_record, submit_caption
from service.gateway.openai.common import (
    OpenAICaller,
    inline_schema,
    parse_json_object,
    read_body,
    resolve_model,
)
from service.gateway.openai.errors import error_responses
from service.gateway.openai.schemas import (
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    ChatMessageOut,
    Usage,
)

router = APIRouter(tags=["openai"])

# Room for the JSON around the base64 video (messages, options) beyond the upload cap's 4/3.
JSON_OVERHEAD_BYTES = 1024 * 1024
FRAME_TYPES = ("image/png", "image/jpeg", "image/jpg")
POLL_FIRST_SECONDS = 0.05
POLL_MAX_SECONDS = 0.5


def body_limit(settings: Settings) -> int:
    """The largest chat request: a base64 video of ``max_upload_bytes`` plus the JSON around it."""
    return settings.max_upload_bytes * 4 // 3 + JSON_OVERHEAD_BYTES


def _bad(message: str, param: str | None, code: str = "invalid_parameter") -> HttpError:
    return HttpError(422, code, message, param=param)


@dataclass(frozen=True)
class _Visual:
    """What the user message shows: one video or a list of frames (data URLs with their JSON paths)."""

    video: tuple[str, str] | None
    frames: list[tuple[str, str]]
    text: str | None


_NO_VIDEO = (
    "send exactly one video, as a content part of a user message:"
    ' {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,..."}},'
    " or its frames in order, as image_url parts of one user message"
)


def _visual(body: ChatCompletionRequest) -> _Visual:
    """The video or the frames of the request, and the text of their message."""
    videos: list[tuple[str, str, int]] = []
    frames: list[tuple[str, str, int]] = []
    for m, message in enumerate(body.messages):
        if not isinstance(message.content, list):
            continue
        for p, part in enumerate(message.content):
            path = f"messages[{m}].content[{p}]"
            if part.type in ("video_url", "image_url"):
                if message.role != "user":
                    raise _bad(
                        f"{path}: a video or frame must be in a user message, not {message.role!r}", path
                    )
                found = part.video_url if part.type == "video_url" else part.image_url
                url = found if found is None or isinstance(found, str) else found.url
                if not url:
                    raise _bad(f"{path}.{part.type}.url: field required", f"{path}.{part.type}.url")
                (videos if part.type == "video_url" else frames).append((url, f"{path}.{part.type}.url", m))
            elif part.type in ("input_image", "input_audio", "file"):
                raise _bad(
                    f"{path}: {part.type} parts are not supported; send a video_url or image_url parts", path
                )
    if videos and frames:
        raise _bad("send either one video_url or its frames as image_url parts, not both", "messages")
    if len(videos) > 1 or not (videos or frames):
        raise _bad(f"{_NO_VIDEO} (found {len(videos)} videos)", "messages")
    index = (videos or frames)[0][2]
    if any(m != index for _, _, m in frames):
        raise _bad("the frames of a video must all be in one user message", "messages")
    content = body.messages[index].content
    assert isinstance(content, list)
    texts = [part.text.strip() for part in content if part.type == "text" and part.text and part.text.strip()]
    return _Visual(
        video=(videos[0][0], videos[0][1]) if videos else None,
        frames=[(url, path) for url, path, _ in frames],
        text=" ".join(texts) or None,
    )


def _decode_data_url(url: str, param: str, max_bytes: int, *, media_types: tuple[str, ...] = ()) -> bytes:
    """The bytes of a ``data:[<type>];base64,<data>`` URL; any other URL is refused (no network).
    With ``media_types``, the URL must declare one of them."""
    what = "frame" if media_types else "video"
    example = f"data:{media_types[0] if media_types else 'video/mp4'};base64,..."
    if not url.startswith("data:"):
        scheme = url.split(":", 1)[0] if ":" in url else "a relative"
        raise _bad(
            f"only data: URLs are accepted ({example}): this service has no network access"
            f" to fetch {scheme} URLs; inline the {what} instead",
            param,
            code="unsupported_url",
        )
    header, comma, data = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise _bad(f"the data: URL must be base64-encoded ({example})", param)
    declared = header.removeprefix("data:").removesuffix(";base64").lower()
    if media_types and declared not in media_types:
        raise _bad(
            f"a frame must be one of {', '.join(media_types)}, got {quote_input(declared) if declared else 'no type'}",
            param,
        )
    compact = "".join(data.split())
    if len(compact) * 3 // 4 > max_bytes + 2:
        raise HttpError(413, "payload_too_large", f"the {what} exceeds {max_bytes} bytes", param=param)
    try:
        decoded = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _bad(f"the data: URL is not valid base64: {exc}", param) from exc
    if len(decoded) > max_bytes:
        raise HttpError(413, "payload_too_large", f"the {what} exceeds {max_bytes} bytes", param=param)
    if not decoded:
        raise _bad(f"the data: URL holds no {what}", param)
    return decoded


def _frames_clip(
    services: Services,
    model: ServedModel,
    frames: list[tuple[str, str]],
    frames_fps: float | None,
    upload: Path,
) -> None:
    """Write the frames (data URLs with their JSON paths) as the MP4 ``upload``.

    The frames are fitted to the model's size, as a video is. Their frame rate is ``frames_fps`` or, by
    default, what spreads them over one clip of the model's default length (``num_frames / fps``), as a
    harness's frames sampled evenly from a whole video are best seen: fewer frames are shown longer,
    more are thinned evenly. The worker then reads the MP4 like any video (resampled to the model's fps,
    trimmed to 4k+1 frames).
    """
    settings = services.settings
    if len(frames) > settings.max_frames:
        raise _bad(
            f"send at most {settings.max_frames} frames (UNIVIGU_MAX_FRAMES), got {len(frames)}", "messages"
        )
    limit = settings.max_upload_bytes
    images = [_decode_data_url(url, path, limit, media_types=FRAME_TYPES) for url, path in frames]
    if sum(map(len, images)) > limit:
        raise HttpError(413, "payload_too_large", f"the frames exceed {limit} bytes", param="messages")
    d = model.defaults
    fps = frames_fps or Fraction(len(images) * d["fps"], d["num_frames"])
    images_to_mp4(images, upload, height=d["height"], width=d["width"], fps=fps)


def _caption_params(
    services: Services, model: ServedModel, body: ChatCompletionRequest, prompt: str | None
) -> dict[str, Any]:
    """The native caption job's options, validated by the native route's request model.

    ``max_tokens`` is OpenAI's ceiling, so one above the model's longest caption gets the longest
    (harnesses send 1024 to any model); ``temperature: 0`` without a seed asks for the same answer
    every time, so it gets seed 0."""
    tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if tokens is not None:
        tokens = min(tokens, model.max_caption_tokens)
    seed = 0 if body.seed is None and body.temperature == 0 else body.seed
    fields = {
        "prompt": prompt,
        "steps": body.steps,
        "max_tokens": tokens,
        "seed": seed,
        "video_reuse": body.video_reuse,
    }
    try:
        params = services.models.caption.model_validate(fields)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from exc
    return params.model_dump(exclude_none=True)


def _submit(
    services: Services, caller: Caller, key: str | None, body: ChatCompletionRequest
) -> tuple[ServedModel, str]:
    """Check the request, store the video, submit the caption job; returns the model and the job id."""
    model = resolve_model(services, body.model)
    if body.stream:
        raise _bad(
            "stream=true is not supported: the caption is denoised as a whole and exists only at the end;"
            " send stream=false (the default)",
            "stream",
            code="unsupported_parameter",
        )
    if body.n not in (None, 1):
        raise _bad(f"n must be 1 (one caption per request), got {body.n}", "n", code="unsupported_parameter")
    visual = _visual(body)
    params = _caption_params(services, model, body, visual.text)
    job_id = new_job_id()
    upload = services.files.new_upload(job_id, services.settings.result_ttl_seconds)
    if visual.video is not None:
        video = _decode_data_url(*visual.video, services.settings.max_upload_bytes)
        upload.write_bytes(video)
    else:
        _frames_clip(services, model, visual.frames, body.frames_fps, upload)
        video = upload.read_bytes()  # the clip the frames became, for the Idempotency-Key
    submission = submit_caption(
        services,
        params,
        job_id=job_id,
        caller=caller,
        idempotency_key=key,
        sha256=hashlib.sha256(video).hexdigest(),
    )
    return model, submission.record.id


async def _wait(services: Services, caller: Caller, job_id: str, request: Request) -> JobRecord:
    """Poll the job until it finishes; 504 naming it after ``chat_timeout_seconds`` (it keeps running)."""
    timeout = services.settings.chat_timeout_seconds
    deadline = time.monotonic() + timeout
    interval = POLL_FIRST_SECONDS
    while True:
        record, _ = await run_in_threadpool(read_record, services, caller, job_id)
        if record.status.terminal:
            return record
        remaining = deadline - time.monotonic()
        if remaining <= 0 or await request.is_disconnected():
            raise HttpError(
                504,
                "timeout",
                f"the caption job {job_id} did not finish within {timeout:g} s; it was not canceled and"
                f" keeps running: poll GET /jobs/{job_id} for its caption, or cancel it with"
                f" POST /jobs/{job_id}/cancel",
                param=None,
                headers={"X-Job-Id": job_id},
            )
        await asyncio.sleep(min(interval, remaining))
        interval = min(interval * 2, POLL_MAX_SECONDS)


def _completion_tokens(services: Services, job_id: str) -> int:
    try:
        payload = json.loads(services.files.result_json(job_id).read_text(encoding="utf-8"))
        return len(payload.get("tokens", []))
    except (OSError, ValueError):
        return 0


@router.post(
    "/chat/completions",
    response_model=ChatCompletion,
    responses=error_responses(400, 401, 404, 409, 413, 415, 500, 503, 504),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": inline_schema(ChatCompletionRequest)}},
        }
    },
)
async def chat_completions(
    request: Request, services: ServicesDep, caller: OpenAICaller, idempotency_key: IdempotencyKey
) -> ChatCompletion:
    """Caption the one video of the user message (text in that message conditions the caption)."""
    fields = parse_json_object(await read_body(request, body_limit(services.settings)))
    try:
        body = ChatCompletionRequest.model_validate(fields)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from exc
    model, job_id = await run_in_threadpool(_submit, services, caller, idempotency_key, body)
    record = await _wait(services, caller, job_id, request)
    if record.status != JobStatus.succeeded or record.result is None:
        raise failed_job_error(job_id, record.error)
    tokens = await run_in_threadpool(_completion_tokens, services, job_id)
    return ChatCompletion(
        id=f"chatcmpl-{job_id}",
        created=int(record.created_at.timestamp()),
        model=model.id,
        choices=[ChatChoice(message=ChatMessageOut(content=record.result.caption or ""))],
        usage=Usage(prompt_tokens=0, completion_tokens=tokens, total_tokens=tokens),
        job_id=job_id,
    )
