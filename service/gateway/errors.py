"""The one mapping from exceptions to HTTP answers.

Every handler here decides an :class:`ErrorReply` (status, code, message, param, headers); the reply is
then written as the native envelope ``{"error": {code, message, param}}``, or, for a path under a
prefix given to :func:`install_error_handlers` (the OpenAI-compatible layer's ``/v1/``), by that
prefix's renderer. Renderers change the body's shape only; which error gets which status and code is
decided here and nowhere else.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError as RedisOutOfMemoryError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

from model.errors import InvalidParameterError, InvalidVideoError, UniViGUError, VideoTooLargeError
from service.contract.errors import IdempotencyConflict, JobNotFound, QueueFull, RateLimited
from service.contract.schemas import ErrorEnvelope, ErrorInfo

log = logging.getLogger(__name__)

_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_parameter",
    429: "rate_limited",
    503: "unavailable",
}


class HttpError(Exception):
    """An HTTP answer the gateway gives on purpose (status, code, message); raised by routes."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param
        self.headers = headers


@dataclass(frozen=True)
class ErrorReply:
    """An error answer before it is written: what every handler decides."""

    status: int
    code: str
    message: str
    param: str | None = None
    headers: Mapping[str, str] | None = None


Renderer = Callable[[ErrorReply], JSONResponse]


def envelope(status: int, code: str, message: str, param: str | None = None, **kwargs: Any) -> JSONResponse:
    body = ErrorEnvelope(error=ErrorInfo(code=code, message=message, param=param))
    return JSONResponse(body.model_dump(), status_code=status, **kwargs)


def render_native(reply: ErrorReply) -> JSONResponse:
    return envelope(reply.status, reply.code, reply.message, reply.param, headers=reply.headers)


QUOTE_CHARS = 80
"""The most characters of a client's input an error message quotes; the rest is left out, its length said."""


def quote_input(value: object) -> str:
    """``value`` as an error message quotes it: its repr, cut to :data:`QUOTE_CHARS` with the full length
    stated, so a long input (a 100 KB prompt) is never echoed whole."""
    text = repr(value)
    if len(text) <= QUOTE_CHARS:
        return text
    length = (
        f"{len(value)} characters" if isinstance(value, str | bytes) else f"{len(text)} characters as text"
    )
    return f"{text[:QUOTE_CHARS]}… ({length})"


def _validation_param(loc: tuple[Any, ...]) -> str | None:
    parts = [str(part) for part in loc if part not in ("body", "query", "path", "header", "form")]
    return ".".join(parts) or None


def _validation_message(error: dict[str, Any]) -> str:
    param = _validation_param(tuple(error.get("loc", ())))
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "missing":
        return f"{param}: field required"
    if error["type"] == "extra_forbidden":
        return f"{param}: unknown field"
    if "input" in error and not isinstance(error["input"], dict | list):
        message = f"{message} (got {quote_input(error['input'])})"
    return f"{param}: {message}" if param else message


def validation_reply(errors: list[dict[str, Any]]) -> ErrorReply:
    """422 naming the first bad field; the message lists every problem."""
    first = errors[0]
    if first["type"] == "json_invalid":
        return ErrorReply(
            400, "invalid_json", f"the body is not valid JSON: {first.get('ctx', {}).get('error')}"
        )
    message = "; ".join(_validation_message(error) for error in errors)
    return ErrorReply(422, "invalid_parameter", message, _validation_param(tuple(first.get("loc", ()))))


def model_error_status(error: type[UniViGUError]) -> int:
    """415 for a file that is not a usable video, 422 for every other model error."""
    return 415 if issubclass(error, InvalidVideoError) and not issubclass(error, VideoTooLargeError) else 422


def _model_error_classes() -> dict[str, type[UniViGUError]]:
    found: dict[str, type[UniViGUError]] = {}
    pending: list[type[UniViGUError]] = [UniViGUError]
    while pending:
        cls = pending.pop()
        found.setdefault(cls.code, cls)
        pending.extend(cls.__subclasses__())
    return found


def failed_job_error(job_id: str, error: ErrorInfo | None) -> HttpError:
    """The HTTP answer for a job that ended without a result, for routes that wait for one (the
    OpenAI-compatible chat completions). The request's fault (a parameter or input video the model
    refused) answers as the same error raised at the gateway would (422, or 415 for an unusable video);
    a canceled job 409; anything else (worker_lost, gpu_oom, timeout, storage_error, internal_error)
    500 with the job's code. The message names the job so that it can be looked up."""
    code = error.code if error else "internal_error"
    message = f"job {job_id}: {error.message if error else 'failed without an error record'}"
    param = error.param if error else None
    if code == "canceled":
        return HttpError(409, "job_canceled", message, param="id")
    cls = _model_error_classes().get(code)
    if cls is not None and issubclass(cls, InvalidParameterError | InvalidVideoError):
        return HttpError(model_error_status(cls), code, message, param=param)
    return HttpError(500, code, message, param=param)


def install_error_handlers(
    app: FastAPI, *, retry_after_seconds: int, renderers: Mapping[str, Renderer] | None = None
) -> None:
    """Register every handler. ``renderers`` maps a path prefix (e.g. ``/v1/``) to the renderer of the
    error answers under it; every other path gets the native envelope."""
    unavailable = {"Retry-After": str(retry_after_seconds)}
    by_prefix = dict(renderers or {})

    def render(request: Request, reply: ErrorReply) -> JSONResponse:
        path = request.scope.get("path", "")
        path = path.removeprefix(request.scope.get("root_path", "")) or path
        for prefix, renderer in by_prefix.items():
            if path.startswith(prefix):
                return renderer(reply)
        return render_native(reply)

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HttpError)
        return render(request, ErrorReply(exc.status, exc.code, exc.message, exc.param, exc.headers))

    async def request_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return render(request, validation_reply(list(exc.errors())))

    async def http_exception(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code = _STATUS_CODES.get(exc.status_code, "http_error")
        return render(request, ErrorReply(exc.status_code, code, str(exc.detail), headers=exc.headers))

    async def job_not_found(request: Request, exc: Exception) -> JSONResponse:
        return render(request, ErrorReply(404, "job_not_found", str(exc), "id"))

    async def idempotency_conflict(request: Request, exc: Exception) -> JSONResponse:
        return render(request, ErrorReply(422, "idempotency_key_reused", str(exc), "Idempotency-Key"))

    async def queue_full(request: Request, exc: Exception) -> JSONResponse:
        return render(request, ErrorReply(503, "queue_full", str(exc), headers=unavailable))

    async def rate_limited(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RateLimited)
        retry = {"Retry-After": str(exc.retry_after_seconds)}
        return render(request, ErrorReply(429, exc.code, str(exc), headers=retry))

    async def redis_down(request: Request, exc: Exception) -> JSONResponse:
        log.warning("Redis unreachable: %s", exc)
        message = "the job store is unreachable; retry later"
        return render(request, ErrorReply(503, "redis_unavailable", message, headers=unavailable))

    async def redis_full(request: Request, exc: Exception) -> JSONResponse:
        log.error("Redis is out of memory (maxmemory-policy noeviction): %s", exc)
        message = "the job store is full; retry once finished jobs expire"
        return render(request, ErrorReply(503, "redis_full", message, headers=unavailable))

    async def model_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, UniViGUError)
        return render(request, ErrorReply(model_error_status(type(exc)), exc.code, exc.message, exc.param))

    async def internal(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return render(request, ErrorReply(500, "internal_error", "internal server error"))

    app.add_exception_handler(HttpError, http_error)
    app.add_exception_handler(RequestValidationError, request_validation)
    app.add_exception_handler(StarletteHTTPException, http_exception)
    app.add_exception_handler(JobNotFound, job_not_found)
    app.add_exception_handler(IdempotencyConflict, idempotency_conflict)
    app.add_exception_handler(QueueFull, queue_full)
    app.add_exception_handler(RateLimited, rate_limited)
    app.add_exception_handler(RedisConnectionError, redis_down)
    app.add_exception_handler(RedisTimeoutError, redis_down)
    app.add_exception_handler(RedisOutOfMemoryError, redis_full)
    app.add_exception_handler(UniViGUError, model_error)
    app.add_exception_handler(Exception, internal)
