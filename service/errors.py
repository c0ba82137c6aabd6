"""The one mapping from exceptions to HTTP answers, all in the envelope {"error": {code, message, param}}."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError as RedisOutOfMemoryError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

from model.errors import InvalidVideoError, UniViGUError, VideoTooLargeError
from service.jobs import IdempotencyConflict, JobNotFound
from service.queue import QueueFull
from service.ratelimit import RateLimited
from service.schemas import ErrorEnvelope, ErrorInfo

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


class ApiError(Exception):
    """An error the gateway answers on purpose."""

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


def envelope(status: int, code: str, message: str, param: str | None = None, **kwargs: Any) -> JSONResponse:
    body = ErrorEnvelope(error=ErrorInfo(code=code, message=message, param=param))
    return JSONResponse(body.model_dump(), status_code=status, **kwargs)


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
        message = f"{message} (got {error['input']!r})"
    return f"{param}: {message}" if param else message


def validation_error(errors: list[dict[str, Any]]) -> JSONResponse:
    """422 naming the first bad field; the message lists every problem."""
    first = errors[0]
    if first["type"] == "json_invalid":
        return envelope(
            400, "invalid_json", f"the body is not valid JSON: {first.get('ctx', {}).get('error')}"
        )
    message = "; ".join(_validation_message(error) for error in errors)
    return envelope(422, "invalid_parameter", message, _validation_param(tuple(first.get("loc", ()))))


def install_error_handlers(app: FastAPI, *, retry_after_seconds: int) -> None:
    unavailable = {"Retry-After": str(retry_after_seconds)}

    async def api_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        return envelope(exc.status, exc.code, exc.message, exc.param, headers=exc.headers)

    async def request_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return validation_error(list(exc.errors()))

    async def http_exception(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code = _STATUS_CODES.get(exc.status_code, "http_error")
        return envelope(exc.status_code, code, str(exc.detail), headers=exc.headers)

    async def job_not_found(request: Request, exc: Exception) -> JSONResponse:
        return envelope(404, "job_not_found", str(exc), "id")

    async def idempotency_conflict(request: Request, exc: Exception) -> JSONResponse:
        return envelope(422, "idempotency_key_reused", str(exc), "Idempotency-Key")

    async def queue_full(request: Request, exc: Exception) -> JSONResponse:
        return envelope(503, "queue_full", str(exc), headers=unavailable)

    async def rate_limited(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RateLimited)
        return envelope(429, "rate_limited", str(exc), headers={"Retry-After": str(exc.retry_after_seconds)})

    async def redis_down(request: Request, exc: Exception) -> JSONResponse:
        log.warning("Redis unreachable: %s", exc)
        return envelope(
            503, "redis_unavailable", "the job store is unreachable; retry later", headers=unavailable
        )

    async def redis_full(request: Request, exc: Exception) -> JSONResponse:
        log.error("Redis is out of memory (maxmemory-policy noeviction): %s", exc)
        return envelope(
            503, "redis_full", "the job store is full; retry once finished jobs expire", headers=unavailable
        )

    async def model_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, UniViGUError)
        status = (
            415 if isinstance(exc, InvalidVideoError) and not isinstance(exc, VideoTooLargeError) else 422
        )
        return envelope(status, exc.code, exc.message, exc.param)

    async def internal(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return envelope(500, "internal_error", "internal server error")

    app.add_exception_handler(ApiError, api_error)
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
