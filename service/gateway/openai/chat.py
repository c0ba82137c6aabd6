"""``/v1/chat/completions``: captioning one video, the way video-language servers take it.

The user message carries the video as a content part ``{"type": "video_url", "video_url": {"url":
"data:video/mp4;base64,..."}}`` and optionally text, which conditions the caption (the native caption
job's ``prompt``). The route submits a native caption job through the same use cases as ``POST
/caption`` and waits for it: the caption is the assistant's message. After ``chat_timeout_seconds`` it
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
from typing import Any

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from service.contract.schemas import JobRecord, JobStatus, ServedModel
from service.contract.settings import Settings
from service.gateway.dependencies import Caller, IdempotencyKey, Services, ServicesDep
from service.gateway.errors import HttpError, failed_job_error
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
POLL_FIRST_SECONDS = 0.05
POLL_MAX_SECONDS = 0.5


def body_limit(settings: Settings) -> int:
    """The largest chat request: a base64 video of ``max_upload_bytes`` plus the JSON around it."""
    return settings.max_upload_bytes * 4 // 3 + JSON_OVERHEAD_BYTES


def _bad(message: str, param: str | None, code: str = "invalid_parameter") -> HttpError:
    return HttpError(422, code, message, param=param)


def _video_and_text(body: ChatCompletionRequest) -> tuple[str, str, str | None]:
    """(the video's URL, its JSON path for errors, the text of its message or None)."""
    found: list[tuple[str, str, int]] = []
    for m, message in enumerate(body.messages):
        if not isinstance(message.content, list):
            continue
        for p, part in enumerate(message.content):
            path = f"messages[{m}].content[{p}]"
            if part.type == "video_url":
                if message.role != "user":
                    raise _bad(f"{path}: a video must be in a user message, not {message.role!r}", path)
                video_url = part.video_url  # {"url": ...} as OpenAI-style servers take it, or a bare string
                url = video_url if video_url is None or isinstance(video_url, str) else video_url.url
                if not url:
                    raise _bad(f"{path}.video_url.url: field required", f"{path}.video_url.url")
                found.append((url, f"{path}.video_url.url", m))
            elif part.type in ("image_url", "input_image", "input_audio", "file"):
                raise _bad(f"{path}: {part.type} parts are not supported; send one video_url part", path)
    if len(found) != 1:
        raise _bad(
            "send exactly one video, as a content part of a user message:"
            ' {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,..."}}'
            f" (found {len(found)})",
            "messages",
        )
    url, path, index = found[0]
    content = body.messages[index].content
    assert isinstance(content, list)
    texts = [part.text.strip() for part in content if part.type == "text" and part.text and part.text.strip()]
    return url, path, " ".join(texts) or None


def _decode_data_url(url: str, param: str, max_bytes: int) -> bytes:
    """The bytes of a ``data:[<type>];base64,<data>`` URL; any other URL is refused (no network)."""
    if not url.startswith("data:"):
        scheme = url.split(":", 1)[0] if ":" in url else "a relative"
        raise _bad(
            f"only data: URLs are accepted (data:video/mp4;base64,...): this service has no network access"
            f" to fetch {scheme} URLs; inline the video instead",
            param,
            code="unsupported_url",
        )
    header, comma, data = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise _bad("the data: URL must be base64-encoded (data:video/mp4;base64,...)", param)
    compact = "".join(data.split())
    if len(compact) * 3 // 4 > max_bytes + 2:
        raise HttpError(413, "payload_too_large", f"the video exceeds {max_bytes} bytes", param=param)
    try:
        video = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _bad(f"the data: URL is not valid base64: {exc}", param) from exc
    if len(video) > max_bytes:
        raise HttpError(413, "payload_too_large", f"the video exceeds {max_bytes} bytes", param=param)
    if not video:
        raise _bad("the data: URL holds no video", param)
    return video


def _caption_params(services: Services, body: ChatCompletionRequest, prompt: str | None) -> dict[str, Any]:
    """The native caption job's options, validated by the native route's request model."""
    tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    fields = {
        "prompt": prompt,
        "steps": body.steps,
        "max_tokens": tokens,
        "seed": body.seed,
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
    url, param, prompt = _video_and_text(body)
    video = _decode_data_url(url, param, services.settings.max_upload_bytes)
    params = _caption_params(services, body, prompt)
    job_id = new_job_id()
    upload = services.files.upload(job_id)
    upload.write_bytes(video)
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
